"""rlhf.algorithms.shared_prompts: each prompt read once for all its responses gives the plain pass's
numbers (logits, logprobs, gradients, critic values). Pure torch and the tiny model; no Ray."""

from __future__ import annotations

import pytest
import torch

from rlhf.algorithms import (
    crop_to_window, pack_shared_prompts, ppo_schedule, prompt_groups, response_logprobs, scored_window,
    shared_prompt_logits, token_logprobs, windowed_logits,
)


def make_batch(prompts: list[list[int]], responses: list[tuple[int, list[int]]], left_pad: int = 0,
               pad: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded rows ``prompts[k] + response`` (as the rollout engines' samples_to_batch makes
    them); the first ``left_pad`` rows are left-padded by 2 as well."""
    rows = [(prompts[k], r) for k, r in responses]
    width = max(len(p) + len(r) for p, r in rows) + 2
    batch = len(rows)
    input_ids = torch.full((batch, width), pad, dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    action_mask = torch.zeros((batch, width - 1), dtype=torch.bool)
    for i, (p, r) in enumerate(rows):
        start = 2 if i < left_pad else 0
        input_ids[i, start:start + len(p) + len(r)] = torch.tensor(p + r)
        attention_mask[i, start:start + len(p) + len(r)] = 1
        action_mask[i, start + len(p) - 1:start + len(p) - 1 + len(r)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "action_mask": action_mask}


def random_batch(seed: int = 0, left_pad: int = 0) -> dict[str, torch.Tensor]:
    """Three prompts of different lengths with 4, 3 and 1 responses of mixed lengths (one of 1 token)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, 500, (n,), generator=g).tolist() for n in (7, 11, 9)]
    lengths = [(0, 5), (0, 3), (1, 6), (0, 1), (1, 4), (2, 2), (1, 6), (0, 6)]
    responses = [(k, torch.randint(5, 500, (n,), generator=g).tolist()) for k, n in lengths]
    return make_batch(prompts, responses, left_pad=left_pad)


def load_tiny(path, attn: str = "sdpa"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation=attn)


def test_packed_layout_of_a_small_batch():
    batch = make_batch([[11, 12, 13], [21, 22]], [(0, [1, 2, 3]), (1, [4, 5]), (0, [6, 7])])
    window = scored_window(batch["action_mask"])
    shared = pack_shared_prompts(batch["input_ids"], batch["attention_mask"], batch["action_mask"], window)
    # Prompt once, then each response without its last token; positions continue from the prompt.
    assert shared.input_ids.tolist() == [[11, 12, 13, 1, 2, 6], [21, 22, 4, 0, 0, 0]]
    assert shared.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 0, 0, 0]]
    mask = shared.attention_mask[0, 0].int().tolist()
    assert mask[3] == [1, 1, 1, 1, 0, 0]  # first response token: the prompt and itself
    assert mask[4] == [1, 1, 1, 1, 1, 0]
    assert mask[5] == [1, 1, 1, 0, 0, 1]  # the second response never sees the first
    assert shared.attention_mask[1, 0, 4].int().tolist() == [0, 0, 0, 0, 1, 0]  # padding: itself only
    assert shared.tokens == 12
    # Output columns: from the earliest prompt end (column 1) on, shared by both packed rows.
    assert shared.keep.tolist() == [1, 2, 3, 4, 5]
    assert window == (1, 5)
    # Per row and window column, the flat output position (group * 5 + keep index) that scores it;
    # columns outside a row's response point at position 0 (finite, masked by every consumer).
    assert shared.index.tolist() == [[0, 1, 2, 3],  # row 0: prompt end, then its tokens 1, 2
                                     [5, 6, 0, 0],  # row 1: group 1's prompt end, then its token 4
                                     [0, 1, 4, 0]]  # row 2: the shared prompt end, then its token 6


def test_prompt_groups_and_no_sharing_when_every_prompt_is_alone():
    batch = random_batch()
    assert prompt_groups(batch["input_ids"], batch["attention_mask"], batch["action_mask"]) == [0, 0, 1, 0, 1, 2, 1, 0]
    single = make_batch([[1, 2], [3, 4, 5]], [(0, [7, 8]), (1, [9])])
    window = scored_window(single["action_mask"])
    assert pack_shared_prompts(single["input_ids"], single["attention_mask"], single["action_mask"], window) is None


