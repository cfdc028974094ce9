"""Normalise raw records of several layouts into SFT, preference and prompt examples.

A conversation is a list of OpenAI-style messages ``{"role": "system"|"user"|"assistant", "content": str}``.
The layout of each record is detected from the fields it has:

SFT (:func:`to_sft_examples`)
    ``prompt``/``response``; ``prompt``/``chosen`` (Dahoas rm-static: the chosen answer is the response);
    ChatLLaMA ``user_input``/``completion``; chat ``messages`` (the last message, an assistant one, is
    the response); Anthropic-HH ``text`` or ``chosen`` as one string
    ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` (the last Assistant turn is the response).
Preferences (:func:`to_preference_examples`)
    ``prompt``/``chosen``/``rejected`` (Dahoas rm-static); ``chosen``/``rejected`` as full HH texts (split at
    the last Assistant turn; both must share the same conversation before it); ChatLLaMA scored records
    ``user_input``/``completion``/``score``, grouped by prompt: every two completions of one prompt with
    different scores make one pair, the higher score chosen (ties make no pair and are counted).
Prompts (:func:`to_prompt_examples`)
    ``messages`` (a trailing assistant message is dropped), ``prompt``, ``user_input``, and the prompt part
    of the HH layouts ``text`` / ``chosen``.

A ``prompt`` string that starts with ``Human:`` (after whitespace) is read as an HH conversation, so
Dahoas-style prompts ``"\\n\\nHuman: ...\\n\\nAssistant:"`` become proper messages. Responses are stripped
of surrounding whitespace (the chat template or plain format supplies the separators).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from rlhf.config import DataConfig
from rlhf.data.errors import DataError, SkipReport, bad_field, missing_field
from rlhf.data.readers import Record

ROLES = ("system", "user", "assistant")
DEFAULT_MAX_RECORD_CHARS: int = DataConfig.model_fields["max_record_chars"].default  # one default, in config

SFT_LAYOUTS = (
    "prompt/response",
    "prompt/chosen (rm-static)",
    "user_input/completion (ChatLLaMA)",
    "messages (chat)",
    "text or chosen (Anthropic HH string)",
)
PREFERENCE_LAYOUTS = (
    "prompt/chosen/rejected (rm-static)",
    "chosen/rejected (Anthropic HH strings)",
    "user_input/completion/score (ChatLLaMA scored)",
)
PROMPT_LAYOUTS = ("messages (chat)", "prompt", "user_input (ChatLLaMA)", "text or chosen (Anthropic HH string)")

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class SFTExample:
    """A conversation before the response, the response, and where the record came from."""

    messages: Messages
    response: str
    where: str


@dataclass(frozen=True)
class PreferenceExample:
    """A conversation and two responses to it, the chosen one preferred."""

    messages: Messages
    chosen: str
    rejected: str
    where: str


@dataclass(frozen=True)
class PromptExample:
    """A conversation to generate a response to (PPO rollouts)."""

    messages: Messages
    where: str


# --------------------------------------------------------------------------------------------------
# Field checks
# --------------------------------------------------------------------------------------------------


def _string(fields: dict[str, Any], name: str, where: str) -> str:
    """The field as a non-empty string, else a DataError naming it."""
    if name not in fields:
        raise missing_field(where, name, list(map(str, fields)))
    value = fields[name]
    if not isinstance(value, str) or not value.strip():
        raise bad_field(where, name, "a non-empty string", value)
    return value


def _score(fields: dict[str, Any], name: str, where: str) -> float:
    """A finite number; numeric strings are accepted because CSV has no other kind of value."""
    if name not in fields:
        raise missing_field(where, name, list(map(str, fields)))
    value = fields[name]
    number: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise bad_field(where, name, "a finite number", value, reason=f"invalid field '{name}'")
    return number


def _text_length(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(len(m["content"]) for m in value if isinstance(m, dict) and isinstance(m.get("content"), str))
    return 0


def _check_length(fields: dict[str, Any], names: Iterable[str], where: str, max_chars: int) -> None:
    """Refuse records whose text (the fields the layout uses) is longer than ``max_chars``."""
    lengths = {name: _text_length(fields.get(name)) for name in names}
    total = sum(lengths.values())
    if total > max_chars:
        longest = max(lengths, key=lengths.__getitem__)
        raise DataError(
            f"{where}: field '{longest}': expected a record of at most max_record_chars={max_chars} "
            f"characters, got {total}",
            reason=f"longer than {max_chars} characters",
        )


def _messages(value: Any, name: str, where: str) -> Messages:
    """Validate a list of role/content dicts; returns clean copies with only those two keys."""
    if not isinstance(value, list) or not value:
        raise bad_field(where, name, "a non-empty list of {role, content} messages", value,
                        reason=f"invalid field '{name}'")
    out: Messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise bad_field(where, f"{name}[{i}]", "a {role, content} object", message,
                            reason=f"invalid field '{name}'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise bad_field(where, f"{name}[{i}].role", f"one of {', '.join(ROLES)}", role,
                            reason=f"invalid field '{name}'")
        if not isinstance(content, str) or not content.strip():
            reason = f"empty field '{name}'" if isinstance(content, str) else f"invalid field '{name}'"
            raise bad_field(where, f"{name}[{i}].content", "a non-empty string", content, reason=reason)
        out.append({"role": role, "content": content})
    return out


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def _is_hh(text: str) -> bool:
    return text.lstrip().startswith("Human:")


def _parse_hh(text: str, name: str, where: str) -> Messages:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> user/assistant messages (contents stripped; the last may be empty)."""
    expected = "an Anthropic-HH conversation '\\n\\nHuman: ...\\n\\nAssistant: ...'"
    if not isinstance(text, str) or not text.strip():
        raise bad_field(where, name, expected, text)
    if not _is_hh(text):
        raise bad_field(where, name, expected, text, reason=f"invalid field '{name}'")
    parts = _HH_TURN.split("\n\n" + text.lstrip())
    # parts = ["", role, content, role, content, ...]; the first is whatever came before the first turn.
    turns = [{"role": _HH_ROLES[parts[i]], "content": parts[i + 1].strip()} for i in range(1, len(parts), 2)]
    for i, turn in enumerate(turns[:-1]):
        if not turn["content"]:
            raise bad_field(where, name, f"{expected} with no empty turns (turn {i + 1} is empty)", text,
                            reason=f"empty turn in field '{name}'")
    return turns


