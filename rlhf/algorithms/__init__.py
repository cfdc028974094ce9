"""Pure torch math for RLHF (no Ray): log-probabilities, and later KL, advantages and losses.

Tensors are ``(batch, seq)`` with an ``action_mask`` marking the response tokens.
"""

from rlhf.algorithms.logprobs import (
    causal_lm_logprobs, crop_to_window, logprob_diff, response_logprobs, scored_window, shared_prompt_logits,
    token_logprobs, uncrop, windowed_logits,
)
from rlhf.algorithms.shared_prompts import (
    SharedPrompts, attention_kernel, can_share_prompts, pack_shared_prompts, prompt_groups,
)

__all__ = ["causal_lm_logprobs", "crop_to_window", "logprob_diff", "response_logprobs", "scored_window",
           "shared_prompt_logits", "token_logprobs", "uncrop", "windowed_logits",
           "SharedPrompts", "attention_kernel", "can_share_prompts", "pack_shared_prompts", "prompt_groups"]

# PPO with a KL penalty: kl.py (KL estimators, controllers), rewards.py (scores -> token rewards),
# advantages.py (estimator registry, whitening), losses.py (the PPO loss), batching.py (epochs, micro-batches).
from rlhf.algorithms.advantages import (
    ADVANTAGE_ESTIMATORS, compute_advantages, gae, grpo, needs_critic, reinforce_plus_plus, rloo, whiten,
)
from rlhf.algorithms.batching import MicroBatch, mean_stats, micro_batches, ppo_schedule, token_loss_weight
from rlhf.algorithms.kl import AdaptiveKLController, FixedKLController, kl_estimate, make_kl_controller
from rlhf.algorithms.losses import (
    entropy_from_logits, kl_loss, masked_mean, policy_loss, ptx_loss, total_policy_loss, value_loss,
)
from rlhf.algorithms.rewards import (
    clip_scores, length_and_eos_penalty, normalize_scores, process_scores, shape_rewards,
)

__all__ += [
    "ADVANTAGE_ESTIMATORS", "compute_advantages", "gae", "grpo", "needs_critic",
    "reinforce_plus_plus", "rloo", "whiten",
    "MicroBatch", "mean_stats", "micro_batches", "ppo_schedule", "token_loss_weight",
    "AdaptiveKLController", "FixedKLController", "kl_estimate", "make_kl_controller",
    "entropy_from_logits", "kl_loss", "masked_mean", "policy_loss", "ptx_loss", "total_policy_loss",
    "value_loss",
    "clip_scores", "length_and_eos_penalty", "normalize_scores", "process_scores", "shape_rewards",
]
