"""Latency: time to first token against prompt length, time per output token against context.

Each engine answers one request at a time. TTFT is the time to produce the first
token (prefill + one sample). Per-token times are taken at every decode step —
kvforge from its engine steps, transformers from a logits processor called once
per generated token — and summarised as p50 and p99. On CUDA every clock read
waits for the device first (`context.now`).
"""

import itertools
import statistics
import time

import torch

from kvforge.bench.context import BenchContext, model_label, now
from kvforge.bench.engines import gguf_of, hf_model, llamacpp_peer
from kvforge.bench.llamacpp_workloads import Shapes, bench_side_by_side
from kvforge.bench.machine import describe_machine
from kvforge.bench.report import Plot, Report
from kvforge.bench.workloads import mixed_workload
from kvforge.models.catalog import model_config

FULL = {
    "prompt_lengths": [32, 128, 512, 1024],
    "contexts": [64, 256, 1024],
    "repeats": 5,
    "decode_tokens": 32,
}
QUICK = {"prompt_lengths": [8, 32], "contexts": [16, 48], "repeats": 2, "decode_tokens": 6}


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class _KVForge:
    name = "kvforge"

    def __init__(self, model_path, device: str, weights_dtype: str, ranks: int = 1) -> None:
        from kvforge import LLM

        self.llm = LLM(model=str(model_path), device=device, kv_memory="256MiB",
                       weights_dtype=weights_dtype, tensor_parallel_size=ranks)  # fmt: skip
        self.device = device

    def token_times(self, prompt: list[int], n: int) -> list[float]:
        """Seconds to the first token, then between consecutive tokens."""
        from kvforge import SamplingParams

        engine = self.llm.engine
        engine.add_request(prompt, SamplingParams(max_tokens=n, ignore_eos=True))
        times, start = [], now(self.device)
        while engine.has_unfinished:
            if any(e.token_id is not None for e in engine.step()):
                stamp = now(self.device)
                times.append(stamp - start)
                start = stamp
        return times


class _Transformers:
    name = "transformers generate"

    def __init__(self, model_path, device: str) -> None:
        self.model = hf_model(model_path, device)
        self.device = device

    def token_times(self, prompt: list[int], n: int) -> list[float]:
        stamps: list[float] = []

        def stamp(input_ids, scores):  # called once per generated token, before sampling
            stamps.append(now(self.device))
            return scores

        start = now(self.device)
        with torch.inference_mode():
            self.model.generate(
                torch.tensor([prompt], device=self.device),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                logits_processor=[stamp],
            )
        marks = [start, *stamps]
        return [b - a for a, b in itertools.pairwise(marks)]


class _LlamaCpp:
    """llama.cpp, timed token by token through the engine's per-token callback."""

    name = "llama.cpp"

    def __init__(self, peer) -> None:
        self.peer = peer

    def token_times(self, prompt: list[int], n: int) -> list[float]:
        stamps: list[float] = []
        start = time.perf_counter()
        self.peer.engine.generate_greedy(
            prompt, n, on_token=lambda: stamps.append(time.perf_counter())
        )
        marks = [start, *stamps]
        return [b - a for a, b in itertools.pairwise(marks)]


def run(ctx: BenchContext) -> Report:
    sizes = QUICK if ctx.quick else FULL
    notes = ["p99 of a few samples is close to their maximum"]
    model_path = ctx.real_model(notes)
    vocab_size = model_config(model_path)["vocab_size"]
    kvforge = _KVForge(model_path, ctx.device, ctx.weights_dtype, ctx.tensor_parallel_size)
    engines = [kvforge, _Transformers(model_path, ctx.device)]
    peer = llamacpp_peer(model_path)
    if isinstance(peer, str):
        notes.append(peer)
    else:
        engines.append(_LlamaCpp(peer))
    for engine in engines:
        engine.token_times([5, 6, 7], 2)  # warm-up
    rows, ttft_series, tpot_series = [], {}, {}
    work = [(e, "prefill", length) for e in engines for length in sizes["prompt_lengths"]]
    work += [(e, "decode", length) for e in engines for length in sizes["contexts"]]
    for engine, phase, length in ctx.progress(work, "latency"):
        samples = []
        for repeat in range(sizes["repeats"]):
            prompt = mixed_workload(1, vocab_size, (length, length), (1, 1), seed=repeat)[0]
            if phase == "prefill":
                samples.append(engine.token_times(prompt.prompt_token_ids, 1)[0])
            else:
                samples += engine.token_times(prompt.prompt_token_ids, sizes["decode_tokens"])[1:]
        row = {
            "engine": engine.name,
            "phase": phase,
            "prompt_tokens" if phase == "prefill" else "context_tokens": length,
            "p50_ms": 1000 * statistics.median(samples),
            "p99_ms": 1000 * _percentile(samples, 0.99),
            "samples": len(samples),
        }
        rows.append(row)
        series = ttft_series if phase == "prefill" else tpot_series
        xs, ys = series.setdefault(engine.name, ([], []))
        xs.append(length)
        ys.append(row["p50_ms"])
    ratios = {}
    for phase, key in (("prefill", "ttft"), ("decode", "tpot")):
        ours = [r for r in rows if r["phase"] == phase and r["engine"] == "kvforge"]
        for other in engines[1:]:
            theirs = [r for r in rows if r["phase"] == phase and r["engine"] == other.name]
            label = "transformers" if other.name.startswith("transformers") else "llamacpp"
            ratios[f"{label}_over_kvforge_{key}_p50"] = {
                str(o.get("prompt_tokens", o.get("context_tokens"))): t["p50_ms"] / o["p50_ms"]
                for o, t in zip(ours, theirs, strict=True)
            }
    versus = bench_side_by_side(kvforge.llm, gguf_of(model_path), Shapes.for_run(ctx.quick),
                                torch.get_num_threads(), notes,
                                None if isinstance(peer, str) else peer.engine)  # fmt: skip
    return Report(
        scenario="latency",
        machine=describe_machine(ctx.device),
        settings={
            "model": model_label(model_path),
            "weights_dtype": ctx.weights_dtype,
            "compute_dtype": str(kvforge.llm.engine.runner.model.model.norm.weight.dtype),
            **sizes,
        },
        results=rows,
        ratios=ratios,
        versus=versus,
        notes=notes,
        plots=[
            Plot(
                "latency_ttft.png",
                "Time to first token (p50)",
                "prompt tokens",
                "ms",
                ttft_series,
                logx=True,
                logy=True,
            ),
            Plot(
                "latency_tpot.png",
                "Time per output token (p50)",
                "context tokens",
                "ms",
                tpot_series,
                logx=True,
            ),
        ],
    )
