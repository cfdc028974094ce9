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
