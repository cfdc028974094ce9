"""A learner rank's optimiser state in safetensors, so that a resumed PPO run continues exactly.

DeepSpeed's own ``save_checkpoint`` pickles (and its loader unpickles with ``weights_only=False``), and
we load nothing from pickles. What a resume needs is small and plain: the torch optimiser that does
the update (AdamW: ``step``, ``exp_avg``, ``exp_avg_sq`` per parameter) and the fp32 parameters it
updates. Under ZeRO-0 those are the model's own parameters; under ZeRO 1-3 DeepSpeed wraps the torch
optimiser (``.optimizer``) and hands it this rank's flat fp32 partitions. Either way the tensors are
the torch optimiser's ``param_groups`` and ``state`` (ZeRO-3 lends it its partitions only during a
step, so there they come through DeepSpeed's ``state_dict``), saved here as

* ``master/<i>``: the i-th parameter the optimiser updates (the fp32 master copy under ZeRO 1-3 or
  bf16, which the Hugging Face weights in the checkpoint round), and
* ``state/<i>/<name>``: its optimiser state,

with the hyper-parameters and a description of the layout (ZeRO stage, world size, rank) as JSON in
the file's metadata. Partitions are per rank, so a resume needs the same ZeRO stage and number of
ranks; anything else is a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

LAYOUT_KEYS = ("zero_stage", "world_size", "rank")


def group_layout(zero_stage: int, world_size: int) -> dict[str, int]:
    """How a learner group's optimiser states are sharded: what a checkpoint records and a resume must match."""
    return {"zero_stage": zero_stage, "world_size": world_size}


def shard_layout(zero_stage: int, world_size: int, rank: int) -> dict[str, int]:
    """How one rank's optimiser state is sharded: what a file records and a resume must match."""
    return {**group_layout(zero_stage, world_size), "rank": rank}


class OptimizerStateError(RuntimeError):
    """An optimiser state file that does not fit the optimiser it is loaded into."""


def base_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimiser doing the update: DeepSpeed's ZeRO and bf16 wrappers keep it in ``.optimizer``."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def is_zero3(optimizer) -> bool:
    # ZeRO-3 hands its fp32 partitions to the torch optimiser only during a step, so its state goes
    # through DeepSpeed's own state_dict / load_state_dict (their tensors; the rest is configuration).
    return hasattr(optimizer, "fp32_partitioned_groups_flat")


def torch_state_and_masters(optimizer) -> tuple[dict, list[torch.Tensor]]:
    """The torch optimiser's state dict and the fp32 parameters it updates, in its own order."""
    if is_zero3(optimizer):
        full = optimizer.state_dict()
        return full["optimizer_state_dict"], list(full["fp32_flat_groups"])
    base = base_optimizer(optimizer)
    return base.state_dict(), [p for group in base.param_groups for p in group["params"]]


def optimizer_state_file(folder: Path, rank: int) -> Path:
    return Path(folder) / f"rank_{rank:05d}.safetensors"


def save_optimizer_state(optimizer, folder: Path, layout: dict[str, int]) -> Path:
    """Write this rank's optimiser state to ``folder/rank_NNNNN.safetensors`` (temp name, then rename)."""
    from safetensors.torch import save_file

    saved, params = torch_state_and_masters(optimizer)
    tensors = {f"master/{i}": p.detach().to("cpu", copy=True).contiguous() for i, p in enumerate(params)}
    for index, state in saved["state"].items():
        for name, value in state.items():
            if not torch.is_tensor(value):
                raise OptimizerStateError(f"optimiser state {name!r} of parameter {index} is a "
                                          f"{type(value).__name__}, not a tensor: cannot be saved as safetensors")
            tensors[f"state/{index}/{name}"] = value.detach().to("cpu", copy=True).contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()} for group in saved["param_groups"]]
    metadata = {"param_groups": json.dumps(groups), "layout": json.dumps(layout)}
    path = optimizer_state_file(folder, layout["rank"])
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".partial")
    save_file(tensors, str(staging), metadata=metadata)
    staging.rename(path)
    return path


def load_optimizer_state(optimizer, folder: Path, layout: dict[str, int]) -> None:
    """Load ``folder``'s file for this rank into ``optimizer`` (state and fp32 parameters). The saved
    layout must equal ``layout`` and every tensor must match in shape: otherwise an
    ``OptimizerStateError`` naming the file and what differs, before anything is changed."""
    from safetensors import safe_open

    path = optimizer_state_file(folder, layout["rank"])
    if not path.is_file():
        raise OptimizerStateError(f"{path}: missing (the checkpoint holds no optimiser state for rank {layout['rank']})")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    try:
        saved_layout = json.loads(metadata["layout"])
        groups = json.loads(metadata["param_groups"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise OptimizerStateError(f"{path}: not an optimiser state file ({exc})") from None
    differ = [f"{key} saved {saved_layout.get(key)}, now {layout[key]}" for key in LAYOUT_KEYS
              if saved_layout.get(key) != layout[key]]
    if differ:
        raise OptimizerStateError(f"{path}: the optimiser state is sharded per rank and was saved with another "
                                  f"layout ({'; '.join(differ)}); resume with the same ZeRO stage and worker count")
    _, params = torch_state_and_masters(optimizer)
    masters = [key for key in tensors if key.startswith("master/")]
    if len(masters) != len(params):
        raise OptimizerStateError(f"{path}: holds {len(masters)} parameters, the optimiser has {len(params)}")
    for i, param in enumerate(params):
        if tensors[f"master/{i}"].shape != param.shape:
            raise OptimizerStateError(f"{path}: parameter {i} has shape {tuple(tensors[f'master/{i}'].shape)}, "
                                      f"the optimiser's has {tuple(param.shape)}")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    for group in groups:
        for key, value in group.items():
            if key != "params" and isinstance(value, list):
                group[key] = tuple(value)
    torch_state = {"state": state, "param_groups": groups}
    if is_zero3(optimizer):  # DeepSpeed copies the masters into its partitions and the module's shards
        merged = {**optimizer.state_dict(), "optimizer_state_dict": torch_state,
                  "fp32_flat_groups": [tensors[f"master/{i}"] for i in range(len(params))]}
        optimizer.load_state_dict([merged] * layout["world_size"])
        return
    base_optimizer(optimizer).load_state_dict(torch_state)
    with torch.no_grad():
        for i, param in enumerate(params):
            param.copy_(tensors[f"master/{i}"])
