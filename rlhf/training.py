"""The training loop shared by the SFT and reward-model stages: Ray Train workers running DeepSpeed.

The driver (``fit``) checks resources and data, then starts a Ray Train ``TorchTrainer`` whose workers
run ``train_loop``. A *task* (``rlhf.sft.SFTTask`` or ``rlhf.rm.RewardTask``) supplies what differs
between stages: the model, how a batch is collated, its loss, and its evaluation.

Data order is a function of (seed, step) alone, so a run resumed from a checkpoint sees exactly the
batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from rlhf.config import OptimConfig, RMConfig, SFTConfig
from rlhf.data.split import epoch_permutation
from rlhf.deepspeed_setup import adamw, deepspeed_config, deepspeed_engine
from rlhf.optimizer_state import (
    group_layout, load_optimizer_state, optimizer_state_file, save_optimizer_state, shard_layout,
)

STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"  # a resume checkpoint's module weights (ZeRO 0-2; ZeRO-3's are in its masters)
OPTIMIZER_DIR = "optimizer"  # each rank's optimiser state, rlhf.optimizer_state (no pickles)


class TrainingError(RuntimeError):
    """Training cannot start or continue; the message says why."""


class Task(Protocol):
    """What a stage plugs into the shared loop."""

    name: str

    def build_model(self, cfg: Any, path: str) -> torch.nn.Module: ...

    def collate(self, items: list[dict], pad_id: int) -> dict[str, torch.Tensor]: ...

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean loss of one micro-batch, and metrics to average across micro-batches and ranks."""

    def eval_sums(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """Sums over one held-out batch; summed across batches and ranks, then ``eval_metrics``."""

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]: ...

    def tokens(self, batch: dict[str, torch.Tensor]) -> int: ...

    def finish(self, engine: Any, items: list[dict], ctx: WorkerContext) -> dict[str, Any]:
        """Runs on every rank after training; returns extra files for the final folder (rank 0)."""


@dataclass
class WorkerContext:
    rank: int
    world: int
    batch_size: int
    pad_id: int


# --------------------------------------------------------------------------------------------------
# Pure helpers (no Ray, no DeepSpeed): schedule, data order, DeepSpeed config
# --------------------------------------------------------------------------------------------------


def lr_factor(step: int, total_steps: int, warmup_steps: int, scheduler: str) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    progress = min(max(progress, 0.0), 1.0)
    if scheduler == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine


def steps_per_epoch(n_items: int, global_batch: int) -> int:
    return n_items // global_batch


def micro_batch_indices(step: int, *, n_items: int, seed: int, batch_size: int, grad_accum: int,
                        world: int, rank: int) -> list[list[int]]:
    """Indices of the micro-batches rank ``rank`` trains on at optimiser step ``step``.

    Each epoch is a fresh permutation seeded by (seed, epoch); a step takes the next global batch
    (batch_size * grad_accum * world items) and deals micro-batches out to ranks in turn.
    """
    global_batch = batch_size * grad_accum * world
    per_epoch = steps_per_epoch(n_items, global_batch)
    epoch, offset = divmod(step, per_epoch)
    order = epoch_permutation(n_items, seed, epoch)
    chunk = order[offset * global_batch:(offset + 1) * global_batch]
    return [
        chunk[(m * world + rank) * batch_size:(m * world + rank + 1) * batch_size] for m in range(grad_accum)
    ]


