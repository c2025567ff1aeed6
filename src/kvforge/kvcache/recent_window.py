"""The full-precision recent window of int4 and int2 (KIVI): the newest tokens of each running
request stay unquantized until their block is whole and out of the window, then are committed
once. `RecentWindow` keeps which blocks are hot and where; `WindowedCache` is a layer's
quantized cache that reads hot blocks from the window."""

from dataclasses import dataclass

import torch

from kvforge.kvcache.formats import recent_blocks
from kvforge.kvcache.quantized_cache import QuantizedCache


@dataclass(frozen=True)
class _WindowPass:
    """What one forward pass writes, for every layer alike: the new tokens that go to
    recent-window slots, and the blocks committed (encoded) because they left the window."""

    recent_src: torch.Tensor  # [n] rows of the pass's new tokens ...
    recent_dst: torch.Tensor  # ... to these flat recent slots (slot * block_size + offset)
    commit_ids: torch.Tensor  # [c] blocks encoded in this pass, staged whole:
    stage_recent_src: torch.Tensor  # flat recent slots ...
    stage_recent_dst: torch.Tensor  # ... to staging rows (i * block_size + offset)
    stage_new_src: torch.Tensor  # rows of the pass's new tokens ...
    stage_new_dst: torch.Tensor  # ... to staging rows


