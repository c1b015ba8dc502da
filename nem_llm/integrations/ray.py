"""Ray Data: match a ``ray.data.Dataset`` on a pool of actors, and ``match --engine ray``.

Each actor builds one :class:`~nem_llm.Matcher` that *loads* the saved index (the
catalog is encoded once, on the driver, by :func:`prepare_index`, never per actor or per
batch) and matches its batches with the async API (the actor's event loop; the
micro-batcher and the governor work as in one process).

The fleet must never exceed the run's limits, so :func:`split_limits` gives every actor
an equal share: ``rpm / actors``, ``tpm / actors``, ``budget_tokens / actors``,
``budget_usd / actors`` and ``concurrency // actors`` (at least 1). A share is a hard
cap per actor, so a skewed split of the work can leave budget unused on idle actors; the
sum never exceeds the global limit.

Ray does not keep row order: every output row carries its ``id`` (and the input's
``index`` column when there is one).

Example:
    >>> import ray                                                    # doctest: +SKIP
    >>> ds = ray.data.from_items([{"id": "1", "query": "Deutschland"}])
    >>> settings = MatcherSettings(index_dir=Path("idx"))
    >>> out = match_dataset(ds, catalog="countries.jsonl", settings=settings, actors=2)
    >>> out.take_all()[0]["entity_id"]
    'DE'

Needs the optional extra ``nem_llm[ray]`` (``ray[data]``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .._jobs.batch import load_job_catalog
from .._jobs.checkpoint import RunStore
from .._jobs.io import QueryRow, count_rows
from .._jobs.runs import (
    JobSummary,
    MatchJob,
    error_row,
    output_row,
    row_filter,
    run_key,
    workload_sample,
    write_output,
)
from .._llm.stats import StatsCollector
from .._llm.strategies import Strategy
from .._retrieval.embedding import Embedder
from ..config import Limits
from ..errors import ConfigError
from ..matcher import Matcher
from ..models import MatchResult
from ..settings import MatcherSettings

__all__ = ["match_dataset", "prepare_index", "run_ray_job", "split_limits"]

#: Columns of the dataset :func:`match_dataset` returns (plus the input's id column).
RESULT_COLUMNS = (
    "status",
    "entity_id",
    "entity_name",
    "score",
    "decided_by",
    "reason",
    "error",
    "error_type",
    "result",
)


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise ConfigError(
            "the Ray engine needs the optional extra: pip install 'nem_llm[ray]'"
        ) from exc
    return ray


def split_limits(limits: Limits, actors: int) -> Limits:
    """Each actor's share of the run's limits, so the fleet never exceeds them.

    Example:
        >>> split_limits(Limits(rpm=600, concurrency=16, budget_usd=1.0), 4)
        ... # doctest: +ELLIPSIS
        Limits(concurrency=4, rpm=150.0, tpm=None, ..., budget_usd=0.25, ...)
    """
    if actors < 1:
        raise ConfigError(f"actors must be >= 1, got {actors}")

    def share(value: float | None) -> float | None:
        return None if value is None else value / actors

    tokens = limits.budget_tokens
    return dataclasses.replace(
        limits,
        concurrency=max(1, limits.concurrency // actors),
        rpm=share(limits.rpm),
        tpm=share(limits.tpm),
        budget_usd=share(limits.budget_usd),
        budget_tokens=None if tokens is None else max(1, tokens // actors),
    )


def prepare_index(
    catalog: Any, settings: MatcherSettings, embedder: Embedder | None = None
) -> Path:
    """Build and save the catalog's index in ``settings.index_dir`` unless it is there."""
    if settings.index_dir is None:
        raise ConfigError("the Ray engine needs settings.index_dir: every actor loads it")
    path = settings.index_dir
    if not (path / "manifest.json").exists():
        with Matcher(catalog, settings.replace(llm=False, cache=None), embedder=embedder) as m:
            m.fit()
    return path


class _MatchActor:
    """One actor: one Matcher that loads the saved index once, then matches batches."""

    def __init__(
        self,
        catalog: Any,
        settings_json: str,
        column: str,
        id_column: str,
        strategy: Strategy,
        embedder: Embedder | None,
    ) -> None:
        self.column = column
        self.id_column = id_column
        self.strategy = strategy
        settings = MatcherSettings.model_validate_json(settings_json)
        self.matcher = Matcher(catalog, settings, embedder=embedder)
        self._ready: asyncio.Lock | None = None

    async def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self._ready is None:
            self._ready = asyncio.Lock()
        async with self._ready:
            if not self.matcher.ready:
                await self.matcher.fit_async()  # loads the saved index
        queries = [str(q) for q in batch[self.column]]
        wheres = batch.get("where")
        filters = None if wheres is None else [json.loads(str(w)) or None for w in wheres]
        results = await self.matcher.match_batch_async(
            queries, strategy=self.strategy, where=filters
        )
        results.sort(key=lambda r: r.index)  # as_completed delivers in completion order
        indexes = batch.get("index")
        out: dict[str, list[Any]] = {name: [] for name in RESULT_COLUMNS}
        for n, result in enumerate(results):
            if indexes is not None:
                result.index = int(indexes[n])
            for name in RESULT_COLUMNS[:-1]:
                out[name].append(getattr(result, name))
            out["result"].append(result.model_dump_json())
        data: dict[str, Any] = {self.id_column: list(batch[self.id_column])}
        if indexes is not None:
            data["index"] = np.asarray(indexes)
        data.update(out)
        return data


