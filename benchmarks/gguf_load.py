"""Loading a GGUF file: kvforge against transformers on the same file, each in its own process.

Prints each one's load time (model, then with the tokenizer) and peak resident memory
above the process's memory after imports (after the model, then with the tokenizer),
next to the weights' bytes once loaded. Usage:

    python benchmarks/gguf_load.py [--model FILE.gguf]   # default: SmolLM2-135M-Instruct
"""

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch, transformers, gguf  # imported before the baseline is read
from pathlib import Path

def peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

path, who = Path(sys.argv[1]), sys.argv[2]
base = peak_mib()
start = time.perf_counter()
if who == "kvforge":
    from kvforge.models.gguf_file import read_gguf
    from kvforge.models.loader import load_model
    from kvforge.models.tokenizer import load_tokenizer
    info = read_gguf(path)
    model = load_model(info)
    model_s, model_peak = time.perf_counter() - start, peak_mib()
    load_tokenizer(info)
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32)
    model_s, model_peak = time.perf_counter() - start, peak_mib()
    transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
total_s = time.perf_counter() - start
weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
print(json.dumps({"who": who, "model_s": model_s, "total_s": total_s,
                  "model_peak_mib": model_peak - base, "peak_mib": peak_mib() - base,
                  "weights_mib": weights}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a GGUF file (default: the installed SmolLM2)")
    args = parser.parse_args()
    if args.model is None:
        from kvforge.models.catalog import smollm2_path

        args.model = str(smollm2_path())
    rows = []
    for who in ("kvforge", "transformers"):
        out = subprocess.run([sys.executable, "-c", CHILD, args.model, who],
                             capture_output=True, text=True, check=True)  # fmt: skip
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.model}")
    print("| loader | model s | + tokenizer s | peak RSS: model | + tokenizer | weights |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['who']} | {r['model_s']:.1f} | {r['total_s']:.1f} | "
              f"{r['model_peak_mib']:.0f} MiB | {r['peak_mib']:.0f} MiB | "
              f"{r['weights_mib']:.0f} MiB |")  # fmt: skip


if __name__ == "__main__":
    main()
