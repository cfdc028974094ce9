"""A tiny random Llama with a real tokenizer, for tests and quick demos.

The tokenizer is a byte-level BPE trained on the shipped default dataset (so it encodes any text),
with ChatML special tokens and chat template, like SmolLM2's. The head size (64) is one vLLM supports.
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.paths import DEFAULT_DATA_DIR, check_writable, replace_dir, rlhf_home

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_DONE_MARKER = ".rlhf-complete"


def _training_texts() -> list[str]:
    texts = []
    for file in sorted(DEFAULT_DATA_DIR.glob("*.jsonl")):
        for line in file.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                texts.extend(str(v) for v in record.values())
    return texts


def build_tiny_tokenizer(vocab_size: int = 1024):
    """A deterministic byte-level BPE tokenizer wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(_training_texts() or ["hello world"], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token="<|im_start|>",
        unk_token=None,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(out_dir: str | Path, *, hidden_size: int = 128, layers: int = 2, heads: int = 2,
                     vocab_size: int = 1024, seed: int = 0, overwrite: bool = False) -> Path:
    """Write a random tiny Llama and its tokenizer to ``out_dir`` (a Hugging Face folder). An existing
    ``out_dir`` is replaced only if rlhf made it, or with ``overwrite``."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = check_writable(out_dir, overwrite=overwrite, override="--overwrite")  # before the slow part
    tokenizer = build_tiny_tokenizer(vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        head_dim=hidden_size // heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

    def fill(staging: Path) -> None:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / _DONE_MARKER).write_text("tiny random Llama\n")

    return replace_dir(out, fill, overwrite=overwrite, override="--overwrite")


def ensure_tiny_model() -> Path:
    """The tiny model that ``model.path: tiny`` names, built once under $RLHF_HOME."""
    target = rlhf_home() / "models" / "tiny"
    if not (target / _DONE_MARKER).is_file():
        build_tiny_model(target)
    return target
