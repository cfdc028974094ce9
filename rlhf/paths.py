"""Where the project keeps things on disk."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = PACKAGE_DIR / "data" / "default"


def rlhf_home() -> Path:
    """Cache root: $RLHF_HOME, else ~/.cache/rlhf."""
    return Path(os.environ.get("RLHF_HOME") or Path.home() / ".cache" / "rlhf").expanduser()
