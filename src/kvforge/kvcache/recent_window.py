"""The full-precision recent window of int4 and int2 (KIVI): the newest tokens of each running
request stay unquantized until their block is whole and out of the window, then are committed
once. `RecentWindow` keeps which blocks are hot and where; `WindowedCache` is a layer's
quantized cache that reads hot blocks from the window."""

from dataclasses import dataclass

import torch

from kvforge.kvcache.formats import recent_blocks
from kvforge.kvcache.quantized_cache import QuantizedCache

Rows = tuple[torch.Tensor, torch.Tensor]  # (borrowed block, row) of each token: see RecentWindow


@dataclass(frozen=True)
class _WindowPass:
    """What one forward pass writes, for every layer alike: the new tokens that go to
    recent-window rows, and the blocks committed (encoded) because they left the window.
    A window row is (borrowed block, row in its codes): see `RecentWindow`."""

    cleared: Rows  # the rows of slots taken in this pass, zeroed first ...
    recent_src: torch.Tensor  # [n] rows of the pass's new tokens ...
    recent_dst: Rows  # ... to these window rows
    commit_ids: torch.Tensor  # [c] blocks encoded in this pass, staged whole:
    stage_recent_src: Rows  # window rows ...
    stage_recent_dst: torch.Tensor  # ... to staging rows (i * block_size + offset)
    stage_new_src: torch.Tensor  # rows of the pass's new tokens ...
    stage_new_dst: torch.Tensor  # ... to staging rows


