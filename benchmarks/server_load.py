"""What serving costs: N concurrent streaming `openai` clients against `kvforge serve` next
to `LLM.generate` on the same requests and settings, side by side in one run.

    python benchmarks/server_load.py --clients 64 --max-tokens 64 [--device cuda]
        [--out docs/benchmarks/server_load]
    python benchmarks/server_load.py --inspector-cost 5 --clients 16 --max-tokens 64
        [--out docs/benchmarks/inspector_cost]

Three rows: `LLM.generate` (offline), `kvforge serve` as it runs (the API server and the
engine in two processes), and the same server with its engine on a thread of the API
server's process (`build_app(LLM(...))`, one process: what `kvforge serve` was before).
Greedy with ignore_eos, so each produces exactly clients × max_tokens tokens. Thread
counts are fixed: the engine computes with --threads torch threads wherever it runs; the
clients run in this process, and the CPU time they take is reported (on a 2-core machine
they compete with the server for the same cores).

--inspector-cost N measures what the KV cache inspector costs instead: one `kvforge serve`,
N runs with the inspector closed and N with it open (a client reading
/debug/kv/stream every 0.25 s, as the /inspect page does), interleaved, and the engine
process's CPU seconds (user + system, from /proc) per 1,000 generated tokens of each; the
goal is the open median within 5% of the closed one. The API server process's CPU is
reported too: it forwards the snapshots.
"""

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
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


SNAPSHOTS_ALONE = 50


def serve_command(args, port: int) -> list[str]:
    serve = [sys.executable, "-m", "kvforge", "serve", "--port", str(port),
             "--device", args.device, "--kv-memory", args.kv_memory,
             "--max-num-seqs", str(args.clients), "--served-model-name", "kvforge"]  # fmt: skip
    return serve + (["--model", args.model] if args.model else [])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def engine_pid(server_pid: int) -> int:
    """The engine process `kvforge serve` spawned (its child running spawn_main)."""
    for tid in os.listdir(f"/proc/{server_pid}/task"):
        for child in Path(f"/proc/{server_pid}/task/{tid}/children").read_text().split():
            if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                return int(child)
    raise RuntimeError("kvforge serve has no engine process")


