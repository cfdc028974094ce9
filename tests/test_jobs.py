"""`rlhf submit` / `rlhf jobs`: pure helpers, then real Ray Jobs on a head this module starts itself.

The head runs on 127.0.0.1 with explicit ports and token authentication (the client gets the same
mode and token), in a process group of its own that the fixture ends by its id afterwards.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from cluster.jobs import (
    DEFAULT_EXCLUDES,
    JobError,
    config_in_working_dir,
    display_command,
    parse_env,
    resolve_address,
    resolve_job,
    runtime_env,
    stage_command,
)
from rlhf.cli import main
from rlhf.cli_jobs import job_section
from rlhf.config import ConfigError, JobConfig, mask_secrets
from rlhf.serve import free_port

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
TINY_SFT = [
    "data.max_records=64", "optim.max_steps=2", "optim.eval_every=100", "scaling.workers=1", "sample_prompts=[]",
]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def marked_processes(marker: str) -> list[int]:
    """Ids of live processes whose environment carries ``RLHF_TEST_RAY=<marker>``."""
    needle = f"RLHF_TEST_RAY={marker}".encode()
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in Path(entry.path, "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
    return found


_WORKER_NODE = """
import json, sys, time
from ray._private.node import Node
from ray._private.parameter import RayParams
Node(RayParams(**json.loads(sys.argv[1])), head=False, shutdown_at_exit=True, spawn_reaper=True)
while True:
    time.sleep(60)
