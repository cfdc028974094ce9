"""Rollout engines: generate responses, with the behaviour policy's logprobs, from the current weights.

Layers, from the bottom up:

* The generation backends, :class:`VLLMBackend` and :class:`HFBackend`, and the sampling settings'
  validation and translation live in rlhf/generation.py (the serve app uses them too).
* :class:`RolloutEngine` owns one backend plus the tokenizer: text or token-id prompts in,
  :class:`Sample` records out; ``update_weights`` (object store) and ``join_weight_group`` /
  ``receive_weights`` (broadcast). Plain Python: usable and testable without Ray.
* :data:`RolloutActor` is the same class as a Ray actor; :class:`RolloutGroup` (controller side)
  places N of them on placement-group bundles, splits a batch across them and returns results in
  prompt order.

Samples are ordered prompt-major (rlhf/generation.py says how they are seeded).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence

import ray
import torch

from actors.weight_sync import PackedWeights, WeightReceiver, named_tensors, pack_weights
from rlhf.config import ModelConfig, RolloutConfig, SamplingConfig
from rlhf.generation import (
    Backend, HFBackend, Prompt, Sample, Sampling, VLLMBackend, sampling_config, vllm_env,
)

LOGPROB_DIFF_METRIC = "rollout/logprob_diff"


# --------------------------------------------------------------------------------------------------
# The engine (plain Python) and its Ray actor
# --------------------------------------------------------------------------------------------------


def _prompt_ids(prompts: Sequence[Prompt], tokenizer) -> list[list[int]]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings or of token-id lists, got {type(prompts).__name__}")
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        if isinstance(prompt, str):
            ids = tokenizer(prompt).input_ids
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids = list(prompt)
        else:
            raise TypeError(f"prompt {i}: expected a string or a list of token ids, got {prompt!r:.80}")
        if not ids:
            raise ValueError(f"prompt {i} is empty")
        out.append(ids)
    return out


class RolloutEngine:
    """One generation backend plus its tokenizer. Also the body of the Ray actor :data:`RolloutActor`."""

    def __init__(self, model: ModelConfig | str, rollout: RolloutConfig | None = None, *, seed: int = 0,
                 max_model_len: int | None = None):
        from rlhf.models import load_tokenizer, resolve_model_path

        model_cfg = ModelConfig(path=model) if isinstance(model, str) else model
        self.rollout = rollout or RolloutConfig()
        path = resolve_model_path(model_cfg.path)
        self.tokenizer = load_tokenizer(path, trust_remote_code=model_cfg.trust_remote_code)
        start = time.perf_counter()
        if self.rollout.backend == "vllm":
            self.backend: Backend = VLLMBackend(
                path, dtype=model_cfg.dtype, seed=seed, enforce_eager=self.rollout.enforce_eager,
                kv_cache_gib=self.rollout.kv_cache_gib, max_model_len=max_model_len,
                gpu_memory_utilization=self.rollout.gpu_memory_utilization,
                trust_remote_code=model_cfg.trust_remote_code,
            )
        else:
            self.backend = HFBackend(model_cfg, path, self.tokenizer)
        # The first step of an engine pays one-off costs (allocations, kernel selection): pay them here.
        self.backend.generate([[self.tokenizer.eos_token_id or 0]], SamplingConfig(temperature=0, max_new_tokens=2))
        self.startup_s = time.perf_counter() - start
        self._receiver: WeightReceiver | None = None

    # Generation ------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling = None, *, first_index: int = 0) -> list[Sample]:
        """Samples for ``prompts`` (strings or token-id lists), prompt-major (see the module doc)."""
        cfg = sampling_config(sampling, self.rollout.sampling)
        return self.backend.generate(_prompt_ids(prompts, self.tokenizer), cfg, first_index=first_index)

    def stream(self, prompts: Sequence[Prompt], sampling: Sampling = None, *,
               first_index: int = 0) -> Iterator[list[tuple[int, Sample]]]:
        """Like :meth:`generate`, but yields ``(sample index, Sample)`` lists as samples finish.
        As a Ray actor method call it with ``.options(num_returns="streaming")``."""
        cfg = sampling_config(sampling, self.rollout.sampling)
        yield from self.backend.stream(_prompt_ids(prompts, self.tokenizer), cfg, first_index=first_index)

    # Weights ---------------------------------------------------------------------------------------

    def update_weights(self, weights: PackedWeights | Mapping[str, torch.Tensor] | Iterable) -> float:
        """Load new weights in place (a state dict, ``(name, tensor)`` pairs, or ``PackedWeights``
        from the object store), then drop the prefix cache. Returns seconds taken."""
        start = time.perf_counter()
        self.backend.update_weights(named_tensors(weights))
        return time.perf_counter() - start

    def join_weight_group(self, host: str, port: int, rank: int, world_size: int,
                          backend: str | None = None, timeout_s: float = 300.0) -> None:
        """Join a learner's broadcast group (blocks until every member has joined)."""
        self._receiver = WeightReceiver(host, port, rank, world_size, backend=backend, timeout_s=timeout_s)

    def receive_weights(self) -> float:
        """Receive one broadcast from the learner, streaming buckets into the model. Returns seconds."""
        if self._receiver is None:
            raise RuntimeError("join_weight_group() first")
        start = time.perf_counter()
        self.backend.update_weights(self._receiver.receive())
        return time.perf_counter() - start

    # Introspection ---------------------------------------------------------------------------------

    def info(self) -> dict:
        """Where and how this engine runs, and its peak memory so far."""
        return {
            "backend": self.backend.name,
            "pid": os.getpid(),
            "startup_s": self.startup_s,
            "torch_threads": torch.get_num_threads(),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


RolloutActor = ray.remote(RolloutEngine)


def engine_env(rollout: RolloutConfig, threads: float) -> dict[str, str]:
    """Environment variables of an engine actor: vLLM's (when it is the backend) and its thread count
    (whole CPUs, at least 1)."""
    env = vllm_env() if rollout.backend == "vllm" else {}
    env["OMP_NUM_THREADS"] = str(max(1, int(threads)))
    return env


def split_evenly(count: int, parts: int) -> list[tuple[int, int]]:
    """``count`` items as ``parts`` contiguous ``(start, stop)`` ranges whose sizes differ by at most 1."""
    base, extra = divmod(count, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


class RolloutGroup:
    """N rollout engine actors, one per placement-group bundle (controller side).

    ``cpus_per_engine`` / ``gpus_per_engine`` size the bundles: fractional CPU bundles on a CPU
    machine, GPU bundles on a GPU cluster. Each engine runs ``rollout.threads_per_engine`` torch
    threads (default: its whole CPUs, at least 1). Needs a connected Ray (``cluster.runtime.init_ray``).
    """

    def __init__(self, model: ModelConfig | str, rollout: RolloutConfig | None = None, *,
                 cpus_per_engine: float = 1.0, gpus_per_engine: float = 0.0, strategy: str = "PACK",
                 resource_timeout_s: float = 30.0, seed: int = 0, max_model_len: int | None = None,
                 placement_group=None, start_timeout_s: float = 900.0):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from cluster.runtime import create_placement_group, wait_for_actors

        self.rollout = rollout or RolloutConfig()
        count = self.rollout.engines
        # A caller that planned the engines' placement (cluster/placement.py) passes its group, one
        # bundle per engine, and removes it itself; otherwise the group is made here and owned here.
        self._owns_group = placement_group is None
        if placement_group is None:
            bundle = {"CPU": cpus_per_engine, **({"GPU": gpus_per_engine} if gpus_per_engine > 0 else {})}
            placement_group = create_placement_group(
                [dict(bundle) for _ in range(count)], strategy=strategy, timeout_s=resource_timeout_s,
                what=f"{count} rollout engine(s)",
            )
        self.placement_group = placement_group
        self.start_timeout_s = start_timeout_s

        def start_engine(i: int):  # engine i always runs on bundle i (restart_engine starts it again)
            return RolloutActor.options(
                num_cpus=cpus_per_engine,
                num_gpus=gpus_per_engine,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, i),
                runtime_env={"env_vars": engine_env(self.rollout, self.rollout.threads_per_engine or cpus_per_engine)},
            ).remote(model, self.rollout, seed=seed + i, max_model_len=max_model_len)

        self._start_engine = start_engine
        self.engines = [start_engine(i) for i in range(count)]
        try:
            self.engine_info = wait_for_actors([engine.info.remote() for engine in self.engines],
                                               role=f"rollout engine ({self.rollout.backend})",
                                               timeout_s=start_timeout_s)
        except Exception:
            self.shutdown()
            raise

    def __len__(self) -> int:
        return len(self.engines)

    def stream(self, prompts: Sequence[Prompt], sampling: Sampling = None) -> Iterator[tuple[int, Sample]]:
        """Yield ``(sample index, Sample)`` as samples finish on any engine. Prompts are split into
        contiguous, even shards, one per engine."""
        cfg = sampling_config(sampling, self.rollout.sampling)  # a bad config fails here, not remotely
        if isinstance(prompts, str) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of strings or of token-id lists, got {type(prompts).__name__}")
        streams = [
            engine.stream.options(num_returns="streaming").remote(prompts[start:stop], cfg, first_index=start)
            for engine, (start, stop) in zip(self.engines, split_evenly(len(prompts), len(self.engines)))
            if stop > start
        ]
        while streams:
            ready, _ = ray.wait(streams, num_returns=1)
            for stream in ready:
                try:
                    chunk = ray.get(next(stream))
                except StopIteration:
                    streams.remove(stream)
                    continue
                yield from chunk

    def generate(self, prompts: Sequence[Prompt], sampling: Sampling = None) -> list[Sample]:
        """All samples for ``prompts``, in prompt order (prompt-major for ``n`` > 1)."""
        cfg = sampling_config(sampling, self.rollout.sampling)
        results: list[Sample | None] = [None] * (len(prompts) * cfg.n)
        for index, sample in self.stream(prompts, cfg):
            results[index] = sample
        missing = [i for i, s in enumerate(results) if s is None]
        if missing:
            raise RuntimeError(f"rollout engines returned no sample for indices {missing[:5]}")
        return results  # type: ignore[return-value]

    # Weights ---------------------------------------------------------------------------------------

    def update_weights(self, weights) -> list[float]:
        """Object-store transport: put the weights once (or take an ``ObjectRef`` of
        :func:`pack_weights` output) and have every engine load them. Returns each engine's seconds."""
        ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(pack_weights(weights))
        return ray.get([engine.update_weights.remote(ref) for engine in self.engines])

    def join_weight_group(self, host: str, port: int, world_size: int, backend: str | None = None,
                          timeout_s: float = 300.0) -> list:
        """Start every engine joining a broadcast group as ranks 1..N. Returns the pending calls:
        ``ray.get`` them after the learner side's ``WeightBroadcaster.connect()``."""
        return [engine.join_weight_group.remote(host, port, rank, world_size, backend, timeout_s)
                for rank, engine in enumerate(self.engines, start=1)]

    def receive_weights(self) -> list:
        """Start every engine receiving one broadcast. Returns the pending calls (seconds each)."""
        return [engine.receive_weights.remote() for engine in self.engines]

    def broadcast_weights(self, broadcaster, weights) -> dict:
        """Broadcast transport when the learner side is in this process: send and wait."""
        pending = self.receive_weights()
        stats = broadcaster.broadcast(weights)
        stats["engine_seconds"] = ray.get(pending)
        return stats

    def info(self) -> list[dict]:
        return ray.get([engine.info.remote() for engine in self.engines])

    def index_of(self, actor_id: str | None) -> int | None:
        """The index of the engine with this hex actor id, or None when it is not one of these."""
        ids = [engine._actor_id.hex() for engine in self.engines]
        return ids.index(actor_id) if actor_id in ids else None

    def restart_engine(self, index: int, weights=None) -> dict:
        """Replace engine ``index`` (dead, say) by a new one on the same bundle, then load ``weights``
        (as for :meth:`update_weights`; None keeps the model it starts from). Returns its info."""
        from cluster.runtime import wait_for_actors

        ray.kill(self.engines[index])  # already dead, or about to be replaced
        self.engines[index] = self._start_engine(index)
        info = wait_for_actors([self.engines[index].info.remote()], role=f"rollout engine {index} (restart)",
                               timeout_s=self.start_timeout_s)[0]
        if weights is not None:
            ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(pack_weights(weights))
            ray.get(self.engines[index].update_weights.remote(ref))
        self.engine_info[index] = info
        return info

    def shutdown(self) -> None:
        """Kill the engine actors and release their placement group."""
        from ray.util.placement_group import remove_placement_group

        for engine in self.engines:
            ray.kill(engine)
        self.engines = []
        if self.placement_group is not None and self._owns_group:
            remove_placement_group(self.placement_group)
        self.placement_group = None


# --------------------------------------------------------------------------------------------------
# Logprob agreement (engine versus learner)
# --------------------------------------------------------------------------------------------------


def samples_to_batch(samples: Sequence[Sample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors of prompt + response.

    ``input_ids``, ``attention_mask``: (batch, seq). ``action_mask``, ``logprobs``: (batch, seq - 1),
    aligned with :func:`rlhf.algorithms.causal_lm_logprobs` (position ``i`` scores token ``i + 1``):
    ``action_mask`` marks response tokens, ``logprobs`` holds the engine's logprobs there.
    """
    width = max(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    action_mask = torch.zeros((batch, width - 1), dtype=torch.bool)
    logprobs = torch.zeros((batch, width - 1), dtype=torch.float32)
    for row, s in enumerate(samples):
        p, r = len(s.prompt_ids), len(s.response_ids)
        input_ids[row, : p + r] = torch.tensor(s.prompt_ids + s.response_ids, dtype=torch.long)
        attention_mask[row, : p + r] = 1
        action_mask[row, p - 1: p - 1 + r] = True
        logprobs[row, p - 1: p - 1 + r] = torch.tensor(s.logprobs, dtype=torch.float32)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "action_mask": action_mask,
            "logprobs": logprobs}


@torch.no_grad()
def logprob_agreement(samples: Sequence[Sample], model, *, temperature: float, pad_token_id: int) -> dict:
    """``{"rollout/logprob_diff": mean |engine - learner|}`` over response tokens, the learner's
    logprobs recomputed by ``model`` (same weights) at the sampling temperature. Meaningful when
    sampling used no top-k / top-p truncation (the learner does not apply it)."""
    from rlhf.algorithms import causal_lm_logprobs, logprob_diff

    batch = samples_to_batch(samples, pad_token_id)
    device = next(model.parameters()).device
    learner = causal_lm_logprobs(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                 temperature=temperature).cpu()
    return {LOGPROB_DIFF_METRIC: logprob_diff(batch["logprobs"], learner, batch["action_mask"])}
