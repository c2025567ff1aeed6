"""Reference attention: gather each sequence's whole K/V from its blocks, then SDPA.

Simple and obviously right; the tests hold the paged path to it. It
materialises the full score matrix, so it is not used for serving.
"""

import torch
import torch.nn.functional as F

from kvforge.attention.metadata import AttentionMetadata


def gather_kv(
    cache: torch.Tensor,  # [kv_heads, num_blocks, block_size, D]
    block_table: torch.Tensor,
    seq_len: int,
) -> torch.Tensor:  # [seq_len, kv_heads, D]
    num_blocks = -(-seq_len // cache.shape[2])
    return cache[:, block_table[:num_blocks]].flatten(1, 2)[:, :seq_len].transpose(0, 1)


def causal_mask(
    query_len: int, seq_len: int, sliding_window: int | None, device: torch.device
) -> torch.Tensor:  # [query_len, seq_len] bool, True = attend
    q_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def reference_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [kv_heads, num_blocks, block_size, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:  # [T, H, D]
    out = torch.empty_like(q)
    group = q.shape[1] // k_cache.shape[0]
    for i in range(meta.num_seqs):
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        seq_len = meta.seq_lens[i]
        k = gather_kv(k_cache, meta.block_tables[i], seq_len).repeat_interleave(group, dim=1)
        v = gather_kv(v_cache, meta.block_tables[i], seq_len).repeat_interleave(group, dim=1)
        mask = causal_mask(end - start, seq_len, sliding_window, q.device)
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1).float(),  # [H, Lq, D]
            k.transpose(0, 1).float(),
            v.transpose(0, 1).float(),
            attn_mask=mask,
            scale=scale,
        )
        out[start:end] = o.transpose(0, 1).to(q.dtype)
    return out
