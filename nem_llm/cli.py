"""The ``nem-llm`` command line: match, eval, review, discover, report, bench, serve, sim,
local-llm.

User errors (bad files, bad options) print one line ``error: ...`` and exit with status 2;
``--debug`` shows the traceback. The OpenAI key is read from the environment by the
openai client and is never printed or written.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import traceback
from collections.abc import Callable, Coroutine
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from .errors import NemLLMError

T = TypeVar("T")

app = typer.Typer(
    name="nem-llm",
    help="LLM-assisted entity matching: link messy mentions to a catalog.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
out = Console()


class StrategyOpt(StrEnum):
    sequential = "sequential"
    gather = "gather"
    as_completed = "as_completed"


class OrderOpt(StrEnum):
    input = "input"
    completion = "completion"


class LLMModeOpt(StrEnum):
    live = "live"
    batch_api = "batch-api"


class EngineOpt(StrEnum):
    local = "local"
    ray = "ray"


class LLMOpt(StrEnum):
    off = "off"
    env = "env"
    sim = "sim"


_debug = False


def _fail(message: str, code: int = 2) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine; user errors become one line and exit status 2."""
    try:
        return asyncio.run(main())
    except NemLLMError as exc:
        if _debug:
            traceback.print_exc()
        raise _fail(str(exc)) from None
    except (OSError, ValueError) as exc:
        if _debug:
            traceback.print_exc()
        raise _fail(f"{type(exc).__name__}: {exc}") from None


async def _as_coro(fn: Callable[[], T]) -> T:
    """Run a sync job function under ``_run`` (its errors become one line, exit 2)."""
    return fn()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    global _debug
    _debug = debug
    # the model loader's own tqdm bar ("Loading weights") is noise next to ours, and
    # --quiet must print nothing; read when transformers is first imported (lazily)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _limits(**kwargs: Any) -> Any:
    from .config import Limits

    try:
        return Limits(**{k: v for k, v in kwargs.items() if v is not None})
    except NemLLMError as exc:
        raise _fail(str(exc)) from None


def _stats_table(title: str, stats: Any, extra: dict[str, str] | None = None) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    for k, v in (extra or {}).items():
        table.add_row(k, v)
    table.add_row("results", str(stats.total))
    for status, n in sorted(stats.by_status.items()):
        table.add_row(f"  status {status}", str(n))
    for who, n in sorted(stats.by_decided_by.items()):
        table.add_row(f"  decided by {who}", str(n))
    table.add_row("LLM calls", str(stats.llm_calls))
    table.add_row("LLM attempts", str(stats.llm_attempts))
    retries = ", ".join(f"{k} {v}" for k, v in sorted(stats.retries_by_cause.items()))
    table.add_row("retries", f"{stats.retries}" + (f" ({retries})" if retries else ""))
    table.add_row("429s received", str(stats.rate_limited))
    table.add_row("tokens", f"{stats.usage.total_tokens:,}")
    table.add_row("cost", f"${stats.usage.cost_usd:.4f}")
    table.add_row("wall time", f"{stats.wall_time_s:.1f} s")
    if stats.latency_p50_s is not None:
        table.add_row(
            "latency p50 / p95", f"{stats.latency_p50_s:.3f} / {stats.latency_p95_s:.3f} s"
        )
    return table


# -- match -------------------------------------------------------------------------------


class EncoderOpt(StrEnum):
    auto = "auto"
    torch = "torch"
    onnx = "onnx"
    onnx_int8 = "onnx-int8"
    static = "static"


_ENCODER_HELP = (
    "Catalog and query encoder: torch, onnx, onnx-int8 (the [fast] extra), static "
    "(the [static] extra), or auto (the measured default; a saved index's own encoder)."
)


