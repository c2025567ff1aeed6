"""One layer's K (or V) stored in a codec's packed parts, decoded a tile at a time.
It answers the layer-cache calls listed in plain_cache.py."""

import torch


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
        # values rotated before quantizing (rotation.RotatedCodec): `gather_scaled` leaves
        # them rotated, for attention to rotate the query and un-rotate its output
        self.rotation = getattr(codec, "rotation", None)
        # what gather_scaled decodes with: a rotated codec's own codec, values left as x @ R
        self.read_codec = codec if self.rotation is None else codec.codec

    def write(self, slot_mapping: torch.Tensor, x: torch.Tensor) -> None:  # x [kv_heads, T, D]
        for name, encoded in self.codec.encode(x).items():
            part = self.parts[name]
            part.view(part.shape[0], -1, part.shape[-1]).index_copy_(1, slot_mapping, encoded)

    def write_slots(self, slot_mapping: torch.Tensor, x: torch.Tensor) -> None:
        """Rewrite tokens, encoded as new ones are."""
        self.write(slot_mapping, x)

    def write_whole_blocks(self, block_ids: torch.Tensor, x: torch.Tensor, codec=None) -> None:
        """Encode whole blocks ([kv_heads, n, block_size, D]) into `block_ids`, with `codec`
        (default: the cache's own)."""
        for name, encoded in (codec or self.codec).encode(x).items():
            self.parts[name].index_copy_(1, block_ids, encoded)

    def gather(self, block_ids: torch.Tensor) -> torch.Tensor:
        """The blocks' values, decoded: [kv_heads, len(block_ids), block_size, D] float32."""
        return self.codec.decode({n: t.index_select(1, block_ids) for n, t in self.parts.items()})

    def gather_scaled(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(values, per-token scale [kv_heads, n, block_size] or None): codecs with one scale
        per token leave it unapplied, for attention to apply where it is cheaper."""
        parts = {n: t.index_select(1, block_ids) for n, t in self.parts.items()}
        if not hasattr(self.read_codec, "decode_unscaled"):
            return self.read_codec.decode(parts), None
        return self.read_codec.decode_unscaled(parts), parts["scale"].squeeze(-1).float()

    def read_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """Tokens' values, decoded: [kv_heads, len(slots), D] float32."""
        block_size = self.shape[2]
        blocks, offsets = slots // block_size, slots % block_size
        picked = torch.arange(len(slots), device=slots.device)
        return self.gather(blocks)[:, picked, offsets]

    def move_tokens(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Tokens' codes and parameters between slots, as stored: nothing re-encoded."""
        if self.codec.block_wise:
            raise AssertionError("a codec with per-block parameters cannot move tokens")
        for part in self.parts.values():
            flat = part.view(part.shape[0], -1, part.shape[-1])
            flat.index_copy_(1, dst, flat.index_select(1, src))

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        for part in self.parts.values():
            part.index_copy_(1, dst, part.index_select(1, src))

    def tensors(self) -> list[torch.Tensor]:
        return list(self.parts.values())
