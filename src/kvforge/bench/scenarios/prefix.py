"""Prefix caching: TTFT and throughput with the cache off, on, and from disk after a restart.

Two workloads, seeded:
- a shared system prompt (2,048 tokens) with a short distinct suffix (32 tokens) per
  request: the case a chat service or an agent sees on every call;
- a multi-turn chat: each turn's prompt is the whole conversation so far (the
  previous prompt, the reply, and a new 64-token user message).

TTFT is the engine's own (arrival to first token) with requests run one at a
time, so it is the prefill each setting needs. "on" is measured after one
request has filled the cache; "disk after restart" is a new engine over the disk
directory a previous one wrote (nothing on the device). Throughput runs all
shared-prefix requests together. Greedy, EOS ignored, outputs compared.
"""

import random
import statistics
import tempfile

from kvforge.bench.context import BenchContext, model_label
from kvforge.bench.machine import describe_machine
from kvforge.bench.report import Plot, Report
from kvforge.bench.workloads import SMALL_LLAMA, TINY_LLAMA
from kvforge.models.catalog import model_config

FULL = {"prefix": 2048, "suffix": 32, "requests": 8, "output": 8, "turns": 6, "turn": 64}
QUICK = {"prefix": 96, "suffix": 8, "requests": 3, "output": 4, "turns": 3, "turn": 16}
PREFIX_LLAMA = {**SMALL_LLAMA, "max_position_embeddings": 4096}  # room for 2K + the rest


def run(ctx: BenchContext) -> Report:
    sizes = QUICK if ctx.quick else FULL
    config = {**TINY_LLAMA, "max_position_embeddings": 1024} if ctx.quick else PREFIX_LLAMA
    model_path = ctx.checkpoint(config)
    vocab = model_config(model_path)["vocab_size"]
    rng = random.Random(0)
    system = [rng.randrange(3, vocab) for _ in range(sizes["prefix"])]
    prompts = [
        system + [rng.randrange(3, vocab) for _ in range(sizes["suffix"])]
        for _ in range(sizes["requests"])
    ]
    turns = [[rng.randrange(3, vocab) for _ in range(sizes["turn"])] for _ in range(sizes["turns"])]
    disk = tempfile.mkdtemp(prefix="kvforge-prefix-")
    settings = {"off": {"enable_prefix_caching": False}, "on": {}, "disk": {"disk_cache_dir": disk}}

    rows, outputs, series = [], {}, {}
    for name, options in ctx.progress(list(settings.items()), "prefix"):
        llm = _engine(model_path, ctx, options)
        warm = system + [rng.randrange(3, vocab) for _ in range(sizes["suffix"])]
        _generate(llm, [warm], sizes["output"])  # fills the cache ("on"), the disk ("disk")
        if name == "disk":  # a restart: the device cache is empty
            llm = _restart(llm, model_path, ctx, options)
        ttfts, cached, tokens = [], [], []
        for prompt in prompts:
            out = _generate(llm, [prompt], sizes["output"])[0]
            ttfts.append(out.metrics.ttft_s)
            cached.append(out.metrics.cached_tokens)
            tokens.append(out.token_ids)
            if name == "disk":  # every request starts from the disk, as the first one did
                llm = _restart(llm, model_path, ctx, options)
        llm.close()
        outputs[name] = tokens
        series[name] = (list(range(1, len(ttfts) + 1)), [1000 * t for t in ttfts])
        rows.append(_row("shared prefix", name, ttfts, cached, prompts))
        if name != "disk":
            rows[-1]["requests_per_s"] = _throughput(model_path, ctx, options, system, prompts,
                                                     sizes["output"])  # fmt: skip
            rows.append(_chat(model_path, ctx, options, system, turns, sizes["output"], name))

    by = {(r["workload"], r["setting"]): r for r in rows}
    off, on = by["shared prefix", "off"], by["shared prefix", "on"]
    ratios = {
        "ttft_off_over_on_shared_prefix": off["ttft_p50_ms"] / on["ttft_p50_ms"],
        "ttft_off_over_disk_after_restart": off["ttft_p50_ms"]
        / by["shared prefix", "disk after restart"]["ttft_p50_ms"],
        "throughput_on_over_off_shared_prefix": on["requests_per_s"] / off["requests_per_s"],
        "ttft_off_over_on_multi_turn": by["multi-turn", "off"]["ttft_p50_ms"]
        / by["multi-turn", "on"]["ttft_p50_ms"],
        "hit_rate_shared_prefix_on": on["hit_rate"],
        "hit_rate_multi_turn_on": by["multi-turn", "on"]["hit_rate"],
        "same_tokens_on_and_off": outputs["on"] == outputs["off"] == outputs["disk"],
    }
    return Report(
        scenario="prefix",
        machine=describe_machine(ctx.device),
        settings={"model": model_label(model_path), "dtype": "float32", "greedy": True, **sizes},
        results=rows,
        ratios=ratios,
        notes=["TTFT of requests run one at a time (the prefill each setting needs)"],
        plots=[
            Plot(
                "prefix_ttft.png",
                f"TTFT, {sizes['prefix']}-token shared prefix + {sizes['suffix']}-token suffix",
                "request",
                "TTFT (ms)",
                series,
                logy=True,
            )
        ],
    )


def _engine(model_path, ctx: BenchContext, options: dict):
    from kvforge import LLM

    return LLM(model=str(model_path), device=ctx.device, kv_memory="1GiB",
               tensor_parallel_size=ctx.tensor_parallel_size, **options)  # fmt: skip


def _generate(llm, prompts: list[list[int]], max_tokens: int):
    from kvforge import SamplingParams

    return llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def _row(workload: str, setting: str, ttfts, cached, prompts) -> dict:
    ordered = sorted(ttfts)
    return {
        "workload": workload,
        "setting": {"disk": "disk after restart"}.get(setting, setting),
        "ttft_p50_ms": 1000 * statistics.median(ttfts),
        "ttft_p99_ms": 1000 * ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "hit_rate": sum(cached) / sum(len(p) for p in prompts),
        "cached_tokens_mean": statistics.mean(cached),
        "requests": len(ttfts),
    }


def _restart(llm, model_path, ctx, options):
    """A new engine in place of `llm` (closed first: one tensor-parallel group at a time)."""
    llm.close()
    return _engine(model_path, ctx, options)


def _throughput(model_path, ctx, options, system, prompts, max_tokens) -> float:
    """Requests/s with every shared-prefix request submitted together (cache warmed)."""
    with _engine(model_path, ctx, options) as llm:
        _generate(llm, [system + prompts[0][len(system) :]], max_tokens)
        start = ctx.now()
        _generate(llm, prompts, max_tokens)
        return len(prompts) / (ctx.now() - start)


def _chat(model_path, ctx, options, system, turns, max_tokens, setting) -> dict:
    """A conversation: each turn sends everything so far plus a new user message."""
    with _engine(model_path, ctx, options) as llm:
        return _converse(llm, system, turns, max_tokens, setting)


def _converse(llm, system, turns, max_tokens, setting) -> dict:
    history, ttfts, cached, prompts = list(system), [], [], []
    for message in turns:
        prompt = history + message
        out = _generate(llm, [prompt], max_tokens)[0]
        ttfts.append(out.metrics.ttft_s)
        cached.append(out.metrics.cached_tokens)
        prompts.append(prompt)
        history = prompt + out.token_ids
    return _row("multi-turn", setting, ttfts, cached, prompts)