@app.command()
def match(
    catalog: Annotated[Path, typer.Option(help="Entities: JSONL or CSV (id, name, ...).")],
    queries: Annotated[Path, typer.Option(help="Queries: JSONL, CSV, TSV or TXT.")],
    out: Annotated[Path, typer.Option(help="Results JSONL (one row per input row).")],
    strategy: StrategyOpt = StrategyOpt.as_completed,
    concurrency: Annotated[int, typer.Option(help="LLM calls in flight.")] = 16,
    rpm: Annotated[float | None, typer.Option(help="Requests per minute cap.")] = None,
    tpm: Annotated[float | None, typer.Option(help="Tokens per minute cap.")] = None,
    model: str = "gpt-4o-mini",
    base_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible endpoint (default: OPENAI_BASE_URL).")
    ] = None,
    query_column: Annotated[str | None, typer.Option(help="Column/key holding the query.")] = None,
    id_column: Annotated[str | None, typer.Option(help="Column/key holding the row id.")] = None,
    top_k: Annotated[int, typer.Option(help="Candidates shown to the LLM.")] = 5,
    budget_usd: Annotated[float | None, typer.Option(help="Stop LLM calls past this.")] = None,
    budget_tokens: Annotated[int | None, typer.Option(help="Stop LLM calls past this.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per LLM attempt.")] = 30.0,
    max_attempts: Annotated[int, typer.Option(help="Attempts per LLM call.")] = 5,
    order: Annotated[OrderOpt, typer.Option(help="Output row order.")] = OrderOpt.input,
    accept_threshold: float | None = None,
    margin: float | None = None,
    novel_threshold: float | None = None,
    index_description: Annotated[
        bool, typer.Option(help="Also index 'name, description' (record-like catalogs).")
    ] = False,
    state: Annotated[
        Path | None, typer.Option(help="State directory (default: <out>.state).")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, no table.")] = False,
    stats_json: Annotated[Path | None, typer.Option(help="Write run stats as JSON.")] = None,
    llm_mode: Annotated[
        LLMModeOpt,
        typer.Option(
            help="live: one call per ambiguous row; batch-api: the provider's Batch "
            "API (half price, up to 24 h; rerun the command to resume polling)."
        ),
    ] = LLMModeOpt.live,
    poll_interval: Annotated[
        float, typer.Option(help="Seconds between Batch API polls (--llm-mode batch-api).")
    ] = 30.0,
    engine: Annotated[
        EngineOpt, typer.Option(help="local: this process; ray: a Ray Data actor pool.")
    ] = EngineOpt.local,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster address (e.g. auto); default: start locally.")
    ] = None,
    actors: Annotated[int, typer.Option(help="Ray actors (limits are split across them).")] = 2,
    where: Annotated[
        list[str] | None,
        typer.Option(
            help="ATTRIBUTE=COLUMN: each row's candidates are the entities whose attribute "
            "equals the row's COLUMN value (repeatable; an empty value: no filter)."
        ),
    ] = None,
    catalog_columns: Annotated[
        str | None,
        typer.Option(help="Map catalog columns, e.g. id=code,name=label,aliases=alt_names."),
    ] = None,
    alias_separator: Annotated[
        str | None, typer.Option(help="Splits an aliases column given as one string.")
    ] = None,
    prompt_attributes: Annotated[
        str | None,
        typer.Option(help="Entity attributes shown to the LLM, comma-separated (country,type)."),
    ] = None,
    rewrite: Annotated[
        bool,
        typer.Option(
            help="For a row the LLM found no match for (it gives the entity's catalog names "
            "with its 'none') or that retrieval called novel, retrieve again with those names "
            "and decide once more."
        ),
    ] = False,
    index: Annotated[
        Path | None, typer.Option(help="A saved index (nem-llm index build) to reuse.")
    ] = None,
    encoder: Annotated[EncoderOpt | None, typer.Option(help=_ENCODER_HELP)] = None,
) -> None:
    """Match every row of a queries file against a catalog; resumable and cached."""
    from .catalog import CatalogColumns
    from .jobs.batch import MatchJob, run_match_job

    limits = _limits(
        concurrency=concurrency,
        rpm=rpm,
        tpm=tpm,
        timeout=timeout,
        max_attempts=max_attempts,
        budget_usd=budget_usd,
        budget_tokens=budget_tokens,
    )
    for label, path in (("catalog", catalog), ("queries", queries)):
        if not path.is_file():
            raise _fail(f"{path}: {label} file not found")
    if engine is EngineOpt.ray and llm_mode is LLMModeOpt.batch_api:
        raise _fail("--engine ray works with --llm-mode live only")
    filters: list[tuple[str, str]] = []
    for spec in where or []:
        attribute, sep, column = (part.strip() for part in spec.partition("="))
        if not sep or not attribute or not column:
            raise _fail(f"--where {spec!r}: use ATTRIBUTE=COLUMN, e.g. country=country_code")
        filters.append((attribute, column))
    columns = None
    if catalog_columns or alias_separator:
        columns = CatalogColumns.parse(catalog_columns or "", alias_separator=alias_separator)
    job = MatchJob(
        catalog=catalog,
        queries=queries,
        out=out,
        query_column=query_column,
        id_column=id_column,
        strategy=strategy.value,
        order=order.value,
        model=model,
        base_url=base_url,
        top_k=top_k,
        limits=limits,
        accept_threshold=accept_threshold,
        margin=margin,
        novel_threshold=novel_threshold,
        index_description=index_description,
        state=state,
        where=tuple(filters),
        columns=columns,
        prompt_attributes=tuple(
            a.strip() for a in (prompt_attributes or "").split(",") if a.strip()
        ),
        rewrite=rewrite,
        index=index,
        encoder=encoder.value if encoder else None,
    )
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
            if engine is EngineOpt.ray:
                from .integrations.ray import run_ray_job

                return await loop.run_in_executor(
                    None,
                    lambda: run_ray_job(
                        job, actors=actors, ray_address=ray_address, on_progress=on_progress
                    ),
                )
            if llm_mode is LLMModeOpt.batch_api:
                return await _run_batch_api(job, poll_interval, stop, on_progress, quiet)
            return await run_match_job(job, stop=stop, on_progress=on_progress)
        except asyncio.CancelledError:
            return None
        finally:
            if first:
                progress.stop()

    summary = _run(main)
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
        if llm_mode is LLMModeOpt.batch_api:
            extra["batches (all runs)"] = str(getattr(summary, "batches", 0))
            extra["prices"] = "Batch API (half the live price)"
        err.print(_stats_table("nem-llm match", summary.stats, extra))
    if summary.interrupted:
        err.print(
            "[yellow]interrupted:[/] finished rows are saved; run the same command to resume."
        )
        raise typer.Exit(130)


