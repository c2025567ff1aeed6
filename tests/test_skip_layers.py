"""kv_skip_layers: the named layers keep their K/V in the model's own dtype while the others
take kv_dtype. The planner and the store count the same bytes, the setting is part of the
prefix cache's key, and every store operation and the engine's paths work on a mixed cache."""

import json

import pytest
import torch

from kvforge import LLM, SamplingParams
from kvforge.cli import main
from kvforge.config import ModelSpec
from kvforge.errors import KVForgeError
from kvforge.kvcache.formats import (
    KV_FORMATS,
    get_kv_format,
    window_blocks,
    with_rotation,
    with_skip_layers,
)
from kvforge.kvcache.plain_cache import PlainCache
from kvforge.kvcache.store import KVStore
from kvforge.models.checkpoint import resolve_model
from kvforge.planner import (
    bytes_per_block,
    bytes_per_request,
    bytes_per_token,
    max_context,
    plan_kv,
    pool_size,
)
from kvforge.presets import get_preset

SMOLLM2 = get_preset("smollm2-135m-instruct")  # 30 layers, 3 KV heads, head_dim 64, bf16
TINY = ModelSpec(name="tiny", architecture="llama", num_layers=4, num_attention_heads=4,
                 num_kv_heads=2, head_dim=16, hidden_size=64, max_position_embeddings=256,
                 dtype="fp32")  # fmt: skip
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def skipped(spec: ModelSpec, kv_dtype: str, layers) -> object:
    return with_skip_layers(get_kv_format(kv_dtype), layers, spec)


# --- bytes: the planner's count is the store's -------------------------------------------


@pytest.mark.parametrize("spec", [TINY, SMOLLM2], ids=["tiny", "smollm2"])
@pytest.mark.parametrize("kv_dtype", ["int4", "int8", "int2", "fp16"])
def test_planner_bytes_equal_the_store_bytes(spec, kv_dtype):
    fmt = skipped(spec, kv_dtype, [0, spec.num_layers - 1])
    block = 64 if kv_dtype == "int2" else 16
    store = KVStore(spec, fmt, 3, block, "cpu")
    assert store.bytes_allocated == 3 * bytes_per_block(spec, fmt, block)
    assert store.bytes_per_token == bytes_per_token(spec, fmt, block)
    blocks = pool_size(spec, fmt, block, 64 * 2**20, 2)
    sized = KVStore(spec, fmt, blocks, block, "cpu")
    # all of the KV memory is blocks (int4's and int2's windows borrow some while running)
    block_bytes = bytes_per_block(spec, fmt, block)
    assert sized.bytes_allocated == blocks * block_bytes == 64 * 2**20 // block_bytes * block_bytes


def test_the_byte_arithmetic_for_int4_on_smollm2():
    fmt = skipped(SMOLLM2, "int4", [0, 29])
    heads, dim = SMOLLM2.num_kv_heads, SMOLLM2.head_dim
    # per head and token at int4's 64-token blocks: 32 B of values; K an fp16 scale and zero
    # per channel once a block (64 x 2 x 2 B / 64 tokens), V an fp16 scale and zero per token
    int4_k, int4_v = dim // 2 + dim * 2 * 2 // 64, dim // 2 + 2 * 2
    assert (int4_k, int4_v) == (36, 36)
    kept_token = 2 * heads * dim * 2  # a skipped layer: K and V of every head at bf16
    expected = 28 * heads * (int4_k + int4_v) + 2 * kept_token
    assert expected == 7_584
    assert bytes_per_token(SMOLLM2, fmt, 64) == expected
    assert bytes_per_block(SMOLLM2, fmt, 64) == 64 * expected
    # at 16-token blocks a key's channel parameters cost 4 x as much a token: 16 B, not 4
    assert bytes_per_token(SMOLLM2, fmt, 16) == expected + 28 * heads * (16 - 4) == 8_592
    plain = get_kv_format("int4")
    skip_cost = 2 * (kept_token - heads * (int4_k + int4_v))  # the two layers' extra bytes
    assert bytes_per_token(SMOLLM2, fmt, 64) - bytes_per_token(SMOLLM2, plain, 64) == skip_cost
    # the recent window: 2 blocks of 64 bf16 tokens, each in the codes of borrowed blocks
    # (64 x 32 B a head: 16 bf16 rows of 64 channels, so 4 blocks a block of tokens), in the
    # 28 coded layers; the skipped layers' share of those blocks is unused
    assert window_blocks(SMOLLM2, fmt, 64) == window_blocks(SMOLLM2, plain, 64) == 2 * 4
    # a request and the longest context count the same blocks at the new size, and a window
    assert bytes_per_request(SMOLLM2, fmt, 64, 1000) == (16 + 8) * 64 * expected
    assert max_context(SMOLLM2, fmt, 64, (16 + 8) * 64 * expected) == 1024
    assert max_context(SMOLLM2, plain, 64, (16 + 8) * 64 * expected) > 1024


