"""MicroBatcher: concurrent single-item submits become batches for one function.

A batch flushes when it holds ``max_batch_size`` items or ``max_wait`` after its first
item, whichever comes first; the function runs in a worker thread. Time-dependent tests
run on looptime's virtual clock.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence

import pytest

from nem_llm.errors import ConfigError
from nem_llm.retrieval.embedding import MicroBatcher

pytestmark = [pytest.mark.timeout(10), pytest.mark.usefixtures("no_loop_errors")]


class Doubler:
    """The batch function: doubles every item; records each batch and the thread it ran on.

    With ``hold`` set, each batch waits in its worker thread until ``release()``.
    """

    def __init__(self, *, hold: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()
        self.entered = threading.Event()
        self._gate = threading.Event()
        if not hold:
            self._gate.set()

    def release(self) -> None:
        self._gate.set()

    def __call__(self, items: list[int]) -> list[int]:
        self.threads.add(threading.get_ident())
        self.batches.append(list(items))
        self.entered.set()
        if not self._gate.wait(timeout=5):
            raise TimeoutError("the test never released the batch")
        if any(item < 0 for item in items):
            raise ValueError("negative item")
        return [2 * item for item in items]


@pytest.fixture
def doubler() -> Iterator[Doubler]:
    fn = Doubler()
    yield fn
    fn.release()  # never leave a worker thread blocked


@pytest.fixture
def held() -> Iterator[Doubler]:
    fn = Doubler(hold=True)
    yield fn
    fn.release()


async def entered(fn: Doubler) -> None:
    """Wait until a batch has reached the (held) function in its thread."""
    await asyncio.to_thread(fn.entered.wait, 5)


async def submit_all(batcher: MicroBatcher[int, int], items: Sequence[int]) -> list[int]:
    return list(await asyncio.gather(*(batcher.submit_async(item) for item in items)))


# -- batching --------------------------------------------------------------------------


async def test_concurrent_submits_are_grouped_into_full_batches(doubler: Doubler) -> None:
    batcher = MicroBatcher(doubler, max_batch_size=16, max_wait=10.0)
    try:
        answers = await submit_all(batcher, range(64))
    finally:
        await batcher.close_async()

    assert answers == [2 * i for i in range(64)]
    assert doubler.batches == [list(range(s, s + 16)) for s in range(0, 64, 16)]
    assert batcher.batches == 4


@pytest.mark.looptime
async def test_a_partial_batch_flushes_after_max_wait(doubler: Doubler) -> None:
    batcher = MicroBatcher(doubler, max_batch_size=16, max_wait=0.05)
    loop = asyncio.get_running_loop()
    try:
        pending = asyncio.gather(*(batcher.submit_async(item) for item in (1, 2, 3)))
        await asyncio.sleep(0.049)
        assert doubler.batches == []  # still waiting for more items

        assert await pending == [2, 4, 6]
        assert loop.time() >= 0.05
    finally:
        await batcher.close_async()

    assert doubler.batches == [[1, 2, 3]]


@pytest.mark.looptime
async def test_a_flush_submit_sends_its_batch_without_waiting(doubler: Doubler) -> None:
    batcher = MicroBatcher(doubler, max_batch_size=16, max_wait=10.0)
    loop = asyncio.get_running_loop()
    try:
        together = asyncio.gather(batcher.submit_async(1), batcher.submit_async(2, flush=True))
        assert await together == [2, 4]
        assert loop.time() < 10.0  # the flush item did not wait max_wait for company
    finally:
        await batcher.close_async()

    assert doubler.batches == [[1, 2]]  # items already queued still ride along


async def test_max_batch_size_one_processes_every_item_alone(doubler: Doubler) -> None:
    batcher = MicroBatcher(doubler, max_batch_size=1, max_wait=10.0)
    try:
        answers = await submit_all(batcher, [5, 6, 7, 8])
    finally:
        await batcher.close_async()

    assert answers == [10, 12, 14, 16]
    assert doubler.batches == [[5], [6], [7], [8]]


async def test_items_arriving_while_a_batch_runs_form_the_next_batch(held: Doubler) -> None:
    batcher = MicroBatcher(held, max_batch_size=8, max_wait=0.0)
    try:
        first = asyncio.gather(*(batcher.submit_async(item) for item in (1, 2)))
        await entered(held)
        second = asyncio.gather(*(batcher.submit_async(item) for item in (3, 4, 5)))
        await asyncio.sleep(0)
        held.release()
        assert (await first, await second) == ([2, 4], [6, 8, 10])
    finally:
        await batcher.close_async()

    assert held.batches == [[1, 2], [3, 4, 5]]


async def test_the_function_runs_off_the_event_loop_thread(doubler: Doubler) -> None:
    batcher = MicroBatcher(doubler, max_batch_size=4, max_wait=0.0)
    try:
        await submit_all(batcher, range(12))
    finally:
        await batcher.close_async()

    assert doubler.threads
    assert threading.get_ident() not in doubler.threads


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="max_batch_size"):
        MicroBatcher(Doubler(), max_batch_size=0)
    with pytest.raises(ConfigError, match="max_wait"):
        MicroBatcher(Doubler(), max_wait=-1)


# -- failures --------------------------------------------------------------------------


async def test_an_exception_reaches_every_caller_in_its_batch_and_the_batcher_recovers(
    doubler: Doubler,
) -> None:
    batcher = MicroBatcher(doubler, max_batch_size=3, max_wait=10.0)
    try:
        outcomes = await asyncio.gather(
            *(batcher.submit_async(item) for item in (1, -1, 2)), return_exceptions=True
        )
        after = await submit_all(batcher, [4, 5, 6])
    finally:
        await batcher.close_async()

    assert [type(o) for o in outcomes] == [ValueError, ValueError, ValueError]
    assert after == [8, 10, 12]
    assert batcher.batches == 1  # only the batch that succeeded counts


@pytest.mark.looptime
async def test_a_function_returning_the_wrong_number_of_rows_fails_its_batch_only() -> None:
    calls = 0

    def short(items: list[int]) -> list[int]:
        nonlocal calls
        calls += 1
        return items[:-1] if calls == 1 else items

    batcher = MicroBatcher(short, max_batch_size=2, max_wait=10.0)
    try:
        async with asyncio.timeout(5):  # virtual: a dead batcher fails fast, not hangs
            outcomes = await asyncio.gather(
                batcher.submit_async(1), batcher.submit_async(2), return_exceptions=True
            )
            after = await submit_all(batcher, [3, 4])
    finally:
        await batcher.close_async()

    assert [type(o) for o in outcomes] == [ValueError, ValueError]
    assert after == [3, 4]


@pytest.mark.looptime
async def test_a_caller_cancelled_before_the_flush_is_left_out(doubler: Doubler) -> None:
    batcher = MicroBatcher(doubler, max_batch_size=16, max_wait=1.0)
    try:
        tasks = [asyncio.create_task(batcher.submit_async(item)) for item in (1, 2, 3)]
        await asyncio.sleep(0.5)
        tasks[1].cancel()

        assert await tasks[0] == 2
        assert await tasks[2] == 6
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
    finally:
        await batcher.close_async()

    assert doubler.batches == [[1, 3]]


@pytest.mark.looptime
async def test_a_batch_whose_callers_all_left_is_not_run(doubler: Doubler) -> None:
    batcher = MicroBatcher(doubler, max_batch_size=16, max_wait=1.0)
    try:
        gone = [asyncio.create_task(batcher.submit_async(item)) for item in (1, 2)]
        await asyncio.sleep(0.5)
        for task in gone:
            task.cancel()
        await asyncio.wait(gone)
        await asyncio.sleep(1)  # past max_wait: the empty batch was dropped

        assert await batcher.submit_async(3) == 6
    finally:
        await batcher.close_async()

    assert doubler.batches == [[3]]


async def test_a_caller_cancelled_while_its_batch_runs_does_not_break_the_others(
    held: Doubler,
) -> None:
    batcher = MicroBatcher(held, max_batch_size=3, max_wait=10.0)
    try:
        tasks = [asyncio.create_task(batcher.submit_async(item)) for item in (1, 2, 3)]
        await entered(held)
        tasks[1].cancel()
        held.release()

        assert await tasks[0] == 2
        assert await tasks[2] == 6
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
    finally:
        await batcher.close_async()


# -- closing ---------------------------------------------------------------------------


async def test_aclose_cancels_callers_whose_batch_is_running_or_queued(held: Doubler) -> None:
    batcher = MicroBatcher(held, max_batch_size=2, max_wait=0.0)
    running = [asyncio.create_task(batcher.submit_async(item)) for item in (1, 2)]
    await entered(held)
    queued = [asyncio.create_task(batcher.submit_async(item)) for item in (3, 4, 5)]
    await asyncio.sleep(0)

    await batcher.close_async()

    for task in running + queued:
        with pytest.raises(asyncio.CancelledError):
            await task


@pytest.mark.looptime
async def test_aclose_cancels_callers_whose_batch_is_still_filling(doubler: Doubler) -> None:
    batcher = MicroBatcher(doubler, max_batch_size=16, max_wait=60.0)
    filling = [asyncio.create_task(batcher.submit_async(item)) for item in (1, 2)]
    await asyncio.sleep(1)  # the batcher holds both, waiting up to 60 s for more

    await batcher.close_async()

    done, _ = await asyncio.wait(filling, timeout=5)
    assert set(done) == set(filling), "callers were left waiting forever"
    assert all(task.cancelled() for task in filling)
    assert doubler.batches == []


async def test_submit_after_aclose_is_an_error(doubler: Doubler) -> None:
    batcher = MicroBatcher(doubler)
    assert await batcher.submit_async(1) == 2
    await batcher.close_async()

    with pytest.raises(RuntimeError, match="closed"):
        await batcher.submit_async(2)


async def test_aclose_of_an_unused_batcher_is_harmless(doubler: Doubler) -> None:
    batcher = MicroBatcher(doubler)
    await batcher.close_async()
    await batcher.close_async()
