"""Matmul weights kept quantized: int4 (GGUF's Q4_1 layout) and int8 (Q8_0).

A `QuantizedWeight` holds an [out, in] matrix in groups of 32 along `in`:

    int4   qs [out, in/32, 16] uint8 (byte j: value j low nibble, j + 16 high), scale d
           and minimum m [out, in/32] float16: w = d * q + m        (Q4_1; Q4_0: m = -8 d)
    int8   qs [out, in] int8, scale d [out, in/32] float16: w = d * q             (Q8_0)

so int4 costs 5 bits a weight and int8 8.5, as the files' Q4_1 and Q8_0 do.

A GGUF file's Q4_0, Q4_1 and Q8_0 blocks are taken as they are (exact); other
weights are quantized at load with the same rules (int4: min and max of a group;
int8: its largest magnitude). `QuantizedLinear` multiplies with the AVX-512 kernels
of `kernels/qlinear.cpp` on a CPU that has them (dequantized in registers, float32
arithmetic), else with the dequantized matrix, one call at a time.
"""

import numpy as np
import torch
from torch import nn

from kvforge import kernels
from kvforge.errors import ConfigError
from kvforge.models.linear import linear

GROUP = 32
# activation rows multiplied in registers; more take a dense GEMM on a dequantized copy.
# The direct kernel costs in proportion to the rows (compute-bound past one row): on
# SmolLM2's shapes it equals dequantize + oneDNN at 16 rows and takes 1.4-1.8x as long at
# 32-64 (benchmarks/qlinear_kernels.py).
DIRECT_ROWS = 16
WEIGHT_FORMATS = ("int8", "int4")
# GGUF block types read as they are: (format, bytes a block of 32)
GGUF_BLOCKS = {"Q4_0": ("int4", 18), "Q4_1": ("int4", 20), "Q8_0": ("int8", 34)}


