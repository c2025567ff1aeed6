"""int2 (KIVI-style): 2-bit packing, keys per channel per block, values per token, and the
recent full-precision window — which blocks are hot after every pass, what attention reads,
commits, swaps, retirement, and generation through the engine."""

import dataclasses

import pytest
import torch

from kvforge import LLM, SamplingParams
from kvforge.config import ModelSpec
from kvforge.errors import KVForgeError
from kvforge.kvcache.codecs import Int2KeyCodec, Int2ValueCodec, get_codecs, pack, unpack
from kvforge.kvcache.formats import KV_FORMATS, recent_blocks, window_blocks, window_lend
from kvforge.kvcache.store import KVStore
from kvforge.planner import bytes_per_block, bytes_per_token, plan_kv, pool_size

# --- codecs ---------------------------------------------------------------------------


def test_pack_puts_four_values_a_byte_first_value_lowest():
    q = torch.tensor([[1, 2, 3, 0, 3, 3]], dtype=torch.uint8)
    packed = pack(q, 2)
    assert packed.tolist() == [[1 | 2 << 2 | 3 << 4 | 0 << 6, 3 | 3 << 2]]
    assert unpack(packed, 2, 6).tolist() == q.tolist()


@pytest.mark.parametrize("outliers", [False, True])
def test_int2_keys_are_quantized_per_channel_over_a_block(outliers):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, 64, generator=gen)  # [kv_heads, blocks, block, D]
    if outliers:  # outlier channels: per-channel ranges keep the other channels fine
        x[..., ::9] *= 40
    codec = Int2KeyCodec(64)
    parts = codec.encode(x)
    assert parts["q"].shape == (2, 3, 16, 16) and parts["q"].dtype == torch.uint8
    assert parts["scale"].shape == parts["zero"].shape == (2, 3, 1, 64)
    step = (x.amax(-2, keepdim=True) - x.amin(-2, keepdim=True)) / 3  # per channel, block
    err = (codec.decode(parts) - x).abs()
    assert bool((err <= step * 0.5 + step * 0.01 + 1e-3).all())
    # per channel: an outlier channel does not coarsen its neighbours
    if outliers:
        assert float(err[..., 1].max()) < 2.0


def test_int2_values_are_quantized_per_token_in_groups_of_64():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, 80, generator=gen)
    codec = Int2ValueCodec(80)
    parts = codec.encode(x)
    assert parts["q"].shape == (2, 40, 20) and parts["scale"].shape == (2, 40, 2)
    decoded = codec.decode(parts)
    for sl in (slice(0, 64), slice(64, 80)):
        chunk = x[..., sl]
        step = (chunk.amax(-1, keepdim=True) - chunk.amin(-1, keepdim=True)) / 3
        assert bool(((decoded[..., sl] - chunk).abs() <= step * 0.5 + step * 0.01 + 1e-3).all())


# --- the recent window, pass by pass ----------------------------------------------------

SPEC = ModelSpec(name="tiny", architecture="llama", num_layers=2, num_attention_heads=4,
                 num_kv_heads=2, head_dim=16, hidden_size=64, max_position_embeddings=256,
                 dtype="fp32")  # fmt: skip
FMT = dataclasses.replace(KV_FORMATS["int2"], residual_tokens=24)  # 3 recent blocks of 16
BLOCK = 16
# a head's codes of a block (16 x 4 B) hold one fp32 row of 16 channels: a block of recent
# tokens borrows 16 blocks, a request 3 x 16
LEND = 16


