"""The physical KV cache: per layer, K and V tensors cut into fixed blocks of tokens.

Allocated once at start and never grown. Each layer's K and V is a layer cache
answering one interface (plain_cache.py lists it): `PlainCache` for fp32/fp16/
bf16, `QuantizedCache` (quantized_cache.py) for a codec's packed parts, int4's and int2's
`WindowedCache` with its full-precision recent window (recent_window.py), kept in blocks
each running request borrows from the pool; a layer
the format skips (kv_skip_layers) is a `PlainCache` in the model's dtype. The
store is their owner: it routes each call to every layer and moves whole blocks
as bytes (tiers, swap). Only num_kv_heads are stored, so
GQA/MQA savings are real bytes, and the store's bytes per token equal the
planner's: both count with `formats.bytes_per_block`.
"""

from dataclasses import dataclass
from fractions import Fraction

import torch

from kvforge.config import ModelSpec
from kvforge.dtypes import torch_dtype
from kvforge.kvcache.codecs import get_codecs
from kvforge.kvcache.formats import (
    KVFormat,
    as_number,
    bytes_per_block,
    window_lend,
    window_rows,
)
from kvforge.kvcache.plain_cache import PlainCache
from kvforge.kvcache.quantized_cache import QuantizedCache
from kvforge.kvcache.recent_window import RecentWindow, WindowedCache
from kvforge.kvcache.rotation import RotatedCodec, rotation_matrix


@dataclass(frozen=True)
class Swapped:
    """A swapped-out request's blocks in host memory: the packed blocks, and (int2) the
    full-precision tokens of its hot blocks, at `hot` positions of its block list."""

    blocks: torch.Tensor
    hot: list[int]
    recent: torch.Tensor | None = None


