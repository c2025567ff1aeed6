"""The KV cache manager with exact block ids: admission (prefix hits on the device and in
lower tiers), the operations it hands the runner, preemption, and a sliding window's
blocks given back — plus a real sliding-window model doing it, token-identical."""

from dataclasses import dataclass, field

import pytest
import torch
import transformers

from kvforge import LLM, SamplingParams
from kvforge.kvcache.block_ops import (
    DropSwapped,
    LoadBlocks,
    Retire,
    SaveBlock,
    SwapIn,
    SwapOut,
)
from kvforge.kvcache.block_table import NULL_BLOCK, BlockTable
from kvforge.kvcache.manager import KVCacheManager
from model_util import hf_greedy

BLOCK = 4


@dataclass
class Seq:
    """The request fields the manager reads and writes (engine.request.Request has them)."""

    tokens: list[int]
    request_id: str = "r"
    block_table: BlockTable = field(default_factory=lambda: BlockTable(BLOCK))
    cache_seed: bytes | None = None
    block_keys: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    num_computed_tokens: int = 0
    num_dropped: int = 0
    prefix_hit_limit: int = 1 << 30  # no limit
    swapped: bool = False
    window_blocks: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_kv_tokens(self) -> int:
        return self.num_computed_tokens - self.num_dropped

    def token_ids(self, start: int, end: int) -> list[int]:
        return self.tokens[start:end]


class Tiers:
    """Lower tiers holding `blocks` (key -> (contents, source)); records what it is told."""

    def __init__(self, blocks=None, writes_through=False):
        self.blocks = dict(blocks or {})
        self.writes_through = writes_through
        self.loaded_sources: list[str] = []

    def fetch_run(self, keys):
        found = []
        for key in keys:
            if key not in self.blocks:
                break
            found.append(self.blocks[key])
        return found

    def loaded(self, sources):
        self.loaded_sources += sources


def computed(manager: KVCacheManager, seq: Seq, n: int) -> None:
    """What the engine does after a pass computed `n` tokens of `seq`."""
    seq.num_computed_tokens += n
    manager.register(seq)


def test_a_second_request_takes_the_cached_prefix_and_counts_it():
    m = KVCacheManager(8, BLOCK, cache_id=("model", "fp32"))
    a, b = Seq(list(range(10))), Seq([*range(8), 50, 51, 52], request_id="b")
    m.start(a)
    m.start(b)
    assert m.admit(a, cap=64, first=True).slots == list(range(10))  # blocks 0, 1, 2
    computed(m, a, 10)
    admitted = m.admit(b, cap=64, first=True)
    # b shares a's first two blocks (8 tokens); its 3 others go to a new block 3
    assert b.block_table.block_ids == [0, 1, 3] and admitted.cached == 8
    assert admitted.num_new == 3 and admitted.slots == [12, 13, 14]
    assert m.pool.ref_count(0) == m.pool.ref_count(1) == 2
    assert (m.prefix_queries, m.prefix_hits) == (21, 8)
    assert m.take_ops() == []  # nothing to do to block contents


def test_blocks_found_in_a_lower_tier_are_loaded_as_an_operation():
    seq = Seq(list(range(9)))
    m = KVCacheManager(4, BLOCK, cache_id=("model", "int8"))
    m.start(seq)
    tiers = Tiers({seq.block_keys[0]: ("block-0", "disk"), seq.block_keys[1]: ("block-1", "host")})
    m = KVCacheManager(4, BLOCK, cache_id=("model", "int8"), tiers=tiers)
    m.start(seq)
    admitted = m.admit(seq, cap=64, first=True)
    assert (admitted.cached, admitted.from_disk, admitted.from_host) == (8, 4, 4)
    assert seq.block_table.block_ids == [0, 1, 2] and admitted.slots == [8]
    assert m.take_ops() == [LoadBlocks([0, 1], ["block-0", "block-1"])]
    assert tiers.loaded_sources == ["disk", "host"]
    assert m.pool.key_of(0) == seq.block_keys[0]  # loaded blocks are cached at once


def test_evicted_and_newly_cached_blocks_are_saved_in_order():
    tiers = Tiers(writes_through=True)
    m = KVCacheManager(2, BLOCK, cache_id=("model", "fp32"), tiers=tiers)
    a = Seq(list(range(5)))
    m.start(a)
    m.admit(a, cap=64, first=True)
    computed(m, a, 5)
    m.free(a)
    first_key = a.block_keys[0]
    assert m.take_ops() == [SaveBlock(0, first_key, spill=False), Retire([0, 1], 5)]
    b = Seq([90, 91, 92, 93, 94, 95, 96], request_id="b")
    m.start(b)
    m.admit(b, cap=64, first=True)  # the free queue is [1, 0]: block 0 (cached) is evicted
    assert b.block_table.block_ids == [1, 0]
    assert m.take_ops() == [SaveBlock(0, first_key, spill=True)]


