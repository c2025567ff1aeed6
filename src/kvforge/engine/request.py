"""A request's state as it moves through the engine, and what the user gets back."""

import enum
from dataclasses import dataclass, field

import torch

from kvforge.engine.sampling import SamplingParams, TokenLogprobs
from kvforge.kvcache.block_table import BlockTable
from kvforge.kvcache.policy import KVPolicy, PolicyState


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class RequestMetrics:
    """Times in seconds; token counts of the finished request."""

    arrival_s: float
    scheduled_s: float | None = None  # first admitted to the running batch
    first_token_s: float | None = None
    finish_s: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens not computed: found in the prefix cache
    cached_tokens_host: int = 0  # of those, loaded back from the host-memory tier
    cached_tokens_disk: int = 0  # and from the disk tier
    cached_tokens_remote: int = 0  # and from the remote tier (the rest were on the device)
    preemptions: int = 0
    peak_kv_tokens: int = 0  # the most tokens the request held in the cache at any moment

    @property
    def ttft_s(self) -> float | None:
        """Time to first token: arrival until the first output token exists."""
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first."""
        if self.finish_s is None or self.first_token_s is None or self.completion_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.completion_tokens - 1)


@dataclass
class RequestOutput:
    """The result of one prompt (`finish_reason` is "stop", "length" or "abort")."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    metrics: RequestMetrics
    error: str | None = None
    # with SamplingParams.logprobs: each output token's log-probability and the top N
    logprobs: list[TokenLogprobs] | None = None
    # with SamplingParams.prompt_logprobs: each prompt token's (the first has none: None)
    prompt_logprobs: list[TokenLogprobs | None] | None = None

    @property
    def cumulative_logprob(self) -> float | None:
        """The sum of the output tokens' log-probabilities (with logprobs)."""
        return None if self.logprobs is None else sum(t.logprob for t in self.logprobs)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Request:
    """Engine-side state. Tokens 0 .. num_computed_tokens-1 have been computed; their
    K/V are in the cache, but for the `num_dropped` an eviction policy let go of.

    all_token_ids: | prompt ............ | output ...... |
                   |<- num_computed ->|<- to compute ->|

    The cache holds `num_kv_tokens` = num_computed_tokens - num_dropped of them, in the
    order computed, in the block table's first slots; a new token goes on at position
    num_computed_tokens (its RoPE position) but at cache index num_kv_tokens.
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    block_table: BlockTable
    metrics: RequestMetrics
    eos_token_ids: frozenset[int]
    generator: torch.Generator | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    finish_reason: str | None = None
    text: str = ""
    error: str | None = None
    # prefix caching: the chain seed (None: off for this request), the keys of its full
    # blocks so far, and how many of its table's blocks are registered in the cache
    cache_seed: bytes | None = None
    block_keys: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    swapped: bool = False  # its blocks are in host memory (preempted by swap)
    window_blocks: list[int] = field(default_factory=list)  # borrowed while running (int2)
    kv_policy: KVPolicy | None = None  # None: keep every token
    policy_state: PolicyState = field(default_factory=PolicyState)
    num_dropped: int = 0  # computed tokens evicted from the cache by the policy
    logprobs: list[TokenLogprobs] | None = None  # with params.logprobs
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # with params.prompt_logprobs

    def __post_init__(self) -> None:
        if self.params.logprobs is not None:
            self.logprobs = []
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]  # the first prompt token has no context

    @property
    def prefix_hit_limit(self) -> int:
        """How many of its first tokens the prefix cache may serve. A prompt position whose
        log-probability is returned runs through the model: cached K/V serve only as
        context for positions already scored (a re-admission after a preemption)."""
        logprobs = self.prompt_logprobs
        if logprobs is None or len(logprobs) == len(self.prompt_token_ids):
            return self.num_tokens
        return len(logprobs) - 1

    @property
    def num_kv_tokens(self) -> int:
        """Computed tokens still in the cache."""
        return self.num_computed_tokens - self.num_dropped

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        prompt_len = len(self.prompt_token_ids)
        if end <= prompt_len:
            return self.prompt_token_ids[start:end]
        if start >= prompt_len:  # decode: no copy of the whole sequence each step
            return self.output_token_ids[start - prompt_len : end - prompt_len]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - prompt_len]

    def output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            token_ids=list(self.output_token_ids),
            text=self.text,
            finish_reason=self.finish_reason,
            metrics=self.metrics,
            error=self.error,
            logprobs=None if self.logprobs is None else list(self.logprobs),
            prompt_logprobs=None if self.prompt_logprobs is None else list(self.prompt_logprobs),
        )


def stable_text(r: Request, text: str) -> str:
    """The part of a running request's text that later tokens cannot change.

    Held back: a trailing U+FFFD (a multi-byte character cut between tokens)
    and any tail that could be the start of a stop string (cut if it completes).
    """
    if r.finish_reason is not None:
        return r.text
    text = text.rstrip("\ufffd")
    for stop in r.params.stop_strings:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                text = text[:-k]
                break
    return text
