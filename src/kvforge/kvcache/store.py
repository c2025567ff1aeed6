"""The physical KV cache: per layer, K and V tensors cut into fixed blocks of tokens.

Allocated once at start and never grown. Plain formats keep each layer's K and V
as tensors; quantized ones as `QuantizedCache`s (quantized_cache.py), int2's with
its full-precision recent window (recent_window.py). Only num_kv_heads are stored, so
GQA/MQA savings are real bytes, and the store's bytes per token equal the
planner's: both count with `formats.bytes_per_block`.
"""

from fractions import Fraction

import torch

from kvforge.config import ModelSpec
from kvforge.kvcache.codecs import get_codecs
from kvforge.kvcache.formats import (
    KVFormat,
    as_number,
    bytes_per_block,
    residual_bytes,
)
from kvforge.kvcache.quantized_cache import QuantizedCache
from kvforge.kvcache.recent_window import RecentWindow, WindowedCache

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
