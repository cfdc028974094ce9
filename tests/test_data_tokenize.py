"""Tokenisation, padding and the stage loaders, with a real byte-level BPE tokenizer built on the spot."""

from __future__ import annotations

import copy
import json
import logging
import random
from pathlib import Path

import pytest
import torch

from rlhf.config import DataConfig
from rlhf.data import (
    IGNORE_INDEX,
    DataError,
    PreferenceExample,
    PromptExample,
    SFTExample,
    collate_preferences,
    collate_sft,
    load_preference_data,
    load_prompt_data,
    load_sft_data,
    pad_batch,
    render_prompt,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
    tokenizer_fingerprint,
)
from rlhf.data import datasets as data_datasets
from rlhf.data import readers

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = (
    "the a cat dog sat on mat what is how do I make tea coffee friend kind say something to you hello world "
    "please thanks answer question good bad bread eggs run walk garden book music rain sun happy sad long "
    "short tell me joke why not help with my homework travel city train plane water plant flower tree"
).split()


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A byte-level BPE tokenizer (vocab about 500) trained here, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".?!")
        for _ in range(400)
    ]
    corpus += ["User: Assistant: System:\n", "0123456789 ,;'\"()-"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    )


@pytest.fixture(scope="session")
def plain_tokenizer(bpe_tokenizer):
    """The same tokenizer without a chat template."""
    tok = copy.deepcopy(bpe_tokenizer)
    tok.chat_template = None
    return tok


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --------------------------------------------------------------------------------------------------
# render_prompt
# --------------------------------------------------------------------------------------------------


