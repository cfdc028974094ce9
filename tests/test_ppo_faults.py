"""PPO under faults on the tiny model: inference actors killed mid-run are restarted and the step
redone; a lost learner rank stops the run with a clear error and resume_from continues it; checkpoints
survive a kill mid-write; non-finite batches are skipped, then stop the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from test_ppo import _cfg, _trained

from rlhf.paths import claim_dir
from rlhf.ppo import STATE_FILE, checkpoints, prune_checkpoints, write_checkpoint

NAN_REWARD = "tests/data/nan_reward.py"


def _steps(out) -> list[int]:
    return [r["step"] for r in _trained(out)]


def _pid_of(actor) -> int:
    import ray

    return ray.get(actor.info.remote())["pid"] if hasattr(actor, "info") else ray.get(actor.pid.remote())


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_inference_actors_killed_mid_run_are_restarted_and_the_step_redone(tiny_model_dir, tmp_path):
    """A rollout engine (ray.kill), the reward actor (ray.kill, during a step), the reference actor
    (ray.kill) and the engine again (SIGKILL on its process) die one after another; each is restarted
    on its bundle and the run ends at its final step with every step logged once. The held-out
    evaluation rides out a dead engine too."""
    import ray

    from rlhf.ppo import run

    def kill_reward_soon(trainer):  # lands inside the next step
        threading.Timer(0.3, ray.kill, [trainer.reward]).start()

    evaluations = []

    def kill_engine_then_evaluate(trainer):  # after the last step's evaluation was logged
        ray.kill(trainer.engines.engines[0])
        evaluations.append({**trainer.evaluate(), **trainer.faults})

    faults = {
        1: lambda trainer: ray.kill(trainer.engines.engines[0]),
        2: kill_reward_soon,
        3: lambda trainer: ray.kill(trainer.reference),
        4: lambda trainer: os.kill(_pid_of(trainer.engines.engines[0]), signal.SIGKILL),
        5: kill_engine_then_evaluate,
    }
    out = tmp_path / "run"
    try:
        run(_cfg(tiny_model_dir, out, "steps=5", "ppo.advantage=grpo"),
            on_step=lambda trainer: faults.get(trainer.iteration, lambda t: None)(trainer))
    finally:
        ray.shutdown()
    records = _trained(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    restarts = [r["faults/actor_restarts"] for r in records]
    # The reward dies whenever its timer fires on a loaded machine: in step 3, or as step 4 starts.
    assert restarts[:2] == [0, 1] and restarts == sorted(restarts) and restarts[-1] == 4, restarts
    # The restarted engine samples from the current policy, not the initial weights it starts from.
    assert all(r["rollout/logprob_diff"] < 1e-4 for r in records), [r["rollout/logprob_diff"] for r in records]
    assert (out / "final" / "model.safetensors").is_file()
    # The engine killed before an evaluation was restarted with the current weights: the same replies
    # (same seed) as the evaluation logged at step 5, just before the kill.
    assert evaluations[0]["faults/actor_restarts"] == 5
    for key in ("eval/judge", "eval/response_length", "eval/ended_with_eos"):
        assert evaluations[0][key] == pytest.approx(records[-1][key], abs=1e-6), key


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_actor_that_keeps_dying_stops_the_run_after_max_step_retries(tiny_model_dir, tmp_path):
    import ray

    from rlhf.ppo import PPOStopped, run

    def kill_reward(trainer):  # between steps, so step 2 is the one that finds it dead
        ray.kill(trainer.reward)

    try:
        with pytest.raises(PPOStopped, match=r"reward actor 0 died again after 0 restart\(s\) \(max_step_retries=0\)"):
            run(_cfg(tiny_model_dir, tmp_path / "run", "steps=3", "ppo.advantage=grpo", "max_step_retries=0"),
                on_step=kill_reward)
    finally:
        ray.shutdown()
    assert _steps(tmp_path / "run") == [1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_lost_learner_rank_stops_with_a_clear_error_and_resume_continues_the_series(tiny_model_dir, tmp_path):
    """SIGKILL on the critic's rank mid-run: the run stops naming it and the checkpoint to resume
    from; resuming into the same folder redoes the steps after the checkpoint, same as before."""
    import ray

    from actors.group import LearnerLostError
    from rlhf.ppo import run

    out = tmp_path / "run"
    common = ["steps=4", "save_every=2", "keep_checkpoints=2"]

    def kill_critic(trainer):
        if trainer.iteration == 3:
            os.kill(_pid_of(trainer.critic.actors[0]), signal.SIGKILL)

    try:
        with pytest.raises(LearnerLostError, match=r"critic rank 0 of 1 died.*resume_from=.*step_000002"):
            run(_cfg(tiny_model_dir, out, *common), on_step=kill_critic)
        before = {r["step"]: r for r in _trained(out)}
        assert sorted(before) == [1, 2, 3]
        run(_cfg(tiny_model_dir, out, *common, f"resume_from={out / 'checkpoints' / 'step_000002'}"))
    finally:
        ray.shutdown()
    after = {r["step"]: r for r in _trained(out)}
    assert _steps(out) == [1, 2, 3, 4]  # step 3 redone, not logged twice
    assert after[3]["reward/mean"] == pytest.approx(before[3]["reward/mean"], abs=1e-6)  # same batch, same weights
    assert after[2]["time"] == before[2]["time"]  # steps up to the checkpoint kept as they were
    assert [p.name for p in checkpoints(out / "checkpoints")] == ["step_000002", "step_000004"]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_nonfinite_rewards_skip_the_batch_then_stop_the_run(tiny_model_dir, tmp_path):
    import ray

    from rlhf.ppo import PPOStopped, run

    some = tmp_path / "some"
    always = tmp_path / "always"
    try:
        run(_cfg(tiny_model_dir, some, "steps=4", "save_every=1", "max_nonfinite_batches=2", "ppo.advantage=grpo",
                 f"reward.function={NAN_REWARD}:nan_on_even_calls"))
        with pytest.raises(PPOStopped, match=r"2 iterations in a row had non-finite values .*scores"):
            run(_cfg(tiny_model_dir, always, "steps=4", "save_every=1", "max_nonfinite_batches=2",
                     "ppo.advantage=grpo", f"reward.function={NAN_REWARD}:always_nan"))
    finally:
        ray.shutdown()
    records = _trained(some)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["faults/nonfinite_skipped"] for r in records] == [0, 1, 1, 2]
    assert "loss/policy" in records[0] and "loss/policy" not in records[1]  # skipped: not trained on
    assert _steps(always) == [1]  # the second non-finite batch in a row stops the run
    from safetensors.torch import load_file

    saved = checkpoints(some / "checkpoints") + checkpoints(always / "checkpoints")
    assert saved
    for folder in saved:
        assert all(torch.isfinite(t).all() for t in load_file(folder / "policy" / "model.safetensors").values())


# ---- A learner's optimiser step on non-finite gradients (DeepSpeed, no Ray) ------------------------

STEP_GUARD = """
import math, sys, torch
from actors.group import Learner
from rlhf.serve import free_port
from rlhf.config import DeepSpeedConfig, PPOAlgoConfig

