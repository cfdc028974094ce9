"""The serve app: an OpenAI-compatible HTTP API over the aligned model, on Ray Serve.

Two deployments: :class:`OpenAIServer`, the HTTP ingress (``/v1/chat/completions``,
``/v1/completions``, ``/v1/models``, ``/health``: authorisation, validation, chat template, token
counts), and :class:`GenerationReplica`, the replicas that each hold one generation engine (vLLM, or
HF ``generate`` where vLLM is absent; rlhf/inference.py) and scale with load. Request formats and
errors live in rlhf/openai_api.py; the stage that starts and stops the app (``rlhf serve``) in
rlhf/serve.py. Replica count, autoscaling and resources come from :class:`~rlhf.config.ServeConfig`
(:func:`build_app`).

One request cannot starve the others: the ingress refuses a body beyond ``max_body_bytes`` (413)
before parsing it, bounds what a request may ask for (``max_n``, ``max_prompts``, ``max_choices``,
``max_request_tokens``: 400), refuses work beyond ``max_pending_choices`` (429 with Retry-After), answers a client address that
keeps sending refused requests more and more slowly (:class:`~rlhf.openai_api.RefusalThrottle`), and
parses and tokenises on a worker thread, so /health and other clients are answered meanwhile. Every
error is an OpenAI error body; no traceback reaches a client (the server log has the details).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.handle import DeploymentHandle

from rlhf import openai_api as api
from rlhf.config import ConfigError, ModelConfig, SamplingConfig, ServeConfig
from rlhf.inference import Delta, HFStreamer, VLLMStreamer, one_completion

log = logging.getLogger("rlhf.serve")

API_KEY_ENV = "RLHF_API_KEY"

app = FastAPI(title="rlhf serve", docs_url=None, redoc_url=None, openapi_url=None)  # ours: GET /openapi.json


@app.exception_handler(HTTPException)
async def _openai_error_body(request: Request, exc: HTTPException) -> JSONResponse:
    """Unknown paths (404) and methods (405) get OpenAI's error body too, not FastAPI's ``detail``."""
    error = api.APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                         code="not_found" if exc.status_code == 404 else None)
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


def resolve_api_key(cfg: ServeConfig) -> str | None:
    """The key clients must send: the config's, else $RLHF_API_KEY, else none (no check). A variable
    that is set but empty is an error, not "no key": it would turn authentication off unnoticed."""
    if cfg.api_key:
        return cfg.api_key
    key = os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise ConfigError(f"${API_KEY_ENV} is set but empty: set it to the key, or unset it to serve without one")
    return key or None


def model_name(cfg: ServeConfig) -> str:
    return cfg.model_name or Path(cfg.model.path.rstrip("/")).name or cfg.model.path


def resolve_backend(backend: str) -> str:
    """'auto' -> 'vllm' when vLLM is installed, else 'hf'."""
    if backend != "auto":
        return backend
    import importlib.util

    return "vllm" if importlib.util.find_spec("vllm") is not None else "hf"


def merge_adapter(model: ModelConfig, adapter_path: str, out_dir: str) -> str:
    """Base model + LoRA adapter -> one merged Hugging Face folder (safetensors) in ``out_dir``, so
    any engine can serve it."""
    from peft import PeftModel

    from rlhf.models import load_causal_lm, load_tokenizer, resolve_model_path

    base_path = resolve_model_path(model.path)
    if not (Path(adapter_path) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"adapter_path {adapter_path}: no adapter_config.json (expected a peft adapter folder)")
    if not (Path(adapter_path) / "adapter_model.safetensors").is_file():  # peft would unpickle a .bin
        raise FileNotFoundError(f"adapter_path {adapter_path}: no adapter_model.safetensors (only safetensors "
                                "weights are loaded)")
    base = load_causal_lm(model, path=base_path, device="cpu")
    merged = PeftModel.from_pretrained(base, adapter_path).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    load_tokenizer(base_path, trust_remote_code=model.trust_remote_code).save_pretrained(out_dir)
    return out_dir


def model_limit(cfg: ServeConfig, path: str) -> int:
    """The context length requests must fit in: the config's, capped by the model's own."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=cfg.model.trust_remote_code)
    trained = getattr(config, "max_position_embeddings", None) or cfg.max_model_len
    return min(cfg.max_model_len, trained)


