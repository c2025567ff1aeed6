"""Eviction policies: exact kept indices, exact compaction (block ids and contents),
the attention gathered for them, and the engine under a budget."""

import pytest
import torch

from kvforge import LLM, SamplingParams
from kvforge.attention import AttentionMetadata, paged_attention
from kvforge.attention.metadata import ScoreCollector
from kvforge.cli import main
from kvforge.config import ModelSpec
from kvforge.engine.request import Request, RequestMetrics
from kvforge.engine.runner import ModelRunner
from kvforge.errors import KVForgeError
from kvforge.kvcache.block_ops import MoveTokens
from kvforge.kvcache.block_table import BlockTable
from kvforge.kvcache.formats import KV_FORMATS
from kvforge.kvcache.manager import KVCacheManager
from kvforge.kvcache.plain_cache import PlainCache
from kvforge.kvcache.policy import (
    H2O,
    PolicyState,
    Sliding,
    SnapKV,
    Streaming,
    make_policy,
    pool_votes,
    whole_blocks,
)
from kvforge.kvcache.store import KVStore

# --- which tokens each policy keeps -------------------------------------------------------


def test_sliding_keeps_the_most_recent():
    assert Sliding(8).select(PolicyState(), 20) == list(range(12, 20))
    assert Sliding(8).select(PolicyState(), 5) == [0, 1, 2, 3, 4]


def test_streaming_keeps_sinks_and_the_most_recent():
    assert Streaming(8).select(PolicyState(), 20) == [0, 1, 2, 3, 16, 17, 18, 19]
    assert Streaming(8, sinks=2).select(PolicyState(), 20) == [0, 1, 14, 15, 16, 17, 18, 19]
    with pytest.raises(KVForgeError, match="streaming keeps 4 sink tokens: kv_budget must"):
        Streaming(4)


def test_h2o_keeps_heavy_hitters_and_a_recent_window():
    scores = torch.full((20,), 0.1)
    scores[[2, 5, 9, 11]] = torch.tensor([3.0, 1.0, 2.0, 0.5])
    scores[17] = 9.0  # recent anyway: not counted twice
    # budget 8: the last 4 (recent half) and the 4 heaviest of the 16 older tokens
    assert H2O(8).select(PolicyState(scores=scores), 20) == [2, 5, 9, 11, 16, 17, 18, 19]
    # 2 heavy hitters with recent 6
    assert H2O(8, recent=6).select(PolicyState(scores=scores), 20) == [
        2, 9, 14, 15, 16, 17, 18, 19
    ]  # fmt: skip
    # equal scores: the later token stays
    assert H2O(6).select(PolicyState(scores=torch.ones(12)), 12) == [6, 7, 8, 9, 10, 11]


def test_snapkv_pools_votes_and_keeps_the_window():
    votes = torch.zeros(2, 12)
    votes[0, 3] = 1.0  # head 0 wants token 3 (and, pooled, its neighbours)
    votes[1, 8] = 0.5
    pooled = pool_votes(votes, 3)
    assert pooled[0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]
    assert pooled[1].tolist() == [0, 0, 0, 0, 0, 0, 0, 0.5, 0.5, 0.5, 0, 0]
    state = PolicyState(scores=pooled.sum(0))
    # budget 7, window 4: the 3 best voted of tokens 0..7 (2, 3, 4 beat 7) + 8..11
    assert SnapKV(7, observation_window=4).select(state, 12) == [2, 3, 4, 8, 9, 10, 11]
    assert SnapKV(7).wants_scores(state, True) == "window"
    assert SnapKV(7).wants_scores(state, False) is None


def test_compaction_triggers():
    state = PolicyState()
    assert not Sliding(8).compact_now(state, 11, 4, False)
    assert Sliding(8).compact_now(state, 12, 4, False)  # budget + one block
    # snapkv: once the prompt is done (over budget), then at budget + one block
    assert SnapKV(8).compact_now(state, 9, 4, True)
    assert not SnapKV(8).compact_now(PolicyState(prefilled=True), 11, 4, False)
    assert SnapKV(8).compact_now(PolicyState(prefilled=True), 12, 4, False)


