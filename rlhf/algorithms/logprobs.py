"""Log-probabilities of chosen tokens, and the engine-versus-learner agreement check.

The rollout engine reports the sampled tokens' logprobs after temperature (vLLM
``logprobs_mode="processed_logprobs"``): those are the behaviour policy's. The learner recomputes them
from the same weights with :func:`causal_lm_logprobs`; :func:`logprob_diff` is the mean absolute gap
(``rollout/logprob_diff``). A gap much above float noise means PPO silently trains off-policy.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   *, chunk_rows: int = 1) -> torch.Tensor:
    """``log softmax(logits / temperature)`` at ``tokens``.

    logits (batch, seq, vocab), tokens (batch, seq) -> (batch, seq), in float32 (or float64 when the
    logits are). ``temperature`` 0 (greedy) is treated as 1: greedy engines report unscaled logprobs.
    Rows are processed ``chunk_rows`` at a time so a large vocabulary never needs a second
    (batch, seq, vocab) tensor.
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} do not match")
    scale = 1.0 if temperature in (0, 1) else 1.0 / temperature
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    out = torch.empty(tokens.shape, dtype=dtype, device=logits.device)
    for start in range(0, logits.shape[0], max(1, chunk_rows)):
        rows = slice(start, start + max(1, chunk_rows))
        chunk = logits[rows].to(dtype)
        if scale != 1.0:
            chunk = chunk * scale
        picked = chunk.gather(-1, tokens[rows].long().unsqueeze(-1)).squeeze(-1)
        out[rows] = picked - torch.logsumexp(chunk, dim=-1)
    return out


def causal_lm_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """Logprob of each next token under a causal LM.

    input_ids, attention_mask (batch, seq) -> (batch, seq - 1): position ``i`` is the logprob of
    ``input_ids[:, i + 1]`` given ``input_ids[:, : i + 1]``. Pair it with an ``action_mask``
    (batch, seq - 1) that marks response tokens. Padding may be on either side: position ids come
    from the attention mask, so left-padded rows see the same positions as unpadded ones.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    return token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature)


def logprob_diff(engine_logprobs: torch.Tensor, learner_logprobs: torch.Tensor,
                 mask: torch.Tensor) -> float:
    """Mean absolute difference over tokens where ``mask`` is set; all (batch, seq). 0.0 if none."""
    if not (engine_logprobs.shape == learner_logprobs.shape == mask.shape):
        raise ValueError(
            f"shapes differ: engine {tuple(engine_logprobs.shape)}, learner "
            f"{tuple(learner_logprobs.shape)}, mask {tuple(mask.shape)}"
        )
    valid = mask.bool()
    count = int(valid.sum())
    if count == 0:
        return 0.0
    gap = (engine_logprobs.double() - learner_logprobs.double()).abs()
    return float(gap[valid].sum() / count)
