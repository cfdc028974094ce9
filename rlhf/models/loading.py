"""Load Hugging Face causal LMs and tokenizers from a local folder or a hub id."""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf.config import ModelConfig


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says from where and why."""


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return _DTYPES[name]


def pick_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("model.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def resolve_model_path(path: str) -> str:
    """'default' and 'tiny' name models this project provisions itself; a local folder becomes an
    absolute path; anything else is kept as is (a hub id, for users who can reach a hub)."""
    if path == "default":
        from rlhf.models.default import ensure_default_model

        return str(ensure_default_model())
    if path == "tiny":
        from rlhf.models.tiny import ensure_tiny_model

        return str(ensure_tiny_model())
    local = Path(path).expanduser()
    if local.exists():
        # Absolute: Ray workers (Ray Train's among them) need not share the driver's working directory.
        return str(local.resolve())
    return path


def check_model_source(path: str) -> None:
    """A path that looks local must be a Hugging Face model folder (hub ids pass)."""
    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "config.json").is_file():
        raise ModelLoadError(
            f"model folder {path} has no config.json: expected a Hugging Face model folder "
            "(save_pretrained output), 'default' or 'tiny'"
        )


def load_tokenizer(path: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    path = resolve_model_path(path)
    check_model_source(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {path!r}: {exc}") from None
    if tokenizer.pad_token_id is None:
        # Batched generation and scoring need a pad token; eos is the usual stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def use_training_attention(model: torch.nn.Module, choice: str, device: torch.device) -> None:
    """Switch ``model`` (or a LoRA model's base) to the attention kernel it trains with. ``auto``: eager
    attention on the CPU, the model's own (sdpa) elsewhere: the fused CPU kernel's backward is slow,
    and 2-3x slower again inside Ray workers (a default-model GRPO step trained in 7.1-7.6 s instead
    of 9.7-11.8 s in bf16 with eager attention). Models that name no kernel are left as they are."""
    from rlhf.algorithms import attention_kernel

    wanted = ("eager" if device.type == "cpu" else None) if choice == "auto" else choice
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a LoRA model's own
    if wanted is not None and attention_kernel(base) not in (None, wanted):  # None: not a transformers model
        base.set_attn_implementation(wanted)


def load_causal_lm(cfg: ModelConfig, *, path: str | None = None, device: str | None = None):
    """A causal LM with dtype and device from config. ``path`` overrides ``cfg.path``."""
    from transformers import AutoModelForCausalLM

    source = resolve_model_path(path or cfg.path)
    check_model_source(source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype(cfg.dtype),
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=True,  # never unpickle weights from a path we do not control
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a causal LM from {source!r}: {exc}") from None
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model.to(pick_device(device or cfg.device))
