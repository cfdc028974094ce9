"""A learner's optimiser state saved as safetensors and loaded back continues training exactly: plain
torch (ZeRO-0's optimiser) here, DeepSpeed ZeRO-2 and ZeRO-3 in a subprocess (no Ray)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from rlhf.optimizer_state import OptimizerStateError, load_optimizer_state, save_optimizer_state

LAYOUT = {"zero_stage": 0, "world_size": 1, "rank": 0}


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.9, 0.95))


def _train(model, optimizer, steps: int, start: int = 0) -> None:
    for step in range(start, start + steps):
        x = torch.arange(8.0).reshape(2, 4) + step
        optimizer.zero_grad()
        model(x).pow(2).mean().backward()
        optimizer.step()


def test_a_loaded_optimizer_continues_exactly_where_the_saved_one_was(tmp_path):
    model, optimizer = _model_and_optimizer()
    _train(model, optimizer, 3)
    path = save_optimizer_state(optimizer, tmp_path, LAYOUT)
    assert path.name == "rank_00000.safetensors" and not list(tmp_path.glob("*.partial"))
    _train(model, optimizer, 2, start=3)
    expected = [p.detach().clone() for p in model.parameters()]

    # A fresh model from another seed: the file brings both the weights and the Adam moments.
    fresh, fresh_optimizer = _model_and_optimizer(seed=1)
    load_optimizer_state(fresh_optimizer, tmp_path, LAYOUT)
    assert fresh_optimizer.param_groups[0]["betas"] == (0.9, 0.95)
    _train(fresh, fresh_optimizer, 2, start=3)
    assert all(torch.equal(a, b) for a, b in zip(expected, fresh.parameters()))

    # Without the moments (a fresh optimiser on the same weights) the same two steps land elsewhere.
    restarted, restarted_optimizer = _model_and_optimizer(seed=1)
    load_optimizer_state(restarted_optimizer, tmp_path, LAYOUT)
    restarted_optimizer.state.clear()
    _train(restarted, restarted_optimizer, 2, start=3)
    assert not torch.allclose(expected[0], restarted[0].weight, atol=1e-4)


def test_the_file_is_safetensors_with_the_layout_in_its_metadata(tmp_path):
    model, optimizer = _model_and_optimizer()
    _train(model, optimizer, 1)
    path = save_optimizer_state(optimizer, tmp_path, LAYOUT)
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        assert '"zero_stage": 0' in handle.metadata()["layout"]
    assert {"master/0", "state/0/exp_avg", "state/0/exp_avg_sq", "state/0/step"} <= keys


@pytest.mark.parametrize("change, message", [
    ({"world_size": 2, "rank": 0}, r"world_size saved 1, now 2"),
    ({"zero_stage": 2}, r"zero_stage saved 0, now 2"),
    ({"rank": 1}, r"rank_00001.safetensors: missing"),
])
def test_a_different_layout_or_a_missing_file_is_a_clear_error(tmp_path, change, message):
    model, optimizer = _model_and_optimizer()
    _train(model, optimizer, 1)
    save_optimizer_state(optimizer, tmp_path, LAYOUT)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(OptimizerStateError, match=message):
        load_optimizer_state(optimizer, tmp_path, {**LAYOUT, **change})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing changed


def test_another_models_state_is_refused_before_anything_changes(tmp_path):
    model, optimizer = _model_and_optimizer()
    _train(model, optimizer, 1)
    save_optimizer_state(optimizer, tmp_path, LAYOUT)
    other = torch.nn.Linear(4, 2)
    other_optimizer = torch.optim.AdamW(other.parameters())
    weight = other.weight.detach().clone()
    with pytest.raises(OptimizerStateError, match=r"holds 4 parameters, the optimiser has 2"):
        load_optimizer_state(other_optimizer, tmp_path, LAYOUT)
    assert torch.equal(weight, other.weight)


DEEPSPEED_RESUME = """
import sys, tempfile, torch
from actors.group import Learner
from rlhf.serve import free_port
from rlhf.config import DeepSpeedConfig, PPOAlgoConfig

stage = int(sys.argv[1])
learner = Learner()
learner.init_distributed(0, 1, "127.0.0.1", free_port(), threads=1)

def engine(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    learner._initialize(model, learning_rate=0.05, ds=DeepSpeedConfig(zero_stage=stage),
                        algo=PPOAlgoConfig(micro_batch_size=2), bf16=False)
    return learner.engine

def train(eng, steps, start):
    for step in range(start, start + steps):
        eng.backward(eng(torch.arange(8.0).reshape(2, 4) + step).pow(2).mean())
        eng.step()

def weights(eng):
    return [t.clone() for t in learner.full_state_dict().values()]

folder = tempfile.mkdtemp()
first = engine(0)
train(first, 3, 0)
learner.save_optimizer(folder)
saved_weights = weights(first)
train(first, 2, 3)
expected = weights(first)

second = engine(1)  # another start: the resume must bring the weights and the Adam moments
if stage < 3:  # the checkpoint's HF weights (ZeRO-3 partitions the module: they come from the masters)
    with torch.no_grad():
        for p, w in zip(second.module.parameters(), saved_weights):
            p.copy_(w)
learner.load_optimizer(folder)
train(second, 2, 3)
got = weights(second)
assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(expected, got)), [(a - b).abs().max() for a, b in zip(expected, got)]
print("ok")
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_partitions_resume_exactly_through_deepspeed(stage):
    result = subprocess.run([sys.executable, "-c", DEEPSPEED_RESUME, str(stage)], capture_output=True, text=True,
                            timeout=280, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
