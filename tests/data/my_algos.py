"""A user's own algorithm pieces, registered from a file outside the package (``plugins:`` in a config).

tests/test_ppo.py trains with them: ``plugins=[tests/data/my_algos.py] ppo.advantage=signed_outcome
ppo.policy_loss=vanilla_pg``.
"""

import torch

from rlhf.algorithms import register_advantage, register_policy_loss


@register_advantage("signed_outcome", needs_groups=True)
def signed_outcome(scores: torch.Tensor, group_ids: torch.Tensor, action_mask: torch.Tensor):
    """+1 on every token of a response scored above its group's mean, -1 below, 0 at it."""
    _, inverse = torch.unique(group_ids, return_inverse=True)
    means = torch.zeros(int(inverse.max()) + 1).index_add_(0, inverse, scores.float())
    means /= torch.bincount(inverse).float()
    sign = torch.sign(scores.float() - means[inverse])
    per_token = sign.unsqueeze(-1).expand(action_mask.shape) * action_mask
    return per_token, scores.float().unsqueeze(-1).expand(action_mask.shape) * action_mask


@register_policy_loss("vanilla_pg")
def vanilla_pg(logprobs: torch.Tensor, advantages: torch.Tensor, action_mask: torch.Tensor):
    """REINFORCE: ``-A * logprob`` per token, no ratio and no clip."""
    logprobs = torch.where(action_mask.bool(), logprobs, torch.zeros_like(logprobs))
    return -advantages.detach() * logprobs, {}
