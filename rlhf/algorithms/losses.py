"""The PPO losses: clipped policy loss, clipped value loss, entropy, KL-in-loss, PTX, and their sum.

Each loss is a token mean over the valid response tokens of one micro-batch (``masked_mean`` over
the whole (batch, seq) tensor), so within a micro-batch every response token weighs the same. Across
the micro-batches of an optimiser step (and across ranks) the learners multiply each micro-batch's
per-token terms by ``token_weight``, its share of the step's response tokens
(``rlhf.algorithms.batching.token_loss_weight``), so that every token of the step weighs the same
however the micro-batches are cut.

The policy's objective, as :func:`total_policy_loss` assembles it (minimised):

    loss = token_weight * ( pg_loss                          PPO clipped surrogate (+ dual clip)
                          + kl_coef * kl_loss   if kl_in_loss  (kl.mode: loss; in reward mode the KL
                                                               is in the rewards, hence the advantages)
                          - entropy_coef * entropy )         entropy bonus: higher entropy, lower loss
         + ptx_coef * ptx_loss                               LM loss on a pretraining/SFT micro-batch
                                                             (InstructGPT): a mean over micro-batches,
                                                             not weighted by the policy's tokens

The critic's loss is :func:`value_loss` alone (times the same ``token_weight``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf.algorithms.kl import KLEstimator, kl_estimate

IGNORE_INDEX = -100  # label of tokens without loss, PyTorch's default ignore_index (as in rlhf.data)

# exp(log ratio) overflows float32 past ~88 nats, and then even a token in the clipped branch gets a NaN
# gradient (0 * inf in the backward of exp). Past 20 nats (a ratio of 5e8, as OpenRLHF and veRL clamp)
# the token is far outside any clip range, so the exact ratio no longer matters, only that it is finite.
LOG_RATIO_LIMIT = 20.0


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1.

    values, mask (batch, seq). dim=None: a scalar over all valid positions; dim=d: the mean along d
    (e.g. dim=-1 -> (batch,)). Positions with mask 0 never contribute, whatever they hold (inf, NaN);
    a slice with no valid position gives 0.
    """
    valid = mask.bool()
    total = torch.where(valid, values, torch.zeros_like(values))
    if dim is None:
        return total.sum() / valid.sum().clamp(min=1)
    return total.sum(dim) / valid.sum(dim).clamp(min=1)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                action_mask: torch.Tensor, clip_ratio: float,
                dual_clip: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate loss (Schulman et al., 2017), with optional dual clip (Ye et al., 2020).

    logprobs (batch, seq) under the policy being trained (with grad), old_logprobs (batch, seq) under
    the policy that sampled, advantages (batch, seq), action_mask (batch, seq) -> (scalar loss, stats):

        ratio = exp(clamp(logprobs - old_logprobs, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        loss_t = max(-A_t * ratio, -A_t * clip(ratio, 1 - clip_ratio, 1 + clip_ratio))
        dual clip, only where A_t < 0:  loss_t = min(loss_t, -dual_clip * A_t)
        loss = masked_mean(loss_t)

    The dual clip (``dual_clip`` > 1) bounds the loss of a negative-advantage token whose ratio has
    grown large, where plain PPO's loss (and gradient) is unbounded. A token whose loss comes from a
    clipped branch has zero gradient, and so has one whose log ratio is beyond +-``LOG_RATIO_LIMIT``.

    stats: ``clipfrac`` (fraction of valid tokens where the clipped term is taken, i.e. no gradient),
    ``approx_kl`` (k3 estimate of KL(old || new): mean of ``ratio - 1 - log ratio``), ``ratio_mean``,
    and with dual clip ``dual_clipfrac``.
    """
    if not (logprobs.shape == old_logprobs.shape == advantages.shape == action_mask.shape):
        raise ValueError(
            f"shapes differ: logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)}, "
            f"advantages {tuple(advantages.shape)}, action_mask {tuple(action_mask.shape)}"
        )
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    # Padding may hold anything (-inf old logprobs, NaN advantages); zero it before exp() so that
    # neither the loss nor the gradient (0 * inf = NaN) can see it.
    valid = action_mask.bool()
    advantages = torch.where(valid, advantages.detach(), torch.zeros_like(advantages))
    log_ratio = torch.where(valid, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    log_ratio = log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)  # exp() stays finite, so does its gradient
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio)
    losses = torch.maximum(unclipped, clipped)
    stats_dual = None
    if dual_clip is not None:
        bound = -dual_clip * advantages
        dual_active = (advantages < 0) & (losses > bound)
        losses = torch.where(dual_active, bound, losses)
        stats_dual = dual_active
    loss = masked_mean(losses, action_mask)

    with torch.no_grad():
        stats = {
            "clipfrac": float(masked_mean((clipped > unclipped).float(), action_mask)),
            "approx_kl": float(masked_mean(ratio - 1.0 - log_ratio, action_mask)),
            "ratio_mean": float(masked_mean(ratio, action_mask)),
        }
        if stats_dual is not None:
            stats["dual_clipfrac"] = float(masked_mean(stats_dual.float(), action_mask))
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               action_mask: torch.Tensor, value_clip: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss (as in PPO2 / OpenAI baselines).

    values (batch, seq) from the critic being trained (with grad), old_values (batch, seq) the critic's
    values when the experience was made, returns (batch, seq) targets, action_mask (batch, seq)
    -> (scalar loss, stats):

        values_clipped = old_values + clip(values - old_values, -value_clip, value_clip)
        loss = 0.5 * masked_mean(max((values - returns)^2, (values_clipped - returns)^2))

    stats: ``clipfrac`` (fraction of valid tokens where the clipped error is the larger),
    ``values_mean``.
    """
    if not (values.shape == old_values.shape == returns.shape == action_mask.shape):
        raise ValueError(
            f"shapes differ: values {tuple(values.shape)}, old_values {tuple(old_values.shape)}, "
            f"returns {tuple(returns.shape)}, action_mask {tuple(action_mask.shape)}"
        )
    # Zero the padding first: a NaN there would reach the gradient through the square (0 * NaN).
    valid = action_mask.bool()
    zeros = torch.zeros_like(values)
    values = torch.where(valid, values, zeros)
    old_values = torch.where(valid, old_values.detach(), zeros)
    returns = torch.where(valid, returns.detach(), zeros)
    values_clipped = old_values + (values - old_values).clamp(-value_clip, value_clip)
    error = (values - returns).square()
    error_clipped = (values_clipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(error, error_clipped), action_mask)
    with torch.no_grad():
        stats = {
            "clipfrac": float(masked_mean((error_clipped > error).float(), action_mask)),
            "values_mean": float(masked_mean(values, action_mask)),
        }
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax distribution at each position, in nats, computed in float32 (or more).

    logits (batch, seq, vocab) -> (batch, seq): ``logsumexp(z) - sum(softmax(z) * z)``. Differentiable,
    for the entropy bonus. Pair with the logits that produced ``logprobs`` (for a causal LM,
    ``logits[:, :-1]``).
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def ptx_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Language-modelling loss on a pretraining/SFT batch (the PTX term of InstructGPT).

    logits (batch, seq, vocab) from the policy on ``input_ids``, labels (batch, seq) = ``input_ids``
    with -100 on tokens without loss (the layout rlhf.data builds) -> scalar: the mean next-token
    cross-entropy (position t predicts labels[t + 1]) over labelled tokens; 0 when none is labelled.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    predicted = logits[:, :-1].float()
    targets = labels[:, 1:]
    total = F.cross_entropy(predicted.reshape(-1, predicted.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, action_mask: torch.Tensor,
            estimator: KLEstimator = "k3") -> torch.Tensor:
    """KL to the reference as a loss term (``kl.mode: loss``), before multiplying by ``kl_coef``.

    logprobs (batch, seq) with grad, ref_logprobs (batch, seq), action_mask (batch, seq) -> scalar
    ``masked_mean(kl_estimate(logprobs, ref_logprobs, estimator))``. Prefer k3 (GRPO) or k2: the k1
    term's gradient is ``grad log p``, zero in expectation.
    """
    return masked_mean(kl_estimate(logprobs, ref_logprobs.detach(), estimator, action_mask), action_mask)


def total_policy_loss(*, logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      action_mask: torch.Tensor, clip_ratio: float, dual_clip: float | None = None,
                      kl_in_loss: bool = False, ref_logprobs: torch.Tensor | None = None,
                      kl_coef: float = 0.0, kl_estimator: KLEstimator = "k3",
                      entropy: torch.Tensor | None = None, entropy_coef: float = 0.0,
                      ptx: torch.Tensor | None = None, ptx_coef: float = 0.0,
                      token_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy's whole loss for one micro-batch, assembled as in the module docstring.

    logprobs, old_logprobs, advantages, action_mask (batch, seq): as for :func:`policy_loss`.
    kl_in_loss: add ``kl_coef * kl_loss(logprobs, ref_logprobs, action_mask, kl_estimator)``
    (needs ref_logprobs (batch, seq)). entropy (batch, seq): :func:`entropy_from_logits` of the
    policy's logits at the same positions (needed when entropy_coef > 0). ptx: a scalar
    :func:`ptx_loss` on a pretraining/SFT batch (needed when ptx_coef > 0). token_weight: multiplies
    the per-token terms (policy, KL, entropy) but not the PTX term
    (``rlhf.algorithms.batching.token_loss_weight``; 1 for a lone micro-batch).

    Returns (scalar loss, stats) with stats named as the metrics are: ``loss/policy`` (the clipped
    surrogate), ``loss/policy_total``, ``policy/clipfrac``, ``policy/approx_kl``,
    ``policy/ratio_mean`` (``policy/dual_clipfrac``), ``loss/kl`` and ``loss/ptx`` when
    their terms are on, ``policy/entropy`` whenever ``entropy`` is given. The stats are the
    micro-batch's own means, before ``token_weight``.
    """
    pg, pg_stats = policy_loss(logprobs, old_logprobs, advantages, action_mask, clip_ratio, dual_clip)
    stats = {"loss/policy": float(pg.detach())}
    stats.update({f"policy/{key}": value for key, value in pg_stats.items()})
    loss = pg
    if kl_in_loss:
        if ref_logprobs is None:
            raise ValueError("kl_in_loss needs ref_logprobs")
        kl = kl_loss(logprobs, ref_logprobs, action_mask, kl_estimator)
        loss = loss + kl_coef * kl
        stats["loss/kl"] = float(kl.detach())
    if entropy_coef > 0 and entropy is None:
        raise ValueError("entropy_coef > 0 needs entropy (batch, seq) from entropy_from_logits")
    if entropy is not None:  # logged whenever given; in the loss only with a coefficient
        mean_entropy = masked_mean(entropy, action_mask)
        if entropy_coef > 0:
            loss = loss - entropy_coef * mean_entropy
        stats["policy/entropy"] = float(mean_entropy.detach())
    total = loss
    loss = token_weight * loss
    if ptx_coef > 0:
        if ptx is None:
            raise ValueError("ptx_coef > 0 needs ptx, the ptx_loss of a pretraining/SFT batch")
        # The PTX micro-batch is its own token mean: it weighs the same in every policy micro-batch.
        loss = loss + ptx_coef * ptx
        total = total + ptx_coef * ptx
        stats["loss/ptx"] = float(ptx.detach())
    stats["loss/policy_total"] = float(total.detach())
    return loss, stats
