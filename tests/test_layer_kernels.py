"""The fused decoder-layer kernels (kernels/layer_ops.cpp) against the PyTorch operations
they stand for, and the model with them against the model without."""

import pytest
import torch

from kvforge import LLM, SamplingParams, kernels
from kvforge.attention import AttentionMetadata, paged_attention
from kvforge.kvcache.plain_cache import PlainCache
from kvforge.models import layer_ops
from kvforge.models.rope import apply_rope

OPS = kernels.cpu()
pytestmark = pytest.mark.skipif(OPS is None, reason=f"no CPU kernels: {kernels.reason()}")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def reference_rms_norm(x, weight, eps):
    x32 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32


def test_rms_norm_with_and_without_the_residual_add():
    x, residual, weight = randn(5, 576), randn(5, 576, seed=1), randn(576, seed=2)
    torch.testing.assert_close(OPS.rms_norm(x, weight, 1e-5), reference_rms_norm(x, weight, 1e-5),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    expected_sum = residual + x
    out = OPS.rms_norm(x, weight, 1e-5, residual)
    assert torch.equal(residual, expected_sum)  # the add happened in place, exactly
    torch.testing.assert_close(out, reference_rms_norm(expected_sum, weight, 1e-5),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    with pytest.raises(RuntimeError, match=r"weight must be float32 \[576\]"):
        OPS.rms_norm(x, randn(100), 1e-5)


def test_silu_mul_on_strided_rows():
    gate_up = randn(7, 2 * 96)[:, :]
    wide = randn(3, 2 * 96 + 8)[:, : 2 * 96]  # rows with a stride past their width
    for x in (gate_up, wide):
        gate, up = x.chunk(2, dim=-1)
        torch.testing.assert_close(OPS.silu_mul(x), torch.nn.functional.silu(gate) * up,
                                   rtol=1e-6, atol=1e-6)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rope_store_rotates_in_place_and_writes_the_slots(dtype):
    heads, kv_heads, dim, tokens = 6, 2, 64, 3
    qkv = randn(tokens, (heads + 2 * kv_heads) * dim)
    angles = randn(tokens, dim // 2, seed=3)
    cos, sin = angles.cos(), angles.sin()
    k_cache = torch.zeros(kv_heads, 4, 8, dim, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([5, 17, 30])
    expected = apply_rope(qkv[:, : (heads + kv_heads) * dim].view(tokens, -1, dim),
                          cos[:, None], sin[:, None])  # fmt: skip
    v = qkv[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim).clone()
    OPS.rope_store(qkv, cos, sin, heads, k_cache, v_cache, slots)
    rotated = qkv[:, : (heads + kv_heads) * dim].view(tokens, -1, dim)
    torch.testing.assert_close(rotated, expected, rtol=1e-6, atol=1e-6)
    flat_k, flat_v = k_cache.view(kv_heads, -1, dim), v_cache.view(kv_heads, -1, dim)
    assert torch.equal(flat_k[:, slots], expected[:, heads:].transpose(0, 1).to(dtype))
    assert torch.equal(flat_v[:, slots], v.transpose(0, 1).to(dtype))
    untouched = [s for s in range(32) if s not in slots.tolist()]
    assert not flat_k[:, untouched].any() and not flat_v[:, untouched].any()
    with pytest.raises(RuntimeError, match="slot 32 is out of the cache"):
        OPS.rope_store(qkv, cos, sin, heads, k_cache, v_cache, torch.tensor([0, 1, 32]))


def _decode_case(lens, block_size=4, kv_heads=2, heads=6, dim=64, blocks=40, seed=0):
    """Caches filled with random K/V, and scattered block tables for sequences of `lens`."""
    k = PlainCache(randn(kv_heads, blocks, block_size, dim, seed=seed))
    v = PlainCache(randn(kv_heads, blocks, block_size, dim, seed=seed + 1))
    order = torch.randperm(blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    width = max(-(-n // block_size) for n in lens)
    tables = []
    for n in lens:
        ids = [order.pop() for _ in range(-(-n // block_size))]
        tables.append(ids + [0] * (width - len(ids)))
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(len(lens), dtype=torch.long),
        query_start_loc=tuple(range(len(lens) + 1)),
        seq_lens=tuple(lens),
        block_tables=torch.tensor(tables),
        block_size=block_size,
    )
    return randn(len(lens), heads, dim, seed=seed + 2), k, v, meta


@pytest.mark.parametrize("window", [None, 5])
def test_in_place_decode_attention_equals_the_gathered_path(monkeypatch, window):
    q, k, v, meta = _decode_case([1, 9, 23, 16])
    fused = paged_attention(q, k, v, meta, 0.125, window)
    monkeypatch.setattr(kernels, "cpu", lambda: None)
    gathered = paged_attention(q, k, v, AttentionMetadata(**{**meta.__dict__, "plans": {}}),
                               0.125, window)  # fmt: skip
    torch.testing.assert_close(fused, gathered, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_in_place_decode_attention_reads_half_precision_caches(dtype):
    q, k, v, meta = _decode_case([7, 12])
    lens = torch.tensor(meta.seq_lens)
    k_half, v_half = k.data.to(dtype), v.data.to(dtype)
    half = OPS.decode_attention(q.flatten(1), k_half, v_half, meta.block_tables, lens, 0.125, 0)
    exact = OPS.decode_attention(q.flatten(1), k_half.float(), v_half.float(), meta.block_tables,
                                 lens, 0.125, 0)  # fmt: skip
    assert torch.equal(half, exact)  # widened to float32 exactly, then the same arithmetic


def test_decode_attention_names_a_bad_table():
    q, k, v, meta = _decode_case([7, 12])
    with pytest.raises(RuntimeError, match="block id 99 is out of the cache"):
        OPS.decode_attention(q.flatten(1), k.data, v.data, torch.full_like(meta.block_tables, 99),
                             torch.tensor(meta.seq_lens), 0.125, 0)  # fmt: skip
    with pytest.raises(RuntimeError, match="sequence 1 has 13 tokens; its table holds 12"):
        OPS.decode_attention(q.flatten(1), k.data, v.data, meta.block_tables,
                             torch.tensor([7, 13]), 0.125, 0)  # fmt: skip


def test_the_model_with_fused_kernels_generates_what_it_does_without(monkeypatch):
    # the fused path and PyTorch's operations differ only in the order of sums: the same
    # greedy tokens, and logits within float32 noise
    params = SamplingParams(max_tokens=24)
    prompts = [[1, 9, 14, 3, 3, 27], [5, 6, 7, 8, 9, 10, 11, 12, 13]]

    def run():
        llm = LLM(model="kvforge-mini", device="cpu", kv_memory="16MiB")
        logits = []
        llm.engine.runner.logits_hook = lambda requests, step: logits.append(step.clone())
        return [o.token_ids for o in llm.generate(prompts, params)], torch.cat(logits)

    fused, fused_logits = run()
    monkeypatch.setattr(kernels, "cpu", lambda: None)
    plain, plain_logits = run()
    assert fused == plain
    torch.testing.assert_close(fused_logits, plain_logits, rtol=1e-4, atol=1e-4)


def test_layer_ops_fall_back_off_the_kernels_dtype():
    # bf16 rows take PyTorch's operations (the kernels are float32)
    x, weight = randn(3, 64).bfloat16(), randn(64).bfloat16()
    out = layer_ops.rms_norm(x, weight, 1e-6)
    expected = weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, True) + 1e-6)).bfloat16()
    assert torch.equal(out, expected)
