"""Micro-batching: worker threads do the work of many concurrent callers at once.

The service has two batchers: the scorer (texts of concurrent requests scored in
one forward pass; on a CPU two workers run forward passes side by side, each
on its share of the cores) and the store writer (their predictions written in one
transaction: a group commit). A caller submits its items and gets a future;
the worker takes whatever is waiting, at most `max_items`, smallest requests
first so a single text never waits behind a 64-text batch, and splits a request
bigger than the room left into chunks (it finishes when its last chunk does).
A batch waits at most `window_s` after its oldest item arrived for others to
join it: an idle worker waits that long, a busy one finds its next batch already
waiting longer and starts at once, so the batch grows with the load. At most
`max_queued` items wait: beyond that `submit` raises
`QueueFull` at once (the service answers 503 with Retry-After), so memory and
latency stay bounded under any load.

With `workers` > 1 each worker takes its own next batch from the one queue
(so a single text waits for the first free worker, not behind a busy one), and
`work` runs on several threads at once: it must be thread-safe.

`work(items) -> results` must return one result per item, in order; if it
raises, every caller whose items were in that batch gets the exception and no
other caller is affected.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class QueueFull(RuntimeError):
    """More items wait than the batcher holds; retry after `retry_after_s`."""

    def __init__(self, name: str, queued: int, retry_after_s: int):
        super().__init__(f"the {name} queue is full ({queued} items waiting); retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass
class Job(Generic[Item, Result]):
    items: Sequence[Item]
    future: Future
    done: int = 0  # items handed to the worker so far
    enqueued: float = field(default_factory=time.monotonic)
    results: list = field(init=False)  # by item position: workers may finish a job's chunks out of order
    answered: int = 0  # items with results

    def __post_init__(self) -> None:
        self.results = [None] * len(self.items)

    @property
    def left(self) -> int:
        return len(self.items) - self.done


def settle(future: Future, result: object = None, error: BaseException | None = None) -> None:
    """Answers `future` unless it is answered already: another worker may have failed a
    chunk of the same request meanwhile, and the first answer stands."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


def plan_batch(jobs: Sequence[Job], max_items: int) -> list[tuple[Job, int, int]]:
    """The next batch as (job, start, stop) slices: smallest remaining jobs first (in
    arrival order on a tie), whole while they fit, then a chunk of the next one."""
    batch, room = [], max_items
    for job in sorted(jobs, key=lambda j: j.left):  # sorted() is stable: arrival order on ties
        if room <= 0:
            break
        take = min(job.left, room)
        batch.append((job, job.done, job.done + take))
        room -= take
    return batch


class MicroBatcher(Generic[Item, Result]):
    """Worker threads running `work` on the items of many callers together."""

    def __init__(self, work: Callable[[list[Item]], Sequence[Result]], name: str, max_items: int = 32,
                 window_s: float = 0.002, max_queued: int = 1024, workers: int = 1):
        if max_items <= 0 or max_queued <= 0 or workers <= 0 or window_s < 0:
            raise ValueError(f"{name}: max_items, max_queued and workers must be positive, window_s not negative")
        self.work, self.name = work, name
        self.max_items, self.window_s, self.max_queued = max_items, window_s, max_queued
        self._jobs: list[Job] = []
        self._queued = 0
        self._wake = threading.Condition()
        self._closed = False
        self._rate = 0.0  # items per second of the last batch, times the workers, for Retry-After
        self._threads = [threading.Thread(target=self._run, name=f"tuneloop-{name}-{index}", daemon=True)
                         for index in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, items: Sequence[Item]) -> Future:
        """A future of `work`'s results for `items`, in order.

        Raises:
            QueueFull: `max_queued` items already wait (nothing is queued).
            RuntimeError: the batcher is closed.
        """
        future: Future = Future()
        if not items:
            future.set_result([])
            return future
        with self._wake:
            if self._closed:
                raise RuntimeError(f"the {self.name} batcher is closed")
            if self._queued and self._queued + len(items) > self.max_queued:
                raise QueueFull(self.name, self._queued, self.retry_after())
            self._jobs.append(Job(items, future))
            self._queued += len(items)
            self._wake.notify()
        return future

    def retry_after(self) -> int:
        """Whole seconds until the queue has drained at the recent rate (1 at least)."""
        if self._rate <= 0:
            return 1
        return max(1, int(self._queued / self._rate + 0.999))

    def close(self, timeout: float = 10.0) -> None:
        """Finishes what is queued, then stops the workers."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _next_batch(self) -> list[tuple[Job, int, int]] | None:
        with self._wake:
            while True:
                while not self._jobs and not self._closed:
                    self._wake.wait()
                if not self._jobs:
                    return None  # closed and drained
                deadline = min(job.enqueued for job in self._jobs) + self.window_s  # under load: already past
                while self._queued < self.max_items and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._wake.wait(remaining)
                if self._jobs:  # else another worker took them while this one waited
                    break
            batch = plan_batch(self._jobs, self.max_items)
            for job, start, stop in batch:
                job.done = stop
                self._queued -= stop - start
            self._jobs = [job for job in self._jobs if job.left]
            if self._jobs:
                self._wake.notify()  # the rest is another idle worker's
            return batch

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            items = [item for job, start, stop in batch for item in job.items[start:stop]]
            started = time.perf_counter()
            try:
                results = list(self.work(items))
                if len(results) != len(items):
                    raise RuntimeError(f"{self.name}: {len(results)} results for {len(items)} items")
            except BaseException as error:  # noqa: BLE001 - handed to the callers, the worker goes on
                for job, _, _ in batch:
                    settle(job.future, error=error)
                self._drop_failed(batch)
                continue
            self._rate = len(self._threads) * len(items) / max(time.perf_counter() - started, 1e-6)
            offset = 0
            for job, start, stop in batch:
                with self._wake:  # another worker may be finishing another chunk of the same job
                    job.results[start:stop] = results[offset : offset + stop - start]
                    job.answered += stop - start
                    whole = job.answered == len(job.items)
                offset += stop - start
                if whole:
                    settle(job.future, job.results)

    def _drop_failed(self, batch: list[tuple[Job, int, int]]) -> None:
        """A job whose chunk failed is answered; its later chunks are not worked."""
        failed = {id(job) for job, _, _ in batch}
        with self._wake:
            for job in self._jobs:
                if id(job) in failed:
                    self._queued -= job.left
                    job.done = len(job.items)
            self._jobs = [job for job in self._jobs if job.left]
