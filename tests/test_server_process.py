"""`kvforge serve` as users run it: the API server and the engine in two processes. The
answers equal the engine's own; a client that goes away frees its blocks; when the
engine process dies, its requests fail, /health answers 503 within a second and the
server exits with code 1 within five."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from kvforge import LLM, SamplingParams
from process_util import served

MODEL = "kvforge-builtin-untrained"
ARGS = ("--model", "random", "--device", "cpu", "--kv-memory", "4MiB")


@pytest.fixture(scope="module")
def server():
    with served(*ARGS) as (proc, url):
        yield proc, url


def _metrics(url: str) -> dict[str, float]:
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def _engine_pid(server_pid: int) -> int:
    """The engine process: the server's child started by multiprocessing's spawn (not its
    resource tracker)."""
    found = []
    for child in Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split():
        cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        if b"spawn_main" in cmdline:
            found.append(int(child))
    (pid,) = found
    return pid


def test_two_processes_answer_what_the_engine_computes(server):
    proc, url = server
    assert _engine_pid(proc.pid) != proc.pid
    offline = LLM(model="random", device="cpu", kv_memory="4MiB")
    prompts = ["The cat sat", "Hello there"]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    expected = [o.text for o in offline.generate(prompts, params)]
    body = {"model": MODEL, "prompt": prompts, "max_tokens": 12, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    whole = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
    assert [c["text"] for c in whole["choices"]] == expected
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True},
                      timeout=60) as r:  # fmt: skip
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]  # fmt: skip
    for index in range(2):
        text = "".join(e["choices"][0]["text"] for e in events
                       if e["choices"] and e["choices"][0]["index"] == index)  # fmt: skip
        assert text == expected[index]
    chat = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
        "temperature": 0, "ignore_eos": True})  # fmt: skip
    assert chat.json()["usage"]["completion_tokens"] == 5
    values = _metrics(url)
    assert values["kvforge_generation_tokens_total"] >= 2 * 12 * 2 + 5
    assert values["kvforge_kv_blocks_total"] == 128


def test_a_client_that_goes_away_frees_its_blocks():
    with served("--model", "random", "--device", "cpu", "--kv-memory", "16MiB") as (_, url):
        before = _metrics(url)["kvforge_generation_tokens_total"]
        body = {"model": MODEL, "prompt": "x" * 300, "max_tokens": 3700, "stream": True,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            next(r.iter_lines())  # it runs; the client goes away
        deadline = time.monotonic() + 10
        while (m := _metrics(url))["kvforge_kv_blocks_used"] or m["kvforge_num_requests_running"]:
            assert time.monotonic() < deadline, "the blocks of a gone client were not freed"
            time.sleep(0.05)
        # aborted, not run to its end (3,700 tokens take the engine seconds)
        assert m["kvforge_generation_tokens_total"] - before < 3700
        assert m["kvforge_kv_blocks_free"] == m["kvforge_kv_blocks_total"]


def test_bad_input_is_refused_by_the_server_process(server):
    _, url = server
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi",
                                                  "max_tokens": 5000})  # fmt: skip
    assert r.status_code == 400
    assert "exceeds the model's context of 4096 tokens" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": [[1], [400]]})
    assert "prompt 1: prompt token id 400 is outside the vocabulary" in r.json()["error"]["message"]


def test_limits_are_flags():
    args = (*ARGS, "--max-request-bytes", "2KiB", "--max-logprobs", "3",
            "--max-prompts-per-request", "2")  # fmt: skip
    with served(*args) as (_, url):
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "y" * 3000})
        assert r.status_code == 413
        assert "exceeds 2,048 bytes" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "y",
                                                      "logprobs": 4})  # fmt: skip
        assert "at most 3 (the server's --max-logprobs)" in r.json()["error"]["message"]
        r = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": ["a"] * 3})
        assert "at most 2 (the server's --max-prompts-per-request)" in r.json()["error"]["message"]


def test_when_the_engine_process_dies_the_server_answers_503_and_exits_1():
    with served(*ARGS) as (proc, url):
        engine = _engine_pid(proc.pid)
        answers = {}

        def long_request():
            body = {"model": MODEL, "prompt": "x", "max_tokens": 2000, "ignore_eos": True,
                    "temperature": 0}  # fmt: skip
            answers["long"] = httpx.post(f"{url}/v1/completions", json=body, timeout=30)

        worker = threading.Thread(target=long_request)
        worker.start()
        deadline = time.monotonic() + 10
        while _metrics(url)["kvforge_num_requests_running"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(engine, signal.SIGKILL)
        killed = time.monotonic()
        while httpx.get(f"{url}/health").status_code != 503:
            assert time.monotonic() - killed < 1.0, "/health did not answer 503 within 1 s"
            time.sleep(0.02)
        worker.join(timeout=10)
        failed = answers["long"]
        assert failed.status_code == 500
        assert "the engine process died (exit code -9)" in failed.json()["error"]["message"]
        assert proc.wait(timeout=5) == 1
        assert time.monotonic() - killed < 5.0
