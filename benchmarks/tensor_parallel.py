"""What tensor parallelism costs on this machine: each model at 1 rank and at N ranks, side
by side in one run, with the time the ranks spend in all-reduces set against the step.

    python benchmarks/tensor_parallel.py [--out docs/benchmarks/tensor_parallel]
        [--models smollm2,llama-wide] [--repeats 5]

Models:
    smollm2      SmolLM2-135M-Instruct (Q4_1 GGUF, its weights kept in their blocks):
                 9 query / 3 KV heads, so 1 and 3 ranks (2 does not divide 9 heads)
    llama-wide   a random-weights Llama (hidden 1024, 16 query / 4 KV heads, MLP 4096,
                 12 layers, vocabulary 32,000; fp32), written with transformers'
                 save_pretrained: 1, 2 and 4 ranks

For each: the prefill of one 512-token prompt (TTFT), then decode steps of a batch of 1
and of 8 requests (median step time over `repeats` x 32 steps). Rank 0's counters say
how long its all-reduces took (two a layer; the wait for the slowest rank included) and
how long sending the step's plan took. On a CPU the ranks split the cores (torch threads
per rank = cores / ranks). Writes tensor_parallel.json and README.md to --out.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvforge import LLM, SamplingParams
from kvforge.models import catalog

PROMPT_TOKENS = 512
DECODE_STEPS = 32
BATCHES = (1, 8)
WIDE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096,
            num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
            max_position_embeddings=4096)  # fmt: skip


def wide_model(folder: Path) -> Path:
    """The random-weights Llama, saved once under `folder`."""
    path = folder / "llama-wide"
    if not (path / "config.json").exists():
        import torch
        import transformers

        torch.manual_seed(0)
        config = transformers.LlamaConfig(**WIDE, torch_dtype="float32")
        transformers.LlamaForCausalLM(config).save_pretrained(path)
    return path


def _floor_rank(rank: int, size: int, port: int, width: int, calls: int) -> float:
    """Seconds per all-reduce of one [1, width] float32 row, nothing else running."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)  # fmt: skip
    row = torch.ones(1, width)
    for _ in range(100):
        dist.all_reduce(row)
    start = time.perf_counter()
    for _ in range(calls):
        dist.all_reduce(row)
    elapsed = (time.perf_counter() - start) / calls
    dist.destroy_process_group()
    return elapsed


def all_reduce_floor(size: int, width: int, calls: int = 2000) -> float:
    """The transport's own cost: gloo all-reduces between `size` processes on loopback."""
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    others = [subprocess.Popen([sys.executable, __file__, "--floor-rank", str(rank), str(size),
                                str(port), str(width), str(calls)])
              for rank in range(1, size)]  # fmt: skip
    threads = torch.get_num_threads()
    seconds = _floor_rank(0, size, port, width, calls)
    torch.set_num_threads(threads)  # the models are timed with the process's own
    for process in others:
        process.wait()
    return seconds


def prompt_ids(n: int, vocab: int, seed: int) -> list[int]:
    return [(seed * 7919 + i * 104729) % (vocab - 10) + 5 for i in range(n)]


def measure(model: str, ranks: int, repeats: int) -> dict:
    llm = LLM(model=model, kv_memory="512MiB", tensor_parallel_size=ranks,
              max_num_batched_tokens=PROMPT_TOKENS, enable_prefix_caching=False)  # fmt: skip
    engine = llm.engine
    group = engine.runner.group
    vocab = engine.vocab_size
    row: dict = {"ranks": ranks, "threads_per_rank": torch.get_num_threads()}
    once = SamplingParams(max_tokens=1, ignore_eos=True)
    llm.generate([prompt_ids(PROMPT_TOKENS, vocab, 99)], once)  # warm-up
    ttfts = []
    for r in range(repeats):
        start = time.perf_counter()
        llm.generate([prompt_ids(PROMPT_TOKENS, vocab, r)], once)
        ttfts.append(time.perf_counter() - start)
    row["prefill_512_ms"] = 1000 * statistics.median(ttfts)
    for batch in BATCHES:
        steps, reduce_s, send_s, reduces = [], 0.0, 0.0, 0
        params = SamplingParams(max_tokens=DECODE_STEPS + 2, ignore_eos=True)
        for r in range(repeats):
            for i in range(batch):
                engine.add_request(prompt_ids(64, vocab, 1000 * r + i), params)
            engine.step()  # the prompts
            for _ in range(DECODE_STEPS):
                if group is not None:
                    r0, s0, n0 = group.comm.reduce_s, group.send_s, group.comm.reduces
                start = time.perf_counter()
                engine.step()
                steps.append(time.perf_counter() - start)
                if group is not None:
                    reduce_s += group.comm.reduce_s - r0
                    send_s += group.send_s - s0
                    reduces += group.comm.reduces - n0
            while engine.has_unfinished:
                engine.step()
        step = statistics.median(steps)
        row[f"decode_b{batch}_step_ms"] = 1000 * step
        row[f"decode_b{batch}_tokens_per_s"] = batch / step
        if group is not None:
            count = len(steps)
            row[f"decode_b{batch}_all_reduce_ms"] = 1000 * reduce_s / count
            row[f"decode_b{batch}_all_reduces_per_step"] = reduces / count
            row[f"decode_b{batch}_plan_send_ms"] = 1000 * send_s / count
            row[f"decode_b{batch}_comm_share"] = (reduce_s + send_s) / sum(steps)
    llm.close()
    return row