def match_dataset(
    ds: Any,
    *,
    catalog: Any,
    settings: MatcherSettings,
    column: str = "query",
    id_column: str = "id",
    actors: int = 2,
    num_cpus: float = 0.5,
    batch_size: int = 256,
    strategy: Strategy = "as_completed",
    embedder: Embedder | None = None,
) -> Any:
    """Match the ``column`` of a Ray dataset on a pool of ``actors`` Matchers (lazy).

    Args:
        ds: A ``ray.data.Dataset`` with a query column and an id column (and, optionally,
            a ``where`` column: each row's filter as a JSON object).
        catalog: The entities (a path, or a list of dicts): each actor loads it.
        settings: How to match; ``settings.index_dir`` is the saved index (built here
            once if missing). Every actor gets these settings with ``limits`` split
            (:func:`split_limits`) and makes its own client from ``base_url`` and the
            environment.
        column, id_column: The query and id columns (rows keep their id; Ray does not
            keep order).
        actors: Size of the actor pool (``ActorPoolStrategy(size=actors)``).
        num_cpus: CPUs reserved per actor (0.5 lets two actors share a core).
        batch_size: Rows per ``map_batches`` call.
        strategy: The order each actor starts its LLM work in (answers are the same).
        embedder: An encoder object for every actor (pickled; default: each actor makes
            the one ``settings.encoder`` names). For tests and custom encoders.

    Returns:
        A ``ray.data.Dataset`` with ``id_column``, ``index`` (if the input has one),
        ``status``, ``entity_id``, ``entity_name``, ``score``, ``decided_by``, ``reason``,
        ``error``, ``error_type`` and ``result`` (the full ``MatchResult`` as JSON).
    """
    ray = _ray()
    prepare_index(catalog, settings, embedder)
    shared = settings.replace(limits=split_limits(settings.limits, actors))
    return ds.map_batches(
        _MatchActor,
        fn_constructor_kwargs={
            "catalog": catalog,
            "settings_json": shared.model_dump_json(),
            "column": column,
            "id_column": id_column,
            "strategy": strategy,
            "embedder": embedder,
        },
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=num_cpus,
    )


def run_ray_job(
    job: MatchJob,
    *,
    actors: int = 2,
    ray_address: str | None = None,
    on_progress: Callable[[int, int | None, Any], None] | None = None,
    embedder: Embedder | None = None,
) -> JobSummary:
    """``nem-llm match --engine ray``: the same output rows as the local engine.

    Every option of ``job.settings`` reaches the actors (they get the settings, with the
    limits split), and each row carries its own filter (``job.where``). Rows are recorded
    in the run checkpoint as their results reach the driver, so a rerun skips them; the
    output file is rewritten from the checkpoint at the end. Ray is started here
    (``ray.init(address=ray_address)``; local when None) unless it already runs. The
    decision cache is not shared between actors (a cluster has no common disk): a rerun
    only skips rows already recorded.
    """
    ray = _ray()
    started = time.monotonic()
    load_job_catalog(job)  # fail early, as the local engine does
    total = count_rows(job.queries)
    state = job.state_dir
    state.mkdir(parents=True, exist_ok=True)
    key, meta = run_key(job, "ray")
    started_ray = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.WARNING,
        }
        if ray_address:
            kwargs["address"] = ray_address
        else:
            kwargs["_temp_dir"] = tempfile.mkdtemp(prefix="nem-ray-")
        ray.init(**kwargs)
        started_ray = True
    # our progress bar and table say what Ray Data's executor logs line by line
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    collector = StatsCollector()
    store = RunStore(state / "run.sqlite")
    try:
        store.open_run(key, meta)
        done = store.done_indexes(key)
        resumed = len(done)
        items: list[dict[str, Any]] = []
        rows = job.read_rows()
        try:
            for row in rows:
                if row.index in done:
                    continue
                if row.error is not None or row.query is None:
                    result = error_row(row)
                    store.record(key, row.index, output_row(row, result))
                    collector.add(result, 0.0)
                    continue
                item = {"index": row.index, "id": row.id, "line": row.line, "query": row.query}
                if job.where:
                    item["where"] = json.dumps(row_filter(job.where, row))
                items.append(item)
        finally:
            rows.close()
        lines = {item["index"]: item["line"] for item in items}
        if items:
            # the driver fits once: the index, and the routes calibrated on a labelled
            # sample of the workload (saved beside the index: every actor adopts them)
            with Matcher(str(job.catalog), job.matcher_settings(), embedder=embedder) as m:
                budget = m.settings.resolved_label_budget(m.llm_configured)
                m.fit(workload=workload_sample(job) if budget else None, show_progress=False)
            out = match_dataset(
                ray.data.from_items(items),
                catalog=str(job.catalog),
                settings=job.matcher_settings(),
                actors=actors,
                strategy=job.strategy,
                embedder=embedder,
            )
            finished = resumed
            for batch in out.iter_batches(batch_size=256, batch_format="numpy"):
                pairs = []
                for index, row_id, text in zip(
                    batch["index"], batch["id"], batch["result"], strict=True
                ):
                    result = MatchResult.model_validate_json(str(text))
                    row = QueryRow(int(index), lines[int(index)], str(row_id), None, None, None)
                    pairs.append((int(index), output_row(row, result)))
                    collector.add(result, 0.0)
                store.record_many(key, pairs)
                finished += len(pairs)
                if on_progress is not None:
                    on_progress(finished, total, None)
        store.mark_complete(key)
        write_output(job.out, store, key, job.order)
        rows_total = store.count(key)
    finally:
        store.close()
        if started_ray:
            ray.shutdown()
    s = job.settings
    return JobSummary(
        stats=collector.finish(time.monotonic() - started),
        rows_total=rows_total,
        rows_resumed=resumed,
        interrupted=False,
        out=job.out,
        state_dir=state,
        llm_configured=s.llm and bool(s.base_url or os.environ.get("OPENAI_API_KEY")),
    )
