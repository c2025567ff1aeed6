"""A decoder layer's small operations: one fused kernel each on a CPU with kvforge's
kernels (`kernels/layer_ops.cpp`, float32), else the PyTorch operations they stand for.

At batch 1 a decoder layer in plain PyTorch is about a hundred tensor operations, each
costing more to dispatch than to compute; fused, a layer is a dozen calls. The PyTorch
forms here are the reference the kernels follow (transformers' arithmetic), and what
runs on a GPU, in other dtypes, or without the kernels.
"""

import torch
import torch.nn.functional as F

from kvforge import kernels
from kvforge.kvcache.store import KVStore
from kvforge.models.rope import apply_rope


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor:
    """x / rms(x) * weight over the last dimension, computed in float32 and cast back before
    the weight (as transformers). With `residual`: `residual += x` in place first, and the
    sum is what is normalized (a decoder's "x = x + sublayer(x)" and the next norm)."""
    ops = kernels.for_tensor(x)
    if ops is not None and x.dim() == 2 and x.stride(1) == 1 and weight.dtype == x.dtype:
        return ops.rms_norm(x, weight, eps, residual)
    if residual is not None:
        x = residual.add_(x)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] (gate, then up) -> silu(gate) * up, [T, I]."""
    ops = kernels.for_tensor(gate_up)
    if ops is not None and gate_up.stride(-1) == 1:
        return ops.silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    # in place: no new [T, inter] tensors (allocating them costs page faults in prefill)
    return F.silu(gate, inplace=True).mul_(up)


def rope_and_store(
    qkv: torch.Tensor,  # [T, (H + 2 kvH) * D]: q, k, v side by side
    cos: torch.Tensor,  # [T, D/2] in qkv's dtype
    sin: torch.Tensor,
    num_heads: int,
    head_dim: int,
    store: KVStore,
    layer: int,
    slot_mapping: torch.Tensor,  # [T]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RoPE on q and k, then k and v written to the store at their slots; returns q
    [T, H, D], k and v [T, kvH, D]. Where the kernel runs (a plain cache), q and k are
    rotated in place in `qkv` and the write is part of the same pass."""
    num_tokens = qkv.shape[0]
    kv_heads = (qkv.shape[1] // head_dim - num_heads) // 2
    q_end, k_end = num_heads * head_dim, (num_heads + kv_heads) * head_dim
    ops = kernels.for_tensor(qkv)
    caches = store.plain(layer) if ops is not None and qkv.stride(1) == 1 else None
    if caches is not None:
        ops.rope_store(qkv, cos, sin, num_heads, *caches, slot_mapping)
        q = qkv[:, :q_end].view(num_tokens, num_heads, head_dim)
        k = qkv[:, q_end:k_end].view(num_tokens, kv_heads, head_dim)
    else:
        qk = apply_rope(qkv[:, :k_end].view(num_tokens, -1, head_dim), cos[:, None], sin[:, None])
        q, k = qk[:, :num_heads], qk[:, num_heads:]
    v = qkv[:, k_end:].view(num_tokens, kv_heads, head_dim)
    if caches is None:
        store.write(layer, slot_mapping, k, v)
    return q, k, v
