"""Pure torch math for RLHF (no Ray): log-probabilities, and later KL, advantages and losses.

Tensors are ``(batch, seq)`` with an ``action_mask`` marking the response tokens.
"""

from rlhf.algorithms.logprobs import causal_lm_logprobs, logprob_diff, token_logprobs

__all__ = ["causal_lm_logprobs", "logprob_diff", "token_logprobs"]
