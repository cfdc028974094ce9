"""Weight sync from the learner to rollout engines: two transports behind one idea.

Both end in the same call on the engine side, ``RolloutEngine.update_weights(named tensors)``.

* Object store: the learner ``ray.put``s :func:`pack_weights` output once (numpy arrays, which Ray
  stores and reads back without copying) and hands the reference to every engine.
* Broadcast: a ``torch.distributed`` group of its own (a ``TCPStore`` listening on ``host`` only, plus
  ``ProcessGroupGloo`` on the CPU, ``ProcessGroupNCCL`` on GPUs), separate from any default process
  group the learner's DeepSpeed ranks use. Learner rank 0 holds a :class:`WeightBroadcaster`, each engine a :class:`WeightReceiver`.
  Parameters travel in buckets (several tensors flattened into one broadcast, ``bucket_bytes`` each);
  the list of names, shapes and dtypes goes through the store, so the receivers need no other channel.

Sequence for the broadcast transport (the controller drives it; the learner may be any actor)::

    broadcaster = WeightBroadcaster(num_receivers=len(engines))     # starts the store; port known
    joins = [e.join_weight_group.remote(broadcaster.host, broadcaster.port, i + 1,
                                        broadcaster.world_size) for i, e in enumerate(engines)]
    broadcaster.connect(); ray.get(joins)                            # rendezvous
    ...
    pending = [e.receive_weights.remote() for e in engines]          # engines wait for buckets
    broadcaster.broadcast(model.state_dict()); ray.get(pending)

Deadlocks are bounded by ``timeout_s``: a collective that waits longer fails instead of hanging.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch

DEFAULT_BUCKET_BYTES = 64 << 20
Weights = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]

_DTYPES = {
    str(dtype).removeprefix("torch."): dtype
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                  torch.int8, torch.uint8, torch.bool)
}
# numpy has no bfloat16: such tensors travel as int16 views of the same bytes.
_NUMPY_STAND_IN = {torch.bfloat16: torch.int16}


def named_tensors(weights: Weights | PackedWeights) -> Iterable[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs from a state dict, a list of pairs, or :class:`PackedWeights`."""
    if isinstance(weights, PackedWeights):
        return weights.unpack()
    if isinstance(weights, Mapping):
        return weights.items()
    return weights


