"""Quantized KV: codec round trips with error bounds, packed layouts, planner = store bytes,
capacity, and generation through the whole engine with each codec."""

import pytest
import torch

from kvforge import LLM, SamplingParams
from kvforge.errors import KVForgeError
from kvforge.kvcache import codecs
from kvforge.kvcache.codecs import Fp8Codec, Int4Codec, Int8Codec, get_codec
from kvforge.planner import bytes_per_token

QUANTIZED = ["int8", "fp8", "int4"]
# the per-token codecs (int4's values' codec also coded its keys before they went per channel)
CODECS = {"int8": Int8Codec, "fp8": Fp8Codec, "int4": Int4Codec}


def values(head_dim: int, outliers: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, head_dim, generator=gen)  # [kv_heads, tokens, D]
    if outliers:  # a few channels 40x larger, as real keys have
        x[..., ::17] *= 40
    return x


@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_int8_round_trip_error_is_at_most_half_a_step(head_dim, outliers):
    x = values(head_dim, outliers)
    codec = Int8Codec(head_dim)
    parts = codec.encode(x)
    assert parts["q"].dtype == torch.int8 and parts["q"].shape == x.shape
    assert parts["scale"].dtype == torch.float16 and parts["scale"].shape == (3, 50, 1)
    err = (codec.decode(parts) - x).abs()
    step = x.abs().amax(-1, keepdim=True) / 127
    assert bool((err <= step * 0.5 + step * 2e-3).all())  # + fp16 rounding of the scale


@pytest.mark.parametrize("outliers", [False, True])
def test_fp8_round_trip_error_is_relative(outliers):
    x = values(128, outliers)
    codec = Fp8Codec(128)
    parts = codec.encode(x)
    assert parts["q"].dtype == torch.uint8  # e4m3 bits
    decoded = codec.decode(parts)
    scale = x.abs().amax(-1, keepdim=True) / 448
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4, or an absolute floor near zero
    assert bool(((decoded - x).abs() <= x.abs() / 16 + scale * 2**-6 + 1e-6).all())


