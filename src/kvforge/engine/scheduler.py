"""Continuous batching with chunked prefill and preemption.

Every step has a token budget (max_num_batched_tokens). Running requests go
first, in admission order: a decoding request takes 1 token, a request still
prefilling takes the rest of its prompt or what is left of the budget (chunked
prefill). Waiting requests are admitted in arrival order while the budget, the
sequence limit and free blocks allow. Prefill chunks and decode tokens of
different requests share one forward pass.

The scheduler holds the queues, the budget and the choice of whom to preempt;
every block decision is the KV cache manager's (`kvcache/manager.py`): the
cached prefix a request is admitted with (device hits, then blocks loaded from
the host and disk tiers — never its last token, which must be computed to
sample), the blocks its new tokens take, and what preemption does. Each step's
output carries the manager's operations on block contents for the runner.

When a running request needs a block and none is free, the most recently
admitted running request is preempted: its blocks go back to the pool and it
waits at the head of the queue. With preemption_mode "recompute" its tokens
(prompt + output so far) are computed again when it is admitted again (its
full blocks, still cached, usually spare most of that); with "swap" its blocks
are copied to host memory first and copied back on re-admission. A request
that could never fit alone is refused at `add`, so one request can always
make progress: no deadlock.
"""

import time
from collections import deque
from dataclasses import dataclass, field

from kvforge.engine.request import Request, Status
from kvforge.errors import KVForgeError, positive_int
from kvforge.kvcache.block_ops import BlockOp
from kvforge.kvcache.manager import KVCacheManager
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


@dataclass
class SchedulerOutput:
    """One step's plan: the tokens each request computes, and the operations on block
    contents (`kvcache.block_ops`) the runner executes first, in order."""

    scheduled: list[ScheduledRequest]
    ops: list[BlockOp] = field(default_factory=list)


class Scheduler:
    """Decides which tokens of which requests run in each step: the queues, the token
    budget and whom to preempt. Every block decision is the KV cache manager's."""

    def __init__(self, manager: KVCacheManager, config: SchedulerConfig):
        self.manager = manager
        self.config = config
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        self.waiting.append(request)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        batch: list[ScheduledRequest] = []
        preempted = False
        for request in list(self.running):
            if budget == 0:
                break
            if request.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            remaining = request.num_tokens - request.num_computed_tokens
            num_new = min(remaining, self._cap(request, budget))
            while not self.manager.can_allocate(request, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is request:
                    break
            if request.status is not Status.RUNNING:
                continue
            slots = self.manager.allocate_slots(request, num_new)
            batch.append(self._scheduled(request, num_new, slots))
            budget -= num_new

        # Admitting while requests are being preempted would only thrash.
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            request = self.waiting[0]  # waiting: an empty block table
            first = request.metrics.preemptions == 0
            admitted = self.manager.admit(request, self._cap(request, budget), first)
            if admitted is None:
                break
            if request.metrics.scheduled_s is None:
                request.metrics.scheduled_s = time.perf_counter()
            if first and request.cache_seed is not None:
                m = request.metrics
                m.cached_tokens = admitted.cached
                m.cached_tokens_host, m.cached_tokens_disk = admitted.from_host, admitted.from_disk
                m.cached_tokens_remote = admitted.from_remote
            self.waiting.popleft()
            request.status = Status.RUNNING
            self.running.append(request)
            batch.append(self._scheduled(request, admitted.num_new, admitted.slots))
            budget -= admitted.num_new
        return SchedulerOutput(batch, self.manager.take_ops())

    def _cap(self, request: Request, budget: int) -> int:
        """The most tokens one pass computes for `request`: the step's budget, and what its
        eviction policy reads in one piece (`KVPolicy.max_pass_tokens`)."""
        policy = request.kv_policy
        if policy is None:
            return budget
        return min(budget, policy.max_pass_tokens(self.manager.block_size))

    def _scheduled(self, request: Request, num_new: int, slots: list[int]) -> ScheduledRequest:
        end = request.num_computed_tokens + num_new
        prompt_done = not request.policy_state.prefilled and end >= len(request.prompt_token_ids)
        return ScheduledRequest(request, num_new, slots, prompt_done)

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        swap = self.config.preemption_mode == "swap"
        self.manager.preempt(request, swap)
        if not request.swapped:
            request.policy_state = PolicyState()  # recomputed from the start, pruned again
        request.status = Status.WAITING
        request.metrics.preemptions += 1
        self.waiting.appendleft(request)

    def finish(self, request: Request, reason: str) -> None:
        """End a request (running or waiting) and return its blocks to the pool."""
        if request.status is Status.RUNNING:
            self.running.remove(request)
        elif request.status is Status.WAITING and request in self.waiting:
            self.waiting.remove(request)
        self.manager.free(request)
        request.status = Status.FINISHED
        request.finish_reason = reason