def parameter_groups(model: torch.nn.Module, learning_rate: float, head_learning_rate: float | None) -> list[dict]:
    """The trainable parameters as optimiser groups: one at ``learning_rate``, or, with
    ``head_learning_rate``, the scalar head (``score``, the reward model's) in a group of its own at
    that rate. A freshly initialised head on a pretrained backbone needs far larger steps than the
    backbone: at one shared rate of 5e-5 the demo's reward model stayed at chance."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if head_learning_rate is None:
        return [{"params": [p for _, p in trainable], "lr": learning_rate}]
    is_head = ["score" in name.split(".") for name, _ in trainable]
    if not any(is_head):
        raise TrainingError("head_learning_rate is set but the model has no trainable 'score' head")
    return [{"params": [p for (_, p), head in zip(trainable, is_head) if not head], "lr": learning_rate},
            {"params": [p for (_, p), head in zip(trainable, is_head) if head], "lr": head_learning_rate}]


def plan_steps(n_items: int, optim: OptimConfig, world: int) -> tuple[int, int]:
    """(steps per epoch, total steps); an error when the data cannot fill one global batch."""
    global_batch = optim.batch_size * optim.grad_accum * world
    per_epoch = steps_per_epoch(n_items, global_batch)
    if per_epoch == 0:
        raise TrainingError(
            f"{n_items} training examples cannot fill one global batch of {global_batch} "
            f"(optim.batch_size {optim.batch_size} x optim.grad_accum {optim.grad_accum} x {world} workers); "
            "lower the batch size or add data"
        )
    total = per_epoch * optim.epochs
    if optim.max_steps is not None:
        total = min(total, optim.max_steps)
    return per_epoch, total


# --------------------------------------------------------------------------------------------------
# The worker loop (runs inside each Ray Train worker)
# --------------------------------------------------------------------------------------------------


def all_reduce_sums(values: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist

    keys = sorted(values)
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist()))


def sharded_batches(task: Task, items: list[dict], ctx: WorkerContext, device):
    """This rank's share of ``items`` in batches, as ``(batch, real)``.

    Every rank yields the same number of batches, because under ZeRO-3 every forward needs all
    ranks; a rank whose share ran out gets a stand-in batch with ``real=False`` (ignore its output).
    """
    shard = items[ctx.rank::ctx.world]
    for b in range(math.ceil(len(items) / ctx.world / ctx.batch_size)):
        chunk = shard[b * ctx.batch_size:(b + 1) * ctx.batch_size]
        batch = {k: v.to(device) for k, v in task.collate(chunk or items[:1], ctx.pad_id).items()}
        yield batch, bool(chunk)


def _evaluate(engine, task: Task, items: list[dict], ctx: WorkerContext, device) -> dict[str, float]:
    """Every rank evaluates its shard; sums are reduced across ranks."""
    sums: dict[str, float] = {}
    engine.eval()
    with torch.no_grad():
        for batch, real in sharded_batches(task, items, ctx, device):
            batch_sums = task.eval_sums(engine, batch)
            if real:
                for key, value in batch_sums.items():
                    sums[key] = sums.get(key, 0.0) + value
    engine.train()
    return task.eval_metrics(all_reduce_sums(sums))


def _save_resume_checkpoint(engine, scheduler, step: int, metrics: dict[str, float], ctx: WorkerContext,
                            zero_stage: int) -> None:
    """Every rank's optimiser state and rank 0's module weights and trainer state, all as safetensors
    or JSON, merged by Ray Train into one checkpoint folder."""
    import ray.train
    from safetensors.torch import save_file

    local = Path(tempfile.mkdtemp(prefix=f"rlhf-ckpt-r{ctx.rank}-"))
    save_optimizer_state(engine.optimizer, local / OPTIMIZER_DIR, shard_layout(zero_stage, ctx.world, ctx.rank))
    if ctx.rank == 0:
        if zero_stage < 3:
            # Copies: ZeRO 1-2 keep the parameters as views into one flat buffer, which safetensors refuses.
            save_file({k: v.detach().to("cpu", copy=True).contiguous() for k, v in engine.module.state_dict().items()},
                      str(local / MODEL_FILE))
        state = {"step": step, "scheduler": scheduler.state_dict(),
                 "layout": group_layout(zero_stage, ctx.world)}
        (local / STATE_FILE).write_text(json.dumps(state))
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(str(local)),
        checkpoint_dir_name=f"checkpoint_step_{step:06d}",
    )
    shutil.rmtree(local, ignore_errors=True)


def _load_resume_checkpoint(engine, scheduler, resume: Path, ctx: WorkerContext, zero_stage: int) -> int:
    """Load what ``_save_resume_checkpoint`` wrote; returns the step to continue from."""
    from safetensors.torch import load_file

    state = json.loads((resume / STATE_FILE).read_text())
    if zero_stage < 3:  # under ZeRO-3 the module's shards are refreshed from the fp32 masters below
        engine.module.load_state_dict(load_file(str(resume / MODEL_FILE)), strict=True)
    load_optimizer_state(engine.optimizer, resume / OPTIMIZER_DIR, shard_layout(zero_stage, ctx.world, ctx.rank))
    scheduler.load_state_dict(state["scheduler"])
    return state["step"]


def check_resume_checkpoint(resume: Path, cfg: SFTConfig | RMConfig) -> int:
    """Before any worker starts: ``resume`` is a checkpoint of this trainer whose optimiser states
    (sharded per rank) fit the configured ZeRO stage and worker count. Returns its step."""
    state_file = resume / STATE_FILE
    if not state_file.is_file():
        raise TrainingError(f"resume_from {resume}: not a checkpoint folder (no {STATE_FILE})")
    state = json.loads(state_file.read_text())
    layout = state.get("layout")
    if layout is None:
        raise TrainingError(f"resume_from {resume}: written by an older version (DeepSpeed pickles), which is not "
                            "loaded: weights load only from safetensors")
    now = group_layout(cfg.deepspeed.zero_stage, cfg.scaling.workers)
    if layout != now:
        raise TrainingError(f"resume_from {resume}: saved with deepspeed.zero_stage={layout['zero_stage']} and "
                            f"scaling.workers={layout['world_size']}, the config gives {now['zero_stage']} and "
                            f"{now['world_size']}; optimiser states are sharded per rank, so resume with the same")
    return state["step"]


def checkpoints(output_dir: str | Path) -> list[Path]:
    """The complete resume checkpoints under ``<output_dir>/ray_train``, oldest first: each with its
    trainer state and, for every rank that state names, the rank's optimiser state (and below ZeRO-3
    the weights)."""
    found = []
    for folder in sorted(Path(output_dir, "ray_train").glob("checkpoint_step_*")):
        try:
            layout = json.loads((folder / STATE_FILE).read_text())["layout"]
            files = [optimizer_state_file(folder / OPTIMIZER_DIR, rank) for rank in range(layout["world_size"])]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if layout["zero_stage"] < 3:
            files.append(folder / MODEL_FILE)
        if all(f.is_file() for f in files):
            found.append(folder)
    return found


def _final_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor] | None:
    """Full weights on rank 0 (ZeRO-3 gathers them from all ranks; every rank must call this)."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


