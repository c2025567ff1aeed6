"""Lower tiers of the prefix cache: blocks evicted from the device pool go to a bounded
host-memory LRU, and from there to a bounded directory on disk (LRU by file time); a
shared remote tier (`remote`, Redis) sits below both.

    device pool ──evicted block──▶ HostTier ──evicted block──▶ DiskTier
    device pool ──every computed block (write-through)───────▶ DiskTier
    device pool ◀──a later prefix hit loads it back, no recompute── either tier

The disk tier is written through (each block as soon as it is computed and
cached), so a new process over the same directory finds every block an
earlier one computed, not only those it happened to evict.

Entries are keyed by the prefix cache's chained keys (`prefix_cache`), which
already name the model, codec and block size: an entry of another model can
never be asked for. A disk entry also records its block's shape and dtype, and
a SHA-256 of its bytes; it is written to a temporary name and renamed, so a
reader sees a whole file or none. A missing, truncated or corrupted file, or
one of another shape or dtype, is a miss (and is deleted), never wrong output.
"""

import contextlib
import hashlib
import json
import os
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

MAGIC = b"KVFORGE-BLOCK-1\n"
REMOTE_RUN = 16  # blocks asked of the remote tier in one round trip
SUFFIX = ".kvblock"


def _dtype_name(dtype: torch.dtype) -> str:
    """torch's own name ("float32", "uint8" for packed blocks), as a file records it."""
    return str(dtype).removeprefix("torch.")


def encode_block(key: bytes, block: torch.Tensor) -> bytes:
    """A block as the disk and remote tiers keep it: a magic line, a JSON header (its key,
    dtype, shape, and the SHA-256 of its bytes), then its bytes."""
    payload = block.contiguous().view(torch.uint8).numpy().tobytes()  # any dtype
    header = {
        "key": key.hex(),
        "dtype": _dtype_name(block.dtype),
        "shape": list(block.shape),
        "sha256": hashlib.sha256(payload).hexdigest(),
    }
    head = json.dumps(header).encode()
    return MAGIC + len(head).to_bytes(4, "little") + head + payload


def decode_block(data: bytes, key: bytes, shape, dtype: torch.dtype) -> torch.Tensor | None:
    """The block `encode_block` wrote for `key`, or None if `data` is not exactly that
    (another key, shape or dtype, a bad checksum, truncated, garbage)."""
    try:
        if not data.startswith(MAGIC):
            return None
        at = len(MAGIC)
        head_len = int.from_bytes(data[at : at + 4], "little")
        header = json.loads(data[at + 4 : at + 4 + head_len])
        payload = data[at + 4 + head_len :]
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(header, dict):
        return None
    expected = {"key": key.hex(), "dtype": _dtype_name(dtype), "shape": list(shape)}
    if any(header.get(k) != v for k, v in expected.items()):
        return None
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        return None
    if len(payload) != torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size():
        return None
    return torch.frombuffer(bytearray(payload), dtype=dtype).view(shape)


