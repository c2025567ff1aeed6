"""The memory math, checked against the seeds' figures and hand arithmetic."""

import pytest

from kvforge.config import spec_from_hf_config
from kvforge.errors import KVForgeError, PlanError
from kvforge.kvcache.formats import get_kv_format
from kvforge.planner import (
    blocks_per_request,
    bytes_per_request,
    compare_levers,
    max_context,
    plan_kv,
    resolve_weights,
)
from kvforge.presets import get_preset

GiB = 2**30


# --- the seeds' figures -------------------------------------------------------------


def test_llama2_7b_fp16_seed_figures():
    plan = plan_kv(get_preset("llama-2-7b"), context=4096, kv_dtype="fp16")
    assert plan.bytes_per_token == 524_288  # 2 × 32 × 32 × 128 × 2
    assert plan.bytes_per_request == 2_147_483_648  # ≈ 2 GiB at 4K
    assert plan.gqa_saving_factor == 1
    assert plan.weights_bytes == 13_476_831_232  # "the 14 GB FP16 weights"


def test_llama2_7b_long_contexts_seed_figures():
    spec = get_preset("llama-2-7b")
    at_32k = plan_kv(spec, context=32768, kv_dtype="fp16")
    assert at_32k.bytes_per_request == 16 * GiB  # "32K tokens about 16 GiB"
    assert at_32k.warnings == ["context 32768 exceeds the model's max_position_embeddings 4096"]
    assert plan_kv(spec, context=131072).bytes_per_request == 68_719_476_736  # "128K → 67 GB"
    ten_users = plan_kv(spec, context=4096, batch=10)
    assert ten_users.kv_bytes_batch == 21_474_836_480  # "10 users × 2.1 GB = 21 GB"
    assert ten_users.kv_bytes_batch > ten_users.weights_bytes


def test_llama3_70b_bf16_seed_figures():
    plan = plan_kv(get_preset("llama-3-70b"), context=8192)
    assert plan.kv_dtype == "bf16"  # auto = the model's dtype
    assert plan.bytes_per_token == 327_680  # 80 × 8 × 128 × 2 × 2, not the seed's "1.6 MB"
    assert plan.bytes_per_request == 2_684_354_560  # ≈ 2.7 GB at 8K
    assert plan.gqa_saving_factor == 8


def test_gpt3_175b_fp16_seed_figure():
    plan = plan_kv(get_preset("gpt-3-175b"), context=2048)
    assert plan.bytes_per_token == 4_718_592  # 2 × 96 × 96 × 128 × 2 ≈ 4.7 MB/token
    assert plan.bytes_per_token * 4096 == 19_327_352_832  # "~19 GB per request" at 4K


def test_gqa_example_of_the_seeds():
    """8 query heads: MHA 8 KV pairs, GQA 2 (4× smaller), MQA 1 (8× smaller)."""
    config = {
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "hidden_size": 512,
        "max_position_embeddings": 1024,
    }
    mha = plan_kv(spec_from_hf_config(config, "mha"), context=100)
    gqa = plan_kv(spec_from_hf_config({**config, "num_key_value_heads": 2}, "gqa"), context=100)
    mqa = plan_kv(spec_from_hf_config({**config, "num_key_value_heads": 1}, "mqa"), context=100)
    assert mha.bytes_per_token == 2 * 2 * 8 * 64 * 2
    assert mha.bytes_per_token / gqa.bytes_per_token == 4 == gqa.gqa_saving_factor
    assert mha.bytes_per_token / mqa.bytes_per_token == 8 == mqa.gqa_saving_factor
    assert (mha.attention, gqa.attention, mqa.attention) == ("MHA", "GQA", "MQA")