async def _run_batch_api(
    job: Any, poll_interval: float, stop: asyncio.Event, on_progress: Any, quiet: bool
) -> Any:
    """``match --llm-mode batch-api``: the job, with one status line per batch poll."""
    from .jobs.batch_api import BatchApiOptions, BatchProgress, run_batch_api_job

    def on_batch(p: BatchProgress) -> None:
        if not quiet:
            err.print(
                f"batch {p.seq} ({p.batch_id}): {p.status}, {p.completed:,}/{p.total:,} done,"
                f" {p.failed:,} failed",
                highlight=False,
            )

    options = BatchApiOptions(poll_interval=poll_interval)
    return await run_batch_api_job(
        job, options=options, stop=stop, on_progress=on_progress, on_batch=on_batch
    )


# -- index -------------------------------------------------------------------------------

index_app = typer.Typer(help="Build a reusable search index for a large catalog.")
app.add_typer(index_app, name="index")


class IndexOpt(StrEnum):
    auto = "auto"
    exact = "exact"
    ann = "ann"


@index_app.command("build")
def index_build(
    catalog: Annotated[Path, typer.Option(help="Entities: JSONL or CSV (id, name, ...).")],
    out_dir: Annotated[Path, typer.Option("--out", help="Index directory (created).")],
    index: Annotated[IndexOpt, typer.Option(help="Search: auto, exact or ann.")] = IndexOpt.auto,
    index_description: Annotated[
        bool, typer.Option(help="Also index 'name, description' (record-like catalogs).")
    ] = False,
    lexical_weight: float = 0.5,
    chunk_size: Annotated[int, typer.Option(help="Forms encoded per saved chunk.")] = 20_000,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress.")] = False,
    encoder: Annotated[EncoderOpt, typer.Option(help=_ENCODER_HELP)] = EncoderOpt.auto,
) -> None:
    """Encode a catalog (resumable in chunks; Ctrl-C safe) and save its index to --out."""
    from .catalog import load_catalog
    from .jobs.index_build import build_index
    from .retrieval.encoders import make_embedder

    if not catalog.is_file():
        raise _fail(f"{catalog}: catalog file not found")
    entities = load_catalog(catalog, include_description=index_description)
    try:
        embedder = make_embedder(encoder.value)
    except NemLLMError as exc:
        raise _fail(str(exc)) from None
    progress = Progress(
        TextColumn("[bold]encoding"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=quiet,
    )
    task = progress.add_task("encode", total=len(entities.forms))
    try:
        with progress:
            built = build_index(
                entities,
                embedder,
                out_dir,
                index=index.value,
                lexical_weight=lexical_weight,
                chunk_size=chunk_size,
                on_chunk=lambda done, total: progress.update(task, completed=done),
            )
    except KeyboardInterrupt:
        err.print("[yellow]interrupted: encoded chunks are kept; run again to resume[/]")
        raise typer.Exit(130) from None
    kind = "ann" if built.use_ann else "exact"
    err.print(
        f"index saved to {out_dir}: {len(entities):,} entities, {len(entities.forms):,} "
        f"forms, {kind} search, {built.dense_nbytes_per_entity():,.0f} dense bytes/entity, "
        f"encoder {embedder.name}"
    )


# -- eval --------------------------------------------------------------------------------


@app.command("eval")
def eval_(
    catalog: Annotated[Path, typer.Option(help="Entities JSONL/CSV.")],
    queries: Annotated[Path, typer.Option(help="Labelled queries with 'gold_id' (null = absent).")],
    llm: Annotated[
        LLMOpt, typer.Option(help="off: no LLM; env: OPENAI_* settings; sim: simulator oracle.")
    ] = LLMOpt.off,
    oracle_error_rate: Annotated[float, typer.Option(help="Simulator oracle error rate.")] = 0.1,
    model: str = "gpt-4o-mini",
    top_k: int = 5,
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N queries only.")] = None,
    concurrency: int = 32,
    accept_threshold: float | None = None,
    margin: float | None = None,
    novel_threshold: float | None = None,
    index_description: bool = False,
    calibrate: Annotated[
        float,
        typer.Option(help="Share of queries used to calibrate thresholds (rest evaluated)."),
    ] = 0.0,
    target_precision: float = 0.99,
    mode: Annotated[
        str,
        typer.Option(help="fit mode with --calibrate: zero-shot, aliases, full, or auto."),
    ] = "zero-shot",
    seed: Annotated[int, typer.Option(help="Seed of the --calibrate split.")] = 0,
    rewrite: Annotated[
        bool, typer.Option(help="LLM query rewriting for rows retrieval missed (see match).")
    ] = False,
    max_seconds: Annotated[
        float, typer.Option(help="Fine-tuning time limit (mode full), seconds.")
    ] = 600.0,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the report as JSON.")
    ] = None,
    name: Annotated[str | None, typer.Option(help="Set name in the table.")] = None,
    report_out: Annotated[
        Path | None, typer.Option("--report", help="Also write the HTML run report.")
    ] = None,
    index: Annotated[
        Path | None, typer.Option(help="Index directory: built once, reused by later runs.")
    ] = None,
    encoder: Annotated[EncoderOpt | None, typer.Option(help=_ENCODER_HELP)] = None,
) -> None:
    """Measure retrieval recall, routing and end-to-end accuracy on labelled queries."""
    from .jobs.eval_job import run_eval

    kept: list[Any] | None = [] if report_out is not None else None

    report = _run(
        lambda: run_eval(
            catalog=catalog,
            queries=queries,
            llm=llm.value,
            oracle_error_rate=oracle_error_rate,
            model=model,
            top_k=top_k,
            limit=limit,
            concurrency=concurrency,
            accept_threshold=accept_threshold,
            margin=margin,
            novel_threshold=novel_threshold,
            index_description=index_description,
            calibrate_fraction=calibrate,
            target_precision=target_precision,
            seed=seed,
            rewrite=rewrite,
            mode=None if mode == "auto" else mode,
            fit_options={"max_seconds": max_seconds} if mode in ("full", "auto") else None,
            name=name or catalog.stem.removesuffix("_catalog"),
            progress=err,
            keep_results=kept,
            index_path=index,
            encoder=encoder.value if encoder else None,
        )
    )
    from .jobs.evaluation import render_eval_table

    out.print(render_eval_table([report]), highlight=False, soft_wrap=True)
    if json_out is not None:
        json_out.write_text(report.model_dump_json(indent=2), encoding="utf-8")
    if report_out is not None and kept is not None:
        from .jobs.report import ReportData, write_report

        data = ReportData(
            results=[r for r, _ in kept],
            golds=[g for _, g in kept],
            accept_threshold=report.thresholds.get("accept", ReportData.accept_threshold),
            title=f"nem-llm eval: {report.name}",
            source=str(queries),
        )
        err.print(f"report written: {write_report(data, report_out)}", highlight=False)


