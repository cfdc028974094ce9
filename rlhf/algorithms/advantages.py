"""Advantage estimators, registered by name (``ppo.advantage``), and masked whitening.

Every estimator returns ``(advantages, returns)``, both (batch, seq) and 0 where ``action_mask`` is 0:

    gae                   critic-based: GAE(gamma, lambda) on per-token rewards and the critic's values;
                          ``returns = advantages + values`` are the critic's regression targets.
    grpo                  each score normalised within its group (samples of the same prompt).
    dr_grpo               each score minus its group's mean, not divided by the group's std (Dr. GRPO).
    rloo                  each score minus the mean score of the other samples in its group.
    reinforce++           discounted return-to-go of per-token rewards, whitened over the batch.
    reinforce++_baseline  each score minus its group's mean, then whitened over the batch.

Critic-free estimators have no value targets; their ``returns`` are the un-normalised returns the
advantages came from (the score broadcast over the response for the group estimators, the return-to-go
for reinforce++), useful for logging only.

The group estimators see one score per response. So that they see the per-token KL penalty of
``kl.mode: reward``, PPO passes them ``scores = token_rewards.sum(-1)``: the summed penalty is part of
the outcome (as OpenRLHF's RLOO does). With ``kl.mode: loss`` (as GRPO's paper does) the KL is a loss
term instead.

A new estimator is one function: decorate it with ``@register_advantage("name", needs_critic=...,
needs_groups=...)`` and take any of the inputs PPO hands every estimator (``token_rewards``, ``values``,
``scores``, ``group_ids``, ``action_mask``, ``gamma``, ``lam``) by name. ``compute_advantages(name,
**inputs)`` passes it only those it takes. Whitening afterwards (``ppo.whiten_advantages``) applies to
the estimators registered with ``whiten_option=True`` (gae).
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from rlhf.algorithms.registry import Registry

AdvantageFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]

# needs_critic: uses a critic's values (PPO builds a critic only then); needs_groups: compares the
# samples of one prompt (rollout.sampling.n >= 2); whiten_option: ppo.whiten_advantages applies.
ADVANTAGES = Registry("advantage estimator", "ppo.advantage",
                      defaults={"needs_critic": False, "needs_groups": False, "whiten_option": False})
register_advantage = ADVANTAGES.register


def needs_critic(name: str) -> bool:
    """Whether estimator ``name`` uses a critic's values (only then does PPO build a critic)."""
    return ADVANTAGES.info(name)["needs_critic"]


