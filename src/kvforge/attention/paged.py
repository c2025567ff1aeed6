"""Paged attention: read each sequence's K/V from its blocks, a tile of blocks at a time.

Keys and values are gathered TILE_TOKENS at a time and folded into a running
(online) softmax, FlashAttention-style, so the score matrix never holds more
than one tile of keys however long the context is. Decode tokens of all
sequences are processed together; each prefill chunk on its own. Query heads
are grouped onto their KV head (GQA/MQA) without copying K/V per query head.

A prefill with nothing cached before it (the whole sequence is new) needs no
read at all: its K/V are the ones just computed, and PyTorch's fused causal
SDPA (tiled, GQA-aware) attends over them directly.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvforge import kernels
from kvforge.attention.metadata import AttentionMetadata
from kvforge.kvcache.layer_cache import LayerCache
from kvforge.kvcache.plain_cache import PlainCache

TILE_TOKENS = 512  # keys per tile: bounds the scores to [kv_heads, rows, TILE_TOKENS]
# Decode rows are few, so their tiles are sized by the K/V they gather (all sequences
# together, float32) instead: one tile, one plain softmax, for most contexts.
DECODE_TILE_BYTES = 16 * 2**20


@dataclass(frozen=True)
class _Tile:
    """One tile of keys for a group of sequences: which blocks, and what each query sees."""

    ids: torch.Tensor  # [B * nb] block ids, sequence-major
    bias: torch.Tensor  # [B, Lq, L] float32: 0 where the key is visible, -inf where not
    length: int  # L = nb * block_size keys per sequence


@dataclass(frozen=True)
class _Plan:
    """What every layer of one forward pass reads for a group of sequences. It depends
    only on the metadata, so it is built once per pass and shared by all layers."""

    tables: torch.Tensor  # [B, max_blocks]
    tiles: tuple[_Tile, ...]
    rows: list[int] | None = None  # decode: the batch rows of the decode tokens (None: all)


def _tiles(
    block_tables: torch.Tensor,  # [B, blocks]
    q_pos: torch.Tensor,  # [B, Lq] position of each query token
    first_block: int,
    block_size: int,
    sliding_window: int | None,
    tile_tokens: int,
) -> tuple[_Tile, ...]:
    tile_blocks = max(1, tile_tokens // block_size)
    tiles = []
    for start in range(first_block, block_tables.shape[1], tile_blocks):
        ids = block_tables[:, start : start + tile_blocks]  # [B, nb]
        length = ids.shape[1] * block_size
        k_pos = torch.arange(start * block_size, start * block_size + length, device=q_pos.device)
        visible = k_pos <= q_pos[..., None]  # [B, Lq, L]; also hides padding past seq_len
        if sliding_window is not None:
            visible &= k_pos > q_pos[..., None] - sliding_window
        bias = torch.zeros(visible.shape, device=q_pos.device).masked_fill_(~visible, -torch.inf)
        tiles.append(_Tile(ids.reshape(-1), bias, length))
    return tuple(tiles)


def _gather(cache: LayerCache, block_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One tile's blocks as float32 [kv_heads, n, block_size, D], and the per-token scale
    [kv_heads, n, block_size] a quantized cache left for attention to apply (else None).

    A quantized cache decodes just these blocks. Head-major blocks make each
    (head, sequence) tile one contiguous [L, D] matrix.
    """
    return cache.gather_scaled(block_ids)


