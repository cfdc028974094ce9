"""The reward: a frozen reward model, a Python function, an HTTP endpoint, or the default judge."""

from __future__ import annotations

import os

import torch

from rlhf.config import RewardConfig


class RewardScorer:
    def __init__(self, cfg: RewardConfig, dtype: str = "float32", threads: int | None = None,
                 take_turns: bool = False) -> None:
        from rlhf.judge import make_reward_fn

        from actors.group import torch_threads

        torch.set_num_threads(torch_threads(threads, take_turns))
        self.score_fn = make_reward_fn(cfg, dtype=dtype)

    def pid(self) -> int:
        """This actor's process id (fault tests and benchmarks/chaos.py kill it with SIGKILL)."""
        return os.getpid()

    def stats(self) -> tuple[float | None, float | None]:
        """The reward model's stored train-set mean and std, for normalisation (None for others)."""
        return getattr(self.score_fn, "mean", None), getattr(self.score_fn, "std", None)

    def scores(self, prompts: list[str], responses: list[str]) -> list[float]:
        scores = [float(s) for s in self.score_fn(prompts, responses)]
        if len(scores) != len(responses):
            raise ValueError(f"reward returned {len(scores)} scores for {len(responses)} responses")
        return scores
