"""``nem-llm match``: a queries file against a catalog, on one of three engines."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ..errors import NemLLMError
from ..settings import EngineName, MatcherSettings, OutputOrder, Strategy
from ._app import app, err, escape, fail, run, say, stats_table, warn
from ._settings import with_settings
from .sim import LOCAL_LLM_HELP, LLMChoice, use_local_llm, warn_small_model

__all__ = ["JOB_FLAGS", "match", "parse_where"]

#: The flags of ``match`` that are not settings: the files, the query-side columns, how
#: the job runs and reports (``tests/test_settings.py`` checks flags = these + settings).
#: ``--llm`` is the settings field ``llm`` spelt ``env|off|local`` (``local`` starts the
#: bundled model for the job), so it is a settings flag, not one of these.
JOB_FLAGS = frozenset(
    {
        "catalog", "queries", "out", "query_column", "id_column", "delimiter", "where",
        "fields", "strategy", "order",
        "state", "quiet", "stats_json", "engine", "poll_interval", "ray_address",
        "actors",
    }
)  # fmt: skip


def parse_where(specs: list[str] | None, flag: str = "--where") -> dict[str, str]:
    """``["country=country_code"]`` -> ``{"country": "country_code"}`` (attribute=column)."""
    out: dict[str, str] = {}
    for spec in specs or []:
        attribute, sep, column = (part.strip() for part in spec.partition("="))
        if not sep or not attribute or not column:
            raise fail(f"{flag} {spec!r}: use ATTRIBUTE=COLUMN, e.g. country=country_code")
        out[attribute] = column
    return out


@app.command()
@with_settings(exclude=("llm",))
def match(
    catalog: Annotated[
        Path,
        typer.Option(
            help="Entities: JSONL, CSV, TSV or Parquet with id, name and optionally "
            "aliases (in CSV and Parquet one cell split on '|': see --alias-separator)."
        ),
    ],
    queries: Annotated[
        Path,
        typer.Option(
            help="Queries: JSONL, CSV, TSV, TXT or Parquet (a CSV's delimiter is sniffed "
            "from its header: see --delimiter)."
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Results, one row per input row: JSONL, or Parquet for a name ending "
            "in .parquet (written at the end; needs pyarrow: nem_llm[frames])."
        ),
    ],
    settings: MatcherSettings,
    ctx: typer.Context,
    llm: Annotated[
        LLMChoice,
        typer.Option(
            help=f"env: the OPENAI_* endpoint (or --base-url); off: none; {LOCAL_LLM_HELP}."
        ),
    ] = LLMChoice.env,
    strategy: Annotated[
        Strategy, typer.Option(help="Order LLM work starts in (answers are the same).")
    ] = "as_completed",
    query_column: Annotated[
        str | None,
        typer.Option(help="Column/key holding the query (default: query, text, mention, name)."),
    ] = None,
    id_column: Annotated[
        str | None, typer.Option(help="Column/key holding the row id (default: id).")
    ] = None,
    delimiter: Annotated[
        str | None,
        typer.Option(
            help="The queries CSV's field delimiter, e.g. ';' (default: sniffed from the "
            "header: comma, semicolon, tab or |)."
        ),
    ] = None,
    where: Annotated[
        list[str] | None,
        typer.Option(
            metavar="ATTRIBUTE=COLUMN",
            help="ATTRIBUTE=COLUMN: each row's candidates are the entities whose attribute "
            "equals the row's COLUMN value (repeatable; an empty value: no filter).",
        ),
    ] = None,
    fields: Annotated[
        list[str] | None,
        typer.Option(
            metavar="ATTRIBUTE=COLUMN",
            help="The rows are records: the row's COLUMN is its field ATTRIBUTE, compared "
            "field by field with the entities' attributes (repeatable; a JSONL row's own "
            "'attributes' object is read without it).",
        ),
    ] = None,
    order: Annotated[OutputOrder, typer.Option(help="Output row order.")] = "input",
    state: Annotated[
        Path | None, typer.Option(help="State directory (default: <out>.state).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, no table.")] = False,
    stats_json: Annotated[Path | None, typer.Option(help="Write run stats as JSON.")] = None,
    engine: Annotated[
        EngineName,
        typer.Option(
            help="local: this process; ray: a Ray Data actor pool; batch-api: the "
            "provider's Batch API (half price, up to 24 h; rerun to resume polling)."
        ),
    ] = "local",
    llm_mode: Annotated[
        Literal["live", "batch-api"] | None,
        typer.Option(hidden=True, help="Deprecated: --engine batch-api."),
    ] = None,
    poll_interval: Annotated[
        float, typer.Option(help="Seconds between Batch API polls (--engine batch-api).")
    ] = 30.0,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address (e.g. auto); default: start locally.")
    ] = None,
    actors: Annotated[int, typer.Option(help="Ray actors (limits are split across them).")] = 2,
) -> None:
    """Match every row of a queries file against a catalog; resumable and cached."""
    from .._jobs.runs import MatchJob
    from ..integrations.engines import make_engine

    for label, path in (("catalog", catalog), ("queries", queries)):
        if not path.is_file():
            raise fail(f"{path}: {label} file not found")
    engine_name: str = engine
    if llm_mode == "batch-api":
        warn("--llm-mode batch-api is deprecated: use --engine batch-api")
        if engine == "ray":
            raise fail("--engine ray and --llm-mode batch-api are two engines: choose one")
        engine_name = "batch-api"
    settings = settings.replace(llm=llm is not LLMChoice.off)
    if llm is LLMChoice.local:
        if engine_name != "local":
            raise fail(f"--llm local runs with --engine local, not {engine_name}")
        settings = use_local_llm(settings, ctx)  # stopped when the command ends
    else:
        warn_small_model(settings.model)
    try:
        job = MatchJob(
            catalog=catalog,
            queries=queries,
            out=out,
            settings=settings,
            query_column=query_column,
            id_column=id_column,
            delimiter=delimiter,
            where=parse_where(where),
            fields=parse_where(fields, "--fields"),
            strategy=strategy,
            order=order,
            state=state,
        )
        options: dict[str, Any] = {}
        if engine_name == "ray":
            options = {"actors": actors, "address": ray_address}
        elif engine_name == "batch-api":
            options = {"poll_interval": poll_interval, "on_batch": _on_batch(quiet)}
        runner = make_engine(engine_name, **options)
        runner.check(job)
    except NemLLMError as exc:
        raise fail(str(exc)) from None
    progress = Progress(
        TextColumn("[bold]matching"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[llm]}"),
        console=err,
        disable=quiet,
        transient=False,
    )

    async def main() -> Any:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        this = asyncio.current_task()
        presses = 0

        def on_signal() -> None:
            nonlocal presses
            presses += 1
            if presses == 1:
                err.print(
                    "\n[yellow]stopping: no new LLM calls; unfinished rows are left for the "
                    "next run (Ctrl-C again to cancel)[/]"
                )
                stop.set()
            elif this is not None:
                this.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        task_id = progress.add_task("match", total=None, rate="", llm="")
        started = loop.time()
        first: list[int] = []

        def on_progress(done: int, total: int | None, gov: Any) -> None:
            if not first:
                first.append(done)
                # shown from the first finished row on: a fatal input error (raised
                # before any row) then prints its one line and nothing else
                progress.start()
            elapsed = max(loop.time() - started, 1e-9)
            rate = (done - first[0] + 1) / elapsed
            llm = ""
            if gov is not None:
                llm = (
                    f"LLM {gov.attempts} sent · {gov.usage.total_tokens:,} tok · "
                    f"${gov.usage.cost_usd:.4f}"
                )
            progress.update(task_id, completed=done, total=total, rate=f"{rate:,.0f}/s", llm=llm)

        try:
            return await runner.run_async(job, stop=stop, on_progress=on_progress)
        except asyncio.CancelledError:
            return None
        finally:
            if first:
                progress.stop()

    summary = run(main)
    if summary is None:
        err.print("[yellow]cancelled.[/] Finished rows are saved; run the same command to resume.")
        raise typer.Exit(130)
    if stats_json is not None:
        data = summary.stats.model_dump(mode="json")
        data.update(
            rows_total=summary.rows_total,
            rows_resumed=summary.rows_resumed,
            interrupted=summary.interrupted,
        )
        stats_json.write_text(json.dumps(data, indent=2), encoding="utf-8")
    if not quiet:
        extra = {"output": str(summary.out), "rows in output": f"{summary.rows_total:,}"}
        if summary.rows_resumed:
            extra["resumed from earlier run"] = f"{summary.rows_resumed:,}"
        if not summary.llm_configured:
            extra["LLM"] = "not configured: ambiguous rows are 'review'"
        if engine_name == "batch-api":
            extra["batches (all runs)"] = str(getattr(summary, "batches", 0))
            extra["prices"] = "Batch API (half the live price)"
        err.print(stats_table("nem-llm match", summary.stats, extra))
        for line in route_lines(summary.calibration, summary.stats):
            err.print(line, highlight=False, soft_wrap=True)
    if summary.interrupted:
        err.print(
            "[yellow]interrupted:[/] finished rows are saved; run the same command to resume."
        )
        raise typer.Exit(130)


def route_lines(calibration: Any, stats: Any) -> list[str]:
    """What decided alone and why not: each auto route's state, the labelled sample, and
    any route the audit closed during the run (escaped: no rich markup)."""
    lines: list[str] = []
    if calibration is not None:
        if calibration.labelled:
            usage = calibration.label_usage
            lines.append(
                f"calibrated on {calibration.labelled} LLM-labelled queries of this job "
                f"({usage.total_tokens:,} tokens, ${usage.cost_usd:.4f})"
            )
        for name, est in (("auto-match", calibration.matched), ("auto-novel", calibration.novel)):
            state = "open" if est.open else "closed"
            lines.append(f"{name} route {state}: {est.reason}")
    for route, audit in sorted(getattr(stats, "audit", {}).items()):
        note = f"audit of auto-{route}: {audit.agreeing}/{audit.audited} agreed"
        if audit.closed:
            note += " (below its target: closed for the rest of the run)"
        lines.append(note)
    return [escape(line) for line in lines]


def _on_batch(quiet: bool) -> Any:
    """One status line per poll of a Batch API batch."""

    def on_batch(p: Any) -> None:
        if not quiet:
            say(
                f"batch {p.seq} ({p.batch_id}): {p.status}, {p.completed:,}/{p.total:,} done,"
                f" {p.failed:,} failed"
            )

    return on_batch