@pytest.mark.parametrize(
    ("kv_dtype", "per_head_token"),
    [
        ("fp32", 2 * 128 * 4),
        ("fp16", 2 * 128 * 2),
        ("bf16", 2 * 128 * 2),
        ("fp8", 2 * (128 + 2)),
        ("int8", 2 * (128 + 2)),
        ("int4", 2 * (64 + 8)),  # 64-token blocks: K's 512 B of params / 64
        ("int2", (32 + 8) + (32 + 8)),
    ],
)
def test_every_kv_dtype_for_llama3_8b(kv_dtype, per_head_token):
    plan = plan_kv(get_preset("llama-3-8b"), context=1000, kv_dtype=kv_dtype)
    block = 64 if kv_dtype in ("int4", "int2") else 16
    assert plan.block_size == block
    assert plan.bytes_per_token == 32 * 8 * per_head_token
    assert plan.bytes_per_block == block * 32 * 8 * per_head_token


def test_int2_at_16_token_blocks_pays_for_its_key_params():
    plan = plan_kv(get_preset("llama-3-8b"), context=1000, kv_dtype="int2", block_size=16)
    assert plan.bytes_per_token == 32 * 8 * ((32 + 32) + (32 + 8))


# --- paged rounding and windows -----------------------------------------------------


def test_paged_rounding_holds_whole_blocks():
    spec = get_preset("llama-2-7b")
    plan = plan_kv(spec, context=17, kv_dtype="fp16")
    assert plan.blocks_per_request == 2
    assert plan.bytes_per_request == 2 * 16 * 524_288
    assert plan_kv(spec, context=16).blocks_per_request == 1
    assert plan_kv(spec, context=1, block_size=32).bytes_per_request == 32 * 524_288
    assert plan_kv(spec, context=100, block_size=1).bytes_per_request == 100 * 524_288


def test_sliding_window_caps_the_cache_at_the_window():
    spec = get_preset("mistral-7b")  # window 4096, 131,072 B/token in bf16
    short = plan_kv(spec, context=4096)
    assert (short.tokens_cached_per_request, short.blocks_per_request) == (4096, 256)
    full = plan_kv(spec, context=32768)
    assert full.tokens_cached_per_request == 4096
    # 4096 recent tokens starting mid-block span ceil(4095 / 16) + 1 = 257 blocks
    assert full.blocks_per_request == 257
    assert full.bytes_per_request == 257 * 16 * 131_072
    assert blocks_per_request(spec, 4097, 16) == 257
    assert blocks_per_request(spec, 32768, 4096) == 2


def test_int2_adds_the_full_precision_recent_blocks():
    spec = get_preset("llama-3-8b")  # bf16 model: 131,072 B per full-precision token
    plan = plan_kv(spec, context=1000, kv_dtype="int2")
    # the newest 32 tokens span at most 2 blocks of 64, kept whole in full precision in the
    # codes of borrowed blocks: a head's 64 x 32 B hold 8 bf16 rows of 128 channels, so
    # each block of recent tokens borrows 8 blocks while the request runs
    assert plan.window_blocks_per_request == 2 * 8
    assert plan.bytes_per_request == (16 + 16) * plan.bytes_per_block
    # borrowed whole, whatever the context
    assert plan_kv(spec, context=10, kv_dtype="int2").window_blocks_per_request == 16
    at_16 = plan_kv(spec, context=1000, kv_dtype="int2", block_size=16)
    # ceil(31 / 16) + 1 = 3 blocks of 16 recent tokens, 2 rows a borrowed block
    assert at_16.window_blocks_per_request == 3 * 8


# --- memory budgets -----------------------------------------------------------------


def test_budget_gives_capacity_concurrency_and_longest_context():
    spec = get_preset("llama-3.1-8b")  # 8,030,261,248 params, 131,072 B/token in bf16
    plan = plan_kv(spec, context=8192, memory_bytes=24 * GiB)
    pool = 24 * GiB - 8_030_261_248 * 2
    assert plan.kv_bytes_total == pool == 9_709_281_280
    assert plan.kv_capacity_blocks == pool // (16 * 131_072) == 4629
    assert plan.kv_capacity_tokens == 4629 * 16
    assert plan.max_concurrent_requests == pool // (8192 * 131_072) == 9
    assert plan.max_context_single_request == 4629 * 16  # whole blocks only
    assert plan.fits is True
    assert plan.memory_required_bytes == 8_030_261_248 * 2 + 8192 * 131_072


