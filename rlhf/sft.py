"""`rlhf sft`: supervised fine-tuning on Ray Train with DeepSpeed; loss on response tokens only."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from rlhf.algorithms.losses import ptx_loss
from rlhf.config import ModelConfig, SFTConfig
from rlhf.data.tokenize import IGNORE_INDEX
from rlhf.outputs import StageOutput
from rlhf.paths import write_atomic

log = logging.getLogger("rlhf.sft")

def labelled_tokens(labels: torch.Tensor) -> int:
    """Positions that carry loss: labels (batch, seq), shifted as in next-token prediction."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


class SFTTask:
    """Plugs SFT into the shared loop in rlhf/training.py."""

    name = "sft"
    peft_task_type = "CAUSAL_LM"

    def build_model(self, cfg: ModelConfig, path: str):
        from rlhf.models import load_causal_lm

        return load_causal_lm(cfg.model_copy(update={"dtype": "float32"}), path=path, device="cpu")

    def collate(self, items, pad_id):
        from rlhf.data.tokenize import collate_sft

        return collate_sft(items, pad_id)

    def loss(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = ptx_loss(logits, batch["labels"])  # the LM loss on labelled (response) tokens
        return loss, {"loss": loss.item()}

    def eval_sums(self, model, batch):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        count = labelled_tokens(batch["labels"])
        return {"loss_sum": ptx_loss(logits, batch["labels"]).item() * count, "tokens": count}

    def eval_metrics(self, sums):
        loss = sums["loss_sum"] / max(sums["tokens"], 1)
        return {"eval/loss": loss, "eval/perplexity": float(torch.exp(torch.tensor(min(loss, 50.0))))}

    def tokens(self, batch):
        return int(batch["attention_mask"].sum())

    def finish(self, engine, items, ctx):
        return {}


def generate_samples(model_path: str, prompts: list[str], *, max_new_tokens: int = 48) -> list[str]:
    """Greedy replies to a few fixed prompts (on the driver, for the before/after file)."""
    from rlhf.data.tokenize import render_prompt
    from rlhf.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(ModelConfig(path=model_path, device="cpu")).eval()
    replies = []
    for prompt in prompts:
        text = render_prompt(tokenizer, [{"role": "user", "content": prompt}])
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return replies


def run(cfg: SFTConfig) -> Path:
    from rlhf.data import load_sft_data
    from rlhf.models import load_tokenizer, resolve_model_path
    from rlhf.training import checkpoints, fit

    output = StageOutput(cfg, "sft", lambda: checkpoints(cfg.output_dir))  # refuses before anything loads
    model_path = resolve_model_path(cfg.model.path)
    tokenizer = load_tokenizer(model_path, trust_remote_code=cfg.model.trust_remote_code)
    train_items, eval_items = load_sft_data(cfg.data, tokenizer, seed=cfg.seed, phase=0)
    log.info("sft: %d training and %d held-out examples", len(train_items), len(eval_items))
    out = output.begin()

    before = generate_samples(model_path, cfg.sample_prompts) if cfg.sample_prompts else []
    final = fit(SFTTask(), cfg, model_path=model_path, train_items=train_items, eval_items=eval_items,
                pad_id=tokenizer.pad_token_id)
    if cfg.sample_prompts and not cfg.save_adapter_only:
        after = generate_samples(str(final), cfg.sample_prompts)
        samples = [{"prompt": p, "before": b, "after": a} for p, b, a in zip(cfg.sample_prompts, before, after)]
        write_atomic(out / "samples.jsonl", "".join(json.dumps(s) + "\n" for s in samples))
    output.finish()
    return final
