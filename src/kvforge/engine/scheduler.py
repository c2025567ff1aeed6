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

When a running request needs a block and none is free, the most recently
admitted running request is preempted: its blocks go back to the pool and it
waits at the head of the queue, to be recomputed (prompt + output so far)
when it is admitted again. A request that could never fit alone is refused
at `add`, so one request can always make progress: no deadlock.
"""

from collections import deque
from dataclasses import dataclass

from kvforge.engine.request import Request, Status
from kvforge.errors import KVForgeError
from kvforge.kvcache.block_pool import BlockPool


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits. Every running request must get its decode token each step,
    so the token budget is at least the number of sequences."""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 256

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise KVForgeError(f"{name} must be a positive integer, got {value!r}")
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

    @property
    def samples(self) -> bool:
        """True when this step computes the request's last known token: a new one follows."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


class Scheduler:
    """Decides which tokens of which requests run in each step; owns the block pool."""

    def __init__(self, pool: BlockPool, config: SchedulerConfig) -> None:
        self.pool = pool
        self.config = config
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
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
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
            request = self.waiting[0]  # waiting: nothing computed, an empty block table
            block_size = request.block_table.block_size
            hits = self._prefix_hits(request)
            cached = len(hits) * block_size
            num_new = min(request.num_tokens - cached, budget)
            # new blocks, plus the hit blocks that leave the free queue when taken
            needed = -(-(cached + num_new) // block_size) - len(hits)
            reused = sum(1 for b in hits if self.pool.ref_count(b) == 0)
            if needed + reused > self.pool.num_free:
                break
            self.waiting.popleft()
            if hits:
                self.pool.take(hits)
                request.block_table.adopt(hits)
                request.num_registered_blocks = len(hits)
                request.num_computed_tokens = cached
            self._count_prefix(request, cached)
            request.status = Status.RUNNING
            self.running.append(request)
            batch.append(self._reserve(request, num_new))
            budget -= num_new
        return batch

    def _prefix_hits(self, request: Request) -> list[int]:
        """The blocks of the longest cached prefix of `request` (at most all but its last
        token: that one is always computed, to sample from)."""
        if request.cache_seed is None:
            return []
        limit = (request.num_tokens - 1) // request.block_table.block_size
        hits = []
        for key in request.block_keys[:limit]:
            block_id = self.pool.lookup(key)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def _count_prefix(self, request: Request, cached: int) -> None:
        """A request's first admission counts toward the hit rate; re-admissions after a
        preemption do not (their hits are recompute saved, not prompt reuse)."""
        if request.metrics.preemptions == 0 and request.cache_seed is not None:
            request.metrics.cached_tokens = cached
            self.prefix_queries += len(request.prompt_token_ids)
            self.prefix_hits += cached

    def register_computed_blocks(self, request: Request) -> None:
        """Put the request's newly computed full blocks in the prefix cache."""
        if request.cache_seed is None:
            return
        table = request.block_table
        full = min(request.num_computed_tokens // table.block_size, len(request.block_keys))
        for i in range(request.num_registered_blocks, full):
            self.pool.cache(table.block_ids[i], request.block_keys[i])
        request.num_registered_blocks = max(request.num_registered_blocks, full)

    def _reserve(self, request: Request, num_new: int) -> ScheduledRequest:
        table = request.block_table
        new_blocks = self.pool.allocate(table.blocks_needed(num_new))
        slots = table.append_tokens(num_new, new_blocks)
        return ScheduledRequest(request, num_new, slots)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        request.block_table.release(self.pool)  # its full blocks stay cached for re-admission
        request.num_computed_tokens = request.num_registered_blocks = 0
        request.status = Status.WAITING
        request.metrics.preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def finish(self, request: Request, reason: str) -> None:
        """End a request (running or waiting) and return its blocks to the pool."""
        if request.status is Status.RUNNING:
            self.running.remove(request)
        elif request.status is Status.WAITING and request in self.waiting:
            self.waiting.remove(request)
        request.block_table.release(self.pool)
        request.status = Status.FINISHED
        request.finish_reason = reason
