"""`rlhf eval`: did alignment work? The policy versus the reference (the model before RL) on
held-out prompts.

Sampling: ``sampling.n`` samples per prompt from each model, both with the same seeds (sample ``j`` of
prompt ``i`` draws from the same random numbers in both models: common random numbers), so samples are
paired per (prompt, sample index). The unit of every interval is the prompt: a prompt's score is the
mean over its ``n`` samples, and bootstrap intervals resample prompts (``bootstrap_resamples`` times,
seeded by ``seed``).

Per model (``before`` = reference, ``after`` = policy): mean judge score and reward-model score with 95%
intervals (normal, over prompt means), the reference's best-of-n under the judge (mean over prompts of
the best of its ``n`` samples: what the policy should approach), AFINN sentiment per word (a lexicon no
training stage uses), KL(model || reference) per sequence and per token on the model's own
samples, response length, distinct-1/2, the share of replies that finish (EOS or a stop, not cut at
``max_new_tokens``) and (with ``sft_data``) perplexity on held-out SFT responses. Between them: the
policy's win rate over the reference per prompt (ties count half) and the mean judge and AFINN gains,
each with a 95% bootstrap interval. With a reward model: its accuracy on pairs the judge labels among
the eval's own samples (Wilson interval), and with ``preference_data`` its accuracy on held-out pairs.
Flags: reward rising while the judge falls, KL above its thresholds, a judge gain below zero, and a
collapse of the text (distinct-2, finished share, length). Writes ``eval.json``, ``eval.md`` with
sample responses side by side, and ``eval.png`` (score distributions with the reference's best-of-n;
reward and KL curves of the PPO run when ``ppo_metrics`` is given).
"""

from __future__ import annotations

import functools
import json
import logging
import math
from pathlib import Path

import torch

from rlhf.config import EvalConfig, ModelConfig, RolloutConfig
from rlhf.outputs import StageOutput
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


def per_prompt(values: list, n: int) -> list[list]:
    """Prompt-major ``values`` (prompt ``i``'s samples at ``i * n ... i * n + n - 1``) as one list per prompt."""
    if n < 1 or len(values) % n:
        raise ValueError(f"{len(values)} values are not a whole number of prompts of {n} samples each")
    return [values[i:i + n] for i in range(0, len(values), n)]


def prompt_means(values: list[float], n: int) -> list[float]:
    """Each prompt's score: the mean over its ``n`` samples (``values`` prompt-major)."""
    return [sum(group) / n for group in per_prompt(values, n)]


def best_of_n(values: list[float], n: int) -> float:
    """Mean over prompts of the best of each prompt's ``n`` scores (``values`` prompt-major)."""
    groups = per_prompt(values, n)
    return sum(max(group) for group in groups) / len(groups)


