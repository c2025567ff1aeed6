"""One layer's K (or V) stored as computed: fp32, fp16 or bf16, nothing else
(a `layer_cache.LayerCache`)."""

import torch


class PlainCache:
    """[kv_heads, num_blocks, block_size, head_dim] of one dtype."""

    prefill_full_precision = False  # stored as computed: reading it back is exact
    rotation = None  # values as computed

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data
        self.shape = tuple(data.shape)
        self.dtype = data.dtype
        self.device = data.device

    @classmethod
    def zeros(cls, kv_heads: int, num_blocks: int, block_size: int, head_dim: int,
              dtype: torch.dtype, device) -> "PlainCache":  # fmt: skip
        return cls(torch.zeros((kv_heads, num_blocks, block_size, head_dim), dtype=dtype,
                               device=device))  # fmt: skip

    def _slots(self) -> torch.Tensor:  # [kv_heads, num_blocks * block_size, D]
        return self.data.view(self.shape[0], -1, self.shape[-1])

    def write(self, slot_mapping: torch.Tensor, x: torch.Tensor) -> None:
        self._slots().index_copy_(1, slot_mapping, x.to(self.dtype))

    write_slots = write

    def gather(self, block_ids: torch.Tensor) -> torch.Tensor:
        # index_select, not data[:, ids]: advanced indexing is ~8x slower on CPU
        return self.data.index_select(1, block_ids).float()

    def gather_scaled(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.gather(block_ids), None

    def read_slots(self, slots: torch.Tensor) -> torch.Tensor:
        return self._slots().index_select(1, slots).float()

    def move_tokens(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        flat = self._slots()
        flat.index_copy_(1, dst, flat.index_select(1, src))

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.data.index_copy_(1, dst, self.data.index_select(1, src))

    def tensors(self) -> list[torch.Tensor]:
        return [self.data]