def _split_hh(text: Any, name: str, where: str) -> tuple[Messages, str]:
    """An HH text -> (conversation before the last Assistant turn, that turn's content)."""
    turns = _parse_hh(text, name, where)
    if turns[-1]["role"] != "assistant":
        raise bad_field(where, name, "an HH conversation ending with an '\\n\\nAssistant:' turn", text,
                        reason=f"invalid field '{name}'")
    if not turns[-1]["content"]:
        raise bad_field(where, name, "a non-empty last '\\n\\nAssistant:' turn", text,
                        reason=f"empty field '{name}'")
    if len(turns) < 2:
        raise bad_field(where, name, "an HH conversation with a Human turn before the last Assistant turn", text,
                        reason=f"invalid field '{name}'")
    return turns[:-1], turns[-1]["content"]


def _prompt(fields: dict[str, Any], name: str, where: str) -> Messages:
    """A prompt field: a string (an HH conversation or one user message) or a list of messages."""
    if name not in fields:
        raise missing_field(where, name, list(map(str, fields)))
    value = fields[name]
    if isinstance(value, list):
        return _messages(value, name, where)
    text = _string(fields, name, where)
    if _is_hh(text):
        turns = _parse_hh(text, name, where)
        if turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
            turns = turns[:-1]  # rm-static prompts end with an empty "Assistant:" turn to be answered
        if not turns or not turns[-1]["content"]:
            raise bad_field(where, name, "a non-empty prompt", text, reason=f"empty field '{name}'")
        return turns
    return [{"role": "user", "content": text}]


def _unknown_layout(fields: dict[str, Any], where: str, layouts: tuple[str, ...]) -> DataError:
    found = ", ".join(map(str, fields)) or "(none)"
    return DataError(
        f"{where}: unknown record layout: the record has fields {found}; expected one of: {'; '.join(layouts)}",
        reason="unknown layout",
    )


# --------------------------------------------------------------------------------------------------
# One record -> one example
# --------------------------------------------------------------------------------------------------


