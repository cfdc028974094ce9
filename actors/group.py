"""DeepSpeed learner groups: N Ray actors wired as the ranks of one torch.distributed job.

``LearnerGroup`` (controller side) starts the actors on placement-group bundles, has rank 0 start the
group's store (listening on its node's address only: 127.0.0.1 on a local Ray) and hands every rank
``RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT``; each rank joins the process group on that store
before DeepSpeed initialises (which then uses it; without the variables DeepSpeed tries MPI discovery
and fails). ``Learner`` is the base of the policy and critic actors: it owns the DeepSpeed engine and
the code both roles share.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from rlhf.config import DeepSpeedConfig, PPOAlgoConfig

log = logging.getLogger("rlhf.learner")


class LearnerLostError(RuntimeError):
    """A learner rank died. Its DeepSpeed group cannot go on without it (the other ranks hold only
    their share of the work, and a rank cannot rejoin a running group), so the run stops; the message
    names the role and rank. Resume from the last checkpoint (``resume_from``)."""


class NonFiniteWeightsError(RuntimeError):
    """A learner's weights hold NaN or infinity: they are not written as a checkpoint."""


def torch_threads(threads: int | None, take_turns: bool = False) -> int:
    """Torch threads for a PPO actor: ``threads`` when set (config ``actor_threads``); else all this
    node's cores when the actors take turns (config ``actors_take_turns``), half of them (at least 1)
    when they work in pairs at the same time. Two actors each running a thread per core oversubscribe
    the cores: on 2 cores a default-model PPO step took 48.0 s that way and 32.8 s with one thread each
    (benchmarks/ppo_step.py)."""
    cores = os.cpu_count() or 2
    return threads or (cores if take_turns else max(1, cores // 2))


class Learner:
    """One DeepSpeed rank. Subclasses build the model in ``setup`` and define ``train``."""

    def address(self, world_size: int, timeout_s: float) -> tuple[str, int]:
        """Start the group's store and say where it listens (called on rank 0 only)."""
        from datetime import timedelta

        import ray

        from actors.weight_sync import master_store

        host = ray.util.get_node_ip_address()
        self._store = master_store(host, world_size, timedelta(seconds=timeout_s))
        return host, self._store.port

    def init_distributed(self, rank: int, world_size: int, master_addr: str, master_port: int,
                         threads: int | None = None, take_turns: bool = False) -> None:
        # Ray shows each GPU actor only its own device, so the local rank is always 0.
        os.environ.update({
            "RANK": str(rank), "LOCAL_RANK": "0",
            "WORLD_SIZE": str(world_size), "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
        })
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        torch.set_num_threads(torch_threads(threads, take_turns))
        from datetime import timedelta

        from actors.weight_sync import master_store
        from rlhf.deepspeed_setup import import_deepspeed

        deepspeed = import_deepspeed()

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if master_addr in ("127.0.0.1", "localhost"):  # a local group: gloo's own sockets on loopback too
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        timeout = timedelta(minutes=30)  # torch's default for a process group
        if rank == 0:  # address() started it; a rank 0 started by hand starts it here
            store = getattr(self, "_store", None) or master_store(master_addr, world_size, timeout, master_port)
        else:
            store = torch.distributed.TCPStore(master_addr, master_port, world_size, is_master=False, timeout=timeout)
        torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        deepspeed.init_distributed(dist_backend=backend)  # takes the group above
        self.rank, self.world_size = rank, world_size
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def _initialize(self, model: torch.nn.Module, *, learning_rate: float, ds: DeepSpeedConfig,
                    algo: PPOAlgoConfig, bf16: bool) -> None:
        """DeepSpeed engine with an AdamW of ``learning_rate``; batch shape and clipping from ``algo``."""
        from rlhf.deepspeed_setup import adamw, deepspeed_config, deepspeed_engine

        from rlhf.models import use_training_attention

        use_training_attention(model, algo.learner_attention, self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = adamw(params, lr=learning_rate, betas=(0.9, 0.95), weight_decay=0.0, device=self.device)
        config = deepspeed_config(ds, micro_batch_size=algo.micro_batch_size, grad_accum=algo.grad_accum,
                                  max_grad_norm=algo.max_grad_norm, world=self.world_size, bf16=bf16)
        self.engine = deepspeed_engine(model, optimizer, config)
        self.zero_stage = ds.zero_stage

    def _schedule(self, experience: dict[str, torch.Tensor], iteration: int, unit: str = "token") -> list:
        """This call's optimiser steps and micro-batches (``ppo_schedule``), shuffled by seed and
        iteration; micro-batches group sequences of similar length, so each carries little padding.
        With shared prompts the responses to one prompt stay together, so that it is read once.
        Each micro-batch counts what its losses average over (``unit``, the loss aggregation's): its
        response tokens, or its responses."""
        from rlhf.algorithms import ppo_schedule, prompt_groups

        algo = self.algo
        groups = prompt_groups(experience["input_ids"], experience["attention_mask"],
                               experience["action_mask"]) if self.share_prompts else None
        return ppo_schedule(experience["input_ids"].shape[0], algo.micro_batch_size, epochs=algo.epochs,
                            seed=self.seed + iteration, grad_accum=algo.grad_accum,
                            lengths=experience["attention_mask"].sum(-1).tolist(), groups=groups,
                            tokens=experience["action_mask"].sum(-1).tolist() if unit == "token"
                            else [1] * experience["input_ids"].shape[0])

    def _step_tokens(self, schedule: list) -> list[int]:
        """Response tokens of each optimiser step of ``schedule``, summed over all ranks: one
        all_reduce for the whole schedule (every rank has as many steps: PPOConfig.check makes the
        samples a multiple of micro_batch_size x grad_accum x workers)."""
        import torch.distributed as dist

        counts = torch.tensor([sum(micro.tokens for micro in step) for step in schedule], dtype=torch.long,
                              device=self.device)
        if self.world_size > 1:
            dist.all_reduce(counts)
        return counts.tolist()

    def _train_steps(self, experience: dict[str, torch.Tensor], schedule: list, micro_loss: Callable,
                     role: str) -> tuple[list[dict[str, float]], int]:
        """Train on ``schedule`` (:meth:`_schedule`): per micro-batch one ``engine.backward`` of
        ``micro_loss(batch, window, shared, weight=, step_index=, micro_index=) -> (loss, stats)``
        on its rows (:meth:`_micro_batch`), and ``_step``. Returns every micro-batch's stats (the
        last of each step with ``<role>/grad_norm`` where DeepSpeed computes one) and how many
        optimiser steps were skipped for non-finite gradients.

        ``micro_loss`` multiplies its token-mean terms by ``weight``, the micro-batch's share of its
        step's response tokens on all ranks (``token_loss_weight``, undoing DeepSpeed's division by
        grad_accum and its average over ranks): every response token of a step then weighs the same,
        in a micro-batch of short responses or of long ones, on this rank or another."""
        from rlhf.algorithms import token_loss_weight

        step_tokens = self._step_tokens(schedule)
        grad_accum = self.engine.gradient_accumulation_steps()  # what engine.backward divides by
        stats, skipped, micro_index = [], 0, 0
        for step_index, (optimizer_step, tokens) in enumerate(zip(schedule, step_tokens)):
            for micro in optimizer_step:
                batch, window, shared = self._micro_batch(experience, micro.indices)
                weight = token_loss_weight(micro.tokens, tokens, grad_accum=grad_accum, world=self.world_size)
                loss, micro_stats = micro_loss(batch, window, shared, weight=weight, step_index=step_index,
                                               micro_index=micro_index)
                self.engine.backward(loss)
                skipped += not self._step()
                stats.append(micro_stats)
                micro_index += 1
            grad_norm = self.engine.get_global_grad_norm()
            if grad_norm is not None:
                stats[-1][f"{role}/grad_norm"] = float(grad_norm)
        return stats, skipped

    def _micro_batch(self, experience: dict[str, torch.Tensor], indices: list[int]) -> tuple:
        """Rows ``indices`` of ``experience`` cut to their scored window (``crop_to_window``: no
        padding past the last response token) on this rank's device, that window, and the rows
        packed by prompt (``SharedPrompts``; None without shared prompts or when no two rows share one)."""
        from rlhf.algorithms import crop_to_window, pack_shared_prompts, scored_window
        from rlhf.algorithms.batching import select

        batch = select(experience, indices)
        window = scored_window(batch["action_mask"])
        shared = None
        if self.share_prompts:
            shared = pack_shared_prompts(batch["input_ids"], batch["attention_mask"], batch["action_mask"], window,
                                         pad_token_id=self.tokenizer.pad_token_id or 0)
            plain = len(indices) * (window[1] + 1)  # what the plain pass reads, padding included
            self.tokens_read += plain if shared is None else shared.tokens
            self.plain_tokens += plain
            shared = shared.to(self.device) if shared is not None else None
        cropped = {k: v.to(self.device) for k, v in crop_to_window(batch, window).items()}
        return cropped, window, shared

    def _use_shared_prompts(self, wanted: bool) -> None:
        """Share prompts when the config asks and the model's attention takes a custom mask."""
        from rlhf.algorithms import attention_kernel, can_share_prompts

        module = self.engine.module
        self.share_prompts = wanted and can_share_prompts(module)
        if wanted and not self.share_prompts:
            log.warning("%s: ppo.share_prompts is on but the model's attention (%s) takes no custom mask; "
                        "scoring every row in full", type(self).__name__, attention_kernel(module))
        self.tokens_read = self.plain_tokens = 0

    def _token_stats(self, role: str) -> dict[str, float]:
        """``<role>/tokens_read_fraction``: tokens read with shared prompts over those the plain pass
        reads (padding included in both), since the last call; absent without sharing."""
        stats = {f"{role}/tokens_read_fraction": self.tokens_read / self.plain_tokens} if self.plain_tokens else {}
        self.tokens_read = self.plain_tokens = 0
        return stats

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights on rank 0, None elsewhere; every rank must call it (ZeRO-3 gathers)."""
        if self.zero_stage == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict() if self.rank == 0 else None
        if self.rank != 0 or state is None:
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def _step(self) -> bool:
        """``engine.step()``, except that an optimiser step whose gradients hold NaN or infinity is
        skipped: no change to the weights or the optimiser state. Returns False when it was skipped.

        Under ZeRO-0 the gradients sit in ``param.grad``, already averaged across ranks at the
        accumulation boundary (so every rank decides alike), and DeepSpeed's step would write NaN
        into the weights: then the weights and optimiser state are kept aside, the step runs on zero
        gradients (DeepSpeed's counters stay in line) and both are put back. DeepSpeed's ZeRO 1-3
        optimisers check for overflow themselves and skip the step; their ``overflow`` flag says so."""
        import copy

        boundary = self.engine.is_gradient_accumulation_boundary()
        params = [p for p in self.engine.module.parameters() if p.grad is not None]
        # The gradients' total norm is finite exactly when they all are (or they overflow it, which
        # is as bad): one fused pass, where a check per tensor took 0.3 s of a default-model step.
        if boundary and self.zero_stage == 0 and not torch.isfinite(
                torch.nn.utils.get_total_norm([p.grad for p in params])):
            weights = [p.detach().clone() for p in params]
            optimizer_state = copy.deepcopy(self.engine.optimizer.state_dict())
            for p in params:
                p.grad.zero_()
            self.engine.step()
            with torch.no_grad():
                for p, saved in zip(params, weights):
                    p.copy_(saved)
            self.engine.optimizer.load_state_dict(optimizer_state)
            return False
        self.engine.step()
        return not (boundary and bool(getattr(self.engine.optimizer, "overflow", False)))

    def save_pretrained(self, folder: str, adapter_folder: str | None = None) -> str | None:
        """Write a Hugging Face folder of the current weights (rank 0; every rank must call it: ZeRO-3
        gathers) through the shared writer, ``rlhf.models.saving.save_model_folder``: a LoRA model's
        folder holds merged weights, and its adapter alone goes to ``adapter_folder`` when given."""
        from rlhf.models.saving import save_model_folder

        state = self.full_state_dict()
        if self.rank != 0:
            return None
        bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
        if bad:  # never write a checkpoint that cannot be trained or served from
            raise NonFiniteWeightsError(f"{len(bad)} weight tensor(s) hold NaN or infinity (first: {bad[0]}); "
                                        f"not saving {folder}")
        return str(save_model_folder(self.engine.module, self.tokenizer, Path(folder), state_dict=state,
                                     adapter_out=Path(adapter_folder) if adapter_folder else None))

    def optimizer_layout(self) -> dict[str, int]:
        """How this rank's optimiser state is sharded; a resume must find the same."""
        from rlhf.optimizer_state import shard_layout

        return shard_layout(self.zero_stage, self.world_size, self.rank)

    def save_optimizer(self, folder: str) -> str:
        """This rank's optimiser state (and fp32 master weights) as ``folder/rank_NNNNN.safetensors``;
        every rank writes its own."""
        from rlhf.optimizer_state import save_optimizer_state

        return str(save_optimizer_state(self.engine.optimizer, Path(folder), self.optimizer_layout()))

    def load_optimizer(self, folder: str) -> None:
        """Continue from the optimiser state ``save_optimizer`` wrote (resume_from)."""
        from rlhf.optimizer_state import load_optimizer_state

        load_optimizer_state(self.engine.optimizer, Path(folder), self.optimizer_layout())

    def pid(self) -> int:
        """This rank's process id (fault tests kill it with SIGKILL)."""
        return os.getpid()

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()


class LearnerGroup:
    """N actors of one ``Learner`` class, wired as DeepSpeed ranks (controller side)."""

    def __init__(self, actor_class, world_size: int, *, placement_group, bundle_indices: list[int],
                 num_cpus: float, num_gpus: float = 0.0, name: str = "learner", threads: int | None = None,
                 take_turns: bool = False, start_timeout_s: float = 900.0):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from cluster.runtime import wait_for_actors

        remote_class = ray.remote(actor_class)
        self.name = name
        self.actors = [
            remote_class.options(
                num_cpus=num_cpus,
                num_gpus=num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group, bundle_indices[rank]),
            ).remote()
            for rank in range(world_size)
        ]
        # Bounded: an actor that cannot be placed or dies starting is an ActorStartError naming the role.
        self.start_timeout_s = start_timeout_s
        master_addr, master_port = wait_for_actors([self.actors[0].address.remote(world_size, start_timeout_s)],
                                                   role=f"{name} rank 0", timeout_s=start_timeout_s)[0]
        wait_for_actors([
            actor.init_distributed.remote(rank, world_size, master_addr, master_port, threads, take_turns)
            for rank, actor in enumerate(self.actors)
        ], role=f"{name} ranks", timeout_s=start_timeout_s)

    def call(self, method: str, *args, **kwargs) -> list:
        """Call ``method`` on every rank with the same arguments; returns object refs."""
        return [getattr(actor, method).remote(*args, **kwargs) for actor in self.actors]

    def call_sharded(self, method: str, shards: list, *args, **kwargs) -> list:
        """Call ``method`` with shard ``i`` on rank ``i``; returns object refs."""
        return [getattr(actor, method).remote(shard, *args, **kwargs) for actor, shard in zip(self.actors, shards)]

    def get(self, refs: list) -> list:
        """The results of one call per rank (refs in rank order), failing fast: as soon as any rank
        has died, a ``LearnerLostError`` naming it (the other ranks may be stuck in a collective
        waiting for it, so waiting for them in order could hang)."""
        import ray

        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                ray.get(ready)  # raises the first failure as soon as it happens
            return ray.get(list(refs))
        except ray.exceptions.RayError as exc:
            self.raise_if_lost(exc)
            raise

    def rank_of(self, actor_id: str | None) -> int | None:
        """The rank of the actor with this hex id, or None when it is not one of this group's."""
        ids = [actor._actor_id.hex() for actor in self.actors]
        return ids.index(actor_id) if actor_id in ids else None

    def raise_if_lost(self, error: BaseException) -> None:
        """Turn a failure that came from (or through) a dead rank of this group into a
        ``LearnerLostError`` naming the role and rank; return when every rank still answers."""
        from cluster.runtime import root_cause

        rank = self.rank_of(getattr(error, "actor_id", None))
        if rank is None:
            rank = next(iter(self.dead_ranks()), None)
        if rank is not None:
            raise LearnerLostError(
                f"{self.name} rank {rank} of {len(self.actors)} died ({root_cause(error)}); its DeepSpeed "
                "group cannot continue without it, so the run stops"
            ) from None

    def dead_ranks(self, timeout_s: float = 5.0) -> list[int]:
        """Ranks whose actor is dead (a live rank busy in a long call counts as alive)."""
        import ray

        pings = [actor.__ray_ready__.remote() for actor in self.actors]
        ready, _ = ray.wait(pings, num_returns=len(pings), timeout=timeout_s)
        dead = []
        for rank, ping in enumerate(pings):
            if ping in ready:
                try:
                    ray.get(ping)
                except ray.exceptions.RayActorError:
                    dead.append(rank)
        return dead

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
