"""KV cache events in vLLM's wire format, read as a router reads them: a pyzmq SUB socket
on the engine's PUB endpoint, decoded with msgspec structs written here from vLLM 0.29's
definitions (`vllm/distributed/kv_events.py`), not imported from kvforge. A scripted
sequence of requests gives exact events: hashes, parents, token ids, evictions."""

import contextlib
import time

import httpx
import msgspec
import pytest
import zmq

from kvforge import LLM, SamplingParams
from process_util import free_port, served

BLOCK = 4


# --- vLLM 0.29's structs, as vLLM defines them ---------------------------------------


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    pass


class BlockStored(KVCacheEvent):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int | bytes]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


DECODER = msgspec.msgpack.Decoder(KVEventBatch)


@pytest.fixture()
def endpoints():
    return f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"


def _receive(sub, timeout_s: float = 5.0) -> list[tuple[int, KVEventBatch]]:
    """Every batch waiting on `sub`: (sequence number, batch)."""
    out = []
    deadline = time.monotonic() + timeout_s
    while sub.poll(200 if out else int((deadline - time.monotonic()) * 1000)):
        topic, seq, payload = sub.recv_multipart()
        assert topic == b"" and len(seq) == 8
        out.append((int.from_bytes(seq, "big"), DECODER.decode(payload)))
    return out


@contextlib.contextmanager
def _subscriber(endpoint: str):
    """A SUB socket on `endpoint`, joined before the test's requests."""
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    time.sleep(0.3)  # a SUB socket misses what was sent before it joined
    try:
        yield sub
    finally:
        sub.close()
        context.term()


def _key_hash(key: bytes) -> int:
    return int.from_bytes(key[-8:], "big")


def test_stores_and_evictions_are_published_exactly(endpoints):
    endpoint, replay = endpoints
    llm = LLM(model="random", device="cpu", block_size=BLOCK, num_blocks=8,
              kv_events_endpoint=endpoint, kv_events_replay_endpoint=replay)  # fmt: skip
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    time.sleep(0.3)  # a SUB socket misses what was sent before it joined: replay has it
    try:
        prompt = [256, *range(65, 65 + 10)]  # 11 tokens: 2 full blocks and 3 more
        params = SamplingParams(max_tokens=2, ignore_eos=True)
        out = llm.generate([prompt], params)[0]
        batches = _receive(sub)
        events = [e for _, b in batches for e in b.events]
        stored = [e for e in events if isinstance(e, BlockStored)]
        tokens = prompt + out.token_ids
        # the prompt's 2 full blocks in one event, then the block completed by generation
        assert [e.token_ids for e in stored] == [tokens[:8], tokens[8:12]]
        assert all(e.block_size == BLOCK and e.medium == "GPU" for e in stored)
        assert all(e.lora_id is None and e.lora_name is None for e in stored)
        assert stored[0].parent_block_hash is None
        assert stored[1].parent_block_hash == stored[0].block_hashes[-1]
        assert len(stored[0].block_hashes) == 2 and len(stored[1].block_hashes) == 1
        pool = llm.engine.manager.pool  # the prefix cache's keys of the blocks
        keys = [pool.key_of(b) for b in range(8)]
        announced = stored[0].block_hashes + stored[1].block_hashes
        assert set(announced) <= {_key_hash(k) for k in keys if k is not None}
        assert all(b.data_parallel_rank == 0 and b.ts > 0 for _, b in batches)

        # a second prompt needs every block: the cached ones are evicted, oldest first
        llm.generate([[256, *range(97, 97 + 27)]], params)
        later = [e for _, b in _receive(sub) for e in b.events]
        removed = [h for e in later if isinstance(e, BlockRemoved) for h in e.block_hashes]
        assert sorted(removed) == sorted(announced)
        assert all(e.medium == "GPU" for e in later if isinstance(e, BlockRemoved))

        # replay from the start: AllBlocksCleared first, then every batch, in order
        dealer = context.socket(zmq.DEALER)
        dealer.connect(replay)
        dealer.send_multipart((b"", (0).to_bytes(8, "big")))
        replayed = []
        while True:
            assert dealer.poll(5000)
            empty, topic, seq, payload = dealer.recv_multipart()
            assert empty == b"" and topic == b""
            if seq == (-1).to_bytes(8, "big", signed=True):
                break
            replayed.append((int.from_bytes(seq, "big"), DECODER.decode(payload)))
        assert [s for s, _ in replayed] == list(range(len(replayed)))
        assert replayed[0][1].events == [AllBlocksCleared()]
        assert [e for _, b in replayed[1:] for e in b.events] == events + later
        dealer.close()
    finally:
        sub.close()
        context.term()
        llm.engine.kv_events.close()


