"""A fixed orthonormal rotation of each head's K and V before they are quantized.

Outlier channels (a few of a head's dimensions far larger than the rest) set a
per-token quantization scale that crushes every other channel. Rotating each
head's vector by an orthonormal matrix R spreads an outlier over all channels
first; attention stays exact, because rotations keep dot products
(q·k = (qR)·(kR)) and are undone by their transpose.

R is a Hadamard matrix with seeded random signs (llama.cpp and QuaRot's choice)
when head_dim is a power of two, else a seeded random orthogonal matrix (the Q
of a Gaussian matrix's QR). The seed is part of the KV format's cache key, so a
block stored under one rotation is never read under another.
"""

import torch

from kvforge.kvcache.formats import ROTATION_SEED


def rotation_matrix(head_dim: int, seed: int = ROTATION_SEED) -> torch.Tensor:
    """[head_dim, head_dim] float32, orthonormal: R @ R.T = I."""
    generator = torch.Generator().manual_seed(seed)
    if head_dim & (head_dim - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < head_dim:  # Sylvester: [[H, H], [H, -H]]
            h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
        signs = torch.randint(0, 2, (head_dim,), generator=generator).to(torch.float64) * 2 - 1
        return (signs[:, None] * h / head_dim**0.5).float()
    gaussian = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return (q * torch.sign(torch.diagonal(r))).float()  # a unique Q: R's diagonal positive


class RotatedCodec:
    """A codec that stores x @ R and reads back (decoded) @ R.T: the same parts and bytes
    as the codec it wraps."""

    def __init__(self, codec, rotation: torch.Tensor) -> None:
        self.codec = codec
        self.rotation = rotation
        self.name, self.head_dim = codec.name, codec.head_dim
        self.parts, self.block_wise = codec.parts, codec.block_wise

    def _r(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation.to(x.device)

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.float()
        return self.codec.encode(x @ self._r(x))

    def decode(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        y = self.codec.decode(parts)
        return y @ self._r(y).T