class RecentWindow:
    """Which blocks still hold recent tokens in full precision, and where (int4, int2: KIVI).

    A request's block is "hot" — its K/V live in a full-precision slot, not in the
    packed block — until it is whole and at least `tokens` newer tokens follow it.
    Then it is committed: its keys are quantized per channel over the block, its
    values per token, once. A request thus keeps at most `blocks_per_request` hot
    blocks, and the store reserves slots for `max_running` requests.

    The state is keyed by block id and shared by every layer; each forward pass
    plans its writes once (`begin_pass`). A hot block shared through the prefix cache
    is committed by whichever request lets go of it first: the content is the same.
    """

    def __init__(self, num_blocks: int, block_size: int, tokens: int, max_running: int,
                 device) -> None:  # fmt: skip
        self.block_size, self.tokens = block_size, tokens
        self.blocks_per_request = recent_blocks(tokens, block_size)
        self.num_slots = max_running * self.blocks_per_request
        self.device = torch.device(device)
        self.slot_of = torch.full((num_blocks,), -1, dtype=torch.long, device=device)
        self.slots: dict[int, int] = {}  # hot block id -> slot
        self._free = list(range(self.num_slots - 1, -1, -1))
        self.caches: list[WindowedCache] = []
        self.plan: _WindowPass | None = None
        self._memo: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    # --- slots --------------------------------------------------------------------------

    def _take(self, block_id: int) -> int:
        if not self._free:  # the store caps running requests so that this cannot happen
            raise AssertionError("no free recent-window slot")
        slot = self.slots[block_id] = self._free.pop()
        return slot

    def _drop(self, block_ids: list[int]) -> None:
        for b in block_ids:
            self._free.append(self.slots.pop(b))

    def _sync(self, changed: list[int]) -> None:
        """Mirror `slots` into the device-side `slot_of` for these block ids."""
        if changed:
            ids = torch.tensor(changed, dtype=torch.long, device=self.device)
            slots = [self.slots.get(b, -1) for b in changed]
            self.slot_of[ids] = torch.tensor(slots, dtype=torch.long, device=self.device)
        self._memo.clear()

    def hot(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions in block_ids that are hot, their slots); memoised for the pass,
        since every layer gathers the same tiles."""
        key = (block_ids.data_ptr(), block_ids.numel())
        found = self._memo.get(key)
        if found is None:
            slot = self.slot_of.index_select(0, block_ids)
            pos = (slot >= 0).nonzero().squeeze(1)
            found = self._memo[key] = (pos, slot.index_select(0, pos))
        return found

    # --- passes -------------------------------------------------------------------------

    def begin_pass(self, seqs: list[tuple[list[int], int, int]]) -> None:
        """Plan the writes of one forward pass: per sequence in batch order, its block ids
        and the positions [start, end) of its new tokens (rows of the pass, in order)."""
        bs = self.block_size
        commits: list[int] = []
        committed: set[int] = set()
        stage_recent: tuple[list[int], list[int]] = ([], [])
        stage_new: tuple[list[int], list[int]] = ([], [])
        hot_writes: list[tuple[int, int, int, int]] = []  # block, first pos, row, count
        row = 0
        for block_ids, start, end in seqs:
            first_hot = max(0, (end - self.tokens) // bs)  # blocks from here stay hot
            for j in range(max(0, (start - self.tokens) // bs), -(-end // bs)):
                b, lo, hi = block_ids[j], max(start, j * bs), min(end, (j + 1) * bs)
                touched = lo < hi
                if j >= first_hot:
                    if touched:
                        hot_writes.append((b, lo - j * bs, row + lo - start, hi - lo))
                    continue
                if (b not in self.slots and not touched) or b in committed:
                    continue  # committed before (or by a request sharing it this pass)
                i = len(commits)
                commits.append(b)
                committed.add(b)
                old = (lo - j * bs) if touched else bs  # tokens already in the slot
                if old:
                    if b not in self.slots:
                        raise AssertionError(f"block {b} has old tokens but no recent slot")
                    slot = self.slots[b]
                    stage_recent[0].extend(range(slot * bs, slot * bs + old))
                    stage_recent[1].extend(range(i * bs, i * bs + old))
                if touched:
                    stage_new[0].extend(range(row + lo - start, row + hi - start))
                    stage_new[1].extend(range(i * bs + lo - j * bs, i * bs + hi - j * bs))
            row += end - start
        # free the committed blocks' slots first: a write reads them before it reuses them
        self._drop([b for b in commits if b in self.slots])
        recent = ([], [])
        for b, offset, first_row, count in hot_writes:
            slot = self.slots.get(b)
            if slot is None:
                slot = self._take(b)
            recent[0].extend(range(first_row, first_row + count))
            recent[1].extend(range(slot * bs + offset, slot * bs + offset + count))
        self._sync(commits + [b for b, *_ in hot_writes])

        def t(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=self.device)

        self.plan = _WindowPass(t(recent[0]), t(recent[1]), t(commits), t(stage_recent[0]),
                                t(stage_recent[1]), t(stage_new[0]), t(stage_new[1]))  # fmt: skip

    # --- blocks leaving a request ----------------------------------------------------

    def settle(self, block_ids: list[int]) -> None:
        """Encode hot blocks into their packed blocks (as committing would), keeping them
        hot: so that a copy of the packed blocks (tiers, swap) is complete."""
        hot = [b for b in block_ids if b in self.slots]
        if hot:
            ids = torch.tensor(hot, dtype=torch.long, device=self.device)
            slots = torch.tensor([self.slots[b] for b in hot], dtype=torch.long,
                                 device=self.device)  # fmt: skip
            for cache in self.caches:
                cache.commit_recent(ids, cache.recent.index_select(1, slots).float())

    def retire(self, block_ids: list[int], num_tokens: int) -> None:
        """A request lets go of its blocks: whole hot ones are committed (they may stay in
        the prefix cache), the partial last one is dropped with the request."""
        whole = block_ids[: num_tokens // self.block_size]
        self.settle(whole)
        hot = [b for b in block_ids if b in self.slots]
        self._drop(hot)
        self._sync(hot)

    def take_out(self, block_ids: list[int]) -> tuple[list[int], torch.Tensor | None]:
        """For a swap: (positions of the hot blocks in block_ids, their full-precision
        tokens [n, 2 x coded layers, kv_heads, block_size, D] on the host); frees their slots."""
        pos = [i for i, b in enumerate(block_ids) if b in self.slots]
        if not pos:
            return pos, None
        hot = [block_ids[i] for i in pos]
        slots = torch.tensor([self.slots[b] for b in hot], dtype=torch.long, device=self.device)
        # [kv_heads, caches, n, block, D]
        data = torch.stack([c.recent.index_select(1, slots) for c in self.caches], dim=1)
        self._drop(hot)
        self._sync(hot)
        return pos, data.permute(2, 1, 0, 3, 4).cpu()  # [n, caches, kv_heads, block, D]

    def put_back(self, block_ids: list[int], pos: list[int], data: torch.Tensor | None) -> None:
        """The inverse of `take_out`, into (new) block ids."""
        if not pos:
            return
        hot = [block_ids[i] for i in pos]
        slots = torch.tensor([self._take(b) for b in hot], dtype=torch.long, device=self.device)
        data = data.to(self.device)
        for c, cache in enumerate(self.caches):
            cache.recent.index_copy_(1, slots, data[:, c].transpose(0, 1))
        self._sync(hot)


class WindowedCache(QuantizedCache):
    """A `QuantizedCache` whose hot blocks (see `RecentWindow`) live in full-precision
    slots [kv_heads, slots, block_size, D]; reading a tile takes them from there.

    A rotated cache keeps its recent tokens rotated too (x @ R, once, as written): the
    tiles attention reads are then all in the rotated space without a matmul a read, and
    a committed block is encoded by the rotation's own codec."""

    # The prompt's own attention, in the pass that computes it, uses the K/V it just
    # computed (as KIVI does): 2-bit keys are for what later tokens read.
    prefill_full_precision = True

    def __init__(self, codec, kv_heads: int, num_blocks: int, block_size: int, device,
                 window: RecentWindow, dtype: torch.dtype) -> None:  # fmt: skip
        super().__init__(codec, kv_heads, num_blocks, block_size, device)
        self.window = window
        self.recent = torch.zeros((kv_heads, window.num_slots, block_size, codec.head_dim),
                                  dtype=dtype, device=device)  # fmt: skip
        window.caches.append(self)

    def write(self, slot_mapping: torch.Tensor, x: torch.Tensor) -> None:
        """The pass's new K/V ([kv_heads, T, D]): where each token goes (a recent slot, or
        its block committed whole) was planned by `RecentWindow.begin_pass`."""
        plan = self.window.plan
        if plan is None:
            raise AssertionError("a windowed cache is written inside a pass (begin_pass first)")
        heads, _, dim = x.shape
        if self.rotation is not None:
            x = x.float() @ self.rotation
        flat = self.recent.view(heads, -1, dim)
        if plan.commit_ids.numel():
            block = self.shape[2]
            staged = torch.empty((heads, plan.commit_ids.numel() * block, dim),
                                 dtype=torch.float32, device=x.device)  # fmt: skip
            staged.index_copy_(1, plan.stage_recent_dst,
                               flat.index_select(1, plan.stage_recent_src).float())  # fmt: skip
            staged.index_copy_(1, plan.stage_new_dst, x.index_select(1, plan.stage_new_src).float())
            self.commit_recent(plan.commit_ids, staged.view(heads, -1, block, dim))
        flat.index_copy_(1, plan.recent_dst, x.index_select(1, plan.recent_src).to(flat.dtype))

    def write_slots(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Rewrite whole blocks of tokens (the keys are quantized per block), outside the
        recent window: `slots` cover whole blocks, in order."""
        bs = self.shape[2]
        ids = slots[::bs] // bs
        expected = (ids[:, None] * bs + torch.arange(bs, device=slots.device)).reshape(-1)
        if not torch.equal(slots, expected):
            raise AssertionError("int4 and int2 tokens are rewritten a whole block at a time")
        if any(int(b) in self.window.slots for b in ids):
            raise AssertionError("a block in the recent window is rewritten by its writes")
        self.write_whole_blocks(ids, x.view(x.shape[0], len(ids), bs, x.shape[-1]))

    def move_tokens(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        raise AssertionError("tokens of a windowed (int4, int2) cache cannot move")

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        if any(int(b) in self.window.slots for b in src):
            raise AssertionError("a block in the recent window cannot be copied")
        super().copy_blocks(src, dst)

    def commit_recent(self, block_ids: torch.Tensor, x: torch.Tensor) -> None:
        """Encode whole blocks of recent tokens ([kv_heads, n, block_size, D], as the window
        stores them: rotated, for a rotated cache) into `block_ids`."""
        self.write_whole_blocks(block_ids, x, self.read_codec)

    def gather(self, block_ids: torch.Tensor) -> torch.Tensor:
        out = super().gather(block_ids)
        pos, slots = self.window.hot(block_ids)
        if pos.numel():
            recent = self.recent.index_select(1, slots).float()
            out.index_copy_(1, pos, recent if self.rotation is None else recent @ self.rotation.T)
        return out

    def gather_scaled(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        """What attention reads: the packed values as their codec decodes them (a rotated
        cache's stay rotated) and the recent ones as stored, in the same space. The
        windowed codecs apply their own scales: no scale is left for attention."""
        out, _ = super().gather_scaled(block_ids)
        pos, slots = self.window.hot(block_ids)
        if pos.numel():
            out.index_copy_(1, pos, self.recent.index_select(1, slots).float())
        return out, None
