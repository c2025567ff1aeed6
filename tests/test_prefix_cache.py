"""Prefix caching: chained keys, the pool's cache entries and LRU eviction (exact block ids),
and the engine reusing cached blocks without changing a single output token."""

import pytest

from kvforge import LLM, SamplingParams
from kvforge.errors import KVForgeError
from kvforge.kvcache.block_pool import BlockPool
from kvforge.kvcache.block_table import BlockTable
from kvforge.kvcache.prefix_cache import block_key, chain_seed, extend_keys

GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)

# --- keys ---------------------------------------------------------------------------


def test_seed_names_model_codec_block_size_and_salt():
    base = chain_seed("m", "fp32", 16)
    assert base == chain_seed("m", "fp32", 16)  # stable: no per-process hashing
    assert len(base) == 32  # 256-bit
    variants = [
        chain_seed("m2", "fp32", 16),
        chain_seed("m", "fp16", 16),
        chain_seed("m", "fp32", 8),
        chain_seed("m", "fp32", 16, salt="tenant-a"),
        chain_seed("m", "fp32", 16, salt=""),
    ]
    assert len({base, *variants}) == 6


def test_keys_chain_over_every_earlier_token():
    seed = chain_seed("m", "fp32", 4)
    tokens = list(range(10, 22))  # 3 full blocks of 4
    keys: list[bytes] = []
    extend_keys(keys, seed, tokens[:6], 4)  # one full block so far
    assert len(keys) == 1
    extend_keys(keys, seed, tokens, 4)  # incremental == all at once
    assert keys == [
        block_key(seed, tokens[0:4]),
        block_key(block_key(seed, tokens[0:4]), tokens[4:8]),
        block_key(block_key(block_key(seed, tokens[0:4]), tokens[4:8]), tokens[8:12]),
    ]
    changed = tokens.copy()
    changed[1] = 99  # a token of block 0 changes the key of every later block
    other: list[bytes] = []
    extend_keys(other, seed, changed, 4)
    assert all(a != b for a, b in zip(keys, other, strict=True))
    same_tail: list[bytes] = []
    extend_keys(same_tail, seed, [*tokens[:8], 1, 2, 3, 4], 4)
    assert same_tail[:2] == keys[:2] and same_tail[2] != keys[2]


# --- the pool -----------------------------------------------------------------------


def test_pool_cache_entries_and_lru_eviction_with_exact_ids():
    pool = BlockPool(4)
    evicted: list[tuple[int, bytes]] = []
    pool.on_evict = lambda block_id, key: evicted.append((block_id, key))
    table = BlockTable(4)
    table.append_tokens(12, pool.allocate(3))  # blocks 0, 1, 2
    for block_id, key in zip(table.block_ids, (b"k0", b"k1", b"k2"), strict=True):
        assert pool.cache(block_id, key)
    assert not pool.cache(1, b"k-other")  # one key per block
    table.release(pool)  # tail first
    assert pool.free_block_ids() == [3, 2, 1, 0]
    assert pool.num_cached == pool.num_cached_free == 3
    pool.check_integrity()

    assert pool.allocate(1) == [3]  # empty block first: nothing evicted
    assert evicted == []
    assert pool.allocate(1) == [2]  # least recently freed cached block: k2 goes
    assert evicted == [(2, b"k2")] and pool.lookup(b"k2") is None
    assert pool.num_evictions == 1

    assert pool.lookup(b"k0") == 0
    pool.take([0])  # a hit: out of the free queue, referenced
    assert pool.free_block_ids() == [1] and pool.ref_count(0) == 1
    pool.release([0])
    assert pool.free_block_ids() == [1, 0]  # now the most recently used
    assert pool.allocate(1) == [1] and evicted[-1] == (1, b"k1")
    pool.check_integrity()


def test_pool_refuses_bad_cache_operations():
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="cannot cache block 0: it is free"):
        pool.cache(0, b"k")
    with pytest.raises(ValueError, match="cannot take block 1: it holds no cache entry"):
        pool.take([1])
    a, b = pool.allocate(2)
    assert pool.cache(a, b"k")
    assert not pool.cache(b, b"k")  # the key stays with the first block
    assert pool.lookup(b"k") == a


# --- the engine ---------------------------------------------------------------------


def small_llm(**options) -> LLM:
    return LLM(model="random", device="cpu", **{"kv_memory": "8MiB", **options})


SYSTEM = "You are a helpful assistant. Answer briefly and exactly. " * 4


