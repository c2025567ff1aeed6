"""Continuous batching with chunked prefill and preemption by recompute.

Every step has a token budget (max_num_batched_tokens). Running requests go
first, in admission order: a decoding request takes 1 token, a request still
prefilling takes the rest of its prompt or what is left of the budget (chunked
prefill). Waiting requests are admitted in arrival order while the budget, the
sequence limit and free blocks allow. Prefill chunks and decode tokens of
different requests share one forward pass.

Prefix caching: a request being admitted first takes the longest run of its
full blocks that the pool still holds (keyed by `prefix_cache`), so only the
rest is computed — never its last token, which must be computed to sample.
Blocks are registered in the cache as soon as their tokens are computed.

Blocks evicted from the pool may live on in lower tiers (host memory, disk):
the lookup goes on there after the last device hit, and the blocks it finds
are loaded into fresh blocks instead of being computed.

When a running request needs a block and none is free, the most recently
admitted running request is preempted: its blocks go back to the pool and it
waits at the head of the queue. With preemption_mode "recompute" its tokens
(prompt + output so far) are computed again when it is admitted again (its
full blocks, still cached, usually spare most of that); with "swap" its blocks
are copied to host memory first and copied back on re-admission. A request
that could never fit alone is refused at `add`, so one request can always
make progress: no deadlock.
"""

from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

from kvforge.engine.request import Request, Status
from kvforge.errors import KVForgeError, positive_int
from kvforge.kvcache.block_pool import BlockPool
from kvforge.kvcache.policy import PolicyState

PREEMPTION_MODES = ("recompute", "swap")


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits. Every running request must get its decode token each step,
    so the token budget is at least the number of sequences."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256
    preemption_mode: str = "recompute"  # or "swap"

    def __post_init__(self) -> None:
        if self.preemption_mode not in PREEMPTION_MODES:
            raise KVForgeError(
                f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, "
                f"got {self.preemption_mode!r}"
            )
        for name in ("max_num_batched_tokens", "max_num_seqs"):
            positive_int(name, getattr(self, name))
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise KVForgeError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs}), or running requests would starve"
            )


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    slot_mapping: list[int]
    # this pass computes the prompt's last token, the first time (a recompute after a
    # preemption goes on from there as generation); scoring counts every chunk as one
    prompt_done: bool = False

    @property
    def samples(self) -> bool:
        """True when this step computes the request's last known token: a new one follows."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


def _cap(request: Request, budget: int) -> int:
    """The most tokens one pass computes for `request`: the step's budget, and what its
    eviction policy reads in one piece (`KVPolicy.max_pass_tokens`)."""
    policy = request.kv_policy
    if policy is None:
        return budget
    return min(budget, policy.max_pass_tokens(request.block_table.block_size))


class BlockIO(Protocol):
    """What the scheduler asks of the engine to move block contents (it holds no tensors)."""

    def fetch_lower(self, key: bytes) -> tuple[Any, str] | None:
        """A block evicted to a lower tier: (its contents, "host" or "disk"), or None."""

    def load(self, block_ids: list[int], contents: list[Any]) -> None:
        """Write block contents into device blocks."""

    def swap_out(self, block_ids: list[int]) -> Any:
        """A host copy of these device blocks."""

    def swap_in(self, block_ids: list[int], swapped: Any) -> None:
        """Write a `swap_out` copy back into device blocks."""

    def retire(self, block_ids: list[int], num_tokens: int) -> None:
        """A request lets go of its blocks (finished, or preempted to recompute) after
        `num_tokens` computed tokens: the store settles what it keeps apart."""

    def persist(self, block_id: int, key: bytes) -> None:
        """A block was just cached: write it through to the disk tier, if there is one."""

    def move_tokens(self, src_slots: list[int], dst_slots: list[int]) -> None:
        """Copy tokens' K/V between slots, every layer (sources read before writes)."""

    def copy_blocks(self, src_ids: list[int], dst_ids: list[int]) -> None:
        """Copy whole blocks as stored, every layer (sources read before writes)."""

    @property
    def token_moves(self) -> bool:
        """Whether single tokens can move between slots (else only whole blocks)."""

    def loaded(self, sources: list[str]) -> None:
        """Blocks from these lower tiers were loaded into the pool (for the tiers' counters)."""


