"""Micro-batching (tuneloop/service/batching.py): concurrent callers' items worked together, small
requests first, each caller answered with its own results in order, a failure kept
to its batch, and a full queue refused at once with a retry time."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tuneloop.service.batching import Job, MicroBatcher, QueueFull, plan_batch


def job(size: int, done: int = 0) -> Job:
    return Job(list(range(size)), None, done=done)


@pytest.mark.parametrize("sizes, max_items, expected", [
    ([1, 1, 1], 32, [(1, 0, 1), (1, 0, 1), (1, 0, 1)]),          # singles all fit
    ([32, 1, 1], 32, [(1, 0, 1), (1, 0, 1), (32, 0, 30)]),       # singles first, then a chunk of the batch
    ([64], 32, [(64, 0, 32)]),                                   # a big request is split
    ([10, 10, 10, 10], 32, [(10, 0, 10), (10, 0, 10), (10, 0, 10), (10, 0, 2)]),  # arrival order on ties
])
def test_a_batch_takes_the_smallest_requests_first_and_a_chunk_of_the_next(sizes, max_items, expected) -> None:
    jobs = [job(n) for n in sizes]
    planned = plan_batch(jobs, max_items)
    assert [(len(j.items), start, stop) for j, start, stop in planned] == expected
    assert sum(stop - start for _, start, stop in planned) <= max_items


def test_a_partly_done_request_continues_where_it_stopped() -> None:
    assert [(s, e) for _, s, e in plan_batch([job(64, done=32)], 32)] == [(32, 64)]


def test_concurrent_callers_are_worked_together_and_each_gets_its_own_results_in_order() -> None:
    batches: list[int] = []

    def work(items: list[int]) -> list[int]:
        batches.append(len(items))
        time.sleep(0.02)  # a forward pass: callers arriving meanwhile wait for the next batch
        return [item * 10 for item in items]

    batcher = MicroBatcher(work, "test", max_items=8, window_s=0.005)
    requests = [list(range(i, i + 1 + i % 3)) for i in range(40)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda items: batcher.submit(items).result(timeout=30), requests))
    batcher.close()
    assert answers == [[item * 10 for item in items] for items in requests]
    assert sum(batches) == sum(len(r) for r in requests)  # every item worked exactly once
    assert max(batches) == 8 and len(batches) < len(requests) / 2  # batched across callers, bounded


def test_a_request_bigger_than_a_batch_is_split_and_answered_whole() -> None:
    batches: list[list[int]] = []
    batcher = MicroBatcher(lambda items: batches.append(list(items)) or list(items), "test", max_items=4)
    assert batcher.submit(list(range(10))).result(timeout=10) == list(range(10))
    batcher.close()
    assert [len(b) for b in batches] == [4, 4, 2]


def test_a_failing_batch_fails_only_its_own_callers() -> None:
    def work(items: list[str]) -> list[str]:
        if "poison" in items:
            raise ValueError("cannot score poison")
        return [item.upper() for item in items]

    batcher = MicroBatcher(work, "test", max_items=1)  # one item per batch: the failure stays with its caller
    bad, good = batcher.submit(["poison"]), batcher.submit(["fine"])
    with pytest.raises(ValueError, match="cannot score poison"):
        bad.result(timeout=10)
    assert good.result(timeout=10) == ["FINE"]
    batcher.close()


def test_a_full_queue_is_refused_at_once_with_a_retry_time_and_nothing_is_queued() -> None:
    release = threading.Event()
    worked: list[int] = []

    def work(items: list[int]) -> list[int]:
        release.wait(10)
        worked.extend(items)
        return items

    batcher = MicroBatcher(work, "scoring", max_items=2, window_s=0.0, max_queued=3)
    running = batcher.submit([1, 2])  # taken by the worker, which blocks
    time.sleep(0.1)
    waiting = batcher.submit([3, 4, 5])  # fills the queue
    with pytest.raises(QueueFull, match="scoring queue is full") as refused:
        batcher.submit([6])
    assert refused.value.retry_after_s >= 1
    release.set()
    assert running.result(timeout=10) == [1, 2] and waiting.result(timeout=10) == [3, 4, 5]
    batcher.close()
    assert sorted(worked) == [1, 2, 3, 4, 5]  # the refused item was never worked


def test_two_workers_run_two_batches_at_the_same_time() -> None:
    both_inside = threading.Barrier(2, timeout=10)  # one worker alone would break it: BrokenBarrierError

    def work(items: list[int]) -> list[int]:
        both_inside.wait()
        return [item + 1 for item in items]

    batcher = MicroBatcher(work, "test", max_items=2, window_s=0.0, workers=2)
    first, second = batcher.submit([1, 2]), batcher.submit([3, 4])
    assert first.result(timeout=10) == [2, 3] and second.result(timeout=10) == [4, 5]
    batcher.close()


def test_a_single_text_is_answered_by_the_free_worker_while_the_other_is_busy() -> None:
    release = threading.Event()

    def work(items: list[str]) -> list[str]:
        if "slow" in items:
            release.wait(10)
        return [item.upper() for item in items]

    batcher = MicroBatcher(work, "test", max_items=4, window_s=0.0, workers=2)
    slow = batcher.submit(["slow"] * 4)
    time.sleep(0.1)  # the first worker holds the slow batch
    assert batcher.submit(["quick"]).result(timeout=5) == ["QUICK"]
    assert not slow.done()
    release.set()
    assert slow.result(timeout=10) == ["SLOW"] * 4
    batcher.close()


def test_workers_sharing_one_queue_work_every_item_exactly_once_and_in_order() -> None:
    worked: list[int] = []
    guard = threading.Lock()

    def work(items: list[int]) -> list[int]:
        time.sleep(0.002)
        with guard:
            worked.extend(items)
        return [item * 10 for item in items]

    batcher = MicroBatcher(work, "test", max_items=4, window_s=0.001, workers=3)
    requests = [list(range(100 * i, 100 * i + 1 + (i * 7) % 13)) for i in range(60)]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda items: batcher.submit(items).result(timeout=30), requests))
    batcher.close()
    assert answers == [[item * 10 for item in items] for items in requests]
    assert sorted(worked) == sorted(item for items in requests for item in items)  # none twice, none lost


def test_closing_stops_every_worker_after_the_queue_drains() -> None:
    batcher = MicroBatcher(lambda items: list(items), "test", max_items=2, workers=3)
    pending = [batcher.submit([i]) for i in range(10)]
    batcher.close()
    assert [f.result(timeout=1) for f in pending] == [[i] for i in range(10)]
    assert not any(thread.is_alive() for thread in batcher._threads)


def test_a_request_whose_two_chunks_fail_at_once_gets_one_answer_and_both_workers_go_on() -> None:
    both_inside = threading.Barrier(2, timeout=10)

    def work(items: list[str]) -> list[str]:
        if items[0].startswith("part"):
            both_inside.wait()  # the two chunks of one request fail together, on two workers
            raise ValueError(f"{items[0]} failed")
        return [item.upper() for item in items]

    batcher = MicroBatcher(work, "test", max_items=2, window_s=0.0, workers=2)
    request = batcher.submit(["part-a", "x", "part-b", "y"])
    with pytest.raises(ValueError, match="part-. failed"):
        request.result(timeout=10)
    time.sleep(0.1)  # the second failure is settled (ignored) too
    assert all(thread.is_alive() for thread in batcher._threads)
    assert [batcher.submit([f"after{i}"]) for i in range(4)][-1].result(timeout=5) == ["AFTER3"]
    batcher.close()
