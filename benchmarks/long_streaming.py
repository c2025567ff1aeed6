"""A long run under a fixed KV budget: `streaming` (attention sinks + recent tokens) against
`sliding` (recent tokens only), on the built-in trained model, far past its context.

    python benchmarks/long_streaming.py --out docs/eval          # ~4 min on a 2-core CPU

`streaming` runs twice: as shipped (the sinks move along with the window, as if
positions were numbered inside the cache) and with the sinks at their original
positions (`Streaming(budget, positions="original")`), which shows why they move.

1. Teacher-forced: 20,480 tokens of Python (the standard library's sources, in a fixed
   order) go through the cache 64 tokens a pass; the perplexity of each 1,024-token
   window is plotted, with the KV tokens held. The model's context is 2,048 tokens: a
   full cache could not go on, and positions run ten times past what it was trained on.
2. Generation: 20,000 sampled tokens (temperature 1, seed 0) after a short prompt; the
   KV tokens held after every step, and the perplexity of each 1,000-token window of
   what it generated (its own log-probabilities) and the share of its 8-grams that are
   distinct (a perplexity near 1 with few distinct 8-grams is a loop, not fluency).
3. How much attention the model gives its first token over a 1,024-token read, against
   a uniform causal reading: whether it has an attention sink for `streaming` to keep.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

from kvforge import LLM, SamplingParams
from kvforge.kvcache.policy import H2O, KVPolicy, Sliding, Streaming
from kvforge.training.data import python_sources, read_sources

BUDGET = 256
TOKENS = 20_480
WINDOW = 1024


def settings() -> dict[str, KVPolicy]:
    return {
        "streaming": Streaming(BUDGET),
        "streaming, sinks at original positions": Streaming(BUDGET, positions="original"),
        "sliding": Sliding(BUDGET),
    }


def teacher_forced(name: str, policy: KVPolicy, ids: list[int]) -> dict:
    llm = LLM(model="kvforge-mini", kv_policy=policy, kv_memory="64MiB")
    started = time.perf_counter()
    logprobs = llm.engine.score(ids, chunk_size=64)
    seconds = time.perf_counter() - started
    windows = [
        math.exp(-float(logprobs[i : i + WINDOW].mean()))
        for i in range(0, len(logprobs) - WINDOW + 1, WINDOW)
    ]
    return {"setting": name, "budget": BUDGET, "tokens": len(ids),
            "peak_kv_tokens": llm.engine.last_score_peak_kv_tokens,
            "window_perplexity": windows, "seconds": seconds}  # fmt: skip


def generation(name: str, policy: KVPolicy, tokens: int) -> dict:
    llm = LLM(model="kvforge-mini", kv_policy=policy, kv_memory="64MiB")
    chosen: list[torch.Tensor] = []
    held: list[int] = []

    def record(requests, logits):
        # the sampled token's log-prob is read after sampling, below
        chosen.append(torch.log_softmax(logits[0].float(), -1))
        held.append(requests[0].num_kv_tokens)

    llm.engine.runner.logits_hook = record
    params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=0, ignore_eos=True)
    started = time.perf_counter()
    out = llm.generate(["def main():\n"], params)[0]
    seconds = time.perf_counter() - started
    nll = [-float(lp[t]) for lp, t in zip(chosen, out.token_ids, strict=True)]
    step = 1000
    starts = range(0, len(nll) - step + 1, step)
    windows = [math.exp(sum(nll[i : i + step]) / step) for i in starts]
    # a perplexity near 1 can mean a loop: the share of distinct 8-grams tells it apart
    distinct = [distinct_share(out.token_ids[i : i + step], 8) for i in starts]
    return {"setting": name, "budget": BUDGET, "tokens": len(out.token_ids),
            "peak_kv_tokens": out.metrics.peak_kv_tokens, "held_min_after_prompt": min(held[1:]),
            "held_max": max(held), "window_perplexity": windows,
            "window_distinct_8grams": distinct, "seconds": seconds,
            "tokens_per_second": len(out.token_ids) / seconds,
            "kv_bytes_allocated": llm.engine.store.bytes_allocated,
            "blocks_used_at_end": llm.engine.kv_stats()["blocks_used"]}  # fmt: skip


def sink_share(ids: list[int]) -> dict:
    """How much attention the first token gets (summed over every query, head and layer)
    over one read of `ids`, against what a uniform causal reading would give it: a model
    with an attention sink gives it far more."""
    llm = LLM(
        model="kvforge-mini", kv_policy=H2O(len(ids) + 64), kv_memory="64MiB"
    )  # gathers, keeps all
    scores: list[torch.Tensor] = []
    llm.engine.runner.logits_hook = lambda requests, logits: scores.append(
        requests[0].policy_state.scores
    )
    llm.generate([ids], SamplingParams(max_tokens=2))  # the prompt's scores, then one more
    received = scores[-1]
    uniform = sum(1 / (i + 1) for i in range(len(ids))) / len(ids)
    return {"tokens": len(ids), "first_token_share": float(received[0] / received.sum()),
            "uniform_causal_share": uniform}  # fmt: skip


def distinct_share(tokens: list[int], n: int) -> float:
    """Distinct n-grams over all n-grams: 1 for text that never repeats itself, near 0 for
    a loop."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / max(1, len(grams))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=TOKENS)
    parser.add_argument("--plot-only", action="store_true", help="redraw from the JSON")
    args = parser.parse_args()
    if args.plot_only:
        replot(args.out)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    llm = LLM(model="kvforge-mini", kv_memory="8MiB")
    ids: list[int] = []
    for text in read_sources(python_sources()):
        ids += llm.engine.tokenizer.encode(text)
        if len(ids) >= args.tokens:
            break
    ids = ids[: args.tokens]
    sink = sink_share(ids[100:1124])
    print(
        f"first token's share of attention over {sink['tokens']} tokens: "
        f"{sink['first_token_share']:.2%} (uniform causal: {sink['uniform_causal_share']:.2%})"
    )
    forced = [teacher_forced(name, policy, ids) for name, policy in settings().items()]
    for r in forced:
        print(f"{r['setting']}: peak {r['peak_kv_tokens']} tokens, window perplexity "
              f"{[round(x, 1) for x in r['window_perplexity']]}", flush=True)  # fmt: skip
    gen = [generation(name, settings()[name], args.tokens - 480)
           for name in ("streaming", "streaming, sinks at original positions")]  # fmt: skip
    for g in gen:
        print(f"generation, {g['setting']}: {g['tokens']} tokens, peak {g['peak_kv_tokens']}, "
              f"{g['tokens_per_second']:.0f} tokens/s, window perplexity "
              f"{[round(x, 2) for x in g['window_perplexity']]}, distinct 8-grams "
              f"{[round(x, 2) for x in g['window_distinct_8grams']]}", flush=True)  # fmt: skip
    (args.out / "long_streaming.json").write_text(
        json.dumps({"teacher_forced": forced, "generation": gen, "sink": sink}, indent=1) + "\n"
    )
    plot(forced, gen, args.out / "long_streaming.png")