def test_int2_keeps_no_window_for_the_skipped_layers():
    fmt = skipped(TINY, "int2", [1, 2])
    # 2 recent blocks of 64 fp32 tokens, in 16 borrowed blocks each (a head's 64 x 4 B of
    # codes hold 4 rows of 16 fp32 channels), kept in the codes of layers 0 and 3 only
    assert window_blocks(TINY, fmt, 64) == window_blocks(TINY, KV_FORMATS["int2"], 64) == 32
    store = KVStore(TINY, fmt, 40, 64, "cpu")
    assert len(store.window.caches) == 4  # K and V of layers 0 and 3
    assert [type(c).__name__ for c in store.k] == [
        "WindowedCache", "PlainCache", "PlainCache", "WindowedCache"]  # fmt: skip
    every = skipped(TINY, "int2", range(4))
    assert window_blocks(TINY, every, 64) == 0
    assert KVStore(TINY, every, 4, 64, "cpu").window is None


def test_plan_reports_the_skipped_layers():
    plan = plan_kv(SMOLLM2, context=1000, kv_dtype="int4", kv_skip_layers=[29, 0])
    assert plan.kv_skip_layers == [0, 29]
    assert plan.block_size == 64  # int4's default
    assert plan.bytes_per_token == 7_584
    # 16 blocks of 64 tokens, and the 8 the window borrows while the request runs
    assert plan.window_blocks_per_request == 8
    assert plan.bytes_per_request == (16 + 8) * 64 * 7_584
    assert "layers 0, 29 at bf16" in plan.kv_layout
    plain = plan_kv(SMOLLM2, context=1000, kv_dtype="int4")
    assert plain.kv_skip_layers == [] and plain.bytes_per_token == 30 * 2 * 3 * 36 == 6_480
    with_memory = plan_kv(SMOLLM2, context=1000, kv_dtype="int4", kv_skip_layers=[0, 29],
                          kv_memory_bytes=2**30)  # fmt: skip
    fmt = skipped(SMOLLM2, "int4", [0, 29])
    assert with_memory.kv_capacity_blocks == pool_size(SMOLLM2, fmt, 64, 2**30, 256)


