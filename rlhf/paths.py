"""Where the project keeps things on disk, and the rules for writing there.

rlhf never deletes or overwrites a folder it did not create. Every folder it creates carries a marker
file (:data:`MARKER`); a folder is written whole under a temporary name and renamed into place
(:func:`replace_dir`), a file likewise (:func:`write_file`). An existing non-empty folder without the
marker is refused with an :class:`OutputError` naming it and the override that allows it
(``overwrite=true`` for a stage's output_dir, ``--overwrite`` for ``rlhf models tiny``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = PACKAGE_DIR / "data" / "default"
MARKER = ".rlhf-owned"  # in every folder rlhf creates: such a folder rlhf may replace or delete


class OutputError(Exception):
    """rlhf may not write where it was asked to: the message names the path and what to do."""


def rlhf_home() -> Path:
    """Cache root: $RLHF_HOME, else ~/.cache/rlhf."""
    return Path(os.environ.get("RLHF_HOME") or Path.home() / ".cache" / "rlhf").expanduser()


def write_file(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` fills a temporary name beside ``path``, then one rename: never a half-written file."""
    path = Path(path)
    if path.parent.exists() and not path.parent.is_dir():
        raise OutputError(f"{path.parent} is a file, not a folder: cannot write {path.name} into it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary name beside ``path``, then rename: never a half-written file."""
    return write_file(path, lambda tmp: tmp.write_text(text))


def is_ours(folder: str | Path) -> bool:
    """Whether rlhf created ``folder`` (it carries :data:`MARKER`)."""
    return (Path(folder) / MARKER).is_file()


def check_writable(folder: str | Path, *, overwrite: bool = False, override: str = "overwrite=true") -> Path:
    """Refuse (``OutputError``) a ``folder`` rlhf may not write or replace: a file, a link to be replaced,
    or a non-empty folder without rlhf's marker (allowed with ``overwrite``; ``override`` is how the
    user says so). Writes nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file, not a folder: choose another path")
    if folder.is_dir() and not overwrite and not is_ours(folder) and any(folder.iterdir()):
        raise OutputError(f"{folder} already exists and was not made by rlhf (it holds no {MARKER} file); rlhf "
                          f"never deletes or overwrites a folder it did not make: choose another path, or pass "
                          f"{override} to allow it")
    return folder


def claim_dir(folder: str | Path, *, overwrite: bool = False, override: str = "overwrite=true") -> Path:
    """``folder`` as one of rlhf's folders to write into: created (parents too) and marked, or accepted
    when it is already rlhf's or empty; :func:`check_writable` refuses anything else."""
    folder = check_writable(folder, overwrite=overwrite, override=override)
    folder.mkdir(parents=True, exist_ok=True)
    if not is_ours(folder):
        (folder / MARKER).write_text("made by rlhf, which may replace or delete this folder\n")
    return folder


def replace_dir(target: str | Path, fill: Callable[[Path], object], *, overwrite: bool = False,
                override: str = "overwrite=true") -> Path:
    """Write the folder ``target`` whole: ``fill(staging)`` fills ``<target>.partial`` (created and
    marked here), which then replaces ``target`` in one rename. A process killed on the way leaves
    ``target`` as it was. ``target`` and a leftover staging folder are removed only when rlhf made
    them (or with ``overwrite``); a symbolic link is never followed."""
    target = Path(target)
    staging = target.with_name(target.name + ".partial")
    for path in (target, staging):
        if path.is_symlink():
            raise OutputError(f"{path} is a symbolic link: rlhf does not replace links; choose another path")
        check_writable(path, overwrite=overwrite, override=override)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        fill(claim_dir(staging))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a killed process leaves it; the next write removes it
        raise
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target


def remove_ours(folder: str | Path) -> bool:
    """Delete ``folder`` if rlhf made it (it carries the marker); leave anything else. True if deleted."""
    folder = Path(folder)
    if folder.is_symlink() or not is_ours(folder):
        return False
    shutil.rmtree(folder)
    return True
