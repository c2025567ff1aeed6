"""Attention over the paged KV store: a tiled paged path and a gather + SDPA reference."""

from kvforge.attention.metadata import AttentionMetadata
from kvforge.attention.paged import paged_attention
from kvforge.attention.reference import reference_attention

__all__ = ["AttentionMetadata", "paged_attention", "reference_attention"]
