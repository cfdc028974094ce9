"""The main job's bookkeeping: peak memory over this process and its children."""

from __future__ import annotations

import subprocess
import sys
import time

from rlhf.pipeline import PeakMemory

HOLD_512_MIB = "import time; block = bytearray(512 * 2**20); time.sleep(3)"


def test_peak_memory_counts_a_child_process_once():
    with PeakMemory(interval_s=0.2) as quiet:
        time.sleep(0.6)
    with PeakMemory(interval_s=0.2) as busy:
        subprocess.run([sys.executable, "-c", HOLD_512_MIB], check=True)
    grown = busy.peak_gib - quiet.peak_gib
    assert 0.4 < grown < 0.8, (quiet.peak_gib, busy.peak_gib)  # the child's 0.5 GiB, counted once
    assert busy.peak_rss_gib >= busy.peak_gib  # RSS counts shared pages in full in every process


def test_peak_memory_of_another_process_tree():
    """benchmarks/vs_trl.py measures each framework's child process this way."""
    child = subprocess.Popen([sys.executable, "-c", HOLD_512_MIB])
    with PeakMemory(interval_s=0.2, pid=child.pid) as memory:
        child.wait()
    assert 0.4 < memory.peak_gib < 0.8 and memory.peak_rss_gib >= memory.peak_gib


def test_ppo_is_rewarded_by_the_pipelines_reward_model_unless_the_user_names_a_reward():
    from rlhf.config import load_config
    from rlhf.pipeline import stage_configs

    default = stage_configs(load_config("run", None, ["output_dir=runs/x"]))["ppo"].reward
    assert default.path == "runs/x/rm/final" and default.function is None
    own = stage_configs(load_config("run", None, ["output_dir=runs/x", "ppo.reward.function=rules.py:score"]))["ppo"].reward
    assert own.function == "rules.py:score" and own.path is None


def test_the_reward_model_starts_from_the_sft_model_with_the_runs_settings_plus_its_own():
    from rlhf.config import load_config
    from rlhf.pipeline import stage_configs

    cfg = load_config("run", None, ["output_dir=runs/x", "model.dtype=bfloat16", "rm.model.lora.r=4"])
    rm = stage_configs(cfg)["rm"].model
    assert (rm.path, rm.dtype, rm.lora.r) == ("runs/x/sft/final", "bfloat16", 4)


def _eval_result(win_rate, win_ci, gain_ci, rm_accuracy, rm_pairs, flags=()):
    block = {"judge": 1.0, "judge_ci95": 0.1, "judge_best_of_n": 1.4, "reward": 0.5, "reward_ci95": 0.1,
             "afinn": 0.2, "afinn_ci95": 0.02, "kl": 2.0, "kl_ci95": 0.5, "kl_per_token": 0.05, "finished": 0.6,
             "length_words": 20.0, "distinct_2": 0.8, "perplexity": 18.0}
    return {"prompts": 64, "samples_per_prompt": 2, "before": block, "after": {**block, "judge": 1.3},
            "policy_vs_reference": {"win_rate": win_rate, "win_rate_ci95": win_ci, "wins": 40, "ties": 4, "losses": 20},
            "judge_gain": {"mean": 0.3, "ci95": gain_ci}, "flags": list(flags),
            "reward_model": {"accuracy": rm_accuracy, "accuracy_ci95": [rm_accuracy - 0.1, rm_accuracy + 0.05],
                             "pairs": rm_pairs}}


