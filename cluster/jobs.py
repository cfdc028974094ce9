"""Ray Jobs: run a stage on a cluster through the dashboard's job API, and follow it.

The job runs the same command a user types locally, ``rlhf STAGE -c CONFIG KEY=VALUE ...``, inside a
runtime environment whose working directory is a copy of the local one (so the config file, local
data and the project's code travel with it), plus environment variables and pip packages. Only the
address differs between a laptop head (``http://127.0.0.1:8265``) and a cluster
(``http://HEAD:8265``, or a port-forward of it).

Authentication follows Ray's token mode: when the cluster runs with ``RAY_AUTH_MODE=token``, the
client needs the same mode and the cluster's token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
``~/.ray/auth_token``); Ray adds it to every request.

The job's settings come from the config's ``job:`` section (``rlhf.config.JobConfig``: address, working
dir, env vars, pip packages, excludes) with the command line's options on top (``resolve_job``).
Pure helpers build the entrypoint and the runtime environment; ``JobClient`` wraps
``ray.job_submission.JobSubmissionClient`` with errors that say what to do.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, TextIO

from rlhf.config import ENV_NAME, SECRET_KEY, JobConfig, mask_secrets, mask_url

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
_ADDRESS_VARS = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
# Never uploaded with the working directory (Ray also honours .gitignore and .rayignore there).
DEFAULT_EXCLUDES = (
    ".git", ".venv", "venv", "runs", ".cache", "__pycache__", "*.pyc", "*.egg-info", "build",
    "bench-results", ".pytest_cache",
)
# What a just-started head answers until its job agent is up; submission retries it.
_NOT_READY = "No available agent"


class JobError(RuntimeError):
    """A job request that cannot be done; the message says why and what to do."""


# --------------------------------------------------------------------------------------------------
# Pure helpers
# --------------------------------------------------------------------------------------------------


def parse_env(items: Iterable[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """``["A=1", "HF_TOKEN"]`` -> ``{"A": "1", "HF_TOKEN": <its local value>}``."""
    environ = os.environ if environ is None else environ
    env: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not ENV_NAME.match(key):
            raise JobError(f"--env {item!r}: expected KEY=VALUE, or KEY to pass on its local value")
        if not sep:
            if key not in environ:
                raise JobError(f"--env {key}: not set here; give a value with --env {key}=VALUE")
            value = environ[key]
        env[key] = value
    return env


def mask_override(text: str) -> str:
    """``serve.api_key=abc`` -> ``serve.api_key=***``, ``reward.url=https://u:p@h`` -> ``...u:***@h``;
    other overrides unchanged."""
    key, sep, value = text.partition("=")
    if sep and value and SECRET_KEY.search(key):
        return f"{key}=***"
    return f"{key}={mask_url(value)}" if sep else text


def config_in_working_dir(config: str | Path, working_dir: str | Path) -> str:
    """The config path relative to the working dir (as the job sees it), or a ``JobError``."""
    config_path = Path(config).expanduser().resolve()
    root = Path(working_dir).expanduser().resolve()
    if not config_path.is_file():
        raise JobError(f"config file {config} does not exist")
    try:
        return config_path.relative_to(root).as_posix()
    except ValueError:
        raise JobError(
            f"config file {config_path} is outside the working directory {root}, so the job would not "
            "see it: move it inside, or pass --working-dir with a folder that holds it"
        ) from None


def stage_command(stage: str, config: str | None, overrides: Iterable[str] = (),
                  stage_args: Iterable[str] = ()) -> list[str]:
    """``rlhf STAGE [ARGS] [-c CONFIG] [KEY=VALUE ...]`` as an argument list."""
    return ["rlhf", stage, *stage_args, *(["-c", config] if config else []), *overrides]


def display_command(argv: list[str]) -> str:
    """The command for printing, secret overrides masked."""
    return shlex.join(mask_override(a) for a in argv)


def resolve_job(job: JobConfig, *, address: str | None = None, working_dir: str | None = None,
                env: Iterable[str] = (), pip: Iterable[str] = (), exclude: Iterable[str] = (),
                entrypoint_num_cpus: float | None = None, entrypoint_num_gpus: float | None = None,
                environ: dict[str, str] | None = None) -> JobConfig:
    """A config's ``job:`` section with `rlhf submit`'s options on top: ``address``, ``working_dir`` and
    the entrypoint resources replace the config's; ``env`` (``--env`` items), ``pip`` and ``exclude`` add
    to it, an ``--env`` winning over the config's value of the same name. The names in ``job.pass_env``
    become ``env_vars`` with their local values (so the result's ``pass_env`` is empty)."""
    environ = os.environ if environ is None else environ
    missing = [name for name in job.pass_env if name not in environ]
    if missing:
        raise JobError(f"job.pass_env: {', '.join(missing)} not set here; set it, or give a value in job.env_vars")
    passed = {name: environ[name] for name in job.pass_env}
    return job.model_copy(update={
        "address": address or job.address,
        "working_dir": working_dir or job.working_dir,
        "env_vars": {**job.env_vars, **passed, **parse_env(env, environ)},
        "pass_env": [],
        "pip": [*job.pip, *pip],
        "excludes": [*job.excludes, *exclude],
        "entrypoint_num_cpus": job.entrypoint_num_cpus if entrypoint_num_cpus is None else entrypoint_num_cpus,
        "entrypoint_num_gpus": job.entrypoint_num_gpus if entrypoint_num_gpus is None else entrypoint_num_gpus,
    })


def runtime_env(job: JobConfig) -> dict:
    """The Ray runtime environment of a stage job (``job`` as ``resolve_job`` returns it)."""
    root = Path(job.working_dir).expanduser().resolve()
    if not root.is_dir():
        raise JobError(f"working directory {job.working_dir} does not exist")
    result: dict = {"working_dir": str(root), "excludes": [*DEFAULT_EXCLUDES, *job.excludes]}
    if job.env_vars:
        result["env_vars"] = dict(job.env_vars)
    if job.pip:
        result["pip"] = list(job.pip)
    return result


def describe_runtime_env(renv: dict) -> list[str]:
    """Printable lines for a runtime env, secrets masked."""
    lines = [f"working dir: {renv.get('working_dir', '-')} (excluding {', '.join(renv.get('excludes', [])) or 'nothing'})"]
    if renv.get("env_vars"):
        env = mask_secrets({"env_vars": renv["env_vars"]})["env_vars"]  # values are secrets unless known safe
        lines.append("env: " + " ".join(f"{k}={v}" for k, v in env.items()))
    if renv.get("pip"):
        lines.append("pip: " + " ".join(renv["pip"]))
    return lines


# --------------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobInfo:
    submission_id: str
    status: str
    entrypoint: str
    message: str
    start_time: float | None
    end_time: float | None
    metadata: dict

    @classmethod
    def from_details(cls, details) -> JobInfo:
        return cls(
            submission_id=details.submission_id or details.job_id or "?",
            status=str(getattr(details.status, "value", details.status)),
            entrypoint=details.entrypoint,
            message=details.message or "",
            start_time=details.start_time / 1000 if details.start_time else None,
            end_time=details.end_time / 1000 if details.end_time else None,
            metadata=dict(details.metadata or {}),
        )

    @property
    def masked_entrypoint(self) -> str:
        try:
            return display_command(shlex.split(self.entrypoint))
        except ValueError:
            return self.entrypoint


def _explain(exc: Exception, address: str) -> JobError:
    """Turn Ray's client errors into one message that says what to do."""
    text = str(exc)
    if type(exc).__name__ == "AuthenticationError" or "status code 401" in text or "status code 403" in text:
        return JobError(
            f"the Ray cluster at {address} refused the request: {text.strip().splitlines()[0]}\n"
            "It uses token authentication: set RAY_AUTH_MODE=token here as on the cluster, and give its "
            "token through RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (`ray get-auth-token` "
            "on the head prints it)."
        )
    if "status code 404" in text or "does not exist" in text:
        return JobError(f"{text.strip()} (cluster {address}; `rlhf jobs list` shows the jobs it has)")
    if isinstance(exc, ConnectionError) or "Failed to connect" in text or "Connection refused" in text:
        return JobError(
            f"cannot reach the Ray dashboard at {address}: is the cluster up, and is that its dashboard "
            "address (http://HEAD:8265, or a port-forward of it)? Pass --address or set RAY_API_SERVER_ADDRESS."
        )
    return JobError(f"Ray job request to {address} failed: {text.strip()}")


def resolve_address(address: str | None, environ: dict[str, str] | None = None) -> str:
    """The dashboard URL: ``address``, else $RAY_API_SERVER_ADDRESS, else an http(s) $RAY_ADDRESS,
    else the local default ``http://127.0.0.1:8265``. A bare ``HOST:PORT`` gets ``http://``."""
    environ = os.environ if environ is None else environ
    ray_address = environ.get("RAY_ADDRESS", "")
    address = (address or environ.get("RAY_API_SERVER_ADDRESS")
               or (ray_address if ray_address.startswith(("http://", "https://")) else None)
               or DEFAULT_ADDRESS)
    return address if "://" in address else "http://" + address


class JobClient:
    """The job API of one cluster: submit, status, logs (whole or followed), wait, stop, list."""

    def __init__(self, address: str | None = None) -> None:
        self.address = resolve_address(address)
        self._client = None

    @property
    def client(self):
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            # Ray lets $RAY_ADDRESS / $RAY_API_SERVER_ADDRESS override an explicit address; ours wins.
            hidden = {k: os.environ.pop(k) for k in _ADDRESS_VARS if k in os.environ}
            try:
                self._client = JobSubmissionClient(self.address)
            except Exception as exc:  # noqa: BLE001 - Ray raises plain exceptions; explain them
                raise _explain(exc, self.address) from None
            finally:
                os.environ.update(hidden)
        return self._client

    def _call(self, fn: Callable, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except JobError:
            raise
        except Exception as exc:  # noqa: BLE001 - Ray raises plain exceptions; explain them
            raise _explain(exc, self.address) from None

    def submit(self, argv: list[str], renv: dict, *, submission_id: str | None = None,
               metadata: dict[str, str] | None = None, entrypoint_num_cpus: float | None = None,
               entrypoint_num_gpus: float | None = None, ready_timeout_s: float = 60.0) -> str:
        """Submit ``argv`` as a job; returns its submission id.

        A head that has just started answers "No available agent" for a few seconds; that is retried
        for up to ``ready_timeout_s``.
        """
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                return self.client.submit_job(
                    entrypoint=shlex.join(argv), runtime_env=renv, submission_id=submission_id,
                    metadata=metadata, entrypoint_num_cpus=entrypoint_num_cpus,
                    entrypoint_num_gpus=entrypoint_num_gpus,
                )
            except JobError:
                raise
            except Exception as exc:  # noqa: BLE001
                if _NOT_READY not in str(exc) or time.monotonic() > deadline:
                    raise _explain(exc, self.address) from None
                time.sleep(1.0)

    def info(self, submission_id: str) -> JobInfo:
        return JobInfo.from_details(self._call(self.client.get_job_info, submission_id))

    def logs(self, submission_id: str) -> str:
        return self._call(self.client.get_job_logs, submission_id)

    def follow(self, submission_id: str, out: TextIO) -> None:
        """Write the job's logs to ``out`` as they come, until the job ends."""
        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(submission_id):
                out.write(chunk)
                out.flush()

        self._call(asyncio.run, tail())

    def wait(self, submission_id: str, *, timeout_s: float | None = None, poll_s: float = 1.0,
             on_change: Callable[[JobInfo], None] | None = None) -> JobInfo:
        """Poll until the job is SUCCEEDED, FAILED or STOPPED (or ``timeout_s`` passes: JobError)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        last = None
        while True:
            info = self.info(submission_id)
            if info.status != last:
                last = info.status
                if on_change:
                    on_change(info)
            if info.status in TERMINAL:
                return info
            if deadline is not None and time.monotonic() > deadline:
                raise JobError(f"job {submission_id} is still {info.status} after {timeout_s:g} s")
            time.sleep(poll_s)

    def stop(self, submission_id: str) -> bool:
        """Ask the job to stop (SIGTERM, then SIGKILL after Ray's grace period); False if it had ended."""
        return bool(self._call(self.client.stop_job, submission_id))

    def list(self) -> list[JobInfo]:
        jobs = [JobInfo.from_details(d) for d in self._call(self.client.list_jobs) if d.submission_id]
        return sorted(jobs, key=lambda j: j.start_time or 0.0)
