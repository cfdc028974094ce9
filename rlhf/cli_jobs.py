"""`rlhf submit` and `rlhf jobs ...`: run stages as Ray Jobs on a cluster (or a local head).

    rlhf submit STAGE -c CONFIG [KEY=VALUE ...] [--address URL] [--env KEY[=VALUE]] [--pip PKG]
                [--working-dir DIR] [--exclude PATTERN] [--no-wait | --follow]
    rlhf jobs status ID [--wait]       rlhf jobs logs ID [--follow]
    rlhf jobs stop ID [--no-wait]      rlhf jobs list

The job runs ``rlhf STAGE -c CONFIG KEY=VALUE ...`` in a copy of the working directory (default: the
current one), so the same config runs locally and on a cluster; only ``--address`` differs. The
config's ``job:`` section sets the job's defaults (address, working dir, env vars, pip packages,
excludes); the options here replace or extend them. The address defaults to ``job.address``,
$RAY_API_SERVER_ADDRESS, an http(s) $RAY_ADDRESS, or http://127.0.0.1:8265.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from rlhf.config import STAGES, ConfigError, JobConfig, StageConfig, apply_override, explain, load_config, \
    parse_override, read_yaml

COMMANDS = ("submit", "jobs")


def _add_address(parser: argparse.ArgumentParser, *, from_config: bool = False) -> None:
    first = "the config's job.address, " if from_config else ""
    parser.add_argument(
        "--address", help=f"the cluster's dashboard, e.g. http://HEAD:8265 (default: {first}"
        "$RAY_API_SERVER_ADDRESS, an http(s) $RAY_ADDRESS, else http://127.0.0.1:8265)",
    )


class _IntermixedParser(argparse.ArgumentParser):
    """Lets options and KEY=VALUE overrides come in any order, e.g. `-c X a=1 --follow b=2`."""

    _intermixing = False

    def parse_known_args(self, args=None, namespace=None):
        if self._intermixing:  # parse_known_intermixed_args calls back here for its two passes
            return super().parse_known_args(args, namespace)
        self._intermixing = True
        try:
            return self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixing = False


def add_job_commands(subparsers) -> None:
    """Add ``submit`` and ``jobs`` to the `rlhf` command's subparsers."""
    submit = subparsers.add_parser(
        "submit", help="run a stage (or the whole pipeline, `run`) as a Ray Job on a cluster",
        description="Run `rlhf STAGE -c CONFIG KEY=VALUE ...` as a Ray Job. The working directory is "
        "uploaded (minus --exclude patterns and .gitignore'd files); the config must lie inside it. "
        "The config's job: section gives the defaults of the options below. "
        "Prints the submission id on the first line of stdout.",
    )
    submit.__class__ = _IntermixedParser  # subparsers build plain parsers; this one may interleave
    submit.add_argument("stage", choices=sorted(STAGES), help="the stage to run")
    submit.add_argument("-c", "--config", help="YAML config file inside the working directory")
    submit.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, as for the stage itself (bench: its argument first)")
    _add_address(submit, from_config=True)
    submit.add_argument("--working-dir", help="uploaded as the job's working directory (default: the config's "
                        "job.working_dir, else .)")
    submit.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="also leave this out of the upload (repeatable; added to job.excludes; .git, "
                        ".venv, runs, .cache, ... always are)")
    submit.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                        help="environment variable for the job (repeatable; added to job.env_vars, winning "
                        "over them); KEY alone passes on its local value")
    submit.add_argument("--pip", action="append", default=[], metavar="PACKAGE",
                        help="extra pip package installed for the job (repeatable; added to job.pip), "
                        "e.g. --pip 'rlhf[gpu]'")
    submit.add_argument("--quick", action="store_true", help="with `run`: its tiny-model preset")
    submit.add_argument("--submission-id", help="choose the job's id (default: Ray makes one)")
    submit.add_argument("--entrypoint-num-cpus", type=float,
                        help="CPUs reserved for the stage's driver (default: job.entrypoint_num_cpus)")
    submit.add_argument("--entrypoint-num-gpus", type=float,
                        help="GPUs reserved for the stage's driver (default: job.entrypoint_num_gpus)")
    submit.add_argument("--no-check", action="store_true",
                        help="submit without validating the command and config here first")
    mode = submit.add_mutually_exclusive_group()
    mode.add_argument("--no-wait", action="store_true", help="print the id and return at once")
    mode.add_argument("--follow", action="store_true", help="stream the job's logs until it ends")
    submit.add_argument("--timeout", type=float, help="stop waiting after this many seconds (the job goes on)")

    jobs = subparsers.add_parser("jobs", help="status, logs, stop or list Ray Jobs")
    actions = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="a job's status")
    status.add_argument("submission_id")
    status.add_argument("--wait", action="store_true", help="wait until it ends; exit 0 only if it SUCCEEDED")
    status.add_argument("--timeout", type=float, help="with --wait: give up after this many seconds")
    logs = actions.add_parser("logs", help="a job's logs")
    logs.add_argument("submission_id")
    logs.add_argument("-f", "--follow", action="store_true", help="keep streaming until the job ends")
    stop = actions.add_parser("stop", help="stop a running job")
    stop.add_argument("submission_id")
    stop.add_argument("--no-wait", action="store_true", help="return once the stop is requested")
    stop.add_argument("--timeout", type=float, default=60.0, help="how long to wait for it to stop (default 60 s)")
    listing = actions.add_parser("list", help="the cluster's jobs")
    for parser in (status, logs, stop, listing):
        _add_address(parser)


