"""Deterministic splits: train/eval hold-out and the DeepSpeed-Chat style sft/rm/ppo phase split.

Both keep the original order of the items inside each part (so files read top to bottom stay readable)
and depend only on the seed and the number of items.
"""

from __future__ import annotations

import random
from typing import Sequence, TypeVar

T = TypeVar("T")

PHASES = ("sft", "rm", "ppo")


def train_eval_split(items: Sequence[T], fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """Hold out ``round(fraction * n)`` items, chosen by ``seed``, as the eval part.

    At least one item is held out when ``fraction > 0`` and ``n > 1``, and at least one is left for
    training. Returns ``(train, eval)``.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    n = len(items)
    held = round(fraction * n)
    if fraction > 0 and n > 1:
        held = min(max(held, 1), n - 1)
    else:
        held = 0
    chosen = set(random.Random(seed).sample(range(n), held))
    train = [item for i, item in enumerate(items) if i not in chosen]
    evaluation = [item for i, item in enumerate(items) if i in chosen]
    return train, evaluation


def parse_phase_spec(spec: str) -> tuple[int, int, int]:
    """``"2,4,4"`` -> ``(2, 4, 4)``: three non-negative integers, not all zero."""
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) != 3 or not all(p.isdigit() for p in parts) or sum(map(int, parts)) == 0:
        raise ValueError(f"phase split: expected three non-negative integers like '2,4,4', got {spec!r}")
    a, b, c = map(int, parts)
    return a, b, c


def phase_bounds(n: int, spec: str) -> list[tuple[int, int]]:
    """The ``[start, end)`` of each phase's share of ``n`` shuffled items; they tile ``[0, n)`` exactly."""
    weights = parse_phase_spec(spec)
    total = sum(weights)
    cuts = [0]
    running = 0
    for weight in weights:
        running += weight
        cuts.append(running * n // total)  # integer cuts: the last is exactly n, so nothing is lost
    return [(cuts[i], cuts[i + 1]) for i in range(3)]


def phase_split(items: Sequence[T], spec: str = "2,4,4", *, phase: int, seed: int) -> list[T]:
    """The share of ``items`` for ``phase`` (0 = sft, 1 = rm, 2 = ppo), DeepSpeed-Chat style.

    The items are shuffled by ``seed`` and cut into three contiguous shares proportional to ``spec``; the
    three shares partition the items exactly. A share keeps the original order of its items.
    """
    if phase not in (0, 1, 2):
        raise ValueError(f"phase must be 0 (sft), 1 (rm) or 2 (ppo), got {phase!r}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    start, end = phase_bounds(len(items), spec)[phase]
    return [items[i] for i in sorted(order[start:end])]


def epoch_permutation(n_items: int, seed: int, epoch: int) -> list[int]:
    """The order of ``n_items`` in epoch ``epoch``: a fresh permutation seeded by (seed, epoch), so a
    run's data order is a function of its seed and position alone (resume sees the same batches)."""
    import torch

    return torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
