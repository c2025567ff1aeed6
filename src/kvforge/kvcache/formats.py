"""Byte layouts of the KV formats: the single source of truth for what a cached token costs.

A format says how one attention head's K or V vector of `head_dim` values is
stored, and which quantization parameters sit beside it. The planner counts
bytes from these layouts and the store (with its codecs) must allocate exactly
the same bytes, so `kvforge plan` and the measured tensors agree to the byte.

Layouts (per layer, per KV head; K and V alike unless stated):

    fp32 / fp16 / bf16   head_dim values of 4 / 2 / 2 bytes, nothing else.
    fp8   (e4m3)         head_dim bytes + one fp16 scale per token.
    int8  (symmetric)    head_dim bytes + one fp16 scale per token.
    int4  (KIVI-style)   head_dim / 2 bytes (two values a byte);
    int2  (KIVI-style)   head_dim / 4 bytes (four values a byte); both:
                         K: an fp16 scale and zero point per channel per block
                            (keys are quantized along tokens, the KIVI per-channel rule),
                         V: an fp16 scale and zero point per group of 64 channels of a token;
                         plus, per running request, the blocks that hold its 32 most
                         recent tokens (ceil(31 / block) + 1 of them) in full precision:
                         a block is packed once whole and out of that window. Those
                         full-precision blocks live in pool blocks the request borrows
                         while it runs (`window_blocks`), so the pool is all there is.

int4 quantized each token's keys per 64 channels until measured on SmolLM2: keys per
channel over a block took its prose perplexity from +10.9% to +0.8% against the fp32
cache (+0.3% rotated); per-token keys with the recent window gave +4.5% (docs/eval).

A group that does not divide head_dim leaves a shorter last group. Packed
values round up to whole bytes per token and head.

Layers named in kv_skip_layers (`with_skip_layers`) are stored in the model's own
dtype whatever the format: their bytes are that plain format's, int4's and int2's recent
window leaves them out, and the bytes per block are summed layer by layer.
"""

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from math import ceil

from kvforge.config import ModelSpec
from kvforge.dtypes import DTYPE_BITS
from kvforge.errors import KVForgeError

PARAM_BYTES = 2  # scales and zero points are stored as fp16
INT4_GROUP_SIZE = 64
INT2_GROUP_SIZE = 64
RESIDUAL_TOKENS = 32  # int4's and int2's full-precision recent window


@dataclass(frozen=True)
class QuantGroups:
    """Where the quantization parameters of one K or V head live.

    along="channels": each token's head_dim values are cut into groups of
    `group_size` channels (None: the whole head is one group), each group storing
    `params_per_group` fp16 numbers (1: scale; 2: scale and zero point).
    along="tokens": each channel is one group over the tokens of a block, so
    the parameters are stored once per block, not per token.
    """

    along: str
    params_per_group: int
    group_size: int | None = None

    def bytes_per_block(self, head_dim: int, block_size: int) -> int:
        if self.along == "tokens":
            return head_dim * self.params_per_group * PARAM_BYTES
        groups = 1 if self.group_size is None else ceil(head_dim / self.group_size)
        return block_size * groups * self.params_per_group * PARAM_BYTES


@dataclass(frozen=True)
class KVFormat:
    """How cached K and V values are stored: bits per value plus quantization parameters."""

    name: str
    value_bits: int
    key_groups: QuantGroups | None = None
    value_groups: QuantGroups | None = None
    residual_tokens: int = 0  # most recent tokens per request kept in full precision
    # each running request's first blocks (its attention sinks) kept in full precision too
    sink_blocks: int = 0
    summary: str = ""
    # the classes in `codecs` that encode K and V in this layout (None: stored as is)
    codecs: tuple[str, str] | None = None
    # K and V rotated before they are quantized (`rotation.py`); costs no bytes
    rotation: bool = False
    # layers kept in `skip_dtype` (the model's own, a plain format), sorted: `with_skip_layers`
    skip_layers: tuple[int, ...] = ()
    skip_dtype: str | None = None

    @property
    def key(self) -> str:
        """What the prefix cache keys blocks by: the name, the rotation if any, and the
        layers kept in the model's dtype if any ("int4+rot0+skip0,29@bf16"). Not the
        full-precision window (`with_window`): it decides when a block is packed, not how,
        so a packed block is the same bytes under every window."""
        key = f"{self.name}+rot{ROTATION_SEED}" if self.rotation else self.name
        if self.skip_layers:
            key += f"+skip{','.join(map(str, self.skip_layers))}@{self.skip_dtype}"
        return key

    def layer_format(self, layer: int) -> "KVFormat":
        """How `layer` is stored: the plain `skip_dtype` format for a skipped layer, else this."""
        return KV_FORMATS[self.skip_dtype] if layer in self.skip_layers else self

    @property
    def quantized(self) -> bool:
        return self.key_groups is not None

    def head_bytes_per_block(self, head_dim: int, block_size: int) -> int:
        """Bytes of K plus V for one head of one layer over one block of tokens."""
        packed = block_size * ceil(head_dim * self.value_bits / 8)
        total = 2 * packed
        for groups in (self.key_groups, self.value_groups):
            if groups is not None:
                total += groups.bytes_per_block(head_dim, block_size)
        return total