class ReplicaLost(Exception):
    """Every try of a streamed choice found its replica gone."""


@serve.deployment
class GenerationReplica:
    """One engine (vLLM, or HF generate): token ids in, text deltas out. The deployment that scales."""

    def __init__(self, cfg: dict):
        from rlhf.models import resolve_model_path

        cfg = ServeConfig.model_validate(cfg)
        model = cfg.model
        path = resolve_model_path(model.path)
        merged = tempfile.mkdtemp(prefix="rlhf-serve-merged-") if cfg.adapter_path else None
        try:
            if merged:
                path = merge_adapter(model, cfg.adapter_path, merged)
            if resolve_backend(cfg.backend) == "vllm":
                self.engine = VLLMStreamer(path, dtype=model.dtype, max_model_len=model_limit(cfg, path),
                                           kv_cache_gib=cfg.kv_cache_gib, seed=cfg.seed,
                                           trust_remote_code=model.trust_remote_code)
            else:
                self.engine = HFStreamer(path, dtype=model.dtype, trust_remote_code=model.trust_remote_code)
        finally:  # the engine holds the merged weights (and tokenizer) in memory now: the folder goes
            if merged:
                shutil.rmtree(merged, ignore_errors=True)

    async def stream(self, prompt_ids: list[int], sampling: SamplingConfig) -> AsyncIterator[Delta]:
        async for delta in self.engine.stream(prompt_ids, sampling):
            yield delta

    async def complete(self, prompt_ids: list[int], sampling: SamplingConfig) -> Delta:
        """The whole completion as one Delta (its text, token count and finish reason)."""
        text, tokens, reason = [], 0, "length"
        async for delta in self.engine.stream(prompt_ids, sampling):
            text.append(delta.text)
            tokens += delta.tokens
            reason = delta.finish_reason or reason
        return Delta("".join(text), tokens, reason)

    async def info(self) -> dict:
        return {"backend": self.engine.name, "replica_pid": os.getpid()}


