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
    >>> out = match_dataset(ds, catalog="countries.jsonl", index="idx/", actors=2)
    >>> out.take_all()[0]["entity_id"]
    'DE'

Needs the optional extra ``nem_llm[ray]`` (``ray[data]``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..catalog import load_catalog
from ..config import Limits
from ..errors import ConfigError
from ..jobs.batch import JobSummary, MatchJob, _error_result, _rewrite, _run_meta, output_row
from ..jobs.checkpoint import RunStore
from ..jobs.io import QueryRow, count_rows, read_queries
from ..llm.stats import StatsCollector
from ..matcher import Matcher
from ..models import MatchResult

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


def prepare_index(catalog: Any, index: str | os.PathLike[str], **matcher_options: Any) -> Path:
    """Build and save the catalog's index in ``index`` unless it is there already."""
    path = Path(index)
    if not (path / "manifest.json").exists():
        options = {k: v for k, v in matcher_options.items() if k not in ("client", "cache", "llm")}
        with Matcher(catalog, llm=False, index_path=path, **options) as matcher:
            matcher.fit()
    return path


class _MatchActor:
    """One actor: one Matcher that loads the saved index once, then matches batches."""

    def __init__(
        self,
        catalog: Any,
        index: str,
        column: str,
        id_column: str,
        options: dict[str, Any],
    ) -> None:
        self.column = column
        self.id_column = id_column
        self.matcher = Matcher(catalog, index_path=index, **options)
        self._ready: asyncio.Lock | None = None

    async def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self._ready is None:
            self._ready = asyncio.Lock()
        async with self._ready:
            if not self.matcher.ready:
                await self.matcher.fit_async()  # loads the saved index
        queries = [str(q) for q in batch[self.column]]
        results = await self.matcher.match_batch_async(queries, strategy="gather")
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
    index: str | os.PathLike[str],
    column: str = "query",
    id_column: str = "id",
    actors: int = 2,
    num_cpus: float = 0.5,
    batch_size: int = 256,
    limits: Limits | None = None,
    **matcher_options: Any,
) -> Any:
    """Match the ``column`` of a Ray dataset on a pool of ``actors`` Matchers (lazy).

    Args:
        ds: A ``ray.data.Dataset`` with a query column and an id column.
        catalog: The entities (a path, or a list of dicts): each actor loads it.
        index: Directory of the saved index; built here once if missing.
        column, id_column: The query and id columns (rows keep their id; Ray does not
            keep order).
        actors: Size of the actor pool (``ActorPoolStrategy(size=actors)``).
        num_cpus: CPUs reserved per actor (0.5 lets two actors share a core).
        batch_size: Rows per ``map_batches`` call.
        limits: The run's global limits; every actor gets ``split_limits(limits, actors)``.
        **matcher_options: More ``Matcher`` options (``model``, ``base_url``,
            ``embedder``, thresholds...). Each actor builds its own client from them.

    Returns:
        A ``ray.data.Dataset`` with ``id_column``, ``index`` (if the input has one),
        ``status``, ``entity_id``, ``entity_name``, ``score``, ``decided_by``, ``reason``,
        ``error``, ``error_type`` and ``result`` (the full ``MatchResult`` as JSON).
    """
    ray = _ray()
    if "client" in matcher_options:
        raise ConfigError("pass base_url/api_key, not client: a client cannot go to actors")
    path = prepare_index(catalog, index, **matcher_options)
    options = dict(matcher_options)
    options["limits"] = split_limits(limits or Limits(), actors)
    return ds.map_batches(
        _MatchActor,
        fn_constructor_kwargs={
            "catalog": catalog,
            "index": str(path),
            "column": column,
            "id_column": id_column,
            "options": options,
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
    matcher_options: Mapping[str, Any] | None = None,
    on_progress: Callable[[int, int | None, Any], None] | None = None,
) -> JobSummary:
    """``nem-llm match --engine ray``: the same output rows as the local engine.

    Rows are recorded in the run checkpoint as their results reach the driver, so a
    rerun skips them; the output file is rewritten from the checkpoint at the end. Ray is
    started here (``ray.init(address=ray_address)``; local when None) unless it already
    runs. The decision cache is not shared between actors (a cluster has no common disk):
    a rerun only skips rows already recorded.
    """
    ray = _ray()
    started = time.monotonic()
    load_catalog(job.catalog, include_description=job.index_description)  # fail early
    total = count_rows(job.queries)
    state = job.state_dir
    state.mkdir(parents=True, exist_ok=True)
    meta = _run_meta(job)
    meta["engine"] = "ray"
    run_key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:32]
    options: dict[str, Any] = {
        "model": job.model,
        "base_url": job.base_url,
        "top_k": job.top_k,
        "accept_threshold": job.accept_threshold,
        "margin": job.margin,
        "novel_threshold": job.novel_threshold,
        **(matcher_options or {}),
    }
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
        store.open_run(run_key, meta)
        done = store.done_indexes(run_key)
        resumed = len(done)
        items: list[dict[str, Any]] = []
        rows = read_queries(job.queries, query_column=job.query_column, id_column=job.id_column)
        try:
            for row in rows:
                if row.index in done:
                    continue
                if row.error is not None or row.query is None:
                    result = _error_result(row)
                    store.record(run_key, row.index, output_row(row, result))
                    collector.add(result, 0.0)
                    continue
                items.append(
                    {"index": row.index, "id": row.id, "line": row.line, "query": row.query}
                )
        finally:
            rows.close()
        lines = {item["index"]: item["line"] for item in items}
        if items:
            ds = ray.data.from_items(items)
            out = match_dataset(
                ds,
                catalog=str(job.catalog),
                index=state / "index",
                actors=actors,
                limits=job.limits,
                index_description=job.index_description,
                **options,
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
                store.record_many(run_key, pairs)
                finished += len(pairs)
                if on_progress is not None:
                    on_progress(finished, total, None)
        store.mark_complete(run_key)
        _rewrite(job.out, store, run_key, job.order)
        rows_total = store.count(run_key)
    finally:
        store.close()
        if started_ray:
            ray.shutdown()
    return JobSummary(
        stats=collector.finish(time.monotonic() - started),
        rows_total=rows_total,
        rows_resumed=resumed,
        interrupted=False,
        out=job.out,
        state_dir=state,
        llm_configured=bool(job.base_url or os.environ.get("OPENAI_API_KEY")),
    )
