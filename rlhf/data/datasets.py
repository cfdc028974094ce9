"""What the training stages call: config in, tokenised train and eval items out.

Each loader does, in order:

1. read the training records from ``cfg.train_path`` (``cfg.columns`` applied);
2. with ``cfg.phase_split`` (e.g. ``"2,4,4"``), keep this phase's share (0 sft, 1 rm, 2 ppo; by default
   the loader's own phase), shuffled by ``seed``;
3. keep the first ``cfg.max_records`` records;
4. eval records: ``cfg.eval_path`` when given (split ``cfg.eval_split`` for ``hf:``), else ``default:eval``
   when training on ``default``, else ``cfg.eval_fraction`` of the training records held out by ``seed``
   (so the hold-out comes out of the ``max_records``);
5. normalise (:mod:`rlhf.data.formats`) and tokenise (:mod:`rlhf.data.tokenize`) each part, through the
   tokenised-data cache (:mod:`rlhf.data.cache`);
6. log what was skipped (logger ``rlhf.data``), when anything was.

An empty training set is a :class:`DataError` naming the source. The eval part may be empty
(``eval_fraction: 0``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from rlhf.config import DataConfig
from rlhf.data.cache import cached, source_fingerprint, tokenizer_fingerprint
from rlhf.data.errors import DataError, SkipReport
from rlhf.data.formats import to_preference_examples, to_prompt_examples, to_sft_examples
from rlhf.data.readers import Record, read_records
from rlhf.data.split import PHASES, phase_split, train_eval_split
from rlhf.data.tokenize import tokenize_preferences, tokenize_prompts, tokenize_sft

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger("rlhf.data")

Kind = Literal["sft", "preference", "prompt"]
OWN_PHASE: dict[str, int] = {"sft": 0, "preference": 1, "prompt": 2}


def eval_source(cfg: DataConfig) -> str | None:
    """Where eval records are read from, or None when they are held out of the training records."""
    if cfg.eval_path:
        return cfg.eval_path
    if cfg.train_path == "default":
        return "default:eval"
    return None


def load_sft_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, seed: int, phase: int | None = None,
                  cache_dir: Path | None = None) -> tuple[list[dict], list[dict]]:
    """SFT items ``{"input_ids", "labels"}`` for training and eval (see the module docstring)."""
    return _load("sft", cfg, tokenizer, seed=seed, phase=phase, cache_dir=cache_dir)


def load_preference_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, seed: int,
                         phase: int | None = None, cache_dir: Path | None = None) -> tuple[list[dict], list[dict]]:
    """Preference items ``{"chosen_ids", "rejected_ids"}`` for training and eval."""
    return _load("preference", cfg, tokenizer, seed=seed, phase=phase, cache_dir=cache_dir)


def load_prompt_data(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, seed: int, phase: int | None = None,
                     cache_dir: Path | None = None) -> tuple[list[dict], list[dict]]:
    """Prompt items ``{"prompt_ids", "prompt_text", "messages"}`` for rollouts and eval."""
    return _load("prompt", cfg, tokenizer, seed=seed, phase=phase, cache_dir=cache_dir)


def read_split_records(cfg: DataConfig, *, seed: int, phase: int | None, kind: str = "data",
                       report: SkipReport | None = None) -> tuple[list[Record], list[Record]]:
    """Steps 1-4 of the module docstring: (train records, eval records). Read skips go into ``report``."""
    train = read_records(cfg.train_path, split=cfg.train_split, columns=cfg.columns,
                         max_records=None if cfg.phase_split else cfg.max_records, skipped=report)
    if cfg.phase_split:
        if phase is None:
            raise ValueError("phase_split is set: pass phase 0 (sft), 1 (rm) or 2 (ppo)")
        total = len(train)
        train = phase_split(train, cfg.phase_split, phase=phase, seed=seed)
        if not train:
            raise DataError(
                f"{cfg.train_path}: the {PHASES[phase]} share (phase {phase}) of phase_split "
                f"'{cfg.phase_split}' is empty ({total} records in all); give this phase a larger share"
            )
        if cfg.max_records is not None:
            train = train[: cfg.max_records]
    source = eval_source(cfg)
    if source is not None:
        evaluation = read_records(source, split=cfg.eval_split, columns=cfg.columns, skipped=report)
    else:
        train, evaluation = train_eval_split(train, cfg.eval_fraction, seed)
    log.debug("%s records: %d train, %d eval", kind, len(train), len(evaluation))
    return train, evaluation


def _normalise_and_tokenise(kind: Kind, records: list[Record], cfg: DataConfig,
                            tokenizer: PreTrainedTokenizerBase) -> tuple[list[dict], SkipReport]:
    common: dict[str, Any] = {"skip_invalid": cfg.skip_invalid, "max_record_chars": cfg.max_record_chars}
    lengths = {"max_length": cfg.max_length, "max_prompt_length": cfg.max_prompt_length,
               "chat_template": cfg.chat_template}
    if kind == "sft":
        examples, report = to_sft_examples(records, **common)
        items, token_report = tokenize_sft(examples, tokenizer, skip_invalid=cfg.skip_invalid, **lengths)
    elif kind == "preference":
        examples, report = to_preference_examples(records, **common)
        items, token_report = tokenize_preferences(examples, tokenizer, skip_invalid=cfg.skip_invalid, **lengths)
    else:
        examples, report = to_prompt_examples(records, **common)
        items = tokenize_prompts(examples, tokenizer, max_prompt_length=cfg.max_prompt_length,
                                 chat_template=cfg.chat_template)
        token_report = SkipReport()
    report.merge(token_report)
    return items, report


def _load(kind: Kind, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, *, seed: int, phase: int | None,
          cache_dir: Path | None) -> tuple[list[dict], list[dict]]:
    if phase is None:
        phase = OWN_PHASE[kind]
    if phase not in (0, 1, 2):
        raise ValueError(f"phase must be 0 (sft), 1 (rm) or 2 (ppo), got {phase!r}")
    source = eval_source(cfg)
    key_base = {
        "kind": kind,
        "data": cfg.model_dump(mode="json"),
        "train_source": source_fingerprint(cfg.train_path),
        "eval_source": source_fingerprint(source) if source else None,
        "seed": seed,
        "phase": phase if cfg.phase_split else None,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }

    # Read once, on the first cache miss; a hit on both parts reads nothing.
    parts: dict[str, list[Record]] = {}

    def records(part: str) -> list[Record]:
        if not parts:
            read_report = SkipReport() if cfg.skip_invalid else None
            parts["train"], parts["eval"] = read_split_records(cfg, seed=seed, phase=phase, kind=kind,
                                                               report=read_report)
            if read_report is not None and not read_report.empty:
                log.warning("%s: while reading: %s (%s)", cfg.train_path, read_report.summary(),
                            read_report.locations())
        return parts[part]

    def builder(part: str) -> Callable[[], list[dict]]:
        def build() -> list[dict]:
            part_records = records(part)
            if not part_records:
                return []
            items, report = _normalise_and_tokenise(kind, part_records, cfg, tokenizer)
            if not report.empty:
                log.warning("%s %s data (%s): %s (%s)", kind, part, cfg.train_path, report.summary(),
                            report.locations())
            return items
        return build

    train = cached({**key_base, "part": "train"}, builder("train"), cache_dir)
    if not train:
        raise DataError(f"{cfg.train_path}: no {kind} training examples left after reading and validation")
    evaluation = cached({**key_base, "part": "eval"}, builder("eval"), cache_dir)
    log.info("%s data from %s: %d train, %d eval examples", kind, cfg.train_path, len(train), len(evaluation))
    return train, evaluation
