"""The KV cache inspector page in a real browser: Debian's Chromium, headless, driven by
Playwright, loads /inspect from a running `kvforge serve` under live requests. The grid it
draws has, state by state, the counts of the snapshot it drew; the page keeps updating
as requests come and go; once the server is idle its counts equal /debug/kv and
/metrics. Without the key in its address, the page asks for it."""

import threading

import httpx
import pytest

from process_util import require_program, served
from test_inspect import _metrics

KEY = "browser-key"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]  # fmt: skip

# What the page drew, read in one go (the page draws on the same thread: nothing changes
# in between): its grid's cells by state, its counters, its requests, and the snapshot.
DRAWN = """() => {
  const cells = [...document.querySelectorAll('#pool .cell')];
  const count = (state) => cells.filter((c) => (c.dataset.state || 'free') === state).length;
  const text = (id) => document.getElementById(id).textContent;
  return {
    cells: cells.length, free: count('free'), cached: count('cached'),
    used: count('used'), window: count('window'),
    counters: {free: +text('n-free'), cached: +text('n-cached'), used: +text('n-used'),
               total: +text('n-total'), hits: +text('hits'), queries: +text('queries')},
    requests: [...document.querySelectorAll('#requests [data-request]')]
      .map((e) => e.dataset.request),
    snapshots: window.kvforge.snapshots,
    snap: window.kvforge.last,
  };
}"""


def _check_drawn(drawn: dict) -> None:
    """The page's grid and counters are the snapshot it drew."""
    snap = drawn["snap"]
    assert drawn["cells"] == snap["blocks_total"] == drawn["counters"]["total"]
    assert drawn["cached"] == snap["blocks_cached"] == drawn["counters"]["cached"]
    assert drawn["free"] + drawn["cached"] == snap["blocks_free"]
    assert drawn["used"] + drawn["window"] == snap["blocks_used"]
    assert drawn["window"] == snap["blocks_window"]
    assert drawn["used"] == drawn["counters"]["used"]
    assert drawn["free"] == drawn["counters"]["free"]
    assert drawn["requests"] == [r["id"] for r in snap["requests"]]
    assert drawn["counters"]["hits"] == snap["prefix"]["hits"]
    assert drawn["counters"]["queries"] == snap["prefix"]["queries"]


@pytest.fixture(scope="module")
def browser():
    require_program(CHROMIUM, "chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_the_page_draws_the_live_cache_and_equals_debug_kv_when_idle(browser):
    options = ("--model", "random", "--kv-memory", "4MiB", "--api-key", KEY,
               "--host-cache-memory", "256KiB")  # fmt: skip
    with served(*options) as (_, url):
        headers = {"Authorization": f"Bearer {KEY}"}
        model = httpx.get(f"{url}/v1/models", headers=headers).json()["data"][0]["id"]
        stop = threading.Event()
        failures: list[str] = []
        shared = list(range(1, 97))  # 6 full blocks every request shares

        def client(i: int) -> None:
            k = 0
            with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
                while not stop.is_set():
                    prompt = shared + [(7 * i + k) % 250 + 1] * (10 + 3 * k % 20)
                    body = {"model": model, "prompt": prompt, "max_tokens": 24,
                            "ignore_eos": True, "temperature": 0}  # fmt: skip
                    reply = http.post("/v1/completions", json=body)
                    if reply.status_code != 200:
                        failures.append(reply.text)
                        return
                    k += 1

        page = browser.new_page()
        page.goto(f"{url}/inspect?token={KEY}")
        assert page.url == f"{url}/inspect"  # the key leaves the address bar (a cookie keeps it)
        clients = [threading.Thread(target=client, args=(i,)) for i in range(3)]
        for t in clients:
            t.start()
        try:
            seen_requests: set[str] = set()
            busy = 0
            snapshots = []
            while busy < 8:
                assert not failures, failures[0]
                assert len(snapshots) < 400, "the page drew no running request"
                page.wait_for_function(f"window.kvforge.snapshots > {len(snapshots)}",
                                       timeout=30_000)  # fmt: skip
                drawn = page.evaluate(DRAWN)
                _check_drawn(drawn)
                snapshots.append(drawn["snapshots"])
                if drawn["snap"]["requests"]:
                    busy += 1
                    seen_requests.update(drawn["requests"])
                    # a running request's block table is drawn in its colour
                    r = drawn["snap"]["requests"][0]
                    cell = page.locator(f'#pool .cell[data-block="{r["blocks"][0]}"]')
                    assert cell.get_attribute("data-state") in ("used", "window")
        finally:
            stop.set()
            for t in clients:
                t.join()
        # it updates: snapshot after snapshot, with requests coming and going
        assert snapshots == sorted(set(snapshots)) and snapshots[-1] >= 8
        assert len(seen_requests) >= 3
        # idle: what the page draws equals /debug/kv and /metrics
        snap = httpx.get(f"{url}/debug/kv", headers=headers).json()
        assert snap["requests"] == [] and snap["waiting"] == 0
        page.wait_for_function(
            f"window.kvforge.last.requests.length === 0 && "
            f"window.kvforge.last.prefix.queries === {snap['prefix']['queries']}",
            timeout=30_000,
        )
        drawn = page.evaluate(DRAWN)
        _check_drawn(drawn)
        metrics = _metrics(url)
        assert drawn["free"] + drawn["cached"] == snap["blocks_free"]
        assert drawn["free"] + drawn["cached"] == metrics["kvforge_kv_blocks_free"]
        assert drawn["used"] == snap["blocks_used"] == metrics["kvforge_kv_blocks_used"] == 0
        assert drawn["cached"] == snap["blocks_cached"] > 0
        assert drawn["counters"]["hits"] == snap["prefix"]["hits"] > 0
        # the host tier took evicted blocks, and the page says how many it holds
        host = page.locator("#tiers").inner_text()
        assert f"{snap['tiers']['host_blocks']} / {snap['tiers']['host_capacity']} blocks" in host
        page.close()


def test_without_the_key_the_page_asks_for_it(browser):
    with served("--model", "random", "--kv-memory", "4MiB", "--api-key", KEY) as (_, url):
        context = browser.new_context()
        page = context.new_page()
        page.goto(f"{url}/inspect")
        page.wait_for_selector("#keyform.show", timeout=30_000)
        assert page.locator("#status").inner_text() == "this server needs its API key"
        page.fill("#key", KEY)
        page.click("#keyform button")
        page.wait_for_function("window.kvforge.snapshots >= 2", timeout=30_000)
        _check_drawn(page.evaluate(DRAWN))
        context.close()
