"""Sampling parameters and the sampler.

Greedy rows are taken together with one argmax; sampled rows each use their
request's own torch.Generator, so a seed gives the same tokens whether the
request runs alone or batched with others.
"""

import math
from dataclasses import dataclass, field

import torch

from kvforge.errors import KVForgeError

MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop (vLLM-compatible names)."""

    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = all tokens
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise KVForgeError(f"max_tokens must be an integer, got {self.max_tokens!r}")
        if self.max_tokens < 1:
            raise KVForgeError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, int | float)
            or not math.isfinite(self.temperature)
            or self.temperature < 0
        ):
            raise KVForgeError(
                f"temperature must be a finite number >= 0, got {self.temperature!r}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise KVForgeError(
                f"top_k must be a non-negative integer (0 = off), got {self.top_k!r}"
            )
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise KVForgeError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not -(2**63) <= self.seed < 2**64
        ):
            raise KVForgeError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise KVForgeError(f"stop must be non-empty strings, got {self.stop!r}")
        self.stop_strings = tuple(stop)
        ids = self.stop_token_ids or []
        if any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in ids):
            raise KVForgeError(f"stop_token_ids must be token ids, got {self.stop_token_ids!r}")

    @property
    def greedy(self) -> bool:
        # Below MIN_TEMPERATURE dividing the logits overflows, and top_k=1 keeps only
        # the best token: both are argmax (first of equal logits, as greedy picks).
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top k and outside the top-p nucleus ([V])."""
    if 0 < top_k < logits.shape[-1]:
        keep = torch.topk(logits, top_k).indices  # exactly k tokens, even with ties
        kept = torch.full_like(logits, float("-inf"))
        kept[keep] = logits[keep]
        logits = kept
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, stable=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p; the first always stays
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def sample(
    logits: torch.Tensor,  # [N, V] float32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    tokens = logits.argmax(dim=-1).tolist()
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        scaled = _filter_top_k_top_p(logits[row] / p.temperature, p.top_k, p.top_p)
        # on the CPU: each request's generator lives there, so a seed gives the same
        # tokens on every device, alone or batched
        probs = torch.softmax(scaled, dim=-1).cpu()
        tokens[row] = int(torch.multinomial(probs, 1, generator=gen))
    return tokens
