"""Byte layouts of every KV format, checked by hand for the common head sizes."""

import pytest

from kvforge.dtypes import DTYPE_BITS
from kvforge.errors import KVForgeError
from kvforge.kvcache.formats import KV_FORMATS, get_kv_format

# Bytes of K plus V for one head and one token (block of 1 would distort int2; use 16).
BLOCK = 16


def per_token(name: str, head_dim: int) -> float:
    return get_kv_format(name).head_bytes_per_block(head_dim, BLOCK) / BLOCK


def test_every_dtype_name_is_a_format():
    assert set(KV_FORMATS) == set(DTYPE_BITS)


@pytest.mark.parametrize(
    ("name", "head_dim", "expected"),
    [
        ("fp32", 128, 2 * 128 * 4),
        ("fp16", 128, 2 * 128 * 2),
        ("bf16", 64, 2 * 64 * 2),
        # one byte a value + one fp16 scale per token per head, for K and for V
        ("fp8", 128, 2 * (128 + 2)),
        ("int8", 128, 2 * (128 + 2)),
        ("int8", 64, 2 * (64 + 2)),
        # two values a byte; K: (scale, zero) per channel per block; V: per 64 channels
        ("int4", 128, (64 + 128 * 2 * 2 / BLOCK) + (64 + 2 * 2 * 2)),
        ("int4", 64, (32 + 64 * 2 * 2 / BLOCK) + (32 + 1 * 2 * 2)),
        ("int4", 80, (40 + 80 * 2 * 2 / BLOCK) + (40 + 2 * 2 * 2)),  # V: 64 + a group of 16
        # four values a byte; K: (scale, zero) per channel per block; V: per 64 channels
        ("int2", 128, (32 + 128 * 2 * 2 / BLOCK) + (32 + 2 * 2 * 2)),
    ],
)
def test_head_bytes(name, head_dim, expected):
    assert per_token(name, head_dim) == expected


def test_int2_key_scales_amortise_over_the_block():
    fmt = get_kv_format("int2")
    # K: 64 tokens × 32 B packed + 128 channels × 4 B; V: 64 × (32 + 8)
    assert fmt.head_bytes_per_block(128, 64) == 64 * 32 + 128 * 4 + 64 * 40
    assert fmt.residual_tokens == 32


def test_capacity_factors_against_fp16_at_head_dim_128():
    fp16 = per_token("fp16", 128)
    assert fp16 / per_token("int8", 128) == pytest.approx(512 / 260)
    assert fp16 / per_token("int8", 128) >= 1.9
    # int4 at its default 64-token blocks: K's 512 B of parameters a block are 8 B a token
    int4 = get_kv_format("int4").head_bytes_per_block(128, 64) / 64
    assert fp16 / int4 == pytest.approx(512 / 144) and fp16 / int4 >= 3.5
    assert get_kv_format("int4").residual_tokens == 32


def test_unknown_format_names_the_choices():
    with pytest.raises(KVForgeError, match="unknown KV dtype 'int3'; choose one of: auto, fp32"):
        get_kv_format("int3")
