"""`rlhf serve`: the real Ray Serve app on a free loopback port, driven by the official openai client
and raw HTTP. One server (tiny model + a LoRA adapter, API key on, two generation replicas) is started
for the module by the CLI in a subprocess, loses a replica under load, and is stopped at the end with
SIGINT, as a user's Ctrl-C would. It holds at most MAX_PENDING completions at once (max_pending_choices),
so the 429 test can fill it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

API_KEY = "test-key-123"
NAME = "tiny-aligned"
CHAT = [{"role": "user", "content": "Say something nice."}]
MAX_PENDING = 40
MERGED_BEFORE: set = set()  # adapter merges in the temp folder before the module's server started


def merged_folders() -> set:
    import tempfile

    return set(Path(tempfile.gettempdir()).glob("rlhf-serve-merged-*"))


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter with non-zero weights, so serving it changes what the model says."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    out = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def server(tiny_model_dir, adapter_dir, tmp_path_factory):
    """``rlhf serve`` in a subprocess; yields (base url, process, output dir)."""
    from rlhf.serve import free_port, spawn

    scratch = tmp_path_factory.mktemp("serve")
    out = scratch / "out"  # made by rlhf serve (a folder rlhf did not make is refused)
    MERGED_BEFORE.update(merged_folders())
    process, url = spawn([str(tiny_model_dir), f"adapter_path={adapter_dir}", f"model_name={NAME}",
                          f"api_key={API_KEY}", "ray.num_cpus=2", "min_replicas=2", "max_replicas=2",
                          "cpus_per_replica=1", "kv_cache_gib=0.25", f"max_pending_choices={MAX_PENDING}",
                          "max_request_tokens=4096", "default_max_tokens=16",  # keeps the fuzz run short
                          # the corpus and the fuzz run send hundreds of bad requests from one address: no throttle
                          "refusal_delay_s=0"],
                         out, port=free_port(), log_path=scratch / "server.log")
    yield url, process, out
    if process.poll() is None:  # the stop test did not run or failed
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server[0] + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def merged_model(tiny_model_dir, adapter_dir):
    """The same base + adapter, merged in plain transformers: what the server should say."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()


def greedy_text(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> tuple[str, int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    new = out[0, len(prompt_ids):].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id) + 1]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def chat_prompt_ids(tokenizer) -> list[int]:
    text = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


# --------------------------------------------------------------------------------------------------
# The openai client
# --------------------------------------------------------------------------------------------------


def test_models_list(client):
    assert [m.id for m in client.models.list().data] == [NAME]


def test_chat_greedy_matches_the_merged_model(client, merged_model, tiny_tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    prompt_ids = chat_prompt_ids(tiny_tokenizer)
    expected, expected_tokens = greedy_text(merged_model, tiny_tokenizer, prompt_ids, 12)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert greedy_text(base, tiny_tokenizer, prompt_ids, 12)[0] != expected, "the adapter must change the output"

    reply = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=12, temperature=0)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.usage.completion_tokens == expected_tokens
    assert reply.usage.total_tokens == len(prompt_ids) + expected_tokens


def test_the_replicas_leave_no_merged_model_behind(client):
    """Each replica merges the adapter into a temporary folder, loads it, and deletes the folder."""
    assert client.models.list().data  # the replicas are up
    assert merged_folders() - MERGED_BEFORE == set()


def test_chat_stream_gives_the_same_text(client):
    whole = client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model=NAME, messages=CHAT, max_tokens=12, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == whole.choices[0].message.content
    assert reasons == [whole.choices[0].finish_reason]
    assert len([c for c in chunks if c.choices]) > 2, "streaming should deliver several deltas"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_n_seed_and_stream(client):
    first = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=10, n=3, seed=7, temperature=1.0)
    again = client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=10, n=3, seed=7, temperature=1.0)
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)], "same seed, same samples"
    assert len(set(texts)) > 1, "three seeded samples should differ"
    assert first.usage.completion_tokens == 30 or first.usage.completion_tokens < 30  # EOS may end one early
    assert first.usage.completion_tokens > 0

    streamed: dict[int, str] = {}
    for chunk in client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=10, n=3, seed=7,
                                           temperature=1.0, stream=True):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    assert [streamed[i] for i in range(3)] == texts