def render(results: dict) -> str:
    lines = [
        "# Tensor parallelism on this machine",
        "",
        f"{results['machine']}; torch threads split between the ranks. One run, side by "
        "side; timings on a shared VM drift, the ratios within a model are what to read.",
        "",
        "Command: `python benchmarks/tensor_parallel.py --out docs/benchmarks/tensor_parallel`",
        "",
    ]
    lines += ["## The transport's floor", "",
              "gloo all-reduces of one row of floats between processes on loopback, nothing "
              "else running (what a decode step of batch 1 pays per all-reduce at best):", "",
              "| ranks | row width | µs per all-reduce |", "|---:|---:|---:|"]  # fmt: skip
    for floor in results["floor"]:
        lines.append(f"| {floor['ranks']} | {floor['width']} | {1e6 * floor['seconds']:.0f} |")
    lines.append("")
    for name, rows in results["models"].items():
        base = rows[0]
        lines += [f"## {name}", "", "| ranks | threads/rank | prefill 512 (ms) | decode b1 step "
                  "(ms) | b1 all-reduce + plan (ms) | b1 comm share | decode b8 step (ms) | "
                  "b8 comm share | b1 tokens/s vs 1 rank | b8 tokens/s vs 1 rank |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for row in rows:
            comm1 = share1 = share8 = "—"
            if row["ranks"] > 1:
                comm1 = (f"{row['decode_b1_all_reduce_ms']:.2f} + "
                         f"{row['decode_b1_plan_send_ms']:.2f}")  # fmt: skip
                share1 = f"{100 * row['decode_b1_comm_share']:.0f}%"
                share8 = f"{100 * row['decode_b8_comm_share']:.0f}%"
            lines.append(
                f"| {row['ranks']} | {row['threads_per_rank']} | {row['prefill_512_ms']:.0f} | "
                f"{row['decode_b1_step_ms']:.1f} | {comm1} | {share1} | "
                f"{row['decode_b8_step_ms']:.1f} | {share8} | "
                f"{row['decode_b1_tokens_per_s'] / base['decode_b1_tokens_per_s']:.2f}× | "
                f"{row['decode_b8_tokens_per_s'] / base['decode_b8_tokens_per_s']:.2f}× |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="docs/benchmarks/tensor_parallel")
    parser.add_argument("--models", default="smollm2,llama-wide")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--floor-rank", nargs=5, help=argparse.SUPPRESS)  # a floor process
    args = parser.parse_args()
    if args.floor_rank:
        _floor_rank(*map(int, args.floor_rank))
        return
    cache = Path(tempfile.gettempdir()) / "kvforge-bench-models"
    cache.mkdir(exist_ok=True)
    plans = {
        "smollm2": (str(catalog.smollm2_path()), (1, 3)),
        "llama-wide": (lambda: str(wide_model(cache)), (1, 2, 4)),
    }
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} "
               f"cores, Python {sys.version.split()[0]}", "models": {}, "floor": []}  # fmt: skip
    for size, width in ((2, 576), (2, 1024), (3, 576), (4, 1024)):
        seconds = all_reduce_floor(size, width)
        results["floor"].append({"ranks": size, "width": width, "seconds": seconds})
        print("floor", results["floor"][-1], flush=True)
    for name in args.models.split(","):
        model, sizes = plans[name]
        model = model() if callable(model) else model
        rows = []
        for ranks in sizes:
            rows.append(measure(model, ranks, args.repeats))
            print(name, json.dumps(rows[-1]), flush=True)
        results["models"][name] = rows
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tensor_parallel.json").write_text(json.dumps(results, indent=2))
    (out / "README.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
