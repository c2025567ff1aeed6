"""A long run under a fixed KV budget: `streaming` (attention sinks + recent tokens) against
`sliding` (recent tokens only), far past the model's context: SmolLM2-135M-Instruct (8,192
tokens) by default, `--model kvforge-mini` (2,048) for the built-in one.

    python benchmarks/long_streaming.py --out docs/eval/smollm2   # ~45 min on a 2-core CPU
    python benchmarks/long_streaming.py --out /tmp/s --quick   # ~3 min: 4K tokens, no generation

`streaming` runs twice: as shipped (the sinks move along with the window, as if
positions were numbered inside the cache) and with the sinks at their original
positions (`Streaming(budget, positions="original")`), which shows why they move.

1. Teacher-forced: 20,480 tokens (SmolLM2: English prose, `eval.corpus`; kvforge-mini:
   the standard library's Python, what it was trained on) go through the cache 64 tokens a
   pass; the perplexity of each 1,024-token window is plotted, with the KV tokens held.
   A full cache could not go past the model's context, and positions run 2.5x (SmolLM2)
   or 10x (kvforge-mini) past what it was trained on.
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
from kvforge.eval.corpus import prose_text
from kvforge.kvcache.policy import H2O, KVPolicy, Sliding, Streaming
from kvforge.training.data import python_sources, read_sources

BUDGET = 512
TOKENS = 20_480
WINDOW = 1024
MODEL: str | None = None  # --model: None is the default model (SmolLM2)
KV_MEMORY = "256MiB"
# fp32 weights: a GGUF file's quantized weights would be dequantized again for every
# 64-token pass (kept quantized, they are read in place only by passes of <= 16 rows)
WEIGHTS = "fp32"


def settings(budget: int) -> dict[str, KVPolicy]:
    return {
        "streaming": Streaming(budget),
        "streaming, sinks at original positions": Streaming(budget, positions="original"),
        "sliding": Sliding(budget),
    }


def teacher_forced(name: str, policy: KVPolicy, ids: list[int]) -> dict:
    llm = LLM(model=MODEL, kv_policy=policy, kv_memory=KV_MEMORY, weights_dtype=WEIGHTS)
    started = time.perf_counter()
    logprobs = llm.engine.score(ids, chunk_size=64)
    seconds = time.perf_counter() - started
    windows = [
        math.exp(-float(logprobs[i : i + WINDOW].mean()))
        for i in range(0, len(logprobs) - WINDOW + 1, WINDOW)
    ]
    return {"setting": name, "budget": policy.budget, "tokens": len(ids),
            "peak_kv_tokens": llm.engine.last_score_peak_kv_tokens,
            "window_perplexity": windows, "seconds": seconds}  # fmt: skip


def generation(name: str, policy: KVPolicy, tokens: int, prompt: str) -> dict:
    llm = LLM(model=MODEL, kv_policy=policy, kv_memory=KV_MEMORY, weights_dtype=WEIGHTS)
    chosen: list[torch.Tensor] = []
    held: list[int] = []

    def record(requests, logits):
        # the sampled token's log-prob is read after sampling, below
        chosen.append(torch.log_softmax(logits[0].float(), -1))
        held.append(requests[0].num_kv_tokens)

    llm.engine.runner.logits_hook = record
    params = SamplingParams(max_tokens=tokens, temperature=1.0, seed=0, ignore_eos=True)
    started = time.perf_counter()
    out = llm.generate([prompt], params)[0]
    seconds = time.perf_counter() - started
    nll = [-float(lp[t]) for lp, t in zip(chosen, out.token_ids, strict=True)]
    step = 1000
    starts = range(0, len(nll) - step + 1, step)
    windows = [math.exp(sum(nll[i : i + step]) / step) for i in starts]
    # a perplexity near 1 can mean a loop: the share of distinct 8-grams tells it apart
    distinct = [distinct_share(out.token_ids[i : i + step], 8) for i in starts]
    return {"setting": name, "budget": policy.budget, "tokens": len(out.token_ids),
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
        model=MODEL, kv_policy=H2O(len(ids) + 64), kv_memory=KV_MEMORY, weights_dtype=WEIGHTS
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
    global MODEL
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", help="any --model value (default: the default model)")
    parser.add_argument("--tokens", type=int, default=TOKENS, help="teacher-forced tokens")
    parser.add_argument("--budget", type=int, default=BUDGET, help="KV tokens held (512)")
    parser.add_argument("--generate", type=int, help="tokens generated (default tokens - 480; "
                        "0: skip)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="4,096 tokens, no generation")
    parser.add_argument("--plot-only", action="store_true", help="redraw from the JSON")
    args = parser.parse_args()
    if args.plot_only:
        replot(args.out)
        return
    if args.quick:
        args.tokens, args.generate = 4096, 0
    MODEL = args.model
    args.out.mkdir(parents=True, exist_ok=True)
    llm = LLM(model=MODEL, kv_memory="8MiB")
    encode = llm.engine.tokenizer.encode
    if llm.engine.store.spec.max_position_embeddings > 2048:  # a real model: English prose
        ids, prompt = encode(prose_text()), "Once upon a time"
    else:  # kvforge-mini knows only Python
        ids, prompt = [], "def main():\n"
        for text in read_sources(python_sources()):
            ids += encode(text)
            if len(ids) >= args.tokens:
                break
    ids = ids[: args.tokens]
    sink = sink_share(ids[100:1124])
    sink["model"] = llm.model_name
    print(
        f"first token's share of attention over {sink['tokens']} tokens: "
        f"{sink['first_token_share']:.2%} (uniform causal: {sink['uniform_causal_share']:.2%})"
    )
    policies = settings(args.budget)
    forced = [teacher_forced(name, policy, ids) for name, policy in policies.items()]
    for r in forced:
        print(f"{r['setting']}: peak {r['peak_kv_tokens']} tokens, window perplexity "
              f"{[round(x, 1) for x in r['window_perplexity']]}", flush=True)  # fmt: skip
    generate = args.tokens - 480 if args.generate is None else args.generate
    gen = [generation(name, policies[name], generate, prompt)
           for name in ("streaming", "streaming, sinks at original positions")
           if generate > 0]  # fmt: skip
    for g in gen:
        print(f"generation, {g['setting']}: {g['tokens']} tokens, peak {g['peak_kv_tokens']}, "
              f"{g['tokens_per_second']:.0f} tokens/s, window perplexity "
              f"{[round(x, 2) for x in g['window_perplexity']]}, distinct 8-grams "
              f"{[round(x, 2) for x in g['window_distinct_8grams']]}", flush=True)  # fmt: skip
    context = llm.engine.store.spec.max_position_embeddings
    (args.out / "long_streaming.json").write_text(
        json.dumps(
            {
                "model": llm.model_name,
                "context": context,
                "teacher_forced": forced,
                "generation": gen,
                "sink": sink,
            },
            indent=1,
        )
        + "\n"
    )
    plot(forced, gen, args.out / "long_streaming.png", llm.model_name, context)


def replot(out: Path) -> None:
    """Draw the plot again from a run's JSON."""
    data = json.loads((out / "long_streaming.json").read_text())
    plot(data["teacher_forced"], data["generation"], out / "long_streaming.png",
         data.get("model", "kvforge-mini"), data.get("context", 2048))  # fmt: skip