def test_rows_that_are_not_prompt_then_response_are_refused():
    batch = make_batch([[1, 2, 3]], [(0, [4, 5, 6]), (0, [7, 8])])
    gaps = batch["action_mask"].clone()
    gaps[0, 3] = False  # a hole inside the response
    with pytest.raises(ValueError, match="row 0.*not one block"):
        pack_shared_prompts(batch["input_ids"], batch["attention_mask"], gaps, scored_window(gaps))
    empty = batch["action_mask"].clone()
    empty[1] = False
    with pytest.raises(ValueError, match="row 1 has no response token"):
        pack_shared_prompts(batch["input_ids"], batch["attention_mask"], empty, scored_window(empty))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_logits_and_gradients_equal_the_plain_pass(tiny_model_dir, attn):
    model = load_tiny(tiny_model_dir, attn)
    batch = random_batch(left_pad=2)
    window = scored_window(batch["action_mask"])
    cropped = crop_to_window(batch, window)
    shared = pack_shared_prompts(batch["input_ids"], batch["attention_mask"], batch["action_mask"], window)
    assert shared.tokens < batch["input_ids"][:, :window[1] + 1].numel()  # fewer tokens read
    tokens = cropped["input_ids"][:, window[0] + 1:window[1] + 1]
    mask = cropped["action_mask"]

    def loss_and_grads(logits):
        model.zero_grad()
        logprobs = token_logprobs(logits, tokens)
        (logprobs * mask).sum().backward()
        return logprobs.detach(), [p.grad.clone() for p in model.parameters()]

    plain, plain_grads = loss_and_grads(windowed_logits(model, cropped["input_ids"], cropped["attention_mask"], window))
    packed, packed_grads = loss_and_grads(shared_prompt_logits(model, shared))
    torch.testing.assert_close(packed[mask], plain[mask], atol=1e-5, rtol=1e-5)
    for a, b in zip(plain_grads, packed_grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_response_logprobs_with_shared_prompts(tiny_model_dir):
    model = load_tiny(tiny_model_dir)
    batch = random_batch(seed=3)
    with torch.no_grad():
        plain = response_logprobs(model, batch, 0.7)
        shared = response_logprobs(model, batch, 0.7, share_prompts=True)
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    assert (shared[~batch["action_mask"]] == 0).all() and (plain[~batch["action_mask"]] == 0).all()
    assert (shared[batch["action_mask"]] < 0).all()  # logprobs of real tokens, not zeros


def test_critic_values_with_shared_prompts(tiny_model_dir):
    from actors.critic import next_token_values
    from rlhf.config import ModelConfig
    from rlhf.models import load_scalar_model

    torch.manual_seed(0)
    critic = load_scalar_model(ModelConfig(path=str(tiny_model_dir)))
    batch = random_batch(seed=5)
    window = scored_window(batch["action_mask"])
    cropped = crop_to_window(batch, window)
    shared = pack_shared_prompts(batch["input_ids"], batch["attention_mask"], batch["action_mask"], window)
    with torch.no_grad():
        plain = next_token_values(critic, cropped, window)
        packed = next_token_values(critic, cropped, window, shared)
    mask = cropped["action_mask"]
    assert plain.shape == packed.shape == mask.shape
    torch.testing.assert_close(packed[mask], plain[mask], atol=1e-5, rtol=1e-5)


def test_can_share_prompts_only_with_kernels_that_take_a_mask(tiny_model_dir):
    from rlhf.algorithms import can_share_prompts

    model = load_tiny(tiny_model_dir)
    assert can_share_prompts(model)
    model.config._attn_implementation = "flash_attention_2"  # takes a 2D padding mask only
    assert not can_share_prompts(model)


def test_ppo_schedule_with_groups_keeps_each_group_together():
    groups = [g for g in range(6) for _ in range(4)]  # 6 prompts x 4 responses, in order
    lengths = [10 + (i * 7) % 5 for i in range(24)]
    schedule = ppo_schedule(24, 8, epochs=2, seed=3, grad_accum=1, lengths=lengths, groups=groups)
    assert len(schedule) == 6
    for epoch in (0, 1):
        seen = sorted(i for step in schedule if step[0].epoch == epoch for mb in step for i in mb.indices)
        assert seen == list(range(24))  # every item once per epoch
    for step in schedule:
        (micro,) = step
        assert len({groups[i] for i in micro.indices}) == 2  # two whole groups per micro-batch of 8
        assert micro.loss_weight == 1.0
    orders = [[groups[mb.indices[0]] for step in schedule for mb in step if mb.epoch == e] for e in (0, 1)]
    assert orders[0] != orders[1]  # groups are reshuffled each epoch
    assert schedule == ppo_schedule(24, 8, epochs=2, seed=3, grad_accum=1, lengths=lengths, groups=groups)
    # Within a step of several micro-batches, groups are ordered by their longest item and stay whole.
    (step,) = ppo_schedule(24, 8, epochs=1, seed=1, grad_accum=3, lengths=lengths, groups=groups)
    flat = [i for mb in step for i in mb.indices]
    runs = [groups[i] for k, i in enumerate(flat) if k == 0 or groups[flat[k - 1]] != groups[i]]
    assert len(runs) == len(set(runs)) == 6
    longest = [max(lengths[i] for i in flat if groups[i] == g) for g in runs]
    assert longest == sorted(longest)
    with pytest.raises(ValueError, match="groups has 3 entries for 24 items"):
        ppo_schedule(24, 8, epochs=1, seed=0, groups=[0, 0, 1])


@pytest.mark.parametrize("choice, expected", [("auto", "eager"), ("sdpa", "sdpa"), ("eager", "eager")])
def test_learners_on_the_cpu_train_with_eager_attention_unless_told(tiny_model_dir, choice, expected):
    from rlhf.algorithms import attention_kernel
    from rlhf.config import LoraConfig
    from rlhf.models import attach_lora, use_training_attention

    for lora in (False, True):
        model = load_tiny(tiny_model_dir)
        if lora:
            model = attach_lora(model, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
        use_training_attention(model, choice, torch.device("cpu"))
        base = model.get_base_model() if lora else model
        assert attention_kernel(base) == expected
        # The shared-prompt path still gives the plain numbers under the chosen kernel.
        batch = random_batch(seed=7)
        with torch.no_grad():
            torch.testing.assert_close(response_logprobs(model, batch, 1.0, share_prompts=True),
                                       response_logprobs(model, batch, 1.0), atol=1e-5, rtol=1e-5)
