"""int2 (KIVI-style): 2-bit packing, keys per channel per block, values per token, and the
recent full-precision window — which blocks are hot after every pass, what attention reads,
commits, swaps, retirement, and generation through the engine."""

import dataclasses

import pytest
import torch

from kvforge import LLM, SamplingParams
from kvforge.config import ModelSpec
from kvforge.kvcache.codecs import Int2KeyCodec, Int2ValueCodec, get_codecs, pack, unpack
from kvforge.kvcache.formats import KV_FORMATS, recent_blocks
from kvforge.kvcache.store import KVStore
from kvforge.planner import bytes_per_token, plan_kv, residual_bytes

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
FMT = dataclasses.replace(KV_FORMATS["int2"], residual_tokens=6)  # 3 recent blocks of 4
BLOCK = 4


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

    def __init__(self, num_blocks=40, max_running=2):
        self.store = KVStore(SPEC, FMT, num_blocks, BLOCK, "cpu", max_running)
        self.free = list(range(num_blocks - 1, -1, -1))
        self.gen = torch.Generator().manual_seed(0)
        self.tables: dict[str, list[int]] = {}
        self.raw: dict[str, list[torch.Tensor]] = {}  # per layer*2 (k, v): [len, heads, D]

    def step(self, work: dict[str, int]) -> None:
        seqs, new = [], {}
        for name, count in work.items():
            table = self.tables.setdefault(name, [])
            raw = self.raw.setdefault(name, [torch.empty(0, 2, 16)] * (2 * SPEC.num_layers))
            start = raw[0].shape[0]
            while len(table) * BLOCK < start + count:
                table.append(self.free.pop())
            seqs.append((table, start, start + count))
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
    plan = [{"A": 10}, {"A": 13}, {"A": 1, "B": 7}, {"A": 1, "B": 1}, {"A": 5, "B": 9}]
    plan += [{"A": 1, "B": 1}] * 12
    for work in plan:
        sim.step(work)
        for name in work:
            sim.check(name)
    window = sim.store.window
    # A: 42 tokens, blocks from (42 - 6) // 4 = 9 stay hot (9, 10); B: 29 tokens, from 5
    assert (sim.raw["A"][0].shape[0], sim.raw["B"][0].shape[0]) == (42, 29)
    assert sorted(window.slots) == sorted(sim.tables["A"][9:11] + sim.tables["B"][5:8])
    assert len(window.slots) <= 2 * recent_blocks(FMT.residual_tokens, BLOCK)


def test_a_prefill_longer_than_the_window_commits_its_blocks_in_the_same_pass():
    sim = Sim()
    sim.step({"A": 37})  # 10 blocks: 0..6 committed at once, 7..9 hot
    sim.check("A")
    assert sorted(sim.store.window.slots) == sorted(sim.tables["A"][7:10])
    assert sim.store.window.plan.commit_ids.tolist() == sim.tables["A"][:7]


def test_a_hot_block_two_requests_share_is_committed_once():
    sim = Sim()
    sim.step({"A": 8})  # blocks 0 and 1, both hot
    # B adopts A's block 0 (a prefix-cache hit) with the same 4 tokens
    sim.tables["B"] = sim.tables["A"][:1]
    sim.raw["B"] = [r[:4] for r in sim.raw["A"]]
    sim.step({"A": 6, "B": 6})  # block 0 leaves both windows in the same pass
    assert sim.store.window.plan.commit_ids.tolist() == sim.tables["A"][:2]
    sim.check("A")
    sim.check("B")


def test_retire_commits_whole_hot_blocks_and_drops_the_partial_one():
    sim = Sim()
    sim.step({"A": 14})  # blocks 0..3: 0 cold, 1..3 hot (3 partial)
    table = sim.tables["A"]
    sim.store.retire(table, 14)
    assert sim.store.window.slots == {}
    assert sim.store.window.slot_of.max().item() == -1
    ids = torch.tensor(table[:3])
    # the whole blocks now read back quantized, exactly as a commit makes them
    want = expected_blocks(sim.raw["A"][0], 12, 3, key=True)
    torch.testing.assert_close(sim.store.k[0].gather(ids), want, rtol=0, atol=0)