def test_swap_preemption_hands_the_blocks_over_and_back():
    m = KVCacheManager(6, BLOCK)
    seq = Seq(list(range(8)))
    m.admit(seq, cap=64, first=True)
    computed(m, seq, 8)
    seq.tokens.append(99)  # sampled
    m.allocate_slots(seq, 1)  # the next step reserves its slot (block 2), then is preempted
    m.preempt(seq, swap=True)
    assert seq.swapped and m.take_ops() == [SwapOut("r", [0, 1])]  # computed blocks only
    assert m.pool.num_free == 6 and m.num_preemptions == 1
    assert m.pool.allocate(1) == [3]  # someone else takes block 3; the queue is 4, 5, 2, ..
    admitted = m.admit(seq, cap=64, first=False)
    assert seq.block_table.block_ids == [4, 5, 2] and admitted.slots == [8]
    assert m.take_ops() == [SwapIn("r", [4, 5], [])] and not seq.swapped
    m.preempt(seq, swap=True)
    m.take_ops()
    m.free(seq)  # ends while swapped out: its host copy is dropped
    assert m.take_ops() == [DropSwapped("r")]


def test_a_sliding_window_gives_back_the_blocks_it_no_longer_reads():
    m = KVCacheManager(10, BLOCK, sliding_window=6)
    seq = Seq(list(range(18)))
    m.admit(seq, cap=64, first=True)
    computed(m, seq, 18)
    m.drop_out_of_window(seq)
    # the next query (position 18) sees keys 13..18: blocks 0-2 (tokens 0-11) are never
    # read again; block 3 (12-15) still holds 13-15
    assert seq.block_table.block_ids == [NULL_BLOCK] * 3 + [3, 4]
    assert m.take_ops() == [Retire([0, 1, 2], 12)]
    assert m.pool.num_free == 8 and m.stats([seq])["tokens_stored"] == 6
    m.preempt(seq, swap=True)  # only the blocks still held are swapped
    assert m.take_ops() == [SwapOut("r", [3, 4])]
    # free queue: 5-9, then the window's 2, 1, 0, then the preempted 4, 3
    assert m.admit(seq, cap=1, first=False).num_new == 0
    assert seq.block_table.block_ids == [NULL_BLOCK] * 3 + [5, 6]
    assert seq.block_table.num_freed == 3 and m.take_ops() == [SwapIn("r", [5, 6], [])]


def window_model(path, kv_heads: int, window: int):
    """A random-init tiny Mistral with a sliding window, saved at `path` (the oracle)."""
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(
        "mistral", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=kv_heads, vocab_size=211,
        max_position_embeddings=512, sliding_window=window,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    model.eval().save_pretrained(path)
    return model


def test_a_sliding_window_model_frees_blocks_and_matches_transformers(tmp_path):
    model = window_model(tmp_path, kv_heads=1, window=24)
    prompt = [int(t) for t in torch.randint(0, 211, (60,), generator=torch.Generator())]
    llm = LLM(model=str(tmp_path), device="cpu", block_size=8, num_blocks=64)
    llm.engine.add_request(prompt, SamplingParams(max_tokens=40, ignore_eos=True), "w")
    used, tokens = [], []
    while llm.engine.has_unfinished:
        for event in llm.engine.step():
            tokens += [] if event.token_id is None else [event.token_id]
        used.append(llm.kv_stats()["blocks_used"])
    assert tokens == hf_greedy(model, prompt, 40)
    # 100 tokens would take 13 blocks of 8; the window of 24 keeps at most 5 (the window
    # starts anywhere in a block, and the block being filled)
    assert max(used[1:]) <= 5 and used[0] <= 5
    llm.engine.pool.check_integrity()
    assert llm.kv_stats()["blocks_used"] == 0


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_a_sliding_window_survives_preemption(tmp_path, mode):
    model = window_model(tmp_path, kv_heads=2, window=16)
    gen = torch.Generator().manual_seed(2)
    prompts = [[int(t) for t in torch.randint(0, 211, (6,), generator=gen)] for _ in range(3)]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    # each request alone needs 12 blocks of 4 (the pool must hold that much), but holds at
    # most 6 of them at once: three decoding together outgrow 14 blocks
    tight = LLM(model=str(tmp_path), device="cpu", block_size=4, num_blocks=14,
                preemption_mode=mode)  # fmt: skip
    outs = tight.generate(prompts, params)
    assert tight.kv_stats()["num_preemptions"] > 0
    assert [o.token_ids for o in outs] == [hf_greedy(model, p, 40) for p in prompts]
    tight.engine.pool.check_integrity()
