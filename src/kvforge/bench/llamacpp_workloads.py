"""llama.cpp's own benchmark workloads, run by llama.cpp's tools and by kvforge alike.

`llama-bench -p 256 -n 64`: prefill 256 tokens (tokens/s of that one pass) and 64 tokens
decoded at batch 1 from an empty cache. `llama-batched-bench -npp 128 -ntg 64 -npl
1,16,64`: N sequences of 128 prompt tokens and 64 generated, all at once; its `S t/s` is
(prompt + generated tokens) / the whole time. kvforge runs the same shapes on random
token ids (EOS ignored), so the two are compared on equal work.

llama.cpp's tools are found on PATH or in the folder LLAMACPP_BIN names (the folder a
llama.cpp build puts them in; its shared libraries are looked up there too). Without
them, llama-cpp-python (when installed) times the llama-bench workload from Python.
"""

import json
import os
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

PREFILL, DECODE = 256, 64  # llama-bench -p 256 -n 64
PROMPT, GENERATED = 128, 64  # llama-batched-bench -npp 128 -ntg 64
QUICK_PREFILL, QUICK_DECODE, QUICK_PROMPT, QUICK_GENERATED = 32, 8, 16, 8
TOOLS_MISSING = (
    "llama.cpp's tools not found (llama-bench, llama-batched-bench): put the folder of a "
    "llama.cpp build on PATH or in LLAMACPP_BIN"
)


@dataclass(frozen=True)
class Shapes:
    prefill: int = PREFILL
    decode: int = DECODE
    prompt: int = PROMPT
    generated: int = GENERATED

    @classmethod
    def for_run(cls, quick: bool) -> "Shapes":
        if quick:
            return cls(QUICK_PREFILL, QUICK_DECODE, QUICK_PROMPT, QUICK_GENERATED)
        return cls()


def find_tool(name: str) -> str | None:
    folder = os.environ.get("LLAMACPP_BIN")
    return shutil.which(name) or (shutil.which(name, path=folder) if folder else None)


