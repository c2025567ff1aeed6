"""The one interface of a layer's K (or V) cache.

Three kinds answer it — `PlainCache` (plain_cache.py: fp32/fp16/bf16 as computed),
`QuantizedCache` (quantized_cache.py: a codec's packed parts) and int2's
`WindowedCache` (recent_window.py: packed blocks plus a full-precision recent
window) — so the store and attention never ask which one they hold.
"""

from typing import Protocol

import torch


class LayerCache(Protocol):
    shape: tuple[int, ...]  # (kv_heads, num_blocks, block_size, head_dim)
    dtype: torch.dtype | None  # the plain dtype, or None when stored encoded
    prefill_full_precision: bool  # a fresh prompt attends to itself as computed
    # R when `gather_scaled` returns values rotated (x @ R, a rotated KV format): attention
    # then multiplies the query by R for K, and its output by R.T for V; else None
    rotation: torch.Tensor | None
    device: torch.device

    def write(self, slot_mapping: torch.Tensor, x: torch.Tensor) -> None:
        """New tokens' values [kv_heads, T, D] at their slots, encoded once."""

    def gather(self, block_ids: torch.Tensor) -> torch.Tensor:
        """A tile of blocks, decoded: [kv_heads, n, block_size, D] float32."""

    def gather_scaled(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(values, a per-token scale [kv_heads, n, block_size] left for attention, or None);
        rotated by `rotation` when that is set."""

    def read_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """Tokens' values, decoded: [kv_heads, len(slots), D] float32."""

    def write_slots(self, slots: torch.Tensor, x: torch.Tensor) -> None:
        """Rewrite tokens (re-rotated sinks), encoded as new ones are."""

    def move_tokens(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Tokens' stored bytes between slots; sources read before writes."""

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Whole blocks as stored; sources read before writes."""

    def tensors(self) -> list[torch.Tensor]:
        """What it stores, [kv_heads, num_blocks, rows, width] each (rows: block_size, or
        1 for parameters kept once per block)."""
