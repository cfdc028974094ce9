"""`rlhf pairs`: AI-feedback preference data.

Sample K responses per prompt from a policy, score each with a judge (the default programmatic judge,
a Python function, or a reward model), and keep the best and worst of each prompt as chosen/rejected.
This is how the default demo gets preference data without human labellers.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rlhf.config import PairsConfig
from rlhf.data.formats import last_user_text
from rlhf.judge import make_judge
from rlhf.outputs import StageOutput
from rlhf.paths import write_file

log = logging.getLogger("rlhf.pairs")

PAIRS_FILE = "pairs.jsonl"


@dataclass
class Pair:
    prompt: str
    messages: list[dict]
    chosen: str
    rejected: str
    chosen_score: float
    rejected_score: float


def pick_pair(texts: list[str], values: list[float], *, min_score_gap: float = 0.0) -> tuple[int, int] | str:
    """One prompt's pair: the indices ``(best, worst)`` of its highest- and lowest-scored non-empty
    responses, or (a string) why it has none: fewer than two non-empty responses, best and worst the
    same text, or scores that differ by no more than ``min_score_gap``."""
    candidates = [i for i, text in enumerate(texts) if text.strip()]
    if len(candidates) < 2:
        return "fewer than 2 non-empty responses"
    best = max(candidates, key=lambda i: values[i])
    worst = min(candidates, key=lambda i: values[i])
    if texts[best].strip() == texts[worst].strip():
        return "identical responses"
    if values[best] - values[worst] <= min_score_gap:
        return f"score gap <= {min_score_gap:g}"
    return best, worst


def select_pairs(prompts: list[str], messages: list[list[dict]], responses: list[list[str]],
                 scores: list[list[float]], *, min_score_gap: float = 0.0) -> tuple[list[Pair], Counter]:
    """For each prompt, the highest-scored response is chosen and the lowest rejected (:func:`pick_pair`;
    empty responses are left out, since a record needs text on both sides); the counter says how many
    prompts yield no pair, and why."""
    pairs, dropped = [], Counter()
    for prompt, convo, texts, values in zip(prompts, messages, responses, scores):
        picked = pick_pair(texts, values, min_score_gap=min_score_gap)
        if isinstance(picked, str):
            dropped[picked] += 1
            continue
        best, worst = picked
        pairs.append(Pair(prompt, convo, texts[best], texts[worst], values[best], values[worst]))
    return pairs, dropped


def write_pairs(pairs: list[Pair], path: Path) -> Path:
    """JSONL in the prompt/chosen/rejected layout the rm stage reads; written to a temp name first."""
    def write(tmp: Path) -> None:
        with tmp.open("w") as f:
            for pair in pairs:
                f.write(json.dumps({
                    "prompt": pair.messages if len(pair.messages) > 1 else pair.prompt,
                    "chosen": pair.chosen,
                    "rejected": pair.rejected,
                    "chosen_score": round(pair.chosen_score, 4),
                    "rejected_score": round(pair.rejected_score, 4),
                }) + "\n")

    return write_file(path, write)


def run(cfg: PairsConfig) -> Path:
    """Generate, judge and write ``<output_dir>/pairs.jsonl``."""
    from actors.rollout import RolloutGroup
    from cluster.runtime import init_ray
    from rlhf.data import load_prompt_data
    from rlhf.models import load_tokenizer, resolve_model_path

    output = StageOutput(cfg, "pairs")  # refuses before anything loads
    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    # Pairs are made from the training prompts; the held-out ones stay unseen for evaluation.
    items, _ = load_prompt_data(cfg.data, tokenizer, seed=cfg.seed, phase=1)
    judge = make_judge(cfg.judge)
    out = output.begin()

    init_ray(cfg.ray)
    sampling = cfg.rollout.sampling.model_copy(update={"seed": cfg.seed})
    engines = RolloutGroup(cfg.model.model_copy(update={"path": model_path}), cfg.rollout, seed=cfg.seed,
                           resource_timeout_s=cfg.ray.resource_timeout_s)
    try:
        samples = engines.generate([item["prompt_ids"] for item in items], sampling)
    finally:
        engines.shutdown()

    k = sampling.n
    prompts = [last_user_text(item["messages"]) for item in items]
    responses = [[s.text for s in samples[i * k:(i + 1) * k]] for i in range(len(items))]
    flat_scores = judge([p for p in prompts for _ in range(k)], [r for group in responses for r in group])
    scores = [flat_scores[i * k:(i + 1) * k] for i in range(len(items))]
    pairs, dropped = select_pairs(prompts, [item["messages"] for item in items], responses, scores,
                                  min_score_gap=cfg.min_score_gap)
    if dropped:
        log.warning("pairs: dropped %d of %d prompts: %s", sum(dropped.values()), len(items),
                    ", ".join(f"{n} {why}" for why, n in dropped.items()))
    if not pairs:
        raise RuntimeError(f"no pairs: every prompt was dropped ({dict(dropped)})")
    path = write_pairs(pairs, out / PAIRS_FILE)
    gap = sum(p.chosen_score - p.rejected_score for p in pairs) / len(pairs)
    log.info("pairs: wrote %d pairs to %s (mean judge gap %.3f)", len(pairs), path, gap)
    output.finish()
    return path
