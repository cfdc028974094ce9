"""`rlhf eval`: did alignment work? The policy versus the reference (the model before RL) on
held-out prompts.

Per model: mean judge score and reward-model score with 95% confidence intervals, KL(model ||
reference) estimated on the model's own samples, mean response length and distinct-n, and (with
``sft_data``) perplexity on held-out SFT responses. Between them: the policy's win rate over the
reference (same prompt; the judge decides; ties count half). With ``preference_data``: the reward
model's accuracy on held-out pairs. Writes ``eval.json`` (``before``/``after`` blocks with ``judge``,
``reward``, ``kl``, ``perplexity``; ``reward_model`` with ``accuracy``), ``eval.md`` with sample
responses side by side, and ``eval.png`` (score distributions; reward and KL curves of the PPO run
when ``ppo_metrics`` is given).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from rlhf.config import EvalConfig, ModelConfig, RolloutConfig, save_config
from rlhf.paths import write_atomic

log = logging.getLogger("rlhf.eval")


# --------------------------------------------------------------------------------------------------
# Metrics (pure)
# --------------------------------------------------------------------------------------------------


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal confidence interval (0 for fewer than two values)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, 1.96 * math.sqrt(var / n)


def win_rate(policy: list[float], reference: list[float]) -> dict[str, float]:
    """Share of prompts where the policy's score beats the reference's; ties count half."""
    wins = sum(p > r for p, r in zip(policy, reference))
    ties = sum(p == r for p, r in zip(policy, reference))
    n = len(policy)
    return {"win_rate": (wins + 0.5 * ties) / n, "wins": wins, "ties": ties, "losses": n - wins - ties}


def distinct_n(texts: list[str], n: int) -> float:
    """Unique word n-grams over all n-grams across ``texts`` (diversity; 0 when there are none)."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def response_perplexity(model, items: list[dict], pad_id: int, batch_size: int = 8) -> dict[str, float]:
    """Perplexity of a causal LM on SFT items ``{"input_ids", "labels"}`` (labels -100 on the prompt):
    exp of the mean next-token NLL over all response tokens of all items (token-weighted, so long
    responses count for more, as in the SFT stage's eval/perplexity). Returns perplexity, nll, tokens."""
    from rlhf.algorithms.losses import ptx_loss
    from rlhf.data.tokenize import collate_sft
    from rlhf.sft import labelled_tokens

    device = next(model.parameters()).device
    nll_sum, tokens = 0.0, 0
    for start in range(0, len(items), batch_size):
        batch = {k: v.to(device) for k, v in collate_sft(items[start:start + batch_size], pad_id).items()}
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        count = labelled_tokens(batch["labels"])
        nll_sum += ptx_loss(logits, batch["labels"]).item() * count  # ptx_loss is the mean over labelled tokens
        tokens += count
    if not tokens:
        raise ValueError("perplexity: the held-out SFT items have no response tokens")
    nll = nll_sum / tokens
    return {"perplexity": math.exp(nll), "nll": nll, "tokens": tokens}


def reward_model_accuracy(model, items: list[dict], pad_id: int, batch_size: int = 8) -> dict[str, float]:
    """A scalar-head reward model on preference items ``{"chosen_ids", "rejected_ids"}``: the share of
    pairs whose chosen sequence scores strictly higher (a tie counts as wrong, as in the rm stage) and
    the mean margin (chosen minus rejected)."""
    from rlhf.data.tokenize import collate_preferences
    from rlhf.models import sequence_scores

    if not items:
        raise ValueError("reward-model accuracy needs at least one pair")
    device = next(model.parameters()).device
    correct, margin_sum = 0, 0.0
    for start in range(0, len(items), batch_size):
        batch = collate_preferences(items[start:start + batch_size], pad_id)
        with torch.no_grad():
            scores = sequence_scores(model, batch["input_ids"].to(device), batch["attention_mask"].to(device)).float()
        chosen, rejected = scores.chunk(2)  # rows [:batch] chosen, [batch:] rejected
        correct += int((chosen > rejected).sum())
        margin_sum += float((chosen - rejected).sum())
    return {"accuracy": correct / len(items), "margin": margin_sum / len(items), "pairs": len(items)}


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Per-sequence KL estimate (sum of k1 = log p - log q over response tokens), on samples from p.
    All (batch, seq); returns one float per row."""
    return ((logprobs - ref_logprobs) * mask).sum(-1).tolist()


# --------------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------------


def _generate(model: ModelConfig, prompt_ids: list[list[int]], cfg: EvalConfig):
    from actors.rollout import RolloutGroup

    rollout = RolloutConfig(backend=cfg.backend, engines=1, sampling=cfg.sampling)
    engines = RolloutGroup(model, rollout, seed=cfg.seed, resource_timeout_s=cfg.ray.resource_timeout_s)
    try:
        return engines.generate(prompt_ids, cfg.sampling.model_copy(update={"seed": cfg.seed}))
    finally:
        engines.shutdown()


def _kl_to_reference(samples, reference_model, pad_id: int, temperature: float) -> list[float]:
    """KL(model || reference) per sample: the engine's (processed) logprobs against the reference's at
    the same temperature."""
    from actors.rollout import samples_to_batch
    from rlhf.algorithms import causal_lm_logprobs

    kls = []
    for start in range(0, len(samples), 16):
        batch = samples_to_batch(samples[start:start + 16], pad_id)
        with torch.no_grad():
            ref = causal_lm_logprobs(reference_model, batch["input_ids"], batch["attention_mask"], temperature)
        kls += sequence_kl(batch["logprobs"], ref.float(), batch["action_mask"])
    return kls


def _held_out(kind: str, data, tokenizer, seed: int, field: str) -> list[dict]:
    """The held-out part of a stage's data section, split and tokenised exactly as that stage does."""
    from rlhf.data import load_preference_data, load_sft_data

    loader = load_sft_data if kind == "sft" else load_preference_data
    _, items = loader(data, tokenizer, seed=seed)
    if not items:
        raise ValueError(f"{field}: no held-out records from {data.train_path}; set {field}.eval_path "
                         f"or {field}.eval_fraction > 0")
    return items


