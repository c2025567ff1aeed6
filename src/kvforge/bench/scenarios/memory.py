"""Where the KV bytes go on the mixed workload: allocated, held in blocks, holding tokens.

Waste is paged rounding: the empty slots of each request's last block, as a
share of the bytes its blocks hold, averaged over every engine step. Also
checks that the store's bytes per token equal the planner's, and reports the
process's peak resident memory (and on CUDA its peak of allocated device memory).
"""

import resource

import torch

from kvforge.bench.context import BenchContext, model_label
from kvforge.bench.machine import describe_machine
from kvforge.bench.report import Plot, Report
from kvforge.bench.workloads import mixed_workload
from kvforge.models.catalog import model_config
from kvforge.planner import bytes_per_token

FULL = {
    "concurrency": 16,
    "requests": 48,
    "block_sizes": [1, 8, 16, 32],
    "prompt": (32, 256),
    "output": (16, 64),
}
QUICK = {
    "concurrency": 4,
    "requests": 8,
    "block_sizes": [4, 16],
    "prompt": (8, 24),
    "output": (4, 8),
}


def run(ctx: BenchContext) -> Report:
    from kvforge import LLM, SamplingParams

    sizes = QUICK if ctx.quick else FULL
    model_path = ctx.checkpoint()
    vocab_size = model_config(model_path)["vocab_size"]
    requests = mixed_workload(sizes["requests"], vocab_size, sizes["prompt"], sizes["output"])
    rows, plots = [], []
    for block_size in ctx.progress(sizes["block_sizes"], "memory"):
        llm = LLM(
            model=str(model_path),
            device=ctx.device,
            block_size=block_size,
            kv_memory="256MiB",
            max_num_seqs=sizes["concurrency"],
        )
        engine = llm.engine
        for r in requests:
            engine.add_request(
                r.prompt_token_ids, SamplingParams(max_tokens=r.max_tokens, ignore_eos=True)
            )
        per_token = engine.store.bytes_per_token
        used, live = [], []
        while engine.has_unfinished:
            engine.step()
            stats = llm.kv_stats()
            used.append(stats["blocks_used"] * block_size * per_token)
            live.append(stats["tokens_stored"] * per_token)
        engine.pool.check_integrity()
        planner = bytes_per_token(engine.store.spec, engine.store.format, block_size)
        rows.append(
            {
                "block_size": block_size,
                "kv_bytes_allocated": engine.store.bytes_allocated,
                "peak_kv_bytes_in_blocks": max(used),
                "peak_kv_bytes_of_live_tokens": max(live),
                "waste_pct": 100 * (1 - sum(live) / sum(used)),
                "bytes_per_token_store": per_token,
                "bytes_per_token_planner": int(planner),
                "store_equals_planner": per_token == planner,
                "steps": len(used),
            }
        )
        if block_size == 16 or block_size == sizes["block_sizes"][-1]:
            steps = list(range(len(used)))
            plots = [
                Plot(
                    "memory.png",
                    f"KV bytes over the workload (block size {block_size})",
                    "engine step",
                    "bytes",
                    {"held in blocks": (steps, used), "holding live tokens": (steps, live)},
                )
            ]
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    peaks = {"peak_process_rss_bytes": peak_rss}
    if ctx.device == "cuda":  # the KV cache and weights live there, not in the RSS
        peaks["peak_process_cuda_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return Report(
        scenario="memory",
        machine=describe_machine(ctx.device),
        settings={"model": model_label(model_path), **sizes},
        results=rows,
        ratios={
            "waste_pct_by_block_size": {str(r["block_size"]): r["waste_pct"] for r in rows},
            "store_equals_planner": all(r["store_equals_planner"] for r in rows),
            **peaks,
        },
        plots=plots,
    )