# -- review ------------------------------------------------------------------------------

review_app = typer.Typer(
    help="The review queue: unsure rows out to a CSV, a person's decisions back in.",
    no_args_is_help=True,
)
app.add_typer(review_app, name="review")


@review_app.command("export")
def review_export(
    results: Annotated[Path, typer.Option(help="Results JSONL of `nem-llm match`.")],
    to: Annotated[Path, typer.Option(help="The CSV to write.")],
    min_confidence: Annotated[
        float, typer.Option(help="Also queue LLM matches below this confidence.")
    ] = 0.7,
    novel: Annotated[bool, typer.Option(help="Also queue 'novel' rows.")] = True,
) -> None:
    """Write review, novel and low-confidence rows to a CSV with a 'decision' column."""
    from .jobs.review import export_review

    summary = _run(
        lambda: _as_coro(
            lambda: export_review(results, to, min_confidence=min_confidence, include_novel=novel)
        )
    )
    parts = ", ".join(f"{n} {why}" for why, n in sorted(summary.by_why.items()))
    err.print(
        f"{summary.rows_exported} of {summary.rows_read} rows to review ({parts or 'none'}): "
        f"{summary.out}; fill in 'decision' (a catalog id or 'none'), then "
        "`nem-llm review import`",
        highlight=False,
        soft_wrap=True,
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
    from .jobs.review import import_review

    summary = _run(lambda: _as_coro(lambda: import_review(csv_file, state, catalog=catalog)))
    err.print(
        f"imported {summary.decisions} decisions ({summary.blank} rows left blank); "
        f"{summary.rows_reopened} result rows reopened: rerun the same `nem-llm match` "
        f"command to apply them; labels file {summary.labels_file} "
        f"({summary.labels_total} labels)",
        highlight=False,
        soft_wrap=True,
    )


# -- discover ----------------------------------------------------------------------------


class MethodOpt(StrEnum):
    agglomerative = "agglomerative"
    hdbscan = "hdbscan"


@app.command()
def discover(
    catalog: Annotated[Path, typer.Option(help="The catalog (JSONL to --promote into).")],
    results: Annotated[Path | None, typer.Option(help="Results JSONL of `nem-llm match`.")] = None,
    out: Annotated[Path | None, typer.Option(help="Proposals JSONL to write.")] = None,
    promote: Annotated[
        Path | None,
        typer.Option(help="Add the approved proposals of this file to the catalog, then stop."),
    ] = None,
    model: str = "gpt-4o-mini",
    base_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible endpoint (default: OPENAI_BASE_URL).")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="LLM calls in flight.")] = 8,
    rpm: Annotated[float | None, typer.Option(help="Requests per minute cap.")] = None,
    tpm: Annotated[float | None, typer.Option(help="Tokens per minute cap.")] = None,
    budget_usd: Annotated[float | None, typer.Option(help="Stop LLM calls past this.")] = None,
    budget_tokens: Annotated[int | None, typer.Option(help="Stop LLM calls past this.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per LLM attempt.")] = 60.0,
    max_attempts: Annotated[int, typer.Option(help="Attempts per LLM call.")] = 5,
    method: Annotated[MethodOpt, typer.Option(help="Clustering method.")] = (
        MethodOpt.agglomerative
    ),
    threshold: Annotated[
        float, typer.Option(help="Largest distance inside a cluster (agglomerative).")
    ] = 0.4,
    min_size: Annotated[int, typer.Option(help="Drop clusters with fewer mentions.")] = 2,
    lexical_weight: Annotated[
        float, typer.Option(help="Weight of character n-grams vs embeddings.")
    ] = 0.7,
    cache: Annotated[
        Path | None, typer.Option(help="Proposal cache (default: <out>.cache.sqlite).")
    ] = None,
    state: Annotated[
        Path | None,
        typer.Option(help="With --promote: the match job's state dir (its index is reset)."),
    ] = None,
) -> None:
    """Cluster the novel rows and ask the LLM for a proposed entity per cluster."""
    from .jobs import discovery as d

    if promote is not None:
        summary = _run(lambda: _as_coro(lambda: d.promote(promote, catalog, state=state)))
        if summary.index_removed is not None:
            index_note = (
                f"removed the saved index {summary.index_removed}: the next `nem-llm "
                "match` rebuilds it for the changed catalog"
            )
        else:
            index_note = (
                "a match job's saved index is for the old catalog: pass --state "
                "<out>.state to remove it (or match with a new --state)"
            )
        err.print(
            f"catalog {catalog}: {summary.added} entities added, {summary.aliases_added} "
            f"aliases added to existing ones, {summary.skipped} proposals not approved; "
            + index_note,
            highlight=False,
            soft_wrap=True,
        )
        return
    if results is None or out is None:
        raise _fail("--results and --out are needed (or --promote PROPOSALS)")
    limits = _limits(
        concurrency=concurrency,
        rpm=rpm,
        tpm=tpm,
        timeout=timeout,
        max_attempts=max_attempts,
        budget_usd=budget_usd,
        budget_tokens=budget_tokens,
    )
    try:
        config = d.ClusterConfig(
            method=method.value,
            threshold=threshold,
            min_size=min_size,
            lexical_weight=lexical_weight,
        )
    except NemLLMError as exc:
        raise _fail(str(exc)) from None

    async def main() -> Any:
        from openai import AsyncOpenAI

        url = base_url or os.environ.get("OPENAI_BASE_URL")
        key = os.environ.get("OPENAI_API_KEY")
        client = None
        if url or key:
            client = AsyncOpenAI(base_url=url, api_key=key or "not-needed", max_retries=0)
        try:
            rows = await d.discover_async(
                results,
                catalog=catalog,
                client=client,
                model=model,
                limits=limits,
                config=config,
                cache=cache or out.with_name(out.name + ".cache.sqlite"),
            )
        finally:
            if client is not None:
                await client.close()
        d.write_proposals(rows, out)
        return rows

    rows = _run(main)
    by_status: dict[str, int] = {}
    for row in rows:
        by_status[row.status] = by_status.get(row.status, 0) + 1
    parts = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items()))
    tokens = sum(r.usage.total_tokens for r in rows)
    err.print(
        f"{len(rows)} clusters ({parts or 'none'}), {sum(r.llm_calls for r in rows)} LLM "
        f'calls, {tokens:,} tokens: {out}; set "approved": true on the ones to keep, '
        "then `nem-llm discover --promote`",
        highlight=False,
        soft_wrap=True,
    )


