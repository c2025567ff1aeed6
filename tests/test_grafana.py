"""The Grafana dashboard (deploy/grafana/kvforge.json) against a live server: it has the
shape Grafana imports, and a real Prometheus (Debian's) scraping `kvforge serve` answers
every panel's query with at least one series."""

import contextlib
import json
import subprocess
import time
from pathlib import Path

import httpx

from process_util import free_port, require_program, served
from redis_util import redis_server

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "kvforge.json"
PROMETHEUS = "/usr/bin/prometheus"
SHARED = "A system prompt that every request shares, long enough for blocks. " * 4


def _queries(dashboard: dict) -> list[str]:
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_the_dashboard_has_what_grafana_imports():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "kvforge" and dashboard["schemaVersion"] >= 36
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) == 13
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)) >= 1
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {"KV cache usage", "KV blocks by state", "Prefix cache hit rate", "Tier traffic",
            "Time to first token", "Inter-token latency", "End-to-end request latency",
            "Queue time", "Requests"} <= titles  # fmt: skip


@contextlib.contextmanager
def _prometheus(target: str, folder: Path):
    """Debian's prometheus scraping `target` (host:port) every second; yields its URL."""
    require_program(PROMETHEUS, "prometheus")
    port = free_port()
    config = folder / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
        "scrape_configs:\n  - job_name: kvforge\n    static_configs:\n"
        f"      - targets: ['{target}']\n"
    )
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stderr.read()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/-/ready").status_code == 200:
                    break
            assert time.monotonic() < deadline, "prometheus did not start"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _query(url: str, expr: str) -> list:
    reply = httpx.get(f"{url}/api/v1/query", params={"query": expr}).json()
    assert reply["status"] == "success", (expr, reply)
    return reply["data"]["result"]


def test_every_panel_query_returns_a_series_from_a_live_server(tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    with redis_server() as redis_url, served(
        "--model", "random", "--kv-memory", "4MiB", "--host-cache-memory", "1MiB",
        "--disk-cache-dir", str(tmp_path / "disk"), "--kv-remote", redis_url,
    ) as (_, url), _prometheus(url.removeprefix("http://"), tmp_path) as prometheus:  # fmt: skip
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        deadline = time.monotonic() + 30
        while not _query(prometheus, "kvforge_kv_blocks_total"):  # the first scrape
            assert time.monotonic() < deadline, "prometheus never scraped the server"
            time.sleep(0.5)
        for i in range(6):  # shared prefixes (hits), streamed tokens (inter-token latency)
            body = {"model": model, "prompt": SHARED + str(i), "max_tokens": 8}
            assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
        bad = {"model": model, "prompt": "x", "max_tokens": 10**9}
        assert httpx.post(f"{url}/v1/completions", json=bad, timeout=60).status_code == 400
        time.sleep(4)  # a few scrapes after the workload: rates have two samples
        empty = []
        for expr in _queries(dashboard):
            if not _query(prometheus, expr.replace("$__rate_interval", "1m")):
                empty.append(expr)
        assert empty == [], f"queries with no series: {empty}"
