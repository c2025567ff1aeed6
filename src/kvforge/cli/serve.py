"""`kvforge serve`: the OpenAI-compatible HTTP server."""

import argparse
import sys

from kvforge.cli.options import (
    EXIT_OK,
    add_engine_options,
    engine_from_args,
    non_negative_int,
    positive_int,
)
from kvforge.errors import KVForgeError


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "serve",
        help="serve an OpenAI-compatible HTTP API (completions, chat, streaming, metrics)",
        description="Serve the model over an OpenAI-compatible API: /v1/completions, "
        "/v1/chat/completions, /v1/models, /health and /metrics (Prometheus).",
        epilog="example: kvforge serve --port 8000 --api-key secret",
    )
    add_engine_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free one)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-model-name", help="the model id clients send (default: --model)")
    p.add_argument("--max-num-seqs", type=positive_int, default=256, help="requests run at once")
    p.add_argument(
        "--max-queue",
        type=non_negative_int,
        default=256,
        help="requests that may wait beyond --max-num-seqs; more get 429 (default 256)",
    )
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=2048)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from kvforge.server.app import build_app

    if not 0 <= args.port <= 65535:
        raise KVForgeError(f"--port must be in 0..65535, got {args.port}")
    llm = engine_from_args(
        args,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=max(args.max_num_batched_tokens, args.max_num_seqs),
    )
    name = args.served_model_name or llm.model_name
    app = build_app(llm, name, api_key=args.api_key, max_queue=args.max_queue)
    print(f"kvforge serve: {name} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return EXIT_OK
