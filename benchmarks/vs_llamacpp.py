"""kvforge against llama.cpp on the same GGUF file, side by side in one run, for several
kvforge weight formats at once (`kvforge bench latency` / `throughput` run one).

Workloads are llama.cpp's own (`kvforge.bench.llamacpp_workloads`): `llama-bench -p 256
-n 64` and `llama-batched-bench -npp 128 -ntg 64 -npl 1,16,64` (its `S t/s`: prompt +
generated tokens over the whole time). llama.cpp's tools are found on PATH or in
LLAMACPP_BIN. Timings drift on shared machines: compare the ratios of one run.

    python benchmarks/vs_llamacpp.py --out docs/benchmarks/vs_llamacpp
"""

import argparse
import json
from pathlib import Path

import torch

from kvforge import LLM
from kvforge.bench import llamacpp_workloads as workloads
from kvforge.models import catalog

THREADS = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="auto,fp32", help="kvforge weights dtypes to run")
    parser.add_argument("--npl", default="1,16,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    path, shapes = catalog.smollm2_path(), workloads.Shapes()
    npl = [int(n) for n in args.npl.split(",")]
    rows = {}
    bench = workloads.llama_bench(path, shapes, THREADS, args.repeats)
    if bench is not None:
        batched = workloads.llama_batched_bench(path, shapes, npl, THREADS) or {}
        rows["llama.cpp (Q4_1 file)"] = {**bench, **batched}
    for weights in args.weights.split(","):
        llm = LLM(device="cpu", weights_dtype=weights, kv_memory="1GiB",
                  enable_prefix_caching=False, max_num_seqs=max(npl))  # fmt: skip
        rows[f"kvforge weights {weights}"] = {
            **workloads.kvforge_bench(llm, shapes, args.repeats),
            **workloads.kvforge_batched(llm, shapes, npl),
        }
        del llm
    columns = ["prefill", "decode", *npl]
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