# --------------------------------------------------------------------------------------------------


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def check_command(argv: list[str], root: str | Path, parse_args: Callable[[list[str]], argparse.Namespace]):
    """Parse ``rlhf ...`` as the job will and load its config: a bad command fails here, not remotely.

    ``argv`` starts with ``rlhf``; a relative ``-c`` path is taken inside ``root``; ``parse_args`` is
    the CLI's own parser (rlhf.cli hands it over: that module imports this one). Returns the config.
    """
    from cluster.jobs import display_command

    shown = display_command(argv)
    if not argv or argv[0] != "rlhf":
        raise ConfigError(f"not an rlhf command: {shown}")
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            args = parse_args(argv[1:])
    except SystemExit:
        raise ConfigError(f"`{shown}` would not run: {captured.getvalue().strip().splitlines()[-1]}") from None
    if args.command not in STAGES:
        raise ConfigError(f"`{shown}` is not a stage command ({', '.join(STAGES)})")
    config = str(Path(root) / args.config) if args.config else None
    loaded = load_config(args.command, config, args.overrides)
    for plugin in loaded.plugins:  # the job imports them from the working directory it is shipped
        if not Path(plugin).is_relative_to(Path(root).resolve()):
            raise ConfigError(f"plugins: {plugin} is outside the job's working directory {Path(root).resolve()}, "
                              "so it would not reach the cluster; move it inside, or set job.working_dir")
    return loaded


def _print_info(info) -> None:
    print(f"{info.submission_id}: {info.status}")
    print(f"  command: {info.masked_entrypoint}")
    if info.message:
        print(f"  message: {info.message.strip()}")
    print(f"  started: {_when(info.start_time)}  ended: {_when(info.end_time)}")


def _on_change(info) -> None:
    _say(f"status: {info.status}")


def _finish(info) -> int:
    detail = f" ({info.message.strip()})" if info.message else ""
    _say(f"job {info.submission_id}: {info.status}{detail}")
    if info.status == "FAILED":
        _say(f"  logs: rlhf jobs logs {info.submission_id}")
    return 0 if info.status == "SUCCEEDED" else 1


