"""The physical KV cache: per layer, K and V tensors cut into fixed blocks of tokens.

Allocated once at start and never grown. Only num_kv_heads are stored, so
GQA/MQA savings are real bytes, and the store's bytes per token equal the
planner's (`planner.bytes_per_block`), which sized it.
"""

import torch

from kvforge.config import ModelSpec
from kvforge.kvcache.codecs import get_codec
from kvforge.kvcache.formats import KVFormat
from kvforge.planner import bytes_per_block

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class QuantizedCache:
    """One layer's K (or V) in a codec's parts, each [kv_heads, num_blocks, block_size, width].

    `write` encodes new tokens once; `gather` decodes only the blocks asked for
    (a tile), so the cache is never dequantized as a whole nor re-quantized.
    """

    dtype = None  # no plain dtype: attention never reads it as computed

    def __init__(self, codec, kv_heads: int, num_blocks: int, block_size: int, device) -> None:
        self.codec = codec
        self.shape = (kv_heads, num_blocks, block_size, codec.head_dim)
        self.parts = {
            p.name: torch.zeros((*self.shape[:3], p.width), dtype=p.dtype, device=device)
            for p in codec.parts
        }
        self.device = torch.device(device)

    def write(self, slot_mapping: torch.Tensor, x: torch.Tensor) -> None:  # x [kv_heads, T, D]
        for name, encoded in self.codec.encode(x).items():
            part = self.parts[name]
            part.view(part.shape[0], -1, part.shape[-1]).index_copy_(1, slot_mapping, encoded)

    def gather(self, block_ids: torch.Tensor) -> torch.Tensor:
        """The blocks' values, decoded: [kv_heads, len(block_ids), block_size, D] float32."""
        return self.codec.decode({n: t.index_select(1, block_ids) for n, t in self.parts.items()})

    def gather_scaled(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(values, per-token scale [kv_heads, n, block_size] or None): codecs with one scale
        per token leave it unapplied, for attention to apply where it is cheaper."""
        parts = {n: t.index_select(1, block_ids) for n, t in self.parts.items()}
        if hasattr(self.codec, "decode_unscaled"):
            return self.codec.decode_unscaled(parts), parts["scale"].squeeze(-1).float()
        return self.codec.decode(parts), None

    def tensors(self) -> list[torch.Tensor]:
        return list(self.parts.values())


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
    ) -> None:
        self.spec, self.format = spec, fmt
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (spec.num_kv_heads, num_blocks, block_size, spec.head_dim)
        if fmt.name in TORCH_DTYPES:
            self.codec = None
            self.dtype = TORCH_DTYPES[fmt.name]

            def make():
                return torch.zeros(shape, dtype=self.dtype, device=device)
        else:
            self.codec = get_codec(fmt.name, spec.head_dim)
            self.dtype = torch.uint8  # what whole blocks move as (tiers, swap)

            def make():
                return QuantizedCache(self.codec, *shape[:3], device)

        self.k = [make() for _ in range(spec.num_layers)]
        self.v = [make() for _ in range(spec.num_layers)]
        if self.bytes_allocated != num_blocks * bytes_per_block(spec, fmt, block_size):
            raise AssertionError("store layout disagrees with the planner")  # a bug, not input

    def write(
        self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store the new tokens' K/V ([T, kv_heads, D]) at their slots ([T])."""
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

    @property
    def block_shape(self) -> tuple[int, ...]:
        """The shape of one block in `read_blocks`' layout."""
        if self.codec is not None:
            return (bytes_per_block(self.spec, self.format, self.block_size),)
        return (self.spec.num_layers, 2, self.spec.num_kv_heads, self.block_size,
                self.spec.head_dim)  # fmt: skip

    def layer(self, layer: int):
        return self.k[layer], self.v[layer]

    @property
    def bytes_allocated(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors())

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_allocated // (self.num_blocks * self.block_size)