def test_make_policy_errors_name_the_choices():
    assert make_policy(None, None) is None
    with pytest.raises(KVForgeError, match="unknown kv_policy 'lru'; choose one of sliding, "
                       "streaming, h2o, snapkv"):  # fmt: skip
        make_policy("lru", 8)
    with pytest.raises(KVForgeError, match="kv_policy 'h2o' needs kv_budget"):
        make_policy("h2o", None)
    with pytest.raises(KVForgeError, match="kv_budget needs a kv_policy"):
        make_policy(None, 8)
    with pytest.raises(KVForgeError, match="kv_budget must be a positive integer, got 0"):
        make_policy("sliding", 0)
    own = Streaming(64, sinks=8, positions="original")
    assert make_policy(own, None) is own and make_policy(own, 64) is own
    with pytest.raises(KVForgeError, match="kv_budget 32 disagrees with the policy's \\(64\\)"):
        make_policy(own, 32)
    with pytest.raises(KVForgeError, match="streaming positions must be 'cache' or 'original'"):
        Streaming(64, positions="absolute")


def test_only_streaming_sinks_move_and_only_in_cache_positions():
    assert Streaming(64).moved == 4 and Streaming(64, sinks=2).moved == 2
    assert Streaming(64, positions="original").moved == 0
    assert Sliding(64).moved == H2O(64).moved == SnapKV(64).moved == 0


# --- RoPE past the tables, and keys moved to another position -----------------------------


def _rotary(max_positions=32, head_dim=8):
    from kvforge.models.llama import ModelConfig
    from kvforge.models.rope import RotaryEmbedding

    spec = ModelSpec(name="r", architecture="llama", num_layers=1, num_attention_heads=1,
                     num_kv_heads=1, head_dim=head_dim, hidden_size=head_dim,
                     max_position_embeddings=max_positions, dtype="fp32", vocab_size=16,
                     intermediate_size=16)  # fmt: skip
    return RotaryEmbedding(ModelConfig(spec=spec, rope_theta=10000.0))


def test_rope_past_its_tables_is_computed_exactly_and_the_tables_do_not_grow():
    rope = _rotary()
    positions = torch.tensor([3, 31, 32, 1000, 5_000_000])
    cos, sin = rope(positions)
    assert rope.cos.shape == (32, 4)  # no table growth
    assert torch.equal(cos[:2], rope.cos[[3, 31]]) and torch.equal(sin[:2], rope.sin[[3, 31]])
    exact = positions[2:, None].double() * rope.inv_freq.double()
    torch.testing.assert_close(cos[2:], exact.cos().float(), rtol=0, atol=1e-7)
    torch.testing.assert_close(sin[2:], exact.sin().float(), rtol=0, atol=1e-7)


def test_shifting_a_key_equals_computing_it_later():
    from kvforge.models.rope import apply_rope

    rope = _rotary()
    k = torch.randn(5, 2, 8, generator=torch.Generator().manual_seed(0))  # [T, heads, D]
    at = torch.tensor([0, 1, 2, 3, 4])
    cos, sin = rope(at)
    cos2, sin2 = rope(at + 977)
    computed_later = apply_rope(k, cos2[:, None], sin2[:, None])
    moved = rope.shift(apply_rope(k, cos[:, None], sin[:, None]), 977)
    torch.testing.assert_close(moved, computed_later, rtol=0, atol=1e-5)
    back = rope.shift(moved, -977)  # and back
    torch.testing.assert_close(back, apply_rope(k, cos[:, None], sin[:, None]), rtol=0, atol=1e-5)


# --- compaction: exact block ids and contents ---------------------------------------------

SPEC = ModelSpec(name="tiny", architecture="llama", num_layers=2, num_attention_heads=4,
                 num_kv_heads=2, head_dim=8, hidden_size=32, max_position_embeddings=256,
                 dtype="fp32")  # fmt: skip
BLOCK = 4


def _setup(fmt="fp32", num_blocks=12):
    """A store, the manager of its blocks, and a compaction that runs the manager's
    operations on the store as the engine's runner does: (done, tokens moved)."""
    store = KVStore(SPEC, KV_FORMATS[fmt], num_blocks, BLOCK)
    manager = KVCacheManager(num_blocks, BLOCK, token_moves=store.token_moves)
    runner = ModelRunner(None, store, torch.device("cpu"))

    def compact(r, keep, rewritten=0):
        done = manager.compact(r, keep, rewritten)
        ops = manager.take_ops()
        runner.execute(ops)
        return done, sum(len(op.src_slots) for op in ops if isinstance(op, MoveTokens))

    return store, manager.pool, compact


