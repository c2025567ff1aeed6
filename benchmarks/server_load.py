"""What serving costs: N concurrent streaming `openai` clients against `kvforge serve` next
to `LLM.generate` on the same requests and settings, side by side in one run.

    python benchmarks/server_load.py --clients 64 --max-tokens 64 [--device cuda]
        [--out docs/benchmarks/server_load]

Three rows: `LLM.generate` (offline), `kvforge serve` as it runs (the API server and the
engine in two processes), and the same server with its engine on a thread of the API
server's process (`build_app(LLM(...))`, one process: what `kvforge serve` was before).
Greedy with ignore_eos, so each produces exactly clients × max_tokens tokens. Thread
counts are fixed: the engine computes with --threads torch threads wherever it runs; the
clients run in this process, and the CPU time they take is reported (on a 2-core machine
they compete with the server for the same cores).
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import torch

from kvforge import LLM, SamplingParams

IN_PROCESS = """
import sys, torch, uvicorn
from kvforge import LLM
from kvforge.server.app import build_app
torch.set_num_threads(int(sys.argv[2]))
llm = LLM(**__import__("json").loads(sys.argv[3]))
uvicorn.run(build_app(llm, "kvforge"), host="127.0.0.1", port=int(sys.argv[1]),
            log_level="warning")
"""


def prompts(n: int) -> list[str]:
    return [f"request {i}: " + "lorem ipsum dolor sit amet " * (i % 8 + 1) for i in range(n)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start(command: list[str], port: int, env: dict) -> subprocess.Popen:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env)  # fmt: skip
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, f"{command[:4]} exited"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline
        time.sleep(0.2)


async def clients(url: str, model: str, texts: list[str], max_tokens: int) -> list[float]:
    async def one(client, text: str) -> float:
        begin = time.perf_counter()
        ttft = None
        stream = await client.completions.create(
            model=model, prompt=text, max_tokens=max_tokens, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        async for chunk in stream:
            if ttft is None and chunk.choices and chunk.choices[0].text:
                ttft = time.perf_counter() - begin
        return ttft if ttft is not None else time.perf_counter() - begin

    limits = httpx.Limits(max_connections=len(texts) + 8)
    http = httpx.AsyncClient(limits=limits, timeout=600)
    async with openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0,
                                  http_client=http) as client:  # fmt: skip
        return await asyncio.gather(*(one(client, t) for t in texts))


def drive(url: str, model: str, texts: list[str], max_tokens: int) -> dict:
    """Warm up, then all clients at once: seconds, the clients' CPU seconds, TTFTs."""
    asyncio.run(clients(url, model, texts[:2], 4))
    cpu, begin = time.process_time(), time.perf_counter()
    ttfts = sorted(asyncio.run(clients(url, model, texts, max_tokens)))
    seconds = time.perf_counter() - begin
    p99 = ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))]
    return {"seconds": seconds, "client_cpu_s": time.process_time() - cpu,
            "ttft_p50_ms": statistics.median(ttfts) * 1e3, "ttft_p99_ms": p99 * 1e3}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default=None, help="any --model value (default: the default)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of the engine (default: this machine's)")  # fmt: skip
    parser.add_argument("--server-threads", type=int, default=None,
                        help="torch threads of the served engine (default: --threads)")  # fmt: skip
    parser.add_argument("--kv-memory", default="256MiB")
    parser.add_argument("--out", help="write server_load.json and .md into this directory")
    args = parser.parse_args()
    texts = prompts(args.clients)
    options = {"model": args.model, "device": args.device, "kv_memory": args.kv_memory,
               "max_num_seqs": args.clients}  # fmt: skip
    tokens = args.clients * args.max_tokens
    served_threads = args.server_threads or args.threads
    env = {**os.environ, "OMP_NUM_THREADS": str(served_threads), "TOKENIZERS_PARALLELISM": "false"}
    rows = {}

    torch.set_num_threads(args.threads)
    offline = LLM(**options)
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True)
    offline.generate(texts[:2], params)  # warm-up
    begin = time.perf_counter()
    offline.generate(texts, params)
    rows["LLM.generate"] = {"seconds": time.perf_counter() - begin}
    del offline

    def measure(command: list[str], port: int) -> dict:
        proc = start(command, port, env)
        try:
            return drive(f"http://127.0.0.1:{port}/v1", "kvforge", texts, args.max_tokens)
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    port = free_port()
    serve = [sys.executable, "-m", "kvforge", "serve", "--port", str(port),
             "--device", args.device, "--kv-memory", args.kv_memory,
             "--max-num-seqs", str(args.clients), "--served-model-name", "kvforge"]  # fmt: skip
    if args.model:
        serve += ["--model", args.model]
    rows["kvforge serve (2 processes)"] = measure(serve, port)
    port = free_port()
    one = [sys.executable, "-c", IN_PROCESS, str(port), str(served_threads), json.dumps(options)]
    rows["engine on a thread (1 process)"] = measure(one, port)

    offline_s = rows["LLM.generate"]["seconds"]
    for row in rows.values():
        row["tokens_per_s"] = tokens / row["seconds"]
        row["vs_offline"] = offline_s / row["seconds"]
    model = args.model or "the default model"
    title = (f"{args.clients} streaming clients × {args.max_tokens} tokens, {model}, "
             f"{args.device}, torch threads: {args.threads} offline, {served_threads} "
             "served")  # fmt: skip
    lines = [f"# Serving load: {title}", "",
             "| | tokens/s | vs LLM.generate | TTFT p50 | TTFT p99 | clients' CPU |",
             "|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, row in rows.items():
        ttft = (f"{row['ttft_p50_ms']:.0f} ms | {row['ttft_p99_ms']:.0f} ms"
                if "ttft_p50_ms" in row else "| ")  # fmt: skip
        cpu = f"{row['client_cpu_s']:.1f} s" if "client_cpu_s" in row else ""
        lines.append(f"| {name} | {row['tokens_per_s']:.1f} | {row['vs_offline']:.2f}× | "
                     f"{ttft} | {cpu} |")  # fmt: skip
    report = "\n".join(lines)
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"clients": args.clients, "max_tokens": args.max_tokens, "device": args.device,
                "model": args.model, "threads": args.threads,
                "server_threads": served_threads}  # fmt: skip
        (out / "server_load.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
        (out / "server_load.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
