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
from kvforge.engine.sampling import History, TokenLogprobs, sample, token_logprobs
from kvforge.engine.scheduler import ScheduledRequest, SchedulerOutput
from kvforge.kvcache import block_ops as ops
from kvforge.kvcache.block_table import NULL_BLOCK
from kvforge.kvcache.store import KVStore
from kvforge.kvcache.tiers import TieredBlocks

PROMPT_LOGITS_ROWS = 256  # prompt positions scored at once: bounds the [rows, vocab] logits


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
        # the last `run`'s log-probabilities, by position in its batch (see `run`)
        self.logprobs: dict[int, TokenLogprobs] = {}
        self.prompt_logprobs: dict[int, list[TokenLogprobs]] = {}

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
        """The sampled token of each scheduled request, or None mid-prefill. The
        log-probabilities asked for are left in `logprobs` (the sampled tokens') and
        `prompt_logprobs` (prompt tokens scored in this pass), by position in the batch."""
        self.execute(step.ops)
        batch = step.scheduled
        self.logprobs, self.prompt_logprobs = {}, {}
        if not batch:
            return []
        ids, pos, meta = self.prepare(batch)
        hidden = self.model(ids, pos, self.store, meta)  # [T, hidden]
        self._score_prompts(batch, meta, hidden)
        rows = [i for i, item in enumerate(batch) if item.samples]
        if not rows:
            return [None] * len(batch)
        last = torch.tensor([meta.query_start_loc[i + 1] - 1 for i in rows], device=self.device)
        logits = self.model.compute_logits(hidden[last])  # [N, vocab] float32
        requests = [batch[i].request for i in rows]
        if self.logits_hook is not None:
            self.logits_hook(requests, logits)
        histories = [_history(r) if r.params.processes_logits else None for r in requests]
        tokens = sample(
            logits, [r.params for r in requests], [r.generator for r in requests], histories
        )
        asked = [j for j, r in enumerate(requests) if r.params.logprobs is not None]
        if asked:
            found = token_logprobs(logits[asked], [tokens[j] for j in asked],
                                   [requests[j].params.logprobs for j in asked])  # fmt: skip
            self.logprobs = {rows[j]: f for j, f in zip(asked, found, strict=True)}
        out: list[int | None] = [None] * len(batch)
        for i, token in zip(rows, tokens, strict=True):
            out[i] = token
        return out

    def _score_prompts(self, batch: list[ScheduledRequest], meta: AttentionMetadata,
                       hidden: torch.Tensor) -> None:  # fmt: skip
        """The log-probabilities of the prompt tokens whose predictions this pass computed
        (requests with prompt_logprobs), PROMPT_LOGITS_ROWS logits rows at a time."""
        rows: list[int] = []  # rows of `hidden`, each predicting ...
        targets: list[int] = []  # ... this prompt token
        tops: list[int] = []
        owners: list[int] = []  # the request's position in the batch
        for i, item in enumerate(batch):
            r = item.request
            if r.prompt_logprobs is None:
                continue
            start = r.num_computed_tokens
            first = max(start, len(r.prompt_logprobs) - 1)  # positions scored before: skip
            end = min(start + item.num_new_tokens, len(r.prompt_token_ids) - 1)
            base = meta.query_start_loc[i] - start  # the row of position `start` is base+start
            rows += range(base + first, base + end)
            targets += r.prompt_token_ids[first + 1 : end + 1]
            tops += [r.params.prompt_logprobs] * max(0, end - first)
            owners += [i] * max(0, end - first)
        for lo in range(0, len(rows), PROMPT_LOGITS_ROWS):
            at = torch.tensor(rows[lo : lo + PROMPT_LOGITS_ROWS], device=self.device)
            logits = self.model.compute_logits(hidden[at])
            found = token_logprobs(logits, targets[lo : lo + PROMPT_LOGITS_ROWS],
                                   tops[lo : lo + PROMPT_LOGITS_ROWS])  # fmt: skip
            for owner, f in zip(owners[lo : lo + PROMPT_LOGITS_ROWS], found, strict=True):
                self.prompt_logprobs.setdefault(owner, []).append(f)


def _history(r) -> History:
    stops = r.eos_token_ids | frozenset(r.params.stop_token_ids or ())
    return History(r.prompt_token_ids, r.output_token_ids, stops)
