"""Figures drawn from a run's metrics.jsonl: a PPO run's learning curves (``learning_curves.png``).

Matplotlib's object interface (``Figure``), not pyplot: no global figure state and no GUI backend in
the process that drives a run.
"""

from __future__ import annotations

import math
from pathlib import Path

from rlhf.metrics import read_metrics
from rlhf.paths import write_file

# (panel title, ((metric, legend label), ...)): a PPO run's learning curves against step.
PPO_PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("Reward", (("reward/mean", "reward/mean (rollouts)"),)),
    ("KL to the reference", (("kl/mean", "kl/mean"),)),
    ("Policy entropy", (("policy/entropy", "policy/entropy"),)),
    ("Response length (tokens)", (("response/length", "response/length (rollouts)"),
                                  ("eval/response_length", "eval/response_length (held-out)"))),
    ("Held-out judge", (("eval/judge", "eval/judge"),)),
    ("Ended with EOS (share)", (("response/ended_with_eos", "response/ended_with_eos (rollouts)"),
                                ("eval/ended_with_eos", "eval/ended_with_eos (held-out)"))),
)


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """Steps and values of metric ``key``, from the records that hold a finite number for it: a metric
    logged at some steps only (held-out evaluations), or stored as ``"nan"``, leaves gaps."""
    points = [(r["step"], r[key]) for r in records
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [step for step, _ in points], [value for _, value in points]


def save_figure(figure, path: str | Path) -> Path:
    """Write ``figure`` as a PNG under a temp name, then rename: a reader never sees half a file."""
    return write_file(path, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))


def plot_learning_curves(metrics: str | Path, path: str | Path, panels=PPO_PANELS) -> Path:
    """One panel per entry of ``panels`` (default: reward, KL, policy entropy, response length,
    held-out judge, EOS share) against step, from the metrics.jsonl file ``metrics``; a metric the run
    did not log (no critic, evaluation off) leaves its panel saying so. Returns ``path``."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    records = read_metrics(metrics) if Path(metrics).is_file() else []
    columns = 3
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(4.6 * columns, 3.4 * rows), layout="constrained")
    axes = list(figure.subplots(rows, columns, squeeze=False, sharex=True).flat)  # one step axis
    for ax, (title, lines) in zip(axes, panels):
        drawn = 0
        for key, label in lines:
            steps, values = series(records, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) <= 40 else None, markersize=3, label=label)
                drawn += 1
        if drawn:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="gray")
            ax.set_yticks([])
        ax.set(title=title, xlabel="step")
        ax.tick_params(labelbottom=True)  # sharex would hide the upper rows' step numbers
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    for ax in axes[len(panels):]:  # the grid's spare cells
        ax.set_visible(False)
    return save_figure(figure, path)
