"""The `rlhf` command.

    rlhf models pull default          convert the embedded default model once (cached)
    rlhf models tiny OUT [--overwrite]  write a tiny random Llama for tests and quick demos
    rlhf config show STAGE [-c FILE] [KEY=VALUE ...]
    rlhf STAGE -c FILE [KEY=VALUE ...]     STAGE: sft, rm, pairs, ppo, serve, eval, run
    rlhf serve MODEL_DIR [--host H] [--port P]   (and `rlhf serve --stop`)
    rlhf bench rollout [-c FILE] [KEY=VALUE ...]

Overrides are dotted keys: ``rlhf ppo -c configs/demo.yaml ppo.kl.coef=0.05 output_dir=runs/x``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from rlhf.config import STAGES, ConfigError, dump_config, load_config

# The controller module of each stage; each has ``run(config) -> pathlib.Path``.
STAGE_MODULES = {
    "sft": "rlhf.sft",
    "rm": "rlhf.rm",
    "pairs": "rlhf.pairs",
    "ppo": "rlhf.ppo",
    "serve": "rlhf.serve",
    "eval": "rlhf.eval",
    "bench": "rlhf.bench",
    "run": "rlhf.pipeline",
}


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story: print it, no traceback."""
    from actors.group import LearnerLostError, NonFiniteWeightsError
    from cluster.runtime import ActorStartError, ResourceError
    from rlhf.data.errors import DataError
    from rlhf.models.loading import ModelLoadError
    from rlhf.paths import OutputError
    from rlhf.ppo import PPOStopped

    return (ConfigError, DataError, ModelLoadError, ResourceError, ActorStartError, FileNotFoundError,
            LearnerLostError, NonFiniteWeightsError, PPOStopped, OutputError)


def _add_stage_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", help="YAML config file (defaults apply when omitted)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. seed=1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf", description="Distributed RLHF on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = commands.add_parser("models", help="provision models").add_subparsers(dest="action", required=True)
    pull = models.add_parser("pull", help="convert the embedded default model once (cached under $RLHF_HOME)")
    pull.add_argument("name", choices=["default"])
    tiny = models.add_parser("tiny", help="write a tiny random Llama with a real tokenizer")
    tiny.add_argument("out", help="output folder")
    tiny.add_argument("--hidden-size", type=int, default=128)
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--heads", type=int, default=2)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true",
                      help="replace OUT even if rlhf did not make it (deletes everything in it)")

    config = commands.add_parser("config", help="inspect configs").add_subparsers(dest="action", required=True)
    show = config.add_parser("show", help="print a stage's resolved config")
    show.add_argument("stage", choices=sorted(STAGES))
    _add_stage_args(show)

    for stage in STAGES:
        doc = (STAGES[stage].__doc__ or "").strip().splitlines()[0]
        stage_parser = commands.add_parser(stage, help=doc)
        if stage == "bench":
            stage_parser.add_argument("what", choices=["rollout"], help="what to benchmark")
        _add_stage_args(stage_parser)
        if stage == "run":
            stage_parser.add_argument("--quick", action="store_true", help="the tiny-model preset (minutes)")
        if stage == "serve":
            stage_parser.usage = "rlhf serve [MODEL_DIR] [-c FILE] [--host H] [--port P] [--stop] [KEY=VALUE ...]"
            stage_parser.add_argument("--host", help="address to bind (default 127.0.0.1)")
            stage_parser.add_argument("--port", type=int, help="port to listen on (default 8000)")
            stage_parser.add_argument("--stop", action="store_true", help="stop the server this config started")
    from rlhf.cli_jobs import add_job_commands
    add_job_commands(commands)
    return parser


def _serve_overrides(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """`rlhf serve MODEL_DIR --host H --port P` as overrides: the one word without '=' is the model."""
    bare = [o for o in overrides if "=" not in o]
    if len(bare) > 1:
        raise ConfigError(f"rlhf serve takes one MODEL_DIR, got {len(bare)}: {' '.join(bare)}")
    overrides = [f"model.path={o}" if "=" not in o else o for o in overrides]
    if args.host is not None:
        overrides.append(f"host={args.host}")
    if args.port is not None:
        overrides.append(f"port={args.port}")
    return overrides


def _run_stage(stage: str, args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if getattr(args, "quick", False):
        from rlhf.pipeline import QUICK_OVERRIDES

        overrides = QUICK_OVERRIDES + overrides
    if stage == "serve":
        overrides = _serve_overrides(args, overrides)
    cfg = load_config(stage, args.config, overrides)
    if stage == "serve" and args.stop:
        from rlhf.serve import stop

        return 0 if stop(cfg) else 1
    try:
        module = importlib.import_module(STAGE_MODULES[stage])
    except ModuleNotFoundError as exc:
        if exc.name != STAGE_MODULES[stage]:
            raise
        print(f"error: stage '{stage}' is not implemented yet", file=sys.stderr)
        return 2
    output = module.run(cfg, args.what) if stage == "bench" else module.run(cfg)
    print(f"{stage}: done, output in {output}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Options and ``KEY=VALUE`` overrides mix in any order: argparse fills the overrides list only
    once, so in ``rlhf serve MODEL --port 9000 api_key=KEY`` the words after ``--port`` come back
    unparsed; they are overrides too. (``parse_intermixed_args`` refuses parsers with subcommands.)"""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(word.startswith("-") for word in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        if args.command == "models" and args.action == "pull":
            from rlhf.models import ensure_default_model

            print(ensure_default_model())
            return 0
        if args.command == "models" and args.action == "tiny":
            from rlhf.models import build_tiny_model

            out = build_tiny_model(args.out, hidden_size=args.hidden_size, layers=args.layers,
                                   heads=args.heads, seed=args.seed, overwrite=args.overwrite)
            print(out)
            return 0
        if args.command == "config":
            print(dump_config(load_config(args.stage, args.config, args.overrides)), end="")
            return 0
        if args.command in ("submit", "jobs"):
            from rlhf.cli_jobs import run_job_command
            return run_job_command(args, parse_args)
        return _run_stage(args.command, args)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # a stage's rlhf.outputs.Interrupted says how to continue
        print("; ".join(["interrupted", *filter(None, [str(exc)])]), file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
