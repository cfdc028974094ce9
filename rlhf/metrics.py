"""Metrics: one JSON object per logged step in ``metrics.jsonl``, mirrored to TensorBoard."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path


class MetricsLogger:
    """Append-only metrics for one run. ``append=True`` continues an existing file (resume)."""

    def __init__(self, output_dir: str | Path, *, append: bool = False, tensorboard: bool = True) -> None:
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.output_dir / "metrics.jsonl"
        self._file = self.path.open("a" if append else "w")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.output_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, "time": round(time.time(), 3)}
        for key, value in metrics.items():
            value = float(value)
            record[key] = value if math.isfinite(value) else str(value)  # JSON has no NaN
            if self._writer is not None:
                self._writer.add_scalar(key, value, step)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def continue_metrics(path: str | Path, step: int) -> None:
    """Resuming at ``step`` into a run's own output folder: drop the records of later steps (they are
    redone), so the series holds every step once. Nothing to do in a fresh folder."""
    from rlhf.paths import write_atomic

    path = Path(path)
    if path.is_file():
        kept = [r for r in read_metrics(path) if r["step"] <= step]
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
