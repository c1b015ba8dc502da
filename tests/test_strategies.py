"""Strategies decide the order work starts and results arrive; every input yields one result.

The runners in ``nem_llm._llm.strategies`` are driven directly with workers that wait for
events the test releases in a chosen order; the Matcher's strategies run on the fake
embedder and the fake LLM (``httpx.MockTransport``), so nothing touches a network.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import aclosing
from typing import Any

import httpx
import openai
import pytest

from nem_llm import Limits, Matcher, MatchResult
from nem_llm._llm.stats import percentile
from nem_llm._llm.strategies import (
    STRATEGIES,
    check_strategy,
    run_ordered,
    run_strategy,
    run_stream,
)
from nem_llm.errors import ConfigError
from nem_llm.sim.protocol import parse_request
from nem_llm.testing import FakeEmbedder, FakeLLM

pytestmark = [pytest.mark.timeout(20), pytest.mark.usefixtures("no_loop_errors")]


class Gates:
    """A worker whose call for item ``i`` finishes when the test releases ``i``."""

    def __init__(self, n: int) -> None:
        self.events = [asyncio.Event() for _ in range(n)]
        self.running = 0
        self.peak = 0

    async def __call__(self, index: int, item: str) -> tuple[int, str]:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.events[index].wait()
        finally:
            self.running -= 1
        return index, item


async def collect(stream: Any, into: list[Any]) -> None:
    async with aclosing(stream):
        async for result in stream:
            into.append(result)


# -- order -----------------------------------------------------------------------------


@pytest.mark.looptime
async def test_as_completed_delivers_in_completion_order_with_input_index() -> None:
    items = ["a", "b", "c", "d", "e"]
    worker = Gates(len(items))
    delivered: list[tuple[int, str]] = []
    consumer = asyncio.create_task(collect(run_stream(items, worker, workers=5), delivered))

    for n, index in enumerate([3, 0, 4, 1, 2], start=1):
        await asyncio.sleep(1)
        worker.events[index].set()
        await asyncio.sleep(1)
        assert len(delivered) == n
    await consumer

    assert delivered == [(3, "d"), (0, "a"), (4, "e"), (1, "b"), (2, "c")]


@pytest.mark.looptime
async def test_gather_returns_results_in_input_order_whatever_the_completion_order() -> None:
    items = ["a", "b", "c", "d", "e"]
    worker = Gates(len(items))
    arrived: list[int] = []

    async def on_result(result: tuple[int, str]) -> None:
        arrived.append(result[0])

    ordered = asyncio.create_task(
        run_ordered(items, worker, workers=5, index_of=lambda r: r[0], on_result=on_result)
    )
    for index in [4, 2, 0, 3, 1]:
        await asyncio.sleep(1)
        worker.events[index].set()

    assert await ordered == [(0, "a"), (1, "b"), (2, "c"), (3, "d"), (4, "e")]
    assert arrived == [4, 2, 0, 3, 1]


@pytest.mark.looptime
async def test_sequential_runs_one_item_at_a_time_in_input_order() -> None:
    running = peak = 0

    async def worker(index: int, item: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(10 - item)  # later items would finish first if run together
        running -= 1
        return index

    results: list[int] = []
    await collect(run_strategy("sequential", range(10), worker, workers=8), results)

    assert results == list(range(10))
    assert peak == 1


@pytest.mark.looptime
@pytest.mark.parametrize("strategy", ["gather", "as_completed"])
async def test_concurrent_strategies_run_up_to_workers_at_once(strategy: str) -> None:
    worker = Gates(20)
    results: list[tuple[int, str]] = []
    consumer = asyncio.create_task(
        collect(run_strategy(check_strategy(strategy), "x" * 20, worker, workers=6), results)
    )
    await asyncio.sleep(1)
    assert worker.running == 6
    for event in worker.events:
        event.set()
    await consumer

    assert worker.peak == 6
    assert sorted(i for i, _ in results) == list(range(20))


def test_strategy_names_are_checked() -> None:
    assert STRATEGIES == ("sequential", "gather", "as_completed")
    with pytest.raises(ConfigError, match="as_completed"):
        check_strategy("fastest")


async def test_workers_must_be_at_least_one() -> None:
    async def worker(index: int, item: str) -> int:
        return index

    with pytest.raises(ConfigError, match="workers"):
        await anext(run_stream(["a"], worker, workers=0))


# -- inputs ----------------------------------------------------------------------------


async def agen(items: Iterable[str]) -> AsyncIterator[str]:
    for item in items:
        await asyncio.sleep(0)
        yield item


def sources() -> dict[str, Any]:
    words = ["a", "b", "c", "d", "e", "f", "g"]
    return {
        "list": lambda: list(words),
        "tuple": lambda: tuple(words),
        "generator": lambda: (w for w in words),
        "iterator": lambda: iter(words),
        "dict keys": lambda: dict.fromkeys(words).keys(),
        "async generator": lambda: agen(words),
    }


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("source", list(sources()))
async def test_any_iterable_or_async_iterable_is_accepted(source: str, strategy: str) -> None:
    async def worker(index: int, item: str) -> tuple[int, str]:
        await asyncio.sleep(0)
        return index, item

    results: list[tuple[int, str]] = []
    stream = run_strategy(check_strategy(strategy), sources()[source](), worker, workers=3)
    await collect(stream, results)

    assert sorted(results) == list(enumerate("abcdefg"))


async def test_large_generator_is_pulled_lazily_by_a_fixed_set_of_workers() -> None:
    n, workers = 100_000, 8
    pulled = consumed = 0
    ahead = tasks_seen = 0

    def numbers() -> Iterator[int]:
        nonlocal pulled
        for i in range(n):
            pulled += 1
            yield i

    async def worker(index: int, item: int) -> int:
        nonlocal tasks_seen
        if index % 997 == 0:
            tasks_seen = max(tasks_seen, len(asyncio.all_tasks()))
        await asyncio.sleep(0)
        return index

    seen = bytearray(n)
    stream = run_stream(numbers(), worker, workers=workers)
    async with aclosing(stream):
        async for index in stream:
            consumed += 1
            ahead = max(ahead, pulled - consumed)
            seen[index] += 1

    assert consumed == n
    assert seen == bytearray([1]) * n  # every index once: no drop, no duplicate
    assert ahead <= 3 * workers
    assert tasks_seen <= workers + 1  # the workers and this test


@pytest.mark.looptime
async def test_every_input_yields_exactly_one_result_in_any_completion_order() -> None:
    rng = random.Random(3)
    delays = [rng.uniform(0, 5) for _ in range(500)]

    async def worker(index: int, delay: float) -> int:
        await asyncio.sleep(delay)
        return index

    results: list[int] = []
    await collect(run_stream(delays, worker, workers=50), results)

    assert len(results) == len(delays)
    assert set(results) == set(range(len(delays)))
    assert results != sorted(results)  # they did finish out of order


# -- failures --------------------------------------------------------------------------


@pytest.mark.looptime
async def test_worker_exception_propagates_and_cancels_the_rest() -> None:
    cancelled: list[int] = []

    async def worker(index: int, item: str) -> int:
        if index == 3:
            await asyncio.sleep(1)
            raise ZeroDivisionError("a bug in the worker")
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(index)
            raise
        return index

    with pytest.raises(ZeroDivisionError, match="a bug"):
        await collect(run_stream("abcdef", worker, workers=6), [])

    assert sorted(cancelled) == [0, 1, 2, 4, 5]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["iterator", "async-iterator"])
async def test_input_iterator_exception_propagates(asynchronous: bool) -> None:
    def broken() -> Iterator[str]:
        yield "a"
        yield "b"
        raise OSError("disk gone")

    async def abroken() -> AsyncIterator[str]:
        for item in broken():
            yield item

    async def worker(index: int, item: str) -> str:
        return item

    source = abroken() if asynchronous else broken()
    with pytest.raises(OSError, match="disk gone"):
        await collect(run_stream(source, worker, workers=2), [])


# -- through the Matcher ---------------------------------------------------------------

NAMES = ["Germany", "France", "Austria", "Spain", "Italy", "Norway", "Sweden", "Poland"]


def entities() -> list[dict[str, Any]]:
    return [{"id": name[:2].upper(), "name": name} for name in NAMES]


class CountingLLM:
    """Async ``FakeLLM`` wrapper that counts requests running at once."""

    def __init__(self) -> None:
        self.fake = FakeLLM()
        self.running = 0
        self.peak = 0
        self.queries: list[str] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.queries.append(parse_request(json.loads(request.content)).query)
        try:
            await asyncio.sleep(0.01)
            return self.fake(request)
        finally:
            self.running -= 1


@pytest.fixture
async def llm() -> CountingLLM:
    return CountingLLM()


@pytest.fixture
async def matcher(llm: CountingLLM) -> AsyncIterator[Matcher]:
    http = httpx.AsyncClient(transport=httpx.MockTransport(llm))
    client = openai.AsyncOpenAI(api_key="t", base_url="http://fake/v1", http_client=http)
    matcher = Matcher(
        entities(),
        client=client,
        embedder=FakeEmbedder(),
        accept_threshold=1.01,  # every query goes to the LLM
        novel_threshold=0.45,
        limits=Limits(concurrency=4),
    )
    await matcher.fit_async()
    try:
        yield matcher
    finally:
        await matcher.aclose()
        await http.aclose()


QUERIES = [*NAMES[:6], *(name.upper() for name in NAMES[:4])]


@pytest.mark.looptime
@pytest.mark.parametrize("strategy", ["sequential", "gather"])
async def test_match_batch_returns_one_result_per_query_in_input_order(
    matcher: Matcher, strategy: str
) -> None:
    results = await matcher.match_batch_async(QUERIES, strategy=check_strategy(strategy))

    assert [r.query for r in results] == QUERIES
    assert [r.index for r in results] == list(range(len(QUERIES)))
    assert [r.entity_id for r in results] == [q[:2].upper() for q in QUERIES]
    assert {r.decided_by for r in results} == {"llm"}


@pytest.mark.looptime
async def test_match_batch_as_completed_returns_one_result_per_query_with_its_index(
    matcher: Matcher,
) -> None:
    results = await matcher.match_batch_async(QUERIES, strategy="as_completed")

    assert sorted(r.index for r in results) == list(range(len(QUERIES)))
    assert all(r.query == QUERIES[r.index] for r in results)
    assert all(r.entity_id == r.query[:2].upper() for r in results)


@pytest.mark.looptime
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_match_stream_yields_each_index_once(matcher: Matcher, strategy: str) -> None:
    results: list[MatchResult] = []
    await collect(matcher.match_stream_async(QUERIES, strategy=check_strategy(strategy)), results)

    assert sorted(r.index for r in results) == list(range(len(QUERIES)))
    assert all(r.query == QUERIES[r.index] for r in results)


@pytest.mark.looptime
async def test_sequential_matcher_makes_one_llm_call_at_a_time(
    matcher: Matcher, llm: CountingLLM
) -> None:
    await matcher.match_batch_async(QUERIES, strategy="sequential")

    assert llm.peak == 1
    assert llm.queries == QUERIES  # started in input order


@pytest.mark.looptime
async def test_gather_matcher_runs_llm_calls_up_to_the_concurrency_limit(
    matcher: Matcher, llm: CountingLLM
) -> None:
    await matcher.match_batch_async(QUERIES, strategy="gather")

    assert llm.peak == 4


@pytest.mark.looptime
@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_match_batch_accepts_generators_and_async_generators(
    matcher: Matcher, strategy: str
) -> None:
    from_generator = await matcher.match_batch_async(
        (q for q in QUERIES), strategy=check_strategy(strategy)
    )
    from_async = await matcher.match_batch_async(agen(QUERIES), strategy=check_strategy(strategy))

    for results in (from_generator, from_async):
        assert sorted((r.index, r.query) for r in results) == list(enumerate(QUERIES))


@pytest.mark.looptime
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_on_progress_counts_every_result_with_the_total(
    matcher: Matcher, strategy: str, kind: str
) -> None:
    calls: list[tuple[int, int | None]] = []

    def sync_progress(done: int, total: int | None) -> None:
        calls.append((done, total))

    async def async_progress(done: int, total: int | None) -> None:
        await asyncio.sleep(0)
        calls.append((done, total))

    progress = sync_progress if kind == "sync" else async_progress
    n = len(QUERIES)
    await matcher.match_batch_async(
        QUERIES, strategy=check_strategy(strategy), on_progress=progress
    )
    assert calls == [(i, n) for i in range(1, n + 1)]

    calls.clear()
    await matcher.match_batch_async(
        (q for q in QUERIES), strategy=check_strategy(strategy), on_progress=progress
    )
    assert calls == [(i, None) for i in range(1, n + 1)]


@pytest.mark.looptime
async def test_bad_queries_become_error_records_in_place(matcher: Matcher) -> None:
    queries: list[Any] = ["Germany", "", 42, "France"]

    results = await matcher.match_batch_async(queries)

    assert [r.status for r in results] == ["matched", "error", "error", "matched"]
    assert [r.index for r in results] == [0, 1, 2, 3]


# -- run stats -------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([4.0], 95) == 4.0
    assert percentile([float(v) for v in range(1, 11)], 50) == 5.0  # ceil(0.5 * 10) = 5th
    assert percentile([float(v) for v in range(1, 21)], 95) == 19.0
    assert percentile([float(v) for v in range(1, 21)], 100) == 20.0
    assert percentile([1.0, 2.0, 3.0], 1) == 1.0


@pytest.mark.looptime
async def test_last_run_stats_count_every_result_and_every_attempt() -> None:
    failed_once: set[str] = set()

    def policy(query: str, ids: tuple[str, ...]) -> str | httpx.Response:
        if query.startswith("S") and query not in failed_once:  # Spain, Sweden: one 503
            failed_once.add(query)
            return httpx.Response(503, json={"error": {"message": "busy"}})
        return ids[0]

    http = httpx.AsyncClient(transport=httpx.MockTransport(FakeLLM(policy)))
    client = openai.AsyncOpenAI(api_key="t", base_url="http://fake/v1", http_client=http)
    matcher = Matcher(
        entities(),
        client=client,
        embedder=FakeEmbedder(),
        accept_threshold=1.01,
        novel_threshold=0.45,
    )
    try:
        await matcher.fit_async()
        results = await matcher.match_batch_async([*NAMES, "qxzv jjj"])
    finally:
        await matcher.aclose()
        await http.aclose()

    stats = matcher.last_run_stats
    assert stats is not None
    assert stats.total == 9
    assert stats.by_status == {"matched": 8, "novel": 1}
    assert stats.by_decided_by == {"llm": 8, "embedding": 1}
    assert stats.llm_calls == 8
    assert stats.llm_attempts == 10
    assert stats.retries_by_cause == {"server": 2}
    assert stats.usage.total_tokens == sum(r.usage.total_tokens for r in results) > 0


@pytest.mark.looptime
async def test_sequential_retrieval_does_not_wait_the_micro_batchers_max_wait() -> None:
    """One query in flight: waiting ``max_wait`` for company would only add latency."""
    loop = asyncio.get_running_loop()
    async with Matcher(entities(), embedder=FakeEmbedder(), llm=False, max_wait=5.0) as m:
        await m.fit_async(show_progress=False)
        started = loop.time()
        results = await m.match_batch_async(NAMES[:4], strategy="sequential")

    assert [r.candidates[0].entity_id for r in results] == [n[:2].upper() for n in NAMES[:4]]
    assert loop.time() - started < 5.0  # four waits would take 20 s of loop time
