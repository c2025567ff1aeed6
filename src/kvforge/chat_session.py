"""`kvforge chat`: a multi-turn conversation with a model in the terminal.

Each turn sends the whole conversation, rendered by the model's chat template,
as a new request. The earlier turns' tokens are the prompt's prefix, so their
K/V blocks come from the prefix cache and only the new message is computed —
the stats line after each answer shows it ("reused" vs "computed").

Interactive (stdin is a terminal): readline editing and history, answers
streamed as they come, Ctrl-C stops the answer (not the program), commands
/reset, /stats, /help, /exit. Piped (`echo question | kvforge chat`): all of
stdin is one user message, the answer goes to stdout, the stats line to stderr.
"""

import contextlib
import dataclasses
import signal
import sys
from dataclasses import dataclass
from typing import TextIO

from kvforge.chat_template import Message, chat_prompt
from kvforge.engine.sampling import SamplingParams
from kvforge.errors import KVForgeError
from kvforge.units import format_bytes

PROMPT = ">>> "
COMMANDS = {
    "/reset": "forget the conversation (the system prompt stays)",
    "/stats": "show the KV cache: blocks, bytes, prefix-cache hits",
    "/help": "show this list",
    "/exit": "leave (Ctrl-D does too)",
}
DIM, RESET = "\x1b[2m", "\x1b[0m"


@dataclass(frozen=True)
class Turn:
    """One answer: its text, how it ended, and the request's figures (None if interrupted)."""

    text: str
    interrupted: bool
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    tpot_s: float | None = None


class ChatSession:
    """A conversation held as chat messages; `ask` adds a user message and its answer.

    An answer stopped by `interrupt()` (Ctrl-C) stays in the conversation as far as
    it got, so the next turn sees what the user saw.
    """

    def __init__(self, llm, params: SamplingParams, system: str | None = None) -> None:
        self.llm = llm
        self.params = params
        self.system = system
        self.messages: list[Message] = []
        self._stop = False
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def interrupt(self) -> None:
        """Stop the answer being written after its current token (safe from a signal
        handler; an interrupt that comes before the answer's first token counts too)."""
        self._stop = True

    def arm(self) -> None:
        """Forget earlier interrupts: called before the handler that sets one is installed."""
        self._stop = False

    def ask(self, text: str, write) -> Turn:
        """Send `text` as the next user message; `write(delta)` gets the answer as it comes."""
        messages = [*self.messages, {"role": "user", "content": text}]
        _, ids = self.llm.engine.tokenize(chat_prompt(self.llm.tokenizer, messages))
        room = self.llm.engine.max_model_len - len(ids)
        if room < 1:
            raise KVForgeError(
                f"the conversation is {len(ids):,} tokens and the context holds "
                f"{self.llm.engine.max_model_len:,}: /reset to start over"
            )
        params = dataclasses.replace(self.params, max_tokens=min(self.params.max_tokens, room))
        answer, output = "", None
        events = self.llm.stream([ids], params)
        try:
            for event in events:
                if event.output is not None and event.output.error:
                    raise KVForgeError(event.output.error)
                answer += event.text
                write(event.text)
                output = event.output or output
                if self._stop:
                    break
        finally:
            events.close()  # an unfinished request is aborted: its blocks go back
        self.messages = [*messages, {"role": "assistant", "content": answer}]
        if output is None:
            return Turn(answer, interrupted=True)
        m = output.metrics
        return Turn(answer, False, m.prompt_tokens, m.cached_tokens, m.completion_tokens,
                    m.ttft_s, m.tpot_s)  # fmt: skip

    def stats_line(self, turn: Turn) -> str:
        """Prompt tokens reused vs computed, TTFT, decode speed and the KV the turn holds."""
        if turn.interrupted:
            return "[interrupted]"
        bytes_per_token = self.llm.kv_stats()["bytes_per_token"]
        tokens = turn.prompt_tokens + turn.completion_tokens
        parts = [
            f"prompt {turn.prompt_tokens:,} tokens: {turn.cached_tokens:,} reused, "
            f"{turn.prompt_tokens - turn.cached_tokens:,} computed",
            f"TTFT {turn.ttft_s * 1000:.0f} ms",
        ]
        if turn.tpot_s:
            parts.append(f"{1 / turn.tpot_s:.1f} tokens/s")
        parts.append(f"KV {format_bytes(tokens * bytes_per_token)} for {tokens:,} tokens")
        return "[" + " · ".join(parts) + "]"

    def kv_summary(self) -> str:
        s = self.llm.kv_stats()
        block_bytes = s["bytes_per_token"] * s["block_size"]
        return (
            f"KV cache: {s['blocks_used']:,} blocks in use, {s['blocks_cached']:,} cached, "
            f"{s['blocks_free']:,} free of {s['blocks_total']:,} "
            f"({s['block_size']} tokens, {format_bytes(block_bytes)} each; "
            f"{format_bytes(s['kv_bytes_allocated'])} allocated) · prefix cache: "
            f"{s['prefix_cache_hits']:,} of {s['prefix_cache_queries']:,} prompt tokens hit"
        )


