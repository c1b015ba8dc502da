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
import hashlib
import json
import os
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .._gc import tuned_gc
from ..catalog import CatalogColumns, load_catalog
from ..config import Limits
from ..errors import ConfigError
from ..llm.adjudication import PROMPT_VERSION
from ..llm.cache import DecisionCache
from ..llm.governor import GovernorStats
from ..llm.stats import StatsCollector
from ..llm.strategies import Strategy, check_strategy
from ..matcher import Matcher
from ..models import MatchResult, RunStats
from .checkpoint import RunStore
from .io import AtomicLineWriter, QueryRow, count_rows, read_queries

__all__ = ["JobSummary", "MatchJob", "run_match_job"]

OutputOrder = Literal["input", "completion"]
ProgressHook = Callable[[int, int | None, GovernorStats | None], None]


@dataclass(frozen=True, kw_only=True)
class MatchJob:
    """Everything ``nem-llm match`` needs; equal jobs resume each other."""

    catalog: Path
    queries: Path
    out: Path
    query_column: str | None = None
    id_column: str | None = None
    strategy: Strategy = "as_completed"
    order: OutputOrder = "input"
    model: str = "gpt-4o-mini"
    base_url: str | None = None
    top_k: int = 5
    limits: Limits = field(default_factory=Limits)
    accept_threshold: float | None = None
    margin: float | None = None
    novel_threshold: float | None = None
    index_description: bool = False
    state: Path | None = None
    #: (entity attribute, query column) pairs: each row's candidates are filtered to
    #: entities whose attribute equals the row's value (an empty value: no filter)
    where: tuple[tuple[str, str], ...] = ()
    columns: CatalogColumns | None = None
    prompt_attributes: tuple[str, ...] = ()
    rewrite: bool = False
    index: Path | None = None  # a saved index to reuse (default: one under the state dir)
    encoder: str | None = None  # the Matcher's encoder= (None: its default, "auto")

    @property
    def state_dir(self) -> Path:
        return self.state or self.out.with_name(self.out.name + ".state")


@dataclass
class JobSummary:
    """What the job did: this session's stats plus rows carried over from earlier runs."""

    stats: RunStats
    rows_total: int
    rows_resumed: int
    interrupted: bool
    out: Path
    state_dir: Path
    llm_configured: bool


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _run_meta(job: MatchJob) -> dict[str, object]:
    # what makes two runs "the same": inputs by content, and every knob that changes answers
    return {
        "catalog_sha256": _sha256_file(job.catalog),
        "queries_sha256": _sha256_file(job.queries),
        "query_column": job.query_column,
        "id_column": job.id_column,
        "model": job.model,
        "top_k": job.top_k,
        "thresholds": [job.accept_threshold, job.margin, job.novel_threshold],
        "index_description": job.index_description,
        "prompt_version": PROMPT_VERSION,
        "where": [list(w) for w in job.where],
        "columns": None if job.columns is None else repr(job.columns),
        "prompt_attributes": list(job.prompt_attributes),
        "rewrite": job.rewrite,
        # only when set: runs started before the option existed keep their key
        **({"encoder": job.encoder} if job.encoder else {}),
    }


def output_row(row: QueryRow, result: MatchResult) -> str:
    """One output line: the input's id and line, then the full ``MatchResult``."""
    data = result.model_dump(mode="json")
    data["index"] = row.index
    return json.dumps({"id": row.id, "line": row.line, **data}, ensure_ascii=False)


def _row_filter(where: tuple[tuple[str, str], ...], row: QueryRow) -> dict[str, str]:
    """A row's candidate filter from its columns (empty or missing values: no filter)."""
    record = row.record or {}
    out: dict[str, str] = {}
    for attribute, column in where:
        value = record.get(column)
        if value is not None and str(value).strip():
            out[attribute] = str(value).strip()
    return out


def _error_result(row: QueryRow) -> MatchResult:
    return MatchResult(
        query=(row.query or "")[:1000],
        index=row.index,
        status="error",
        error=f"line {row.line}: {row.error}",
        error_type="input",
    )


def _rewrite(out: Path, store: RunStore, run_key: str, order: OutputOrder) -> None:
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for _, text in store.iter_rows(run_key, order=order):
            fh.write(text + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)


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
    check_strategy(job.strategy)
    loop = asyncio.get_running_loop()
    catalog = await loop.run_in_executor(
        None,
        lambda: load_catalog(
            job.catalog, include_description=job.index_description, columns=job.columns
        ),
    )
    known = catalog.attribute_names()
    for attribute, _ in job.where:
        if attribute not in known:
            raise ConfigError(
                f"--where {attribute}=...: no entity in {job.catalog} has the attribute "
                f"{attribute!r} (attributes: {', '.join(sorted(known)[:10]) or 'none'})"
            )
    rows = read_queries(job.queries, query_column=job.query_column, id_column=job.id_column)
    total = count_rows(job.queries)
    state = job.state_dir
    state.mkdir(parents=True, exist_ok=True)
    meta = await loop.run_in_executor(None, _run_meta, job)
    run_key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:32]

    store = RunStore(state / "run.sqlite")
    cache = DecisionCache(state / "run.sqlite")
    matcher = matcher_factory(
        catalog,
        model=job.model,
        base_url=job.base_url,
        limits=job.limits,
        top_k=job.top_k,
        accept_threshold=job.accept_threshold,
        margin=job.margin,
        novel_threshold=job.novel_threshold,
        cache=cache,
        index_path=job.index or state / "index",
        **({"prompt_attributes": job.prompt_attributes} if job.prompt_attributes else {}),
        **({"rewrite": True} if job.rewrite else {}),
        **({"encoder": job.encoder} if job.encoder else {}),
    )
    collector = StatsCollector()
    started = loop.time()
    interrupted = False
    try:
        await store.aopen_run(run_key, meta)
        done = await store.adone_indexes(run_key)
        resumed = len(done)
        # the output file is rebuilt from the checkpoint, then appended to
        await loop.run_in_executor(None, _rewrite, job.out, store, run_key, "completion")
        await matcher.fit_async()
        pending: dict[int, QueryRow] = {}
        filters: dict[int, dict[str, str]] = {}
        finished = resumed

        # the built index is long-lived: keep the collector's full passes off it
        with tuned_gc(), AtomicLineWriter(job.out, append=True) as writer:

            async def emit(row: QueryRow, result: MatchResult) -> None:
                nonlocal finished
                line = output_row(row, result)
                await store.arecord(run_key, row.index, line)  # durable first
                writer.write_line(line)
                collector.add(result, loop.time() - started)
                finished += 1
                if on_progress is not None:
                    on_progress(finished, total, matcher.governor_stats)

            async def feed() -> AsyncIterator[str]:
                nonlocal interrupted
                position = 0
                for row in rows:
                    if row.index in done:
                        continue
                    if stop is not None and stop.is_set():
                        interrupted = True
                        return
                    if row.error is not None or row.query is None:
                        await emit(row, _error_result(row))
                        continue
                    pending[position] = row
                    if job.where:
                        filters[position] = _row_filter(job.where, row)
                    position += 1
                    yield row.query

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
            await store.amark_complete(run_key)
            if job.order == "input":
                await loop.run_in_executor(None, _rewrite, job.out, store, run_key, "input")
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
    )
