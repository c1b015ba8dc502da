"""``nem-llm bench``: the strategies side by side against the simulator."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from ..errors import NemLLMError
from ._app import app, err, fail, out, run


@app.command()
def bench(
    n: Annotated[int, typer.Option(help="Queries per scenario.")] = 1000,
    concurrency: Annotated[int, typer.Option(help="Concurrency cap.")] = 64,
    latency: Annotated[str, typer.Option(help="fixed | uniform | lognormal")] = "lognormal",
    latency_p50: Annotated[
        float, typer.Option(help="Median simulated LLM latency, seconds.")
    ] = 1.0,
    latency_p99: Annotated[
        float | None, typer.Option(help="99th percentile latency, seconds (lognormal, uniform).")
    ] = 3.0,
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
    model: Annotated[str, typer.Option(help="The chat model the requests name.")] = "nem-llm-sim",
    scenarios: Annotated[
        str | None, typer.Option(help="Comma-separated, e.g. 'gather,as_completed+rpm'.")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write a PNG of completions over time.")] = None,
    soak: Annotated[
        bool, typer.Option("--soak", help="Run the fault soak (429s, 5xx, hangs, bad answers).")
    ] = False,
    soak_rpm: Annotated[
        float, typer.Option(help="Client requests per minute of the fault soak.")
    ] = 3600.0,
) -> None:
    """Compare sequential, gather and as_completed (each capped and rate limited)."""
    from .._jobs import bench as b

    if soak:
        from .._jobs.soak import render_soak, run_soak

        soak_report = run(lambda: run_soak(n, rpm=soak_rpm, concurrency=concurrency))
        out.print(render_soak(soak_report), markup=False, highlight=False, soft_wrap=True)
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
        raise fail(str(exc)) from None
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
        report = run(lambda: b.run_bench(config, on_progress=on_progress))
    out.print(b.render_table(report), markup=False, highlight=False, soft_wrap=True)
    if json_out is not None:
        b.write_json(report, json_out)
    if plot is not None:
        b.write_plot(report, plot)