def test_goals_are_met_or_missed_by_the_numbers():
    from rlhf.config import load_config
    from rlhf.pipeline import check_goals, summary_table

    cfg = load_config("run", None, [])
    summary = {"wall_s": 850.0, "peak_memory_gib": 11.0, "skipped": []}
    good = {g["goal"]: g["met"] for g in check_goals(_eval_result(0.7, [0.6, 0.8], [0.1, 0.5], 0.85, 64), summary, cfg)}
    assert all(good.values()), good
    bad = check_goals(_eval_result(0.7, [0.49, 0.8], [-0.1, 0.5], 0.85, 60, ["collapse: distinct-2 fell"]),
                      {**summary, "wall_s": 950.0}, cfg)
    missed = [g["goal"] for g in bad if g["met"] is False]
    assert len(missed) == 5 and any("interval above 50%" in m for m in missed)
    assert any("collapse" in m for m in missed) and any("900 s" in m for m in missed)
    assert any("judge gain" in m for m in missed) and any("64 held-out pairs" in m for m in missed)
    # Time and memory are not judged when stages were skipped (a resumed run).
    resumed = {g["goal"]: g["met"] for g in check_goals(_eval_result(0.7, [0.6, 0.8], [0.1, 0.5], 0.85, 64),
                                                        {**summary, "skipped": ["sft"]}, cfg)}
    assert resumed["whole pipeline within 900 s"] is None

    result = {**_eval_result(0.7, [0.6, 0.8], [0.1, 0.5], 0.85, 64), "goals": bad}
    table = summary_table(result)
    assert "win rate 70.0% [60.0%, 80.0%]" in table and "MISSED" in table and "judge, best of 2" in table


STAGE_NAMES = ["sft", "pairs", "rm", "ppo", "eval"]


def _stand_in_stages(monkeypatch, ran: list[str], interrupt: str | None = None) -> None:
    """Each stage of `rlhf run` as a stand-in that keeps its output folder as the real one does
    (rlhf.outputs.StageOutput) and writes its product; ``interrupt`` stops that stage midway."""
    import importlib
    import json

    from rlhf.outputs import Interrupted, StageOutput
    from rlhf.paths import replace_dir, write_atomic

    def stand_in(stage):
        def run(cfg):
            output = StageOutput(cfg, stage)
            out = output.begin()
            ran.append(stage)
            if stage == "eval":
                write_atomic(out / "eval.json", json.dumps(_eval_result(0.7, [0.6, 0.8], [0.1, 0.5], 0.85, 64)))
            elif stage == "pairs":
                write_atomic(out / "pairs.jsonl", "{}\n")
            else:
                replace_dir(out / "final", lambda staging: (staging / "config.json").write_text("{}"))
            if stage == interrupt:  # as Ctrl-C in a stage with checkpoints
                raise Interrupted([out / "checkpoint_step_000002"])
            output.finish()
        return run

    for stage in STAGE_NAMES:
        monkeypatch.setattr(importlib.import_module(f"rlhf.{stage}"), "run", stand_in(stage))


def test_a_stage_reruns_with_everything_downstream_of_it_and_an_interrupted_stage_is_not_done(tmp_path, monkeypatch):
    import json

    import pytest

    from rlhf.config import load_config
    from rlhf.pipeline import run

    def pipeline(*overrides, interrupt=None):
        ran: list[str] = []
        _stand_in_stages(monkeypatch, ran, interrupt)
        run(load_config("run", None, [f"output_dir={tmp_path}", "goals.max_wall_s=null", *overrides]))
        return ran, json.loads((tmp_path / "run_summary.json").read_text())["skipped"]

    assert pipeline() == (STAGE_NAMES, [])
    assert pipeline() == ([], STAGE_NAMES)
    # Only the SFT learning rate changes: every stage reads the SFT model, directly or not.
    assert pipeline("sft.optim.learning_rate=1e-4") == (STAGE_NAMES, [])
    # The reward model changes: pairs and sft are current, ppo and eval read the reward model.
    assert pipeline("sft.optim.learning_rate=1e-4", "rm.margin=0.5") == (["rm", "ppo", "eval"], ["sft", "pairs"])
    # Interrupted after its config and model were written: not done, so the next run redoes it.
    with pytest.raises(KeyboardInterrupt, match=rf"to continue: rm.resume_from={tmp_path}/rm/checkpoint_step_000002"):
        pipeline("sft.optim.learning_rate=1e-4", "rm.margin=0.2", interrupt="rm")
    assert (tmp_path / "rm" / "config.yaml").is_file() and (tmp_path / "rm" / "final").is_dir()
    assert pipeline("sft.optim.learning_rate=1e-4", "rm.margin=0.2") == (["rm", "ppo", "eval"], ["sft", "pairs"])
    assert "goals" in json.loads((tmp_path / "eval.json").read_text())
