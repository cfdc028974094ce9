"""The critic: a DeepSpeed learner rank holding a scalar-head model that predicts per-token values.

Used by GAE; critic-free estimators (GRPO, RLOO, REINFORCE++) run without it.
"""

from __future__ import annotations

import torch

from actors.group import Learner
from rlhf.algorithms import crop_to_window, mean_stats, scored_window, uncrop, value_loss
from rlhf.config import DeepSpeedConfig, ModelConfig, PPOAlgoConfig


def next_token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Value of the state before each next token: (batch, seq) -> (batch, seq - 1), aligned with
    ``causal_lm_logprobs`` (position ``i`` is the state that emits token ``i + 1``)."""
    from rlhf.models import token_values

    return token_values(model, input_ids, attention_mask)[:, :-1].float()


class CriticLearner(Learner):
    def setup(self, model_cfg: ModelConfig, path: str, algo: PPOAlgoConfig, ds: DeepSpeedConfig, seed: int) -> None:
        from rlhf.models import load_scalar_model, load_tokenizer

        torch.manual_seed(seed)
        self.tokenizer = load_tokenizer(path, trust_remote_code=model_cfg.trust_remote_code)
        model = load_scalar_model(model_cfg.model_copy(update={"dtype": "float32"}), path=path, device=self.device.type)
        self._initialize(model, learning_rate=algo.critic_learning_rate, ds=ds, algo=algo, bf16=model_cfg.dtype == "bfloat16")
        self.algo, self.seed = algo, seed

    @torch.no_grad()
    def values(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch, seq - 1) values for this rank's share of a batch (input_ids, attention_mask,
        action_mask); zeros outside its scored window."""
        self.engine.eval()
        window = scored_window(batch["action_mask"])
        cropped = crop_to_window(batch, window)  # the model reads nothing past the last response token
        values = next_token_values(self.engine.module, cropped["input_ids"].to(self.device),
                                   cropped["attention_mask"].to(self.device))[:, window[0]:]
        return uncrop(values.cpu(), window, batch["action_mask"].shape[1])

    def train(self, experience: dict[str, torch.Tensor], iteration: int) -> dict[str, float]:
        """Clipped value regression towards ``returns``. Keys: input_ids, attention_mask, action_mask,
        values (when the experience was made), returns."""
        algo = self.algo
        schedule = self._schedule(experience, iteration)
        self.engine.train()
        stats, skipped = [], 0
        for optimizer_step in schedule:
            for micro in optimizer_step:
                batch, window = self._micro_batch(experience, micro.indices)
                values = next_token_values(self.engine.module, batch["input_ids"],
                                           batch["attention_mask"])[:, window[0]:]
                loss, micro_stats = value_loss(values, batch["values"], batch["returns"], batch["action_mask"],
                                               algo.value_clip)
                self.engine.backward(loss)
                skipped += not self._step()
                stats.append({"loss/value": float(loss.detach()), **{f"critic/{k}": v for k, v in micro_stats.items()}})
        return {**mean_stats(stats), "critic/skipped_steps": float(skipped)}