learner = Learner()
learner.init_distributed(0, 1, "127.0.0.1", free_port(), threads=1)
torch.manual_seed(0)
model = torch.nn.Linear(4, 1)
learner._initialize(model, learning_rate=0.1, ds=DeepSpeedConfig(zero_stage=0),
                    algo=PPOAlgoConfig(micro_batch_size=2), bf16=False)
x = torch.ones(2, 4)
assert learner.engine.enable_backward_allreduce is False  # one ZeRO-0 rank: nothing to all-reduce

def step(scale):
    learner.engine.backward(learner.engine(x).sum() * scale)
    return learner._step()

assert step(1.0) is True
before = [p.detach().clone() for p in model.parameters()]
state = {k: v.clone() for k, v in learner.engine.optimizer.state[model.weight].items()}
assert step(math.nan) is False
assert step(math.inf) is False
assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
after = learner.engine.optimizer.state[model.weight]
assert all(torch.equal(state[k], after[k]) for k in state)  # Adam moments untouched too
assert step(1.0) is True
assert not torch.equal(before[0], model.weight) and torch.isfinite(model.weight).all()
print("ok")
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_learner_skips_an_optimiser_step_with_nonfinite_gradients():
    """ZeRO-0 would write NaN into the weights; the guard leaves weights and Adam state as they were,
    and the next finite step trains as usual."""
    result = subprocess.run([sys.executable, "-c", STEP_GUARD], capture_output=True, text=True, timeout=280,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# ---- Checkpoint files (no Ray) ---------------------------------------------------------------------

WRITER = """
import sys, time
from pathlib import Path
from transformers import AutoModelForCausalLM
from rlhf.ppo import write_checkpoint

model_dir, folder = sys.argv[1], Path(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(model_dir)

def write_models(staging):
    model.save_pretrained(staging / "policy")
    (staging.parent / "writing").write_text("policy written")
    time.sleep(120)  # killed here, between the policy and the critic
    model.save_pretrained(staging / "critic")

write_checkpoint(folder, write_models, {"iteration": 4})
"""


@pytest.mark.timeout(120)
def test_checkpoint_killed_mid_write_leaves_the_previous_one_intact(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    root = tmp_path / "checkpoints"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    write_checkpoint(root / "step_000002", lambda staging: model.save_pretrained(staging / "policy"), {"iteration": 2})
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tiny_model_dir), str(root / "step_000004")],
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        deadline = time.monotonic() + 90
        while not (root / "writing").exists():
            assert writer.poll() is None and time.monotonic() < deadline, "the writer never got to its first file"
            time.sleep(0.1)
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    finally:
        writer.kill()
    assert (root / "step_000004.partial" / "policy").is_dir()  # the half-written one
    assert not (root / "step_000004").exists()
    assert checkpoints(root) == [root / "step_000002"]
    assert json.loads((root / "step_000002" / STATE_FILE).read_text()) == {"iteration": 2}
    reloaded = AutoModelForCausalLM.from_pretrained(root / "step_000002" / "policy")
    for (name, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    prune_checkpoints(root, keep=2)
    assert not (root / "step_000004.partial").exists() and checkpoints(root) == [root / "step_000002"]


def test_keep_checkpoints_keeps_the_newest_complete_ones(tmp_path):
    for step in (2, 4, 6, 8):
        write_checkpoint(tmp_path / f"step_{step:06d}", lambda staging: None, {"iteration": step})
    claim_dir(tmp_path / "step_000009.partial")  # as write_checkpoint leaves it when killed
    (tmp_path / "step_000010.partial").mkdir()  # not rlhf's: kept
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["step_000006", "step_000008", "step_000010.partial"]
