"""Learning-curve figures from a metrics.jsonl (rlhf/plots.py): no Ray, no model."""

from __future__ import annotations

import json

from rlhf.plots import plot_learning_curves, series

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_learning_curves_skip_what_a_run_did_not_log(tmp_path):
    """Step 0 holds only the held-out evaluation, evaluations come every few steps, a value can be
    "nan", and a run without entropy (or without evaluations) still gets its figure."""
    records = [{"step": 0, "eval/judge": 0.1, "eval/response_length": 20.0, "eval/ended_with_eos": 0.5}]
    records += [{"step": s, "reward/mean": 0.1 * s, "kl/mean": 0.01 * s, "response/length": 20.0 + s,
                 "response/ended_with_eos": 0.5, "timing/step": 1.0} for s in range(1, 7)]
    records[3]["kl/mean"] = "nan"  # how MetricsLogger stores a non-finite value
    records[5].update({"eval/judge": 0.3, "eval/response_length": 18.0, "eval/ended_with_eos": 0.75})
    assert series(records, "eval/judge") == ([0, 5], [0.1, 0.3])
    assert series(records, "kl/mean") == ([1, 2, 4, 5, 6], [0.01, 0.02, 0.04, 0.05, 0.06])
    assert series(records, "policy/entropy") == ([], [])

    png = plot_learning_curves(_write(tmp_path / "metrics.jsonl", records), tmp_path / "learning_curves.png")
    assert png == tmp_path / "learning_curves.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000
    assert not list(tmp_path.glob("*.tmp*"))  # written under a temp name, then renamed

    no_eval = [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in records[1:]]
    again = plot_learning_curves(_write(tmp_path / "no_eval.jsonl", no_eval), png)  # replaces the old one
    assert again.read_bytes()[:8] == PNG_SIGNATURE
    empty = plot_learning_curves(tmp_path / "missing.jsonl", tmp_path / "empty.png")  # nothing logged yet
    assert empty.read_bytes()[:8] == PNG_SIGNATURE
