"""The KV memory math: what a cache costs, and how much of it fits.

Pure functions over a `ModelSpec` and a `KVFormat`; used by `kvforge plan` and to
size the engine's block pool (`pool_size`), so the plan and the allocation cannot
disagree. The per-format byte counts live with the formats (`kvcache.formats`).

    bytes per block   = num_layers × num_kv_heads × (K + V bytes of one head over block_size tokens)
    bytes per token   = bytes per block / block_size
                      = 2 × num_layers × num_kv_heads × head_dim × bytes per value (+ scales)
    blocks a request  = ceil(cached tokens / block_size)     (paged rounding)
    cached tokens     = context, or the sliding window when the model has one
    bytes a request   = (blocks + window blocks) × bytes per block
    window blocks     = int4's, int2's full-precision recent tokens, in blocks a running
                        request borrows from the pool (`formats.window_blocks`)
"""

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from math import ceil

from kvforge.config import LLAMA_FAMILY, ModelSpec
from kvforge.dtypes import DTYPE_BITS, normalize_dtype
from kvforge.errors import PlanError, positive_int
from kvforge.kvcache.formats import (
    KV_FORMATS,
    KVFormat,
    as_number,
    blocks_per_request,
    bytes_per_block,
    bytes_per_token,
    cached_tokens,
    resolve_kv_format,
    window_blocks,
    with_skip_layers,
    with_window,
)

DEFAULT_BLOCK_SIZE = 16
# int4 and int2 store a scale and zero point per key channel per block: 64-token blocks
# spread them to 0.5 bit a value (int2: 2.5 bits in all); 16-token blocks would make it 2.
WINDOWED_BLOCK_SIZE = 64
COMPARE_CONTEXTS = (1024, 4096, 8192, 32768, 131072)
DEFAULT_MAX_NUM_SEQS = 256  # requests running at once, LLM(max_num_seqs=)'s default


def default_block_size(kv_dtype: str) -> int:
    """The block size used when none is given: 16 tokens, 64 for int4 and int2 (keys
    quantized per channel over a block)."""
    keys = getattr(KV_FORMATS.get(kv_dtype), "key_groups", None)
    return WINDOWED_BLOCK_SIZE if keys and keys.along == "tokens" else DEFAULT_BLOCK_SIZE


