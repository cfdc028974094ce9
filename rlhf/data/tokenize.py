"""Turn examples into token ids with any Hugging Face tokenizer, and pad them into batches.

Truncation policy (the same for SFT, preferences and prompts):

- The prompt is rendered (chat template, or the plain ``Role: content`` format) and tokenised on its own.
  A prompt longer than ``max_prompt_length`` tokens is LEFT-truncated: the end of the conversation, which
  the response answers, is kept. A leading BOS token is kept in front of what remains.
- The response is tokenised on its own (``add_special_tokens=False``) so the prompt/response boundary is
  exact, and followed by the tokenizer's EOS token so the model learns to stop.
- The response (with its EOS) is capped to ``max_length - len(prompt_ids)`` tokens. A capped response
  loses its EOS too: the model must not learn to stop in mid-sentence.
- A record left with no response tokens is an error (or a counted skip with ``skip_invalid``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from rlhf.data.errors import DataError, SkipReport
from rlhf.data.formats import Messages, PreferenceExample, PromptExample, SFTExample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # label of tokens that carry no loss (the prompt, padding); PyTorch's default ignore_index


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: PreTrainedTokenizerBase, messages: Messages, *, chat_template: bool = True) -> str:
    """The text the model sees before its response.

    With ``chat_template`` and a tokenizer that has one: ``apply_chat_template(..., add_generation_prompt=True)``.
    Otherwise a plain format, one ``"{Role}: {content}\\n"`` per message followed by ``"Assistant:"``.
    """
    if chat_template and has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"


def _uses_template(tokenizer: PreTrainedTokenizerBase, chat_template: bool) -> bool:
    return chat_template and has_chat_template(tokenizer)


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no eos_token: set one so responses can end")
    return int(eos)


def _prompt_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], *, chat_template: bool,
                max_prompt_length: int) -> tuple[list[list[int]], list[bool]]:
    """Tokenise rendered prompts and left-truncate each to ``max_prompt_length`` (keeping a leading BOS).

    Returns the ids and, per prompt, whether it was truncated.
    """
    if max_prompt_length <= 0:
        raise ValueError(f"max_prompt_length must be positive, got {max_prompt_length}")
    # A chat template writes its own special tokens (BOS included); the plain format needs the tokenizer's.
    add_special = not _uses_template(tokenizer, chat_template)
    encoded = tokenizer(texts, add_special_tokens=add_special)["input_ids"] if texts else []
    bos = tokenizer.bos_token_id
    out, truncated = [], []
    for ids in encoded:
        ids = list(ids)
        truncated.append(len(ids) > max_prompt_length)
        if len(ids) > max_prompt_length:
            if bos is not None and ids[0] == bos and max_prompt_length > 1:
                ids = [bos] + ids[len(ids) - (max_prompt_length - 1):]
            else:
                ids = ids[len(ids) - max_prompt_length:]
        out.append(ids)
    return out, truncated


def _response_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str], *, chat_template: bool) -> list[list[int]]:
    """Tokenise responses on their own, each followed by EOS."""
    eos = _eos_id(tokenizer)
    # In the plain format the prompt ends with "Assistant:"; the space belongs to the response's first token.
    if not _uses_template(tokenizer, chat_template):
        texts = [" " + t for t in texts]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    return [list(ids) + [eos] for ids in encoded]


def _no_room(where: str, prompt_len: int, max_length: int, field: str) -> DataError:
    return DataError(
        f"{where}: field '{field}': expected at least one response token after truncation, got none "
        f"(prompt is {prompt_len} tokens, max_length={max_length})",
        reason="no response tokens after truncation",
    )


def _check_lengths(max_length: int, max_prompt_length: int) -> None:
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}")
    if max_prompt_length <= 0:
        raise ValueError(f"max_prompt_length must be positive, got {max_prompt_length}")


def tokenize_sft(examples: list[SFTExample], tokenizer: PreTrainedTokenizerBase, *, max_length: int,
                 max_prompt_length: int, chat_template: bool = True,
                 skip_invalid: bool = False) -> tuple[list[dict[str, list[int]]], SkipReport]:
    """SFT examples -> ``{"input_ids": [...], "labels": [...]}`` (same length, at most ``max_length``).

    ``labels`` is -100 on prompt tokens and equals ``input_ids`` on response tokens and the EOS after
    them. Truncation follows the module docstring's policy.
    """
    _check_lengths(max_length, max_prompt_length)
    report = SkipReport(total=len(examples))
    texts = [render_prompt(tokenizer, e.messages, chat_template=chat_template) for e in examples]
    prompts, _ = _prompt_ids(tokenizer, texts, chat_template=chat_template, max_prompt_length=max_prompt_length)
    responses = _response_ids(tokenizer, [e.response for e in examples], chat_template=chat_template)
    items = []
    for example, prompt, response in zip(examples, prompts, responses):
        response = response[: max(0, max_length - len(prompt))]
        if not response:
            error = _no_room(example.where, len(prompt), max_length, "response")
            if not skip_invalid:
                raise error
            report.skip(error.reason, example.where)
            continue
        items.append({"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response})
    if examples and not items:
        raise DataError(f"no SFT examples left after tokenisation: {report.summary()}; {report.locations()}")
    return items, report


def tokenize_preferences(examples: list[PreferenceExample], tokenizer: PreTrainedTokenizerBase, *,
                         max_length: int, max_prompt_length: int, chat_template: bool = True,
                         skip_invalid: bool = False) -> tuple[list[dict[str, list[int]]], SkipReport]:
    """Preference examples -> ``{"chosen_ids": [...], "rejected_ids": [...]}``, each prompt + response + EOS.

    Same truncation policy as :func:`tokenize_sft`. Pairs whose two sequences are identical after
    truncation carry no preference signal: an error, or a counted skip with ``skip_invalid``.
    """
    _check_lengths(max_length, max_prompt_length)
    report = SkipReport(total=len(examples))
    texts = [render_prompt(tokenizer, e.messages, chat_template=chat_template) for e in examples]
    prompts, _ = _prompt_ids(tokenizer, texts, chat_template=chat_template, max_prompt_length=max_prompt_length)
    chosen_all = _response_ids(tokenizer, [e.chosen for e in examples], chat_template=chat_template)
    rejected_all = _response_ids(tokenizer, [e.rejected for e in examples], chat_template=chat_template)
    items = []
    for example, prompt, chosen, rejected in zip(examples, prompts, chosen_all, rejected_all):
        room = max(0, max_length - len(prompt))
        chosen, rejected = chosen[:room], rejected[:room]
        error = None
        if not chosen or not rejected:
            error = _no_room(example.where, len(prompt), max_length, "chosen" if not chosen else "rejected")
        elif chosen == rejected:
            error = DataError(
                f"{example.where}: field 'rejected': expected tokens different from 'chosen' after truncation "
                f"to max_length={max_length}, got the same {len(prompt) + len(chosen)} tokens",
                reason="chosen equals rejected after truncation",
            )
        if error is not None:
            if not skip_invalid:
                raise error
            report.skip(error.reason, example.where)
            continue
        items.append({"chosen_ids": prompt + chosen, "rejected_ids": prompt + rejected})
    if examples and not items:
        raise DataError(f"no preference pairs left after tokenisation: {report.summary()}; {report.locations()}")
    return items, report


def tokenize_prompts(examples: list[PromptExample], tokenizer: PreTrainedTokenizerBase, *,
                     max_prompt_length: int, chat_template: bool = True) -> list[dict[str, Any]]:
    """Prompt examples -> ``{"prompt_ids", "prompt_text", "messages"}``.

    ``prompt_text`` is the text of ``prompt_ids`` (the rendered prompt, or the decoded tail of it when
    left-truncated). ``messages`` is the untruncated conversation, for judges and for writing pairs.
    """
    texts = [render_prompt(tokenizer, e.messages, chat_template=chat_template) for e in examples]
    prompts, cut = _prompt_ids(tokenizer, texts, chat_template=chat_template, max_prompt_length=max_prompt_length)
    items = []
    for example, text, ids, truncated in zip(examples, texts, prompts, cut):
        items.append({
            "prompt_ids": ids,
            "prompt_text": tokenizer.decode(ids, skip_special_tokens=False) if truncated else text,
            "messages": example.messages,
        })
    return items


def pad_batch(sequences: list[list[int]], pad_id: int, *, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token lists to one length.

    Returns ``input_ids`` and ``attention_mask``, both LongTensor ``(batch, seq)`` with ``seq`` the longest
    length; the mask is 1 on real tokens. ``side="left"`` pads in front (for generation).
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    if not sequences:
        raise ValueError("pad_batch needs at least one sequence")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if not seq:
            continue
        cols = slice(0, len(seq)) if side == "right" else slice(width - len(seq), width)
        input_ids[row, cols] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, cols] = 1
    return input_ids, attention_mask


def collate_sft(items: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """SFT items -> ``input_ids``, ``attention_mask``, ``labels``: LongTensor ``(batch, seq)``, right-padded;
    labels are -100 on padding."""
    input_ids, attention_mask = pad_batch([item["input_ids"] for item in items], pad_id)
    labels, _ = pad_batch([item["labels"] for item in items], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_preferences(items: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Preference items -> ``input_ids``, ``attention_mask``: LongTensor ``(2 * batch, seq)``, right-padded;
    rows ``[:batch]`` are the chosen sequences and rows ``[batch:]`` the rejected ones, so one forward
    pass scores both."""
    sequences = [item["chosen_ids"] for item in items] + [item["rejected_ids"] for item in items]
    input_ids, attention_mask = pad_batch(sequences, pad_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask}
