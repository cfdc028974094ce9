"""Scalar-head models: reward models (one score per sequence) and critics (one value per token).

Both are ``AutoModelForSequenceClassification`` models with ``num_labels=1`` on a causal-LM backbone,
so a reward model we save loads in plain transformers and gives the same scores.
"""

from __future__ import annotations

import torch

from rlhf.config import ModelConfig
from rlhf.models.loading import ModelLoadError, check_model_source, pick_device, resolve_model_path, torch_dtype


def load_scalar_model(cfg: ModelConfig, *, path: str | None = None, device: str | None = None):
    """A scalar-head model. From a causal-LM folder the head starts random; from a saved reward
    model it is loaded as trained."""
    from transformers import AutoModelForSequenceClassification

    source = resolve_model_path(path or cfg.path)
    check_model_source(source)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=1,
            dtype=torch_dtype(cfg.dtype),
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a scalar-head model from {source!r}: {exc}") from None
    if model.config.pad_token_id is None:
        raise ModelLoadError(
            f"{source}: config has no pad_token_id; the score is read at the last non-pad token"
        )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.to(pick_device(device or cfg.device))


def token_values(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Head output at every position. (batch, seq) -> (batch, seq). ``attention_mask`` may also be a
    prepared 4D mask (shared prompts), with its ``position_ids``."""
    if hasattr(model, "get_base_model"):  # a peft (LoRA) model: its wrapped transformers model
        model = model.get_base_model()
    backbone = getattr(model, model.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return model.score(hidden).squeeze(-1)


def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Head output at the last non-pad token of each sequence. (batch, seq) -> (batch,).

    Works for left or right padding: the last position whose attention_mask is 1.
    """
    values = token_values(model, input_ids, attention_mask)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask).argmax(dim=1)
    return values.gather(1, last.unsqueeze(1)).squeeze(1)
