"""Streaming generation for the serve app: many concurrent requests, text deltas as they are made.

* :class:`VLLMStreamer`: one vLLM engine in this process, driven by one background thread, the only
  thread that touches the engine. Requests from any asyncio task are queued to that thread; it adds
  them between engine steps, so concurrent requests share steps (continuous batching), and sends
  each request's new text back to the task that asked, on that task's event loop.
* :class:`HFStreamer`: ``transformers`` ``generate`` where vLLM is absent: one request at a time in a
  worker thread, each completion delivered as a single delta.

Both take token ids (the caller applies the chat template and counts prompt tokens) and one
:class:`~rlhf.config.SamplingConfig` per completion (``n`` completions are ``n`` requests with seeds
``seed, seed + 1, ...``, so a request's completions do not depend on what else is running). No Ray here.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from rlhf.config import ModelConfig, SamplingConfig

log = logging.getLogger("rlhf.inference")


@dataclass
class Delta:
    """New output of one completion: its text, how many tokens it took, and, on the last delta,
    why it ended (``"stop"``: EOS or a stop string; ``"length"``: ``max_new_tokens`` reached)."""

    text: str
    tokens: int
    finish_reason: str | None = None


def one_completion(sampling: SamplingConfig, index: int) -> SamplingConfig:
    """The sampling of completion ``index`` of a request: ``n = 1`` and its own seed (kept in
    [0, 2**63), which every engine takes, whatever 64-bit seed the request gave)."""
    seed = None if sampling.seed is None else (sampling.seed + index) % 2**63
    return sampling.model_copy(update={"n": 1, "seed": seed})


def _deliver(deliver, item) -> bool:
    """Hand ``item`` to a request's event loop; False when that loop has closed (the caller is gone)."""
    try:
        deliver(item)
    except RuntimeError:  # "Event loop is closed"
        return False
    return True


class VLLMStreamer:
    """A vLLM engine stepped by a background thread (see the module doc)."""

    name = "vllm"

    def __init__(self, path: str, *, dtype: str = "float32", max_model_len: int | None = None,
                 kv_cache_gib: float = 1.0, seed: int = 0, enforce_eager: bool = True,
                 gpu_memory_utilization: float | None = None, trust_remote_code: bool = False):
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[str, tuple[str, object]] = {}  # request id -> (engine's id, deliver)
        self._closing = False
        self._started = threading.Event()
        self._startup_error: BaseException | None = None
        engine_args = dict(dtype=dtype, seed=seed, enforce_eager=enforce_eager, kv_cache_gib=kv_cache_gib,
                           max_model_len=max_model_len, gpu_memory_utilization=gpu_memory_utilization,
                           trust_remote_code=trust_remote_code)
        # The engine is built on the thread that will step it, so one thread owns it from the start.
        self._thread = threading.Thread(target=self._run, args=(path, engine_args), name="vllm-engine", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._startup_error is not None:
            raise self._startup_error

    # The engine thread -----------------------------------------------------------------------------

    def _run(self, path: str, engine_args: dict) -> None:
        try:
            from rlhf.generation import VLLMBackend

            self._engine = VLLMBackend(path, **engine_args).llm.llm_engine
        except BaseException as exc:  # reported to the constructor, which raises it
            self._startup_error = exc
            self._started.set()
            return
        self._started.set()
        while not self._closing:
            self._take_commands(block=not self._active)
            if self._active:
                self._step()
        for _, deliver in self._active.values():
            _deliver(deliver, RuntimeError("the engine was shut down"))

    def _take_commands(self, *, block: bool) -> None:
        """Apply queued adds and aborts; when idle, wait (briefly, to notice shutdown) for one."""
        try:
            command = self._commands.get(timeout=0.5) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _apply(self, command: tuple) -> None:
        from vllm.inputs import TokensPrompt

        kind, request_id, *rest = command
        if kind == "add":
            prompt_ids, params, deliver = rest
            try:
                engine_id = self._engine.add_request(request_id, TokensPrompt(prompt_token_ids=prompt_ids), params)
            except Exception as exc:  # a request the engine refuses fails alone
                _deliver(deliver, exc)
                return
            self._active[request_id] = (engine_id, deliver)
        elif kind == "abort" and request_id in self._active:
            engine_id, _ = self._active.pop(request_id)
            self._engine.abort_request([engine_id], internal=True)

    def _step(self) -> None:
        try:
            outputs = self._engine.step()
        except Exception as exc:  # the engine is unusable for these requests: fail them, keep serving
            log.exception("vLLM engine step failed")
            for _, deliver in self._active.values():
                _deliver(deliver, exc)
            self._engine.abort_request([engine_id for engine_id, _ in self._active.values()], internal=True)
            self._active.clear()
            return
        for out in outputs:
            entry = self._active.get(out.request_id)
            if entry is None:
                continue
            completion = out.outputs[0]
            reason = str(completion.finish_reason) if out.finished else None
            delivered = _deliver(entry[1], Delta(completion.text, len(completion.token_ids), reason))
            if out.finished or not delivered:
                del self._active[out.request_id]
                if not out.finished:
                    self._engine.abort_request([entry[0]], internal=True)

    # Callers (any thread's event loop) ------------------------------------------------------------

    async def stream(self, prompt_ids: list[int], sampling: SamplingConfig) -> AsyncIterator[Delta]:
        """Deltas of one completion (``sampling.n`` must be 1) until the one with a finish reason.
        Stopping early (a client that disconnects) aborts the request in the engine."""
        from vllm.sampling_params import RequestOutputKind

        from rlhf.generation import vllm_sampling_params

        if sampling.n != 1:
            raise ValueError("stream() makes one completion: pass one_completion(sampling, i)")
        params = vllm_sampling_params(sampling)
        params.output_kind = RequestOutputKind.DELTA
        params.logprobs = None  # the server does not return them; skip the work
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        request_id = uuid.uuid4().hex
        self._commands.put(("add", request_id, list(prompt_ids), params,
                            lambda item: loop.call_soon_threadsafe(inbox.put_nowait, item)))
        finished = False
        try:
            while not finished:
                item = await inbox.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:
                self._commands.put(("abort", request_id))

    def close(self) -> None:
        self._closing = True
        self._thread.join(timeout=10)


class HFStreamer:
    """``transformers`` ``generate``, one request at a time, each completion as one delta."""

    name = "hf"

    def __init__(self, path: str, *, dtype: str = "float32", trust_remote_code: bool = False):
        from rlhf.generation import HFBackend
        from rlhf.models import load_tokenizer

        tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code)
        model_cfg = ModelConfig(path=path, dtype=dtype, trust_remote_code=trust_remote_code)
        self._backend = HFBackend(model_cfg, path, tokenizer)
        self._lock = asyncio.Lock()

    async def stream(self, prompt_ids: list[int], sampling: SamplingConfig) -> AsyncIterator[Delta]:
        if sampling.n != 1:
            raise ValueError("stream() makes one completion: pass one_completion(sampling, i)")
        async with self._lock:  # generate is not re-entrant; it runs off the event loop
            [sample] = await asyncio.to_thread(self._backend.generate, [list(prompt_ids)], sampling)
        yield Delta(sample.text, len(sample.response_ids), sample.finish_reason)

    def close(self) -> None:
        pass
