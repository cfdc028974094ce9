"""A stage's output_dir from one run to the next: what a rerun may do, and when a stage is done.

    out = StageOutput(cfg, "sft")   # before anything loads: refuses a folder this run may not write
    ...
    out.begin()                     # claims the folder, drops the old completion record, writes config.yaml
    ...                             # the stage trains and writes its outputs
    out.finish()                    # the completion record (done.json), written last

* A folder rlhf did not make is refused unless ``overwrite=true`` (``rlhf.paths``).
* A folder holding a previous run is refused, naming how to continue (``resume_from`` one of its
  checkpoints) or start over (``overwrite=true``: the previous run's outputs, :data:`RUN_OUTPUTS`, are
  deleted; nothing else is). Resuming from one of its own checkpoints continues there and keeps its
  history (the stage drops the metrics of the steps it redoes).
* ``done.json`` is written only when the stage finished. It holds a digest of the config (less the
  keys that do not change the result: ``overwrite``, ``resume_from``) and the identity (the digest of
  ``done.json``) of every finished rlhf output the config reads, e.g. the SFT model a reward model
  starts from. ``rlhf run`` skips a stage only when both are unchanged (:func:`is_current`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from rlhf.config import mask_secrets, save_config
from rlhf.paths import OutputError, check_writable, claim_dir, write_atomic

DONE_FILE = "done.json"
# What a stage run writes into its output_dir: a previous run is any of these; starting over deletes them.
RUN_OUTPUTS = (DONE_FILE, "config.yaml", "metrics.jsonl", "tensorboard", "final", "final.partial", "adapter",
               "adapter.partial", "ray_train", "checkpoints", "samples.jsonl", "pairs.jsonl", "eval.json", "eval.md",
               "eval.png", "learning_curves.png")
# Keys that do not change what a finished run produced: a resumed run equals the uninterrupted one.
NOT_IN_DIGEST = {"overwrite", "resume_from"}


def _sha256(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


def config_digest(cfg) -> str:
    """The config's identity for completion records (secrets masked, :data:`NOT_IN_DIGEST` left out)."""
    tree = cfg.model_dump(mode="json", exclude=NOT_IN_DIGEST & set(type(cfg).model_fields))
    return _sha256(json.dumps(mask_secrets(tree), sort_keys=True))


def record_digest(folder: str | Path) -> str | None:
    """The identity of a finished run's output folder: its completion record's digest (None: not finished)."""
    record = Path(folder) / DONE_FILE
    return _sha256(record.read_bytes()) if record.is_file() else None


def _strings(tree):
    if isinstance(tree, dict):
        for value in tree.values():
            yield from _strings(value)
    elif isinstance(tree, list):
        for value in tree:
            yield from _strings(value)
    elif isinstance(tree, str) and tree:
        yield tree


def upstream_records(cfg) -> dict[str, str]:
    """``{path: record digest}`` for every path in ``cfg`` that is a finished rlhf output folder or lies
    directly in one (``runs/x/sft/final``, ``runs/x/pairs/pairs.jsonl``), other than its own output_dir."""
    own = Path(cfg.output_dir).resolve()
    found = {}
    for value in _strings(cfg.model_dump(mode="json", exclude={"output_dir"} | NOT_IN_DIGEST)):
        try:
            path = Path(value)
            candidates = [path, path.parent] if path.exists() else []
        except (OSError, ValueError):  # not a path at all (too long, a NUL byte)
            continue
        for folder in candidates:
            digest = record_digest(folder) if folder.resolve() != own else None
            if digest:
                found[value] = digest
                break
    return found


def is_current(cfg) -> bool:
    """Whether ``cfg.output_dir`` holds a finished run of this very config on the same upstream outputs."""
    record = Path(cfg.output_dir) / DONE_FILE
    if not record.is_file():
        return False
    try:
        saved = json.loads(record.read_text())
    except ValueError:
        return False
    return saved.get("config_sha256") == config_digest(cfg) and saved.get("inputs") == upstream_records(cfg)


