"""Every eviction policy at 25% and 50% of the context, alone and with int8/int4, on the
default model (SmolLM2-135M-Instruct; --model kvforge-mini for the built-in one, with 10%
too): KV memory next to passkey accuracy, perplexity and agreement (the table and the
memory-vs-quality plot in docs/eval/).

    python benchmarks/eval_policies.py --out docs/eval   # full: 1K..8K x 5 depths x 2, ~10 h
    python benchmarks/eval_policies.py --out /tmp/e --quick      # a smoke run, ~10 min

Each setting is `kvforge eval passkey|perplexity|agreement --kv-policy P --kv-budget S%`
with prompts fed 64 tokens a pass (so that policies that evict as they go hold their
budget while reading a prompt; snapkv holds the whole prompt, then compresses it once).
The budget is a share of each measured length: of each passkey prompt, of perplexity's
1,024-token windows, of agreement's 256-token prompts.
"""

import argparse
import json
import time
from pathlib import Path

from kvforge import LLM
from kvforge.eval import tasks

POLICIES = ["sliding", "streaming", "h2o", "snapkv"]
SHARES = [0.25, 0.5]
CHUNK = 64


def settings(quick: bool, shares: list[float], codecs: list[str], fp32_policies: bool = True
             ) -> list[tuple[str, str | None, float | None]]:  # fmt: skip
    """fp32 with every policy at every share (unless not `fp32_policies`); each of `codecs`
    alone and with every policy at each share."""
    rows = [("fp32", None, None)]
    if fp32_policies:
        rows += [("fp32", p, s) for p in POLICIES for s in shares]
    rows += [(codec, None, None) for codec in codecs]
    rows += [(codec, p, s) for codec in codecs for p in POLICIES for s in shares]
    if quick:
        rows = rows[:3]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", help="any --model value (default: the default model)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--lengths", help="passkey lengths (default 1K..8K; kvforge-mini "
                        "256..2000)")  # fmt: skip
    parser.add_argument("--depths", help="passkey depths (0,.25,.5,.75,1)")
    parser.add_argument("--trials", type=int, help="passkey keys a cell (2)")
    parser.add_argument("--form", help="passkey form (default: the model's)")
    parser.add_argument("--max-tokens", type=int, help="prose tokens scored (2048)")
    parser.add_argument("--prompts", type=int, help="agreement prompts (8)")
    parser.add_argument("--shares", help="budgets, as shares of each length (default 0.25,0.5)")
    parser.add_argument("--codecs", default="int8,int4", help="with each policy at each share")
    parser.add_argument(
        "--no-fp32-policies",
        action="store_true",
        help="the fp32 cache without policies only (a codec-only run)",
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        help="agreement prompts' tokens (256; int4 and int2 at 25%% need "
        "1,024: a policy's budget must hold their window and two blocks)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = {"lengths": None, "depths": list(tasks.DEFAULT_DEPTHS), "trials": 2,
             "max_tokens": 2048, "prompts": 8, "form": None, "prompt_tokens": 256}  # fmt: skip
    if args.quick:
        sizes.update(lengths=[1024], depths=[0.0, 1.0], trials=1, max_tokens=1024, prompts=2)
    sizes = tasks.with_overrides(sizes, args)
    # fp32 weights: a GGUF file's quantized weights would be dequantized for every pass
    reference = LLM(model=args.model, kv_dtype="fp32", kv_memory="1GiB", weights_dtype="fp32")
    lengths = sizes["lengths"] or tasks.default_lengths(reference, sizes["form"])
    sizes["lengths"] = list(lengths)
    ref = str(max(n for n in lengths if n <= 1024))
    small = reference.engine.store.spec.max_position_embeddings <= 2048
    shares = [0.1, *SHARES] if small else SHARES  # kvforge-mini: 10% too
    if args.shares:
        shares = [float(x) for x in args.shares.split(",")]
    rows = []
    codecs = args.codecs.split(",")
    for codec, name, share in settings(args.quick, shares, codecs, not args.no_fp32_policies):
        started = time.perf_counter()
        llm = LLM(model=args.model, kv_dtype=codec, kv_memory="1GiB", weights_dtype="fp32",
                  max_num_batched_tokens=CHUNK, max_num_seqs=CHUNK)  # fmt: skip
        policy = None if name is None else (name, share)
        key = tasks.passkey(llm, lengths=lengths, depths=sizes["depths"], trials=sizes["trials"],
                            policy=policy, form=sizes["form"])  # fmt: skip
        ppl = tasks.perplexity(llm, max_tokens=sizes["max_tokens"], chunk=CHUNK, policy=policy)
        agree = tasks.agreement(llm, reference, count=sizes["prompts"],
                                tokens=sizes["prompt_tokens"], policy=policy)  # fmt: skip
        rows.append({
            "kv_dtype": codec,
            "kv_policy": name,
            "budget_share": share,
            "bytes_per_token": key["bytes_per_token"],
            # at the longest length up to 1,024 (1,024 itself but in --quick)
            "kv_bytes_1024": key["kv_bytes_per_request"][ref],
            "peak_kv_tokens_1024": key["peak_kv_tokens"][ref],
            "passkey_le_1024": tasks.passkey_accuracy_up_to(key, 1024),
            "passkey_all": key["mean_accuracy"],
            "passkey_by_depth": [sum(c) / len(c) for c in zip(*key["accuracy"], strict=True)],
            "perplexity": ppl["perplexity"],
            "token_agreement": agree["token_agreement"],
            "mean_kl": agree["mean_kl"],
            "seconds": time.perf_counter() - started,
            "details": {"perplexity": ppl, "passkey": key, "agreement": agree},
        })  # fmt: skip
        label = f"{codec} {name or 'full'} {'' if share is None else f'{share:.0%}'}"
        print(f"{label}: passkey {key['mean_accuracy']:.2f}, ppl {ppl['perplexity']:.2f}, "
              f"agreement {agree['token_agreement']:.3f}, "
              f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
        write(args.out, rows, sizes)


def write(out: Path, rows: list[dict], sizes: dict) -> None:
    """policies.json, .md and .png for the rows so far (a long run keeps what it measured)."""
    base = rows[0]
    for row in rows:
        row["perplexity_delta"] = row["perplexity"] - base["perplexity"]
    (out / "policies.json").write_text(json.dumps({"sizes": sizes, "rows": rows}, indent=1))
    model = base["details"]["passkey"]["model"]
    (out / "policies.md").write_text(render(rows, sizes, base))
    plot(rows, out / "policies.png", model)
    print(f"wrote {out / 'policies.md'}", flush=True)


def _label(r: dict) -> str:
    if r["kv_policy"] is None:
        return f"{r['kv_dtype']}, full cache"
    return f"{r['kv_dtype']} + {r['kv_policy']} {r['budget_share']:.0%}"


def render(rows: list[dict], sizes: dict, base: dict) -> str:
    depths = [f"{d:.0%}" for d in base["details"]["passkey"]["depths"]]
    lines = [
        "| setting | KV at 1,024 tokens | vs full fp32 | passkey ≤1,024 | passkey all | "
        "perplexity (Δ) | agreement | mean KL |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {_label(r)} | {r['kv_bytes_1024']:,} B | "
            f"{r['kv_bytes_1024'] / base['kv_bytes_1024']:.2f}× | {r['passkey_le_1024']:.0%} | "
            f"{r['passkey_all']:.0%} | {r['perplexity']:.2f} ({r['perplexity_delta']:+.2f}) | "
            f"{r['token_agreement']:.3f} | {r['mean_kl']:.2g} |"
        )
    lines += ["", "Passkey accuracy by needle depth (all lengths):", "",
              "| setting | " + " | ".join(depths) + " |",
              "|---|" + "---:|" * len(depths)]  # fmt: skip
    for r in rows:
        cells = " | ".join(f"{a:.0%}" for a in r["passkey_by_depth"])
        lines.append(f"| {_label(r)} | {cells} |")
    lines += ["", f"Sizes: {json.dumps(sizes)}; prompts fed {CHUNK} tokens a pass.", ""]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    markers = {None: "*", "sliding": "o", "streaming": "s", "h2o": "^", "snapkv": "D"}
    colors = {"fp32": "tab:blue", "int8": "tab:orange", "int4": "tab:green"}
    for r in rows:
        x = r["kv_bytes_1024"] / 2**20
        style = {"marker": markers[r["kv_policy"]], "color": colors[r["kv_dtype"]], "s": 40}
        axes[0].scatter(x, r["passkey_le_1024"], **style)
        axes[1].scatter(x, r["perplexity"], **style)
    for ax, name in zip(axes, ["passkey accuracy (≤ 1,024 tokens)", "prose perplexity"],
                        strict=True):  # fmt: skip
        ax.set_xlabel("KV bytes of a 1,024-token request (MiB)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], marker=m, ls="", color="grey", label=k or "full cache")
               for k, m in markers.items()]  # fmt: skip
    handles += [plt.Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in colors.items()]
    axes[0].legend(handles=handles, fontsize=8)
    fig.suptitle(f"{model}: eviction policies and codecs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
