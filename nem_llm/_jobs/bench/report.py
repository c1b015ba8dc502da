"""What a benchmark run reports: one :class:`BenchRow` per scenario in a :class:`BenchReport`,
as a markdown table, JSON or a PNG of completions over time."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

__all__ = ["BenchReport", "BenchRow", "read_json", "render_table", "write_json", "write_plot"]


class BenchRow(BaseModel):
    """One scenario of a benchmark run.

    ``first_result_s`` is when the caller holds its first result: ``gather`` returns the
    whole list at the end (so it equals the makespan); ``sequential`` and ``as_completed``
    stream. ``completion_times`` are seconds since the start at which each query finished
    (what the plot draws). ``rate_limited`` counts 429s received; ``retries`` all retries.
    ``ideal_s`` is :func:`ideal_makespan` over the simulator's own latency draws (a
    zero-overhead client; simulator only), so ``makespan / ideal`` is the client's overhead
    and ``ideal / bound`` the tail of the last wave. ``llm_latency_mean_s`` is the mean
    latency of successful attempts as the client saw it; ``client_cpu_s`` and ``sim_cpu_s``
    the CPU seconds the client process and the simulator process spent on the scenario
    (for telling a CPU-bound client from a slow server); ``loop_lag_*_ms`` how late the
    client's event loop woke a 50 ms sleeper (a busy or CPU-starved loop runs late, and
    every request's latency grows with it).
    """

    scenario: str
    strategy: str
    concurrency: int
    rpm: float | None = None
    n: int
    subset_of: int | None = None
    makespan_s: float
    bound_s: float
    ratio: float | None = None
    ideal_s: float | None = None
    throughput_rps: float
    p50_s: float | None = None
    p95_s: float | None = None
    first_result_s: float | None = None
    retries: int = 0
    rate_limited: int = 0
    tokens: int = 0
    errors: int = 0
    llm_latency_mean_s: float | None = None
    client_cpu_s: float | None = None
    sim_cpu_s: float | None = None
    loop_lag_mean_ms: float | None = None
    loop_lag_p99_ms: float | None = None
    completion_times: list[float] = Field(default_factory=list)


class BenchReport(BaseModel):
    """A benchmark run: its settings, the environment, and one row per scenario."""

    target: str
    n: int
    concurrency: int
    rpm: float | None = None
    sim_rpm: float | None = None
    sequential_n: int
    latency: str
    latency_p50_s: float
    latency_p99_s: float | None = None
    latency_mean_s: float
    latency_source: Literal["simulator", "measured"] = "simulator"
    http_client: str = "httpx"
    started_at: str = ""
    duration_s: float = 0.0
    python: str = ""
    cpu_count: int | None = None
    load_avg_before: list[float] | None = None
    load_avg_after: list[float] | None = None
    rows: list[BenchRow] = Field(default_factory=list)


def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def render_table(report: BenchReport) -> str:
    """The report as a markdown table (one row per scenario), with a note on subsets."""
    header = (
        "| strategy | n | concurrency | rpm | makespan | bound | ratio | ideal | throughput "
        "| p50 | p95 | first result | retries | 429s | tokens | errors |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]
    notes: list[str] = []
    for row in report.rows:
        name = row.scenario
        if row.subset_of is not None and row.subset_of != row.n:
            name += " *"
            notes.append(
                f"\\* {row.scenario}: the first {row.n} of the {row.subset_of} queries "
                f"(N x L would take ~{row.subset_of * report.latency_mean_s / 60:.0f} min)."
            )
        cells = [
            name,
            str(row.n),
            str(row.concurrency),
            "-" if row.rpm is None else f"{row.rpm:g}",
            _fmt_s(row.makespan_s),
            _fmt_s(row.bound_s),
            "-" if row.ratio is None else f"{row.ratio:.2f}x",
            _fmt_s(row.ideal_s),
            f"{row.throughput_rps:.1f}/s",
            _fmt_s(row.p50_s),
            _fmt_s(row.p95_s),
            _fmt_s(row.first_result_s),
            str(row.retries),
            str(row.rate_limited),
            str(row.tokens),
            str(row.errors),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    rpm_note = "" if report.rpm is None else f"; client rpm {report.rpm:g}"
    if report.sim_rpm is not None:
        rpm_note += f", simulator rpm {report.sim_rpm:g} (+rpm scenarios only)"
    bound_note = (
        f"bound = max(N x mean latency / C, N / rpm x 60) with mean latency "
        f"{report.latency_mean_s:.3f} s ({report.latency_source})"
        if report.latency != "fixed"
        else f"bound = max(ceil(N / C) x {report.latency_mean_s:g} s, N / rpm x 60)"
    )
    lines.append("")
    lines.append(f"{report.target}, {report.latency} latency{rpm_note}. {bound_note}.")
    if any(row.ideal_s is not None for row in report.rows):
        lines.append(
            "ideal = a zero-overhead client against the same seeded latency draws "
            "(makespan / ideal is the client's overhead; ideal / bound the last wave's tail)."
        )
    lines.extend(notes)
    cpu = [
        f"{row.scenario} {row.client_cpu_s / row.n * 1000:.1f} ms"
        + (f" (+ simulator {row.sim_cpu_s / row.n * 1000:.1f} ms)" if row.sim_cpu_s else "")
        for row in report.rows
        if row.client_cpu_s is not None and row.n
    ]
    if cpu:
        lines.append("client CPU per query: " + "; ".join(cpu) + ".")
    lag = [
        f"{row.scenario} {row.loop_lag_mean_ms:.1f}/{row.loop_lag_p99_ms:.0f} ms"
        for row in report.rows
        if row.loop_lag_mean_ms is not None and row.loop_lag_p99_ms is not None
    ]
    if lag:
        lines.append("client event-loop lag, mean/p99: " + "; ".join(lag) + ".")
    if report.load_avg_before is not None and report.load_avg_after is not None:
        lines.append(
            f"machine: {report.cpu_count} CPUs, load average {report.load_avg_before[0]:.2f} "
            f"before, {report.load_avg_after[0]:.2f} after (1 min)."
        )
    return "\n".join(lines)


def write_json(report: BaseModel, path: str | os.PathLike[str]) -> None:
    """Write a report as indented JSON (``read_json`` reads a ``BenchReport`` back)."""
    Path(path).write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")


def read_json(path: str | os.PathLike[str]) -> BenchReport:
    """Read a ``BenchReport`` written by :func:`write_json`."""
    return BenchReport.model_validate_json(Path(path).read_text(encoding="utf-8"))


def write_plot(report: BenchReport, path: str | os.PathLike[str]) -> None:
    """Draw completions over time per scenario (share of its queries done) to a PNG.

    Each scenario's theoretical bound is marked with an ``x`` at 100 %.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    try:
        for row in report.rows:
            times = sorted(row.completion_times)
            if not times:
                continue
            xs = [0.0, *times]
            ys = [0.0, *[(i + 1) / row.n for i in range(len(times))]]
            label = f"{row.scenario} (n={row.n}, C={row.concurrency}"
            label += f", rpm={row.rpm:g})" if row.rpm is not None else ")"
            (line,) = ax.step(xs, ys, where="post", label=label)
            ax.plot([row.bound_s], [1.0], marker="x", color=line.get_color(), markersize=9)
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("share of the scenario's queries completed")
        ax.set_ylim(0, 1.05)
        ax.set_title(
            f"nem-llm bench: N={report.n}, C={report.concurrency}, {report.latency} latency "
            f"p50={report.latency_p50_s:g} s (x = theoretical bound)",
            fontsize=10,
        )
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(os.fspath(path), format="png")
    finally:
        plt.close(fig)
