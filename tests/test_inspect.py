"""GET /debug/kv: the KV cache's snapshot between two steps. Idle after a scripted
workload its counts equal kv_stats() and /metrics exactly; under load every snapshot is
consistent in itself; it takes the API key as a header, ?token= or the page's cookie, is
off with --no-inspect, and shows request text only with --inspect-show-text."""

import threading

import httpx

from process_util import served
from test_server import GREEDY, KEY, MODEL, Server, new_llm

SHARED = "The quick brown fox jumps over the lazy dog. " * 3  # 136 tokens: 8 full blocks


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("kvforge_kv_blocks_") or line.startswith("kvforge_prefix_cache")
    }


def _check_consistent(snap: dict) -> None:
    """What holds within any one snapshot."""
    assert snap["schema_version"] == 1
    assert snap["blocks_free"] + snap["blocks_used"] == snap["blocks_total"]
    assert snap["blocks_cached"] == len(snap["lru"]) <= snap["blocks_free"]
    states = [b["state"] for b in snap["blocks"]]
    assert states.count("cached") == snap["blocks_cached"]
    assert states.count("used") + states.count("window") == snap["blocks_used"]
    used = {b["id"]: b for b in snap["blocks"] if b["state"] != "cached"}
    for r in snap["requests"]:
        for block in r["blocks"]:
            if block >= 0:
                assert r["id"] in used[block]["requests"]
                assert used[block]["ref_count"] >= 1
        assert "text" not in r


def test_idle_snapshot_equals_kv_stats_and_metrics():
    llm = new_llm(kv_memory="4MiB")
    server = Server(llm, api_key=KEY)
    try:
        client = server.client()
        for suffix in ("one", "two", "three"):
            client.completions.create(model=MODEL, prompt=SHARED + suffix, max_tokens=8, **GREEDY)
        server.wait_idle()
        snap = httpx.get(f"{server.url}/debug/kv",
                         headers={"Authorization": f"Bearer {KEY}"}).json()  # fmt: skip
        stats = llm.kv_stats()
        _check_consistent(snap)
        for key in ("blocks_total", "blocks_free", "blocks_cached", "blocks_used", "block_size"):
            assert snap[key] == stats[key], key
        assert snap["requests"] == [] and snap["waiting"] == 0
        assert snap["blocks_used"] == 0 and snap["blocks_cached"] > 0
        assert snap["prefix"]["hits"] == stats["prefix_cache_hits"] == 2 * 128
        assert snap["prefix"]["queries"] == stats["prefix_cache_queries"]
        assert snap["bytes"]["per_token"] == stats["bytes_per_token"] == 2048
        assert snap["bytes"]["per_token_fp16"] == 1024  # the built-in model computes in fp32
        assert snap["bytes"]["allocated"] == stats["kv_bytes_allocated"]
        metrics = _metrics(server.url)
        assert metrics["kvforge_kv_blocks_free"] == snap["blocks_free"]
        assert metrics["kvforge_kv_blocks_used"] == snap["blocks_used"]
        assert metrics["kvforge_kv_blocks_total"] == snap["blocks_total"]
        # every cached block is in the LRU list, each once, with its prefix key
        cached = [b for b in snap["blocks"] if b["state"] == "cached"]
        assert sorted(b["id"] for b in cached) == sorted(snap["lru"])
        assert all(len(b["prefix_key"]) == 16 for b in cached)
    finally:
        server.close()


def test_the_key_as_a_header_a_query_parameter_or_the_cookie():
    server = Server(new_llm(), api_key=KEY)
    try:
        url = f"{server.url}/debug/kv"
        refused = httpx.get(url)
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url, params={"token": "wrong"}).status_code == 401
        assert httpx.get(url, params={"token": KEY}).status_code == 200
        assert httpx.get(url, cookies={"kvforge_token": KEY}).status_code == 200
        assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    finally:
        server.close()


def test_snapshots_under_load_are_consistent_and_text_is_opt_in():
    hidden = Server(new_llm(kv_memory="4MiB"))
    shown = Server(new_llm(kv_memory="4MiB"), inspect_show_text=True)
    try:
        for server, show in ((hidden, False), (shown, True)):
            client = server.client()

            def run(client=client):
                client.completions.create(model=MODEL, prompt=SHARED, max_tokens=200, **GREEDY)

            thread = threading.Thread(target=run)
            thread.start()
            seen = []
            while thread.is_alive():
                snap = httpx.get(f"{server.url}/debug/kv").json()
                if snap["requests"]:
                    seen.append(snap)
                    if show:
                        assert isinstance(snap["requests"][0]["text"], str)
                    else:
                        _check_consistent(snap)
            thread.join()
            assert seen, "no snapshot caught the request running"
            request = seen[-1]["requests"][0]
            assert request["prompt_tokens"] == 136
            assert request["computed_tokens"] >= 136
            computed = request["computed_tokens"]  # the table may hold the next token's slot
            assert -(-computed // 16) <= len(request["blocks"]) <= -(-(computed + 1) // 16)
    finally:
        hidden.close()
        shown.close()


def test_served_snapshot_comes_from_the_engine_process_and_can_be_turned_off():
    with served("--model", "random", "--kv-memory", "4MiB") as (_, url):
        body = {"model": MODEL, "prompt": SHARED, "max_tokens": 4}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
        snap = httpx.get(f"{url}/debug/kv").json()
        _check_consistent(snap)
        metrics = _metrics(url)
        assert snap["blocks_used"] == metrics["kvforge_kv_blocks_used"] == 0
        assert snap["blocks_free"] == metrics["kvforge_kv_blocks_free"] == snap["blocks_total"]
        assert snap["blocks_cached"] == 8  # the prompt's 8 full blocks, cached
    with served("--model", "random", "--no-inspect") as (_, url):
        off = httpx.get(f"{url}/debug/kv")
        assert off.status_code == 404
