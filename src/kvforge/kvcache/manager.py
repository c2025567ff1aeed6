"""The KV cache manager: the one owner of block decisions.

Everything that decides which block holds what goes through here: a request's
prefix keys, admission (prefix hits on the device, then in the lower tiers, and
the blocks the rest needs), slots for new tokens, registering computed blocks in
the prefix cache, compaction under an eviction policy, blocks a sliding window no
longer reads, preemption (swap or recompute), freeing, and the exact counts that
`kv_stats()` reports.

It holds no tensors. What must happen to block contents is appended to `ops`
(`block_ops`) and executed in order by the model runner before the next forward
pass: the scheduler's output carries them, as vLLM's `SchedulerOutput` does.
A lower tier's contents are fetched at decision time (a disk entry is only known
good once read) and travel in the `LoadBlocks` operation.

    scheduler ── admit / allocate_slots / preempt / free ──▶ KVCacheManager ─▶ ops
    engine ── register / drop_out_of_window ─────────────▶ KVCacheManager ─▶ ops
    pruning ── compact / rotate_keys ────────────────────▶ KVCacheManager ─▶ ops
    runner ◀── take_ops() ── executes them against the store and the tiers
"""

from dataclasses import dataclass
from typing import Any, Protocol

from kvforge.kvcache.block_ops import (
    BlockOp,
    CopyBlocks,
    DropSwapped,
    LoadBlocks,
    MoveTokens,
    Retire,
    RotateKeys,
    SaveBlock,
    SwapIn,
    SwapOut,
)
from kvforge.kvcache.block_pool import BlockPool
from kvforge.kvcache.block_table import NULL_BLOCK, BlockTable
from kvforge.kvcache.prefix_cache import chain_seed, extend_keys


class CachedSequence(Protocol):
    """What the manager reads and keeps up to date on a request (engine.request.Request)."""

    request_id: str
    block_table: BlockTable
    cache_seed: bytes | None  # None: this request does not use the prefix cache
    block_keys: list[bytes]  # keys of its full blocks so far
    num_registered_blocks: int  # of its table's blocks, how many are in the cache
    num_computed_tokens: int
    num_dropped: int  # computed tokens an eviction policy let go of
    swapped: bool  # its blocks are in host memory (preempted by swap)
    window_blocks: list[int]  # blocks borrowed for its recent window while it runs (int4, int2)

    @property
    def prefix_hit_limit(self) -> int: ...  # the most of its first tokens a prefix hit serves

    @property
    def num_tokens(self) -> int: ...

    @property
    def num_kv_tokens(self) -> int: ...

    def token_ids(self, start: int, end: int) -> list[int]: ...


class LowerTiers(Protocol):
    """The prefix cache's lower tiers, as the manager sees them (kvcache.tiers)."""

    def fetch_run(self, keys: list[bytes]) -> list[tuple[Any, str]]:
        """(contents, "host", "disk" or "remote") of the leading blocks of `keys` that the
        tiers hold, up to the first they do not."""

    def loaded(self, sources: list[str]) -> None:
        """Blocks from these tiers were loaded into the pool."""

    @property
    def writes_through(self) -> bool:
        """Whether newly cached blocks are written through (to disk, the remote tier)."""


@dataclass(frozen=True)
class Admission:
    """A request admitted: `num_new` tokens reserved at `slots`, after `cached` tokens
    found in the prefix cache (`from_host`, `from_disk`, `from_remote` of them loaded from
    the tiers)."""

    num_new: int
    slots: list[int]
    cached: int = 0
    from_host: int = 0
    from_disk: int = 0
    from_remote: int = 0


