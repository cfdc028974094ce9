"""Evaluation metrics on constructed inputs with known answers, and the report files."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf.eval import distinct_n, mean_ci, sequence_kl, win_rate, write_report


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


def test_report_files(tmp_path):
    result = {
        "prompts": 2,
        "before": {"judge": 0.1, "judge_ci95": 0.05, "kl": 0.0, "length_words": 5, "distinct_1": 0.5,
                   "distinct_2": 0.6, "reward": -0.2, "reward_ci95": 0.1},
        "after": {"judge": 0.4, "judge_ci95": 0.05, "kl": 1.5, "length_words": 6, "distinct_1": 0.4,
                  "distinct_2": 0.5, "reward": 0.3, "reward_ci95": 0.1},
        "policy_vs_reference": {"win_rate": 0.75, "wins": 1, "ties": 1, "losses": 0},
        "flags": ["KL to the reference 1.50 exceeds kl_threshold 1"],
        "samples": [{"prompt": "hi | there", "before": "a", "after": "b", "judge_before": 0, "judge_after": 1}],
        "_scores": {"judge_before": [0.1, 0.1], "judge_after": [0.4, 0.4], "reward_before": [-0.2, -0.2],
                    "reward_after": [0.3, 0.3]},
    }
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "reward/mean": s / 10, "kl/mean": s / 20}) + "\n" for s in (1, 2)))
    write_report(result, tmp_path, str(metrics))
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["after"]["judge"] == 0.4 and "_scores" not in saved
    report = (tmp_path / "eval.md").read_text()
    assert "75.0%" in report and "0.400 ± 0.050" in report and "hi / there" in report and "exceeds" in report
    assert (tmp_path / "eval.png").stat().st_size > 10_000
    assert not list(tmp_path.glob("*.tmp*"))
