"""`kvforge eval`: perplexity, passkey and agreement for a cache setting."""

import argparse
import json
from pathlib import Path

from kvforge.cli.options import (
    EXIT_OK,
    add_engine_options,
    engine_from_args,
    number_list,
    positive_int,
)
from kvforge.errors import KVForgeError
from kvforge.eval.corpus import CORPORA
from kvforge.training.data import PASSKEY_FORMS

EVAL_TASKS = ("perplexity", "passkey", "agreement")


def add_parser(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "eval",
        help="measure what a cache setting costs in quality: perplexity, passkey, agreement",
        description="Quality of a cache setting next to the KV bytes it uses. perplexity: "
        "a text scored through the cache (default: English prose, the Python "
        "documentation's tutorial, FAQ and HOWTOs from Debian's python3.11-doc; --corpus "
        "code: the standard-library modules kvforge-mini's training kept out); passkey: "
        "retrieval accuracy over context lengths x needle depths, through the model's "
        "chat template; agreement: greedy tokens and next-token KL against the "
        "full-precision, full cache.",
        epilog="example: kvforge eval passkey --kv-dtype int4 --json",
    )
    p.add_argument("task", choices=EVAL_TASKS)
    add_engine_options(p, budget_share=True)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", type=Path, help="also write TASK.json (and passkey's heat map PNG)")
    p.add_argument("--corpus", choices=CORPORA, default="prose",
                   help="perplexity and agreement: prose (default) or code")  # fmt: skip
    p.add_argument("--text", type=Path, help="perplexity: a UTF-8 text file instead")
    p.add_argument("--context", type=positive_int, default=1024,
                   help="perplexity: tokens per scored window (default 1024)")  # fmt: skip
    p.add_argument("--max-tokens", type=positive_int, default=16_384,
                   help="perplexity: tokens scored at most (default 16384)")  # fmt: skip
    p.add_argument("--chunk", type=positive_int, default=64,
                   help="tokens a pass through the cache: perplexity's, and with a "
                   "--kv-policy every prompt's (default 64)")  # fmt: skip
    p.add_argument("--lengths", type=number_list(int, "context lengths like 256,512,1024"),
                   help="passkey: context lengths (default 1K, 2K, 4K up to the model's "
                   "context; 256..2000 for a 2,048-token model)")  # fmt: skip
    p.add_argument("--depths", type=number_list(float, "depths in 0..1 like 0,0.5,1"),
                   help="passkey: needle depths, 0 = start (default 0,.25,.5,.75,1)")  # fmt: skip
    p.add_argument("--form", choices=PASSKEY_FORMS,
                   help="passkey: chat (the model's chat template, the default where it has "
                   "one), text (the test's original plain-text form, answer begun), colon "
                   "(kvforge-mini's form, its default)")  # fmt: skip
    p.add_argument("--trials", type=positive_int, default=2,
                   help="passkey: keys per cell (default 2)")  # fmt: skip
    p.add_argument("--prompts", type=positive_int, default=8, help="agreement: prompts")
    p.add_argument("--prompt-tokens", type=positive_int, default=256,
                   help="agreement: tokens per prompt (default 256)")  # fmt: skip
    p.add_argument("--new-tokens", type=positive_int, default=64,
                   help="agreement: greedy tokens generated per prompt (default 64)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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
    llm = engine_from_args(args, **options)
    if args.task == "perplexity":
        text = None
        if args.text is not None:
            try:
                text = args.text.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise KVForgeError(f"cannot read --text {args.text}: {exc}") from None
        result = tasks.perplexity(llm, text, args.context, args.max_tokens, args.chunk, policy,
                                  args.corpus)  # fmt: skip
    elif args.task == "passkey":
        result = tasks.passkey(llm, args.lengths, args.depths or tasks.DEFAULT_DEPTHS,
                               args.trials, policy, args.form)  # fmt: skip
    else:
        from kvforge.llm import LLM

        # the same model with the full-precision, full cache
        reference = LLM(model=args.model, dtype=args.dtype, device=args.device,
                        weights_dtype=args.weights_dtype, kv_memory=args.kv_memory,
                        kv_dtype="fp32")  # fmt: skip
        result = tasks.agreement(llm, reference, args.prompts, args.prompt_tokens,
                                 args.new_tokens, policy, args.corpus)  # fmt: skip
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
    rotated = ", rotated" if r.get("kv_rotation") else ""
    head = (f"{r['task']} · {r['model']} · kv_dtype {r['kv_dtype']} (block {r['block_size']}, "
            f"{r['bytes_per_token']:,} B/token{rotated})")  # fmt: skip
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