_PER_TOKEN_SCALE = QuantGroups(along="channels", params_per_group=1)

KV_FORMATS: dict[str, KVFormat] = {
    "fp32": KVFormat("fp32", 32, summary="4 B a value"),
    "fp16": KVFormat("fp16", 16, summary="2 B a value"),
    "bf16": KVFormat("bf16", 16, summary="2 B a value"),
    "fp8": KVFormat(
        "fp8",
        8,
        _PER_TOKEN_SCALE,
        _PER_TOKEN_SCALE,
        summary="e4m3, 1 B a value + fp16 scale per token per head",
        codecs=("Fp8Codec", "Fp8Codec"),
    ),
    "int8": KVFormat(
        "int8",
        8,
        _PER_TOKEN_SCALE,
        _PER_TOKEN_SCALE,
        summary="symmetric, 1 B a value + fp16 scale per token per head",
        codecs=("Int8Codec", "Int8Codec"),
    ),
    "int4": KVFormat(
        "int4",
        4,
        QuantGroups("tokens", 2),
        QuantGroups("channels", 2, INT4_GROUP_SIZE),
        residual_tokens=RESIDUAL_TOKENS,
        summary=(
            "2 values a byte; K scale+zero per channel per block, V per "
            f"{INT4_GROUP_SIZE} channels; last {RESIDUAL_TOKENS} tokens full precision"
        ),
        codecs=("Int4KeyCodec", "Int4Codec"),
    ),
    "int2": KVFormat(
        "int2",
        2,
        QuantGroups("tokens", 2),
        QuantGroups("channels", 2, INT2_GROUP_SIZE),
        residual_tokens=RESIDUAL_TOKENS,
        summary=(
            "4 values a byte; K scale+zero per channel per block, V per "
            f"{INT2_GROUP_SIZE} channels; last {RESIDUAL_TOKENS} tokens full precision"
        ),
        codecs=("Int2KeyCodec", "Int2ValueCodec"),
    ),
}
UNQUANTIZED_FORMATS = tuple(name for name, f in KV_FORMATS.items() if f.codecs is None)


ROTATION_SEED = 0  # the seed of every rotation matrix (`rotation.rotation_matrix`)
# where a quantized format rotates K and V when kv_rotation is not given: where it was
# measured to lower SmolLM2's perplexity against the fp32 cache (docs/eval/codecs.md)
DEFAULT_ROTATION: dict[str, bool] = {"int8": True, "int4": True, "int2": True}


def with_rotation(fmt: KVFormat, rotation: bool | None) -> KVFormat:
    """`fmt` with kv_rotation applied (None: the format's default); KVForgeError for a
    rotation asked of a format that stores values as computed."""
    if rotation is None:
        rotation = DEFAULT_ROTATION.get(fmt.name, False)
    if rotation and fmt.codecs is None:
        quantized = ", ".join(n for n, f in KV_FORMATS.items() if f.codecs is not None)
        raise KVForgeError(
            f"kv_rotation applies to the quantized KV formats ({quantized}), not {fmt.name}"
        )
    return dataclasses.replace(fmt, rotation=bool(rotation))