def bootstrap_ci(values: list[float], *, resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile-bootstrap interval ``[lo, hi]`` of the mean of ``values`` (one per prompt): the
    2.5% and 97.5% quantiles of the means of ``resamples`` draws of ``len(values)`` values with
    replacement, from a generator seeded by ``seed`` (the same seed and values give the same interval)."""
    import numpy as np

    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("a bootstrap interval needs at least one value")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    chunk = max(1, 1_000_000 // x.size)  # at most a million drawn indices in memory at once
    for start in range(0, resamples, chunk):
        rows = min(chunk, resamples - start)
        means[start:start + rows] = x[rng.integers(0, x.size, size=(rows, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return [float(lo), float(hi)]


def paired_gain(after: list[float], before: list[float], *, resamples: int = 2000, seed: int = 0) -> dict:
    """``{"mean", "ci95"}``: the mean per-prompt difference ``after - before`` and its 95% bootstrap
    interval (:func:`bootstrap_ci` of the differences: a resample keeps a prompt's two scores together)."""
    diffs = [a - b for a, b in zip(after, before, strict=True)]
    return {"mean": sum(diffs) / len(diffs), "ci95": bootstrap_ci(diffs, resamples=resamples, seed=seed)}


def win_outcomes(policy: list[float], reference: list[float]) -> list[float]:
    """Per prompt: 1 when the policy's score beats the reference's, 0.5 for a tie, 0 for a loss."""
    return [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy, reference, strict=True)]


def win_rate(policy: list[float], reference: list[float]) -> dict[str, float]:
    """Share of prompts where the policy's score beats the reference's; ties count half (the mean of
    :func:`win_outcomes`)."""
    outcomes = win_outcomes(policy, reference)
    wins, ties = outcomes.count(1.0), outcomes.count(0.5)
    return {"win_rate": sum(outcomes) / len(outcomes), "wins": wins, "ties": ties,
            "losses": len(outcomes) - wins - ties}


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> list[float]:
    """Wilson score interval ``[lo, hi]`` of a binomial proportion (95% for z = 1.96). Unlike the normal
    interval it stays inside [0, 1] and has a width at 0 or ``trials`` successes:
    ``(p + z²/2t ± z·sqrt(p(1-p)/t + z²/4t²)) / (1 + z²/t)`` for ``p = successes / trials``."""
    if trials <= 0 or not 0 <= successes <= trials:
        raise ValueError(f"Wilson interval: {successes} successes in {trials} trials")
    p, z2 = successes / trials, z * z
    denominator = 1 + z2 / trials
    centre = (p + z2 / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / denominator
    return [max(0.0, centre - half), min(1.0, centre + half)]


def accuracy_block(correct: int, pairs: int) -> dict:
    """``{"accuracy", "accuracy_ci95" (Wilson), "correct", "pairs"}``; accuracy and interval None
    without pairs."""
    if not pairs:
        return {"accuracy": None, "accuracy_ci95": None, "correct": 0, "pairs": 0}
    return {"accuracy": correct / pairs, "accuracy_ci95": wilson_interval(correct, pairs), "correct": correct,
            "pairs": pairs}


def judge_labelled_accuracy(texts: list[list[str]], judge: list[list[float]], reward: list[list[float]], *,
                            min_judge_gap: float) -> dict:
    """A reward model's accuracy on pairs that the judge labels, one list per prompt of its responses,
    their judge scores and their reward-model scores. A prompt's pair is the judge's best and worst
    response, picked as the pairs stage picks the reward model's training pairs
    (:func:`rlhf.pairs.pick_pair`: non-empty, different texts, judge scores more than ``min_judge_gap``
    apart); it is right when the reward model scores the judge's best strictly higher (a tie is wrong,
    as in the rm stage). Returns :func:`accuracy_block`."""
    from rlhf.pairs import pick_pair

    correct = pairs = 0
    for responses, judged, rewarded in zip(texts, judge, reward, strict=True):
        picked = pick_pair(responses, judged, min_score_gap=min_judge_gap)
        if isinstance(picked, tuple):
            best, worst = picked
            pairs += 1
            correct += rewarded[best] > rewarded[worst]
    return accuracy_block(correct, pairs)


def distinct_n(texts: list[str], n: int) -> float:
    """Unique word n-grams over all n-grams across ``texts`` (diversity; 0 when there are none)."""
    grams = [tuple(words[i:i + n]) for words in (t.split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def finished_share(finish_reasons: list[str]) -> float:
    """Share of replies that ended on their own (``"stop"``: EOS, a stop string or a stop token id)
    rather than being cut at ``max_new_tokens`` (``"length"``)."""
    return sum(reason == "stop" for reason in finish_reasons) / len(finish_reasons)


def text_stats(texts: list[str], finish_reasons: list[str]) -> dict[str, float]:
    """Measures of degenerate text: mean length in (whitespace) words, distinct-1/2 and the finished share."""
    return {"length_words": sum(len(t.split()) for t in texts) / len(texts), "distinct_1": distinct_n(texts, 1),
            "distinct_2": distinct_n(texts, 2), "finished": finished_share(finish_reasons)}


def collapse_flags(before: dict, after: dict, *, distinct_2_drop: float, finished_drop: float,
                   min_words: float) -> list[str]:
    """Warnings that the policy's text degenerated, from the :func:`text_stats` of reference (``before``)
    and policy (``after``): distinct-2 below ``(1 - distinct_2_drop)`` times the reference's, the finished
    share down by more than ``finished_drop`` (absolute), or a mean length under ``min_words`` words."""
    flags = []
    if after["distinct_2"] < (1 - distinct_2_drop) * before["distinct_2"]:
        flags.append(f"collapse: distinct-2 fell from {before['distinct_2']:.3f} to {after['distinct_2']:.3f} "
                     f"(by more than collapse_distinct_2_drop {distinct_2_drop:g} of it): repetitive text")
    if before["finished"] - after["finished"] > finished_drop:
        flags.append(f"collapse: the share of replies that finish fell from {before['finished']:.1%} to "
                     f"{after['finished']:.1%} (by more than collapse_finished_drop {finished_drop:g}): "
                     "replies run on to max_new_tokens")
    if after["length_words"] < min_words:
        flags.append(f"collapse: the policy's replies average {after['length_words']:.1f} words, under "
                     f"collapse_min_words {min_words:g}")
    return flags


@functools.cache
def _afinn():
    from afinn import Afinn

    return Afinn()


def afinn_per_word(texts: list[str]) -> list[float]:
    """AFINN-165 sentiment of each reply per word: the sum of the lexicon's word valences (-5..5) divided by
    the reply's whitespace word count (0 for an empty reply), so a reply does not gain by being longer.
    A scorer that no training stage uses (the default judge and reward are VADER-based)."""
    return [_afinn().score(t) / len(t.split()) if t.split() else 0.0 for t in texts]


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
    pairs whose chosen sequence scores strictly higher (a tie counts as wrong, as in the rm stage) with
    its Wilson interval (:func:`accuracy_block`), and the mean margin (chosen minus rejected)."""
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
    return {**accuracy_block(correct, len(items)), "margin": margin_sum / len(items)}


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """Per-sequence KL estimate (sum of k1 = log p - log q over response tokens), on samples from p.
    All (batch, seq); returns one float per row."""
    return ((logprobs - ref_logprobs) * mask).sum(-1).tolist()


# --------------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------------


def differ_only_in_weights(a: str, b: str) -> bool:
    """Whether the model folders ``a`` and ``b`` hold the same files, byte for byte, but for their
    ``*.safetensors`` weights (a PPO run's ``final/`` beside the SFT model it started from), so that
    one engine can serve both by loading the other's weights. An adapter folder never qualifies."""
    def files(folder: str) -> dict[str, Path]:
        path = Path(folder)
        return {f.name: f for f in path.iterdir() if f.is_file()} if path.is_dir() else {}

    first, second = files(a), files(b)
    if not first or "adapter_config.json" in first or "adapter_config.json" in second:
        return False
    weights = [name for name in first if name.endswith(".safetensors")]
    others = sorted(name for name in first if not name.endswith(".safetensors"))
    return (bool(weights) and any(name.endswith(".safetensors") for name in second)
            and others == sorted(name for name in second if not name.endswith(".safetensors"))
            and all(first[name].read_bytes() == second[name].read_bytes() for name in others))


def _generate(reference: ModelConfig, policy: ModelConfig, prompt_ids: list[list[int]],
              cfg: EvalConfig) -> dict[str, list]:
    """``sampling.n`` samples per prompt from each model, prompt-major: ``{"before": reference's,
    "after": policy's}``. Both are sampled with the seed ``cfg.seed`` (sample ``k`` of the batch with
    ``seed + k`` on vLLM), so a (prompt, sample index) pair shares its random numbers across the two.
    When the two folders differ only in their weights, one engine serves both: after the reference's
    samples it loads the policy's weights in place, as PPO's weight sync does, instead of starting a
    second engine (about 10 s on a CPU)."""
    from safetensors.torch import load_file

    from actors.rollout import RolloutGroup

    rollout = RolloutConfig(backend=cfg.backend, engines=1, sampling=cfg.sampling)
    sampling = cfg.sampling.model_copy(update={"seed": cfg.seed})
    one_engine = (reference.model_copy(update={"path": policy.path}) == policy
                  and differ_only_in_weights(reference.path, policy.path))
    start = functools.partial(RolloutGroup, rollout=rollout, seed=cfg.seed,
                              resource_timeout_s=cfg.ray.resource_timeout_s)
    engines = start(reference)
    try:
        samples = {"before": engines.generate(prompt_ids, sampling)}
        if one_engine:
            weights = {}
            for shard in sorted(Path(policy.path).glob("*.safetensors")):
                weights.update(load_file(str(shard)))
            engines.update_weights(weights)
        else:
            engines.shutdown()
            engines = None
            engines = start(policy)
        samples["after"] = engines.generate(prompt_ids, sampling)
        return samples
    finally:
        if engines is not None:
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


def _side(values: list[float], n: int) -> tuple[float, float]:
    """Mean and 95% normal half-width over prompts of per-sample ``values`` (prompt-major)."""
    return mean_ci(prompt_means(values, n))


def _block(side: dict, n: int) -> dict:
    """One model's ``before``/``after`` block from its per-sample measurements (see :func:`compare`)."""
    block = {}
    block["judge"], block["judge_ci95"] = _side(side["judge"], n)
    block["judge_best_of_n"] = best_of_n(side["judge"], n)
    block["reward"], block["reward_ci95"] = _side(side["reward"], n) if side["reward"] is not None else (None, None)
    block["afinn"], block["afinn_ci95"] = _side(side["afinn"], n)
    block["kl"], block["kl_ci95"] = _side(side["kl"], n)
    block["kl_per_token"] = sum(side["kl"]) / max(1, sum(side["tokens"]))
    block["perplexity"] = side["perplexity"]["perplexity"] if side["perplexity"] else None
    block.update(text_stats(side["texts"], side["finish_reasons"]))
    return block


def _flags(result: dict, cfg: EvalConfig) -> list[str]:
    b, a = result["before"], result["after"]
    flags = []
    if a["reward"] is not None and a["reward"] > b["reward"] and a["judge"] < b["judge"]:
        flags.append("reward rose while the independent judge's score fell: possible reward hacking")
    if a["kl"] > cfg.kl_threshold:
        flags.append(f"KL to the reference {a['kl']:.2f} per sequence exceeds kl_threshold {cfg.kl_threshold:g}")
    if a["kl_per_token"] > cfg.kl_per_token_threshold:
        flags.append(f"KL to the reference {a['kl_per_token']:.3f} per token exceeds kl_per_token_threshold "
                     f"{cfg.kl_per_token_threshold:g}")
    gain = result["judge_gain"]
    if gain["ci95"][1] < 0:
        flags.append(f"the judge prefers the reference: judge gain {gain['mean']:+.3f}, 95% interval "
                     f"[{gain['ci95'][0]:+.3f}, {gain['ci95'][1]:+.3f}] below 0")
    return flags + collapse_flags(b, a, distinct_2_drop=cfg.collapse_distinct_2_drop,
                                  finished_drop=cfg.collapse_finished_drop, min_words=cfg.collapse_min_words)


def compare(prompts: list[str], n: int, before: dict, after: dict, cfg: EvalConfig, *,
            reward_model: dict | None = None) -> dict:
    """The eval.json content (plus ``_scores`` for the plot) from each model's per-sample measurements.

    ``before`` (reference) and ``after`` (policy) hold prompt-major lists, ``n`` samples per prompt of
    ``prompts``, sample ``j`` of a prompt drawn with the same seed in both: ``texts``,
    ``finish_reasons``, ``judge``, ``reward`` (None without a reward model), ``kl`` (per sequence),
    ``tokens`` (response tokens per sample); and ``perplexity`` (:func:`response_perplexity`'s dict, or
    None). ``reward_model``: :func:`reward_model_accuracy` on held-out pairs, or None.
    """
    before = {**before, "afinn": afinn_per_word(before["texts"])}
    after = {**after, "afinn": afinn_per_word(after["texts"])}
    boot = {"resamples": cfg.bootstrap_resamples, "seed": cfg.seed}
    judge_b, judge_a = prompt_means(before["judge"], n), prompt_means(after["judge"], n)
    result = {
        "prompts": len(prompts),
        "samples_per_prompt": n,
        "bootstrap_resamples": cfg.bootstrap_resamples,
        "before": _block(before, n),
        "after": _block(after, n),
        "policy_vs_reference": {**win_rate(judge_a, judge_b),
                                "win_rate_ci95": bootstrap_ci(win_outcomes(judge_a, judge_b), **boot)},
        "judge_gain": paired_gain(judge_a, judge_b, **boot),
        "afinn_gain": paired_gain(prompt_means(after["afinn"], n), prompt_means(before["afinn"], n), **boot),
        "perplexity_tokens": before["perplexity"]["tokens"] if before["perplexity"] else None,
        "reward_model": reward_model,
        "reward_model_eval_pairs": None,
    }
    if before["reward"] is not None:
        pools = {key: [b + a for b, a in zip(per_prompt(before[key], n), per_prompt(after[key], n))]
                 for key in ("texts", "judge", "reward")}
        result["reward_model_eval_pairs"] = {
            **judge_labelled_accuracy(pools["texts"], pools["judge"], pools["reward"],
                                      min_judge_gap=cfg.rm_pair_min_judge_gap),
            "min_judge_gap": cfg.rm_pair_min_judge_gap}
    result["flags"] = _flags(result, cfg)
    result["samples"] = [
        {"prompt": prompt, "index": j, "before": before["texts"][i * n + j], "after": after["texts"][i * n + j],
         "judge_before": before["judge"][i * n + j], "judge_after": after["judge"][i * n + j]}
        for i, prompt in enumerate(prompts) for j in range(n)
    ]
    result["_scores"] = {"judge_before": before["judge"], "judge_after": after["judge"],
                         "reward_before": before["reward"], "reward_after": after["reward"]}
    return result


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
    n = cfg.sampling.n
    per_sample = [p for p in prompts for _ in range(n)]  # the prompt of each sample

    init_ray(cfg.ray)
    samples = _generate(reference, policy, prompt_ids, cfg)
    sides = {key: {"texts": [s.text for s in found], "finish_reasons": [s.finish_reason for s in found],
                   "tokens": [len(s.response_ids) for s in found], "reward": None, "perplexity": None}
             for key, found in samples.items()}

    judge = make_judge(cfg.judge)
    for side in sides.values():
        side["judge"] = judge(per_sample, side["texts"])
    accuracy = None
    if cfg.reward.path:
        # In the run's dtype, as PPO's reward actor scored (bf16 takes a third of fp32's time on the CPU).
        scorer = RewardModelJudge(ModelConfig(path=cfg.reward.path, device="cpu", dtype=reference.dtype))
        for side in sides.values():
            side["reward"] = scorer(per_sample, side["texts"])
        if cfg.preference_data is not None:
            pairs = _held_out("preference", cfg.preference_data, scorer.tokenizer, cfg.seed, "preference_data")
            accuracy = reward_model_accuracy(scorer.model, pairs, scorer.tokenizer.pad_token_id)
        del scorer

    reference_model = load_causal_lm(reference.model_copy(update={"device": "cpu"})).eval()
    temperature = cfg.sampling.temperature or 1.0
    for key, side in sides.items():
        side["kl"] = _kl_to_reference(samples[key], reference_model, tokenizer.pad_token_id, temperature)
    if cfg.sft_data is not None:
        sft_items = _held_out("sft", cfg.sft_data, tokenizer, cfg.seed, "sft_data")
        sides["before"]["perplexity"] = response_perplexity(reference_model, sft_items, tokenizer.pad_token_id)
        del reference_model
        policy_model = load_causal_lm(policy.model_copy(update={"device": "cpu"})).eval()
        sides["after"]["perplexity"] = response_perplexity(policy_model, sft_items, tokenizer.pad_token_id)
        del policy_model
    return compare(prompts, n, sides["before"], sides["after"], cfg, reward_model=accuracy)


def format_interval(ci: list[float] | None, form: str = "+.3f") -> str:
    """`` [lo, hi]`` of an interval, each bound in format ``form``; nothing without one."""
    return f" [{ci[0]:{form}}, {ci[1]:{form}}]" if ci else ""


def _share(block: dict, what: str) -> str:
    """One reward-model accuracy line of eval.md."""
    if block["accuracy"] is None:
        return f"{what}: no pairs."
    return f"**{block['accuracy']:.1%}**{format_interval(block['accuracy_ci95'], '.1%')} accuracy on {block['pairs']} {what}"


def write_report(result: dict, out: Path, ppo_metrics: str | None = None) -> None:
    """eval.json, eval.md and eval.png, each written to a temp name first."""
    scores = result.pop("_scores")
    write_atomic(out / "eval.json", json.dumps(result, indent=2))

    def fmt(value, ci=None):
        if value is None:
            return "-"
        return f"{value:.3f}" + (f" ± {ci:.3f}" if ci else "")

    b, a, n = result["before"], result["after"], result["samples_per_prompt"]
    versus, gain, afinn = result["policy_vs_reference"], result["judge_gain"], result["afinn_gain"]
    lines = [
        "# Evaluation: policy versus reference", "",
        f"{result['prompts']} held-out prompts, {n} sample(s) per prompt from each model with the same seeds "
        "(paired by prompt and sample index); a prompt's score is the mean judge score over its samples. "
        "Intervals are 95%: ± is the normal interval over prompts, [lo, hi] a bootstrap interval over prompts "
        f"({result['bootstrap_resamples']} resamples) or, for accuracies, a Wilson interval.", "",
        f"- Win rate of the policy over the reference (judge, per prompt; a tie counts as half a win): "
        f"**{versus['win_rate']:.1%}**{format_interval(versus['win_rate_ci95'], '.1%')} "
        f"({versus['wins']} wins, {versus['ties']} ties, {versus['losses']} losses).",
        f"- Judge gain (policy minus reference, per prompt): **{gain['mean']:+.3f}**{format_interval(gain['ci95'])}.",
        f"- AFINN sentiment gain (per word; a lexicon no training stage uses): "
        f"{afinn['mean']:+.3f}{format_interval(afinn['ci95'])}.",
        f"- Best-of-{n} of the reference under the judge (mean over prompts of the best of its {n} samples; "
        f"what the policy should approach): {b['judge_best_of_n']:.3f}; the policy's mean judge score "
        f"{a['judge']:.3f}.", "",
        "| | judge | best-of-n | reward | AFINN/word | KL/seq | KL/token | words | distinct-1 | distinct-2 "
        "| finished | perplexity |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, block in (("before (reference)", b), ("after (policy)", a)):
        lines.append(f"| {name} | {fmt(block['judge'], block['judge_ci95'])} | {fmt(block['judge_best_of_n'])} | "
                     f"{fmt(block['reward'], block['reward_ci95'])} | {fmt(block['afinn'], block['afinn_ci95'])} | "
                     f"{fmt(block['kl'], block['kl_ci95'])} | {block['kl_per_token']:.4f} | "
                     f"{block['length_words']:.1f} | {block['distinct_1']:.3f} | {block['distinct_2']:.3f} | "
                     f"{block['finished']:.1%} | {fmt(block['perplexity'])} |")
    lines += ["", "Finished: replies that ended with EOS or a stop, not cut at max_new_tokens. KL(model || "
                  "reference) on the model's own samples: per sequence summed over the reply's tokens, per token "
                  "the summed KL of all replies over their response tokens."]
    if result["perplexity_tokens"]:
        lines += ["", f"Perplexity: exp of the mean NLL over {result['perplexity_tokens']} response tokens "
                      "of the held-out SFT records."]
    if result["reward_model"]:
        rm = result["reward_model"]
        lines += ["", f"Reward model: {_share(rm, 'held-out pairs')} (chosen scored higher), mean margin "
                      f"{rm['margin']:.3f}."]
    if result["reward_model_eval_pairs"]:
        rm = result["reward_model_eval_pairs"]
        lines += ["", f"Reward model on this eval's samples: {_share(rm, 'pairs')} labelled by the judge (per "
                      f"prompt the best and worst of its {2 * n} reference and policy samples, judge gap above "
                      f"{rm['min_judge_gap']:g})."]
    if result["flags"]:
        lines += ["", "**Warnings:**", *[f"- {flag}" for flag in result["flags"]]]
    lines += ["", "## Sample responses", "", "| prompt | sample | before | after | judge before | judge after |",
              "|---|---|---|---|---|---|"]
    for sample in result["samples"][:10]:
        cells = [sample["prompt"], str(sample["index"]), sample["before"], sample["after"],
                 f"{sample['judge_before']:.3f}", f"{sample['judge_after']:.3f}"]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ")[:300] for c in cells) + " |")
    write_atomic(out / "eval.md", "\n".join(lines) + "\n")
    plot(scores, out / "eval.png", ppo_metrics, judge_lines={
        "reference mean": b["judge"], "policy mean": a["judge"], f"reference best-of-{n}": b["judge_best_of_n"]})


def plot(scores: dict, path: Path, ppo_metrics: str | None, judge_lines: dict[str, float] | None = None) -> None:
    """Histograms of the judge's (and the reward model's) scores per sample, with ``judge_lines`` (label:
    score) drawn across the judge's; the PPO run's reward and KL curves when ``ppo_metrics`` is a file."""
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
    for i, (label, value) in enumerate((judge_lines or {}).items()):
        axes[0].axvline(value, color="black", linestyle=("--", "-", ":", "-.")[i % 4], label=f"{label} {value:.2f}")
    axes[0].set(title="Judge score", xlabel="score", ylabel="responses")
    axes[0].legend(fontsize="small")
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
    output = StageOutput(cfg, "eval")  # refuses before anything loads
    result = evaluate(cfg)
    out = output.begin()
    write_report(result, out, cfg.ppo_metrics)
    output.finish()
    b, a = result["before"], result["after"]
    versus, gain = result["policy_vs_reference"], result["judge_gain"]
    log.info("eval: judge %.3f -> %.3f (gain %+.3f [%+.3f, %+.3f]), reward %s -> %s, KL %.3f -> %.3f, "
             "perplexity %s -> %s, win rate %.1f%% [%.1f%%, %.1f%%], reward-model accuracy %s",
             b["judge"], a["judge"], gain["mean"], *gain["ci95"], b["reward"], a["reward"], b["kl"], a["kl"],
             b["perplexity"], a["perplexity"], 100 * versus["win_rate"], *(100 * x for x in versus["win_rate_ci95"]),
             result["reward_model"] and result["reward_model"]["accuracy"])
    for flag in result["flags"]:
        log.warning("eval: %s", flag)
    return out / "eval.json"
