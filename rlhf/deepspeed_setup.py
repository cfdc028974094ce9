"""Setting DeepSpeed up, for the Ray Train stages (rlhf/training.py) and the PPO learners (actors/group.py):
importing it on a machine that builds torch extensions, its config, the client optimiser and the engine."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from rlhf.config import DeepSpeedConfig, deep_merge


def _build_running_in(folder: Path) -> bool:
    """Whether a process works in ``folder`` (a build's ninja and compilers run there) or names it."""
    import psutil

    for process in psutil.process_iter(["cwd", "cmdline"]):
        cwd, cmdline = process.info.get("cwd"), process.info.get("cmdline") or []
        if (cwd and Path(cwd) == folder) or any(str(folder) in part for part in cmdline):
            return True
    return False


def clear_stale_build_locks(max_age_s: float = 300.0) -> list[str]:
    """Remove torch extension build locks older than ``max_age_s`` whose build no process is still
    running; returns their paths.

    DeepSpeed builds an op (its CPU Adam for optimizer offload, say) on first use, under a lock file that
    torch waits on for as long as it exists. A build killed half way (a Ray worker killed while it started) leaves the
    lock behind, and every later DeepSpeed start on that machine would wait forever. A build takes
    about a minute; a lock minutes old is removed unless a process still works in its folder (a slow
    build on a loaded machine). Called where DeepSpeed starts."""
    import logging
    import time

    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    removed = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            age = time.time() - lock.stat().st_mtime
            if age > max_age_s and not _build_running_in(lock.parent):
                lock.unlink()
                removed.append(str(lock))
                logging.getLogger(__name__).warning(
                    "removed a stale build lock %s (%.0f s old, left by a build that was killed); it would "
                    "have made DeepSpeed wait forever", lock, age)
        except FileNotFoundError:  # its build just finished
            pass
    return removed


def import_deepspeed():
    """``import deepspeed``, ready for training: stale build locks cleared first
    (:func:`clear_stale_build_locks`), and DeepSpeed's shared-memory all-reduce op switched off.

    DeepSpeed compiles that op with gcc when its communication starts on a CPU: 60-80 s on a new
    machine, and about 25 s again whenever another virtual environment built it last (torch's build
    cache is keyed by the op's name, and the sources' path differs). Only DeepSpeed's inference
    all-reduce uses it; training's collectives are torch.distributed's. ``deepspeed.ops.__compatible_ops__``
    is the dict DeepSpeed consults before building an op, kept for the process so edits to it last."""
    clear_stale_build_locks()
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def deepspeed_config(ds: DeepSpeedConfig, *, micro_batch_size: int, grad_accum: int, max_grad_norm: float,
                     world: int, bf16: bool) -> dict:
    """Our config mapped onto DeepSpeed's; ``ds.extra`` is merged last, verbatim. Shared by the Ray
    Train stages and the PPO learners."""
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world,
        "gradient_clipping": max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,  # we log ourselves
        "wall_clock_breakdown": False,
    }
    return deep_merge(config, ds.extra)


def adamw(params: list, *, lr: float, betas: tuple[float, float], weight_decay: float,
          device: torch.device) -> torch.optim.AdamW:
    """The client AdamW of the DeepSpeed engines (Ray Train stages and PPO learners). On the CPU it is
    torch's fused kernel: one pass per tensor instead of a chain of element-wise ops, 0.07 s instead of
    0.36 s per step over the 135M default model's parameters on 2 cores."""
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay,
                             fused=True if device.type == "cpu" else None)


def deepspeed_engine(model: torch.nn.Module, optimizer: torch.optim.Optimizer, config: dict, lr_scheduler=None):
    """``deepspeed.initialize``'s engine, for the Ray Train stages and the PPO learners. A lone ZeRO-0
    rank has nothing to average, yet DeepSpeed would still flatten, "reduce" and copy back every
    gradient at each optimiser step (0.13 s of a default-model step on 2 cores): it skips that."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=config)
    if engine.world_size == 1 and engine.zero_optimization_stage() == 0:
        engine.enable_backward_allreduce = False
    return engine
