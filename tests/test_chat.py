"""`kvforge chat` driven as a person would: through a pseudo-terminal (two turns, the
second reusing the first's KV; Ctrl-C during an answer), and through a pipe."""

import contextlib
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time

import pytest

from kvforge.chat_session import PROMPT

READY_TIMEOUT_S = 120  # loading the model
ANSWER_TIMEOUT_S = 120
STATS = re.compile(r"\[prompt ([\d,]+) tokens: ([\d,]+) reused, ([\d,]+) computed · TTFT")


class Terminal:
    """A process on a pseudo-terminal: what it wrote so far, and keys to send."""

    def __init__(self, *args: str) -> None:
        self.master, slave = pty.openpty()
        env = {**os.environ, "TERM": "dumb", "COLUMNS": "200"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvforge", "chat", *args],
            stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
        )  # fmt: skip
        os.close(slave)
        self.screen = ""

    def read_until(self, pattern: str, timeout_s: float, start: int = 0) -> int:
        """Wait until `pattern` (a regex) appears after `start`; its end offset."""
        deadline = time.monotonic() + timeout_s
        while True:
            match = re.compile(pattern).search(self.screen, start)
            if match:
                return match.end()
            left = deadline - time.monotonic()
            if left <= 0 or self.proc.poll() is not None:
                raise AssertionError(f"no {pattern!r} in:\n{self.screen[start:]}")
            ready, _, _ = select.select([self.master], [], [], min(left, 0.5))
            if ready:
                with contextlib.suppress(OSError):  # the process closed the terminal
                    self.screen += os.read(self.master, 65536).decode(errors="replace")

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        os.close(self.master)
        return self.proc.wait(timeout=30)


@pytest.fixture
def terminal():
    terminals: list[Terminal] = []
    yield lambda *args: terminals.append(Terminal(*args)) or terminals[-1]
    for t in terminals:
        t.close()


def test_two_turns_the_second_reusing_the_first(terminal):
    t = terminal("--max-tokens", "40")
    at = t.read_until(re.escape(PROMPT), READY_TIMEOUT_S)
    t.type("What is the capital of France?\r")
    at = t.read_until(r"The capital of France is Paris\.", ANSWER_TIMEOUT_S, at)
    at = t.read_until(STATS.pattern, ANSWER_TIMEOUT_S, at)
    first = STATS.findall(t.screen)[-1]
    assert first[1] == "0"  # nothing cached yet
    at = t.read_until(re.escape(PROMPT), ANSWER_TIMEOUT_S, at)
    t.type("And of Italy?\r")
    at = t.read_until(STATS.pattern, ANSWER_TIMEOUT_S, at)
    prompt, reused, computed = (int(x.replace(",", "")) for x in STATS.findall(t.screen)[-1])
    assert reused >= 32 and reused % 16 == 0  # the first turn's full blocks
    assert reused + computed == prompt > int(first[0])
    assert "Rome" in t.screen[t.screen.index("And of Italy?") :]
    at = t.read_until(re.escape(PROMPT), ANSWER_TIMEOUT_S, at)
    t.type("/stats\r")
    at = t.read_until(r"KV cache: \d+ blocks in use, \d+ cached", 30, at)
    t.type("/exit\r")
    assert t.proc.wait(timeout=30) == 0


def test_ctrl_c_stops_the_answer_and_returns_to_the_prompt(terminal):
    t = terminal("--max-tokens", "2000")
    at = t.read_until(re.escape(PROMPT), READY_TIMEOUT_S)
    t.type("Tell me a very long story about a dragon.\r")
    at = t.read_until(r"dragon\.\r?\n", 30, at)  # the terminal's echo of the line
    at = t.read_until(r"\w+ \w+ \w+ \w+", ANSWER_TIMEOUT_S, at)  # the answer is streaming
    t.proc.send_signal(signal.SIGINT)
    at = t.read_until(r"\[interrupted\]", 30, at)
    at = t.read_until(re.escape(PROMPT), 30, at)
    assert t.proc.poll() is None  # the program goes on
    t.type("/stats\r")
    at = t.read_until(r"KV cache: 0 blocks in use", 30, at)  # the answer's blocks came back
    t.type("/reset\r")
    at = t.read_until("conversation cleared", 30, at)
    t.type("What is the capital of France?\r")
    at = t.read_until(r"The capital of France is Paris\.", ANSWER_TIMEOUT_S, at)
    t.read_until(re.escape(PROMPT), ANSWER_TIMEOUT_S, at)
    t.type("\x04")  # Ctrl-D leaves
    assert t.proc.wait(timeout=30) == 0


def test_piped_input_is_one_message_answer_to_stdout_stats_to_stderr():
    result = subprocess.run(
        [sys.executable, "-m", "kvforge", "chat"],
        input="What is the capital\nof France?\n", capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout == "The capital of France is Paris.\n"
    assert STATS.search(result.stderr) and "Traceback" not in result.stderr
    empty = subprocess.run(
        [sys.executable, "-m", "kvforge", "chat", "--model", "random"],
        input="", capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert empty.returncode == 2
    assert empty.stderr.strip() == "kvforge chat: error: no message on standard input"