class QuantizedWeight:
    """An [out, in] matrix in int4 or int8 groups of 32 (see the module's docstring)."""

    def __init__(self, fmt: str, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None):
        self.format, self.qs, self.d, self.m = fmt, qs, d, m
        self.shape = (qs.shape[0], d.shape[1] * GROUP)

    @classmethod
    def from_gguf(cls, type_name: str, blocks: np.ndarray) -> "QuantizedWeight":
        """From a GGUF tensor's raw blocks, [out, bytes per row] uint8."""
        fmt, size = GGUF_BLOCKS[type_name]
        rows = blocks.shape[0]
        b = torch.from_numpy(np.array(blocks)).view(rows, -1, size)  # a copy: the file is mapped
        d = b[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
        if type_name == "Q4_1":
            m = b[..., 2:4].contiguous().view(torch.float16).squeeze(-1)
            return cls(fmt, b[..., 4:].contiguous(), d, m)
        if type_name == "Q4_0":
            return cls(fmt, b[..., 2:].contiguous(), d, -8 * d)  # exact in fp16
        return cls(fmt, b[..., 2:].contiguous().view(torch.int8).view(rows, -1), d, None)

    @classmethod
    def quantize(cls, weight: torch.Tensor, fmt: str) -> "QuantizedWeight":
        """Quantize a float [out, in] matrix (in: a multiple of 32)."""
        out_features, in_features = weight.shape
        if in_features % GROUP:
            raise ConfigError(f"weights_dtype {fmt} needs input sizes that divide by {GROUP}")
        w = weight.detach().float().cpu().view(out_features, -1, GROUP)
        # the scales are rounded to fp16 first, and the values quantized against them
        if fmt == "int8":
            d = (w.abs().amax(-1) / 127).half()
            q = torch.round(w / d.float().clamp_min(1e-12)[..., None]).clamp_(-127, 127)
            return cls(fmt, q.to(torch.int8).view(out_features, in_features), d, None)
        lo = w.amin(-1).half()
        d = ((w.amax(-1) - lo.float()) / 15).half()
        q = torch.round((w - lo.float()[..., None]) / d.float().clamp_min(1e-12)[..., None])
        q = q.clamp_(0, 15).to(torch.uint8)
        packed = q[..., :16] | (q[..., 16:] << 4)
        return cls(fmt, packed.contiguous(), d, lo)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        d = self.d.float()[..., None]
        if self.format == "int8":
            w = self.qs.view(self.shape[0], -1, GROUP).float() * d
        else:
            q = torch.cat((self.qs & 0x0F, self.qs >> 4), dim=-1).float()
            w = q * d + self.m.float()[..., None]
        return w.view(self.shape).to(dtype)

    def rows(self, ids: torch.Tensor) -> "QuantizedWeight":
        """The matrix's rows `ids` (an embedding lookup, or reordered rows)."""
        m = None if self.m is None else self.m[ids]
        return QuantizedWeight(self.format, self.qs[ids], self.d[ids], m)

    def columns(self, start: int, end: int) -> "QuantizedWeight":
        """Input columns [start, end) of every row (a row-parallel shard); both ends must
        fall on group boundaries, since each group of 32 shares its scale."""
        if start % GROUP or end % GROUP:
            raise ConfigError(
                f"a shard of input columns {start}:{end} splits a quantization group of "
                f"{GROUP}: tensor parallelism needs shards of whole groups"
            )
        g0, g1 = start // GROUP, end // GROUP
        qs = self.qs[:, start:end] if self.format == "int8" else self.qs[:, g0:g1]
        m = None if self.m is None else self.m[:, g0:g1].contiguous()
        return QuantizedWeight(self.format, qs.contiguous(), self.d[:, g0:g1].contiguous(), m)

    @staticmethod
    def cat(parts: list["QuantizedWeight"]) -> "QuantizedWeight":
        """The parts' rows one after another (fused projections)."""
        fmt = parts[0].format
        m = None if fmt == "int8" else torch.cat([p.m for p in parts])
        return QuantizedWeight(fmt, torch.cat([p.qs for p in parts]),
                               torch.cat([p.d for p in parts]), m)  # fmt: skip

    def to(self, device) -> "QuantizedWeight":
        m = None if self.m is None else self.m.to(device)
        return QuantizedWeight(self.format, self.qs.to(device), self.d.to(device), m)

    @property
    def nbytes(self) -> int:
        """Bytes held: the packed values and fp16 scales (and minimums)."""
        tensors = [self.qs, self.d] + ([] if self.m is None else [self.m])
        return sum(t.numel() * t.element_size() for t in tensors)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, in] @ self.T -> [M, out], in x's dtype. Up to `DIRECT_ROWS` rows are
        multiplied in registers (memory-bound: the packed bytes are what is read); more
        rows go through a dense GEMM on a dequantized copy made for the call."""
        ops = kernels.for_tensor(x)
        if ops is None:
            return x @ self.dequantize(x.dtype).T
        x = x.contiguous()
        int4 = self.format == "int4"
        if x.shape[0] <= DIRECT_ROWS:
            if int4:
                return ops.q4_linear(x, self.qs, self.d, self.m)
            return ops.q8_linear(x, self.qs, self.d)
        w = (
            ops.q4_dequantize(self.qs, self.d, self.m)
            if int4
            else ops.q8_dequantize(self.qs, self.d)
        )
        return linear(x, w)


class QuantizedLinear(nn.Module):
    """A Linear layer whose weight stays quantized (no parameters: nothing trains it)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.qweight = weight
        self.out_features, self.in_features = weight.shape
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.qweight.matmul(x.reshape(-1, self.in_features))
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class QuantizedEmbedding(nn.Module):
    """An embedding table kept quantized: rows are dequantized as they are looked up."""

    def __init__(self, weight: QuantizedWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.qweight, self.dtype = weight, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight.rows(ids).dequantize(self.dtype)


EMBEDDING = "model.embed_tokens.weight"
LM_HEAD = "lm_head.weight"


def is_matmul_weight(name: str) -> bool:
    """A weight that multiplies (or, for the embedding, is looked up): what quantizes."""
    return name.endswith("_proj.weight") or name in (EMBEDDING, LM_HEAD)


def target_format(name: str, weights: str) -> str | None:
    """The quantized format parameter `name` is served in under `weights` (None: as the
    file has it with "auto", dense otherwise). With int4 the embedding and LM head stay
    int8, as llama.cpp's Q4 files keep them in 8 or 6 bits: 4 bits there costs most."""
    if weights not in WEIGHT_FORMATS or not is_matmul_weight(name):
        return None
    return "int8" if name in (EMBEDDING, LM_HEAD) else weights


def keeps_gguf_blocks(name: str, type_name: str, weights: str) -> bool:
    """Whether a GGUF tensor (of HF name `name`) is served from its own blocks as they are."""
    fmt = GGUF_BLOCKS[type_name][0] if type_name in GGUF_BLOCKS else None
    if fmt is None or not is_matmul_weight(name):
        return False
    return weights == "auto" or fmt == target_format(name, weights)


def apply_weights(model: nn.Module, weights: str, taken: dict[str, QuantizedWeight]) -> None:
    """Swap the model's matmuls for quantized ones: the weights `taken` from a file as they
    are (HF name -> weight), and under int8/int4 every other matmul weight, quantized
    from its loaded values. A tied LM head shares the embedding's quantized table."""
    config = model.config
    dtype, device = model.model.norm.weight.dtype, model.model.norm.weight.device
    if (taken or weights in WEIGHT_FORMATS) and device.type == "cpu":
        kernels.cpu()  # built now, while loading, rather than in the first request
    for name, module in list(model.named_modules()):
        key = f"{name}.weight"
        if not isinstance(module, nn.Linear) or (key == LM_HEAD and config.tie_word_embeddings):
            continue
        weight = taken.get(key)
        fmt = target_format(key, weights)
        if weight is None and fmt is not None:
            weight = QuantizedWeight.quantize(module.weight, fmt).to(device)
        if weight is not None:
            model.set_submodule(name, QuantizedLinear(weight, module.bias))
    table = taken.get(EMBEDDING)
    fmt = target_format(EMBEDDING, weights)
    if table is None and fmt is not None:
        table = QuantizedWeight.quantize(model.model.embed_tokens.weight, fmt).to(device)
    if table is not None:
        model.model.embed_tokens = QuantizedEmbedding(table, dtype)
        if config.tie_word_embeddings:
            model.lm_head = QuantizedLinear(table)


def fuse_quantized(parts) -> QuantizedLinear | None:
    """One QuantizedLinear for matmuls of the same input (q/k/v, gate/up), when all of them
    are quantized in one format; else None."""
    if not all(isinstance(p, QuantizedLinear) for p in parts):
        return None
    if len({p.qweight.format for p in parts}) != 1:
        return None
    biases = [p.bias for p in parts]
    bias = None if biases[0] is None else torch.cat(biases)
    return QuantizedLinear(QuantizedWeight.cat([p.qweight for p in parts]), bias)
