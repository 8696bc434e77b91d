"""Unit tests of the gateway's request coalescer (plain asyncio, no Ray)."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from servecore.traffic.coalescer import Coalescer


class Recorder:
    """A process function that records its batches and can be held until released."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.started = asyncio.Event()
        self.fail_on = fail_on

    async def __call__(self, items: list[str]) -> list[str]:
        self.batches.append(list(items))
        self.started.set()
        await self.release.wait()
        if self.fail_on in items:
            raise ValueError(f"cannot process {self.fail_on}")
        return [item.upper() for item in items]


async def _hold_first_batch(recorder: Recorder, coalescer: Coalescer) -> asyncio.Task:
    recorder.release.clear()
    first = asyncio.create_task(coalescer.submit("first"))
    await recorder.started.wait()
    return first


async def test_a_lone_request_goes_out_at_once():
    recorder = Recorder()
    coalescer = Coalescer(recorder, max_batch_size=8, max_concurrent=1)
    assert await asyncio.wait_for(coalescer.submit("a"), 1) == "A"
    assert recorder.batches == [["a"]]


async def test_requests_arriving_while_busy_form_one_batch_when_the_slot_frees():
    recorder = Recorder()
    coalescer = Coalescer(recorder, max_batch_size=8, max_concurrent=1)
    first = await _hold_first_batch(recorder, coalescer)
    waiting = [asyncio.create_task(coalescer.submit(x)) for x in "bcd"]
    await asyncio.sleep(0.01)
    assert recorder.batches == [["first"]]  # nothing formed while the only slot is busy
    recorder.release.set()
    assert await first == "FIRST"
    assert await asyncio.gather(*waiting) == ["B", "C", "D"]
    assert recorder.batches == [["first"], ["b", "c", "d"]]


async def test_batches_are_bounded_in_rows_and_an_oversized_item_runs_alone():
    recorder = Recorder()
    coalescer = Coalescer(recorder, max_batch_size=4, max_concurrent=1, size_of=len)
    first = await _hold_first_batch(recorder, coalescer)
    items = ["aa", "bb", "c", "dddddd", "e"]
    waiting = [asyncio.create_task(coalescer.submit(x)) for x in items]
    await asyncio.sleep(0.01)
    recorder.release.set()
    await first
    assert await asyncio.gather(*waiting) == [x.upper() for x in items]
    assert recorder.batches[1:] == [["aa", "bb"], ["c"], ["dddddd"], ["e"]]
    assert list(coalescer.batch_sizes)[1:] == [4, 1, 6, 1]


async def test_a_failure_reaches_every_caller_of_its_batch_only():
    recorder = Recorder(fail_on="bad")
    coalescer = Coalescer(recorder, max_batch_size=8, max_concurrent=1)
    first = await _hold_first_batch(recorder, coalescer)
    waiting = [asyncio.create_task(coalescer.submit(x)) for x in ("ok", "bad")]
    await asyncio.sleep(0.01)
    recorder.release.set()
    await first
    for task in waiting:
        with pytest.raises(ValueError, match="cannot process bad"):
            await task
    assert await coalescer.submit("later") == "LATER"


async def test_a_cancelled_caller_is_dropped_from_the_next_batch():
    recorder = Recorder()
    coalescer = Coalescer(recorder, max_batch_size=8, max_concurrent=1)
    first = await _hold_first_batch(recorder, coalescer)
    gone = asyncio.create_task(coalescer.submit("gone"))
    kept = asyncio.create_task(coalescer.submit("kept"))
    await asyncio.sleep(0.01)
    gone.cancel()
    recorder.release.set()
    await first
    assert await kept == "KEPT"
    assert recorder.batches == [["first"], ["kept"]]


