"""Cancellation propagates and nothing is left pending: governor, runners and Matcher.

Leaving a result stream early (``break`` inside ``contextlib.aclosing``) or cancelling the
task that runs a batch cancels the LLM calls in flight, starts no new ones, re-raises
``CancelledError`` and leaves no task behind. The fake LLM here is an async
``httpx.MockTransport`` handler that holds each request until the test opens its gate.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from typing import Any

import httpx
import openai
import pytest

from nem_llm import Limits, Matcher
from nem_llm._llm.governor import Governor
from nem_llm._llm.strategies import (
    STRATEGIES,
    check_strategy,
    run_ordered,
    run_strategy,
    run_stream,
)
from nem_llm.errors import LLMError
from nem_llm.models import Usage
from nem_llm.testing import FakeEmbedder, FakeLLM

pytestmark = [pytest.mark.timeout(10), pytest.mark.usefixtures("no_loop_errors")]

REQUEST = httpx.Request("POST", "http://x/v1/chat/completions")


class Blocked:
    """An async callable that never finishes on its own; counts calls and cancellations."""

    def __init__(self) -> None:
        self.calls = 0
        self.cancelled = 0

    async def __call__(self, *_args: object) -> Any:
        self.calls += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


def no_usage(_value: object) -> Usage:
    return Usage()


# -- the governor ----------------------------------------------------------------------


@pytest.mark.looptime
async def test_cancelling_a_governed_call_cancels_fn_and_frees_its_slot_and_budget() -> None:
    governor = Governor(Limits(concurrency=1, budget_tokens=100))
    fn = Blocked()
    task = asyncio.create_task(governor.call_async(fn, estimated_tokens=100, usage_of=no_usage))
    await asyncio.sleep(1)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert (fn.calls, fn.cancelled) == (1, 1)
    assert governor.stats.in_flight == 0

    async def answer() -> str:
        return "ok"

    # the slot and the 100 reserved tokens are free again
    governed = await governor.call_async(answer, estimated_tokens=100, usage_of=no_usage)
    assert governed.value == "ok"


@pytest.mark.looptime
async def test_cancelling_a_governed_call_during_backoff_raises_cancelled_not_llm_error() -> None:
    governor = Governor(Limits())
    calls = 0

    async def unavailable() -> None:
        nonlocal calls
        calls += 1
        response = httpx.Response(503, headers={"retry-after": "100"}, request=REQUEST)
        raise openai.InternalServerError("busy", response=response, body=None)

    task = asyncio.create_task(
        governor.call_async(unavailable, estimated_tokens=1, usage_of=no_usage)
    )
    await asyncio.sleep(50)  # inside the 100 s backoff
    task.cancel()

    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 1
    assert governor.stats.failures == 0


@pytest.mark.looptime
async def test_cancelling_a_call_waiting_for_a_slot_never_runs_it() -> None:
    governor = Governor(Limits(concurrency=1))
    first, second = Blocked(), Blocked()
    holder = asyncio.create_task(governor.call_async(first, estimated_tokens=1, usage_of=no_usage))
    waiter = asyncio.create_task(governor.call_async(second, estimated_tokens=1, usage_of=no_usage))
    await asyncio.sleep(1)

    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder

    assert (first.calls, second.calls) == (1, 0)


@pytest.mark.looptime
async def test_timeout_of_an_attempt_is_not_mistaken_for_cancellation() -> None:
    governor = Governor(Limits(timeout=1.0, max_attempts=2))
    fn = Blocked()

    with pytest.raises(LLMError) as caught:
        await governor.call_async(fn, estimated_tokens=1, usage_of=no_usage)

    assert caught.value.cause == "timeout"
    assert fn.calls == 2


# -- the runners -----------------------------------------------------------------------


class Gated:
    """A worker whose call for item ``i`` waits for ``release(i)``; counts cancellations."""

    def __init__(self, n: int) -> None:
        self.events = [asyncio.Event() for _ in range(n)]
        self.calls: list[int] = []
        self.cancelled: list[int] = []

    async def __call__(self, index: int, item: object) -> int:
        self.calls.append(index)
        try:
            await self.events[index].wait()
        except asyncio.CancelledError:
            self.cancelled.append(index)
            raise
        return index


@pytest.mark.looptime
async def test_leaving_a_stream_early_cancels_the_remaining_work() -> None:
    worker = Gated(10)
    worker.events[2].set()

    async with aclosing(run_stream(range(10), worker, workers=4)) as stream:
        async for index in stream:
            assert index == 2
            break

    assert sorted(worker.calls) == [0, 1, 2, 3, 4]  # 4 workers; the one that finished took 4
    assert sorted(worker.cancelled) == [0, 1, 3, 4]
    await asyncio.sleep(10)
    assert len(worker.calls) == 5  # nothing started after the close


@pytest.mark.looptime
@pytest.mark.parametrize("asynchronous", [True, False], ids=["async-generator", "generator"])
async def test_leaving_a_stream_early_closes_its_generator_source(asynchronous: bool) -> None:
    closed: list[bool] = []

    async def agen() -> AsyncIterator[int]:
        try:
            for i in range(1000):
                yield i
        finally:
            closed.append(True)

    def gen() -> Iterator[int]:
        try:
            yield from range(1000)
        finally:
            closed.append(True)

    async def worker(index: int, item: int) -> int:
        return item

    source = agen() if asynchronous else gen()
    async with aclosing(run_stream(source, worker, workers=2)) as stream:
        async for _ in stream:
            break

    assert closed == [True]  # its finally ran at the close, not at garbage collection


@pytest.mark.looptime
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_leaving_any_strategy_early_starts_nothing_more_and_leaves_no_task(
    strategy: str,
) -> None:
    worker = Gated(6)
    for event in worker.events:
        event.set()

    async with aclosing(run_strategy(check_strategy(strategy), range(6), worker, workers=3)) as s:
        async for _ in s:
            calls_at_break = len(worker.calls)
            break
    await asyncio.sleep(10)

    assert len(worker.calls) == calls_at_break
    if strategy == "sequential":
        assert calls_at_break == 1


@pytest.mark.looptime
async def test_cancelling_the_consumer_cancels_the_workers_and_propagates() -> None:
    worker = Gated(8)
    task = asyncio.create_task(run_ordered(range(8), worker, workers=3, index_of=lambda i: i))
    await asyncio.sleep(1)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert sorted(worker.cancelled) == [0, 1, 2]
    assert len(worker.calls) == 3


# -- the Matcher -----------------------------------------------------------------------

NAMES = ["Germany", "France", "Austria", "Spain", "Italy", "Norway", "Sweden", "Poland"]


class GatedLLM:
    """Async fake LLM: the n-th request waits until ``gates[n]`` is set, then answers."""

    def __init__(self) -> None:
        self.fake = FakeLLM()
        self.gates: list[asyncio.Event] = []
        self.queries: list[str] = []
        self.cancelled = 0

    @property
    def started(self) -> int:
        return len(self.gates)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        gate = asyncio.Event()
        self.gates.append(gate)
        self.queries.append(json.loads(request.content)["messages"][-1]["content"])
        try:
            await gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return self.fake(request)


@pytest.fixture
async def llm() -> GatedLLM:
    return GatedLLM()


@pytest.fixture
async def matcher(llm: GatedLLM) -> AsyncIterator[Matcher]:
    http = httpx.AsyncClient(transport=httpx.MockTransport(llm))
    client = openai.AsyncOpenAI(api_key="t", base_url="http://fake/v1", http_client=http)
    matcher = Matcher(
        [{"id": name[:2].upper(), "name": name} for name in NAMES],
        client=client,
        embedder=FakeEmbedder(),
        accept_threshold=1.01,  # every query goes to the LLM
        novel_threshold=0.45,
        limits=Limits(concurrency=4),
    )
    await matcher.fit_async()
    warm_up = await matcher.match_async("qxzv jjj")  # novel: starts the micro-batcher only
    assert warm_up.status == "novel" and llm.started == 0
    try:
        yield matcher
    finally:
        await matcher.aclose()
        await http.aclose()


async def until(condition: Any, *, limit: float = 5.0) -> None:
    """Let the loop run (virtual time) until ``condition()`` holds."""
    async with asyncio.timeout(limit):
        while not condition():  # noqa: ASYNC110 - polling a plain attribute of a fake
            await asyncio.sleep(0.01)


@pytest.mark.looptime
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_leaving_match_stream_after_the_first_result_cancels_the_rest(
    matcher: Matcher, llm: GatedLLM, strategy: str
) -> None:
    tasks_before = asyncio.all_tasks()
    width = 1 if strategy == "sequential" else 4

    async def open_first_gate() -> None:
        await until(lambda: llm.started == width)
        llm.gates[0].set()

    opener = asyncio.create_task(open_first_gate())
    stream = matcher.match_stream_async(NAMES * 4, strategy=check_strategy(strategy))
    async with aclosing(stream):
        async for result in stream:
            first, started = result, llm.started
            break
    await opener

    assert first.status == "matched" and first.decided_by == "llm"
    # the answered call freed its slot: a concurrent strategy may have started one more
    assert started in ({1} if strategy == "sequential" else {width, width + 1})
    assert llm.cancelled == started - 1  # every call still in flight at the break
    await asyncio.sleep(10)
    assert llm.started == started  # no LLM call after the close
    assert asyncio.all_tasks() == tasks_before


@pytest.mark.looptime
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_cancelling_match_batch_cancels_in_flight_llm_calls(
    matcher: Matcher, llm: GatedLLM, strategy: str
) -> None:
    tasks_before = asyncio.all_tasks()
    width = 1 if strategy == "sequential" else 4
    task = asyncio.create_task(
        matcher.match_batch_async(NAMES * 4, strategy=check_strategy(strategy))
    )
    await until(lambda: llm.started == width)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert llm.cancelled == width
    await asyncio.sleep(10)
    assert llm.started == width
    assert asyncio.all_tasks() == tasks_before