@pytest.mark.parametrize("outliers", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128, 80, 33])
def test_int4_packs_two_values_a_byte_and_errs_half_a_step_per_group(head_dim, outliers):
    x = values(head_dim, outliers)
    codec = Int4Codec(head_dim)
    parts = codec.encode(x)
    groups = -(-head_dim // 64)
    assert parts["q"].shape == (3, 50, -(-head_dim // 2)) and parts["q"].dtype == torch.uint8
    assert parts["scale"].shape == parts["zero"].shape == (3, 50, groups)
    decoded = codec.decode(parts)
    for g in range(groups):
        sl = slice(g * 64, min(head_dim, (g + 1) * 64))
        chunk = x[..., sl]
        step = (chunk.amax(-1, keepdim=True) - chunk.amin(-1, keepdim=True)) / 15
        err = (decoded[..., sl] - chunk).abs()
        assert bool((err <= step * 0.5 + step * 0.01 + 1e-3).all())


def test_int4_nibble_layout_is_low_first():
    codec = Int4Codec(4)
    x = torch.tensor([[0.0, 15.0, 5.0, 10.0]])  # min 0, max 15: step 1, values exact
    parts = codec.encode(x)
    assert parts["q"].tolist() == [[0 | 15 << 4, 5 | 10 << 4]]
    assert codec.decode(parts).tolist() == x.tolist()


def test_unknown_codec_and_missing_fp8_name_the_alternatives(monkeypatch):
    with pytest.raises(KVForgeError, match=r"'int3' has no codec; available: .*int4, int2$"):
        get_codec("int3", 64)
    monkeypatch.setattr(codecs.torch, "float8_e4m3fn", None, raising=False)
    with pytest.raises(KVForgeError, match=r"use int8 \(the same bytes per token\) or int4"):
        Fp8Codec(64)


# --- through the engine --------------------------------------------------------------

PROMPTS = ["The quick brown fox jumps over the lazy dog. " * 6, "Hello", "abc" * 40]
PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def reference():
    llm = LLM(model="random", device="cpu", kv_memory="8MiB", enable_prefix_caching=False)
    return [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]


@pytest.mark.parametrize("kv_dtype", QUANTIZED)
def test_generation_with_each_codec_through_the_engine(kv_dtype, reference):
    llm = LLM(model="random", device="cpu", kv_memory="8MiB", kv_dtype=kv_dtype)
    stats = llm.kv_stats()
    store = llm.engine.store
    assert stats["bytes_per_token"] == bytes_per_token(store.spec, store.format, store.block_size)
    outs = llm.generate(PROMPTS, PARAMS)
    assert all(len(o.token_ids) == 24 for o in outs)
    agree = sum(a == b for o, r in zip(outs, reference, strict=True)
                for a, b in zip(o.token_ids, r, strict=True))  # fmt: skip
    assert agree >= 0.75 * 3 * 24  # a lossy cache, close to the full one
    # batched == alone, and a prefix-cache hit reads the same packed blocks
    alone = [llm.generate([p], PARAMS)[0].token_ids for p in PROMPTS]
    assert alone == [o.token_ids for o in outs]
    llm.engine.pool.check_integrity()


@pytest.mark.parametrize(("kv_dtype", "ratio"), [("int8", 1.88), ("fp8", 1.88), ("int4", 3.37)])
def test_the_same_kv_memory_holds_more_tokens(kv_dtype, ratio):
    full = LLM(model="random", device="cpu", kv_memory="8MiB", kv_dtype="fp16").kv_stats()[
        "blocks_total"
    ]
    packed = LLM(model="random", device="cpu", kv_memory="8MiB", kv_dtype=kv_dtype).kv_stats()
    # head_dim 32: int8 = 32 + 2 B against 64 B (1.88x); int4 at 64-token blocks = K 16 + 2
    # and V 16 + 4 B (3.37x); all of the memory is blocks (int4's window borrows some)
    tokens = packed["blocks_total"] * packed["block_size"]
    assert tokens == pytest.approx(full * 16 * ratio, rel=0.01)


def test_int2_holds_the_expected_tokens_in_blocks_only():
    full = LLM(model="random", device="cpu", kv_memory="8MiB", kv_dtype="fp16").kv_stats()
    packed = LLM(model="random", device="cpu", kv_memory="8MiB", kv_dtype="int2").kv_stats()
    # 176 B a token against 1,024 (5.82x): every byte of the memory is blocks
    assert full["blocks_total"] * full["block_size"] == 8 * 2**20 // 1024
    assert packed["blocks_total"] == 8 * 2**20 // (176 * 64) == 744
    tokens = packed["blocks_total"] * packed["block_size"]
    assert tokens / (full["blocks_total"] * full["block_size"]) == pytest.approx(5.81, abs=0.01)
    # a running request borrows 32 of them for its window: 2 blocks of 64 fp32 tokens, each
    # in the codes of 16 (a head's 64 x 8 B hold 4 rows of 32 fp32 channels)
    assert packed["window_blocks_per_request"] == 32


def test_quantized_blocks_move_packed_through_the_tiers(tmp_path, reference):
    prompt = PROMPTS[0] * 2
    first = LLM(
        model="random",
        device="cpu",
        kv_memory="8MiB",
        kv_dtype="int8",
        disk_cache_dir=str(tmp_path),
    )
    expected = first.generate([prompt], PARAMS)[0].token_ids
    file = next(tmp_path.glob("*.kvblock"))
    store = first.engine.store
    assert file.stat().st_size < store.block_shape[0] + 400  # packed bytes + a small header
    again = LLM(
        model="random",
        device="cpu",
        kv_memory="8MiB",
        kv_dtype="int8",
        disk_cache_dir=str(tmp_path),
    )
    out = again.generate([prompt], PARAMS)[0]
    assert out.token_ids == expected and out.metrics.cached_tokens_disk > 0
    fp16 = LLM(
        model="random",
        device="cpu",
        kv_memory="8MiB",
        kv_dtype="fp16",
        disk_cache_dir=str(tmp_path),
    )
    assert fp16.generate([prompt], PARAMS)[0].metrics.cached_tokens_disk == 0  # other codec


def test_swap_preemption_with_a_quantized_cache():
    prompts = ["abc" * 33 + str(i) for i in range(4)]  # 101 tokens: 7 blocks, 10 at the end
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    roomy = LLM(
        model="random", device="cpu", kv_memory="8MiB", kv_dtype="int8", enable_prefix_caching=False
    )
    tight = LLM(model="random", device="cpu", num_blocks=16, kv_dtype="int8",
                preemption_mode="swap", enable_prefix_caching=False)  # fmt: skip
    assert [o.token_ids for o in tight.generate(prompts, params)] == [
        o.token_ids for o in roomy.generate(prompts, params)
    ]
    assert tight.kv_stats()["num_preemptions"] > 0


@pytest.mark.parametrize("kv_dtype", ["int4", "int2"])
def test_cli_generates_with_a_quantized_cache(kv_dtype, capsys):
    import json

    from kvforge.cli import main

    assert main(["generate", "--model", "kvforge-mini", "--prompt", "The cat sat",
                 "--max-tokens", "4", "--kv-dtype", kv_dtype, "--device", "cpu",
                 "--json"]) == 0  # fmt: skip
    assert len(json.loads(capsys.readouterr().out)["token_ids"]) == 4


@pytest.mark.parametrize("kv_dtype", QUANTIZED)
@pytest.mark.parametrize("tile_tokens", [512, 8])
def test_paged_attention_over_a_quantized_cache_equals_it_over_the_decoded_values(
    kv_dtype, tile_tokens, monkeypatch
):
    import kvforge.attention.paged as paged
    from kvforge.attention import paged_attention
    from kvforge.kvcache.plain_cache import PlainCache
    from kvforge.kvcache.quantized_cache import QuantizedCache
    from test_attention import batch

    monkeypatch.setattr(paged, "TILE_TOKENS", tile_tokens)
    if tile_tokens == 8:
        monkeypatch.setattr(paged, "DECODE_TILE_BYTES", 0)
    q, k_plain, v_plain, meta = batch(4)
    heads, num_blocks, block, dim = k_plain.shape
    caches = []
    for plain in (k_plain, v_plain):
        cache = QuantizedCache(CODECS[kv_dtype](dim), heads, num_blocks, block, "cpu")
        cache.write(torch.arange(num_blocks * block), plain.reshape(heads, -1, dim))
        caches.append(cache)
    decoded = [PlainCache(c.gather(torch.arange(num_blocks))) for c in caches]
    ours = paged_attention(q, *caches, meta, 0.25)
    expected = paged_attention(q, *decoded, meta, 0.25)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
