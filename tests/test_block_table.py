"""BlockTable: slot mappings on non-contiguous blocks, block counts, release order."""

import pytest

from kvforge.kvcache.block_pool import BlockPool
from kvforge.kvcache.block_table import BlockTable


def test_non_positive_block_size_is_rejected():
    with pytest.raises(ValueError, match="block_size must be positive"):
        BlockTable(0)


def test_new_table_is_empty():
    table = BlockTable(4)
    assert (table.block_size, table.block_ids, table.num_tokens) == (4, [], 0)
    assert table.blocks_needed(0) == 0


def test_block_size_1_slots_are_the_block_ids():
    table = BlockTable(1)
    assert table.append_tokens(3, [7, 2, 5]) == [7, 2, 5]
    assert table.append_tokens(1, [0]) == [0]
    assert [table.slot(p) for p in range(4)] == [7, 2, 5, 0]


def test_block_size_4_matches_the_docstring_diagram():
    table = BlockTable(4)
    assert table.append_tokens(10, [7, 2, 5]) == [28, 29, 30, 31, 8, 9, 10, 11, 20, 21]
    # Slots 22 and 23 are already reserved in block 5: no new block.
    assert table.blocks_needed(2) == 0
    assert table.append_tokens(2, []) == [22, 23]
    assert table.append_tokens(1, [9]) == [36]
    assert (table.block_ids, table.num_tokens) == ([7, 2, 5, 9], 13)


def test_block_size_16_prefill_then_decode():
    table = BlockTable(16)
    slots = table.append_tokens(33, [7, 2, 5])
    assert slots[:16] == list(range(112, 128))
    assert slots[16:32] == list(range(32, 48))
    assert slots[32:] == [80]
    decoded = []
    for _ in range(15):
        decoded += table.append_tokens(1, [])
    assert decoded == list(range(81, 96))
    assert table.append_tokens(1, [0]) == [0]
    assert (table.slot(0), table.slot(16), table.slot(47), table.slot(48)) == (112, 32, 95, 0)


@pytest.mark.parametrize(("num_new_tokens", "expected"), [(0, 0), (15, 1), (16, 1), (17, 2)])
def test_blocks_needed_from_empty_at_the_boundary(num_new_tokens, expected):
    assert BlockTable(16).blocks_needed(num_new_tokens) == expected


@pytest.mark.parametrize(
    ("num_tokens", "num_new_tokens", "expected"),
    [(15, 1, 0), (15, 2, 1), (16, 0, 0), (16, 1, 1), (16, 16, 1), (16, 17, 2), (17, 15, 0)],
)
def test_blocks_needed_after_tokens(num_tokens, num_new_tokens, expected):
    table = BlockTable(16)
    table.append_tokens(num_tokens, list(range(table.blocks_needed(num_tokens))))
    assert table.blocks_needed(num_new_tokens) == expected


def test_blocks_needed_rejects_negative():
    with pytest.raises(ValueError, match=">= 0"):
        BlockTable(16).blocks_needed(-1)


@pytest.mark.parametrize("new_block_ids", [[], [3], [3, 4, 6]])
def test_wrong_number_of_new_blocks_raises_and_changes_nothing(new_block_ids):
    table = BlockTable(4)
    table.append_tokens(3, [1])
    with pytest.raises(ValueError, match=r"need 2 new block\(s\) of 4, got"):
        table.append_tokens(6, new_block_ids)  # 9 tokens need 3 blocks; 1 is held
    assert (table.block_ids, table.num_tokens) == ([1], 3)


@pytest.mark.parametrize("position", [-1, 5, 8])
def test_slot_outside_reserved_tokens_raises(position):
    table = BlockTable(4)
    table.append_tokens(5, [0, 1])  # slots of positions 5..7 exist but are not reserved
    with pytest.raises(IndexError, match=f"position {position} is outside the 5"):
        table.slot(position)


def test_release_returns_blocks_tail_first_and_empties_the_table():
    pool = BlockPool(8)
    table = BlockTable(4)
    table.append_tokens(10, pool.allocate(table.blocks_needed(10)))
    assert table.block_ids == [0, 1, 2]
    table.release(pool)
    assert pool.free_block_ids() == [3, 4, 5, 6, 7, 2, 1, 0]
    assert (table.block_ids, table.num_tokens) == ([], 0)
    pool.check_integrity()
    # The head block is now last to be reused.
    assert pool.allocate(7) == [3, 4, 5, 6, 7, 2, 1]


def test_release_drops_one_reference_per_block():
    pool = BlockPool(4)
    first, second = BlockTable(2), BlockTable(2)
    first.append_tokens(4, pool.allocate(2))
    pool.ref(first.block_ids)  # the second request shares the first's blocks
    second.append_tokens(4, list(first.block_ids))
    first.release(pool)
    assert [pool.ref_count(b) for b in (0, 1)] == [1, 1]
    assert pool.free_block_ids() == [2, 3]
    second.release(pool)
    assert pool.free_block_ids() == [2, 3, 1, 0]
    pool.check_integrity()


def test_failed_release_keeps_the_table():
    pool = BlockPool(4)
    table = BlockTable(4)
    table.append_tokens(4, pool.allocate(1))
    pool.release([0])  # someone else dropped the table's reference: a bug
    with pytest.raises(ValueError, match=r"block 0\b"):
        table.release(pool)
    assert (table.block_ids, table.num_tokens) == ([0], 4)
