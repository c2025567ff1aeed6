"""`kvforge chat`: the terminal conversation (see `kvforge.chat_session`)."""

import argparse
import dataclasses
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


def add_parser(commands: argparse._SubParsersAction) -> None:
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
    add_engine_options(p)
    p.add_argument("--system", help="a system message that starts the conversation")
    add_sampling_options(p, default_max_tokens=512)
    p.add_argument("--json", action="store_true", help="piped input: print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvforge import chat_session

    params = sampling_params(args)
    llm = engine_from_args(args)
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
