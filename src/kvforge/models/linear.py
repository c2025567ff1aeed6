"""Matrix products for serving: oneDNN's on the CPU, PyTorch's default elsewhere.

On the CPU, `F.linear` goes to the BLAS PyTorch was built with (MKL in the
official wheels). For the few rows a decode step has (1 to 64), oneDNN's
matmul — the one `torch.compile` uses for CPU linears — is about twice as
fast on AMD CPUs for the larger matrices (MKL does not pick its best kernels
there), and no slower on Intel ones; results differ from `F.linear` only by
float rounding.

A GEMM library repacks the weight into its blocked layout on every call; for
2-64 rows that repacking costs as much as the product itself. Serving packs
each weight once (`Linear.pack_weight`), in place of the plain one, which
halves decode steps of 4-16 sequences on a 2-core AMD CPU.
"""

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(
            torch.ops.mkldnn, "_linear_pointwise"
        )
    except (AttributeError, RuntimeError):
        return False


ONEDNN = _onednn_available()
PACK_ROWS = 64  # the row count oneDNN lays a packed weight out for; any count works


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, with weight [out, in] as nn.Linear keeps it."""
    if ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same names) that multiplies through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def pack_weight(self) -> bool:
        """Replace the weight by oneDNN's packed copy of it (CPU, float32; else a no-op).

        The packed tensor is opaque: only `linear` reads it, and it is no longer a
        parameter (nothing trains or saves a serving model). Memory stays the same:
        the plain weight is released. Returns whether the weight was packed.
        """
        weight = self.weight
        if not (ONEDNN and weight.device.type == "cpu" and weight.dtype == torch.float32):
            return False
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS)
        except (AttributeError, RuntimeError):  # a build without the op
            return False
        del self.weight
        self.weight = packed
        return True
