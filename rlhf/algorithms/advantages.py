"""Advantage estimators behind a small registry, and masked whitening.

Every estimator returns ``(advantages, returns)``, both (batch, seq) and 0 where ``action_mask`` is 0:

    gae           critic-based: GAE(gamma, lambda) on per-token rewards and the critic's values;
                  ``returns = advantages + values`` are the critic's regression targets.
    grpo          critic-free: each score normalised within its group (samples of the same prompt).
    rloo          critic-free: each score minus the mean score of the other samples in its group.
    reinforce++   critic-free: discounted return-to-go of per-token rewards, whitened over the batch.

Critic-free estimators have no value targets; their ``returns`` are the un-normalised returns the
advantages came from (the score broadcast over the response for grpo/rloo, the return-to-go for
reinforce++), useful for logging only.

grpo and rloo see one score per response. So that they see the per-token KL penalty of ``kl.mode:
reward``, PPO passes them ``scores = token_rewards.sum(-1)``: the summed penalty is part of the outcome
(as OpenRLHF's RLOO does). With ``kl.mode: loss`` (as GRPO's paper does) the KL is a loss term instead.

``compute_advantages(name, **inputs)`` calls an estimator by name and passes it only the inputs it
takes, so a caller can hand every estimator the same inputs. Whitening afterwards
(``ppo.whiten_advantages``) is the caller's choice: :func:`whiten`.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch

AdvantageFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {}
_NEEDS_CRITIC: set[str] = set()


def register(name: str, *, needs_critic: bool = False) -> Callable[[AdvantageFn], AdvantageFn]:
    """Decorator: add an estimator to :data:`ADVANTAGE_ESTIMATORS` under ``name``."""

    def add(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = fn
        if needs_critic:
            _NEEDS_CRITIC.add(name)
        return fn

    return add


def _lookup(name: str) -> AdvantageFn:
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {name!r}; valid: {', '.join(sorted(ADVANTAGE_ESTIMATORS))}"
        )
    return ADVANTAGE_ESTIMATORS[name]


def needs_critic(name: str) -> bool:
    """Whether estimator ``name`` uses a critic's values (only then does PPO build a critic)."""
    _lookup(name)
    return name in _NEEDS_CRITIC


def compute_advantages(name: str, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Run estimator ``name`` on the subset of ``inputs`` it accepts; returns (advantages, returns).

    Inputs no registered estimator accepts are an error (catches typos such as ``gama=``); a missing
    input the chosen estimator needs is an error naming it.
    """
    fn = _lookup(name)
    known = {p for f in ADVANTAGE_ESTIMATORS.values() for p in inspect.signature(f).parameters}
    unknown = sorted(set(inputs) - known)
    if unknown:
        raise TypeError(f"unknown advantage inputs {unknown}; known: {', '.join(sorted(known))}")
    params = inspect.signature(fn).parameters
    missing = [p.name for p in params.values() if p.default is p.empty and p.name not in inputs]
    if missing:
        raise TypeError(f"advantage estimator {name!r} needs {', '.join(missing)}")
    return fn(**{k: v for k, v in inputs.items() if k in params})


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


@register("gae", needs_critic=True)
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


@register("grpo")
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


@register("rloo")
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


@register("reinforce++")
def reinforce_plus_plus(token_rewards: torch.Tensor, action_mask: torch.Tensor,
                        gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ (Hu, 2025): discounted return-to-go, whitened over all valid tokens of the batch.

    token_rewards, action_mask (batch, seq) -> advantages (batch, seq) = whiten(G),
    returns (batch, seq) = G, where ``G_t = r_t + gamma * G_next`` over valid tokens.
    """
    _check_same_shape(token_rewards=token_rewards, action_mask=action_mask)
    returns = _discounted_sum(token_rewards, action_mask, gamma)
    return whiten(returns, action_mask), returns


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
