"""kvforge against llama.cpp on the same GGUF file, side by side in one run.

Workloads are llama.cpp's own: `llama-bench -p 256 -n 64` (prefill 256 tokens; 64
tokens decoded at batch 1) and `llama-batched-bench -npp 128 -ntg 64 -npl 1,16,64`
(N sequences of 128 prompt tokens and 64 generated; its `S t/s` is prompt + generated
tokens over the whole time). kvforge runs the same shapes on random token ids with
each `--weights-dtype`; llama.cpp's tools are found on PATH or in LLAMACPP_BIN
(`build-llamacpp.sh` builds them). Timings drift on shared machines: compare the
ratios of one run.

    python benchmarks/vs_llamacpp.py --out docs/benchmarks/vs_llamacpp
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import torch

from kvforge import LLM, SamplingParams
from kvforge.models import catalog

THREADS = 2


def tool(name: str) -> str | None:
    folder = os.environ.get("LLAMACPP_BIN", str(Path.home() / ".cache/llama.cpp/bin"))
    found = shutil.which(name) or shutil.which(name, path=folder)
    return found


def llama_env(binary: str) -> dict:
    return {**os.environ, "LD_LIBRARY_PATH": str(Path(binary).parent)}


def llamacpp_bench(path: Path) -> dict | None:
    binary = tool("llama-bench")
    if binary is None:
        return None
    out = subprocess.run([binary, "-m", str(path), "-p", "256", "-n", "64", "-t", str(THREADS),
                          "-r", "3", "-o", "json"], capture_output=True, text=True, check=True,
                         env=llama_env(binary))  # fmt: skip
    rows = json.loads(out.stdout)
    result = {}
    for row in rows:
        key = "prefill_256" if row["n_prompt"] else "decode_64"
        result[key] = row["avg_ts"]
    return result


def llamacpp_batched(path: Path, npl: list[int]) -> dict | None:
    binary = tool("llama-batched-bench")
    if binary is None:
        return None
    ctx = max(npl) * (128 + 64) + 64
    out = subprocess.run([binary, "-m", str(path), "-c", str(ctx), "-b", "2048", "-ub", "512",
                          "-npp", "128", "-ntg", "64", "-npl", ",".join(map(str, npl)),
                          "-t", str(THREADS)], capture_output=True, text=True, check=True,
                         env=llama_env(binary))  # fmt: skip
    result = {}
    for line in out.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and re.fullmatch(r"\d+", cells[0]):
            # PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s
            result[int(cells[2])] = float(cells[9])
    return result


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [int(t) for t in torch.randint(100, vocab - 1, (n,), generator=g)]


def kvforge_runs(weights: str, npl: list[int], repeats: int) -> dict:
    llm = LLM(device="cpu", weights_dtype=weights, kv_memory="1GiB",
              enable_prefix_caching=False, max_num_seqs=max(npl))  # fmt: skip
    vocab = llm.engine.vocab_size
    engine = llm.engine
    result = {}
    # prefill 256: the time of the step that computes the prompt
    times = []
    for r in range(repeats + 1):
        engine.add_request(random_ids(256, vocab, r), SamplingParams(max_tokens=1, ignore_eos=True))
        start = time.perf_counter()
        while engine.has_unfinished:
            engine.step()
        times.append(time.perf_counter() - start)
    result["prefill_256"] = 256 / statistics.median(times[1:])
    # decode 64 at batch 1, from an (almost) empty cache as llama-bench's tg64
    rates = []
    for r in range(repeats):
        engine.add_request(random_ids(1, vocab, 100 + r),
                           SamplingParams(max_tokens=65, ignore_eos=True))  # fmt: skip
        engine.step()  # the prompt's token and the first sample
        start = time.perf_counter()
        while engine.has_unfinished:
            engine.step()
        rates.append(64 / (time.perf_counter() - start))
    result["decode_64"] = statistics.median(rates)
    # N x (128 prompt + 64 generated), all submitted at once
    for n in npl:
        prompts = [random_ids(128, vocab, 1000 + i) for i in range(n)]
        start = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=64, ignore_eos=True))
        result[n] = n * (128 + 64) / (time.perf_counter() - start)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="auto,fp32", help="kvforge weights dtypes to run")
    parser.add_argument("--npl", default="1,16,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    path = catalog.smollm2_path()
    npl = [int(n) for n in args.npl.split(",")]
    rows = {}
    bench, batched = llamacpp_bench(path), llamacpp_batched(path, npl)
    if bench is not None:
        rows["llama.cpp (Q4_1 file)"] = {**bench, **(batched or {})}
    for weights in args.weights.split(","):
        rows[f"kvforge weights {weights}"] = kvforge_runs(weights, npl, args.repeats)
    columns = ["prefill_256", "decode_64", *npl]
    head = ["engine", "prefill 256 t/s", "decode 64 t/s", *(f"{n}x(128+64) t/s" for n in npl)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, row in rows.items():
        cells = [f"{row.get(c, float('nan')):.1f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    peer = rows.get("llama.cpp (Q4_1 file)")
    if peer:
        for name, row in rows.items():
            if name.startswith("kvforge"):
                ratios = [row[c] / peer[c] if peer.get(c) else float("nan") for c in columns]
                cells = [f"{r:.2f}×" for r in ratios]
                lines.append(f"| {name} ÷ llama.cpp | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
        (args.out / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
