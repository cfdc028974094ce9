"""Evaluation metrics on constructed inputs with known answers, and the report files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf.eval import (
    distinct_n, mean_ci, response_perplexity, reward_model_accuracy, sequence_kl, win_rate, write_report,
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
    assert result["accuracy"] == pytest.approx(2 / 3)
    s = sorted(scores)
    expected_margin = ((s[3] - s[0]) + (s[2] - s[1]) + (s[0] - s[2])) / 3
    assert result["margin"] == pytest.approx(expected_margin, abs=1e-4)


def test_reward_model_accuracy_needs_a_reward_model():
    from pydantic import ValidationError

    from rlhf.config import DataConfig, EvalConfig

    with pytest.raises(ValidationError, match="preference_data: reward-model accuracy needs reward.path"):
        EvalConfig(preference_data=DataConfig(train_path="pairs.jsonl"))


def test_report_files(tmp_path):
    result = {
        "prompts": 2,
        "before": {"judge": 0.1, "judge_ci95": 0.05, "kl": 0.0, "length_words": 5, "distinct_1": 0.5,
                   "distinct_2": 0.6, "reward": -0.2, "reward_ci95": 0.1, "perplexity": 7.25},
        "after": {"judge": 0.4, "judge_ci95": 0.05, "kl": 1.5, "length_words": 6, "distinct_1": 0.4,
                  "distinct_2": 0.5, "reward": 0.3, "reward_ci95": 0.1, "perplexity": 8.5},
        "policy_vs_reference": {"win_rate": 0.75, "wins": 1, "ties": 1, "losses": 0},
        "perplexity_tokens": 120,
        "reward_model": {"accuracy": 0.625, "margin": 0.8, "pairs": 8},
        "flags": ["KL to the reference 1.50 exceeds kl_threshold 1"],
        "samples": [{"prompt": "hi | there", "before": "a", "after": "b", "judge_before": 0, "judge_after": 1}],
        "_scores": {"judge_before": [0.1, 0.1], "judge_after": [0.4, 0.4], "reward_before": [-0.2, -0.2],
                    "reward_after": [0.3, 0.3]},
    }
    metrics = tmp_path / "metrics.jsonl"
    records = [{"step": 0, "eval/judge": 0.1}]  # a PPO run's step 0: its held-out evaluation alone
    records += [{"step": s, "reward/mean": s / 10, "kl/mean": s / 20} for s in (1, 2)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    write_report(result, tmp_path, str(metrics))
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["after"]["judge"] == 0.4 and "_scores" not in saved
    report = (tmp_path / "eval.md").read_text()
    assert "75.0%" in report and "0.400 ± 0.050" in report and "hi / there" in report and "exceeds" in report
    assert "| 7.250 |" in report and "| 8.500 |" in report and "120 response tokens" in report
    assert "62.5%** accuracy on 8 held-out pairs" in report
    assert saved["reward_model"]["accuracy"] == 0.625 and saved["after"]["perplexity"] == 8.5
    assert (tmp_path / "eval.png").stat().st_size > 10_000
    assert not list(tmp_path.glob("*.tmp*"))
