"""The job behind ``nem-llm dedupe``: duplicates within one catalog, and golden records.

Each entity is a record query against the rest of its own catalog: retrieval (the same
index and encoder as matching) gives its candidates, the entity itself left out; the field
model (``nem_llm.records``, fit on those pairs without labels) gives each pair's match
probability; pairs at or above ``threshold`` are links; connected components of links are
clusters (a duplicate of a duplicate is the same entity); each cluster gets one golden
record by the survivorship rule of :func:`nem_llm.records.golden_records` (the value most
members agree on, then the most complete member's, then the first member's).

A catalog without attributes is compared on its names and descriptions (the name is a
field). Output: one row per entity with its cluster, and one golden record per cluster of
two or more, to CSV, JSONL or Parquet.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..catalog import Catalog
from ..errors import ConfigError
from ..matcher import Matcher
from ..records import RecordLinker, clusters, golden_records
from ..settings import MatcherSettings

__all__ = ["DedupeResult", "dedupe_catalog", "write_dedupe"]


@dataclass
class DedupeResult:
    """What ``dedupe`` found: each entity's cluster and one golden record per cluster."""

    catalog: Catalog
    cluster_of: list[int]  # per entity position: its cluster (the first member's position)
    golden: list[dict[str, Any]]  # one per cluster of two or more members
    links: int  # pairs at or above the threshold
    threshold: float

    @property
    def duplicates(self) -> int:
        """Entities that belong to a cluster of two or more."""
        sizes: dict[int, int] = {}
        for c in self.cluster_of:
            sizes[c] = sizes.get(c, 0) + 1
        return sum(n for n in sizes.values() if n > 1)


def _record(entity: Any) -> dict[str, Any]:
    """An entity as a record: its attributes, else its name (and description)."""
    if entity.attributes:
        return dict(entity.attributes)
    out = {"name": entity.name}
    if entity.description:
        out["description"] = entity.description
    return out


async def dedupe_catalog(
    catalog: str | Path | Catalog,
    settings: MatcherSettings | None = None,
    *,
    threshold: float = 0.99,
    candidates: int = 10,
    embedder: Any = None,
) -> DedupeResult:
    """Cluster a catalog's duplicates (see the module docstring).

    Args:
        catalog: a catalog path or a loaded ``Catalog``.
        settings: how to retrieve (encoder, index description, columns; no LLM is used).
        threshold: a pair is a link at or above this match probability.
        candidates: candidates retrieved per entity (itself left out).
        embedder: an encoder object (tests); default: the settings' encoder.
    """
    if not 0.5 <= threshold <= 1.0:
        raise ConfigError(f"threshold must be in [0.5, 1], got {threshold!r}")
    settings = (settings or MatcherSettings()).replace(llm=False, label_budget=0)
    async with Matcher(catalog, settings, embedder=embedder) as m:
        await m.fit_async(show_progress=False)
        entities = m.catalog.entities
        texts = [", ".join(str(v) for v in _record(e).values() if v) or e.name for e in entities]
        found = []
        for lo in range(0, len(texts), 256):
            found.extend(await m.retrieve_async(texts[lo : lo + 256], top_k=candidates + 1))
        by_id = m.catalog.by_id
        pairs = [
            [by_id[c.entity_id] for c in cands if c.entity_id != entities[i].id][:candidates]
            for i, cands in enumerate(found)
        ]
        records = [_record(e) for e in entities]
        linker = RecordLinker.fit(records, records, pairs)
        left = np.array([i for i, ps in enumerate(pairs) for _ in ps], dtype=np.int64)
        right = np.array([j for ps in pairs for j in ps], dtype=np.int64)
        scores = linker.model.score(records, left, right)
        probability = np.asarray(scores.probability, dtype=np.float64)
        cluster_of = clusters(len(records), left, right, probability, threshold=threshold)
        golden = []
        for g in golden_records(records, cluster_of):
            if len(g.members) < 2:
                continue
            golden.append(
                {
                    "cluster": entities[g.cluster].id,
                    "members": [entities[i].id for i in g.members],
                    **g.values,
                }
            )
        return DedupeResult(
            m.catalog,
            [int(c) for c in cluster_of],
            golden,
            int((probability >= threshold).sum()),
            threshold,
        )


def write_dedupe(result: DedupeResult, out: Path, golden_out: Path | None = None) -> None:
    """Write each entity's cluster to ``out`` and the golden records to ``golden_out``
    (default: beside ``out``, ``<stem>.golden<suffix>``); CSV, JSONL or Parquet by suffix."""
    entities = result.catalog.entities
    sizes: dict[int, int] = {}
    for c in result.cluster_of:
        sizes[c] = sizes.get(c, 0) + 1
    rows: list[dict[str, Any]] = [
        {"id": e.id, "name": e.name, "cluster": entities[c].id, "duplicate": sizes[c] > 1}
        for e, c in zip(entities, result.cluster_of, strict=True)
    ]
    _write(rows, out)
    golden = golden_out or out.with_name(f"{out.stem}.golden{out.suffix}")
    flat = [{**g, "members": "|".join(g["members"])} for g in result.golden]
    _write(flat, golden)


def _write(rows: list[dict[str, Any]], path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        with path.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        return
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    if suffix == ".parquet":
        from .._parquet import require_pyarrow

        require_pyarrow(f"--out {path.name}")
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({c: [_cell(r.get(c)) for r in rows] for c in columns})
        pq.write_table(table, path)
        return
    if suffix not in (".csv", ".tsv"):
        raise ConfigError(f"{path}: write .csv, .tsv, .jsonl or .parquet")
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, columns, delimiter="\t" if suffix == ".tsv" else ",")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _cell(row.get(c)) for c in columns})


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return json.dumps(value, ensure_ascii=False, default=str)
