"""What a request may be, as fixed numbers of one engine: the checks `add_request` makes
before a request is queued. Plain data, so that a process without the engine (the API
server's front end) can refuse a request that could never run, naming the limit."""

from dataclasses import dataclass

from kvforge.engine.sampling import SamplingParams
from kvforge.errors import KVForgeError
from kvforge.kvcache.policy import KVPolicy

MAX_POSITION = 1 << 24  # with a policy, positions may run past the context up to here


@dataclass(frozen=True)
class RequestLimits:
    """An engine's fixed limits on a request."""

    vocab_size: int
    max_model_len: int
    block_size: int
    num_blocks: int  # in the pool
    window_blocks: int  # borrowed by each running request for its recent window (int4, int2)
    token_moves: bool  # whether the cache moves single tokens (else policies keep blocks)
    residual_tokens: int  # tokens kept in full precision (int4, int2)
    kv_dtype: str
    kv_policy: KVPolicy | None = None  # every request's, unless it names its own

    @property
    def max_request_tokens(self) -> int:
        """The most tokens (prompt + output) one request can have: context and pool."""
        return min(self.max_model_len, (self.num_blocks - self.window_blocks) * self.block_size)

    def check_policy(self, policy: KVPolicy | None) -> None:
        """KVForgeError if the cache cannot apply `policy`. Under int4 and int2 (keys
        quantized per channel over whole blocks, the newest tokens kept in full precision)
        a policy keeps and drops whole blocks, and its budget must hold the sinks' block,
        the full-precision tokens and the block being filled."""
        if policy is None or self.token_moves:
            return
        bs = self.block_size
        least = self.residual_tokens + 2 * bs
        if policy.budget < least:
            raise KVForgeError(
                f"kv_budget {policy.budget} is too small for kv_dtype {self.kv_dtype!r}: it keeps "
                f"whole blocks of {bs} tokens and its {self.residual_tokens} newest tokens "
                f"in full precision, so a policy needs kv_budget >= {least}"
            )

    def check(self, token_ids: list[int], params: SamplingParams,
              policy: KVPolicy | None = None) -> None:  # fmt: skip
        """KVForgeError naming the limit if this request could never run.

        With an eviction policy a request holds at most twice its budget and a block (a
        piece of prompt read on top of a full budget), or snapkv's whole prompt, so it
        may run past the model's context: positions go on, the cache does not grow."""
        policy = policy if policy is not None else self.kv_policy
        self.check_policy(policy)
        if not token_ids:
            raise KVForgeError("the prompt is empty")
        bad = [t for t in token_ids if isinstance(t, bool) or not isinstance(t, int)]
        bad += [t for t in token_ids if isinstance(t, int) and not 0 <= t < self.vocab_size]
        if bad:
            raise KVForgeError(
                f"prompt token id {bad[0]!r} is outside the vocabulary [0, {self.vocab_size})"
            )
        total = len(token_ids) + params.max_tokens
        if policy is not None:
            if total > MAX_POSITION:
                raise KVForgeError(f"prompt + max_tokens = {total} exceeds {MAX_POSITION:,}")
            policy.check_prompt(len(token_ids), self.max_model_len)
            total = policy.most_cached(len(token_ids), total, self.block_size)
        elif total > self.max_model_len:
            raise KVForgeError(
                f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) = {total} "
                f"exceeds the model's context of {self.max_model_len} tokens"
            )
        block_size, window = self.block_size, self.window_blocks
        blocks = -(-total // block_size)
        if blocks + window > self.num_blocks:
            borrowed = f" (and {window} borrowed for its recent window)" * bool(window)
            raise KVForgeError(
                f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) needs "
                f"{blocks} KV blocks of {block_size} tokens{borrowed}; the pool has "
                f"{self.num_blocks} ({self.num_blocks * block_size} tokens): raise "
                "kv_memory or num_blocks"
            )