def test_outputs_with_caching_equal_outputs_without():
    prompts = [SYSTEM + "What is 2+2?", SYSTEM + "Name a colour.", SYSTEM + "What is 2+2?"]
    on, off = small_llm(), small_llm(enable_prefix_caching=False)
    expected = [o.token_ids for o in off.generate(prompts, GREEDY)]
    assert [o.token_ids for o in on.generate(prompts, GREEDY)] == expected  # batched
    for prompt, tokens in zip(prompts, expected, strict=True):  # one by one: hits
        out = on.generate([prompt], GREEDY)[0]
        assert out.token_ids == tokens
        assert out.metrics.cached_tokens > 0
    assert all(o.metrics.cached_tokens == 0 for o in off.generate(prompts, GREEDY))
    on.engine.pool.check_integrity()
    assert on.kv_stats()["blocks_used"] == 0


def test_the_second_run_of_a_2k_prompt_reuses_2000_tokens_and_a_salt_shares_nothing():
    llm = small_llm()
    prompt = "The quick brown fox jumps over the lazy dog. " * 45  # 2,026 tokens with BOS
    first = llm.generate([prompt], GREEDY)[0]
    second = llm.generate([prompt], GREEDY)[0]
    salted = llm.generate([prompt], GREEDY, cache_salt="tenant-b")[0]
    assert len(first.prompt_token_ids) == 2026
    assert first.metrics.cached_tokens == 0
    assert second.metrics.cached_tokens == 2016  # 126 full blocks; 10 tokens computed
    assert salted.metrics.cached_tokens == 0
    assert first.token_ids == second.token_ids == salted.token_ids
    again = llm.generate([prompt], GREEDY, cache_salt="tenant-b")[0]
    assert again.metrics.cached_tokens == 2016  # the tenant's own cache
    stats = llm.kv_stats()
    assert stats["prefix_cache_queries"] == 4 * 2026
    assert stats["prefix_cache_hits"] == 2 * 2016
    llm.engine.pool.check_integrity()


def test_salted_requests_never_share_a_block():
    llm = small_llm()
    prompt = SYSTEM * 2
    llm.generate([prompt], GREEDY, cache_salt="a")
    cached_a = llm.kv_stats()["blocks_cached"]
    llm.generate([prompt], GREEDY, cache_salt="b")
    assert llm.kv_stats()["blocks_cached"] == 2 * cached_a  # b computed and kept its own
    assert llm.generate([prompt], GREEDY, cache_salt="c")[0].metrics.cached_tokens == 0


def test_the_last_prompt_token_is_always_computed():
    llm = small_llm(block_size=4)
    prompt = [256] + [65] * 15  # 16 tokens: exactly 4 full blocks
    llm.generate([prompt], GREEDY)
    out = llm.generate([prompt], GREEDY)[0]
    assert out.metrics.cached_tokens == 12  # not 16: the last token is computed to sample


def test_lru_eviction_order_through_the_engine():
    llm = small_llm(block_size=4, num_blocks=6)
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    p1, p2, p3 = "abcdefgh", "ijklmnop", "qrstuvwx"  # BOS + 8 bytes: 3 blocks, 2 full
    llm.generate([p1], one)  # blocks 0, 1, 2; 0 and 1 cached
    llm.generate([p2], one)  # blocks 3, 4, 5; 3 and 4 cached
    pool = llm.engine.pool
    assert pool.free_block_ids() == [2, 1, 0, 5, 4, 3]
    llm.generate([p3], one)  # takes 2, 1, 0: evicts p1's blocks, keeps p2's
    assert pool.num_evictions == 2
    assert llm.generate([p2], one)[0].metrics.cached_tokens == 8
    assert llm.generate([p1], one)[0].metrics.cached_tokens == 0
    pool.check_integrity()


def test_multi_turn_chat_reuses_the_previous_turn_including_its_reply():
    llm = small_llm()
    turn1 = llm.generate([SYSTEM + "user: hi\n"], GREEDY)[0]
    history = turn1.prompt_token_ids + turn1.token_ids
    turn2 = llm.generate([history + list(b"user: more\n")], GREEDY)[0]
    assert turn2.metrics.cached_tokens == len(history) // 16 * 16


def test_preemption_with_caching_keeps_outputs_and_the_pool_whole():
    prompts = [SYSTEM + f"question {i}" for i in range(6)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    tight = small_llm(num_blocks=40)  # 6 requests of ~21 blocks each cannot all fit
    roomy = small_llm(enable_prefix_caching=False)
    outs = tight.generate(prompts, params)
    assert tight.kv_stats()["num_preemptions"] > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in roomy.generate(prompts, params)]
    tight.engine.pool.check_integrity()
    assert tight.kv_stats()["blocks_used"] == 0


# --- tiers --------------------------------------------------------------------------

FOX = "The quick brown fox jumps over the lazy dog. " * 10  # 451 tokens: 28 full blocks
OTHER = "Completely different text to push blocks out. " * 12
BLOCK_BYTES = 2048 * 16  # the built-in model: 2,048 B a token, 16 tokens a block


