"""``nem-llm review``: unsure rows out to a CSV, a person's decisions back in."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ._app import app, as_coro, run, say

review_app = typer.Typer(
    help="The review queue: unsure rows out to a CSV, a person's decisions back in.",
    no_args_is_help=True,
)
app.add_typer(review_app, name="review")


@review_app.command("export")
def review_export(
    results: Annotated[Path, typer.Option(help="Results of `nem-llm match` (JSONL or Parquet).")],
    to: Annotated[Path, typer.Option(help="The CSV to write.")],
    min_confidence: Annotated[
        float, typer.Option(help="Also queue LLM matches below this confidence.")
    ] = 0.7,
    novel: Annotated[bool, typer.Option(help="Also queue 'novel' rows.")] = True,
) -> None:
    """Write review, novel and low-confidence rows to a CSV with a 'decision' column."""
    from .._jobs.review import export_review

    summary = run(
        lambda: as_coro(
            lambda: export_review(results, to, min_confidence=min_confidence, include_novel=novel)
        )
    )
    parts = ", ".join(f"{n} {why}" for why, n in sorted(summary.by_why.items()))
    say(
        f"{summary.rows_exported} of {summary.rows_read} rows to review ({parts or 'none'}): "
        f"{summary.out}; fill in 'decision' (a catalog id or 'none'), then "
        "`nem-llm review import`"
    )


@review_app.command("import")
def review_import(
    csv_file: Annotated[Path, typer.Argument(help="The filled-in review CSV.")],
    state: Annotated[Path, typer.Option(help="The match job's state directory.")],
    catalog: Annotated[
        Path | None, typer.Option(help="Catalog: allow any of its ids, not only candidates.")
    ] = None,
) -> None:
    """Store the decisions as labels; rerunning the match applies them with no LLM call."""
    from .._jobs.review import import_review

    summary = run(lambda: as_coro(lambda: import_review(csv_file, state, catalog=catalog)))
    say(
        f"imported {summary.decisions} decisions ({summary.blank} rows left blank); "
        f"{summary.rows_reopened} result rows reopened: rerun the same `nem-llm match` "
        f"command to apply them; labels file {summary.labels_file} "
        f"({summary.labels_total} labels)"
    )