class DiskTier:
    """Blocks as files `<key hex>.kvblock` in `directory`, at most `capacity` of them."""

    def __init__(self, directory: str | Path, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"the disk tier needs room for at least one block, got {capacity}")
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.capacity = capacity
        for leftover in self.directory.glob(f".tmp-*{SUFFIX}"):  # a crashed write
            leftover.unlink(missing_ok=True)
        files = sorted(self.directory.glob(f"[!.]*{SUFFIX}"), key=lambda f: f.stat().st_mtime)
        self._lru: OrderedDict[str, None] = OrderedDict((f.stem, None) for f in files)
        self.num_writes = self.num_reads = self.num_rejected = self.num_evictions = 0
        self.num_write_errors = 0
        self.events = None  # a `kvforge.events.KVEvents` told what comes and goes, if any
        self._evict_over_capacity()

    def __len__(self) -> int:
        return len(self._lru)

    def __contains__(self, key: bytes) -> bool:
        return key.hex() in self._lru

    def put(self, key: bytes, block: torch.Tensor) -> None:
        name = key.hex()
        if name in self._lru:
            self._lru.move_to_end(name)
            return
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=SUFFIX)
            with os.fdopen(fd, "wb") as f:
                f.write(encode_block(key, block))
            os.replace(tmp, self._path(name))  # atomic: readers see all of it or nothing
        except OSError:  # disk full, directory gone, read-only: the cache is best effort
            self.num_write_errors += 1
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            return
        self._lru[name] = None
        self.num_writes += 1
        if self.events is not None:
            self.events.copied(key, "disk")
        self._evict_over_capacity()

    def get(self, key: bytes, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """The block, or None if it is absent or fails any check (then its file is removed)."""
        name = key.hex()
        if name not in self._lru:
            return None
        block = self._read(name, shape, dtype)
        if block is None:
            self.num_rejected += 1
            self._remove(name)
            return None
        self._lru.move_to_end(name)
        if self.events is not None:  # one an earlier process wrote is news to the router
            self.events.copied(key, "disk")
        with contextlib.suppress(OSError):  # gone meanwhile: the block was read whole
            os.utime(self._path(name))  # the file time is the LRU order across restarts
        self.num_reads += 1
        return block

    def _read(self, name: str, shape, dtype) -> torch.Tensor | None:
        try:
            data = self._path(name).read_bytes()
        except OSError:
            return None
        return decode_block(data, bytes.fromhex(name), shape, dtype)

    def _evict_over_capacity(self) -> None:
        while len(self._lru) > self.capacity:
            name, _ = self._lru.popitem(last=False)
            self._path(name).unlink(missing_ok=True)
            self.num_evictions += 1
            self._left(name)

    def _remove(self, name: str) -> None:
        self._lru.pop(name, None)
        self._path(name).unlink(missing_ok=True)
        self._left(name)

    def _left(self, name: str) -> None:
        if self.events is not None:
            self.events.removed([bytes.fromhex(name)], "disk")

    def _path(self, name: str) -> Path:
        return self.directory / f"{name}{SUFFIX}"


class HostTier:
    """At most `capacity` blocks in host memory, least recently used evicted first —
    to `lower` (the disk tier) when there is one."""

    def __init__(self, capacity: int, lower: DiskTier | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"the host tier needs room for at least one block, got {capacity}")
        self.capacity = capacity
        self.lower = lower
        self._blocks: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.num_puts = self.num_evictions = 0
        self.events = None  # a `kvforge.events.KVEvents` told what comes and goes, if any

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, key: bytes) -> bool:
        return key in self._blocks

    def put(self, key: bytes, block: torch.Tensor) -> None:
        if key in self._blocks:
            self._blocks.move_to_end(key)
            return
        self._blocks[key] = block
        self.num_puts += 1
        if self.events is not None:
            self.events.copied(key, "host")
        while len(self._blocks) > self.capacity:
            old_key, old_block = self._blocks.popitem(last=False)
            self.num_evictions += 1
            if self.events is not None:
                self.events.removed([old_key], "host")
            if self.lower is not None:
                self.lower.put(old_key, old_block)

    def get(self, key: bytes) -> torch.Tensor | None:
        block = self._blocks.get(key)
        if block is not None:
            self._blocks.move_to_end(key)
        return block