def test_host_and_disk_tiers_round_trip_gives_identical_output(tmp_path):
    llm = small_llm(num_blocks=40, host_cache_memory=10 * BLOCK_BYTES, disk_cache_dir=str(tmp_path))
    first = llm.generate([FOX], GREEDY)[0]
    llm.generate([OTHER], GREEDY)  # needs 36 of 40 blocks: FOX's blocks are evicted
    stats = llm.kv_stats()
    assert stats["host_blocks"] == 10 and stats["host_evictions"] > 0
    assert stats["disk_blocks"] == stats["disk_writes"] > 0  # written through
    again = llm.generate([FOX], GREEDY)[0]
    m = again.metrics
    assert again.token_ids == first.token_ids
    assert m.cached_tokens == 448  # all 28 full blocks, from wherever they were
    assert m.cached_tokens_host > 0 and m.cached_tokens_disk > 0
    assert m.cached_tokens_host + m.cached_tokens_disk <= m.cached_tokens
    llm.engine.pool.check_integrity()


def test_a_new_process_reuses_the_disk_tier_of_the_same_model_only(tmp_path):
    first = small_llm(disk_cache_dir=str(tmp_path)).generate([FOX], GREEDY)[0]
    assert len(list(tmp_path.glob("*.kvblock"))) == 28
    fresh = small_llm(disk_cache_dir=str(tmp_path))  # nothing on the device yet
    out = fresh.generate([FOX], GREEDY)[0]
    assert out.token_ids == first.token_ids
    assert out.metrics.cached_tokens == out.metrics.cached_tokens_disk == 448
    # another block size (or model, or codec) makes other keys: nothing is loaded
    other = small_llm(disk_cache_dir=str(tmp_path), block_size=8)
    assert other.generate([FOX], GREEDY)[0].metrics.cached_tokens_disk == 0


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "garbage"])
def test_damaged_disk_files_are_misses_never_wrong_output(tmp_path, damage):
    first = small_llm(disk_cache_dir=str(tmp_path)).generate([FOX], GREEDY)[0]
    keys: list[bytes] = []
    llm = small_llm(disk_cache_dir=str(tmp_path))
    extend_keys(keys, chain_seed(llm.engine.model_id, "fp32", 16), first.prompt_token_ids, 16)
    victim = tmp_path / f"{keys[5].hex()}.kvblock"  # block 5 of 28
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        victim.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
    elif damage == "delete":
        victim.unlink()
    else:
        victim.write_bytes(b"not a block")
    out = llm.generate([FOX], GREEDY)[0]
    assert out.token_ids == first.token_ids
    assert out.metrics.cached_tokens_disk == 5 * 16  # blocks 0-4; 5 is a miss, so it stops
    assert llm.kv_stats()["disk_rejected"] == 1  # a file the index knew of but cannot use
    store = llm.engine.store  # recomputed and written again, whole and checksummed
    assert llm.engine.tiers.disk.get(keys[5], store.block_shape, store.dtype) is not None


def test_disk_tier_capacity_evicts_the_oldest_files(tmp_path):
    small_llm(disk_cache_dir=str(tmp_path), disk_cache_memory=20 * BLOCK_BYTES).generate(
        [FOX], GREEDY
    )
    assert len(list(tmp_path.glob("*.kvblock"))) == 20  # 28 written, 8 oldest removed
    out = small_llm(disk_cache_dir=str(tmp_path)).generate([FOX], GREEDY)[0]
    assert out.metrics.cached_tokens_disk == 0  # the head blocks were the oldest: gone


def test_tier_options_are_checked():
    with pytest.raises(KVForgeError, match=r"host_cache_memory must hold at least one KV block"):
        small_llm(host_cache_memory=100)
    with pytest.raises(KVForgeError, match="preemption_mode must be one of recompute, swap"):
        small_llm(preemption_mode="drop")


# --- preemption by swap -------------------------------------------------------------


