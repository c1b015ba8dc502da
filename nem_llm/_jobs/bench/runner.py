"""The run: every scenario of a :class:`BenchConfig` through a real ``Matcher``, one after
another, each against a fresh simulator server (or a given endpoint), into a report."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Literal

import openai

from ..._gc import tuned_gc
from ...config import Limits
from ...matcher import Matcher
from ...models import MatchResult, RunStats
from ...testing import FakeEmbedder
from .bounds import bound_ratio, ideal_makespan, simulated_latencies, theoretical_bound
from .config import BenchConfig, BenchProgress, Plan, make_catalog, make_queries, plans, resolve_rpm
from .probes import (
    LoopLag,
    SimProcess,
    load_avg,
    make_client,
    maybe_await,
    quiet_instructor,
    self_cpu,
)
from .report import BenchReport, BenchRow

__all__ = ["run_bench"]


def _ok_latency_mean(results: Sequence[MatchResult]) -> float | None:
    values = [a.latency_s for r in results for a in r.attempts if a.outcome == "ok"]
    return sum(values) / len(values) if values else None


async def _run_plan(
    plan: Plan,
    config: BenchConfig,
    on_progress: BenchProgress | None,
    sim_cpu: Callable[[], float | None] = lambda: None,
) -> tuple[BenchRow, list[MatchResult]]:
    queries = make_queries(plan.n, config.catalog_size)
    client = make_client(plan.base_url, config.api_key, config.http_client)
    limits = Limits(
        concurrency=plan.concurrency,
        rpm=plan.rpm,
        max_attempts=config.max_attempts,
        timeout=config.timeout,
    )
    matcher = Matcher(
        make_catalog(config.catalog_size),
        client=client,
        model=config.model,
        limits=limits,
        top_k=config.top_k,
        accept_threshold=1.01,
        novel_threshold=0.0,
        embedder=FakeEmbedder(),
    )
    stack = contextlib.ExitStack()
    try:
        await matcher.fit_async()
        loop = asyncio.get_running_loop()
        times: list[float] = []
        if config.gc_freeze:
            stack.enter_context(tuned_gc())
        cpu0, sim0 = self_cpu(), sim_cpu()
        started = loop.time()

        async def progress(done: int, total: int | None) -> None:
            times.append(loop.time() - started)
            if on_progress is not None:
                await maybe_await(on_progress(plan.name, done, plan.n))

        first: float | None = None
        async with LoopLag() as lag:
            if plan.strategy == "gather":
                results = await matcher.match_batch_async(
                    queries, strategy="gather", batch_size=plan.concurrency, on_progress=progress
                )
            else:
                results = []
                stream = matcher.match_stream_async(
                    queries,
                    strategy=plan.strategy,
                    batch_size=plan.concurrency,
                    on_progress=progress,
                )
                async with contextlib.aclosing(stream):
                    async for result in stream:
                        if first is None:
                            first = loop.time() - started
                        results.append(result)
            makespan = loop.time() - started
        if plan.strategy == "gather":
            first = makespan  # the caller holds nothing until the whole list returns
        cpu1, sim1 = self_cpu(), sim_cpu()
        stats = matcher.last_run_stats or RunStats()
    finally:
        stack.close()  # the collector as it was
        await matcher.aclose()
        await client.close()
    row = BenchRow(
        scenario=plan.name,
        strategy=plan.strategy,
        concurrency=plan.concurrency,
        rpm=plan.rpm,
        n=plan.n,
        subset_of=plan.subset_of,
        makespan_s=makespan,
        bound_s=0.0,  # filled in by run_bench once the latency is known
        throughput_rps=plan.n / makespan if makespan > 0 else 0.0,
        p50_s=stats.latency_p50_s,
        p95_s=stats.latency_p95_s,
        first_result_s=first,
        retries=stats.retries,
        rate_limited=stats.rate_limited,
        tokens=stats.usage.total_tokens,
        errors=stats.by_status.get("error", 0),
        llm_latency_mean_s=_ok_latency_mean(results),
        client_cpu_s=cpu1 - cpu0,
        loop_lag_mean_ms=lag.mean_ms,
        loop_lag_p99_ms=lag.p99_ms,
        sim_cpu_s=sim1 - sim0 if sim0 is not None and sim1 is not None else None,
        completion_times=[round(t, 4) for t in times],
    )
    return row, results


async def run_bench(
    config: BenchConfig, *, on_progress: BenchProgress | None = None
) -> BenchReport:
    """Run every scenario of ``config`` one after another and return the report.

    Without ``config.base_url`` a simulator child process serves one fresh server per
    scenario (the ``+rpm`` ones with the server-side limit ``sim_rpm``); it is stopped at
    the end. ``on_progress(scenario, completed, total)`` is called after every result.
    """
    with quiet_instructor():
        return await _run_bench(config, on_progress)


async def _run_bench(config: BenchConfig, on_progress: BenchProgress | None) -> BenchReport:
    wall = time.monotonic()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    load_before = load_avg()
    scenario_plans = plans(config)
    rows: list[BenchRow] = []
    all_results: list[list[MatchResult]] = []
    if config.base_url is None:
        sims = [config.sim_config(rpm=p.sim_rpm) for p in scenario_plans]
        async with SimProcess(sims) as proc:
            for plan, url in zip(scenario_plans, proc.base_urls, strict=True):
                row, results = await _run_plan(
                    replace(plan, base_url=url), config, on_progress, proc.cpu_seconds
                )
                rows.append(row)
                all_results.append(results)
        latency_mean = config.expected_latency()
        source: Literal["simulator", "measured"] = "simulator"
        target = "simulator"
    else:
        for plan in scenario_plans:
            row, results = await _run_plan(
                replace(plan, base_url=config.base_url), config, on_progress
            )
            rows.append(row)
            all_results.append(results)
        measured = _ok_latency_mean([r for rs in all_results for r in rs])
        latency_mean = measured if measured is not None else config.expected_latency()
        source = "measured" if measured is not None else "simulator"
        target = config.base_url
    random_latency = config.latency != "fixed" or source == "measured"
    for row in rows:
        row.bound_s = theoretical_bound(
            row.n, row.concurrency, latency_mean, row.rpm, random_latency=random_latency
        )
        row.ratio = bound_ratio(row.makespan_s, row.bound_s)
        if config.base_url is None:
            draws = simulated_latencies(config.sim_config(rpm=None), row.n)
            row.ideal_s = ideal_makespan(draws, row.concurrency, row.rpm)
    rpm, sim_rpm = resolve_rpm(config.rpm, config.sim_rpm)
    any_rpm = any(p.rpm is not None for p in scenario_plans)
    return BenchReport(
        target=target,
        n=config.n,
        concurrency=config.concurrency,
        rpm=rpm if any_rpm else None,
        sim_rpm=sim_rpm if any_rpm and config.base_url is None else None,
        sequential_n=config.effective_sequential_n,
        latency=config.latency if source == "simulator" else "measured",
        latency_p50_s=config.latency_p50,
        latency_p99_s=config.latency_p99,
        latency_mean_s=latency_mean,
        latency_source=source,
        http_client=config.http_client,
        started_at=started_at,
        duration_s=time.monotonic() - wall,
        python=f"{platform.python_implementation()} {platform.python_version()}, "
        f"openai {openai.__version__}",
        cpu_count=os.cpu_count(),
        load_avg_before=load_before,
        load_avg_after=load_avg(),
        rows=rows,
    )
