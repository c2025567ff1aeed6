"""Plain-text rendering of plans and comparisons for the terminal."""

from collections.abc import Sequence

from kvforge.dtypes import DTYPE_BITS
from kvforge.planner import Plan
from kvforge.units import format_bytes, format_count


def _b(num_bytes: int | float | None) -> str:
    """'2,147,483,648 B (2.00 GiB)'."""
    if num_bytes is None:
        return "unknown"
    exact = f"{num_bytes:,}" if isinstance(num_bytes, int) else f"{num_bytes:,.3f}"
    return f"{exact} B ({format_bytes(num_bytes)})"


def render_table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None
) -> str:
    """Columns padded to width; `align` has an "l" or "r" per column (default: "l" then "r"s)."""
    align = align or "l" + "r" * (len(headers) - 1)
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        parts = [
            c.ljust(w) if a == "l" else c.rjust(w)
            for c, w, a in zip(row, widths, align, strict=True)
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _per_token_formula(plan: Plan) -> str:
    if plan.kv_skip_layers:  # layers in two formats: the layout row names both
        skipped = len(plan.kv_skip_layers)
        return (
            f"({plan.num_layers - skipped} layers at {plan.kv_dtype} + {skipped} kept at the "
            f"model's dtype) × {plan.num_kv_heads} KV heads × K+V = {_b(plan.bytes_per_token)}"
        )
    if plan.kv_layout.endswith("a value"):  # unquantized: the seeds' formula
        value_bytes = DTYPE_BITS[plan.kv_dtype] // 8
        return (
            f"2 × {plan.num_layers} layers × {plan.num_kv_heads} KV heads × "
            f"{plan.head_dim} head_dim × {value_bytes} B = {_b(plan.bytes_per_token)}"
        )
    return (
        f"{plan.num_layers} layers × {plan.num_kv_heads} KV heads × K+V packed with scales "
        f"= {_b(plan.bytes_per_token)}"
    )


def _attention_note(plan: Plan) -> str:
    if plan.attention == "MHA":
        return "MHA"
    return f"{plan.attention}, cache {plan.gqa_saving_factor:g}× smaller than MHA"


def render_plan(plan: Plan, title: str) -> str:
    sw = f" · sliding window {plan.sliding_window:,}" if plan.sliding_window else ""
    rows = [
        ("model", title),
        (
            "shape",
            f"{plan.num_layers} layers · {plan.num_attention_heads} query heads · "
            f"{plan.num_kv_heads} KV heads ({_attention_note(plan)}) · head_dim {plan.head_dim} · "
            "max context "
            f"{plan.max_position_embeddings:,}{sw}",
        ),
        ("KV format", f"{plan.kv_dtype}: {plan.kv_layout}"),
        ("per token", _per_token_formula(plan)),
        ("per block", f"{plan.block_size} tokens = {_b(plan.bytes_per_block)}"),
    ]
    cached = plan.tokens_cached_per_request
    held = f"{plan.context:,} tokens"
    if cached != plan.context:
        held += f" (window keeps {cached:,})"
    request = f"{held} → {plan.blocks_per_request:,} blocks"
    if plan.window_blocks_per_request:
        request += (f" + {plan.window_blocks_per_request:,} borrowed while it runs for its "
                    "full-precision recent tokens")  # fmt: skip
    rows.append(("per request", f"{request} = {_b(plan.bytes_per_request)}"))
    rows.append(("batch", f"{plan.batch} × request = {_b(plan.kv_bytes_batch)}"))
    if plan.num_params is not None:
        rows.append(
            (
                "weights",
                f"{format_count(plan.num_params)} parameters at {plan.weights_dtype} "
                f"= {_b(plan.weights_bytes)}",
            )
        )
    elif plan.weights_bytes is not None:
        rows.append(("weights", _b(plan.weights_bytes)))
    if plan.memory_required_bytes is not None and plan.tensor_parallel_size == 1:
        reserve = f" + reserve {format_bytes(plan.reserve_bytes)}" if plan.reserve_bytes else ""
        rows.append(
            ("memory needed", f"weights{reserve} + batch KV = {_b(plan.memory_required_bytes)}")
        )
    if plan.tensor_parallel_size > 1:
        rows += _tensor_parallel_rows(plan)
    if plan.kv_capacity_blocks is not None:
        budget = (
            f"{_b(plan.memory_bytes)} → KV pool {_b(plan.kv_bytes_total)}"
            if plan.memory_bytes is not None
            else f"KV memory {_b(plan.kv_bytes_total)}"
        )
        if plan.tensor_parallel_size > 1:
            budget = (
                f"{_b(plan.memory_bytes)} a rank → KV pool {_b(plan.kv_bytes_per_rank)} a rank"
                if plan.memory_bytes is not None
                else f"KV memory {_b(plan.kv_bytes_per_rank)} a rank"
            ) + f", {_b(plan.kv_bytes_total)} in all"
        rows += [
            ("budget", budget),
            (
                "capacity",
                f"{plan.kv_capacity_blocks:,} blocks = {plan.kv_capacity_tokens:,} tokens",
            ),
            (
                "fits",
                f"{plan.max_concurrent_requests:,} concurrent "
                f"request{'' if plan.max_concurrent_requests == 1 else 's'} of {plan.context:,} "
                f"tokens; one request up to {plan.max_context_single_request:,} tokens"
                + (
                    " (the model's limit)"
                    if plan.max_context_single_request == plan.max_position_embeddings
                    else ""
                ),
            ),
        ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def _tensor_parallel_rows(plan: Plan) -> list[tuple[str, str]]:
    """Each rank's share and the group's total (the rows above are the group's)."""
    n = plan.tensor_parallel_size
    heads = f"{plan.num_attention_heads // n} query heads, {plan.kv_heads_per_rank} KV head"
    heads += "s" if plan.kv_heads_per_rank != 1 else ""
    if plan.kv_replicas > 1:
        heads += f" (each KV head stored on {plan.kv_replicas} ranks: fewer KV heads than ranks)"
    block = _b(plan.bytes_per_block_per_rank)
    rank = f"KV {plan.bytes_per_token_per_rank:,} B/token, {block} a block"
    if plan.weights_bytes_per_rank is not None:
        rank = f"weights {_b(plan.weights_bytes_per_rank)} · " + rank
    if plan.memory_required_bytes_per_rank is not None:
        rank += f" · needs {_b(plan.memory_required_bytes_per_rank)}"
    total = f"KV {plan.bytes_per_token:,} B/token"
    if plan.weights_bytes_per_rank is not None:  # the replicated embedding counts each time
        total = f"weights {_b(plan.weights_bytes_per_rank * n)} · " + total
    if plan.memory_required_bytes is not None:
        total += f" · needs {_b(plan.memory_required_bytes)}"
    return [
        ("tensor parallel", f"{n} ranks, each {heads}"),
        ("each rank", rank),
        (f"all {n} ranks", total),
    ]


def render_comparison(comparison: dict, plan: Plan) -> str:
    has_budget = plan.kv_capacity_blocks is not None
    fit_header = "requests that fit" if has_budget else "requests (give --memory)"
    ctx = f"{plan.context:,}-token requests"
    attention = render_table(
        ["attention", "KV heads", "B/token", "B/request", "vs MHA", fit_header],
        [
            (
                r["attention"] + (" (this model)" if r["is_model"] else ""),
                r["num_kv_heads"],
                f"{r['bytes_per_token']:,}",
                format_bytes(r["bytes_per_request"]),
                f"{r['saving_vs_mha']:.2f}×",
                r["max_concurrent_requests"],
            )
            for r in comparison["attention"]
        ],
    )
    dtypes = render_table(
        [
            "KV dtype",
            "block",
            "B/token",
            "B/request",
            "tokens vs fp16",
            "token capacity",
            fit_header,
        ],
        [
            (
                r["kv_dtype"],
                r["block_size"],
                f"{r['bytes_per_token']:,}",
                format_bytes(r["bytes_per_request"]),
                f"{r['tokens_vs_fp16']:.2f}×",
                None if r["kv_capacity_tokens"] is None else f"{r['kv_capacity_tokens']:,}",
                r["max_concurrent_requests"],
            )
            for r in comparison["kv_dtypes"]
        ],
    )
    contexts = render_table(
        ["context", "B/request", fit_header],
        [
            (
                f"{r['context']:,}" + ("" if r["within_model_limit"] else " (> model max)"),
                format_bytes(r["bytes_per_request"]),
                r["max_concurrent_requests"],
            )
            for r in comparison["contexts"]
        ],
    )
    return "\n\n".join(
        [
            f"Attention layout ({plan.kv_dtype}, {ctx}):\n{attention}",
            f"KV dtype ({ctx}):\n{dtypes}",
            f"Batch vs context ({plan.kv_dtype}):\n{contexts}",
        ]
    )
