"""`kvforge serve` under NVIDIA's AIPerf, the load generator serving users run: streaming
completions at a fixed concurrency, synthetic prompts of a fixed length, its report kept.

    python benchmarks/server_aiperf.py --out docs/benchmarks/aiperf \
        [--aiperf PATH] [--concurrency 16] [--requests 64] [--input-tokens 128] \
        [--output-tokens 64] [--model FILE|NAME]

AIPerf is not a kvforge dependency (it pulls in a large tree of its own): install it in
a separate environment (`python -m venv aiperf && aiperf/bin/pip install aiperf`) and
give its `aiperf` with --aiperf, or have it on PATH. It counts tokens with the model's
own tokenizer, which this script saves from the GGUF file to a directory (nothing comes
from a model hub). The server runs with its defaults (quantized weights as the GGUF
file stores them); greedy with ignore_eos so every request produces --output-tokens.
Writes AIPerf's JSON export and a markdown summary into --out.
"""

import argparse
import json
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

METRICS = (  # (AIPerf's name, shown as, unit)
    ("request_throughput", "requests/s", ""),
    ("output_token_throughput", "output tokens/s", ""),
    ("time_to_first_token", "TTFT", "ms"),
    ("inter_token_latency", "inter-token latency", "ms"),
    ("request_latency", "request latency", "ms"),
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def save_tokenizer(model: str | None, directory: Path) -> None:
    """The model's tokenizer as a tokenizer directory (AIPerf loads it with transformers)."""
    from kvforge.models.catalog import find_model

    ref = find_model(model)
    if ref.kind != "gguf":
        raise SystemExit(f"--model {model}: a GGUF file or name is needed here")
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(ref.path.parent, gguf_file=ref.path.name)
    tokenizer.save_pretrained(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--aiperf", default=shutil.which("aiperf"), help="the aiperf program")
    parser.add_argument("--model", default=None, help="a GGUF file or name (default model)")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--input-tokens", type=int, default=128)
    parser.add_argument("--output-tokens", type=int, default=64)
    args = parser.parse_args()
    if not args.aiperf:
        raise SystemExit("aiperf not found: install it in its own environment, pass --aiperf")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kvforge-aiperf-"))
    save_tokenizer(args.model, work / "tokenizer")

    port = free_port()
    command = [sys.executable, "-m", "kvforge", "serve", "--port", str(port), "--served-model-name",
               "kvforge", "--max-num-seqs", str(args.concurrency)]  # fmt: skip
    if args.model:
        command += ["--model", args.model]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, "no server"
            time.sleep(0.5)
        profile = [
            args.aiperf, "profile", "--model", "kvforge", "--url", f"127.0.0.1:{port}",
            "--endpoint-type", "completions", "--streaming",
            "--tokenizer", str(work / "tokenizer"),
            "--concurrency", str(args.concurrency), "--request-count", str(args.requests),
            "--synthetic-input-tokens-mean", str(args.input_tokens),
            "--synthetic-input-tokens-stddev", "0",
            "--output-tokens-mean", str(args.output_tokens), "--output-tokens-stddev", "0",
            "--extra-inputs", "ignore_eos:true", "--extra-inputs", "temperature:0",
            "--random-seed", "1", "--artifact-dir", str(work / "artifacts"),
            "--ui-type", "none",
        ]  # fmt: skip
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(profile, capture_output=True, text=True)
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # aiperf and its workers
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        if done.returncode:
            raise SystemExit(f"aiperf failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    (export,) = (work / "artifacts").rglob("profile_export_aiperf.json")
    report = json.loads(export.read_text())
    shutil.copy(export, out / "profile_export_aiperf.json")
    lines = [
        f"# AIPerf against `kvforge serve` ({args.model or 'the default model'})", "",
        f"`aiperf profile --endpoint-type completions --streaming --concurrency "
        f"{args.concurrency} --request-count {args.requests} --synthetic-input-tokens-mean "
        f"{args.input_tokens} --output-tokens-mean {args.output_tokens}` (stddev 0, "
        f"ignore_eos, greedy); {wall:.0f} s wall, AIPerf's own CPU time {cpu:.1f} s (on "
        "the same cores as the server). From AIPerf's JSON export:", "",
        "| metric | avg | p50 | p99 |", "|---|---:|---:|---:|",
    ]  # fmt: skip
    for key, name, unit in METRICS:
        m = report.get(key)
        if not isinstance(m, dict):
            continue
        cells = [m.get(stat) for stat in ("avg", "p50", "p99")]
        shown = [f"{v:,.1f} {unit}".strip() if isinstance(v, int | float) else "" for v in cells]
        lines.append(f"| {name} | " + " | ".join(shown) + " |")
    (out / "aiperf.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
