"""Quantized KV cache: what each codec saves in memory and costs in speed and quality.

For every KV format on the same model and workload: bytes per token (store,
equal to the planner), tokens and requests that fit in a fixed KV budget,
decode step time at a short and a long context against the fp16 cache, and
quality against the fp32 cache (exact for this float32 model): greedy token
agreement over a fixed prompt set, and the mean KL divergence of next-token
distributions over the steps where both runs have the same history so far.

Bytes, capacity and speed are measured on the sized random-init benchmark model;
quality on a trained one (--model, else the built-in kvforge-mini), whose attention
means something. `kvforge eval` measures quality in more depth (perplexity, passkey).
"""

from kvforge.bench.context import BenchContext, model_label
from kvforge.bench.machine import describe_machine
from kvforge.bench.report import Plot, Report
from kvforge.bench.scenarios.roofline import decode_step_s
from kvforge.eval.quality import agreement, greedy_with_logprobs
from kvforge.eval.tasks import agreement_prompts
from kvforge.models.builtin import MINI_MODEL_DIR
from kvforge.models.catalog import model_config
from kvforge.planner import bytes_per_request
from kvforge.units import parse_bytes

FORMATS = ["fp32", "fp16", "bf16", "int8", "fp8", "int4", "int2"]
ROTATED = ["int8", "int4", "int2"]  # also run with kv_rotation, labelled "int4+rot"
FULL = {"budget": "256MiB", "context": 1024, "short": 128, "long": 1536, "batch": 8,
        "steps": 8, "prompts": 8, "prompt_tokens": 256, "new_tokens": 32}  # fmt: skip
QUICK = {"budget": "4MiB", "context": 128, "short": 16, "long": 96, "batch": 2,
         "steps": 3, "prompts": 2, "prompt_tokens": 24, "new_tokens": 6}  # fmt: skip


def run(ctx: BenchContext) -> Report:
    from kvforge import LLM

    sizes = QUICK if ctx.quick else FULL
    model_path = ctx.checkpoint()  # memory and speed: the sized benchmark model
    vocab = model_config(model_path)["vocab_size"]
    # quality: a trained model (--model, else the built-in kvforge-mini) on the fixed
    # prompt set of `kvforge eval agreement`: random weights would only show closeness
    quality_dir = ctx.model_path or MINI_MODEL_DIR
    quality_prompts = None

    rows, runs = [], {}
    # each rotated format timed right after its unrotated one: this VM's speed drifts
    # over a run, and rotated_decode_vs_unrotated_long compares the two
    variants = [(f, r) for f in FORMATS for r in ((False, True) if f in ROTATED else (False,))]
    for fmt, rotation in ctx.progress(variants, "kvquant"):
        label, kv = (f"{fmt}+rot" if rotation else fmt), {"kv_dtype": fmt, "kv_rotation": rotation}
        # int4's and int2's recent windows are blocks a running request borrows from the pool
        budget = LLM(model=str(model_path), device=ctx.device, kv_memory=sizes["budget"],
                     max_num_seqs=sizes["batch"], **kv)  # fmt: skip
        stats = budget.kv_stats()
        store = budget.engine.store
        request_bytes = bytes_per_request(store.spec, store.format, store.block_size,
                                          sizes["context"])  # fmt: skip
        judged = LLM(model=str(quality_dir), device=ctx.device, **kv)
        if quality_prompts is None:
            encode = judged.engine.tokenizer.encode
            quality_prompts = agreement_prompts(encode, sizes["prompts"], sizes["prompt_tokens"])
        runs[label] = greedy_with_logprobs(judged, quality_prompts, sizes["new_tokens"])
        row = {
            "kv_dtype": label,
            "block_size": stats["block_size"],
            "bytes_per_token": stats["bytes_per_token"],
            "tokens_in_budget": stats["blocks_total"] * stats["block_size"],
            # the planner's count, the blocks windows borrow included: budget // bytes a request
            "requests_at_context": parse_bytes(sizes["budget"]) // request_bytes,
        }
        for name in ("short", "long"):
            timing = LLM(model=str(model_path), device=ctx.device, **kv, kv_memory="1GiB",
                         tensor_parallel_size=ctx.tensor_parallel_size,
                         enable_prefix_caching=False, max_num_seqs=sizes["batch"],
                         max_num_batched_tokens=sizes["batch"] * (sizes[name] + 1))  # fmt: skip
            step = decode_step_s(timing, sizes["batch"], sizes[name], sizes["steps"], vocab,
                                  ctx.now)  # fmt: skip
            timing.close()  # its ranks stop before the next engine's start
            row[f"decode_ms_{name}"] = 1000 * step
        rows.append(row)

    by = {r["kv_dtype"]: r for r in rows}
    reference = runs["fp32"]
    for row in rows:
        agree, kl = agreement(runs[row["kv_dtype"]], reference)
        row["token_agreement"], row["mean_kl"] = agree, kl
        row["tokens_vs_fp16"] = row["tokens_in_budget"] / by["fp16"]["tokens_in_budget"]
        for name in ("short", "long"):
            row[f"decode_vs_fp16_{name}"] = (
                by["fp16"][f"decode_ms_{name}"] / row[f"decode_ms_{name}"]
            )
    ratios = {
        "tokens_vs_fp16": {r["kv_dtype"]: r["tokens_vs_fp16"] for r in rows},
        "decode_vs_fp16_long": {r["kv_dtype"]: r["decode_vs_fp16_long"] for r in rows},
        "token_agreement_vs_fp32": {r["kv_dtype"]: r["token_agreement"] for r in rows},
        # point of comparison for rotation's cost: > 1 is faster than the unrotated format
        "rotated_decode_vs_unrotated_long": {
            f: by[f]["decode_ms_long"] / by[f"{f}+rot"]["decode_ms_long"] for f in ROTATED
        },
    }
    return Report(
        scenario="kvquant",
        machine=describe_machine(ctx.device),
        settings={"model": model_label(model_path), "dtype": "float32", **sizes},
        results=rows,
        ratios=ratios,
        notes=[
            f"bytes, capacity and decode speed on the sized random-init model ({model_path.name}); "
            f"quality on the trained model {quality_dir.name} (held-out code and passkey "
            "prompts, the prompt set of `kvforge eval agreement`)",
            "KL: mean over the steps where the run's history still equals the fp32 run's",
            "int4 and int2 use 64-token blocks and keep each running request's newest tokens "
            "(at least 32, whole blocks) in full precision, in blocks the request borrows "
            "from the pool while it runs: tokens_in_budget is every block of the budget",
        ],
        plots=[
            Plot(
                "kvquant.png",
                "Tokens that fit in the KV budget against token agreement",
                "tokens in budget",
                "greedy token agreement with the fp32 cache",
                {r["kv_dtype"]: ([r["tokens_in_budget"]], [r["token_agreement"]]) for r in rows},
            )
        ],
    )
