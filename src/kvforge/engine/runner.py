"""Turns a scheduled batch into tensors, runs the model once, and samples.

One forward pass takes the new tokens of every scheduled request as one flat
batch (no padding): token ids, positions, the slot of each token in the KV
store, and each request's block table. Only the last position of a request
that completes its known tokens goes through the LM head.
"""

import torch

from kvforge.attention import AttentionMetadata
from kvforge.attention.metadata import ScoreCollector
from kvforge.engine.sampling import sample
from kvforge.engine.scheduler import ScheduledRequest
from kvforge.kvcache.store import KVStore


class ModelRunner:
    """Owns the model and the KV store; `run` is one forward pass plus sampling."""

    def __init__(self, model: torch.nn.Module, store: KVStore, device: torch.device) -> None:
        self.model = model
        self.store = store
        self.device = device
        # called with (requests, their next-token logits [N, vocab]) before sampling:
        # how benchmarks compare the distributions of two cache settings
        self.logits_hook = None
        # the attention gathered in the last pass for eviction policies (None: none asked)
        self.collected: ScoreCollector | None = None

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
            windows.append((r.block_table.block_ids, kv_end - item.num_new_tokens, kv_end))
            if r.kv_policy is not None:
                mode = r.kv_policy.wants_scores(r.policy_state, item.prompt_done)
                if mode is not None:
                    collect.modes[i] = mode
                    collect.window[i] = r.kv_policy.score_window
        max_blocks = max(len(item.request.block_table.block_ids) for item in batch)
        tables = [
            item.request.block_table.block_ids
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
    def all_logits(self, batch: list[ScheduledRequest]) -> torch.Tensor:
        """One forward pass; the logits after every new token, [T, vocab] float32 (scoring)."""
        ids, pos, meta = self.prepare(batch)
        return self.model.compute_logits(self.model(ids, pos, self.store, meta))

    @torch.inference_mode()
    def run(self, batch: list[ScheduledRequest]) -> list[int | None]:
        """The sampled token of each scheduled request, or None mid-prefill."""
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
