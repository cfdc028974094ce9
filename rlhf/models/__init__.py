"""Models: loading from a folder or hub id, the embedded default, a tiny builder, scalar heads, LoRA."""

from rlhf.models.default import DEFAULT_MODEL_NAME, default_model_dir, ensure_default_model
from rlhf.models.heads import load_scalar_model, sequence_scores, token_values
from rlhf.models.loading import (
    ModelLoadError,
    load_causal_lm,
    load_tokenizer,
    pick_device,
    resolve_model_path,
    torch_dtype,
    use_training_attention,
)
from rlhf.models.lora import attach_lora, merge_lora
from rlhf.models.tiny import build_tiny_model, ensure_tiny_model

__all__ = [
    "DEFAULT_MODEL_NAME",
    "ModelLoadError",
    "attach_lora",
    "build_tiny_model",
    "default_model_dir",
    "ensure_default_model",
    "ensure_tiny_model",
    "load_causal_lm",
    "load_scalar_model",
    "load_tokenizer",
    "merge_lora",
    "pick_device",
    "resolve_model_path",
    "sequence_scores",
    "token_values",
    "torch_dtype",
    "use_training_attention",
]
