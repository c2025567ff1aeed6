"""KV cache events in vLLM's wire format, so that routers built for vLLM (vllm-router's
`kv_aware` policy) know which replica holds which blocks. The only module that knows it.

The format is vLLM 0.29's (`vllm/distributed/kv_events.py`), which vllm-router 0.1.17
decodes: each engine step's events go out as one ZeroMQ multipart message on a PUB
socket, `(topic, sequence number as 8 bytes big-endian, payload)`, the topic empty and
the sequence counting from 0. The payload is msgpack of `KVEventBatch`:

    [ts, [event, ...], data_parallel_rank]        (an array: array_like)
    event = {"type": "BlockStored", "block_hashes": [...], "parent_block_hash": ...,
             "token_ids": [...], "block_size": B, "lora_id": None, "medium": "GPU",
             "lora_name": None}
          | {"type": "BlockRemoved", "block_hashes": [...], "medium": "GPU"}
          | {"type": "AllBlocksCleared"}

Field order and options follow vLLM's structs (msgspec `tag=True`, `omit_defaults`);
fields vLLM gives no default are always sent. A block's hash is its prefix-cache key's
last 8 bytes as an unsigned integer (vLLM's `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES`);
`parent_block_hash` is the previous block's, None for a prompt's first. vllm-router
matches requests by the `token_ids` it is sent, so the hashes need only be stable ids.

Every medium that holds a block announces it: "GPU" the engine's pool, "CPU" the host
tier (a block evicted from the pool and kept in host memory is removed from "GPU" and
stored as "CPU"), "STORAGE" the disk tier (written through as computed); each with the
block's own parent and token ids. The shared remote tier is not announced: every replica
reads it alike, so it tells a router nothing about where to send a request. Blocks a
disk tier holds from an earlier process are announced when a request loads them (the
pool's copy, then the disk's and the host's).

A replay socket (ZeroMQ ROUTER) answers `["", start sequence]` with every buffered
batch from there, `[identity, "", topic, seq, payload]` each, then the end marker
`[identity, "", "", ff×8, ""]`. `AllBlocksCleared` is the first batch.
"""

import threading
import time
from collections import deque

import msgspec
import zmq

# where a block is, by kvforge's tier names, as vLLM names the medium: "GPU" is the
# engine's own pool (on a CPU too), "CPU" host memory its offloading tier
MEDIUM = {"device": "GPU", "host": "CPU", "disk": "STORAGE"}
END_SEQ = (-1).to_bytes(8, "big", signed=True)
REPLAY_BUFFER = 10_000  # batches kept for replay


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """vLLM's base of the events (a map tagged "type": the class name)."""


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


def block_hash(key: bytes) -> int:
    """A prefix-cache key as vLLM sends a block hash: its last 8 bytes, unsigned."""
    return int.from_bytes(key[-8:], "big")


class KVEvents:
    """What the KV cache manager and the lower tiers record during a step: blocks stored
    and removed, in order, each with the medium that holds it; `take` hands them over
    (the publisher sends them as one batch).

    A block that moves to a lower tier is announced again with that tier's medium, with
    its parent and token ids as first stored: they are remembered while some medium
    holds the block (and until the end of the step it left the last one in, so that a
    block evicted from the pool and spilled to host memory in the same step is known).
    A tier may take a block before the cache announces it (one loaded from disk or the
    remote tier is kept in host memory on the way): that copy is announced right after
    the block itself. A medium is told removed only of what it announced."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._events: list[KVCacheEvent] = []
        self._known: dict[bytes, tuple[bytes | None, list[int], set[str]]] = {}
        self._left: list[bytes] = []  # blocks no medium holds now: forgotten at `take`
        self._early: dict[bytes, set[str]] = {}  # tiers holding blocks not announced yet

    def stored(self, keys: list[bytes], parent: bytes | None, token_ids: list[int],
               tier: str = "device") -> None:  # fmt: skip
        if not keys:
            return
        self._events.append(BlockStored(
            [block_hash(k) for k in keys], None if parent is None else block_hash(parent),
            list(token_ids), self.block_size, None, MEDIUM[tier], None,
        ))  # fmt: skip
        bs = self.block_size
        for i, key in enumerate(keys):
            media = self._known.get(key, (None, None, set()))[2]
            media.add(tier)
            self._known[key] = (keys[i - 1] if i else parent, token_ids[i * bs : (i + 1) * bs],
                                media)  # fmt: skip
        for key in keys:
            for early in sorted(self._early.pop(key, ())):
                self.copied(key, early)

    def copied(self, key: bytes, tier: str) -> None:
        """A block the cache announced is now held by `tier` too ("host", "disk")."""
        known = self._known.get(key)
        if known is None:
            self._early.setdefault(key, set()).add(tier)
        elif tier not in known[2]:
            self.stored([key], known[0], known[1], tier)

    def removed(self, keys: list[bytes], tier: str = "device") -> None:
        gone = []
        for key in keys:
            known = self._known.get(key)
            if known is None or tier not in known[2]:  # never announced there
                early = self._early.get(key)
                if early is not None:
                    early.discard(tier)
                    if not early:
                        del self._early[key]
                continue
            gone.append(key)
            known[2].discard(tier)
            if not known[2]:
                self._left.append(key)
        if gone:
            self._events.append(BlockRemoved([block_hash(k) for k in gone], MEDIUM[tier]))

    def cleared(self) -> None:
        self._events.append(AllBlocksCleared())

    def take(self) -> list[KVCacheEvent]:
        events, self._events = self._events, []
        for key in self._left:
            if key in self._known and not self._known[key][2]:
                del self._known[key]
        self._left = []
        return events


class EventPublisher:
    """Sends event batches on a bound PUB socket and keeps them for replay."""

    def __init__(self, endpoint: str, replay_endpoint: str | None = None,
                 data_parallel_rank: int = 0) -> None:  # fmt: skip
        self.rank = data_parallel_rank
        self._encoder = msgspec.msgpack.Encoder()
        self._context = zmq.Context()
        self._pub = self._context.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.bind(endpoint)
        self._seq = 0
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=REPLAY_BUFFER)
        self._lock = threading.Lock()
        self._replay = None
        if replay_endpoint is not None:
            self._replay = self._context.socket(zmq.ROUTER)
            self._replay.setsockopt(zmq.LINGER, 0)
            self._replay.bind(replay_endpoint)
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._serve_replay, daemon=True,
                                            name="kvforge-kv-events-replay")  # fmt: skip
            self._thread.start()

    def publish(self, events: list[KVCacheEvent]) -> None:
        if not events:
            return
        payload = self._encoder.encode(KVEventBatch(time.time(), events, self.rank))
        with self._lock:
            seq = self._seq
            self._seq += 1
            self._buffer.append((seq, payload))
        self._pub.send_multipart((b"", seq.to_bytes(8, "big"), payload))

    def _serve_replay(self) -> None:
        poller = zmq.Poller()
        poller.register(self._replay, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            frames = self._replay.recv_multipart()
            if len(frames) != 3:  # identity, "", start
                continue
            identity, _, start = frames
            start_seq = int.from_bytes(start, "big")
            with self._lock:
                batches = [(s, p) for s, p in self._buffer if s >= start_seq]
            for seq, payload in batches:
                self._replay.send_multipart((identity, b"", b"", seq.to_bytes(8, "big"), payload))
            self._replay.send_multipart((identity, b"", b"", END_SEQ, b""))

    def close(self) -> None:
        if self._replay is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._replay.close()
        self._pub.close()
        self._context.term()