def plot(forced: list[dict], gen: list[dict], path: Path, model: str, context: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if gen else 1, figsize=(12 if gen else 6.5, 4.2))
    axes = list(axes) if gen else [axes]
    for r in forced:
        xs = [(i + 1) * WINDOW for i in range(len(r["window_perplexity"]))]
        wide = r["setting"] == "streaming"  # drawn under sliding, which it nearly equals
        axes[0].plot(xs, r["window_perplexity"], marker="o", ms=3, lw=4 if wide else 1.5,
                     alpha=0.5 if wide else 1.0,
                     label=f"{r['setting']} (peak {r['peak_kv_tokens']} KV tokens)")  # fmt: skip
    axes[0].axvline(context, color="grey", ls="--", lw=1)
    axes[0].text(context, axes[0].get_ylim()[0], " model context", va="bottom", fontsize=8)
    axes[0].set_xlabel("tokens read (teacher-forced)")
    axes[0].set_ylabel(f"perplexity of each {WINDOW}-token window")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    for g in gen:
        xs = [(i + 1) * 1000 for i in range(len(g["window_perplexity"]))]
        axes[1].plot(xs, g["window_perplexity"], marker="o", ms=3,
                     label=f"{g['setting']} (KV held ≤ {g['held_max']} tokens)")  # fmt: skip
    if not gen:
        fig.suptitle(f"{model}, KV budget {forced[0]['budget']} tokens, "
                     f"{forced[0]['tokens']:,} tokens")  # fmt: skip
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    axes[1].axvline(context, color="grey", ls="--", lw=1)
    axes[1].set_xlabel("tokens generated (temperature 1)")
    axes[1].set_ylabel("perplexity of its own tokens, per 1,000")
    axes[1].set_title("near 1: the model loops on a copied span (it does so within its "
                      "context too)", fontsize=8)  # fmt: skip
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=8)
    axes[1].grid(alpha=0.3)
    fig.suptitle(f"{model}, KV budget {forced[0]['budget']} tokens, {forced[0]['tokens']:,} tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
