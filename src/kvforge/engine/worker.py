"""What every rank of an engine executes each step: a `Plan`.

A plan is plain data that rank 0's runner writes from the scheduler's output: the
block operations in order, the flat batch of one forward pass (token ids, positions,
slots, block tables), and which rows of the pass need logits. With one rank the
runner hands it to its own `Worker`; with tensor parallelism (`engine.parallel`)
every rank gets its copy once a step and runs it on its share of the model and of
the KV heads, meeting the others only in the collectives:

    ops        consecutive SaveBlocks gathered to rank 0 (a tier block holds every
               rank's share, [ranks, ...]); LoadBlocks arrive cut to the rank's share
    forward    an all-reduce after each attention and MLP (`models.tensor_parallel`)
    scores     the attention an eviction policy asked for, gathered to rank 0 per KV head
    logits     each rank's vocabulary rows, gathered to rank 0
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from kvforge.attention import AttentionMetadata
from kvforge.attention.metadata import ScoreCollector
from kvforge.kvcache import block_ops as ops
from kvforge.kvcache.store import KVStore
from kvforge.kvcache.tiers import TieredBlocks


@dataclass(frozen=True)
class PassInputs:
    """One forward pass's flat batch, as plain lists (see `AttentionMetadata`)."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    query_start_loc: tuple[int, ...]
    seq_lens: tuple[int, ...]
    windows: list[tuple[list[int], int, int, list[int]]]  # `KVStore.begin_pass`'s
    block_tables: list[list[int]]  # padded to one length
    score_modes: dict[int, str] = field(default_factory=dict)  # `ScoreCollector`'s
    score_window: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RotateKeysAt:
    """`block_ops.RotateKeys` as a rank runs it: the keys as first computed are kept by
    the rank itself under `key` (each rank holds its own heads' keys)."""

    slots: list[int]
    offset: int
    key: int


@dataclass(frozen=True)
class Plan:
    """One step's work for a rank: `ops`, then (if `inputs`) a forward pass whose hidden
    rows `logit_rows` (one list per batch of rows) go through the LM head. `forget`:
    moved keys whose requests have ended."""

    ops: list[Any]
    inputs: PassInputs | None = None
    logit_rows: list[list[int]] = field(default_factory=list)
    forget: list[int] = field(default_factory=list)


