"""What `GET /debug/kv` answers: one snapshot of the KV cache, taken between two steps of
the engine (so every count in it agrees with every other).

Schema (version 1), top level:

    schema_version      1
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
                        requests (ids holding it)}
    requests            the running requests, in batch order: {id, prompt_tokens,
                        computed_tokens, output_tokens, cached_tokens, blocks (its block
                        table, -1 for a block freed out of a sliding window), window_blocks,
                        ttft_s, decode_tokens_per_s, text (only with --inspect-show-text)}
    waiting             requests queued
    prefix              {queries, hits, hit_rate, evictions} (tokens; evicted blocks)
    tiers               the lower tiers' counters (kv_stats()'s host_*, disk_*, remote_*)
    bytes               {per_token, per_token_fp16, per_token_per_rank, per_block,
                         allocated, in_use, tensor_parallel_size}

Counts are exact: when the engine is idle they equal `kv_stats()` and /metrics.
"""

import time

from kvforge.kvcache.block_table import NULL_BLOCK
from kvforge.planner import bytes_per_block

SCHEMA_VERSION = 1


def kv_snapshot(engine, show_text: bool = False) -> dict:
    """The snapshot of `engine`'s cache (call it between steps, on the engine's thread)."""
    stats = engine.kv_stats()
    pool, manager, store = engine.pool, engine.manager, engine.store
    running = list(engine.scheduler.running)
    holders: dict[int, list[str]] = {}
    window: set[int] = set()
    requests = []
    now = time.perf_counter()
    for r in running:
        table = r.block_table.block_ids
        for b in table:
            if b != NULL_BLOCK:
                holders.setdefault(b, []).append(r.request_id)
        window.update(r.window_blocks)
        m = r.metrics
        decoded = len(r.output_token_ids) - 1
        since = None if m.first_token_s is None else now - m.first_token_s
        entry = {
            "id": r.request_id,
            "prompt_tokens": len(r.prompt_token_ids),
            "computed_tokens": r.num_computed_tokens,
            "output_tokens": len(r.output_token_ids),
            "cached_tokens": m.cached_tokens,
            "blocks": [-1 if b == NULL_BLOCK else b for b in table],
            "window_blocks": list(r.window_blocks),
            "ttft_s": None if m.first_token_s is None else m.first_token_s - m.arrival_s,
            "decode_tokens_per_s": decoded / since if decoded > 0 and since else None,
        }
        if show_text:
            entry["text"] = engine.decode_text(r)
        requests.append(entry)
    free = pool.free_block_ids()
    lru = [b for b in free if pool.key_of(b) is not None]
    blocks = []
    for b in range(pool.num_blocks):
        refs, key = pool.ref_count(b), pool.key_of(b)
        if refs == 0 and key is None:
            continue
        state = "cached" if refs == 0 else "window" if b in window else "used"
        blocks.append({"id": b, "state": state, "ref_count": refs,
                       "prefix_key": None if key is None else key.hex()[:16],
                       "requests": holders.get(b, [])})  # fmt: skip
    ranks = engine.tensor_parallel_size
    block_bytes = ranks * bytes_per_block(store.spec, store.format, store.block_size)
    fp16 = store.spec.num_layers * 2 * store.spec.num_kv_heads * store.spec.head_dim * 2
    queries, hits = manager.prefix_queries, manager.prefix_hits
    prefix = {"queries": queries, "hits": hits, "hit_rate": hits / queries if queries else None,
              "evictions": stats["prefix_cache_evictions"]}  # fmt: skip
    return {
        "schema_version": SCHEMA_VERSION,
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
        "tiers": engine.tiers.stats() if engine.tiers is not None else {},
        "bytes": {
            "per_token": stats["bytes_per_token"],
            "per_token_fp16": fp16 * ranks,
            "per_token_per_rank": stats["bytes_per_token_per_rank"],
            "per_block": block_bytes,
            "allocated": stats["kv_bytes_allocated"],
            "in_use": stats["blocks_used"] * block_bytes,
            "tensor_parallel_size": ranks,
        },
    }
