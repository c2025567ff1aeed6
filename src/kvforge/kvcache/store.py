"""The physical KV cache: per layer, K and V tensors cut into fixed blocks of tokens.

Allocated once at start and never grown. Only num_kv_heads are stored, so
GQA/MQA savings are real bytes, and the store's bytes per token equal the
planner's (`planner.bytes_per_block`), which sized it.
"""

import torch

from kvforge.config import ModelSpec
from kvforge.errors import KVForgeError
from kvforge.kvcache.formats import KVFormat
from kvforge.planner import bytes_per_block

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class KVStore:
    """K and V of every layer: [num_kv_heads, num_blocks, block_size, head_dim] each.

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
        if fmt.name not in TORCH_DTYPES:
            raise KVForgeError(
                f"kv_dtype {fmt.name!r} is not supported by the KV store yet; "
                f"supported: auto, {', '.join(TORCH_DTYPES)}"
            )
        self.spec, self.format = spec, fmt
        self.num_blocks, self.block_size = num_blocks, block_size
        self.dtype = TORCH_DTYPES[fmt.name]
        shape = (spec.num_kv_heads, num_blocks, block_size, spec.head_dim)
        self.k = [
            torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(spec.num_layers)
        ]
        self.v = [
            torch.zeros(shape, dtype=self.dtype, device=device) for _ in range(spec.num_layers)
        ]
        if self.bytes_allocated != num_blocks * bytes_per_block(spec, fmt, block_size):
            raise AssertionError("store layout disagrees with the planner")  # a bug, not input

    def write(
        self, layer: int, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Store the new tokens' K/V ([T, kv_heads, D]) at their slots ([T])."""
        heads, dim = k.shape[1], k.shape[2]
        k_slots = self.k[layer].view(heads, -1, dim)  # [kv_heads, num_blocks * block_size, D]
        v_slots = self.v[layer].view(heads, -1, dim)
        k_slots.index_copy_(1, slot_mapping, k.transpose(0, 1).to(self.dtype))
        v_slots.index_copy_(1, slot_mapping, v.transpose(0, 1).to(self.dtype))

    def read_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """A host copy of whole blocks, as stored: [n, layers, 2 (K, V), kv_heads, block, D]."""
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.k[0].device)
        per_layer = [
            torch.stack((k.index_select(1, ids), v.index_select(1, ids)))  # [2, kvH, n, B, D]
            for k, v in zip(self.k, self.v, strict=True)
        ]
        return torch.stack(per_layer).permute(3, 0, 1, 2, 4, 5).contiguous().cpu()

    def write_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Put back blocks copied by `read_blocks` (same layout), into `block_ids`."""
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.k[0].device)
        data = data.to(device=self.k[0].device).permute(1, 2, 3, 0, 4, 5)  # [L, 2, kvH, n, B, D]
        for layer, (k, v) in enumerate(zip(self.k, self.v, strict=True)):
            k.index_copy_(1, ids, data[layer, 0])
            v.index_copy_(1, ids, data[layer, 1])

    @property
    def block_shape(self) -> tuple[int, ...]:
        """The shape of one block in `read_blocks`' layout: [layers, 2, kv_heads, block, D]."""
        return (self.spec.num_layers, 2, self.spec.num_kv_heads, self.block_size,
                self.spec.head_dim)  # fmt: skip

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer], self.v[layer]

    @property
    def bytes_allocated(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    @property
    def bytes_per_token(self) -> int:
        return self.bytes_allocated // (self.num_blocks * self.block_size)
