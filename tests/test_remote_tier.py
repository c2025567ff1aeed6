"""The shared remote tier against a real redis-server: what one engine computes, another
loads (every full block, identical tokens); salts, models and codecs never share; a
Redis that dies, fills up or returns garbage costs misses, never a request or a token."""

import time

import httpx
import pytest
import redis

from kvforge import LLM, SamplingParams
from kvforge.errors import KVForgeError
from kvforge.kvcache.remote import PREFIX
from kvforge.kvcache.tiers import decode_block
from process_util import served
from redis_util import redis_server

BLOCK = 4
PARAMS = SamplingParams(max_tokens=4, ignore_eos=True)
PROMPT = "The shared tier holds every block a replica computed. " * 2  # 110 byte tokens


@pytest.fixture()
def redis_url():
    with redis_server() as url:
        yield url


def _llm(url: str | None, **kwargs) -> LLM:
    options = {"model": "random", "device": "cpu", "block_size": BLOCK, "num_blocks": 64}
    return LLM(**{**options, **kwargs}, kv_remote=url)


def _remote(llm: LLM):
    return llm.engine.tiers.remote


def _generate(llm: LLM, prompt=PROMPT, **kwargs):
    out = llm.generate([prompt], PARAMS, **kwargs)[0]
    assert _remote(llm).flush(), "the remote tier's writes did not drain"
    return out


def _keys(url: str) -> list[bytes]:
    with redis.Redis.from_url(url) as client:
        return sorted(client.keys(PREFIX + b"*"))


def test_a_second_engine_loads_every_full_block_the_first_computed(redis_url):
    a = _llm(redis_url)
    first = _generate(a)
    assert first.metrics.cached_tokens == 0
    n = len(first.prompt_token_ids)
    # every block A computed in full: the prompt's and those generation completed (the
    # last sampled token is never computed)
    computed = (n + len(first.token_ids) - 1) // BLOCK
    assert len(_keys(redis_url)) == computed
    assert _remote(a).ops["put"] == computed and _remote(a).pending_writes == 0

    b = _llm(redis_url)
    second = _generate(b)
    assert second.token_ids == first.token_ids
    usable = (n - 1) // BLOCK * BLOCK  # the last prompt token is always computed
    assert second.metrics.cached_tokens == second.metrics.cached_tokens_remote == usable
    assert _remote(b).ops["hit"] == usable // BLOCK
    assert b.kv_stats()["remote_hits"] == usable // BLOCK
    assert _remote(b).ops["put"] == computed - usable // BLOCK  # only what it computed


def test_a_request_waiting_for_blocks_does_not_fetch_its_prefix_again(redis_url):
    """Two prompts whose blocks are in Redis, on a pool that holds one at a time: the
    second waits steps for the first to finish, and asks Redis for its prefix once."""
    a = _llm(redis_url)
    prompts = [PROMPT, PROMPT.upper()]
    expected = [o.token_ids for o in a.generate(prompts, PARAMS)]
    assert _remote(a).flush()
    b = _llm(redis_url, num_blocks=31)  # 110 tokens + 4: 29 blocks a request
    out = b.generate(prompts, PARAMS)
    assert [o.token_ids for o in out] == expected
    per_prompt = (len(out[0].prompt_token_ids) - 1) // BLOCK
    assert [o.metrics.cached_tokens_remote for o in out] == [per_prompt * BLOCK] * 2
    assert b.kv_stats()["remote_hits"] == 2 * per_prompt  # blocks loaded
    assert _remote(b).ops["hit"] == 2 * per_prompt  # blocks fetched: each once


def test_salts_models_and_codecs_never_share(redis_url):
    _generate(_llm(redis_url), cache_salt="tenant-a")
    stored = len(_keys(redis_url))
    for kwargs, salt in (({}, "tenant-b"), ({}, None), ({"kv_dtype": "int8"}, "tenant-a"),
                         ({"model": "kvforge-mini"}, "tenant-a"),
                         ({"block_size": 8}, "tenant-a")):  # fmt: skip
        other = _llm(redis_url, **kwargs)
        out = _generate(other, cache_salt=salt)
        assert out.metrics.cached_tokens == 0, (kwargs, salt)
        assert _remote(other).ops["hit"] == 0 and _remote(other).ops["reject"] == 0
        assert len(_keys(redis_url)) > stored  # its own blocks went in beside the others'
        stored = len(_keys(redis_url))
    again = _generate(_llm(redis_url), cache_salt="tenant-a")
    assert again.metrics.cached_tokens_remote > 0  # the salted blocks are still there


def test_a_corrupted_value_is_a_miss_and_is_rewritten(redis_url):
    a = _llm(redis_url)
    first = _generate(a)
    expected = first.token_ids
    client = redis.Redis.from_url(redis_url)
    seed_keys = _prompt_keys(a, first.prompt_token_ids)
    victim = PREFIX + seed_keys[2].hex().encode()
    good = client.get(victim)
    client.set(victim, good[:-1] + bytes([good[-1] ^ 0xFF]))  # one flipped byte
    b = _llm(redis_url)
    out = _generate(b)
    assert out.token_ids == expected
    assert out.metrics.cached_tokens_remote == 2 * BLOCK  # the blocks before the bad one
    assert _remote(b).ops["reject"] == 1
    assert client.get(victim) == good  # computed again, written again, whole
    client.set(victim, b"not a block at all")
    c = _llm(redis_url)
    assert _generate(c).token_ids == expected and _remote(c).ops["reject"] == 1
    assert client.get(victim) == good
    shape, dtype = a.engine.store.block_shape, a.engine.store.dtype
    assert decode_block(good, seed_keys[2], shape, dtype) is not None
    client.close()


