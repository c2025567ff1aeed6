"""Executes a scheduler step: the block operations, then one forward pass and sampling.

The operations on block contents that the KV cache manager recorded
(`kvcache.block_ops`) run first, in order, against the store, the lower tiers
and the swap space (the host copies of swapped-out requests, kept here). Then
one forward pass takes the new tokens of every scheduled request as one flat
batch (no padding): token ids, positions, the slot of each token in the KV
store, and each request's block table. Only the last position of a request
that completes its known tokens goes through the LM head.
"""

from typing import Any

import torch

from kvforge.attention import AttentionMetadata
from kvforge.attention.metadata import ScoreCollector
from kvforge.engine.sampling import sample
from kvforge.engine.scheduler import ScheduledRequest, SchedulerOutput
from kvforge.kvcache import block_ops as ops
from kvforge.kvcache.block_table import NULL_BLOCK
from kvforge.kvcache.store import KVStore
from kvforge.kvcache.tiers import TieredBlocks


class ModelRunner:
    """Owns the model, the KV store and the swap space; `run` is one step."""

    def __init__(self, model: torch.nn.Module, store: KVStore, device: torch.device,
                 tiers: TieredBlocks | None = None) -> None:  # fmt: skip
        self.model = model
        self.store = store
        self.device = device
        self.tiers = tiers
        self.swapped: dict[str, Any] = {}  # request id -> its blocks' host copy
        # called with (requests, their next-token logits [N, vocab]) before sampling:
        # how benchmarks compare the distributions of two cache settings
        self.logits_hook = None
        # the attention gathered in the last pass for eviction policies (None: none asked)
        self.collected: ScoreCollector | None = None

    def execute(self, block_ops: list[ops.BlockOp]) -> None:
        """Carry out the manager's operations on block contents, in order."""
        store = self.store
        for op in block_ops:
            match op:
                case ops.LoadBlocks(block_ids, contents):
                    store.write_blocks(block_ids, torch.stack(contents))
                case ops.SaveBlock(block_id, key, spill):
                    block = store.read_blocks([block_id])[0]
                    if spill:
                        self.tiers.put(key, block)
                    else:
                        self.tiers.persist(key, block)
                case ops.SwapOut(request_id, block_ids):
                    self.swapped[request_id] = store.swap_out(block_ids)
                case ops.SwapIn(request_id, block_ids, window_blocks):
                    store.swap_in(block_ids, self.swapped.pop(request_id), window_blocks)
                case ops.DropSwapped(request_id):
                    self.swapped.pop(request_id, None)
                case ops.Retire(block_ids, num_tokens):
                    store.retire(block_ids, num_tokens)
                case ops.MoveTokens(src, dst):
                    store.move_tokens(src, dst)
                case ops.CopyBlocks(src, dst):
                    store.copy_blocks(src, dst)
                case ops.RotateKeys(slots, offset, state):
                    if state.moved_keys is None:  # the first move: still where computed
                        dtype = next(self.model.parameters()).dtype  # what keys came out as
                        state.moved_keys = store.read_keys(slots).to(dtype)
                    store.write_keys(slots, self.model.rotate_keys(state.moved_keys, offset))
                case _:
                    raise AssertionError(f"unknown block operation {op!r}")

    def prepare(
        self, batch: list[ScheduledRequest]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens = []
        windows = []
        collect = ScoreCollector(modes={})
        for i, item in enumerate(batch):
            r, start = item.request, item.request.num_computed_tokens
            end = start + item.num_new_tokens
            input_ids += r.token_ids(start, end)
            positions += range(start, end)  # RoPE positions: every token computed counts
            slots += item.slot_mapping
            query_start_loc.append(query_start_loc[-1] + item.num_new_tokens)
            kv_end = r.block_table.num_tokens  # cache indices: evicted tokens do not
            seq_lens.append(kv_end)
            windows.append((r.block_table.block_ids, kv_end - item.num_new_tokens, kv_end,
                            r.window_blocks))  # fmt: skip
            if r.kv_policy is not None:
                mode = r.kv_policy.wants_scores(r.policy_state, item.prompt_done)
                if mode is not None:
                    collect.modes[i] = mode
                    collect.window[i] = r.kv_policy.score_window
        max_blocks = max(len(item.request.block_table.block_ids) for item in batch)
        # a freed entry (out of a sliding window) is never visible: any block id will do
        tables = [
            [0 if b == NULL_BLOCK else b for b in item.request.block_table.block_ids]
            + [0] * (max_blocks - len(item.request.block_table.block_ids))
            for item in batch
        ]
        self.store.begin_pass(windows)
        self.collected = collect if collect.modes else None
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=self.device),
            query_start_loc=tuple(query_start_loc),
            seq_lens=tuple(seq_lens),
            block_tables=torch.tensor(tables, dtype=torch.long, device=self.device),
            block_size=self.store.block_size,
            collect=self.collected,
        )
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        return ids, pos, meta

    @torch.inference_mode()
    def all_logits(self, step: SchedulerOutput) -> torch.Tensor:
        """One step; the logits after every new token, [T, vocab] float32 (scoring)."""
        self.execute(step.ops)
        ids, pos, meta = self.prepare(step.scheduled)
        return self.model.compute_logits(self.model(ids, pos, self.store, meta))

    @torch.inference_mode()
    def run(self, step: SchedulerOutput) -> list[int | None]:
        """The sampled token of each scheduled request, or None mid-prefill."""
        self.execute(step.ops)
        batch = step.scheduled
        if not batch:
            return []
        ids, pos, meta = self.prepare(batch)
        hidden = self.model(ids, pos, self.store, meta)  # [T, hidden]
        rows = [i for i, item in enumerate(batch) if item.samples]
        if not rows:
            return [None] * len(batch)
        last = torch.tensor([meta.query_start_loc[i + 1] - 1 for i in rows], device=self.device)
        logits = self.model.compute_logits(hidden[last])  # [N, vocab] float32
        requests = [batch[i].request for i in rows]
        if self.logits_hook is not None:
            self.logits_hook(requests, logits)
        tokens = sample(logits, [r.params for r in requests], [r.generator for r in requests])
        out: list[int | None] = [None] * len(batch)
        for i, token in zip(rows, tokens, strict=True):
            out[i] = token
        return out
