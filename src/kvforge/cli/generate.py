"""`kvforge generate`: one prompt, streamed, then a summary of speed and KV use."""

import argparse
import json
import sys

from kvforge.cli.options import (
    EXIT_OK,
    add_engine_options,
    add_sampling_options,
    engine_from_args,
    sampling_params,
)
from kvforge.errors import KVForgeError
from kvforge.models.builtin import RANDOM_MODEL


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "generate",
        help="generate text from a prompt, streaming it to the terminal",
        description="Generate from one prompt, streaming tokens as they come, then a summary "
        "of speed and KV cache use.",
        epilog='example: kvforge generate --prompt "The cat sat" --max-tokens 16',
    )
    add_engine_options(p)
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument(
        "--chat",
        action="store_true",
        help="send --prompt as a user message through the model's chat template",
    )
    p.add_argument("--system", help="with --chat: a system message first")
    add_sampling_options(p, default_max_tokens=64)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvforge.chat_template import chat_prompt

    if args.system is not None and not args.chat:
        raise KVForgeError("--system needs --chat")
    params = sampling_params(args)
    llm = engine_from_args(args)
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
