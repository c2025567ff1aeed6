"""Record what the engine outputs under many cache settings, to prove a refactor changed
nothing: greedy tokens, `kv_stats()` and a teacher-forced score, for every KV dtype,
eviction policy, preemption mode and the lower tiers, on SmolLM2 and kvforge-mini.

    python benchmarks/output_fingerprint.py before.json      # on the old code
    python benchmarks/output_fingerprint.py after.json       # on the new code
    python benchmarks/output_fingerprint.py --compare before.json after.json

Weights are pinned to fp32 so the fingerprint does not move with the weight format.
"""

import argparse
import json
import sys
import tempfile

from kvforge import LLM, SamplingParams
from kvforge.chat_template import chat_prompt

QUESTIONS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "List three uses of a paperclip.",
]


def run(**options) -> dict:
    llm = LLM(device="cpu", weights_dtype="fp32", **options)
    prompts = [chat_prompt(llm.tokenizer, [{"role": "user", "content": q}]) for q in QUESTIONS]
    long = prompts[0] * 6  # a longer prompt, so that budgets and small pools bite
    ids = llm.tokenizer.encode(long) if isinstance(long, str) else list(long)
    first = llm.generate([*prompts, long], SamplingParams(max_tokens=40, ignore_eos=True))
    again = llm.generate(prompts[:2], SamplingParams(max_tokens=8, ignore_eos=True))
    score = llm.engine.score(ids[:300], chunk_size=48).sum().item()
    return {"tokens": [r.token_ids for r in first + again], "stats": llm.kv_stats(),
            "score": round(score, 3)}  # fmt: skip


def record(path: str) -> None:
    out = {}
    for model in ["smollm2-135m-instruct", "kvforge-mini"]:
        for kv in ["auto", "fp16", "bf16", "int8", "fp8", "int4", "int2"]:
            out[f"{model}/{kv}"] = run(model=model, kv_dtype=kv, kv_memory="256MiB")
        for kv in ["auto", "int8", "int2"]:
            budget = 192 if kv == "int2" else 128
            for policy in ["streaming", "snapkv", "h2o", "sliding"]:
                out[f"{model}/{kv}/{policy}"] = run(model=model, kv_dtype=kv, kv_memory="256MiB",
                                                    kv_policy=policy, kv_budget=budget)  # fmt: skip
            for mode in ["recompute", "swap"]:
                small = {"num_blocks": 8} if kv == "int2" else {"num_blocks": 40, "block_size": 16}
                out[f"{model}/{kv}/preempt-{mode}"] = run(
                    model=model, kv_dtype=kv, max_num_seqs=4, preemption_mode=mode, **small
                )
            out[f"{model}/{kv}/tiers"] = run(
                model=model, kv_dtype=kv, num_blocks=40, max_num_seqs=4,
                host_cache_memory="2MiB", disk_cache_dir=tempfile.mkdtemp(),
            )  # fmt: skip
            print(model, kv, flush=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=0)


def compare(before: str, after: str) -> int:
    with open(before) as f, open(after) as g:
        a, b = json.load(f), json.load(g)
    differences = [f"{key}: {field}" for key in sorted(set(a) | set(b))
                   for field in ("tokens", "stats", "score")
                   if a.get(key, {}).get(field) != b.get(key, {}).get(field)]  # fmt: skip
    print("\n".join(differences) or f"identical: {len(a)} settings")
    return 1 if differences else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--compare", action="store_true")
    args = parser.parse_args()
    sys.exit(compare(*args.paths) if args.compare else record(args.paths[0]))
