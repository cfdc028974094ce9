"""The Ray runtime: a local embedded Ray on loopback by default, or an existing cluster.

(The loopback default is set in rlhf/__init__.py, because Ray reads it when it is imported.)

Ray waits forever for resources it cannot get, so placement groups are created only after a check
that fails fast, naming what is missing, and are awaited with a timeout.
"""

from __future__ import annotations

import os
import re
import socket
from collections import defaultdict
from pathlib import Path

from rlhf.config import RayConfig


class ResourceError(RuntimeError):
    """The cluster cannot host what was asked for; the message says what is missing."""


class ActorStartError(RuntimeError):
    """Actors failed to start, or did not start in time; the message names the role and the cause."""


# Causes whose fix is a setting of ours, not the library's (vLLM's own advice names GPU settings).
_START_HINTS = {
    "No available memory for the cache blocks": "raise rollout.kv_cache_gib",
    "KV cache is needed": "raise rollout.kv_cache_gib or lower the context length",
    "config.json": "model.path must be a Hugging Face model folder",
}


def root_cause(error: BaseException) -> str:
    """The last ``SomeError: message`` line of a remote error's text (Ray wraps the traceback)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b:?", line)]
    return causes[-1] if causes else (lines[-1] if lines else type(error).__name__)


def wait_for_actors(refs: list, *, role: str, timeout_s: float) -> list:
    """``ray.get(refs)`` for the first call of freshly created actors, bounded: an actor whose
    constructor failed, or that did not answer within ``timeout_s``, is an ActorStartError."""
    import ray

    try:
        return ray.get(refs, timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ActorStartError(
            f"{role}: not started within {timeout_s:g} s (a slow model load, or no free resources: available "
            f"{_fmt(ray.available_resources())}); ray.actor_start_timeout_s sets the bound"
        ) from None
    except ray.exceptions.RayActorError as exc:
        cause = root_cause(exc)
        hint = next((f" ({fix})" for text, fix in _START_HINTS.items() if text in str(exc)), "")
        raise ActorStartError(f"{role} failed to start: {cause}{hint}") from None


# A local Ray runs no dashboard (one listener fewer), so Ray's State API is absent and Ray Train's
# placement-group cleaner would warn about it every few seconds of every SFT and reward-model run.
_NOISY_WITHOUT_DASHBOARD = "ray.train.v2._internal.execution.controller.placement_group_cleaner"


def setup_local_worker() -> None:
    """Runs in every worker of a local Ray (``worker_process_setup_hook``): mutes the warning above,
    and keeps Serve replicas' gRPC servers on loopback (:func:`_grpc_ports_on_loopback`)."""
    import logging

    logging.getLogger(_NOISY_WITHOUT_DASHBOARD).setLevel(logging.ERROR)
    _grpc_ports_on_loopback()


def _grpc_ports_on_loopback() -> None:
    """Ray Serve replicas bind their inter-deployment gRPC server to ``[::]:0``, every interface,
    whatever the node's address. On a local Ray all traffic is loopback, so the port is bound to
    127.0.0.1 instead: Ray's helper is wrapped before Serve's replica module takes it by name."""
    import sys

    from ray._common import tls_utils

    bind = tls_utils.add_port_to_grpc_server
    if getattr(bind, "on_loopback", False):
        return

    def on_loopback(server, address: str):
        host, _, port = address.rpartition(":")
        return bind(server, f"127.0.0.1:{port}" if host in ("[::]", "0.0.0.0", "") else address)

    on_loopback.on_loopback = True
    tls_utils.add_port_to_grpc_server = on_loopback
    replica = sys.modules.get("ray.serve._private.replica")
    if replica is not None:  # imported before this hook ran
        replica.add_port_to_grpc_server = on_loopback


