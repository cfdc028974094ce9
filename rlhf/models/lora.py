"""LoRA adapters through peft."""

from __future__ import annotations

import torch

from rlhf.config import LoraConfig

PEFT_PREFIX = "base_model.model."  # what peft puts before the wrapped model's parameter names


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


def load_lora(model, adapter_dir: str, *, trainable: bool = True):
    """Wrap ``model`` with the adapter saved in ``adapter_dir`` (a peft folder), to train it further."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)


def merge_lora(model):
    """Fold adapters into the base weights and return the plain model (for export and rollout)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def is_lora_model(model) -> bool:
    """A peft model with LoRA adapters (unwraps DeepSpeed/DDP's ``.module``)."""
    model = getattr(model, "module", model)
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def lora_scaling(model, adapter: str = "default") -> float:
    """``alpha / r`` of a peft LoRA model's adapter: the factor :func:`merged_state_dict` needs.

    Only the plain LoRA that :func:`attach_lora` builds is supported; variants whose merge is not
    ``W + scaling * B @ A`` (DoRA, rsLoRA, per-module ranks) are refused rather than merged wrongly.
    """
    config = getattr(model, "module", model).peft_config[adapter]
    variants = {"use_dora": config.use_dora, "use_rslora": config.use_rslora, "rank_pattern": config.rank_pattern,
                "alpha_pattern": config.alpha_pattern, "fan_in_fan_out": config.fan_in_fan_out}
    unsupported = [name for name, value in variants.items() if value]
    if unsupported:
        raise ValueError(f"cannot merge LoRA adapter {adapter!r} with {', '.join(unsupported)} set")
    return config.lora_alpha / config.r


def merged_state_dict(state: dict[str, torch.Tensor], scaling: float,
                      adapter: str = "default") -> dict[str, torch.Tensor]:
    """A peft LoRA model's state dict -> the plain model's, adapters folded in; the model is not touched.

    ``state`` is the full state dict of a peft model (names ``base_model.model.<name>``; on ZeRO-3 the
    gathered one), ``scaling`` is :func:`lora_scaling`. For each adapted linear layer
    ``W' = W + scaling * B @ A`` (W (out, in), A (r, in), B (out, r)), computed in float32 and stored in
    W's dtype; ``modules_to_save`` copies (a reward model's score head) replace the originals. Works on
    CPU tensors, under any ZeRO stage, and leaves no rounding drift in the training weights (peft's
    in-place merge/unmerge would).
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if not name.startswith(PEFT_PREFIX):
            raise ValueError(f"{name}: not a peft state dict (expected names starting with {PEFT_PREFIX!r})")
        name = name[len(PEFT_PREFIX):]
        if ".lora_" in name or ".original_module." in name:
            continue
        name = name.replace(f".modules_to_save.{adapter}.", ".")
        if ".base_layer." in name:
            module, param = name.split(".base_layer.")
            a = state.get(f"{PEFT_PREFIX}{module}.lora_A.{adapter}.{param}")
            b = state.get(f"{PEFT_PREFIX}{module}.lora_B.{adapter}.{param}")
            if param == "weight" and a is not None and b is not None:
                delta = b.float() @ a.float()
                tensor = (tensor.float() + scaling * delta).to(tensor.dtype)
            name = f"{module}.{param}"
        out[name] = tensor
    return out
