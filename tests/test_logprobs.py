"""rlhf.algorithms.logprobs: pure torch, tiny tensors and the tiny model; no Ray, no vLLM."""

from __future__ import annotations

import pytest
import torch

from rlhf.algorithms import causal_lm_logprobs, crop_to_window, logprob_diff, scored_window, token_logprobs, uncrop


def test_token_logprobs_is_log_softmax_at_tokens():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    tokens = torch.randint(0, 11, (3, 5))
    expected = torch.log_softmax(logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert token_logprobs(logits, tokens).shape == (3, 5)
    torch.testing.assert_close(token_logprobs(logits, tokens), expected)
    torch.testing.assert_close(token_logprobs(logits, tokens, chunk_rows=2), expected)


def test_token_logprobs_gradient_is_the_same_in_chunks():
    torch.manual_seed(0)
    tokens = torch.randint(0, 11, (3, 5))
    grads = []
    for chunk_rows in (1, 2, 3):
        logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(1), requires_grad=True)
        (token_logprobs(logits, tokens, chunk_rows=chunk_rows) * torch.arange(15.0).view(3, 5)).sum().backward()
        grads.append(logits.grad)
    expected = torch.func.grad(lambda x: (torch.log_softmax(x, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
                                          * torch.arange(15.0).view(3, 5)).sum())(
        torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(1)))
    for grad in grads:
        torch.testing.assert_close(grad, expected)
    assert token_logprobs(torch.randn(0, 5, 11), torch.zeros(0, 5, dtype=torch.long)).shape == (0, 5)


def test_token_logprobs_temperature():
    torch.manual_seed(1)
    logits = torch.randn(2, 4, 7)
    tokens = torch.randint(0, 7, (2, 4))
    expected = torch.log_softmax(logits / 0.7, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, tokens, temperature=0.7), expected)
    # Greedy engines report unscaled logprobs: temperature 0 means "no scaling".
    torch.testing.assert_close(token_logprobs(logits, tokens, temperature=0), token_logprobs(logits, tokens))


def test_token_logprobs_keeps_float64_and_upcasts_half():
    logits = torch.randn(1, 3, 5, dtype=torch.float64)
    tokens = torch.zeros(1, 3, dtype=torch.long)
    assert token_logprobs(logits, tokens).dtype == torch.float64
    assert token_logprobs(logits.to(torch.bfloat16), tokens).dtype == torch.float32


def test_token_logprobs_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="do not match"):
        token_logprobs(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_logprob_diff_counts_only_masked_tokens():
    engine = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, 0.0, 0.0]])
    learner = torch.tensor([[-1.5, -2.0, -9.0], [-0.5, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert logprob_diff(engine, learner, mask) == pytest.approx((0.5 + 0.0 + 0.5) / 3)
    assert logprob_diff(engine, learner, torch.zeros_like(mask)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        logprob_diff(engine, learner[:, :2], mask)


def test_causal_lm_logprobs_matches_manual_and_ignores_padding(tiny_model_dir):
    from rlhf.config import ModelConfig
    from rlhf.models import load_causal_lm

    model = load_causal_lm(ModelConfig(path=str(tiny_model_dir)), device="cpu").eval()
    ids = torch.tensor([[5, 9, 14, 3, 7]])
    with torch.no_grad():
        out = causal_lm_logprobs(model, ids, torch.ones_like(ids), temperature=0.9)
        logits = model(input_ids=ids).logits
    assert out.shape == (1, 4)
    expected = torch.log_softmax(logits[:, :-1] / 0.9, -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)

    # The same sequence left- and right-padded in a batch gives the same logprobs at its tokens.
    pad = 0
    left = torch.tensor([[pad, pad, 5, 9, 14, 3, 7]])
    right = torch.tensor([[5, 9, 14, 3, 7, pad, pad]])
    with torch.no_grad():
        from_left = causal_lm_logprobs(model, left, (left != pad).long(), temperature=0.9)[:, 2:]
        from_right = causal_lm_logprobs(model, right, (right != pad).long(), temperature=0.9)[:, :4]
    torch.testing.assert_close(from_left, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_right, out, atol=1e-5, rtol=1e-5)


def test_scored_window_spans_every_rows_actions():
    mask = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert scored_window(mask) == (2, 6)
    assert scored_window(mask[:1]) == (2, 4)
    assert scored_window(torch.zeros(2, 4, dtype=torch.bool)) == (0, 0)


def test_crop_to_window_and_uncrop():
    batch = {"input_ids": torch.arange(14).reshape(2, 7), "attention_mask": torch.ones(2, 7, dtype=torch.long),
             "action_mask": torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0]], dtype=torch.bool),
             "advantages": torch.arange(12.0).reshape(2, 6)}
    window = scored_window(batch["action_mask"])
    assert window == (1, 4)
    cropped = crop_to_window(batch, window)
    assert cropped["input_ids"].tolist() == [[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]]  # tokens up to column stop
    assert cropped["advantages"].tolist() == [[1.0, 2.0, 3.0], [7.0, 8.0, 9.0]]
    assert cropped["action_mask"].sum() == batch["action_mask"].sum()  # no action is cut off
    back = uncrop(cropped["advantages"], window, 6)
    assert back.tolist() == [[0.0, 1.0, 2.0, 3.0, 0.0, 0.0], [0.0, 7.0, 8.0, 9.0, 0.0, 0.0]]


def test_windowed_logprobs_equal_the_full_computation_on_the_window(tiny_model_dir):
    """Reading only the tokens up to the window's end and computing logits inside it gives the same
    logprobs as the full forward (right padding, rows of different prompt and response lengths)."""
    from rlhf.config import ModelConfig
    from rlhf.models import load_causal_lm

    model = load_causal_lm(ModelConfig(path=str(tiny_model_dir)), device="cpu").eval()
    torch.manual_seed(0)
    ids = torch.randint(5, 200, (3, 12))
    attention = torch.tensor([[1] * 12, [1] * 9 + [0] * 3, [1] * 7 + [0] * 5])
    action = torch.zeros(3, 11, dtype=torch.bool)
    action[0, 6:11], action[1, 3:8], action[2, 4:6] = True, True, True
    with torch.no_grad():
        full = causal_lm_logprobs(model, ids, attention, temperature=0.8)
        window = scored_window(action)
        assert window == (3, 11)
        windowed = causal_lm_logprobs(model, ids, attention, temperature=0.8, window=window)
        # A window that ends before the batch does: the model reads fewer columns.
        short = causal_lm_logprobs(model, ids, attention, temperature=0.8, window=(4, 6))
    assert windowed.shape == (3, 8)
    torch.testing.assert_close(windowed[action[:, 3:11]], full[:, 3:11][action[:, 3:11]], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(uncrop(windowed, window, 11)[action], full[action], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(short, full[:, 4:6], rtol=1e-5, atol=1e-5)