def job_section(config: str | None, overrides: list[str]) -> JobConfig:
    """The ``job:`` section of a config file with its ``job.*`` overrides (the rest is checked by
    ``check_command``, which --no-check skips)."""
    tree = read_yaml(config) if config else {}
    section = {"job": tree.get("job") or {}}
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] == "job":
            apply_override(section, keys, value)
    try:
        return StageConfig.model_validate(section).job
    except ValidationError as exc:
        raise explain(exc, StageConfig, config or "(defaults)") from None


def _submit(args: argparse.Namespace, parse_args: Callable[[list[str]], argparse.Namespace]) -> int:
    from cluster import jobs

    overrides = [a for a in args.overrides if "=" in a]
    job = jobs.resolve_job(
        job_section(args.config, overrides), address=args.address, working_dir=args.working_dir, env=args.env,
        pip=args.pip, exclude=args.exclude, entrypoint_num_cpus=args.entrypoint_num_cpus,
        entrypoint_num_gpus=args.entrypoint_num_gpus,
    )
    renv = jobs.runtime_env(job)
    root = Path(renv["working_dir"])
    config = jobs.config_in_working_dir(args.config, root) if args.config else None
    stage_args = [a for a in args.overrides if "=" not in a]  # e.g. `bench rollout`
    if args.quick:
        if args.stage != "run":
            raise jobs.JobError("--quick is an option of `run` only")
        stage_args.append("--quick")
    argv = jobs.stage_command(args.stage, config, overrides, stage_args)
    if not args.no_check:
        check_command(argv, root, parse_args)

    client = jobs.JobClient(job.address)
    submission_id = client.submit(
        argv, renv, submission_id=args.submission_id,
        metadata={"rlhf_stage": args.stage, "rlhf_config": config or ""},
        entrypoint_num_cpus=job.entrypoint_num_cpus, entrypoint_num_gpus=job.entrypoint_num_gpus,
    )
    print(submission_id, flush=True)
    _say(f"submitted `{args.stage}` to {client.address} as {submission_id}")
    _say(f"  command: {jobs.display_command(argv)}")
    for line in jobs.describe_runtime_env(renv):
        _say(f"  {line}")
    _say(f"  follow: rlhf jobs logs {submission_id} --follow --address {client.address}")
    if args.no_wait:
        return 0
    if args.follow:
        client.follow(submission_id, sys.stdout)
    return _finish(client.wait(submission_id, timeout_s=args.timeout, on_change=None if args.follow else _on_change))


def _jobs(args: argparse.Namespace) -> int:
    from cluster import jobs

    client = jobs.JobClient(args.address)
    if args.action == "status":
        if args.wait:
            return _finish(client.wait(args.submission_id, timeout_s=args.timeout, on_change=_on_change))
        _print_info(client.info(args.submission_id))
        return 0
    if args.action == "logs":
        if args.follow:
            client.follow(args.submission_id, sys.stdout)
        else:
            sys.stdout.write(client.logs(args.submission_id))
        return 0
    if args.action == "stop":
        if not client.stop(args.submission_id):
            _say(f"job {args.submission_id} was not running")
        if args.no_wait:
            return 0
        info = client.wait(args.submission_id, timeout_s=args.timeout)
        print(f"{info.submission_id}: {info.status}")
        return 0
    rows = [(j.submission_id, j.status, j.metadata.get("rlhf_stage", "-"), _when(j.start_time), j.masked_entrypoint)
            for j in client.list()]
    header = ("SUBMISSION ID", "STATUS", "STAGE", "STARTED", "COMMAND")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[4])
    return 0


def run_job_command(args: argparse.Namespace, parse_args: Callable[[list[str]], argparse.Namespace]) -> int:
    """Run `rlhf submit ...` (checking the job's command with ``parse_args``, the CLI's parser) or
    `rlhf jobs ...`; user errors are printed, exit status 2."""
    from cluster.jobs import JobError

    try:
        return _submit(args, parse_args) if args.command == "submit" else _jobs(args)
    except (JobError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