def save_final_model(task: Task, cfg: SFTConfig | RMConfig, path: str, state: dict[str, torch.Tensor],
                     out: Path, tokenizer_path: str, extra_files: dict[str, Any]) -> Path:
    """A Hugging Face folder at ``out`` through the shared writer (``rlhf.models.saving``): merged
    weights, unless ``save_adapter_only``. With LoRA the adapter alone is also written to
    ``<output_dir>/adapter``."""
    from transformers import AutoTokenizer

    from rlhf.models import attach_lora
    from rlhf.models.loading import torch_dtype
    from rlhf.models.saving import save_model_folder

    model = task.build_model(cfg.model, path)
    if cfg.model.lora is not None:
        model = attach_lora(model, cfg.model.lora, task_type=task.peft_task_type)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "lora_" in m or "score" in m]:
        raise TrainingError(f"final weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model = model.to(torch_dtype(cfg.model.dtype))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    return save_model_folder(model, tokenizer, out, extra_files=extra_files,
                             adapter_out=out.with_name("adapter") if cfg.model.lora is not None else None,
                             adapter_only=cfg.save_adapter_only, overwrite=cfg.overwrite)


def train_loop(job: dict) -> None:
    """Body of each Ray Train worker."""
    import ray.train

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from rlhf.deepspeed_setup import import_deepspeed

    deepspeed = import_deepspeed()

    from rlhf.metrics import MetricsLogger
    from rlhf.models import attach_lora, use_training_attention

    task: Task = job["task"]
    cfg: SFTConfig | RMConfig = job["cfg"]
    optim = cfg.optim
    context = ray.train.get_context()
    ctx = WorkerContext(context.get_world_rank(), context.get_world_size(), optim.batch_size, job["pad_id"])
    device = torch.device("cuda", context.get_local_rank()) if torch.cuda.is_available() else torch.device("cpu")
    torch.manual_seed(cfg.seed)
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")

    train_items, eval_items = job["train_items"], job["eval_items"]
    per_epoch, total_steps = plan_steps(len(train_items), optim, ctx.world)
    warmup = int(optim.warmup_ratio * total_steps)

    model = task.build_model(cfg.model, job["model_path"])
    use_training_attention(model, optim.attention, device)
    if cfg.model.lora is not None:
        model = attach_lora(model, cfg.model.lora, task_type=task.peft_task_type)
    params = parameter_groups(model, optim.learning_rate, getattr(task, "head_learning_rate", None))
    optimizer = adamw(params, lr=optim.learning_rate, betas=optim.betas, weight_decay=optim.weight_decay, device=device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, optim.scheduler)
    )
    engine = deepspeed_engine(
        model, optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg.deepspeed, micro_batch_size=optim.batch_size, grad_accum=optim.grad_accum,
                                max_grad_norm=optim.max_grad_norm, world=ctx.world,
                                bf16=cfg.model.dtype == "bfloat16"),
    )

    start_step = 0
    if job["resume_from"]:
        resume = Path(job["resume_from"])
        start_step = _load_resume_checkpoint(engine, scheduler, resume, ctx, cfg.deepspeed.zero_stage)

    logger = MetricsLogger(cfg.output_dir, append=start_step > 0) if ctx.rank == 0 else None
    progress = None
    if ctx.rank == 0:
        from ray.experimental.tqdm_ray import tqdm

        progress = tqdm(total=total_steps, desc=f"{task.name} training")
        progress.update(start_step)

    if start_step == 0:  # the baseline every later evaluation is compared with
        baseline = _evaluate(engine, task, eval_items, ctx, device)
        if logger:
            logger.log(0, baseline)

    for step in range(start_step, total_steps):
        started = time.perf_counter()
        sums: dict[str, float] = {}
        tokens = 0
        indices = micro_batch_indices(step, n_items=len(train_items), seed=cfg.seed, batch_size=optim.batch_size,
                                      grad_accum=optim.grad_accum, world=ctx.world, rank=ctx.rank)
        for micro in indices:
            batch = {k: v.to(device) for k, v in task.collate([train_items[i] for i in micro], ctx.pad_id).items()}
            loss, micro_metrics = task.loss(engine, batch)
            engine.backward(loss)
            engine.step()
            tokens += task.tokens(batch)
            for key, value in micro_metrics.items():
                sums[key] = sums.get(key, 0.0) + value
        reduced = all_reduce_sums({**sums, "_tokens": tokens})
        done = step + 1
        metrics = {key: reduced[key] / (len(indices) * ctx.world) for key in sums}
        metrics["lr"] = scheduler.get_last_lr()[0]
        grad_norm = engine.get_global_grad_norm()  # None where DeepSpeed does not compute it (ZeRO-0)
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        metrics["tokens_per_s"] = reduced["_tokens"] / (time.perf_counter() - started)
        metrics["epoch"] = step / per_epoch
        if done % optim.eval_every == 0 or done == total_steps:
            metrics.update(_evaluate(engine, task, eval_items, ctx, device))
        if logger and (done % optim.log_every == 0 or done == total_steps):
            logger.log(done, {k if "/" in k else f"train/{k}": v for k, v in metrics.items()})
        if progress:
            progress.update(1)
        if optim.save_every and done % optim.save_every == 0 and done < total_steps:
            _save_resume_checkpoint(engine, scheduler, done, metrics, ctx, cfg.deepspeed.zero_stage)

    extra_files = task.finish(engine, train_items, ctx)
    state = _final_state_dict(engine, cfg.deepspeed.zero_stage)
    if ctx.rank == 0:
        save_final_model(task, cfg, job["model_path"], state, Path(cfg.output_dir) / "final",
                         job["model_path"], extra_files)
        logger.close()
        progress.close()
    import torch.distributed as dist

    dist.barrier()


