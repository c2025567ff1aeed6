"""Every KV codec on the default model (SmolLM2-135M-Instruct): memory per token next to
perplexity (English prose, and code), passkey accuracy and agreement with the fp32 cache
(the table in docs/eval/).

    python benchmarks/eval_codecs.py --out docs/eval        # full sizes: ~6 h on a 2-core CPU
    python benchmarks/eval_codecs.py --out /tmp/e --quick    # ~2 min a codec

Each row is `kvforge eval perplexity|passkey|agreement --kv-dtype X [--no-kv-rotation]
[--kv-skip-layers L] [--kv-recent-tokens N] [--kv-exact-sinks]` (a codec is written like
"int4+norot", "int2+skip0:29" or "int2+recent128+sinks"). Full
sizes: perplexity over 16,384 prose tokens and 4,096 code tokens in 1,024-token windows;
passkey at 1K, 2K, 4K and 8K tokens x 5 depths x 2 keys through the chat template; agreement:
8 prompts x 64 greedy tokens. Each size can be set on its own (--max-tokens, --lengths...);
the sizes run are written with the results. Passkey at 8K dominates the cost (~80 s a prompt).
"""

import argparse
import json
import time
from pathlib import Path

from kvforge import LLM
from kvforge.eval import tasks

CODECS = ["fp32", "fp16", "bf16", "fp8", "int8", "int8+norot", "int4", "int4+norot", "int2",
          "int2+norot", "int2+skip0:29"]  # fmt: skip


def codec_options(codec: str) -> dict:
    """ "int2+norot+skip0:29+recent128+sinks" -> LLM keyword arguments (rotation: the
    format's default, on for int8, int4 and int2, unless "+rot" or "+norot")."""
    name, *extras = codec.split("+")
    options: dict = {"kv_dtype": name}
    for extra in extras:
        if extra in ("rot", "norot"):
            options["kv_rotation"] = extra == "rot"
        elif extra.startswith("skip"):
            options["kv_skip_layers"] = [int(x) for x in extra[4:].split(":")]
        elif extra.startswith("recent"):
            options["kv_recent_tokens"] = int(extra[6:])
        elif extra == "sinks":
            options["kv_exact_sinks"] = True
        elif extra.startswith("block"):
            options["block_size"] = int(extra[5:])
        else:
            raise SystemExit(f"unknown codec option {extra!r} in {codec!r}")
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", help="any --model value (default: the default model)")
    parser.add_argument("--quick", action="store_true", help="small sizes (~2 min a codec)")
    parser.add_argument("--codecs", default=",".join(CODECS))
    parser.add_argument("--max-tokens", type=int, help="prose tokens scored (16384)")
    parser.add_argument("--code-tokens", type=int, help="code tokens scored (4096)")
    parser.add_argument("--lengths", help="passkey lengths (default 1K..8K)")
    parser.add_argument("--depths", help="passkey depths (0,.25,.5,.75,1)")
    parser.add_argument("--trials", type=int, help="passkey keys a cell (2)")
    parser.add_argument("--form", help="passkey form (default: the model's, chat for SmolLM2)")
    parser.add_argument("--prompts", type=int, help="agreement prompts (8)")
    parser.add_argument("--plot-only", action="store_true", help="redraw from codecs.json")
    args = parser.parse_args()
    if args.plot_only:
        data = json.loads((args.out / "codecs.json").read_text())
        write(args.out, data["rows"], data["sizes"])
        return
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = {"max_tokens": 16_384, "code_tokens": 4096, "lengths": None, "trials": 2,
             "depths": list(tasks.DEFAULT_DEPTHS), "form": None, "prompts": 8}  # fmt: skip
    if args.quick:
        sizes.update(max_tokens=2048, code_tokens=1024, lengths=[1024, 2048],
                     depths=[0.0, 0.5, 1.0], trials=1, prompts=2)  # fmt: skip
    sizes = tasks.with_overrides(sizes, args)
    # fp32 weights: a GGUF file's quantized weights would be dequantized again for every
    # 64-token pass of perplexity (kept quantized, only passes of <= 16 rows read them)
    common = {"model": args.model, "kv_memory": "1GiB", "max_num_batched_tokens": 8192,
              "weights_dtype": "fp32"}  # fmt: skip
    reference = LLM(**common, kv_dtype="fp32")
    rows = []
    for codec in args.codecs.split(","):
        started = time.perf_counter()
        llm = LLM(**common, **codec_options(codec))
        ppl = tasks.perplexity(llm, max_tokens=sizes["max_tokens"])
        code = tasks.perplexity(llm, max_tokens=sizes["code_tokens"], corpus="code")
        key = tasks.passkey(llm, lengths=sizes["lengths"], depths=sizes["depths"],
                            trials=sizes["trials"], form=sizes["form"])  # fmt: skip
        agree = tasks.agreement(llm, reference, count=sizes["prompts"])
        rows.append({
            "codec": codec,
            "kv_dtype": ppl["kv_dtype"],
            "block_size": ppl["block_size"],
            "bytes_per_token": ppl["bytes_per_token"],
            "kv_bytes_1024": ppl["kv_bytes_per_request"],
            # a request of the model's whole context, the blocks its window borrows included
            "kv_bytes_8192": tasks.kv_bytes(llm, 8192),
            "perplexity": ppl["perplexity"],
            "code_perplexity": code["perplexity"],
            "passkey_all": key["mean_accuracy"],
            "passkey_by_length": key["accuracy_by_length"],
            "token_agreement": agree["token_agreement"],
            "mean_kl": agree["mean_kl"],
            "seconds": time.perf_counter() - started,
            "details": {"perplexity": ppl, "code": code, "passkey": key, "agreement": agree},
        })  # fmt: skip
        print(f"{codec}: ppl {ppl['perplexity']:.3f}, code {code['perplexity']:.3f}, passkey "
              f"{key['accuracy_by_length']}, agreement {agree['token_agreement']:.3f}, KL "
              f"{agree['mean_kl']:.3g}, {time.perf_counter() - started:.0f} s",
              flush=True)  # fmt: skip
        sizes["form"] = key["form"]
        write(args.out, rows, sizes)


