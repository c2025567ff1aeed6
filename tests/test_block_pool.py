"""BlockPool: exact block ids, reference counts, eviction order and integrity."""

import random

import pytest

from kvforge.kvcache.block_pool import BlockPool, IntegrityError, NoFreeBlocksError


def checked(pool: BlockPool) -> BlockPool:
    pool.check_integrity()
    assert pool.num_free + pool.num_used == pool.num_blocks
    return pool


@pytest.mark.parametrize("num_blocks", [0, -1])
def test_non_positive_size_is_rejected(num_blocks):
    with pytest.raises(ValueError, match="at least one block"):
        BlockPool(num_blocks)


def test_new_pool_is_all_free_in_id_order():
    pool = checked(BlockPool(4))
    assert pool.free_block_ids() == [0, 1, 2, 3]
    assert (pool.num_free, pool.num_used) == (4, 0)
    assert [pool.ref_count(b) for b in range(4)] == [0, 0, 0, 0]


def test_allocate_takes_head_and_release_appends_to_tail():
    pool = checked(BlockPool(4))
    assert pool.allocate(2) == [0, 1]
    assert checked(pool).free_block_ids() == [2, 3]
    assert pool.allocate(1) == [2]
    assert checked(pool).free_block_ids() == [3]
    pool.release([1, 0])
    assert checked(pool).free_block_ids() == [3, 1, 0]
    assert pool.allocate(2) == [3, 1]
    assert checked(pool).free_block_ids() == [0]
    assert (pool.num_free, pool.num_used) == (1, 3)
    assert [pool.ref_count(b) for b in range(4)] == [0, 1, 1, 1]


def test_allocate_zero_returns_nothing():
    pool = BlockPool(2)
    assert pool.allocate(0) == []
    assert checked(pool).free_block_ids() == [0, 1]


def test_allocate_negative_is_rejected():
    with pytest.raises(ValueError, match="negative"):
        BlockPool(2).allocate(-1)


def test_allocate_more_than_free_raises_and_takes_nothing():
    pool = BlockPool(4)
    with pytest.raises(NoFreeBlocksError, match="asked for 5 blocks but only 4"):
        pool.allocate(5)
    assert pool.allocate(3) == [0, 1, 2]
    with pytest.raises(NoFreeBlocksError, match="asked for 2 blocks but only 1"):
        pool.allocate(2)
    assert checked(pool).free_block_ids() == [3]
    assert pool.allocate(1) == [3]
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)


def test_ref_and_release_counts():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    pool.ref([0])
    pool.ref([0, 1])
    assert [pool.ref_count(b) for b in range(4)] == [3, 2, 0, 0]
    pool.release([0, 1])
    assert [pool.ref_count(b) for b in range(4)] == [2, 1, 0, 0]
    assert checked(pool).free_block_ids() == [2, 3]
    pool.release([1])
    assert checked(pool).free_block_ids() == [2, 3, 1]
    pool.release([0, 0])  # one call may drop several references to one block
    assert checked(pool).free_block_ids() == [2, 3, 1, 0]
    assert pool.num_used == 0


def test_ref_of_a_free_block_raises_and_changes_nothing():
    pool = BlockPool(4)
    pool.allocate(1)
    with pytest.raises(ValueError, match=r"cannot ref block 2\b.*free"):
        pool.ref([0, 2])
    assert pool.ref_count(0) == 1
    checked(pool)


def test_double_release_names_the_block():
    pool = BlockPool(4)
    assert pool.allocate(3) == [0, 1, 2]
    pool.release([2])
    with pytest.raises(ValueError, match=r"block 2\b.*ref_count is 0"):
        pool.release([2])
    assert checked(pool).free_block_ids() == [3, 2]


def test_failed_release_changes_nothing():
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    with pytest.raises(ValueError, match=r"block 3\b"):
        pool.release([0, 3])
    with pytest.raises(ValueError, match=r"block 1 2 time\(s\)"):
        pool.release([0, 1, 1])
    assert [pool.ref_count(b) for b in range(4)] == [1, 1, 0, 0]
    assert checked(pool).free_block_ids() == [2, 3]


@pytest.mark.parametrize("block_id", [-1, 4, 100])
def test_out_of_range_ids_are_rejected(block_id):
    pool = BlockPool(4)
    pool.allocate(4)
    for call in (pool.ref, pool.release):
        with pytest.raises(ValueError, match=f"block id {block_id} is outside 0..3"):
            call([block_id])
    with pytest.raises(ValueError, match="outside"):
        pool.ref_count(block_id)
    checked(pool)


def _ref_a_free_block(pool):
    pool._ref_counts[3] = 1


def _drop_a_used_block_from_the_queue(pool):
    pool._ref_counts[0] = 0


def _queue_a_used_block(pool):
    pool._free[0] = None


def _negative_count(pool):
    pool._ref_counts[1] = -1


def _stray_id_in_queue(pool):
    pool._free[7] = None


def _lost_block(pool):
    pool._ref_counts.pop()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (_ref_a_free_block, "block 3 is in the free queue with ref_count 1"),
        (_drop_a_used_block_from_the_queue, "block 0 has ref_count 0 but is not in the free queue"),
        (_queue_a_used_block, "block 0 is in the free queue with ref_count 1"),
        (_negative_count, "block 1 has negative ref_count -1"),
        (_stray_id_in_queue, r"outside 0..3: \[7\]"),
        (_lost_block, "3 reference counts for 4 blocks"),
    ],
)
def test_check_integrity_catches_corruption(corrupt, message):
    pool = BlockPool(4)
    assert pool.allocate(2) == [0, 1]
    checked(pool)
    corrupt(pool)
    with pytest.raises(IntegrityError, match=message):
        pool.check_integrity()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_random_operations_keep_the_books_balanced(seed):
    rng = random.Random(seed)
    num_blocks = 16
    pool = BlockPool(num_blocks)
    refs: list[int] = []  # one entry per reference held, as a caller would keep them
    for _ in range(2000):
        op = rng.choice(["allocate", "ref", "release"])
        if op == "allocate":
            n = rng.randint(0, pool.num_free)
            head = pool.free_block_ids()[:n]
            assert pool.allocate(n) == head
            refs.extend(head)
        elif op == "ref" and refs:
            picked = rng.sample(refs, rng.randint(1, min(3, len(refs))))
            pool.ref(picked)
            refs.extend(picked)
        elif op == "release" and refs:
            picked = rng.sample(refs, rng.randint(1, len(refs)))
            before = pool.free_block_ids()
            pool.release(picked)
            for block_id in picked:
                refs.remove(block_id)
            newly_free = [b for b in dict.fromkeys(picked) if b not in refs]
            newly_free.sort(key=lambda b: max(i for i, x in enumerate(picked) if x == b))
            assert pool.free_block_ids() == before + newly_free
        checked(pool)
        assert pool.num_used == len(set(refs))
        for block_id in range(num_blocks):
            assert pool.ref_count(block_id) == refs.count(block_id)