def _prompt_keys(llm: LLM, token_ids: list[int]) -> list[bytes]:
    """The prefix cache's chained keys of these tokens' blocks under `llm` (no salt)."""
    from kvforge.kvcache.prefix_cache import chain_seed, extend_keys

    engine = llm.engine
    seed = chain_seed(engine.model_id, engine.store.format.key, BLOCK)
    keys: list[bytes] = []
    extend_keys(keys, seed, token_ids, BLOCK)
    return keys


def test_redis_killed_mid_run_leaves_requests_succeeding():
    local = _llm(None).generate([PROMPT, PROMPT[::-1]], PARAMS)
    with redis_server() as url:
        llm = _llm(url, num_blocks=40)
        assert _generate(llm).token_ids == local[0].token_ids
        client = redis.Redis.from_url(url)
        client.shutdown(nosave=True)  # the server goes away under the engine
    out = llm.generate([PROMPT[::-1], PROMPT], PARAMS)
    assert [o.token_ids for o in out] == [local[1].token_ids, local[0].token_ids]
    remote = _remote(llm)
    assert remote.flush()
    assert remote.ops["read_error"] + remote.ops["write_error"] >= 1
    assert remote.ops["read_error"] + remote.ops["write_error"] <= 2  # then it waits, quietly


def test_a_full_redis_refuses_writes_and_requests_go_on():
    with redis_server("--maxmemory", "1", "--maxmemory-policy", "noeviction") as url:
        llm = _llm(url)
        local = _llm(None).generate([PROMPT], PARAMS)[0]
        assert _generate(llm).token_ids == local.token_ids
        remote = _remote(llm)
        assert remote.ops["write_error"] == remote.ops["put"] + remote.ops["write_error"] > 0
        # a refused write is not an outage: every block was tried, none dropped
        assert remote.ops["dropped"] == 0 and remote.ops["read_error"] == 0


def test_an_absent_server_is_a_miss_not_an_error():
    url = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    llm = _llm(url)
    local = _llm(None).generate([PROMPT], PARAMS)[0]
    out = llm.generate([PROMPT], PARAMS)[0]
    assert out.token_ids == local.token_ids and out.metrics.cached_tokens == 0
    assert _remote(llm).ops["read_error"] == 1  # one timeout, then it stays quiet


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:6379", "kv_remote must be a redis://HOST:PORT/DB or valkey://"),
        ("127.0.0.1:6379", "kv_remote must be a redis://HOST:PORT/DB or valkey://"),
        ("redis://127.0.0.1:6379/0?decode_responses=true", "kv_remote takes no \\?options"),
    ],
)
def test_bad_urls_are_refused_by_name(url, message):
    with pytest.raises(KVForgeError, match=message):
        _llm(url)


def test_valkey_urls_are_redis_urls(redis_url):
    llm = _llm(redis_url.replace("redis://", "valkey://"))
    _generate(llm)
    assert _remote(llm).ops["put"] > 0


def _pending_writes(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith('kvforge_cache_tier_pending_writes{tier="remote"}'):
            return float(line.split()[-1])
    raise AssertionError("no kvforge_cache_tier_pending_writes gauge")


@pytest.mark.parametrize(
    ("model", "served_name"),
    [("random", "kvforge-builtin-untrained"),
     pytest.param("smollm2-135m-instruct", "smollm2-135m-instruct", marks=pytest.mark.slow)],
)  # fmt: skip
def test_two_served_replicas_share_a_2k_prompt(redis_url, model, served_name):
    """The replica that never saw a 2K-token prompt finds ≥ 90% of it cached, through the
    shared tier, and answers with the same tokens."""
    words = ["tiers", "replicas", "blocks", "prefixes", "routers", "events"]
    text = " ".join(words[i % len(words)] + str(i) for i in range(1200))
    args = ("--model", model, "--device", "cpu", "--kv-memory", "160MiB",
            "--kv-remote", redis_url)  # fmt: skip
    with served(*args) as (_, a), served(*args) as (_, b):
        ids = httpx.post(f"{a}/tokenize", json={"prompt": text}).json()["tokens"][:2048]
        body = {"model": served_name, "prompt": ids, "max_tokens": 8, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        first = httpx.post(f"{a}/v1/completions", json=body, timeout=300).json()
        deadline = time.monotonic() + 60
        while _pending_writes(a) > 0:  # written through in the background
            assert time.monotonic() < deadline
            time.sleep(0.1)
        second = httpx.post(f"{b}/v1/completions", json=body, timeout=300).json()
        metrics = httpx.get(f"{b}/metrics").text
    assert first["usage"]["prompt_tokens"] == len(ids) == 2048
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == 2047 // 16 * 16 >= 0.9 * 2048
    assert second["choices"][0]["text"] == first["choices"][0]["text"]
    assert f'kvforge_cache_tier_operations_total{{op="hit",tier="remote"}} {cached // 16}.0' \
        in metrics  # fmt: skip