def _runs(firsts: list[int], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs of integers first .. first + count - 1, concatenated: (the run each belongs
    to, the integer), on the host."""
    if not counts:
        return torch.empty(0, dtype=torch.long), torch.empty(0, dtype=torch.long)
    ends = torch.tensor(counts, dtype=torch.long).cumsum(0)  # where each run ends
    at = torch.arange(int(ends[-1]))
    run = torch.searchsorted(ends, at, right=True)
    begins = ends - torch.tensor(counts, dtype=torch.long)
    return run, at + (torch.tensor(firsts, dtype=torch.long) - begins)[run]


class RecentWindow:
    """Which blocks still hold recent tokens in full precision, and where (int4, int2: KIVI).

    A request's block is "hot" — its K/V live in a full-precision slot, not in the
    packed block — until it is whole and at least `tokens` newer tokens follow it.
    Then it is committed: its keys are quantized per channel over the block, its
    values per token, once. With `sinks` (kv_exact_sinks) a request's first blocks stay
    hot too, until it lets go of them. A request thus keeps at most `blocks_per_request`
    hot blocks.

    The slots are pool blocks: each running request borrows `blocks_per_request` ×
    `lend` blocks from the pool (the manager's `window_blocks`) and each of its hot
    blocks takes `lend` of them. A slot's tokens are written into the packed codes of
    its borrowed blocks, read as `rows` tokens of head_dim full-precision values a
    block (`WindowedCache.rows`): token t of a hot block lives in its slot's block
    t // rows, at row t % rows.

    The state is keyed by block id and shared by every layer; each forward pass
    plans its writes once (`begin_pass`). A hot block shared through the prefix cache
    is committed by whichever request lets go of it first: the content is the same.
    """

    def __init__(self, num_blocks: int, block_size: int, tokens: int, lend: int, rows: int,
                 device, sinks: int = 0) -> None:  # fmt: skip
        self.block_size, self.tokens, self.sinks = block_size, tokens, sinks
        self.blocks_per_request = recent_blocks(tokens, block_size) + sinks
        self.lend, self.rows = lend, rows
        self.device = torch.device(device)
        # hot block id -> the blocks its slot borrows (-1: not hot), mirrored on the device
        self.lent_of = torch.full((num_blocks, lend), -1, dtype=torch.long, device=device)
        self.slots: dict[int, tuple[int, ...]] = {}  # hot block id -> its slot's blocks
        self._in_use: set[int] = set()  # slots taken, by their first block
        self.caches: list[WindowedCache] = []
        self.plan: _WindowPass | None = None
        self._memo: dict[tuple[int, int], tuple[torch.Tensor, Rows]] = {}
        offsets = torch.arange(block_size, device=device)
        self._token_block, self._token_row = offsets // rows, offsets % rows

    # --- slots --------------------------------------------------------------------------

    def _take(self, block_id: int, window: list[int]) -> tuple[int, ...]:
        """A free slot of the request whose borrowed blocks are `window`, for `block_id`."""
        for i in range(0, len(window), self.lend):
            if window[i] not in self._in_use:
                slot = self.slots[block_id] = tuple(window[i : i + self.lend])
                self._in_use.add(slot[0])
                return slot
        # the manager lends every running request blocks_per_request slots
        raise AssertionError(f"no free recent-window slot in the blocks {window}")

    def _drop(self, block_ids: list[int]) -> None:
        for b in block_ids:
            self._in_use.discard(self.slots.pop(b)[0])

    def _sync(self, changed: list[int]) -> None:
        """Mirror `slots` into the device-side `lent_of` for these block ids."""
        if changed:
            ids = torch.tensor(changed, dtype=torch.long, device=self.device)
            lent = [self.slots.get(b, (-1,) * self.lend) for b in changed]
            self.lent_of[ids] = torch.tensor(lent, dtype=torch.long, device=self.device)
        self._memo.clear()

    def rows_of(self, lent: torch.Tensor) -> Rows:
        """Where the tokens of slots live: for `lent` [n, lend] (each slot's blocks), the
        (borrowed block, row) of each of their tokens, [n * block_size] each, in order."""
        blocks = lent[:, self._token_block].reshape(-1)
        return blocks, self._token_row.repeat(lent.shape[0])

    def _slot_rows(self, slots: list[tuple[int, ...]], firsts: list[int],
                   counts: list[int]) -> Rows:  # fmt: skip
        """Where tokens first .. first + count - 1 of each slot live, all in order
        (`rows_of` for runs of tokens), built from one run a borrowed block touched."""
        blocks: list[int] = []
        starts: list[int] = []
        sizes: list[int] = []
        for slot, first, count in zip(slots, firsts, counts, strict=True):
            t, end = first, first + count
            while t < end:
                k, row = divmod(t, self.rows)
                n = min(end, (k + 1) * self.rows) - t
                blocks.append(slot[k])
                starts.append(row)
                sizes.append(n)
                t += n
        run, rows = _runs(starts, sizes)
        where = torch.tensor(blocks, dtype=torch.long)[run]
        return where.to(self.device), rows.to(self.device)

    def hot(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, Rows]:
        """(positions in block_ids that are hot, the (block, row) of each of their tokens);
        memoised for the pass, since every layer gathers the same tiles."""
        key = (block_ids.data_ptr(), block_ids.numel())
        found = self._memo.get(key)
        if found is None:
            lent = self.lent_of.index_select(0, block_ids)
            pos = (lent[:, 0] >= 0).nonzero().squeeze(1)
            found = self._memo[key] = (pos, self.rows_of(lent.index_select(0, pos)))
        return found

    # --- passes -------------------------------------------------------------------------

    def begin_pass(self, seqs: list[tuple[list[int], int, int, list[int]]]) -> None:
        """Plan the writes of one forward pass: per sequence in batch order, its block ids,
        the positions [start, end) of its new tokens (rows of the pass, in order) and the
        blocks it borrows for its window."""
        bs = self.block_size
        commits: list[int] = []
        committed: set[int] = set()
        # runs of tokens: (slot, first, count) are window rows, (start, count) pass or
        # staging rows
        stage_recent: list[tuple[tuple[int, ...], int, int, int]] = []  # slot, first, n, dst
        stage_new: list[tuple[int, int, int]] = []  # src, dst, n
        hot_writes: list[tuple[int, int, int, int, list[int]]] = []  # +first pos, row, count
        row = 0
        for block_ids, start, end, window in seqs:
            first_hot = max(0, (end - self.tokens) // bs)  # blocks from here stay hot
            for j in range(max(0, (start - self.tokens) // bs), -(-end // bs)):
                b, lo, hi = block_ids[j], max(start, j * bs), min(end, (j + 1) * bs)
                touched = lo < hi
                if j >= first_hot or j < self.sinks:
                    if touched:
                        hot_writes.append((b, lo - j * bs, row + lo - start, hi - lo, window))
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
                    stage_recent.append((self.slots[b], 0, old, i * bs))
                if touched:
                    stage_new.append((row + lo - start, i * bs + lo - j * bs, hi - lo))
            row += end - start
        # free the committed blocks' slots first: a write reads them before it reuses them
        self._drop([b for b in commits if b in self.slots])
        taken: list[tuple[int, ...]] = []
        written: list[tuple[int, tuple[int, ...], int, int]] = []  # src row, slot, first, n
        for b, offset, first_row, count, window in hot_writes:
            slot = self.slots.get(b)
            if slot is None:
                slot = self._take(b, window)
                taken.append(slot)
            written.append((first_row, slot, offset, count))
        self._sync(commits + [b for b, *_ in hot_writes])

        def spans(starts: list[int], counts: list[int]) -> torch.Tensor:
            return _runs(starts, counts)[1].to(self.device)

        def columns(runs: list[tuple], width: int) -> list[list]:
            return [list(c) for c in zip(*runs, strict=True)] if runs else [[]] * width

        slot_of, first_of, count_of, dst_of = columns(stage_recent, 4)
        src_of, new_dst_of, new_count_of = columns(stage_new, 3)
        written_src, written_slot, written_first, written_count = columns(written, 4)
        self.plan = _WindowPass(
            # a borrowed block held other bytes: a slot's rows not yet written must read as
            # 0, finite for attention's masked products and a partial block's commit
            cleared=self._slot_rows(taken, [0] * len(taken), [bs] * len(taken)),
            recent_src=spans(written_src, written_count),
            recent_dst=self._slot_rows(written_slot, written_first, written_count),
            commit_ids=torch.tensor(commits, dtype=torch.long, device=self.device),
            stage_recent_src=self._slot_rows(slot_of, first_of, count_of),
            stage_recent_dst=spans(dst_of, count_of),
            stage_new_src=spans(src_of, new_count_of),
            stage_new_dst=spans(new_dst_of, new_count_of),
        )

    # --- blocks leaving a request ----------------------------------------------------

    def _lent(self, hot: list[int]) -> torch.Tensor:
        return torch.tensor([self.slots[b] for b in hot], dtype=torch.long, device=self.device)

    def rows_of_blocks(self, hot: list[int]) -> Rows:
        """Where the tokens of hot blocks live, in order (`rows_of`)."""
        return self.rows_of(self._lent(hot))

    def settle(self, block_ids: list[int]) -> None:
        """Encode hot blocks into their packed blocks (as committing would), keeping them
        hot: so that a copy of the packed blocks (tiers, swap) is complete."""
        hot = [b for b in block_ids if b in self.slots]
        if hot:
            ids = torch.tensor(hot, dtype=torch.long, device=self.device)
            where = self.rows_of(self._lent(hot))
            for cache in self.caches:
                cache.commit_recent(ids, cache.read_recent(where, len(hot)).float())

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
        where = self.rows_of(self._lent(hot))
        # [kv_heads, caches, n, block, D]
        data = torch.stack([c.read_recent(where, len(hot)) for c in self.caches], dim=1)
        self._drop(hot)
        self._sync(hot)
        return pos, data.permute(2, 1, 0, 3, 4).cpu()  # [n, caches, kv_heads, block, D]

    def put_back(self, block_ids: list[int], pos: list[int], data: torch.Tensor | None,
                 window: list[int]) -> None:  # fmt: skip
        """The inverse of `take_out`, into (new) block ids and the window blocks the request
        borrows now."""
        if not pos:
            return
        hot = [block_ids[i] for i in pos]
        for b in hot:
            self._take(b, window)
        where = self.rows_of(self._lent(hot))
        data = data.to(self.device)
        for c, cache in enumerate(self.caches):
            cache.write_recent(where, data[:, c].transpose(0, 1))
        self._sync(hot)


class WindowedCache(QuantizedCache):
    """A `QuantizedCache` whose hot blocks (see `RecentWindow`) live in full-precision
    slots; reading a tile takes them from there. A slot's tokens are rows of head_dim
    values at the model's precision written over the packed codes of the blocks the
    slot borrows: `rows` [kv_heads, num_blocks, rows a block, D] is that view.

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
        codes = self.parts["q"].view(torch.uint8).view(kv_heads, num_blocks, -1)
        row_bytes = codec.head_dim * dtype.itemsize
        if codes.shape[-1] % dtype.itemsize or window.rows * row_bytes > codes.shape[-1]:
            raise AssertionError("a window row does not fit a block's codes")  # formats' bug
        rows = codes[:, :, : window.rows * row_bytes].view(dtype)
        self.rows = rows.view(kv_heads, num_blocks, window.rows, codec.head_dim)
        window.caches.append(self)

    def read_recent(self, where: Rows, n: int) -> torch.Tensor:
        """The tokens of `n` slots at `where` (`RecentWindow.rows_of`), as stored:
        [kv_heads, n, block_size, D]."""
        heads, _, block, dim = self.shape
        return self.rows[:, where[0], where[1]].view(heads, n, block, dim)

    def write_recent(self, where: Rows, x: torch.Tensor) -> None:
        """Store tokens ([kv_heads, n, block_size, D]) in the slots at `where`."""
        self.rows[:, where[0], where[1]] = x.reshape(x.shape[0], -1, x.shape[-1]).to(
            self.rows.dtype
        )

    def write(self, slot_mapping: torch.Tensor, x: torch.Tensor) -> None:
        """The pass's new K/V ([kv_heads, T, D]): where each token goes (a recent slot, or
        its block committed whole) was planned by `RecentWindow.begin_pass`."""
        plan = self.window.plan
        if plan is None:
            raise AssertionError("a windowed cache is written inside a pass (begin_pass first)")
        heads, _, dim = x.shape
        if self.rotation is not None:
            x = x.float() @ self.rotation
        if plan.commit_ids.numel():
            block = self.shape[2]
            staged = torch.empty((heads, plan.commit_ids.numel() * block, dim),
                                 dtype=torch.float32, device=x.device)  # fmt: skip
            blocks, rows = plan.stage_recent_src
            staged.index_copy_(1, plan.stage_recent_dst, self.rows[:, blocks, rows].float())
            staged.index_copy_(1, plan.stage_new_dst, x.index_select(1, plan.stage_new_src).float())
            self.commit_recent(plan.commit_ids, staged.view(heads, -1, block, dim))
        blocks, rows = plan.cleared
        if blocks.numel():
            self.rows[:, blocks, rows] = 0
        blocks, rows = plan.recent_dst
        self.rows[:, blocks, rows] = x.index_select(1, plan.recent_src).to(self.rows.dtype)

    def write_slots(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Rewrite whole blocks of tokens (the keys are quantized per block): `slots` cover
        whole blocks, in order. A hot block (exact sinks re-rotated by `streaming`) is
        rewritten in its full-precision slot, as stored there."""
        bs = self.shape[2]
        ids = slots[::bs] // bs
        expected = (ids[:, None] * bs + torch.arange(bs, device=slots.device)).reshape(-1)
        if not torch.equal(slots, expected):
            raise AssertionError("int4 and int2 tokens are rewritten a whole block at a time")
        blocks = x.view(x.shape[0], len(ids), bs, x.shape[-1])
        is_hot = [b in self.window.slots for b in ids.tolist()]
        hot = [i for i, h in enumerate(is_hot) if h]
        cold = [i for i, h in enumerate(is_hot) if not h]
        if hot:
            values = blocks[:, hot].float()
            if self.rotation is not None:
                values = values @ self.rotation
            where = self.window.rows_of_blocks([int(ids[i]) for i in hot])
            self.write_recent(where, values)
        if cold:
            at = torch.tensor(cold, dtype=torch.long, device=ids.device)
            self.write_whole_blocks(ids[at], blocks[:, at])

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

    def _hot(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(positions in block_ids that are hot, their tokens as stored [kv_heads, n, block, D]
        float32, or None when there are none)."""
        pos, where = self.window.hot(block_ids)
        if not pos.numel():
            return pos, None
        return pos, self.read_recent(where, pos.numel()).float()

    def gather(self, block_ids: torch.Tensor) -> torch.Tensor:
        out = super().gather(block_ids)
        pos, recent = self._hot(block_ids)
        if recent is not None:
            out.index_copy_(1, pos, recent if self.rotation is None else recent @ self.rotation.T)
        return out

    def gather_scaled(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        """What attention reads: the packed values as their codec decodes them (a rotated
        cache's stay rotated) and the recent ones as stored, in the same space. The
        windowed codecs apply their own scales: no scale is left for attention."""
        out, _ = super().gather_scaled(block_ids)
        pos, recent = self._hot(block_ids)
        if recent is not None:
            out.index_copy_(1, pos, recent)
        return out, None
