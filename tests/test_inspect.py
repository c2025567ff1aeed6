"""GET /debug/kv: the KV cache's snapshot between two steps. Idle after a scripted
workload its counts equal kv_stats() and /metrics exactly; under load every snapshot is
consistent in itself; it takes the API key as a header, ?token= or the page's cookie, is
off with --no-inspect, and shows request text only with --inspect-show-text. What the
inspector page draws from it: token regions (prefix hits, a policy's kept and dropped
tokens, int2's full-precision window), the prefix tree, tier copies, the decode step
against its bandwidth floor; the page and its event stream; `kvforge inspect`."""

import json
import re
import subprocess
import sys
import threading

import httpx
import pytest

from kvforge import LLM, SamplingParams
from kvforge.server.inspect import KVInspector, gaps, runs
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


def _run_steps(llm: LLM, prompts: list[list[int]], max_tokens: int, steps: int):
    engine = llm.engine
    requests = [engine.add_request(p, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
                for p in prompts]  # fmt: skip
    for _ in range(steps):
        engine.step()
    return requests


def test_runs_and_gaps():
    assert runs([0, 1, 2, 3, 84, 85, 90]) == [[0, 4], [84, 86], [90, 91]]
    assert runs([]) == []
    assert gaps([[0, 4], [84, 86]], 90) == [[4, 84], [86, 90]]
    assert gaps([], 5) == [[0, 5]] and gaps([[0, 5]], 5) == []


def test_a_streaming_requests_kept_and_dropped_tokens():
    llm = new_llm(kv_policy="streaming", kv_budget=64)
    (r,) = _run_steps(llm, [list(range(1, 41))], max_tokens=150, steps=120)
    snap = KVInspector(llm.engine).snapshot()
    (entry,) = snap["requests"]
    computed = r.num_computed_tokens  # 40 prompt tokens, then one a step
    assert computed == 40 + 119
    assert entry["policy"] == {"name": "streaming", "budget": 64}
    regions = entry["regions"]
    # four sinks, then the newest tokens: the cache holds num_kv_tokens of them
    recent = r.num_kv_tokens - 4
    assert regions["held"] == [[0, 4], [computed - recent, computed]]
    assert regions["dropped"] == [[4, computed - recent]]
    assert regions["computed"] == [[0, computed]] and regions["prefix_hit"] == []
    assert regions["pending"] == [[computed, computed + 1]]  # the token sampled last
    assert regions["window"] == []  # fp32 keeps no separate window
    # the request's first block holds the sinks and the oldest recent tokens
    first = next(b for b in snap["blocks"] if b["id"] == entry["blocks"][0])
    assert first["tokens"] == [[0, 4], [computed - recent, computed - recent + 12]]
    assert first["requests"] == [r.request_id] and first["state"] == "used"


def test_an_int2_requests_full_precision_window():
    llm = new_llm(kv_dtype="int2", kv_memory="8MiB")
    (r,) = _run_steps(llm, [list(range(1, 41))], max_tokens=150, steps=100)
    snap = KVInspector(llm.engine).snapshot()
    (entry,) = snap["requests"]
    assert snap["block_size"] == 64 and r.num_kv_tokens == 139
    # a block is packed once whole and out of the 32 newest tokens: block 1 (64..127) holds
    # some of 107..138, so it and the partial block 2 stay in full precision
    assert entry["regions"]["window"] == [[64, 139]]
    assert entry["regions"]["held"] == [[0, 139]] and entry["regions"]["dropped"] == []
    window = [b for b in snap["blocks"] if b["state"] == "window"]
    assert sorted(b["id"] for b in window) == sorted(entry["window_blocks"])
    assert len(window) == snap["blocks_window"] > 0
    assert all(b["requests"] == [r.request_id] for b in window)


def test_the_prefix_tree_tier_copies_and_bytes(tmp_path):
    llm = new_llm(kv_memory="4MiB", disk_cache_dir=str(tmp_path))
    shared = list(range(1, 129))  # 8 full blocks
    engine = llm.engine
    llm.generate([shared + [200 + i] * 20 for i in range(2)],
                 SamplingParams(max_tokens=4, ignore_eos=True))  # fmt: skip
    a, b = _run_steps(llm, [shared + [230] * 40, shared + [231] * 40], max_tokens=50, steps=3)
    snap = KVInspector(engine).snapshot()
    by_id = {block["id"]: block for block in snap["blocks"]}
    keyed = [block for block in snap["blocks"] if block["prefix_key"]]
    for block in keyed:
        # every cached block was written through to disk; each links to the block before it
        assert block["tiers"] == ["disk"]
        if block["depth"] == 0:
            assert block["parent"] is None
        else:
            assert by_id[block["parent"]]["depth"] == block["depth"] - 1
        assert block["tokens"][0][0] == block["depth"] * 16
    # the shared prefix is one chain, held by both running requests
    chain = [by_id[i] for i in a.block_table.block_ids[:8]]
    assert [block["depth"] for block in chain] == list(range(8))
    assert all(sorted(block["requests"]) == sorted([a.request_id, b.request_id])
               for block in chain)  # fmt: skip
    assert all(block["ref_count"] == 2 for block in chain)
    # three prefixes branch off the shared one: the earlier requests' and one each now
    children = [block for block in keyed if block["depth"] == 8]
    assert len(children) == 4 and {block["parent"] for block in children} == {chain[-1]["id"]}
    entries = {e["id"]: e for e in snap["requests"]}
    assert entries[a.request_id]["regions"]["prefix_hit"] == [[0, 128]]
    assert entries[a.request_id]["cached_tokens"] == 128
    # bytes: each token once; the planner counts each request alone
    per_token, per_block = snap["bytes"]["per_token"], snap["bytes"]["per_block"]
    distinct = 128 + 2 * (a.num_kv_tokens - 128)
    assert snap["bytes"]["tokens"] == distinct * per_token
    assert snap["bytes"]["in_use"] == snap["blocks_used"] * per_block
    assert entries[a.request_id]["bytes"] == len(a.block_table.block_ids) * per_block
    assert snap["bytes"]["planned"] == sum(e["planned_bytes"] for e in entries.values())
    assert snap["bytes"]["planned"] - snap["bytes"]["in_use"] == 8 * per_block  # shared once
    assert snap["tiers"]["disk_capacity"] > 0 and snap["tiers"]["disk_blocks"] == len(keyed)


def test_the_decode_step_against_its_bandwidth_floor():
    llm = new_llm()
    inspector = KVInspector(llm.engine)
    assert inspector.snapshot()["step"] is None  # no decode step yet
    a, b = _run_steps(llm, [list(range(1, 30)), list(range(1, 50))], max_tokens=20, steps=5)
    step = inspector.snapshot()["step"]
    assert step["batch"] == 2
    assert step["kv_tokens"] == a.num_kv_tokens + b.num_kv_tokens
    assert step["kv_bytes"] == step["kv_tokens"] * llm.kv_stats()["bytes_per_token"]
    assert step["floor_s"] == pytest.approx(
        (step["weights_bytes"] + step["kv_bytes"]) / step["bandwidth"]
    )
    assert step["ratio"] == pytest.approx(step["floor_s"] / step["seconds"])
    assert step["weights_bytes"] > 0 and step["ratio"] > 0


def test_the_page_and_its_event_stream():
    server = Server(new_llm(), api_key=KEY)
    try:
        page = httpx.get(f"{server.url}/inspect")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert f'<span class="model">{MODEL}</span>' in page.text
        assert "http://" not in page.text and "https://" not in page.text  # nothing outside
        assert "kvforge_token" not in page.cookies
        # ?token= on the page sets the cookie the page's event stream then sends
        keyed = httpx.get(f"{server.url}/inspect", params={"token": KEY})
        assert keyed.cookies["kvforge_token"] == KEY
        stream = f"{server.url}/debug/kv/stream"
        assert httpx.get(stream).status_code == 401
        refused = httpx.get(stream, params={"interval": 0.01}, cookies={"kvforge_token": KEY})
        assert refused.status_code == 400
        assert refused.json()["error"]["message"] == (
            "interval must be between 0.1 and 10.0 seconds, got 0.01"
        )
        events = []
        with httpx.stream("GET", stream, params={"interval": 0.1},
                          cookies={"kvforge_token": KEY}) as answer:  # fmt: skip
            assert answer.headers["content-type"].startswith("text/event-stream")
            for line in answer.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                if len(events) == 3:
                    break
        for snap in events:
            _check_consistent(snap)
        assert events[0]["time"] < events[1]["time"] < events[2]["time"]
    finally:
        server.close()


def test_kvforge_inspect_serves_the_page_and_its_demo():
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvforge", "inspect", "--model", "random", "--no-browser",
         "--port", "0", "--kv-memory", "4MiB", "--demo", "shared-prefix"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        for line in proc.stdout:
            found = re.search(r"inspector is at (http://\S+)/inspect$", line.strip())
            if found:
                break
        else:
            pytest.fail(f"no address; exit code {proc.wait()}")
        url = found.group(1)
        assert httpx.get(f"{url}/inspect").status_code == 200
        # the demo's four clients share a 192-token prefix: hits come
        for _ in range(300):
            snap = httpx.get(f"{url}/debug/kv").json()
            if snap["prefix"]["hits"] >= 192:
                break
            threading.Event().wait(0.1)
        assert snap["prefix"]["hits"] >= 192
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "kvforge", "inspect", "--port", "70000"],
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip() == "kvforge inspect: error: --port must be in 0..65535, got 70000"