def _attend(
    q: torch.Tensor,  # [kv_heads, B, group * Lq, D] float32, already scaled; rows (head, token)
    k_cache: LayerCache,  # [kv_heads, num_blocks, block_size, D]
    v_cache: LayerCache,
    tiles: tuple[_Tile, ...],
    group: int,
    collect: torch.Tensor | None = None,  # [B, group * Lq]: weight of each row's attention
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(output [kv_heads, B, group * Lq, D] float32, and with `collect` the attention
    each key received from the weighted rows, [kv_heads, B, keys of all tiles])."""
    o, received = _attend_tiles(q, k_cache, v_cache, tiles, group, collect)
    if v_cache.rotation is not None:
        o = o @ v_cache.rotation.T
    return o, received


def _attend_tiles(
    q: torch.Tensor,
    k_cache: LayerCache,
    v_cache: LayerCache,
    tiles: tuple[_Tile, ...],
    group: int,
    collect: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_attend` in the caches' own space: keys and values as `gather_scaled` returns them
    (a rotated cache's stay rotated; q is rotated the same way here, o is not)."""
    if k_cache.rotation is not None:  # (qR).(kR) = q.k
        q = q @ k_cache.rotation
    kv_heads, batch, rows, _ = q.shape
    m = denom = acc = None  # running max, softmax denominator, weighted sum of V
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []  # with collect: (p, m_safe) a tile
    for tile in tiles:
        k, k_scale = _gather(k_cache, tile.ids)
        v, v_scale = _gather(v_cache, tile.ids)
        k = k.view(kv_heads, batch, tile.length, -1)
        v = v.view(kv_heads, batch, tile.length, -1)
        scores = q @ k.transpose(-1, -2)  # [kv_heads, B, group * Lq, L]
        if k_scale is not None:  # q . (s k) = s (q . k): scale the scores, not the keys
            scores.mul_(k_scale.view(kv_heads, batch, 1, tile.length))
        # the bias is per token; the group's query heads share it
        scores.view(kv_heads, batch, group, rows // group, -1).add_(tile.bias[:, None])
        if len(tiles) == 1:
            # One tile holds every key (the common case): a plain softmax. Each row sees
            # at least its own position, so no row is all -inf.
            p = torch.softmax(scores, dim=-1)
            received = None if collect is None else torch.einsum("br,hbrl->hbl", collect, p)
            return _weight(p, v_scale) @ v, received
        tile_max = scores.amax(-1)  # [kv_heads, B, rows]
        m_new = tile_max if m is None else torch.maximum(m, tile_max)
        m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)  # rows with no key yet
        p = torch.exp(scores - m_safe[..., None])
        if collect is not None:
            kept.append((p, m_safe))
        pv = _weight(p, v_scale) @ v  # [kv_heads, B, rows, D]
        if m is None:
            denom, acc = p.sum(-1), pv
        else:
            correction = torch.exp(m - m_safe)
            denom = denom * correction + p.sum(-1)
            acc = acc * correction[..., None] + pv
        m = m_new
    received = None
    if collect is not None:  # each tile's p, rescaled to the final max and denominator
        m_final = torch.where(torch.isinf(m), 0.0, m)
        received = torch.cat(
            [torch.einsum("hbr,hbrl->hbl", collect * torch.exp(m_t - m_final) / denom, p_t)
             for p_t, m_t in kept], dim=-1,
        )  # fmt: skip
    return acc / denom[..., None], received


def _weight(p: torch.Tensor, v_scale: torch.Tensor | None) -> torch.Tensor:
    """Probabilities times each value token's scale: sum_t p_t (s_t v_t) = sum_t (p_t s_t) v_t."""
    if v_scale is None:
        return p
    kv_heads, batch, _, length = p.shape
    return p * v_scale.view(kv_heads, batch, 1, length)


def _wanted(meta: AttentionMetadata, decode: list[int]) -> list[int]:
    """Positions in `decode` of the sequences whose attention this pass gathers."""
    if meta.collect is None:
        return []
    return [b for b, i in enumerate(decode) if i in meta.collect.modes]


def _add_received(meta: AttentionMetadata, i: int, received: torch.Tensor, start: int) -> None:
    """Add one layer's attention received by sequence i's keys ([kv_heads, keys read from
    position `start`]) to the pass's totals, as [kv_heads, seq_len]."""
    seq_len = meta.seq_lens[i]
    full = received.new_zeros(received.shape[0], seq_len)
    full[:, start:] = received[:, : seq_len - start]
    meta.collect.add(i, full)


def _first_block(min_q_pos: int, sliding_window: int | None, block_size: int) -> int:
    """Blocks wholly before every query's window are never read."""
    if sliding_window is None:
        return 0
    return max(0, min_q_pos - sliding_window + 1) // block_size


def _decode_plan(
    meta: AttentionMetadata, decode: list[int], sliding_window: int | None, kv_row_bytes: int
) -> _Plan:
    device = meta.block_tables.device
    all_seqs = len(decode) == meta.num_seqs
    tables = meta.block_tables if all_seqs else meta.block_tables[decode]
    pos = torch.tensor([meta.seq_lens[i] - 1 for i in decode], device=device)[:, None]
    first = _first_block(min(meta.seq_lens[i] for i in decode) - 1, sliding_window,
                         meta.block_size)  # fmt: skip
    tile_tokens = max(TILE_TOKENS, DECODE_TILE_BYTES // (len(decode) * kv_row_bytes))
    tiles = _tiles(tables, pos, first, meta.block_size, sliding_window, tile_tokens)
    return _Plan(tables, tiles, _decode_rows(meta, decode))


def _prefill_plan(meta: AttentionMetadata, i: int, sliding_window: int | None,
                  whole: bool = False) -> _Plan:  # fmt: skip
    """Sequence i's tiles of TILE_TOKENS keys; `whole`: one tile of all its keys."""
    seq_len, query_len = meta.seq_lens[i], meta.query_len(i)
    pos = torch.arange(seq_len - query_len, seq_len, device=meta.block_tables.device)[None]
    tables = meta.block_tables[i : i + 1, : -(-seq_len // meta.block_size)]
    first = _first_block(seq_len - query_len, sliding_window, meta.block_size)
    tile_tokens = tables.shape[1] * meta.block_size if whole else TILE_TOKENS
    tiles = _tiles(tables, pos, first, meta.block_size, sliding_window, tile_tokens)
    return _Plan(tables, tiles)


def _attend_whole(
    q: torch.Tensor,  # [Lq, H, D]: one sequence's new tokens
    k_cache: LayerCache,
    v_cache: LayerCache,
    tile: _Tile,  # all the keys it reads, with their causal (and window) mask
    scale: float,
) -> torch.Tensor:  # [Lq, H, D] float32
    """A prefill chunk's attention over its whole context, as the cache stores it, through
    PyTorch's fused SDPA (tiled inside, with an online softmax) instead of the Python tile
    loop: the keys and values are decoded once (scales applied), the mask is the tile's."""
    kv_heads = k_cache.shape[0]
    group = q.shape[1] // kv_heads
    k, k_scale = _gather(k_cache, tile.ids)  # [kv_heads, n, block_size, D]
    v, v_scale = _gather(v_cache, tile.ids)
    if k_scale is not None:
        k = k * k_scale[..., None]
    if v_scale is not None:
        v = v * v_scale[..., None]
    k, v = (x.reshape(kv_heads, tile.length, -1).repeat_interleave(group, 0)[None] for x in (k, v))
    q = q.float().transpose(0, 1)[None]  # [1, H, Lq, D]
    if k_cache.rotation is not None:  # (qR).(kR) = q.k
        q = q @ k_cache.rotation
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=tile.bias[0], scale=scale)[0]
    if v_cache.rotation is not None:
        o = o @ v_cache.rotation.T
    return o.transpose(0, 1)


def _split(meta: AttentionMetadata) -> tuple[list[int], list[int]]:
    """The sequences with one new token (decode) and those with more (prefill)."""
    lengths = [meta.query_len(i) for i in range(meta.num_seqs)]
    return [i for i, n in enumerate(lengths) if n == 1], [i for i, n in enumerate(lengths) if n > 1]


def _plan(meta: AttentionMetadata, key: tuple, build):
    plan = meta.plans.get(key)
    if plan is None:
        plan = meta.plans[key] = build()
    return plan


def _in_place_decode(
    q: torch.Tensor,  # [T, H, D]
    k_cache: LayerCache,
    v_cache: LayerCache,
    meta: AttentionMetadata,
    decode: list[int],
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor | None:
    """The decode rows' attention [len(decode), H, D] from the compiled kernel, which reads
    each sequence's keys and values where they lie in the cache (no gathered copy, no
    padding to the longest sequence); None where it does not apply: a CPU without the
    kernels, not float32, an encoded cache, or attention gathered for an eviction policy."""
    if q.shape[-1] % 16 or not isinstance(k_cache, PlainCache) or _wanted(meta, decode):
        return None
    ops = kernels.for_tensor(q)
    if ops is None:
        return None

    def build():
        tables = meta.block_tables if len(decode) == meta.num_seqs else meta.block_tables[decode]
        lens = torch.tensor([meta.seq_lens[i] for i in decode], dtype=torch.long)
        return tables.contiguous(), lens

    tables, lens = _plan(meta, ("in place", len(decode)), build)
    rows = _decode_rows(meta, decode)
    o = ops.decode_attention((q if rows is None else q[rows]).flatten(1), k_cache.data,
                             v_cache.data, tables, lens, scale, sliding_window or 0)  # fmt: skip
    return o.view(len(decode), *q.shape[1:])


def _decode_rows(meta: AttentionMetadata, decode: list[int]) -> list[int] | None:
    """The batch rows of the decode tokens, or None when every token is one (built once
    a pass)."""

    def build():
        return None if len(decode) == meta.num_tokens else [meta.query_start_loc[i] for i in decode]

    return _plan(meta, ("decode rows",), build)


def paged_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: LayerCache,  # [kv_heads, num_blocks, block_size, D]
    v_cache: LayerCache,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    k_new: torch.Tensor | None = None,  # [T, kv_heads, D]: this pass's K, V (optional)
    v_new: torch.Tensor | None = None,
) -> torch.Tensor:  # [T, H, D]
    _, num_heads, head_dim = q.shape
    kv_heads = k_cache.shape[0]
    group = num_heads // kv_heads
    out = torch.empty_like(q)
    decode, prefill = _plan(meta, ("split",), lambda: _split(meta))

    o = None
    if decode:
        o = _in_place_decode(q, k_cache, v_cache, meta, decode, scale, sliding_window)
    if o is not None:
        rows = _decode_rows(meta, decode)
        if rows is None:
            out = o
        else:
            out[rows] = o
    elif decode:
        kv_row_bytes = 2 * kv_heads * head_dim * 4  # K and V of one token, float32
        plan = _plan(meta, ("decode", sliding_window),
                     lambda: _decode_plan(meta, decode, sliding_window, kv_row_bytes))  # fmt: skip
        q_dec = q if plan.rows is None else q[plan.rows]
        q_dec = q_dec.float().view(len(decode), kv_heads, group, head_dim).transpose(0, 1)
        wanted = _wanted(meta, decode)
        collect = None
        if wanted:
            collect = torch.zeros(len(decode), group, device=q.device)
            collect[wanted] = 1.0
        o, received = _attend(q_dec * scale, k_cache, v_cache, plan.tiles, group, collect)
        if received is not None:
            first = _first_block(min(meta.seq_lens[i] for i in decode) - 1, sliding_window,
                                 meta.block_size)  # fmt: skip
            for b in wanted:
                _add_received(meta, decode[b], received[:, b], first * meta.block_size)
        o = o.transpose(0, 1).reshape(len(decode), num_heads, head_dim).to(q.dtype)
        if plan.rows is None:
            out = o
        else:
            out[plan.rows] = o

    for i in prefill:
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        query_len, seq_len = end - start, meta.seq_lens[i]
        fresh = query_len == seq_len and (sliding_window is None or seq_len <= sliding_window)
        # Only when the store keeps K/V exactly as computed, so that reading them back
        # later (decode, chunked prefill, recompute) sees the same values — or when the
        # cache asks for it (int2: a prompt attends to itself in full precision, as in KIVI).
        exact = (
            k_new is not None
            and v_new is not None
            and (k_new.dtype == k_cache.dtype or k_cache.prefill_full_precision)
        )
        mode = meta.collect.modes.get(i) if meta.collect is not None else None
        if fresh and exact and mode is None:
            # 4-D inputs with K/V repeated per query head take PyTorch's fused (flash)
            # CPU kernel; enable_gqa or 3-D inputs fall back to the unfused math path.
            o = F.scaled_dot_product_attention(
                q[start:end]
                .transpose(0, 1)[None]
                .float(),  # [1, H, L, D], fp32 like the paged path
                k_new[start:end].transpose(0, 1).repeat_interleave(group, 0)[None].float(),
                v_new[start:end].transpose(0, 1).repeat_interleave(group, 0)[None].float(),
                is_causal=True,
                scale=scale,
            )
            out[start:end] = o[0].transpose(0, 1).to(q.dtype)
            continue
        if mode is None:  # no attention to gather: one fused SDPA over the whole context
            plan = _plan(meta, ("prefill whole", i, sliding_window),
                         lambda i=i: _prefill_plan(meta, i, sliding_window, True))  # fmt: skip
            o = _attend_whole(q[start:end], k_cache, v_cache, plan.tiles[0], scale)
            out[start:end] = o.to(q.dtype)
            continue
        plan = _plan(meta, ("prefill", i, sliding_window),
                     lambda i=i: _prefill_plan(meta, i, sliding_window))  # fmt: skip
        # [Lq, H, D] -> [kv_heads, 1, group * Lq, D]: rows of one KV head are (query head, token)
        q_i = q[start:end].float().view(query_len, kv_heads, group, head_dim).permute(1, 2, 0, 3)
        q_i = q_i.reshape(kv_heads, 1, group * query_len, head_dim)
        collect = None
        if mode is not None:
            counted = query_len if mode == "all" else min(query_len, meta.collect.window[i])
            collect = torch.zeros(1, group, query_len, device=q.device)
            collect[..., query_len - counted :] = 1.0
            collect = collect.view(1, group * query_len)
        o, received = _attend(q_i * scale, k_cache, v_cache, plan.tiles, group, collect)
        if received is not None:
            first = _first_block(seq_len - query_len, sliding_window, meta.block_size)
            _add_received(meta, i, received[:, 0], first * meta.block_size)
        o = o.view(kv_heads, group, query_len, head_dim).permute(2, 0, 1, 3)
        out[start:end] = o.reshape(query_len, num_heads, head_dim).to(q.dtype)
    return out
