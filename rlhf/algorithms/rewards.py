"""From one scalar score per response to per-token rewards.

The reward model (or reward function) gives one score per response. :func:`process_scores` turns raw
scores into the scores PPO uses, in this order:

    normalise (reward model's stored mean/std)  ->  clip to [-clip, clip]  ->  length / EOS penalties
    ->  overlong penalty (DAPO's soft band below the length limit)

Normalising and clipping act on the reward model's scale; the penalties come last, in the units the
user chose, so clipping never erases them (a truncated response at the clip limit is still penalised).

:func:`shape_rewards` then places each score on its response's last token and, when the KL penalty is
in the reward (``kl.mode: reward``, the default), subtracts ``kl_coef * kl`` on every response token.
"""

from __future__ import annotations

import torch

from rlhf.config import RewardConfig


def last_token_index(action_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last token where ``action_mask`` is 1.

    action_mask (batch, seq) -> (batch,) long. Raises ValueError if a row has no response token, since
    that response's score would have nowhere to go.
    """
    valid = action_mask.bool()
    empty = ~valid.any(dim=-1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} of action_mask have no response token to carry the score")
    seq = action_mask.shape[-1]
    # argmax returns the first maximum: on the flipped mask that is the last 1.
    return seq - 1 - valid.flip(-1).long().argmax(dim=-1)


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, action_mask: torch.Tensor, kl_coef: float,
                  *, kl_in_reward: bool = True) -> torch.Tensor:
    """Per-token rewards: the score on each response's last valid token, minus the KL penalty.

    scores (batch,), kl (batch, seq) per-token KL estimate, action_mask (batch, seq) -> (batch, seq):

        token_rewards[b, t] = scores[b] * [t == last valid t of b] - kl_coef * kl[b, t] * kl_in_reward

    and 0 wherever ``action_mask`` is 0. With ``kl_in_reward=False`` (KL as a loss term) only the
    score remains.
    """
    if kl.shape != action_mask.shape or scores.shape != kl.shape[:1]:
        raise ValueError(
            f"expected scores (batch,), kl and action_mask (batch, seq); got scores {tuple(scores.shape)}, "
            f"kl {tuple(kl.shape)}, action_mask {tuple(action_mask.shape)}"
        )
    valid = action_mask.bool()
    rewards = torch.zeros(kl.shape, dtype=torch.promote_types(kl.dtype, scores.dtype), device=kl.device)
    if kl_in_reward:
        rewards = torch.where(valid, -kl_coef * kl, rewards)
    rows = torch.arange(kl.shape[0], device=kl.device)
    rewards[rows, last_token_index(action_mask)] += scores.to(rewards.dtype)
    return rewards


def normalize_scores(scores: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``(scores - mean) / std``; scores (batch,) -> (batch,). ``std`` must be positive."""
    if not std > 0:
        raise ValueError(f"reward normalisation needs a positive std, got {std}")
    return (scores - mean) / std


def clip_scores(scores: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Scores clamped to ``[-clip, clip]``; ``clip=None`` returns them unchanged. (batch,) -> (batch,)."""
    if clip is None:
        return scores
    if clip <= 0:
        raise ValueError(f"reward clip must be > 0, got {clip}")
    return scores.clamp(-clip, clip)


def length_and_eos_penalty(scores: torch.Tensor, response_lengths: torch.Tensor,
                           ended_with_eos: torch.Tensor, length_penalty: float,
                           eos_penalty: float) -> torch.Tensor:
    """Add ``length_penalty`` per response token and ``eos_penalty`` to responses cut off without EOS.

    scores (batch,), response_lengths (batch,) token counts, ended_with_eos (batch,) bool -> (batch,):

        scores + length_penalty * response_lengths + eos_penalty * (not ended_with_eos)

    Both are added, so a penalty is a negative number (e.g. ``eos_penalty: -1.0``).
    """
    truncated = (~ended_with_eos.bool()).to(scores.dtype)
    return scores + length_penalty * response_lengths.to(scores.dtype) + eos_penalty * truncated


def overlong_penalty(response_lengths: torch.Tensor, max_length: int, buffer: int, penalty: float) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al., 2025): nothing up to ``max_length - buffer`` tokens,
    then a penalty growing linearly to ``-penalty`` at ``max_length`` (and no more beyond):

        out = -penalty * clamp((length - (max_length - buffer)) / buffer, 0, 1)

    response_lengths (batch,) -> (batch,). A reply cut at the limit is penalised fully; one that ends
    just before it only a little, so the policy learns to finish in time without a cliff."""
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong buffer must be in 1..{max_length} (the length limit), got {buffer}")
    over = (response_lengths.to(torch.float32) - (max_length - buffer)) / buffer
    return -penalty * over.clamp(0.0, 1.0)


def process_scores(scores: torch.Tensor, config: RewardConfig, *, response_lengths: torch.Tensor,
                   ended_with_eos: torch.Tensor, mean: float | None = None,
                   std: float | None = None, max_length: int | None = None) -> torch.Tensor:
    """Raw scores (batch,) -> the scores PPO uses (batch,), as ``config`` asks (see module docstring).

    Normalises only when ``config.normalize`` is set and ``mean``/``std`` are given (a reward model
    stores them; reward functions and URLs have none). ``max_length``: the responses' length limit
    (max_new_tokens), which ``config.overlong_buffer`` needs.
    """
    if config.normalize and mean is not None and std is not None:
        scores = normalize_scores(scores, mean, std)
    scores = clip_scores(scores, config.clip)
    scores = length_and_eos_penalty(scores, response_lengths, ended_with_eos,
                                    config.length_penalty, config.eos_penalty)
    if config.overlong_buffer:
        if max_length is None:
            raise ValueError("reward.overlong_buffer needs the responses' length limit (max_length)")
        scores = scores + overlong_penalty(response_lengths, max_length, config.overlong_buffer,
                                           config.overlong_penalty).to(scores.dtype)
    return scores
