"""The review queue behind ``nem-llm review``: unsure rows out to a CSV, decisions back in.

``export_review`` writes the rows a person should look at (``review``, ``novel``, and
LLM matches below a confidence) to a CSV a spreadsheet user can fill in: one row per
result with the query, the current answer, the model's reason and the candidates, and an
empty ``decision`` column taking a catalog id or ``none``.

``import_review`` reads the filled CSV back. Each decision becomes:

- a **reviewed label** in the state directory's decision cache (``run.sqlite``, table
  ``reviewed``), keyed by the normalized query. ``Matcher.reviewed_label`` consults it
  before routing, so the label wins over embeddings, the LLM and earlier cached decisions,
  whatever the candidates, model or prompt are on the rerun;
- a line of the **labels file** ``labels.jsonl`` in the state directory, one
  ``{"query", "gold_id"}`` object per reviewed query (the shape of the development sets'
  queries; latest decision wins), for ``fit(training_data=load_labels(path))`` (threshold
  calibration now; learned aliases once the training modes land);
- and the reviewed rows are removed from the run checkpoint, so rerunning the same
  ``nem-llm match`` command redoes exactly those rows, from the labels, with no LLM call.

The CSV is UTF-8 with a byte-order mark (spreadsheets then read non-Latin scripts right).
A cell that a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@`` first) is
written with a leading ``'``, which the import strips again.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._llm.cache import DecisionCache, ReviewedLabel
from .._text import normalize
from ..catalog import load_catalog
from ..errors import InputError
from .checkpoint import RunStore
from .io import read_result_rows
from .labels import read_labels

__all__ = [
    "LABELS_FILE",
    "ExportSummary",
    "ImportSummary",
    "ReviewDecision",
    "export_review",
    "import_review",
    "load_labels",
    "read_review",
    "review_reason",
]

LABELS_FILE = "labels.jsonl"
NONE_DECISION = "none"
DEFAULT_MIN_CONFIDENCE = 0.7
_FIXED_COLUMNS = (
    "line",
    "id",
    "query",
    "why",
    "status",
    "entity_id",
    "entity_name",
    "score",
    "confidence",
    "decided_by",
    "reason",
    "decision",
    "note",
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True)
class ExportSummary:
    """What ``export_review`` wrote: rows read, rows queued for review (by why)."""

    rows_read: int
    rows_exported: int
    by_why: dict[str, int]
    out: Path


@dataclass(frozen=True)
class ReviewDecision:
    """One filled-in CSV row: the query, the decided id (``None`` = novel) and where."""

    query: str
    entity_id: str | None
    line: int
    note: str = ""


@dataclass(frozen=True)
class ImportSummary:
    """What ``import_review`` did: labels stored, checkpoint rows reopened, the labels file."""

    decisions: int
    blank: int
    rows_reopened: int
    labels_file: Path
    labels_total: int


def review_reason(row: Mapping[str, Any], min_confidence: float) -> str | None:
    """Why a result row needs a person (``review``, ``novel``, ``low confidence``), or None."""
    status = row.get("status")
    if status == "review":
        return "review"
    if status == "novel" and row.get("decided_by") != "human":
        return "novel"
    confidence = row.get("confidence")
    if (
        status == "matched"
        and row.get("decided_by") in ("llm", "cache")
        and isinstance(confidence, int | float)
        and confidence < min_confidence
    ):
        return "low confidence"
    return None


def _safe_cell(value: object) -> str:
    text = "" if value is None else str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def _unsafe_cell(text: str) -> str:
    return text[1:] if text.startswith("'") and text[1:].startswith(_FORMULA_START) else text


def _fmt(value: object) -> str:
    return f"{value:.4f}" if isinstance(value, float) else ("" if value is None else str(value))


def export_review(
    results: str | os.PathLike[str],
    to: str | os.PathLike[str],
    *,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    include_novel: bool = True,
) -> ExportSummary:
    """Write the rows of a results JSONL file that need a person to a fillable CSV.

    Args:
        results: the ``nem-llm match`` output.
        to: the CSV to write (replaced atomically).
        min_confidence: LLM matches below this confidence are queued too.
        include_novel: also queue ``novel`` rows.

    Raises:
        InputError: the results file is missing or damaged (names the line).
    """
    out = Path(to)
    queued: list[tuple[int, dict[str, Any], str]] = []
    read = 0
    for line, row in read_result_rows(results):
        read += 1
        why = review_reason(row, min_confidence)
        if why is None or (why == "novel" and not include_novel):
            continue
        queued.append((line, row, why))
    k = max((len(row.get("candidates") or []) for _, row, _ in queued), default=0)
    header = list(_FIXED_COLUMNS)
    for i in range(1, k + 1):
        header += [f"candidate_{i}_id", f"candidate_{i}_name", f"candidate_{i}_score"]
    by_why: dict[str, int] = {}
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", encoding="utf-8-sig", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for line, row, why in queued:
            by_why[why] = by_why.get(why, 0) + 1
            cells = [
                str(line),
                _safe_cell(row.get("id")),
                _safe_cell(row.get("query")),
                why,
                _safe_cell(row.get("status")),
                _safe_cell(row.get("entity_id")),
                _safe_cell(row.get("entity_name")),
                _fmt(row.get("score")),
                _fmt(row.get("confidence")),
                _safe_cell(row.get("decided_by")),
                _safe_cell(row.get("reason")),
                "",
                "",
            ]
            cands = list(row.get("candidates") or [])
            for i in range(k):
                c = cands[i] if i < len(cands) and isinstance(cands[i], dict) else {}
                cid = c.get("entity_id", c.get("id"))  # "id" in files before the rename
                cells += [_safe_cell(cid), _safe_cell(c.get("name")), _fmt(c.get("score"))]
            writer.writerow(cells)
    os.replace(tmp, out)
    return ExportSummary(rows_read=read, rows_exported=len(queued), by_why=by_why, out=out)


def _csv_records(path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """(first line of the record, row) of each CSV record; header checked."""
    label = str(path)
    try:
        fh = path.open(encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise InputError(f"cannot read: {exc.strerror or exc}", source=label) from exc
    with fh:
        reader = csv.reader(fh)
        try:
            header = next(reader, None)
            if header is None:
                raise InputError("empty file (expected a header row)", source=label, line=1)
            missing = [c for c in ("query", "decision") if c not in header]
            if missing:
                raise InputError(
                    f"missing column(s) {', '.join(missing)} (export with `nem-llm review "
                    "export` and fill in the 'decision' column)",
                    source=label,
                    line=1,
                )
            start = reader.line_num + 1
            for cells in reader:
                if any(c.strip() for c in cells):
                    yield start, dict(zip(header, cells, strict=False))
                start = reader.line_num + 1
        except csv.Error as exc:
            raise InputError(f"not valid CSV: {exc}", source=label, line=reader.line_num) from exc
        except UnicodeDecodeError as exc:
            raise InputError(f"not UTF-8: {exc.reason}", source=label) from exc


def read_review(
    path: str | os.PathLike[str], *, catalog_ids: Iterable[str] | None = None
) -> tuple[list[ReviewDecision], int]:
    """Read a filled review CSV: the decided rows (validated) and the number left blank.

    A decision is ``none`` (case-insensitive: not in the catalog) or an id that is one of
    the row's candidates, or any id of ``catalog_ids`` when given.

    Raises:
        InputError: a bad file, an unknown id, or one query decided two ways; the message
            names the CSV line.
    """
    p = Path(path)
    known = set(catalog_ids) if catalog_ids is not None else None
    decisions: list[ReviewDecision] = []
    seen: dict[str, ReviewDecision] = {}
    blank = 0
    for line, row in _csv_records(p):
        raw = _unsafe_cell((row.get("decision") or "").strip())
        if not raw:
            blank += 1
            continue
        query = normalize(_unsafe_cell(row.get("query") or ""))
        if not query:
            raise InputError("the 'query' cell is empty", source=str(p), line=line)
        if raw.casefold() == NONE_DECISION:
            entity_id: str | None = None
        else:
            candidates = {
                _unsafe_cell(v.strip())
                for k, v in row.items()
                if k.startswith("candidate_") and k.endswith("_id") and v and v.strip()
            }
            if raw not in candidates and (known is None or raw not in known):
                where = "the catalog" if known is not None else "this row's candidates"
                hint = "" if known is not None else " (pass the catalog to allow any catalog id)"
                raise InputError(
                    f"decision {raw!r} for query {query!r} is not an id in {where}{hint}; "
                    f"write a catalog id or '{NONE_DECISION}'",
                    source=str(p),
                    line=line,
                )
            entity_id = raw
        decision = ReviewDecision(
            query=query, entity_id=entity_id, line=line, note=(row.get("note") or "").strip()
        )
        earlier = seen.get(query)
        if earlier is not None and earlier.entity_id != entity_id:
            raise InputError(
                f"query {query!r} is decided {entity_id or NONE_DECISION!r} here and "
                f"{earlier.entity_id or NONE_DECISION!r} on line {earlier.line}",
                source=str(p),
                line=line,
            )
        seen[query] = decision
        decisions.append(decision)
    return decisions, blank


def load_labels(path: str | os.PathLike[str]) -> list[tuple[str, str | None]]:
    """Read a labels file as ``(query, id or None)`` pairs, as ``nem-llm eval`` reads it.

    The pairs feed ``Matcher.fit(training_data=...)``; see
    :func:`~nem_llm._jobs.labels.read_labels` for the formats.

    Raises:
        InputError: a row without a query or a ``gold_id`` (names the line).
    """
    return read_labels(path).pairs()


def _write_labels(path: Path, decisions: list[ReviewDecision]) -> int:
    merged: dict[str, str | None] = {}
    if path.is_file():
        merged.update(dict(load_labels(path)))
    for d in decisions:
        merged.pop(d.query, None)  # re-decided queries move to the end
        merged[d.query] = d.entity_id
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for query, gold in merged.items():
            fh.write(json.dumps({"query": query, "gold_id": gold}, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return len(merged)


def _row_query(text: str) -> str | None:
    try:
        query = json.loads(text).get("query")
    except (ValueError, AttributeError):
        return None
    return normalize(query) if isinstance(query, str) else None


def import_review(
    csv_path: str | os.PathLike[str],
    state: str | os.PathLike[str],
    *,
    catalog: str | os.PathLike[str] | None = None,
) -> ImportSummary:
    """Import a filled review CSV into a match job's state directory (see the module doc).

    Everything is validated before anything is written. Afterwards rerunning the same
    ``nem-llm match`` command redoes the reviewed rows from the labels (no LLM call).

    Args:
        csv_path: the CSV from :func:`export_review`, ``decision`` column filled in.
        state: the job's state directory (``<out>.state``).
        catalog: the catalog file; without it a decision must be one of its row's
            candidates.

    Raises:
        InputError: see :func:`read_review`; or ``state`` is not a directory.
    """
    state_dir = Path(state)
    if not state_dir.is_dir():
        raise InputError("not a directory (the match job's <out>.state)", source=str(state_dir))
    ids = None
    if catalog is not None:
        ids = load_catalog(Path(catalog)).by_id.keys()
    decisions, blank = read_review(csv_path, catalog_ids=ids)
    labels = [ReviewedLabel(query=d.query, entity_id=d.entity_id, note=d.note) for d in decisions]
    with DecisionCache(state_dir / "run.sqlite") as cache:
        cache.put_reviewed(labels)
    queries = {d.query for d in decisions}
    with RunStore(state_dir / "run.sqlite") as runs:
        reopened = runs.forget_rows(lambda text: _row_query(text) in queries)
    total = _write_labels(state_dir / LABELS_FILE, decisions)
    return ImportSummary(
        decisions=len(decisions),
        blank=blank,
        rows_reopened=reopened,
        labels_file=state_dir / LABELS_FILE,
        labels_total=total,
    )
