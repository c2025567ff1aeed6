"""The physical KV cache: per layer, K and V tensors cut into fixed blocks of tokens.

Allocated once at start and never grown. Only num_kv_heads are stored, so
GQA/MQA savings are real bytes, and the store's bytes per token equal the
planner's: both count with `formats.bytes_per_block`.
"""

from dataclasses import dataclass
from fractions import Fraction

import torch

from kvforge.config import ModelSpec
from kvforge.kvcache.codecs import get_codecs
from kvforge.kvcache.formats import (
    KVFormat,
    as_number,
    bytes_per_block,
    recent_blocks,
    residual_bytes,
)

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class QuantizedCache:
    """One layer's K (or V) in a codec's parts, each [kv_heads, num_blocks, rows, width]
    (rows: block_size, or 1 for a part stored once per block).

    `write` encodes new tokens once; `gather` decodes only the blocks asked for
    (a tile), so the cache is never dequantized as a whole nor re-quantized.
    """

    dtype = None  # no plain dtype: attention never reads it as computed
    prefill_full_precision = False  # a fresh prompt's own attention reads what is stored

    def __init__(self, codec, kv_heads: int, num_blocks: int, block_size: int, device) -> None:
        self.codec = codec
        self.shape = (kv_heads, num_blocks, block_size, codec.head_dim)
        self.parts = {
            p.name: torch.zeros(
                (kv_heads, num_blocks, 1 if p.per_block else block_size, p.width),
                dtype=p.dtype,
                device=device,
            )
            for p in codec.parts
        }
        self.device = torch.device(device)

    def write(self, slot_mapping: torch.Tensor, x: torch.Tensor) -> None:  # x [kv_heads, T, D]
        for name, encoded in self.codec.encode(x).items():
            part = self.parts[name]
            part.view(part.shape[0], -1, part.shape[-1]).index_copy_(1, slot_mapping, encoded)

    def write_whole_blocks(self, block_ids: torch.Tensor, x: torch.Tensor) -> None:
        """Encode whole blocks ([kv_heads, n, block_size, D]) into `block_ids`."""
        for name, encoded in self.codec.encode(x).items():
            self.parts[name].index_copy_(1, block_ids, encoded)

    def gather(self, block_ids: torch.Tensor) -> torch.Tensor:
        """The blocks' values, decoded: [kv_heads, len(block_ids), block_size, D] float32."""
        return self.codec.decode({n: t.index_select(1, block_ids) for n, t in self.parts.items()})

    def gather_scaled(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(values, per-token scale [kv_heads, n, block_size] or None): codecs with one scale
        per token leave it unapplied, for attention to apply where it is cheaper."""
        if not hasattr(self.codec, "decode_unscaled"):
            return self.gather(block_ids), None
        parts = {n: t.index_select(1, block_ids) for n, t in self.parts.items()}
        return self.codec.decode_unscaled(parts), parts["scale"].squeeze(-1).float()

    def tensors(self) -> list[torch.Tensor]:
        return list(self.parts.values())


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
    """Which blocks still hold recent tokens in full precision, and where (int2, KIVI).

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
                cache.write_whole_blocks(ids, cache.recent.index_select(1, slots).float())

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
        tokens [n, layers * 2, kv_heads, block_size, D] on the host); frees their slots."""
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
    slots [kv_heads, slots, block_size, D]; reading a tile takes them from there."""

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

    def write_pass(self, x: torch.Tensor) -> None:  # x [kv_heads, T, D]: the pass's new K/V
        plan = self.window.plan
        heads, _, dim = x.shape
        flat = self.recent.view(heads, -1, dim)
        if plan.commit_ids.numel():
            block = self.shape[2]
            staged = torch.empty((heads, plan.commit_ids.numel() * block, dim),
                                 dtype=torch.float32, device=x.device)  # fmt: skip
            staged.index_copy_(1, plan.stage_recent_dst,
                               flat.index_select(1, plan.stage_recent_src).float())  # fmt: skip
            staged.index_copy_(1, plan.stage_new_dst, x.index_select(1, plan.stage_new_src).float())
            self.write_whole_blocks(plan.commit_ids, staged.view(heads, -1, block, dim))
        flat.index_copy_(1, plan.recent_dst, x.index_select(1, plan.recent_src).to(flat.dtype))

    def gather(self, block_ids: torch.Tensor) -> torch.Tensor:
        out = super().gather(block_ids)
        pos, slots = self.window.hot(block_ids)
        if pos.numel():
            out.index_copy_(1, pos, self.recent.index_select(1, slots).float())
        return out

    def gather_scaled(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.gather(block_ids), None


class KVStore:
    """K and V of every layer: [num_kv_heads, num_blocks, block_size, head_dim] each.

    A token's K/V is written once, at its slot (block_id * block_size + offset),
    and read by attention through the request's block table. The head comes
    first so that gathering a sequence's blocks for one head yields one
    contiguous [tokens, head_dim] matrix, multiplied without a copy. Quantized
    formats keep each layer's K and V as a `QuantizedCache` of the same shape.
    """

    def __init__(
        self,
        spec: ModelSpec,
        fmt: KVFormat,
        num_blocks: int,
        block_size: int,
        device: torch.device | str = "cpu",
        max_running: int = 1,
    ) -> None:
        """`max_running`: requests whose recent full-precision windows are reserved, for
        formats that keep one (int2); their precision is the model's (`spec.dtype`)."""
        self.spec, self.format = spec, fmt
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (spec.num_kv_heads, num_blocks, block_size, spec.head_dim)
        self.window = None
        if fmt.name in TORCH_DTYPES:
            self.codec = None
            self.dtype = TORCH_DTYPES[fmt.name]
            self.k = [torch.zeros(shape, dtype=self.dtype, device=device)
                      for _ in range(spec.num_layers)]  # fmt: skip
            self.v = [torch.zeros(shape, dtype=self.dtype, device=device)
                      for _ in range(spec.num_layers)]  # fmt: skip
        else:
            k_codec, v_codec = get_codecs(fmt.name, spec.head_dim)
            self.codec = k_codec
            self.dtype = torch.uint8  # what whole blocks move as (tiers, swap)
            if fmt.residual_tokens:
                self.window = RecentWindow(num_blocks, block_size, fmt.residual_tokens,
                                           max_running, device)  # fmt: skip
                full = TORCH_DTYPES[spec.dtype]

                def make(codec):
                    return WindowedCache(codec, *shape[:3], device, self.window, full)
            else:

                def make(codec):
                    return QuantizedCache(codec, *shape[:3], device)

            self.k = [make(k_codec) for _ in range(spec.num_layers)]
            self.v = [make(v_codec) for _ in range(spec.num_layers)]
        if self.block_bytes_allocated != num_blocks * bytes_per_block(spec, fmt, block_size):
            raise AssertionError("store layout disagrees with its format")  # a bug, not input
        if self.recent_bytes_allocated != max_running * residual_bytes(spec, fmt, block_size):
            raise AssertionError("recent window disagrees with its format")

    def begin_pass(self, seqs: list[tuple[list[int], int, int]]) -> None:
        """Before a forward pass: each sequence's block ids and new positions [start, end),
        in batch order (only formats with a recent window need it)."""
        if self.window is not None:
            self.window.begin_pass(seqs)

    def retire(self, block_ids: list[int], num_tokens: int) -> None:
        """A request lets go of its blocks (finished or preempted) after `num_tokens`."""
        if self.window is not None:
            self.window.retire(block_ids, num_tokens)

    def write(
        self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store the new tokens' K/V ([T, kv_heads, D]) at their slots ([T])."""
        if self.window is not None:  # where each token goes was planned by begin_pass
            self.k[layer].write_pass(k.transpose(0, 1))
            self.v[layer].write_pass(v.transpose(0, 1))
            return
        if self.codec is not None:
            self.k[layer].write(slot_mapping, k.transpose(0, 1))
            self.v[layer].write(slot_mapping, v.transpose(0, 1))
            return
        heads, dim = k.shape[1], k.shape[2]
        k_slots = self.k[layer].view(heads, -1, dim)  # [kv_heads, num_blocks * block_size, D]
        v_slots = self.v[layer].view(heads, -1, dim)
        k_slots.index_copy_(1, slot_mapping, k.transpose(0, 1).to(self.dtype))
        v_slots.index_copy_(1, slot_mapping, v.transpose(0, 1).to(self.dtype))

    def _tensors(self) -> list[torch.Tensor]:
        """Every tensor of the store, in a fixed order: [kv_heads, num_blocks, block, width]."""
        out = []
        for k, v in zip(self.k, self.v, strict=True):
            out += [k, v] if self.codec is None else [*k.tensors(), *v.tensors()]
        return out

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A host copy of whole blocks as stored (packed, for quantized formats), one row of
        bytes a block: [n, bytes_per_block] uint8 (or the plain dtype: [n, block_shape])."""
        if self.window is not None:
            self.window.settle(block_ids)
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.k[0].device)
        rows = [
            t.index_select(1, ids).transpose(0, 1).reshape(len(block_ids), -1)
            for t in self._tensors()
        ]
        if self.codec is None:
            return torch.cat(rows, dim=1).view(len(block_ids), *self.block_shape).cpu()
        return torch.cat([r.view(torch.uint8) for r in rows], dim=1).cpu()

    def write_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Put back blocks copied by `read_blocks` (same layout), into `block_ids`."""
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.k[0].device)
        data = data.to(self.k[0].device).reshape(len(block_ids), -1)
        at = 0
        for t in self._tensors():
            heads, _, block, width = t.shape
            size = heads * block * width * (t.element_size() if self.codec is not None else 1)
            chunk = data[:, at : at + size]
            at += size
            if self.codec is not None:
                chunk = chunk.contiguous().view(t.dtype)
            t.index_copy_(
                1, ids, chunk.reshape(len(block_ids), heads, block, width).transpose(0, 1)
            )

    def move_tokens(self, src_slots: list[int], dst_slots: list[int]) -> None:
        """Copy the K/V of every layer from `src_slots` to `dst_slots`, as stored (a
        quantized token keeps its codes and scale: nothing is re-encoded). All sources
        are read before any destination is written, so the two may overlap."""
        if self.window is not None:
            raise AssertionError("tokens of a windowed (int2) cache cannot move")
        device = self.k[0].device
        src = torch.tensor(src_slots, dtype=torch.long, device=device)
        dst = torch.tensor(dst_slots, dtype=torch.long, device=device)
        for t in self._tensors():
            flat = t.view(t.shape[0], -1, t.shape[-1])  # [kv_heads, slots, width]
            flat.index_copy_(1, dst, flat.index_select(1, src))

    def copy_blocks(self, src_ids: list[int], dst_ids: list[int]) -> None:
        """Copy whole blocks as stored, every layer; all sources are read before any
        destination is written. Blocks in the recent window (int2) are not copied."""
        if self.window is not None and any(b in self.window.slots for b in src_ids):
            raise AssertionError("a block in the recent window cannot be copied")
        device = self.k[0].device
        src = torch.tensor(src_ids, dtype=torch.long, device=device)
        dst = torch.tensor(dst_ids, dtype=torch.long, device=device)
        for t in self._tensors():
            t.index_copy_(1, dst, t.index_select(1, src))

    def read_keys(self, slots: list[int]) -> torch.Tensor:
        """Every layer's keys at `slots`, decoded: [layers, kv_heads, len(slots), D] float32."""
        at = torch.tensor(slots, dtype=torch.long, device=self.k[0].device)
        if self.codec is None:
            rows = [k.view(k.shape[0], -1, k.shape[-1]).index_select(1, at) for k in self.k]
            return torch.stack(rows).float()
        blocks, offsets = at // self.block_size, at % self.block_size
        picked = torch.arange(len(slots), device=at.device)
        return torch.stack([k.gather(blocks)[:, picked, offsets] for k in self.k])

    def write_keys(self, slots: list[int], keys: torch.Tensor) -> None:
        """Store every layer's keys ([layers, kv_heads, len(slots), D]) at `slots`, encoded
        as new tokens' are; values stay as they are. A codec that encodes whole blocks
        (int2) takes whole blocks of slots, outside the recent window."""
        at = torch.tensor(slots, dtype=torch.long, device=self.k[0].device)
        block_wise = getattr(self.codec, "block_wise", False)
        if block_wise:
            bs = self.block_size
            blocks = [s // bs for s in slots[::bs]]
            if slots != [b * bs + o for b in blocks for o in range(bs)]:
                raise AssertionError("int2 keys are rewritten a whole block at a time")
            if any(b in self.window.slots for b in blocks):
                raise AssertionError("a block in the recent window is rewritten by its writes")
            ids = torch.tensor(blocks, dtype=torch.long, device=at.device)
        for k, new in zip(self.k, keys, strict=True):
            if self.codec is None:
                k.view(k.shape[0], -1, k.shape[-1]).index_copy_(1, at, new.to(self.dtype))
            elif block_wise:
                k.write_whole_blocks(ids, new.view(new.shape[0], len(ids), -1, new.shape[-1]))
            else:
                k.write(at, new)

    @property
    def token_moves(self) -> bool:
        """Whether single tokens can move between slots (eviction policies compact them):
        every format but those with per-block parameters and a recent window (int2)."""
        return self.window is None

    @property
    def block_shape(self) -> tuple[int, ...]:
        """The shape of one block in `read_blocks`' layout."""
        if self.codec is not None:
            return (bytes_per_block(self.spec, self.format, self.block_size),)
        return (self.spec.num_layers, 2, self.spec.num_kv_heads, self.block_size,
                self.spec.head_dim)  # fmt: skip

    def swap_out(self, block_ids: list[int]):
        """A host copy of a request's blocks, recent full-precision tokens included; the
        window's slots are given up (the request leaves the device)."""
        blocks = self.read_blocks(block_ids)
        if self.window is None:
            return blocks
        return blocks, *self.window.take_out(block_ids)

    def swap_in(self, block_ids: list[int], swapped) -> None:
        if self.window is None:
            self.write_blocks(block_ids, swapped)
            return
        blocks, pos, recent = swapped
        self.write_blocks(block_ids, blocks)
        self.window.put_back(block_ids, pos, recent)

    def layer(self, layer: int):
        return self.k[layer], self.v[layer]

    @property
    def block_bytes_allocated(self) -> int:
        """The paged blocks: num_blocks × the planner's bytes per block."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    @property
    def recent_bytes_allocated(self) -> int:
        """The full-precision recent windows (int2), outside the blocks."""
        if self.window is None:
            return 0
        return sum(c.recent.numel() * c.recent.element_size() for c in self.window.caches)

    @property
    def bytes_allocated(self) -> int:
        return self.block_bytes_allocated + self.recent_bytes_allocated

    @property
    def bytes_per_token(self) -> int | float:
        """Bytes of the paged blocks per token slot (the planner's bytes_per_token)."""
        return as_number(Fraction(self.block_bytes_allocated, self.num_blocks * self.block_size))