def test_stop_string_ends_the_completion(client):
    whole = client.completions.create(model=NAME, prompt="Hello", max_tokens=16, temperature=0).choices[0].text
    if len(whole) < 4:
        pytest.skip("greedy text too short to cut")
    stop = whole[2:4]
    cut = client.completions.create(model=NAME, prompt="Hello", max_tokens=16, temperature=0, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.text == whole[: whole.index(stop)]


def test_concurrent_requests_all_succeed(server):
    import asyncio

    async def one(http: httpx.AsyncClient, i: int) -> int:
        response = await http.post("/v1/completions", json={"model": NAME, "prompt": f"Number {i}", "max_tokens": 8})
        return response.status_code

    async def main() -> list[int]:
        async with httpx.AsyncClient(base_url=server[0], headers={"Authorization": f"Bearer {API_KEY}"},
                                     timeout=120) as http:
            return await asyncio.gather(*(one(http, i) for i in range(16)))

    assert asyncio.run(main()) == [200] * 16


def test_a_client_that_leaves_mid_stream_does_not_hurt_the_server(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.Client(base_url=server[0], headers=headers, timeout=60) as http:
        with http.stream("POST", "/v1/completions",
                         json={"model": NAME, "prompt": "Hi", "max_tokens": 500, "stream": True}) as stream:
            first = next(stream.iter_lines())
            assert first.startswith("data: ")
        # The abandoned request is aborted in the engine; the next one is answered as usual.
        reply = http.post("/v1/completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 4})
        assert reply.status_code == 200
        assert reply.json()["usage"]["completion_tokens"] <= 4


# --------------------------------------------------------------------------------------------------
# Auth and bad requests (raw HTTP)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                                     {"Authorization": "Basic " + API_KEY}])
def test_requests_without_the_right_key_get_401(server, headers):
    for method, path, body in (("GET", "/v1/models", None),
                               ("POST", "/v1/completions", {"model": NAME, "prompt": "x", "max_tokens": 2})):
        response = httpx.request(method, server[0] + path, json=body, headers=headers, timeout=30)
        assert response.status_code == 401, (path, headers, response.text)
        assert response.json()["error"]["type"] == "authentication_error"


def test_openai_client_with_a_wrong_key_raises(server):
    from openai import AuthenticationError, OpenAI

    with pytest.raises(AuthenticationError):
        OpenAI(base_url=server[0] + "/v1", api_key="nope", max_retries=0).models.list()


def test_nothing_the_server_started_listens_beyond_loopback(server):
    """Every socket of `rlhf serve`'s whole process tree (its Ray, the proxy, the replicas) listens on
    127.0.0.1 only, so nothing but this machine can reach Ray's ports or the API."""
    from cluster.runtime import listeners_beyond_loopback

    assert listeners_beyond_loopback(server[1].pid) == []


def test_health_needs_no_key(server):
    response = httpx.get(server[0] + "/health", timeout=30)
    assert response.status_code == 200 and response.json()["model"] == NAME


BAD_REQUESTS = yaml.safe_load((Path(__file__).parent / "bad_inputs" / "corpus.yaml").read_text())["http"]


def corpus_body(case: dict) -> bytes:
    """A corpus case's request body, with its placeholders filled in."""
    if case.get("raw"):
        if case["body"] == "OVERSIZED":  # 2 MiB of valid JSON: twice the default max_body_bytes
            return json.dumps({"model": NAME, "messages": [{"role": "user", "content": "hi " * 700_000}]}).encode()
        return case["body"].replace("DIGITS", "9" * 5000).replace("DEEP", "[" * 100_000 + "]" * 100_000).encode()
    text = json.dumps(case["body"]).replace('"MODEL"', json.dumps(NAME))
    for name, value in (("LONG_PROMPT", "hi " * 3000), ("MANY_PROMPTS", ["hi"] * 100), ("FORTY_PROMPTS", ["hi"] * 40)):
        text = text.replace(f'"{name}"', json.dumps(value))
    return text.encode()


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c["id"] for c in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(server, case):
    endpoint = "chat/completions" if case["endpoint"] == "chat" else "completions"
    response = httpx.post(f"{server[0]}/v1/{endpoint}", content=corpus_body(case), timeout=30,
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == case["status"], response.text[:500]
    assert "Traceback" not in response.text and "File \"" not in response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    assert error["param"] == case["param"], error


def test_a_body_sent_in_chunks_is_cut_off_at_max_body_bytes(server):
    """Without a Content-Length the ingress counts what arrives and refuses at 1 MiB, not at the end."""
    chunk = b" " * 65536
    body = iter([b'{"model": "' + NAME.encode() + b'", "prompt": "'] + [chunk] * 40 + [b'"}'])  # 2.5 MiB
    response = httpx.post(f"{server[0]}/v1/completions", content=body, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == 413, response.text[:300]
    assert "max_body_bytes" in response.json()["error"]["message"]


def test_parameters_common_clients_send_are_accepted(server, client):
    """Content-part arrays, the developer role and no-op values answer as the plain request does."""
    plain = client.chat.completions.create(model=NAME, messages=[{"role": "system", "content": "Be brief."}, *CHAT],
                                           max_tokens=8, temperature=0)
    parts = [{"type": "text", "text": "Say something "}, {"type": "text", "text": "nice."}]
    same = client.chat.completions.create(
        model=NAME, messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": parts}],
        max_tokens=8, temperature=0, logprobs=False, frequency_penalty=0, presence_penalty=0, logit_bias={},
        response_format={"type": "text"}, store=False)
    assert same.choices[0].message.content == plain.choices[0].message.content
    assert client.models.retrieve(NAME).id == NAME

    headers = {"Authorization": f"Bearer {API_KEY}"}
    for method, path, status in (("GET", "/v1/models/gpt-4", 404), ("GET", "/v1/nowhere", 404),
                                 ("GET", "/v1/completions", 405)):
        response = httpx.request(method, server[0] + path, headers=headers, timeout=30)
        assert response.status_code == status, response.text
        assert response.json()["error"]["message"], response.text


def test_a_full_server_answers_429_and_still_serves_what_fits(server):
    """Six clients ask for 16 completions each at once on a server that holds 40: two are admitted
    (32), the others get 429 with Retry-After at once, and a one-completion chat sent meanwhile still
    fits. Places are given back when requests end, also when a streaming client leaves early."""
    import asyncio

    url, headers = server[0], {"Authorization": f"Bearer {API_KEY}"}
    big = {"model": NAME, "prompt": "Hello", "n": 16, "max_tokens": 250}

    async def burst() -> tuple[list[httpx.Response], httpx.Response]:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120) as http:
            bigs = [asyncio.create_task(http.post("/v1/completions", json=big)) for _ in range(6)]
            await asyncio.sleep(0.05)
            small = await http.post("/v1/chat/completions", json={"model": NAME, "messages": CHAT, "max_tokens": 2})
            return await asyncio.gather(*bigs), small

    answers, small = asyncio.run(burst())
    statuses = sorted(r.status_code for r in answers)
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1 and set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) * 16 <= MAX_PENDING or statuses.count(429) == 0
    for refused in (r for r in answers if r.status_code == 429):
        assert refused.headers["retry-after"] == "1" and refused.json()["error"]["code"] == "server_busy"
    assert small.status_code == 200, small.text

    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        hog = {"model": NAME, "prompt": ["Once", "Twice"], "n": 16, "max_tokens": 120, "stream": True}
        with http.stream("POST", "/v1/completions", json=hog) as stream:  # 32 places, then it leaves
            assert stream.status_code == 200
            next(stream.iter_lines())
        deadline = time.monotonic() + 30
        while (again := http.post("/v1/completions", json={**hog, "stream": False})).status_code == 429:
            assert time.monotonic() < deadline, "the stream's places were not given back"
            time.sleep(0.2)
        assert again.status_code == 200 and len(again.json()["choices"]) == 32


def test_fuzzing_from_the_openapi_schema_finds_no_500_hang_or_traceback(server):
    """Schemathesis generates valid and invalid requests for every operation of GET /openapi.json
    (seeded, bounded to about a minute); each is answered within its timeout, below 500, with an
    OpenAI error body when refused and no traceback anywhere; the server is healthy afterwards."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    url = server[0]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    spec = httpx.get(url + "/openapi.json", timeout=30).json()
    operations = [result.ok() for result in schemathesis.openapi.from_dict(spec).get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/models"}
    cases = st.one_of([op.as_strategy(generation_mode=mode) for op in operations for mode in schemathesis.GenerationMode])
    statuses: dict[int, int] = {}
    stop_at = time.monotonic() + 75

    @settings(max_examples=1000, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def fuzz(case):
        if time.monotonic() > stop_at:
            return
        response = case.call(base_url=url, headers=headers, timeout=60)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])
        assert "Traceback" not in response.text and 'File "' not in response.text, response.text[:300]
        if response.status_code >= 400:
            assert response.json()["error"]["message"], response.text[:300]

    fuzz()
    assert sum(statuses.values()) >= 50 and 200 in statuses and 400 in statuses, statuses
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    reply = httpx.post(url + "/v1/chat/completions", headers=headers, timeout=60,
                       json={"model": NAME, "messages": CHAT, "max_tokens": 4})
    assert reply.status_code == 200, reply.text


# --------------------------------------------------------------------------------------------------
# A replica killed under load (then replaced)
# --------------------------------------------------------------------------------------------------


def test_a_replica_killed_under_load_loses_no_request(server):
    import asyncio

    url = server[0]
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def one(http, gate, i: int) -> tuple[int, str]:
        async with gate:
            try:
                response = await asyncio.wait_for(http.post("/v1/completions", json={
                    "model": NAME, "prompt": f"Request {i}", "max_tokens": 24}), 60)
            except (asyncio.TimeoutError, httpx.HTTPError) as exc:
                return -1, type(exc).__name__  # lost: no answer within the bound
            return response.status_code, response.headers.get("retry-after", "")

    async def load_with_a_kill() -> tuple[list, int]:
        async with httpx.AsyncClient(base_url=url, headers=headers, timeout=90) as http:
            gate = asyncio.Semaphore(8)
            requests = [asyncio.create_task(one(http, gate, i)) for i in range(48)]
            await asyncio.sleep(1.0)
            victim = (await http.get("/health")).json()["replica_pid"]
            os.kill(victim, signal.SIGKILL)
            return await asyncio.gather(*requests), victim

    outcomes, victim = asyncio.run(load_with_a_kill())
    statuses = [status for status, _ in outcomes]
    assert -1 not in statuses, f"requests lost: {outcomes}"
    # Each request is answered, or refused with a clean retryable 503 (with Retry-After).
    assert all(status == 200 or (status == 503 and after) for status, after in outcomes), outcomes
    assert statuses.count(200) >= 40, outcomes

    # Serve replaces the replica: two live replicas again, neither the one killed.
    deadline, seen = time.monotonic() + 150, set()
    while time.monotonic() < deadline and len(seen - {victim}) < 2:
        reply = httpx.get(url + "/health", timeout=30)
        if reply.status_code == 200:
            seen.add(reply.json()["replica_pid"])
        time.sleep(0.2)
    assert len(seen - {victim}) >= 2, f"replica pids seen after the kill: {seen} (killed {victim})"


# --------------------------------------------------------------------------------------------------
# Stopping (last: it ends the module's server)
# --------------------------------------------------------------------------------------------------


def test_ctrl_c_stops_the_server_cleanly(server):
    url, process, out = server
    assert json.loads((out / "serve.json").read_text())["pid"] == process.pid
    process.send_signal(signal.SIGINT)
    log = out.parent / "server.log"
    assert process.wait(timeout=180) == 0, log.read_text()[-3000:]
    assert not (out / "serve.json").exists()
    assert "server stopped" in log.read_text()
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "/health", timeout=5)


def test_rayservice_app_builder_takes_config_and_overrides(monkeypatch, tiny_model_dir):
    from ray.serve import Application

    from rlhf.config import ConfigError
    from rlhf.serve import build_app

    monkeypatch.setenv("RLHF_API_KEY", "from-env")
    app = build_app({"config": None, "overrides": [f"model.path={tiny_model_dir}", "max_replicas=3"]})
    assert isinstance(app, Application)
    ingress = app._bound_deployment  # what Serve will create: the ingress, bound to the engine replicas
    config, engine = ingress.init_args
    assert config["api_key"] == "from-env"  # resolved where the app is built
    assert engine._bound_deployment._deployment_config.autoscaling_config.max_replicas == 3
    assert engine._bound_deployment.init_args[0]["api_key"] == "from-env"
    with pytest.raises(ConfigError, match="overides"):
        build_app({"config": None, "overides": []})


def test_hf_backend_server_answers_and_stops_with_the_stop_command(tiny_model_dir, tmp_path):
    """The HF fallback behind the same app, and `rlhf serve --stop` from another process."""
    import sys

    from openai import OpenAI

    from rlhf.serve import free_port, spawn

    out = tmp_path / "hf-serve"
    process, url = spawn([str(tiny_model_dir), "backend=hf", "ray.num_cpus=2", "free_refusals=2",
                          "refusal_delay_s=0.5"], out, port=free_port(), log_path=tmp_path / "hf-server.log")
    try:
        # Refused requests from one address: two answered at once, then 0.5 s longer each.
        waits = []
        for _ in range(4):
            started = time.monotonic()
            assert httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30).status_code == 404
            waits.append(time.monotonic() - started)
        assert waits[2] >= 0.5 and waits[3] >= 1.0, waits
        client = OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        assert httpx.get(url + "/health", timeout=30).json()["backend"] == "hf"
        reply = client.chat.completions.create(model=tiny_model_dir.name, messages=CHAT, max_tokens=6, temperature=0)
        assert reply.usage.completion_tokens > 0 and reply.choices[0].finish_reason in ("stop", "length")
        streamed = list(client.completions.create(model=tiny_model_dir.name, prompt="Hi", max_tokens=6,
                                                  temperature=0, stream=True))
        assert streamed[-1].choices[0].finish_reason in ("stop", "length")

        stop = subprocess.run([sys.executable, "-m", "rlhf.cli", "serve", "--stop", f"output_dir={out}"],
                              capture_output=True, text=True, timeout=120)
        assert stop.returncode == 0 and "stopped the server" in stop.stdout, stop.stdout + stop.stderr
        assert process.wait(timeout=30) == 0
        assert not (out / "serve.json").exists()
    finally:
        if process.poll() is None:
            process.kill()