class TieredBlocks:
    """The lower tiers together: where an evicted block goes, and where a miss looks —
    host memory, then disk, then the shared remote tier (`kvcache.remote`). Blocks are
    the store's `read_blocks` rows: `block_shape` and `dtype` each."""

    def __init__(self, host: HostTier | None, disk: DiskTier | None,
                 block_shape: tuple[int, ...], dtype: torch.dtype,
                 remote=None) -> None:  # fmt: skip
        self.host, self.disk, self.remote = host, disk, remote
        self.block_shape, self.dtype = tuple(block_shape), dtype
        # blocks loaded back into the device pool
        self.num_loaded = {"host": 0, "disk": 0, "remote": 0}

    def watch(self, events) -> None:
        """Tell `events` (a `kvforge.events.KVEvents`) of every block the host and disk
        tiers take in and let go. The remote tier is not announced: every replica reads
        it alike, so it says nothing about where to route."""
        for tier in (self.host, self.disk):
            if tier is not None:
                tier.events = events

    @property
    def writes_through(self) -> bool:
        """Whether newly cached blocks are written through at once (`persist`) to disk and
        the remote tier: so that a new process over the same directory, or another replica
        over the same server, finds every block this one computed, not only those it
        happened to evict."""
        return self.disk is not None or self.remote is not None

    def persist(self, key: bytes, block: torch.Tensor) -> None:
        if self.disk is not None:
            self.disk.put(key, block)
        if self.remote is not None:
            self.remote.put(key, block)

    def fetch_run(self, keys: list[bytes]) -> list[tuple[torch.Tensor, str]]:
        """(block, "host", "disk" or "remote") of the leading `keys` the tiers hold, up to
        the first they do not. The remote tier is asked for runs of blocks in one round
        trip each (`RemoteTier.get_many`), not one block at a time."""
        found: list[tuple[torch.Tensor, str]] = []
        shape, dtype = self.block_shape, self.dtype
        while len(found) < len(keys):
            key = keys[len(found)]
            local = self._local(key, shape, dtype)
            if local is not None:
                found.append(local)
                continue
            if self.remote is None:
                break
            asked = keys[len(found) : len(found) + REMOTE_RUN]
            run = self.remote.get_many(asked, shape, dtype)  # the leading ones it holds
            for k, block in zip(asked[: len(run)], run, strict=True):
                if self.host is not None:
                    self.host.put(k, block)
                found.append((block, "remote"))
            if len(run) < REMOTE_RUN:
                break
        return found

    def loaded(self, sources: list[str]) -> None:
        """Count blocks a request actually loaded (a lookup whose request then waited
        for free blocks, and looked again, counts once)."""
        for source in sources:
            self.num_loaded[source] += 1

    def put(self, key: bytes, block: torch.Tensor) -> None:
        """A block evicted from the device pool (the remote tier has it already)."""
        if self.host is not None:
            self.host.put(key, block)
        elif self.disk is not None:
            self.disk.put(key, block)

    def _local(self, key: bytes, shape, dtype) -> tuple[torch.Tensor, str] | None:
        """(block, "host" or "disk"), or None. A disk hit is kept in host memory too."""
        if self.host is not None:
            block = self.host.get(key)
            if block is not None:
                return block, "host"
        if self.disk is not None:
            block = self.disk.get(key, shape, dtype)
            if block is not None:
                if self.host is not None:
                    self.host.put(key, block)
                return block, "disk"
        return None

    def close(self) -> None:
        if self.remote is not None:
            self.remote.close()

    def stats(self) -> dict:
        out = {}
        if self.host is not None:
            host = self.host
            out["host_blocks"], out["host_puts"] = len(host), host.num_puts
            out["host_hits"], out["host_evictions"] = self.num_loaded["host"], host.num_evictions
        if self.disk is not None:
            disk = self.disk
            out["disk_blocks"], out["disk_writes"] = len(disk), disk.num_writes
            out["disk_reads"], out["disk_rejected"] = disk.num_reads, disk.num_rejected
            out["disk_hits"], out["disk_evictions"] = self.num_loaded["disk"], disk.num_evictions
            out["disk_write_errors"] = disk.num_write_errors
        if self.remote is not None:
            remote = self.remote
            out["remote_pending_writes"] = remote.pending_writes
            out["remote_hits"] = self.num_loaded["remote"]
            out.update({f"remote_op_{op}": n for op, n in remote.ops.items()})
        return out
