"""`rlhf run --quick`, the whole pipeline on the tiny model, really aligns it to its own judge.

One seeded run of the real command (Ray, Ray Train + DeepSpeed, vLLM for PPO, HF generate for pairs
and eval): about 75 s on 2 idle cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_quick_pipeline_beats_the_sft_model_on_its_judge(tmp_path):
    out = tmp_path / "quick"
    result = subprocess.run([sys.executable, "-m", "rlhf.cli", "run", "--quick", f"output_dir={out}"],
                            capture_output=True, text=True, timeout=840, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 0, result.stderr[-4000:]
    outcome = json.loads((out / "eval.json").read_text())
    versus, gain = outcome["policy_vs_reference"], outcome["judge_gain"]
    assert outcome["prompts"] >= 64
    # The aligned policy wins on most held-out prompts, and the interval says it is no accident.
    assert versus["win_rate_ci95"][0] > 0.5, versus
    assert gain["ci95"][0] > 0, gain
    # ... without buying it with degenerate text or a far drift from the SFT model.
    assert not [flag for flag in outcome["flags"] if flag.startswith("collapse")], outcome["flags"]
    assert outcome["after"]["kl_per_token"] <= 0.5
    assert outcome["reward_model"]["pairs"] >= 64 and outcome["reward_model"]["accuracy"] > 0.7
    goals = {goal["goal"]: goal["met"] for goal in outcome["goals"]}
    assert goals["win rate's 95% interval above 50%"] is True
    assert (out / "ppo" / "learning_curves.png").stat().st_size > 0
    assert "win rate" in result.stdout  # the closing table
