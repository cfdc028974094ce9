"""The one writer of model folders: SFT/RM final weights (rlhf.training) and PPO checkpoints and final
weights (actors.group.Learner) all go through :func:`save_model_folder`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rlhf.models.lora import is_lora_model, lora_scaling, merged_state_dict
from rlhf.paths import replace_dir


def save_model_folder(model, tokenizer, out: Path, *, state_dict: dict[str, torch.Tensor] | None = None,
                      adapter_out: Path | None = None, adapter_only: bool = False,
                      extra_files: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Write a Hugging Face folder at ``out`` (built under ``<out>.partial``, then renamed: never half
    written; an existing ``out`` is replaced only if rlhf made it, or with ``overwrite``:
    ``rlhf.paths.replace_dir``) with the tokenizer and ``extra_files`` (name -> JSON content).

    ``model`` is a transformers model or a peft LoRA model; ``state_dict`` its full weights when the
    module's own are not (ZeRO-3: gathered on rank 0), else ``model.state_dict()``. With LoRA:

    * ``adapter_out`` (when given) gets the adapter alone (a peft folder);
    * ``out`` gets the merged weights under the plain model's names, a folder plain transformers
      loads, or the adapter alone with ``adapter_only``.

    The model itself is not modified (the merge works on the state dict).
    """
    module = getattr(model, "module", model)
    state = state_dict if state_dict is not None else module.state_dict()
    lora = is_lora_model(module)
    if lora and adapter_out is not None:
        _write(module, state, tokenizer, extra_files, Path(adapter_out), overwrite)
    if lora and not adapter_only:
        merged = merged_state_dict(state, lora_scaling(module))
        return _write(module.get_base_model(), merged, tokenizer, extra_files, Path(out), overwrite)
    return _write(module, state, tokenizer, extra_files, Path(out), overwrite)


def _write(model, state: dict[str, torch.Tensor], tokenizer, extra_files: dict[str, Any] | None, out: Path,
           overwrite: bool) -> Path:
    def fill(staging: Path) -> None:
        model.save_pretrained(staging, state_dict=state)
        tokenizer.save_pretrained(staging)
        for name, content in (extra_files or {}).items():
            (staging / name).write_text(json.dumps(content, indent=2))

    return replace_dir(out, fill, overwrite=overwrite)
