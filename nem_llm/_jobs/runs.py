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
from collections.abc import Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._llm.adjudication import PROMPT_VERSION
from .._llm.governor import GovernorStats
from .._llm.strategies import Strategy, check_strategy
from .._parquet import PARQUET_SUFFIX, require_pyarrow, write_parquet_rows
from ..errors import ConfigError
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
        catalog, queries, out: the input files and the results file: ``.parquet`` is
            written at the end of the run (the rows go to ``live.jsonl`` in the state
            directory while it runs), any other name is JSONL appended to as rows finish.
        settings: how to match (every engine honours all of it or refuses up front).
        query_column, id_column: where the query and the row id are in the queries file.
        delimiter: the queries CSV's field delimiter (None: sniffed from its header).
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
    delimiter: str | None = None
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
        if self.delimiter is not None and (len(self.delimiter) != 1 or self.delimiter in '"\r\n'):
            raise ConfigError(
                f"delimiter must be one character (not a quote), got {self.delimiter!r}"
            )
        if self.parquet_out:
            require_pyarrow(f"--out {self.out.name}")

    @property
    def parquet_out(self) -> bool:
        """Whether the results file is Parquet (written from the checkpoint at the end)."""
        return self.out.suffix.lower() == PARQUET_SUFFIX

    @property
    def live_out(self) -> Path:
        """Where rows are appended while the job runs: the output, or beside the state."""
        return self.state_dir / "live.jsonl" if self.parquet_out else self.out

    def read_rows(self) -> Generator[QueryRow, None, None]:
        """The queries file's rows, with this job's columns and delimiter (see read_queries)."""
        return read_queries(
            self.queries,
            query_column=self.query_column,
            id_column=self.id_column,
            delimiter=self.delimiter,
        )

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
        **({"delimiter": job.delimiter} if job.delimiter is not None else {}),
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
    rows = job.read_rows()
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
    """Rewrite the output file from the checkpoint (temp file, fsync, atomic rename).

    ``.parquet``: one Parquet file of the same rows (nested fields as Arrow structs and
    lists); anything else: JSONL.
    """
    if out.suffix.lower() == PARQUET_SUFFIX:

        def rows() -> Iterator[dict[str, Any]]:
            for _, text in store.iter_rows(key, order=order):
                yield json.loads(text)

        write_parquet_rows(out, rows)
        return
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for _, text in store.iter_rows(key, order=order):
            fh.write(text + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