def sft_example(record: Record, max_record_chars: int = DEFAULT_MAX_RECORD_CHARS) -> SFTExample:
    """One record -> an SFTExample, or a DataError naming the record and the field."""
    fields, where = record.fields, record.where
    if "messages" in fields:
        _check_length(fields, ["messages"], where, max_record_chars)
        messages = _messages(fields["messages"], "messages", where)
        if messages[-1]["role"] != "assistant":
            raise bad_field(where, f"messages[{len(messages) - 1}].role",
                            "'assistant' (the last message is the response)", messages[-1]["role"],
                            reason="last message not from the assistant")
        if len(messages) < 2:
            raise bad_field(where, "messages", "at least one message before the assistant's response",
                            fields["messages"], reason="invalid field 'messages'")
        return SFTExample(messages[:-1], messages[-1]["content"].strip(), where)
    if "prompt" in fields:
        answer = "chosen" if "response" not in fields and "chosen" in fields else "response"
        _check_length(fields, ["prompt", answer], where, max_record_chars)
        messages = _prompt(fields, "prompt", where)
        return SFTExample(messages, _string(fields, answer, where).strip(), where)
    if "user_input" in fields:
        _check_length(fields, ["user_input", "completion"], where, max_record_chars)
        prompt = _string(fields, "user_input", where)
        response = _string(fields, "completion", where)
        return SFTExample([{"role": "user", "content": prompt}], response.strip(), where)
    for name in ("text", "chosen"):
        if name in fields:
            _check_length(fields, [name], where, max_record_chars)
            messages, response = _split_hh(fields[name], name, where)
            return SFTExample(messages, response, where)
    raise _unknown_layout(fields, where, SFT_LAYOUTS)


def preference_example(record: Record, max_record_chars: int = DEFAULT_MAX_RECORD_CHARS) -> PreferenceExample:
    """One record of the prompt/chosen/rejected or HH chosen/rejected layout -> a PreferenceExample."""
    fields, where = record.fields, record.where
    if "prompt" in fields:
        _check_length(fields, ["prompt", "chosen", "rejected"], where, max_record_chars)
        messages = _prompt(fields, "prompt", where)
        chosen = _string(fields, "chosen", where).strip()
        rejected = _string(fields, "rejected", where).strip()
    elif "chosen" in fields or "rejected" in fields:
        _check_length(fields, ["chosen", "rejected"], where, max_record_chars)
        _string(fields, "chosen", where)
        _string(fields, "rejected", where)
        messages, chosen = _split_hh(fields["chosen"], "chosen", where)
        other, rejected = _split_hh(fields["rejected"], "rejected", where)
        if other != messages:
            raise bad_field(where, "rejected", "the same conversation as 'chosen' before the last Assistant turn",
                            fields["rejected"], reason="chosen and rejected conversations differ")
    else:
        raise _unknown_layout(fields, where, PREFERENCE_LAYOUTS)
    if chosen == rejected:
        raise bad_field(where, "rejected", "a response different from 'chosen'", rejected,
                        reason="chosen equals rejected")
    return PreferenceExample(messages, chosen, rejected, where)


def prompt_example(record: Record, max_record_chars: int = DEFAULT_MAX_RECORD_CHARS) -> PromptExample:
    """One record -> a PromptExample (the prompt part of any SFT or preference layout)."""
    fields, where = record.fields, record.where
    if "messages" in fields:
        _check_length(fields, ["messages"], where, max_record_chars)
        messages = _messages(fields["messages"], "messages", where)
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # a finished conversation: its prompt is what came before the answer
        if not messages:
            raise bad_field(where, "messages", "at least one message before a trailing assistant message",
                            fields["messages"], reason="invalid field 'messages'")
        return PromptExample(messages, where)
    for name in ("prompt", "user_input"):
        if name in fields:
            _check_length(fields, [name], where, max_record_chars)
            return PromptExample(_prompt(fields, name, where), where)
    for name in ("text", "chosen"):
        if name in fields:
            _check_length(fields, [name], where, max_record_chars)
            turns = _parse_hh(fields[name], name, where)
            if turns[-1]["role"] == "assistant":
                turns = turns[:-1]
            if not turns:
                raise bad_field(where, name, "an HH conversation with a Human turn", fields[name],
                                reason=f"invalid field '{name}'")
            return PromptExample(turns, where)
    raise _unknown_layout(fields, where, PROMPT_LAYOUTS)


# --------------------------------------------------------------------------------------------------
# Many records
# --------------------------------------------------------------------------------------------------