def test_budget_with_weights_dtype_and_reserve():
    spec = get_preset("llama-2-7b")
    weights = resolve_weights(spec, weights_dtype="int4")
    # as kvforge's loader holds them: 6,476,005,376 matmul weights at 5 bits (4 + an fp16
    # scale and minimum per 32), the two 32000 x 4096 tables int8 at 8.5 bits, and the
    # 266,240 norm weights at the checkpoint's fp16
    assert weights.num_bytes == (6_476_005_376 * 5 + 262_144_000 * 17 // 2) // 8 + 266_240 * 2
    plan = plan_kv(spec, context=4096, memory_bytes=16 * GiB, reserve_bytes=GiB, weights=weights)
    pool = 16 * GiB - 4_326_563_840 - GiB
    assert plan.kv_bytes_total == pool
    assert plan.max_concurrent_requests == pool // (4096 * 524_288) == 5
    assert plan.max_context_single_request == 4096  # capped at the model's limit


def test_batch_that_does_not_fit_is_flagged():
    plan = plan_kv(get_preset("llama-3.1-8b"), context=8192, batch=10, memory_bytes=24 * GiB)
    assert plan.fits is False
    assert plan.warnings == [
        "10 requests of 8192 tokens need 10,737,418,240 B of KV cache; "
        "the budget leaves 9,709,281,280 B (9 requests fit)"
    ]


def test_sliding_window_model_reaches_its_full_context_in_little_memory():
    spec = get_preset("mistral-7b")
    weights_bytes = 7_241_732_096 * 2
    plan = plan_kv(spec, context=32768, memory_bytes=weights_bytes + 257 * 16 * 131_072)
    assert plan.max_concurrent_requests == 1
    assert plan.max_context_single_request == 32768


def test_max_context_is_the_largest_that_fits():
    spec = get_preset("llama-3-8b")
    for fmt_name in ("bf16", "int4", "int2"):
        fmt = get_kv_format(fmt_name)
        budget = 123_456_789
        longest = max_context(spec, fmt, 16, budget)
        assert 0 < longest < spec.max_position_embeddings
        assert bytes_per_request(spec, fmt, 16, longest) <= budget
        assert bytes_per_request(spec, fmt, 16, longest + 1) > budget
    assert max_context(spec, get_kv_format("bf16"), 16, 1000) == 0


def test_without_budget_the_pool_is_the_batch():
    plan = plan_kv(get_preset("llama-2-7b"), context=4096, batch=3)
    assert plan.kv_bytes_total == 3 * 2_147_483_648
    assert plan.max_concurrent_requests is None and plan.max_context_single_request is None
    assert plan.context == 4096
    assert plan_kv(get_preset("llama-3.1-8b")).context == 131072  # default: the model's maximum


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"context": 0}, "context must be a positive integer, got 0"),
        ({"batch": -2}, "batch must be a positive integer, got -2"),
        ({"block_size": 0}, "block size must be a positive integer, got 0"),
        ({"memory_bytes": 0}, "memory must be a positive integer, got 0"),
        ({"reserve_bytes": -1}, "reserve must be a non-negative number of bytes"),
        ({"kv_dtype": "int3"}, "unknown KV dtype 'int3'"),
    ],
)
def test_impossible_sizes(kwargs, message):
    with pytest.raises(KVForgeError, match=message):
        plan_kv(get_preset("llama-2-7b"), **kwargs)