@serve.deployment
@serve.ingress(app)
class OpenAIServer:
    """The HTTP routes: authorisation, validation, chat templates and token counting happen here; the
    generation replicas behind ``engine`` only generate. A replica that dies under a request is
    retried on another (nothing was sent to the client yet), else the client gets a 503."""

    def __init__(self, cfg: dict, engine: DeploymentHandle):
        from rlhf.data.tokenize import has_chat_template
        from rlhf.models import load_tokenizer, resolve_model_path

        self.cfg = ServeConfig.model_validate(cfg)
        self.engine = engine
        self.name = model_name(self.cfg)
        self.api_key = resolve_api_key(self.cfg)
        self.created = int(time.time())
        path = resolve_model_path(self.cfg.model.path)  # the adapter changes weights, not the tokenizer
        self.tokenizer = load_tokenizer(path, trust_remote_code=self.cfg.model.trust_remote_code)
        self.chat_template = has_chat_template(self.tokenizer)
        self.max_model_len = model_limit(self.cfg, path)
        # Parsing and tokenising run here, off the event loop; one thread, because a fast tokenizer
        # must not be used by two threads at once.
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="rlhf-tokenize")
        self.pending_choices = 0  # completions accepted and not yet finished (max_pending_choices)
        cfg = self.cfg
        self.refusals = api.RefusalThrottle(free=cfg.free_refusals, window_s=cfg.refusal_window_s,
                                            delay_s=cfg.refusal_delay_s, max_delay_s=cfg.max_refusal_delay_s)

    # Checks shared by the routes ---------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        # compare_digest: the time taken does not reveal how much of the key matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise api.APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                               type="authentication_error", code="invalid_api_key")

    def _check_model(self, request: api._Request) -> None:
        if request.model != self.name:
            raise api.APIError(404, f"model '{request.model}' does not exist; this server serves '{self.name}'",
                               param="model", code="model_not_found")

    def _max_tokens(self, request: api._Request, prompt_tokens: int) -> int:
        room = self.max_model_len - prompt_tokens
        wanted = request.requested_max_tokens
        if room < 1:
            raise api.APIError(400, f"the prompt has {prompt_tokens} tokens; this model's context is "
                               f"{self.max_model_len} tokens", code="context_length_exceeded",
                               param="messages" if isinstance(request, api.ChatRequest) else "prompt")
        if wanted is None:
            return min(self.cfg.default_max_tokens, room)
        if wanted > room:
            raise api.APIError(400, f"max_tokens is {wanted}, but the prompt ({prompt_tokens} tokens) leaves room "
                               f"for at most {room} in this model's context of {self.max_model_len} tokens",
                               param="max_tokens", code="context_length_exceeded")
        return wanted

    def _chat_prompt_ids(self, request: api.ChatRequest) -> list[int]:
        from rlhf.data.tokenize import render_prompt

        text = render_prompt(self.tokenizer, [m.for_template() for m in request.messages])
        return self.tokenizer(text, add_special_tokens=not self.chat_template).input_ids

    async def _off_loop(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn, *args)

    async def _parse(self, request: Request, kind: type[api._Request]) -> api._Request:
        """The validated body; beyond ``max_body_bytes`` a 413, refused before anything is parsed."""
        limit = self.cfg.max_body_bytes

        def too_large(size: int) -> api.APIError:
            return api.APIError(413, f"the request body has {'at least ' if size > limit else ''}{size} bytes; this "
                                f"server takes at most {limit} (max_body_bytes)", code="request_too_large")

        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise too_large(int(declared))
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large(size)
            chunks.append(chunk)
        body = await self._off_loop(api.parse_request, b"".join(chunks), kind)
        self._check_model(body)
        return body

    def _check_counts(self, body: api._Request, prompts: int) -> None:
        cfg = self.cfg
        if body.n > cfg.max_n:
            raise api.APIError(400, f"n is {body.n}; this server gives at most {cfg.max_n} completions per prompt "
                               "(max_n)", param="n")
        if prompts > cfg.max_prompts:
            raise api.APIError(400, f"{prompts} prompts in one request; this server takes at most {cfg.max_prompts} "
                               "(max_prompts): send them in several requests", param="prompt")
        if prompts * body.n > cfg.max_choices:
            raise api.APIError(400, f"{prompts} prompts x n={body.n} asks for {prompts * body.n} completions; this "
                               f"server gives at most {cfg.max_choices} per request (max_choices)", param="n")

    def _admit(self, choices: int) -> Callable[[], None]:
        """Count ``choices`` completions as pending, or refuse with 429 when the server holds
        ``max_pending_choices`` already. Returns the (idempotent) release."""
        limit = self.cfg.max_pending_choices
        if self.pending_choices + choices > limit:
            raise api.APIError(429, f"the server is busy: {self.pending_choices} completions are pending and it holds "
                               f"at most {limit} (max_pending_choices); retry shortly", type="rate_limit_error",
                               code="server_busy", headers={"Retry-After": "1"})
        self.pending_choices += choices
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.pending_choices -= choices
        return release

    # Routes -------------------------------------------------------------------------------------

    @app.get("/health")
    async def health(self):
        """Open to all (no key): the model's name and one generation replica's backend and pid."""
        try:
            info = await self._call_engine(lambda: self.engine.info.remote())
        except api.APIError as exc:
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
        return {"status": "ok", "model": self.name, **info}

    @app.get("/openapi.json")
    async def openapi(self):
        """Open to all (no key), like /health: the request schemas, for clients and fuzzers."""
        return api.openapi_spec(self.name)

    @app.get("/v1/models")
    async def models(self, request: Request):
        return await self._answer(request, lambda: api.models_response(self.name, self.created))

    @app.get("/v1/models/{model_id:path}")
    async def model(self, model_id: str, request: Request):
        def card() -> dict:
            if model_id != self.name:
                raise api.APIError(404, f"model '{model_id}' does not exist; this server serves '{self.name}'",
                                   param="model", code="model_not_found")
            return api.model_card(self.name, self.created)
        return await self._answer(request, card)

    @app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        async def handle():
            body = await self._parse(request, api.ChatRequest)
            self._check_counts(body, prompts=1)
            prompt_ids = await self._off_loop(self._chat_prompt_ids, body)
            return await self._complete(body, [prompt_ids], chat=True)
        return await self._answer(request, handle)

    @app.post("/v1/completions")
    async def completions(self, request: Request):
        async def handle():
            body = await self._parse(request, api.CompletionRequest)
            self._check_counts(body, prompts=len(body.prompts))
            prompts = await self._off_loop(lambda: [self.tokenizer(p).input_ids for p in body.prompts])
            return await self._complete(body, prompts, chat=False)
        return await self._answer(request, handle)

    async def _answer(self, request: Request, handle):
        """Run a route's handler; APIErrors become OpenAI error bodies with their status, and anything
        unexpected a 500 with the same body and no details (those go to the server log)."""
        try:
            self._authorize(request)
            result = handle()
            if asyncio.iscoroutine(result):
                result = await result
        except api.APIError as exc:
            if 400 <= exc.status < 500 and exc.status != 429:  # the client's fault (a busy server is not)
                await asyncio.sleep(self.refusals.delay_for(request.client.host if request.client else "?"))
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
        except Exception:
            log.exception("request %s %s failed", request.method, request.url.path)
            error = api.APIError(500, "the server failed to handle this request (its log has the details)",
                                 type="server_error", code="internal_error")
            return JSONResponse(error.body(), status_code=500)
        return result if not isinstance(result, dict) else JSONResponse(result)

    # Generation ---------------------------------------------------------------------------------

    async def _complete(self, body: api._Request, prompts: list[list[int]], *, chat: bool):
        """Choices are prompt-major: prompt ``p``'s completions are ``p * n ... p * n + n - 1``."""
        longest = max(len(ids) for ids in prompts)
        sampling = body.sampling(self._max_tokens(body, longest))
        jobs = [(ids, one_completion(sampling, j)) for ids in prompts for j in range(body.n)]
        prompt_tokens = sum(len(ids) for ids in prompts)
        asked = prompt_tokens + len(jobs) * sampling.max_new_tokens
        if asked > self.cfg.max_request_tokens:
            raise api.APIError(400, f"this request asks for up to {asked} tokens (prompts plus n x max_tokens per "
                               f"prompt); this server takes at most {self.cfg.max_request_tokens} per request "
                               "(max_request_tokens)", param="max_tokens")
        release = self._admit(len(jobs))
        request_id = api.new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            events = self._stream_events(request_id, body, jobs, prompt_tokens, chat=chat, release=release)
            weakref.finalize(events, release)  # a stream never started gives its place back too
            return StreamingResponse(events, media_type="text/event-stream")
        calls = [asyncio.ensure_future(self._call_engine(lambda ids=ids, s=s: self.engine.complete.remote(ids, s)))
                 for ids, s in jobs]
        try:
            results: list[Delta] = await asyncio.gather(*calls)
        finally:  # one failed or the client left: the others stop too
            for call in calls:
                call.cancel()
            release()
        texts = [(r.text, r.finish_reason) for r in results]
        if not chat and getattr(body, "echo", False):
            texts = [(self.tokenizer.decode(jobs[i][0]) + text, reason) for i, (text, reason) in enumerate(texts)]
        usage = api.usage(prompt_tokens, sum(r.tokens for r in results))
        build = api.chat_response if chat else api.completion_response
        return build(request_id, body.model, texts, usage)

    async def _call_engine(self, call):
        """``await call()`` on a generation replica; a replica that dies is retried on another, up to
        ``cfg.replica_retries`` times, then a 503 the client may retry."""
        for attempt in range(self.cfg.replica_retries + 1):
            try:
                return await call()
            except RayActorError as exc:  # the replica died or became unreachable under the call
                log.warning("generation replica failed (attempt %d): %s", attempt + 1, type(exc).__name__)
        raise api.APIError(503, "the model replica handling this request failed; retry", type="server_error",
                           code="replica_unavailable", headers={"Retry-After": "1"})

    async def _stream_events(self, request_id: str, body: api._Request, jobs: list, prompt_tokens: int, *,
                             chat: bool, release: Callable[[], None]) -> AsyncIterator[str]:
        """Server-sent events: every choice's deltas as they come (interleaved), then [DONE].
        A client that disconnects cancels this generator, which aborts its engine requests. A failure
        after the 200 is an error event with OpenAI's body and no details (those go to the log)."""
        events: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, prompt_ids: list[int], sampling) -> None:
            sent = False
            for attempt in range(self.cfg.replica_retries + 1):
                stream = self.engine.options(stream=True).stream.remote(prompt_ids, sampling)
                try:
                    async for delta in stream:
                        sent = True
                        await events.put((index, delta))
                    return
                except RayActorError as exc:
                    if sent:  # part of the answer is out: it cannot be retried invisibly
                        await events.put((index, exc))
                        return
                    log.warning("generation replica failed (attempt %d): %s", attempt + 1, type(exc).__name__)
                except Exception as exc:
                    await events.put((index, exc))
                    return
                finally:
                    stream.cancel()  # a client that left stops its generation on the replica
            await events.put((index, ReplicaLost()))

        tasks = [asyncio.create_task(pump(i, ids, s)) for i, (ids, s) in enumerate(jobs)]
        completion_tokens, open_choices = 0, len(jobs)
        try:
            if chat:
                for index in range(len(jobs)):
                    yield api.sse(api.chat_chunk(request_id, body.model, index, role=True, text=""))
            while open_choices:
                index, item = await events.get()
                if isinstance(item, Exception):
                    log.error("generation failed in a stream: %r", item)
                    lost = isinstance(item, (RayActorError, ReplicaLost))
                    message = ("the model replica handling this request failed; retry" if lost
                               else "generation failed (the server log has the details)")
                    yield api.sse(api.APIError(503 if lost else 500, message, type="server_error",
                                               code="replica_unavailable" if lost else "internal_error").body())
                    return
                delta: Delta = item
                completion_tokens += delta.tokens
                if delta.finish_reason is not None:
                    open_choices -= 1
                if chat:
                    yield api.sse(api.chat_chunk(request_id, body.model, index, text=delta.text or None,
                                                 finish_reason=delta.finish_reason))
                else:
                    yield api.sse(api.completion_chunk(request_id, body.model, index, text=delta.text,
                                                       finish_reason=delta.finish_reason))
            if body.stream_options and body.stream_options.include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield api.sse(api.usage_chunk(request_id, body.model, obj, api.usage(prompt_tokens, completion_tokens)))
            yield api.sse("[DONE]")
        finally:
            for task in tasks:
                task.cancel()
            release()