def test_cli_plan_prints_the_bytes_per_token_with_skipped_layers(capsys):
    args = ["plan", "--model", "smollm2-135m-instruct", "--kv-dtype", "int4", "--context", "1000"]
    # the installed GGUF file's spec (served in fp32 on a CPU) or the preset's (bf16)
    dtype = resolve_model("smollm2-135m-instruct").spec.dtype
    expected = 28 * 2 * 3 * 36 + 2 * (2 * 3 * 64 * DTYPE_BYTES[dtype])
    assert main([*args, "--kv-skip-layers", "0,29", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["bytes_per_token"] == expected and data["kv_skip_layers"] == [0, 29]
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes_per_token"] == 30 * 2 * 3 * 36
    assert main([*args, "--kv-skip-layers", "0,29", "--compare"]) == 0
    out = capsys.readouterr().out
    assert f"{expected:,} B" in out and "(28 layers at int4 + 2 kept at the model's dtype)" in out
    assert f"layers 0, 29 at {dtype}" in out


# --- the format and its key ---------------------------------------------------------------


def test_the_skipped_layers_are_in_the_cache_key():
    int4 = get_kv_format("int4")
    assert with_skip_layers(int4, [], SMOLLM2).key == "int4"
    first_last = with_skip_layers(int4, [29, 0], SMOLLM2)
    assert first_last.key == "int4+skip0,29@bf16" and first_last.skip_layers == (0, 29)
    assert with_skip_layers(int4, [0], SMOLLM2).key == "int4+skip0@bf16"
    rotated = with_rotation(first_last, True)
    assert rotated.key == "int4+rot0+skip0,29@bf16"
    assert len({f.key for f in (int4, first_last, rotated, with_rotation(int4, True))}) == 4
    assert first_last.layer_format(0) is KV_FORMATS["bf16"]
    assert first_last.layer_format(1) is first_last
    # set again, the summary names only the new layers
    assert with_skip_layers(first_last, [], SMOLLM2).summary == int4.summary


@pytest.mark.parametrize(
    ("layers", "message"),
    [
        ([30], r"kv_skip_layers: layer 30 is out of range: the model has 30 layers \(0..29\)"),
        ([0, -1], r"kv_skip_layers: layer -1 is out of range: the model has 30 layers"),
        ([3, 3], r"kv_skip_layers: layer 3 is named twice"),
        (["0"], r"kv_skip_layers: '0' is not a layer index"),
        ([True], r"kv_skip_layers: True is not a layer index"),
        ("0,29", r"kv_skip_layers must be a list of layer indices, got '0,29'"),
    ],
)
def test_bad_layer_indices_are_refused_naming_the_limit(layers, message):
    with pytest.raises(KVForgeError, match=message):
        with_skip_layers(get_kv_format("int4"), layers, SMOLLM2)


def test_the_engine_refuses_bad_layers():
    with pytest.raises(KVForgeError, match=r"layer -2 is out of range: layers count from 0"):
        LLM(model="random", kv_dtype="int4", kv_skip_layers=[-2])  # before the model loads
    with pytest.raises(KVForgeError, match=r"layer 4 is out of range: the model has 4 layers"):
        LLM(model="random", kv_dtype="int4", kv_skip_layers=[0, 4], kv_memory="8MiB")


@pytest.mark.parametrize(
    ("command", "layers", "message"),
    [
        ("generate", "4", "kv_skip_layers: layer 4 is out of range: the model has 4 layers (0..3)"),
        ("generate", "1,1", "kv_skip_layers: layer 1 is named twice"),
        ("generate", "a", "expected layers like 0,29, got 'a'"),
        ("plan", "30", "layer 30 is out of range: the model has 30 layers (0..29)"),
    ],
)
def test_cli_bad_layers_exit_2_without_a_traceback(capsys, command, layers, message):
    model = "smollm2-135m-instruct" if command == "plan" else "random"
    args = [command, "--model", model, "--kv-dtype", "int4", f"--kv-skip-layers={layers}"]
    if command == "generate":
        args += ["--prompt", "hi", "--max-tokens", "2", "--device", "cpu"]
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own usage error, for a value that is no number
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


# --- the store: every operation on a mixed cache ------------------------------------------


# the smallest blocks whose codes hold a recent fp32 token of TINY's (int4, int2), else 4
BLOCK_SIZES = {"int4": 8, "int2": 16}


def mixed_store(kv_dtype: str = "int4", layers=(0, 3), num_blocks: int = 6) -> KVStore:
    """`num_blocks` for the tests' blocks, and the blocks a request's window borrows
    (int4, int2) above them: `borrowed`."""
    fmt = skipped(TINY, kv_dtype, layers)
    block = BLOCK_SIZES.get(kv_dtype, 4)
    return KVStore(TINY, fmt, num_blocks + window_blocks(TINY, fmt, block), block, "cpu")


def borrowed(store: KVStore) -> list[int]:
    """The blocks one request's recent window borrows: the store's last ones."""
    count = window_blocks(store.spec, store.format, store.block_size)
    return list(range(store.num_blocks - count, store.num_blocks))


def fill(store: KVStore, slots: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    written = []
    for layer in range(TINY.num_layers):
        k, v = (torch.randn(len(slots), 2, 16, generator=gen) for _ in range(2))  # [T, kvH, D]
        store.write(layer, slots, k, v)
        written.append(k)
    return written


def prefill(store: KVStore, num_tokens: int, seed: int = 0) -> list[torch.Tensor]:
    """One request's first `num_tokens` tokens, in blocks 0, 1, ...: a store with a recent
    window (int4, int2) plans the pass first (a no-op for the others)."""
    blocks = list(range(-(-num_tokens // store.block_size)))
    store.begin_pass([(blocks, 0, num_tokens, borrowed(store))])
    return fill(store, torch.arange(num_tokens), seed)


def gathered(store: KVStore, block_ids: list[int]) -> list[torch.Tensor]:
    ids = torch.tensor(block_ids)
    return [c.gather(ids) for c in store.caches]


@pytest.mark.parametrize("kv_dtype", ["int4", "int8"])
def test_skipped_layers_are_exact_and_plain_the_others_quantized(kv_dtype):
    store = mixed_store(kv_dtype)
    n = 2 * store.block_size
    keys = prefill(store, n)
    if store.window is not None:  # int4: every layer exact while the tokens are recent
        read = store.read_keys(list(range(n)))
        for layer in range(4):
            assert torch.equal(read[layer], keys[layer].transpose(0, 1))
        store.retire([0, 1], n)  # the request done: its whole blocks are packed
        assert store.window.slots == {}
    read = store.read_keys(list(range(n)))  # [layers, kv_heads, T, D]
    for layer in (0, 3):
        assert torch.equal(read[layer], keys[layer].transpose(0, 1))
        assert store.k[layer].dtype == torch.float32
        k, v = store.plain(layer)
        assert k is store.k[layer].data and v is store.v[layer].data
    for layer in (1, 2):
        assert not torch.equal(read[layer], keys[layer].transpose(0, 1))
        torch.testing.assert_close(read[layer], keys[layer].transpose(0, 1), rtol=0, atol=0.5)
        assert store.plain(layer) is None
    assert store.packed and store.dtype == torch.uint8


@pytest.mark.parametrize("kv_dtype", ["int4", "int8", "fp16"])
def test_blocks_move_as_bytes_and_come_back_the_same(kv_dtype):
    # fp16 with skipped fp32 layers: two plain dtypes, so blocks move as bytes too
    store = mixed_store(kv_dtype)
    bs = store.block_size
    prefill(store, 2 * bs)
    store.retire([0, 1], 2 * bs)  # int4: the request done, its whole blocks are packed
    data = store.read_blocks([0, 1])
    assert data.dtype == torch.uint8 and data.shape == (2, *store.block_shape)
    assert store.block_shape == (bytes_per_block(TINY, store.format, bs),)
    store.write_blocks([4, 5], data)
    for before, after in zip(gathered(store, [0, 1]), gathered(store, [4, 5]), strict=True):
        assert torch.equal(before, after)
    swapped = store.swap_out([0, 1])
    store.swap_in([2, 3], swapped)
    for before, after in zip(gathered(store, [0, 1]), gathered(store, [2, 3]), strict=True):
        assert torch.equal(before, after)
    if store.window is not None:  # int4: hot blocks swap with their full-precision tokens
        store.begin_pass([([4, 5], 0, 2 * bs, borrowed(store))])
        fill(store, torch.arange(4 * bs, 6 * bs), seed=1)
        hot = gathered(store, [4, 5])
        store.swap_in([0, 1], store.swap_out([4, 5]), borrowed(store))
        assert sorted(store.window.slots) == [0, 1]
        for before, after in zip(hot, gathered(store, [0, 1]), strict=True):
            assert torch.equal(before, after)


def test_a_store_of_one_plain_dtype_keeps_its_plain_blocks():
    # fp32 kept layers of an fp32 cache: every layer alike, blocks move in their dtype
    store = mixed_store("fp32")
    assert not store.packed and store.dtype == torch.float32
    assert store.read_blocks([0]).shape == (1, 4, 2, 2, 4, 16)


def test_tokens_and_blocks_move_and_keys_are_rewritten_in_every_layer():
    store = mixed_store("int8")  # a per-token codec: single tokens move (int4's cannot)
    assert store.token_moves
    fill(store, torch.arange(12))
    before = store.read_keys([1, 2, 3])
    store.move_tokens([1, 2, 3], [17, 18, 19])
    assert torch.equal(store.read_keys([17, 18, 19]), before)
    store.copy_blocks([0, 1], [4, 5])
    for a, b in zip(gathered(store, [0, 1]), gathered(store, [4, 5]), strict=True):
        assert torch.equal(a, b)
    keys = torch.randn(4, 2, 2, 16, generator=torch.Generator().manual_seed(3))
    store.write_keys([8, 9], keys)
    read = store.read_keys([8, 9])
    assert torch.equal(read[0], keys[0]) and torch.equal(read[3], keys[3])  # exact: skipped
    torch.testing.assert_close(read[1:3], keys[1:3], rtol=0, atol=0.5)


def test_int4_moves_and_rewrites_whole_blocks_in_every_layer():
    # keys quantized per channel over a block: blocks, not tokens, move and are rewritten
    store = mixed_store("int4")
    bs = store.block_size
    assert not store.token_moves
    prefill(store, 3 * bs)
    store.retire([0, 1, 2], 3 * bs)  # the request done: its whole blocks are packed
    store.copy_blocks([0, 1], [4, 5])
    for a, b in zip(gathered(store, [0, 1]), gathered(store, [4, 5]), strict=True):
        assert torch.equal(a, b)
    keys = torch.randn(4, 2, bs, 16, generator=torch.Generator().manual_seed(3))
    block_2 = list(range(2 * bs, 3 * bs))
    store.write_keys(block_2, keys)  # block 2, whole
    read = store.read_keys(block_2)
    assert torch.equal(read[0], keys[0]) and torch.equal(read[3], keys[3])  # exact: skipped
    assert not torch.equal(read[1:3], keys[1:3])
    torch.testing.assert_close(read[1:3], keys[1:3], rtol=0, atol=0.5)
    with pytest.raises(AssertionError, match="a whole block at a time"):
        store.write_keys(block_2[:2], keys[:, :, :2])


def test_int2_with_skipped_layers_keeps_its_window_for_the_others():
    store = mixed_store("int2", layers=(1,), num_blocks=6)
    assert isinstance(store.k[1], PlainCache) and store.window is not None
    store.begin_pass([([0], 0, 6, borrowed(store))])
    keys = fill(store, torch.arange(6))
    read = store.read_keys(list(range(6)))  # all in the window: exact in every layer
    for layer in range(4):
        assert torch.equal(read[layer], keys[layer].transpose(0, 1))
    store.retire([0], 6)
    assert store.window.slots == {}


# --- through the engine -------------------------------------------------------------------

PROMPTS = ["The quick brown fox jumps over the lazy dog. " * 4, "Hello", "abc" * 30]
PARAMS = SamplingParams(max_tokens=20, ignore_eos=True)


@pytest.fixture(scope="module")
def reference():
    llm = LLM(model="random", device="cpu", kv_memory="8MiB", kv_dtype="fp32")
    return [o.token_ids for o in llm.generate(PROMPTS, PARAMS)]


@pytest.mark.parametrize(("kv_dtype", "rotation"), [("int4", None), ("int4", True),
                                                    ("int2", None), ("fp16", None)])  # fmt: skip
def test_every_layer_skipped_generates_the_model_dtypes_tokens(kv_dtype, rotation, reference):
    llm = LLM(model="random", device="cpu", kv_memory="8MiB", kv_dtype=kv_dtype,
              kv_rotation=rotation, kv_skip_layers=range(4))  # fmt: skip
    store = llm.engine.store
    assert all(isinstance(c, PlainCache) and c.dtype == torch.float32 for c in store.caches)
    assert store.bytes_per_token == 2 * 4 * 2 * 32 * 4  # the fp32 cache's
    assert [o.token_ids for o in llm.generate(PROMPTS, PARAMS)] == reference


def test_a_subset_skipped_generates_and_reports_it(reference):
    llm = LLM(model="random", device="cpu", kv_memory="8MiB", kv_dtype="int4",
              kv_skip_layers=[0, 3])  # fmt: skip
    stats = llm.kv_stats()
    store = llm.engine.store
    assert stats["kv_skip_layers"] == [0, 3]
    assert stats["bytes_per_token"] == bytes_per_token(store.spec, store.format, store.block_size)
    assert store.block_size == 64  # int4's default
    # 2 layers of fp32 K and V, 2 heads of 32 channels; 2 at int4: 16 B of values a head,
    # K an fp16 scale and zero per channel once a block (32 x 2 x 2 B / 64), V per token
    assert stats["bytes_per_token"] == 2 * (2 * 2 * 32 * 4) + 2 * 2 * (16 + 2 + 16 + 4) == 1_176
    # each running request's window: 2 blocks of 64 fp32 tokens, each in the codes of 8
    # borrowed blocks (64 x 16 B a head: 8 rows of 32 fp32 channels), in layers 1 and 2
    assert stats["window_blocks_per_request"] == window_blocks(store.spec, store.format, 64) == 16
    assert stats["kv_bytes_allocated"] == stats["blocks_total"] * 64 * stats["bytes_per_token"]
    assert llm.engine.manager.cache_id[1] == "int4+rot0+skip0,3@fp32"  # rotated by default
    outs = llm.generate(PROMPTS, PARAMS)
    agree = sum(a == b for o, r in zip(outs, reference, strict=True)
                for a, b in zip(o.token_ids, r, strict=True))  # fmt: skip
    assert agree >= 0.75 * 3 * 20
    # a prefix-cache hit reads the same blocks: one by one equals batched
    alone = [llm.generate([p], PARAMS)[0] for p in PROMPTS]
    assert [o.token_ids for o in alone] == [o.token_ids for o in outs]
    assert alone[0].metrics.cached_tokens > 0
    llm.engine.pool.check_integrity()


def test_eval_setting_reports_the_skipped_layers():
    from kvforge.eval.tasks import setting

    llm = LLM(model="random", device="cpu", kv_memory="8MiB", kv_dtype="int8", kv_skip_layers=[1])
    assert setting(llm)["kv_skip_layers"] == [1]


@pytest.mark.parametrize("kv_dtype", ["int4", "int2"])
def test_swap_preemption_with_skipped_layers_gives_the_roomy_tokens(kv_dtype):
    prompts = ["abc" * 60 + str(i) for i in range(3)]  # 182 tokens
    params = SamplingParams(max_tokens=80, ignore_eos=True)
    options = {"model": "random", "device": "cpu", "kv_dtype": kv_dtype, "max_num_seqs": 3,
               "kv_skip_layers": [0, 2], "block_size": 64}  # fmt: skip
    roomy = LLM(kv_memory="8MiB", enable_prefix_caching=False, **options)
    # 15 blocks of 64 tokens at the end, 5 a request, and the blocks each running request
    # borrows for its window: room for two, not grown
    window = roomy.kv_stats()["window_blocks_per_request"]
    assert window == (16 if kv_dtype == "int4" else 32)  # fp32 rows in 8 or 4 B of codes
    blocks = 2 * (4 + window) + 1
    tight = LLM(num_blocks=blocks, preemption_mode="swap", enable_prefix_caching=False, **options)
    expected = [o.token_ids for o in roomy.generate(prompts, params)]
    assert [o.token_ids for o in tight.generate(prompts, params)] == expected
    assert tight.kv_stats()["num_preemptions"] > 0
    # with the prefix cache too: a first request's blocks are hits (the prompts share
    # their first two blocks: 11 blocks at the end), and swaps still happen
    cached = LLM(num_blocks=blocks - 3, preemption_mode="swap", **options)
    cached.generate(prompts[:1], SamplingParams(max_tokens=1))
    outs = cached.generate(prompts, params)
    assert all(len(o.token_ids) == 80 for o in outs)
    assert cached.kv_stats()["num_preemptions"] > 0
    assert sum(o.metrics.cached_tokens for o in outs) > 0
    cached.engine.pool.check_integrity()


def test_blocks_of_one_skip_setting_are_never_served_to_another(tmp_path):
    prompt = PROMPTS[0] * 2
    options = {"model": "random", "device": "cpu", "kv_memory": "8MiB", "kv_dtype": "int4",
               "disk_cache_dir": str(tmp_path)}  # fmt: skip
    first = LLM(kv_skip_layers=[0, 3], **options)
    expected = first.generate([prompt], PARAMS)[0].token_ids
    assert any(tmp_path.glob("*.kvblock"))
    again = LLM(kv_skip_layers=[0, 3], **options).generate([prompt], PARAMS)[0]
    assert again.token_ids == expected and again.metrics.cached_tokens_disk > 0
    for other in ([], [0], [0, 2]):
        out = LLM(kv_skip_layers=other, **options).generate([prompt], SamplingParams(max_tokens=1))[
            0
        ]
        assert out.metrics.cached_tokens_disk == 0


def test_the_fused_cpu_kernels_run_on_a_skipped_layer(monkeypatch):
    """Where the CPU kernels run, a skipped layer's plain tensors take the in-place decode
    (and rope+store) kernels, and a quantized layer never does."""
    from kvforge import kernels

    if kernels.cpu() is None:
        pytest.skip(f"no CPU kernels: {kernels.reason()}")
    import kvforge.attention.paged as paged

    taken = []
    original = paged._in_place_decode

    def counted(q, k_cache, *args):
        out = original(q, k_cache, *args)
        taken.append((isinstance(k_cache, PlainCache), out is not None))
        return out

    monkeypatch.setattr(paged, "_in_place_decode", counted)
    llm = LLM(model="random", device="cpu", kv_memory="8MiB", kv_dtype="int8",
              kv_skip_layers=[1])  # fmt: skip
    assert len(llm.generate(PROMPTS[:1], PARAMS)[0].token_ids) == 20
    assert (True, True) in taken and (False, True) not in taken


def test_the_config_keeps_the_layers_sorted():
    from kvforge.engine.config import EngineConfig

    config = EngineConfig.create(model="random", kv_dtype="int4", kv_skip_layers=[3, 0])
    assert config.cache.kv_skip_layers == (0, 3)
    assert EngineConfig.create(model="random", kv_skip_layers=None).cache.kv_skip_layers == ()
