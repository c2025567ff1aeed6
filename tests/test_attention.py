"""Paged attention (tiled, online softmax) against the gather + SDPA reference."""

import pytest
import torch

import kvforge.attention.paged as paged
from kvforge.attention import AttentionMetadata, paged_attention, reference_attention
from kvforge.kvcache.plain_cache import PlainCache

KV_HEADS, HEADS, HEAD_DIM, NUM_BLOCKS = 2, 8, 16, 200
# (query_len, seq_len): decode rows, prefill chunks after a cached context, a fresh prefill
SEQS = [(1, 37), (5, 20), (1, 3), (9, 9), (1, 50)]


def batch(block_size: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(KV_HEADS, NUM_BLOCKS, block_size, HEAD_DIM, generator=gen)
    v_cache = torch.randn(KV_HEADS, NUM_BLOCKS, block_size, HEAD_DIM, generator=gen)
    free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()  # scattered block ids
    tables, starts, lens = [], [0], []
    for query_len, seq_len in SEQS:
        tables.append([free.pop() for _ in range(-(-seq_len // block_size))])
        starts.append(starts[-1] + query_len)
        lens.append(seq_len)
    width = max(map(len, tables))
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(starts[-1], dtype=torch.long),
        query_start_loc=tuple(starts),
        seq_lens=tuple(lens),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        block_size=block_size,
    )
    q = torch.randn(starts[-1], HEADS, HEAD_DIM, generator=gen)
    return q, k_cache, v_cache, meta


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("tile_tokens", [512, 8])
@pytest.mark.parametrize("window", [None, 7])
def test_paged_equals_reference(monkeypatch, block_size, tile_tokens, window):
    monkeypatch.setattr(paged, "TILE_TOKENS", tile_tokens)  # 8: many tiles per sequence
    if tile_tokens == 8:
        monkeypatch.setattr(paged, "DECODE_TILE_BYTES", 0)  # decode tiles of 8 keys too
    q, k_cache, v_cache, meta = batch(block_size)
    ours = paged_attention(q, PlainCache(k_cache), PlainCache(v_cache), meta, 0.25, window)
    ref = reference_attention(q, k_cache, v_cache, meta, 0.25, window)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_reference_matches_a_dense_computation():
    """One sequence, one block per token: the reference equals attention written out."""
    q, k_cache, v_cache, meta = batch(1)
    start, end = meta.query_start_loc[1], meta.query_start_loc[2]  # 5 queries over 20 keys
    keys = k_cache[:, meta.block_tables[1, :20]].squeeze(2).transpose(0, 1)  # [20, kv_heads, D]
    values = v_cache[:, meta.block_tables[1, :20]].squeeze(2).transpose(0, 1)
    out = reference_attention(q, k_cache, v_cache, meta, 0.25)[start:end]
    for t in range(5):
        pos = 15 + t
        for h in range(HEADS):
            kv = h // (HEADS // KV_HEADS)
            scores = (keys[: pos + 1, kv] @ q[start + t, h]) * 0.25
            expected = torch.softmax(scores, 0) @ values[: pos + 1, kv]
            torch.testing.assert_close(out[t, h], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 4, 64])
def test_fresh_prefill_from_new_kv_equals_reading_the_cache(window):
    """A sequence with nothing cached attends over this pass's K/V via fused SDPA."""
    q, k_cache, v_cache, meta = batch(4)
    tokens = meta.query_start_loc[-1]
    blocks, offsets = [], []
    for i in range(meta.num_seqs):  # where the new tokens sit in the cache
        for p in range(meta.seq_lens[i] - meta.query_len(i), meta.seq_lens[i]):
            blocks.append(int(meta.block_tables[i, p // 4]))
            offsets.append(p % 4)
    k_new = k_cache[:, blocks, offsets].transpose(0, 1)  # [T, kv_heads, D]
    v_new = v_cache[:, blocks, offsets].transpose(0, 1)
    assert k_new.shape == (tokens, KV_HEADS, HEAD_DIM)
    ours = paged_attention(
        q, PlainCache(k_cache), PlainCache(v_cache), meta, 0.25, window, k_new, v_new
    )
    ref = reference_attention(q, k_cache, v_cache, meta, 0.25, window)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
