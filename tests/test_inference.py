"""Streaming engines of the serve app (rlhf/inference.py), without Ray: concurrent requests share one
vLLM engine without changing what each gets; abandoned streams are aborted; the HF fallback agrees."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from rlhf.config import SamplingConfig
from rlhf.inference import HFStreamer, VLLMStreamer, one_completion

pytestmark = pytest.mark.timeout(300)

GREEDY = SamplingConfig(temperature=0, max_new_tokens=12)
PROMPTS = ["Hello there", "The weather today", "One two three", "A short story:"]


async def collect(streamer, prompt_ids, sampling) -> tuple[str, int, str]:
    text, tokens, reason = "", 0, None
    async for delta in streamer.stream(prompt_ids, sampling):
        text, tokens, reason = text + delta.text, tokens + delta.tokens, delta.finish_reason
    return text, tokens, reason


def hf_greedy(model_dir, tokenizer, prompt_ids, max_new_tokens) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                             pad_token_id=tokenizer.pad_token_id)
    return out[0, len(prompt_ids):].tolist()


def test_one_completion_gives_each_choice_its_own_seed():
    cfg = SamplingConfig(n=3, seed=10)
    assert [(c.n, c.seed) for c in (one_completion(cfg, i) for i in range(3))] == [(1, 10), (1, 11), (1, 12)]
    assert one_completion(SamplingConfig(n=2), 1).seed is None


def test_hf_streamer_matches_generate(tiny_model_dir, tiny_tokenizer):
    streamer = HFStreamer(str(tiny_model_dir))
    ids = tiny_tokenizer(PROMPTS[0]).input_ids
    text, tokens, reason = asyncio.run(collect(streamer, ids, GREEDY))
    expected = hf_greedy(tiny_model_dir, tiny_tokenizer, ids, 12)
    assert tokens == len(expected) and reason == "length"
    assert text == tiny_tokenizer.decode(expected, skip_special_tokens=True)


@pytest.fixture(scope="module")
def vllm_streamer(tiny_model_dir):
    streamer = VLLMStreamer(str(tiny_model_dir), max_model_len=256, kv_cache_gib=0.25)
    yield streamer
    streamer.close()


def test_concurrent_streams_get_what_they_get_alone(vllm_streamer, tiny_tokenizer):
    prompt_ids = [tiny_tokenizer(p).input_ids for p in PROMPTS]

    async def alone():
        return [await collect(vllm_streamer, ids, GREEDY) for ids in prompt_ids]

    async def together():
        return await asyncio.gather(*(collect(vllm_streamer, ids, GREEDY) for ids in prompt_ids))

    one_by_one = asyncio.run(alone())
    assert asyncio.run(together()) == one_by_one
    assert all(tokens == 12 and reason == "length" for _, tokens, reason in one_by_one)


def test_abandoned_stream_is_aborted(vllm_streamer, tiny_tokenizer):
    ids = tiny_tokenizer(PROMPTS[1]).input_ids

    async def first_delta_only():
        stream = vllm_streamer.stream(ids, SamplingConfig(temperature=1.0, max_new_tokens=200))
        async for delta in stream:
            assert delta.finish_reason is None
            break
        await stream.aclose()

    asyncio.run(first_delta_only())
    deadline = time.monotonic() + 10
    while vllm_streamer._active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not vllm_streamer._active, "the engine still works on a request nobody reads"
    # ... and the engine goes on serving.
    assert asyncio.run(collect(vllm_streamer, ids, GREEDY))[1] == 12


def test_a_refused_request_fails_alone(vllm_streamer, tiny_tokenizer):
    too_long = list(range(5, 305))  # 300 prompt tokens > max_model_len 256: the engine refuses it
    with pytest.raises(Exception, match="maximum context length"):
        asyncio.run(collect(vllm_streamer, too_long, GREEDY))
    assert asyncio.run(collect(vllm_streamer, tiny_tokenizer(PROMPTS[2]).input_ids, GREEDY))[1] == 12
