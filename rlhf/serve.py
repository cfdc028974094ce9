"""`rlhf serve`: the aligned model behind an OpenAI-compatible API on Ray Serve, in the foreground.

    rlhf serve MODEL_DIR [--host H] [--port P] [KEY=VALUE ...]
    rlhf serve -c configs/serve.yaml
    rlhf serve --stop [-c CONFIG]      stop the server started with this config's output_dir

The app itself is cluster/serving.py. While it runs, ``<output_dir>/serve.json`` records its process
id and URL; Ctrl-C, SIGTERM or ``--stop`` shuts the app, Serve and (when this process started it) the
local Ray down, and removes the file.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from pathlib import Path

from rlhf.config import ConfigError, ServeConfig
from rlhf.paths import claim_dir, write_atomic

log = logging.getLogger("rlhf.serve")

APP_NAME = "rlhf"
STATE_FILE = "serve.json"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (an exited process its parent has not reaped yet counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc: trust the signal check


def _read_state(out: Path) -> dict | None:
    """``<out>/serve.json``, or None when there is none; a ConfigError when it is not one we wrote."""
    path = out / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise ConfigError(f"{path} is not a server record rlhf serve wrote ({exc}); check it and remove it") from None
    pid = state.get("pid") if isinstance(state, dict) else None
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        # pid 0 or a negative one would signal a whole process group, 1 is init.
        raise ConfigError(f"{path}: 'pid' must be a process id above 1, got {pid!r}; this is not a record rlhf "
                          "serve wrote: check it and remove it")
    return state


def _process_identity(pid: int) -> dict | None:
    """What tells this process apart from a later one given the same pid: its start time and command
    line. None when no such process runs (a zombie counts as gone)."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return {"started": process.create_time(), "cmdline": process.cmdline()}
    except psutil.Error:
        return None


def _running_server(state: dict | None) -> int | None:
    """The pid of the server ``state`` records if that very process still runs, else None: a record
    whose pid now belongs to another program (the server died, the pid was reused) is stale."""
    if state is None:
        return None
    now, started = _process_identity(state["pid"]), state.get("started")
    if now is None or state.get("cmdline") != now["cmdline"] or not isinstance(started, (int, float)) \
            or abs(now["started"] - started) > 1.0:
        return None
    return state["pid"]


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"port: cannot listen on {host}:{port} ({exc.strerror}); pick another with --port") from None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the server the way Ctrl-C does


def run(cfg: ServeConfig) -> Path:
    import ray
    from ray import serve

    from cluster.runtime import init_ray
    from cluster.serving import build_app, model_name, resolve_api_key
    from rlhf.models import resolve_model_path
    from rlhf.models.loading import check_model_source

    out = Path(cfg.output_dir)
    state = _read_state(out)
    if _running_server(state):
        raise ConfigError(f"output_dir {out}: a server started from it is still running (pid {state['pid']}, "
                          f"{state.get('url')}); stop it with `rlhf serve --stop` or pick another output_dir")
    if os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "disabled" and not cfg.allow_ray_without_auth:
        raise ConfigError("RAY_AUTH_MODE=disabled: without Ray's token authentication, the ports Ray opens for the "
                          "serve replicas run code sent by anyone who can reach them, whatever api_key and host say. "
                          "Unset RAY_AUTH_MODE (token authentication is Ray's default), or set "
                          "allow_ray_without_auth=true to serve anyway")
    check_model_source(resolve_model_path(cfg.model.path))  # fail here, not in every replica
    api_key = resolve_api_key(cfg)  # an empty $RLHF_API_KEY fails here, before anything starts
    if cfg.host not in LOOPBACK and api_key is None:
        log.warning("binding %s without an API key: anyone who can reach this address can use the model "
                    "(set api_key or $RLHF_API_KEY)", cfg.host)
    _check_port_free(cfg.host, cfg.port)
    claim_dir(out, overwrite=cfg.overwrite)

    started_ray = not ray.is_initialized()
    url = f"http://{cfg.host}:{cfg.port}"
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        init_ray(cfg.ray)
        # After init_ray, which installs Ray's own SIGTERM handler (exit 1 without stopping Serve).
        signal.signal(signal.SIGTERM, _raise_interrupt)
        # A shell starts background commands with SIGINT ignored, and Python keeps it ignored: make
        # SIGINT (Ctrl-C, or `kill -INT`) stop the server however it was started.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        start = time.perf_counter()
        # A short keep-alive: on stop the proxy waits for idle client connections to time out (90 s by default).
        serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s,
                                  "keep_alive_timeout_s": 5})
        serve.run(build_app(cfg), name=APP_NAME, route_prefix="/", blocking=False)
        # The start time and command line let `--stop` check that the pid is still this server.
        write_atomic(out / STATE_FILE, json.dumps({"pid": os.getpid(), **_process_identity(os.getpid()), "url": url,
                                                   "model": model_name(cfg), "app": APP_NAME}))
        print(f"serving '{model_name(cfg)}' at {url}/v1 (OpenAI API; ready in {time.perf_counter() - start:.0f} s). "
              f"Ctrl-C or `rlhf serve --stop` stops it.", flush=True)
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        print(f"stopping the server (replicas get {cfg.shutdown_grace_s:g} s to finish requests in flight)...",
              flush=True)
    finally:
        stopping = time.perf_counter()
        try:
            if ray.is_initialized():
                serve.shutdown()
                log.info("serve shut down in %.1f s", time.perf_counter() - stopping)
        finally:
            (out / STATE_FILE).unlink(missing_ok=True)
            if started_ray:
                ray.shutdown()
            signal.signal(signal.SIGTERM, previous[0])
            signal.signal(signal.SIGINT, previous[1])
    print(f"server stopped ({time.perf_counter() - stopping:.0f} s)", flush=True)
    return out


