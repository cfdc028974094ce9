"""The OpenAI-compatible request and response formats of the serve app (no Ray, no HTTP server).

Requests are validated here into :class:`ChatRequest` / :class:`CompletionRequest`; anything wrong
is an :class:`APIError` with the HTTP status and OpenAI's error body
(``{"error": {"message", "type", "param", "code"}}``), so the app never answers a bad request with a
500. What clients commonly send is accepted as OpenAI's API and vLLM's server accept it: content-part
arrays, the ``developer`` role, and parameters whose value means "off" (``logprobs: false``,
``frequency_penalty: 0``, ...: :data:`NO_OP_VALUES`); a 400 is kept for what this server cannot do.
Response bodies and streaming chunks are built by the functions at the bottom.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import deque
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rlhf.config import SamplingConfig

MAX_STOP = 4  # OpenAI's own limit
# Seeds are 64-bit, as in OpenAI's API; completion j of a request samples with (seed + j) mod 2**63.
SEED_RANGE = (-(2**63), 2**63 - 1)

# Parameters of OpenAI's API (or vLLM's server) that this server does not implement, with the values
# that ask for nothing (what common clients send by default): those are accepted and ignored; any
# other value is a 400 naming the parameter, so a client never believes a setting took effect.
NO_OP_VALUES: dict[str, tuple] = {
    "logprobs": (None, False, 0),  # chat: a bool, completions: an int
    "top_logprobs": (None, 0),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "repetition_penalty": (None, 1),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),  # without tools, "auto" chooses none
    "parallel_tool_calls": (None, True, False),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "store": (None, False),
    "metadata": (None, {}),
    "service_tier": (None, "auto", "default"),
    "modalities": (None, ["text"]),
    "ignore_eos": (None, False),
    "skip_special_tokens": (None, True),
}


class APIError(Exception):
    """An error answered with ``status`` and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class RefusalThrottle:
    """Slows the answers to a client that keeps sending requests the server refuses.

    Every request costs the server its HTTP and routing work (about 10 ms of CPU on Ray Serve) even
    when refused, so a client sending bad requests as fast as they are answered takes CPU from the
    others. Per client address, the first ``free`` refusals within ``window_s`` are answered at once;
    the k-th beyond waits ``k * delay_s`` (at most ``max_delay_s``) before its answer. Waiting costs
    nothing, and a client that waits for its answers is slowed to a few requests a second. Requests
    that succeed are never delayed. ``clock`` is injectable for tests."""

    def __init__(self, *, free: int, window_s: float, delay_s: float, max_delay_s: float, clock=time.monotonic,
                 max_addresses: int = 10_000):
        self.free, self.window_s, self.delay_s, self.max_delay_s = free, window_s, delay_s, max_delay_s
        self.clock, self.max_addresses = clock, max_addresses
        self.recent: dict[str, deque[float]] = {}

    def delay_for(self, address: str) -> float:
        """Record a refusal for ``address``; the seconds its answer should wait."""
        now = self.clock()
        if len(self.recent) >= self.max_addresses:  # forget addresses with nothing recent
            self.recent = {a: q for a, q in self.recent.items() if q and q[-1] > now - self.window_s}
        times = self.recent.setdefault(address, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        times.append(now)
        excess = len(times) - self.free
        return min(self.max_delay_s, excess * self.delay_s) if excess > 0 else 0.0


# --------------------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------------------


class TextPart(BaseModel):
    """One part of a message's content array; only text parts exist for a text model."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None  # accepted, as OpenAI's API does; the chat template sees role and content

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        if isinstance(value, list):
            kinds = {part.get("type") for part in value if isinstance(part, dict)} - {"text"}
            if kinds:
                raise ValueError(f"content parts of type {', '.join(sorted(map(str, kinds)))} are not supported: "
                                 "this server takes text parts only")
        return value

    def for_template(self) -> dict[str, str]:
        """The message as chat templates expect it: text content; ``developer`` (OpenAI's newer name
        for the system message) as ``system``."""
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _Request(BaseModel):
    """Parameters both endpoints take. Unknown parameters are errors (as in OpenAI's API), so a
    client never believes a setting took effect when it did not."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    n: int = Field(1, ge=1)  # its upper bound is the server's (ServeConfig.max_n)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, le=2**31 - 1)  # vLLM's extension; -1: off
    min_tokens: int = Field(0, ge=0, le=2**31 - 1)  # vLLM's extension
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and ignored, as many clients send it

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    def sampling(self, max_tokens: int) -> SamplingConfig:
        if self.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens ({self.min_tokens}) exceeds max_tokens ({max_tokens})", param="min_tokens")
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=max_tokens, min_new_tokens=self.min_tokens,
                              stop=list(self.stop or []), n=self.n, seed=self.seed)


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str]) -> str | list[str]:
        prompts = [value] if isinstance(value, str) else value
        if not prompts:
            raise ValueError("at least one prompt")
        if any(not p for p in prompts):
            raise ValueError("prompts must be non-empty")
        return value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