def test_the_hash_is_the_prefix_key_and_parents_chain(endpoints):
    endpoint, _ = endpoints
    llm = LLM(model="random", device="cpu", block_size=BLOCK, num_blocks=32,
              kv_events_endpoint=endpoint)  # fmt: skip
    with _subscriber(endpoint) as sub:
        shared = [256, *range(65, 65 + 11)]  # 12 tokens: 3 blocks
        llm.generate([[*shared, 70]], SamplingParams(max_tokens=1, ignore_eos=True))
        first = [e for _, b in _receive(sub) for e in b.events if isinstance(e, BlockStored)]
        llm.generate([[*shared, 80, 81, 82, 83, 84]],
                     SamplingParams(max_tokens=1, ignore_eos=True))  # fmt: skip
        second = [e for _, b in _receive(sub) for e in b.events if isinstance(e, BlockStored)]
        # the shared 3 blocks were announced once; the new one hangs under the last of them
        assert first[0].token_ids[:12] == shared
        assert second[0].parent_block_hash == first[0].block_hashes[2]
        assert second[0].token_ids == [80, 81, 82, 83]
        # a block's hash: the last 8 bytes of its SHA-256 prefix key, unsigned
        pool = llm.engine.manager.pool
        keys = {_key_hash(pool.key_of(b)) for b in range(32) if pool.key_of(b) is not None}
        assert {h for e in first + second for h in e.block_hashes} <= keys
    llm.engine.kv_events.close()


def test_tiers_announce_their_copies_with_their_medium(endpoints, tmp_path):
    """A block written through to disk is stored again as "STORAGE"; one evicted from the
    pool is removed from "GPU" and stored as "CPU" (host memory); the host tier's own
    evictions remove it there. Parents and token ids are the block's own each time."""
    endpoint, _ = endpoints
    llm = LLM(model="random", device="cpu", block_size=BLOCK, num_blocks=8,
              host_cache_memory=2 * llm_block_bytes(), disk_cache_dir=str(tmp_path),
              kv_events_endpoint=endpoint)  # fmt: skip
    with _subscriber(endpoint) as sub:
        params = SamplingParams(max_tokens=1, ignore_eos=True)
        prompt = [256, *range(65, 65 + 8)]  # 9 tokens: 2 full blocks
        llm.generate([prompt], params)
        events = [e for _, b in _receive(sub) for e in b.events]
        gpu = [e for e in events if isinstance(e, BlockStored) and e.medium == "GPU"]
        disk = [e for e in events if isinstance(e, BlockStored) and e.medium == "STORAGE"]
        assert [e.token_ids for e in gpu] == [prompt[:8]]
        hashes = gpu[0].block_hashes
        assert [(e.block_hashes, e.token_ids) for e in disk] == [
            ([hashes[0]], prompt[:4]), ([hashes[1]], prompt[4:8])]  # fmt: skip
        assert [e.parent_block_hash for e in disk] == [None, hashes[0]]

        # another prompt needs every block: both cached ones leave the pool for host memory
        llm.generate([[257, *range(97, 97 + 30)]], params)  # 31 tokens: all 8 blocks
        later = [e for _, b in _receive(sub) for e in b.events]
        removed_gpu = [h for e in later if isinstance(e, BlockRemoved) and e.medium == "GPU"
                       for h in e.block_hashes]  # fmt: skip
        host = [e for e in later if isinstance(e, BlockStored) and e.medium == "CPU"]
        assert set(hashes) <= set(removed_gpu)
        assert {h: (e.parent_block_hash, e.token_ids) for e in host for h in e.block_hashes
                if h in hashes} == {hashes[0]: (None, prompt[:4]),
                                    hashes[1]: (hashes[0], prompt[4:8])}  # fmt: skip
        # the host tier holds 2 blocks: the later prompt's own evictions push ours out
        removed_host = [h for e in later if isinstance(e, BlockRemoved) and e.medium == "CPU"
                        for h in e.block_hashes]  # fmt: skip
        stored_host = [h for e in host for h in e.block_hashes]
        assert len(stored_host) - len(removed_host) == len(llm.engine.tiers.host)
    llm.engine.kv_events.close()


