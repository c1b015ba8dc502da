"""Strategies decide the ORDER work starts and results are delivered; the governor decides
how much runs at once.

- ``sequential``: one item at a time, in input order.
- ``gather``: concurrent; results returned in input order.
- ``as_completed``: concurrent; results delivered as they finish (each carries its index).

None of them creates one task per item: a fixed set of ``workers`` pulls items lazily from
the input (any iterable or async iterable), so 100,000 queries run in bounded memory.
Every item yields exactly one result; leaving a stream early cancels the remaining work.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Iterable
from typing import TypeVar, get_args

from ..errors import ConfigError
from ..settings import Strategy

__all__ = ["STRATEGIES", "Strategy", "aiter_indexed", "run_ordered", "run_strategy", "run_stream"]

STRATEGIES: tuple[str, ...] = get_args(Strategy)

Q = TypeVar("Q")
R = TypeVar("R")
Worker = Callable[[int, Q], Awaitable[R]]


def check_strategy(strategy: str) -> Strategy:
    """Validate a strategy name (clear error listing the choices)."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
    return strategy  # type: ignore[return-value]


async def aiter_indexed(
    items: Iterable[Q] | AsyncIterable[Q],
) -> AsyncGenerator[tuple[int, Q], None]:
    """Number the items of a sync or async iterable, lazily.

    Closing this generator early also closes a generator it reads from: ``async for``
    alone would leave an async generator suspended (its ``finally`` blocks, an open file
    say, unrun) until garbage collection schedules its ``aclose()`` on the loop.
    """
    if isinstance(items, AsyncIterable):
        iterator = aiter(items)
        try:
            i = 0
            async for item in iterator:
                yield i, item
                i += 1
        finally:
            if inspect.isasyncgen(iterator):
                await iterator.aclose()
    else:
        iterator_ = iter(items)
        try:
            for i, item in enumerate(iterator_):
                yield i, item
        finally:
            if inspect.isgenerator(iterator_):
                iterator_.close()


class _Failure:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_DONE = object()


async def run_stream(
    items: Iterable[Q] | AsyncIterable[Q], worker: Worker[Q, R], *, workers: int
) -> AsyncGenerator[R, None]:
    """Run ``worker(index, item)`` on every item with ``workers`` tasks; yield as finished.

    Backpressure: at most ``2 * workers`` finished results wait for the consumer. If the
    consumer leaves early (``break``, an exception, or ``aclose()``), the workers are
    cancelled and awaited before the generator finishes, so nothing is left pending.
    A worker exception (a bug: per-item failures are the worker's to turn into records)
    or an exception from the input cancels the rest and propagates.
    """
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    source = aiter_indexed(items)
    pull_lock = asyncio.Lock()  # an async iterator must not be advanced concurrently
    out: asyncio.Queue[object] = asyncio.Queue(maxsize=2 * workers)
    alive = workers

    async def work() -> None:
        nonlocal alive
        try:
            while True:
                async with pull_lock:
                    try:
                        index, item = await anext(source)
                    except StopAsyncIteration:
                        break
                await out.put(await worker(index, item))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            await out.put(_Failure(exc))
        finally:
            alive -= 1
        if alive == 0:
            await out.put(_DONE)

    tasks = [asyncio.create_task(work(), name=f"nem-llm-worker-{n}") for n in range(workers)]
    try:
        while True:
            got = await out.get()
            if got is _DONE:
                break
            if isinstance(got, _Failure):
                raise got.exc
            yield got  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await source.aclose()


async def run_sequential(
    items: Iterable[Q] | AsyncIterable[Q], worker: Worker[Q, R]
) -> AsyncGenerator[R, None]:
    """One at a time, in input order."""
    source = aiter_indexed(items)
    try:
        async for index, item in source:
            yield await worker(index, item)
    finally:
        await source.aclose()


async def run_ordered(
    items: Iterable[Q] | AsyncIterable[Q],
    worker: Worker[Q, R],
    *,
    workers: int,
    index_of: Callable[[R], int],
    on_result: Callable[[R], Awaitable[None]] | None = None,
) -> list[R]:
    """Concurrent, returned in input order (``gather`` semantics without a task per item)."""
    done: dict[int, R] = {}
    stream = run_stream(items, worker, workers=workers)
    try:
        async for result in stream:
            done[index_of(result)] = result
            if on_result is not None:
                await on_result(result)
    finally:
        await stream.aclose()
    return [done[i] for i in sorted(done)]


def run_strategy(
    strategy: Strategy,
    items: Iterable[Q] | AsyncIterable[Q],
    worker: Worker[Q, R],
    *,
    workers: int,
) -> AsyncGenerator[R, None]:
    """The result stream of a strategy: input order for sequential, completion otherwise.

    ``gather`` streams in completion order here too: callers sort by index at the end
    (as ``Matcher.match_batch_async`` does), or use :func:`run_ordered`.
    """
    if strategy == "sequential":
        return run_sequential(items, worker)
    return run_stream(items, worker, workers=workers)
