"""Eviction policies: which of a request's cached tokens to keep when its budget is full.

A policy keeps at most `budget` tokens of a request's KV. The engine lets the cache
grow to `budget + block_size` tokens, then asks the policy which `budget` to keep,
compacts them into the first blocks of the request's table and gives the other
blocks back to the pool (`Scheduler.compact`). Compacting once a block, not once a
token, keeps the copying to one pass over the budget every `block_size` tokens.

Kept tokens keep their original positions: their keys were rotated (RoPE) at the
position they were computed at, and new tokens go on from the request's true length.
Relative distances inside the cache stay exact, which is what the model was trained
on, and no key is touched again. The one exception is `streaming`'s sinks: a sink kept
at its first position ends up thousands of positions behind the query, farther than
the model ever saw, and the model degrades past its context. So by default the sinks
move along: at every compaction their keys are re-rotated (RoPE rotations compose) to
sit just before the oldest kept recent token. The query then sees exactly the
distances of StreamingLLM's positions-within-the-cache (sinks at 0..S-1, the window
after them) without re-rotating the window: S keys a compaction instead of the budget.
With a policy a request may run past the model's context; positions past the RoPE
tables are computed in float64, so they stay exact at any length. `h2o`'s and
`snapkv`'s far-back kept tokens keep their positions, and distances to them can exceed
what the model saw in training.

Under int4 and int2 (keys quantized per channel over a block) a token cannot move out of its
block: a policy's choice is rounded to whole blocks (`whole_blocks`), which are kept
as they are or dropped, and streaming's whole first block moves along.

The four policies share one interface: `select(state, held)` returns the sorted
indices (into the request's cache, 0 = oldest kept) of the tokens to keep. Those that
rank tokens by attention read it from `state.scores`, gathered inside the attention
read of the passes that asked for it (`wants_scores`).
"""

from dataclasses import dataclass
from typing import ClassVar

import torch

from kvforge.errors import KVForgeError, positive_int

DEFAULT_SINKS = 4
DEFAULT_OBSERVATION_WINDOW = 32
DEFAULT_POOL_KERNEL = 7


@dataclass
class PolicyState:
    """What a policy keeps about one request's cached tokens, indexed like its cache."""

    scores: torch.Tensor | None = None  # [held] float32: attention each token received
    prefilled: bool = False  # the pass that computed the last prompt token has run
    # the positions (in the request's tokens) of the first len(kept) cached tokens, those
    # the last compaction kept; the cached tokens after them came later, in order
    kept: list[int] | None = None

    def positions(self, held: int, dropped: int) -> list[int]:
        """The position of each of the `held` cached tokens (`dropped` evicted so far)."""
        kept = self.kept or []
        return kept + list(range(dropped + len(kept), dropped + held))

    def grow(self, held: int) -> None:
        """Scores for tokens added since the last update start at zero."""
        if self.scores is not None and len(self.scores) < held:
            self.scores = torch.cat([self.scores, torch.zeros(held - len(self.scores))])

    def add(self, received: torch.Tensor, held: int) -> None:
        """Add one pass's per-token attention ([held], float32)."""
        self.grow(held)
        self.scores = received if self.scores is None else self.scores + received


@dataclass(frozen=True)
class KVPolicy:
    """Keep at most `budget` tokens per request (see the module docstring)."""

    name: ClassVar[str]
    budget: int

    def __post_init__(self) -> None:
        positive_int("kv_budget", self.budget)

    def wants_scores(self, state: PolicyState, prompt_done: bool) -> str | None:
        """Which attention this pass should gather for the request (`prompt_done`: the
        pass completes its prompt): "all" (every new token's), "window" (the last
        `score_window` tokens of the pass), or None."""
        return None

    @property
    def score_window(self) -> int:
        """How many of a pass's last tokens count in "window" scores."""
        return 0

    def max_pass_tokens(self, block_size: int) -> int:
        """The most tokens one pass computes for a request under this policy: a long
        prompt (or a recompute) is read in pieces the policy compacts between."""
        return self.budget + block_size

    def check_prompt(self, prompt_len: int, max_model_len: int) -> None:
        """KVForgeError if a prompt this long cannot be read under this policy."""

    def most_cached(self, prompt_len: int, total: int, block_size: int) -> int:
        """The most tokens a request of `total` tokens (prompt + output) ever holds: a
        piece of prompt read on top of a full budget."""
        return min(total, 2 * self.max_pass_tokens(block_size))

    def compact_now(self, state: PolicyState, held: int, block_size: int,
                    prompt_done: bool) -> bool:  # fmt: skip
        """Whether to compact after this pass (`prompt_done`: it completed the prompt):
        when the cache reached budget + one block."""
        return held >= self.budget + block_size

    def select(self, state: PolicyState, held: int) -> list[int]:
        raise NotImplementedError

    def token_scores(self, received: torch.Tensor) -> torch.Tensor:
        """One pass's gathered attention, [kv_heads, held], as one score per token."""
        return received.sum(0)

    @property
    def pinned(self) -> int:
        """How many of the first tokens are always kept (streaming's sinks)."""
        return 0

    @property
    def moved(self) -> int:
        """How many of the first kept tokens move along as older tokens are dropped: after
        each compaction their keys are re-rotated to sit just before the oldest other kept
        token (streaming's sinks); 0 for none."""
        return 0


