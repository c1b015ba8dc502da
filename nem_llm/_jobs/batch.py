"""The batch adjudication job behind ``nem-llm match``: files in, results out, resumable.

State lives next to the output (``<out>.state/``): ``run.sqlite`` holds the run checkpoint
(one committed row per finished input row) and the LLM decision cache; ``index/`` holds
the catalog's vectors. A run killed at any point and started again with the same command
skips the rows already recorded (at most the in-flight LLM calls are repeated), and the
cache means a rerun never pays twice for the same decision.

The output file is a projection of the checkpoint: rows are appended one ``os.write`` each
while the job runs (completion order), and on a clean finish with ``order="input"`` the
file is rewritten in input order (write to a temp file, then an atomic rename).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from .._gc import tuned_gc
from .._llm.cache import DecisionCache
from .._llm.stats import StatsCollector
from ..catalog import Catalog, load_catalog
from ..errors import ConfigError
from ..matcher import Matcher
from ..models import MatchResult
from .checkpoint import RunStore
from .io import AtomicLineWriter, QueryRow, count_rows
from .runs import (
    JobSummary,
    MatchJob,
    ProgressHook,
    error_row,
    output_row,
    row_filter,
    row_query,
    run_key,
    workload_sample,
    write_output,
)

__all__ = [
    "JobSummary",
    "MatchJob",
    "check_where",
    "job_workload",
    "load_job_catalog",
    "run_match_job",
]


async def job_workload(job: MatchJob, matcher: Matcher) -> list[str | dict[str, Any]]:
    """A sample of the job's queries for ``fit``: the LLM labels a share of it (the label
    budget) and its records fit the field model."""
    labels = matcher.settings.resolved_label_budget(matcher.llm_configured)
    if not labels and not matcher.settings.field_model:
        return []
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, workload_sample, job)


def load_job_catalog(job: MatchJob) -> Catalog:
    """The job's catalog, with its filters checked against the catalog's attributes."""
    s = job.settings
    catalog = load_catalog(job.catalog, include_description=s.index_description, columns=s.columns)
    check_where(job, catalog)
    return catalog


def check_where(job: MatchJob, catalog: Catalog) -> None:
    """A filter on an attribute no entity has is refused before any work."""
    known = catalog.attribute_names()
    for attribute in job.where:
        if attribute not in known:
            raise ConfigError(
                f"--where {attribute}=...: no entity in {job.catalog} has the attribute "
                f"{attribute!r} (attributes: {', '.join(sorted(known)[:10]) or 'none'})"
            )


async def run_match_job(
    job: MatchJob,
    *,
    stop: asyncio.Event | None = None,
    on_progress: ProgressHook | None = None,
    matcher_factory: Callable[..., Matcher] = Matcher,
) -> JobSummary:
    """Run (or resume) a batch job; every input row ends as exactly one output row.

    Args:
        job: the inputs and knobs.
        stop: set it to stop (Ctrl-C): no new rows and no new LLM calls; results already
            done are recorded, the rest (in-flight LLM calls included) is cancelled and
            left for the next run; the summary says ``interrupted``.
        on_progress: ``hook(done, total, governor_stats)`` after every row.
        matcher_factory: builds the Matcher (tests inject fakes).

    Raises:
        InputError / CatalogError / ConfigError: fatal input problems, before any work.
    """
    loop = asyncio.get_running_loop()
    catalog = await loop.run_in_executor(None, load_job_catalog, job)
    rows = job.read_rows()
    total = count_rows(job.queries)
    state = job.state_dir
    state.mkdir(parents=True, exist_ok=True)
    key, meta = await loop.run_in_executor(None, run_key, job, "local")

    store = RunStore(state / "run.sqlite")
    cache = DecisionCache(state / "run.sqlite")
    matcher = matcher_factory(catalog, job.matcher_settings(), cache=cache)
    collector = StatsCollector()
    started = loop.time()
    interrupted = False
    try:
        await store.open_run_async(key, meta)
        done = await store.done_indexes_async(key)
        resumed = len(done)
        # the output file is rebuilt from the checkpoint, then appended to (a Parquet
        # output is written at the end: the rows go to a JSONL file beside the state)
        live = job.live_out
        await loop.run_in_executor(None, write_output, live, store, key, "completion")
        await matcher.fit_async(workload=await job_workload(job, matcher))
        pending: dict[int, QueryRow] = {}
        filters: dict[int, dict[str, str]] = {}
        finished = resumed

        # the built index is long-lived: keep the collector's full passes off it
        with tuned_gc(), AtomicLineWriter(live, append=True) as writer:

            async def emit(row: QueryRow, result: MatchResult) -> None:
                nonlocal finished
                line = output_row(row, result)
                await store.record_async(key, row.index, line)  # durable first
                writer.write_line(line)
                collector.add(result, loop.time() - started)
                finished += 1
                if on_progress is not None:
                    on_progress(finished, total, matcher.governor_stats)

            async def feed() -> AsyncIterator[str | dict[str, Any]]:
                nonlocal interrupted
                position = 0
                for row in rows:
                    if row.index in done:
                        continue
                    if stop is not None and stop.is_set():
                        interrupted = True
                        return
                    if row.error is not None or row.query is None:
                        await emit(row, error_row(row))
                        continue
                    pending[position] = row
                    if job.where:
                        filters[position] = row_filter(job.where, row)
                    position += 1
                    yield row_query(job, row)

            stream = matcher.match_stream_async(
                feed(),
                strategy=job.strategy,
                where=(lambda i: filters.pop(i, None) or None) if job.where else None,
            )
            # Stop (Ctrl-C) must stop LLM dispatch, not only the feed: the workers have
            # already pulled rows ahead that wait for an LLM slot. Results that are ready
            # are still recorded; then the stream is cancelled (in-flight calls too) and
            # the unrecorded rows are left for the next run.
            stopped = asyncio.ensure_future(stop.wait()) if stop is not None else None
            try:
                async with aclosing(stream):
                    while True:
                        step = asyncio.ensure_future(anext(stream, None))
                        try:
                            waits = {step} if stopped is None else {step, stopped}
                            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                        finally:
                            if not step.done():
                                step.cancel()
                                await asyncio.wait({step})
                        if step.cancelled():
                            interrupted = True
                            break
                        result = step.result()
                        if result is None:
                            break
                        row = pending.pop(result.index)
                        await emit(row, result)
            finally:
                if stopped is not None:
                    stopped.cancel()
        if not interrupted:
            await store.mark_complete_async(key)
        if job.parquet_out:
            order = job.order if not interrupted else "completion"
            await loop.run_in_executor(None, write_output, job.out, store, key, order)
        elif not interrupted and job.order == "input":
            await loop.run_in_executor(None, write_output, job.out, store, key, "input")
    finally:
        rows.close()
        await matcher.aclose()
        store.close()
        cache.close()
    return JobSummary(
        stats=collector.finish(loop.time() - started),
        rows_total=finished,
        rows_resumed=resumed,
        interrupted=interrupted,
        out=job.out,
        state_dir=state,
        llm_configured=matcher.llm_configured,
        calibration=matcher.calibration,
    )
