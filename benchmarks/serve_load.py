"""Load test of `rlhf serve` on loopback: a bounded number of chat requests at each concurrency level.

Starts the real server (`rlhf serve`, a child process), sends ``--requests`` chat completions per
concurrency level from an async HTTP client, each bounded by ``--request-timeout``, and reports
requests/s, generated tokens/s, latency percentiles, errors (a response other than 200) and lost
requests (no response: timeout or dropped connection). Then it stops the server (SIGTERM, as
`rlhf serve --stop` does); the measurements are kept even if the stop is not clean.

    python benchmarks/serve_load.py --output bench-results/serve_load.json
    python benchmarks/serve_load.py --model tiny --requests 100 --output /tmp/serve.json   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = min(len(ordered), max(1, math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def load_prompts(count: int) -> list[str]:
    from rlhf.paths import DEFAULT_DATA_DIR

    lines = (DEFAULT_DATA_DIR / "eval.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines]
    return [prompts[i % len(prompts)] for i in range(count)]


async def one_request(http, model: str, prompt: str, max_tokens: int, timeout_s: float) -> dict:
    """One chat completion: its outcome, latency and generated tokens."""
    import httpx

    start = time.perf_counter()
    try:
        response = await asyncio.wait_for(http.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 1.0}), timeout_s)
    except (asyncio.TimeoutError, httpx.HTTPError) as exc:
        return {"outcome": "lost", "why": type(exc).__name__, "latency_s": time.perf_counter() - start}
    latency = time.perf_counter() - start
    if response.status_code != 200:
        return {"outcome": "error", "status": response.status_code, "latency_s": latency}
    return {"outcome": "ok", "latency_s": latency, "tokens": response.json()["usage"]["completion_tokens"]}


async def kill_a_replica(http, after_s: float) -> int:
    """SIGKILL the replica that answers /health, ``after_s`` seconds into the level; its pid."""
    await asyncio.sleep(after_s)
    pid = (await http.get("/health")).json()["replica_pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


async def load_level(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int,
                     timeout_s: float, kill_after_s: float | None = None) -> dict:
    """All ``prompts`` at ``concurrency`` requests in flight (and, with ``kill_after_s``, one replica
    killed on the way)."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout_s + 5) as http:
        async def gated(prompt: str) -> dict:
            async with gate:
                return await one_request(http, model, prompt, max_tokens, timeout_s)

        start = time.perf_counter()
        killer = asyncio.create_task(kill_a_replica(http, kill_after_s)) if kill_after_s is not None else None
        results = await asyncio.gather(*(gated(p) for p in prompts))
        wall = time.perf_counter() - start
        killed = await killer if killer is not None else None
    ok = [r for r in results if r["outcome"] == "ok"]
    latencies_ms = [r["latency_s"] * 1000 for r in ok] or [float("nan")]
    statuses: dict[str, int] = {}
    for r in results:
        if r["outcome"] == "error":
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    return {
        "concurrency": concurrency, "requests": len(prompts), "ok": len(ok),
        "errors": sum(r["outcome"] == "error" for r in results), "error_statuses": statuses,
        "lost": sum(r["outcome"] == "lost" for r in results),
        "wall_s": round(wall, 2), "requests_per_s": round(len(ok) / wall, 2),
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 1),
        "p50_ms": round(percentile(latencies_ms, 50), 1), "p95_ms": round(percentile(latencies_ms, 95), 1),
        "p99_ms": round(percentile(latencies_ms, 99), 1),
        "mean_tokens": round(statistics.mean(r["tokens"] for r in ok), 1) if ok else 0,
        "killed_replica_pid": killed,
    }


def print_table(levels: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = ("concurrency", "requests", "ok", "errors", "lost", "requests_per_s", "tokens_per_s",
               "p50_ms", "p95_ms", "p99_ms")
    for column in columns:
        table.add_column(column.replace("_per_s", "/s").replace("_ms", " ms"), justify="right")
    for level in levels:
        table.add_row(*(str(level[c]) for c in columns))
    Console(width=140).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="model path, 'default' or 'tiny'")
    parser.add_argument("--requests", type=int, default=500, help="requests per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds before a request counts as lost")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--cpus-per-replica", type=float, default=float(os.cpu_count() or 2))
    parser.add_argument("--kill-replica-after", type=float, default=None,
                        help="fault injection: SIGKILL one replica this many seconds into each level")
    parser.add_argument("--output", required=True, help="JSON results file")
    args = parser.parse_args(argv)

    from rlhf.paths import write_atomic
    from rlhf.serve import free_port, spawn

    prompts = load_prompts(args.requests)
    with tempfile.TemporaryDirectory(prefix="rlhf-serve-load-") as tmp:
        started = time.perf_counter()
        process, url = spawn(
            [f"model.path={args.model}", "model_name=bench", f"min_replicas={args.replicas}",
             f"max_replicas={args.replicas}", f"cpus_per_replica={args.cpus_per_replica:g}",
             f"ray.num_cpus={max(int(args.cpus_per_replica * args.replicas), 1)}"],
            Path(tmp) / "serve", port=free_port(), log_path=Path(tmp) / "server.log",
        )
        startup_s = time.perf_counter() - started
        try:
            asyncio.run(load_level(url, "bench", prompts[:4], 4, args.max_tokens, args.request_timeout))  # warm-up
            levels = [asyncio.run(load_level(url, "bench", prompts, c, args.max_tokens, args.request_timeout,
                                             args.kill_replica_after))
                      for c in args.concurrency]
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                stopped_cleanly = process.wait(timeout=180) == 0
            except subprocess.TimeoutExpired:  # keep the measurements; say the stop was not clean
                process.kill()
                process.wait()
                stopped_cleanly = False

    title = (f"rlhf serve under load ({args.model}, {args.replicas} replica(s), {args.max_tokens} max tokens, "
             f"loopback)")
    print_table(levels, title)
    payload = {
        "model": args.model, "replicas": args.replicas, "max_tokens": args.max_tokens,
        "request_timeout_s": args.request_timeout, "server_startup_s": round(startup_s, 1),
        "stopped_cleanly": stopped_cleanly, "load_average": os.getloadavg(),
        "levels": {str(level["concurrency"]): level for level in levels},
    }
    print(f"server start {startup_s:.0f} s; stopped cleanly: {stopped_cleanly}")
    print(f"wrote {write_atomic(args.output, json.dumps(payload, indent=2))}")
    return 0 if all(level["errors"] == 0 and level["lost"] == 0 for level in levels) else 1


if __name__ == "__main__":
    sys.exit(main())