def test_weights_larger_than_memory():
    with pytest.raises(PlanError, match=r"weights \(13,476,831,232 B at fp16\) plus reserve"):
        plan_kv(get_preset("llama-2-7b"), memory_bytes=8 * GiB)


def test_uncountable_architecture_needs_params_for_a_budget():
    config = {
        "model_type": "falcon",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "hidden_size": 64,
        "max_position_embeddings": 64,
    }
    spec = spec_from_hf_config(config, "odd")
    assert plan_kv(spec, context=8).weights_bytes is None
    with pytest.raises(PlanError, match="cannot count the parameters of odd"):
        plan_kv(spec, context=8, memory_bytes=GiB)
    weights = resolve_weights(spec, num_params=1000)
    assert plan_kv(spec, context=8, memory_bytes=GiB, weights=weights).kv_bytes_total == GiB - 2000


def test_int2_weights_are_rejected():
    with pytest.raises(PlanError, match="weights dtype int2 is not supported"):
        resolve_weights(get_preset("llama-2-7b"), weights_dtype="int2")


# --- the levers side by side --------------------------------------------------------


def test_compare_levers():
    spec = get_preset("llama-3.1-8b")
    plan = plan_kv(spec, context=8192, memory_bytes=24 * GiB)
    comparison = compare_levers(spec, plan)
    pool = 9_709_281_280
    attention = {r["attention"]: r for r in comparison["attention"]}
    assert attention["MHA"]["bytes_per_token"] == 524_288
    assert attention["GQA"]["bytes_per_token"] == 131_072 and attention["GQA"]["is_model"]
    assert attention["MQA"]["bytes_per_token"] == 16_384
    assert attention["MQA"]["saving_vs_mha"] == 32
    assert attention["MHA"]["max_concurrent_requests"] == pool // (8192 * 524_288) == 2
    dtypes = {r["kv_dtype"]: r for r in comparison["kv_dtypes"]}
    assert list(dtypes) == ["fp32", "fp16", "bf16", "fp8", "int8", "int4", "int2"]
    assert dtypes["int8"]["kv_capacity_tokens"] == pool // (16 * 66_560) * 16
    # at the plan's 16-token blocks int4's per-channel key parameters cost 32 B a token
    assert dtypes["int4"]["tokens_vs_fp16"] == pytest.approx(131_072 / 43_008)
    contexts = {r["context"]: r for r in comparison["contexts"]}
    assert list(contexts) == [1024, 4096, 8192, 32768, 131072]
    assert contexts[1024]["max_concurrent_requests"] == pool // (1024 * 131_072) == 72
    assert contexts[131072]["max_concurrent_requests"] == 0
    assert all(r["within_model_limit"] for r in contexts.values())


def test_compare_without_budget_and_beyond_the_model_limit():
    spec = get_preset("llama-2-7b")
    comparison = compare_levers(spec, plan_kv(spec, context=4096))
    assert [r["num_kv_heads"] for r in comparison["attention"]] == [32, 1]  # MHA model, MQA
    contexts = {r["context"]: r for r in comparison["contexts"]}
    assert contexts[8192]["within_model_limit"] is False
    assert contexts[4096]["max_concurrent_requests"] is None


def test_compare_puts_each_format_at_its_own_default_block_size():
    spec = get_preset("llama-3.1-8b")
    plan = plan_kv(spec, context=8192, memory_bytes=24 * 2**30)
    rows = {r["kv_dtype"]: r for r in compare_levers(spec, plan, own_block_sizes=True)["kv_dtypes"]}
    assert (rows["int2"]["block_size"], rows["int8"]["block_size"]) == (64, 16)
    assert rows["int2"]["bytes_per_token"] == 20_480 and rows["int2"]["tokens_vs_fp16"] == 6.4
    same = {r["kv_dtype"]: r for r in compare_levers(spec, plan)["kv_dtypes"]}
    assert same["int2"]["block_size"] == 16 and same["int2"]["bytes_per_token"] == 26_624