def _convert_all(records: list[Record], convert: Callable[[Record], list], skip_invalid: bool,
                 report: SkipReport) -> list:
    """Apply ``convert`` to each record; on DataError raise, or count a skip when ``skip_invalid``."""
    out: list = []
    for record in records:
        try:
            out.extend(convert(record))
        except DataError as exc:
            if not skip_invalid:
                raise
            report.skip(exc.reason, record.where)
    return out


def _nothing_left(records: list[Record], report: SkipReport) -> DataError:
    return DataError(
        f"no usable examples in {len(records)} records ({records[0].where} ...): "
        f"{report.summary()}; {report.locations()}"
    )


def to_sft_examples(records: list[Record], *, skip_invalid: bool = False,
                    max_record_chars: int = DEFAULT_MAX_RECORD_CHARS) -> tuple[list[SFTExample], SkipReport]:
    """Records -> SFT examples. With ``skip_invalid`` bad records are counted in the report, not raised."""
    records = list(records)
    report = SkipReport(total=len(records))
    examples = _convert_all(records, lambda r: [sft_example(r, max_record_chars)], skip_invalid, report)
    if records and not examples:
        raise _nothing_left(records, report)
    return examples, report


def to_preference_examples(records: list[Record], *, skip_invalid: bool = False,
                           max_record_chars: int = DEFAULT_MAX_RECORD_CHARS,
                           ) -> tuple[list[PreferenceExample], SkipReport]:
    """Records -> preference pairs.

    Scored records (``user_input``/``completion``/``score``) are grouped by prompt (in order of first
    appearance); each two completions of a prompt with different scores make one pair, the higher score
    chosen. Ties make no pair and are counted in ``report.notes``, as are prompts with one completion.
    """
    records = list(records)
    report = SkipReport(total=len(records))
    groups: dict[str, list[tuple[str, float, str]]] = {}

    def convert(record: Record) -> list[PreferenceExample]:
        fields, where = record.fields, record.where
        if "user_input" in fields and "prompt" not in fields and "chosen" not in fields:
            _check_length(fields, ["user_input", "completion"], where, max_record_chars)
            prompt = _string(fields, "user_input", where)
            completion = _string(fields, "completion", where).strip()
            score = _score(fields, "score", where)
            groups.setdefault(prompt.strip(), []).append((completion, score, where))
            return []  # paired below, once every completion of the prompt is known
        return [preference_example(record, max_record_chars)]

    examples = _convert_all(records, convert, skip_invalid, report)
    for prompt, completions in groups.items():
        if len(completions) == 1:
            report.note("prompts with a single scored completion (no pair)")
        for i in range(len(completions)):
            for j in range(i + 1, len(completions)):
                (text_a, score_a, where_a), (text_b, score_b, where_b) = completions[i], completions[j]
                if score_a == score_b:
                    report.note("pairs dropped for tied scores")
                    continue
                (chosen, _, where_c), (rejected, _, where_r) = (
                    (completions[i], completions[j]) if score_a > score_b else (completions[j], completions[i])
                )
                where = f"{where_c} and {where_r}"
                if chosen == rejected:
                    error = bad_field(where, "completion", "different completions for different scores",
                                      rejected, reason="chosen equals rejected")
                    if not skip_invalid:
                        raise error
                    report.skip(error.reason, where)
                    continue
                examples.append(PreferenceExample([{"role": "user", "content": prompt}], chosen, rejected, where))
    if records and not examples:
        raise _nothing_left(records, report)
    return examples, report


def to_prompt_examples(records: list[Record], *, skip_invalid: bool = False,
                       max_record_chars: int = DEFAULT_MAX_RECORD_CHARS) -> tuple[list[PromptExample], SkipReport]:
    """Records -> prompts. Repeated prompts (several completions of one prompt) are kept once and counted."""
    records = list(records)
    report = SkipReport(total=len(records))
    seen: set[str] = set()

    def convert(record: Record) -> list[PromptExample]:
        example = prompt_example(record, max_record_chars)
        key = repr(example.messages)
        if key in seen:
            report.note("duplicate prompts dropped")
            return []
        seen.add(key)
        return [example]

    examples = _convert_all(records, convert, skip_invalid, report)
    if records and not examples:
        raise _nothing_left(records, report)
    return examples, report


def last_user_text(messages: Messages) -> str:
    """The last user turn of a conversation: what judges and reward functions read as the prompt."""
    return next((m["content"] for m in reversed(messages) if m["role"] == "user"), messages[-1]["content"])