def replot(out: Path) -> None:
    """Draw the plot again from a run's JSON."""
    data = json.loads((out / "long_streaming.json").read_text())
    plot(data["teacher_forced"], data["generation"], out / "long_streaming.png")


def plot(forced: list[dict], gen: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for r in forced:
        xs = [(i + 1) * WINDOW for i in range(len(r["window_perplexity"]))]
        wide = r["setting"] == "streaming"  # drawn under sliding, which it nearly equals
        axes[0].plot(xs, r["window_perplexity"], marker="o", ms=3, lw=4 if wide else 1.5,
                     alpha=0.5 if wide else 1.0,
                     label=f"{r['setting']} (peak {r['peak_kv_tokens']} KV tokens)")  # fmt: skip
    axes[0].axvline(2048, color="grey", ls="--", lw=1)
    axes[0].text(2048, axes[0].get_ylim()[0], " model context", va="bottom", fontsize=8)
    axes[0].set_xlabel("tokens read (teacher-forced Python)")
    axes[0].set_ylabel(f"perplexity of each {WINDOW}-token window")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    for g in gen:
        xs = [(i + 1) * 1000 for i in range(len(g["window_perplexity"]))]
        axes[1].plot(xs, g["window_perplexity"], marker="o", ms=3,
                     label=f"{g['setting']} (KV held ≤ {g['held_max']} tokens)")  # fmt: skip
    axes[1].axvline(2048, color="grey", ls="--", lw=1)
    axes[1].set_xlabel("tokens generated (temperature 1)")
    axes[1].set_ylabel("perplexity of its own tokens, per 1,000")
    axes[1].set_title("near 1: the model loops on a copied span (it does so within its "
                      "context too)", fontsize=8)  # fmt: skip
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=8)
    axes[1].grid(alpha=0.3)
    fig.suptitle(f"kvforge-mini, KV budget {BUDGET} tokens, {forced[0]['tokens']:,} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
