"""Throughput at rising concurrency on a mixed workload, kvforge against its peers.

At concurrency c, c requests (seeded prompt and output lengths) arrive together
and every engine serves all of them; output tokens/s and requests/s are taken
over the whole batch. Engines run one after another for each c, so machine
drift hits them alike; ratios are taken within the same c.
"""

import torch

from kvforge.bench.context import BenchContext, model_label
from kvforge.bench.engines import KVForgeEngine, gguf_of, llamacpp_peer, transformers_engines
from kvforge.bench.llamacpp_workloads import Shapes, batched_side_by_side
from kvforge.bench.machine import describe_machine
from kvforge.bench.report import Plot, Report
from kvforge.bench.workloads import mixed_workload
from kvforge.models.catalog import model_config

FULL = {"concurrency": [1, 2, 4, 8, 16, 32, 64], "prompt": (32, 256), "output": (16, 64)}
QUICK = {"concurrency": [1, 4], "prompt": (8, 24), "output": (4, 8)}
BATCHED = [1, 16, 64]  # llama-batched-bench -npl 1,16,64
QUICK_BATCHED = [1, 4]


def _peers(model_path, device: str, notes: list[str]) -> list:
    engines = transformers_engines(model_path, device)
    peer = llamacpp_peer(model_path)
    if isinstance(peer, str):
        notes.append(peer)
    else:
        engines.append(peer)
    return engines


def run(ctx: BenchContext) -> Report:
    sizes = QUICK if ctx.quick else FULL
    notes: list[str] = []
    model_path = ctx.real_model(notes)
    vocab_size = model_config(model_path)["vocab_size"]
    batched = QUICK_BATCHED if ctx.quick else BATCHED
    kvforge = KVForgeEngine(model_path, max_num_seqs=max(*sizes["concurrency"], *batched),
                            device=ctx.device, weights_dtype=ctx.weights_dtype,
                            tensor_parallel_size=ctx.tensor_parallel_size)  # fmt: skip
    engines = [kvforge, *_peers(model_path, ctx.device, notes)]
    warmup = mixed_workload(2, vocab_size, (4, 8), (2, 2), seed=99)
    for engine in engines:
        engine.generate(warmup)

    rows, outputs = [], {}
    work = [(c, e) for c in sizes["concurrency"] for e in engines]
    for concurrency, engine in ctx.progress(work, "throughput"):
        requests = mixed_workload(
            concurrency, vocab_size, sizes["prompt"], sizes["output"], seed=concurrency
        )
        start = ctx.now()
        tokens = engine.generate(requests)
        seconds = ctx.now() - start
        if [len(t) for t in tokens] != [r.max_tokens for r in requests]:
            raise RuntimeError(f"{engine.name} returned the wrong number of tokens")
        outputs[engine.name, concurrency] = tokens
        output_tokens = sum(r.max_tokens for r in requests)
        rows.append(
            {
                "engine": engine.name,
                "concurrency": concurrency,
                "output_tokens_per_s": output_tokens / seconds,
                "requests_per_s": concurrency / seconds,
                "seconds": seconds,
                "output_tokens": output_tokens,
            }
        )

    ratios: dict = {"kvforge_vs_transformers": {}, "greedy_tokens_equal_to_kvforge": {}}
    for c in sizes["concurrency"]:
        at_c = {r["engine"]: r["output_tokens_per_s"] for r in rows if r["concurrency"] == c}
        best = max(v for k, v in at_c.items() if k.startswith("transformers"))
        ratios["kvforge_vs_transformers"][str(c)] = at_c["kvforge"] / best
        if "llama.cpp" in at_c:
            ratios.setdefault("kvforge_vs_llamacpp", {})[str(c)] = (
                at_c["kvforge"] / at_c["llama.cpp"]
            )
        for engine in engines[1:]:
            same = outputs[engine.name, c] == outputs["kvforge", c]
            ratios["greedy_tokens_equal_to_kvforge"].setdefault(engine.name, []).append(same)
    series = {
        e.name: (
            [r["concurrency"] for r in rows if r["engine"] == e.name],
            [r["output_tokens_per_s"] for r in rows if r["engine"] == e.name],
        )
        for e in engines
    }
    versus = batched_side_by_side(kvforge.llm, gguf_of(model_path), Shapes.for_run(ctx.quick),
                                  batched, torch.get_num_threads(), notes)  # fmt: skip
    return Report(
        scenario="throughput",
        machine=describe_machine(ctx.device),
        settings={
            "model": model_label(model_path),
            "weights_dtype": ctx.weights_dtype,
            "compute_dtype": str(kvforge.llm.engine.runner.model.model.norm.weight.dtype),
            "greedy": True,
            **sizes,
            "batched": batched,
        },
        results=rows,
        ratios=ratios,
        versus=versus,
        notes=notes,
        plots=[
            Plot(
                "throughput.png",
                "Output tokens/s against concurrency",
                "concurrent requests",
                "output tokens/s",
                series,
                logx=True,
            )
        ],
    )