def expected_blocks(raw: torch.Tensor, length: int, hot_from: int, key: bool) -> torch.Tensor:
    """What attention must read for a sequence: [kv_heads, blocks, block, D]. Blocks before
    `hot_from` quantized (whole), the rest exact (unwritten rows left out by the caller)."""
    heads, dim = raw.shape[1], raw.shape[2]
    n = -(-length // BLOCK)
    padded = torch.zeros(n * BLOCK, heads, dim)
    padded[:length] = raw[:length]
    blocks = padded.view(n, BLOCK, heads, dim).permute(2, 0, 1, 3)
    out = blocks.clone()
    if hot_from:
        cold = blocks[:, :hot_from]
        codec = Int2KeyCodec(dim) if key else Int2ValueCodec(dim)
        out[:, :hot_from] = codec.decode(codec.encode(cold))
    return out


class Sim:
    """Drives a KVStore through passes with random K/V and remembers the raw values."""

    def __init__(self, num_blocks=200):
        self.store = KVStore(SPEC, FMT, num_blocks, BLOCK, "cpu")
        assert window_lend(SPEC, FMT, BLOCK) == LEND
        self.free = list(range(num_blocks - 1, -1, -1))
        self.gen = torch.Generator().manual_seed(0)
        self.tables: dict[str, list[int]] = {}
        self.windows: dict[str, list[int]] = {}  # the blocks each request borrows
        self.raw: dict[str, list[torch.Tensor]] = {}  # per layer*2 (k, v): [len, heads, D]

    def step(self, work: dict[str, int]) -> None:
        seqs, new = [], {}
        for name, count in work.items():
            table = self.tables.setdefault(name, [])
            raw = self.raw.setdefault(name, [torch.empty(0, 2, 16)] * (2 * SPEC.num_layers))
            start = raw[0].shape[0]
            while len(table) * BLOCK < start + count:
                table.append(self.free.pop())
            if name not in self.windows:
                self.windows[name] = [self.free.pop() for _ in range(3 * LEND)]
            seqs.append((table, start, start + count, self.windows[name]))
            new[name] = [torch.randn(count, 2, 16, generator=self.gen) for _ in raw]
        self.store.begin_pass(seqs)
        for layer in range(SPEC.num_layers):
            k = torch.cat([new[n][2 * layer] for n in work])
            v = torch.cat([new[n][2 * layer + 1] for n in work])
            self.store.write(layer, torch.zeros(0, dtype=torch.long), k, v)
        for name in work:
            self.raw[name] = [torch.cat((a, b)) for a, b in zip(self.raw[name], new[name],
                                                                 strict=True)]  # fmt: skip

    def check(self, name: str) -> None:
        length = self.raw[name][0].shape[0]
        hot_from = max(0, (length - FMT.residual_tokens) // BLOCK)
        ids = torch.tensor(self.tables[name][: -(-length // BLOCK)])
        window = self.store.window
        assert {b for b in ids.tolist() if b in window.slots} == set(ids[hot_from:].tolist())
        for layer in range(SPEC.num_layers):
            for i, cache in enumerate(self.store.layer(layer)):
                want = expected_blocks(self.raw[name][2 * layer + i], length, hot_from, i == 0)
                got = cache.gather(ids)
                rows = torch.arange(ids.numel() * BLOCK).view(-1, BLOCK) < length
                torch.testing.assert_close(got[:, rows], want[:, rows], rtol=0, atol=0)


def test_hot_blocks_and_what_attention_reads_after_every_pass():
    sim = Sim()
    # A: a chunked prefill whose chunks end mid-block, then decode; B joins later
    plan = [{"A": 40}, {"A": 52}, {"A": 4, "B": 28}, {"A": 1, "B": 1}, {"A": 20, "B": 36}]
    plan += [{"A": 1, "B": 1}] * 12
    for work in plan:
        sim.step(work)
        for name in work:
            sim.check(name)
    window = sim.store.window
    # A: 129 tokens, blocks from (129 - 24) // 16 = 6 stay hot (6, 7, 8); B: 77, from 3
    assert (sim.raw["A"][0].shape[0], sim.raw["B"][0].shape[0]) == (129, 77)
    assert sorted(window.slots) == sorted(sim.tables["A"][6:9] + sim.tables["B"][3:5])
    assert len(window.slots) <= 2 * recent_blocks(FMT.residual_tokens, BLOCK)
    # each hot block's slot is LEND of its own request's borrowed blocks, none shared
    for name, hot in (("A", sim.tables["A"][6:9]), ("B", sim.tables["B"][3:5])):
        lent = [b for h in hot for b in window.slots[h]]
        assert len(lent) == len(set(lent)) == LEND * len(hot)
        assert set(lent) <= set(sim.windows[name])


def test_a_prefill_longer_than_the_window_commits_its_blocks_in_the_same_pass():
    sim = Sim()
    sim.step({"A": 148})  # 10 blocks: 0..6 committed at once, 7..9 hot
    sim.check("A")
    assert sorted(sim.store.window.slots) == sorted(sim.tables["A"][7:10])
    assert sim.store.window.plan.commit_ids.tolist() == sim.tables["A"][:7]


def test_a_hot_block_two_requests_share_is_committed_once():
    sim = Sim()
    sim.step({"A": 32})  # blocks 0 and 1, both hot
    # B adopts A's block 0 (a prefix-cache hit) with the same 16 tokens
    sim.tables["B"] = sim.tables["A"][:1]
    sim.raw["B"] = [r[:16] for r in sim.raw["A"]]
    sim.step({"A": 24, "B": 24})  # block 0 leaves both windows in the same pass
    assert sim.store.window.plan.commit_ids.tolist() == sim.tables["A"][:2]
    sim.check("A")
    sim.check("B")


def test_retire_commits_whole_hot_blocks_and_drops_the_partial_one():
    sim = Sim()
    sim.step({"A": 56})  # blocks 0..3: 0, 1 cold, 2, 3 hot (3 partial)
    table = sim.tables["A"]
    sim.store.retire(table, 56)
    assert sim.store.window.slots == {}
    assert sim.store.window.lent_of.max().item() == -1
    ids = torch.tensor(table[:3])
    # the whole blocks now read back quantized, exactly as a commit makes them
    want = expected_blocks(sim.raw["A"][0], 48, 3, key=True)
    torch.testing.assert_close(sim.store.k[0].gather(ids), want, rtol=0, atol=0)


def test_read_blocks_of_a_hot_block_are_its_committed_bytes():
    sim = Sim()
    sim.step({"A": 32})  # blocks 0, 1 whole and hot
    block = sim.tables["A"][0]
    early = sim.store.read_blocks([block])
    sim.step({"A": 24})  # now block 0 leaves the window and is committed
    assert block not in sim.store.window.slots
    assert torch.equal(sim.store.read_blocks([block]), early)


def test_swap_out_and_in_keeps_the_recent_tokens_exact():
    sim = Sim()
    sim.step({"A": 52})
    sim.step({"A": 1})
    table = sim.tables["A"]
    before = [c.gather(torch.tensor(table)) for layer in range(2) for c in sim.store.layer(layer)]
    swapped = sim.store.swap_out(table)
    assert sim.store.window.slots == {}
    new_ids = [100, 101, 102, 103]
    window = sim.windows["A"] = list(range(20, 20 + 3 * LEND))  # borrowed anew
    sim.store.swap_in(new_ids, swapped, window)
    # (53 - 24) // 16 = 1: blocks 1, 2, 3, each in LEND of the new window's blocks
    assert sorted(sim.store.window.slots) == [101, 102, 103]
    assert {b for s in sim.store.window.slots.values() for b in s} == set(window)
    after = [c.gather(torch.tensor(new_ids)) for layer in range(2) for c in sim.store.layer(layer)]
    rows = torch.arange(64).view(4, 16) < 53
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a[:, rows], b[:, rows], rtol=0, atol=0)
    sim.tables["A"] = new_ids  # goes on from the new blocks
    sim.step({"A": 1})
    sim.check("A")


def test_store_bytes_equal_the_planner_for_blocks_and_windows():
    fmt = KV_FORMATS["int2"]
    store = KVStore(SPEC, fmt, 40, 64, "cpu")
    assert store.bytes_per_token == bytes_per_token(SPEC, fmt, 64)
    assert store.bytes_allocated == 40 * bytes_per_block(SPEC, fmt, 64)  # nothing beside
    # 2 recent blocks of 64 fp32 tokens, each in the codes of 16 borrowed blocks (a head's
    # 64 x 4 B hold 4 rows of 16 fp32 channels)
    assert window_blocks(SPEC, fmt, 64) == 2 * 16
    plan = plan_kv(SPEC, context=256, kv_dtype="int2")
    assert plan.block_size == 64 and plan.window_blocks_per_request == 32
    assert plan.bytes_per_request == (4 + 32) * plan.bytes_per_block
    # a pool must hold one request's window and a block; the error names both
    with pytest.raises(KVForgeError, match=r"holds 32 KV blocks of 64 tokens .* it needs one and "
                       r"the 32 a running request borrows for its recent window"):  # fmt: skip
        pool_size(SPEC, fmt, 64, 32 * plan.bytes_per_block, 256)
    assert pool_size(SPEC, fmt, 64, 33 * plan.bytes_per_block, 256) == 33


def test_a_block_too_small_to_hold_a_recent_token_is_refused_by_name():
    with pytest.raises(KVForgeError, match="a block of 4 tokens cannot hold one; use a block "
                       "size of at least 16"):  # fmt: skip
        window_blocks(SPEC, KV_FORMATS["int2"], 4)
    with pytest.raises(KVForgeError, match="at least 16"):
        LLM(model="random", device="cpu", kv_memory="8MiB", kv_dtype="int2", block_size=8)


# --- through the engine ----------------------------------------------------------------

PARAMS = SamplingParams(max_tokens=24, ignore_eos=True)
LONG = ["The quick brown fox jumps over the lazy dog. " * 6, "abc" * 40]


@pytest.fixture(scope="module")
def reference():
    llm = LLM(model="random", device="cpu", kv_memory="8MiB", enable_prefix_caching=False)
    return {p: llm.generate([p], PARAMS)[0].token_ids for p in [*LONG, "Hello"]}


def test_a_request_inside_the_window_is_exact(reference):
    llm = LLM(model="random", device="cpu", kv_memory="8MiB", kv_dtype="int2")
    out = llm.generate(["Hello"], SamplingParams(max_tokens=24, ignore_eos=True))[0]
    # 6 prompt tokens + 24: every token is in a hot block, read in full precision
    assert out.token_ids == reference["Hello"]


def test_int2_generates_through_the_engine(reference):
    llm = LLM(
        model="random", device="cpu", kv_memory="8MiB", kv_dtype="int2", enable_prefix_caching=False
    )
    stats = llm.kv_stats()
    store = llm.engine.store
    assert stats["block_size"] == 64
    assert stats["bytes_per_token"] == bytes_per_token(store.spec, store.format, 64) == 176
    # all 8 MiB are blocks; a running request borrows 32 for its window (2 blocks of 64 fp32
    # tokens, each in the codes of 16 blocks: a head's 64 x 8 B hold 4 rows of 32 channels)
    assert stats["blocks_total"] == 8 * 2**20 // (176 * 64) and stats["max_num_seqs"] == 256
    assert stats["window_blocks_per_request"] == 32
    seen = []
    llm.engine.runner.logits_hook = lambda requests, logits: seen.append(llm.kv_stats())
    outs = llm.generate(LONG, PARAMS)
    # while both ran, each held its blocks and its 32 borrowed ones
    assert seen[0]["blocks_window"] == 64
    assert seen[0]["blocks_used"] == 64 + sum(-(-len(p) // 64) for p in map(
        llm.engine.tokenizer.encode, LONG))  # fmt: skip
    assert llm.kv_stats()["blocks_window"] == 0
    agree = sum(a == b for o, p in zip(outs, LONG, strict=True)
                for a, b in zip(o.token_ids, reference[p], strict=True))  # fmt: skip
    assert agree >= 0.6 * 2 * 24
    alone = [llm.generate([p], PARAMS)[0].token_ids for p in LONG]
    assert alone == [o.token_ids for o in outs]  # batched == one by one
    assert store.window.slots == {}  # every finished request gave its window back
    llm.engine.pool.check_integrity()


def test_chunked_prefill_and_recompute_preemption_with_int2():
    prompts = ["abc" * 60 + str(i) for i in range(3)]  # 182 tokens: 3 blocks of 64
    params = SamplingParams(max_tokens=80, ignore_eos=True)
    # 3 requests of 5 blocks (the first 2 shared through the prefix cache), each borrowing 32
    # while it runs: 71 blocks hold two until they grow to their last block
    tight = LLM(model="random", device="cpu", num_blocks=71, kv_dtype="int2",
                max_num_batched_tokens=48, max_num_seqs=3)  # fmt: skip
    outs = tight.generate(prompts, params)
    assert all(len(o.token_ids) == 80 for o in outs)
    assert tight.kv_stats()["num_preemptions"] > 0
    assert tight.engine.store.window.slots == {}
    tight.engine.pool.check_integrity()


def test_borrowed_blocks_that_held_other_bytes_give_the_same_tokens(reference):
    """A window's rows are a borrowed block's packed codes: whatever they held before (here
    every byte 0xFF, a NaN as fp32) must not reach attention or a partial block's commit."""
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    clean = LLM(model="random", device="cpu", kv_memory="8MiB", kv_dtype="int2",
                enable_prefix_caching=False)  # fmt: skip
    expected = [o.token_ids for o in clean.generate(LONG, params)]
    dirty = LLM(model="random", device="cpu", kv_memory="8MiB", kv_dtype="int2",
                enable_prefix_caching=False)  # fmt: skip
    for cache in dirty.engine.store.caches:
        cache.parts["q"].fill_(0xFF)
    assert [o.token_ids for o in dirty.generate(LONG, params)] == expected


def test_swap_preemption_with_int2_gives_the_roomy_tokens():
    prompts = ["abc" * 60 + str(i) for i in range(3)]
    params = SamplingParams(max_tokens=80, ignore_eos=True)
    roomy = LLM(model="random", device="cpu", kv_memory="8MiB", kv_dtype="int2",
                enable_prefix_caching=False, max_num_seqs=3)  # fmt: skip
    tight = LLM(model="random", device="cpu", num_blocks=72, kv_dtype="int2",
                preemption_mode="swap", enable_prefix_caching=False, max_num_seqs=3)  # fmt: skip
    assert [o.token_ids for o in tight.generate(prompts, params)] == [
        o.token_ids for o in roomy.generate(prompts, params)
    ]
    assert tight.kv_stats()["num_preemptions"] > 0
    assert tight.engine.store.window.slots == {}


def test_int2_blocks_are_cached_and_move_packed_through_the_disk_tier(tmp_path):
    prompt = LONG[0] * 2  # 541 tokens: 8 whole blocks
    first = LLM(
        model="random",
        device="cpu",
        kv_memory="8MiB",
        kv_dtype="int2",
        disk_cache_dir=str(tmp_path),
    )
    first.generate([prompt], PARAMS)
    hit = first.generate([prompt], PARAMS)[0]
    assert hit.metrics.cached_tokens == 512
    files = list(tmp_path.glob("*.kvblock"))
    assert len(files) == 8
    assert files[0].stat().st_size < first.engine.store.block_shape[0] + 400
    again = LLM(
        model="random",
        device="cpu",
        kv_memory="8MiB",
        kv_dtype="int2",
        disk_cache_dir=str(tmp_path),
    )
    out = again.generate([prompt], PARAMS)[0]
    assert out.metrics.cached_tokens_disk == 512
    assert out.token_ids == hit.token_ids  # the same packed blocks, read the same way


def test_a_pool_too_small_for_a_window_and_a_block_is_named():
    block = 176 * 64
    with pytest.raises(KVForgeError, match=r"holds 32 KV blocks of 64 tokens .* it needs one and "
                       r"the 32 a running request borrows"):  # fmt: skip
        LLM(model="random", device="cpu", kv_memory=32 * block + 1000, kv_dtype="int2")
    with pytest.raises(KVForgeError, match=r"num_blocks=32 is too few for int2: a running request "
                       r"borrows 32 blocks .* use num_blocks >= 33"):  # fmt: skip
        LLM(model="random", device="cpu", num_blocks=32, kv_dtype="int2")
    llm = LLM(model="random", device="cpu", num_blocks=33, kv_dtype="int2")
    # one block of tokens is all a request can have beside its window
    assert llm.engine.max_request_tokens == 64
    long, short = SamplingParams(max_tokens=20), SamplingParams(max_tokens=8, ignore_eos=True)
    outs = llm.generate([[5] * 60, [5] * 40], [long, short])
    assert outs[0].error == (
        "prompt (60 tokens) + max_tokens (20) needs 2 KV blocks of 64 tokens (and 32 borrowed "
        "for its recent window); the pool has 33 (2112 tokens): raise kv_memory or num_blocks"
    )
    assert len(outs[1].token_ids) == 8


def test_int2_quantizes_keys_per_channel_and_values_per_token():
    """An outlier channel (as keys have) spoils only itself under the key codec, whose
    scales are per channel over the block; the value codec's per-token groups share one
    scale across channels, so there the outlier blurs every other channel."""
    k, v = get_codecs("int2", 64)
    gen = torch.Generator().manual_seed(0)
    block = torch.randn(1, 64, 64, generator=gen)  # [blocks, tokens, channels]
    block[..., 0] *= 100
    key_error = (k.decode(k.encode(block)) - block)[..., 1:].abs().mean()
    value_error = (v.decode(v.encode(block)) - block)[..., 1:].abs().mean()
    assert value_error > 4 * key_error  # 2.3 against 0.38 here
    k8, v8 = get_codecs("int8", 64)
    assert k8 is v8