def stop(cfg: ServeConfig, timeout_s: float = 120.0) -> bool:
    """Stop the server recorded in ``<output_dir>/serve.json`` (SIGTERM, then wait). On a cluster
    (``ray.address`` set) with no local record, delete the app there instead. True if one was stopped."""
    out = Path(cfg.output_dir)
    state = _read_state(out)
    pid = _running_server(state)
    if pid:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            raise RuntimeError(f"the server (pid {pid}) did not stop within {timeout_s:g} s")
        print(f"stopped the server at {state.get('url')} (pid {pid})")
        return True
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        import ray
        from ray import serve

        from cluster.runtime import init_ray

        init_ray(cfg.ray)
        try:
            serve.delete(APP_NAME)
        finally:
            ray.shutdown()
        print(f"deleted the serve app '{APP_NAME}' on the cluster")
        return True
    if state is not None:  # a record left by a server that died; its pid may be another program's now
        (out / STATE_FILE).unlink(missing_ok=True)
        print(f"no running server: {out / STATE_FILE} named pid {state['pid']}, which is no longer that server; "
              "removed the stale record (nothing was signalled)")
        return False
    print(f"no running server recorded in {out / STATE_FILE}")
    return False


def build_app(args: dict):
    """The Serve application builder named in a RayService (``import_path: rlhf.serve:build_app``):
    ``args`` is ``{config: FILE or null, overrides: [KEY=VALUE, ...]}``, as for ``rlhf serve``."""
    from cluster.serving import build_app as build
    from rlhf.config import load_config

    unknown = set(args) - {"config", "overrides"}
    if unknown:
        raise ConfigError(f"serve app args: unknown keys {sorted(unknown)}; expected config and overrides")
    return build(load_config("serve", args.get("config"), list(args.get("overrides") or [])))


def spawn(overrides: list[str], output_dir: str | Path, *, port: int, log_path: str | Path,
          ready_timeout_s: float = 240.0):
    """Start ``rlhf serve`` in a child process (tests, benchmarks) and wait until it serves.

    Returns ``(process, url)``. The child writes its output to ``log_path``; on failure to start
    it is killed and the error quotes the end of that log.
    """
    import subprocess
    import sys

    out = Path(output_dir)
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "rlhf.cli", "serve", f"output_dir={out}", *overrides, "--port", str(port)],
            stdout=log_file, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    deadline = time.monotonic() + ready_timeout_s
    while not (out / STATE_FILE).is_file():
        if process.poll() is not None or time.monotonic() > deadline:
            why = f"exited with {process.returncode}" if process.poll() is not None else \
                f"was not ready within {ready_timeout_s:g} s"
            process.kill()
            process.wait()
            tail = Path(log_path).read_text()[-3000:]
            raise RuntimeError(f"rlhf serve {why}; end of {log_path}:\n{tail}")
        time.sleep(0.5)
    return process, f"http://127.0.0.1:{port}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
