"""vllm-router 0.1.17's `kv_aware` policy in front of two `kvforge serve` replicas, fed by
their KV events: a request goes to the replica whose prefix cache holds its prompt's
blocks. The router hashes each BlockStored's token ids itself and gets a request's ids
from a token-id prompt as sent, or asks each worker (POST /v1/completions/render,
which kvforge answers 404, then POST /tokenize). Where a request landed is read from
the replicas' own counters (prompt tokens, prefix-cache hits) and from the router's
placement lookups: exact numbers, block by block.

vllm-router is a Python package with a Rust extension (`pip install vllm-router==0.1.17`,
in the test extra); the test looks for its `vllm-router` script on PATH and beside this
interpreter, and is skipped when there is none."""

import contextlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from process_util import free_port, served

BLOCK = 16
MODEL = "kvforge-builtin-untrained"
REPLICA = ("--model", "random", "--device", "cpu", "--kv-memory", "8MiB",
           "--block-size", str(BLOCK))  # fmt: skip
SETTLE_S = 0.5  # for the router to apply a replica's events (sent a step before the answer)
TIMEOUT_S = 600  # the first request on a fresh machine builds the CPU kernels


def _router_executable() -> str | None:
    found = shutil.which("vllm-router")
    if found:
        return found
    beside = Path(sys.executable).parent / "vllm-router"
    return str(beside) if beside.exists() else None


ROUTER = _router_executable()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        ROUTER is None,
        reason="no vllm-router executable on PATH or beside the interpreter "
        "(pip install vllm-router==0.1.17)",
    ),
]


@contextlib.contextmanager
def _router(workers: dict[str, tuple[str, str]], log: Path, timeout_s: float = 120):
    """vllm-router with kv_aware over `workers` (URL: (events, replay endpoint)) until it
    is ready with all of them; yields its URL and its Prometheus URL."""
    port, prom = free_port(), free_port()
    args = [ROUTER, "--policy", "kv_aware", "--worker-urls", *workers,
            "--kv-event-block-size", str(BLOCK), "--kv-event-model", MODEL,
            "--host", "127.0.0.1", "--port", str(port),
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prom),
            "--worker-startup-check-interval", "1"]  # fmt: skip
    for url, (events, replay) in workers.items():
        args += ["--kv-event-source", f"{url}={events}", "--kv-event-replay-source",
                 f"{url}={replay}"]  # fmt: skip
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readiness")
                if ready.status_code == 200 and ready.json()["healthy_workers"] == len(workers):
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "vllm-router did not come up:\n" + log.read_text()
            time.sleep(0.2)
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{prom}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two replicas A and B publishing KV events, and the router before them."""
    with contextlib.ExitStack() as stack:
        workers = {}
        for _ in range(2):
            events, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
            _, url = stack.enter_context(served(
                *REPLICA, "--kv-events-endpoint", events, "--kv-events-replay-endpoint", replay
            ))  # fmt: skip
            workers[url] = (events, replay)
        log = tmp_path_factory.mktemp("router") / "vllm-router.log"
        router, prometheus = stack.enter_context(_router(workers, log))
        yield list(workers), router, prometheus, log


def _counters(url: str) -> dict[str, float]:
    """A replica's prompt tokens and prefix-cache hits so far."""
    values = {}
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(("kvforge_prompt_tokens_total ", "kvforge_prefix_cache_hits_total ")):
            name, value = line.rsplit(" ", 1)
            values[name.removeprefix("kvforge_").removesuffix("_total")] = float(value)
    assert set(values) == {"prompt_tokens", "prefix_cache_hits"}, values
    return values


