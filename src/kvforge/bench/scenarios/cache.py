"""The seeds' triangle: n tokens with the KV cache against full recompute at every step.

With the cache each token's K/V is computed once (n rows per layer); recomputing
the whole sequence for every new token computes 1 + 2 + ... + n = n(n+1)/2 rows.
Both paths run on kvforge's own model; rows are counted by a hook on the
layer-0 K/V projection, and both must produce the same greedy tokens.
"""

from collections.abc import Callable

from kvforge.bench.context import BenchContext, model_label
from kvforge.bench.machine import describe_machine
from kvforge.bench.report import Plot, Report

FULL = [16, 32, 64, 128, 256]
QUICK = [4, 8, 16]
PROMPT = [1]  # one token: the sequence grows from 1 to n


def _count_rows(llm) -> list[int]:
    """A list that grows by the number of tokens layer 0 projects to K/V on each call."""
    calls: list[int] = []
    attention = llm.engine.runner.model.model.layers[0].self_attn
    attention.qkv_proj.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    return calls


def _step_times(
    llm, prompt: list[int], max_tokens: int, now: Callable[[], float]
) -> tuple[list[int], list[float]]:
    from kvforge import SamplingParams

    engine = llm.engine
    request = engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    times = []
    while engine.has_unfinished:
        start = now()
        engine.step()
        times.append(now() - start)
    return request.output_token_ids, times


def run(ctx: BenchContext) -> Report:
    from kvforge import LLM

    lengths = QUICK if ctx.quick else FULL
    model_path = ctx.checkpoint()
    llm = LLM(model=str(model_path), device=ctx.device, kv_memory="64MiB")
    rows_per_call = _count_rows(llm)
    _step_times(llm, PROMPT, 2, ctx.now)  # warm-up
    results, last = [], {}
    for n in ctx.progress(lengths, "cache"):
        rows_per_call.clear()
        tokens, cached_times = _step_times(llm, PROMPT, n, ctx.now)
        cached_rows = sum(rows_per_call)
        rows_per_call.clear()
        recompute_times, same = [], True
        for t in range(1, n + 1):  # step t feeds the whole sequence of t tokens
            out, times = _step_times(llm, (PROMPT + tokens)[:t], 1, ctx.now)
            recompute_times.append(sum(times))
            same &= out[0] == tokens[t - 1]
        recompute_rows = sum(rows_per_call)
        results.append(
            {
                "n": n,
                "kv_rows_cached": cached_rows,
                "kv_rows_recompute": recompute_rows,
                "expected_cached": n,
                "expected_recompute": n * (n + 1) // 2,
                "seconds_cached": sum(cached_times),
                "seconds_recompute": sum(recompute_times),
                "recompute_over_cached": sum(recompute_times) / sum(cached_times),
                "same_tokens": same,
            }
        )
        last = {"cached": cached_times, "recompute": recompute_times}
    steps = list(range(1, len(last["cached"]) + 1))
    plots = [
        Plot(
            "cache_per_step.png",
            f"Cost of each step, n = {lengths[-1]}",
            "step (sequence length)",
            "seconds",
            {"KV cache": (steps, last["cached"]), "full recompute": (steps, last["recompute"])},
        ),
        Plot(
            "cache_total.png",
            "Total time for n tokens",
            "n",
            "seconds",
            {
                "KV cache": (lengths, [r["seconds_cached"] for r in results]),
                "full recompute": (lengths, [r["seconds_recompute"] for r in results]),
            },
            logx=True,
            logy=True,
        ),
    ]
    return Report(
        scenario="cache",
        machine=describe_machine(ctx.device),
        settings={
            "model": model_label(model_path),
            "lengths": lengths,
            "prompt_tokens": len(PROMPT),
        },
        results=results,
        ratios={"recompute_over_cached_at_max_n": results[-1]["recompute_over_cached"]},
        plots=plots,
    )
