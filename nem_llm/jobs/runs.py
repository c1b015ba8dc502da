"""What every engine of ``nem-llm match`` shares: the job, its run key, its rows.

A :class:`MatchJob` is the files, the query-side columns and the
:class:`~nem_llm.MatcherSettings`; every engine (local, Ray, Batch API; see ``engines.py``)
receives the same job and honours every option or refuses it up front. The run key is the
settings' fingerprint plus the inputs' contents and the query-side columns, so a rerun of
the same command resumes and a changed option starts a new run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..llm.adjudication import PROMPT_VERSION
from ..llm.governor import GovernorStats
from ..llm.strategies import Strategy, check_strategy
from ..models import Calibration, MatchResult, RunStats
from ..settings import MatcherSettings, OutputOrder
from .checkpoint import RunStore
from .io import QueryRow, read_queries

__all__ = [
    "JobSummary",
    "MatchJob",
    "OutputOrder",
    "ProgressHook",
    "error_row",
    "output_row",
    "row_filter",
    "row_query",
    "run_key",
    "workload_sample",
    "write_output",
]

ProgressHook = Callable[[int, int | None, GovernorStats | None], None]


@dataclass(frozen=True, kw_only=True)
class MatchJob:
    """Everything ``nem-llm match`` needs; equal jobs resume each other.

    Args:
        catalog, queries, out: the input files and the results JSONL.
        settings: how to match (every engine honours all of it or refuses up front).
        query_column, id_column: where the query and the row id are in the queries file.
        where: ``{attribute: column}``: each row's candidates are the entities whose
            attribute equals the row's value in that column (an empty value: no filter).
        fields: ``{attribute: column}``: the row is a record, these columns its fields
            (compared field by field with the entities' attributes); a JSONL row's own
            ``"attributes"`` object is read without a mapping.
        strategy: the order LLM work is started in (answers are the same).
        order: the output file's row order at the end.
        state: the state directory (default ``<out>.state``): checkpoint, cache, index.
    """

    catalog: Path
    queries: Path
    out: Path
    settings: MatcherSettings = field(default_factory=MatcherSettings)
    query_column: str | None = None
    id_column: str | None = None
    where: Mapping[str, str] = field(default_factory=dict)
    fields: Mapping[str, str] = field(default_factory=dict)
    strategy: Strategy = "as_completed"
    order: OutputOrder = "input"
    state: Path | None = None

    def __post_init__(self) -> None:
        check_strategy(self.strategy)
        if self.order not in ("input", "completion"):
            raise ConfigError(f"order must be 'input' or 'completion', got {self.order!r}")
        for name, mapping in (("where", self.where), ("fields", self.fields)):
            for attribute, column in mapping.items():
                if not attribute or not column:
                    raise ConfigError(f"{name}: use attribute=column, got {attribute!r}={column!r}")
            object.__setattr__(self, name, dict(mapping))

    @property
    def state_dir(self) -> Path:
        return self.state or self.out.with_name(self.out.name + ".state")

    @property
    def index_dir(self) -> Path:
        """The saved index this job uses: the settings' ``index_dir``, else one in state."""
        return self.settings.index_dir or self.state_dir / "index"

    def matcher_settings(self) -> MatcherSettings:
        """The settings a job's Matcher runs with (its index lives in ``index_dir``)."""
        return self.settings.replace(index_dir=self.index_dir)


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
    #: how the routes were calibrated (``None`` where the engine fit elsewhere: Ray actors)
    calibration: Calibration | None = None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_key(job: MatchJob, engine: str) -> tuple[str, dict[str, object]]:
    """(key, what it hashes): inputs by content, the settings, the query-side columns."""
    meta: dict[str, object] = {
        "catalog_sha256": _sha256_file(job.catalog),
        "queries_sha256": _sha256_file(job.queries),
        "query_column": job.query_column,
        "id_column": job.id_column,
        "where": sorted(job.where.items()),
        **({"fields": sorted(job.fields.items())} if job.fields else {}),
        "settings": job.settings.fingerprint(),
        "prompt_version": PROMPT_VERSION,
        "engine": engine,
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:32]
    return key, meta


#: queries of a job's file the workload sample for ``label_budget`` is drawn from
WORKLOAD_SAMPLE = 20_000


def row_query(job: MatchJob, row: QueryRow) -> str | dict[str, Any]:
    """A row as the Matcher takes it: its text, or a record ``{"query", "attributes"}``
    (the job's ``fields`` columns, else a JSONL row's own ``"attributes"`` object)."""
    record = row.record or {}
    attributes: dict[str, Any] = {}
    if job.fields:
        attributes = {
            a: record[c] for a, c in job.fields.items() if record.get(c) not in (None, "")
        }
    elif isinstance(record.get("attributes"), Mapping):
        attributes = dict(record["attributes"])
    assert row.query is not None
    return {"query": row.query, "attributes": attributes} if attributes else row.query


def workload_sample(
    job: MatchJob, size: int = WORKLOAD_SAMPLE, seed: int = 0
) -> list[str | dict[str, Any]]:
    """A uniform sample of the job's queries (reservoir: one pass, bounded memory), the
    workload ``fit`` labels a stratified share of (``label_budget``) and fits the field
    model on (records)."""
    rng = random.Random(seed)
    kept: list[str | dict[str, Any]] = []
    seen = 0
    rows = read_queries(job.queries, query_column=job.query_column, id_column=job.id_column)
    try:
        for row in rows:
            if row.error is not None or row.query is None:
                continue
            seen += 1
            if len(kept) < size:
                kept.append(row_query(job, row))
            else:
                j = rng.randrange(seen)
                if j < size:
                    kept[j] = row_query(job, row)
    finally:
        rows.close()
    return kept


def output_row(row: QueryRow, result: MatchResult) -> str:
    """One output line: the input's id and line, then the full ``MatchResult``."""
    data = result.model_dump(mode="json")
    data["index"] = row.index
    return json.dumps({"id": row.id, "line": row.line, **data}, ensure_ascii=False)


def row_filter(where: Mapping[str, str], row: QueryRow) -> dict[str, str]:
    """A row's candidate filter from its columns (empty or missing values: no filter)."""
    record = row.record or {}
    out: dict[str, str] = {}
    for attribute, column in where.items():
        value = record.get(column)
        if value is not None and str(value).strip():
            out[attribute] = str(value).strip()
    return out


def error_row(row: QueryRow) -> MatchResult:
    """The error record of an input row that could not be read."""
    return MatchResult(
        query=(row.query or "")[:1000],
        index=row.index,
        status="error",
        error=f"line {row.line}: {row.error}",
        error_type="input",
    )


def write_output(out: Path, store: RunStore, key: str, order: OutputOrder) -> None:
    """Rewrite the output file from the checkpoint (temp file, fsync, atomic rename)."""
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for _, text in store.iter_rows(key, order=order):
            fh.write(text + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
