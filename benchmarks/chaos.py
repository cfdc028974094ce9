"""Fault injection: a seeded PPO run on the tiny model with actors killed at random steps, beside an
uninterrupted run of the same config and seed.

Faults (drawn from --seed): ``--faults`` inference faults, each a rollout engine, the reward or the
reference actor killed with ``ray.kill`` or SIGKILL on its process, either between two steps or a
random fraction of a second into the next one; then one learner rank (policy or critic) killed,
which stops the run, and a resume from the last checkpoint into the same output folder.

Reported: faults_injected, faults_survived (an inference fault is survived when the step it hit was
completed; the learner fault when the resumed run reached the final step), steps_lost (steps redone
after the resume: those since the checkpoint), and metrics_match: every step's reward, KL and
response length within --tolerance of the uninterrupted run. A redone step regenerates its rollouts
from the same (seed, iteration) sampling seeds and the same weights, so it reproduces the lost
attempt; the resumed run restarts AdamW's moments (checkpoints hold weights, not optimiser state),
so after a resume the policy follows a slightly different path: details.max_diff_after_resume shows by
how much.

    python benchmarks/chaos.py --steps 16 --output bench-results/chaos.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

COMPARED = ("reward/mean", "kl/mean", "response/length")
INFERENCE_ROLES = ("rollout", "reward", "reference")


def draw_faults(rng: random.Random, steps: int, count: int, save_every: int) -> tuple[dict[int, dict], dict]:
    """Inference faults by step (after that step is logged), and the learner fault: at a step that is
    not a checkpoint step, after the first checkpoint, so some steps are lost."""
    candidates = [s for s in range(save_every + 1, steps - 1) if s % save_every]
    learner = {"step": rng.choice(candidates), "role": rng.choice(["policy", "critic"]),
               "how": rng.choice(["ray.kill", "SIGKILL"])}
    steps_free = [s for s in range(1, steps - 1) if s != learner["step"]]
    # Every inference role at least once (given count >= 3), in a random order; the rest at random.
    roles = rng.sample(INFERENCE_ROLES, len(INFERENCE_ROLES)) + [rng.choice(INFERENCE_ROLES) for _ in range(count)]
    inference = {s: {"step": s, "role": role, "how": rng.choice(["ray.kill", "SIGKILL"]),
                     "delay_s": rng.choice([0.0, round(rng.uniform(0.1, 1.0), 2)])}
                 for s, role in zip(sorted(rng.sample(steps_free, count)), roles)}
    return inference, learner


def actor_of(trainer, role: str):
    return {"rollout": lambda: trainer.engines.engines[0], "reward": lambda: trainer.reward,
            "reference": lambda: trainer.reference, "policy": lambda: trainer.policy.actors[0],
            "critic": lambda: trainer.critic.actors[0]}[role]()


def kill(actor, how: str) -> None:
    import ray

    if how == "ray.kill":
        ray.kill(actor)
        return
    pid = ray.get(actor.info.remote())["pid"] if hasattr(actor, "info") else ray.get(actor.pid.remote())
    os.kill(pid, signal.SIGKILL)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny" / "ppo.yaml"))
    parser.add_argument("--reward", default=str(REPO / "tests" / "data" / "rule_reward.py") + ":letter_e",
                        help="reward.function (FILE.py:NAME)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--faults", type=int, default=4, help="inference actor faults (plus one learner fault)")
    parser.add_argument("--save-every", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0, help="draws the fault schedule")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest |difference| of a compared metric")
    parser.add_argument("--output", required=True, help="JSON results file")
    parser.add_argument("overrides", nargs="*", help="config overrides, KEY=VALUE")
    args = parser.parse_args(argv)

    import ray
    from rich.console import Console
    from rich.table import Table

    from actors.group import LearnerLostError
    from rlhf.config import load_config
    from rlhf.metrics import read_metrics
    from rlhf.paths import write_atomic
    from rlhf.ppo import checkpoints, run

    inference, learner = draw_faults(random.Random(args.seed), args.steps, args.faults, args.save_every)
    injected: list[dict] = []

    def on_step(trainer) -> None:
        fault = inference.get(trainer.iteration)
        if fault and fault not in injected:
            actor = actor_of(trainer, fault["role"])
            injected.append(fault)
            threading.Timer(fault["delay_s"], kill, [actor, fault["how"]]).start()
        if trainer.iteration == learner["step"] and learner not in injected:
            injected.append(learner)
            kill(actor_of(trainer, learner["role"]), learner["how"])

    with tempfile.TemporaryDirectory(prefix="rlhf-chaos-") as tmp:
        def cfg(out: Path, *extra: str):
            return load_config("ppo", args.config, [
                "model.path=tiny", f"output_dir={out}", f"reward.function={args.reward}", f"steps={args.steps}",
                f"save_every={args.save_every}", *args.overrides, *extra])

        clean_dir, chaos_dir = Path(tmp) / "clean", Path(tmp) / "chaos"
        started = time.perf_counter()
        try:
            run(cfg(clean_dir))
            clean_s = time.perf_counter() - started
            started = time.perf_counter()
            stop_error = None
            try:
                run(cfg(chaos_dir), on_step=on_step)
            except LearnerLostError as exc:
                stop_error = str(exc)
            stopped_at = max((r["step"] for r in read_metrics(chaos_dir / "metrics.jsonl")), default=0)
            resumed_from = None
            if stop_error is not None:
                checkpoint = checkpoints(chaos_dir / "checkpoints")[-1]
                resumed_from = json.loads((checkpoint / "controller_state.json").read_text())["iteration"]
                run(cfg(chaos_dir, f"resume_from={checkpoint}"), on_step=on_step)
            chaos_s = time.perf_counter() - started
        finally:
            ray.shutdown()
        clean = {r["step"]: r for r in read_metrics(clean_dir / "metrics.jsonl")}
        chaos_records = read_metrics(chaos_dir / "metrics.jsonl")
    chaos = {r["step"]: r for r in chaos_records}

    final_step = max(chaos, default=0)
    survived = [f for f in injected if (f is learner and final_step == args.steps)
                or (f is not learner and f["step"] + 1 in chaos)]
    resume_step = resumed_from if resumed_from is not None else args.steps

    def max_diff(steps) -> dict[str, float]:
        return {k: max((abs(float(chaos[s][k]) - float(clean[s][k])) for s in steps), default=0.0) for k in COMPARED}

    common = sorted(s for s in set(clean) & set(chaos) if s > 0)  # step 0: the held-out evaluation alone
    before = max_diff([s for s in common if s <= resume_step])
    after = max_diff([s for s in common if s > resume_step])
    overall = {k: max(before[k], after[k]) for k in COMPARED}
    metrics_match = (sorted(chaos) == sorted(clean) and len(chaos_records) == len(chaos)
                     and all(v <= args.tolerance for v in overall.values()))
    result = {
        "faults_injected": len(injected),
        "faults_survived": len(survived),
        "steps_lost": (stopped_at - resumed_from) if resumed_from is not None else 0,
        "metrics_match": metrics_match,
        "details": {
            "steps": args.steps, "seed": args.seed, "save_every": args.save_every, "tolerance": args.tolerance,
            "faults": injected, "learner_stop_error": stop_error, "stopped_at_step": stopped_at,
            "resumed_from_step": resumed_from, "final_step": final_step,
            "steps_logged_once": len(chaos_records) == len(chaos),
            "actor_restarts": chaos[final_step].get("faults/actor_restarts") if chaos else None,
            "max_diff_before_resume": before, "max_diff_after_resume": after,
            "seconds": {"uninterrupted": clean_s, "with_faults": chaos_s},
        },
    }

    table = Table(title=f"PPO chaos run (tiny model, {args.steps} steps, fault seed {args.seed})")
    for column in ("step", "fault", "how", "survived"):
        table.add_column(column, justify="right")
    for fault in injected:
        how = fault["how"] + (f" +{fault['delay_s']} s" if fault.get("delay_s") else "")
        table.add_row(str(fault["step"]), fault["role"], how, "yes" if fault in survived else "no")
    Console().print(table)
    summary = Table(title="summary")
    summary.add_column("measure")
    summary.add_column("value", justify="right")
    for key in ("faults_injected", "faults_survived", "steps_lost", "metrics_match"):
        summary.add_row(key, str(result[key]))
    for key in COMPARED:
        summary.add_row(f"max |diff| {key}: to resume / after", f"{before[key]:.2e} / {after[key]:.2e}")
    summary.add_row("seconds: uninterrupted / with faults", f"{clean_s:.0f} / {chaos_s:.0f}")
    Console().print(summary)
    output = write_atomic(args.output, json.dumps(result, indent=2))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
