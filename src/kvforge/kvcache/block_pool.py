"""The pool of physical KV blocks: reference counts and the free queue.

Pure bookkeeping, no tensors: a block id names a slice of the KV store that the
store owns; this module only decides which ids are in use and which are free.
"""

from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable


class NoFreeBlocksError(RuntimeError):
    """`allocate` asked for more blocks than are free.

    Internal: the scheduler checks `num_free` before allocating, so reaching this
    is a bug in the caller, not something a user can cause.
    """


class IntegrityError(RuntimeError):
    """The pool's reference counts and free queue disagree (a bookkeeping bug)."""


class BlockPool:
    """A fixed set of KV block ids 0..num_blocks-1 with reference counts and a free queue.

    Invariant: a block is either free (ref_count 0, in the free queue exactly
    once) or used (ref_count > 0, not in the queue). `allocate` pops from the
    HEAD of the queue and `release` appends blocks that drop to 0 at the TAIL, so
    the queue is in eviction order: the block freed longest ago is reused first.
    The queue starts as 0, 1, 2, ..., num_blocks-1.

    Prefix caching: a block may also hold a cache entry, a key (see
    `prefix_cache`) naming the tokens whose K/V it holds. A cached block stays
    cached while used and after it is freed; a free cached block is reused
    last-freed-last like any other, and reusing it evicts the entry
    (`on_evict` is told first, so a lower tier can copy it). A hit (`take`) pulls
    a free cached block out of the middle of the queue, which is why the queue
    is an OrderedDict (O(1) removal). Callers releasing a whole request release
    its blocks tail first (see `BlockTable.release`): its head blocks, the
    prefix most likely to be shared, then sit nearest the tail and are evicted
    last.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise ValueError(f"a block pool needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self._ref_counts = [0] * num_blocks
        # Values are unused; the dict is an ordered set with O(1) removal anywhere.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._key_of: dict[int, bytes] = {}  # cached block -> its key
        self._block_of: dict[bytes, int] = {}  # key -> the block holding it
        self._parent_of: dict[int, bytes | None] = {}  # cached block -> the key before it
        self.num_evictions = 0
        self.on_evict: Callable[[int, bytes], None] | None = None

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks with ref_count > 0."""
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks holding a cache entry, used or free."""
        return len(self._key_of)

    @property
    def num_cached_free(self) -> int:
        """Free blocks that still hold a cache entry (reusable at once, or evictable)."""
        return sum(1 for b in self._key_of if self._ref_counts[b] == 0)

    # --- prefix cache ---------------------------------------------------------------

    def lookup(self, key: bytes) -> int | None:
        """The block holding `key`, or None."""
        return self._block_of.get(key)

    def key_of(self, block_id: int) -> bytes | None:
        return self._key_of.get(block_id)

    def parent_of(self, block_id: int) -> bytes | None:
        """The key of the block before this cached one in its prefix (None: the first)."""
        return self._parent_of.get(block_id)

    def cache(self, block_id: int, key: bytes, parent: bytes | None = None) -> bool:
        """Record that the used block `block_id` holds the K/V of `key` (`parent`: the key
        of the block before it in its prefix, None for a first block).

        A key already held by another block keeps that block, and a block holds
        one key: either way nothing changes and the answer is False.
        """
        self._check_id(block_id)
        if self._ref_counts[block_id] == 0:
            raise ValueError(f"cannot cache block {block_id}: it is free")
        if key in self._block_of or block_id in self._key_of:
            return False
        self._block_of[key] = block_id
        self._key_of[block_id] = key
        self._parent_of[block_id] = parent
        return True

    def take(self, block_ids: Iterable[int]) -> None:
        """Add a reference to each cached block (a prefix hit); a free one leaves the queue."""
        block_ids = list(block_ids)
        for block_id in block_ids:
            self._check_id(block_id)
            if block_id not in self._key_of:
                raise ValueError(f"cannot take block {block_id}: it holds no cache entry")
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1

    def _evict(self, block_id: int) -> None:
        key = self._key_of.pop(block_id, None)
        if key is None:
            return
        del self._block_of[key]
        del self._parent_of[block_id]
        self.num_evictions += 1
        if self.on_evict is not None:
            self.on_evict(block_id, key)

    def allocate(self, n: int) -> list[int]:
        """Take `n` blocks from the head of the free queue; each gets ref_count 1.

        Raises NoFreeBlocksError (and takes nothing) if fewer than `n` are free.
        """
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of blocks: {n}")
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} blocks but only {len(self._free)} are free")
        block_ids = [self._free.popitem(last=False)[0] for _ in range(n)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        for block_id in block_ids:  # bookkeeping first: a raising callback loses no block
            self._evict(block_id)  # its old contents are about to be overwritten
        return block_ids

    def ref(self, block_ids: Iterable[int]) -> None:
        """Add one reference to each block (a block listed twice gets two).

        Every block must already be in use; referencing a free block raises
        ValueError and changes nothing.
        """
        block_ids = list(block_ids)
        for block_id in block_ids:
            self._check_id(block_id)
            if self._ref_counts[block_id] == 0:
                raise ValueError(f"cannot ref block {block_id}: it is free (ref_count 0)")
        for block_id in block_ids:
            self._ref_counts[block_id] += 1

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block, in the order given.

        A block whose ref_count reaches 0 is appended to the tail of the free
        queue. Releasing more references than a block holds raises ValueError
        naming the block and changes nothing.
        """
        block_ids = list(block_ids)
        # Check the whole call first so a bad id cannot leave the pool half released.
        for block_id, times in Counter(block_ids).items():
            self._check_id(block_id)
            ref_count = self._ref_counts[block_id]
            if times > ref_count:
                raise ValueError(
                    f"cannot release block {block_id} {times} time(s): its ref_count is {ref_count}"
                )
        for block_id in block_ids:
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free[block_id] = None

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def free_block_ids(self) -> list[int]:
        """The free queue in order, head (next to allocate) first."""
        return list(self._free)

    def check_integrity(self) -> None:
        """Recount every block and raise IntegrityError on the first inconsistency."""
        if len(self._ref_counts) != self.num_blocks:
            raise IntegrityError(
                f"{len(self._ref_counts)} reference counts for {self.num_blocks} blocks"
            )
        strays = [b for b in self._free if not (isinstance(b, int) and 0 <= b < self.num_blocks)]
        if strays:
            raise IntegrityError(f"free queue holds ids outside 0..{self.num_blocks - 1}: {strays}")
        num_used = 0
        for block_id, ref_count in enumerate(self._ref_counts):
            is_free = block_id in self._free
            if ref_count < 0:
                raise IntegrityError(f"block {block_id} has negative ref_count {ref_count}")
            if is_free and ref_count != 0:
                raise IntegrityError(
                    f"block {block_id} is in the free queue with ref_count {ref_count}"
                )
            if not is_free and ref_count == 0:
                raise IntegrityError(
                    f"block {block_id} has ref_count 0 but is not in the free queue"
                )
            num_used += ref_count > 0
        if len(self._free) + num_used != self.num_blocks:
            raise IntegrityError(
                f"free ({len(self._free)}) + used ({num_used}) != total ({self.num_blocks})"
            )
        if len(self._key_of) != len(self._block_of) or any(
            self._block_of.get(key) != block_id for block_id, key in self._key_of.items()
        ):
            raise IntegrityError("the cache's key -> block and block -> key maps disagree")
        strays = [b for b in self._key_of if not 0 <= b < self.num_blocks]
        if strays:
            raise IntegrityError(f"cache entries name ids outside 0..{self.num_blocks - 1}")

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} is outside 0..{self.num_blocks - 1}")