def _dim(text: str, stream: TextIO) -> str:
    return f"{DIM}{text}{RESET}" if stream.isatty() else text


def run_piped(session: ChatSession, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> None:
    """All of stdin is one user message: the answer to stdout, the stats line to stderr."""
    text = stdin.read().strip()
    if not text:
        raise KVForgeError("no message on standard input")
    turn = session.ask(text, lambda delta: stdout.write(delta) and stdout.flush())
    stdout.write("\n")
    stdout.flush()
    print(session.stats_line(turn), file=stderr)


def run_interactive(session: ChatSession, stdout: TextIO, stderr: TextIO) -> None:
    """Read messages at the prompt until /exit or end of input."""
    with contextlib.suppress(ImportError):  # not on every platform; input() works without
        import readline  # noqa: F401  (input() gets line editing and history)
    print(_dim(f"chat with {session.llm.model_name} · /help for commands", stderr), file=stderr)
    while True:
        try:
            line = input(PROMPT)
        except EOFError:
            print(file=stdout)
            return
        except KeyboardInterrupt:
            print(_dim("\n(/exit or Ctrl-D to leave)", stderr), file=stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if _command(session, text.split()[0], stdout, stderr):
                return
            continue
        _answer(session, text, stdout, stderr)


def _command(session: ChatSession, command: str, stdout: TextIO, stderr: TextIO) -> bool:
    """Run a /command; True when the session should end."""
    if command in ("/exit", "/bye", "/quit"):
        return True
    if command == "/reset":
        session.reset()
        print(_dim("conversation cleared", stderr), file=stderr)
    elif command == "/stats":
        print(_dim(session.kv_summary(), stderr), file=stderr)
    else:
        if command != "/help":
            print(f"unknown command {command}", file=stderr)
        for name, what in COMMANDS.items():
            print(f"  {name:<7} {what}", file=stderr)
    return False


def _answer(session: ChatSession, text: str, stdout: TextIO, stderr: TextIO) -> None:
    """Stream one answer; Ctrl-C during it stops the answer and returns to the prompt."""

    def write(delta: str) -> None:
        stdout.write(delta)
        stdout.flush()

    session.arm()
    previous = signal.signal(signal.SIGINT, lambda *_: session.interrupt())
    try:  # the handler stays until the stats line is out: a Ctrl-C then ends nothing
        turn = session.ask(text, write)
        print(file=stdout)
        print(_dim(session.stats_line(turn), stderr), file=stderr)
    except KVForgeError as exc:
        print(f"error: {exc}", file=stderr)
    finally:
        signal.signal(signal.SIGINT, previous)


def run(session: ChatSession) -> None:
    """Interactive when stdin is a terminal, else one piped message."""
    if sys.stdin.isatty():
        run_interactive(session, sys.stdout, sys.stderr)
    else:
        run_piped(session, sys.stdin, sys.stdout, sys.stderr)
