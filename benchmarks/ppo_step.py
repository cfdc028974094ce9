"""Where a PPO step's time goes: per-phase breakdown on the default model, with each phase's share.

Runs real PPO iterations (vLLM engine, DeepSpeed policy and critic, reference and reward actors) and
reports the median of each phase over the steps after the first (which warms caches up). Overhead is
the step minus its phases: Ray calls, batching and bookkeeping in the controller.

    python benchmarks/ppo_step.py --output bench-results/ppo_step.json
    python benchmarks/ppo_step.py --model tiny --steps 4 --output /tmp/ppo_step.json   # quick
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

PHASES = ["generation", "make_experience", "train", "weight_sync"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="policy: a folder, 'default' or 'tiny'")
    parser.add_argument("--reward", default=None, help="reward-model folder (default: the programmatic judge)")
    parser.add_argument("--advantage", default="gae", help="ppo.advantage: any registered estimator")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=8, help="ppo.rollout_batch_size")
    parser.add_argument("--samples", type=int, default=2, help="rollout.sampling.n")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--weight-sync", default="object_store", choices=["object_store", "broadcast"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other PPO config override, e.g. actor_threads=1 (repeatable)")
    parser.add_argument("--output", required=True, help="JSON results file")
    args = parser.parse_args(argv)

    import ray

    from rlhf.paths import write_atomic
    from rich.console import Console
    from rich.table import Table

    from rlhf.config import load_config
    from rlhf.ppo import PPOTrainer

    with tempfile.TemporaryDirectory(prefix="rlhf-ppo-bench-") as tmp:
        overrides = [
            f"model.path={args.model}", f"output_dir={tmp}", f"ppo.advantage={args.advantage}",
            f"ppo.rollout_batch_size={args.prompts}", f"rollout.sampling.n={args.samples}",
            f"rollout.sampling.max_new_tokens={args.max_new_tokens}", f"rollout.weight_sync={args.weight_sync}",
            "ppo.micro_batch_size=8", f"ppo.grad_accum={max(1, args.prompts * args.samples // 8)}",
            "data.max_length=192", "data.max_prompt_length=96", f"steps={args.steps}",
        ]
        if args.reward:
            overrides.append(f"reward.path={args.reward}")
        overrides += args.set
        cfg = load_config("ppo", None, overrides)
        started = time.perf_counter()
        trainer = PPOTrainer(cfg)
        startup_s = time.perf_counter() - started
        records = []
        try:
            for _ in range(args.steps):
                records.append(trainer.step())
        finally:
            trainer.shutdown()
            ray.shutdown()

    measured = records[1:] if len(records) > 1 else records
    median = {key: statistics.median(r[f"timing/{key}"] for r in measured) for key in [*PHASES, "step"]}
    overhead = statistics.median(r["timing/step"] - sum(r[f"timing/{p}"] for p in PHASES) for r in measured)
    share = {p: median[p] / median["step"] for p in PHASES}
    share["overhead"] = overhead / median["step"]

    table = Table(title=f"PPO step ({args.model}, {args.advantage}, {args.prompts} prompts x {args.samples} "
                        f"samples x {args.max_new_tokens} tokens, median of {len(measured)} steps)")
    for column in ("phase", "seconds", "share"):
        table.add_column(column, justify="right")
    for phase in [*PHASES, "overhead"]:
        seconds = overhead if phase == "overhead" else median[phase]
        table.add_row(phase, f"{seconds:.2f}", f"{share[phase]:.1%}")
    table.add_row("step", f"{median['step']:.2f}", "100%")
    Console().print(table)
    print(f"startup (actors, engines, models): {startup_s:.1f} s")

    payload = {
        "model": args.model, "advantage": args.advantage, "prompts": args.prompts, "samples": args.samples,
        "overrides": args.set,
        "max_new_tokens": args.max_new_tokens, "weight_sync": args.weight_sync, "steps_measured": len(measured),
        "seconds": {**{p: median[p] for p in PHASES}, "overhead": overhead, "step": median["step"]},
        "share": share, "startup_s": startup_s,
        "targets": {"weight_sync_share_below": 0.05, "overhead_share_below": 0.10},
        "per_step": [{k: v for k, v in r.items() if k.startswith("timing/")} for r in records],
    }
    output = write_atomic(args.output, json.dumps(payload, indent=2))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