def _block(texts: list[str], judge: list[float], reward: list[float] | None, kl: list[float],
           perplexity: dict | None) -> dict:
    judge_mean, judge_ci = mean_ci(judge)
    block = {"judge": judge_mean, "judge_ci95": judge_ci, "kl": sum(kl) / len(kl),
             "perplexity": perplexity["perplexity"] if perplexity else None,
             "length_words": sum(len(t.split()) for t in texts) / len(texts),
             "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2)}
    if reward is not None:
        block["reward"], block["reward_ci95"] = mean_ci(reward)
    else:
        block["reward"] = None
    return block


def evaluate(cfg: EvalConfig) -> dict:
    """Generate with reference and policy, score, and compare. Returns the eval.json content."""
    from cluster.runtime import init_ray
    from rlhf.data import load_prompt_data
    from rlhf.data.formats import last_user_text
    from rlhf.judge import RewardModelJudge, make_judge
    from rlhf.models import load_causal_lm, load_tokenizer, resolve_model_path

    policy = cfg.policy.model_copy(update={"path": resolve_model_path(cfg.policy.path)})
    reference = cfg.reference.model_copy(update={"path": resolve_model_path(cfg.reference.path)})
    tokenizer = load_tokenizer(reference.path, trust_remote_code=reference.trust_remote_code)
    _, held_out = load_prompt_data(cfg.data, tokenizer, seed=cfg.seed, phase=2)
    if not held_out:
        raise ValueError("no held-out prompts: set data.eval_path or data.eval_fraction > 0")
    held_out = held_out[: cfg.max_prompts]
    prompt_ids = [p["prompt_ids"] for p in held_out]
    prompts = [last_user_text(p["messages"]) for p in held_out]

    init_ray(cfg.ray)
    before_samples = _generate(reference, prompt_ids, cfg)
    after_samples = _generate(policy, prompt_ids, cfg)
    before = [s.text for s in before_samples]
    after = [s.text for s in after_samples]

    judge = make_judge(cfg.judge)
    judge_before, judge_after = judge(prompts, before), judge(prompts, after)
    reward_before = reward_after = accuracy = None
    if cfg.reward.path:
        scorer = RewardModelJudge(ModelConfig(path=cfg.reward.path, device="cpu"))
        reward_before, reward_after = scorer(prompts, before), scorer(prompts, after)
        if cfg.preference_data is not None:
            pairs = _held_out("preference", cfg.preference_data, scorer.tokenizer, cfg.seed, "preference_data")
            accuracy = reward_model_accuracy(scorer.model, pairs, scorer.tokenizer.pad_token_id)
        del scorer

    reference_model = load_causal_lm(reference.model_copy(update={"device": "cpu"})).eval()
    temperature = cfg.sampling.temperature or 1.0
    kl_before = _kl_to_reference(before_samples, reference_model, tokenizer.pad_token_id, temperature)
    kl_after = _kl_to_reference(after_samples, reference_model, tokenizer.pad_token_id, temperature)
    perplexity_before = perplexity_after = None
    if cfg.sft_data is not None:
        sft_items = _held_out("sft", cfg.sft_data, tokenizer, cfg.seed, "sft_data")
        perplexity_before = response_perplexity(reference_model, sft_items, tokenizer.pad_token_id)
        del reference_model
        policy_model = load_causal_lm(policy.model_copy(update={"device": "cpu"})).eval()
        perplexity_after = response_perplexity(policy_model, sft_items, tokenizer.pad_token_id)
        del policy_model

    result = {
        "prompts": len(prompts),
        "before": _block(before, judge_before, reward_before, kl_before, perplexity_before),
        "after": _block(after, judge_after, reward_after, kl_after, perplexity_after),
        "policy_vs_reference": win_rate(judge_after, judge_before),
        "perplexity_tokens": perplexity_before["tokens"] if perplexity_before else None,
        "reward_model": accuracy,
    }
    flags = []
    if reward_after is not None and result["after"]["reward"] > result["before"]["reward"] \
            and result["after"]["judge"] < result["before"]["judge"]:
        flags.append("reward rose while the independent judge's score fell: possible reward hacking")
    if result["after"]["kl"] > cfg.kl_threshold:
        flags.append(f"KL to the reference {result['after']['kl']:.2f} exceeds kl_threshold {cfg.kl_threshold:g}")
    result["flags"] = flags
    result["samples"] = [
        {"prompt": p, "before": b, "after": a, "judge_before": jb, "judge_after": ja}
        for p, b, a, jb, ja in zip(prompts, before, after, judge_before, judge_after)
    ]
    result["_scores"] = {"judge_before": judge_before, "judge_after": judge_after,
                         "reward_before": reward_before, "reward_after": reward_after}
    return result


def write_report(result: dict, out: Path, ppo_metrics: str | None = None) -> None:
    """eval.json, eval.md and eval.png, each written to a temp name first."""
    scores = result.pop("_scores")
    write_atomic(out / "eval.json", json.dumps(result, indent=2))

    def fmt(value, ci=None):
        if value is None:
            return "-"
        return f"{value:.3f}" + (f" ± {ci:.3f}" if ci else "")

    b, a = result["before"], result["after"]
    lines = [
        "# Evaluation: policy versus reference", "",
        f"{result['prompts']} held-out prompts. Win rate of the policy over the reference (judge): "
        f"**{result['policy_vs_reference']['win_rate']:.1%}**.", "",
        "| | judge | reward | KL to reference | words | distinct-1 | distinct-2 | perplexity |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, block in (("before (reference)", b), ("after (policy)", a)):
        lines.append(f"| {name} | {fmt(block['judge'], block['judge_ci95'])} | "
                     f"{fmt(block['reward'], block.get('reward_ci95'))} | {block['kl']:.3f} | "
                     f"{block['length_words']:.1f} | {block['distinct_1']:.3f} | {block['distinct_2']:.3f} | "
                     f"{fmt(block['perplexity'])} |")
    if result["perplexity_tokens"]:
        lines += ["", f"Perplexity: exp of the mean NLL over {result['perplexity_tokens']} response tokens "
                      "of the held-out SFT records."]
    if result["reward_model"]:
        rm = result["reward_model"]
        lines += ["", f"Reward model: **{rm['accuracy']:.1%}** accuracy on {rm['pairs']} held-out pairs "
                      f"(chosen scored higher), mean margin {rm['margin']:.3f}."]
    if result["flags"]:
        lines += ["", "**Warnings:**", *[f"- {flag}" for flag in result["flags"]]]
    lines += ["", "## Sample responses", "", "| prompt | before | after |", "|---|---|---|"]
    for sample in result["samples"][:10]:
        cells = [sample["prompt"], sample["before"], sample["after"]]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ")[:300] for c in cells) + " |")
    write_atomic(out / "eval.md", "\n".join(lines) + "\n")
    plot(scores, out / "eval.png", ppo_metrics)


def plot(scores: dict, path: Path, ppo_metrics: str | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rlhf.metrics import read_metrics
    from rlhf.plots import save_figure, series

    curves = read_metrics(ppo_metrics) if ppo_metrics and Path(ppo_metrics).is_file() else []
    columns = 2 if curves else 1
    figure, axes = plt.subplots(1, columns + (1 if scores["reward_before"] else 0), figsize=(5 * (columns + 1), 4))
    axes = list(axes) if hasattr(axes, "__len__") else [axes]
    axes[0].hist([scores["judge_before"], scores["judge_after"]], bins=15, label=["before", "after"])
    axes[0].set(title="Judge score", xlabel="score", ylabel="responses")
    axes[0].legend()
    next_axis = 1
    if scores["reward_before"]:
        axes[1].hist([scores["reward_before"], scores["reward_after"]], bins=15, label=["before", "after"])
        axes[1].set(title="Reward-model score", xlabel="score")
        axes[1].legend()
        next_axis = 2
    if curves:
        ax = axes[next_axis]
        ax.plot(*series(curves, "reward/mean"), color="tab:blue", label="reward/mean")
        ax.set(title="PPO", xlabel="step")
        ax.set_ylabel("reward/mean", color="tab:blue")
        twin = ax.twinx()
        twin.plot(*series(curves, "kl/mean"), color="tab:red", label="kl/mean")
        twin.set_ylabel("kl/mean", color="tab:red")
    figure.tight_layout()
    save_figure(figure, path)
    plt.close(figure)


def run(cfg: EvalConfig) -> Path:
    out = Path(cfg.output_dir)
    save_config(cfg, out)
    result = evaluate(cfg)
    write_report(result, out, cfg.ppo_metrics)
    b, a = result["before"], result["after"]
    log.info("eval: judge %.3f -> %.3f, reward %s -> %s, KL %.3f -> %.3f, perplexity %s -> %s, win rate %.1f%%, "
             "reward-model accuracy %s", b["judge"], a["judge"], b["reward"], a["reward"], b["kl"], a["kl"],
             b["perplexity"], a["perplexity"], 100 * result["policy_vs_reference"]["win_rate"],
             result["reward_model"] and result["reward_model"]["accuracy"])
    return out / "eval.json"
