"""Pure torch math for RLHF (no Ray): log-probabilities, KL, advantages and losses, the last three in
registries (registry.py) that a user's own file extends (``plugins:`` in any config).

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
# advantages.py (estimators, whitening), losses.py (policy losses, aggregation, their sum),
# batching.py (epochs, micro-batches); registry.py holds the registries' type and load_plugins.
from rlhf.algorithms.advantages import (
    ADVANTAGES, compute_advantages, dr_grpo, gae, grpo, needs_critic, register_advantage, reinforce_plus_plus,
    reinforce_plus_plus_baseline, rloo, uniform_groups, whiten,
)
from rlhf.algorithms.batching import MicroBatch, mean_stats, micro_batches, ppo_schedule, token_loss_weight
from rlhf.algorithms.kl import (
    KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_estimate, make_kl_controller, register_kl_estimator,
)
from rlhf.algorithms.losses import (
    LOSS_AGGREGATIONS, POLICY_LOSSES, aggregate, entropy_from_logits, kl_loss, masked_mean, policy_loss,
    policy_token_losses, ptx_loss, register_loss_aggregation, register_policy_loss, total_policy_loss,
    truncated_importance_weights, value_loss,
)
from rlhf.algorithms.registry import Registry, load_plugins
from rlhf.algorithms.rewards import (
    clip_scores, length_and_eos_penalty, normalize_scores, process_scores, shape_rewards,
)

__all__ += [
    "ADVANTAGES", "compute_advantages", "dr_grpo", "gae", "grpo", "needs_critic", "register_advantage",
    "reinforce_plus_plus", "reinforce_plus_plus_baseline", "rloo", "uniform_groups", "whiten",
    "MicroBatch", "mean_stats", "micro_batches", "ppo_schedule", "token_loss_weight",
    "KL_ESTIMATORS", "AdaptiveKLController", "FixedKLController", "kl_estimate", "make_kl_controller",
    "register_kl_estimator",
    "LOSS_AGGREGATIONS", "POLICY_LOSSES", "aggregate", "entropy_from_logits", "kl_loss", "masked_mean",
    "policy_loss", "policy_token_losses", "ptx_loss", "register_loss_aggregation", "register_policy_loss",
    "total_policy_loss", "truncated_importance_weights", "value_loss", "Registry", "load_plugins",
    "clip_scores", "length_and_eos_penalty", "normalize_scores", "process_scores", "shape_rewards",
]