# -- report ------------------------------------------------------------------------------


@app.command()
def report(
    results: Annotated[Path, typer.Option(help="Results JSONL of `nem-llm match`.")],
    out: Annotated[Path, typer.Option(help="The HTML file to write.")],
    labels: Annotated[
        Path | None, typer.Option(help="Labels JSONL ('query', 'gold_id'; 'qid' optional).")
    ] = None,
    proposals: Annotated[
        Path | None, typer.Option(help="Proposals JSONL of `nem-llm discover`.")
    ] = None,
    accept_threshold: Annotated[
        float | None, typer.Option(help="The run's accept threshold (drawn on the charts).")
    ] = None,
    title: str | None = None,
) -> None:
    """Write one self-contained HTML page of charts about a run (no network to view it)."""
    from .jobs.report import build_report, write_report

    def main() -> Path:
        data = build_report(
            results,
            labels=labels,
            proposals=proposals,
            accept_threshold=accept_threshold,
            title=title,
        )
        return write_report(data, out)

    written = _run(lambda: _as_coro(main))
    err.print(f"report written: {written}", highlight=False, soft_wrap=True)


# -- bench -------------------------------------------------------------------------------


@app.command()
def bench(
    n: Annotated[int, typer.Option(help="Queries per scenario.")] = 1000,
    concurrency: Annotated[int, typer.Option(help="Concurrency cap.")] = 64,
    latency: Annotated[str, typer.Option(help="fixed | uniform | lognormal")] = "lognormal",
    latency_p50: float = 1.0,
    latency_p99: float | None = 3.0,
    rpm: Annotated[
        float | None, typer.Option(help="Client RPM of the +rpm scenarios (default: auto).")
    ] = None,
    sim_rpm: Annotated[float | None, typer.Option(help="Simulator's RPM limit there.")] = None,
    sequential_n: Annotated[
        int | None, typer.Option(help="Queries of the sequential scenario (default 20).")
    ] = None,
    base_url: Annotated[
        str | None, typer.Option(help="Benchmark this endpoint instead of the simulator.")
    ] = None,
    model: str = "nem-llm-sim",
    scenarios: Annotated[
        str | None, typer.Option(help="Comma-separated, e.g. 'gather,as_completed+rpm'.")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of completions over time.")] = None,
    soak: Annotated[
        bool, typer.Option("--soak", help="Run the fault soak (429s, 5xx, hangs, bad answers).")
    ] = False,
    soak_rpm: float = 3600.0,
) -> None:
    """Compare sequential, gather and as_completed (each capped and rate limited)."""
    from .jobs import bench as b

    if soak:
        from .jobs.soak import render_soak, run_soak

        soak_report = _run(lambda: run_soak(n, rpm=soak_rpm, concurrency=concurrency))
        out.print(render_soak(soak_report), highlight=False, soft_wrap=True)
        if json_out is not None:
            b.write_json(soak_report, json_out)
        if not all(soak_report.checks.values()):
            raise typer.Exit(1)
        return
    try:
        config = b.BenchConfig(
            n=n,
            concurrency=concurrency,
            latency=latency,  # type: ignore[arg-type]  # BenchConfig validates it
            latency_p50=latency_p50,
            latency_p99=latency_p99,
            rpm=rpm,
            sim_rpm=sim_rpm,
            sequential_n=sequential_n,
            base_url=base_url,
            api_key=os.environ.get("OPENAI_API_KEY", "sim") if base_url else "sim",
            model=model,
            scenarios=tuple(scenarios.split(",")) if scenarios else b.DEFAULT_SCENARIOS,
        )
    except (NemLLMError, ValueError) as exc:
        raise _fail(str(exc)) from None
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
    )
    tasks: dict[str, Any] = {}

    def on_progress(scenario: str, completed: int, total: int) -> None:
        if scenario not in tasks:
            tasks[scenario] = progress.add_task(scenario, total=total)
        progress.update(tasks[scenario], completed=completed)

    with progress:
        report = _run(lambda: b.run_bench(config, on_progress=on_progress))
    out.print(b.render_table(report), highlight=False, soft_wrap=True)
    if json_out is not None:
        b.write_json(report, json_out)
    if plot is not None:
        b.write_plot(report, plot)