# --------------------------------------------------------------------------------------------------
# The driver side
# --------------------------------------------------------------------------------------------------


def fit(task: Task, cfg: SFTConfig | RMConfig, *, model_path: str, train_items: list[dict],
        eval_items: list[dict], pad_id: int) -> Path:
    """Check everything that can be checked before training, then run the Ray Train job."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from cluster.runtime import check_resources, init_ray
    from rlhf.metrics import continue_metrics
    from rlhf.outputs import Interrupted

    scaling = cfg.scaling
    plan_steps(len(train_items), cfg.optim, scaling.workers)  # fail before starting anything
    if not eval_items:
        raise TrainingError("no held-out examples: set data.eval_path or data.eval_fraction > 0")
    resume_step = check_resume_checkpoint(Path(cfg.resume_from), cfg) if cfg.resume_from else 0

    init_ray(cfg.ray)
    bundle = {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.gpus_per_worker else {})}
    check_resources([bundle] * scaling.workers, what=f"{task.name} (scaling.workers={scaling.workers})")

    output_dir = Path(cfg.output_dir).resolve()
    if resume_step:  # into this run's own folder, the steps after the checkpoint are redone: logged once
        continue_metrics(output_dir / "metrics.jsonl", resume_step)
    cfg = cfg.model_copy(update={"output_dir": str(output_dir)})
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "task": task,
            "cfg": cfg,
            "model_path": model_path,
            "train_items": train_items,
            "eval_items": eval_items,
            "pad_id": pad_id,
            "resume_from": str(Path(cfg.resume_from).resolve()) if cfg.resume_from else None,
        },
        scaling_config=ScalingConfig(
            num_workers=scaling.workers,
            use_gpu=scaling.gpus_per_worker > 0,
            resources_per_worker=bundle,
        ),
        torch_config=TorchConfig(backend="nccl" if scaling.gpus_per_worker > 0 else "gloo"),
        run_config=RunConfig(name="ray_train", storage_path=str(output_dir)),
    )
    try:
        result = _fit_on_a_thread(trainer)
    except KeyboardInterrupt:
        raise Interrupted(checkpoints(output_dir)) from None
    if result.error:
        raise TrainingError(f"{task.name} training failed: {result.error}")
    return output_dir / "final"


def _fit_on_a_thread(trainer):
    """``trainer.fit()`` on a helper thread, so that Ctrl-C stays ours: on the main thread Ray Train
    installs its own SIGINT handler, which aborts the run and exits with status 1 and no word. Here
    Ctrl-C raises ``KeyboardInterrupt`` in the waiting main thread; the training itself stops when the
    process exits (``rlhf sft`` and ``rlhf rm`` exit at once, with status 130)."""
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread
            outcome["error"] = exc

    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
