"""``nem-llm dedupe``: duplicates within a catalog, clustered, with one golden record each."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ..settings import MatcherSettings
from ._app import app, fail, run, say
from ._settings import with_settings

#: The flags of ``dedupe`` that are not settings.
DEDUPE_FLAGS = frozenset({"catalog", "out", "golden_out", "threshold", "candidates"})
# no LLM, no calibration, no routing: the settings that shape retrieval alone
_NOT_HERE = (
    "model", "base_url", "llm", "instructor_mode", "temperature", "limits", "accept_threshold",
    "margin", "novel_threshold", "target_precision", "novel_target_precision", "label_budget",
    "audit_rate", "field_model", "prompt_attributes", "prompt_attribute_chars", "rewrite",
    "cache", "batching", "max_batch_size", "max_wait", "max_query_chars",
)  # fmt: skip


@app.command()
@with_settings(exclude=_NOT_HERE)
def dedupe(
    catalog: Annotated[Path, typer.Option(help="Entities: JSONL, CSV, TSV or Parquet.")],
    out: Annotated[
        Path, typer.Option(help="Each entity with its cluster: .csv, .tsv, .jsonl or .parquet.")
    ],
    settings: MatcherSettings,
    golden_out: Annotated[
        Path | None,
        typer.Option(help="The golden records (default: <out stem>.golden<suffix>)."),
    ] = None,
    threshold: Annotated[
        float, typer.Option(help="Match probability at or above which a pair is a link.")
    ] = 0.99,
    candidates: Annotated[
        int, typer.Option(help="Candidates compared per entity (itself left out).")
    ] = 10,
) -> None:
    """Find duplicates within one catalog: links of the field model, clusters of links,
    and one golden record per cluster (most votes, then the most complete, then first)."""
    from .._jobs.dedupe import DedupeResult, dedupe_catalog, write_dedupe

    if not catalog.is_file():
        raise fail(f"{catalog}: catalog file not found")
    if candidates < 1:
        raise fail(f"--candidates must be >= 1, got {candidates}")

    async def main() -> DedupeResult:
        result = await dedupe_catalog(catalog, settings, threshold=threshold, candidates=candidates)
        write_dedupe(result, out, golden_out)
        return result

    result = run(main)
    say(
        f"{len(result.catalog)} entities, {result.links} links at P >= {threshold:g}: "
        f"{result.duplicates} entities in {len(result.golden)} clusters of duplicates; "
        f"written to {out} and its golden records beside it"
    )