"""


class RayNodes:
    """Ray nodes started with `ray start --block`, each in a process group of its own, on 127.0.0.1.

    Every process they start (raylet, workers, job drivers in sessions of their own) inherits a
    marker in its environment, so what is left afterwards can be found, and only those are ended.
    """

    def __init__(self, temp_dir: Path, client_env: dict[str, str]) -> None:
        self.temp_dir = temp_dir
        self.marker = secrets.token_hex(8)
        self.client_env = {**client_env, "RAY_USAGE_STATS_ENABLED": "0",
                           "PATH": f"{VENV_BIN}{os.pathsep}{client_env.get('PATH', '')}"}
        self.client_env.pop("RAY_ADDRESS", None)
        self.env = {**self.client_env, "RLHF_TEST_RAY": self.marker}
        self.procs: list[subprocess.Popen] = []
        self.ports: list[int] = []
        self.gcs_port = self.dashboard_port = 0

    def _start(self, cmd: list[str], env: dict[str, str], log: str) -> None:
        with open(self.temp_dir / log, "w") as out:
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                               start_new_session=True))

    def start_head(self, *, num_cpus: int, dashboard: bool = True, resources: str | None = None,
                   num_gpus: int = 0, timeout_s: float = 90) -> None:
        self.gcs_port, self.dashboard_port, client = free_port(), free_port(), free_port()
        self.ports += [self.gcs_port, client] + ([self.dashboard_port] if dashboard else [])
        args = ["--head", f"--port={self.gcs_port}", f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
                f"--ray-client-server-port={client}", f"--temp-dir={self.temp_dir}",
                f"--include-dashboard={'true' if dashboard else 'false'}"]
        if dashboard:
            args += ["--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"]
        if resources:
            args.append(f"--resources={resources}")
        agent = free_port()
        self.ports.append(agent)
        cmd = [str(VENV_BIN / "ray"), "start", *args, "--node-ip-address=127.0.0.1",
               f"--dashboard-agent-listen-port={agent}", "--block"]
        # A head on this machine stays on loopback (see rlhf/__init__.py).
        self._start(cmd, {**self.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, "head.log")
        self._wait(lambda: port_open(self.gcs_port) and (not dashboard or self._dashboard_answers()), timeout_s)

    def add_worker(self, *, num_cpus: int, num_gpus: int = 0, resources: dict[str, float] | None = None) -> None:
        """A second node on 127.0.0.1. `ray start --address` cannot make one here: it refuses while
        node-IP detection is pinned to loopback, and unpinned it turns 127.0.0.1 into the machine's
        address. So the node is started directly, as `ray start --block` would, in a process of its own."""
        agent = free_port()
        self.ports.append(agent)
        # Sockets named here: two such nodes started together otherwise pick the same free name in the
        # session's socket folder, and the second one's object store fails to bind it.
        sockets = self.temp_dir / "sockets"
        sockets.mkdir(exist_ok=True)
        n = len(self.procs)
        params = dict(gcs_address=f"127.0.0.1:{self.gcs_port}", node_ip_address="127.0.0.1", num_cpus=num_cpus,
                      num_gpus=num_gpus, resources=resources or {}, dashboard_agent_listen_port=agent,
                      min_worker_port=0, max_worker_port=0, plasma_store_socket_name=str(sockets / f"plasma{n}"),
                      raylet_socket_name=str(sockets / f"raylet{n}"))
        env = {**self.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": str(self.temp_dir)}
        self._start([sys.executable, "-c", _WORKER_NODE, json.dumps(params)], env, f"worker{n}.log")

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _dashboard_answers(self) -> bool:
        try:
            urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=2)
        except urllib.error.HTTPError:
            return True  # it answers (401 in token mode)
        except OSError:
            return False
        return True

    def _wait(self, ready, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(f"ray start exited with {proc.returncode}: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray did not come up within {timeout_s} s: {self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self) -> str:
        return "\n".join(p.read_text()[-2000:] for p in sorted(self.temp_dir.glob("*.log")))

    def stop(self, grace_s: float = 5) -> list[str]:
        """End the nodes: SIGTERM each process group, SIGKILL what is left of it after ``grace_s``.

        Returns what was still there afterwards (processes with the marker, ports answering); those
        processes, all started by these nodes, are then killed by their ids.
        """
        for proc in reversed(self.procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in reversed(self.procs):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        deadline = time.monotonic() + grace_s  # workers notice their raylet is gone and exit
        while (left := marked_processes(self.marker)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return [f"process {pid}" for pid in left] + [f"port {p}" for p in self.ports if port_open(p)]


# --------------------------------------------------------------------------------------------------
# Pure helpers and local checks (no cluster)
# --------------------------------------------------------------------------------------------------


def test_env_parsing_and_masking():
    env = parse_env(["RLHF_HOME=/data/rlhf", "HF_TOKEN", "EMPTY="], environ={"HF_TOKEN": "hf_abc"})
    assert env == {"RLHF_HOME": "/data/rlhf", "HF_TOKEN": "hf_abc", "EMPTY": ""}
    assert mask_secrets(env) == {"RLHF_HOME": "/data/rlhf", "HF_TOKEN": "***", "EMPTY": ""}
    with pytest.raises(JobError, match="HF_TOKEN: not set here"):
        parse_env(["HF_TOKEN"], environ={})
    with pytest.raises(JobError, match="expected KEY=VALUE"):
        parse_env(["=x"])


def test_command_and_runtime_env(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "a.yaml").write_text("seed: 1\n")
    assert config_in_working_dir(tmp_path / "configs" / "a.yaml", tmp_path) == "configs/a.yaml"
    outside = tmp_path.parent / f"{tmp_path.name}-outside.yaml"
    outside.write_text("seed: 1\n")
    with pytest.raises(JobError, match="outside the working directory"):
        config_in_working_dir(outside, tmp_path / "configs")
    with pytest.raises(JobError, match="does not exist"):
        config_in_working_dir(tmp_path / "nope.yaml", tmp_path)

    argv = stage_command("serve", "configs/a.yaml", ["api_key=s3cret", "port=9000"])
    assert argv == ["rlhf", "serve", "-c", "configs/a.yaml", "api_key=s3cret", "port=9000"]
    assert display_command(argv) == "rlhf serve -c configs/a.yaml 'api_key=***' port=9000"
    assert stage_command("bench", None, ["prompts=8"], ["rollout"]) == ["rlhf", "bench", "rollout", "prompts=8"]

    renv = runtime_env(JobConfig(working_dir=str(tmp_path), env_vars={"A": "1"}, pip=["rlhf[gpu]"], excludes=["data"]))
    assert renv == {"working_dir": str(tmp_path.resolve()), "excludes": [*DEFAULT_EXCLUDES, "data"],
                    "env_vars": {"A": "1"}, "pip": ["rlhf[gpu]"]}
    assert {".git", ".venv", "runs", ".cache"} <= set(renv["excludes"])
    assert "env_vars" not in runtime_env(JobConfig(working_dir=str(tmp_path)))
    with pytest.raises(JobError, match="working directory nope does not exist"):
        runtime_env(JobConfig(working_dir="nope"))


def test_the_config_job_section_under_the_command_line(tmp_path):
    config = tmp_path / "ppo.yaml"
    config.write_text(
        "job:\n  address: http://head:8265\n  working_dir: /srv/rlhf\n  env_vars: {RLHF_HOME: /mnt/cache, A: '1'}\n"
        "  pass_env: [HF_TOKEN]\n  pip: ['rlhf[gpu]']\n  entrypoint_num_cpus: 1\nsteps: 3\n"
    )
    job = job_section(str(config), ["steps=4", "job.excludes=[data]"])
    assert job == JobConfig(address="http://head:8265", working_dir="/srv/rlhf", excludes=["data"],
                            env_vars={"RLHF_HOME": "/mnt/cache", "A": "1"}, pass_env=["HF_TOKEN"], pip=["rlhf[gpu]"],
                            entrypoint_num_cpus=1)
    # Options replace the address and working dir; --env, --pip and --exclude add (an --env wins).
    resolved = resolve_job(job, working_dir=".", env=["A=2", "B=3"], pip=["peft"], exclude=["*.ckpt"],
                           entrypoint_num_gpus=1, environ={"HF_TOKEN": "hf_x"})
    assert resolved == JobConfig(address="http://head:8265", working_dir=".", excludes=["data", "*.ckpt"],
                                 env_vars={"RLHF_HOME": "/mnt/cache", "A": "2", "HF_TOKEN": "hf_x", "B": "3"},
                                 pip=["rlhf[gpu]", "peft"], entrypoint_num_cpus=1, entrypoint_num_gpus=1)
    assert resolve_job(job, address="http://other:8265", environ={"HF_TOKEN": ""}).address == "http://other:8265"
    with pytest.raises(JobError, match="job.pass_env: HF_TOKEN not set here"):
        resolve_job(job, environ={})
    with pytest.raises(ConfigError, match=r"ppo.yaml.*\n  job.pip: Input should be a valid list"):
        job_section(str(config), ["job.pip=rlhf"])
    with pytest.raises(ConfigError, match="unknown key 'job.adress'; valid keys here: address, working_dir"):
        job_section(str(config), ["job.adress=x"])
    with pytest.raises(ConfigError, match="job.env_vars: .*not environment variable names: '1A'"):
        job_section(None, ["job.env_vars={1A: x}"])


def test_address_resolution():
    assert resolve_address(None, {}) == "http://127.0.0.1:8265"
    assert resolve_address("10.0.0.5:8265", {"RAY_API_SERVER_ADDRESS": "http://x:1"}) == "http://10.0.0.5:8265"
    assert resolve_address(None, {"RAY_API_SERVER_ADDRESS": "http://x:1"}) == "http://x:1"
    assert resolve_address(None, {"RAY_ADDRESS": "http://head:8265"}) == "http://head:8265"
    assert resolve_address(None, {"RAY_ADDRESS": "10.0.0.5:6379"}) == "http://127.0.0.1:8265"  # a GCS address


def test_bad_config_is_refused_before_submitting(capsys, tmp_path):
    # Port 1 has no cluster: the command must fail on the config, never reaching the network.
    code = main(["submit", "sft", "-c", "configs/tiny/sft.yaml", "--address", "http://127.0.0.1:1", "optim.bogus=1"])
    assert code == 2
    assert "unknown key 'optim.bogus'" in capsys.readouterr().err
    (tmp_path / "sft.yaml").write_text("seed: 1\n")
    code = main(["submit", "sft", "-c", str(tmp_path / "sft.yaml"), "--address", "http://127.0.0.1:1"])
    assert code == 2
    assert "outside the working directory" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_unreachable_cluster_is_a_clear_error(capsys):
    code = main(["jobs", "list", "--address", f"127.0.0.1:{free_port()}"])
    assert code == 2
    assert "cannot reach the Ray dashboard at http://127.0.0.1:" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Real jobs on a head of our own
# --------------------------------------------------------------------------------------------------


def drivers_keep_a_loopback_cluster_on_loopback() -> bool:
    """Whether `init_ray` connects to a cluster at 127.0.0.1 without switching Ray's node-IP detection
    to the machine's network address (which makes a job's driver look for the head there and hang)."""
    import ray
    from ray._private import ray_constants

    from cluster.runtime import init_ray
    from rlhf.config import RayConfig

    saved = ray_constants.ENABLE_RAY_CLUSTER
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray, "is_initialized", lambda: False)
        patch.setattr(ray, "init", lambda **kwargs: None)
        ray_constants.ENABLE_RAY_CLUSTER = False
        try:
            init_ray(RayConfig(address="127.0.0.1:6379"))
            return not ray_constants.ENABLE_RAY_CLUSTER
        finally:
            ray_constants.ENABLE_RAY_CLUSTER = saved


needs_loopback_drivers = pytest.mark.skipif(
    not drivers_keep_a_loopback_cluster_on_loopback(),
    reason="cluster/runtime.py init_ray sets ray_constants.ENABLE_RAY_CLUSTER = True for every address, so a "
    "job on a head at 127.0.0.1 resolves 127.0.0.1 to the machine's address and hangs; it must keep "
    "loopback for a loopback address",
)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    # Token mode on both sides, with a token of this test's own (not ~/.ray/auth_token).
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    nodes = RayNodes(tmp_path_factory.mktemp("ray"), {**os.environ, **auth})
    try:
        nodes.start_head(num_cpus=2)
        yield nodes
    finally:
        assert nodes.stop() == [], "left behind after the head was stopped"


def rlhf(head: RayNodes, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`rlhf ...` in a process of its own, with the client's auth settings, from the repo root."""
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], cwd=REPO, env=env or head.client_env,
                          capture_output=True, text=True, timeout=timeout)