def init_ray(cfg: RayConfig | None = None, *, runtime_env: dict | None = None) -> None:
    """Connect to ``cfg.address`` / $RAY_ADDRESS, else start a local embedded Ray on 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    cfg = cfg or RayConfig()
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        # rlhf/__init__.py pinned node-IP detection to loopback for local runs; a real cluster needs
        # the machine's address, but a head on loopback (tests, a laptop) must keep 127.0.0.1.
        host = address.split("://")[-1].rsplit(":", 1)[0].strip("[]")
        if host not in ("127.0.0.1", "localhost", "::1"):
            from ray._private import ray_constants

            ray_constants.ENABLE_RAY_CLUSTER = True
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True)
        return
    # Keep a local Ray on loopback even when ray was imported before rlhf (which sets the variable
    # Ray reads at import: see rlhf/__init__.py).
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    runtime_env = {"worker_process_setup_hook": "cluster.runtime.setup_local_worker", **(runtime_env or {})}
    ray.init(
        # "local": always a fresh instance. Without it ray.init() joins whatever cluster `ray start`
        # last started on this machine (someone else's, say) and competes for its resources.
        address="local",
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        runtime_env=runtime_env,
        log_to_driver=True,
    )


def listeners_beyond_loopback(root_pid: int) -> list[str]:
    """The sockets of the process tree under ``root_pid`` that listen on an address other than
    loopback (TCP listening, or UDP bound), as ``"pid name address:port"``: empty when nothing that
    tree opened can be reached from another machine."""
    import ipaddress

    import psutil

    root = psutil.Process(root_pid)
    names = {root.pid: root.name()}
    for child in root.children(recursive=True):
        try:
            names[child.pid] = child.name()
        except psutil.Error:  # it exited meanwhile
            pass
    found = []
    for conn in psutil.net_connections(kind="inet"):
        if conn.pid not in names or not conn.laddr:
            continue
        listening = conn.status == psutil.CONN_LISTEN or (conn.type == socket.SOCK_DGRAM and not conn.raddr)
        address = ipaddress.ip_address(conn.laddr.ip.split("%")[0])
        mapped = getattr(address, "ipv4_mapped", None)
        if listening and not (mapped or address).is_loopback:
            found.append(f"{conn.pid} {names[conn.pid]} {conn.laddr.ip}:{conn.laddr.port}")
    return sorted(found)


def _fmt(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items())) or "nothing"


def check_resources(bundles: list[dict[str, float]], *, strategy: str = "PACK", what: str = "this job") -> None:
    """Fail fast when the cluster can never host ``bundles`` (total, or per node for STRICT_PACK)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    need: dict[str, float] = defaultdict(float)
    for bundle in bundles:
        for key, amount in bundle.items():
            need[key] += amount
    total: dict[str, float] = defaultdict(float)
    for node in nodes:
        for key, amount in node.items():
            total[key] += amount
    missing = {k: v - total.get(k, 0.0) for k, v in need.items() if v > total.get(k, 0.0) + 1e-9}
    if missing:
        raise ResourceError(
            f"{what} needs {_fmt(need)} in {len(bundles)} bundles, but the cluster has "
            f"{_fmt({k: total.get(k, 0.0) for k in need})}: missing {_fmt(missing)}. "
            "Lower the workers/engines or their cpus/gpus, or add nodes."
        )
    for i, bundle in enumerate(bundles):
        if not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()) for node in nodes):
            raise ResourceError(f"{what}: bundle {i} ({_fmt(bundle)}) fits on no single node")
    if strategy == "STRICT_PACK" and not any(
        all(node.get(k, 0.0) + 1e-9 >= v for k, v in need.items()) for node in nodes
    ):
        raise ResourceError(f"{what}: STRICT_PACK needs {_fmt(need)} on one node; no node has that")


def create_placement_group(bundles: list[dict[str, float]], *, strategy: str = "PACK",
                           name: str = "", timeout_s: float = 30.0, what: str = "this job"):
    """Check, create, and wait (bounded) for a placement group."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    check_resources(bundles, strategy=strategy, what=what)
    group = placement_group(bundles, strategy=strategy, name=name)
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise ResourceError(
            f"{what}: placement group ({_fmt(bundles[0])} x {len(bundles)}, {strategy}) was not ready "
            f"within {timeout_s:g} s; other jobs may hold the resources (available now: "
            f"{_fmt(ray.available_resources())})"
        ) from None
    return group