def _request(pool, tokens: int) -> Request:
    r = Request(request_id="r", prompt=None, prompt_token_ids=list(range(tokens)),
                params=SamplingParams(max_tokens=8), block_table=BlockTable(BLOCK),
                metrics=RequestMetrics(arrival_s=0.0), eos_token_ids=frozenset())  # fmt: skip
    r.block_table.append_tokens(tokens, pool.allocate(-(-tokens // BLOCK)))
    r.num_computed_tokens = tokens
    r.cache_seed = b"seed"
    return r


def _fill(store, r):
    """Token t's K (every layer, head, channel) = t + 1 and its V = -(t + 1), as stored."""
    for layer in range(SPEC.num_layers):
        for t in range(r.num_kv_tokens):
            value = torch.full((1, SPEC.num_kv_heads, SPEC.head_dim), float(t + 1))
            slot = torch.tensor([r.block_table.slot(t)])
            store.write(layer, slot, value, -value)


def _read(store, r, layer=0, head=0):
    """What the cache holds for the request, in cache order (K channel 0)."""
    k = store.k[layer].data.view(SPEC.num_kv_heads, -1, SPEC.head_dim)
    return [k[head, r.block_table.slot(t), 0].item() for t in range(r.block_table.num_tokens)]


def test_compaction_moves_kept_tokens_to_the_front_and_frees_blocks():
    store, pool, compact = _setup()
    r = _request(pool, 22)  # 6 blocks, 22 tokens
    old = list(r.block_table.block_ids)
    _fill(store, r)
    keep = [0, 1, 2, 3, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]  # streaming-like: 4 sinks
    done, moves = compact(r, keep)
    assert done
    # tokens 0-3, 12-15 and 16-19 are old blocks 0, 3 and 4 whole, and tokens 20-21 the
    # partial last block 5: all taken as they are, nothing copied
    assert r.block_table.block_ids == [old[0], old[3], old[4], old[5]]
    assert r.block_table.num_tokens == 14 and r.num_dropped == 8 and r.num_kv_tokens == 14
    assert _read(store, r) == [t + 1.0 for t in keep]
    v = store.v[1].data.view(SPEC.num_kv_heads, -1, SPEC.head_dim)
    assert [v[1, r.block_table.slot(i), 7].item() for i in range(14)] == [-(t + 1.0) for t in keep]
    assert moves == 0
    assert r.cache_seed is None  # a pruned request publishes nothing more
    pool.check_integrity()
    assert pool.num_free == 12 - 4


def test_compaction_never_writes_a_shared_or_cached_block():
    store, pool, compact = _setup()
    r = _request(pool, 12)  # 3 blocks
    old = list(r.block_table.block_ids)
    _fill(store, r)
    pool.cache(old[0], b"k0")  # the first block is in the prefix cache
    before = store.read_blocks([old[0]])
    assert compact(r, [0, 1, 5, 6, 7, 9, 10, 11])[0]  # nothing whole: every block written
    assert old[0] not in r.block_table.block_ids  # the cached block is left as it was
    assert torch.equal(store.read_blocks([old[0]]), before)
    assert r.block_table.block_ids[1] == old[1]  # own, uncached, unshared: written in place
    assert _read(store, r) == [1.0, 2.0, 6.0, 7.0, 8.0, 10.0, 11.0, 12.0]
    pool.check_integrity()
    assert pool.ref_count(old[0]) == 0 and pool.lookup(b"k0") == old[0]  # cached, free


def test_tokens_to_be_rewritten_never_stay_in_a_cached_block():
    store, pool, compact = _setup()
    r = _request(pool, 12)  # 3 blocks
    old = list(r.block_table.block_ids)
    _fill(store, r)
    pool.cache(old[0], b"k0")  # the sinks' block is in the prefix cache
    before = store.read_blocks([old[0]])
    # tokens 0-3 are old block 0 whole, but the first 4 kept will be rewritten (moved
    # sinks): they go to a fresh block; tokens 8-11 are old block 2 whole, taken as is
    done, moves = compact(r, [0, 1, 2, 3, 8, 9, 10, 11], rewritten=4)
    assert done
    assert r.block_table.block_ids[0] not in old and r.block_table.block_ids[1] == old[2]
    assert moves == 4 and _read(store, r) == [1.0, 2.0, 3.0, 4.0, 9.0, 10.0, 11.0, 12.0]
    assert torch.equal(store.read_blocks([old[0]]), before)
    pool.check_integrity()
    # without rewriting, the same block is taken as it is
    store, pool, compact = _setup()
    r = _request(pool, 12)
    old = list(r.block_table.block_ids)
    assert compact(r, [0, 1, 2, 3, 8, 9, 10, 11]) == (True, 0)
    assert r.block_table.block_ids == [old[0], old[2]]


def test_compaction_of_quantized_tokens_copies_their_codes():
    store, pool, compact = _setup("fp8")
    r = _request(pool, 10)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, SPEC.num_kv_heads, SPEC.head_dim, generator=gen)
    slots = torch.tensor([r.block_table.slot(t) for t in range(10)])
    store.write(0, slots, x, x)
    decoded_before = store.k[0].gather(torch.tensor(r.block_table.block_ids))
    flat = decoded_before.reshape(SPEC.num_kv_heads, -1, SPEC.head_dim)
    assert compact(r, [1, 4, 8, 9])[0]
    after = store.k[0].gather(torch.tensor(r.block_table.block_ids))
    assert torch.equal(after.reshape(SPEC.num_kv_heads, -1, SPEC.head_dim)[:, :4],
                       flat[:, [1, 4, 8, 9]])  # fmt: skip


# --- attention gathered inside the read ---------------------------------------------------


@pytest.mark.parametrize("tile_tokens", [512, 8])
def test_gathered_attention_equals_the_softmax(monkeypatch, tile_tokens):
    import kvforge.attention.paged as paged

    monkeypatch.setattr(paged, "TILE_TOKENS", tile_tokens)
    if tile_tokens == 8:
        monkeypatch.setattr(paged, "DECODE_TILE_BYTES", 0)
    gen = torch.Generator().manual_seed(1)
    kv_heads, heads, dim, bs = 2, 4, 8, 4
    k_cache = torch.randn(kv_heads, 16, bs, dim, generator=gen)
    v_cache = torch.randn(kv_heads, 16, bs, dim, generator=gen)
    # seq 0: decode at 13 keys; seq 1: a 5-token chunk after 10 cached (15 keys)
    tables = torch.tensor([[3, 7, 1, 9], [2, 5, 11, 4]])
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(6, dtype=torch.long), query_start_loc=(0, 1, 6),
        seq_lens=(13, 15), block_tables=tables, block_size=bs,
        collect=ScoreCollector(modes={0: "all", 1: "window"}, window={1: 2}),
    )  # fmt: skip
    q = torch.randn(6, heads, dim, generator=gen)
    paged_attention(q, PlainCache(k_cache), PlainCache(v_cache), meta, 0.5)

    def expected(seq, rows, seq_len):
        keys = k_cache[:, tables[seq]].reshape(kv_heads, -1, dim)[:, :seq_len]
        total = torch.zeros(kv_heads, seq_len)
        for row, pos in rows:
            for h in range(heads):
                g = h // (heads // kv_heads)
                s = (keys[g, : pos + 1] @ q[row, h]) * 0.5
                total[g, : pos + 1] += torch.softmax(s, -1)
        return total

    got = meta.collect.scores
    torch.testing.assert_close(got[0], expected(0, [(0, 12)], 13), rtol=1e-5, atol=1e-6)
    # "window" 2: only the chunk's last two queries (positions 13, 14) vote
    torch.testing.assert_close(got[1], expected(1, [(4, 13), (5, 14)], 15), rtol=1e-5,
                               atol=1e-6)  # fmt: skip


# --- the engine under a budget ------------------------------------------------------------

POLICY_NAMES = ["sliding", "streaming", "h2o", "snapkv"]


def _llm(**options):
    return LLM(model="random", device="cpu", kv_memory="2MiB", **options)


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_a_budget_above_the_sequence_changes_nothing(name):
    prompts = ["The cat sat on the mat. " * 3, "def f(x):\n    return x * 2\n" * 4]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain = [
        o.token_ids
        for o in _llm(max_num_batched_tokens=32, max_num_seqs=8).generate(prompts, params)
    ]
    llm = _llm(kv_policy=name, kv_budget=512, max_num_batched_tokens=32, max_num_seqs=8)
    assert [o.token_ids for o in llm.generate(prompts, params)] == plain


@pytest.mark.parametrize("name", POLICY_NAMES)
@pytest.mark.parametrize("kv_dtype", ["fp32", "int8", "fp8"])
def test_the_budget_holds_over_a_long_generation(name, kv_dtype):
    llm = _llm(kv_policy=name, kv_budget=48, kv_dtype=kv_dtype)
    outs = llm.generate(["Once upon a time", "x = [1, 2, 3]\n" * 20],
                        SamplingParams(max_tokens=100, ignore_eos=True))  # fmt: skip
    block = llm.engine.store.block_size
    prompt = len(outs[1].prompt_token_ids)
    assert prompt > 2 * 48 + block and [len(o.token_ids) for o in outs] == [100, 100]
    assert outs[0].metrics.peak_kv_tokens == 48 + block  # compacted at budget + one block
    if name == "snapkv":  # holds the whole prompt, then compresses it once
        assert outs[1].metrics.peak_kv_tokens == prompt
    else:  # reads the prompt in pieces of budget + block, compacting in between
        assert outs[1].metrics.peak_kv_tokens <= 2 * 48 + block
    llm.engine.pool.check_integrity()
    assert llm.engine.pool.num_free == llm.engine.pool.num_blocks


@pytest.mark.slow
def test_streaming_4096_tokens_within_budget_plus_a_block():
    llm = _llm(kv_policy="streaming", kv_budget=256)
    out = llm.generate(["Hello"], SamplingParams(max_tokens=4096, ignore_eos=True))[0]
    assert len(out.token_ids) == 4096
    assert out.metrics.peak_kv_tokens <= 256 + llm.engine.store.block_size


def test_a_policy_lets_a_request_run_past_the_context():
    llm = _llm(kv_policy="streaming", kv_budget=64)
    context = llm.engine.max_model_len
    prompt = [(7 * i) % 200 + 3 for i in range(context + 40)]  # read 80 tokens a pass
    out = llm.generate([prompt], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert out.error is None and len(out.token_ids) == 5
    assert out.metrics.peak_kv_tokens <= 2 * 64 + 16
    refused = _llm().generate([prompt], SamplingParams(max_tokens=5))[0]
    assert refused.finish_reason == "abort" and "exceeds the model's context" in refused.error
    snap = _llm(kv_policy="snapkv", kv_budget=64).generate([prompt], SamplingParams(max_tokens=5))
    assert "(snapkv reads a prompt whole)" in snap[0].error


@pytest.fixture(scope="module")
def one_layer(tmp_path_factory):
    """A one-layer Llama with sharp attention (weights drawn wider than usual): its cached
    K/V depend only on each token and its position, so a pruned cache can be compared with
    a fresh read of the kept tokens alone."""
    import transformers

    config = transformers.LlamaConfig(num_hidden_layers=1, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=211, max_position_embeddings=128,
                                      initializer_range=0.2)  # fmt: skip
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("one-layer")
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def _first_layer_keys(engine, tokens: list[int], first_position: int) -> torch.Tensor:
    """Layer 0's keys of `tokens` computed at positions first_position, first_position + 1,
    ...: [kv_heads, len(tokens), D] (in a one-layer model they depend on nothing else)."""
    from kvforge.models.rope import apply_rope

    model = engine.runner.model.model
    attention = model.layers[0].self_attn
    with torch.no_grad():
        qkv = attention._project(model.layers[0].input_layernorm(
            model.embed_tokens(torch.tensor(tokens))))  # fmt: skip
    heads, kv_heads, dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(len(tokens), kv_heads, dim)
    cos, sin = model.rotary_emb(torch.arange(len(tokens)) + first_position)
    return apply_rope(k, cos[:, None], sin[:, None]).transpose(0, 1)


def _held_when_predicting(n: int, budget: int, block: int, sinks: int = 4) -> list[list[int]]:
    """Which tokens streaming holds when token t's pass predicts token t + 1, one per pass."""
    held, out = [], []
    for t in range(n):
        held.append(t)
        out.append(list(held))
        if len(held) >= budget + block:
            held = held[:sinks] + held[-(budget - sinks) :]
    return out


@pytest.mark.parametrize(("kv_dtype", "atol"), [("fp32", 1e-5), ("fp16", 5e-3)])
def test_streaming_sees_its_cache_as_a_fresh_sequence(one_layer, kv_dtype, atol):
    # StreamingLLM numbers positions inside the cache: the model sees the sinks, then the
    # window, as one short sequence. With the sinks moved along, what the pruned cache
    # predicts equals a fresh read of the kept tokens alone; with their original
    # positions it does not. 300 tokens run past this model's context of 128.
    engine = LLM(model=one_layer, device="cpu", num_blocks=64, kv_dtype=kv_dtype).engine
    budget, block = 24, engine.store.block_size
    ids = torch.randint(0, 211, (300,), generator=torch.Generator().manual_seed(1)).tolist()
    held = _held_when_predicting(len(ids) - 1, budget, block)
    checked = [40, 50, 150, 250, 295]  # after 1, 1, 7, 14 and 16 moves

    def errors(positions):
        got = engine.score(ids, chunk_size=1, kv_policy=Streaming(budget, positions=positions))
        fresh = [engine.score([ids[j] for j in held[t]] + [ids[t + 1]])[-1] for t in checked]
        return [abs(float(got[t] - f)) for t, f in zip(checked, fresh, strict=True)]

    assert [len(held[t]) for t in checked] == [25, 35, 39, 27, 40]
    assert max(errors("cache")) < atol
    assert max(errors("original")) > 0.1  # the sinks drifted 256 positions away


def test_moved_sinks_are_encoded_once_from_their_first_keys(one_layer):
    # int8: each move re-encodes the sinks from their keys as first stored, rotated to the
    # new place, so after many moves they are as close to the exact keys as after one
    # (within two quantization steps), not drifting with every re-encoding.
    llm = LLM(model=one_layer, device="cpu", num_blocks=64, kv_dtype="int8",
              kv_policy=Streaming(24))  # fmt: skip
    engine, seen = llm.engine, []

    def record(requests, logits):
        r = requests[0]
        if r.num_dropped:
            slots = [r.block_table.slot(i) for i in range(4)]
            seen.append((r.num_dropped, engine.store.read_keys(slots)[0]))  # layer 0

    engine.runner.logits_hook = record
    prompt = [5, 17, 42, 9, 100, 3, 77, 8]
    llm.generate([prompt], SamplingParams(max_tokens=200, ignore_eos=True))
    moves = sorted({dropped for dropped, _ in seen})
    assert moves == list(range(16, 177, 16))  # 11 moves of 16 tokens (207 computed)
    for dropped, stored in seen:
        exact = _first_layer_keys(engine, prompt[:4], dropped)  # [kv_heads, 4, D]
        step = exact.abs().amax(-1, keepdim=True) / 127
        assert ((stored - exact).abs() <= 2 * step).all(), dropped


def test_whole_blocks_for_a_cache_whose_tokens_cannot_move():
    # streaming, budget 40, 70 held in blocks of 8: the sinks' block 0, the partial last
    # block 8 (64-69), and the 3 blocks (26 tokens of room) holding most kept tokens
    keep = Streaming(40).select(PolicyState(), 70)
    assert keep == [0, 1, 2, 3, *range(34, 70)]
    assert whole_blocks(keep, 70, 8, 40, pinned=4) == list(range(8)) + list(range(40, 70))
    # h2o-like: heavy hitters 1, 2 (block 0), 9 (block 1), 17-19 (block 2), recent 60-69;
    # budget 24: the last block (6 tokens) and 2 more: block 7 (4 kept), block 2 (3)
    keep = [1, 2, 9, 17, 18, 19, *range(60, 70)]
    assert whole_blocks(keep, 70, 8, 24) == list(range(16, 24)) + list(range(56, 70))


def test_int2_keeps_and_drops_whole_blocks():
    with pytest.raises(KVForgeError, match="kv_budget 64 is too small for kv_dtype 'int2': it "
                       "keeps whole blocks of 64 tokens and its 32 newest tokens in full "
                       "precision, so a policy needs kv_budget >= 160"):  # fmt: skip
        _llm(kv_policy="h2o", kv_budget=64, kv_dtype="int2")
    for name in POLICY_NAMES:
        llm = _llm(kv_policy=name, kv_budget=160, kv_dtype="int2")
        outs = llm.generate(["Once upon a time", "x = [1, 2, 3]\n" * 30],
                            SamplingParams(max_tokens=300, ignore_eos=True))  # fmt: skip
        prompt = len(outs[1].prompt_token_ids)
        assert [len(o.token_ids) for o in outs] == [300, 300] and prompt == 421
        assert outs[0].metrics.peak_kv_tokens == 160 + 64
        assert outs[1].metrics.peak_kv_tokens == (prompt if name == "snapkv" else 357)
        llm.engine.pool.check_integrity()
        assert llm.engine.pool.num_free == llm.engine.pool.num_blocks
        assert llm.engine.store.window.slots == {}  # every recent-window slot given back


def test_int2_moves_the_sinks_block_along(one_layer):
    # under int2 the sinks' whole first block moves: re-rotated from its keys as first
    # stored and encoded once more, its error against the keys computed at the new
    # positions stays near that of one 2-bit quantization, move after move; left where
    # it was, the block drifts away from them
    def errors(positions):
        """(tokens dropped, relative error of the stored sinks block) after each step."""
        llm = LLM(model=one_layer, device="cpu", num_blocks=64, kv_dtype="int2",
                  kv_rotation=False, kv_policy=Streaming(160, positions=positions))  # fmt: skip
        engine, seen = llm.engine, []

        def record(requests, logits):
            r = requests[0]
            slots = [r.block_table.slot(i) for i in range(64)]
            seen.append((r.num_dropped, engine.store.read_keys(slots)[0]))

        engine.runner.logits_hook = record
        prompt = list(range(3, 67))
        llm.generate([prompt], SamplingParams(max_tokens=400, ignore_eos=True))
        out = []
        for dropped, keys in seen:
            exact = _first_layer_keys(engine, prompt, dropped)
            out.append((dropped, float((keys - exact).norm() / exact.norm())))
        return out

    moved = errors("cache")
    assert sorted({d for d, _ in moved}) == [0, 64, 128, 192, 256]  # 4 moves of a block
    once = [e for d, e in moved if d == 0][-1]  # encoded once, at the first positions
    assert 0.2 < once < 0.6  # what 2 bits cost this sharp model's keys
    assert max(e for d, e in moved if d) < 1.5 * once
    stayed = errors("original")
    assert min(e for d, e in stayed if d) > 2 * once


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_under_a_policy(mode):
    # 7 blocks of 16: three running requests of 2 blocks each cannot all take a third
    prompts = [f"request {i}: hello" for i in range(3)]  # 17 tokens each
    params = SamplingParams(max_tokens=120, ignore_eos=True)
    roomy = _llm(kv_policy="sliding", kv_budget=32).generate(prompts, params)
    llm = LLM(model="random", device="cpu", num_blocks=7, kv_policy="sliding", kv_budget=32,
              preemption_mode=mode)  # fmt: skip
    outs = llm.generate(prompts, params)
    assert llm.engine.manager.num_preemptions > 0
    assert [len(o.token_ids) for o in outs] == [120] * 3
    if mode == "swap":  # the pruned cache comes back as it was: the same tokens
        assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    llm.engine.pool.check_integrity()
    assert llm.engine.pool.num_free == 7


def test_int2_copies_a_cached_sinks_block_before_moving_it():
    # the prompt's first block is in the prefix cache when streaming first compacts: the
    # sinks' block is copied whole into a block of the request's own and re-rotated
    # there; the cached block keeps what it held, and the tokens are those of an engine
    # whose block was never cached (rotated in place)
    prompt = list(range(3, 131))  # two whole blocks of 64, published as computed
    params = SamplingParams(max_tokens=300, ignore_eos=True)
    options = {"kv_policy": "streaming", "kv_budget": 160, "kv_dtype": "int2"}
    llm = _llm(**options)
    engine, first = llm.engine, {}

    def record(requests, logits):
        r = requests[0]
        if not first and r.block_keys:  # the first block is published
            first["id"] = r.block_table.block_ids[0]
            first["bytes"] = engine.store.read_blocks([first["id"]])
        first["table"] = list(r.block_table.block_ids)

    engine.runner.logits_hook = record
    out = llm.generate([prompt], params)[0]
    assert out.metrics.peak_kv_tokens == 224
    assert first["table"][0] != first["id"]  # the sinks' block moved out of the cached one
    assert engine.pool.lookup(engine.pool.key_of(first["id"])) == first["id"]
    assert torch.equal(engine.store.read_blocks([first["id"]]), first["bytes"])
    uncached = _llm(enable_prefix_caching=False, **options).generate([prompt], params)[0]
    assert out.token_ids == uncached.token_ids
    engine.pool.check_integrity()


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_int2_preemption_under_streaming(mode):
    # 10 blocks of 64 beside the 32 each running request borrows for its window: three
    # requests that each grow to 224 tokens (4 blocks) cannot all run
    prompts = [f"request {i}: hello" * 5 for i in range(3)]
    params = SamplingParams(max_tokens=400, ignore_eos=True)
    options = {"kv_policy": "streaming", "kv_budget": 160, "kv_dtype": "int2"}
    roomy = _llm(**options).generate(prompts, params)
    blocks = 10 + 3 * 32
    llm = LLM(model="random", device="cpu", num_blocks=blocks, preemption_mode=mode, **options)
    outs = llm.generate(prompts, params)
    assert llm.engine.manager.num_preemptions > 0
    assert [len(o.token_ids) for o in outs] == [400] * 3
    if mode == "swap":  # hot blocks leave with the request and come back: the same tokens
        assert [o.token_ids for o in outs] == [o.token_ids for o in roomy]
    llm.engine.pool.check_integrity()
    assert llm.engine.pool.num_free == blocks and llm.engine.store.window.slots == {}


def test_a_pruned_request_publishes_no_stale_prefix():
    llm = _llm(kv_policy="sliding", kv_budget=32)
    first = llm.generate(["The quick brown fox " * 4],
                         SamplingParams(max_tokens=100, ignore_eos=True))[0]  # fmt: skip
    # its prompt and output, asked again without a policy, must not reuse pruned blocks
    llm.engine.kv_policy = None
    ids = first.prompt_token_ids + first.token_ids
    again = llm.generate([ids], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    fresh = _llm().generate([ids], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert again.token_ids == fresh.token_ids
    # only the prompt's full blocks were published (before the first compaction)
    assert again.metrics.cached_tokens <= len(first.prompt_token_ids) // 16 * 16


def test_eval_with_a_policy(capsys, tmp_path):
    import json

    assert main(["eval", "passkey", "--model", "random", "--device", "cpu", "--lengths",
                 "200", "--depths", "0,1", "--trials", "1", "--kv-policy", "snapkv",
                 "--kv-budget", "25%", "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["kv_policy"] == "snapkv" and result["kv_budget"] == "25%"
    assert result["kv_budget_tokens"] == {"200": 50}
    assert result["peak_kv_tokens"]["200"] <= 200 + 8
    assert main(["eval", "perplexity", "--model", "random", "--device", "cpu", "--context",
                 "128", "--max-tokens", "200", "--kv-policy", "streaming", "--kv-budget",
                 "32", "--json"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    # window 1: 127 tokens in chunks of 64 and 63, compacted to 32 at 64 held: 32 + 63
    assert result["tokens_scored"] == 200 and result["peak_kv_tokens"] == 32 + 63
    assert main(["eval", "passkey", "--kv-budget", "64"]) == 2
    assert "--kv-budget needs --kv-policy" in capsys.readouterr().err
    assert main(["eval", "passkey", "--kv-policy", "h2o", "--kv-budget", "64",
                 "--kv-dtype", "int2", "--device", "cpu", "--model", "random"]) == 2  # fmt: skip
    assert "kv_budget 64 is too small for kv_dtype 'int2'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "passkey", "--kv-policy", "h2o", "--kv-budget", "150%"])
