"""KV codecs: how a head's K or V vector is stored in the paged blocks, and read back.

Each codec is one small unit: `parts` (the block-shaped tensors it stores,
their dtype and last dimension), `encode` (new tokens' values → those parts,
once, at write time) and `decode` (gathered parts → float32, inside attention,
one tile of blocks at a time). `formats.KV_FORMATS`, the one registry of
formats, names each format's K and V codec; a codec's parts are exactly its
format's layout, so the store's bytes equal the planner's.

    int8   value int8 [D]        + scale fp16 [1]      symmetric, per token per head
    fp8    value e4m3 bits [D]   + scale fp16 [1]      per token per head
    int4   K: value uint8 [D/2]  + scale, zero fp16 [D] per channel, once per block
           V: value uint8 [D/2]  + scale, zero fp16 [G] asymmetric, per 64 channels,
                                                        two values a byte (low bits first)
    int2   K: value uint8 [D/4]  + scale, zero fp16 [D] per channel, once per block
           V: value uint8 [D/4]  + scale, zero fp16 [G] per 64 channels of a token

int4's and int2's keys are quantized along tokens (KIVI: key outliers sit in fixed
channels, so a channel's range over a block is narrow), which needs a whole
block at once: its codec is "block-wise" — `encode` takes [..., n, block, D]
and stores its parameters once per block (`Part.per_block`). The store keeps
a request's most recent tokens in full precision until their block is whole
and out of the recent window (`store.WindowedCache`).
"""

from dataclasses import dataclass
from math import ceil

import torch

from kvforge.errors import KVForgeError
from kvforge.kvcache.formats import (
    INT2_GROUP_SIZE,
    INT4_GROUP_SIZE,
    KV_FORMATS,
)

PARAM_DTYPE = torch.float16  # scales and zero points
TINY = 1e-8  # a zero vector still gets a non-zero scale


@dataclass(frozen=True)
class Part:
    """One tensor a codec stores per token and head: its dtype and last dimension."""

    name: str
    dtype: torch.dtype
    width: int
    per_block: bool = False  # stored once per block ([..., 1, width]), not per token


class Int8Codec:
    name = "int8"
    block_wise = False  # parameters per token (int2's keys: per block)

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
    block_wise = False
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


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned `bits`-bit values [..., D] (uint8) → bytes [..., ceil(D * bits / 8)],
    the first value in the lowest bits."""
    per_byte = 8 // bits
    pad = -q.shape[-1] % per_byte
    if pad:
        q = torch.cat((q, q.new_zeros(*q.shape[:-1], pad)), dim=-1)
    q = q.view(*q.shape[:-1], -1, per_byte)
    packed = q[..., 0].clone()
    for i in range(1, per_byte):
        packed |= q[..., i] << (bits * i)
    return packed


_UNPACK_TABLES: dict[tuple[int, torch.device], torch.Tensor] = {}


def _unpack_table(bits: int, device: torch.device) -> torch.Tensor:
    """[256, 8 / bits] float32: the values packed in each byte, first value first."""
    table = _UNPACK_TABLES.get((bits, device))
    if table is None:
        byte = torch.arange(256, dtype=torch.int32)
        mask = (1 << bits) - 1
        table = torch.stack([(byte >> (bits * i)) & mask for i in range(8 // bits)], dim=-1)
        table = _UNPACK_TABLES[(bits, device)] = table.float().to(device)
    return table


def unpack(packed: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    """The inverse of `pack`: bytes [..., n] → values [..., width] as float32 (one table
    lookup a byte: cheaper than shifting and masking each value on CPU)."""
    table = _unpack_table(bits, packed.device)
    values = table.index_select(0, packed.reshape(-1).int())
    values = values.view(*packed.shape[:-1], -1)
    return values if values.shape[-1] == width else values[..., :width]


def _affine(x: torch.Tensor, dim: int, bits: int) -> tuple[torch.Tensor, ...]:
    """Asymmetric quantization of x over `dim`: (values uint8, scale fp16, zero fp16)."""
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).clamp_min(TINY).to(PARAM_DTYPE)
    zero = lo.to(PARAM_DTYPE)
    q = torch.round((x - zero.float()) / scale.float()).clamp_(0, levels).to(torch.uint8)
    return q, scale, zero


class GroupCodec:
    """Asymmetric `bits`-bit values with an fp16 scale and zero point per group of
    `group_size` channels of a token; 8 / bits values a byte."""

    block_wise = False

    def __init__(self, head_dim: int, bits: int, group_size: int) -> None:
        self.head_dim, self.bits, self.group_size = head_dim, bits, group_size
        self.groups = ceil(head_dim / group_size)
        self.parts = (
            Part("q", torch.uint8, ceil(head_dim * bits / 8)),
            Part("scale", PARAM_DTYPE, self.groups),
            Part("zero", PARAM_DTYPE, self.groups),
        )

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., G, group]
        pad = self.groups * self.group_size - self.head_dim
        if pad:  # a shorter last group: pad with its own last value (changes no min/max)
            x = torch.cat((x, x[..., -1:].expand(*x.shape[:-1], pad)), dim=-1)
        return x.view(*x.shape[:-1], self.groups, self.group_size)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale, zero = _affine(self._grouped(x.float()), -1, self.bits)
        q = q.view(*x.shape[:-1], -1)[..., : self.head_dim]
        return {"q": pack(q, self.bits), "scale": scale.squeeze(-1), "zero": zero.squeeze(-1)}

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        q = unpack(parts["q"], self.bits, self.head_dim)
        scale, zero = parts["scale"].float(), parts["zero"].float()
        if self.head_dim % self.group_size == 0:  # broadcast each group's scale and zero
            grouped = q.view(*q.shape[:-1], self.groups, self.group_size)
            out = torch.addcmul(zero[..., None], grouped, scale[..., None])
            return out.view(q.shape)
        scale = scale.repeat_interleave(self.group_size, -1)[..., : self.head_dim]
        zero = zero.repeat_interleave(self.group_size, -1)[..., : self.head_dim]
        return torch.addcmul(zero, q, scale)


class Int4Codec(GroupCodec):
    name = "int4"

    def __init__(self, head_dim: int, group_size: int = INT4_GROUP_SIZE) -> None:
        super().__init__(head_dim, 4, group_size)


class Int2ValueCodec(GroupCodec):
    """int2's values: quantized per token (KIVI), 2 bits, per 64 channels."""

    name = "int2"

    def __init__(self, head_dim: int, group_size: int = INT2_GROUP_SIZE) -> None:
        super().__init__(head_dim, 2, group_size)


