"""Adaptive request coalescing: batches are formed when capacity frees up, not when items arrive.

Why not ``@serve.batch`` at the gateway: in Ray Serve 2.60 its queue forms the next batch as soon as
one item is waiting and only then waits for a free ``max_concurrent_batches`` slot. Under load that
yields a queue of one-item batches (measured: 1.9 texts per graph call at 32 concurrent clients),
so every request pays every downstream hop. Here a slot is taken first and the batch is whatever
is queued at that moment (up to ``max_batch_size`` rows): batches grow exactly when the pipeline is
busy, and a lone request goes out at once.

A caller that goes away (its ``submit`` is cancelled, as Serve does when the client disconnects)
is dropped from the queue; a running batch whose callers have all gone away is cancelled.

Plain asyncio, no Ray: one instance per event loop (per gateway replica).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


@dataclass
class _Pending(Generic[Item, Result]):
    item: Item
    size: int
    future: asyncio.Future[Result]


class Coalescer(Generic[Item, Result]):
    """Runs ``process(items) -> results`` (same order, same length) over gathered submissions.

    ``size_of`` gives an item's rows; a batch holds at most ``max_batch_size`` rows, except that a
    single item larger than that still runs, alone. At most ``max_concurrent`` batches run at once.
    """

    def __init__(
        self,
        process: Callable[[list[Item]], Awaitable[Sequence[Result]]],
        *,
        max_batch_size: int,
        max_concurrent: int,
        max_wait_s: float = 0.0,
        size_of: Callable[[Item], int] = lambda _: 1,
    ) -> None:
        self._process = process
        self._size_of = size_of
        self._queue: collections.deque[_Pending[Item, Result]] = collections.deque()
        self._arrived = asyncio.Event()
        self._running = 0
        self._slot_freed = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=512)
        self.configure(max_batch_size, max_concurrent, max_wait_s)

    def configure(self, max_batch_size: int, max_concurrent: int, max_wait_s: float) -> None:
        """Change the knobs live; batches already running are not affected."""
        if max_batch_size < 1 or max_concurrent < 1 or max_wait_s < 0:
            raise ValueError("max_batch_size and max_concurrent must be >= 1, max_wait_s >= 0")
        self.max_batch_size = max_batch_size
        self.max_concurrent = max_concurrent
        self.max_wait_s = max_wait_s
        self._slot_freed.set()

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append(_Pending(item, self._size_of(item), future))
        self._arrived.set()
        if self._loop_task is None or self._loop_task.done():
            # A fresh context: the dispatcher (and every batch it starts) must not inherit the
            # first caller's context — under Serve that holds its request id, and cancelling that
            # request would cancel other callers' work.
            self._loop_task = asyncio.create_task(self._dispatch(), context=contextvars.Context())
            self._loop_task.add_done_callback(self._dispatcher_ended)
        return await future

    def _dispatcher_ended(self, task: asyncio.Task[None]) -> None:
        """The dispatcher never ends by itself: if it failed, every queued caller gets the error
        now instead of waiting for ever (the next ``submit`` starts a new dispatcher)."""
        error = None if task.cancelled() else task.exception()
        if error is None and not task.cancelled():
            return
        logger.error("coalescer dispatcher ended: %r", error or "cancelled")
        while self._queue:
            pending = self._queue.popleft()
            if not pending.future.done():
                if error is None:
                    pending.future.cancel()
                else:
                    pending.future.set_exception(error)

    def _queued_rows(self) -> int:
        return sum(p.size for p in self._queue if not p.future.done())

    async def _dispatch(self) -> None:
        while True:
            while self._running >= self.max_concurrent:
                self._slot_freed.clear()
                await self._slot_freed.wait()
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            if self.max_wait_s > 0 and self._queued_rows() < self.max_batch_size:
                deadline = asyncio.get_running_loop().time() + self.max_wait_s
                while self._queued_rows() < self.max_batch_size:
                    remaining = deadline - asyncio.get_running_loop().time()
                    if remaining <= 0:
                        break
                    self._arrived.clear()
                    try:
                        await asyncio.wait_for(self._arrived.wait(), remaining)
                    except TimeoutError:
                        break
            batch = self._take_batch()
            if batch:
                self._running += 1
                task = asyncio.create_task(self._run(batch))
                self._tasks.add(task)  # the loop keeps only weak references to tasks
                # The slot is given back when the task ends, however it ends: a task cancelled
                # before it first ran (every caller left at once) never runs its own code.
                task.add_done_callback(self._batch_ended)
                orphaned = functools.partial(self._abandon_if_orphaned, task, batch)
                for pending in batch:
                    pending.future.add_done_callback(orphaned)

    @staticmethod
    def _abandon_if_orphaned(
        task: asyncio.Task[None], batch: list[_Pending[Item, Result]], _: object = None
    ) -> None:
        """Every caller of a running batch went away (cancelled, e.g. the client disconnected):
        stop its work, which cancels the downstream calls, instead of finishing for nobody."""
        if not task.done() and all(p.future.cancelled() for p in batch):
            task.cancel()

    def _take_batch(self) -> list[_Pending[Item, Result]]:
        batch: list[_Pending[Item, Result]] = []
        rows = 0
        while self._queue:
            pending = self._queue[0]
            if pending.future.done():  # the caller went away (cancelled): skip its work
                self._queue.popleft()
                continue
            if batch and rows + pending.size > self.max_batch_size:
                break
            batch.append(self._queue.popleft())
            rows += pending.size
        return batch

    async def _run(self, batch: list[_Pending[Item, Result]]) -> None:
        try:
            self.batch_sizes.append(sum(p.size for p in batch))
            results = await self._process([p.item for p in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} items produced {len(results)} results")
            for pending, result in zip(batch, results, strict=True):
                if not pending.future.done():
                    pending.future.set_result(result)
        except asyncio.CancelledError:
            for pending in batch:
                pending.future.cancel()
            raise
        except Exception as e:  # every caller of the batch sees the failure
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(e)

    def _batch_ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._running -= 1
        self._slot_freed.set()
