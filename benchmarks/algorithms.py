"""Every registered advantage estimator and policy loss on one budget: reward after N steps, step time.

Each row is a real PPO run (vLLM engine, DeepSpeed learner, reward function) on the tiny model from
configs/tiny/grpo.yaml's settings (4 prompts x 8 samples of 16 tokens per step, learning rate 5e-3),
the same seed and number of steps, with a rule reward no preset was tuned on by default (the share of
'e' characters, tests/data/rule_reward.py). Only the algorithm's own settings change between rows.
Reported: the mean reward of the first three and the last three steps, their difference, and the
median step time after the first step. All runs share one local Ray.

    python benchmarks/algorithms.py --output bench-results/algorithms.json
    python benchmarks/algorithms.py --steps 6 --only grpo,gspo --output /tmp/algorithms.json   # quick
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

ROOT = Path(__file__).resolve().parents[1]

# name -> (preset in configs/tiny, its overrides); grpo.yaml: GRPO, KL loss k3 0.01, token mean
ROWS: dict[str, tuple[str, list[str]]] = {
    "grpo": ("grpo", []),
    "dr_grpo + seq_mean_token_sum_norm": ("grpo", ["ppo.advantage=dr_grpo", "ppo.loss_agg=seq_mean_token_sum_norm"]),
    "rloo": ("grpo", ["ppo.advantage=rloo"]),
    "reinforce++": ("grpo", ["ppo.advantage=reinforce++"]),
    "reinforce++_baseline": ("grpo", ["ppo.advantage=reinforce++_baseline"]),
    "gae (critic)": ("grpo", ["ppo.advantage=gae", "ppo.lam=1.0", "ppo.critic_learning_rate=3e-3"]),
    "grpo + gspo": ("grpo", ["ppo.policy_loss=gspo", "ppo.loss_agg=seq_mean_token_mean", "ppo.clip_ratio_low=3e-4",
                             "ppo.clip_ratio_high=4e-4"]),
    "grpo + cispo": ("grpo", ["ppo.policy_loss=cispo", "ppo.clip_ratio_low=1.0", "ppo.clip_ratio_high=0.28"]),
    "dapo (configs/tiny/dapo.yaml)": ("dapo", []),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a folder or 'tiny'")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--reward", default=str(ROOT / "tests" / "data" / "rule_reward.py") + ":letter_e",
                        help="FILE.py:NAME reward function")
    parser.add_argument("--only", default=None, help="comma-separated row names (prefixes) to run")
    parser.add_argument("--output", required=True, help="JSON results file")
    args = parser.parse_args(argv)

    import ray
    from rich.console import Console
    from rich.table import Table

    from cluster.runtime import init_ray
    from rlhf.config import RayConfig, load_config
    from rlhf.metrics import read_metrics
    from rlhf.paths import write_atomic
    from rlhf.ppo import run

    rows = {name: row for name, row in ROWS.items()
            if not args.only or any(name.startswith(p) for p in args.only.split(","))}
    results = []
    init_ray(RayConfig())
    try:
        for name, (preset, overrides) in rows.items():
            with tempfile.TemporaryDirectory(prefix="rlhf-algorithms-") as out:
                cfg = load_config("ppo", ROOT / "configs" / "tiny" / f"{preset}.yaml", [
                    f"model.path={args.model}", f"output_dir={out}", f"reward.function={args.reward}",
                    f"steps={args.steps}", "eval_every=0", *overrides,
                ])
                started = time.perf_counter()
                run(cfg)
                wall = time.perf_counter() - started
                records = [r for r in read_metrics(Path(out) / "metrics.jsonl") if "reward/mean" in r]
            rewards = [r["reward/mean"] for r in records]
            first, last = statistics.mean(rewards[:3]), statistics.mean(rewards[-3:])
            results.append({
                "row": name, "overrides": overrides, "steps": len(rewards), "reward_first3": first,
                "reward_last3": last, "gain": last - first,
                "step_s_median": statistics.median(r["timing/step"] for r in records[1:]),
                "kl_last": records[-1]["kl/mean"], "clipfrac_mean": statistics.mean(
                    r.get("policy/clipfrac", 0.0) for r in records),
                "groups_dropped": sum(r.get("rollout/groups_dropped", 0.0) for r in records),
                "wall_s": wall,
            })
            print(json.dumps(results[-1]), flush=True)
    finally:
        ray.shutdown()

    table = Table(title=f"{args.steps} steps on {args.model}, reward {Path(args.reward).name}, seed 42")
    for column in ("algorithm", "reward first 3", "last 3", "gain", "step s (median)", "KL last", "clipfrac",
                   "groups dropped"):
        table.add_column(column)
    for r in results:
        table.add_row(r["row"], f"{r['reward_first3']:.3f}", f"{r['reward_last3']:.3f}", f"{r['gain']:+.3f}",
                      f"{r['step_s_median']:.2f}", f"{r['kl_last']:.3f}", f"{r['clipfrac_mean']:.3f}",
                      f"{r['groups_dropped']:.0f}")
    Console(width=160).print(table)
    write_atomic(Path(args.output), json.dumps({"model": args.model, "steps": args.steps, "reward": args.reward,
                                                "rows": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
