"""Rotated low-bit KV: the rotation is orthonormal and exact, it is part of the format's
cache key, and it spreads outlier channels before they are quantized."""

import pytest
import torch

from kvforge import LLM, SamplingParams
from kvforge.cli import main
from kvforge.errors import KVForgeError
from kvforge.kvcache.codecs import Int4Codec, Int8Codec
from kvforge.kvcache.formats import get_kv_format, with_rotation
from kvforge.kvcache.rotation import RotatedCodec, rotation_matrix


@pytest.mark.parametrize("head_dim", [64, 128, 48, 80])
def test_the_rotation_is_orthonormal_and_seeded(head_dim):
    r = rotation_matrix(head_dim)
    torch.testing.assert_close(r @ r.T, torch.eye(head_dim), rtol=0, atol=1e-6)
    assert torch.equal(r, rotation_matrix(head_dim))  # the same seed, the same matrix
    assert not torch.equal(r, rotation_matrix(head_dim, seed=1))
    if head_dim & (head_dim - 1) == 0:  # Hadamard with signs: every entry +-1/sqrt(D)
        assert torch.equal(r.abs(), torch.full_like(r, head_dim**-0.5))


def test_attention_through_the_rotation_is_exact():
    # q.k is kept (scores equal) and the output is rotated back: unquantized values give
    # the unrotated attention within float32 rounding
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(5, 64, generator=gen) for _ in range(3))
    r = rotation_matrix(64)
    plain = torch.softmax(q @ k.T, -1) @ v
    rotated = torch.softmax((q @ r) @ (k @ r).T, -1) @ (v @ r) @ r.T
    torch.testing.assert_close(rotated, plain, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_rotation_spreads_an_outlier_channel(name):
    # integer codes with one scale a token (a group): an outlier sets the step for all
    # (fp8's floating codes keep small values' relative precision and gain nothing)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 256, 64, generator=gen)
    x[..., 7] *= 40  # one channel far larger than the rest, as real keys have
    plain = {"int8": Int8Codec, "int4": Int4Codec}[name](64)
    rotated = RotatedCodec(plain, rotation_matrix(64))

    def error(codec):
        return float((codec.decode(codec.encode(x)) - x).norm() / x.norm())

    assert error(rotated) < 0.6 * error(plain)
    assert rotated.parts == plain.parts  # the same bytes: the planner's count holds


def test_the_rotation_is_in_the_cache_key_and_refused_where_nothing_is_quantized():
    int4 = get_kv_format("int4")
    assert with_rotation(int4, True).key == "int4+rot0"
    assert with_rotation(int4, False).key == "int4"
    with pytest.raises(KVForgeError, match=r"kv_rotation applies to the quantized KV formats"):
        with_rotation(get_kv_format("fp16"), True)


def test_rotation_is_on_by_default_where_it_was_measured_to_win():
    """kv_rotation=None takes the format's default: on for int8, int4, int2 (their
    perplexity on SmolLM2 fell with it), off for fp8 and the unquantized formats."""
    for name, default in [("int8", True), ("int4", True), ("int2", True), ("fp8", False),
                          ("fp16", False)]:  # fmt: skip
        fmt = get_kv_format(name)
        assert with_rotation(fmt, None).rotation is default
        assert with_rotation(fmt, False).key == name
    llm = LLM(model="kvforge-mini", kv_dtype="int4", kv_memory="16MiB")
    assert llm.engine.store.format.key == "int4+rot0" and llm.engine.store.block_size == 64
    plain = LLM(model="kvforge-mini", kv_dtype="int4", kv_rotation=False, kv_memory="16MiB")
    assert plain.engine.manager.cache_id[1] == "int4"  # another prefix-cache key


def test_llm_with_a_rotated_cache(capsys):
    llm = LLM(model="kvforge-mini", kv_dtype="int4", kv_rotation=True, kv_memory="16MiB")
    assert llm.engine.store.format.key == "int4+rot0"
    assert llm.engine.manager.cache_id[1] == "int4+rot0"
    out = llm.generate([[5, 6, 7, 8, 9, 10]], SamplingParams(max_tokens=8))[0]
    assert len(out.token_ids) == 8
    code = main(["generate", "--model", "kvforge-mini", "--kv-dtype", "fp16", "--kv-rotation",
                 "--prompt", "hi"])  # fmt: skip
    assert code == 2
    assert "kv_rotation applies to the quantized KV formats" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["int8", "int4"])