def submit_args(head: RayNodes, out: Path, *extra: str) -> list[str]:
    return ["submit", "sft", "-c", "configs/tiny/sft.yaml", "--address", head.dashboard,
            "--env", f"RLHF_HOME={os.environ['RLHF_HOME']}", *extra, *TINY_SFT, f"output_dir={out}"]


@pytest.mark.slow
@needs_loopback_drivers
@pytest.mark.timeout(600)
def test_sft_job_succeeds_and_its_logs_show_the_output(head, tmp_path):
    out = tmp_path / "sft"
    # The job's environment from the config's job section (here an override) instead of --env.
    args = [a for a in submit_args(head, out, "--follow") if not a.startswith(("--env", "RLHF_HOME="))]
    done = rlhf(head, *args, "job.pass_env=[RLHF_HOME]", timeout=540)
    assert done.returncode == 0, done.stderr + done.stdout[-3000:]
    submission_id = done.stdout.splitlines()[0]
    assert submission_id.startswith("raysubmit_")
    assert f"job {submission_id}: SUCCEEDED" in done.stderr
    assert f"sft: done, output in {out}/final" in done.stdout  # followed logs
    assert (out / "final" / "config.json").is_file() and (out / "metrics.jsonl").is_file()

    status = rlhf(head, "jobs", "status", submission_id, "--address", head.dashboard)
    assert status.returncode == 0 and f"{submission_id}: SUCCEEDED" in status.stdout
    assert "rlhf sft -c configs/tiny/sft.yaml" in status.stdout
    logs = rlhf(head, "jobs", "logs", submission_id, "--address", head.dashboard)
    assert f"sft: done, output in {out}/final" in logs.stdout


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_failing_job_reports_failed_with_the_error_in_its_logs(head, tmp_path):
    done = rlhf(head, *submit_args(head, tmp_path / "bad", "data.train_path=missing-records.jsonl"))
    assert done.returncode == 1, done.stderr
    submission_id = done.stdout.splitlines()[0]
    assert f"job {submission_id}: FAILED" in done.stderr
    logs = rlhf(head, "jobs", "logs", submission_id, "--address", head.dashboard)
    assert "missing-records.jsonl: file not found" in logs.stdout


