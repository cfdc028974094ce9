"""The PPO losses: policy losses by name, their aggregation, clipped value loss, entropy, KL-in-loss,
PTX, and their sum.

A policy loss (``ppo.policy_loss``: ppo, gspo, cispo or a plugin's) gives per-token losses; the
aggregation (``ppo.loss_agg``: token_mean, seq_mean_token_mean, seq_mean_token_sum_norm) turns them
into one micro-batch's loss, a mean over its tokens or its responses. Across the micro-batches of an
optimiser step (and across ranks) the learners multiply each micro-batch's terms by ``token_weight``,
its share of the step's tokens (or responses, for the sequence aggregations)
(``rlhf.algorithms.batching.token_loss_weight``), so that the step's loss is that mean over the whole
step however the micro-batches are cut.

The policy's objective, as :func:`total_policy_loss` assembles it (minimised):

    loss = token_weight * ( pg_loss                          the policy loss, aggregated
                          + kl_coef * kl_loss   if kl_in_loss  (kl.mode: loss; in reward mode the KL
                                                               is in the rewards, hence the advantages)
                          - entropy_coef * entropy )         entropy bonus: higher entropy, lower loss
         + ptx_coef * ptx_loss                               LM loss on a pretraining/SFT micro-batch
                                                             (InstructGPT): a mean over micro-batches,
                                                             not weighted by the policy's tokens

The critic's loss is :func:`value_loss` alone (times the same ``token_weight``).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from rlhf.algorithms.kl import KLEstimator, kl_estimate
from rlhf.algorithms.registry import Registry

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


# --------------------------------------------------------------------------------------------------
# Loss aggregation: per-token losses (batch, seq) -> one micro-batch loss (ppo.loss_agg)
# --------------------------------------------------------------------------------------------------

# unit: what one micro-batch's loss is a mean over, "token" or "sequence"; the learners weigh each
# micro-batch by its share of its optimiser step's units (batching.token_loss_weight), so the step's
# loss is that mean over the whole step however the micro-batches are cut.
LOSS_AGGREGATIONS = Registry("loss aggregation", "ppo.loss_agg", defaults={"unit": "token"})
register_loss_aggregation = LOSS_AGGREGATIONS.register


@register_loss_aggregation("token_mean", unit="token")
def token_mean(losses: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """The mean over every response token of the batch: a long response weighs more than a short
    one (DAPO's token-level loss; what PPO implementations did before the sequence means)."""
    return masked_mean(losses, action_mask)


@register_loss_aggregation("seq_mean_token_mean", unit="sequence")
def seq_mean_token_mean(losses: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Each response's token mean, then the mean over responses (GRPO's paper, GSPO): every response
    weighs the same, so a token of a short response weighs more than one of a long response."""
    return masked_mean(losses, action_mask, dim=-1).mean()


@register_loss_aggregation("seq_mean_token_sum_norm", unit="sequence")
def seq_mean_token_sum_norm(losses: torch.Tensor, action_mask: torch.Tensor, length: int) -> torch.Tensor:
    """Each response's token sum divided by one constant ``length`` (``ppo.loss_agg_length``, default
    the rollout's max_new_tokens), then the mean over responses (Dr. GRPO, Liu et al., 2025): no
    per-response length normalisation, so long wrong answers are not penalised less per token."""
    valid = action_mask.bool()
    return torch.where(valid, losses, torch.zeros_like(losses)).sum(-1).div(length).mean()


def aggregate(losses: torch.Tensor, action_mask: torch.Tensor, how: str = "token_mean", *,
              length: int | None = None) -> torch.Tensor:
    """``losses`` (batch, seq) -> a scalar by the aggregation ``how``; ``length`` for those that take it."""
    fn = LOSS_AGGREGATIONS.get(how)
    if "length" in inspect.signature(fn).parameters:
        if not length or length <= 0:
            raise ValueError(f"loss aggregation {how!r} needs a length > 0 (ppo.loss_agg_length), got {length}")
        return fn(losses, action_mask, length)
    return fn(losses, action_mask)


# --------------------------------------------------------------------------------------------------
# Policy losses: per-token losses from logprobs and advantages (ppo.policy_loss)
# --------------------------------------------------------------------------------------------------

# Every entry takes logprobs (with grad), old_logprobs, advantages, action_mask (batch, seq) and any of
# clip_ratio_low, clip_ratio_high, dual_clip by name; it returns per-token losses (batch, seq) and
# statistics (floats). Padding may hold anything (-inf, NaN): entries see it zeroed (_valid_inputs).
POLICY_LOSSES = Registry("policy loss", "ppo.policy_loss")
register_policy_loss = POLICY_LOSSES.register


def _valid_inputs(logprobs, old_logprobs, advantages, action_mask):
    """Advantages and the clamped log ratio with padding zeroed, so that neither the loss nor the
    gradient (0 * inf = NaN) can see what padding holds."""
    if not (logprobs.shape == old_logprobs.shape == advantages.shape == action_mask.shape):
        raise ValueError(
            f"shapes differ: logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)}, "
            f"advantages {tuple(advantages.shape)}, action_mask {tuple(action_mask.shape)}"
        )
    valid = action_mask.bool()
    advantages = torch.where(valid, advantages.detach(), torch.zeros_like(advantages))
    log_ratio = torch.where(valid, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    return advantages, log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT)  # exp() and its gradient stay finite


def _ratio_stats(ratio: torch.Tensor, log_ratio: torch.Tensor, clipped: torch.Tensor,
                 action_mask: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        return {
            "clipfrac": float(masked_mean(clipped.float(), action_mask)),
            "approx_kl": float(masked_mean(ratio - 1.0 - log_ratio, action_mask)),
            "ratio_mean": float(masked_mean(ratio, action_mask)),
        }


@register_policy_loss("ppo")
def ppo_token_losses(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                     action_mask: torch.Tensor, clip_ratio_low: float, clip_ratio_high: float,
                     dual_clip: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO clipped surrogate (Schulman et al., 2017) per token, with asymmetric clipping (DAPO's
    "clip-higher", Yu et al., 2025) and optional dual clip (Ye et al., 2020):

        ratio = exp(clamp(logprobs - old_logprobs, -LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
        loss_t = max(-A_t * ratio, -A_t * clip(ratio, 1 - clip_ratio_low, 1 + clip_ratio_high))
        dual clip, only where A_t < 0:  loss_t = min(loss_t, -dual_clip * A_t)

    The dual clip (``dual_clip`` > 1) bounds the loss of a negative-advantage token whose ratio has
    grown large, where plain PPO's loss (and gradient) is unbounded. A token whose loss comes from a
    clipped branch has zero gradient, and so has one whose log ratio is beyond +-``LOG_RATIO_LIMIT``.

    stats: ``clipfrac`` (fraction of valid tokens where the clipped term is taken, i.e. no gradient),
    ``approx_kl`` (k3 estimate of KL(old || new): mean of ``ratio - 1 - log ratio``), ``ratio_mean``,
    and with dual clip ``dual_clipfrac``.
    """
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    advantages, log_ratio = _valid_inputs(logprobs, old_logprobs, advantages, action_mask)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    losses = torch.maximum(unclipped, clipped)
    stats = _ratio_stats(ratio, log_ratio, clipped > unclipped, action_mask)
    if dual_clip is not None:
        bound = -dual_clip * advantages
        dual_active = (advantages < 0) & (losses > bound)
        losses = torch.where(dual_active, bound, losses)
        stats["dual_clipfrac"] = float(masked_mean(dual_active.float(), action_mask))
    return losses, stats


@register_policy_loss("gspo")
def gspo_token_losses(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      action_mask: torch.Tensor, clip_ratio_low: float,
                      clip_ratio_high: float) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO (Zheng et al., 2025, "Group Sequence Policy Optimization"): one importance ratio per
    response, the geometric mean of its tokens' ratios (length-normalised), clipped per response:

        s_i = exp(mean_t(logprobs - old_logprobs))            over response i's tokens
        s_i,t = sg(s_i) * exp(logprobs_t - sg(logprobs_t))    equals s_i, with the gradient of s_i
        loss_i,t = max(-A_i * s_i,t, -A_i * clip(s_i,t, 1 - clip_ratio_low, 1 + clip_ratio_high))

    (the paper's GSPO-token form: with one advantage per response it is the sequence-level loss, and
    ``seq_mean_token_mean`` aggregation gives the paper's objective). The paper's clip ranges are
    tiny (3e-4, 4e-4), since a sequence ratio moves much less than a token's.
    stats: ``clipfrac`` (share of tokens in clipped responses), ``approx_kl``, ``ratio_mean`` (of s_i).
    """
    advantages, log_ratio = _valid_inputs(logprobs, old_logprobs, advantages, action_mask)
    sequence_log_ratio = masked_mean(log_ratio, action_mask, dim=-1)  # (batch,), with grad
    token_log_ratio = sequence_log_ratio.detach().unsqueeze(-1) + logprobs - logprobs.detach()
    token_log_ratio = torch.where(action_mask.bool(), token_log_ratio, torch.zeros_like(token_log_ratio))
    ratio = torch.exp(token_log_ratio.clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    sequence_ratio = sequence_log_ratio.detach().unsqueeze(-1).expand_as(ratio)
    stats = _ratio_stats(torch.exp(sequence_ratio), sequence_ratio, clipped > unclipped, action_mask)
    return torch.maximum(unclipped, clipped), stats


@register_policy_loss("cispo")
def cispo_token_losses(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                       action_mask: torch.Tensor, clip_ratio_low: float,
                       clip_ratio_high: float) -> tuple[torch.Tensor, dict[str, float]]:
    """CISPO (MiniMax, 2025, "MiniMax-M1"): clip the importance weight, not the update. Every token
    keeps a gradient, through its log-probability, weighted by a clipped, stop-gradient ratio:

        w_t = sg(clip(ratio_t, 1 - clip_ratio_low, 1 + clip_ratio_high))
        loss_t = -w_t * A_t * logprobs_t

    (PPO's clip drops the gradient of a clipped token entirely; CISPO keeps it, bounded.)
    stats: ``clipfrac`` (share of tokens whose weight was clipped), ``approx_kl``, ``ratio_mean``.
    """
    advantages, log_ratio = _valid_inputs(logprobs, old_logprobs, advantages, action_mask)
    ratio = torch.exp(log_ratio)
    weight = ratio.detach().clamp(1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    logprobs = torch.where(action_mask.bool(), logprobs, torch.zeros_like(logprobs))
    stats = _ratio_stats(ratio, log_ratio, weight != ratio.detach(), action_mask)
    return -weight * advantages * logprobs, stats


def truncated_importance_weights(learner_logprobs: torch.Tensor, engine_logprobs: torch.Tensor,
                                 action_mask: torch.Tensor, cap: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Truncated importance sampling of the engine-versus-learner mismatch (Yao et al., 2025, "Your
    Efficient RL Framework Secretly Brings You Off-Policy RL Training"): the rollout engine samples
    with its own numerics (bf16, other kernels, or weights one sync behind), so its policy is not quite
    the learner's. Each token's policy loss is weighted by

        w_t = min(exp(learner_logprobs_t - engine_logprobs_t), cap)     (no gradient)

    learner_logprobs: the learner's own logprobs of the sampled tokens before this batch's updates;
    engine_logprobs: the engine's; action_mask (batch, seq) -> weights (batch, seq), 0 on padding, and
    stats ``is_weight_mean`` (after the cap) and ``is_clipped_fraction`` (tokens whose weight the cap cut).
    """
    if cap <= 0:
        raise ValueError(f"the importance weight cap must be > 0, got {cap}")
    valid = action_mask.bool()
    log_ratio = torch.where(valid, learner_logprobs - engine_logprobs, torch.zeros_like(learner_logprobs))
    raw = torch.exp(log_ratio.detach().clamp(-LOG_RATIO_LIMIT, LOG_RATIO_LIMIT))
    weights = torch.where(valid, raw.clamp(max=cap), torch.zeros_like(raw))
    stats = {"is_weight_mean": float(masked_mean(weights, action_mask)),
             "is_clipped_fraction": float(masked_mean((raw > cap).float(), action_mask))}
    return weights, stats


def policy_token_losses(name: str, **inputs) -> tuple[torch.Tensor, dict[str, float]]:
    """Run policy loss ``name`` on the subset of ``inputs`` it takes (``Registry.call``)."""
    return POLICY_LOSSES.call(name, **inputs)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                action_mask: torch.Tensor, clip_ratio: float,
                dual_clip: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate with a symmetric clip range, as a token mean: :func:`ppo_token_losses`
    with ``clip_ratio_low = clip_ratio_high = clip_ratio``, then ``masked_mean``."""
    losses, stats = ppo_token_losses(logprobs, old_logprobs, advantages, action_mask, clip_ratio, clip_ratio, dual_clip)
    return masked_mean(losses, action_mask), stats


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
                      clip_ratio_low: float | None = None, clip_ratio_high: float | None = None,
                      policy_loss_name: str = "ppo", loss_agg: str = "token_mean", loss_agg_length: int | None = None,
                      kl_in_loss: bool = False, ref_logprobs: torch.Tensor | None = None,
                      kl_coef: float = 0.0, kl_estimator: KLEstimator = "k3",
                      entropy: torch.Tensor | None = None, entropy_coef: float = 0.0,
                      ptx: torch.Tensor | None = None, ptx_coef: float = 0.0,
                      importance_weights: torch.Tensor | None = None,
                      token_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The policy's whole loss for one micro-batch, assembled as in the module docstring.

    logprobs, old_logprobs, advantages, action_mask (batch, seq): as for :func:`ppo_token_losses`.
    policy_loss_name: the entry of :data:`POLICY_LOSSES`; clip_ratio_low / clip_ratio_high default to
    clip_ratio. loss_agg: the entry of :data:`LOSS_AGGREGATIONS` that turns the policy's, the KL's and
    the entropy's per-token values into the micro-batch's (``loss_agg_length`` for those that divide
    by a constant). kl_in_loss: add ``kl_coef`` times the aggregated KL estimate ``kl_estimator`` to
    the reference (needs ref_logprobs (batch, seq)). entropy (batch, seq): :func:`entropy_from_logits`
    of the policy's logits at the same positions (needed when entropy_coef > 0). ptx: a scalar
    :func:`ptx_loss` on a pretraining/SFT batch (needed when ptx_coef > 0). importance_weights
    (batch, seq): multiply the policy's per-token losses (:func:`truncated_importance_weights`).
    token_weight: multiplies the aggregated terms (policy, KL, entropy) but not the PTX term
    (``rlhf.algorithms.batching.token_loss_weight``; 1 for a lone micro-batch).

    Returns (scalar loss, stats) with stats named as the metrics are: ``loss/policy`` (the aggregated
    policy loss), ``loss/policy_total``, ``policy/clipfrac``, ``policy/approx_kl``,
    ``policy/ratio_mean`` (and the loss's own, such as ``policy/dual_clipfrac``), ``loss/kl`` and
    ``loss/ptx`` when their terms are on, ``policy/entropy`` whenever ``entropy`` is given. The
    stats are the micro-batch's own, before ``token_weight``.
    """
    def agg(values: torch.Tensor) -> torch.Tensor:
        return aggregate(values, action_mask, loss_agg, length=loss_agg_length)

    token_losses, pg_stats = policy_token_losses(
        policy_loss_name, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages,
        action_mask=action_mask, dual_clip=dual_clip,
        clip_ratio_low=clip_ratio if clip_ratio_low is None else clip_ratio_low,
        clip_ratio_high=clip_ratio if clip_ratio_high is None else clip_ratio_high,
    )
    if importance_weights is not None:
        token_losses = token_losses * importance_weights.detach()
    pg = agg(token_losses)
    stats = {"loss/policy": float(pg.detach())}
    stats.update({f"policy/{key}": value for key, value in pg_stats.items()})
    loss = pg
    if kl_in_loss:
        if ref_logprobs is None:
            raise ValueError("kl_in_loss needs ref_logprobs")
        kl = agg(kl_estimate(logprobs, ref_logprobs.detach(), kl_estimator, action_mask))
        loss = loss + kl_coef * kl
        stats["loss/kl"] = float(kl.detach())
    if entropy_coef > 0 and entropy is None:
        raise ValueError("entropy_coef > 0 needs entropy (batch, seq) from entropy_from_logits")
    if entropy is not None:  # logged whenever given; in the loss only with a coefficient
        mean_entropy = agg(entropy)
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
