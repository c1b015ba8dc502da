"""The strategy benchmark behind ``nem-llm bench``.

``run_bench`` sends the same N queries through each strategy (sequential, gather,
as_completed), each with a concurrency cap and, in the ``+rpm`` scenarios, a client-side
rate limit, against the OpenAI-compatible simulator (started in a separate process so its
CPU does not compete with the client's event loop) or any ``base_url``. Every query goes
to the LLM (``accept_threshold=1.01``, ``novel_threshold=0.0``) and embedding uses
``FakeEmbedder``, so what is measured is the LLM path: governor, strategies, HTTP client.

Each row is compared with the theoretical bound

    bound = max(ceil(N / C) * L, N / RPM * 60)          (fixed latency L)
    bound = max(N * mean(L) / C,  N / RPM * 60)          (random latency)

and the ratio ``makespan / bound`` says how close the run came. The mean of a log-normal
latency with median p50 is ``p50 * exp(sigma**2 / 2)``. The bound leaves out the tail of
the last wave (the slowest calls started near the end), so against the simulator each row
also carries ``ideal``: the makespan of a zero-overhead client over the simulator's own
seeded latency draws (N=1000, C=64, p50 1 s, p99 3 s, seed 0: 18.89 s, 1.08x the bound).
``makespan / ideal`` is then what the client itself cost; the CPU seconds the client and
the simulator spent are recorded per row to tell a CPU-bound client from a slow server.

Sequential costs ``N * L``: it runs on a subset (``sequential_n``, default ``min(N, 20)``)
and its row says so.

The fault soak lives in ``jobs.soak``.

Example:
    >>> report = asyncio.run(run_bench(BenchConfig(n=200, concurrency=16)))  # doctest: +SKIP
    >>> print(render_table(report))                                          # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
from pydantic import BaseModel, Field

from .._gc import tuned_gc
from ..config import Limits
from ..errors import ConfigError
from ..llm.stats import percentile
from ..llm.strategies import Strategy, check_strategy
from ..matcher import Matcher
from ..models import MatchResult, RunStats
from ..sim import SimConfig
from ..sim.config import LatencyKind, lognormal_sigma, sample_latency
from ..testing import FakeEmbedder

__all__ = [
    "DEFAULT_SCENARIOS",
    "BenchConfig",
    "BenchProgress",
    "BenchReport",
    "BenchRow",
    "bound_ratio",
    "ideal_makespan",
    "make_catalog",
    "make_queries",
    "mean_latency",
    "parse_scenario",
    "read_json",
    "render_table",
    "resolve_rpm",
    "run_bench",
    "simulated_latencies",
    "theoretical_bound",
    "write_json",
    "write_plot",
]

#: The scenarios ``run_bench`` runs by default, in order.
DEFAULT_SCENARIOS: tuple[str, ...] = (
    "sequential",
    "gather",
    "as_completed",
    "gather+rpm",
    "as_completed+rpm",
)
#: Client requests per minute when neither ``rpm`` nor ``sim_rpm`` is given (30 req/s).
DEFAULT_RPM = 1800.0
#: The simulator's limit is this multiple of the client's, so a governed client stays below.
SIM_RPM_FACTOR = 1.5
DEFAULT_SEQUENTIAL_N = 20

HttpClientKind = Literal["httpx", "aiohttp"]
#: ``on_progress(scenario, completed, total)``, called after every result.
BenchProgress = Callable[[str, int, int], Awaitable[None] | None]


# ---------------------------------------------------------------------------- pure parts


def mean_latency(
    kind: LatencyKind,
    p50: float,
    *,
    p99: float | None = None,
    low: float = 0.0,
    high: float | None = None,
) -> float:
    """Expected latency of the simulator's distribution, in seconds.

    ``fixed``: ``p50``; ``uniform``: ``(low + high) / 2``; ``lognormal``:
    ``p50 * exp(sigma**2 / 2)`` with ``sigma = ln(p99 / p50) / 2.326``.

    Example:
        >>> round(mean_latency("lognormal", 1.0, p99=3.0), 4)
        1.1180
    """
    if kind == "fixed":
        return float(p50)
    if kind == "uniform":
        return (low + (high if high is not None else low)) / 2.0
    if p99 is None:
        raise ConfigError("lognormal latency needs p99")
    sigma = lognormal_sigma(p50, p99)
    return float(p50 * math.exp(sigma * sigma / 2.0))


def theoretical_bound(
    n: int,
    concurrency: int,
    latency_s: float,
    rpm: float | None = None,
    *,
    random_latency: bool = False,
) -> float:
    """The least makespan ``n`` calls can take: ``max(latency term, n / rpm * 60)``.

    The latency term is ``ceil(n / concurrency) * latency_s`` for a fixed latency (whole
    waves of ``concurrency`` calls) and ``n * latency_s / concurrency`` for a random one,
    where ``latency_s`` is the mean (a work-conserving pool keeps every slot busy).

    Example:
        >>> theoretical_bound(1000, 64, 1.0)
        16.0
        >>> theoretical_bound(1000, 64, 1.0, rpm=1800)
        33.333333333333336
    """
    if n < 0 or concurrency < 1 or latency_s < 0:
        raise ConfigError("theoretical_bound needs n >= 0, concurrency >= 1, latency_s >= 0")
    if random_latency:
        by_latency = n * latency_s / concurrency
    else:
        by_latency = math.ceil(n / concurrency) * latency_s
    by_rate = n / rpm * 60.0 if rpm else 0.0
    return max(by_latency, by_rate)


def bound_ratio(makespan_s: float, bound_s: float) -> float | None:
    """``makespan / bound`` (1.0 is ideal), or ``None`` when the bound is zero."""
    if bound_s <= 0:
        return None
    return makespan_s / bound_s


def ideal_makespan(latencies: Sequence[float], concurrency: int, rpm: float | None = None) -> float:
    """The makespan of a zero-overhead client: list scheduling of ``latencies`` in order.

    Call ``k`` starts as soon as one of ``concurrency`` slots is free and, with ``rpm``, not
    before ``k * 60 / rpm`` (an exact pacer). Against the simulator, whose ``k``-th arriving
    request gets its ``k``-th latency draw, this is the best any client could do; the gap
    between it and :func:`theoretical_bound` is the tail of the last wave.

    Example:
        >>> ideal_makespan([1.0, 1.0, 1.0, 1.0, 1.0], 2)
        3.0
        >>> ideal_makespan([0.5, 0.5, 0.5], 3, rpm=60)
        2.5
    """
    if concurrency < 1:
        raise ConfigError(f"concurrency must be >= 1, got {concurrency}")
    interval = 60.0 / rpm if rpm else 0.0
    free = [0.0] * min(concurrency, max(len(latencies), 1))
    heapq.heapify(free)
    end = 0.0
    for k, latency in enumerate(latencies):
        start = max(heapq.heappop(free), k * interval)
        heapq.heappush(free, start + latency)
        end = max(end, start + latency)
    return end


def simulated_latencies(config: SimConfig, n: int) -> list[float]:
    """The latencies the simulator draws for its first ``n`` requests (arrival order).

    Mirrors ``SimServer``'s use of its seeded ``random.Random``: per request one draw for
    the fault kind, then one for the latency. Valid for configs without faults and with
    the ``top`` policy (the benchmark's); a test checks it against the server's log.
    """
    rng = random.Random(config.seed)
    out = []
    for _ in range(n):
        rng.random()  # the fault draw
        out.append(sample_latency(config, rng))
    return out


def resolve_rpm(rpm: float | None, sim_rpm: float | None) -> tuple[float, float]:
    """The client's and the simulator's RPM for the ``+rpm`` scenarios.

    Given one, the other follows (the simulator gets ``1.5x`` the client's rpm, so the
    client runs at ~2/3 of the server's capacity); given neither, 1800 and 2700.

    Example:
        >>> resolve_rpm(None, None)
        (1800.0, 2700.0)
        >>> resolve_rpm(None, 3000)
        (2000.0, 3000.0)
    """
    if (rpm is not None and rpm <= 0) or (sim_rpm is not None and sim_rpm <= 0):
        raise ConfigError(f"rpm and sim_rpm must be > 0, got {rpm!r} and {sim_rpm!r}")
    if rpm is None and sim_rpm is None:
        rpm = DEFAULT_RPM
    if rpm is None:
        assert sim_rpm is not None
        return float(sim_rpm) / SIM_RPM_FACTOR, float(sim_rpm)
    return float(rpm), float(sim_rpm) if sim_rpm is not None else float(rpm) * SIM_RPM_FACTOR


def parse_scenario(name: str) -> tuple[Strategy, bool]:
    """``"gather+rpm"`` -> ``("gather", True)``; ``"sequential"`` -> ``("sequential", False)``."""
    base, plus, suffix = name.partition("+")
    if plus and suffix != "rpm":
        raise ConfigError(f"unknown scenario {name!r}: the only suffix is '+rpm'")
    return check_strategy(base), bool(plus)


def make_catalog(size: int = 200) -> list[dict[str, str]]:
    """A synthetic catalog: ``E0001 "Entity 0001"`` ... (ids and names)."""
    return [{"id": f"E{i:04d}", "name": f"Entity {i:04d}"} for i in range(1, size + 1)]


def make_queries(n: int, catalog_size: int = 200) -> list[str]:
    """``n`` distinct queries, each near one catalog entity (so no answer is a repeat)."""
    return [f"entity {i % catalog_size + 1:04d} mention {i}" for i in range(n)]


# ---------------------------------------------------------------------------- reports


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


# ---------------------------------------------------------------------------- the run


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """Settings of one benchmark run (``nem-llm bench`` options map one to one).

    Attributes:
        n: queries per scenario.
        concurrency: the concurrency cap of the concurrent scenarios (sequential uses 1).
        latency, latency_p50, latency_p99: the simulator's latency distribution (seconds);
            with ``base_url`` the bound uses the measured mean LLM latency instead.
        rpm: client requests per minute in the ``+rpm`` scenarios; ``sim_rpm``: the
            simulator's limit in those scenarios (see :func:`resolve_rpm`). Scenarios
            without ``+rpm`` run against a simulator without a limit.
        sequential_n: queries of the sequential scenario (default ``min(n, 20)``).
        base_url, api_key, model: a real endpoint instead of the simulator.
        scenarios: names from ``DEFAULT_SCENARIOS`` (``strategy`` or ``strategy+rpm``).
        http_client: ``"aiohttp"`` (``openai.DefaultAioHttpClient``, the transport of the
            clients a ``Matcher`` makes itself: measured cheaper) or ``"httpx"`` (openai's
            own default).
        catalog_size, top_k: the synthetic catalog and candidates per query.
        max_attempts, timeout: the governor's ``Limits``.
        seed: the simulator's seed (every scenario's server starts from it).
        gc_freeze: tune the collector for each timed scenario (``nem_llm._gc.tuned_gc``,
            undone after it), as ``nem-llm match`` and ``nem-llm serve`` do once the index is
            built, so the cyclic collector's full passes skip the ~270k objects of the index
            and the imported libraries; each such pass otherwise stalls the event loop for
            100-350 ms on these machines. ``False`` measures an untuned process.
    """

    n: int = 1000
    concurrency: int = 64
    latency: LatencyKind = "lognormal"
    latency_p50: float = 1.0
    latency_p99: float | None = 3.0
    rpm: float | None = None
    sim_rpm: float | None = None
    sequential_n: int | None = None
    base_url: str | None = None
    api_key: str = "sim"
    model: str = "nem-llm-sim"
    scenarios: tuple[str, ...] = DEFAULT_SCENARIOS
    http_client: HttpClientKind = "aiohttp"
    catalog_size: int = 200
    top_k: int = 5
    max_attempts: int = 5
    timeout: float = 30.0
    seed: int = 0
    gc_freeze: bool = True

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"n must be >= 1, got {self.n}")
        if self.concurrency < 1:
            raise ConfigError(f"concurrency must be >= 1, got {self.concurrency}")
        if self.sequential_n is not None and self.sequential_n < 1:
            raise ConfigError(f"sequential_n must be >= 1, got {self.sequential_n}")
        if self.http_client not in ("httpx", "aiohttp"):
            raise ConfigError(f"http_client must be httpx or aiohttp, got {self.http_client!r}")
        if not self.scenarios:
            raise ConfigError("scenarios must not be empty")
        for name in self.scenarios:
            parse_scenario(name)
        resolve_rpm(self.rpm, self.sim_rpm)
        self.sim_config(rpm=None)  # validates the latency settings

    @property
    def effective_sequential_n(self) -> int:
        return min(self.n, self.sequential_n or DEFAULT_SEQUENTIAL_N)

    def sim_config(self, *, rpm: float | None) -> SimConfig:
        """The simulator's settings for one scenario (``rpm``: its server-side limit)."""
        return SimConfig(
            seed=self.seed,
            model=self.model,
            latency=self.latency,
            latency_p50=self.latency_p50,
            latency_p99=self.latency_p99,
            latency_max=self.latency_p99 if self.latency == "uniform" else None,
            rpm=rpm,
        )

    def expected_latency(self) -> float:
        return mean_latency(
            self.latency,
            self.latency_p50,
            p99=self.latency_p99,
            high=self.latency_p99 if self.latency == "uniform" else None,
        )


@dataclass(frozen=True)
class _Plan:
    name: str
    strategy: Strategy
    concurrency: int
    rpm: float | None
    n: int
    subset_of: int | None
    sim_rpm: float | None = None
    base_url: str = ""


_SIM_SCRIPT = r"""
import asyncio, json, signal, sys, threading
from nem_llm.sim import SimConfig, SimServer

async def main():
    servers = [SimServer(SimConfig(**c)) for c in json.loads(sys.argv[1])]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    def watch_stdin():
        sys.stdin.read()  # EOF: the parent closed the pipe (or died)
        loop.call_soon_threadsafe(stop.set)
    threading.Thread(target=watch_stdin, daemon=True).start()
    try:
        for server in servers:
            await server.start()
        print(json.dumps([server.base_url for server in servers]), flush=True)
        await stop.wait()
    finally:
        for server in servers:
            await server.stop()

asyncio.run(main())
"""


class _SimProcess:
    """Simulator servers (one per config) in a child process, off the client's CPU time.

    One process serves them all (importing nem_llm takes seconds); each scenario gets a
    fresh server, so rate-limit windows and seeded latency draws start anew.
    """

    def __init__(self, configs: Sequence[SimConfig], *, start_timeout: float = 60.0) -> None:
        self.configs = list(configs)
        self.start_timeout = start_timeout
        self.base_urls: list[str] = []
        self._proc: subprocess.Popen[str] | None = None
        self._stderr: Any = None

    async def __aenter__(self) -> _SimProcess:
        payload = json.dumps([asdict(c) for c in self.configs])
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, "-c", _SIM_SCRIPT, payload],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        try:
            assert self._proc.stdout is not None
            line = await asyncio.wait_for(
                asyncio.to_thread(self._proc.stdout.readline), self.start_timeout
            )
            if not line:
                raise RuntimeError(f"the simulator did not start: {self._stderr_tail()}")
            self.base_urls = list(json.loads(line))
            await asyncio.gather(*(_wait_ready(url) for url in self.base_urls))
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    def cpu_seconds(self) -> float | None:
        """CPU seconds (user + system) the simulator process has used, if readable."""
        return None if self._proc is None else _process_cpu(self._proc.pid)

    def _stderr_tail(self) -> str:
        if self._stderr is None:
            return ""
        self._stderr.seek(0)
        return str(self._stderr.read())[-2000:]

    async def _stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
            if proc.stdout is not None:
                proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None


