"""`kvforge inspect`: a local server with the KV cache inspector open, and if asked, a
demonstration workload to watch."""

import argparse
import random
import sys
import webbrowser

import httpx

from kvforge.cli import serve

DEMO_PREFIX_TOKENS = 192  # the shared-prefix demo's common prompt
DEMO_CLIENTS = 4


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "inspect",
        help="watch the KV cache live: serve the model and open the inspector page",
        description="Serve the model as `kvforge serve` does and open the KV cache inspector "
        "(/inspect) in a browser: the block pool, the running requests' blocks and token "
        "regions, the prefix cache and its tiers, bytes against the planner's, and decode "
        "steps against the memory-bandwidth floor. --demo sends a workload to watch.",
        epilog="example: kvforge inspect --model smollm2 --kv-dtype int2 --demo shared-prefix",
    )
    serve.add_server_options(p)
    p.add_argument(
        "--demo",
        choices=("shared-prefix", "long"),
        help="send a workload to the server until stopped: shared-prefix (4 clients, one "
        f"{DEMO_PREFIX_TOKENS}-token prefix, each their own question), or long (2 clients, "
        "long generations: watch windows and eviction policies)",
    )
    p.add_argument("--no-browser", action="store_true", help="print the page's address only")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    def started(url: str, engine) -> None:
        page = f"{url}/inspect" + (f"?token={args.api_key}" if args.api_key else "")
        print(f"kvforge inspect: the KV cache inspector is at {page}", file=sys.stderr)
        if not args.no_browser:
            webbrowser.open(page)
        if args.demo:
            name = args.served_model_name or engine.model_name
            demo(url, args.demo, engine.limits, name, args.api_key)

    return serve.run(args, on_start=started)


def demo(url: str, workload: str, limits, model: str, api_key: str | None) -> None:
    """Send `workload`'s requests (token ids, so any model takes them) until the server
    stops: each client on a thread of its own, one request at a time."""
    import threading

    vocab_size = limits.vocab_size
    rng = random.Random(0)
    shared = [rng.randrange(vocab_size) for _ in range(DEMO_PREFIX_TOKENS)]
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def client(i: int) -> None:
        own = random.Random(i + 1)
        with httpx.Client(base_url=url, headers=headers, timeout=600) as http:
            while True:
                if workload == "shared-prefix":
                    prompt = shared + [own.randrange(vocab_size) for _ in range(own.randint(8, 40))]
                    max_tokens = own.randint(16, 96)
                else:
                    prompt = [own.randrange(vocab_size) for _ in range(own.randint(64, 256))]
                    max_tokens = min(2048, limits.max_model_len - len(prompt))
                body = {"model": model, "prompt": prompt, "max_tokens": max_tokens,
                        "temperature": 0.8, "ignore_eos": True}  # fmt: skip
                try:
                    answer = http.post("/v1/completions", json=body)
                except httpx.HTTPError:
                    return  # the server stopped
                if answer.status_code != 200:
                    print(f"kvforge inspect: the demo's request was refused: {answer.text}",
                          file=sys.stderr)  # fmt: skip
                    return

    clients = DEMO_CLIENTS if workload == "shared-prefix" else 2
    for i in range(clients):
        threading.Thread(target=client, args=(i,), daemon=True).start()