class BlockKeyCodec:
    """Keys with each channel quantized over the tokens of a block (KIVI's per-channel
    rule), `bits` bits; a scale and zero point per channel per block."""

    block_wise = True
    bits = 2

    def __init__(self, head_dim: int) -> None:
        self.head_dim = head_dim
        self.parts = (
            Part("q", torch.uint8, ceil(head_dim * self.bits / 8)),
            Part("scale", PARAM_DTYPE, head_dim, per_block=True),
            Part("zero", PARAM_DTYPE, head_dim, per_block=True),
        )

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # x [..., n, block, D]
        q, scale, zero = _affine(x.float(), -2, self.bits)
        return {"q": pack(q, self.bits), "scale": scale, "zero": zero}

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        q = unpack(parts["q"], self.bits, self.head_dim)
        return torch.addcmul(parts["zero"].float(), q, parts["scale"].float())


class Int2KeyCodec(BlockKeyCodec):
    name = "int2"
    bits = 2


class Int4KeyCodec(BlockKeyCodec):
    """int4's keys per channel over a block: KIVI's axis at 4 bits (formats.py says what it
    measured against per-token groups)."""

    name = "int4"
    bits = 4


_CLASSES = {c.__name__: c for c in (Int8Codec, Fp8Codec, Int4Codec, Int2KeyCodec, Int4KeyCodec,
                                    Int2ValueCodec)}  # fmt: skip


def get_codecs(name: str, head_dim: int) -> tuple:
    """The (key, value) codecs of a quantized KV format, as `formats.KV_FORMATS` names
    them; KVForgeError naming what exists otherwise."""
    fmt = KV_FORMATS.get(name)
    if fmt is None or fmt.codecs is None:
        raise KVForgeError(f"kv_dtype {name!r} has no codec; available: {', '.join(KV_FORMATS)}")
    key, value = fmt.codecs
    k = _CLASSES[key](head_dim)
    return k, (k if value == key else _CLASSES[value](head_dim))


def get_codec(name: str, head_dim: int):
    """The codec of a format whose keys and values share one (all but int2)."""
    k, v = get_codecs(name, head_dim)
    if k is not v:
        raise KVForgeError(f"kv_dtype {name!r} has separate key and value codecs")
    return k