def _process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a process from ``/proc`` (None where there is none)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _self_cpu() -> float:
    times = os.times()
    return times.user + times.system


def load_avg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


async def _wait_ready(base_url: str, within_s: float = 30.0) -> None:
    """Poll ``GET {base_url}/models`` until it answers 200."""
    deadline = time.monotonic() + within_s
    async with httpx.AsyncClient(timeout=2.0) as http:
        while True:
            try:
                response = await http.get(base_url.rstrip("/") + "/models")
                if response.status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{base_url} did not answer GET /models in {within_s:g} s")
            await asyncio.sleep(0.1)


def _make_client(base_url: str, api_key: str, kind: HttpClientKind) -> openai.AsyncOpenAI:
    if kind == "aiohttp":
        try:
            http_client: Any = openai.DefaultAioHttpClient()
        except RuntimeError as exc:  # openai raises this when httpx-aiohttp is missing
            raise ConfigError(f"http_client='aiohttp' needs openai[aiohttp]: {exc}") from exc
        return openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key, max_retries=0, http_client=http_client
        )
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0)


class _LoopLag:
    """Samples how late the running event loop wakes a sleeper, while the block runs."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.samples: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _LoopLag:
        self._task = asyncio.create_task(self._sample(), name="nem-llm-bench-loop-lag")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            start = loop.time()
            await asyncio.sleep(self.interval)
            self.samples.append(max(0.0, loop.time() - start - self.interval))

    @property
    def mean_ms(self) -> float | None:
        return 1000 * sum(self.samples) / len(self.samples) if self.samples else None

    @property
    def p99_ms(self) -> float | None:
        value = percentile(sorted(self.samples), 99)
        return None if value is None else 1000 * value


@contextlib.contextmanager
def quiet_instructor() -> Iterator[None]:
    """Mute instructor's per-attempt error log for the run (the governor records attempts).

    instructor logs every transport error it passes up at ERROR level; in a soak with 20 %
    429s that is thousands of lines on stderr and costs client CPU.
    """
    logger = logging.getLogger("instructor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


async def maybe_await(value: Awaitable[None] | None) -> None:
    if value is not None:
        await value


def _ok_latency_mean(results: Sequence[MatchResult]) -> float | None:
    values = [a.latency_s for r in results for a in r.attempts if a.outcome == "ok"]
    return sum(values) / len(values) if values else None


async def _run_plan(
    plan: _Plan,
    config: BenchConfig,
    on_progress: BenchProgress | None,
    sim_cpu: Callable[[], float | None] = lambda: None,
) -> tuple[BenchRow, list[MatchResult]]:
    queries = make_queries(plan.n, config.catalog_size)
    client = _make_client(plan.base_url, config.api_key, config.http_client)
    limits = Limits(
        concurrency=plan.concurrency,
        rpm=plan.rpm,
        max_attempts=config.max_attempts,
        timeout=config.timeout,
    )
    matcher = Matcher(
        make_catalog(config.catalog_size),
        client=client,
        model=config.model,
        limits=limits,
        top_k=config.top_k,
        accept_threshold=1.01,
        novel_threshold=0.0,
        embedder=FakeEmbedder(),
    )
    stack = contextlib.ExitStack()
    try:
        await matcher.fit_async()
        loop = asyncio.get_running_loop()
        times: list[float] = []
        if config.gc_freeze:
            stack.enter_context(tuned_gc())
        cpu0, sim0 = _self_cpu(), sim_cpu()
        started = loop.time()

        async def progress(done: int, total: int | None) -> None:
            times.append(loop.time() - started)
            if on_progress is not None:
                await maybe_await(on_progress(plan.name, done, plan.n))

        first: float | None = None
        async with _LoopLag() as lag:
            if plan.strategy == "gather":
                results = await matcher.match_batch_async(
                    queries, strategy="gather", batch_size=plan.concurrency, on_progress=progress
                )
            else:
                results = []
                stream = matcher.match_stream_async(
                    queries,
                    strategy=plan.strategy,
                    batch_size=plan.concurrency,
                    on_progress=progress,
                )
                async with contextlib.aclosing(stream):
                    async for result in stream:
                        if first is None:
                            first = loop.time() - started
                        results.append(result)
            makespan = loop.time() - started
        if plan.strategy == "gather":
            first = makespan  # the caller holds nothing until the whole list returns
        cpu1, sim1 = _self_cpu(), sim_cpu()
        stats = matcher.last_run_stats or RunStats()
    finally:
        stack.close()  # the collector as it was
        await matcher.aclose()
        await client.close()
    row = BenchRow(
        scenario=plan.name,
        strategy=plan.strategy,
        concurrency=plan.concurrency,
        rpm=plan.rpm,
        n=plan.n,
        subset_of=plan.subset_of,
        makespan_s=makespan,
        bound_s=0.0,  # filled in by run_bench once the latency is known
        throughput_rps=plan.n / makespan if makespan > 0 else 0.0,
        p50_s=stats.latency_p50_s,
        p95_s=stats.latency_p95_s,
        first_result_s=first,
        retries=stats.retries,
        rate_limited=stats.rate_limited,
        tokens=stats.usage.total_tokens,
        errors=stats.by_status.get("error", 0),
        llm_latency_mean_s=_ok_latency_mean(results),
        client_cpu_s=cpu1 - cpu0,
        loop_lag_mean_ms=lag.mean_ms,
        loop_lag_p99_ms=lag.p99_ms,
        sim_cpu_s=sim1 - sim0 if sim0 is not None and sim1 is not None else None,
        completion_times=[round(t, 4) for t in times],
    )
    return row, results


def _plans(config: BenchConfig) -> list[_Plan]:
    rpm, sim_rpm = resolve_rpm(config.rpm, config.sim_rpm)
    plans = []
    for name in config.scenarios:
        strategy, limited = parse_scenario(name)
        sequential = strategy == "sequential"
        plans.append(
            _Plan(
                name=name,
                strategy=strategy,
                concurrency=1 if sequential else config.concurrency,
                rpm=rpm if limited else None,
                n=config.effective_sequential_n if sequential else config.n,
                subset_of=config.n if sequential else None,
                sim_rpm=sim_rpm if limited else None,
            )
        )
    return plans


async def run_bench(
    config: BenchConfig, *, on_progress: BenchProgress | None = None
) -> BenchReport:
    """Run every scenario of ``config`` one after another and return the report.

    Without ``config.base_url`` a simulator child process serves one fresh server per
    scenario (the ``+rpm`` ones with the server-side limit ``sim_rpm``); it is stopped at
    the end. ``on_progress(scenario, completed, total)`` is called after every result.
    """
    with quiet_instructor():
        return await _run_bench(config, on_progress)


async def _run_bench(config: BenchConfig, on_progress: BenchProgress | None) -> BenchReport:
    wall = time.monotonic()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    load_before = load_avg()
    plans = _plans(config)
    rows: list[BenchRow] = []
    all_results: list[list[MatchResult]] = []
    if config.base_url is None:
        sims = [config.sim_config(rpm=p.sim_rpm) for p in plans]
        async with _SimProcess(sims) as proc:
            for plan, url in zip(plans, proc.base_urls, strict=True):
                row, results = await _run_plan(
                    replace(plan, base_url=url), config, on_progress, proc.cpu_seconds
                )
                rows.append(row)
                all_results.append(results)
        latency_mean = config.expected_latency()
        source: Literal["simulator", "measured"] = "simulator"
        target = "simulator"
    else:
        for plan in plans:
            row, results = await _run_plan(
                replace(plan, base_url=config.base_url), config, on_progress
            )
            rows.append(row)
            all_results.append(results)
        measured = _ok_latency_mean([r for rs in all_results for r in rs])
        latency_mean = measured if measured is not None else config.expected_latency()
        source = "measured" if measured is not None else "simulator"
        target = config.base_url
    random_latency = config.latency != "fixed" or source == "measured"
    for row in rows:
        row.bound_s = theoretical_bound(
            row.n, row.concurrency, latency_mean, row.rpm, random_latency=random_latency
        )
        row.ratio = bound_ratio(row.makespan_s, row.bound_s)
        if config.base_url is None:
            draws = simulated_latencies(config.sim_config(rpm=None), row.n)
            row.ideal_s = ideal_makespan(draws, row.concurrency, row.rpm)
    rpm, sim_rpm = resolve_rpm(config.rpm, config.sim_rpm)
    any_rpm = any(p.rpm is not None for p in plans)
    return BenchReport(
        target=target,
        n=config.n,
        concurrency=config.concurrency,
        rpm=rpm if any_rpm else None,
        sim_rpm=sim_rpm if any_rpm and config.base_url is None else None,
        sequential_n=config.effective_sequential_n,
        latency=config.latency if source == "simulator" else "measured",
        latency_p50_s=config.latency_p50,
        latency_p99_s=config.latency_p99,
        latency_mean_s=latency_mean,
        latency_source=source,
        http_client=config.http_client,
        started_at=started_at,
        duration_s=time.monotonic() - wall,
        python=f"{platform.python_implementation()} {platform.python_version()}, "
        f"openai {openai.__version__}",
        cpu_count=os.cpu_count(),
        load_avg_before=load_before,
        load_avg_after=load_avg(),
        rows=rows,
    )
