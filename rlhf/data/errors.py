"""Data errors and skip accounting.

Every :class:`DataError` message names where the problem is (file plus line, item or row), the field,
and what was expected, e.g. ``data/x.jsonl line 7: field 'response': expected a non-empty string, got 3``.
Its ``reason`` is a short, stable label (``"empty field 'response'"``) under which a record is counted
when the caller asked to skip invalid records instead of failing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class DataError(ValueError):
    """A problem with input data; the message says where it is and what was expected."""

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or "invalid record"


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters so a 100k-character field does not flood a message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def missing_field(where: str, name: str, present: list[str] | None = None) -> DataError:
    found = f"; the record has fields: {', '.join(present) or '(none)'}" if present is not None else ""
    return DataError(f"{where}: field '{name}': missing{found}", reason=f"missing field '{name}'")


def bad_field(where: str, name: str, expected: str, got: Any, *, reason: str | None = None) -> DataError:
    """A present field with a wrong value; the reason tells empty strings apart from wrong types."""
    if reason is not None:
        pass
    elif isinstance(got, str) and not got.strip():
        reason = f"empty field '{name}'"
    elif got is None:
        reason = f"null field '{name}'"
    else:
        reason = f"invalid field '{name}'"
    return DataError(f"{where}: field '{name}': expected {expected}, got {short_repr(got)}", reason=reason)


@dataclass
class SkipReport:
    """What was skipped, by reason.

    ``total`` is the number of records looked at; ``reasons`` counts skipped records by reason;
    ``notes`` counts things that are not skipped records (pairs dropped for tied scores, duplicate
    prompts); ``first`` keeps where each reason was first seen, to help find the bad record.
    """

    total: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    notes: dict[str, int] = field(default_factory=dict)
    first: dict[str, str] = field(default_factory=dict)

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    @property
    def empty(self) -> bool:
        """True when nothing was skipped and nothing noted."""
        return not self.reasons and not any(self.notes.values())

    def skip(self, reason: str, where: str) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self.first.setdefault(reason, where)

    def note(self, what: str, count: int = 1) -> None:
        if count:
            self.notes[what] = self.notes.get(what, 0) + count

    def merge(self, other: SkipReport) -> None:
        """Add another report's reasons and notes (``total`` is left to the caller)."""
        for reason, count in other.reasons.items():
            self.reasons[reason] = self.reasons.get(reason, 0) + count
        for what, count in other.notes.items():
            self.note(what, count)
        for reason, where in other.first.items():
            self.first.setdefault(reason, where)

    def summary(self) -> str:
        """E.g. ``skipped 3 of 120 records: 2 empty field 'response', 1 longer than 100000 characters``."""
        parts = [f"{count} {reason}" for reason, count in sorted(self.reasons.items(), key=lambda kv: -kv[1])]
        text = f"skipped {self.skipped} of {self.total} records"
        if parts:
            text += ": " + ", ".join(parts)
        notes = [f"{count} {what}" for what, count in self.notes.items() if count]
        if notes:
            text += "; " + ", ".join(notes)
        return text

    def locations(self) -> str:
        """Where each skip reason was first seen, e.g. ``empty field 'response' first at x.jsonl line 7``."""
        return "; ".join(f"{reason} first at {where}" for reason, where in self.first.items())