def _is_type_tag(part) -> bool:
    """Parts of a pydantic error location that name a union branch or validator, not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part or part.startswith("function-"))


def parse_request(raw: bytes, kind: type[_Request]) -> _Request:
    """The validated request, or an :class:`APIError` (400) naming the parameter and what it expects."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise APIError(400, f"the request body is not acceptable JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:  # JSON may escape lone surrogates ("\\ud800"), which no tokenizer can encode
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, "the request body holds invalid Unicode (a lone surrogate escape such as \\ud800)") from None
    for key, allowed in NO_OP_VALUES.items():
        if key in data:
            value = data.pop(key)
            if not any(value == ok and type(value) is not bool or value is ok for ok in allowed):
                shown = ", ".join(json.dumps(ok) for ok in allowed)
                raise APIError(400, f"'{key}' is not supported by this server; it accepts only {shown} "
                               f"(got {json.dumps(value)[:80]})", param=key, code="unsupported_parameter")
    try:
        return kind.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if not _is_type_tag(p)) or None
        if first["type"] == "extra_forbidden":
            supported = ", ".join(sorted(kind.model_fields))
            message = f"unsupported parameter '{param}'; supported: {supported}"
        elif first["type"] == "missing":
            message = f"missing required parameter '{param}'"
        else:
            message = f"invalid '{param}': {first['msg']} (got {first.get('input')!r:.80})"
        more = len(exc.errors()) - 1
        if more:
            message += f" (and {more} more problem{'s' if more > 1 else ''})"
        raise APIError(400, message, param=param) from None


# --------------------------------------------------------------------------------------------------
# Responses
# --------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(request_id: str, model: str, choices: list[tuple[str, str]], usage_: dict) -> dict:
    """``choices``: (text, finish reason) in choice order."""
    return {
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                    for i, (text, reason) in enumerate(choices)],
        "usage": usage_,
    }


def completion_response(request_id: str, model: str, choices: list[tuple[str, str]], usage_: dict) -> dict:
    return {
        "id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                    for i, (text, reason) in enumerate(choices)],
        "usage": usage_,
    }


def chat_chunk(request_id: str, model: str, index: int, *, role: bool = False, text: str | None = None,
               finish_reason: str | None = None) -> dict:
    delta: dict[str, str] = {}
    if role:
        delta["role"] = "assistant"
    if text is not None:
        delta["content"] = text
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason}]}


def completion_chunk(request_id: str, model: str, index: int, *, text: str = "",
                     finish_reason: str | None = None) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(request_id: str, model: str, obj: str, usage_: dict) -> dict:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    return {"id": request_id, "object": obj, "created": int(time.time()), "model": model, "choices": [],
            "usage": usage_}


def sse(payload: dict | str) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def model_card(name: str, created: int) -> dict:
    """What ``GET /v1/models/{name}`` answers (and each entry of ``GET /v1/models``)."""
    return {"id": name, "object": "model", "created": created, "owned_by": "rlhf"}


def models_response(name: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(name, created)]}


def openapi_spec(model: str) -> dict:
    """The API's OpenAPI 3.1 document (``GET /openapi.json``), request bodies from the pydantic
    models above, so that clients and fuzzers (tests/test_serve_fuzz.py) see what the server takes."""
    components: dict[str, dict] = {}

    def body_schema(kind: type[_Request]) -> dict:
        schema = kind.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        schema["properties"]["model"]["example"] = model
        components[kind.__name__] = schema
        return {"required": True, "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{kind.__name__}"}}}}

    error = {"description": "an OpenAI error body", "content": {"application/json": {"schema": {"type": "object"}}}}
    ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    answers = {"200": ok, "400": error, "401": error, "404": error, "413": error, "429": error}
    bearer = [{"bearer": []}]
    return {
        "openapi": "3.1.0",
        "info": {"title": "rlhf serve", "version": "1"},
        "paths": {
            "/v1/chat/completions": {"post": {"operationId": "chat", "requestBody": body_schema(ChatRequest),
                                              "responses": answers, "security": bearer}},
            "/v1/completions": {"post": {"operationId": "completions", "requestBody": body_schema(CompletionRequest),
                                         "responses": answers, "security": bearer}},
            "/v1/models": {"get": {"operationId": "models", "responses": answers, "security": bearer}},
            "/v1/models/{model_id}": {"get": {
                "operationId": "model", "responses": answers, "security": bearer,
                "parameters": [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}]}},
            "/health": {"get": {"operationId": "health", "responses": {"200": ok, "503": error}}},
        },
        "components": {"schemas": components,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
