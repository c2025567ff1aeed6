"""Eviction policies applied: when a request's cache is pruned, and what that takes.

`kvcache.policy` says which tokens a policy keeps; this module is where the engine
acts on it, the one place that does:

* `after_pass` (without a policy) has a sliding-window model's blocks before its window
  given back; with one, it adds the attention a pass gathered to the request's scores, asks the
  policy whether to compact, rounds the choice to whole blocks where tokens cannot
  move one by one (int4, int2), has the KV cache manager compact the blocks, and has the
  keys of the tokens that move along (streaming's sinks) re-rotated (the runner does
  it through the model's own `rotate_keys`).
"""

import torch

from kvforge.engine.request import Request
from kvforge.kvcache.manager import KVCacheManager
from kvforge.kvcache.policy import whole_blocks
from kvforge.kvcache.store import KVStore


class Pruner:
    """Applies each request's eviction policy after every pass it takes part in."""

    def __init__(self, store: KVStore, manager: KVCacheManager) -> None:
        self.store = store
        self.manager = manager

    def after_pass(self, r: Request, prompt_done: bool, received: torch.Tensor | None) -> None:
        """Count the request's cache peak; with a policy, add the attention its tokens
        received in this pass (`prompt_done`: the pass completed its prompt) and compact
        when the policy says so."""
        held = r.num_kv_tokens
        r.metrics.peak_kv_tokens = max(r.metrics.peak_kv_tokens, held)
        policy = r.kv_policy
        if policy is None:  # a policy bounds (and moves) the cache; else a sliding window
            self.manager.drop_out_of_window(r)  # gives back the blocks it no longer reads
            return
        state = r.policy_state
        if received is not None:
            state.add(policy.token_scores(received).cpu(), held)
        if prompt_done:
            state.prefilled = True
        if not policy.compact_now(state, held, self.store.block_size, prompt_done):
            return
        state.grow(held)
        keep = policy.select(state, held)
        moved = min(policy.moved, len(keep))
        if not self.store.token_moves:  # int4, int2: whole blocks are kept, or dropped
            bs = self.store.block_size
            keep = whole_blocks(keep, held, bs, policy.budget, policy.pinned)
            moved = -(-moved // bs) * bs  # the sinks' whole block moves along
        positions = state.positions(held, r.num_dropped)
        if not self.manager.compact(r, keep, rewritten=moved):
            return
        state.kept = [positions[i] for i in keep]  # what the inspector shows as kept
        if state.scores is not None:
            state.scores = state.scores[keep]
        if moved and r.num_dropped:
            # the sinks go to positions num_dropped .. num_dropped + moved - 1, just before
            # the oldest other kept token, from their keys as first computed (at 0 ..)
            self.manager.rotate_keys(r, moved, r.num_dropped, state)
