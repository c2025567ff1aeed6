"""What `GET /debug/kv` answers, and the inspector page (`GET /inspect`) draws: one
snapshot of the KV cache, taken between two steps of the engine (so every count in it
agrees with every other).

Schema (version 1). Token ranges are lists of [start, end) runs of positions in the
request's tokens (prompt, then output). Top level:

    schema_version      1
    time                the server's clock (Unix seconds) when it was taken
    block_size          tokens a block
    blocks_total        the pool's blocks: blocks_free + blocks_used
    blocks_free         blocks a request may take (as kv_stats() and /metrics count them)
    blocks_cached       of those, blocks still holding a prefix (reused until evicted)
    blocks_used         blocks referenced by a request (window blocks included)
    blocks_window       blocks the running requests borrow for int4's/int2's recent window
    tokens_stored       tokens in the running requests' blocks
    lru                 the cached free blocks, next to be evicted first
    blocks              every block not free and empty: {id, state ("used", "window" or
                        "cached"), ref_count, prefix_key (hex, 16 digits, or null),
                        parent (the block before it in its prefix, null for a first block
                        or one whose parent left the pool), depth (its index in its
                        prefix, null when unknown), requests (ids holding it), tokens
                        (the first holder's tokens in it; a cached block's from its
                        depth), tiers (lower tiers with a copy: "host", "disk"; "remote"
                        when the remote tier is on, as every cached block is written
                        through to it)}
    requests            the running requests, in batch order: {id, prompt_tokens,
                        computed_tokens, output_tokens, cached_tokens, blocks (its block
                        table, -1 for a block freed out of a sliding window), window_blocks,
                        ttft_s, decode_tokens_per_s, policy ({name, budget} or null),
                        regions ({prefix_hit, computed, pending, held, dropped, window}:
                        token runs; held: the tokens in its cache, those its policy kept;
                        dropped: computed and let go of; window: int4's/int2's
                        full-precision recent tokens), bytes (its blocks and window
                        blocks), planned_bytes (the planner's figure for its tokens),
                        text (only with --inspect-show-text)}
    waiting             requests queued
    prefix              {queries, hits, hit_rate, evictions} (tokens; evicted blocks)
    tiers               the lower tiers' counters (kv_stats()'s host_*, disk_*, remote_*),
                        with host_capacity and disk_capacity in blocks
    bytes               {per_token, per_token_fp16, per_token_per_rank, per_block,
                         allocated, in_use, tokens (the bytes of the tokens in used
                         blocks, each once: tokens_stored counts a shared block once per
                         request), planned (the planner's figure for the running requests,
                         each on its own, without sharing), tensor_parallel_size}
    step                the last decode-only step against the bandwidth floor, or null:
                        {seconds, batch, kv_tokens, weights_bytes, kv_bytes,
                         bandwidth (bytes/s, a copy measured once), floor_s, ratio}

Counts are exact: when the engine is idle they equal `kv_stats()` and /metrics.
"""

import time

from kvforge.kvcache.block_table import NULL_BLOCK
from kvforge.planner import bytes_per_block, bytes_per_request
from kvforge.roofline import memory_bandwidth, weights_read

SCHEMA_VERSION = 1
COPY_BYTES = {"cpu": 2**28, "cuda": 2**30}  # the bandwidth probe: past the caches


def runs(positions) -> list[list[int]]:
    """Sorted positions as [start, end) runs."""
    out: list[list[int]] = []
    for p in positions:
        if out and out[-1][1] == p:
            out[-1][1] = p + 1
        else:
            out.append([p, p + 1])
    return out


def span(start: int, end: int) -> list[list[int]]:
    return [[start, end]] if end > start else []


def gaps(held: list[list[int]], end: int) -> list[list[int]]:
    """The runs of 0 .. end-1 that `held` (sorted runs) leaves out."""
    out, at = [], 0
    for start, stop in held:
        out += span(at, min(start, end))
        at = max(at, stop)
    return out + span(at, end)


