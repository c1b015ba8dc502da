"""``nem-llm eval``: retrieval recall, routing and accuracy on labelled queries."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import typer

from ..settings import MatcherSettings
from ._app import app, err, out, run, say, warn
from ._settings import with_settings
from .sim import LOCAL_LLM_HELP, use_local_llm, warn_small_model


class LLMOpt(StrEnum):
    off = "off"
    env = "env"
    sim = "sim"
    local = "local"


#: The flags of ``eval`` that are not settings (``llm`` is replaced by
#: ``--llm off|env|sim|local``).
EVAL_FLAGS = frozenset(
    {
        "catalog", "queries", "llm", "oracle_error_rate", "oracle_error_profile", "limit",
        "calibrate", "mode", "seed",
        "max_seconds", "json_out", "name", "report_out",
    }
)  # fmt: skip


@app.command("eval")
@with_settings(exclude=("llm",))
def eval_(
    catalog: Annotated[Path, typer.Option(help="Entities: JSONL, CSV, TSV or Parquet.")],
    queries: Annotated[
        Path,
        typer.Option(
            help="Labelled queries: JSONL, CSV, TSV or Parquet with 'query' and 'gold_id' "
            "(an empty cell or null: not in the catalog)."
        ),
    ],
    settings: MatcherSettings,
    ctx: typer.Context,
    llm: Annotated[
        LLMOpt,
        typer.Option(
            help=f"off: no LLM; env: OPENAI_* settings; sim: simulator oracle; {LOCAL_LLM_HELP}."
        ),
    ] = LLMOpt.off,
    oracle_error_rate: Annotated[float, typer.Option(help="Simulator oracle error rate.")] = 0.1,
    oracle_error_profile: Annotated[
        Literal["uniform", "difficulty"],
        typer.Option(help="Simulator errors: uniform, or concentrated on ambiguous queries."),
    ] = "uniform",
    limit: Annotated[int | None, typer.Option(help="Evaluate the first N queries only.")] = None,
    calibrate: Annotated[
        float,
        typer.Option(help="Share of queries used to calibrate thresholds (rest evaluated)."),
    ] = 0.0,
    mode: Annotated[
        str,
        typer.Option(help="fit mode with --calibrate: zero-shot, aliases, full, or auto."),
    ] = "zero-shot",
    seed: Annotated[int, typer.Option(help="Seed of the --calibrate split.")] = 0,
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
) -> None:
    """Measure retrieval recall, routing and end-to-end accuracy on labelled queries."""
    from .._jobs.eval_job import run_eval

    kept: list[Any] | None = [] if report_out is not None else None
    llm_mode = llm.value
    if llm is LLMOpt.local:
        settings, llm_mode = use_local_llm(settings, ctx), "env"  # stopped when the command ends
    elif llm is LLMOpt.env:
        warn_small_model(settings.model)

    report = run(
        lambda: run_eval(
            catalog=catalog,
            queries=queries,
            settings=settings,
            llm=llm_mode,
            oracle_error_rate=oracle_error_rate,
            oracle_error_profile=oracle_error_profile,
            limit=limit,
            calibrate_fraction=calibrate,
            seed=seed,
            mode=None if mode == "auto" else mode,
            fit_options={"max_seconds": max_seconds} if mode in ("full", "auto") else None,
            name=name or catalog.stem.removesuffix("_catalog"),
            progress=err,
            keep_results=kept,
            on_warning=warn,
        )
    )
    from .._jobs.evaluation import render_eval_table

    out.print(render_eval_table([report]), markup=False, highlight=False, soft_wrap=True)
    if json_out is not None:
        json_out.write_text(report.model_dump_json(indent=2), encoding="utf-8")
    if report_out is not None and kept is not None:
        from .._jobs.report import ReportData, write_report

        data = ReportData(
            results=[r for r, _ in kept],
            golds=[g for _, g in kept],
            accept_threshold=report.thresholds.get("accept", ReportData.accept_threshold),
            title=f"nem-llm eval: {report.name}",
            source=str(queries),
        )
        say(f"report written: {write_report(data, report_out)}")
