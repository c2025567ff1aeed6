"""What the HTTP layer costs: N concurrent streaming `openai` clients against `kvforge serve`
(its own process, loopback) next to `LLM.generate` on the same requests and settings.

    python benchmarks/server_load.py --clients 64 --max-tokens 32 [--device cuda]

Prints output tokens/s of both, their ratio, and the clients' TTFT p50/p99. Greedy with
ignore_eos, so both produce exactly clients × max_tokens tokens.
"""

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time

import httpx
import openai

from kvforge import LLM, SamplingParams

MODEL = "kvforge-builtin-untrained"


def prompts(n: int) -> list[str]:
    return [f"request {i}: " + "lorem ipsum " * (i % 8 + 1) for i in range(n)]


def serve(args) -> tuple[subprocess.Popen, str]:
    """`kvforge serve` in its own process (clients here must not share its GIL)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "kvforge", "serve", "--port", str(port), "--model", args.model,
               "--device", args.device, "--kv-memory", "64MiB",
               "--max-num-seqs", str(args.clients)]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc, f"http://127.0.0.1:{port}/v1"
        except httpx.TransportError:
            time.sleep(0.2)


async def clients(url: str, texts: list[str], max_tokens: int) -> list[float]:
    async def one(client, text: str) -> float:
        start = time.perf_counter()
        ttft = None
        stream = await client.completions.create(
            model=MODEL, prompt=text, max_tokens=max_tokens, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        async for chunk in stream:
            if ttft is None and chunk.choices and chunk.choices[0].text:
                ttft = time.perf_counter() - start
        return ttft if ttft is not None else time.perf_counter() - start

    async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0) as client:
        return await asyncio.gather(*(one(client, t) for t in texts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="kvforge-mini", help="any --model value")
    args = parser.parse_args()
    texts = prompts(args.clients)
    options = {"model": args.model, "device": args.device, "kv_memory": "64MiB",
               "max_num_seqs": args.clients}  # fmt: skip
    tokens = args.clients * args.max_tokens

    offline = LLM(**options)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    offline.generate(texts[:2], params)  # warm-up
    start = time.perf_counter()
    offline.generate(texts, params)
    offline_s = time.perf_counter() - start

    server, url = serve(args)
    try:
        asyncio.run(clients(url, texts[:2], 4))  # warm-up
        start = time.perf_counter()
        ttfts = sorted(asyncio.run(clients(url, texts, args.max_tokens)))
        served_s = time.perf_counter() - start
    finally:
        server.terminate()

    print(f"{args.clients} streaming clients × {args.max_tokens} tokens, device {args.device}")
    print(f"LLM.generate      {tokens / offline_s:8.1f} tokens/s ({offline_s:.2f} s)")
    print(f"kvforge serve     {tokens / served_s:8.1f} tokens/s ({served_s:.2f} s)")
    print(f"served / offline  {offline_s / served_s:.2f}")
    p99 = ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]
    print(f"client TTFT       p50 {statistics.median(ttfts) * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