@contextmanager
def rollout_weights(model) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The weights an engine needs, as ``(name, tensor)`` pairs, from a learner's model.

    A plain model gives its state dict. A peft LoRA model gives merged weights under the base
    model's names: adapters are merged in place for the duration of the ``with`` block and unmerged
    after, so the training model is left as it was. Send the weights inside the block.
    """
    model = getattr(model, "module", model)  # DeepSpeed / DDP wrappers
    is_lora = hasattr(model, "peft_config") and hasattr(model, "merge_adapter")
    if is_lora:
        model.merge_adapter()
    try:
        pairs = []
        for name, tensor in model.state_dict().items():
            if is_lora:
                if "lora_" in name:
                    continue
                name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
            pairs.append((name, tensor.detach()))
        yield pairs
    finally:
        if is_lora:
            model.unmerge_adapter()


def unique_tensors(weights: Weights) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """Drop tensors that are views of an earlier one (tied embeddings: ``lm_head.weight`` is
    ``model.embed_tokens.weight``). Returns the unique pairs and ``{alias name: source name}``."""
    unique, aliases, seen = [], {}, {}
    for name, tensor in named_tensors(weights):
        tensor = tensor.detach()
        key = (tensor.device, tensor.dtype, tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique.append((name, tensor))
    return unique, aliases


def _with_aliases(pairs: Iterable[tuple[str, torch.Tensor]], aliases: dict[str, str]):
    """Yield ``pairs`` and, right after each source, its aliases (same tensor, other names)."""
    names_of: dict[str, list[str]] = {}
    for alias, source in aliases.items():
        names_of.setdefault(source, []).append(alias)
    for name, tensor in pairs:
        yield name, tensor
        for alias in names_of.get(name, ()):
            yield alias, tensor


# --------------------------------------------------------------------------------------------------
# Object store
# --------------------------------------------------------------------------------------------------


@dataclass
class PackedWeights:
    """Weights as numpy arrays, for ``ray.put``: Ray reads numpy arrays back without a copy.
    Tied weights travel once (``aliases``: alias name -> source name)."""

    names: list[str]
    dtypes: list[str]
    arrays: list  # numpy arrays
    aliases: dict[str, str]

    def unpack(self) -> list[tuple[str, torch.Tensor]]:
        out = []
        with warnings.catch_warnings():
            # The arrays are read-only views of the object store. The engine only copies from them
            # into its own parameters, so sharing that memory is safe; torch warns anyway.
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            for name, dtype_name, array in zip(self.names, self.dtypes, self.arrays, strict=True):
                tensor = torch.from_numpy(array)
                dtype = _DTYPES[dtype_name]
                out.append((name, tensor.view(dtype) if dtype in _NUMPY_STAND_IN else tensor))
        return list(_with_aliases(out, self.aliases))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


def pack_weights(weights: Weights) -> PackedWeights:
    """CPU numpy views of the weights (no copy for contiguous CPU tensors) for ``ray.put``."""
    pairs, aliases = unique_tensors(weights)
    names, dtypes, arrays = [], [], []
    for name, tensor in pairs:
        tensor = tensor.cpu().contiguous()
        stand_in = _NUMPY_STAND_IN.get(tensor.dtype)
        names.append(name)
        dtypes.append(str(tensor.dtype).removeprefix("torch."))
        arrays.append((tensor.view(stand_in) if stand_in else tensor).numpy())
    return PackedWeights(names, dtypes, arrays, aliases)


# --------------------------------------------------------------------------------------------------
# torch.distributed broadcast
# --------------------------------------------------------------------------------------------------


def master_store(host: str, world_size: int, timeout: timedelta, port: int = 0):
    """A master ``TCPStore`` that listens on ``host`` only (``port``, or a free one: ``store.port``).

    A TCPStore left to itself listens on every interface ("::"), whatever host it is given, which
    would put a port of a local run on the network; a socket bound here and handed over is not."""
    import socket

    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listener.bind((host, port))
    listener.listen(128)
    port = listener.getsockname()[1]
    # detach: the store owns the descriptor from here on (Python must not close it under the store).
    return torch.distributed.TCPStore(host, port, world_size, is_master=True, timeout=timeout,
                                      wait_for_workers=False, master_listen_fd=listener.detach())


def _make_group(store, rank: int, world_size: int, backend: str, host: str, timeout: timedelta):
    """A process group of our own on ``store``; never touches the default process group."""
    from torch.distributed import ProcessGroupGloo

    if backend == "nccl":
        from torch.distributed import ProcessGroupNCCL

        options = ProcessGroupNCCL.Options()
        options._timeout = timeout
        return ProcessGroupNCCL(store, rank, world_size, options)
    if backend != "gloo":
        raise ValueError(f"weight sync backend must be 'gloo' or 'nccl', got {backend!r}")
    options = ProcessGroupGloo._Options()
    options._timeout = timeout
    # Bind to loopback when the group is local, so no traffic leaves the machine.
    local = host in ("127.0.0.1", "localhost")
    options._devices = [ProcessGroupGloo.create_device(hostname="127.0.0.1" if local else "")]
    return ProcessGroupGloo(store, rank, world_size, options)


def default_backend() -> str:
    """NCCL where CUDA is available, else gloo."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def _plan_buckets(meta: list[dict], bucket_bytes: int) -> list[list[int]]:
    """Group consecutive tensors of one dtype into buckets of at most ``bucket_bytes`` (a tensor
    larger than that gets a bucket of its own). Returns lists of indices into ``meta``."""
    buckets: list[list[int]] = []
    size = 0
    for i, item in enumerate(meta):
        nbytes = item["numel"] * _DTYPES[item["dtype"]].itemsize
        if not buckets or meta[buckets[-1][0]]["dtype"] != item["dtype"] or size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(i)
        size += nbytes
    return buckets


