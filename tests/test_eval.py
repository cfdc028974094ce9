"""Evaluation metrics on constructed inputs with known answers, and the report files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf.config import EvalConfig
from rlhf.eval import (
    afinn_per_word, best_of_n, bootstrap_ci, collapse_flags, compare, distinct_n, judge_labelled_accuracy, mean_ci,
    paired_gain, per_prompt, prompt_means, response_perplexity, reward_model_accuracy, sequence_kl, text_stats,
    wilson_interval, win_outcomes, win_rate, write_report,
)


def test_mean_ci_matches_the_normal_formula():
    mean, half = mean_ci([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert half == pytest.approx(1.96 * math.sqrt((1.5**2 + 0.5**2 + 0.5**2 + 1.5**2) / 3 / 4))
    assert mean_ci([5.0]) == (5.0, 0.0)
    # Four times the samples with the same spread halves the interval.
    assert mean_ci([1.0, 2.0, 3.0, 4.0] * 4)[1] == pytest.approx(half / 2, rel=0.15)


def test_win_rate_counts_ties_as_half():
    result = win_rate([1.0, 2.0, 3.0, 0.5], [0.5, 2.0, 4.0, 0.0])
    assert result == {"win_rate": (2 + 0.5) / 4, "wins": 2, "ties": 1, "losses": 1}
    assert win_outcomes([1.0, 2.0, 3.0, 0.5], [0.5, 2.0, 4.0, 0.0]) == [1.0, 0.5, 0.0, 1.0]


def test_samples_are_grouped_per_prompt():
    # Two prompts, three samples each, prompt-major.
    values = [1.0, 2.0, 6.0, -1.0, -3.0, -2.0]
    assert per_prompt(values, 3) == [[1.0, 2.0, 6.0], [-1.0, -3.0, -2.0]]
    assert prompt_means(values, 3) == [3.0, -2.0]
    assert best_of_n(values, 3) == (6.0 + -1.0) / 2
    assert prompt_means(values, 1) == values and best_of_n(values, 1) == sum(values) / 6
    with pytest.raises(ValueError, match="not a whole number of prompts"):
        per_prompt(values, 4)
    # The win rate is per prompt on the means: prompt 1 loses on two of its three samples but wins on
    # its mean; prompt 2 ties on its mean although no sample ties.
    policy = [2.5, 1.5, 7.0, -1.5, -2.5, -2.0]
    assert prompt_means(policy, 3) == [3.6666666666666665, -2.0]
    assert win_rate(prompt_means(policy, 3), prompt_means(values, 3))["win_rate"] == (1 + 0.5) / 2


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), Statistics in Medicine 17:857, table I, method 3 (Wilson score, no continuity correction).
    assert wilson_interval(81, 263) == pytest.approx([0.2553, 0.3662], abs=1e-4)
    assert wilson_interval(15, 148) == pytest.approx([0.0624, 0.1605], abs=1e-4)
    assert wilson_interval(0, 20) == pytest.approx([0.0, 0.1611], abs=1e-4)
    # All successes: the mirror image of none.
    lo, hi = wilson_interval(20, 20)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.1611, abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_bootstrap_interval_excludes_zero_for_a_clear_gain_and_covers_it_for_none():
    clear = [0.4, 0.6, 0.5, 0.7, 0.3, 0.55, 0.45, 0.65, 0.35, 0.5]
    lo, hi = bootstrap_ci(clear, resamples=2000, seed=0)
    assert 0 < lo < sum(clear) / len(clear) < hi <= max(clear)
    none = [-1.0, 1.0, -0.5, 0.5, -0.2, 0.2, -0.8, 0.8, 0.1, -0.1]
    lo, hi = bootstrap_ci(none, resamples=2000, seed=0)
    assert lo < 0 < hi
    # Seeded: the same seed gives the same interval; one value has no spread.
    assert bootstrap_ci(none, resamples=500, seed=3) == bootstrap_ci(none, resamples=500, seed=3)
    assert bootstrap_ci([0.25], resamples=200, seed=0) == [0.25, 0.25]
    with pytest.raises(ValueError):
        bootstrap_ci([], resamples=200)


def test_bootstrap_interval_of_many_values_is_close_to_the_normal_interval():
    values = [float((7 * i) % 23) for i in range(400)]  # spread over 0..22
    mean, half = mean_ci(values)
    lo, hi = bootstrap_ci(values, resamples=4000, seed=1)
    assert lo == pytest.approx(mean - half, abs=0.1 * half) and hi == pytest.approx(mean + half, abs=0.1 * half)


def test_paired_gain_keeps_a_prompts_scores_together():
    # Prompts differ wildly in difficulty, but the policy gains exactly 1 on every one: the paired
    # interval is [1, 1], while intervals of the two means alone overlap heavily.
    before = [-5.0, 3.0, 10.0, 0.0, -2.0, 7.0]
    after = [b + 1.0 for b in before]
    gain = paired_gain(after, before, resamples=500, seed=0)
    assert gain["mean"] == pytest.approx(1.0) and gain["ci95"] == pytest.approx([1.0, 1.0])
    assert mean_ci(after)[0] - mean_ci(after)[1] < mean_ci(before)[0] + mean_ci(before)[1]
    worse = paired_gain([b - 0.5 + 0.1 * (i % 3) for i, b in enumerate(before)], before, resamples=500, seed=0)
    assert worse["ci95"][1] < 0


def test_afinn_is_per_word():
    assert afinn_per_word(["good", "good good good good", "good and then some", "", "bad bad"]) == [
        3.0, 3.0, 3.0 / 4, 0.0, -3.0]


NORMAL = ["The weather today is mild with a light breeze from the west.",
          "You can brew green tea at about eighty degrees for two minutes.",
          "Paris is the capital of France and sits on the Seine.",
          "A short walk after lunch helps many people feel more awake."]


def test_collapse_is_flagged_on_degenerate_text_and_not_on_normal_text():
    thresholds = {"distinct_2_drop": 0.5, "finished_drop": 0.25, "min_words": 3.0}
    normal = text_stats(NORMAL, ["stop"] * 4)
    assert normal["finished"] == 1.0 and normal["distinct_2"] > 0.9
    reworded = text_stats([t.replace("the", "a") for t in NORMAL], ["stop", "stop", "stop", "length"])
    assert collapse_flags(normal, reworded, **thresholds) == []
    repetitive = text_stats(["good good good good good good good good"] * 4, ["length"] * 4)
    assert repetitive["finished"] == 0.0
    flags = collapse_flags(normal, repetitive, **thresholds)
    assert len(flags) == 2 and "distinct-2" in flags[0] and "finish" in flags[1]
    short = text_stats(["Yes.", "No.", "Maybe so.", "Fine."], ["stop"] * 4)
    assert [f for f in collapse_flags(normal, short, **thresholds) if "words" in f]
    assert collapse_flags(normal, short, **{**thresholds, "min_words": 1.0}) == []


def test_reward_model_accuracy_on_judge_labelled_pairs():
    texts = [["a", "b", "c"], ["a", "b", "c"], ["a", "b", "c"], ["same", "same", "x"], ["a", "b", "c"]]
    judge = [[0.9, 0.5, 0.1],   # best a, worst c
             [0.1, 0.5, 0.9],   # best c, worst a
             [0.50, 0.55, 0.6],  # gap 0.1: no pair
             [0.9, 0.95, 0.92],  # best and worst are both "same": no pair
             [0.2, 0.9, 0.0]]   # best b, worst c
    reward = [[2.0, 0.0, -1.0],  # right: a above c
              [3.0, 0.0, 1.0],   # wrong: a (judge's worst) above c
              [0.0, 1.0, 2.0],
              [0.0, 1.0, 2.0],
              [0.0, 1.0, 1.0]]   # a tie counts as wrong
    result = judge_labelled_accuracy(texts, judge, reward, min_judge_gap=0.25)
    assert (result["pairs"], result["correct"]) == (3, 1)
    assert result["accuracy"] == pytest.approx(1 / 3) and result["accuracy_ci95"] == wilson_interval(1, 3)
    assert judge_labelled_accuracy(texts, judge, reward, min_judge_gap=5.0)["accuracy"] is None


def test_distinct_n():
    assert distinct_n(["a b a b"], 1) == 2 / 4
    assert distinct_n(["a b a b"], 2) == 2 / 3  # (a b), (b a), (a b)
    assert distinct_n(["", "x"], 2) == 0.0


def test_sequence_kl_equals_exact_kl_of_two_known_distributions():
    # p = (0.8, 0.2), q = (0.5, 0.5) over two tokens; sample tokens with p's frequencies exactly.
    p, q = torch.tensor([0.8, 0.2]), torch.tensor([0.5, 0.5])
    tokens = torch.tensor([0] * 8 + [1] * 2)
    logp, logq = p.log()[tokens].unsqueeze(1), q.log()[tokens].unsqueeze(1)
    kls = sequence_kl(logp, logq, torch.ones_like(logp))
    exact = float((p * (p / q).log()).sum())
    assert sum(kls) / len(kls) == pytest.approx(exact, abs=1e-6)
    # Masked tokens contribute nothing.
    assert sequence_kl(logp, logq, torch.zeros_like(logp)) == [0.0] * 10


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_perplexity_is_exp_of_the_mean_response_nll(tiny_model_dir, tiny_tokenizer):
    from rlhf.config import ModelConfig
    from rlhf.models import load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(ModelConfig(path=str(tiny_model_dir), device="cpu")).eval()
    # Different prompt and response lengths, so the batched version pads and masks.
    pairs = [("Hello there, how are you", " fine thanks"), ("Tea?", " yes please, with a little milk and honey"),
             ("A much longer prompt about the weather in the hills today", " rain")]
    items = []
    for prompt, response in pairs:
        p, r = _ids(tiny_tokenizer, prompt), _ids(tiny_tokenizer, response)
        items.append({"input_ids": p + r, "labels": [-100] * len(p) + r})
    # By hand: each sequence alone, -log p(token | prefix) at every response token.
    nlls = []
    for item in items:
        ids = torch.tensor([item["input_ids"]])
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits[0].log_softmax(-1)
        start = item["labels"].count(-100)  # the first response position
        nlls += [-logprobs[t - 1, item["input_ids"][t]].item() for t in range(start, len(item["input_ids"]))]
    result = response_perplexity(model, items, tiny_tokenizer.pad_token_id, batch_size=2)
    assert result["tokens"] == len(nlls) == sum(len(_ids(tiny_tokenizer, r)) for _, r in pairs)
    assert result["perplexity"] == pytest.approx(math.exp(sum(nlls) / len(nlls)), rel=1e-4)
    assert result["nll"] == pytest.approx(sum(nlls) / len(nlls), rel=1e-4)


def test_reward_model_accuracy_on_pairs_of_known_order(tiny_model_dir, tiny_tokenizer):
    from rlhf.config import ModelConfig
    from rlhf.models import load_scalar_model, sequence_scores

    torch.manual_seed(0)  # the scalar head of a causal-LM folder starts random
    model = load_scalar_model(ModelConfig(path=str(tiny_model_dir), device="cpu")).eval()
    texts = ["a kind and helpful reply", "no", "the weather is nice today", "I will not help you with that at all"]
    sequences = [_ids(tiny_tokenizer, t) for t in texts]
    with torch.no_grad():
        scores = [sequence_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item()
                  for s in sequences]
    order = sorted(range(len(texts)), key=scores.__getitem__)  # lowest score first
    low, mid_low, mid_high, high = (sequences[i] for i in order)
    items = [{"chosen_ids": high, "rejected_ids": low},           # right
             {"chosen_ids": mid_high, "rejected_ids": mid_low},   # right
             {"chosen_ids": low, "rejected_ids": mid_high}]       # wrong
    result = reward_model_accuracy(model, items, tiny_tokenizer.pad_token_id, batch_size=2)
    assert result["pairs"] == 3
    assert result["accuracy"] == pytest.approx(2 / 3) and result["accuracy_ci95"] == wilson_interval(2, 3)
    s = sorted(scores)
    expected_margin = ((s[3] - s[0]) + (s[2] - s[1]) + (s[0] - s[2])) / 3
    assert result["margin"] == pytest.approx(expected_margin, abs=1e-4)


def test_reward_model_accuracy_needs_a_reward_model():
    from pydantic import ValidationError

    from rlhf.config import DataConfig, EvalConfig

    with pytest.raises(ValidationError, match="preference_data: reward-model accuracy needs reward.path"):
        EvalConfig(preference_data=DataConfig(train_path="pairs.jsonl"))


def _side(texts, judge, reward, kl, tokens, perplexity=None):
    return {"texts": texts, "finish_reasons": ["stop"] * len(texts), "judge": judge, "reward": reward, "kl": kl,
            "tokens": tokens, "perplexity": perplexity}


def test_report_files_with_two_samples_per_prompt(tmp_path):
    prompts = ["hi | there", "tea?", "weather"]
    before = _side(["a reply", "another reply", "tea is fine", "tea is good", "rain", "sun today"],
                   [0.1, 0.3, 0.0, 0.2, 0.5, 0.1], [-0.2, 0.0, -0.1, 0.1, 0.2, -0.3],
                   [0.0] * 6, [3, 4, 4, 4, 2, 3], {"perplexity": 7.25, "nll": 2.0, "tokens": 120})
    after = _side(["a good reply", "another good reply", "tea is great", "tea is good", "rain", "sunny and warm"],
                  [0.5, 0.6, 0.4, 0.2, 0.1, 0.3], [0.3, 0.4, 0.2, 0.1, 0.0, 0.5],
                  [1.0, 2.0, 1.5, 0.5, 0.0, 1.0], [3, 4, 4, 4, 2, 3], {"perplexity": 8.5, "nll": 2.1, "tokens": 120})
    cfg = EvalConfig(bootstrap_resamples=200, kl_threshold=0.9, rm_pair_min_judge_gap=0.25)
    rm = {"accuracy": 0.625, "accuracy_ci95": wilson_interval(5, 8), "correct": 5, "pairs": 8, "margin": 0.8}
    result = compare(prompts, 2, before, after, cfg, reward_model=rm)

    # By hand, per prompt (mean of two samples): before 0.2, 0.1, 0.3; after 0.55, 0.3, 0.2.
    assert result["prompts"] == 3 and result["samples_per_prompt"] == 2
    assert result["policy_vs_reference"]["win_rate"] == pytest.approx(2 / 3)
    assert (result["policy_vs_reference"]["wins"], result["policy_vs_reference"]["losses"]) == (2, 1)
    lo, hi = result["policy_vs_reference"]["win_rate_ci95"]
    assert 0 <= lo <= 2 / 3 <= hi <= 1
    assert result["judge_gain"]["mean"] == pytest.approx((0.35 + 0.2 - 0.1) / 3)
    assert result["before"]["judge"] == pytest.approx(0.2) and result["before"]["judge_best_of_n"] == pytest.approx(
        (0.3 + 0.2 + 0.5) / 3)
    assert result["after"]["kl"] == pytest.approx(6.0 / 6) and result["after"]["kl_per_token"] == pytest.approx(6 / 20)
    assert result["before"]["finished"] == 1.0 and result["after"]["length_words"] == pytest.approx(16 / 6)
    assert result["afinn_gain"]["mean"] > 0  # "good", "great", "warm" are positive words, and nothing negative
    # Pools of four per prompt: prompt 1's judge best "a good reply" (0.6) vs worst "a reply" (0.1): reward
    # 0.4 > -0.2, right; prompt 2's best "tea is great" (0.4) vs worst "tea is fine" (0.0): 0.2 > -0.1, right;
    # prompt 3's best "rain" (0.5) vs worst "sun today" (0.1): 0.2 > -0.3, right.
    assert result["reward_model_eval_pairs"]["pairs"] == 3 and result["reward_model_eval_pairs"]["accuracy"] == 1.0
    assert [(s["prompt"], s["index"]) for s in result["samples"]] == [(p, j) for p in prompts for j in (0, 1)]
    assert result["samples"][3]["after"] == "tea is good" and result["samples"][3]["judge_after"] == 0.2
    assert any("per sequence exceeds kl_threshold" in f for f in result["flags"])  # 1.0 per sequence, above 0.9
    assert not any("per token" in f for f in result["flags"])  # 0.3 per token, under the default 0.5
    assert any("collapse_min_words" in f for f in result["flags"])  # 2.7 words on average, under 3

    metrics = tmp_path / "metrics.jsonl"
    records = [{"step": 0, "eval/judge": 0.1}]  # a PPO run's step 0: its held-out evaluation alone
    records += [{"step": s, "reward/mean": s / 10, "kl/mean": s / 20} for s in (1, 2)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    write_report(result, tmp_path, str(metrics))
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert "_scores" not in saved and saved["after"]["judge"] == pytest.approx((0.55 + 0.3 + 0.2) / 3)
    assert saved["reward_model"]["accuracy"] == 0.625 and saved["after"]["perplexity"] == 8.5
    for key in ("judge", "reward", "kl"):
        assert key in saved["before"] and key in saved["after"]
    report = (tmp_path / "eval.md").read_text()
    assert "**66.7%**" in report and "a tie counts as half a win" in report and "hi / there" in report
    assert "| 7.250 |" in report and "| 8.500 |" in report and "120 response tokens" in report
    assert "**62.5%** [30.6%, 86.3%] accuracy on 8 held-out pairs" in report
    assert "**100.0%**" in report and "exceeds" in report and "Best-of-2" in report
    assert (tmp_path / "eval.png").stat().st_size > 10_000
    assert not list(tmp_path.glob("*.tmp*"))


@pytest.mark.slow
def test_eval_of_a_policy_equal_to_its_reference_with_two_samples_per_prompt(tiny_model_dir, tmp_path):
    """Through Ray and the HF engine: with the same seeds, a policy that is its reference samples the
    very same replies, so every pair ties, the gain is exactly 0 and the KL is 0."""
    import ray

    from rlhf.eval import run

    tiny = str(tiny_model_dir)
    cfg = EvalConfig(output_dir=str(tmp_path), policy={"path": tiny}, reference={"path": tiny},
                     reward={"path": tiny}, backend="hf", max_prompts=3, bootstrap_resamples=200,
                     sampling={"n": 2, "temperature": 1.0, "max_new_tokens": 8}, ray={"num_cpus": 2})
    try:
        saved = json.loads(run(cfg).read_text())
    finally:
        ray.shutdown()
    assert saved["prompts"] == 3 and saved["samples_per_prompt"] == 2 and len(saved["samples"]) == 6
    assert [s["index"] for s in saved["samples"]] == [0, 1] * 3
    assert all(s["before"] == s["after"] and s["judge_before"] == s["judge_after"] for s in saved["samples"])
    assert saved["samples"][0]["before"] != saved["samples"][1]["before"]  # two different draws per prompt
    assert saved["policy_vs_reference"]["ties"] == 3 and saved["policy_vs_reference"]["win_rate"] == 0.5
    assert saved["judge_gain"] == {"mean": 0.0, "ci95": [0.0, 0.0]}
    assert abs(saved["after"]["kl"]) < 1e-3 and abs(saved["after"]["kl_per_token"]) < 1e-3
    assert saved["after"]["judge_best_of_n"] >= saved["after"]["judge"]
    assert saved["reward_model_eval_pairs"]["pairs"] <= 3 and (tmp_path / "eval.md").is_file()


def test_folders_that_differ_only_in_their_weights(tmp_path):
    import shutil

    from rlhf.eval import differ_only_in_weights

    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "config.json").write_text('{"hidden_size": 8}')
    (a / "model.safetensors").write_bytes(b"1")
    (b / "model-00001-of-00002.safetensors").write_bytes(b"2")
    assert differ_only_in_weights(str(a), str(b))
    (b / "config.json").write_text('{"hidden_size": 16}')
    assert not differ_only_in_weights(str(a), str(b))  # another model
    shutil.copy(a / "config.json", b / "config.json")
    (b / "adapter_config.json").write_text("{}")
    assert not differ_only_in_weights(str(a), str(b))  # an adapter is not a model
    (b / "adapter_config.json").unlink()
    (b / "tokenizer.json").write_text("{}")
    assert not differ_only_in_weights(str(a), str(b))  # another tokenizer
    assert not differ_only_in_weights(str(a), str(tmp_path / "missing"))


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_engine_for_both_models_samples_what_two_engines_do(tiny_model_dir, tmp_path, monkeypatch):
    """The eval loads the policy's weights into the reference's engine when the folders differ only in
    their weights: the replies are those of an engine started on the policy."""
    import ray

    import rlhf.eval
    from cluster.runtime import init_ray
    from rlhf.config import ModelConfig, RayConfig
    from rlhf.models import build_tiny_model

    policy = build_tiny_model(tmp_path / "policy", seed=1)  # same config and tokenizer, other weights
    assert rlhf.eval.differ_only_in_weights(str(tiny_model_dir), str(policy))
    cfg = EvalConfig(output_dir=str(tmp_path / "eval"), backend="hf", max_prompts=3,
                     sampling={"n": 2, "temperature": 1.0, "max_new_tokens": 8})
    prompt_ids = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    models = ModelConfig(path=str(tiny_model_dir)), ModelConfig(path=str(policy))
    init_ray(RayConfig(num_cpus=2))
    try:
        one = rlhf.eval._generate(*models, prompt_ids, cfg)
        monkeypatch.setattr(rlhf.eval, "differ_only_in_weights", lambda a, b: False)
        two = rlhf.eval._generate(*models, prompt_ids, cfg)
    finally:
        ray.shutdown()
    for key in ("before", "after"):
        assert [s.response_ids for s in one[key]] == [s.response_ids for s in two[key]], key
    assert [s.response_ids for s in one["before"]] != [s.response_ids for s in one["after"]]
