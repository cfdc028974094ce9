"""The reference: a frozen copy of the initial policy, for the KL penalty."""

from __future__ import annotations

import os

import torch

from rlhf.config import ModelConfig


class ReferenceModel:
    def __init__(self, model_cfg: ModelConfig, path: str, threads: int | None = None,
                 take_turns: bool = False) -> None:
        from rlhf.models import load_causal_lm

        from actors.group import torch_threads

        torch.set_num_threads(torch_threads(threads, take_turns))
        self.model = load_causal_lm(model_cfg, path=path).eval()
        self.model.requires_grad_(False)

    def pid(self) -> int:
        """This actor's process id (fault tests and benchmarks/chaos.py kill it with SIGKILL)."""
        return os.getpid()

    @torch.no_grad()
    def logprobs(self, batch: dict[str, torch.Tensor], temperature: float, share_prompts: bool = False) -> torch.Tensor:
        """(batch, seq - 1) logprobs of the response tokens of ``batch`` (input_ids, attention_mask,
        action_mask) at the policy's sampling temperature; zeros outside its response tokens. With
        ``share_prompts`` each prompt is read once for all its responses."""
        from rlhf.algorithms import response_logprobs

        return response_logprobs(self.model, batch, temperature, share_prompts=share_prompts)