# -- serve -------------------------------------------------------------------------------


@app.command()
def serve(
    catalog: Annotated[Path, typer.Option(help="Entities: JSONL or CSV (id, name, ...).")],
    index: Annotated[
        Path | None, typer.Option(help="Directory to save the index to and load it from.")
    ] = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key_env: Annotated[
        str | None,
        typer.Option(
            help="Require 'Authorization: Bearer <token>', the token read from this env var."
        ),
    ] = None,
    concurrency: Annotated[int, typer.Option(help="LLM calls in flight.")] = 16,
    rpm: Annotated[float | None, typer.Option(help="Requests per minute cap.")] = None,
    tpm: Annotated[float | None, typer.Option(help="Tokens per minute cap.")] = None,
    model: str = "gpt-4o-mini",
    base_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible endpoint (default: OPENAI_BASE_URL).")
    ] = None,
    top_k: Annotated[int, typer.Option(help="Candidates shown to the LLM.")] = 5,
    budget_usd: Annotated[float | None, typer.Option(help="Stop LLM calls past this.")] = None,
    budget_tokens: Annotated[int | None, typer.Option(help="Stop LLM calls past this.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per LLM attempt.")] = 30.0,
    max_attempts: Annotated[int, typer.Option(help="Attempts per LLM call.")] = 5,
    accept_threshold: float | None = None,
    margin: float | None = None,
    novel_threshold: float | None = None,
    index_description: Annotated[
        bool, typer.Option(help="Also index 'name, description' (record-like catalogs).")
    ] = False,
    cache: Annotated[Path | None, typer.Option(help="SQLite decision cache.")] = None,
    max_body_bytes: Annotated[
        int, typer.Option(help="Larger bodies are answered 413.")
    ] = 1_048_576,
    max_queries: Annotated[int, typer.Option(help="Queries per request (else 422).")] = 1000,
    max_query_chars: Annotated[int, typer.Option(help="Characters per query (else 422).")] = 2000,
    drain_timeout: Annotated[
        float, typer.Option(help="Seconds in-flight requests may finish after SIGTERM.")
    ] = 30.0,
    log_level: str = "info",
    access_log: Annotated[
        bool, typer.Option(help="Log a line per request (off: ~10% less CPU per request).")
    ] = True,
) -> None:
    """Serve the catalog over HTTP (FastAPI + uvicorn; needs the `service` extra)."""
    try:
        import uvicorn

        from .integrations.service import ServiceLimits, create_app, server_config
    except ImportError as exc:
        raise _fail(f"{exc.name} is missing: pip install 'nem_llm[service]'") from None
    from .matcher import Matcher

    token: str | None = None
    if api_key_env is not None:
        token = os.environ.get(api_key_env)
        if not token:
            raise _fail(f"--api-key-env {api_key_env}: that environment variable is not set")
    if not catalog.is_file():
        raise _fail(f"{catalog}: catalog file not found")
    limits = _limits(
        concurrency=concurrency,
        rpm=rpm,
        tpm=tpm,
        timeout=timeout,
        max_attempts=max_attempts,
        budget_usd=budget_usd,
        budget_tokens=budget_tokens,
    )
    try:
        service_limits = ServiceLimits(
            max_body_bytes=max_body_bytes,
            max_queries=max_queries,
            max_query_chars=max_query_chars,
            drain_timeout=drain_timeout,
        )
        matcher = Matcher(
            catalog,
            model=model,
            base_url=base_url,
            limits=limits,
            top_k=top_k,
            accept_threshold=accept_threshold,
            margin=margin,
            novel_threshold=novel_threshold,
            index_description=index_description,
            cache=cache,
            index_path=index,
        )
    except (NemLLMError, ValueError) as exc:
        raise _fail(str(exc)) from None
    service = create_app(
        matcher, api_key=token, limits=service_limits, close_matcher=True, tune_gc=True
    )
    config = server_config(
        service, host=host, port=port, log_level=log_level, access_log=access_log
    )
    uvicorn.Server(config).run()