def compute_advantages(name: str, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Run estimator ``name`` on the subset of ``inputs`` it accepts; returns (advantages, returns).

    Inputs no registered estimator accepts are an error (catches typos such as ``gama=``); a missing
    input the chosen estimator needs is an error naming it.
    """
    ADVANTAGES.check(name)
    known = {p for _, f in ADVANTAGES.items() for p in inspect.signature(f).parameters}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise TypeError(f"unknown advantage inputs {unknown}; known: {', '.join(sorted(known))}")
    return ADVANTAGES.call(name, **inputs)


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"expected equal (batch, seq) shapes, got {shapes}")


def _discounted_sum(values: torch.Tensor, action_mask: torch.Tensor, discount: float) -> torch.Tensor:
    """Reverse recursion ``out_t = values_t + discount * out_next`` over valid tokens only.

    values, action_mask (batch, seq) -> (batch, seq). ``out_next`` is the next *valid* position's
    value (0 past the last), so padding anywhere in a row is skipped as if absent; out is 0 there.
    """
    valid = action_mask.bool()
    out = torch.zeros_like(values)
    carry = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        current = values[:, t] + discount * carry
        carry = torch.where(valid[:, t], current, carry)
        out[:, t] = torch.where(valid[:, t], current, torch.zeros_like(current))
    return out


@register_advantage("gae", needs_critic=True, whiten_option=True)
def gae(token_rewards: torch.Tensor, values: torch.Tensor, action_mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al., 2016) over the response tokens.

    token_rewards, values, action_mask (batch, seq) -> advantages, returns (batch, seq):

        delta_t = r_t + gamma * V_next - V_t          (V_next = 0 after the last valid token)
        A_t     = delta_t + gamma * lam * A_next
        returns = A + V

    ``next`` means the next valid token: padding is skipped, and is 0 in both outputs.
    """
    _check_same_shape(token_rewards=token_rewards, values=values, action_mask=action_mask)
    valid = action_mask.bool()
    values = torch.where(valid, values, torch.zeros_like(values)).detach()
    rewards = torch.where(valid, token_rewards, torch.zeros_like(token_rewards))
    # V_next for each position: the value of the next valid token, 0 after the last one.
    next_values = torch.zeros_like(values)
    carry = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_values[:, t] = carry
        carry = torch.where(valid[:, t], values[:, t], carry)
    deltas = rewards + gamma * next_values - values
    advantages = _discounted_sum(deltas, action_mask, gamma * lam)
    returns = torch.where(valid, advantages + values, torch.zeros_like(values))
    return advantages, returns


def _group_sums(scores: torch.Tensor, group_ids: torch.Tensor,
                method: str) -> tuple[torch.Tensor, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Per-sample group sum and group size of ``scores``, and a function that sums any other (batch,)
    values over each sample's group the same way. scores, group_ids (batch,); sums in float64."""
    if scores.dim() != 1 or group_ids.shape != scores.shape:
        raise ValueError(
            f"expected scores and group_ids of shape (batch,), got {tuple(scores.shape)} and "
            f"{tuple(group_ids.shape)}"
        )
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    if bool((counts < 2).any()):
        raise ValueError(
            f"{method} needs at least 2 samples per group (prompt), but some groups have 1; "
            "sample several responses per prompt (rollout.sampling.n >= 2)"
        )

    def group_sum(values: torch.Tensor) -> torch.Tensor:
        totals = torch.zeros(len(counts), dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
        return totals[inverse]

    scores = scores.double()  # group sums in float64: the subtractions after them cancel a lot
    return group_sum(scores), counts[inverse].to(scores.dtype), group_sum


def _broadcast(per_sample: torch.Tensor, action_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch,) -> (batch, seq): the value on every valid token, 0 on padding."""
    per_token = per_sample.to(dtype).unsqueeze(-1).expand(action_mask.shape)
    return torch.where(action_mask.bool(), per_token, torch.zeros_like(per_token))


@register_advantage("grpo", needs_groups=True)
def grpo(scores: torch.Tensor, group_ids: torch.Tensor, action_mask: torch.Tensor,
         eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO outcome advantage (Shao et al., 2024): the score normalised within its group.

    scores (batch,), group_ids (batch,) (equal ids = samples of one prompt), action_mask (batch, seq)
    -> advantages (batch, seq) ``(score - group mean) / (group std + eps)`` on every response token,
    returns (batch, seq) the raw score on every response token. The std is the sample std (n - 1),
    as TRL and veRL compute it, in two passes: ``sqrt(sum((score - mean)^2) / (n - 1))``. Groups of
    one sample are an error.
    """
    sums, counts, group_sum = _group_sums(scores, group_ids, "grpo")
    # Two passes, mean first: the one-pass sum(x^2) - n * mean^2 cancels catastrophically when the
    # scores are large next to their spread (1e8 + [0, 1, 2, 3] in float64 lost a fifth of the std).
    deviations = scores.double() - sums / counts
    std = (group_sum(deviations.square()) / (counts - 1)).sqrt()
    advantages = deviations / (std + eps)
    dtype = torch.promote_types(scores.dtype, torch.float32)
    return _broadcast(advantages, action_mask, dtype), _broadcast(scores, action_mask, dtype)


@register_advantage("rloo", needs_groups=True)
def rloo(scores: torch.Tensor, group_ids: torch.Tensor,
         action_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE leave-one-out (Ahmadian et al., 2024): baseline = mean score of the group's others.

    scores (batch,), group_ids (batch,), action_mask (batch, seq) -> advantages (batch, seq)
    ``score_i - (group sum - score_i) / (group size - 1)`` on every response token, returns (batch, seq)
    the raw score on every response token. Groups of one sample (no "others") are an error.
    """
    sums, counts, _ = _group_sums(scores, group_ids, "rloo")
    baseline = (sums - scores.double()) / (counts - 1)
    advantages = scores.double() - baseline
    dtype = torch.promote_types(scores.dtype, torch.float32)
    return _broadcast(advantages, action_mask, dtype), _broadcast(scores, action_mask, dtype)


@register_advantage("dr_grpo", needs_groups=True)
def dr_grpo(scores: torch.Tensor, group_ids: torch.Tensor,
            action_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dr. GRPO's advantage (Liu et al., 2025, "Understanding R1-Zero-Like Training: A Critical
    Perspective"): the score minus its group's mean, *not* divided by the group's std, which weighs
    prompts whose samples barely differ (too easy or too hard) as much as the rest.

    scores (batch,), group_ids (batch,), action_mask (batch, seq) -> advantages (batch, seq)
    ``score - group mean`` on every response token, returns (batch, seq) the raw score. The paper's
    other half, a sequence sum divided by a constant instead of each response's own length, is the loss
    aggregation ``ppo.loss_agg: seq_mean_token_sum_norm``.
    """
    sums, counts, _ = _group_sums(scores, group_ids, "dr_grpo")
    advantages = scores.double() - sums / counts
    dtype = torch.promote_types(scores.dtype, torch.float32)
    return _broadcast(advantages, action_mask, dtype), _broadcast(scores, action_mask, dtype)


@register_advantage("reinforce++_baseline", needs_groups=True)
def reinforce_plus_plus_baseline(scores: torch.Tensor, group_ids: torch.Tensor,
                                 action_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++-baseline (Hu et al., 2025, "REINFORCE++: Stabilizing Critic-Free Policy
    Optimization"): the score minus its group's mean (the baseline), broadcast over the response, then
    whitened over all valid tokens of the batch (global, not per-group, normalisation).

    scores (batch,), group_ids (batch,), action_mask (batch, seq) -> advantages (batch, seq)
    ``whiten(score - group mean)``, returns (batch, seq) the raw score on every response token.
    """
    sums, counts, _ = _group_sums(scores, group_ids, "reinforce++_baseline")
    dtype = torch.promote_types(scores.dtype, torch.float32)
    centred = _broadcast(scores.double() - sums / counts, action_mask, dtype)
    return whiten(centred, action_mask), _broadcast(scores, action_mask, dtype)


@register_advantage("reinforce++")
def reinforce_plus_plus(token_rewards: torch.Tensor, action_mask: torch.Tensor,
                        gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu, 2025): discounted return-to-go, whitened over all valid tokens of the batch.

    token_rewards, action_mask (batch, seq) -> advantages (batch, seq) = whiten(G),
    returns (batch, seq) = G, where ``G_t = r_t + gamma * G_next`` over valid tokens.
    """
    _check_same_shape(token_rewards=token_rewards, action_mask=action_mask)
    returns = _discounted_sum(token_rewards, action_mask, gamma)
    return whiten(returns, action_mask), returns


def uniform_groups(scores: list[float], n: int, tolerance: float = 1e-9) -> list[bool]:
    """For scores of consecutive groups of ``n`` samples (prompt-major), whether each group's scores
    are all equal (within ``tolerance``): under a group baseline such a group has zero advantage and
    teaches nothing (DAPO's dynamic sampling drops it). A partial last group is an error."""
    if n < 1 or len(scores) % n:
        raise ValueError(f"{len(scores)} scores do not make groups of {n}")
    return [max(scores[i:i + n]) - min(scores[i:i + n]) <= tolerance for i in range(0, len(scores), n)]


def whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
           eps: float = 1e-8) -> torch.Tensor:
    """Normalise ``values`` to mean 0, variance 1 over the positions where ``mask`` is 1.

    values, mask (batch, seq) -> (batch, seq), 0 where ``mask`` is 0. Mean and variance use only valid
    positions; the variance is the sample variance (n - 1; a single valid value gives 0):

        out = (values - mean) / sqrt(var + eps)       (+ mean again when shift_mean=False)
    """
    _check_same_shape(values=values, mask=mask)
    valid = mask.bool()
    count = valid.sum()
    if int(count) == 0:
        raise ValueError("whiten: mask has no valid position")
    zeros = torch.zeros_like(values)
    mean = torch.where(valid, values, zeros).sum() / count
    centred = torch.where(valid, values - mean, zeros)
    var = centred.square().sum() / (count - 1).clamp(min=1)
    out = centred * torch.rsqrt(var + eps)
    if not shift_mean:
        out = torch.where(valid, out + mean, zeros)
    return out