async def test_a_running_batch_whose_callers_all_left_is_cancelled():
    """A client that disconnects cancels its work: the batch stops, the slot comes back."""
    recorder = Recorder()
    coalescer = Coalescer(recorder, max_batch_size=8, max_concurrent=1)
    recorder.release.clear()
    callers = [asyncio.create_task(coalescer.submit(t)) for t in ("a", "b")]
    await recorder.started.wait()
    (running,) = coalescer._tasks
    callers[0].cancel()
    await asyncio.sleep(0.01)
    assert not running.done()  # "b" still waits for the batch
    callers[1].cancel()
    await asyncio.sleep(0.01)
    assert running.cancelled()
    recorder.release.set()
    assert await coalescer.submit("after") == "AFTER"
    assert recorder.batches == [["a", "b"], ["after"]]


async def test_concurrency_and_sizes_change_live():
    recorder = Recorder()
    coalescer = Coalescer(recorder, max_batch_size=8, max_concurrent=1)
    coalescer.configure(max_batch_size=1, max_concurrent=2, max_wait_s=0.0)
    first = await _hold_first_batch(recorder, coalescer)
    second = asyncio.create_task(coalescer.submit("second"))
    await asyncio.sleep(0.01)
    assert recorder.batches == [["first"], ["second"]]  # two slots: both run at once
    recorder.release.set()
    assert (await first, await second) == ("FIRST", "SECOND")
    with pytest.raises(ValueError):
        coalescer.configure(max_batch_size=0, max_concurrent=1, max_wait_s=0.0)


async def test_cancelling_a_running_batch_cancels_its_callers():
    recorder = Recorder()
    coalescer = Coalescer(recorder, max_batch_size=8, max_concurrent=1)
    first = await _hold_first_batch(recorder, coalescer)
    for task in list(coalescer._tasks):
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    recorder.release.set()
    assert await coalescer.submit("after") == "AFTER"  # the slot was given back


async def test_batches_do_not_run_in_the_first_callers_context():
    caller = contextvars.ContextVar("caller", default="none")
    seen = []

    async def process(items):
        seen.append(caller.get())
        return items

    coalescer = Coalescer(process, max_batch_size=8, max_concurrent=1)

    async def submit_as(name: str, item: str):
        caller.set(name)
        return await coalescer.submit(item)

    assert await submit_as("request-1", "a") == "a"
    assert await submit_as("request-2", "b") == "b"
    assert seen == ["none", "none"]


async def test_max_wait_lets_a_batch_fill():
    recorder = Recorder()
    coalescer = Coalescer(recorder, max_batch_size=3, max_concurrent=1, max_wait_s=5.0)
    tasks = [asyncio.create_task(coalescer.submit(x)) for x in "ab"]
    await asyncio.sleep(0.05)
    assert recorder.batches == []  # still waiting for a third item (or 5 s)
    tasks.append(asyncio.create_task(coalescer.submit("c")))
    assert await asyncio.wait_for(asyncio.gather(*tasks), 1) == ["A", "B", "C"]
    assert recorder.batches == [["a", "b", "c"]]


async def test_a_batch_whose_callers_left_before_it_started_gives_its_slot_back():
    """The batch task is cancelled before its first step (its only caller left at once): the
    slot must come back all the same, or a one-slot coalescer would never run again."""
    recorder = Recorder()
    coalescer = Coalescer(recorder, max_batch_size=8, max_concurrent=1)
    caller = asyncio.create_task(coalescer.submit("gone"))
    for _ in range(3):  # the dispatcher takes the batch and creates its task; nothing ran it yet
        await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert await asyncio.wait_for(coalescer.submit("next"), 1) == "NEXT"
    assert recorder.batches[-1] == ["next"]


async def test_queued_callers_get_the_error_if_the_dispatcher_dies():
    recorder = Recorder()
    coalescer = Coalescer(recorder, max_batch_size=8, max_concurrent=1)
    first = await _hold_first_batch(recorder, coalescer)
    waiting = asyncio.create_task(coalescer.submit("b"))
    await asyncio.sleep(0.01)

    def broken() -> list:
        raise RuntimeError("dispatcher bug")

    coalescer._take_batch = broken  # type: ignore[method-assign]
    recorder.release.set()  # the slot frees: the dispatcher tries to take a batch and fails
    assert await first == "FIRST"
    with pytest.raises(RuntimeError, match="dispatcher bug"):
        await asyncio.wait_for(waiting, 1)