class KVInspector:
    """Takes `engine`'s snapshots (on the engine's thread, between steps). The memory
    bandwidth the roofline needs is measured at the first decode step it reports."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._bandwidth: float | None = None
        self._weights_bytes: int | None = None

    def snapshot(self, show_text: bool = False) -> dict:
        engine = self.engine
        stats = engine.kv_stats()
        pool, manager, store = engine.pool, engine.manager, engine.store
        bs = store.block_size
        ranks = engine.tensor_parallel_size
        block_bytes = ranks * bytes_per_block(store.spec, store.format, bs)
        holders: dict[int, list[str]] = {}
        tokens_of: dict[int, list[list[int]]] = {}
        window: set[int] = set()
        requests = []
        planned = 0
        now = time.perf_counter()
        for r in engine.scheduler.running:
            entry = self._request(r, now, holders, tokens_of, block_bytes)
            planned += entry["planned_bytes"]
            window.update(r.window_blocks)
            if show_text:
                entry["text"] = engine.decode_text(r)
            requests.append(entry)
        # each token once: blocks shared by several requests (a prefix) count once
        distinct = sum(e - s for b, held in tokens_of.items() if b not in window for s, e in held)
        free = pool.free_block_ids()
        lru = [b for b in free if pool.key_of(b) is not None]
        tiers = engine.tiers
        copies = []
        if tiers is not None:
            copies = [(name, tier) for name, tier in (("host", tiers.host), ("disk", tiers.disk))
                      if tier is not None]  # fmt: skip
        remote = tiers is not None and tiers.remote is not None
        depths: dict[int, int | None] = {}
        blocks = []
        for b in range(pool.num_blocks):
            refs, key = pool.ref_count(b), pool.key_of(b)
            if refs == 0 and key is None:
                continue
            state = "cached" if refs == 0 else "window" if b in window else "used"
            parent = None
            on = []
            if key is not None:
                parent_key = pool.parent_of(b)
                parent = None if parent_key is None else pool.lookup(parent_key)
                on = [name for name, tier in copies if key in tier] + (["remote"] * remote)
            depth = self._depth(pool, b, depths) if key is not None else None
            tokens = tokens_of.get(b)
            if tokens is None and depth is not None:
                tokens = [[depth * bs, (depth + 1) * bs]]
            blocks.append({"id": b, "state": state, "ref_count": refs,
                           "prefix_key": None if key is None else key.hex()[:16],
                           "parent": parent, "depth": depth,
                           "requests": holders.get(b, []), "tokens": tokens or [],
                           "tiers": on})  # fmt: skip
        fp16 = store.spec.num_layers * 2 * store.spec.num_kv_heads * store.spec.head_dim * 2
        queries, hits = manager.prefix_queries, manager.prefix_hits
        prefix = {"queries": queries, "hits": hits, "hit_rate": hits / queries if queries else None,
                  "evictions": stats["prefix_cache_evictions"]}  # fmt: skip
        tier_stats = tiers.stats() if tiers is not None else {}
        for name, tier in copies:
            tier_stats[f"{name}_capacity"] = tier.capacity
        return {
            "schema_version": SCHEMA_VERSION,
            "time": time.time(),
            "block_size": stats["block_size"],
            "blocks_total": stats["blocks_total"],
            "blocks_free": stats["blocks_free"],
            "blocks_cached": stats["blocks_cached"],
            "blocks_used": stats["blocks_used"],
            "blocks_window": stats["blocks_window"],
            "tokens_stored": stats["tokens_stored"],
            "lru": lru,
            "blocks": blocks,
            "requests": requests,
            "waiting": len(engine.scheduler.waiting),
            "prefix": prefix,
            "tiers": tier_stats,
            "bytes": {
                "per_token": stats["bytes_per_token"],
                "per_token_fp16": fp16 * ranks,
                "per_token_per_rank": stats["bytes_per_token_per_rank"],
                "per_block": block_bytes,
                "allocated": stats["kv_bytes_allocated"],
                "in_use": stats["blocks_used"] * block_bytes,
                "tokens": distinct * stats["bytes_per_token"],
                "planned": planned,
                "tensor_parallel_size": ranks,
            },
            "step": self._step(stats["bytes_per_token"]),
        }

    def _request(self, r, now: float, holders: dict, tokens_of: dict, block_bytes: int) -> dict:
        """A running request's entry; notes which blocks it holds and their tokens."""
        store, bs = self.engine.store, self.engine.store.block_size
        table = r.block_table.block_ids
        held = r.num_kv_tokens
        policy = r.kv_policy
        if policy is not None:  # the cache holds the tokens its policy kept, then newer ones
            positions = r.policy_state.positions(held, r.num_dropped)
        else:  # cache index = position; a sliding window's dropped blocks are NULL_BLOCK
            positions = [p for j, b in enumerate(table) if b != NULL_BLOCK
                         for p in range(j * bs, min((j + 1) * bs, held))]  # fmt: skip
        live = [b for b in table if b != NULL_BLOCK]
        for j, b in enumerate(live):
            holders.setdefault(b, []).append(r.request_id)
            tokens_of.setdefault(b, runs(positions[j * bs : (j + 1) * bs]))
        computed = r.num_computed_tokens
        held_runs = runs(positions)
        fmt = store.format
        window: list[int] = []
        if r.window_blocks and fmt.residual_tokens:  # int4, int2: unpacked recent blocks
            start = max(0, (held - fmt.residual_tokens) // bs * bs)
            sinks = min(fmt.sink_blocks * bs, start)
            window = positions[:sinks] + positions[start:held]
            for b in r.window_blocks:
                holders.setdefault(b, []).append(r.request_id)
                tokens_of.setdefault(b, runs(window))
        m = r.metrics
        decoded = len(r.output_token_ids) - 1
        since = None if m.first_token_s is None else now - m.first_token_s
        cached = min(m.cached_tokens, computed)
        ranks = self.engine.tensor_parallel_size
        return {
            "id": r.request_id,
            "prompt_tokens": len(r.prompt_token_ids),
            "computed_tokens": computed,
            "output_tokens": len(r.output_token_ids),
            "cached_tokens": m.cached_tokens,
            "blocks": [-1 if b == NULL_BLOCK else b for b in table],
            "window_blocks": list(r.window_blocks),
            "ttft_s": None if m.first_token_s is None else m.first_token_s - m.arrival_s,
            "decode_tokens_per_s": decoded / since if decoded > 0 and since else None,
            "policy": None if policy is None else {"name": policy.name, "budget": policy.budget},
            "regions": {
                "prefix_hit": span(0, cached),
                "computed": span(cached, computed),
                "pending": span(computed, r.num_tokens),
                "held": held_runs,
                "dropped": gaps(held_runs, computed),
                "window": runs(window),
            },
            "bytes": (len(live) + len(r.window_blocks)) * block_bytes,
            "planned_bytes": ranks * bytes_per_request(store.spec, fmt, bs, max(held, 1)),
        }

    @staticmethod
    def _depth(pool, b: int, depths: dict[int, int | None]) -> int | None:
        """A cached block's index in its prefix (None: a block before it left the pool)."""
        chain, node = [], b
        while node not in depths:
            parent_key = pool.parent_of(node)
            parent = None if parent_key is None else pool.lookup(parent_key)
            if parent is None:
                depths[node] = 0 if parent_key is None else None
                break
            chain.append(node)
            node = parent
        depth = depths[node]
        for c in reversed(chain):
            depth = None if depth is None else depth + 1
            depths[c] = depth
        return depths[b]

    def _step(self, kv_bytes_per_token: float) -> dict | None:
        """The last decode-only step against its floor: (weights + KV read) / bandwidth."""
        last = self.engine.last_decode
        if last is None:
            return None
        if self._bandwidth is None:
            runner = self.engine.runner
            self._weights_bytes = weights_read(runner.model)[1] * self.engine.tensor_parallel_size
            device = self.engine.device
            kind = device.type if hasattr(device, "type") else str(device)
            self._bandwidth = memory_bandwidth(COPY_BYTES.get(kind, 2**28), kind)
        kv_bytes = last.kv_tokens * kv_bytes_per_token
        floor = (self._weights_bytes + kv_bytes) / self._bandwidth
        return {
            "seconds": last.seconds,
            "batch": last.batch,
            "kv_tokens": last.kv_tokens,
            "weights_bytes": self._weights_bytes,
            "kv_bytes": kv_bytes,
            "bandwidth": self._bandwidth,
            "floor_s": floor,
            "ratio": floor / last.seconds,
        }