def test_attention_reads_a_rotated_cache_in_its_own_space(name):
    # gather_scaled leaves the values rotated; attention rotates the query and un-rotates
    # its output, which must equal attention over the decoded (un-rotated) values
    from kvforge.attention import AttentionMetadata, paged_attention
    from kvforge.kvcache.quantized_cache import QuantizedCache

    gen = torch.Generator().manual_seed(2)
    codec = RotatedCodec({"int8": Int8Codec, "int4": Int4Codec}[name](64), rotation_matrix(64))
    k_cache, v_cache = (QuantizedCache(codec, 2, 8, 4, "cpu") for _ in range(2))
    assert k_cache.rotation is codec.rotation
    slots = torch.arange(20)  # blocks 0-4
    k_cache.write(slots, torch.randn(2, 20, 64, generator=gen))
    v_cache.write(slots, torch.randn(2, 20, 64, generator=gen))
    meta = AttentionMetadata(slot_mapping=torch.tensor([19]), query_start_loc=(0, 1),
                             seq_lens=(20,), block_tables=torch.tensor([[0, 1, 2, 3, 4]]),
                             block_size=4)  # fmt: skip
    q = torch.randn(1, 6, 64, generator=gen)
    out = paged_attention(q, k_cache, v_cache, meta, 0.125)
    keys, values = k_cache.read_slots(slots), v_cache.read_slots(slots)  # decoded, un-rotated
    expected = torch.stack([torch.softmax(q[0, h] @ keys[h // 3].T * 0.125, -1) @ values[h // 3]
                            for h in range(6)])  # fmt: skip
    torch.testing.assert_close(out[0], expected, rtol=0, atol=1e-5)


def test_int2_rotated_inside_its_window_is_exact():
    # int2 keeps its newest tokens as computed: a request that never leaves the window
    # generates the fp32 cache's tokens, rotated or not (the recent tokens, stored as
    # computed, are rotated as they are read, like the packed ones)
    prompt, params = [3, 14, 15, 92, 65, 35], SamplingParams(max_tokens=12)
    expected = LLM(model="kvforge-mini", kv_dtype="fp32", kv_memory="16MiB").generate(
        [prompt], params)[0].token_ids  # fmt: skip
    llm = LLM(model="kvforge-mini", kv_dtype="int2", kv_rotation=True, kv_memory="16MiB")
    assert llm.engine.store.k[0].rotation is not None  # read rotated, recent tokens too
    assert llm.generate([prompt], params)[0].token_ids == expected


def test_a_rotated_window_keeps_its_recent_tokens_rotated_and_commits_them_once():
    """int4's recent tokens are stored as x @ R (attention reads them without a matmul);
    `gather` gives x back, `gather_scaled` x @ R, and a block leaving the window is encoded
    from the rotated values as a rotated codec encodes x."""
    from kvforge.config import ModelSpec
    from kvforge.kvcache.store import KVStore

    spec = ModelSpec(name="tiny", architecture="llama", num_layers=1, num_attention_heads=2,
                     num_kv_heads=1, head_dim=16, hidden_size=32, vocab_size=64,
                     intermediate_size=64, max_position_embeddings=256, dtype="fp32")  # fmt: skip
    # 8-token blocks: a head's codes of a block (8 x 8 B) hold one fp32 row of 16 channels;
    # the 5 blocks of recent tokens (ceil(31 / 8) + 1) borrow 8 blocks each, 40 in all
    store = KVStore(spec, with_rotation(get_kv_format("int4"), True), 48, 8, "cpu")
    window = list(range(8, 48))
    x = torch.randn(12, 1, 16, generator=torch.Generator().manual_seed(0))  # [T, kvH, D]
    store.begin_pass([([0, 1], 0, 12, window)])
    store.write(0, torch.arange(12), x, x)
    k = store.k[0]
    ids = torch.tensor([0, 1])
    r = k.rotation
    first_row = k.rows[0, k.window.slots[0][0], 0]  # token 0: the slot's first block, row 0
    assert torch.allclose(first_row, x[0, 0] @ r)
    assert torch.allclose(k.gather(ids).reshape(1, 16, 16)[0, :12], x[:, 0], atol=1e-6)
    scaled, scale = k.gather_scaled(ids)
    assert scale is None
    assert torch.allclose(scaled.reshape(1, 16, 16)[0, :12], x[:, 0] @ r, atol=1e-6)
    store.retire([0, 1], 12)  # block 0 is whole: committed from the rotated window
    packed = k.gather(ids[:1]).reshape(8, 16)
    expected = k.codec.decode(k.codec.encode(x[:8, 0][None, None]))[0, 0]
    assert torch.allclose(packed, expected, atol=1e-5)
    assert not torch.allclose(packed, x[:8, 0], atol=1e-3)  # int4: close, not exact
