"""The serve app's request parsing (rlhf/openai_api.py), without a server: what common OpenAI clients
send is accepted, what the server cannot do is a 400 naming the parameter, and hostile JSON is a 400,
never an exception. The same cases run over HTTP against the real app in tests/test_serve.py."""

from __future__ import annotations

import json

import pytest

from rlhf.config import SamplingConfig
from rlhf.inference import one_completion
from rlhf.openai_api import NO_OP_VALUES, APIError, ChatRequest, CompletionRequest, parse_request

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def parse(body: dict | str | bytes, kind=ChatRequest):
    raw = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
    return parse_request(raw, kind)


def refused(body, kind=ChatRequest) -> APIError:
    with pytest.raises(APIError) as caught:
        parse(body, kind)
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize("extra", [
    {"logprobs": False}, {"logprobs": None}, {"top_logprobs": 0}, {"frequency_penalty": 0}, {"presence_penalty": 0.0},
    {"logit_bias": {}}, {"response_format": {"type": "text"}}, {"tools": []}, {"tool_choice": "none"},
    {"parallel_tool_calls": True}, {"store": False}, {"service_tier": "auto"},
])
def test_no_op_values_common_clients_send_are_accepted(extra):
    assert parse({**CHAT, **extra}).n == 1


@pytest.mark.parametrize("key,value", [("logprobs", True), ("top_logprobs", 5), ("frequency_penalty", 0.5),
                                       ("presence_penalty", -1), ("logit_bias", {"1": 5}),
                                       ("response_format", {"type": "json_object"}), ("frequency_penalty", False),
                                       ("tools", [{"type": "function"}])])
def test_what_the_server_cannot_do_is_refused_by_name(key, value):
    error = refused({**CHAT, key: value})
    assert error.param == key and "not supported" in error.message and json.dumps(value)[:20] in error.message


def test_completions_no_op_values():
    body = parse({"model": "m", "prompt": "hi", "logprobs": 0, "best_of": 1, "suffix": None, "echo": False},
                 CompletionRequest)
    assert body.prompts == ["hi"]
    assert refused({"model": "m", "prompt": "hi", "logprobs": 3}, CompletionRequest).param == "logprobs"
    assert refused({"model": "m", "prompt": "hi", "best_of": 2}, CompletionRequest).param == "best_of"
    assert set(NO_OP_VALUES).isdisjoint(CompletionRequest.model_fields)  # no parameter is both


def test_content_parts_developer_role_and_names():
    body = parse({"model": "m", "messages": [
        {"role": "developer", "content": "Be kind."},
        {"role": "user", "name": "ann", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "you"}]},
    ]})
    assert [m.for_template() for m in body.messages] == [{"role": "system", "content": "Be kind."},
                                                         {"role": "user", "content": "Hello, you"}]
    image = {"type": "image_url", "image_url": {"url": "http://x"}}
    error = refused({"model": "m", "messages": [{"role": "user", "content": [image]}]})
    assert error.param == "messages.0.content" and "image_url are not supported" in error.message


def test_seeds_are_64_bit_and_every_completion_gets_one_engines_take():
    assert parse({**CHAT, "seed": 2**63 - 1}).seed == 2**63 - 1
    assert parse({**CHAT, "seed": -(2**63)}).seed == -(2**63)
    assert refused({**CHAT, "seed": 2**64}).param == "seed"
    assert refused({**CHAT, "seed": -(2**63) - 1}).param == "seed"
    sampling = SamplingConfig(seed=2**63 - 1, n=3)
    seeds = [one_completion(sampling, j).seed for j in range(3)]
    assert seeds == [2**63 - 1, 0, 1]
    assert [one_completion(SamplingConfig(seed=-1), j).seed for j in range(2)] == [2**63 - 1, 0]
    assert [one_completion(SamplingConfig(seed=7), j).seed for j in range(2)] == [7, 8]  # small seeds unchanged


@pytest.mark.parametrize("raw,words", [
    ('{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', "lone surrogate"),
    ('{"model": "m", "prompt": "hi", "max_tokens": ' + "9" * 5000 + "}", "not acceptable JSON"),
    ('{"model": "m", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    ('{"model": "m", "prompt": "hi", "max_tokens": 1e999}', "max_tokens"),
])
def test_hostile_json_is_a_400(raw, words):
    error = refused(raw, CompletionRequest if '"prompt"' in raw else ChatRequest)
    assert words in error.message


def test_min_tokens_beyond_max_tokens_is_a_400_not_a_crash():
    body = parse({**CHAT, "min_tokens": 50, "top_k": 5})
    assert body.sampling(64).min_new_tokens == 50 and body.sampling(64).top_k == 5
    with pytest.raises(APIError) as caught:
        body.sampling(10)
    assert caught.value.status == 400 and caught.value.param == "min_tokens"


def test_a_client_that_keeps_being_refused_is_answered_more_and_more_slowly():
    from rlhf.openai_api import RefusalThrottle

    now = [0.0]
    throttle = RefusalThrottle(free=3, window_s=10, delay_s=0.5, max_delay_s=2.0, clock=lambda: now[0])
    delays = [throttle.delay_for("10.0.0.1") for _ in range(8)]
    assert delays == [0, 0, 0, 0.5, 1.0, 1.5, 2.0, 2.0]  # three free, then 0.5 s more each, capped
    assert throttle.delay_for("10.0.0.2") == 0  # per address
    now[0] = 10.5  # the window has passed: free again
    assert throttle.delay_for("10.0.0.1") == 0
    off = RefusalThrottle(free=0, window_s=10, delay_s=0, max_delay_s=5, clock=lambda: now[0])
    assert [off.delay_for("a") for _ in range(3)] == [0, 0, 0]  # refusal_delay_s=0: never


def test_the_throttle_forgets_quiet_addresses():
    from rlhf.openai_api import RefusalThrottle

    now = [0.0]
    throttle = RefusalThrottle(free=1, window_s=1, delay_s=1, max_delay_s=1, clock=lambda: now[0], max_addresses=3)
    for i in range(3):
        throttle.delay_for(f"a{i}")
    now[0] = 5.0
    throttle.delay_for("new")
    assert set(throttle.recent) == {"new"}