def test_render_prompt_with_and_without_chat_template(bpe_tokenizer, plain_tokenizer):
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hello"}]
    assert render_prompt(bpe_tokenizer, messages) == (
        "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    )
    plain = "System: Be kind.\nUser: hello\nAssistant:"
    assert render_prompt(plain_tokenizer, messages) == plain
    assert render_prompt(bpe_tokenizer, messages, chat_template=False) == plain


# --------------------------------------------------------------------------------------------------
# tokenize_sft
# --------------------------------------------------------------------------------------------------


def test_sft_labels_mask_exactly_the_prompt(bpe_tokenizer):
    tok = bpe_tokenizer
    example = SFTExample(user("how do I make tea?"), "boil water, then wait.", "d.jsonl line 1")
    (item,), report = tokenize_sft([example], tok, max_length=128, max_prompt_length=64)
    prompt_ids = ids(tok, render_prompt(tok, example.messages))
    response_ids = ids(tok, example.response) + [tok.eos_token_id]
    assert item["input_ids"] == prompt_ids + response_ids
    assert item["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    assert item["labels"][-1] == tok.eos_token_id  # the model learns to stop
    assert tok.decode(item["input_ids"]) == render_prompt(tok, example.messages) + example.response + "<|im_end|>"
    assert report.skipped == 0


def test_sft_plain_format_puts_a_space_before_the_response(plain_tokenizer):
    tok = plain_tokenizer
    (item,), _ = tokenize_sft([SFTExample(user("hello"), "good answer", "x")], tok, max_length=64,
                              max_prompt_length=32)
    assert tok.decode(item["input_ids"]) == "User: hello\nAssistant: good answer<|im_end|>"
    n_prompt = len(ids(tok, "User: hello\nAssistant:"))
    assert item["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert IGNORE_INDEX not in item["labels"][n_prompt:]


def test_long_prompt_is_left_truncated_and_response_capped(bpe_tokenizer):
    tok = bpe_tokenizer
    long_prompt = " ".join(["the cat sat on the mat"] * 20) + " final question?"
    response = " ".join(["good dog"] * 30)
    example = SFTExample(user(long_prompt), response, "d.jsonl line 4")
    (item,), _ = tokenize_sft([example], tok, max_length=40, max_prompt_length=16)
    full_prompt = ids(tok, render_prompt(tok, example.messages))
    assert len(full_prompt) > 16
    assert item["input_ids"][:16] == full_prompt[-16:]  # the end of the prompt is kept
    assert len(item["input_ids"]) == len(item["labels"]) == 40
    assert item["labels"][:16] == [IGNORE_INDEX] * 16
    assert item["input_ids"][16:] == ids(tok, response)[:24]  # capped; the EOS went with the cut
    assert tok.eos_token_id not in item["input_ids"][16:]


def test_left_truncation_keeps_a_leading_bos(plain_tokenizer):
    from tokenizers import processors

    tok = copy.deepcopy(plain_tokenizer)
    # A Llama-like tokenizer: BOS in front of every text (here the <|endoftext|> token, id 0).
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    tok.bos_token = "<|endoftext|>"
    example = SFTExample(user(" ".join(["the cat sat on the mat"] * 10)), "ok", "x")
    (item,), _ = tokenize_sft([example], tok, max_length=20, max_prompt_length=10)
    full = tok(render_prompt(tok, example.messages))["input_ids"]
    assert full[0] == tok.bos_token_id == 0
    assert item["input_ids"][:10] == [0] + full[-9:]


def test_no_response_tokens_after_truncation(bpe_tokenizer):
    example = SFTExample(user("tell me a long joke about the cat and the dog"), "ok", "d.jsonl line 9")
    with pytest.raises(DataError, match=r"^d\.jsonl line 9: field 'response': expected at least one response "
                                        r"token after truncation, got none \(prompt is 8 tokens, max_length=8\)"):
        tokenize_sft([example], bpe_tokenizer, max_length=8, max_prompt_length=8)
    fine = SFTExample(user("hi"), "ok", "d.jsonl line 10")
    items, report = tokenize_sft([example, fine], bpe_tokenizer, max_length=16, max_prompt_length=16,
                                 skip_invalid=True)
    assert len(items) == 1 and report.reasons == {"no response tokens after truncation": 1}
    assert report.summary() == "skipped 1 of 2 records: 1 no response tokens after truncation"


# --------------------------------------------------------------------------------------------------
# tokenize_preferences / tokenize_prompts
# --------------------------------------------------------------------------------------------------


def test_preferences_share_the_prompt_and_end_with_eos(bpe_tokenizer):
    tok = bpe_tokenizer
    example = PreferenceExample(user("say hello"), "hello friend!", "go away", "x")
    (item,), _ = tokenize_preferences([example], tok, max_length=64, max_prompt_length=32)
    prompt_ids = ids(tok, render_prompt(tok, example.messages))
    assert item["chosen_ids"] == prompt_ids + ids(tok, "hello friend!") + [tok.eos_token_id]
    assert item["rejected_ids"] == prompt_ids + ids(tok, "go away") + [tok.eos_token_id]


def test_preferences_identical_after_truncation(bpe_tokenizer):
    tok = bpe_tokenizer
    prompt_len = len(ids(tok, render_prompt(tok, user("hi"))))
    example = PreferenceExample(user("hi"), "the cat sat on the mat and slept", "the cat sat on the mat and ran",
                                "p.jsonl line 2")
    with pytest.raises(DataError, match=r"^p\.jsonl line 2: field 'rejected': expected tokens different from "
                                        r"'chosen' after truncation"):
        tokenize_preferences([example], tok, max_length=prompt_len + 2, max_prompt_length=prompt_len)
    other = PreferenceExample(user("hi"), "yes", "no", "p.jsonl line 3")
    items, report = tokenize_preferences([example, other], tok, max_length=prompt_len + 2,
                                         max_prompt_length=prompt_len, skip_invalid=True)
    assert len(items) == 1 and report.reasons == {"chosen equals rejected after truncation": 1}


def test_tokenize_prompts(bpe_tokenizer):
    tok = bpe_tokenizer
    short = PromptExample(user("hello"), "a")
    long = PromptExample(user(" ".join(["the cat sat on the mat"] * 10)), "b")
    items = tokenize_prompts([short, long], tok, max_prompt_length=24)
    assert items[0]["prompt_text"] == render_prompt(tok, short.messages)
    assert items[0]["prompt_ids"] == ids(tok, items[0]["prompt_text"])
    assert items[0]["messages"] == short.messages
    assert len(items[1]["prompt_ids"]) == 24
    assert items[1]["prompt_text"].endswith("<|im_start|>assistant\n")
    assert ids(tok, render_prompt(tok, long.messages))[-24:] == items[1]["prompt_ids"]


# --------------------------------------------------------------------------------------------------
# Padding
# --------------------------------------------------------------------------------------------------


def test_pad_batch_right_and_left():
    input_ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=0)
    assert input_ids.dtype == torch.long and mask.dtype == torch.long
    assert input_ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    input_ids, mask = pad_batch([[1, 2, 3], [4]], pad_id=9, side="left")
    assert input_ids.tolist() == [[1, 2, 3], [9, 9, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_collate_sft_and_preferences():
    batch = collate_sft([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    pairs = collate_preferences([{"chosen_ids": [1, 2], "rejected_ids": [1]}, {"chosen_ids": [3], "rejected_ids": [3, 4, 5]}], 0)
    assert pairs["input_ids"].shape == (4, 3)
    assert pairs["input_ids"].tolist() == [[1, 2, 0], [3, 0, 0], [1, 0, 0], [3, 4, 5]]


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sft_rows(n: int) -> list[dict]:
    return [{"prompt": f"question {i} about the cat?", "response": f"answer {i}: the cat sat."} for i in range(n)]


def test_load_sft_data_splits_caches_and_rekeys(bpe_tokenizer, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "sft.jsonl", sft_rows(20))
    cfg = DataConfig(train_path=str(path), eval_fraction=0.25, max_length=64, max_prompt_length=32)
    cache = tmp_path / "cache"
    train, evaluation = load_sft_data(cfg, bpe_tokenizer, seed=3, cache_dir=cache)
    assert (len(train), len(evaluation)) == (15, 5)
    assert set(train[0]) == {"input_ids", "labels"}
    assert len(list(cache.glob("*.json"))) == 2  # train and eval

    # A second call is served from the cache: tokenising again would fail.
    def fail(*args, **kwargs):
        raise AssertionError("tokenize_sft called despite a cache hit")

    monkeypatch.setattr(data_datasets, "tokenize_sft", fail)
    assert load_sft_data(cfg, bpe_tokenizer, seed=3, cache_dir=cache) == (train, evaluation)
    monkeypatch.undo()

    shorter = cfg.model_copy(update={"max_length": 48})
    load_sft_data(shorter, bpe_tokenizer, seed=3, cache_dir=cache)
    assert len(list(cache.glob("*.json"))) == 4  # a new key for a new max_length
    write_jsonl(path, sft_rows(21))
    train2, _ = load_sft_data(cfg, bpe_tokenizer, seed=3, cache_dir=cache)
    assert len(train2) == 16  # the file changed: rebuilt, not served stale


def test_load_default_uses_default_eval(bpe_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "DEFAULT_DATA_DIR", tmp_path)
    write_jsonl(tmp_path / "train.jsonl", sft_rows(6))
    write_jsonl(tmp_path / "eval.jsonl", sft_rows(2))
    cfg = DataConfig(max_length=64, max_prompt_length=32)
    train, evaluation = load_sft_data(cfg, bpe_tokenizer, seed=0, cache_dir=tmp_path / "cache")
    assert (len(train), len(evaluation)) == (6, 2)


def test_load_preference_data_from_scored_csv_logs_ties(bpe_tokenizer, tmp_path, caplog):
    path = tmp_path / "scored.csv"
    path.write_text(
        "question,completion,score\n"
        "how do I make tea?,boil water,3\nhow do I make tea?,no idea,1\nhow do I make tea?,buy some,1\n"
        "why is the sun happy?,it is warm,2\nwhy is the sun happy?,go away,0\n"
    )
    cfg = DataConfig(train_path=str(path), columns={"user_input": "question"}, eval_fraction=0.0,
                     max_length=64, max_prompt_length=32)
    with caplog.at_level(logging.WARNING, logger="rlhf.data"):
        train, evaluation = load_preference_data(cfg, bpe_tokenizer, seed=0, cache_dir=tmp_path / "cache")
    assert len(train) == 3 and evaluation == []
    assert set(train[0]) == {"chosen_ids", "rejected_ids"}
    assert "1 pairs dropped for tied scores" in caplog.text


def test_load_prompt_data_with_phase_split(bpe_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "all.jsonl", sft_rows(50))
    cfg = DataConfig(train_path=str(path), phase_split="2,4,4", eval_fraction=0.0, max_length=64,
                     max_prompt_length=32)
    cache = tmp_path / "cache"
    sft, _ = load_sft_data(cfg, bpe_tokenizer, seed=1, cache_dir=cache)
    prompts, _ = load_prompt_data(cfg, bpe_tokenizer, seed=1, cache_dir=cache)  # phase 2 by default
    rm_prompts, _ = load_prompt_data(cfg, bpe_tokenizer, seed=1, phase=1, cache_dir=cache)
    assert (len(sft), len(rm_prompts), len(prompts)) == (10, 20, 20)
    questions = {p["messages"][0]["content"] for p in prompts} | {p["messages"][0]["content"] for p in rm_prompts}
    assert len(questions) == 40  # the rm and ppo shares do not overlap
    capped = cfg.model_copy(update={"max_records": 5})
    assert len(load_prompt_data(capped, bpe_tokenizer, seed=1, cache_dir=cache)[0]) == 5


def test_load_empty_phase_share_names_the_source(bpe_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "all.jsonl", sft_rows(5))
    cfg = DataConfig(train_path=str(path), phase_split="0,1,1", max_length=64, max_prompt_length=32)
    with pytest.raises(DataError, match=rf"{path}: the sft share \(phase 0\) of phase_split '0,1,1' is empty"):
        load_sft_data(cfg, bpe_tokenizer, seed=0, cache_dir=tmp_path / "cache")


def test_load_with_skip_invalid_logs_the_summary(bpe_tokenizer, tmp_path, caplog):
    path = tmp_path / "mixed.jsonl"
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in sft_rows(3)) + "{broken\n" + json.dumps({"prompt": "x", "response": ""})
        + "\n"
    )
    cfg = DataConfig(train_path=str(path), eval_fraction=0.0, skip_invalid=True, max_length=64, max_prompt_length=32)
    with caplog.at_level(logging.WARNING, logger="rlhf.data"):
        train, _ = load_sft_data(cfg, bpe_tokenizer, seed=0, cache_dir=tmp_path / "cache")
    assert len(train) == 3
    assert "skipped 1 of 5 records: 1 malformed JSON" in caplog.text
    assert "skipped 1 of 4 records: 1 empty field 'response'" in caplog.text
    strict = cfg.model_copy(update={"skip_invalid": False})
    with pytest.raises(DataError, match=rf"{path} line 4: not valid JSON"):
        load_sft_data(strict, bpe_tokenizer, seed=0, cache_dir=tmp_path / "cache")


def test_tokenizer_fingerprint_covers_the_chat_template(bpe_tokenizer, plain_tokenizer):
    assert tokenizer_fingerprint(bpe_tokenizer) == tokenizer_fingerprint(copy.deepcopy(bpe_tokenizer))
    assert tokenizer_fingerprint(bpe_tokenizer) != tokenizer_fingerprint(plain_tokenizer)