class Worker:
    """One rank's model share, KV store and swap space; `run` executes a plan.

    `comm` (None: a single rank) gathers to rank 0 (`gather`, `gather_object`);
    `tiers` are rank 0's only. `kv_replicas`: ranks that store each KV head (more than
    one when there are fewer KV heads than ranks)."""

    def __init__(self, model: torch.nn.Module, store: KVStore, device: torch.device,
                 tiers: TieredBlocks | None = None, comm=None,
                 kv_replicas: int = 1) -> None:  # fmt: skip
        self.model, self.store, self.device, self.tiers = model, store, device, tiers
        self.comm, self.kv_replicas = comm, kv_replicas
        self.swapped: dict[str, Any] = {}  # request id -> its blocks' host copy
        self.moved_keys: dict[int, torch.Tensor] = {}  # RotateKeysAt.key -> keys

    @torch.inference_mode()
    def run(self, plan: Plan, consume: Callable[[int, torch.Tensor], None] | None = None
            ) -> ScoreCollector | None:  # fmt: skip
        """Execute `plan`; on rank 0, `consume(i, logits)` takes the logits of
        `plan.logit_rows[i]` ([rows, vocab] float32) as they come, and the attention
        gathered for eviction policies is returned (None: none asked)."""
        for key in plan.forget:
            self.moved_keys.pop(key, None)
        self.execute(plan.ops)
        if plan.inputs is None:
            return None
        ids, pos, meta = self.metadata(plan.inputs)
        hidden = self.model(ids, pos, self.store, meta)
        collected = self._gather_scores(meta.collect)
        for i, rows in enumerate(plan.logit_rows):
            at = torch.tensor(rows, dtype=torch.long, device=self.device)
            logits = self.logits(hidden[at])
            if logits is not None and consume is not None:
                consume(i, logits)
        return collected

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[rows, vocab] float32 on rank 0 (None on the others)."""
        logits = self.model.compute_logits(hidden)
        if self.comm is None:
            return logits
        vocab = self.model.config.vocab_size
        per = -(-vocab // self.comm.size)  # every rank's rows padded to the first's
        padded = torch.nn.functional.pad(logits.cpu(), (0, per - logits.shape[1]))
        parts = self.comm.gather(padded)
        if parts is None:
            return None
        return torch.cat(parts, dim=1)[:, :vocab].to(logits.device)

    def _gather_scores(self, collect: ScoreCollector | None) -> ScoreCollector | None:
        """The attention collected this pass, over every KV head (on rank 0)."""
        if collect is None or self.comm is None:
            return collect
        parts = self.comm.gather_object({i: s.cpu() for i, s in collect.scores.items()})
        if parts is None:
            return None
        for i in collect.scores:
            heads = torch.cat([p[i] for p in parts])  # [ranks x rank's KV heads, seq]
            if self.kv_replicas > 1:  # a KV head's ranks each saw some of its query heads
                heads = heads.view(-1, self.kv_replicas, heads.shape[-1]).sum(1)
            collect.scores[i] = heads
        return collect

    def metadata(self, inputs: PassInputs) -> tuple[torch.Tensor, torch.Tensor,
                                                    AttentionMetadata]:  # fmt: skip
        """The pass's tensors; the store told which blocks each sequence reads."""
        device = self.device
        self.store.begin_pass(inputs.windows)
        collect = None
        if inputs.score_modes:
            collect = ScoreCollector(modes=dict(inputs.score_modes),
                                     window=dict(inputs.score_window))  # fmt: skip
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(inputs.slots, dtype=torch.long, device=device),
            query_start_loc=inputs.query_start_loc,
            seq_lens=inputs.seq_lens,
            block_tables=torch.tensor(inputs.block_tables, dtype=torch.long, device=device),
            block_size=self.store.block_size,
            collect=collect,
        )
        ids = torch.tensor(inputs.input_ids, dtype=torch.long, device=device)
        pos = torch.tensor(inputs.positions, dtype=torch.long, device=device)
        return ids, pos, meta

    def execute(self, block_ops: list[Any]) -> None:
        """Carry out the manager's operations on block contents, in order (a run of
        SaveBlocks is read, and gathered, at once)."""
        i = 0
        while i < len(block_ops):
            if isinstance(block_ops[i], ops.SaveBlock):
                end = i
                while end < len(block_ops) and isinstance(block_ops[end], ops.SaveBlock):
                    end += 1
                self._save(block_ops[i:end])
                i = end
            else:
                self._apply(block_ops[i])
                i += 1

    def _save(self, saves: list[ops.SaveBlock]) -> None:
        blocks = self.store.read_blocks([op.block_id for op in saves])
        if self.comm is not None:
            parts = self.comm.gather(blocks)
            if parts is None:
                return
            blocks = torch.stack(parts, dim=1)  # [n, ranks, rank's block]
        if len(saves) > 1:  # each its own copy: a tier keeps it (and may pickle it)
            blocks = [block.clone() for block in blocks]
        for op, block in zip(saves, blocks, strict=True):
            if op.spill:
                self.tiers.put(op.key, block)
            else:
                self.tiers.persist(op.key, block)

    def _apply(self, op: Any) -> None:
        store = self.store
        match op:
            case ops.LoadBlocks(block_ids, contents):
                store.write_blocks(block_ids, torch.stack(contents))
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
            case RotateKeysAt(slots, offset, key):
                saved = self.moved_keys.get(key)
                if saved is None:  # the first move: still where computed
                    dtype = next(self.model.parameters()).dtype  # what keys came out as
                    saved = self.moved_keys[key] = store.read_keys(slots).to(dtype)
                store.write_keys(slots, self.model.rotate_keys(saved, offset))
            case _:
                raise AssertionError(f"unknown block operation {op!r}")