@dataclass(frozen=True)
class Sliding(KVPolicy):
    """Drop-oldest: keep the most recent `budget` tokens."""

    name: ClassVar[str] = "sliding"

    def select(self, state: PolicyState, held: int) -> list[int]:
        return list(range(max(0, held - self.budget), held))


@dataclass(frozen=True)
class Streaming(KVPolicy):
    """StreamingLLM (Xiao et al., 2023): the first tokens soak up attention that has
    nowhere else to go ("attention sinks"); keep `sinks` of them (default 4) and the
    most recent `budget - sinks`, and a model stays stable over any length.

    `positions="cache"` (default, the paper's): the sinks sit just before the window,
    as if positions were numbered inside the cache (their keys are re-rotated at each
    compaction; see the module docstring). `"original"`: they keep their first
    positions, and drift ever farther from the query."""

    name: ClassVar[str] = "streaming"
    sinks: int = DEFAULT_SINKS
    positions: str = "cache"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.sinks < self.budget:
            raise KVForgeError(f"streaming keeps {self.sinks} sink tokens: kv_budget must "
                               f"exceed that, got {self.budget}")  # fmt: skip
        if self.positions not in ("cache", "original"):
            raise KVForgeError(f"streaming positions must be 'cache' or 'original', "
                               f"got {self.positions!r}")  # fmt: skip

    @property
    def pinned(self) -> int:
        return self.sinks

    @property
    def moved(self) -> int:
        return self.sinks if self.positions == "cache" else 0

    def select(self, state: PolicyState, held: int) -> list[int]:
        if held <= self.budget:
            return list(range(held))
        return list(range(self.sinks)) + list(range(held - (self.budget - self.sinks), held))


def _recent_plus_top(scores: torch.Tensor, held: int, budget: int, recent: int) -> list[int]:
    """The last `recent` tokens, and the `budget - recent` others with the highest score
    (ties: the later token), sorted."""
    if held <= budget:
        return list(range(held))
    recent = min(recent, budget)
    older = held - recent
    top = budget - recent
    chosen: list[int] = []
    if top > 0:
        # a stable sort of the reversed scores: equal scores keep the later token first
        ranked = torch.sort(scores[:older].flip(0), descending=True, stable=True).indices
        chosen = (older - 1 - ranked[:top]).tolist()
    return sorted(chosen) + list(range(older, held))


@dataclass(frozen=True)
class H2O(KVPolicy):
    """Heavy-Hitter Oracle (Zhang et al., 2023): a few tokens receive most attention;
    keep the `budget - recent` with the largest attention accumulated over every query
    so far (all heads and layers summed), and the `recent` most recent tokens (default
    half the budget, as the paper's equal split). Scores are gathered in every pass."""

    name: ClassVar[str] = "h2o"
    recent: int | None = None

    @property
    def recent_tokens(self) -> int:
        return self.budget // 2 if self.recent is None else self.recent

    def wants_scores(self, state: PolicyState, prompt_done: bool) -> str | None:
        return "all"

    def select(self, state: PolicyState, held: int) -> list[int]:
        scores = state.scores if state.scores is not None else torch.zeros(held)
        return _recent_plus_top(scores, held, self.budget, self.recent_tokens)