def _lookup_hits(prometheus: str) -> float:
    """Requests the router placed on a worker that holds some of their blocks."""
    for line in httpx.get(f"{prometheus}/metrics").text.splitlines():
        if line.startswith('vllm_router_kv_placement_lookups_total{result="hit"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _post(url: str, path: str, body: dict) -> dict:
    response = httpx.post(f"{url}{path}", json={"model": MODEL, **body}, timeout=TIMEOUT_S)
    assert response.status_code == 200, response.text
    return response.json()


def _complete(url: str, prompt: str | list[int]) -> dict:
    return _post(url, "/v1/completions", {"prompt": prompt, "max_tokens": 2, "temperature": 0})


def _cached(answer: dict) -> int:
    return answer["usage"]["prompt_tokens_details"]["cached_tokens"]


def _shared_blocks(first: list[int], second: list[int]) -> int:
    """Tokens of the whole blocks that two prompts share (a prompt's last token is always
    computed, never taken from the cache)."""
    common = 0
    for a, b in zip(first, second[:-1], strict=False):
        if a != b:
            break
        common += 1
    return common // BLOCK * BLOCK


def test_requests_with_a_prefix_follow_it_to_the_replica_that_computed_it(cluster):
    """Text prompts: the router tokenizes them on the workers (render 404, /tokenize)."""
    replicas, router, prometheus, log = cluster
    prefix = " ".join(f"alpha{i}" for i in range(60))  # ~26 blocks of byte tokens
    prompts = [f"{prefix} -> {tail}" for tail in "ABCD"]
    before = {url: _counters(url) for url in replicas}

    first = _complete(router, prompts[0])
    assert _cached(first) == 0
    grew = [url for url in replicas
            if _counters(url)["prompt_tokens"] > before[url]["prompt_tokens"]]  # fmt: skip
    assert len(grew) == 1, log.read_text()
    (owner,) = grew
    (other,) = [url for url in replicas if url != owner]
    computed = _counters(owner)["prompt_tokens"] - before[owner]["prompt_tokens"]
    assert computed == first["usage"]["prompt_tokens"]

    ids = [_post(owner, "/tokenize", {"prompt": p})["tokens"] for p in prompts]
    shared = _shared_blocks(ids[0], ids[1])
    assert shared >= 20 * BLOCK  # the prefix spans many blocks
    assert all(_shared_blocks(ids[0], x) == shared for x in ids[1:])

    time.sleep(SETTLE_S)
    hits_before = _lookup_hits(prometheus)
    mid = _counters(owner)
    answers = [_complete(router, p) for p in prompts[1:]]
    assert [_cached(a) for a in answers] == [shared] * 3, log.read_text()
    after = _counters(owner)
    assert after["prefix_cache_hits"] - mid["prefix_cache_hits"] == 3 * shared
    assert after["prompt_tokens"] - mid["prompt_tokens"] == sum(len(x) for x in ids[1:])
    assert _counters(other) == before[other]  # nothing landed on the other replica
    assert _lookup_hits(prometheus) - hits_before == 3


def test_the_router_follows_blocks_each_replica_announced(cluster):
    """Token-id prompts (the router hashes them as sent): one prefix computed on A, another
    on B, both directly; requests through the router then go where their prefix is, A or
    B, whatever the router would choose between equals."""
    replicas, router, prometheus, log = cluster
    prefixes = {
        replicas[0]: [(7 * i) % 200 + 20 for i in range(6 * BLOCK)],
        replicas[1]: [(11 * i) % 200 + 30 for i in range(6 * BLOCK)],
    }
    for url, prefix in prefixes.items():
        assert _cached(_complete(url, [*prefix, 5, 6])) == 0
    time.sleep(SETTLE_S)

    before = {url: _counters(url) for url in replicas}
    hits_before = _lookup_hits(prometheus)
    for tail in range(3):
        for prefix in prefixes.values():
            answer = _complete(router, [*prefix, 7 + tail, 9])
            assert _cached(answer) == 6 * BLOCK, log.read_text()
    for url, prefix in prefixes.items():
        after = _counters(url)
        assert after["prefix_cache_hits"] - before[url]["prefix_cache_hits"] == 3 * 6 * BLOCK
        assert after["prompt_tokens"] - before[url]["prompt_tokens"] == 3 * (len(prefix) + 2)
    assert _lookup_hits(prometheus) - hits_before == 6


def test_chat_requests_follow_their_prefix_too(cluster):
    """Chat: the router renders the messages with the worker's /tokenize. A long system
    prompt computed on B directly; chats with it through the router go to B."""
    replicas, router, prometheus, log = cluster
    system = " ".join(f"rule{i}" for i in range(60))
    holder = replicas[1]

    def chat(url: str, question: str) -> dict:
        return _post(url, "/v1/chat/completions", {
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": question}],
            "max_tokens": 2, "temperature": 0})  # fmt: skip

    assert _cached(chat(holder, "first?")) == 0
    time.sleep(SETTLE_S)
    hits_before = _lookup_hits(prometheus)
    before = _counters(holder)
    cached = [_cached(chat(router, f"{q}?")) for q in ("second", "third", "fourth")]
    assert _lookup_hits(prometheus) - hits_before == 3, log.read_text()
    assert min(cached) >= 20 * BLOCK
    assert _counters(holder)["prefix_cache_hits"] - before["prefix_cache_hits"] == sum(cached)
