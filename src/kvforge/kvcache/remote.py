"""The shared remote tier of the prefix cache: blocks in Redis (or Valkey), which every
replica pointed at the same server reads and writes, so that a prefix one replica
computed is loaded, not recomputed, by the others.

    device pool ──every computed block──▶ queue ──writer thread──▶ SET kvforge:<key hex>
    device pool ◀──a prefix hit below the host and disk tiers── MGET kvforge:<key hex> ...

Keys are the prefix cache's chained keys (`prefix_cache`): they name the model, the
codec (with its rotation and skipped layers), the block size and the request's salt,
so replicas share exactly the blocks that are the same bytes, tenants never do. A
value is a block as the disk tier stores it (`tiers.encode_block`: header with key,
shape, dtype and SHA-256, then the bytes).

Best effort, always: writes leave the engine's step at once (a bounded queue drained by
one thread; when it is full the block is dropped, counted); a read that fails, times
out or returns anything but a whole, matching block is a miss, counted, never an error
and never wrong output — and the block, computed again, is written again. After a
connection error or a timeout the tier stays quiet for `retry_after` seconds (every read
a miss, no wait), so a Redis that is down costs one timeout, not one per block; other
errors (a full server refusing a write) are counted and the next call tries again. Eviction is
Redis's own (`maxmemory` with `maxmemory-policy allkeys-lru`).
"""

import queue
import threading
import time
from urllib.parse import urlsplit, urlunsplit

import torch

from kvforge.kvcache.tiers import decode_block, encode_block

PREFIX = b"kvforge:"
SCHEMES = ("redis", "rediss", "valkey", "valkeys", "unix")
OPS = ("hit", "miss", "reject", "read_error", "put", "write_error", "dropped")


def redis_url(url: str) -> str:
    """`url` as the redis client takes it (valkey:// is redis://); ValueError if it is
    not one."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES or not (parts.hostname or parts.path):
        raise ValueError(
            f"kv_remote must be a redis://HOST:PORT/DB or valkey://HOST:PORT/DB URL, got {url!r}"
        )
    if parts.query or parts.fragment:  # client options (decode_responses, timeouts) are ours
        raise ValueError(f"kv_remote takes no ?options, got {url!r}")
    scheme = {"valkey": "redis", "valkeys": "rediss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, *parts[1:]))


class RemoteTier:
    """Blocks in a Redis server, written through by a background thread."""

    def __init__(self, url: str, *, timeout_s: float = 0.5, retry_after: float = 5.0,
                 max_pending_bytes: int = 256 << 20) -> None:  # fmt: skip
        import redis  # the client library is needed only when the tier is asked for

        self.url = url
        self._client = redis.Redis.from_url(
            redis_url(url), socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        # the server unreachable or too slow: stay quiet a while (any other error, such as
        # a full server refusing a write, is counted and the next call tries again)
        self._outages = (redis.ConnectionError, redis.TimeoutError, OSError)
        self.retry_after = retry_after
        self.max_pending_bytes = max_pending_bytes
        self.ops = dict.fromkeys(OPS, 0)
        self._down_until = 0.0
        self._queue: queue.Queue[tuple[bytes, torch.Tensor] | None] = queue.Queue()
        self._pending_bytes = 0
        self._lock = threading.Lock()
        self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                        name="kvforge-remote-tier")  # fmt: skip
        self._writer.start()

    @property
    def pending_writes(self) -> int:
        """Blocks queued for writing whose write has not finished."""
        return self._queue.unfinished_tasks

    def put(self, key: bytes, block: torch.Tensor) -> None:
        """Queue `block` (a copy the caller no longer writes to) for writing."""
        size = block.numel() * block.element_size()
        with self._lock:
            if self._pending_bytes + size > self.max_pending_bytes:
                self.ops["dropped"] += 1  # under the lock: the writer counts drops too
                return
            self._pending_bytes += size
        self._queue.put((key, block))

    def get_many(self, keys: list[bytes], shape, dtype: torch.dtype) -> list[torch.Tensor]:
        """The leading blocks of `keys` the server holds, whole and matching, up to the
        first it does not (absent, unreachable, anything else under the key): one MGET."""
        if not keys:
            return []
        if time.monotonic() < self._down_until:
            self.ops["miss"] += 1
            return []
        try:
            values = self._client.mget([PREFIX + key.hex().encode() for key in keys])
        except Exception as exc:  # whatever the client raises: a miss, counted
            self._failed("read_error", exc)
            return []
        blocks = []
        for key, data in zip(keys, values, strict=True):
            try:
                block = None if data is None else decode_block(data, key, shape, dtype)
            except Exception:  # anything at all under the key is a miss, never an error
                block = None
            if block is None:
                # a reject is computed again, and written again over the bad value
                self.ops["miss" if data is None else "reject"] += 1
                break
            self.ops["hit"] += 1
            blocks.append(block)
        return blocks

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every queued write was sent (or failed); False if time ran out."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)
        return not self._queue.unfinished_tasks

    def close(self) -> None:
        self._queue.put(None)
        self._writer.join(timeout=5)
        self._client.close()

    def _failed(self, op: str, exc: Exception) -> None:
        self.ops[op] += 1
        if isinstance(exc, self._outages):
            self._down_until = time.monotonic() + self.retry_after

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            key, block = item
            try:
                if time.monotonic() < self._down_until:
                    with self._lock:
                        self.ops["dropped"] += 1
                    continue
                try:
                    self._client.set(PREFIX + key.hex().encode(), encode_block(key, block))
                    self.ops["put"] += 1
                except Exception as exc:  # down, slow, full (OOM, no eviction policy)...
                    self._failed("write_error", exc)
            finally:
                with self._lock:
                    self._pending_bytes -= block.numel() * block.element_size()
                self._queue.task_done()
        self._queue.task_done()