def _run(binary: str, args: list[str]) -> str:
    env = {**os.environ, "LD_LIBRARY_PATH": str(Path(binary).parent)}
    out = subprocess.run([binary, *args], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{Path(binary).name} failed: {out.stderr.strip()[-300:]}")
    return out.stdout


def llama_bench(gguf: Path, shapes: Shapes, threads: int, repeats: int = 3) -> dict | None:
    """{"prefill": tokens/s, "decode": tokens/s} from llama-bench, or None without it."""
    binary = find_tool("llama-bench")
    if binary is None:
        return None
    rows = json.loads(_run(binary, ["-m", str(gguf), "-p", str(shapes.prefill), "-n",
                                    str(shapes.decode), "-t", str(threads), "-r", str(repeats),
                                    "-o", "json"]))  # fmt: skip
    return {("prefill" if row["n_prompt"] else "decode"): row["avg_ts"] for row in rows}


def llama_batched_bench(gguf: Path, shapes: Shapes, npl: list[int], threads: int) -> dict | None:
    """{N: S t/s} from llama-batched-bench, or None without it."""
    binary = find_tool("llama-batched-bench")
    if binary is None:
        return None
    context = max(npl) * (shapes.prompt + shapes.generated) + 64
    out = _run(binary, ["-m", str(gguf), "-c", str(context), "-b", "2048", "-ub", "512",
                        "-npp", str(shapes.prompt), "-ntg", str(shapes.generated),
                        "-npl", ",".join(map(str, npl)), "-t", str(threads)])  # fmt: skip
    result = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 10 and re.fullmatch(r"\d+", cells[0]):
            # PP | TG | B | N_KV | T_PP s | S_PP t/s | T_TG s | S_TG t/s | T s | S t/s
            result[int(cells[2])] = float(cells[9])
    return result


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [int(t) for t in torch.randint(100, vocab - 1, (n,), generator=g)]


def kvforge_bench(llm, shapes: Shapes, repeats: int = 3) -> dict:
    """The llama-bench workload on a kvforge `LLM`: {"prefill": t/s, "decode": t/s}, medians."""
    from kvforge import SamplingParams

    engine, vocab = llm.engine, llm.engine.vocab_size
    times = []
    for r in range(repeats + 1):  # the first pass warms up
        engine.add_request(random_ids(shapes.prefill, vocab, r),
                           SamplingParams(max_tokens=1, ignore_eos=True))  # fmt: skip
        start = time.perf_counter()
        while engine.has_unfinished:
            engine.step()
        times.append(time.perf_counter() - start)
    rates = []
    for r in range(repeats):  # from an (almost) empty cache, as llama-bench's tg
        params = SamplingParams(max_tokens=shapes.decode + 1, ignore_eos=True)
        engine.add_request(random_ids(1, vocab, 100 + r), params)
        engine.step()  # the one prompt token and the first sample
        start = time.perf_counter()
        while engine.has_unfinished:
            engine.step()
        rates.append(shapes.decode / (time.perf_counter() - start))
    return {"prefill": shapes.prefill / statistics.median(times[1:]),
            "decode": statistics.median(rates)}  # fmt: skip


def kvforge_batched(llm, shapes: Shapes, npl: list[int]) -> dict:
    """The llama-batched-bench workload on a kvforge `LLM`: {N: (prompt + generated) t/s}."""
    from kvforge import SamplingParams

    vocab, result = llm.engine.vocab_size, {}
    params = SamplingParams(max_tokens=shapes.generated, ignore_eos=True)
    llm.generate([random_ids(shapes.prompt, vocab, 999)], params)  # warm-up
    for n in npl:
        prompts = [random_ids(shapes.prompt, vocab, 1000 + i) for i in range(n)]
        start = time.perf_counter()
        llm.generate(prompts, params)
        result[n] = n * (shapes.prompt + shapes.generated) / (time.perf_counter() - start)
    return result


def python_bench(engine, shapes: Shapes, vocab: int, repeats: int = 3) -> dict:
    """The llama-bench workload through llama-cpp-python's `LlamaCppEngine` (one sequence)."""

    def stamps(prompt: list[int], tokens: int) -> list[float]:
        marks = [time.perf_counter()]
        engine.generate_greedy(prompt, tokens, on_token=lambda: marks.append(time.perf_counter()))
        return marks

    prefill, decode = [], []
    for r in range(repeats + 1):
        marks = stamps(random_ids(shapes.prefill, vocab, r), 1)
        prefill.append(marks[1] - marks[0])
        marks = stamps(random_ids(1, vocab, 100 + r), shapes.decode + 1)
        decode.append(shapes.decode / (marks[-1] - marks[1]))
    return {"prefill": shapes.prefill / statistics.median(prefill[1:]),
            "decode": statistics.median(decode[1:])}  # fmt: skip


def _row(workload: str, ours: float, theirs: float | None) -> dict:
    ratio = None if not theirs else ours / theirs
    return {"workload": workload, "kvforge t/s": ours, "llama.cpp t/s": theirs,
            "kvforge ÷ llama.cpp": ratio}  # fmt: skip


def bench_side_by_side(llm, gguf: Path, shapes: Shapes, threads: int, notes: list[str],
                       python_engine=None) -> list[dict]:  # fmt: skip
    """kvforge and llama.cpp on llama-bench's workload: rows for `Report.versus`."""
    ours = kvforge_bench(llm, shapes)
    theirs = llama_bench(gguf, shapes, threads)
    if theirs is None and python_engine is not None:
        theirs = python_bench(python_engine, shapes, llm.engine.vocab_size)
        notes.append("llama.cpp timed through llama-cpp-python (llama-bench not found)")
    elif theirs is None:
        notes.append(TOOLS_MISSING)
    theirs = theirs or {}
    return [
        _row(f"prefill {shapes.prefill} (llama-bench -p)", ours["prefill"], theirs.get("prefill")),
        _row(f"decode {shapes.decode} at batch 1 (llama-bench -n)", ours["decode"],
             theirs.get("decode")),
    ]  # fmt: skip


def batched_side_by_side(llm, gguf: Path, shapes: Shapes, npl: list[int], threads: int,
                         notes: list[str]) -> list[dict]:  # fmt: skip
    """kvforge and llama.cpp on llama-batched-bench's workload: rows for `Report.versus`."""
    ours = kvforge_batched(llm, shapes, npl)
    theirs = llama_batched_bench(gguf, shapes, npl, threads)
    if theirs is None:
        notes.append(TOOLS_MISSING)
    return [
        _row(f"{n} x ({shapes.prompt} prompt + {shapes.generated} generated), S t/s", ours[n],
             (theirs or {}).get(n))
        for n in npl
    ]  # fmt: skip
