"""`rlhf rm`: a scalar-head reward model trained on chosen/rejected pairs (Ray Train + DeepSpeed).

Loss: ``-log sigmoid(r_chosen - r_rejected - margin)``. Held-out accuracy (chosen scored higher) and
mean margin are reported. The saved folder loads in plain
``transformers.AutoModelForSequenceClassification`` and gives the same scores; with ``normalize`` it
also holds ``reward_stats.json`` (mean/std of train-set scores) so PPO can normalise rewards.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from rlhf.config import ModelConfig, RMConfig
from rlhf.outputs import StageOutput

log = logging.getLogger("rlhf.rm")

REWARD_STATS_FILE = "reward_stats.json"


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean of ``-log sigmoid(chosen - rejected - margin)``; chosen, rejected: (batch,)."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


class RewardTask:
    """Plugs reward-model training into the shared loop in rlhf/training.py."""

    name = "rm"
    peft_task_type = "SEQ_CLS"

    def __init__(self, margin: float = 0.0, normalize: bool = True, head_learning_rate: float | None = None) -> None:
        self.margin = margin
        self.normalize = normalize
        self.head_learning_rate = head_learning_rate  # the score head's own rate (training.parameter_groups)

    def build_model(self, cfg: ModelConfig, path: str):
        from rlhf.models import load_scalar_model

        return load_scalar_model(cfg.model_copy(update={"dtype": "float32"}), path=path, device="cpu")

    def collate(self, items, pad_id):
        from rlhf.data.tokenize import collate_preferences

        return collate_preferences(items, pad_id)

    def _scores(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        from rlhf.models import sequence_scores

        scores = sequence_scores(model, batch["input_ids"], batch["attention_mask"]).float()
        half = scores.shape[0] // 2
        return scores[:half], scores[half:]

    def loss(self, model, batch):
        chosen, rejected = self._scores(model, batch)
        loss = pairwise_loss(chosen, rejected, self.margin)
        return loss, {"loss": loss.item(), "accuracy": (chosen > rejected).float().mean().item()}

    def eval_sums(self, model, batch):
        chosen, rejected = self._scores(model, batch)
        return {
            "loss_sum": pairwise_loss(chosen, rejected, self.margin).item() * len(chosen),
            "correct": (chosen > rejected).sum().item(),
            "margin_sum": (chosen - rejected).sum().item(),
            "pairs": len(chosen),
        }

    def eval_metrics(self, sums):
        pairs = max(sums["pairs"], 1)
        return {
            "eval/loss": sums["loss_sum"] / pairs,
            "eval/accuracy": sums["correct"] / pairs,
            "eval/margin": sums["margin_sum"] / pairs,
        }

    def tokens(self, batch):
        return int(batch["attention_mask"].sum())

    def finish(self, engine, items, ctx):
        """Mean and std of the trained model's scores on the training set (all ranks take part)."""
        if not self.normalize:
            return {}
        from rlhf.training import all_reduce_sums, sharded_batches

        device = next(engine.module.parameters()).device
        sums = {"n": 0.0, "sum": 0.0, "sumsq": 0.0}
        engine.eval()
        with torch.no_grad():
            for batch, real in sharded_batches(self, items, ctx, device):
                scores = torch.cat(self._scores(engine, batch)).double()
                if real:
                    sums["n"] += len(scores)
                    sums["sum"] += scores.sum().item()
                    sums["sumsq"] += (scores**2).sum().item()
        total = all_reduce_sums(sums)
        mean = total["sum"] / total["n"]
        std = math.sqrt(max(total["sumsq"] / total["n"] - mean**2, 0.0))
        return {REWARD_STATS_FILE: {"mean": mean, "std": std, "count": int(total["n"])}}


def run(cfg: RMConfig) -> Path:
    from rlhf.data import load_preference_data
    from rlhf.models import load_tokenizer, resolve_model_path
    from rlhf.training import checkpoints, fit

    output = StageOutput(cfg, "rm", lambda: checkpoints(cfg.output_dir))  # refuses before anything loads
    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    train_items, eval_items = load_preference_data(cfg.data, tokenizer, seed=cfg.seed, phase=1)
    log.info("rm: %d training and %d held-out pairs", len(train_items), len(eval_items))
    output.begin()
    final = fit(RewardTask(cfg.margin, cfg.normalize, cfg.head_learning_rate), cfg, model_path=model_path,
                train_items=train_items, eval_items=eval_items, pad_id=tokenizer.pad_token_id)
    output.finish()
    return final
