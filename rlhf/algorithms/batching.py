"""How one rollout batch is trained on: several PPO epochs, shuffled micro-batches, gradient accumulation.

Each epoch visits every item once in a fresh order (deterministic by seed), cut into micro-batches of
``micro_batch_size`` (the last may be smaller). ``grad_accum`` consecutive micro-batches of an epoch
make one optimiser step; a step never spans two epochs. A trainer's loop over :func:`ppo_schedule`:

    for step in ppo_schedule(n, micro_batch_size, epochs=epochs, seed=seed, grad_accum=grad_accum,
                             tokens=action_mask.sum(-1).tolist()):
        for mb in step:
            loss, stats = total_policy_loss(**select(experience, mb.indices), ..., token_weight=mb.loss_weight)
            loss.backward()   # the token means, weighted by mb.loss_weight; the PTX term is not
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)   # DeepSpeed: `gradient_clipping`
        optimizer.step(); optimizer.zero_grad()

``loss_weight`` is the micro-batch's share of the step's loss tokens (``tokens``, one count per item:
its response tokens), so the step's gradient is that of the mean over all the step's tokens, and a
token weighs the same whether it sits in a micro-batch of short or of long responses. (Unweighted
micro-batch means would not: with micro-batches grouped by length, a token among four 2-token
responses would weigh 15x one among four 30-token responses.) Under DeepSpeed, and across
data-parallel ranks, the weight is :func:`token_loss_weight` of the step's tokens on all ranks.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch


def _epoch_orders(n_items: int, epochs: int, seed: int) -> list[list[int]]:
    """One shuffled permutation of range(n_items) per epoch, reproducible from seed."""
    if n_items <= 0:
        raise ValueError(f"n_items must be > 0, got {n_items}")
    if epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    rng = random.Random(seed)  # Python's Random: the same sequence on every platform and version
    orders = []
    for _ in range(epochs):
        order = list(range(n_items))
        rng.shuffle(order)
        orders.append(order)
    return orders


def _chunks(order: list[int], size: int) -> list[list[int]]:
    if size <= 0:
        raise ValueError(f"micro_batch_size must be > 0, got {size}")
    return [order[start:start + size] for start in range(0, len(order), size)]


def micro_batches(n_items: int, micro_batch_size: int, *, epochs: int, seed: int) -> list[list[int]]:
    """Index lists of the micro-batches of all epochs, in training order.

    Epoch e contributes ceil(n_items / micro_batch_size) micro-batches covering each index once; the
    order is shuffled per epoch, deterministically by ``seed``.
    """
    return [chunk for order in _epoch_orders(n_items, epochs, seed) for chunk in _chunks(order, micro_batch_size)]


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of a schedule: which items, from which epoch, its loss tokens and loss weight."""

    epoch: int
    indices: list[int]
    tokens: int  # loss tokens of its items (response tokens); its item count when none were given
    loss_weight: float  # tokens / the step's tokens: multiply its token-mean loss by this before backward


def token_loss_weight(micro_tokens: int, step_tokens: int, *, grad_accum: int = 1, world: int = 1) -> float:
    """The factor for one micro-batch's token-mean loss that makes an optimiser step's gradient the
    gradient of the mean over all the step's loss tokens, on all ranks:

        weight = micro_tokens / step_tokens * grad_accum * world

    micro_tokens: the micro-batch's loss tokens; step_tokens: the step's, over all its micro-batches
    and all ``world`` data-parallel ranks. ``grad_accum`` and ``world`` undo what DeepSpeed does:
    ``engine.backward`` divides each micro-batch's loss by ``grad_accum``, and the gradients are
    averaged over the ranks, so the step's gradient is that of

        sum over ranks and micro-batches of  weight * mean_micro / (grad_accum * world)
          = sum over all the step's tokens of  loss_t / step_tokens

    A plain loop that sums micro-batch gradients on one process uses grad_accum = world = 1.
    """
    if step_tokens <= 0 or micro_tokens < 0:
        raise ValueError(f"need micro_tokens >= 0 and step_tokens > 0, got {micro_tokens} and {step_tokens}")
    return micro_tokens / step_tokens * grad_accum * world