def build_app(cfg: ServeConfig):
    """The Serve application for ``cfg``: one light ingress (no CPU reserved: it validates and
    forwards) in front of the generation replicas, whose count, autoscaling and resources come from
    the config. The API key is resolved here, where the app is built, so replicas on other nodes
    need no $RLHF_API_KEY."""
    cfg = cfg.model_copy(update={"api_key": resolve_api_key(cfg)})
    config = cfg.model_dump(mode="json")
    scaling: dict = (
        {"num_replicas": cfg.min_replicas} if cfg.min_replicas == cfg.max_replicas
        else {"autoscaling_config": {"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                     "target_ongoing_requests": cfg.target_ongoing_requests}}
    )
    resources = {"num_cpus": cfg.cpus_per_replica, **({"num_gpus": cfg.gpus_per_replica} if cfg.gpus_per_replica else {})}
    threads = str(max(1, int(cfg.cpus_per_replica)))
    engine = GenerationReplica.options(
        max_ongoing_requests=cfg.max_ongoing_requests,
        graceful_shutdown_timeout_s=cfg.shutdown_grace_s,
        ray_actor_options={**resources, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": threads,
                                                                     "TOKENIZERS_PARALLELISM": "false"}}},
        **scaling,
    ).bind(config)
    return OpenAIServer.options(
        num_replicas=cfg.ingress_replicas,
        graceful_shutdown_timeout_s=cfg.shutdown_grace_s,
        max_ongoing_requests=cfg.max_ongoing_requests * max(cfg.max_replicas, 1),
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": {"TOKENIZERS_PARALLELISM": "false"}}},
    ).bind(config, engine)
