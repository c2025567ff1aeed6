"""`kvforge bench`: one benchmark scenario, kvforge and its peers side by side."""

import argparse
import json
import sys
from pathlib import Path

from kvforge.cli.options import EXIT_OK, MODEL_HELP, add_weights_dtype_option, positive_int
from kvforge.errors import KVForgeError
from kvforge.models.builtin import RANDOM_MODEL

# the scenarios whose kvforge engine runs tensor-parallel; the others read one rank's
# model or store (memory, roofline, cache) and refuse --tensor-parallel-size
PARALLEL_SCENARIOS = ("throughput", "latency", "prefix", "kvquant")


def add_parser(commands: argparse._SubParsersAction) -> None:
    from kvforge.bench import SCENARIOS

    p = commands.add_parser(
        "bench",
        help="benchmark kvforge against its peers side by side",
        description="Run one benchmark scenario: kvforge and its peers on the same weights and "
        "workload in one run. Writes SCENARIO.json, SCENARIO.md and PNG plots to --out.",
        epilog="example: kvforge bench throughput --quick --json",
    )
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument(
        "--model",
        help=MODEL_HELP.replace("the default, ", "")
        + " (default, or random: a random-init Llama sized for the scenario)",
    )
    p.add_argument("--quick", action="store_true", help="smoke size, under a minute")
    add_weights_dtype_option(p)
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where kvforge and transformers run (default cpu); llama.cpp stays on the CPU",
    )
    p.add_argument(
        "--tensor-parallel-size",
        type=positive_int,
        default=1,
        help="ranks kvforge splits the model across in the scenarios that time generation "
        f"({', '.join(PARALLEL_SCENARIOS)}); default 1",
    )
    p.add_argument("--out", default="bench-results", help="output folder (default bench-results)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:

    import torch

    from kvforge.bench import run_scenario
    from kvforge.bench.context import BenchContext
    from kvforge.bench.report import markdown, save
    from kvforge.models.catalog import find_model
    from kvforge.models.gguf_file import read_gguf

    model_path = None
    if args.model is not None and args.model != RANDOM_MODEL:
        model_path = find_model(args.model).path
        if model_path.is_file():
            read_gguf(model_path)  # a bad file fails here, with its reason, not mid-benchmark
        elif not (model_path / "config.json").is_file():
            raise KVForgeError(f"{model_path}: not a checkpoint directory (no config.json)")
    if args.tensor_parallel_size > 1 and args.scenario not in PARALLEL_SCENARIOS:
        raise KVForgeError(
            f"bench {args.scenario} does not take --tensor-parallel-size; "
            f"these do: {', '.join(PARALLEL_SCENARIOS)}"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        raise KVForgeError("--device cuda: torch sees no CUDA device")
    context = BenchContext(
        quick=args.quick,
        model_path=model_path,
        device=args.device,
        weights_dtype=args.weights_dtype,
        default_model=args.model is None,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    report = run_scenario(args.scenario, context)
    paths = save(report, Path(args.out))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(markdown(report))
        print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return EXIT_OK