def continue_hint(checkpoints: list[Path], key: str = "resume_from") -> str:
    """How to continue a stopped run: the newest of its complete ``checkpoints`` (oldest first) as
    ``key=PATH``, or why there is none."""
    return f"{key}={checkpoints[-1]}" if checkpoints else "no checkpoint yet (save_every sets how often)"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a stage that writes checkpoints; ``str()`` says how to continue. ``key`` is the
    override that names the checkpoint (``rlhf run`` prefixes the stage: ``sft.resume_from``)."""

    def __init__(self, checkpoints: list[Path], key: str = "resume_from") -> None:
        super().__init__()
        self.checkpoints, self.key = checkpoints, key

    def __str__(self) -> str:
        return f"to continue: {continue_hint(self.checkpoints, self.key)}"


class StageOutput:
    """One run's use of a stage's output_dir (see the module docstring). ``checkpoints()`` lists the
    complete checkpoints under it, oldest first, for stages that can resume."""

    def __init__(self, cfg, stage: str, checkpoints: Callable[[], list[Path]] | None = None) -> None:
        self.cfg, self.stage, self.dir, self.checkpoints = cfg, stage, Path(cfg.output_dir), checkpoints
        self.previous = self._check()
        self.inputs = upstream_records(cfg)  # what this run reads, noted before it reads it

    def _check(self) -> list[str]:
        """The previous run's outputs here ([] for none); an ``OutputError`` when this run may not write."""
        check_writable(self.dir, overwrite=self.cfg.overwrite)
        previous = [name for name in RUN_OUTPUTS if (self.dir / name).exists()] if self.dir.is_dir() else []
        if self.continuing:  # what the run replaces at its end, refused now rather than then
            for name in ("final", "adapter"):
                check_writable(self.dir / name, overwrite=self.cfg.overwrite)
        if previous and not self.continuing and not self.cfg.overwrite:
            finished = "a finished" if (self.dir / DONE_FILE).is_file() else "an unfinished"
            ways = [f"to continue it: {continue_hint(self.checkpoints())}"] if self.checkpoints else []
            ways += ["to start over: overwrite=true (deletes its " + ", ".join(previous) + ")",
                     "or choose another output_dir"]
            raise OutputError(f"{self.dir} already holds {finished} {self.stage} run; a rerun does not mix with it: "
                              + "; ".join(ways))
        return previous

    @property
    def continuing(self) -> bool:
        """Whether this run continues the folder's own run: ``resume_from`` is one of its checkpoints."""
        resume = getattr(self.cfg, "resume_from", None)
        return bool(resume) and Path(resume).resolve().is_relative_to(self.dir.resolve())

    def begin(self) -> Path:
        """Claim the folder, drop any completion record first, start over unless continuing (the
        previous run's outputs are deleted: only ``overwrite`` lets ``_check`` pass with one), and write
        ``config.yaml``."""
        self.previous = self._check()
        claim_dir(self.dir, overwrite=self.cfg.overwrite)
        (self.dir / DONE_FILE).unlink(missing_ok=True)  # from here on the folder holds no finished run
        if not self.continuing:
            for name in self.previous:
                path = self.dir / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        save_config(self.cfg, self.dir)
        return self.dir

    def finish(self) -> Path:
        """Write the completion record, the last thing a stage writes."""
        return write_atomic(self.dir / DONE_FILE, json.dumps({
            "stage": self.stage, "config_sha256": config_digest(self.cfg), "inputs": self.inputs,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "finished_ns": time.time_ns(),
        }, indent=2) + "\n")


__all__ = ["DONE_FILE", "RUN_OUTPUTS", "Interrupted", "OutputError", "StageOutput", "config_digest",
           "continue_hint", "is_current", "record_digest", "upstream_records"]