def write(out: Path, rows: list[dict], sizes: dict) -> None:
    """codecs.json and codecs.md for the rows so far (a long run keeps what it measured)."""
    rows = [dict(r) for r in rows]
    base = next((r for r in rows if r["codec"] == "fp32"), rows[0])
    # fp16's bytes: its row's, or half of fp32's
    fp16 = next((r["bytes_per_token"] for r in rows if r["codec"] == "fp16"),
                base["bytes_per_token"] / 2 if base["codec"] == "fp32" else None)  # fmt: skip
    for row in rows:
        row["perplexity_change"] = row["perplexity"] / base["perplexity"] - 1
        row["code_perplexity_change"] = row["code_perplexity"] / base["code_perplexity"] - 1
        row["memory_vs_fp16"] = None if fp16 is None else row["bytes_per_token"] / fp16
    model = rows[0]["details"]["perplexity"]["model"]
    data = {"model": model, "sizes": sizes, "rows": rows}
    (out / "codecs.json").write_text(json.dumps(data, indent=1))
    (out / "codecs.md").write_text(render(rows, sizes, model))
    plot(rows, out / "codecs.png", model)
    print(f"wrote {out / 'codecs.md'}", flush=True)


def render(rows: list[dict], sizes: dict, model: str) -> str:
    lines = [
        f"{model}; perplexity change against the fp32 cache.",
        "",
        "| codec | block | B/token | memory vs fp16 | KV of an 8,192-token request | prose ppl "
        "| Δ | code ppl | Δ | passkey | agreement | mean KL |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        vs = "" if r["memory_vs_fp16"] is None else f"{r['memory_vs_fp16']:.2f}×"
        whole = f"{r['kv_bytes_8192']:,} B" if "kv_bytes_8192" in r else ""
        lines.append(
            f"| {r['codec']} | {r['block_size']} | {r['bytes_per_token']:,} | {vs} | {whole} | "
            f"{r['perplexity']:.3f} | {r['perplexity_change']:+.2%} | "
            f"{r['code_perplexity']:.3f} | {r['code_perplexity_change']:+.2%} | "
            f"{r['passkey_all']:.0%} | {r['token_agreement']:.3f} | {r['mean_kl']:.2g} |"
        )
    lengths = list(rows[0]["passkey_by_length"])
    lines += ["", f"Passkey accuracy by context length ({sizes['form']} form):", "",
              "| codec | " + " | ".join(lengths) + " |",
              "|---|" + "---:|" * len(lengths)]  # fmt: skip
    for r in rows:
        cells = " | ".join(f"{r['passkey_by_length'][n]:.0%}" for n in lengths)
        lines.append(f"| {r['codec']} | {cells} |")
    lines += ["", f"Sizes: {json.dumps(sizes)}.", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, model: str) -> None:
    """Perplexity change against bytes per token (the frontier), and passkey accuracy by
    length as a heat map, one row a codec."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, heat) = plt.subplots(1, 2, figsize=(12, 4.6))
    for r in rows:
        change = max(r["perplexity_change"], 1e-4)  # fp32 itself: drawn at the floor
        # a whole-context request's bytes a token: int4's and int2's borrowed windows count
        x = r.get("kv_bytes_8192", r["bytes_per_token"] * 8192) / 8192
        ax.scatter(x, change * 100, color="tab:blue")
        ax.annotate(r["codec"], (x, change * 100), fontsize=8, xytext=(4, 2),
                    textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("KV bytes a token of an 8,192-token request (its window included)")
    ax.set_ylabel("prose perplexity change vs the fp32 cache (%)")
    ax.grid(alpha=0.3, which="both")
    lengths = list(rows[0]["passkey_by_length"])
    grid = [[r["passkey_by_length"][n] for n in lengths] for r in rows]
    heat.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    heat.set_xticks(range(len(lengths)), lengths)
    heat.set_yticks(range(len(rows)), [r["codec"] for r in rows])
    heat.set_xlabel("passkey context tokens")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            heat.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=8)
    fig.suptitle(f"{model}: KV codecs, bytes against quality")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
