"""int4's and int2's full-precision recent windows are pool blocks: a running request borrows
them when it is admitted and gives them back when it leaves, so all of kv_memory is blocks and
one request can fill all of it but its window. Exact block ids at the manager; the default
settings on SmolLM2; a request that really fills over 6x fp16's tokens through the engine."""

import dataclasses
import re

import pytest
import torch
import transformers

from kvforge import LLM, SamplingParams
from kvforge.cli import main
from kvforge.config import ModelSpec
from kvforge.engine.build import DEFAULT_CPU_KV_BYTES
from kvforge.errors import KVForgeError
from kvforge.kvcache.block_ops import Retire, SwapIn, SwapOut
from kvforge.kvcache.formats import get_kv_format, window_blocks, with_window
from kvforge.kvcache.manager import KVCacheManager
from kvforge.kvcache.store import KVStore
from kvforge.planner import DEFAULT_MAX_NUM_SEQS, plan_kv, pool_size
from kvforge.presets import get_preset
from test_manager import Seq

BLOCK = 4  # tests.test_manager's Seq keys blocks of 4 tokens


def manager(num_blocks: int = 12, window: int = 3) -> KVCacheManager:
    return KVCacheManager(num_blocks, BLOCK, window_blocks=window)


# --- the manager: exact block ids -----------------------------------------------------


def test_a_request_borrows_its_window_when_admitted_and_gives_it_back_when_it_ends():
    m = manager()
    seq = Seq(list(range(10)))  # 3 blocks of 4 tokens
    admitted = m.admit(seq, cap=64, first=True)
    assert seq.block_table.block_ids == [0, 1, 2] and admitted.slots == list(range(10))
    assert seq.window_blocks == [3, 4, 5]  # after its own blocks
    stats = m.stats([seq])
    assert (stats["blocks_used"], stats["blocks_window"], stats["blocks_free"]) == (6, 3, 6)
    # waste counts the blocks holding tokens: 10 tokens in 3 blocks of 4
    assert stats["waste_ratio"] == pytest.approx(1 - 10 / 12)
    # growing takes blocks only: the window is borrowed once
    seq.num_computed_tokens = 10
    seq.tokens.extend([10, 11, 12])
    assert m.can_allocate(seq, 3)
    assert m.allocate_slots(seq, 3) == [10, 11, 24]
    assert seq.block_table.block_ids == [0, 1, 2, 6] and seq.window_blocks == [3, 4, 5]
    seq.num_computed_tokens = 13
    m.free(seq)
    # the store settles the window (Retire) before the blocks go back: the window's first
    assert m.take_ops() == [Retire([0, 1, 2, 6], 13)]
    assert seq.window_blocks == [] and m.stats([])["blocks_window"] == 0
    assert m.pool.free_block_ids() == [7, 8, 9, 10, 11, 3, 4, 5, 6, 2, 1, 0]
    m.pool.check_integrity()


def test_admission_counts_the_window_and_changes_nothing_when_it_does_not_fit():
    m = manager(num_blocks=8)
    first = Seq(list(range(8)), request_id="a")  # 2 blocks + 3 borrowed
    assert m.admit(first, cap=64, first=True) is not None
    second = Seq(list(range(100, 105)), request_id="b")  # 2 blocks + 3: 3 are free
    assert m.admit(second, cap=64, first=True) is None
    assert second.block_table.block_ids == [] and second.window_blocks == []
    assert m.pool.num_free == 3 and not m.can_allocate(second, 5)
    assert m.can_allocate(second, 0)  # its window alone would fit
    m.free(first)
    assert m.admit(second, cap=64, first=True) is not None
    assert len(second.window_blocks) == 3


def test_preemption_gives_the_window_back_and_a_swap_in_borrows_a_new_one():
    m = manager()
    seq = Seq(list(range(6)))
    m.admit(seq, cap=64, first=True)  # blocks 0, 1; window 2, 3, 4
    seq.num_computed_tokens = 6
    m.preempt(seq, swap=True)
    assert m.take_ops() == [SwapOut("r", [0, 1])] and seq.window_blocks == []
    assert m.pool.num_free == 12
    other = Seq(list(range(50, 54)), request_id="o")
    m.admit(other, cap=64, first=True)  # takes 5 and 6 as its block, 7..9 as its window
    assert (other.block_table.block_ids, other.window_blocks) == ([5], [6, 7, 8])
    m.admit(seq, cap=64, first=False)
    # its blocks back where it stopped, and a window borrowed again, named in the swap-in
    assert (seq.block_table.block_ids, seq.window_blocks) == ([9, 10], [11, 2, 3])
    assert m.take_ops() == [SwapIn("r", [9, 10], [11, 2, 3])]
    m.pool.check_integrity()


