"""The bound maths of the strategy benchmark: the least makespan N calls can take.

    bound = max(ceil(N / C) * L, N / RPM * 60)          (fixed latency L)
    bound = max(N * mean(L) / C,  N / RPM * 60)          (random latency)

The mean of a log-normal latency with median p50 is ``p50 * exp(sigma**2 / 2)``. The bound
leaves out the tail of the last wave (the slowest calls started near the end), so against
the simulator a row also carries ``ideal``: the makespan of a zero-overhead client over the
simulator's own seeded latency draws (:func:`ideal_makespan` of
:func:`simulated_latencies`). Pure functions, no I/O.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence

from ...errors import ConfigError
from ...sim import SimConfig
from ...sim.config import LatencyKind, lognormal_sigma, sample_latency

__all__ = [
    "bound_ratio",
    "ideal_makespan",
    "mean_latency",
    "simulated_latencies",
    "theoretical_bound",
]


def mean_latency(
    kind: LatencyKind,
    p50: float,
    *,
    p99: float | None = None,
    low: float = 0.0,
    high: float | None = None,
) -> float:
    """Expected latency of the simulator's distribution, in seconds.

    ``fixed``: ``p50``; ``uniform``: ``(low + high) / 2``; ``lognormal``:
    ``p50 * exp(sigma**2 / 2)`` with ``sigma = ln(p99 / p50) / 2.326``.

    Example:
        >>> round(mean_latency("lognormal", 1.0, p99=3.0), 4)
        1.1180
    """
    if kind == "fixed":
        return float(p50)
    if kind == "uniform":
        return (low + (high if high is not None else low)) / 2.0
    if p99 is None:
        raise ConfigError("lognormal latency needs p99")
    sigma = lognormal_sigma(p50, p99)
    return float(p50 * math.exp(sigma * sigma / 2.0))


def theoretical_bound(
    n: int,
    concurrency: int,
    latency_s: float,
    rpm: float | None = None,
    *,
    random_latency: bool = False,
) -> float:
    """The least makespan ``n`` calls can take: ``max(latency term, n / rpm * 60)``.

    The latency term is ``ceil(n / concurrency) * latency_s`` for a fixed latency (whole
    waves of ``concurrency`` calls) and ``n * latency_s / concurrency`` for a random one,
    where ``latency_s`` is the mean (a work-conserving pool keeps every slot busy).

    Example:
        >>> theoretical_bound(1000, 64, 1.0)
        16.0
        >>> theoretical_bound(1000, 64, 1.0, rpm=1800)
        33.333333333333336
    """
    if n < 0 or concurrency < 1 or latency_s < 0:
        raise ConfigError("theoretical_bound needs n >= 0, concurrency >= 1, latency_s >= 0")
    if random_latency:
        by_latency = n * latency_s / concurrency
    else:
        by_latency = math.ceil(n / concurrency) * latency_s
    by_rate = n / rpm * 60.0 if rpm else 0.0
    return max(by_latency, by_rate)


def bound_ratio(makespan_s: float, bound_s: float) -> float | None:
    """``makespan / bound`` (1.0 is ideal), or ``None`` when the bound is zero."""
    if bound_s <= 0:
        return None
    return makespan_s / bound_s


def ideal_makespan(latencies: Sequence[float], concurrency: int, rpm: float | None = None) -> float:
    """The makespan of a zero-overhead client: list scheduling of ``latencies`` in order.

    Call ``k`` starts as soon as one of ``concurrency`` slots is free and, with ``rpm``, not
    before ``k * 60 / rpm`` (an exact pacer). Against the simulator, whose ``k``-th arriving
    request gets its ``k``-th latency draw, this is the best any client could do; the gap
    between it and :func:`theoretical_bound` is the tail of the last wave.

    Example:
        >>> ideal_makespan([1.0, 1.0, 1.0, 1.0, 1.0], 2)
        3.0
        >>> ideal_makespan([0.5, 0.5, 0.5], 3, rpm=60)
        2.5
    """
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    interval = 60.0 / rpm if rpm else 0.0
    free = [0.0] * min(concurrency, max(len(latencies), 1))
    heapq.heapify(free)
    end = 0.0
    for k, latency in enumerate(latencies):
        start = max(heapq.heappop(free), k * interval)
        heapq.heappush(free, start + latency)
        end = max(end, start + latency)
    return end


def simulated_latencies(config: SimConfig, n: int) -> list[float]:
    """The latencies the simulator draws for its first ``n`` requests (arrival order).

    Mirrors ``SimServer``'s use of its seeded ``random.Random``: per request one draw for
    the fault kind, then one for the latency. Valid for configs without faults and with
    the ``top`` policy (the benchmark's); a test checks it against the server's log.
    """
    rng = random.Random(config.seed)
    out = []
    for _ in range(n):
        rng.random()  # the fault draw
        out.append(sample_latency(config, rng))
    return out
