"""`rlhf run`: the whole pipeline on one config, each stage writing under ``<output_dir>/<stage>``:

    sft    run.model + prompt/response data          -> sft/final
    pairs  sft/final samples K replies, judge ranks   -> pairs/pairs.jsonl
    rm     sft/final backbone on those pairs          -> rm/final
    ppo    sft/final policy, rm/final reward + critic -> ppo/final
    eval   ppo/final versus sft/final                 -> eval/eval.json, eval.md, eval.png
                                                         (eval.json also copied to <output_dir>)

A stage is skipped when its folder holds a finished run (its completion record, ``done.json``) of the
same resolved config on the same upstream outputs (``rlhf.outputs.is_current``): a rerun picks up
where an interrupted one stopped, and a change to one stage reruns it and every stage after it that
reads its output. A stage that reruns starts over in its folder. ``--quick`` runs the same pipeline on
the tiny model in minutes.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from rlhf.config import RunConfig, save_config
from rlhf.eval import format_interval
from rlhf.outputs import Interrupted, is_current
from rlhf.paths import claim_dir, is_ours, write_atomic

log = logging.getLogger("rlhf.pipeline")

# `rlhf run --quick`: the tiny model and small settings; applied before the user's overrides.
QUICK_OVERRIDES = [
    "model.path=tiny",
    "output_dir=runs/quick",
    "sft.data.max_records=128", "sft.optim.epochs=1", "sft.optim.learning_rate=1e-3", "sft.optim.batch_size=8",
    "sft.scaling.workers=1", "sft.scaling.cpus_per_worker=1", "sft.sample_prompts=[]",
    # HF generate starts instantly and is fast on the tiny model; PPO keeps its vLLM engine.
    "pairs.data.max_records=320", "pairs.rollout.sampling.max_new_tokens=24", "pairs.rollout.backend=hf",
    "rm.optim.learning_rate=1e-3", "rm.optim.batch_size=8", "rm.optim.epochs=2", "rm.scaling.workers=1",
    "rm.data.eval_fraction=0.25",  # at least 64 held-out pairs
    # GRPO with a KL loss at a small learning rate: at 2e-4 and above the tiny policy learns to repeat
    # "great" (the judge's sentiment) until its replies no longer finish (KL 30 per reply).
    "ppo.steps=16", "ppo.rollout.sampling.max_new_tokens=24", "ppo.rollout.sampling.n=8",
    "ppo.ppo.advantage=grpo", "ppo.ppo.rollout_batch_size=4", "ppo.ppo.micro_batch_size=8",
    "ppo.ppo.policy_learning_rate=5e-5", "ppo.ppo.kl.mode=loss", "ppo.ppo.kl.estimator=k3", "ppo.ppo.kl.coef=0.1",
    "eval.max_prompts=64", "eval.sampling.n=2", "eval.sampling.max_new_tokens=24", "eval.backend=hf",
]


class PeakMemory:
    """Samples the memory of a process (``pid``, default this one) and all its descendants (the local
    Ray's workers included) every ``interval_s``. ``peak_gib`` is the largest sum of proportional set
    sizes (PSS: a page shared by k processes counts 1/k in each, so the torch and vLLM libraries every
    Ray worker maps count once); ``peak_rss_gib`` is the largest plain sum of resident sizes, which
    counts shared pages again in every process and so overstates what the machine needs."""

    def __init__(self, interval_s: float = 1.0, pid: int | None = None) -> None:
        self.interval_s, self.pid, self.peak_bytes, self.peak_rss_bytes = interval_s, pid, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:  # it has already exited
            return
        while not self._stop.is_set():
            pss = rss = 0
            try:
                processes = [root, *root.children(recursive=True)]
            except psutil.Error:
                break
            for process in processes:
                try:
                    info = process.memory_full_info()  # reads /proc/PID/smaps_rollup on Linux
                    pss += getattr(info, "pss", info.rss)
                    rss += info.rss
                except psutil.Error:
                    pass
            self.peak_bytes = max(self.peak_bytes, pss)
            self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
            self._stop.wait(self.interval_s)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30

    @property
    def peak_rss_gib(self) -> float:
        return self.peak_rss_bytes / 2**30

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def stage_configs(cfg: RunConfig) -> dict:
    """Each stage's config with the wiring filled in: paths between stages, seed, Ray."""
    out = Path(cfg.output_dir)
    common = {"seed": cfg.seed, "ray": cfg.ray, "overwrite": cfg.overwrite, "plugins": cfg.plugins}
    sft_final, rm_final = str(out / "sft" / "final"), str(out / "rm" / "final")
    model = cfg.model
    # PPO is rewarded by the reward model trained here, unless the user named a reward of their own
    # (ppo.reward.path, function or url); rm still trains then, for the eval's reward-model accuracy.
    own_reward = cfg.ppo.reward.path or cfg.ppo.reward.function or cfg.ppo.reward.url
    ppo_reward = cfg.ppo.reward if own_reward else cfg.ppo.reward.model_copy(update={"path": rm_final})
    # The reward model starts from the SFT model with the run's settings (dtype...), plus what rm.model sets
    # itself (lora, say).
    rm_model = model.model_copy(update={**{k: getattr(cfg.rm.model, k) for k in cfg.rm.model.model_fields_set},
                                         "path": sft_final})
    rm_data = cfg.rm.data.model_copy(update={"train_path": str(out / "pairs" / "pairs.jsonl")})
    return {
        "sft": cfg.sft.model_copy(update={**common, "output_dir": str(out / "sft"), "model": model}),
        "pairs": cfg.pairs.model_copy(update={
            **common, "output_dir": str(out / "pairs"), "model": model.model_copy(update={"path": sft_final}),
        }),
        "rm": cfg.rm.model_copy(update={
            **common, "output_dir": str(out / "rm"), "model": rm_model,
            "data": rm_data,
        }),
        "ppo": cfg.ppo.model_copy(update={
            **common, "output_dir": str(out / "ppo"), "model": model.model_copy(update={"path": sft_final}),
            "reward": ppo_reward,
        }),
        "eval": cfg.eval.model_copy(update={
            **common, "output_dir": str(out / "eval"),
            "policy": model.model_copy(update={"path": str(out / "ppo" / "final")}),
            "reference": model.model_copy(update={"path": sft_final}),
            "reward": cfg.eval.reward.model_copy(update={"path": rm_final, "function": None, "url": None}),
            "ppo_metrics": str(out / "ppo" / "metrics.jsonl"),
            # Held out exactly as the sft and rm stages held them out: perplexity and RM accuracy.
            "sft_data": cfg.sft.data,
            "preference_data": rm_data,
        }),
    }


def run(cfg: RunConfig) -> Path:
    import importlib
    import json

    out = claim_dir(cfg.output_dir, overwrite=cfg.overwrite)
    save_config(cfg, out)
    configs = stage_configs(cfg)
    started = time.perf_counter()
    stages: dict[str, dict[str, float]] = {}
    for stage, stage_cfg in configs.items():
        if is_current(stage_cfg):
            log.info("%s: up to date in %s, skipping", stage, stage_cfg.output_dir)
            continue
        log.info("%s: starting (output in %s)", stage, stage_cfg.output_dir)
        # The pipeline's own stage folder: the stage starts over there (a folder rlhf did not make is refused).
        stage_cfg = stage_cfg.model_copy(update={"overwrite": stage_cfg.overwrite or is_ours(stage_cfg.output_dir)})
        stage_started = time.perf_counter()
        try:
            with PeakMemory() as memory:
                importlib.import_module(f"rlhf.{stage}").run(stage_cfg)
        except Interrupted as exc:
            exc.key = f"{stage}.resume_from"  # how to continue through `rlhf run`
            raise
        stages[stage] = {"wall_s": round(time.perf_counter() - stage_started, 1),
                         "peak_memory_gib": round(memory.peak_gib, 2), "peak_rss_sum_gib": round(memory.peak_rss_gib, 2)}
        log.info("%s: done in %.0f s, peak memory %.2f GiB (PSS)", stage, stages[stage]["wall_s"],
                 stages[stage]["peak_memory_gib"])
    summary = {"wall_s": round(time.perf_counter() - started, 1),
               "peak_memory_gib": max((s["peak_memory_gib"] for s in stages.values()), default=0.0),
               "peak_rss_sum_gib": max((s["peak_rss_sum_gib"] for s in stages.values()), default=0.0),
               "stages": stages, "skipped": [stage for stage in configs if stage not in stages]}
    write_atomic(out / "run_summary.json", json.dumps(summary, indent=2))
    result = json.loads((out / "eval" / "eval.json").read_text())
    result["run"] = summary
    result["goals"] = check_goals(result, summary, cfg)
    write_atomic(out / "eval.json", json.dumps(result, indent=2))  # where scripts look for the outcome
    print(f"\nPipeline finished in {summary['wall_s']:.0f} s, peak memory {summary['peak_memory_gib']:.2f} GiB "
          "(PSS of this process and its Ray workers).")
    print(f"  SFT model        {out / 'sft' / 'final'}")
    print(f"  pairs            {out / 'pairs' / 'pairs.jsonl'}")
    print(f"  reward model     {out / 'rm' / 'final'}")
    print(f"  aligned policy   {out / 'ppo' / 'final'}  (metrics: {out / 'ppo' / 'metrics.jsonl'})")
    print(f"  learning curves  {out / 'ppo' / 'learning_curves.png'}")
    print(f"  evaluation       {out / 'eval' / 'eval.md'}, {out / 'eval.json'}, {out / 'eval' / 'eval.png'}")
    print("\n" + summary_table(result))
    return out


def summary_table(result: dict) -> str:
    """The demo's closing lines: the SFT model against the aligned policy on the held-out prompts, the
    reward model's accuracy, flags and goals (eval.json with ``goals`` from :func:`check_goals`)."""
    b, a = result["before"], result["after"]
    versus, gain = result["policy_vs_reference"], result["judge_gain"]

    def cell(value, ci=None, fmt=".3f"):
        return "-" if value is None else f"{value:{fmt}}" + (f" ± {ci:{fmt}}" if ci else "")

    rows = [("judge", "judge", "judge_ci95", ".3f"), ("reward model", "reward", "reward_ci95", ".3f"),
            ("AFINN per word (unseen)", "afinn", "afinn_ci95", ".3f"), ("KL per sequence", "kl", "kl_ci95", ".3f"),
            ("KL per token", "kl_per_token", None, ".4f"), ("replies that finish", "finished", None, ".1%"),
            ("words", "length_words", None, ".1f"), ("distinct-2", "distinct_2", None, ".3f"),
            ("perplexity (held-out SFT)", "perplexity", None, ".2f")]
    lines = [f"  {result['prompts']} held-out prompts x {result['samples_per_prompt']} samples, same seeds for both models",
             f"  {'':28}{'SFT model':>18}{'aligned policy':>20}"]
    for name, key, ci, fmt in rows:
        lines.append(f"  {name:28}{cell(b[key], b.get(ci) if ci else None, fmt):>18}"
                     f"{cell(a[key], a.get(ci) if ci else None, fmt):>20}")
    lines.append(f"  {'judge, best of ' + str(result['samples_per_prompt']) + ' SFT samples':28}{cell(b['judge_best_of_n']):>18}")
    lines.append(f"\n  win rate {versus['win_rate']:.1%}{format_interval(versus.get('win_rate_ci95'), '.1%')} per prompt "
                 f"({versus['wins']} wins, {versus['ties']} ties counted half, {versus['losses']} losses); "
                 f"judge gain {gain['mean']:+.3f}{format_interval(gain['ci95'])}")
    for key, label in (("reward_model", "held-out pairs"), ("reward_model_eval_pairs", "judge-labelled eval pairs")):
        rm = result.get(key)
        if rm and rm.get("accuracy") is not None:
            lines.append(f"  reward model accuracy {rm['accuracy']:.1%}{format_interval(rm.get('accuracy_ci95'), '.1%')} "
                         f"on {rm['pairs']} {label}")
    lines += [f"  warning: {flag}" for flag in result.get("flags", [])]
    if result.get("goals"):
        lines.append("\n  goals:")
        for goal in result["goals"]:
            mark = {True: "met", False: "MISSED", None: "not measured"}[goal["met"]]
            lines.append(f"    {mark:>12}  {goal['goal']}: {goal['value']}")
    return "\n".join(lines)


def check_goals(result: dict, summary: dict, cfg: RunConfig) -> list[dict]:
    """Each of ``cfg.goals`` (and the eval's KL and collapse thresholds) against the outcome:
    ``{"goal", "value", "met"}``; met is None where the run did not measure it (time and memory when
    stages were skipped, accuracy without held-out pairs)."""
    goals, after = cfg.goals, result["after"]
    versus, gain, rm = result["policy_vs_reference"], result["judge_gain"], result.get("reward_model") or {}
    low, high = versus.get("win_rate_ci95") or (None, None)
    whole_run = not summary.get("skipped")
    checks = [
        (f"at least {goals.min_prompts} held-out prompts", result["prompts"], result["prompts"] >= goals.min_prompts),
        (f"win rate at least {goals.min_win_rate:.0%}", f"{versus['win_rate']:.1%}", versus["win_rate"] >= goals.min_win_rate),
        ("win rate's 95% interval above 50%", format_interval([low, high], ".1%").strip() if low is not None else "-",
         None if low is None else low > 0.5),
        ("judge gain's 95% interval above 0", f"{gain['mean']:+.3f}{format_interval(gain['ci95'])}", gain["ci95"][0] > 0),
        (f"KL per sequence at most {cfg.eval.kl_threshold:g}", f"{after['kl']:.3f}", after["kl"] <= cfg.eval.kl_threshold),
        (f"KL per token at most {cfg.eval.kl_per_token_threshold:g}", f"{after['kl_per_token']:.4f}",
         after["kl_per_token"] <= cfg.eval.kl_per_token_threshold),
        ("no collapse of the text", "; ".join(f for f in result.get("flags", []) if f.startswith("collapse")) or "none",
         not any(f.startswith("collapse") for f in result.get("flags", []))),
        (f"reward model at least {goals.min_reward_model_accuracy:.0%} accurate on at least "
         f"{goals.min_reward_model_pairs} held-out pairs",
         f"{rm['accuracy']:.1%}{format_interval(rm.get('accuracy_ci95'), '.1%')} on {rm['pairs']}" if rm.get("accuracy") is not None else "-",
         None if rm.get("accuracy") is None else
         rm["accuracy"] >= goals.min_reward_model_accuracy and rm["pairs"] >= goals.min_reward_model_pairs),
    ]
    if goals.max_wall_s is not None:
        checks.append((f"whole pipeline within {goals.max_wall_s:g} s", f"{summary['wall_s']:.0f} s",
                       summary["wall_s"] <= goals.max_wall_s if whole_run else None))
    if goals.max_peak_memory_gib is not None:
        checks.append((f"peak memory at most {goals.max_peak_memory_gib:g} GiB (PSS)",
                       f"{summary['peak_memory_gib']:.2f} GiB",
                       summary["peak_memory_gib"] <= goals.max_peak_memory_gib if whole_run else None))
    return [{"goal": goal, "value": str(value), "met": met} for goal, value, met in checks]