def test_blocks_loaded_from_an_earlier_disk_are_announced_with_their_host_copy(endpoints, tmp_path):
    """A new engine over a disk an earlier one filled: a prompt's blocks load from disk
    into host memory on their way to the pool. The pool's copy is announced, then the
    disk's and the host's, each with the block's parent and tokens; nothing unannounced
    is removed."""
    endpoint, _ = endpoints
    prompt = [256, *range(65, 65 + 8)]  # 9 tokens: 2 full blocks
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    LLM(model="random", device="cpu", block_size=BLOCK, num_blocks=8,
        disk_cache_dir=str(tmp_path)).generate([prompt], params)  # fmt: skip
    llm = LLM(model="random", device="cpu", block_size=BLOCK, num_blocks=8,
              host_cache_memory=2 * llm_block_bytes(), disk_cache_dir=str(tmp_path),
              kv_events_endpoint=endpoint)  # fmt: skip
    with _subscriber(endpoint) as sub:
        assert llm.generate([prompt], params)[0].metrics.cached_tokens_disk == 8
        events = [e for _, b in _receive(sub) for e in b.events]
    llm.engine.kv_events.close()
    stored = [(e.medium, e.block_hashes, e.parent_block_hash, e.token_ids)
              for e in events if isinstance(e, BlockStored)]  # fmt: skip
    gpu = stored[0]
    assert gpu[0] == "GPU" and gpu[2] is None and gpu[3] == prompt[:8]
    first, second = gpu[1]
    assert stored[1:] == [("STORAGE", [first], None, prompt[:4]),
                          ("CPU", [first], None, prompt[:4]),
                          ("STORAGE", [second], first, prompt[4:8]),
                          ("CPU", [second], first, prompt[4:8])]  # fmt: skip
    assert not [e for e in events if isinstance(e, BlockRemoved)]


def llm_block_bytes() -> int:
    """The bytes of one KV block of the random model at BLOCK tokens, fp32."""
    probe = LLM(model="random", device="cpu", block_size=BLOCK, num_blocks=2)
    return probe.kv_stats()["bytes_per_token"] * BLOCK


def test_bad_endpoints_are_refused_by_name():
    from kvforge.errors import KVForgeError

    with pytest.raises(KVForgeError, match="kv_events_replay_endpoint needs kv_events_endpoint"):
        LLM(model="random", num_blocks=8, kv_events_replay_endpoint="tcp://127.0.0.1:1")
    with pytest.raises(KVForgeError, match="cannot publish KV events at 'nonsense'"):
        LLM(model="random", num_blocks=8, kv_events_endpoint="nonsense")
    with pytest.raises(KVForgeError, match="needs prefix caching"):
        LLM(model="random", num_blocks=8, kv_events_endpoint="tcp://127.0.0.1:1",
            enable_prefix_caching=False)  # fmt: skip


def test_kvforge_serve_publishes_from_its_engine_process(endpoints):
    endpoint, _ = endpoints
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        args = ("--model", "random", "--device", "cpu", "--kv-memory", "4MiB",
                "--kv-events-endpoint", endpoint)  # fmt: skip
        with served(*args) as (_, url):
            sub.connect(endpoint)
            time.sleep(0.3)
            prompt = [256, *range(65, 65 + 40)]  # 41 tokens: 2 full 16-token blocks
            body = {"model": "kvforge-builtin-untrained", "prompt": prompt, "max_tokens": 1}
            assert httpx.post(f"{url}/v1/completions", json=body).status_code == 200
            events = [e for _, b in _receive(sub) for e in b.events]
        stored = [e for e in events if isinstance(e, BlockStored)]
        assert [e.token_ids for e in stored] == [prompt[:32]]
        assert stored[0].block_size == 16 and stored[0].parent_block_hash is None
    finally:
        sub.close()
        context.term()