def with_window(fmt: KVFormat, recent_tokens: int | None, exact_sinks: bool = False
                ) -> KVFormat:  # fmt: skip
    """`fmt` with int4's and int2's full-precision window set: its `recent_tokens` newest
    tokens (None: RESIDUAL_TOKENS) and, with `exact_sinks`, each request's first block (its
    attention sinks) kept in full precision while the request runs. KVForgeError for a
    format without that window, or a window that is not a positive number of tokens."""
    if recent_tokens is None and not exact_sinks:
        return fmt
    if not fmt.residual_tokens:
        windowed = ", ".join(n for n, f in KV_FORMATS.items() if f.residual_tokens)
        raise KVForgeError(
            f"kv_recent_tokens and kv_exact_sinks apply to the formats with a full-precision "
            f"window ({windowed}), not {fmt.name}"
        )
    if recent_tokens is None:
        recent_tokens = fmt.residual_tokens
    if isinstance(recent_tokens, bool) or not isinstance(recent_tokens, int) or recent_tokens < 1:
        raise KVForgeError(f"kv_recent_tokens must be a positive number of tokens, got "
                           f"{recent_tokens!r}")  # fmt: skip
    return dataclasses.replace(fmt, residual_tokens=recent_tokens, sink_blocks=int(exact_sinks))


def get_kv_format(name: str) -> KVFormat:
    if name not in KV_FORMATS:
        raise KVForgeError(
            f"unknown KV dtype {name!r}; choose one of: auto, {', '.join(KV_FORMATS)}"
        )
    return KV_FORMATS[name]


def resolve_kv_format(spec: ModelSpec, kv_dtype: str, skip_layers: Iterable[int] = ()
                      ) -> KVFormat:  # fmt: skip
    """'auto' means the model's own precision; `skip_layers` as `with_skip_layers` takes them."""
    fmt = get_kv_format(spec.dtype if kv_dtype == "auto" else kv_dtype)
    return with_skip_layers(fmt, skip_layers, spec)


def check_skip_layers(layers: Iterable[int] | None, num_layers: int | None = None
                      ) -> tuple[int, ...]:  # fmt: skip
    """kv_skip_layers as a sorted tuple (None or empty: none); KVForgeError naming the limit
    for a layer index that is not an int, is negative, is named twice or (when the model's
    `num_layers` is known) is past its last layer."""
    if layers is None:
        return ()
    if isinstance(layers, str | bytes) or not isinstance(layers, Iterable):
        raise KVForgeError(f"kv_skip_layers must be a list of layer indices, got {layers!r}")
    seen: set[int] = set()
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise KVForgeError(f"kv_skip_layers: {layer!r} is not a layer index")
        if layer < 0 or (num_layers is not None and layer >= num_layers):
            limit = "layers count from 0"
            if num_layers is not None:
                limit = f"the model has {num_layers} layers (0..{num_layers - 1})"
            raise KVForgeError(f"kv_skip_layers: layer {layer} is out of range: {limit}")
        if layer in seen:
            raise KVForgeError(f"kv_skip_layers: layer {layer} is named twice")
        seen.add(layer)
    return tuple(sorted(seen))


def with_skip_layers(fmt: KVFormat, layers: Iterable[int] | None, spec: ModelSpec) -> KVFormat:
    """`fmt` with `layers` (kv_skip_layers) kept in the model's own dtype (`spec.dtype`, what
    kv_dtype "auto" stores): plain caches, unrotated, outside the recent window; every other
    layer stays in `fmt`. With an unquantized `fmt` the skipped layers still take the model's
    dtype. KVForgeError for an index `check_skip_layers` refuses."""
    skip_layers = check_skip_layers(layers, spec.num_layers)
    if not skip_layers:
        summary = KV_FORMATS.get(fmt.name, fmt).summary
        return dataclasses.replace(fmt, skip_layers=(), skip_dtype=None, summary=summary)
    plain = get_kv_format(spec.dtype)
    if plain.codecs is not None:
        raise KVForgeError(
            f"kv_skip_layers keep the model's dtype, but {spec.dtype} is not one the KV cache "
            f"stores as computed ({', '.join(UNQUANTIZED_FORMATS)})"
        )
    base = KV_FORMATS.get(fmt.name, fmt).summary  # not a summary already naming skipped layers
    summary = f"{base}; layers {', '.join(map(str, skip_layers))} at {plain.name}"
    return dataclasses.replace(fmt, skip_layers=skip_layers, skip_dtype=plain.name, summary=summary)


