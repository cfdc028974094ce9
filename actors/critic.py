"""The critic: a DeepSpeed learner rank holding a scalar-head model that predicts per-token values.

Used by GAE; critic-free estimators (GRPO, RLOO, REINFORCE++) run without it.
"""

from __future__ import annotations

import torch

from actors.group import Learner
from rlhf.algorithms import SharedPrompts, mean_stats, uncrop, value_loss
from rlhf.config import DeepSpeedConfig, ModelConfig, PPOAlgoConfig


def next_token_values(model, batch: dict[str, torch.Tensor], window: tuple[int, int],
                      shared: SharedPrompts | None = None) -> torch.Tensor:
    """Value of the state before each next token in ``window``: (batch, stop - start), aligned with
    ``causal_lm_logprobs`` (position ``i`` is the state that emits token ``i + 1``). ``batch`` is cut
    to the window (``crop_to_window``); ``shared``, the same rows packed by prompt, is read instead."""
    from rlhf.models import token_values

    if shared is not None:
        mask = shared.mask_for(model, next(model.parameters()).dtype)
        values = token_values(model, shared.input_ids, mask, position_ids=shared.position_ids)[:, shared.keep]
        return shared.unpack(values).float()
    return token_values(model, batch["input_ids"], batch["attention_mask"])[:, window[0]:-1].float()


class CriticLearner(Learner):
    def setup(self, model_cfg: ModelConfig, path: str, algo: PPOAlgoConfig, ds: DeepSpeedConfig, seed: int) -> None:
        from rlhf.models import load_scalar_model, load_tokenizer

        torch.manual_seed(seed)
        self.tokenizer = load_tokenizer(path, trust_remote_code=model_cfg.trust_remote_code)
        model = load_scalar_model(model_cfg.model_copy(update={"dtype": "float32"}), path=path, device=self.device.type)
        self._initialize(model, learning_rate=algo.critic_learning_rate, ds=ds, algo=algo, bf16=model_cfg.dtype == "bfloat16")
        self._use_shared_prompts(algo.share_prompts)
        self.algo, self.seed = algo, seed

    @torch.no_grad()
    def values(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(batch, seq - 1) values for this rank's share of a batch (input_ids, attention_mask,
        action_mask); zeros outside its response tokens."""
        self.engine.eval()
        # The model reads nothing past the last response token (and each shared prompt once).
        cropped, window, shared = self._micro_batch(batch, list(range(batch["input_ids"].shape[0])))
        values = next_token_values(self.engine.module, cropped, window, shared)
        self._token_stats("critic")  # counted for training only
        values = uncrop(values.cpu(), window, batch["action_mask"].shape[1])
        return values.masked_fill(~batch["action_mask"].bool(), 0.0)

    def train(self, experience: dict[str, torch.Tensor], iteration: int) -> dict[str, float]:
        """Clipped value regression towards ``returns``. Keys: input_ids, attention_mask, action_mask,
        values (when the experience was made), returns. Each optimiser step minimises the mean over
        all its response tokens on all ranks (``Learner._train_steps``)."""
        algo = self.algo
        self.engine.train()

        def micro_loss(batch, window, shared, *, weight, step_index, micro_index):
            values = next_token_values(self.engine.module, batch, window, shared)
            loss, micro_stats = value_loss(values, batch["values"], batch["returns"], batch["action_mask"],
                                           algo.value_clip)
            stats = {"loss/value": float(loss.detach()), **{f"critic/{k}": v for k, v in micro_stats.items()}}
            return weight * loss, stats

        stats, skipped = self._train_steps(experience, self._schedule(experience, iteration), micro_loss, "critic")
        return {**mean_stats(stats), "critic/skipped_steps": float(skipped), **self._token_stats("critic")}
