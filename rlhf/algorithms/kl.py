"""KL between the policy and the frozen reference model: per-token estimators and the coefficient.

Per-token estimators (Schulman, "Approximating KL Divergence", 2020), with tokens sampled from the
policy and ``log_ratio = logprobs - ref_logprobs`` (policy over reference):

    k1 = log_ratio                                 unbiased, high variance, can be negative
    k2 = 0.5 * log_ratio ** 2                      biased, low variance, never negative
    k3 = exp(-log_ratio) - 1 + log_ratio           unbiased, low variance, never negative

The coefficient that multiplies the KL is either fixed or adaptive (Ziegler et al., 2019, "Fine-Tuning
Language Models from Human Preferences"): the adaptive controller nudges it so the measured KL tracks a
target. Controllers hold one float, so their state is checkpointed as JSON.
"""

from __future__ import annotations

import warnings
import torch

from rlhf.config import KLConfig

from rlhf.algorithms.registry import Registry

KLEstimator = str  # a name in KL_ESTIMATORS
# Each entry maps log_ratio = logprobs - ref_logprobs (batch, seq) to the per-token estimate (batch, seq).
KL_ESTIMATORS = Registry("KL estimator", "ppo.kl.estimator")
register_kl_estimator = KL_ESTIMATORS.register

# exp(-log_ratio) in k3 overflows float16/bfloat16 and float32 far out; beyond |20| nats the policy
# and reference disagree so much that the exact penalty no longer matters, only that it is finite.
_K3_LOG_RATIO_LIMIT = 20.0


@register_kl_estimator("k1")
def k1(log_ratio: torch.Tensor) -> torch.Tensor:
    """``log_ratio``: unbiased, high variance, can be negative."""
    return log_ratio


@register_kl_estimator("k2")
def k2(log_ratio: torch.Tensor) -> torch.Tensor:
    """``0.5 * log_ratio ** 2``: biased, low variance, never negative."""
    return 0.5 * log_ratio.square()


@register_kl_estimator("k3")
def k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """``exp(-log_ratio) - 1 + log_ratio``: unbiased, low variance, never negative. The log ratio is
    clamped to [-20, 20] first, so the exponential stays finite."""
    log_ratio = log_ratio.clamp(-_K3_LOG_RATIO_LIMIT, _K3_LOG_RATIO_LIMIT)
    return torch.exp(-log_ratio) - 1.0 + log_ratio


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: KLEstimator = "k1",
                action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate.

    logprobs, ref_logprobs (batch, seq): logprobs of the sampled tokens under the policy and the
    reference. action_mask (batch, seq), optional: where it is 0 the result is exactly 0 (whatever the
    inputs hold there, even inf or NaN). Returns (batch, seq).

    k3 clamps ``log_ratio`` to [-20, 20] before exponentiating so it stays finite.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ in shape"
        )
    log_ratio = logprobs - ref_logprobs
    if action_mask is not None:
        # where(), not multiply: padding may hold inf or NaN, and 0 * inf is NaN (in the gradient too).
        log_ratio = torch.where(action_mask.bool(), log_ratio, torch.zeros_like(log_ratio))
    kl = KL_ESTIMATORS.get(estimator)(log_ratio)
    if action_mask is not None:
        kl = torch.where(action_mask.bool(), kl, torch.zeros_like(kl))
    return kl


class FixedKLController:
    """A constant KL coefficient. ``update`` does nothing; present so both controllers are used alike."""

    def __init__(self, coef: float) -> None:
        if coef < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Returns the (unchanged) coefficient."""
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al.'s adaptive KL coefficient.

    After each iteration with measured KL ``current_kl`` over ``n_steps`` samples:

        error = clip(current_kl / target - 1, -0.2, 0.2)
        value = value * (1 + error * n_steps / horizon)

    so the coefficient grows while KL is above ``target`` and shrinks while below, at most 20% of
    ``n_steps / horizon`` per update.
    """

    ERROR_CLIP = 0.2

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        if init_coef < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {init_coef}")
        if target <= 0:
            raise ValueError(f"adaptive KL target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"adaptive KL horizon must be > 0, got {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move the coefficient towards keeping KL at ``target``; returns the new coefficient.

        current_kl: the iteration's mean KL (a float, e.g. summed over tokens and averaged over
        sequences). n_steps: how many samples that KL was measured on (the rollout batch size).
        """
        error = min(max(float(current_kl) / self.target - 1.0, -self.ERROR_CLIP), self.ERROR_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        # target and horizon come from the config on resume; only the moving value is state.
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


KLController = FixedKLController | AdaptiveKLController


def make_kl_controller(config: KLConfig) -> KLController:
    """The controller ``config`` asks for: adaptive (coef, target, horizon) or fixed (coef).

    Warns when KL is a loss term estimated with k1: the gradient of k1 on samples from the policy is
    ``grad log p``, whose expectation is zero, so such a term does not pull towards the reference.
    """
    if config.mode == "loss" and config.estimator == "k1":
        warnings.warn(
            "kl.mode=loss with kl.estimator=k1: the k1 loss has zero expected gradient and does not "
            "regularise towards the reference; use k2 or k3 in loss mode",
            stacklevel=2,
        )
    if config.adaptive:
        return AdaptiveKLController(config.coef, config.target, config.horizon)
    return FixedKLController(config.coef)