class InspectorClient(threading.Thread):
    """What an open /inspect page does to the server: read /debug/kv/stream."""

    def __init__(self, url: str, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.url = f"{url}/debug/kv/stream?interval={interval}"
        self.events = 0
        self.closing = threading.Event()

    def run(self) -> None:
        with httpx.stream("GET", self.url, timeout=60) as reply:
            reply.raise_for_status()
            for line in reply.iter_lines():
                self.events += line.startswith("data:")
                if self.closing.is_set():
                    return

    def close(self) -> None:
        self.closing.set()
        self.join(timeout=30)


def inspector_cost(args, env: dict, texts: list[str]) -> None:
    """Engine CPU seconds per 1,000 tokens, inspector open vs closed, interleaved runs."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start(serve_command(args, port), port, env)
    tokens = args.clients * args.max_tokens
    runs: dict[str, list[dict]] = {"closed": [], "open": []}
    try:
        engine = engine_pid(proc.pid)
        asyncio.run(clients(f"{url}/v1", "kvforge", texts[:2], 4))  # warm-up
        # the first snapshot after a decode step measures the memory bandwidth once (the
        # roofline's floor): a one-off, taken before the runs and reported apart
        before = cpu_seconds(engine)
        httpx.get(f"{url}/debug/kv", timeout=60).raise_for_status()
        first_snapshot_cpu_s = cpu_seconds(engine) - before
        for _ in range(args.inspector_cost):
            for mode in ("closed", "open"):
                inspector = InspectorClient(url) if mode == "open" else None
                if inspector:
                    inspector.start()
                    while inspector.events == 0:
                        time.sleep(0.01)
                engine_cpu, server_cpu = cpu_seconds(engine), cpu_seconds(proc.pid)
                begin = time.perf_counter()
                asyncio.run(clients(f"{url}/v1", "kvforge", texts, args.max_tokens))
                seconds = time.perf_counter() - begin
                engine_cpu = cpu_seconds(engine) - engine_cpu
                server_cpu = cpu_seconds(proc.pid) - server_cpu
                events = 0
                if inspector:
                    events = inspector.events
                    inspector.close()
                runs[mode].append({
                    "seconds": seconds, "engine_cpu_s": engine_cpu, "server_cpu_s": server_cpu,
                    "engine_cpu_s_per_1k": engine_cpu / tokens * 1e3,
                    "server_cpu_s_per_1k": server_cpu / tokens * 1e3, "snapshots": events,
                })  # fmt: skip
                print(mode, {k: round(v, 3) for k, v in runs[mode][-1].items()}, flush=True)
        # what one snapshot costs, alone: the engine idle, its pool full of cached blocks
        before = cpu_seconds(engine)
        for _ in range(SNAPSHOTS_ALONE):
            httpx.get(f"{url}/debug/kv", timeout=60).raise_for_status()
        snapshot_ms = (cpu_seconds(engine) - before) / SNAPSHOTS_ALONE * 1e3
        blocks = httpx.get(f"{url}/debug/kv", timeout=60).json()["blocks_cached"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    def median(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    ratio = median("open", "engine_cpu_s_per_1k") / median("closed", "engine_cpu_s_per_1k")
    model = args.model or "the default model"
    lines = [f"# Inspector cost: {args.clients} streaming clients × {args.max_tokens} tokens, "
             f"{model}, {args.device}, median of {args.inspector_cost} interleaved runs", "",
             "| inspector | engine CPU s / 1k tokens | API server CPU s / 1k tokens | "
             "tokens/s | snapshots |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for mode in runs:
        lines.append(f"| {mode} | {median(mode, 'engine_cpu_s_per_1k'):.3f} | "
                     f"{median(mode, 'server_cpu_s_per_1k'):.3f} | "
                     f"{tokens / median(mode, 'seconds'):.1f} | "
                     f"{median(mode, 'snapshots'):.0f} |")  # fmt: skip
    verdict = "within" if ratio <= 1.05 else "OVER"
    lines += ["", f"Engine CPU open / closed: **{ratio:.3f}×** ({verdict} the 5% goal). "
              f"The first snapshot (it measures the memory bandwidth once) took "
              f"{first_snapshot_cpu_s:.2f} engine CPU s, before the runs. One snapshot alone "
              f"(the engine idle, {blocks} cached blocks, {SNAPSHOTS_ALONE} in a row): "
              f"{snapshot_ms:.1f} engine CPU ms; at 4 a second, "
              f"{snapshot_ms * 4 / 10:.2f}% of one core."]  # fmt: skip
    write(args, "inspector_cost", lines, {
        "ratio": ratio, "first_snapshot_cpu_s": first_snapshot_cpu_s,
        "snapshot_alone_cpu_ms": snapshot_ms, "snapshot_alone_blocks": blocks, "runs": runs,
    })  # fmt: skip


def write(args, name: str, lines: list[str], figures: dict) -> None:
    """Print the report; with --out, write it as NAME.md and the figures as NAME.json."""
    report = "\n".join(lines)
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"clients": args.clients, "max_tokens": args.max_tokens, "device": args.device,
                "model": args.model}  # fmt: skip
        (out / f"{name}.json").write_text(json.dumps({**meta, **figures}, indent=2))
        (out / f"{name}.md").write_text(report + "\n")


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
    parser.add_argument("--inspector-cost", type=int, metavar="N",
                        help="measure the inspector's cost instead: N interleaved runs each "
                             "open and closed")  # fmt: skip
    args = parser.parse_args()
    texts = prompts(args.clients)
    options = {"model": args.model, "device": args.device, "kv_memory": args.kv_memory,
               "max_num_seqs": args.clients}  # fmt: skip
    tokens = args.clients * args.max_tokens
    served_threads = args.server_threads or args.threads
    env = {**os.environ, "OMP_NUM_THREADS": str(served_threads), "TOKENIZERS_PARALLELISM": "false"}
    if args.inspector_cost:
        inspector_cost(args, env, texts)
        return
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
    rows["kvforge serve (2 processes)"] = measure(serve_command(args, port), port)
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
    write(args, "server_load", lines, {"threads": args.threads, "server_threads": served_threads,
                                       "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