class Scheduler:
    """Decides which tokens of which requests run in each step; owns the block pool."""

    def __init__(self, pool: BlockPool, config: SchedulerConfig, io: BlockIO | None = None):
        self.pool = pool
        self.config = config
        self.io = io
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledRequest]:
        budget = self.config.max_num_batched_tokens
        batch: list[ScheduledRequest] = []
        preempted = False
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            num_new = min(request.num_tokens - request.num_computed_tokens, _cap(request, budget))
            while request.block_table.blocks_needed(num_new) > self.pool.num_free:
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            if request.status is not Status.RUNNING:
                continue
            batch.append(self._reserve(request, num_new))
            budget -= num_new

        # Admitting while requests are being preempted would only thrash.
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]  # waiting: an empty block table
            if request.swapped is not None:
                scheduled = self._admit_swapped(request, budget)
            else:
                scheduled = self._admit(request, budget)
            if scheduled is None:
                break
            self.waiting.popleft()
            request.status = Status.RUNNING
            self.running.append(request)
            batch.append(scheduled)
            budget -= scheduled.num_new_tokens
        return batch

    def _admit(self, request: Request, budget: int) -> ScheduledRequest | None:
        """Take the cached prefix, load what lower tiers hold, reserve the rest; None (and
        nothing changed) if the free blocks do not allow it."""
        block_size = request.block_table.block_size
        device, lower = self._prefix_hits(request)
        cached = (len(device) + len(lower)) * block_size
        num_new = min(request.num_tokens - cached, _cap(request, budget))
        # new blocks (lower-tier hits included), plus device hits that leave the free queue
        needed = -(-(cached + num_new) // block_size) - len(device)
        reused = sum(1 for b in device if self.pool.ref_count(b) == 0)
        if needed + reused > self.pool.num_free:
            return None
        self.pool.take(device)
        loaded = self.pool.allocate(len(lower))
        if lower:
            self.io.load(loaded, [contents for _, contents, _ in lower])
            for block_id, (key, _, _) in zip(loaded, lower, strict=True):
                self.pool.cache(block_id, key)
            self.io.loaded([source for _, _, source in lower])
        if cached:
            request.block_table.adopt(device + loaded)
            request.num_registered_blocks = len(device) + len(lower)
            request.num_computed_tokens = cached
        self._count_prefix(request, cached, [source for _, _, source in lower])
        return self._reserve(request, num_new)

    def _admit_swapped(self, request: Request, budget: int) -> ScheduledRequest | None:
        """Copy a swapped-out request's blocks back and go on where it stopped."""
        computed = request.num_kv_tokens
        num_blocks = -(-computed // request.block_table.block_size)
        num_new = min(request.num_tokens - request.num_computed_tokens, _cap(request, budget))
        total = -(-(computed + num_new) // request.block_table.block_size)
        if total > self.pool.num_free:
            return None
        block_ids = self.pool.allocate(num_blocks)
        self.io.swap_in(block_ids, request.swapped)
        request.swapped = None
        request.block_table.adopt(block_ids, computed)
        request.num_registered_blocks = 0
        self.register_computed_blocks(request)
        return self._reserve(request, num_new)

    def _prefix_hits(self, request: Request) -> tuple[list[int], list[tuple[bytes, Any, str]]]:
        """The longest cached prefix of `request` — at most all but its last token, which is
        always computed, to sample from: device blocks, then (key, contents, source) of
        blocks found in lower tiers after the last device hit."""
        if request.cache_seed is None:
            return [], []
        limit = (request.num_tokens - 1) // request.block_table.block_size
        keys = request.block_keys[:limit]
        device: list[int] = []
        for key in keys:
            block_id = self.pool.lookup(key)
            if block_id is None:
                break
            device.append(block_id)
        lower: list[tuple[bytes, Any, str]] = []
        if self.io is not None:
            for key in keys[len(device) :]:
                found = self.io.fetch_lower(key)
                if found is None:
                    break
                lower.append((key, *found))
        return device, lower

    def _count_prefix(self, request: Request, cached: int, lower_sources: list[str]) -> None:
        """A request's first admission counts toward the hit rate; re-admissions after a
        preemption do not (their hits are recompute saved, not prompt reuse)."""
        if request.metrics.preemptions == 0 and request.cache_seed is not None:
            m, block_size = request.metrics, request.block_table.block_size
            m.cached_tokens = cached
            m.cached_tokens_host = lower_sources.count("host") * block_size
            m.cached_tokens_disk = lower_sources.count("disk") * block_size
            self.prefix_queries += len(request.prompt_token_ids)
            self.prefix_hits += cached

    def register_computed_blocks(self, request: Request) -> None:
        """Put the request's newly computed full blocks in the prefix cache."""
        if request.cache_seed is None:
            return
        table = request.block_table
        full = min(request.num_computed_tokens // table.block_size, len(request.block_keys))
        for i in range(request.num_registered_blocks, full):
            if self.pool.cache(table.block_ids[i], request.block_keys[i]) and self.io:
                self.io.persist(table.block_ids[i], request.block_keys[i])
        request.num_registered_blocks = max(request.num_registered_blocks, full)

    def _reserve(self, request: Request, num_new: int) -> ScheduledRequest:
        table = request.block_table
        new_blocks = self.pool.allocate(table.blocks_needed(num_new))
        slots = table.append_tokens(num_new, new_blocks)
        end = request.num_computed_tokens + num_new
        prompt_done = not request.policy_state.prefilled and end >= len(request.prompt_token_ids)
        return ScheduledRequest(request, num_new, slots, prompt_done)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        table = request.block_table
        if self.config.preemption_mode == "swap" and request.num_computed_tokens > 0:
            # the blocks of computed tokens (slots reserved this step hold nothing yet)
            computed_blocks = -(-request.num_kv_tokens // table.block_size)
            request.swapped = self.io.swap_out(table.block_ids[:computed_blocks])
        else:
            self._retire(request)
            request.num_computed_tokens = request.num_dropped = 0
            request.policy_state = PolicyState()  # recomputed from the start, pruned again
        table.release(self.pool)  # its full blocks stay cached for re-admission
        request.num_registered_blocks = 0
        request.status = Status.WAITING
        request.metrics.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _retire(self, request: Request) -> None:
        if self.io is not None and request.block_table.block_ids:
            self.io.retire(request.block_table.block_ids, request.num_kv_tokens)

    def compact(self, request: Request, keep: list[int], rewritten: int = 0) -> bool:
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
        table, bs = request.block_table, request.block_table.block_size
        old = table.block_ids
        held = request.num_kv_tokens
        if len(keep) == held:
            return True
        n_blocks = -(-len(keep) // bs)
        parts = [keep[j * bs : (j + 1) * bs] for j in range(n_blocks)]
        aligned: dict[int, int] = {}  # destination index -> old block holding exactly its part
        for j, part in enumerate(parts):
            first = part[0]
            if (first % bs == 0 and part[-1] - first == len(part) - 1
                    and (len(part) == bs or first + len(part) == held)):  # fmt: skip
                aligned[j] = old[first // bs]
        whole = {j: b for j, b in aligned.items() if j * bs >= rewritten}  # taken as they are
        taken = set(whole.values())
        writable = {
            j: old[j]
            for j in range(n_blocks)
            if j not in whole and j < len(old) and old[j] not in taken
            and self.pool.ref_count(old[j]) == 1 and self.pool.key_of(old[j]) is None
        }  # fmt: skip
        fresh = n_blocks - len(whole) - len(writable)
        kept_ids = taken | set(writable.values())
        released = [b for b in old if b not in kept_ids]
        by_block = self.io.token_moves  # else: aligned parts are copied as blocks
        copied = {j: b for j, b in aligned.items()
                  if j not in whole and writable.get(j) != b and not by_block}  # fmt: skip
        freed = sum(1 for b in released
                    if self.pool.ref_count(b) == 1 and b not in copied.values())  # fmt: skip
        if fresh > self.pool.num_free + freed:
            return False
        # blocks let go of, whole ones first, leave the store's recent window (int2); a
        # block to be copied is released only once read
        n_whole = sum(1 for b in old[: held // bs] if b not in kept_ids)
        self.io.retire(released, n_whole * bs)  # in table order: whole blocks first
        self.pool.release(reversed([b for b in released if b not in copied.values()]))
        new_ids = self.pool.allocate(fresh)
        table.block_ids = [whole[j] if j in whole else writable[j] if j in writable
                           else new_ids.pop(0) for j in range(n_blocks)]  # fmt: skip
        src, dst = [], []
        for j, part in enumerate(parts):
            if j in whole or j in copied or aligned.get(j) == table.block_ids[j]:
                continue
            src += [old[p // bs] * bs + p % bs for p in part]
            dst += [table.block_ids[j] * bs + o for o in range(len(part))]
        if src:
            self.io.move_tokens(src, dst)
        if copied:
            self.io.copy_blocks(list(copied.values()), [table.block_ids[j] for j in copied])
            self.pool.release(reversed([b for b in released if b in copied.values()]))
        table.num_tokens = len(keep)
        request.num_dropped += held - len(keep)
        request.cache_seed = None
        return True

    def finish(self, request: Request, reason: str) -> None:
        """End a request (running or waiting) and return its blocks to the pool."""
        if request.status is Status.RUNNING:
            self.running.remove(request)
        elif request.status is Status.WAITING and request in self.waiting:
            self.waiting.remove(request)
        self._retire(request)
        request.block_table.release(self.pool)
        request.swapped = None
        request.status = Status.FINISHED
        request.finish_reason = reason
