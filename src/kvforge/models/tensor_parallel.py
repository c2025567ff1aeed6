"""One rank's share of a Llama-family model under tensor parallelism (Megatron's split).

Each decoder layer is cut so that a rank computes its part with no communication but
two all-reduces, one after each sublayer:

    q, k, v, gate, up   column-parallel: the rank's output rows (its heads, its channels)
    o, down             row-parallel: the matching input columns; the partial products
                        are summed across ranks (all-reduce), the bias added by rank 0
    LM head             vocabulary-parallel: the rank's rows of the vocabulary; rank 0
                        gathers the logits (the engine does, `engine.parallel`)
    embedding, norms    replicated: a lookup and an elementwise scale cost less than the
                        all-reduce splitting them would add to every step

A rank's query heads are num_attention_heads / N consecutive ones, its KV heads the ones
those read: num_kv_heads / N of them, or, with fewer KV heads than ranks, the single one
its query heads share, stored by every rank that reads it (`planner.rank_spec`).
Quantized weights are cut before they are packed for the kernels, at whole groups of 32.
"""

from collections.abc import Callable
from math import ceil

import torch
from torch import nn

from kvforge.models.linear import Linear
from kvforge.models.llama import LlamaForCausalLM
from kvforge.models.quantized import QuantizedEmbedding, QuantizedLinear
from kvforge.planner import check_tensor_parallel, rank_spec


class RowParallel(nn.Module):
    """A row-parallel matmul: this rank's partial product, summed over ranks in place."""

    def __init__(self, inner: nn.Module, all_reduce: Callable[[torch.Tensor], None]) -> None:
        super().__init__()
        self.inner = inner
        self.all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        self.all_reduce(y)
        return y


def vocab_range(vocab_size: int, rank: int, size: int) -> tuple[int, int]:
    """The LM head rows rank `rank` computes: ceil(vocab / size) each, the last fewer."""
    per = ceil(vocab_size / size)
    start = min(vocab_size, rank * per)
    return start, min(vocab_size, start + per)


def _rows(module: nn.Module, start: int, end: int) -> nn.Module:
    """Output rows [start, end) of a matmul (column-parallel), bias included."""
    bias = None if module.bias is None else module.bias[start:end].clone()
    if isinstance(module, QuantizedLinear):
        return QuantizedLinear(module.qweight.rows(torch.arange(start, end)), bias)
    weight = module.weight
    part = Linear(module.in_features, end - start, bias=bias is not None)
    part = part.to(device=weight.device, dtype=weight.dtype).requires_grad_(False)
    with torch.no_grad():
        part.weight.copy_(weight[start:end])
        if bias is not None:
            part.bias.copy_(bias)
    return part


def _columns(module: nn.Module, start: int, end: int, keep_bias: bool) -> nn.Module:
    """Input columns [start, end) of a matmul (row-parallel); the bias only where kept."""
    bias = module.bias if keep_bias else None
    if isinstance(module, QuantizedLinear):
        return QuantizedLinear(module.qweight.columns(start, end), bias)
    weight = module.weight
    part = Linear(end - start, module.out_features, bias=bias is not None)
    part = part.to(device=weight.device, dtype=weight.dtype).requires_grad_(False)
    with torch.no_grad():
        part.weight.copy_(weight[:, start:end])
        if bias is not None:
            part.bias.copy_(bias)
    return part


def shard_model(
    net: LlamaForCausalLM, rank: int, size: int, all_reduce: Callable[[torch.Tensor], None]
) -> LlamaForCausalLM:
    """Cut `net` (loaded whole, not yet fused or packed) to rank `rank` of `size`, in place.
    `all_reduce` sums a tensor over the ranks in place. PlanError if `size` cannot split
    the model; ConfigError if a quantized shard would split a group."""
    spec = net.config.spec
    check_tensor_parallel(spec, size)
    share = rank_spec(spec, size)
    head_dim, heads, kv_heads = spec.head_dim, share.num_attention_heads, share.num_kv_heads
    q0 = rank * heads  # the rank's first query head, and the KV head it reads
    k0 = q0 * spec.num_kv_heads // spec.num_attention_heads
    inter = net.config.intermediate_size // size
    i0 = rank * inter
    for layer in net.model.layers:
        attn = layer.self_attn
        attn.q_proj = _rows(attn.q_proj, q0 * head_dim, (q0 + heads) * head_dim)
        attn.k_proj = _rows(attn.k_proj, k0 * head_dim, (k0 + kv_heads) * head_dim)
        attn.v_proj = _rows(attn.v_proj, k0 * head_dim, (k0 + kv_heads) * head_dim)
        o = _columns(attn.o_proj, q0 * head_dim, (q0 + heads) * head_dim, rank == 0)
        attn.o_proj = RowParallel(o, all_reduce)
        attn.num_heads, attn.num_kv_heads = heads, kv_heads
        mlp = layer.mlp
        mlp.gate_proj = _rows(mlp.gate_proj, i0, i0 + inter)
        mlp.up_proj = _rows(mlp.up_proj, i0, i0 + inter)
        mlp.down_proj = RowParallel(_columns(mlp.down_proj, i0, i0 + inter, rank == 0),
                                    all_reduce)  # fmt: skip
    net.lm_head = _rows(net.lm_head, *vocab_range(net.config.vocab_size, rank, size))
    return net


def move_model(net: LlamaForCausalLM, device: torch.device) -> None:
    """Move a rank's share to its device, quantized weights (not parameters) included."""
    net.to(device)
    for module in net.modules():
        if isinstance(module, QuantizedLinear | QuantizedEmbedding):
            module.qweight = module.qweight.to(device)
        bias = getattr(module, "bias", None)
        if (
            isinstance(module, QuantizedLinear)
            and bias is not None
            and not isinstance(bias, nn.Parameter)
        ):
            module.bias = bias.to(device)