@pytest.mark.slow
@needs_loopback_drivers
@pytest.mark.timeout(300)
def test_stop_ends_a_running_job(head, tmp_path):
    out = tmp_path / "long"
    job_id = f"rlhf-stop-{secrets.token_hex(4)}"
    args = submit_args(head, out, "--submission-id", job_id, "--follow")
    args = [a for a in args if not a.startswith("optim.max_steps")] + ["optim.max_steps=100000", "optim.epochs=1000"]
    follower = subprocess.Popen([sys.executable, "-m", "rlhf.cli", *args], cwd=REPO, env=head.client_env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not (out / "config.yaml").is_file():  # the stage itself is running (it writes this first)
            assert follower.poll() is None, follower.communicate()
            time.sleep(0.5)
        stopped = rlhf(head, "jobs", "stop", job_id, "--address", head.dashboard)
        assert stopped.returncode == 0, stopped.stderr
        assert f"{job_id}: STOPPED" in stopped.stdout
        stdout, stderr = follower.communicate(timeout=60)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 1 and f"job {job_id}: STOPPED" in stderr
    assert stdout.splitlines()[0] == job_id

    listing = rlhf(head, "jobs", "list", "--address", head.dashboard)
    row = next(line for line in listing.stdout.splitlines() if line.startswith(job_id))
    assert "STOPPED" in row and " sft " in row


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_client_without_the_token_is_told_how_to_authenticate(head):
    env = {**head.client_env, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_AUTH_TOKEN")
    refused = rlhf(head, "jobs", "list", "--address", head.dashboard, env=env)
    assert refused.returncode == 2
    assert "set RAY_AUTH_MODE=token" in refused.stderr and "RAY_AUTH_TOKEN" in refused.stderr
