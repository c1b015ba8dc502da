"""The fault soak behind ``nem-llm bench --soak``.

``run_soak`` runs many queries against an in-process simulator that injects 429s (with
Retry-After), 5xx, hung requests and schema-invalid answers, and checks the contract:
exactly one result per input, no duplicate indexes, every failure a typed error record with
its attempt log, and (from the server's request log) never more than ``rpm`` requests in
any 60 s window.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

import openai
from pydantic import BaseModel

from ..config import Limits
from ..matcher import Matcher
from ..models import MatchResult, RunStats
from ..sim import SimConfig, SimServer, max_in_window, run_simulator
from ..testing import FakeEmbedder
from .bench.config import make_catalog, make_queries
from .bench.probes import maybe_await, quiet_instructor

__all__ = ["SoakProgress", "SoakReport", "render_soak", "run_soak", "soak_checks"]

#: ``on_progress(completed, total)`` of the soak.
SoakProgress = Callable[[int, int], Awaitable[None] | None]


class SoakReport(BaseModel):
    """The fault soak: what came back, what the server saw, and the contract checks."""

    n: int
    concurrency: int
    rpm: float
    timeout_s: float
    max_attempts: int
    fault_rates: dict[str, float]
    results: int
    duplicate_indexes: int
    missing_indexes: int
    by_status: dict[str, int]
    by_error_type: dict[str, int]
    untyped_errors: int
    retries: int
    retries_by_cause: dict[str, int]
    rate_limited: int
    reasks: int
    server_requests: int
    server_by_kind: dict[str, int]
    max_requests_in_60s: int
    duration_s: float
    checks: dict[str, bool]

    @property
    def ok(self) -> bool:
        return all(self.checks.values())


def soak_checks(
    n: int,
    results: Sequence[MatchResult],
    arrivals: Sequence[float],
    rpm: float,
) -> dict[str, bool]:
    """The soak's contract, from the results and the server's arrival times (pure)."""
    indexes = Counter(r.index for r in results)
    errors = [r for r in results if r.status == "error"]
    return {
        "exactly_n_results": len(results) == n,
        "no_duplicate_indexes": all(c == 1 for c in indexes.values()),
        "every_index_present": set(indexes) == set(range(n)),
        "errors_typed_with_attempts": all(r.error_type and r.attempts for r in errors),
        "rpm_never_exceeded": max_in_window(arrivals) <= rpm,
    }


async def run_soak(
    n: int = 10_000,
    *,
    rpm: float = 3600.0,
    concurrency: int = 32,
    rate_429: float = 0.20,
    rate_5xx: float = 0.05,
    rate_hang: float = 0.02,
    rate_invalid: float = 0.03,
    retry_after: float = 0.01,
    latency_p50: float = 0.05,
    latency_p99: float | None = 0.2,
    attempt_timeout: float = 2.0,
    max_attempts: int = 6,
    seed: int = 0,
    on_progress: SoakProgress | None = None,
) -> SoakReport:
    """Run ``n`` queries through a faulty in-process simulator and check the contract.

    The simulator runs in a background thread (``run_simulator``) so its request log can
    be read: every arrival counts toward the RPM check, re-asks and retries included.
    Faults: ``rate_429`` 429s with ``Retry-After: retry_after``, ``rate_5xx`` split evenly
    between 500 and 503, ``rate_hang`` requests that never answer (the client gives up
    after ``attempt_timeout``), ``rate_invalid`` answers naming an id that was not offered.

    Every 429 pauses dispatch for every caller for Retry-After (the governor's cooldown), so
    with 20 % 429s the rate is about ``5 / (5 / (rpm / 60) + retry_after)`` requests/s; the
    defaults (rpm 3600, Retry-After 10 ms) give ~54/s, ~1.42 requests per query, so 10,000
    queries take about 4-5 minutes on a 2-core machine.
    """
    sim_config = SimConfig(
        seed=seed,
        latency="lognormal" if latency_p99 is not None else "fixed",
        latency_p50=latency_p50,
        latency_p99=latency_p99,
        rate_429=rate_429,
        rate_500=rate_5xx / 2,
        rate_503=rate_5xx / 2,
        rate_hang=rate_hang,
        rate_invalid=rate_invalid,
        retry_after=retry_after,
        hang_seconds=max(4 * attempt_timeout, 10.0),
    )
    limits = Limits(
        concurrency=concurrency, rpm=rpm, timeout=attempt_timeout, max_attempts=max_attempts
    )
    queries = make_queries(n)
    wall = time.monotonic()
    with quiet_instructor():
        sim, results, stats = await _soak(sim_config, limits, queries, on_progress)
    duration = time.monotonic() - wall
    records = sim.requests
    arrivals = [r.arrival for r in records]
    indexes = Counter(r.index for r in results)
    errors = [r for r in results if r.status == "error"]
    return SoakReport(
        n=n,
        concurrency=concurrency,
        rpm=rpm,
        timeout_s=attempt_timeout,
        max_attempts=max_attempts,
        fault_rates={
            "429": rate_429,
            "5xx": rate_5xx,
            "hang": rate_hang,
            "invalid": rate_invalid,
        },
        results=len(results),
        duplicate_indexes=sum(c - 1 for c in indexes.values() if c > 1),
        missing_indexes=len(set(range(n)) - set(indexes)),
        by_status=dict(Counter(r.status for r in results)),
        by_error_type=dict(Counter(str(r.error_type) for r in errors)),
        untyped_errors=sum(1 for r in errors if not (r.error_type and r.attempts)),
        retries=stats.retries,
        retries_by_cause=stats.retries_by_cause,
        rate_limited=stats.rate_limited,
        reasks=stats.reasks,
        server_requests=len(records),
        server_by_kind={k: v for k, v in sim.stats().items() if v},
        max_requests_in_60s=max_in_window(arrivals),
        duration_s=duration,
        checks=soak_checks(n, results, arrivals, rpm),
    )


async def _soak(
    sim_config: SimConfig,
    limits: Limits,
    queries: list[str],
    on_progress: SoakProgress | None,
) -> tuple[SimServer, list[MatchResult], RunStats]:
    """Run the queries against an in-process simulator thread; return its log and results."""
    simulator = run_simulator(sim_config)
    sim = await asyncio.to_thread(simulator.__enter__)
    results: list[MatchResult] = []
    try:
        client = openai.AsyncOpenAI(base_url=sim.base_url, api_key="sim", max_retries=0)
        matcher = Matcher(
            make_catalog(),
            client=client,
            model=sim_config.model,
            limits=limits,
            accept_threshold=1.01,
            novel_threshold=0.0,
            embedder=FakeEmbedder(),
        )
        try:
            await matcher.fit_async()
            stream = matcher.match_stream_async(
                queries, strategy="as_completed", batch_size=limits.concurrency
            )
            async for result in stream:
                results.append(result)
                if on_progress is not None:
                    await maybe_await(on_progress(len(results), len(queries)))
            stats = matcher.last_run_stats or RunStats()
        finally:
            await matcher.aclose()
            await client.close()
    finally:
        await asyncio.to_thread(simulator.__exit__, None, None, None)
    return sim, results, stats


def render_soak(report: SoakReport) -> str:
    """The soak's figures and checks as plain text."""

    def counts(d: dict[str, int]) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) or "-"

    faults = ", ".join(f"{k} {v:.0%}" for k, v in report.fault_rates.items())
    lines = [
        f"soak: {report.n} queries, concurrency {report.concurrency}, rpm {report.rpm:g}, "
        f"timeout {report.timeout_s:g} s, max_attempts {report.max_attempts}; "
        f"faults: {faults}",
        f"duration: {report.duration_s:.1f} s",
        f"results: {report.results} (duplicates {report.duplicate_indexes}, "
        f"missing {report.missing_indexes})",
        f"by status: {counts(report.by_status)}",
        f"by error_type: {counts(report.by_error_type)}",
        f"retries: {report.retries} ({counts(report.retries_by_cause)}); re-asks: {report.reasks}",
        f"429s received: {report.rate_limited}",
        f"server: {report.server_requests} requests ({counts(report.server_by_kind)})",
        f"request rate: {report.server_requests / max(report.duration_s, 1e-9):.1f}/s "
        f"(rpm {report.rpm:g} = {report.rpm / 60:g}/s)",
        f"max requests in any 60 s window: {report.max_requests_in_60s} (rpm {report.rpm:g})",
        "checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in report.checks.items()),
    ]
    return "\n".join(lines)