def test_read_blocks_of_a_hot_block_are_its_committed_bytes():
    sim = Sim()
    sim.step({"A": 8})  # blocks 0, 1 whole and hot
    block = sim.tables["A"][0]
    early = sim.store.read_blocks([block])
    sim.step({"A": 6})  # now block 0 leaves the window and is committed
    assert block not in sim.store.window.slots
    assert torch.equal(sim.store.read_blocks([block]), early)


def test_swap_out_and_in_keeps_the_recent_tokens_exact():
    sim = Sim()
    sim.step({"A": 13})
    sim.step({"A": 1})
    table = sim.tables["A"]
    before = [c.gather(torch.tensor(table)) for layer in range(2) for c in sim.store.layer(layer)]
    swapped = sim.store.swap_out(table)
    assert sim.store.window.slots == {}
    new_ids = [30, 31, 32, 33]
    sim.store.swap_in(new_ids, swapped)
    assert sorted(sim.store.window.slots) == [32, 33]  # (14 - 6) // 4 = 2: blocks 2, 3
    after = [c.gather(torch.tensor(new_ids)) for layer in range(2) for c in sim.store.layer(layer)]
    rows = torch.arange(16).view(4, 4) < 14
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a[:, rows], b[:, rows], rtol=0, atol=0)
    sim.tables["A"] = new_ids  # goes on from the new blocks
    sim.step({"A": 1})
    sim.check("A")


def test_store_bytes_equal_the_planner_for_blocks_and_windows():
    store = KVStore(SPEC, KV_FORMATS["int2"], 10, 64, "cpu", max_running=3)
    assert store.bytes_per_token == bytes_per_token(SPEC, KV_FORMATS["int2"], 64)
    # 2 recent blocks of 64 fp32 tokens per running request
    assert residual_bytes(SPEC, KV_FORMATS["int2"], 64) == 2 * 64 * 2 * 2 * 2 * 16 * 4
    assert store.recent_bytes_allocated == 3 * residual_bytes(SPEC, KV_FORMATS["int2"], 64)
    plan = plan_kv(SPEC, context=256, kv_dtype="int2")
    assert plan.block_size == 64 and plan.residual_bytes_per_request == 65_536
    assert plan.bytes_per_request == 4 * plan.bytes_per_block + 65_536


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
    # 8 MiB / 4 over 256 KiB windows (2 blocks of 64 fp32 tokens of 2 KiB): 8 requests
    assert stats["max_num_seqs"] == 8 and stats["recent_window_bytes"] == 8 * 262_144
    outs = llm.generate(LONG, PARAMS)
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
    tight = LLM(model="random", device="cpu", num_blocks=9, kv_dtype="int2",
                max_num_batched_tokens=48, max_num_seqs=3)  # fmt: skip
    outs = tight.generate(prompts, params)
    assert all(len(o.token_ids) == 80 for o in outs)
    assert tight.kv_stats()["num_preemptions"] > 0
    assert tight.engine.store.window.slots == {}
    tight.engine.pool.check_integrity()


def test_swap_preemption_with_int2_gives_the_roomy_tokens():
    prompts = ["abc" * 60 + str(i) for i in range(3)]
    params = SamplingParams(max_tokens=80, ignore_eos=True)
    roomy = LLM(model="random", device="cpu", kv_memory="8MiB", kv_dtype="int2",
                enable_prefix_caching=False, max_num_seqs=3)  # fmt: skip
    tight = LLM(model="random", device="cpu", num_blocks=9, kv_dtype="int2", preemption_mode="swap",
                enable_prefix_caching=False, max_num_seqs=3)  # fmt: skip
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


def test_the_window_share_caps_running_requests_and_is_named_when_memory_is_short():
    from kvforge.errors import KVForgeError

    llm = LLM(model="random", device="cpu", kv_memory="8MiB", kv_dtype="int2", max_num_seqs=2)
    assert llm.kv_stats()["max_num_seqs"] == 2
    assert llm.kv_stats()["recent_window_bytes"] == 2 * 262_144
    with pytest.raises(KVForgeError, match="holds no KV block after 262,144 B of recent windows"):
        LLM(model="random", device="cpu", kv_memory=262_144 + 1000, kv_dtype="int2", max_num_seqs=1)


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
