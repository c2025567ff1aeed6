"""Every KV codec on the built-in trained model: memory per token next to held-out perplexity,
passkey accuracy and agreement with the full-precision cache (the table in docs/eval/).

    python benchmarks/eval_codecs.py --out docs/eval            # ~15 min on a 2-core CPU
    python benchmarks/eval_codecs.py --out /tmp/e --quick        # a smoke run

Each row is `kvforge eval perplexity|passkey|agreement --kv-dtype X` with the defaults
(perplexity: 16,384 held-out tokens in 1,024-token windows; passkey: 256..2,048 tokens x
5 depths x 4 keys; agreement: 8 prompts x 64 greedy tokens against the fp32 cache).
"""

import argparse
import json
import time
from pathlib import Path

from kvforge import LLM
from kvforge.eval import tasks

CODECS = ["fp32", "fp16", "bf16", "int8", "fp8", "int4", "int2"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--model", default="kvforge-mini", help="any --model value (default kvforge-mini)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--codecs", default=",".join(CODECS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = {"max_tokens": 16_384, "lengths": tasks.DEFAULT_LENGTHS, "trials": 4, "prompts": 8}
    if args.quick:
        sizes = {"max_tokens": 256, "lengths": (128, 256), "trials": 1, "prompts": 2}
    reference = LLM(model=args.model, kv_dtype="fp32", kv_memory="1GiB")
    rows = []
    for codec in args.codecs.split(","):
        started = time.perf_counter()
        llm = LLM(model=args.model, kv_dtype=codec, kv_memory="1GiB")
        ppl = tasks.perplexity(llm, max_tokens=sizes["max_tokens"])
        key = tasks.passkey(llm, lengths=sizes["lengths"], trials=sizes["trials"])
        agree = tasks.agreement(llm, reference, count=sizes["prompts"])
        rows.append({
            "kv_dtype": codec,
            "block_size": ppl["block_size"],
            "bytes_per_token": ppl["bytes_per_token"],
            "kv_bytes_1024": ppl["kv_bytes_per_request"],
            "perplexity": ppl["perplexity"],
            "passkey_le_1024": tasks.passkey_accuracy_up_to(key, 1024),
            "passkey_all": key["mean_accuracy"],
            "passkey_by_length": key["accuracy_by_length"],
            "token_agreement": agree["token_agreement"],
            "mean_kl": agree["mean_kl"],
            "seconds": time.perf_counter() - started,
            "details": {"perplexity": ppl, "passkey": key, "agreement": agree},
        })  # fmt: skip
        print(f"{codec}: ppl {ppl['perplexity']:.3f}, passkey {key['mean_accuracy']:.2f}, "
              f"agreement {agree['token_agreement']:.3f}", flush=True)  # fmt: skip
    base = next((r for r in rows if r["kv_dtype"] == "fp32"), rows[0])
    fp16 = next((r for r in rows if r["kv_dtype"] == "fp16"), None)
    for row in rows:
        row["perplexity_delta"] = row["perplexity"] - base["perplexity"]
        row["memory_vs_fp16"] = (
            None if fp16 is None else row["bytes_per_token"] / fp16["bytes_per_token"]
        )
    (args.out / "codecs.json").write_text(json.dumps({"sizes": sizes, "rows": rows}, indent=1))
    (args.out / "codecs.md").write_text(render(rows, sizes))
    print(f"wrote {args.out / 'codecs.md'}")


def render(rows: list[dict], sizes: dict) -> str:
    lines = [
        "| kv_dtype | block | B/token | memory vs fp16 | perplexity | Δ vs fp32 | passkey ≤1,024 | "
        "passkey all | agreement | mean KL |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        vs = "" if r["memory_vs_fp16"] is None else f"{r['memory_vs_fp16']:.2f}×"
        lines.append(
            f"| {r['kv_dtype']} | {r['block_size']} | {r['bytes_per_token']:,} | {vs} | "
            f"{r['perplexity']:.3f} | {r['perplexity_delta']:+.3f} | "
            f"{r['passkey_le_1024']:.0%} | {r['passkey_all']:.0%} | "
            f"{r['token_agreement']:.3f} | {r['mean_kl']:.2g} |"
        )
    lengths = list(rows[0]["passkey_by_length"])
    lines += ["", "Passkey accuracy by context length:", "",
              "| kv_dtype | " + " | ".join(lengths) + " |",
              "|---|" + "---:|" * len(lengths)]  # fmt: skip
    for r in rows:
        cells = " | ".join(f"{r['passkey_by_length'][n]:.0%}" for n in lengths)
        lines.append(f"| {r['kv_dtype']} | {cells} |")
    lines += ["", f"Sizes: {json.dumps(sizes)}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
