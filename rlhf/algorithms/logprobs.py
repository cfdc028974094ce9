"""Log-probabilities of chosen tokens, and the engine-versus-learner agreement check.

The rollout engine reports the sampled tokens' logprobs after temperature (vLLM
``logprobs_mode="processed_logprobs"``): those are the behaviour policy's. The learner recomputes them
from the same weights with :func:`causal_lm_logprobs`; :func:`logprob_diff` is the mean absolute gap
(``rollout/logprob_diff``). A gap much above float noise means PPO silently trains off-policy.
"""

from __future__ import annotations

import torch

from rlhf.algorithms.shared_prompts import SharedPrompts, can_share_prompts, pack_shared_prompts


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0,
                   *, chunk_rows: int = 1) -> torch.Tensor:
    """``log softmax(logits / temperature)`` at ``tokens``.

    logits (batch, seq, vocab), tokens (batch, seq) -> (batch, seq), in float32 (or float64 when the
    logits are). ``temperature`` 0 (greedy) is treated as 1: greedy engines report unscaled logprobs.
    Rows are processed ``chunk_rows`` at a time so a large vocabulary never needs a second
    (batch, seq, vocab) tensor. They are cut with ``torch.split``, whose backward joins the chunks'
    gradients once; indexing each chunk out instead gave every chunk a zero-filled gradient of the
    whole batch, summed row by row (a third of a default-model micro-batch's backward).
    """
    if logits.shape[:-1] != tokens.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and tokens {tuple(tokens.shape)} do not match")
    scale = 1.0 if temperature in (0, 1) else 1.0 / temperature
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    rows = max(1, chunk_rows)
    picked = []
    for chunk, chunk_tokens in zip(torch.split(logits, rows), torch.split(tokens, rows)):
        chunk = chunk.to(dtype)
        if scale != 1.0:
            chunk = chunk * scale
        picked.append(chunk.gather(-1, chunk_tokens.long().unsqueeze(-1)).squeeze(-1) - torch.logsumexp(chunk, dim=-1))
    if not picked:  # an empty batch
        return torch.empty(tokens.shape, dtype=dtype, device=logits.device)
    return torch.cat(picked)


def scored_window(action_mask: torch.Tensor) -> tuple[int, int]:
    """Columns ``[start, stop)`` of a (batch, seq - 1) ``action_mask`` that hold every action: from
    the earliest response token of any row to the last one. (0, 0) when there is no action.

    A PPO batch is mostly prompt and padding outside this window, and nothing there is ever scored:
    the learners read only the tokens up to ``stop`` and compute logits (a vocabulary-wide matrix
    product and softmax per position) only inside it. See :func:`crop_to_window`.
    """
    columns = action_mask.any(0).nonzero()
    if len(columns) == 0:
        return 0, 0
    return int(columns[0]), int(columns[-1]) + 1


SEQUENCE_KEYS = ("input_ids", "attention_mask")  # (batch, seq); every other tensor is (batch, seq - 1)


def crop_to_window(batch: dict[str, torch.Tensor], window: tuple[int, int]) -> dict[str, torch.Tensor]:
    """``batch`` cut to a :func:`scored_window`: ``input_ids`` and ``attention_mask`` keep columns
    ``:stop + 1`` (the tokens the window's positions read, causally; later columns are padding or
    unscored), every other (batch, seq - 1) tensor keeps ``start:stop``. Exact: a causal model's
    outputs at a position do not depend on later tokens."""
    start, stop = window
    return {key: value[:, :stop + 1] if key in SEQUENCE_KEYS else value[:, start:stop]
            for key, value in batch.items()}


def uncrop(windowed: torch.Tensor, window: tuple[int, int], width: int) -> torch.Tensor:
    """(batch, stop - start) -> (batch, width): the window's values in place, zeros elsewhere
    (positions outside it hold no action, so every consumer masks them)."""
    out = windowed.new_zeros((windowed.shape[0], width))
    out[:, window[0]:window[1]] = windowed
    return out