@dataclass(frozen=True)
class SnapKV(KVPolicy):
    """SnapKV (Li et al., 2024): what the last prompt tokens (the observation window,
    default 32) attend to predicts what generation will need. Once, at the end of the
    prefill, each KV head's votes (attention from the window's queries, summed over the
    head's query group and the layers) are max-pooled along the prompt (kernel 7,
    keeping a hit's neighbours) and summed over heads; the top prompt tokens and the
    window itself are kept. Later, as generation fills the budget, tokens outside the
    most recent `observation_window` with the fewest votes go first (generated tokens
    have none, so the oldest of them go before the chosen prompt tokens)."""

    name: ClassVar[str] = "snapkv"
    observation_window: int = DEFAULT_OBSERVATION_WINDOW
    kernel: int = DEFAULT_POOL_KERNEL

    def wants_scores(self, state: PolicyState, prompt_done: bool) -> str | None:
        return "window" if prompt_done else None

    @property
    def score_window(self) -> int:
        return self.observation_window

    def check_prompt(self, prompt_len: int, max_model_len: int) -> None:
        if prompt_len > max_model_len:
            raise KVForgeError(
                f"the prompt ({prompt_len} tokens) exceeds the model's context of "
                f"{max_model_len} tokens (snapkv reads a prompt whole)"
            )

    def most_cached(self, prompt_len: int, total: int, block_size: int) -> int:
        """The whole prompt, then compressed to the budget."""
        return min(total, max(prompt_len + 1, self.budget + block_size))

    def compact_now(self, state: PolicyState, held: int, block_size: int,
                    prompt_done: bool) -> bool:  # fmt: skip
        if prompt_done:  # compress the prompt once, to the budget
            return held > self.budget
        return state.prefilled and held >= self.budget + block_size

    def select(self, state: PolicyState, held: int) -> list[int]:
        scores = state.scores if state.scores is not None else torch.zeros(held)
        return _recent_plus_top(scores, held, self.budget, self.observation_window)

    def token_scores(self, received: torch.Tensor) -> torch.Tensor:
        """Each KV head's votes pooled along the prompt, then summed over heads."""
        return pool_votes(received, self.kernel).sum(0)


def whole_blocks(keep: list[int], held: int, block_size: int, budget: int,
                 pinned: int = 0) -> list[int]:  # fmt: skip
    """`keep` rounded to whole blocks, for a cache whose tokens cannot move one by one
    (int4 and int2 quantize keys per channel over a block): the last block (the newest tokens),
    the blocks holding the first `pinned` tokens, then the blocks holding most of `keep`
    (ties: the later), as many as the budget holds. Their token indices, sorted."""
    n_blocks = -(-held // block_size)
    last = n_blocks - 1
    chosen = {last} | {i // block_size for i in range(min(pinned, held))}
    room = budget - (held - last * block_size) - block_size * (len(chosen) - 1)
    counts = [0] * n_blocks
    for i in keep:
        counts[i // block_size] += 1
    ranked = sorted((b for b in range(n_blocks) if b not in chosen),
                    key=lambda b: (counts[b], b), reverse=True)  # fmt: skip
    for b in ranked[: max(0, room // block_size)]:
        if counts[b]:
            chosen.add(b)
    return [i for b in sorted(chosen) for i in range(b * block_size,
                                                     min(held, (b + 1) * block_size))]  # fmt: skip


POLICIES: dict[str, type[KVPolicy]] = {p.name: p for p in (Sliding, Streaming, H2O, SnapKV)}


def pool_votes(votes: torch.Tensor, kernel: int) -> torch.Tensor:
    """SnapKV's pooling: [heads, L] votes max-pooled along L (odd kernel, same length)."""
    if kernel <= 1:
        return votes
    return torch.nn.functional.max_pool1d(votes[:, None], kernel, stride=1,
                                          padding=kernel // 2)[:, 0]  # fmt: skip


def make_policy(name: "str | KVPolicy | None", budget: int | None) -> KVPolicy | None:
    """The policy named `name` with `budget` tokens; None without a name; KVForgeError
    naming the choices for an unknown name, or a budget given without a policy. A
    `KVPolicy` built with its own options (say `Streaming(256, sinks=8)`) is taken as
    it is, its budget with it."""
    if isinstance(name, KVPolicy):
        if budget is not None and budget != name.budget:
            raise KVForgeError(f"kv_budget {budget} disagrees with the policy's ({name.budget})")
        return name
    if name is None:
        if budget is not None:
            raise KVForgeError("kv_budget needs a kv_policy (one of " + ", ".join(POLICIES) + ")")
        return None
    if name not in POLICIES:
        raise KVForgeError(f"unknown kv_policy {name!r}; choose one of {', '.join(POLICIES)}")
    if budget is None:
        raise KVForgeError(f"kv_policy {name!r} needs kv_budget (tokens kept per request)")
    return POLICIES[name](budget)
