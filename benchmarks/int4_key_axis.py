"""Which axis int4's keys are quantized along, measured on the default model (SmolLM2):
per token in groups of 64 channels (int4's layout until this measurement), the same with
int2's 32-token full-precision window, and per channel over a block (KIVI's axis, what
int4 ships), each with and without the rotation.

    python benchmarks/int4_key_axis.py --out docs/eval     # ~3 min on a 2-core CPU

Prose perplexity (`kvforge eval perplexity`, 4,096 tokens in 1,024-token windows, fp32
weights) against the fp32 cache. The layouts that int4 no longer has are built here from
the shipped one and put in the format registry for the run only.
"""

import argparse
import dataclasses
import json
from contextlib import contextmanager
from pathlib import Path

from kvforge import LLM
from kvforge.eval import tasks
from kvforge.kvcache.formats import INT4_GROUP_SIZE, KV_FORMATS, QuantGroups

SHIPPED = KV_FORMATS["int4"]
PER_TOKEN = dataclasses.replace(
    SHIPPED, key_groups=QuantGroups("channels", 2, INT4_GROUP_SIZE), residual_tokens=0,
    codecs=("Int4Codec", "Int4Codec"),
)  # fmt: skip
LAYOUTS = {
    "keys per token (64-channel groups)": (PER_TOKEN, 16),
    "keys per token + 32-token window": (dataclasses.replace(PER_TOKEN, residual_tokens=32), 16),
    "keys per channel over a block (shipped)": (SHIPPED, 64),
    "keys per channel, 16-token blocks": (SHIPPED, 16),
}


@contextmanager
def int4_layout(fmt):
    KV_FORMATS["int4"] = fmt
    try:
        yield
    finally:
        KV_FORMATS["int4"] = SHIPPED


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-tokens", type=int, default=4096)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    common = {"weights_dtype": "fp32"}
    base = tasks.perplexity(LLM(kv_dtype="fp32", **common), max_tokens=args.max_tokens)
    rows = []
    for name, (fmt, block) in LAYOUTS.items():
        for rotation in (False, True):
            if block == 16 and fmt is SHIPPED and not rotation:
                continue
            with int4_layout(fmt):
                llm = LLM(kv_dtype="int4", kv_rotation=rotation, block_size=block, **common)
                result = tasks.perplexity(llm, max_tokens=args.max_tokens)
            rows.append({"layout": name, "rotation": rotation, "block_size": block,
                         "bytes_per_token": result["bytes_per_token"],
                         "perplexity": result["perplexity"],
                         "change": result["perplexity"] / base["perplexity"] - 1})  # fmt: skip
            print(rows[-1], flush=True)
    data = {"model": base["model"], "fp32_perplexity": base["perplexity"],
            "tokens": base["tokens_scored"], "rows": rows}  # fmt: skip
    (args.out / "int4_key_axis.json").write_text(json.dumps(data, indent=1) + "\n")
    lines = [f"{base['model']}, prose perplexity over {base['tokens_scored']:,} tokens; the "
             f"fp32 cache: {base['perplexity']:.3f}.", "",
             "| int4 keys | rotated | block | B/token | perplexity | vs fp32 cache |",
             "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['layout']} | {'yes' if r['rotation'] else 'no'} | "
                     f"{r['block_size']} | {r['bytes_per_token']:,} | {r['perplexity']:.3f} | "
                     f"{r['change']:+.2%} |")  # fmt: skip
    (args.out / "int4_key_axis.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'int4_key_axis.md'}")


if __name__ == "__main__":
    main()
