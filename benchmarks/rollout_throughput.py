"""Rollout throughput: vLLM in-process vs our Ray rollout actors (1 and 2 engines) vs HF generate.

The measuring code is rlhf/bench.py (also behind `rlhf bench rollout`); this script is its argparse
front end. It prints a table and writes JSON (``--output``) with a PNG bar chart beside it.

    python benchmarks/rollout_throughput.py --output bench-results/rollout_throughput.json
    python benchmarks/rollout_throughput.py --compiled --output bench-results/rollout_throughput_compiled.json
    python benchmarks/rollout_throughput.py --dtype bfloat16 --output bench-results/rollout_throughput_bf16.json
    python benchmarks/rollout_throughput.py --quick --output /tmp/rollout.json     # tiny model, seconds

``--compiled`` runs the vLLM rows (a) and (b) in vLLM's compiled mode (``rollout.enforce_eager=false``);
the first run compiles (a minute or more per engine), later runs reuse the compile cache under
``$RLHF_HOME/vllm``. ``--dtype`` applies to every row, HF's included.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_config(args: argparse.Namespace):
    from rlhf.config import BenchConfig, RayConfig, RolloutConfig, SamplingConfig

    return BenchConfig(
        output_dir=str(Path(args.output).parent),
        model={"path": args.model, **({"dtype": args.dtype} if args.dtype else {})},
        prompts=args.prompts,
        sampling=SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed),
        engines=args.engines,
        repeats=args.repeats,
        rollout=RolloutConfig(enforce_eager=not args.compiled, threads_per_engine=args.threads_per_engine),
        ray=RayConfig(num_cpus=args.cpus),
    )


def main(argv: list[str] | None = None) -> int:
    from rlhf.bench import QUICK, print_table, rollout_benchmark, write_report
    from rlhf.config import BenchConfig

    default_repeats = BenchConfig.model_fields["repeats"].default
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path, 'default' (SmolLM2-135M-Instruct) or 'tiny'")
    parser.add_argument("--dtype", default=None, help="model dtype for every row (default: the model config's)")
    parser.add_argument("--prompts", type=int, default=None, help="prompts per batch (default 64)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="tokens per response (default 64)")
    parser.add_argument("--engines", type=int, nargs="+", default=[1, 2], help="engine counts for (b)")
    parser.add_argument("--repeats", type=int, default=None, help=f"timed runs each (default {default_repeats})")
    parser.add_argument("--compiled", action="store_true", help="vLLM compiled mode (enforce_eager=false)")
    parser.add_argument("--threads-per-engine", type=int, default=None,
                        help="torch threads per vLLM engine (default: its share of the CPUs)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus", type=int, default=None, help="CPUs for the local Ray (default: all)")
    parser.add_argument("--output", default="bench-results/rollout_throughput.json", help="JSON file to write")
    parser.add_argument("--quick", action="store_true",
                        help=f"tiny model, {QUICK['prompts']} prompts x {QUICK['max_new_tokens']} tokens, 1 run")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else {"model": "default", "prompts": 64, "max_new_tokens": 64,
                                       "repeats": default_repeats}
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    result = rollout_benchmark(build_config(args))
    json_path, png_path = write_report(result, args.output)
    print_table(result)
    print(f"wrote {json_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
