"""Load test of `rlhf serve` on loopback: a bounded number of chat requests at each concurrency level.

Starts the real server (`rlhf serve`, a child process), sends ``--requests`` chat completions per
concurrency level from an async HTTP client, each bounded by ``--request-timeout``, and reports
requests/s, generated tokens/s, latency percentiles, errors (a response other than 200) and lost
requests (no response: timeout or dropped connection). Then it stops the server (SIGTERM, as
`rlhf serve --stop` does); the measurements are kept even if the stop is not clean.

``--abuse`` runs every level twice, side by side: once quiet, once while a hostile client sends
oversized and malformed requests as fast as the server answers them (``--hostile-in-flight`` at a
time: 2 MiB bodies, 100,000-deep JSON, 5000-digit integers, lone surrogates, 1000 prompts x n=16,
64-bit-overflowing seeds, streamed or not). The well-behaved clients stream (``--stream``); the table
and JSON give their p50/p99, errors and lost requests in both runs, the p99 ratio, and what the
hostile client got back (each must be a 4xx; a 5xx or a dropped connection is counted).

    python benchmarks/serve_load.py --output bench-results/serve_load.json
    python benchmarks/serve_load.py --model tiny --requests 100 --output /tmp/serve.json   # quick
    python benchmarks/serve_load.py --abuse --concurrency 16 --output bench-results/serve_abuse.json
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


async def one_request(http, model: str, prompt: str, max_tokens: int, timeout_s: float, stream: bool = False) -> dict:
    """One chat completion (streamed: read to [DONE]): its outcome, latency and generated tokens."""
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 1.0}
    start = time.perf_counter()

    async def streamed() -> tuple[int, int]:
        tokens = 0
        async with http.stream("POST", "/v1/chat/completions",
                               json={**body, "stream": True, "stream_options": {"include_usage": True}}) as response:
            if response.status_code != 200:
                return response.status_code, 0
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    if "error" in event:
                        return 500, 0
                    tokens = (event.get("usage") or {}).get("completion_tokens", tokens)
        return 200, tokens

    try:
        if stream:
            status, tokens = await asyncio.wait_for(streamed(), timeout_s)
        else:
            response = await asyncio.wait_for(http.post("/v1/chat/completions", json=body), timeout_s)
            status = response.status_code
            tokens = response.json()["usage"]["completion_tokens"] if status == 200 else 0
    except (asyncio.TimeoutError, httpx.HTTPError) as exc:
        return {"outcome": "lost", "why": type(exc).__name__, "latency_s": time.perf_counter() - start}
    latency = time.perf_counter() - start
    if status != 200:
        return {"outcome": "error", "status": status, "latency_s": latency}
    return {"outcome": "ok", "latency_s": latency, "tokens": tokens}


def hostile_requests(model: str) -> list[tuple[str, str, bytes]]:
    """(name, endpoint, body) of what the hostile client sends; every one must get a 4xx."""
    chat = "/v1/chat/completions"
    completions = "/v1/completions"

    def body(**fields) -> bytes:
        return json.dumps({"model": model, **fields}).encode()

    return [
        ("2 MiB body", chat, body(messages=[{"role": "user", "content": "hi " * 700_000}])),
        ("100k-deep JSON", completions, ('{"model": "m", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}").encode()),
        ("5000-digit integer", completions, ('{"model": "m", "prompt": "hi", "max_tokens": ' + "9" * 5000 + "}").encode()),
        ("lone surrogate", chat, b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}'),
        ("1000 prompts x n=16", completions, body(prompt=["hi"] * 1000, n=16, max_tokens=1)),
        ("seed 2**64, streamed", chat, body(messages=[{"role": "user", "content": "hi"}], seed=2**64, stream=True)),
        ("malformed JSON", chat, b'{"model": "m", "messages": [{"role": '),
        ("unknown parameter", chat, body(messages=[{"role": "user", "content": "hi"}], logit_bias={"1": 100})),
    ]


async def hostile_client(url: str, model: str, stop: asyncio.Event, in_flight: int) -> dict[str, int]:
    """Send :func:`hostile_requests` round-robin, ``in_flight`` at a time, until ``stop``; counts of
    "name: status" (or the exception's name when the connection failed)."""
    import httpx

    requests = hostile_requests(model)
    counts: dict[str, int] = {}

    async def worker(k: int) -> None:
        i = k
        while not stop.is_set():
            name, endpoint, body = requests[i % len(requests)]
            i += in_flight
            try:
                response = await http.post(endpoint, content=body, headers={"Content-Type": "application/json"})
                outcome = str(response.status_code)
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            counts[f"{name}: {outcome}"] = counts.get(f"{name}: {outcome}", 0) + 1

    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        await asyncio.gather(*(worker(k) for k in range(in_flight)))
    return counts


async def kill_a_replica(http, after_s: float) -> int:
    """SIGKILL the replica that answers /health, ``after_s`` seconds into the level; its pid."""
    await asyncio.sleep(after_s)
    pid = (await http.get("/health")).json()["replica_pid"]
    os.kill(pid, signal.SIGKILL)
    return pid


async def load_level(url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int,
                     timeout_s: float, kill_after_s: float | None = None, stream: bool = False,
                     hostile_in_flight: int = 0) -> dict:
    """All ``prompts`` at ``concurrency`` requests in flight (and, with ``kill_after_s``, one replica
    killed on the way; with ``hostile_in_flight``, a hostile client beside them)."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout_s + 5) as http:
        async def gated(prompt: str) -> dict:
            async with gate:
                return await one_request(http, model, prompt, max_tokens, timeout_s, stream)

        stop = asyncio.Event()
        hostile = (asyncio.create_task(hostile_client(url, model, stop, hostile_in_flight))
                   if hostile_in_flight else None)
        start = time.perf_counter()
        killer = asyncio.create_task(kill_a_replica(http, kill_after_s)) if kill_after_s is not None else None
        results = await asyncio.gather(*(gated(p) for p in prompts))
        wall = time.perf_counter() - start
        killed = await killer if killer is not None else None
        stop.set()
        hostile_counts = await hostile if hostile is not None else None
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
        "hostile": hostile_counts,
    }


def print_table(levels: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    columns = ("concurrency", "requests", "ok", "errors", "lost", "requests_per_s", "tokens_per_s",
               "p50_ms", "p95_ms", "p99_ms")
    if any(level.get("run") for level in levels):
        columns = ("run", *columns, "p99_ratio")
    for column in columns:
        table.add_column(column.replace("_per_s", "/s").replace("_ms", " ms"), justify="right")
    for level in levels:
        table.add_row(*(str(level.get(c, "")) for c in columns))
    Console(width=160).print(table)


def hostile_summary(counts: dict[str, int]) -> tuple[int, int]:
    """(hostile requests answered with a 4xx, those that were not: a 5xx or a failed connection)."""
    refused = sum(n for key, n in counts.items() if key.rsplit(": ", 1)[1].startswith("4"))
    return refused, sum(counts.values()) - refused


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
    parser.add_argument("--stream", action="store_true", help="the well-behaved clients stream (on with --abuse)")
    parser.add_argument("--abuse", action="store_true",
                        help="run each level quiet and then beside a hostile client; compare the p99s")
    parser.add_argument("--hostile-in-flight", type=int, default=1, help="the hostile client's requests at once (1: one connection)")
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
            stream = args.stream or args.abuse
            levels = []
            for c in args.concurrency:
                quiet = asyncio.run(load_level(url, "bench", prompts, c, args.max_tokens, args.request_timeout,
                                               args.kill_replica_after, stream))
                levels.append(quiet)
                if args.abuse:
                    quiet["run"] = "quiet"
                    abused = asyncio.run(load_level(url, "bench", prompts, c, args.max_tokens, args.request_timeout,
                                                    args.kill_replica_after, stream, args.hostile_in_flight))
                    abused["run"] = "hostile client"
                    abused["p99_ratio"] = round(abused["p99_ms"] / quiet["p99_ms"], 2)
                    abused["hostile_refused"], abused["hostile_not_refused"] = hostile_summary(abused["hostile"])
                    levels.append(abused)
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
        "model": args.model, "replicas": args.replicas, "max_tokens": args.max_tokens, "stream": stream,
        "request_timeout_s": args.request_timeout, "server_startup_s": round(startup_s, 1),
        "stopped_cleanly": stopped_cleanly, "load_average": os.getloadavg(),
        "levels": {f"{level['concurrency']}{'/' + level['run'] if level.get('run') else ''}": level
                   for level in levels},
    }
    print(f"server start {startup_s:.0f} s; stopped cleanly: {stopped_cleanly}")
    for level in levels:
        if level.get("hostile"):
            print(f"hostile client at concurrency {level['concurrency']}: {level['hostile_refused']} refused with "
                  f"a 4xx, {level['hostile_not_refused']} not; " + ", ".join(f"{k} x{n}" for k, n in
                                                                          sorted(level["hostile"].items())))
    print(f"wrote {write_atomic(args.output, json.dumps(payload, indent=2))}")
    clean = all(level["errors"] == 0 and level["lost"] == 0 and not level.get("hostile_not_refused")
                for level in levels)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
