"""The `kvforge` command line: one module per command, shared options in `options`.

Every command has --help and --json, exits 0 on success and 2 on bad input,
and reports a user error as one line on stderr, never a traceback.
"""

import argparse
import os
import sys
from collections.abc import Sequence

from kvforge import __version__
from kvforge.cli import bench as bench_command
from kvforge.cli import chat as chat_command
from kvforge.cli import eval as eval_command
from kvforge.cli import generate as generate_command
from kvforge.cli import inspect as inspect_command
from kvforge.cli import plan as plan_command
from kvforge.cli import serve as serve_command
from kvforge.cli.options import EXIT_OK, EXIT_USAGE
from kvforge.errors import KVForgeError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvforge",
        description="kvforge: an LLM inference engine built around its KV cache.",
    )
    parser.add_argument("--version", action="version", version=f"kvforge {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    plan_command.add_parser(commands)
    generate_command.add_parser(commands)
    chat_command.add_parser(commands)
    bench_command.add_parser(commands)
    serve_command.add_parser(commands)
    eval_command.add_parser(commands)
    inspect_command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    engine_command = args.command in ("generate", "chat", "eval", "serve", "bench", "inspect")
    rank = int(os.environ.get("RANK", "0"))
    if engine_command and getattr(args, "tensor_parallel_size", 1) > 1 and rank > 0:
        # under torchrun every rank runs this command; rank 0 is the engine, and the
        # others take their work from it until it stops
        from kvforge.engine.parallel import run_worker

        world = int(os.environ.get("WORLD_SIZE", "0"))
        if world != args.tensor_parallel_size:
            print(f"kvforge {args.command}: error: --tensor-parallel-size "
                  f"{args.tensor_parallel_size} but torchrun started {world} processes",
                  file=sys.stderr)  # fmt: skip
            return EXIT_USAGE
        run_worker(int(os.environ["RANK"]), args.tensor_parallel_size)
        return EXIT_OK
    try:
        return args.func(args)
    except KVForgeError as exc:
        print(f"kvforge {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK  # `kvforge plan ... | head` closed the pipe