def test_formats_without_a_window_borrow_nothing():
    m = manager(window=0)
    seq = Seq(list(range(10)))
    m.admit(seq, cap=64, first=True)
    assert seq.window_blocks == [] and m.stats([seq])["blocks_window"] == 0


# --- the default settings on SmolLM2 ---------------------------------------------------


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # served on a CPU in fp32; bf16 elsewhere
@pytest.mark.parametrize("kv_dtype", ["int2", "int4"])
def test_default_memory_holds_the_formats_tokens_and_one_request_fills_it(dtype, kv_dtype):
    spec = dataclasses.replace(get_preset("smollm2-135m-instruct"), dtype=dtype)
    kv = DEFAULT_CPU_KV_BYTES  # 512 MiB: what LLM(kv_dtype=...) allocates on a CPU
    fp16 = plan_kv(spec, kv_dtype="fp16", kv_memory_bytes=kv).kv_capacity_tokens
    plan = plan_kv(spec, kv_dtype=kv_dtype, kv_memory_bytes=kv)
    fmt = get_kv_format(kv_dtype)
    # the engine's default pool is the planner's (capped to what 256 requests could use)
    engine_blocks = pool_size(spec, fmt, 64, kv, DEFAULT_MAX_NUM_SEQS, cap_to_context=True)
    assert engine_blocks == plan.kv_capacity_blocks == kv // plan.bytes_per_block
    ratio = {"int2": 6.4, "int4": 23_040 / 6_480}[kv_dtype]  # the format's own ratio to fp16
    assert plan.kv_capacity_tokens / fp16 == pytest.approx(ratio, rel=0.01)
    # one running request can hold every block but the ones its window borrows
    window = plan.window_blocks_per_request
    assert window == window_blocks(spec, fmt, 64)
    longest = (plan.kv_capacity_blocks - window) * 64
    if kv_dtype == "int2":
        assert plan.kv_capacity_tokens >= 6 * fp16 and longest >= 6 * fp16
    m = KVCacheManager(plan.kv_capacity_blocks, 64, window_blocks=window)
    seq = Seq(list(range(longest)))
    seq.block_table = type(seq.block_table)(64)
    assert m.admit(seq, cap=longest, first=True) is not None
    assert m.pool.num_free == 0 and len(seq.block_table.block_ids) + window == engine_blocks


def test_smollm2_engine_allocates_the_planners_blocks_and_nothing_beside(smollm2_int2):
    llm = smollm2_int2
    store, stats = llm.engine.store, llm.kv_stats()
    blocks = pool_size(store.spec, store.format, 64, DEFAULT_CPU_KV_BYTES, DEFAULT_MAX_NUM_SEQS,
                       cap_to_context=True)  # fmt: skip
    assert stats["blocks_total"] == blocks
    assert stats["kv_bytes_allocated"] == blocks * 64 * 3_600 <= DEFAULT_CPU_KV_BYTES
    # fp32 rows of 64 channels in a head's 64 x 16 B of codes: 4 a block, so each of the 2
    # blocks of recent tokens borrows 16 blocks
    assert stats["window_blocks_per_request"] == 32
    fp16_tokens = DEFAULT_CPU_KV_BYTES // 23_040
    assert blocks * 64 >= 6 * fp16_tokens and (blocks - 32) * 64 >= 6 * fp16_tokens


@pytest.fixture(scope="module")
def smollm2_int2():
    return LLM(model="smollm2-135m-instruct", device="cpu", kv_dtype="int2")