def test_swap_preemption_gives_the_same_outputs_as_recompute():
    prompts = [FOX + f"question {i}" for i in range(4)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    swap = small_llm(num_blocks=60, preemption_mode="swap", enable_prefix_caching=False)
    recompute = small_llm(num_blocks=60, enable_prefix_caching=False)
    roomy = small_llm(enable_prefix_caching=False)
    expected = [o.token_ids for o in roomy.generate(prompts, params)]
    assert [o.token_ids for o in swap.generate(prompts, params)] == expected
    assert [o.token_ids for o in recompute.generate(prompts, params)] == expected
    assert swap.kv_stats()["num_preemptions"] > 0
    assert recompute.kv_stats()["num_preemptions"] > 0
    swap.engine.pool.check_integrity()
    assert swap.kv_stats()["blocks_used"] == 0


def test_host_tier_lru_spills_to_disk_in_order(tmp_path):
    import torch

    from kvforge.kvcache.tiers import DiskTier, HostTier

    disk = DiskTier(tmp_path, capacity=2)
    host = HostTier(capacity=2, lower=disk)
    blocks = {k: torch.full((2, 3), float(i)) for i, k in enumerate((b"a", b"b", b"c", b"d"))}
    for key in (b"a", b"b", b"c"):
        host.put(key, blocks[key])
    assert host.get(b"b") is not None  # b is now the most recent; a went to disk
    host.put(b"d", blocks[b"d"])  # c is the least recent now: to disk
    assert [len(host), len(disk)] == [2, 2]
    assert host.get(b"a") is None and host.get(b"c") is None
    assert torch.equal(disk.get(b"a", (2, 3), torch.float32), blocks[b"a"])
    assert disk.get(b"a", (3, 2), torch.float32) is None  # another shape: a miss, removed
    assert b"a" not in disk
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{b'c'.hex()}.kvblock"]  # no temp


def test_check_integrity_counts_cached_blocks_and_catches_a_broken_map():
    from kvforge.kvcache.block_pool import IntegrityError

    llm = small_llm(block_size=4, num_blocks=12)
    llm.generate(["abcdefgh", "ijklmnop"], SamplingParams(max_tokens=1, ignore_eos=True))
    pool = llm.engine.pool
    assert pool.num_used == 0 and pool.num_cached == pool.num_cached_free == 4  # 2 full each
    assert llm.kv_stats()["blocks_cached"] == 4
    pool.check_integrity()
    block_id = next(b for b in range(12) if pool.key_of(b) is not None)
    pool._block_of[pool.key_of(block_id)] = (block_id + 1) % 12  # a key pointing elsewhere
    with pytest.raises(IntegrityError, match="maps disagree"):
        pool.check_integrity()


def test_disk_entries_of_another_model_are_never_loaded(tmp_path):
    import torch
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip
    for seed in (1, 2):  # same architecture, different weights
        torch.manual_seed(seed)
        transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / f"m{seed}")
    prompt = list(range(3, 103))
    cache = str(tmp_path / "cache")
    first = LLM(model=str(tmp_path / "m1"), device="cpu", kv_memory="1MiB", disk_cache_dir=cache)
    first.generate([prompt], GREEDY)
    same = LLM(model=str(tmp_path / "m1"), device="cpu", kv_memory="1MiB", disk_cache_dir=cache)
    other = LLM(model=str(tmp_path / "m2"), device="cpu", kv_memory="1MiB", disk_cache_dir=cache)
    assert same.generate([prompt], GREEDY)[0].metrics.cached_tokens_disk == 96
    assert other.generate([prompt], GREEDY)[0].metrics.cached_tokens_disk == 0
    assert same.engine.model_id != other.engine.model_id


def test_a_failing_disk_is_skipped_not_fatal(tmp_path):
    import shutil

    llm = small_llm(num_blocks=6, host_cache_memory=BLOCK_BYTES, disk_cache_dir=str(tmp_path),
                    disk_cache_memory=BLOCK_BYTES)  # fmt: skip
    llm.generate([[256] + [65] * 47], GREEDY)  # 3 full blocks on the device and the disk
    shutil.rmtree(tmp_path)  # the directory goes away (a full or read-only disk alike)
    prompt = [256] + [66] * 79  # + 8 new: all 6 blocks; evicts, spills to disk, writes through
    expected = small_llm(enable_prefix_caching=False).generate([prompt], GREEDY)[0].token_ids
    assert llm.generate([prompt], GREEDY)[0].token_ids == expected
    assert llm.kv_stats()["disk_write_errors"] > 0
    llm.engine.pool.check_integrity()
    assert llm.kv_stats()["blocks_used"] == 0


def test_tier_hits_count_blocks_loaded_not_lookups():
    llm = small_llm(num_blocks=8, host_cache_memory="1MiB", max_num_seqs=4)
    base = [256] + [67] * 50  # 3 full blocks
    llm.generate([base], GREEDY)
    llm.generate([[256] + [68] * 119], GREEDY)  # needs all 8 blocks: base's go to host
    engine = llm.engine
    engine.add_request([256] + [69] * 99, SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()  # holds 7 of 8 blocks for a while
    waiting = engine.add_request([*base, 9], GREEDY)
    looks = 0
    while waiting.status.name == "WAITING":  # looked up at every step until it fits
        engine.step()
        looks += 1
    while engine.has_unfinished:
        engine.step()
    assert looks > 1
    assert waiting.metrics.cached_tokens_host == 48
    assert llm.kv_stats()["host_hits"] == 3  # three blocks loaded, once
