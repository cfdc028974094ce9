"""benchmarks/vs_trl.py: the summary and the ratios against TRL, on constructed runs (no Ray, no TRL).

The benchmark itself (Ray, vLLM and TRL trainers for minutes) is run by hand; see the README.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vs_trl():
    spec = importlib.util.spec_from_file_location("vs_trl", REPO / "benchmarks" / "vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(step_seconds: list[float], tokens: int, rewards: list[float], after: float, pss: float) -> dict:
    ends = [sum(step_seconds[:i + 1]) for i in range(len(step_seconds))]
    return {"steps": [{"seconds": s, "end_s": e, "tokens": tokens, "reward": r}
                      for s, e, r in zip(step_seconds, ends, rewards)],
            "reward_after": {"mean": after, "ci95": 0.01}, "startup_s": 5.0, "wall_s": 30.0,
            "peak_rss_gib": pss * 1.5, "peak_pss_gib": pss}


def test_summary_leaves_the_first_step_out(vs_trl):
    summary = vs_trl.summarise(_run([30.0, 2.0, 4.0, 3.0], 100, [0.1, 0.2, 0.3, 0.4], 0.5, 1.0))
    assert summary["seconds_per_step"] == 3.0  # median of 2, 4, 3: the 30 s warm-up step is not counted
    assert summary["tokens_per_s"] == pytest.approx(300 / 9.0)
    assert (summary["reward_first_step"], summary["reward_last_step"], summary["reward_after"]) == (0.1, 0.4, 0.5)
    assert [c["end_s"] for c in summary["curve"]] == [30.0, 32.0, 36.0, 39.0]


def test_ratios_and_targets(vs_trl):
    ours = vs_trl.summarise(_run([9.0, 4.0, 4.0], 100, [0.1, 0.2, 0.3], 0.30, 3.0))
    trl = vs_trl.summarise(_run([9.0, 10.0, 10.0], 100, [0.1, 0.2, 0.3], 0.25, 1.0))
    slow = vs_trl.summarise(_run([9.0, 6.0, 6.0], 100, [0.1, 0.2, 0.3], 0.20, 1.0))
    result = vs_trl.ratios({"ours": {"ppo": ours, "grpo": slow}, "trl": {"ppo": trl, "grpo": trl}})
    assert result["ppo"]["step_time_ours_over_trl"] == pytest.approx(0.4)
    assert result["ppo"]["reward_ours_minus_trl"] == pytest.approx(0.05)
    assert result["ppo"]["reward_ours_minus_trl_ci95"] == pytest.approx(0.01 * 2 ** 0.5)
    assert result["ppo"]["tokens_per_s_ours_over_trl"] == pytest.approx(2.5)
    assert result["ppo"]["peak_pss_ours_over_trl"] == pytest.approx(3.0)
    assert result["ppo"]["step_time_target_met"] and result["ppo"]["reward_target_met"]
    assert not result["grpo"]["step_time_target_met"] and not result["grpo"]["reward_target_met"]
    # Only one side measured: no ratio rather than a made-up one.
    assert vs_trl.ratios({"ours": {"ppo": ours}}) == {}


def test_prompt_lookup_strips_left_padding_only(vs_trl):
    assert vs_trl._strip_left_padding([0, 0, 5, 0, 7], 0) == (5, 0, 7)
    assert vs_trl._strip_left_padding([0, 0], 0) == ()
