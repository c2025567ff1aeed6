"""`kvforge serve`: the OpenAI-compatible HTTP server."""

import argparse
import sys
import threading
import time

from kvforge.cli.options import (
    EXIT_OK,
    add_engine_options,
    byte_size,
    engine_kwargs,
    non_negative_int,
    positive_int,
)
from kvforge.errors import KVForgeError

EXIT_ENGINE_DIED = 1


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "serve",
        help="serve an OpenAI-compatible HTTP API (completions, chat, streaming, metrics)",
        description="Serve the model over an OpenAI-compatible API: /v1/completions, "
        "/v1/chat/completions, /v1/models, vLLM's /tokenize, /detokenize and /tokenizer_info, "
        "/health and /metrics (Prometheus). The engine runs in a process of its own; if it "
        "dies, the server answers 503 and exits with code 1.",
        epilog="example: kvforge serve --port 8000 --api-key secret",
    )
    add_server_options(p)
    p.add_argument(
        "--no-inspect",
        action="store_true",
        help="do not serve the KV cache inspector (GET /inspect, /debug/kv, /debug/kv/stream)",
    )
    p.set_defaults(func=run)


def add_server_options(p: argparse.ArgumentParser) -> None:
    """The options of `kvforge serve`, which `kvforge inspect` shares."""
    add_engine_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free one)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument(
        "--inspect-show-text",
        action="store_true",
        help="let the inspector show each running request's text (off: prompts can be private)",
    )
    p.add_argument("--served-model-name", help="the model id clients send (default: --model)")
    p.add_argument("--max-num-seqs", type=positive_int, default=256, help="requests run at once")
    p.add_argument(
        "--max-queue",
        type=non_negative_int,
        default=256,
        help="requests that may wait beyond --max-num-seqs; more get 429 (default 256)",
    )
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=2048)
    p.add_argument(
        "--max-prompts-per-request",
        type=positive_int,
        default=64,
        help="prompts one /v1/completions request may hold (default 64)",
    )
    p.add_argument(
        "--max-logprobs",
        type=non_negative_int,
        default=20,
        help="the most top log-probabilities a request may ask for (default 20, as OpenAI)",
    )
    p.add_argument(
        "--max-request-bytes",
        type=byte_size,
        default="16MiB",
        help="larger request bodies get 413 (default 16MiB)",
    )
    p.add_argument(
        "--kv-events-endpoint",
        metavar="tcp://HOST:PORT",
        help="publish the prefix cache's block events there (ZeroMQ PUB, vLLM's format), "
        "for a cache-aware router such as vllm-router's kv_aware policy",
    )
    p.add_argument(
        "--kv-events-replay-endpoint",
        metavar="tcp://HOST:PORT",
        help="answer replay requests for missed event batches there (ZeroMQ ROUTER)",
    )


def run(args: argparse.Namespace, on_start=None) -> int:
    """Serve until stopped. `on_start(url, engine)`: called on a thread of its own once
    the server listens (`kvforge inspect` opens its page and runs its demo there)."""
    import uvicorn

    from kvforge.engine.config import EngineConfig
    from kvforge.server.app import build_app
    from kvforge.server.engine_core import EngineProcess

    if not 0 <= args.port <= 65535:
        raise KVForgeError(f"--port must be in 0..65535, got {args.port}")
    kwargs = engine_kwargs(
        args,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=max(args.max_num_batched_tokens, args.max_num_seqs),
        kv_events_endpoint=args.kv_events_endpoint,
        kv_events_replay_endpoint=args.kv_events_replay_endpoint,
    )
    EngineConfig.create(**kwargs)  # a bad option fails here, before a process starts
    engine = EngineProcess(kwargs, args.max_queue)
    name = args.served_model_name or engine.model_name
    app = build_app(
        engine,
        name,
        api_key=args.api_key,
        max_prompts_per_request=args.max_prompts_per_request,
        max_logprobs=args.max_logprobs,
        max_request_bytes=args.max_request_bytes,
        inspect=not getattr(args, "no_inspect", False),
        inspect_show_text=args.inspect_show_text,
    )
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="info",
                            timeout_graceful_shutdown=2)  # fmt: skip
    server = uvicorn.Server(config)

    def engine_died() -> None:
        print(f"kvforge serve: the engine process died (exit code {engine.exit_code}); "
              "stopping", file=sys.stderr)  # fmt: skip
        server.should_exit = True

    engine.on_death = engine_died
    print(f"kvforge {args.command}: {name} on http://{args.host}:{args.port}/v1",
          file=sys.stderr)  # fmt: skip
    if on_start is not None:
        threading.Thread(target=_when_started, args=(server, on_start, engine),
                         daemon=True).start()  # fmt: skip
    server.run()
    return EXIT_ENGINE_DIED if engine.exit_code is not None else EXIT_OK


def _when_started(server, on_start, engine) -> None:
    while not server.started:
        if server.should_exit:
            return
        time.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    on_start(f"http://{host}:{port}", engine)
