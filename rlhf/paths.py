"""Where the project keeps things on disk."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = PACKAGE_DIR / "data" / "default"


def rlhf_home() -> Path:
    """Cache root: $RLHF_HOME, else ~/.cache/rlhf."""
    return Path(os.environ.get("RLHF_HOME") or Path.home() / ".cache" / "rlhf").expanduser()


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to a temporary name beside ``path``, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