def ppo_schedule(n_items: int, micro_batch_size: int, *, epochs: int, seed: int,
                 grad_accum: int = 1, lengths: Sequence[int] | None = None,
                 groups: Sequence[int] | None = None, tokens: Sequence[int] | None = None) -> list[list[MicroBatch]]:
    """Optimiser steps, each a list of up to ``grad_accum`` micro-batches (see the module docstring).

    The micro-batches are those of :func:`micro_batches` with the same arguments, in the same order.
    With ``tokens`` (one per item: the tokens its loss averages over, its response tokens) a
    micro-batch's ``tokens`` is the sum over its items and, within a step,
    ``loss_weight = tokens / the step's tokens`` (:func:`token_loss_weight`), so the weights sum to 1
    and every token of the step weighs the same. Without ``tokens`` each item counts as one token.

    With ``lengths`` (one per item, e.g. tokens up to the end of each response) each step's items
    are regrouped by length before they are cut into micro-batches: every step still trains on the
    same items with the same weights, but a micro-batch holds sequences of similar length, so it
    carries less padding (the learners crop it to its own scored window).

    With ``groups`` (one id per item, e.g. the prompt it answers) each epoch shuffles whole groups:
    a group's items follow one another in their own order, so they share steps and micro-batches
    (a group larger than a micro-batch spans consecutive ones). Each step's groups are then ordered
    by their longest item when ``lengths`` is given. The steps differ from the ungrouped schedule's.
    """
    if grad_accum <= 0:
        raise ValueError(f"grad_accum must be > 0, got {grad_accum}")
    if lengths is not None and len(lengths) != n_items:
        raise ValueError(f"lengths has {len(lengths)} entries for {n_items} items")
    if groups is not None and len(groups) != n_items:
        raise ValueError(f"groups has {len(groups)} entries for {n_items} items")
    if tokens is not None and len(tokens) != n_items:
        raise ValueError(f"tokens has {len(tokens)} entries for {n_items} items")
    count = (lambda chunk: sum(tokens[i] for i in chunk)) if tokens is not None else len
    if groups is None:
        orders = _epoch_orders(n_items, epochs, seed)
    else:
        members: dict[int, list[int]] = {}
        for item, group in enumerate(groups):
            members.setdefault(group, []).append(item)
        keys = list(members)
        orders = [[item for g in group_order for item in members[keys[g]]]
                  for group_order in _epoch_orders(len(keys), epochs, seed)]
    steps: list[list[MicroBatch]] = []
    per_step = micro_batch_size * grad_accum
    for epoch, order in enumerate(orders):
        for start in range(0, len(order), per_step):
            items = order[start:start + per_step]
            if lengths is not None and groups is None:
                items = sorted(items, key=lambda i: lengths[i])  # stable: ties keep the shuffled order
            elif lengths is not None:
                longest: dict[int, int] = {}
                for i in items:
                    longest[groups[i]] = max(longest.get(groups[i], 0), lengths[i])
                items = sorted(items, key=lambda i: longest[groups[i]])  # stable: groups stay whole
            chunks = _chunks(items, micro_batch_size)
            step_tokens = count(items)
            steps.append([MicroBatch(epoch, chunk, count(chunk), token_loss_weight(count(chunk), step_tokens))
                          for chunk in chunks])
    return steps


def select(batch: dict[str, torch.Tensor], indices: list[int]) -> dict[str, torch.Tensor]:
    """The rows ``indices`` of every tensor in ``batch`` (each (batch, ...)); other values pass through."""
    index = torch.as_tensor(indices, dtype=torch.long)
    return {
        key: value.index_select(0, index.to(value.device)) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
    }


def mean_stats(stats: list[dict[str, float]]) -> dict[str, float]:
    """Average per-micro-batch stats key by key (a key missing from some dicts averages over the rest)."""
    totals: dict[str, list[float]] = {}
    for item in stats:
        for key, value in item.items():
            totals.setdefault(key, []).append(float(value))
    return {key: sum(values) / len(values) for key, values in totals.items()}