# --- what a model's cache costs in a format (the planner and the store both count so) ----


def bytes_per_block(spec: ModelSpec, fmt: KVFormat, block_size: int) -> int:
    """K and V of all layers and KV heads for one block of tokens, scales included; each
    layer in its own format (skipped layers in the model's dtype)."""
    return spec.num_kv_heads * sum(
        fmt.layer_format(layer).head_bytes_per_block(spec.head_dim, block_size)
        for layer in range(spec.num_layers)
    )


def bytes_per_token(spec: ModelSpec, fmt: KVFormat, block_size: int) -> Fraction:
    """Exact; a whole number for every format but int2 with odd block sizes."""
    return Fraction(bytes_per_block(spec, fmt, block_size), block_size)


def cached_tokens(spec: ModelSpec, context: int) -> int:
    """Tokens whose K/V a request must keep: all of them, or the sliding window."""
    return context if spec.sliding_window is None else min(context, spec.sliding_window)


def blocks_per_request(spec: ModelSpec, context: int, block_size: int) -> int:
    """Blocks one request of `context` tokens holds.

    Without a window: ceil(context / block_size). With a window of W tokens the
    W most recent tokens start anywhere inside a block, so they can span
    ceil((W - 1) / block_size) + 1 blocks; the plan reserves that worst case.
    """
    blocks = ceil(context / block_size)
    window = spec.sliding_window
    if window is not None and context > window:
        blocks = min(blocks, ceil((window - 1) / block_size) + 1)
    return blocks


def recent_blocks(tokens: int, block_size: int) -> int:
    """Blocks a request keeps in full precision to hold its newest `tokens` tokens: they
    start anywhere in a block, and a block is packed only once whole and out of the window."""
    return -(-(tokens - 1) // block_size) + 1


def window_rows(spec: ModelSpec, fmt: KVFormat, block_size: int) -> int:
    """Full-precision tokens one borrowed block holds for a windowed (int4, int2) layer cache:
    a head's packed codes of one block (block_size × ceil(head_dim × bits / 8) bytes) read
    as rows of head_dim values at the model's precision (`spec.dtype`)."""
    code_bytes = block_size * ceil(spec.head_dim * fmt.value_bits / 8)
    return code_bytes // (spec.head_dim * DTYPE_BITS[spec.dtype] // 8)


def window_lend(spec: ModelSpec, fmt: KVFormat, block_size: int) -> int:
    """Pool blocks that hold one block of recent tokens at the model's precision (int4,
    int2): ceil(block_size / window_rows). KVForgeError naming the smallest block size
    when a block's codes cannot hold one token."""
    rows = window_rows(spec, fmt, block_size)
    if rows == 0:
        row_bytes = spec.head_dim * DTYPE_BITS[spec.dtype] // 8
        smallest = ceil(row_bytes / ceil(spec.head_dim * fmt.value_bits / 8))
        raise KVForgeError(
            f"{fmt.name} keeps its recent tokens at {spec.dtype} in the codes of borrowed "
            f"blocks: a block of {block_size} tokens cannot hold one; use a block size of at "
            f"least {smallest}"
        )
    return -(-block_size // rows)


def window_blocks(spec: ModelSpec, fmt: KVFormat, block_size: int) -> int:
    """Pool blocks a running request borrows for its full-precision recent window (int4,
    int2; 0 for other formats): `recent_blocks` blocks of tokens and its sink blocks (with
    kv_exact_sinks), each in `window_lend` borrowed blocks. They are taken from the pool
    when the request is admitted and given back when it leaves, so the window costs blocks
    like any other, only while it runs."""
    if not fmt.residual_tokens or len(fmt.skip_layers) == spec.num_layers:
        return 0
    hot = recent_blocks(fmt.residual_tokens, block_size) + fmt.sink_blocks
    return hot * window_lend(spec, fmt, block_size)


def as_number(value: Fraction) -> int | float:
    """A whole number as int, else float."""
    return int(value) if value.denominator == 1 else float(value)
