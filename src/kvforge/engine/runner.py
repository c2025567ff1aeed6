"""Executes a scheduler step: the block operations, then one forward pass and sampling.

The runner turns the scheduler's output into a `worker.Plan` (plain data: the block
operations the KV cache manager recorded, the flat batch of new tokens with each
request's block table, and the rows that need logits), has every rank execute it
(`engine.worker`; one rank, or all of a tensor-parallel group), and samples from
the logits rank 0 receives. Only the last position of a request that completes its
known tokens goes through the LM head, and prompt positions scored for
prompt_logprobs, PROMPT_LOGITS_ROWS at a time.
"""

import itertools
import weakref
from typing import Any

import torch

from kvforge.engine.sampling import History, TokenLogprobs, sample, token_logprobs
from kvforge.engine.scheduler import ScheduledRequest, SchedulerOutput
from kvforge.engine.worker import PassInputs, Plan, RotateKeysAt, Worker
from kvforge.kvcache import block_ops as ops
from kvforge.kvcache.block_table import NULL_BLOCK
from kvforge.kvcache.store import KVStore
from kvforge.kvcache.tiers import TieredBlocks

PROMPT_LOGITS_ROWS = 256  # prompt positions scored at once: bounds the [rows, vocab] logits


class ModelRunner:
    """Plans each step and samples; rank 0's model share and store are `model`, `store`.
    `group`: the tensor-parallel group (`engine.parallel`) every plan also goes to."""

    def __init__(self, model: torch.nn.Module, store: KVStore, device: torch.device,
                 tiers: TieredBlocks | None = None, group=None) -> None:  # fmt: skip
        self.model = model
        self.store = store
        self.device = device
        self.tiers = tiers
        self.group = group
        self.worker = Worker(model, store, device, tiers,
                             None if group is None else group.comm,
                             1 if group is None else group.kv_replicas)  # fmt: skip
        # called with (requests, their next-token logits [N, vocab]) before sampling:
        # how benchmarks compare the distributions of two cache settings
        self.logits_hook = None
        # the attention gathered in the last pass for eviction policies (None: none asked)
        self.collected = None
        # the last `run`'s log-probabilities, by position in its batch (see `run`)
        self.logprobs: dict[int, TokenLogprobs] = {}
        self.prompt_logprobs: dict[int, list[TokenLogprobs]] = {}
        # each policy state whose keys move gets a key the ranks keep them under
        self._keys = itertools.count()
        self._state_keys: dict[int, int] = {}
        self._forget: list[int] = []

    @property
    def swapped(self) -> dict[str, Any]:
        """Rank 0's host copies of swapped-out requests, by request id."""
        return self.worker.swapped

    def _rank_ops(self, block_ops: list[ops.BlockOp]) -> list[Any]:
        """The operations as ranks run them: a policy state's moved keys by a key."""
        out: list[Any] = []
        for op in block_ops:
            if isinstance(op, ops.RotateKeys):
                key = self._state_keys.get(id(op.state))
                if key is None:
                    key = self._state_keys[id(op.state)] = next(self._keys)
                    weakref.finalize(op.state, self._ended, id(op.state), key)
                op = RotateKeysAt(op.slots, op.offset, key)
            out.append(op)
        return out

    def _ended(self, ident: int, key: int) -> None:
        self._state_keys.pop(ident, None)
        self._forget.append(key)

    def _send(self, block_ops: list[ops.BlockOp], inputs: PassInputs | None = None,
              logit_rows: list[list[int]] = (), consume=None):  # fmt: skip
        forget, self._forget = self._forget, []
        plan = Plan(self._rank_ops(block_ops), inputs, list(logit_rows), forget)
        if self.group is None:
            return self.worker.run(plan, consume)
        return self.group.run(self.worker, plan, consume)

    def execute(self, block_ops: list[ops.BlockOp]) -> None:
        """Carry out the manager's operations on block contents, in order, on every rank."""
        if block_ops or self._forget:
            self._send(block_ops)

    def prepare(self, batch: list[ScheduledRequest]) -> PassInputs:
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        seq_lens = []
        windows = []
        modes: dict[int, str] = {}
        score_window: dict[int, int] = {}
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
                    modes[i] = mode
                    score_window[i] = r.kv_policy.score_window
        max_blocks = max(len(item.request.block_table.block_ids) for item in batch)
        # a freed entry (out of a sliding window) is never visible: any block id will do
        tables = [
            [0 if b == NULL_BLOCK else b for b in item.request.block_table.block_ids]
            + [0] * (max_blocks - len(item.request.block_table.block_ids))
            for item in batch
        ]
        return PassInputs(input_ids, positions, slots, tuple(query_start_loc),
                          tuple(seq_lens), windows, tables, modes, score_window)  # fmt: skip

    def all_logits(self, step: SchedulerOutput) -> torch.Tensor:
        """One step; the logits after every new token, [T, vocab] float32 (scoring)."""
        inputs = self.prepare(step.scheduled)
        out: list[torch.Tensor] = []
        rows = list(range(inputs.query_start_loc[-1]))
        self.collected = self._send(step.ops, inputs, [rows], lambda i, logits: out.append(logits))
        return out[0]

    def run(self, step: SchedulerOutput) -> list[int | None]:
        """The sampled token of each scheduled request, or None mid-prefill. The
        log-probabilities asked for are left in `logprobs` (the sampled tokens') and
        `prompt_logprobs` (prompt tokens scored in this pass), by position in the batch."""
        batch = step.scheduled
        self.logprobs, self.prompt_logprobs = {}, {}
        if not batch:
            self.execute(step.ops)
            return []
        inputs = self.prepare(batch)
        scored = _prompt_rows(batch, inputs.query_start_loc)
        chunks = [scored[0][lo : lo + PROMPT_LOGITS_ROWS]
                  for lo in range(0, len(scored[0]), PROMPT_LOGITS_ROWS)]  # fmt: skip
        rows = [i for i, item in enumerate(batch) if item.samples]
        last = [inputs.query_start_loc[i + 1] - 1 for i in rows]
        sampled: list[torch.Tensor] = []

        def consume(i: int, logits: torch.Tensor) -> None:
            if i == len(chunks):
                sampled.append(logits)
                return
            self._score_prompts(scored, i * PROMPT_LOGITS_ROWS, logits)

        self.collected = self._send(step.ops, inputs, chunks + ([last] if rows else []), consume)
        if not rows:
            return [None] * len(batch)
        logits = sampled[0]  # [N, vocab] float32
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

    def _score_prompts(self, scored, lo: int, logits: torch.Tensor) -> None:
        """The log-probabilities of prompt tokens from one batch of `_prompt_rows`' rows."""
        _, targets, tops, owners = scored
        hi = lo + logits.shape[0]
        found = token_logprobs(logits, targets[lo:hi], tops[lo:hi])
        for owner, f in zip(owners[lo:hi], found, strict=True):
            self.prompt_logprobs.setdefault(owner, []).append(f)


def _prompt_rows(batch: list[ScheduledRequest], query_start_loc: tuple[int, ...]):
    """The pass's rows predicting prompt tokens of requests with prompt_logprobs, and for
    each: the prompt token, how many alternatives to report, the request's position."""
    rows: list[int] = []  # rows of the pass's hidden states, each predicting ...
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
        base = query_start_loc[i] - start  # the row of position `start` is base + start
        rows += range(base + first, base + end)
        targets += r.prompt_token_ids[first + 1 : end + 1]
        tops += [r.params.prompt_logprobs] * max(0, end - first)
        owners += [i] * max(0, end - first)
    return rows, targets, tops, owners


def _history(r) -> History:
    stops = r.eos_token_ids | frozenset(r.params.stop_token_ids or ())
    return History(r.prompt_token_ids, r.output_token_ids, stops)
