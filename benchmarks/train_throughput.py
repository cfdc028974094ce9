"""Training throughput of the SFT and reward-model stages: tokens/s by worker count and ZeRO stage.

Every configuration runs the real stage (Ray Train workers, DeepSpeed) for a few steps on the same
data in one process run; throughput is the median of the per-step `train/tokens_per_s` after the
first step (which includes warm-up). The machine's cores are split evenly between the workers.

    python benchmarks/train_throughput.py --output bench-results/train_throughput.json
    python benchmarks/train_throughput.py --model tiny --steps 3 --output /tmp/t.json   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def preference_file(folder: Path) -> str:
    """Pairs for throughput only: each shipped reply is chosen over the next prompt's reply."""
    from rlhf.paths import DEFAULT_DATA_DIR

    records = [json.loads(line) for line in (DEFAULT_DATA_DIR / "train.jsonl").read_text().splitlines()]
    path = folder / "pairs.jsonl"
    path.write_text("".join(
        json.dumps({"prompt": r["prompt"], "chosen": r["response"], "rejected": records[(i + 1) % len(records)]["response"]})
        + "\n" for i, r in enumerate(records)
    ))
    return str(path)


def measure(stage: str, workers: int, zero: int, args, folder: Path) -> dict:
    from rlhf.config import load_config
    from rlhf.metrics import read_metrics

    out = folder / f"{stage}-w{workers}-z{zero}"
    cpus = max(1.0, args.cpus / workers)
    overrides = [
        f"model.path={args.model}", f"output_dir={out}", f"deepspeed.zero_stage={zero}",
        f"scaling.workers={workers}", f"scaling.cpus_per_worker={cpus:g}", f"optim.max_steps={args.steps}",
        f"optim.batch_size={args.batch_size}", "optim.eval_every=100000",
        f"data.max_length={args.max_length}", f"data.max_prompt_length={args.max_length // 2}",
    ]
    if stage == "sft":
        from rlhf.sft import run

        overrides.append("sample_prompts=[]")
    else:
        from rlhf.rm import run

        overrides += [f"data.train_path={preference_file(folder)}", "normalize=false"]
    started = time.perf_counter()
    run(load_config(stage, None, overrides))
    wall = time.perf_counter() - started
    steps = [r for r in read_metrics(out / "metrics.jsonl") if "train/tokens_per_s" in r and r["step"] > 1]
    tokens_per_s = statistics.median(r["train/tokens_per_s"] for r in steps)
    return {"stage": stage, "workers": workers, "zero_stage": zero, "tokens_per_s": round(tokens_per_s, 1),
            "steps": args.steps, "wall_s": round(wall, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model path, 'default' or 'tiny'")
    parser.add_argument("--stages", nargs="+", default=["sft", "rm"], choices=["sft", "rm"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--zero", nargs="+", type=int, default=[0, 2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--cpus", type=float, default=float(os.cpu_count() or 2))
    parser.add_argument("--output", required=True, help="JSON results file")
    args = parser.parse_args(argv)

    import ray
    from rich.console import Console
    from rich.table import Table

    from cluster.runtime import init_ray
    from rlhf.config import RayConfig
    from rlhf.paths import write_atomic

    init_ray(RayConfig(num_cpus=int(args.cpus)))
    results = []
    with tempfile.TemporaryDirectory(prefix="rlhf-train-bench-") as tmp:
        for stage in args.stages:
            for workers in args.workers:
                for zero in args.zero:
                    results.append(measure(stage, workers, zero, args, Path(tmp)))
    ray.shutdown()

    ratios = {}
    for stage in args.stages:
        by = {(r["workers"], r["zero_stage"]): r["tokens_per_s"] for r in results if r["stage"] == stage}
        for zero in args.zero:
            if (1, zero) in by and (2, zero) in by:
                ratios[f"{stage}_zero{zero}_2_over_1_workers"] = round(by[(2, zero)] / by[(1, zero)], 3)
        if (1, 0) in by:
            for (workers, zero), value in by.items():
                if (workers, zero) != (1, 0):
                    ratios[f"{stage}_w{workers}_zero{zero}_over_w1_zero0"] = round(value / by[(1, 0)], 3)

    table = Table(title=f"Training throughput ({args.model}, {args.steps} steps, batch {args.batch_size}/worker)")
    for column in ("stage", "workers", "ZeRO", "tokens/s", "wall s"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(r["stage"], str(r["workers"]), str(r["zero_stage"]), f"{r['tokens_per_s']:.0f}", f"{r['wall_s']:.0f}")
    Console().print(table)

    payload = {"model": args.model, "steps": args.steps, "batch_size": args.batch_size,
               "max_length": args.max_length, "cpus": args.cpus, "results": results, "ratios": ratios}
    output = write_atomic(args.output, json.dumps(payload, indent=2))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