# -- sim / local-llm ---------------------------------------------------------------------


@app.command()
def sim(
    port: int = 8089,
    host: str = "127.0.0.1",
    rpm: float | None = None,
    tpm: float | None = None,
    latency: Annotated[str, typer.Option(help="fixed | uniform | lognormal")] = "fixed",
    latency_p50: float = 0.0,
    latency_p99: float | None = None,
    latency_min: float = 0.0,
    latency_max: float = 0.0,
    seed: int = 0,
    rate_429: float = 0.0,
    rate_500: float = 0.0,
    rate_503: float = 0.0,
    rate_hang: float = 0.0,
    rate_malformed: float = 0.0,
    rate_invalid: float = 0.0,
    retry_after: float = 1.0,
    policy: Annotated[str, typer.Option(help="top | oracle")] = "top",
    gold: Annotated[Path | None, typer.Option(help="Labelled JSONL for the oracle.")] = None,
    oracle_error_rate: float = 0.0,
    model: str = "nem-llm-sim",
    catalog: Annotated[
        Path | None, typer.Option(help="Catalog the oracle names entities from (rewrite call).")
    ] = None,
) -> None:
    """Serve the OpenAI-compatible SIMULATOR (answers come from a policy, not a model)."""
    from .sim import SimConfig, serve_forever

    try:
        config = SimConfig(
            seed=seed,
            model=model,
            latency=latency,  # type: ignore[arg-type]  # SimConfig validates it
            latency_p50=latency_p50,
            latency_p99=latency_p99,
            latency_min=latency_min,
            latency_max=latency_max,
            rpm=rpm,
            tpm=tpm,
            rate_429=rate_429,
            rate_500=rate_500,
            rate_503=rate_503,
            rate_hang=rate_hang,
            rate_malformed=rate_malformed,
            rate_invalid=rate_invalid,
            retry_after=retry_after,
            policy=policy,  # type: ignore[arg-type]
            gold_path=str(gold) if gold else None,
            oracle_error_rate=oracle_error_rate,
            catalog_path=str(catalog) if catalog else None,
        )
    except (NemLLMError, ValueError) as exc:
        raise _fail(str(exc)) from None

    def ready(server: Any) -> None:
        out.print(f"simulator listening: OPENAI_BASE_URL={server.base_url}", highlight=False)
        out.print("(a simulator: its answers are not a model's; Ctrl-C to stop)", style="dim")

    serve_forever(config, host, port, on_ready=ready)


@app.command("local-llm")
def local_llm(
    port: Annotated[int, typer.Option(help="Port (0 = a free one).")] = 8090,
) -> None:
    """Serve the real local model (llama.cpp + SmolLM2-135M) on 127.0.0.1."""
    from .llm import local_llm as local

    ok, reason = local.local_llm_available()
    if not ok:
        raise _fail(reason)
    try:
        local.serve_forever(
            port,
            on_ready=lambda srv: out.print(
                f"local LLM ready: OPENAI_BASE_URL={srv.base_url} model={srv.model}",
                highlight=False,
            ),
        )
    except NemLLMError as exc:
        raise _fail(str(exc)) from None


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
