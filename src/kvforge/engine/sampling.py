"""Sampling parameters and the sampler.

Greedy rows are taken together with one argmax; sampled rows each use their
request's own torch.Generator, so a seed gives the same tokens whether the
request runs alone or batched with others.

Before a token is picked, a row's logits go through what its parameters ask, in
vLLM's order: `logit_bias` is added, the stop tokens are masked while fewer than
`min_tokens` were generated, then the penalties: `repetition_penalty` (a logit of
a token seen in the prompt or the output is divided by it when positive, multiplied
when negative), `frequency_penalty` × the token's count in the output and
`presence_penalty` × whether it occurs there are subtracted. Then temperature,
top-k and top-p. The log-probabilities returned (`logprobs`, `prompt_logprobs`) are
the model's own, before any of this (vLLM's default, "raw_logprobs").
"""

import math
from dataclasses import dataclass, field

import torch

from kvforge.errors import KVForgeError

MIN_TEMPERATURE = 1e-5
MAX_PENALTY = 2.0  # presence and frequency penalties lie in [-2, 2] (OpenAI, vLLM)
MAX_LOGIT_BIAS = 100.0  # a logit_bias value lies in [-100, 100] (OpenAI)
MAX_LOGIT = 1e30  # processed logits are clamped here: / MIN_TEMPERATURE is still finite


def _number(name: str, value, low: float, high: float, low_open: bool = False) -> None:
    """KVForgeError naming the field and its range unless value lies in it."""
    is_number = not isinstance(value, bool) and isinstance(value, int | float)
    if is_number and math.isfinite(value):
        above_low = low < value if low_open else low <= value
        if above_low and value <= high:
            return
    opening, closing = "(["[not low_open], ")]"[math.isfinite(high)]
    raise KVForgeError(f"{name} must be in {opening}{low:g}, {high:g}{closing}, got {value!r}")


def _count(name: str, value, low: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise KVForgeError(f"{name} must be an integer >= {low}, got {value!r}")


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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0  # no stop token (nor stop string) before this many tokens
    logit_bias: dict[int, float] | None = None  # added to the token's logit
    logprobs: int | None = None  # each generated token's log-probability and the top N
    prompt_logprobs: int | None = None  # each prompt token's, and the top N (the first: None)
    stop_strings: tuple[str, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int):
            raise KVForgeError(f"max_tokens must be an integer, got {self.max_tokens!r}")
        if self.max_tokens < 1 and not (self.max_tokens == 0 and self.prompt_logprobs is not None):
            raise KVForgeError(
                f"max_tokens must be at least 1, got {self.max_tokens} (0 only scores the "
                "prompt: with prompt_logprobs)"
            )
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
        _number("presence_penalty", self.presence_penalty, -MAX_PENALTY, MAX_PENALTY)
        _number("frequency_penalty", self.frequency_penalty, -MAX_PENALTY, MAX_PENALTY)
        _number("repetition_penalty", self.repetition_penalty, 0.0, math.inf, low_open=True)
        _count("min_tokens", self.min_tokens)
        if self.min_tokens > self.max_tokens:
            raise KVForgeError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        for token, bias in (self.logit_bias or {}).items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise KVForgeError(f"logit_bias keys must be token ids, got {token!r}")
            _number(f"logit_bias[{token}]", bias, -MAX_LOGIT_BIAS, MAX_LOGIT_BIAS)
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _count(name, getattr(self, name))

    @property
    def processes_logits(self) -> bool:
        """Whether the logits change before a token is picked (bias, penalties, min_tokens)."""
        return bool(self.logit_bias or self.min_tokens or self.presence_penalty
                    or self.frequency_penalty or self.repetition_penalty != 1.0)  # fmt: skip

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
        drop[0] = False  # (a top_p below float32's least number would drop it too)
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


@dataclass(frozen=True)
class History:
    """What a row's logits processing reads: the request's tokens and its stop tokens."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]
    stop_token_ids: frozenset[int]


def process_logits(row: torch.Tensor, p: SamplingParams, h: History) -> torch.Tensor:
    """One row's logits ([V]) after logit_bias, min_tokens and the penalties (a new tensor)."""
    row = row.clone()
    vocab = row.shape[0]
    if p.logit_bias:
        ids = [t for t in p.logit_bias if t < vocab]
        bias = torch.tensor([p.logit_bias[t] for t in ids], dtype=row.dtype, device=row.device)
        row[torch.tensor(ids, dtype=torch.long, device=row.device)] += bias
    if len(h.output_token_ids) < p.min_tokens and h.stop_token_ids:
        stops = torch.tensor(sorted(h.stop_token_ids), dtype=torch.long, device=row.device)
        row[stops[stops < vocab]] = float("-inf")
    masked = torch.isneginf(row)  # what min_tokens ruled out stays out
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(h.prompt_token_ids + h.output_token_ids, device=row.device).unique()
        values = row[seen]
        penalty = p.repetition_penalty
        row[seen] = torch.where(values > 0, values / penalty, values * penalty)
    if (p.frequency_penalty or p.presence_penalty) and h.output_token_ids:
        out = torch.tensor(h.output_token_ids, device=row.device)
        counts = torch.bincount(out, minlength=vocab)[:vocab].to(row.dtype)
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    # an extreme repetition_penalty overflows: keep the order, in a range temperature can
    # divide, every token but those min_tokens masked still possible
    row = torch.nan_to_num(row, nan=-MAX_LOGIT, posinf=MAX_LOGIT, neginf=-MAX_LOGIT)
    return row.masked_fill_(masked, float("-inf"))


@dataclass(frozen=True)
class TokenLogprobs:
    """A position's log-probabilities: of the token there, and the top ones (best first)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), at most the N asked


def token_logprobs(logits: torch.Tensor, tokens: list[int], tops: list[int]) -> list[TokenLogprobs]:
    """Rows of logits ([N, V]) → each row's log-probability of `tokens[i]` and its top
    `tops[i]`, from the model's own distribution (log-softmax in float32)."""
    if not tokens:
        return []
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0]
    k = min(max(tops), logprobs.shape[-1])
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0])
    chosen, top_values, top_ids = chosen.tolist(), top_values.tolist(), top_ids.tolist()
    return [
        TokenLogprobs(token, chosen[i], tuple(zip(top_ids[i][: tops[i]],
                                                  top_values[i][: tops[i]], strict=True)))
        for i, token in enumerate(tokens)
    ]  # fmt: skip


def sample(
    logits: torch.Tensor,  # [N, V] float32
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: list[History] | None = None,  # needed by rows that process their logits
) -> list[int]:
    processed = [i for i, p in enumerate(params) if p.processes_logits]
    if processed:
        logits = logits.clone()
        for i in processed:
            logits[i] = process_logits(logits[i], params[i], histories[i])
    tokens = logits.argmax(dim=-1).tolist()
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        # (a temperature beyond float32's range divides to 0, and a masked -inf to NaN)
        scaled = torch.nan_to_num(logits[row] / p.temperature, nan=float("-inf"))
        scaled = _filter_top_k_top_p(scaled, p.top_k, p.top_p)
        # on the CPU: each request's generator lives there, so a seed gives the same
        # tokens on every device, alone or batched
        probs = torch.softmax(scaled, dim=-1).cpu()
        tokens[row] = int(torch.multinomial(probs, 1, generator=gen))
    return tokens
