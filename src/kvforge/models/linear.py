"""Matrix products for serving: oneDNN's on the CPU, PyTorch's default elsewhere.

On the CPU, `F.linear` goes to the BLAS PyTorch was built with (MKL in the
official wheels). For the few rows a decode step has (1 to 64), oneDNN's
matmul — the one `torch.compile` uses for CPU linears — is about twice as
fast on AMD CPUs for the larger matrices (MKL does not pick its best kernels
there), and no slower on Intel ones. It reads the weight as stored, so nothing
is repacked or copied; results differ from `F.linear` only by float rounding.
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


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, with weight [out, in] as nn.Linear keeps it."""
    if ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same names) that multiplies through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