class KVStore:
    """K and V of every layer, each a layer cache of [num_kv_heads, num_blocks,
    block_size, head_dim] (plain_cache.py lists what a layer cache answers).

    A token's K/V is written once, at its slot (block_id * block_size + offset),
    and read by attention through the request's block table. The head comes
    first so that gathering a sequence's blocks for one head yields one
    contiguous [tokens, head_dim] matrix, multiplied without a copy.
    """

    def __init__(
        self,
        spec: ModelSpec,
        fmt: KVFormat,
        num_blocks: int,
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> None:
        """Formats that keep a recent full-precision window (int4, int2) keep it at the
        model's precision (`spec.dtype`), in blocks of this store that the running requests
        borrow (`formats.window_blocks`). Layers the format skips (`fmt.skip_layers`) are
        plain caches in that dtype, unrotated."""
        self.spec, self.format = spec, fmt
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (spec.num_kv_heads, num_blocks, block_size)
        self.window = None  # int4's and int2's, for the layers it codes (not those it skips)
        if fmt.residual_tokens and len(fmt.skip_layers) < spec.num_layers:
            self.window = RecentWindow(num_blocks, block_size, fmt.residual_tokens,
                                       window_lend(spec, fmt, block_size),
                                       window_rows(spec, fmt, block_size), device,
                                       fmt.sink_blocks)  # fmt: skip
        k_codec, v_codec = get_codecs(fmt.name, spec.head_dim) if fmt.codecs else (None, None)
        if fmt.rotation:  # one matrix for K and V of every coded layer and head
            rotation = rotation_matrix(spec.head_dim).to(device)
            k_codec = RotatedCodec(k_codec, rotation)
            v_codec = RotatedCodec(v_codec, rotation)

        def make(layer: int, codec):
            layer_fmt = fmt.layer_format(layer)
            if layer_fmt.codecs is None:
                dtype = torch_dtype(layer_fmt.name)
                return PlainCache.zeros(*shape, spec.head_dim, dtype, device)
            if self.window is not None:
                full = torch_dtype(spec.dtype)
                return WindowedCache(codec, *shape, device, self.window, full)
            return QuantizedCache(codec, *shape, device)

        self.k = [make(layer, k_codec) for layer in range(spec.num_layers)]
        self.v = [make(layer, v_codec) for layer in range(spec.num_layers)]
        self.caches = [c for pair in zip(self.k, self.v, strict=True) for c in pair]
        # blocks move as bytes (tiers, swap) unless every layer holds one plain dtype
        dtypes = {cache.dtype for cache in self.caches}
        self.packed = None in dtypes or len(dtypes) > 1
        self.dtype = torch.uint8 if self.packed else dtypes.pop()
        if self.bytes_allocated != num_blocks * bytes_per_block(spec, fmt, block_size):
            raise AssertionError("store layout disagrees with its format")  # a bug, not input

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.k[0].device)

    def begin_pass(self, seqs: list[tuple[list[int], int, int, list[int]]]) -> None:
        """Before a forward pass: each sequence's block ids, new positions [start, end) and
        the blocks it borrows for its window, in batch order (only formats with a recent
        window need it)."""
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
        self.k[layer].write(slot_mapping, k.transpose(0, 1))
        self.v[layer].write(slot_mapping, v.transpose(0, 1))

    def _tensors(self) -> list[torch.Tensor]:
        """Every tensor of the store, in a fixed order: [kv_heads, num_blocks, rows, width]."""
        return [t for cache in self.caches for t in cache.tensors()]

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A host copy of whole blocks as stored (packed, for quantized formats), one row of
        bytes a block: [n, bytes_per_block] uint8 (or the plain dtype: [n, block_shape])."""
        if self.window is not None:
            self.window.settle(block_ids)
        ids = self._ids(block_ids)
        rows = [
            t.index_select(1, ids).transpose(0, 1).reshape(len(block_ids), -1)
            for t in self._tensors()
        ]
        if not self.packed:
            return torch.cat(rows, dim=1).view(len(block_ids), *self.block_shape).cpu()
        return torch.cat([r.view(torch.uint8) for r in rows], dim=1).cpu()

    def write_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Put back blocks copied by `read_blocks` (same layout), into `block_ids`."""
        ids = self._ids(block_ids)
        data = data.to(self.k[0].device).reshape(len(block_ids), -1)
        at = 0
        for t in self._tensors():
            heads, _, block, width = t.shape
            size = heads * block * width * (t.element_size() if self.packed else 1)
            chunk = data[:, at : at + size]
            at += size
            if self.packed:
                chunk = chunk.contiguous().view(t.dtype)
            t.index_copy_(
                1, ids, chunk.reshape(len(block_ids), heads, block, width).transpose(0, 1)
            )

    def move_tokens(self, src_slots: list[int], dst_slots: list[int]) -> None:
        """Copy the K/V of every layer from `src_slots` to `dst_slots`, as stored (a
        quantized token keeps its codes and scale: nothing is re-encoded). All sources
        are read before any destination is written, so the two may overlap."""
        src, dst = self._ids(src_slots), self._ids(dst_slots)
        for cache in self.caches:
            cache.move_tokens(src, dst)

    def copy_blocks(self, src_ids: list[int], dst_ids: list[int]) -> None:
        """Copy whole blocks as stored, every layer; all sources are read before any
        destination is written. Blocks in the recent window (int2) are not copied."""
        src, dst = self._ids(src_ids), self._ids(dst_ids)
        for cache in self.caches:
            cache.copy_blocks(src, dst)

    def read_keys(self, slots: list[int]) -> torch.Tensor:
        """Every layer's keys at `slots`, decoded: [layers, kv_heads, len(slots), D] float32."""
        at = self._ids(slots)
        return torch.stack([k.read_slots(at) for k in self.k])

    def write_keys(self, slots: list[int], keys: torch.Tensor) -> None:
        """Store every layer's keys ([layers, kv_heads, len(slots), D]) at `slots`, encoded
        as new tokens' are; values stay as they are. A codec that encodes whole blocks
        (int2) takes whole blocks of slots, outside the recent window."""
        at = self._ids(slots)
        for k, new in zip(self.k, keys, strict=True):
            k.write_slots(at, new)

    @property
    def token_moves(self) -> bool:
        """Whether single tokens can move between slots (eviction policies compact them):
        every format but those with per-block parameters and a recent window (int4, int2)."""
        return self.window is None

    @property
    def block_shape(self) -> tuple[int, ...]:
        """The shape of one block in `read_blocks`' layout."""
        if self.packed:
            return (bytes_per_block(self.spec, self.format, self.block_size),)
        return (self.spec.num_layers, 2, self.spec.num_kv_heads, self.block_size,
                self.spec.head_dim)  # fmt: skip

    def swap_out(self, block_ids: list[int]) -> Swapped:
        """A host copy of a request's blocks, recent full-precision tokens included; the
        window's slots are given up (the request leaves the device)."""
        blocks = self.read_blocks(block_ids)
        if self.window is None:
            return Swapped(blocks, [])
        return Swapped(blocks, *self.window.take_out(block_ids))

    def swap_in(self, block_ids: list[int], swapped: Swapped, window: list[int] = ()) -> None:
        """Put a swapped-out request back into `block_ids`, its recent tokens into the
        `window` blocks it borrows now."""
        self.write_blocks(block_ids, swapped.blocks)
        if self.window is not None:
            self.window.put_back(block_ids, swapped.hot, swapped.recent, window)

    def layer(self, layer: int):
        return self.k[layer], self.v[layer]

    def plain(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A layer's K and V tensors when stored as computed (fp32/fp16/bf16: a plain format,
        or a layer it skips), which kernels may read and write in place; None when encoded."""
        k, v = self.k[layer], self.v[layer]
        if k.dtype is None:
            return None
        return k.data, v.data

    @property
    def bytes_allocated(self) -> int:
        """num_blocks × the planner's bytes per block: all there is (int4's and int2's
        recent windows live in borrowed blocks)."""
        return sum(t.numel() * t.element_size() for t in self._tensors())

    @property
    def bytes_per_token(self) -> int | float:
        """Bytes of the paged blocks per token slot (the planner's bytes_per_token)."""
        return as_number(Fraction(self.bytes_allocated, self.num_blocks * self.block_size))
