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

The modules, one concern each: ``bounds`` (the bound maths), ``config`` (settings,
scenarios, synthetic data), ``report`` (rows, table, JSON, plot), ``probes`` (the simulator
process, CPU, load, loop lag; shared with ``benchmarks/``), ``runner`` (the run). The fault
soak lives in ``jobs.soak``.

Example:
    >>> report = asyncio.run(run_bench(BenchConfig(n=200, concurrency=16)))  # doctest: +SKIP
    >>> print(render_table(report))                                          # doctest: +SKIP
"""

from __future__ import annotations

from .bounds import (
    bound_ratio,
    ideal_makespan,
    mean_latency,
    simulated_latencies,
    theoretical_bound,
)
from .config import (
    DEFAULT_RPM,
    DEFAULT_SCENARIOS,
    DEFAULT_SEQUENTIAL_N,
    SIM_RPM_FACTOR,
    BenchConfig,
    BenchProgress,
    HttpClientKind,
    make_catalog,
    make_queries,
    parse_scenario,
    resolve_rpm,
)
from .probes import (
    LoopLag,
    SimProcess,
    load_avg,
    make_client,
    maybe_await,
    process_cpu,
    quiet_instructor,
    self_cpu,
)
from .report import BenchReport, BenchRow, read_json, render_table, write_json, write_plot
from .runner import run_bench

__all__ = [
    "DEFAULT_RPM",
    "DEFAULT_SCENARIOS",
    "DEFAULT_SEQUENTIAL_N",
    "SIM_RPM_FACTOR",
    "BenchConfig",
    "BenchProgress",
    "BenchReport",
    "BenchRow",
    "HttpClientKind",
    "LoopLag",
    "SimProcess",
    "bound_ratio",
    "ideal_makespan",
    "load_avg",
    "make_catalog",
    "make_client",
    "make_queries",
    "maybe_await",
    "mean_latency",
    "parse_scenario",
    "process_cpu",
    "quiet_instructor",
    "read_json",
    "render_table",
    "resolve_rpm",
    "run_bench",
    "self_cpu",
    "simulated_latencies",
    "theoretical_bound",
    "write_json",
    "write_plot",
]
