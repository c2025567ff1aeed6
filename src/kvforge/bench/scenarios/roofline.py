"""kvforge against the physical limits of this machine.

Measures memory bandwidth (a large copy) and the matmul rate (a large fp32
GEMM) on the benchmark's device, then compares decode steps with their floors:
- batch 1: every weight and every cached K/V byte is read once per token, so a
  step takes at least (weight bytes + KV bytes) / bandwidth, with the weights
  counted as they are stored (fp32, or int4/int8 packed with their scales);
- batched: the matmuls of B tokens take at least their FLOPs / matmul rate.
Ratios are floor / measured: 1.0 would be at the limit. On CUDA the GEMM is
true fp32: torch leaves TF32 off for fp32 matmuls unless asked, and so do we.
"""

import statistics
from collections.abc import Callable

import torch

from kvforge.bench.context import BenchContext, model_label
from kvforge.bench.engines import gguf_of
from kvforge.bench.llamacpp_workloads import Shapes, bench_side_by_side
from kvforge.bench.machine import describe_machine
from kvforge.bench.report import Report
from kvforge.bench.workloads import MEDIUM_LLAMA, TINY_LLAMA, mixed_workload
from kvforge.models.catalog import model_config
from kvforge.models.quantized import QuantizedLinear
from kvforge.roofline import best_time, memory_bandwidth, weights_read

FULL = {
    "model": MEDIUM_LLAMA,
    "context": 256,
    "batch": 32,
    "steps": 16,
    "copy_bytes": 2**29,
    "gemm": 2048,
}
QUICK = {
    "model": TINY_LLAMA,
    "context": 32,
    "batch": 4,
    "steps": 4,
    "copy_bytes": 2**25,
    "gemm": 2048,
}
# on a GPU, --quick or not: a smaller copy would run partly in its cache (50 MiB of L2 on
# an H100), and a smaller GEMM would leave some of its cores idle
CUDA = {"copy_bytes": 2**30, "gemm": 8192}


def matmul_rate(size: int, device: str, now: Callable[[], float]) -> float:
    """FLOP/s of one fp32 GEMM of size x size x size on `device`."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    return 2 * size**3 / best_time(lambda: a @ b, now)


def decode_step_s(
    llm, batch: int, context: int, steps: int, vocab_size: int, now: Callable[[], float]
) -> float:
    """Median seconds of a decode step with `batch` requests at about `context` tokens."""
    from kvforge import SamplingParams

    engine = llm.engine
    for r in mixed_workload(batch, vocab_size, (context, context), (1, 1), seed=7):
        engine.add_request(
            r.prompt_token_ids, SamplingParams(max_tokens=steps + 1, ignore_eos=True)
        )
    engine.step()  # prefill (all prompts fit one step's budget)
    times = []
    while engine.has_unfinished:
        start = now()
        engine.step()
        times.append(now() - start)
    return statistics.median(times)


def run(ctx: BenchContext) -> Report:
    from kvforge import LLM

    sizes = {**(QUICK if ctx.quick else FULL), **(CUDA if ctx.device == "cuda" else {})}
    notes: list[str] = []
    model_path = ctx.real_model(notes, sizes["model"])
    vocab_size = model_config(model_path)["vocab_size"]
    llm = LLM(
        model=str(model_path),
        device=ctx.device,
        weights_dtype=ctx.weights_dtype,
        kv_memory="512MiB",
        max_num_batched_tokens=max(2048, sizes["batch"] * sizes["context"]),
    )
    net = llm.engine.runner.model
    matmul_params, read_bytes = weights_read(net)
    kv_bytes_per_token = llm.engine.store.bytes_per_token
    bandwidth = memory_bandwidth(sizes["copy_bytes"], ctx.device, ctx.now)
    rate = matmul_rate(sizes["gemm"], ctx.device, ctx.now)
    context, batch = sizes["context"], sizes["batch"]
    one = decode_step_s(llm, 1, context, sizes["steps"], vocab_size, ctx.now)
    many = decode_step_s(llm, batch, context, sizes["steps"], vocab_size, ctx.now)
    floor_one = (read_bytes + context * kv_bytes_per_token) / bandwidth
    floor_many = batch * 2 * matmul_params / rate
    rows = [
        {"measure": "memory bandwidth (copy)", "value": bandwidth / 1e9, "unit": "GB/s"},
        {
            "measure": f"matmul rate (fp32 GEMM {sizes['gemm']}^3)",
            "value": rate / 1e9,
            "unit": "GFLOP/s",
        },
        {"measure": "weights read per token", "value": read_bytes, "unit": "B"},
        {
            "measure": f"KV read per token at {context} tokens",
            "value": context * kv_bytes_per_token,
            "unit": "B",
        },
        {"measure": "batch-1 decode step", "value": one * 1000, "unit": "ms"},
        {"measure": "batch-1 bandwidth floor", "value": floor_one * 1000, "unit": "ms"},
        {"measure": f"batch-{batch} decode step", "value": many * 1000, "unit": "ms"},
        {"measure": f"batch-{batch} compute floor", "value": floor_many * 1000, "unit": "ms"},
    ]
    # llama.cpp's batch-1 decode (llama-bench's tg, from an empty cache) against the same
    # floor without KV, next to kvforge's on the same workload
    shapes = Shapes.for_run(ctx.quick)
    versus = bench_side_by_side(llm, gguf_of(model_path), shapes, torch.get_num_threads(), notes)
    weights_floor = read_bytes / bandwidth
    ratios = {}
    # llama.cpp reads the file's own blocks: the same bytes as kvforge's only where kvforge
    # keeps them too (auto on a quantized file); else its floor is not this one
    packed = any(isinstance(m, QuantizedLinear) for m in net.modules())
    same_bytes = model_path.is_file() and packed and ctx.weights_dtype == "auto"
    for engine in ("kvforge", "llama.cpp") if same_bytes else ("kvforge",):
        rate = versus[1][f"{engine} t/s"]
        if rate:
            key = f"{engine}_tg{shapes.decode}_vs_weights_floor".replace(".", "")
            ratios[key] = weights_floor * rate
    return Report(
        scenario="roofline",
        machine=describe_machine(ctx.device),
        versus=versus,
        notes=notes,
        settings={
            "model": model_label(model_path),
            "parameters": net.config.spec.parameter_count(),
            "weights_dtype": ctx.weights_dtype,
            "compute_dtype": str(net.model.norm.weight.dtype),
            "context": context,
            "batch": batch,
            "copy_bytes": sizes["copy_bytes"],
            "gemm": sizes["gemm"],
        },
        results=rows,
        ratios={
            "batch1_decode_vs_bandwidth_floor": floor_one / one,
            "batched_decode_vs_compute_floor": floor_many / many,
            "batch1_tokens_per_s": 1 / one,
            "batched_tokens_per_s": batch / many,
            **ratios,
        },
    )
