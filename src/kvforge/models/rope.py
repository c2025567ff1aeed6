"""Rotary position embeddings (RoPE) as transformers computes them: the frequencies
(plain, Llama 3.1's scaling, or a GGUF file's per-pair divisors), the cos/sin tables,
rotation in the rotate_half convention, and moving a rotated key to another position."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from kvforge.errors import ConfigError

if TYPE_CHECKING:
    from kvforge.models.llama import ModelConfig

ROPE_TYPES = ("default", "llama3")
DEFAULT_ROPE_THETA = 10000.0


@dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's RoPE scaling: wavelengths longer than the original context are
    stretched by `factor`, short ones kept, and the band between interpolated."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


def rope_settings(config: dict[str, Any], name: str) -> tuple[float, Llama3RopeScaling | None]:
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or params
    theta = float(params.get("rope_theta", config.get("rope_theta", DEFAULT_ROPE_THETA)))
    if scaling.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{name}: partial_rotary_factor is not supported")
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type != "llama3":
        raise ConfigError(
            f"{name}: rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    try:
        return theta, Llama3RopeScaling(
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    except KeyError as exc:
        raise ConfigError(f"{name}: llama3 rope scaling needs {exc.args[0]!r}") from None


def rope_inv_freq(
    head_dim: int, theta: float, scaling: Llama3RopeScaling | None
) -> torch.Tensor:  # [head_dim / 2] float32
    """Rotation frequency of each channel pair, computed as transformers does."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos and sin of every position up to max_position_embeddings, in float32.

    The tables are built on the CPU even when the module is built on the meta
    device (so loading need not recompute them); `.to(device)` moves them.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        spec = config.spec
        inv_freq = rope_inv_freq(spec.head_dim, config.rope_theta, config.rope_scaling)
        if config.rope_freq_divisors is not None:
            inv_freq = inv_freq / torch.tensor(config.rope_freq_divisors, device="cpu")
        positions = torch.arange(spec.max_position_embeddings, dtype=torch.float32, device="cpu")
        freqs = positions[:, None] * inv_freq  # [P, D/2]
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.numel() and int(positions.max()) >= self.cos.shape[0]:
            return self._beyond(positions)
        return self.cos[positions], self.sin[positions]  # [T, D/2] each

    def _beyond(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin where some positions lie past the tables (a request whose eviction
        policy bounds its cache may run longer than the context): those are computed on
        the spot, in float64 so that an angle stays exact at any length, the others read
        from the tables as usual. The tables do not grow."""
        inside = positions < self.cos.shape[0]
        cos, sin = self.angles(positions)
        at = positions.clamp(max=self.cos.shape[0] - 1)
        cos = torch.where(inside[:, None], self.cos[at], cos)
        sin = torch.where(inside[:, None], self.sin[at], sin)
        return cos, sin

    def angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of `positions` (any integers, negative too) × each channel pair's
        frequency, computed in float64: [len(positions), D/2] float32 each."""
        freqs = positions.to(torch.float64)[:, None] * self.inv_freq.to(torch.float64)
        return freqs.cos().float(), freqs.sin().float()

    def shift(self, k: torch.Tensor, delta: int) -> torch.Tensor:
        """Keys `k` ([..., D], rotated at some position p) as if computed at p + delta:
        RoPE's rotations compose, so rotating by delta moves them, float32."""
        cos, sin = self.angles(torch.tensor([delta], device=self.inv_freq.device))
        return apply_rope(k.float(), cos[0], sin[0])


def apply_rope(
    x: torch.Tensor,  # [T, H, D]
    cos: torch.Tensor,  # [T, 1, D/2] in x's dtype
    sin: torch.Tensor,
) -> torch.Tensor:  # [T, H, D]
    # x * cat(cos, cos) + rotate_half(x) * cat(sin, sin), written on the halves:
    # the same products and sums as transformers, so the same rounding.
    x1, x2 = x.chunk(2, dim=-1)  # [T, H, D/2] each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