def causal_lm_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       temperature: float = 1.0, *, window: tuple[int, int] | None = None) -> torch.Tensor:
    """Logprob of each next token under a causal LM.

    input_ids, attention_mask (batch, seq) -> (batch, seq - 1): position ``i`` is the logprob of
    ``input_ids[:, i + 1]`` given ``input_ids[:, : i + 1]``. Pair it with an ``action_mask``
    (batch, seq - 1) that marks response tokens. Padding may be on either side: position ids come
    from the attention mask, so left-padded rows see the same positions as unpadded ones.

    With ``window=(start, stop)`` (:func:`scored_window`) only positions ``start..stop - 1`` are
    scored: the model reads ``input_ids[:, :stop + 1]`` and computes logits there alone
    (``logits_to_keep``); the result is (batch, stop - start), the same numbers as the full call's
    columns ``start:stop``.
    """
    if window is None:
        logits = _logits(model, input_ids, attention_mask)
        return token_logprobs(logits[:, :-1], input_ids[:, 1:], temperature)
    return token_logprobs(windowed_logits(model, input_ids, attention_mask, window),
                          input_ids[:, window[0] + 1:window[1] + 1], temperature)


def response_logprobs(model, batch: dict[str, torch.Tensor], temperature: float, *,
                      share_prompts: bool = False) -> torch.Tensor:
    """(batch, seq - 1) float32 logprobs on the CPU of a batch's response tokens (input_ids,
    attention_mask, action_mask), computed in its :func:`scored_window` only; zeros elsewhere (at
    every position outside ``action_mask``).
    ``share_prompts``: rows with the same prompt read it once (:mod:`rlhf.algorithms.shared_prompts`),
    when the model's attention allows it."""
    device = next(model.parameters()).device
    window = scored_window(batch["action_mask"])
    shared = None
    if share_prompts and can_share_prompts(model):
        shared = pack_shared_prompts(batch["input_ids"], batch["attention_mask"], batch["action_mask"], window)
    if shared is None:
        logprobs = causal_lm_logprobs(model, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                                      temperature, window=window)
    else:
        tokens = batch["input_ids"][:, window[0] + 1:window[1] + 1].to(device)
        logprobs = token_logprobs(shared_prompt_logits(model, shared.to(device)), tokens, temperature)
    logprobs = uncrop(logprobs.float().cpu(), window, batch["action_mask"].shape[1])
    return logprobs.masked_fill(~batch["action_mask"].bool(), 0.0)


def shared_prompt_logits(model, shared: SharedPrompts) -> torch.Tensor:
    """Next-token logits of a batch packed by prompt (:func:`pack_shared_prompts`), in the batch's
    layout: (batch, window, vocab), the numbers :func:`windowed_logits` gives. ``model`` may be a
    DeepSpeed engine."""
    module = getattr(model, "module", model)
    mask = shared.mask_for(module, next(module.parameters()).dtype)
    logits = model(input_ids=shared.input_ids, attention_mask=mask, position_ids=shared.position_ids,
                   logits_to_keep=shared.keep).logits
    return shared.unpack(logits)


def windowed_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    window: tuple[int, int]) -> torch.Tensor:
    """Next-token logits at positions ``start..stop - 1`` only: (batch, stop - start, vocab).
    ``input_ids`` may be the full batch or already cropped (:func:`crop_to_window`)."""
    start, stop = window
    # Positions as an index tensor, not a count: Hugging Face then gathers the hidden states into a
    # contiguous tensor. A count slices a strided view, and with frozen weights (the reference) torch's
    # matmul turns that into a batched product over a copy of the output embedding per row: the bf16
    # reference forward took twice as long.
    keep = torch.arange(start, stop + 1, device=input_ids.device)
    logits = _logits(model, input_ids[:, :stop + 1], attention_mask[:, :stop + 1], logits_to_keep=keep)
    return logits[:, :-1]


def _logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> torch.Tensor:
    """The model's logits, with position ids from the attention mask (padding on either side)."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs).logits


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
