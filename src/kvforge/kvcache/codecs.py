"""KV codecs: how a head's K or V vector is stored in the paged blocks, and read back.

Each codec is one small unit: `parts` (the block-shaped tensors it stores,
their dtype and last dimension), `encode` (new tokens' values → those parts,
once, at write time) and `decode` (gathered parts → float32, inside attention,
one tile of blocks at a time). The layouts are exactly `formats.KV_FORMATS`,
so the store's bytes equal the planner's.

    int8   value int8 [D]        + scale fp16 [1]      symmetric, per token per head
    fp8    value e4m3 bits [D]   + scale fp16 [1]      per token per head
    int4   value uint8 [D/2]     + scale, zero fp16 [G] asymmetric, per 64 channels,
                                                        two values a byte (low nibble first)
"""

from dataclasses import dataclass
from math import ceil

import torch

from kvforge.errors import KVForgeError
from kvforge.kvcache.formats import INT4_GROUP_SIZE

PARAM_DTYPE = torch.float16  # scales and zero points
TINY = 1e-8  # a zero vector still gets a non-zero scale


@dataclass(frozen=True)
class Part:
    """One tensor a codec stores per token and head: its dtype and last dimension."""

    name: str
    dtype: torch.dtype
    width: int


class Int8Codec:
    name = "int8"

    def __init__(self, head_dim: int) -> None:
        self.head_dim = head_dim
        self.parts = (Part("q", torch.int8, head_dim), Part("scale", PARAM_DTYPE, 1))

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # x [..., D] float
        x = x.float()
        scale = (x.abs().amax(-1, keepdim=True) / 127).clamp_min(TINY).to(PARAM_DTYPE)
        q = torch.round(x / scale.float()).clamp_(-127, 127).to(torch.int8)
        return {"q": q, "scale": scale}

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return parts["q"].float() * parts["scale"].float()

    def decode_unscaled(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """The values before their per-token scale: attention applies the scale to the
        [rows, tokens] scores and probabilities instead of the [tokens, D] values."""
        return parts["q"].float()


class Fp8Codec:
    name = "fp8"
    MAX = 448.0  # the largest finite e4m3 value

    def __init__(self, head_dim: int) -> None:
        dtype = getattr(torch, "float8_e4m3fn", None)
        if dtype is None or not _casts(dtype):
            raise KVForgeError(
                f"kv_dtype 'fp8' needs float8_e4m3fn, which torch {torch.__version__} cannot "
                "do here; use int8 (the same bytes per token) or int4, fp16, bf16, fp32"
            )
        self.head_dim, self.fp8 = head_dim, dtype
        # stored as their bits in uint8: copying and gathering float8 tensors is not
        # implemented on every device, bytes are
        self.parts = (Part("q", torch.uint8, head_dim), Part("scale", PARAM_DTYPE, 1))

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.float()
        scale = (x.abs().amax(-1, keepdim=True) / self.MAX).clamp_min(TINY).to(PARAM_DTYPE)
        q = (x / scale.float()).clamp_(-self.MAX, self.MAX).to(self.fp8)
        return {"q": q.view(torch.uint8), "scale": scale}

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return parts["q"].view(self.fp8).float() * parts["scale"].float()

    def decode_unscaled(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        return parts["q"].view(self.fp8).float()


def _casts(dtype: torch.dtype) -> bool:
    try:
        return bool(torch.ones(2).to(dtype).float().eq(1).all())
    except (RuntimeError, TypeError):
        return False


class Int4Codec:
    name = "int4"

    def __init__(self, head_dim: int, group_size: int = INT4_GROUP_SIZE) -> None:
        self.head_dim, self.group_size = head_dim, group_size
        self.groups = ceil(head_dim / group_size)
        self.parts = (
            Part("q", torch.uint8, ceil(head_dim / 2)),
            Part("scale", PARAM_DTYPE, self.groups),
            Part("zero", PARAM_DTYPE, self.groups),
        )

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., G, group]
        pad = self.groups * self.group_size - self.head_dim
        if pad:  # a shorter last group: pad with its own first value (changes no min/max)
            x = torch.cat((x, x[..., -1:].expand(*x.shape[:-1], pad)), dim=-1)
        return x.view(*x.shape[:-1], self.groups, self.group_size)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        g = self._grouped(x.float())
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp_min(TINY).to(PARAM_DTYPE)
        zero = lo.to(PARAM_DTYPE)
        q = torch.round((g - zero.float()) / scale.float()).clamp_(0, 15).to(torch.uint8)
        q = q.view(*x.shape[:-1], -1)[..., : self.head_dim]
        if self.head_dim % 2:
            q = torch.cat((q, q.new_zeros(*q.shape[:-1], 1)), dim=-1)
        packed = q[..., 0::2] | (q[..., 1::2] << 4)  # low nibble: even channel
        return {"q": packed, "scale": scale.squeeze(-1), "zero": zero.squeeze(-1)}

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        packed = parts["q"]
        q = torch.stack((packed & 0xF, packed >> 4), dim=-1).view(*packed.shape[:-1], -1)
        q = q[..., : self.head_dim].float()
        scale = parts["scale"].float().repeat_interleave(self.group_size, -1)[..., : self.head_dim]
        zero = parts["zero"].float().repeat_interleave(self.group_size, -1)[..., : self.head_dim]
        return q * scale + zero


CODECS = {"int8": Int8Codec, "fp8": Fp8Codec, "int4": Int4Codec}


def get_codec(name: str, head_dim: int):
    """The codec of a quantized KV format; KVForgeError naming what exists otherwise."""
    if name not in CODECS:
        raise KVForgeError(
            f"kv_dtype {name!r} has no codec in this version; available: "
            f"fp32, fp16, bf16, {', '.join(CODECS)}"
        )
    return CODECS[name](head_dim)
