"""What each eviction policy costs in speed: decode throughput of a batch under a budget,
against the same batch with no policy (side by side, same process, best of 3).

    python benchmarks/policy_overhead.py --out docs/eval/kvforge-mini   # ~3 min, 2-core CPU

h2o gathers the attention every key receives inside the attention read, in every pass;
sliding and streaming only compact (one copy of the budget every block of tokens);
snapkv gathers once, at the end of the prefill.
"""

import argparse
import json
import time
from pathlib import Path

from kvforge import LLM, SamplingParams

SETTINGS = [(None, None), ("sliding", 256), ("streaming", 256), ("h2o", 256), ("snapkv", 256)]


def run(model: str | None, policy, budget, prompts, new_tokens: int) -> dict:
    llm = LLM(model=model, kv_memory="256MiB", kv_policy=policy, kv_budget=budget)
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    best = None
    for _ in range(3):
        started = time.perf_counter()
        outs = llm.generate(prompts, params)
        seconds = time.perf_counter() - started
        decode = max(o.metrics.finish_s for o in outs) - min(o.metrics.first_token_s for o in outs)
        tokens = sum(len(o.token_ids) - 1 for o in outs)
        rate = tokens / decode
        if best is None or rate > best["decode_tokens_per_s"]:
            best = {"decode_tokens_per_s": rate, "seconds": seconds,
                    "peak_kv_tokens": max(o.metrics.peak_kv_tokens for o in outs)}  # fmt: skip
    return {"policy": policy, "budget": budget, **best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for model in (None, "random"):
        probe = LLM(model=model, kv_memory="8MiB")
        name = probe.model_name
        encode = probe.engine.tokenizer.encode
        # each prompt differs from its first block on: no shared prefix
        prompts = [encode(f"item {i}: " + "x = y + 1\n" * 400)[: args.prompt_tokens]
                   for i in range(args.batch)]  # fmt: skip
        rows = [run(model, p, b, prompts, args.new_tokens) for p, b in SETTINGS]
        for r in rows:
            r["vs_no_policy"] = r["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
            rate, ratio = r["decode_tokens_per_s"], r["vs_no_policy"]
            print(f"{name} {r['policy'] or 'none'}: {rate:.0f} tokens/s ({ratio:.2f}x), "
                  f"peak {r['peak_kv_tokens']}", flush=True)  # fmt: skip
        results[name] = rows
    sizes = {"batch": args.batch, "prompt_tokens": args.prompt_tokens,
             "new_tokens": args.new_tokens}  # fmt: skip
    (args.out / "policy_overhead.json").write_text(
        json.dumps({"sizes": sizes, "results": results}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
