"""Replicas behind a router: what routing by KV cache, or a shared Redis tier, does to a
multi-turn workload whose groups share long system prompts. One run, side by side.

    python benchmarks/cluster.py [--replicas 2] [--users 32] [--groups 4]
        [--system-tokens 1500] [--turns 4] [--message-tokens 64] [--reply-tokens 16]
        [--kv-memory 256MiB] [--arrival-interval 1.5] [--out docs/benchmarks/cluster]

Each mode starts its own cold replicas (`kvforge serve`, the default model, --threads
torch threads each, --kv-memory of KV cache each: less than all groups' prompts need, so
not every prefix fits everywhere) and `vllm-router` in front of them:

    round-robin           --policy round_robin
    kv-aware              --policy kv_aware, fed by each replica's KV events
    round-robin + Redis   --policy round_robin, replicas sharing a redis-server tier

Users are in groups; a group's users share a system prompt (English prose from the
Python documentation Debian ships, as token ids). Users arrive --arrival-interval apart
(0: all at once), each running `turns` turns one after another: turn t's prompt is the
system prompt, then each earlier message and the reply it got (as the token ids the
server sampled), then a new message.
Reported: prefix-cache hit rate (tokens found / looked up, all replicas), TTFT p50/p99,
requests and generated tokens per second. Needs `vllm-router` (pip install
vllm-router) and `redis-server` on PATH.
"""

import argparse
import asyncio
import glob
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROSE = "/usr/share/doc/python3.11/html/_sources"
MODEL_NAME = "kvforge"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, url: str, what: str, timeout_s: float = 300,
                 path: str = "/health") -> None:  # fmt: skip
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} did not come up in {timeout_s:.0f} s")
        time.sleep(0.3)


def find_router() -> str:
    for candidate in (shutil.which("vllm-router"), Path(sys.executable).parent / "vllm-router"):
        if candidate and Path(candidate).exists():
            return str(candidate)
    raise SystemExit("vllm-router not found: pip install vllm-router")


class Cluster:
    """Replicas, a router, and maybe a redis-server, for one mode; `stop` ends them."""

    def __init__(self, args, mode: str, logs: Path) -> None:
        self.procs: list[subprocess.Popen] = []
        self.logs = logs
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads),
               "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
        extra: list[str] = []
        if mode == "round-robin + Redis":
            port = free_port()
            self._spawn("redis", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                  "--save", "", "--appendonly", "no", "--maxmemory", "2gb",
                                  "--maxmemory-policy", "allkeys-lru"], env)  # fmt: skip
            time.sleep(0.5)
            extra = ["--kv-remote", f"redis://127.0.0.1:{port}/0"]
        self.replicas: list[str] = []
        events: list[str] = []
        for i in range(args.replicas):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            command = [sys.executable, "-m", "kvforge", "serve", "--port", str(port),
                       "--served-model-name", MODEL_NAME, "--kv-memory", args.kv_memory,
                       "--block-size", str(args.block_size),
                       "--max-num-seqs", str(args.max_num_seqs), *extra]  # fmt: skip
            if args.model:
                command += ["--model", args.model]
            if mode == "kv-aware":
                endpoint, replay = (f"tcp://127.0.0.1:{free_port()}" for _ in range(2))
                command += ["--kv-events-endpoint", endpoint,
                            "--kv-events-replay-endpoint", replay]  # fmt: skip
                events += ["--kv-event-source", f"{url}={endpoint}",
                           "--kv-event-replay-source", f"{url}={replay}"]  # fmt: skip
            self._spawn(f"replica{i}", command, env)
            self.replicas.append(url)
        for proc, url in zip(self.procs[-args.replicas :], self.replicas, strict=True):
            wait_healthy(proc, url, "a replica")
        port = free_port()
        policy = "kv_aware" if mode == "kv-aware" else "round_robin"
        router = [args.router, "--host", "127.0.0.1", "--port", str(port),
                  "--worker-urls", *self.replicas, "--policy", policy,
                  "--worker-startup-check-interval", "1", "--log-level", args.router_log_level,
                  "--prometheus-host", "127.0.0.1",
                  "--prometheus-port", str(free_port())]  # fmt: skip
        if mode == "kv-aware":
            # the model name is only a label to the router: it hashes the token ids the
            # events carry, and gets a request's from the replicas' /tokenize
            router += [*events, "--kv-event-block-size", str(args.block_size),
                       "--kv-event-model", MODEL_NAME]  # fmt: skip
        self._spawn("router", router, env)
        self.url = f"http://127.0.0.1:{port}"
        wait_healthy(self.procs[-1], self.url, "vllm-router", 60, "/readiness")

    def _spawn(self, name: str, command: list[str], env: dict) -> None:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        self.procs.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                           env=env))  # fmt: skip

    def prefix_counts(self) -> tuple[float, float]:
        """(tokens looked up, tokens found) in the replicas' prefix caches, summed."""
        queries = hits = 0.0
        for url in self.replicas:
            for line in httpx.get(f"{url}/metrics").text.splitlines():
                if line.startswith("kvforge_prefix_cache_queries_total "):
                    queries += float(line.split()[-1])
                elif line.startswith("kvforge_prefix_cache_hits_total "):
                    hits += float(line.split()[-1])
        return queries, hits

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def token_ids(url: str, text: str) -> list[int]:
    body = {"model": MODEL_NAME, "prompt": text, "add_special_tokens": False}
    return httpx.post(f"{url}/tokenize", json=body, timeout=60).json()["tokens"]