def pool_size(
    spec: ModelSpec,
    fmt: KVFormat,
    block_size: int,
    kv_bytes: int,
    max_num_seqs: int,
    cap_to_context: bool = False,
) -> int:
    """Blocks in the pool for `kv_bytes` of KV memory: all of it, as blocks. int4's and
    int2's full-precision recent windows are blocks too, borrowed from the pool by each
    request while it runs (`window_blocks`); the pool must hold one request's window and
    a block. `cap_to_context`: never more blocks than max_num_seqs requests of the model's
    whole context (and their windows) can use (for a default, not a user's size). The
    engine allocates exactly this; `kvforge plan --kv-memory` reports it.
    """
    block_bytes = bytes_per_block(spec, fmt, block_size)
    window = window_blocks(spec, fmt, block_size)
    blocks = kv_bytes // block_bytes
    if cap_to_context:
        most_useful = max_num_seqs * (-(-spec.max_position_embeddings // block_size) + window)
        return max(1 + window, min(blocks, most_useful))
    if blocks < 1:
        raise PlanError(
            f"kv_memory {kv_bytes:,} B holds no KV block: one block of {block_size} tokens "
            f"takes {block_bytes:,} B"
        )
    if blocks < 1 + window:
        raise PlanError(
            f"kv_memory {kv_bytes:,} B holds {blocks} KV blocks of {block_size} tokens "
            f"({block_bytes:,} B each): it needs one and the {window} a running request "
            "borrows for its recent window"
        )
    return blocks


def tensor_parallel_problem(spec: ModelSpec, size: int) -> str | None:
    """Why `size` ranks cannot split this model's layers (None: they can). Each rank takes
    num_attention_heads / size query heads and intermediate_size / size MLP channels, so
    both must divide; its KV heads are num_kv_heads / size, or, with fewer KV heads than
    ranks, the one KV head its query heads read, stored on size / num_kv_heads ranks
    (replicated, as vLLM does): so one of the two must divide the other."""
    heads, kv_heads = spec.num_attention_heads, spec.num_kv_heads
    if heads % size:
        return f"its {heads} query heads do not divide by {size}"
    if spec.intermediate_size is not None and spec.intermediate_size % size:
        return f"its intermediate_size {spec.intermediate_size} does not divide by {size}"
    if kv_heads % size and size % kv_heads:
        return f"its {kv_heads} KV heads and {size} ranks do not divide one another"
    return None


def tensor_parallel_sizes(spec: ModelSpec) -> list[int]:
    """Every tensor-parallel size this model's layers split into (1 included)."""
    return [n for n in range(1, spec.num_attention_heads + 1)
            if tensor_parallel_problem(spec, n) is None]  # fmt: skip


def check_tensor_parallel(spec: ModelSpec, size: int) -> None:
    """PlanError naming the sizes that work when `size` ranks cannot split the model."""
    positive_int("tensor_parallel_size", size, PlanError)
    problem = tensor_parallel_problem(spec, size)
    if problem is not None:
        allowed = ", ".join(map(str, tensor_parallel_sizes(spec)))
        raise PlanError(
            f"tensor_parallel_size {size} cannot split {spec.name}: {problem}; "
            f"sizes that work: {allowed}"
        )


def rank_spec(spec: ModelSpec, size: int) -> ModelSpec:
    """One rank's share of the model's attention (what its KV store holds): its query
    heads, and its KV heads (one, replicated, when there are fewer KV heads than ranks)."""
    if size == 1:
        return spec
    return dataclasses.replace(
        spec,
        num_attention_heads=spec.num_attention_heads // size,
        num_kv_heads=max(1, spec.num_kv_heads // size),
    )


def rank_weights_share(spec: ModelSpec, size: int) -> float:
    """The share of the model's parameters one rank holds (1.0 at one rank): its share of
    every layer's matmuls (its KV heads' k/v, replicated ones included), the embedding and
    norms whole, and its rows of the LM head (a tied head's rows are a copy). Llama family;
    other families are counted as 1/size."""
    total = spec.parameter_count()
    if size == 1 or total is None or spec.architecture not in LLAMA_FAMILY:
        return 1.0 if size == 1 else 1 / size
    share, h, d = rank_spec(spec, size), spec.hidden_size, spec.head_dim
    q, kv, inter = share.num_attention_heads * d, share.num_kv_heads * d, spec.intermediate_size
    attention = 2 * h * q + 2 * h * kv + (q + 2 * kv if spec.qkv_bias else 0)
    attention += (h if spec.o_bias else 0) + (2 * d if spec.qk_norm else 0)
    layer = attention + 3 * h * inter // size + 2 * h
    head_rows = ceil(spec.vocab_size / size)
    return (spec.num_layers * layer + spec.vocab_size * h + head_rows * h + h) / total


def bytes_per_request(spec: ModelSpec, fmt: KVFormat, block_size: int, context: int) -> int:
    """A request's blocks, and the blocks its recent window borrows while it runs."""
    blocks = blocks_per_request(spec, context, block_size) + window_blocks(spec, fmt, block_size)
    return blocks * bytes_per_block(spec, fmt, block_size)


def max_context(spec: ModelSpec, fmt: KVFormat, block_size: int, budget_bytes: int) -> int:
    """Longest context (up to max_position_embeddings) whose cache fits in `budget_bytes`."""
    limit = spec.max_position_embeddings
    if bytes_per_request(spec, fmt, block_size, limit) <= budget_bytes:
        return limit
    low, high = 0, limit  # bytes(low) fits (0 tokens cost nothing), bytes(high) does not
    while high - low > 1:
        mid = (low + high) // 2
        if bytes_per_request(spec, fmt, block_size, mid) <= budget_bytes:
            low = mid
        else:
            high = mid
    return low


GROUP_BITS = {"int8": 8.5, "int4": 5}  # groups of 32 + fp16 scale (and int4's minimum)


def weights_bytes_for(num_params: int, dtype: str, spec: ModelSpec | None = None) -> int:
    """Parameters at `dtype`. For int8/int4 with a Llama-family `spec`, what kvforge's
    loader holds: the matmul weights in groups of 32 with their fp16 scales (the
    embedding and LM head int8 under int4), the rest (norms, biases) at `spec.dtype`.
    Otherwise quantized weights count only their packed values."""
    counted = spec is not None and spec.architecture in LLAMA_FAMILY and dtype in GROUP_BITS
    if not counted or spec.parameter_count() is None:
        return ceil(num_params * DTYPE_BITS[dtype] / 8)
    h, q_dim = spec.hidden_size, spec.num_attention_heads * spec.head_dim
    kv_dim = spec.num_kv_heads * spec.head_dim
    per_layer = h * q_dim + 2 * h * kv_dim + q_dim * h + 3 * h * spec.intermediate_size
    matmuls = spec.num_layers * per_layer
    tables = spec.vocab_size * h * (1 if spec.tie_word_embeddings else 2)
    rest = spec.parameter_count() - matmuls - tables
    bits = matmuls * GROUP_BITS[dtype] + tables * GROUP_BITS["int8"]
    return ceil(bits / 8) + rest * DTYPE_BITS[spec.dtype] // 8


@dataclass(frozen=True)
class Weights:
    """What the weights cost: a count and dtype, or exact bytes read from a checkpoint."""

    num_params: int | None
    dtype: str
    num_bytes: int | None


def resolve_weights(
    spec: ModelSpec,
    *,
    weights_dtype: str | None = None,
    num_params: int | None = None,
    checkpoint_bytes: int | None = None,
) -> Weights:
    """Checkpoint bytes when the checkpoint's own dtype is meant, else params × dtype size."""
    num_params = num_params if num_params is not None else spec.parameter_count()
    if weights_dtype is None and checkpoint_bytes is not None:
        return Weights(num_params, spec.dtype, checkpoint_bytes)
    dtype = normalize_dtype(weights_dtype) if weights_dtype else spec.dtype
    if dtype == "int2":
        raise PlanError(
            "weights dtype int2 is not supported; use fp32, fp16, bf16, fp8, int8, int4"
        )
    num_bytes = None if num_params is None else weights_bytes_for(num_params, dtype, spec)
    return Weights(num_params, dtype, num_bytes)


def _positive(name: str, value: int) -> int:
    return positive_int(name, value, PlanError)


@dataclass(frozen=True)
class Plan:
    """The answer to "what will the cache cost, and how much fits?" for one setting."""

    model: str
    attention: str
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None
    max_position_embeddings: int
    kv_dtype: str
    kv_skip_layers: list[int]
    kv_layout: str
    block_size: int
    context: int
    batch: int
    bytes_per_token: int | float
    bytes_per_block: int
    tokens_cached_per_request: int
    blocks_per_request: int
    kv_recent_tokens: int | None  # int4's, int2's full-precision window (None: no window)
    kv_exact_sinks: bool
    window_blocks_per_request: int
    bytes_per_request: int
    kv_bytes_batch: int
    num_params: int | None
    weights_dtype: str
    weights_bytes: int | None
    memory_bytes: int | None
    reserve_bytes: int
    memory_required_bytes: int | None
    kv_bytes_total: int
    kv_capacity_blocks: int | None
    kv_capacity_tokens: int | None
    max_concurrent_requests: int | None
    max_context_single_request: int | None
    fits: bool | None
    gqa_saving_factor: float
    # tensor parallelism: the KV and memory figures above are the whole group's (every
    # rank's heads; weights_bytes is the model's own); memory_bytes and kv_bytes_per_rank
    # are each rank's budget
    tensor_parallel_size: int = 1
    kv_heads_per_rank: int = 0
    kv_replicas: int = 1  # ranks that store each KV head
    bytes_per_token_per_rank: int | float = 0
    bytes_per_block_per_rank: int = 0
    kv_bytes_per_rank: int = 0
    weights_bytes_per_rank: int | None = None
    memory_required_bytes_per_rank: int | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan_kv(
    spec: ModelSpec,
    *,
    context: int | None = None,
    batch: int = 1,
    kv_dtype: str = "auto",
    block_size: int | None = None,
    memory_bytes: int | None = None,
    reserve_bytes: int = 0,
    weights: Weights | None = None,
    kv_memory_bytes: int | None = None,
    max_num_seqs: int | None = None,
    kv_skip_layers: Sequence[int] = (),
    kv_recent_tokens: int | None = None,
    kv_exact_sinks: bool = False,
    tensor_parallel_size: int = 1,
) -> Plan:
    """Plan `batch` requests of `context` tokens (default: the model's maximum).

    `tensor_parallel_size` N: the model split across N ranks (`rank_spec`); the memory
    budgets are each rank's, the pool's blocks are every rank's (one block = each rank's
    share of its heads), and the byte figures are given per rank and for the group.

    With `memory_bytes` (the device budget) the KV pool gets what the weights
    and `reserve_bytes` leave over; with `kv_memory_bytes` it gets that much, as
    `LLM(kv_memory=)` does; without either it is sized to the batch. The pool's
    blocks are what the engine allocates for those bytes and `max_num_seqs`
    (default DEFAULT_MAX_NUM_SEQS), which also caps the concurrent requests when given.
    `kv_skip_layers`: layers kept in the model's dtype (`formats.with_skip_layers`);
    `kv_recent_tokens`, `kv_exact_sinks`: int4's and int2's window (`formats.with_window`).
    """
    context = spec.max_position_embeddings if context is None else _positive("context", context)
    _positive("batch", batch)
    ranks = tensor_parallel_size
    check_tensor_parallel(spec, ranks)
    whole, spec = spec, rank_spec(spec, ranks)  # the KV math below is one rank's
    fmt = resolve_kv_format(spec, kv_dtype, kv_skip_layers)
    fmt = with_window(fmt, kv_recent_tokens, kv_exact_sinks)
    block_size = default_block_size(fmt.name) if block_size is None else block_size
    _positive("block size", block_size)
    if isinstance(reserve_bytes, bool) or not isinstance(reserve_bytes, int) or reserve_bytes < 0:
        raise PlanError(f"reserve must be a non-negative number of bytes, got {reserve_bytes!r}")
    weights = weights or resolve_weights(whole)
    rank_weights = None
    if weights.num_bytes is not None:
        rank_weights = ceil(weights.num_bytes * rank_weights_share(whole, ranks))
    warnings = []
    if context > spec.max_position_embeddings:
        warnings.append(f"context {context} exceeds the model's max_position_embeddings "
                        f"{spec.max_position_embeddings}")  # fmt: skip

    block_bytes = bytes_per_block(spec, fmt, block_size)
    request_bytes = bytes_per_request(spec, fmt, block_size, context)
    kv_bytes_batch = batch * request_bytes
    memory_required = None
    if rank_weights is not None:
        memory_required = rank_weights + reserve_bytes + kv_bytes_batch

    capacity_blocks = capacity_tokens = max_requests = longest = fits = None
    kv_bytes_total = kv_bytes_batch
    if memory_bytes is not None and kv_memory_bytes is not None:
        raise PlanError("give the whole memory or the KV memory, not both")
    if max_num_seqs is not None:
        _positive("max_num_seqs", max_num_seqs)
    if kv_memory_bytes is not None:
        kv_bytes_total = _positive("kv memory", kv_memory_bytes)
    elif memory_bytes is not None:
        _positive("memory", memory_bytes)
        if weights.num_bytes is None:
            raise PlanError(
                f"cannot count the parameters of {spec.name} (architecture "
                f"{spec.architecture!r}) from its config: give --params or a checkpoint directory"
            )
        kv_bytes_total = memory_bytes - rank_weights - reserve_bytes
        if kv_bytes_total <= 0:
            whose = f" (a rank's share of {ranks})" if ranks > 1 else ""
            raise PlanError(
                f"weights ({rank_weights:,} B at {weights.dtype}{whose}) plus reserve "
                f"({reserve_bytes:,} B) need more than the memory budget ({memory_bytes:,} B)"
            )
    if kv_memory_bytes is not None and reserve_bytes:
        raise PlanError("a reserve comes out of the whole memory: give it with --memory")
    if memory_bytes is not None or kv_memory_bytes is not None:
        seqs = max_num_seqs or DEFAULT_MAX_NUM_SEQS
        try:
            capacity_blocks = pool_size(spec, fmt, block_size, kv_bytes_total, seqs)
        except PlanError:
            if kv_memory_bytes is not None:
                raise  # the KV memory the user gave holds no request: say so
            capacity_blocks = 0  # what the weights leave holds none
        capacity_tokens = capacity_blocks * block_size
        max_requests = capacity_blocks // (request_bytes // block_bytes)
        if max_num_seqs is not None:
            max_requests = min(max_requests, max_num_seqs)
        longest = max_context(spec, fmt, block_size, kv_bytes_total)
        fits = batch <= max_requests
        if not fits:
            each = " per rank" if ranks > 1 else ""
            warnings.append(
                f"{batch} requests of {context} tokens need {kv_bytes_batch:,} B of KV "
                f"cache{each}; the budget leaves {kv_bytes_total:,} B ({max_requests} "
                "requests fit)"
            )
    token_bytes = as_number(bytes_per_token(spec, fmt, block_size))

    return Plan(
        model=spec.name,
        attention=whole.attention_kind,
        num_layers=spec.num_layers,
        num_attention_heads=whole.num_attention_heads,
        num_kv_heads=whole.num_kv_heads,
        head_dim=spec.head_dim,
        sliding_window=spec.sliding_window,
        max_position_embeddings=spec.max_position_embeddings,
        kv_dtype=fmt.name,
        kv_skip_layers=list(fmt.skip_layers),
        kv_layout=fmt.summary,
        block_size=block_size,
        context=context,
        batch=batch,
        bytes_per_token=token_bytes * ranks,
        bytes_per_block=block_bytes * ranks,
        tokens_cached_per_request=cached_tokens(spec, context),
        blocks_per_request=blocks_per_request(spec, context, block_size),
        kv_recent_tokens=fmt.residual_tokens or None,
        kv_exact_sinks=bool(fmt.sink_blocks),
        window_blocks_per_request=window_blocks(spec, fmt, block_size),
        bytes_per_request=request_bytes * ranks,
        kv_bytes_batch=kv_bytes_batch * ranks,
        num_params=weights.num_params,
        weights_dtype=weights.dtype,
        weights_bytes=weights.num_bytes,
        memory_bytes=memory_bytes,
        reserve_bytes=reserve_bytes,
        memory_required_bytes=None if memory_required is None else memory_required * ranks,
        kv_bytes_total=kv_bytes_total * ranks,
        kv_capacity_blocks=capacity_blocks,
        kv_capacity_tokens=capacity_tokens,
        max_concurrent_requests=max_requests,
        max_context_single_request=longest,
        fits=fits,
        gqa_saving_factor=whole.gqa_saving_factor,
        tensor_parallel_size=ranks,
        kv_heads_per_rank=spec.num_kv_heads,
        kv_replicas=max(1, ranks // whole.num_kv_heads),
        bytes_per_token_per_rank=token_bytes,
        bytes_per_block_per_rank=block_bytes,
        kv_bytes_per_rank=kv_bytes_total,
        weights_bytes_per_rank=rank_weights,
        memory_required_bytes_per_rank=memory_required,
        warnings=warnings,
    )


def compare_levers(spec: ModelSpec, base: Plan, own_block_sizes: bool = False) -> dict:
    """The seeds' levers side by side, each under the budget of `base`.

    attention: MHA vs the model's own GQA vs MQA (same weights budget, only
    the number of stored KV heads changes); kv_dtypes: every format, at `base`'s
    block size or (own_block_sizes) at each format's default; contexts: how many
    requests fit at 1K ... 128K tokens; each with `base`'s kv_skip_layers.
    """
    budget = base.kv_bytes_total if base.kv_capacity_blocks is not None else None
    fmt = resolve_kv_format(spec, base.kv_dtype, base.kv_skip_layers)
    block_size, context = base.block_size, base.context

    def fit(request_bytes: int) -> int | None:
        return None if budget is None else budget // request_bytes

    attention = []
    head_counts = dict.fromkeys([spec.num_attention_heads, spec.num_kv_heads, 1])
    mha = dataclasses.replace(spec, num_kv_heads=spec.num_attention_heads)
    mha_block = bytes_per_block(mha, fmt, block_size)
    for num_kv_heads in head_counts:
        variant = dataclasses.replace(spec, num_kv_heads=num_kv_heads)
        request_bytes = bytes_per_request(variant, fmt, block_size, context)
        attention.append(
            {
                "attention": variant.attention_kind,
                "num_kv_heads": num_kv_heads,
                "is_model": num_kv_heads == spec.num_kv_heads,
                "bytes_per_token": as_number(bytes_per_token(variant, fmt, block_size)),
                "bytes_per_request": request_bytes,
                "saving_vs_mha": mha_block / bytes_per_block(variant, fmt, block_size),
                "max_concurrent_requests": fit(request_bytes),
            }
        )

    kv_dtypes = []
    fp16_token = bytes_per_token(spec, KV_FORMATS["fp16"], block_size)
    for other in KV_FORMATS.values():
        other = with_skip_layers(other, base.kv_skip_layers, spec)
        size = default_block_size(other.name) if own_block_sizes else block_size
        request_bytes = bytes_per_request(spec, other, size, context)
        capacity = None
        if budget is not None:  # the pool the engine would allocate
            try:
                capacity = pool_size(spec, other, size, budget, DEFAULT_MAX_NUM_SEQS) * size
            except PlanError:
                capacity = 0
        kv_dtypes.append(
            {
                "kv_dtype": other.name,
                "layout": other.summary,
                "block_size": size,
                "bytes_per_token": as_number(bytes_per_token(spec, other, size)),
                "bytes_per_request": request_bytes,
                "tokens_vs_fp16": float(fp16_token / bytes_per_token(spec, other, size)),
                "kv_capacity_tokens": capacity,
                "max_concurrent_requests": fit(request_bytes),
            }
        )

    contexts = []
    for tokens in COMPARE_CONTEXTS:
        request_bytes = bytes_per_request(spec, fmt, block_size, tokens)
        contexts.append(
            {
                "context": tokens,
                "within_model_limit": tokens <= spec.max_position_embeddings,
                "bytes_per_request": request_bytes,
                "max_concurrent_requests": fit(request_bytes),
            }
        )
    return {"attention": attention, "kv_dtypes": kv_dtypes, "contexts": contexts}