# --- through the engine: one request really fills it -----------------------------------


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory):
    """A one-layer Llama with SmolLM2's head shape (head_dim 64, so int2 is 6.4x fp16) and a
    64K context, small enough to run a 36K-token prompt on a CPU."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=128, intermediate_size=128,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=211,
                                      max_position_embeddings=65_536)  # fmt: skip
    path = tmp_path_factory.mktemp("long")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def test_one_request_fills_over_6x_fp16s_tokens_in_the_same_memory(long_context_model):
    kv_memory = 600 * 64 * 40  # 600 int2 blocks: 40 B a token (K 16 + 4, V 16 + 4)
    fp16 = LLM(model=long_context_model, device="cpu", kv_memory=kv_memory, kv_dtype="fp16")
    fp16_tokens = fp16.kv_stats()["blocks_total"] * 16
    assert fp16_tokens == kv_memory // 256 == 6_000
    llm = LLM(model=long_context_model, device="cpu", kv_memory=kv_memory, kv_dtype="int2")
    stats = llm.kv_stats()
    plan = plan_kv(llm.engine.store.spec, kv_dtype="int2", kv_memory_bytes=kv_memory)
    assert stats["blocks_total"] == plan.kv_capacity_blocks == 600
    assert stats["kv_bytes_allocated"] == kv_memory  # planner == allocation, nothing beside
    assert stats["window_blocks_per_request"] == 32
    # the longest request: every block but the 32 its window borrows
    tokens = (600 - 32) * 64
    assert llm.engine.max_request_tokens == tokens >= 6 * fp16_tokens
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, 211, (tokens - 4,), generator=gen).tolist()
    seen = []
    llm.engine.runner.logits_hook = lambda requests, logits: seen.append(llm.kv_stats())
    out = llm.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert out.error is None and len(out.token_ids) == 4
    last = seen[-1]  # the last step: all 568 blocks and the window in use, every slot but
    # the last one filled (the token sampled last is never stored)
    assert last["blocks_free"] == 0 and last["blocks_window"] == 32
    assert last["tokens_stored"] == tokens - 1 and last["num_preemptions"] == 0
    assert llm.kv_stats()["blocks_window"] == 0
    llm.engine.pool.check_integrity()


# --- a longer window and exact sinks (kv_recent_tokens, kv_exact_sinks) -----------------

TINY = ModelSpec(name="tiny", architecture="llama", num_layers=1, num_attention_heads=2,
                 num_kv_heads=1, head_dim=16, hidden_size=32, max_position_embeddings=512,
                 dtype="fp32")  # fmt: skip


def test_the_window_options_count_their_borrowed_blocks():
    spec = dataclasses.replace(get_preset("smollm2-135m-instruct"), dtype="fp32")
    fmt = with_window(get_kv_format("int2"), 128, exact_sinks=True)
    assert (fmt.residual_tokens, fmt.sink_blocks, fmt.key) == (128, 1, "int2")  # same bytes
    # 128 recent tokens span ceil(127 / 64) + 1 = 3 blocks, and the first block: 4 hot
    # blocks of fp32 tokens, 16 borrowed blocks each
    assert window_blocks(spec, fmt, 64) == 4 * 16
    plan = plan_kv(spec, context=8192, kv_dtype="int2", kv_recent_tokens=128, kv_exact_sinks=True)
    assert (plan.kv_recent_tokens, plan.kv_exact_sinks) == (128, True)
    assert plan.window_blocks_per_request == 64
    assert plan.bytes_per_request == (128 + 64) * 64 * 3_600
    assert plan_kv(spec, context=8192, kv_dtype="int2").kv_recent_tokens == 32
    assert plan_kv(spec, context=8192, kv_dtype="fp16").kv_recent_tokens is None


@pytest.mark.parametrize(("kv_dtype", "options", "message"), [
    ("fp16", {"kv_recent_tokens": 64}, "apply to the formats with a full-precision window "
                                       "(int4, int2), not fp16"),
    ("int8", {"kv_exact_sinks": True}, "(int4, int2), not int8"),
    ("int2", {"kv_recent_tokens": 0}, "kv_recent_tokens must be a positive number of tokens, "
                                      "got 0"),
])  # fmt: skip
def test_window_options_a_format_cannot_take_are_refused_by_name(kv_dtype, options, message):
    with pytest.raises(KVForgeError, match=re.escape(message)):
        LLM(model="random", device="cpu", kv_memory="8MiB", kv_dtype=kv_dtype, **options)


def test_the_cli_refuses_them_with_exit_2(capsys):
    code = main(["generate", "--model", "random", "--kv-dtype", "fp16", "--kv-exact-sinks",
                 "--prompt", "hi"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "not fp16" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--model", "smollm2-135m-instruct", "--kv-recent-tokens", "0"])
    assert exc.value.code == 2


def sink_store() -> tuple[KVStore, list[int]]:
    """A store whose int2 window keeps 16 recent tokens and the first block: 3 hot blocks
    of 16 fp32 tokens, each in 16 borrowed blocks (a head's 16 x 4 B hold one token)."""
    fmt = with_window(get_kv_format("int2"), 16, exact_sinks=True)
    assert window_blocks(TINY, fmt, 16) == 3 * 16
    return KVStore(TINY, fmt, 10 + 48, 16, "cpu"), list(range(10, 58))


def test_exact_sinks_keep_the_first_block_hot_until_the_request_lets_go():
    store, window = sink_store()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(80, 1, 16, generator=gen)  # [T, kv_heads, D]
    table = [0, 1, 2, 3, 4]
    for start, end in ((0, 40), (40, 80)):
        store.begin_pass([(table, start, end, window)])
        store.write(0, torch.arange(start, end), x[start:end], x[start:end])
    # 80 tokens: blocks from (80 - 16) // 16 = 4 stay hot, 1..3 are packed, 0 stays (sinks)
    assert sorted(store.window.slots) == [0, 4]
    got = store.k[0].gather(torch.tensor(table)).reshape(80, 16)
    assert torch.equal(got[:16], x[:16, 0])  # the sinks, exact
    assert not torch.equal(got[16:64], x[16:64, 0])  # packed at 2 bits
    assert torch.equal(got[64:], x[64:, 0])  # the recent tokens, exact
    # a hot block's keys are rewritten exactly (streaming re-rotates its sinks there)
    new = torch.randn(1, 1, 16, 16, generator=gen)
    store.write_keys(list(range(16)), new)
    assert torch.equal(store.read_keys(list(range(16))), new)
    store.retire(table, 80)  # the request lets go: the sink block is packed like the rest
    assert store.window.slots == {}
    packed = store.k[0].gather(torch.tensor([0])).reshape(16, 16)
    assert not torch.equal(packed, new[0, 0]) and torch.allclose(packed, new[0, 0], atol=1.5)


def test_a_request_inside_its_sinks_and_window_is_exact():
    """120 tokens at 64-token blocks, scored 64 a pass: the second pass reads the first
    block from the cache. With exact sinks it is read as computed, so every log-probability
    is the fp32 cache's; without them it is packed at 2 bits and they move."""
    tokens = list(range(3, 123))
    scores = {}
    for name, options in (("fp32", {"kv_dtype": "fp32"}),
                          ("sinks", {"kv_dtype": "int2", "kv_exact_sinks": True}),
                          ("int2", {"kv_dtype": "int2"})):  # fmt: skip
        llm = LLM(model="random", device="cpu", kv_memory="8MiB", **options)
        scores[name] = llm.engine.score(tokens, chunk_size=64)
        if name == "sinks":
            assert llm.kv_stats()["window_blocks_per_request"] == 3 * 16
            assert llm.engine.store.window.slots == {}
    torch.testing.assert_close(scores["sinks"], scores["fp32"], rtol=0, atol=1e-5)
    assert (scores["int2"] - scores["fp32"])[63:].abs().max() > 1e-3


def test_streaming_with_exact_sinks_rerotates_them_in_place():
    llm = LLM(model="random", device="cpu", kv_memory="8MiB", kv_dtype="int4",
              kv_exact_sinks=True, kv_policy="streaming", kv_budget=256)  # fmt: skip
    out = llm.generate([list(range(3, 203))], SamplingParams(max_tokens=300, ignore_eos=True))[0]
    assert out.error is None and len(out.token_ids) == 300
    assert out.metrics.peak_kv_tokens <= 256 + 64  # the budget and the block being filled
    assert llm.engine.store.window.slots == {}
    llm.engine.pool.check_integrity()