def workload(url: str, args) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(each group's system prompt, each user's messages), as token ids, from prose."""
    files = sorted(glob.glob(f"{PROSE}/library/*.rst.txt"))
    if not files:
        raise SystemExit(f"no prose under {PROSE}: apt-get install python3.11-doc")
    stream: list[int] = []
    for path in files:
        stream += token_ids(url, Path(path).read_text(errors="replace")[:40_000])
        if len(stream) > args.groups * args.system_tokens + 4 * args.users * args.turns * 64:
            break
    at = 0

    def take(n: int) -> list[int]:
        nonlocal at
        at += n
        return stream[at - n : at]

    systems = [take(args.system_tokens) for _ in range(args.groups)]
    messages = [[take(args.message_tokens) for _ in range(args.turns)] for _ in range(args.users)]
    return systems, messages


async def one_user(client: httpx.AsyncClient, url: str, tokenizer_url: str,
                   system: list[int], messages: list[list[int]], reply_tokens: int,
                   start_s: float) -> list[float]:  # fmt: skip
    """A user's turns, one after another, from `start_s` on: each turn's TTFT. The reply
    goes into the next prompt as a chat client sends it: its text, tokenized again (the
    request does not ask for token ids: vllm-router 0.1.17 credits no cached prefix to a
    request carrying `return_token_ids` or `return_tokens_as_token_ids`)."""
    await asyncio.sleep(start_s)
    history = list(system)
    ttfts = []
    for message in messages:
        history += message
        body = {"model": MODEL_NAME, "prompt": history, "max_tokens": reply_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
        begin = time.perf_counter()
        ttft = None
        reply = ""
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                raise SystemExit(f"HTTP {response.status_code}: {await response.aread()}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                choices = json.loads(line[6:])["choices"]
                if choices and choices[0]["text"] and ttft is None:
                    ttft = time.perf_counter() - begin
                reply += choices[0]["text"] if choices else ""
        ttfts.append(ttft if ttft is not None else time.perf_counter() - begin)
        body = {"model": MODEL_NAME, "prompt": reply, "add_special_tokens": False}
        answer = await client.post(f"{tokenizer_url}/tokenize", json=body)
        history += answer.json()["tokens"]
    return ttfts


async def run_users(url: str, tokenizer_url: str, systems, messages, args) -> list[float]:
    limits = httpx.Limits(max_connections=args.users + 8)
    async with httpx.AsyncClient(limits=limits, timeout=1800) as client:
        per_user = await asyncio.gather(*(
            one_user(client, url, tokenizer_url, systems[u % args.groups], messages[u],
                     args.reply_tokens, u * args.arrival_interval)
            for u in range(args.users)
        ))  # fmt: skip
    return [t for user in per_user for t in user]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="any --model value (default: the default)")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica")
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=1500)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--message-tokens", type=int, default=64)
    parser.add_argument("--reply-tokens", type=int, default=16)
    parser.add_argument(
        "--arrival-interval",
        type=float,
        default=1.5,
        help="seconds between one user's first request and the next's",
    )
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--kv-memory", default="256MiB",
                        help="KV cache per replica (256MiB: 364 blocks of 16 tokens of the "
                        "default model at fp32: 2 groups' system prompts and the running "
                        "requests fit, not all 4 prompts)")  # fmt: skip
    parser.add_argument("--max-num-seqs", type=int, default=8, help="per replica")
    parser.add_argument("--modes", default="round-robin,kv-aware,round-robin + Redis")
    parser.add_argument("--router", default=None, help="the vllm-router executable")
    parser.add_argument("--router-log-level", default="info", help="debug: its decisions")
    parser.add_argument("--out", help="write cluster.json and cluster.md into this directory")
    args = parser.parse_args()
    args.router = args.router or find_router()
    modes = [m.strip() for m in args.modes.split(",")]
    logs = Path(tempfile.mkdtemp(prefix="kvforge-cluster-"))
    print(f"logs of the replicas, the router and redis-server: {logs}", flush=True)
    rows, systems, messages = {}, None, None
    for mode in modes:
        print(f"{mode}: starting {args.replicas} replicas and the router", flush=True)
        cluster = Cluster(args, mode, logs)
        try:
            if systems is None:
                systems, messages = workload(cluster.replicas[0], args)
            begin = time.perf_counter()
            ttfts = asyncio.run(run_users(cluster.url, cluster.replicas[0], systems, messages,
                                          args))  # fmt: skip
            seconds = time.perf_counter() - begin
            queries, hits = cluster.prefix_counts()
        finally:
            cluster.stop()
        requests = args.users * args.turns
        rows[mode] = {"hit_rate": hits / queries, "ttft_p50_ms": statistics.median(ttfts) * 1e3,
                      "ttft_p99_ms": percentile(ttfts, 0.99) * 1e3, "seconds": seconds,
                      "requests_per_s": requests / seconds,
                      "tokens_per_s": requests * args.reply_tokens / seconds}  # fmt: skip
        print(mode, json.dumps(rows[mode]), flush=True)
    base = rows.get("round-robin")
    lines = [
        f"# {args.replicas} replicas: {args.users} users in {args.groups} groups, "
        f"{args.system_tokens}-token system prompts, {args.turns} turns of "
        f"{args.message_tokens}-token messages, {args.reply_tokens}-token replies, "
        f"a user arriving every {args.arrival_interval:g} s",
        "",
        f"{args.model or 'The default model'}, {args.threads} torch thread(s) and "
        f"{args.kv_memory} of KV cache in blocks of {args.block_size} tokens per replica, "
        f"at most {args.max_num_seqs} requests running per replica.",
        "",
        "| routing | prefix hit rate | TTFT p50 | TTFT p99 | requests/s | tokens/s | "
        "TTFT p50 vs round-robin |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for mode, row in rows.items():
        ratio = f"{base['ttft_p50_ms'] / row['ttft_p50_ms']:.1f}× lower" if base else ""
        lines.append(f"| {mode} | {row['hit_rate']:.0%} | {row['ttft_p50_ms']:.0f} ms | "
                     f"{row['ttft_p99_ms']:.0f} ms | {row['requests_per_s']:.2f} | "
                     f"{row['tokens_per_s']:.1f} | {ratio} |")  # fmt: skip
    report = "\n".join(lines)
    print(report)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in vars(args).items() if k not in ("router", "out")}
        (out / "cluster.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
        (out / "cluster.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