class KVCacheManager:
    """Decides which blocks hold what; records what must happen to their contents."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        token_moves: bool = True,
        cache_id: tuple[str, str] | None = None,
        tiers: LowerTiers | None = None,
        sliding_window: int | None = None,
        recent_tokens: int = 0,
        window_blocks: int = 0,
        events=None,
    ) -> None:
        """`token_moves`: single tokens can move between slots (else only whole blocks:
        int2). `cache_id`: (model id, KV format) that prefix keys are seeded with; None
        turns prefix caching off. `tiers`: the lower tiers, if any. `sliding_window`:
        the model's; blocks wholly before it are freed. `recent_tokens`: the newest tokens
        the store keeps apart (int2's window), never freed. `window_blocks`: the blocks a
        running request borrows to hold those tokens in full precision (int4, int2): taken
        with its first slots, given back when it leaves the device. `events`: a
        `kvforge.events.KVEvents` told of every block the prefix cache stores or evicts."""
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.token_moves = token_moves
        self.cache_id = cache_id
        self.tiers = tiers if cache_id is not None else None
        self.sliding_window = sliding_window
        self.recent_tokens = recent_tokens
        self.window_blocks = window_blocks
        self.num_window_blocks = 0  # borrowed by the requests on the device now
        self.ops: list[BlockOp] = []
        self._freed_when_swapped: dict[str, int] = {}  # request id -> table.num_freed
        self.events = events if cache_id is not None else None
        if self.tiers is not None or self.events is not None:
            self.pool.on_evict = self._evicted
        self.num_preemptions = 0
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    def take_ops(self) -> list[BlockOp]:
        """The operations recorded since the last call, in order, for the runner."""
        ops, self.ops = self.ops, []
        return ops

    # --- prefix keys ---------------------------------------------------------------------

    def start(self, seq: CachedSequence, cache_salt: str | None = None) -> None:
        """A new request: seed its prefix keys (requests with different salts never share
        blocks) and key its full prompt blocks."""
        if self.cache_id is not None:
            model_id, fmt = self.cache_id
            seq.cache_seed = chain_seed(model_id, fmt, self.block_size, cache_salt)
            self.update_keys(seq)

    def update_keys(self, seq: CachedSequence) -> None:
        """Key every block of the request that has become full (prompt or output)."""
        if seq.cache_seed is not None and seq.num_tokens // self.block_size > len(seq.block_keys):
            tokens = seq.token_ids(0, seq.num_tokens)
            extend_keys(seq.block_keys, seq.cache_seed, tokens, self.block_size)

    # --- admission and growth ------------------------------------------------------------

    def _window_needed(self, seq: CachedSequence) -> int:
        """Blocks the request must still borrow for its recent window (int4, int2)."""
        return 0 if seq.window_blocks else self.window_blocks

    def _lend_window(self, seq: CachedSequence) -> None:
        if not seq.window_blocks and self.window_blocks:
            seq.window_blocks = self.pool.allocate(self.window_blocks)
            self.num_window_blocks += self.window_blocks

    def _return_window(self, seq: CachedSequence) -> None:
        """Give the window's blocks back, after the operation (Retire, SwapOut) that reads
        what they hold was recorded."""
        if seq.window_blocks:
            self.pool.release(seq.window_blocks)
            self.num_window_blocks -= len(seq.window_blocks)
            seq.window_blocks = []

    def can_allocate(self, seq: CachedSequence, num_new: int) -> bool:
        needed = seq.block_table.blocks_needed(num_new) + self._window_needed(seq)
        return needed <= self.pool.num_free

    def allocate_slots(self, seq: CachedSequence, num_new: int) -> list[int]:
        """Reserve slots for `num_new` more tokens (blocks taken as needed), and the
        request's recent window when it has none yet."""
        table = seq.block_table
        slots = table.append_tokens(num_new, self.pool.allocate(table.blocks_needed(num_new)))
        self._lend_window(seq)
        return slots

    def admit(self, seq: CachedSequence, cap: int, first: bool) -> Admission | None:
        """Take the request's cached prefix, load what the lower tiers hold, and reserve
        up to `cap` more tokens; None (nothing changed) if the free blocks do not allow it.
        `first`: its first admission, which counts toward the hit rate (a re-admission
        after a preemption saves recompute, not prompt work)."""
        if seq.swapped:
            return self._admit_swapped(seq, cap)
        bs = self.block_size
        device, rest = self._device_hits(seq)
        reused = sum(1 for b in device if self.pool.ref_count(b) == 0)
        # lower-tier hits never need fewer new blocks than none would: when even that does
        # not fit, do not fetch them (a request waiting for blocks would fetch them again
        # at each step)
        if self._blocks_needed(seq, len(device), 0, cap) + reused > self.pool.num_free:
            return None
        lower = self._lower_hits(rest)
        cached = (len(device) + len(lower)) * bs
        num_new = min(seq.num_tokens - cached, cap)
        # new blocks (lower-tier hits included), plus device hits that leave the free queue
        if self._blocks_needed(seq, len(device), len(lower), cap) + reused > self.pool.num_free:
            return None
        self.pool.take(device)
        loaded = self.pool.allocate(len(lower))
        sources = [source for _, _, source in lower]
        if lower:
            self.ops.append(LoadBlocks(loaded, [contents for _, contents, _ in lower]))
            keys = seq.block_keys
            for i, (block_id, (key, _, _)) in enumerate(zip(loaded, lower, strict=True)):
                at = len(device) + i
                self.pool.cache(block_id, key, keys[at - 1] if at else None)
            self.tiers.loaded(sources)
            self._announce(seq, len(device), len(device) + len(lower))
        if cached:
            seq.block_table.adopt(device + loaded)
            seq.num_registered_blocks = len(device) + len(lower)
            seq.num_computed_tokens = cached
        if first and seq.cache_seed is not None:
            self.prefix_queries += seq.num_tokens
            self.prefix_hits += cached
        slots = self.allocate_slots(seq, num_new)
        return Admission(num_new, slots, cached, sources.count("host") * bs,
                         sources.count("disk") * bs, sources.count("remote") * bs)  # fmt: skip

    def _admit_swapped(self, seq: CachedSequence, cap: int) -> Admission | None:
        """Copy a swapped-out request's blocks back and go on where it stopped."""
        table, bs = seq.block_table, self.block_size
        computed = seq.num_kv_tokens
        num_blocks = -(-computed // bs)
        freed = self._freed_when_swapped.pop(seq.request_id)
        num_new = min(seq.num_tokens - seq.num_computed_tokens, cap)
        needed = -(-(computed + num_new) // bs) - freed + self._window_needed(seq)
        if needed > self.pool.num_free:
            self._freed_when_swapped[seq.request_id] = freed
            return None
        block_ids = self.pool.allocate(num_blocks - freed)
        self._lend_window(seq)
        self.ops.append(SwapIn(seq.request_id, block_ids, seq.window_blocks))
        seq.swapped = False
        table.adopt([NULL_BLOCK] * freed + block_ids, computed)
        seq.num_registered_blocks = 0
        self.register(seq)
        return Admission(num_new, self.allocate_slots(seq, num_new))

    def _blocks_needed(self, seq: CachedSequence, device: int, lower: int, cap: int) -> int:
        """New blocks an admission takes with `device` and `lower` cached blocks found."""
        cached = (device + lower) * self.block_size
        num_new = min(seq.num_tokens - cached, cap)
        return -(-(cached + num_new) // self.block_size) - device + self._window_needed(seq)

    def _device_hits(self, seq: CachedSequence) -> tuple[list[int], list[bytes]]:
        """The longest cached prefix of the request on the device — at most all but its
        last token, which is always computed, to sample from: its blocks, and the keys of
        the request's later full blocks, which the lower tiers may hold."""
        if seq.cache_seed is None:
            return [], []
        usable = min(seq.num_tokens - 1, seq.prefix_hit_limit)
        keys = seq.block_keys[: usable // self.block_size]
        device: list[int] = []
        for key in keys:
            block_id = self.pool.lookup(key)
            if block_id is None:
                break
            device.append(block_id)
        return device, keys[len(device) :]

    def _lower_hits(self, keys: list[bytes]) -> list[tuple[bytes, Any, str]]:
        """(key, contents, source) of the leading `keys` the lower tiers hold."""
        if self.tiers is None or not keys:
            return []
        found = self.tiers.fetch_run(keys)  # the leading ones: at most all of them
        return [(key, *hit) for key, hit in zip(keys[: len(found)], found, strict=True)]

    # --- after a pass ----------------------------------------------------------------

    def register(self, seq: CachedSequence) -> None:
        """Put the request's newly computed full blocks in the prefix cache (and write
        them through to disk when the tiers do)."""
        if seq.cache_seed is None:
            return
        table = seq.block_table
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_keys))
        persist = self.tiers is not None and self.tiers.writes_through
        run = None  # the first block of the current run of newly cached ones
        for i in range(max(seq.num_registered_blocks, table.num_freed), full):
            block_id, key = table.block_ids[i], seq.block_keys[i]
            if self.pool.cache(block_id, key, seq.block_keys[i - 1] if i else None):
                run = i if run is None else run
                if persist:
                    self.ops.append(SaveBlock(block_id, key, spill=False))
            elif run is not None:
                self._announce(seq, run, i)
                run = None
        if run is not None:
            self._announce(seq, run, full)
        seq.num_registered_blocks = max(seq.num_registered_blocks, full)

    def drop_out_of_window(self, seq: CachedSequence) -> None:
        """Free the request's blocks that its sliding window will never read again: every
        later query sits at position >= num_computed_tokens, and sees the keys after
        position - window. Blocks the store keeps apart (int2's recent ones) stay."""
        if self.sliding_window is None:
            return
        horizon = seq.num_computed_tokens - max(self.sliding_window - 1, self.recent_tokens)
        table = seq.block_table
        n = min(horizon // self.block_size, len(table.block_ids))
        if n > table.num_freed:
            dropped = table.block_ids[table.num_freed : n]
            self.ops.append(Retire(dropped, len(dropped) * self.block_size))
            table.free_leading(n, self.pool)

    def rotate_keys(self, seq: CachedSequence, n: int, offset: int, state: Any) -> None:
        """Re-rotate the keys of the request's first `n` cached tokens by `offset`
        positions (from their keys as first computed, kept while `state` lives)."""
        slots = [seq.block_table.slot(i) for i in range(n)]
        self.ops.append(RotateKeys(slots, offset, state))

    # --- leaving the device --------------------------------------------------------------

    def preempt(self, seq: CachedSequence, swap: bool) -> None:
        """Take the request's blocks back: copied to host memory first (`swap`), or given
        up to be recomputed. Its full blocks stay cached for its re-admission."""
        table = seq.block_table
        if swap and seq.num_computed_tokens > 0:
            # the blocks of computed tokens (slots reserved this step hold nothing yet)
            computed_blocks = -(-seq.num_kv_tokens // self.block_size)
            self.ops.append(SwapOut(seq.request_id, table.block_ids[table.num_freed :
                                                                     computed_blocks]))  # fmt: skip
            seq.swapped = True
            self._freed_when_swapped[seq.request_id] = table.num_freed
        else:
            self._retire(seq)
            seq.num_computed_tokens = seq.num_dropped = 0
        self._return_window(seq)
        table.release(self.pool)
        seq.num_registered_blocks = 0
        self.num_preemptions += 1

    def free(self, seq: CachedSequence) -> None:
        """The request ended (finished, aborted, or scored): its blocks go back to the
        pool; full ones stay cached (LRU)."""
        self._retire(seq)
        self._return_window(seq)
        seq.block_table.release(self.pool)
        if seq.swapped:
            self.ops.append(DropSwapped(seq.request_id))
            self._freed_when_swapped.pop(seq.request_id)
            seq.swapped = False

    def _retire(self, seq: CachedSequence) -> None:
        table = seq.block_table
        live = table.block_ids[table.num_freed :]
        if live:
            self.ops.append(Retire(live, seq.num_kv_tokens - table.num_freed * self.block_size))

    def _evicted(self, block_id: int, key: bytes) -> None:
        """A cached block is about to be reused: keep its contents in the lower tiers."""
        if self.tiers is not None:
            self.ops.append(SaveBlock(block_id, key, spill=True))
        if self.events is not None:
            self.events.removed([key])

    def _announce(self, seq: CachedSequence, first: int, end: int) -> None:
        """Blocks first .. end-1 of the request are now in the prefix cache."""
        if self.events is not None and end > first:
            bs = self.block_size
            parent = seq.block_keys[first - 1] if first else None
            self.events.stored(seq.block_keys[first:end], parent,
                               seq.token_ids(first * bs, end * bs))  # fmt: skip

    # --- an eviction policy's compaction -------------------------------------------------

    def compact(self, seq: CachedSequence, keep: list[int], rewritten: int = 0) -> bool:
        """Keep only the cached tokens at indices `keep` (sorted), moved to the table's
        first slots in order; blocks no longer needed go back to the pool. False (and
        nothing changed) when the pool lacks the fresh blocks it would take.
        `rewritten`: the first kept tokens the caller will modify after the move; their
        blocks end up the request's own.

        A destination block that receives exactly one old block (whole, or the partial
        last one) takes that block as it is, with no copy. Any other is written: into
        the request's own old block at that place when no one else holds it and the
        prefix cache does not (its content changes), else into a fresh block, so shared
        and cached blocks are never modified; an old block that must be copied whole is
        copied as a block. A store whose tokens cannot move one by one (int2) is only
        ever given whole old blocks to keep. The request stops publishing blocks to the
        prefix cache: its blocks no longer hold its token prefix.
        """
        table, bs, pool = seq.block_table, self.block_size, self.pool
        old = table.block_ids
        held = seq.num_kv_tokens
        if len(keep) == held:
            return True
        n_blocks = -(-len(keep) // bs)
        parts = [keep[j * bs : (j + 1) * bs] for j in range(n_blocks)]
        aligned: dict[int, int] = {}  # destination index -> old block holding exactly its part
        for j, part in enumerate(parts):
            first, last = part[0], part[-1]
            whole_run = first % bs == 0 and last - first == len(part) - 1
            if whole_run and (len(part) == bs or first + len(part) == held):
                aligned[j] = old[first // bs]
        whole = {j: b for j, b in aligned.items() if j * bs >= rewritten}  # taken as they are
        taken = set(whole.values())

        def own(j: int) -> bool:
            b = old[j]
            return b not in taken and pool.ref_count(b) == 1 and pool.key_of(b) is None

        writable = {j: old[j] for j in range(min(n_blocks, len(old))) if j not in whole and own(j)}
        fresh = n_blocks - len(whole) - len(writable)
        kept_ids = taken | set(writable.values())
        released = [b for b in old if b not in kept_ids]
        copied = {}  # aligned parts copied as blocks (a store whose tokens cannot move)
        if not self.token_moves:
            copied = {j: b for j, b in aligned.items() if j not in whole and writable.get(j) != b}
        copied_ids = set(copied.values())
        freed = sum(1 for b in released if pool.ref_count(b) == 1 and b not in copied_ids)
        if fresh > pool.num_free + freed:
            return False
        # blocks let go of, whole ones first, leave the store's recent window (int2); a
        # block to be copied is released only once read
        n_whole = sum(1 for b in old[: held // bs] if b not in kept_ids)
        self.ops.append(Retire(released, n_whole * bs))  # in table order: whole blocks first
        pool.release(reversed([b for b in released if b not in copied_ids]))
        new_ids = pool.allocate(fresh)
        table.block_ids = [
            whole[j] if j in whole else writable[j] if j in writable else new_ids.pop(0)
            for j in range(n_blocks)
        ]
        src, dst = [], []
        for j, part in enumerate(parts):
            if j in whole or j in copied or aligned.get(j) == table.block_ids[j]:
                continue
            src += [old[p // bs] * bs + p % bs for p in part]
            dst += [table.block_ids[j] * bs + o for o in range(len(part))]
        if src:
            self.ops.append(MoveTokens(src, dst))
        if copied:
            self.ops.append(CopyBlocks(list(copied.values()), [table.block_ids[j] for j in copied]))
            pool.release(reversed([b for b in released if b in copied_ids]))
        table.num_tokens = len(keep)
        seq.num_dropped += held - len(keep)
        seq.cache_seed = None
        return True

    # --- counts --------------------------------------------------------------------------

    def stats(self, running: list[CachedSequence]) -> dict:
        """The block counts of `kv_stats()`, exact: `running` are the requests on the device."""
        bs, pool = self.block_size, self.pool
        stored = sum(r.block_table.num_tokens - r.block_table.num_freed * bs for r in running)
        used = pool.num_used
        held = used - self.num_window_blocks  # in block tables
        return {
            "block_size": bs,
            "blocks_total": pool.num_blocks,
            "blocks_free": pool.num_free,
            "blocks_used": used,
            "tokens_stored": stored,
            "waste_ratio": 0.0 if held == 0 else 1 - stored / (held * bs),
            "blocks_window": self.num_window_blocks,
            "num_preemptions": self.num_preemptions,
            "blocks_cached": pool.num_cached_free,
            "prefix_cache_queries": self.prefix_queries,
            "prefix_cache_hits": self.prefix_hits,
            "prefix_cache_evictions": pool.num_evictions,
        }
