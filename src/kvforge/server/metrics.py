"""Prometheus metrics for `GET /metrics`.

Counters and histograms are updated as tokens come (prometheus_client is
thread-safe). Gauges of the cache and the queues are read when scraped: from the
engine itself when it runs on a thread of the server, or from the last report of
the engine process (sent every step). Each server has
its own registry, so several can live in one process (tests do).
"""

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

# seconds; TTFT spans a cached decode-sized prefill to a long queue wait
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


def engine_gauges(engine) -> dict:
    """What /metrics reads from the engine: the cache's blocks, the queues, the prefix
    cache's and the tiers' counters. Cheap: the engine process sends it every step."""
    pool, scheduler = engine.pool, engine.scheduler
    return {
        "blocks_total": pool.num_blocks,
        "blocks_free": pool.num_free,
        "blocks_cached": pool.num_cached_free,
        "blocks_window": engine.manager.num_window_blocks,
        "running": len(scheduler.running),
        "waiting": len(scheduler.waiting),
        "preemptions": engine.manager.num_preemptions,
        "prefix_queries": engine.prefix_cache_queries,
        "prefix_hits": engine.prefix_cache_hits,
        "evictions": pool.num_evictions,
        "tiers": engine.tiers.stats() if engine.tiers is not None else {},
    }


class _EngineCollector:
    """Gauges read at scrape time from `gauges()` (`engine_gauges` of the engine, or the
    engine process's last report)."""

    def __init__(self, gauges) -> None:
        self.gauges = gauges

    def collect(self):
        g = self.gauges()
        total = g["blocks_total"]
        used = total - g["blocks_free"]
        yield _gauge("kvforge_kv_cache_usage_ratio", "Fraction of KV blocks in use.", used / total)
        yield _gauge("kvforge_kv_blocks_used", "KV blocks in use (window blocks included).", used)
        yield _gauge(
            "kvforge_kv_blocks_window",
            "KV blocks the running requests borrow for their full-precision recent windows.",
            g["blocks_window"],
        )
        yield _gauge("kvforge_kv_blocks_free", "KV blocks free.", g["blocks_free"])
        yield _gauge(
            "kvforge_kv_blocks_cached",
            "Free KV blocks still holding a prefix (reused until evicted).",
            g["blocks_cached"],
        )
        yield _gauge("kvforge_kv_blocks_total", "KV blocks in the pool.", total)
        yield _gauge("kvforge_num_requests_running", "Requests in the running batch.", g["running"])
        yield _gauge("kvforge_num_requests_waiting", "Requests waiting to run.", g["waiting"])
        for name, text, value in (
            ("kvforge_num_preemptions", "Requests preempted (blocks freed, recomputed later).",
             g["preemptions"]),
            ("kvforge_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
             g["prefix_queries"]),
            ("kvforge_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
             g["prefix_hits"]),
            ("kvforge_prefix_cache_evictions", "Cached blocks evicted from the device pool.",
             g["evictions"]),
        ):  # fmt: skip
            family = CounterMetricFamily(name, text)
            family.add_metric([], value)
            yield family
        yield from _tier_metrics(g["tiers"])


def _tier_metrics(stats: dict):
    """Blocks held by, and traffic of, the host, disk and remote tiers (when configured).
    The remote tier's blocks are the server's to count (Redis `INFO keyspace`); its
    operations are what this replica asked of it."""
    blocks = GaugeMetricFamily(
        "kvforge_cache_tier_blocks", "Prefix-cache blocks held by a lower tier.", labels=["tier"]
    )
    ops = CounterMetricFamily(
        "kvforge_cache_tier_operations",
        "Blocks a lower tier took in (put), gave back to the device (hit), evicted, or "
        "refused (reject: a bad file or value; write_error: a failed write). The remote "
        "tier's: hit and miss per lookup, read_error, write_error, and dropped (not written: "
        "its queue was full, or the server down).",
        labels=["tier", "op"],
    )
    pending = GaugeMetricFamily(
        "kvforge_cache_tier_pending_writes",
        "Blocks queued to be written to a lower tier, not yet sent.",
        labels=["tier"],
    )
    if "remote_pending_writes" in stats:
        pending.add_metric(["remote"], stats["remote_pending_writes"])
        for key, value in stats.items():
            if key.startswith("remote_op_"):
                ops.add_metric(["remote", key.removeprefix("remote_op_")], value)
    for tier in ("host", "disk"):
        if f"{tier}_blocks" not in stats:
            continue
        blocks.add_metric([tier], stats[f"{tier}_blocks"])
        names = {"host": {"put": "puts", "hit": "hits", "evict": "evictions"},
                 "disk": {"put": "writes", "hit": "hits", "evict": "evictions",
                          "reject": "rejected", "write_error": "write_errors"}}[tier]  # fmt: skip
        for op, key in names.items():
            ops.add_metric([tier, op], stats[f"{tier}_{key}"])
    yield blocks
    yield ops
    yield pending


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, text)
    family.add_metric([], value)
    return family


class ServerMetrics:
    """The server's registry: engine gauges plus token counters and latency histograms."""

    def __init__(self, gauges) -> None:
        """`gauges`: a callable answering `engine_gauges`' dict."""
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(gauges))
        self.prompt_tokens = Counter(
            "kvforge_prompt_tokens", "Prompt tokens admitted.", registry=self.registry
        )
        self.generation_tokens = Counter(
            "kvforge_generation_tokens", "Tokens generated.", registry=self.registry
        )
        self.ttft = Histogram(
            "kvforge_time_to_first_token_seconds",
            "Arrival to first generated token.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "kvforge_inter_token_latency_seconds",
            "Time between consecutive tokens of a request.",
            buckets=ITL_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "kvforge_e2e_request_latency_seconds",
            "Arrival to the last token (or the error) of a request.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.queue_time = Histogram(
            "kvforge_request_queue_time_seconds",
            "Arrival at the engine to first being scheduled.",
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.http_errors = Counter(
            "kvforge_request_errors", "Requests answered with an error.", ["status"],
            registry=self.registry,
        )  # fmt: skip
