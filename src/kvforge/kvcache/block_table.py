"""One request's block table: which blocks it holds and the slot of each token."""

from kvforge.kvcache.block_pool import BlockPool

NULL_BLOCK = -1  # a table entry whose block was freed (out of a sliding window)


class BlockTable:
    """The blocks one request holds, in order, and where its tokens' K/V live.

    Token position p lives in block `block_ids[p // block_size]` at offset
    `p % block_size`; its slot (row in the flat KV store) is
    `block_id * block_size + offset`. For block_size 4 and block_ids [7, 2, 5]
    with 10 tokens:

        position  |  0  1  2  3 |  4  5  6  7 |  8  9  .  . |
        block     |      7      |      2      |      5      |
        offset    |  0  1  2  3 |  0  1  2  3 |  0  1  2  3 |
        slot      | 28 29 30 31 |  8  9 10 11 | 20 21 22 23 |

    Slots 22 and 23 belong to the request but hold no token yet; the next two
    tokens take them without a new block. The table holds one reference to each
    of its blocks, returned by `release`.

    A model with a sliding window never reads a block wholly before its window
    again: `free_leading` gives such leading blocks back early and leaves
    `NULL_BLOCK` in their place (`num_freed` of them), so positions keep their
    meaning.
    """

    def __init__(self, block_size: int) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.block_ids: list[int] = []
        self.num_tokens = 0  # tokens whose slots are reserved
        self.num_freed = 0  # leading entries given back (NULL_BLOCK)

    def blocks_needed(self, num_new_tokens: int) -> int:
        """Blocks to add so the table holds num_tokens + num_new_tokens; never negative."""
        if num_new_tokens < 0:
            raise ValueError(f"num_new_tokens must be >= 0, got {num_new_tokens}")
        total_tokens = self.num_tokens + num_new_tokens
        num_blocks = -(-total_tokens // self.block_size)  # ceil without floats
        return max(0, num_blocks - len(self.block_ids))

    def append_tokens(self, num_new_tokens: int, new_block_ids: list[int]) -> list[int]:
        """Reserve slots for `num_new_tokens` more tokens and return their slot mapping.

        `new_block_ids` must be exactly `blocks_needed(num_new_tokens)` blocks,
        already allocated by the caller; the table takes over that reference
        (no ref_count changes here). Raises ValueError, changing nothing, on a
        wrong count.
        """
        needed = self.blocks_needed(num_new_tokens)
        if len(new_block_ids) != needed:
            raise ValueError(
                f"{num_new_tokens} new tokens after {self.num_tokens} need {needed} new "
                f"block(s) of {self.block_size}, got {len(new_block_ids)}"
            )
        self.block_ids.extend(new_block_ids)
        start = self.num_tokens
        self.num_tokens += num_new_tokens
        return [self.slot(p) for p in range(start, self.num_tokens)]

    def adopt(self, block_ids: list[int], num_tokens: int | None = None) -> None:
        """Start an empty table with blocks that already hold its first `num_tokens`
        tokens (default: all full) — a prefix hit, or blocks swapped back in. The caller
        has already taken a reference to each for the table."""
        if self.block_ids:
            raise ValueError("only an empty table can adopt blocks")
        num_tokens = len(block_ids) * self.block_size if num_tokens is None else num_tokens
        if -(-num_tokens // self.block_size) != len(block_ids):
            raise ValueError(f"{num_tokens} tokens do not fill {len(block_ids)} blocks")
        freed = block_ids.count(NULL_BLOCK)
        if block_ids[:freed] != [NULL_BLOCK] * freed:
            raise ValueError("freed entries can only lead a table")
        self.block_ids = list(block_ids)
        self.num_tokens = num_tokens
        self.num_freed = freed

    def free_leading(self, n: int, pool: BlockPool) -> None:
        """Give back the table's first `n` blocks (those not given back yet), leaving
        `NULL_BLOCK` in their place; the last block stays, however far it lies."""
        n = min(n, len(self.block_ids) - 1)
        if n <= self.num_freed:
            return
        pool.release(reversed(self.block_ids[self.num_freed : n]))
        self.block_ids[self.num_freed : n] = [NULL_BLOCK] * (n - self.num_freed)
        self.num_freed = n

    def slot(self, position: int) -> int:
        """The slot of the token at `position`, which must already be reserved."""
        if not 0 <= position < self.num_tokens:
            raise IndexError(
                f"position {position} is outside the {self.num_tokens} reserved tokens"
            )
        block_index, offset = divmod(position, self.block_size)
        if block_index < self.num_freed:
            raise IndexError(f"position {position} is in a block given back")
        return self.block_ids[block_index] * self.block_size + offset

    def release(self, pool: BlockPool) -> None:
        """Drop the table's reference to each block, tail block first, and empty the table.

        Tail first puts the request's head blocks (its most shareable prefix)
        nearest the tail of the pool's free queue, so they are evicted last.
        If the pool rejects the release, it changes nothing and neither does this.
        """
        pool.release(reversed(self.block_ids[self.num_freed :]))
        self.block_ids = []
        self.num_tokens = 0
        self.num_freed = 0
