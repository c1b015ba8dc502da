"""``nem-llm report``: one self-contained HTML page of charts about a run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._app import app, as_coro, run, say


@app.command()
def report(
    results: Annotated[Path, typer.Option(help="Results of `nem-llm match` (JSONL or Parquet).")],
    out: Annotated[Path, typer.Option(help="The HTML file to write.")],
    labels: Annotated[
        Path | None,
        typer.Option(
            help="Labelled queries as eval reads them: JSONL, CSV, TSV or Parquet with "
            "'query' and 'gold_id' (empty or null: not in the catalog; 'qid' or 'id' joins "
            "rows by id)."
        ),
    ] = None,
    proposals: Annotated[
        Path | None, typer.Option(help="Proposals JSONL of `nem-llm discover`.")
    ] = None,
    accept_threshold: Annotated[
        float | None, typer.Option(help="The run's accept threshold (drawn on the charts).")
    ] = None,
    title: Annotated[
        str | None, typer.Option(help="The page's title (default: nem-llm run report).")
    ] = None,
) -> None:
    """Write one self-contained HTML page of charts about a run (no network to view it)."""
    from .._jobs.report import build_report, write_report

    def main() -> Path:
        data = build_report(
            results,
            labels=labels,
            proposals=proposals,
            accept_threshold=accept_threshold,
            title=title,
        )
        return write_report(data, out)

    written = run(lambda: as_coro(main))
    say(f"report written: {written}")
