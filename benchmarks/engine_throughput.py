"""First speed figure: kvforge vs transformers on one mixed batch, measured in one run.

Workload (seeded): a Llama config with hidden 512, 8 layers, 8 heads, 2 KV
heads, vocab 32,000, random float32 weights; 32 requests with prompts of
32-256 tokens and 64 new tokens each (greedy, EOS ignored). Peers on the same
weights: transformers `generate` on the left-padded batch, and transformers
`generate_batch` (its continuous batching). Reports output tokens/s, the
ratio of kvforge to the better peer, and the matmul floor: the time this
machine needs for the workload's matrix multiplications alone.

    .venv/bin/python benchmarks/engine_throughput.py [--requests 32] [--repeats 2]
"""

import argparse
import json
import platform
import random
import tempfile
import time

import torch
import transformers

from kvforge import LLM, SamplingParams
from kvforge.bench.workloads import SMALL_LLAMA

FLOOR = "matmul floor (no engine beats it)"
CONFIG = SMALL_LLAMA  # hidden 512, 8 layers, 8 heads, 2 KV heads, vocab 32,000


def workload(num_requests: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [
        [rng.randrange(3, 32000) for _ in range(rng.randint(32, 256))] for _ in range(num_requests)
    ]


def _best_time(fn, repeats: int = 7) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_floor_s(prompts: list[list[int]], new_tokens: int, chunk: int = 2048) -> float:
    """Seconds this machine needs for the workload's matmuls alone, nothing else.

    Prefill: every prompt token through every layer's projections, timed at
    M = `chunk` rows (the engine's prefill chunk). Decode: one step per new
    token after the first, all requests together (M = number of requests),
    layers plus the LM head. Attention, norms and sampling are not counted, so
    no engine can beat this.
    """
    h, inter, vocab = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"]
    head_dim = h // CONFIG["num_attention_heads"]
    qkv = h + 2 * CONFIG["num_key_value_heads"] * head_dim
    layer_shapes = [(h, qkv), (h, h), (h, 2 * inter), (inter, h)]  # (in, out) per matmul

    def stack_s(rows: int) -> float:
        weights = [torch.randn(n_out, n_in) for n_in, n_out in layer_shapes]
        inputs = [torch.randn(rows, n_in) for n_in, _ in layer_shapes]

        def run() -> None:
            for x, w in zip(inputs, weights, strict=True):
                torch.nn.functional.linear(x, w)

        return CONFIG["num_hidden_layers"] * _best_time(run)

    batch = len(prompts)
    head = torch.randn(vocab, h)
    head_s = _best_time(lambda: torch.nn.functional.linear(torch.randn(batch, h), head))
    prefill_s = sum(map(len, prompts)) / chunk * stack_s(chunk) + head_s
    return prefill_s + (new_tokens - 1) * (stack_s(batch) + head_s)


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run_kvforge(path: str, prompts, new_tokens: int):
    llm = LLM(model=path, device="cpu", kv_memory="1GiB")
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    seconds, outs = timed(lambda: llm.generate(prompts, params))
    return seconds, [o.token_ids for o in outs]


def run_hf_generate(model, prompts, new_tokens: int):
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def go():
        with torch.inference_mode():
            return model.generate(
                ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, eos_token_id=None, pad_token_id=0,
            )  # fmt: skip

    seconds, out = timed(go)
    return seconds, out[:, width:].tolist()


def run_hf_generate_batch(model, prompts, new_tokens: int):
    config = transformers.GenerationConfig(
        max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    seconds, out = timed(lambda: model.generate_batch(inputs=prompts, generation_config=config))
    tokens = [out[k].generated_tokens for k in sorted(out, key=lambda k: int(k.split("_")[-1]))]
    return seconds, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2, help="best of N for each engine")
    parser.add_argument("--only", help="run just this engine (kvforge, generate, generate_batch)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    prompts = workload(args.requests)
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(**CONFIG)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    output_tokens = args.requests * args.new_tokens
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as path:
        model.save_pretrained(path)
        engines = {
            "kvforge": lambda: run_kvforge(path, prompts, args.new_tokens),
            "transformers generate (padded)": lambda: run_hf_generate(
                model, prompts, args.new_tokens
            ),
            "transformers generate_batch": lambda: run_hf_generate_batch(
                model, prompts, args.new_tokens
            ),
        }
        if args.only:
            engines = {n: fn for n, fn in engines.items() if n.endswith(args.only)}
        outputs = {}
        for _ in range(args.repeats):  # interleaved, so drift hits every engine alike
            for name, fn in engines.items():
                try:
                    seconds, tokens = fn()
                except Exception as exc:  # a peer failing must not hide the others
                    results[name] = {"error": f"{type(exc).__name__}: {exc}"}
                    continue
                best = results.get(name, {}).get("seconds", float("inf"))
                if seconds < best:
                    results[name] = {"seconds": seconds, "tokens_per_s": output_tokens / seconds}
                outputs[name] = tokens
    floor_s = gemm_floor_s(prompts, args.new_tokens)
    results[FLOOR] = {
        "seconds": floor_s,
        "tokens_per_s": output_tokens / floor_s,
    }
    ours = outputs.get("kvforge")
    for name, tokens in outputs.items():
        if name != "kvforge" and ours is not None:
            same = sum(a == b for a, b in zip(ours, tokens, strict=False))
            results[name]["identical_greedy_outputs"] = f"{same}/{len(ours)}"
    peers = [
        r["tokens_per_s"]
        for n, r in results.items()
        if n.startswith("transformers") and "tokens_per_s" in r
    ]
    ours_per_s = results.get("kvforge", {}).get("tokens_per_s")
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    summary = {
        "machine": machine,
        "workload": {"requests": args.requests, "prompt_tokens": "32-256",
                     "new_tokens": args.new_tokens, "model": CONFIG, "dtype": "float32"},
        "results": results,
        "kvforge_vs_best_peer": ours_per_s / max(peers) if peers and ours_per_s else None,
        "kvforge_vs_floor": ours_per_s / results[FLOOR]["tokens_per_s"] if ours_per_s else None,
    }  # fmt: skip
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(summary["machine"])
    for name, r in results.items():
        if "error" in r:
            print(f"{name:32s} error: {r['error']}")
        else:
            extra = (
                f"  same greedy tokens: {r['identical_greedy_outputs']}"
                if "identical_greedy_outputs" in r
                else ""
            )
            print(f"{name:32s} {r['tokens_per_s']:8.1f} tokens/s ({r['seconds']:.2f} s){extra}")
    if summary["kvforge_vs_best_peer"]:
        print(f"kvforge / best peer: {summary['kvforge_vs_best_peer']:.2f}x")
    if summary["kvforge_vs_floor"]:
        print(f"kvforge / matmul floor: {summary['kvforge_vs_floor']:.2f}x")


if __name__ == "__main__":
    main()
