"""LoRA adapters through peft."""

from __future__ import annotations

from rlhf.config import LoraConfig


def attach_lora(model, cfg: LoraConfig, *, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` with trainable LoRA adapters; base weights are frozen.

    ``task_type`` is CAUSAL_LM for policies and SEQ_CLS for reward/critic models (whose score head
    then stays trainable too).
    """
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    peft_config = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type=task_type,
    )
    return get_peft_model(model, peft_config)


def merge_lora(model):
    """Fold adapters into the base weights and return the plain model (for export and rollout)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
