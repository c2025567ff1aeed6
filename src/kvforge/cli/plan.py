"""`kvforge plan`: what the KV cache costs for a model, and how much fits."""

import argparse
import json

from kvforge.cli.options import (
    EXIT_OK,
    MODEL_HELP,
    add_kv_layout_options,
    add_tensor_parallel_option,
    byte_size,
    param_count,
    positive_int,
)
from kvforge.dtypes import DTYPES
from kvforge.errors import KVForgeError
from kvforge.kvcache.formats import KV_FORMATS
from kvforge.models.checkpoint import resolve_model
from kvforge.planner import (
    DEFAULT_BLOCK_SIZE,
    WINDOWED_BLOCK_SIZE,
    compare_levers,
    plan_kv,
    resolve_weights,
)
from kvforge.presets import PRESETS, get_preset
from kvforge.report import render_comparison, render_plan, render_table
from kvforge.units import format_bytes, format_count


def add_parser(commands: argparse._SubParsersAction) -> None:
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
    add_kv_layout_options(p)
    p.add_argument(
        "--block-size",
        type=positive_int,
        help="tokens per KV block; a request holds ceil(tokens / block) "
        f"(default {DEFAULT_BLOCK_SIZE}; {WINDOWED_BLOCK_SIZE} for int4 and int2)",
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
        help="requests run at once, as the engine's option (default 256): it caps the "
        "concurrent requests",
    )
    p.add_argument(
        "--weights-dtype",
        choices=[name for name, d in DTYPES.items() if d.bits >= 4],  # no 2-bit weights
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
    add_tensor_parallel_option(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
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
        kv_skip_layers=args.kv_skip_layers,
        kv_recent_tokens=args.kv_recent_tokens,
        kv_exact_sinks=args.kv_exact_sinks,
        tensor_parallel_size=args.tensor_parallel_size,
    )
    comparison = None
    if args.compare and args.tensor_parallel_size > 1:
        raise KVForgeError("--compare weighs one rank's levers: leave out --tensor-parallel-size")
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
