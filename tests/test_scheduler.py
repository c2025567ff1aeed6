"""Scheduling decisions with exact block ids: admission, chunking, preemption."""

from kvforge.engine.request import Request, RequestMetrics, Status
from kvforge.engine.sampling import SamplingParams
from kvforge.engine.scheduler import Scheduler, SchedulerConfig
from kvforge.kvcache.block_table import BlockTable
from kvforge.kvcache.manager import KVCacheManager

BLOCK = 4


def request(name: str, prompt_len: int) -> Request:
    return Request(
        request_id=name,
        prompt=None,
        prompt_token_ids=list(range(prompt_len)),
        params=SamplingParams(max_tokens=100, ignore_eos=True),
        block_table=BlockTable(BLOCK),
        metrics=RequestMetrics(arrival_s=0.0),
        eos_token_ids=frozenset(),
    )


def advance(step, token: int = 7) -> None:
    """What the engine does after the forward pass: count computed tokens, append samples."""
    for item in step.scheduled:
        sampled = item.samples
        item.request.num_computed_tokens += item.num_new_tokens
        if sampled:
            item.request.output_token_ids.append(token)


def plan(step) -> list[tuple[str, int, list[int]]]:
    return [
        (i.request.request_id, i.num_new_tokens, i.request.block_table.block_ids)
        for i in step.scheduled
    ]


def test_admission_chunking_and_decode():
    s = Scheduler(
        KVCacheManager(8, BLOCK), SchedulerConfig(max_num_batched_tokens=8, max_num_seqs=4)
    )
    pool = s.manager.pool
    a, b = request("a", 6), request("b", 5)
    s.add(a)
    s.add(b)
    first = s.schedule()
    # a's whole prompt (6 tokens, blocks 0-1) + a 2-token chunk of b (block 2)
    assert plan(first) == [("a", 6, [0, 1]), ("b", 2, [2])]
    assert first.scheduled[0].slot_mapping == [0, 1, 2, 3, 4, 5]
    assert first.scheduled[1].slot_mapping == [8, 9]
    assert [i.samples for i in first.scheduled] == [True, False]
    advance(first)
    second = s.schedule()
    # a decodes its sampled token (slot 6); b finishes its prompt (3 tokens, block 3 added)
    assert plan(second) == [("a", 1, [0, 1]), ("b", 3, [2, 3])]
    assert second.scheduled[0].slot_mapping == [6] and second.scheduled[1].slot_mapping == [
        10,
        11,
        12,
    ]
    pool.check_integrity()
    assert pool.num_used == 4


def test_preemption_takes_the_most_recently_admitted():
    s = Scheduler(
        KVCacheManager(4, BLOCK), SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4)
    )
    pool = s.manager.pool
    a, b = request("a", 8), request("b", 8)
    s.add(a)
    s.add(b)
    advance(s.schedule())  # a: blocks 0-1, b: blocks 2-3, pool full; both sampled one token
    assert pool.num_free == 0
    batch = s.schedule()
    # a's 9th token needs a block: b (admitted last) is preempted, its blocks 3, 2 freed
    assert plan(batch) == [("a", 1, [0, 1, 3])]
    assert b.status is Status.WAITING and b.num_computed_tokens == 0
    assert b.block_table.block_ids == [] and b.metrics.preemptions == 1
    assert list(s.waiting) == [b] and s.manager.num_preemptions == 1
    pool.check_integrity()
    # when a finishes, b is recomputed from scratch: prompt + its sampled token (9 tokens)
    s.finish(a, "length")
    batch = s.schedule()
    assert plan(batch) == [("b", 9, [2, 3, 1])]  # free queue after a: [2, 3, 1, 0]
    pool.check_integrity()


def test_a_lone_request_that_outgrows_the_pool_preempts_itself_not_a_crash():
    s = Scheduler(
        KVCacheManager(2, BLOCK), SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4)
    )
    pool = s.manager.pool
    a = request("a", 8)
    s.add(a)
    advance(s.schedule())
    assert s.schedule().scheduled == []  # nothing fits: a waits (the engine refuses such requests)
    assert a.status is Status.WAITING
    pool.check_integrity()
    assert pool.num_free == 2


def test_waiting_requests_keep_arrival_order_and_respect_max_num_seqs():
    s = Scheduler(
        KVCacheManager(16, BLOCK), SchedulerConfig(max_num_batched_tokens=100, max_num_seqs=2)
    )
    pool = s.manager.pool
    reqs = [request(name, 3) for name in "abc"]
    for r in reqs:
        s.add(r)
    assert [i.request.request_id for i in s.schedule().scheduled] == ["a", "b"]
    assert list(s.waiting) == [reqs[2]]
    s.finish(reqs[0], "stop")
    assert pool.ref_count(0) == 0
    assert [i.request.request_id for i in s.schedule().scheduled] == ["b", "c"]


def test_finish_while_waiting_and_integrity():
    s = Scheduler(KVCacheManager(4, BLOCK), SchedulerConfig())
    pool = s.manager.pool
    a = request("a", 3)
    s.add(a)
    s.finish(a, "abort")
    assert not s.has_unfinished and a.finish_reason == "abort"
    pool.check_integrity()