class WeightBroadcaster:
    """Learner rank 0's side of the broadcast transport. Any actor (or the driver) can hold one.

    Creating it starts the group's ``TCPStore`` on ``host`` with a free port (``self.port``); the
    receivers join with ``(host, port, rank 1..N, world_size)`` while :meth:`connect` waits for them.
    """

    def __init__(self, num_receivers: int, *, host: str = "127.0.0.1", backend: str | None = None,
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, timeout_s: float = 300.0):
        if num_receivers < 1:
            raise ValueError(f"num_receivers must be at least 1, got {num_receivers}")
        if bucket_bytes < 1:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.host = host
        self.world_size = num_receivers + 1
        self.backend = backend or default_backend()
        self.bucket_bytes = bucket_bytes
        self.timeout = timedelta(seconds=timeout_s)
        self.store = master_store(host, self.world_size, self.timeout)
        self.port = self.store.port
        self.group = None
        self._version = 0
        self._staging: dict[torch.dtype, list] = {}
        self._turn: dict[torch.dtype, int] = {}

    def connect(self) -> None:
        """Rendezvous with the receivers (blocks until all have called ``WeightReceiver(...)``)."""
        if self.group is None:
            self.group = _make_group(self.store, 0, self.world_size, self.backend, self.host, self.timeout)

    def broadcast(self, weights: Weights) -> dict:
        """Send ``weights`` to every receiver, bucket by bucket. Returns sizes and seconds.

        Two buckets are in flight at once: the next one is packed (into a reused staging buffer, so
        no fresh memory is touched) while the previous one is on the wire. A tensor that fills a
        bucket alone is sent as it is, without a copy.
        """
        if self.group is None:
            raise RuntimeError("call connect() before broadcast()")
        start = time.perf_counter()
        pairs, aliases = unique_tensors(weights)
        meta = [{"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                 "numel": t.numel()} for name, t in pairs]
        buckets = _plan_buckets(meta, self.bucket_bytes)
        self._version += 1
        self.store.set(f"weights/{self._version}",
                       json.dumps({"meta": meta, "buckets": buckets, "aliases": aliases}))
        total = 0
        in_flight = []
        for indices in buckets:
            while len(in_flight) > 1:  # the staging buffer about to be reused is free again
                in_flight.pop(0).wait()
            flat = self._pack([pairs[i][1] for i in indices])
            in_flight.append(self.group.broadcast(flat, 0))
            total += flat.numel() * flat.element_size()
        for work in in_flight:
            work.wait()
        return {"bytes": total, "buckets": len(buckets), "tensors": len(pairs), "aliases": len(aliases),
                "seconds": time.perf_counter() - start}

    def _pack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """One flat tensor on the group's device: the tensor itself when it is alone and in place,
        else a copy into the next of two staging buffers of its dtype."""
        device = self._device()
        if len(tensors) == 1 and tensors[0].is_contiguous() and tensors[0].device == device:
            return tensors[0].reshape(-1)
        dtype = tensors[0].dtype
        numel = sum(t.numel() for t in tensors)
        buffers = self._staging.setdefault(dtype, [None, None])
        turn = self._turn.get(dtype, 0)
        self._turn[dtype] = 1 - turn
        if buffers[turn] is None or buffers[turn].numel() < numel:
            capacity = max(numel, self.bucket_bytes // dtype.itemsize)
            buffers[turn] = torch.empty(capacity, dtype=dtype, device=device)
        flat = buffers[turn][:numel]
        offset = 0
        for t in tensors:
            flat[offset: offset + t.numel()].copy_(t.reshape(-1), non_blocking=True)
            offset += t.numel()
        return flat

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def close(self) -> None:
        self.group = None
        self.store = None
        self._staging.clear()


class WeightReceiver:
    """An engine's side of the broadcast transport: joins the group on construction."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, *, backend: str | None = None,
                 timeout_s: float = 300.0, reuse_buffers: bool | None = None):
        if not 1 <= rank < world_size:
            raise ValueError(f"receiver rank must be in 1..{world_size - 1}, got {rank}")
        self.backend = backend or default_backend()
        # On the CPU every fresh buffer is fresh pages from the kernel (page faults cost about as much
        # as the transfer itself), so by default the receive buffers are kept and reused from one
        # update to the next: one extra copy of the weights in memory. CUDA's caching allocator
        # reuses memory by itself, so on NCCL they are not kept.
        self.reuse_buffers = self.backend == "gloo" if reuse_buffers is None else reuse_buffers
        self._buffers: dict[int, torch.Tensor] = {}
        timeout = timedelta(seconds=timeout_s)
        self.store = torch.distributed.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
        self.group = _make_group(self.store, rank, world_size, self.backend, host, timeout)
        self._version = 0

    def receive(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` pairs of the next broadcast, bucket by bucket, as they arrive.

        While the caller loads one bucket's tensors the next bucket is already being received. The
        tensors are views of receive buffers that stay valid until the next ``receive()``: the engine
        must be done with them (have copied them into its parameters) by then, as it is when it
        consumes this iterator to the end.
        """
        self._version += 1
        plan = json.loads(self.store.get(f"weights/{self._version}"))
        meta, buckets = plan["meta"], plan["buckets"]
        device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else "cpu"

        def post(b):
            indices = buckets[b]
            dtype = _DTYPES[meta[indices[0]]["dtype"]]
            numel = sum(meta[i]["numel"] for i in indices)
            flat = self._buffers.get(b)
            if flat is None or flat.dtype != dtype or flat.numel() != numel:
                flat = torch.empty(numel, dtype=dtype, device=device)
                if self.reuse_buffers:
                    self._buffers[b] = flat
            return flat, self.group.broadcast(flat, 0)

        def unpack():
            upcoming = post(0) if buckets else None
            for b, indices in enumerate(buckets):
                flat, work = upcoming
                work.wait()
                if b + 1 < len(buckets):
                    upcoming = post(b + 1)
                offset = 0
                for i in indices:
                    numel = meta[i]["numel"]
                    yield meta[i]["name"], flat[offset: offset + numel].view(meta[i]["shape"])
                    offset += numel

        yield from _with_aliases(unpack(), plan["aliases"])

    def close(self) -> None:
        self.group = None
        self.store = None
        self._buffers.clear()
