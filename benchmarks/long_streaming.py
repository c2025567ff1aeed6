"""A long run under a fixed KV budget: `streaming` (attention sinks + recent tokens) against
`sliding` (recent tokens only), on the built-in trained model, far past its context.

    python benchmarks/long_streaming.py --out docs/eval          # ~10 min on a 2-core CPU

1. Teacher-forced: 20,480 tokens of Python (the standard library's sources, in a fixed
   order) go through the cache 64 tokens a pass; the perplexity of each 1,024-token
   window is plotted, with the KV tokens held. The model's context is 2,048 tokens: a
   full cache could not go on, and positions run ten times past what it was trained on.
2. Generation: 20,000 sampled tokens (temperature 1, seed 0) after a short prompt; the
   KV tokens held after every step, and the perplexity of each 1,000-token window of
   what it generated (its own log-probabilities), which stays flat when it stays sane.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

from kvforge import LLM, SamplingParams
from kvforge.training.data import python_sources, read_sources

BUDGET = 256
TOKENS = 20_480
WINDOW = 1024


def teacher_forced(policy: str, ids: list[int]) -> dict:
    llm = LLM(kv_policy=policy, kv_budget=BUDGET, kv_memory="64MiB")
    started = time.perf_counter()
    logprobs = llm.engine.score(ids, chunk_size=64)
    seconds = time.perf_counter() - started
    windows = [
        math.exp(-float(logprobs[i : i + WINDOW].mean()))
        for i in range(0, len(logprobs) - WINDOW + 1, WINDOW)
    ]
    return {"policy": policy, "budget": BUDGET, "tokens": len(ids),
            "peak_kv_tokens": llm.engine.last_score_peak_kv_tokens,
            "window_perplexity": windows, "seconds": seconds}  # fmt: skip


def generation(tokens: int) -> dict:
    llm = LLM(kv_policy="streaming", kv_budget=BUDGET, kv_memory="64MiB")
    chosen: list[float] = []
    held: list[int] = []

    def record(requests, logits):
        lp = torch.log_softmax(logits.float(), -1)
        chosen.append(lp)  # the sampled token's log-prob is read after sampling, below
        held.append(requests[0].num_kv_tokens)

    llm.engine.runner.logits_hook = record
    params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=0, ignore_eos=True)
    started = time.perf_counter()
    out = llm.generate(["def main():\n"], params)[0]
    seconds = time.perf_counter() - started
    nll = [-float(lp[0, t]) for lp, t in zip(chosen, out.token_ids, strict=True)]
    step = 1000
    windows = [math.exp(sum(nll[i : i + step]) / step) for i in range(0, len(nll) - step + 1, step)]
    return {"policy": "streaming", "budget": BUDGET, "tokens": len(out.token_ids),
            "peak_kv_tokens": out.metrics.peak_kv_tokens, "held_min_after_prompt": min(held[1:]),
            "held_max": max(held), "window_perplexity": windows, "seconds": seconds,
            "tokens_per_second": len(out.token_ids) / seconds,
            "kv_bytes_allocated": llm.engine.store.bytes_allocated,
            "blocks_used_at_end": llm.engine.kv_stats()["blocks_used"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=TOKENS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    llm = LLM(kv_memory="8MiB")
    ids: list[int] = []
    for text in read_sources(python_sources()):
        ids += llm.engine.tokenizer.encode(text)
        if len(ids) >= args.tokens:
            break
    ids = ids[: args.tokens]
    forced = [teacher_forced(p, ids) for p in ("streaming", "sliding")]
    for r in forced:
        print(f"{r['policy']}: peak {r['peak_kv_tokens']} tokens, window perplexity "
              f"{[round(x, 1) for x in r['window_perplexity']]}", flush=True)  # fmt: skip
    gen = generation(args.tokens - 480)
    print(f"generation: {gen['tokens']} tokens, peak {gen['peak_kv_tokens']}, "
          f"{gen['tokens_per_second']:.0f} tokens/s, window perplexity "
          f"{[round(x, 2) for x in gen['window_perplexity']]}", flush=True)  # fmt: skip
    (args.out / "long_streaming.json").write_text(
        json.dumps({"teacher_forced": forced, "generation": gen}, indent=1) + "\n"
    )
    plot(forced, gen, args.out / "long_streaming.png")


def plot(forced: list[dict], gen: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in forced:
        xs = [(i + 1) * WINDOW for i in range(len(r["window_perplexity"]))]
        axes[0].plot(xs, r["window_perplexity"], marker="o", ms=3,
                     label=f"{r['policy']} (peak {r['peak_kv_tokens']} KV tokens)")  # fmt: skip
    axes[0].axvline(2048, color="grey", ls="--", lw=1)
    axes[0].text(2048, axes[0].get_ylim()[1], " model context", va="top", fontsize=8)
    axes[0].set_xlabel("tokens read (teacher-forced Python)")
    axes[0].set_ylabel(f"perplexity of each {WINDOW}-token window")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    xs = [(i + 1) * 1000 for i in range(len(gen["window_perplexity"]))]
    axes[1].plot(xs, gen["window_perplexity"], marker="o", ms=3, color="tab:green")
    axes[1].set_xlabel("tokens generated (streaming, temperature 1)")
    axes[1].set_ylabel("perplexity of its own tokens, per 1,000")
    axes[1].set_title(f"KV held: at most {gen['held_max']} tokens (budget {gen['budget']})",
                      fontsize=9)  # fmt: skip
    axes[1].grid(alpha=0.3)
    fig.suptitle(f"kvforge-mini, KV budget {BUDGET} tokens, {forced[0]['tokens']:,} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
