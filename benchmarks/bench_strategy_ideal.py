#!/usr/bin/env python
"""Strategies against a zero-overhead client on the same latency draws (``nem-llm bench``).

Runs ``nem_llm.jobs.bench.run_bench`` (the simulator in its own process, log-normal latency
p50 1 s / p99 3 s, seed 0, every query to the LLM) for gather and as_completed at
concurrency 64 and 256, N=1000 and N=5000, and sequential (20 queries), and prints
``makespan / ideal``: ``ideal`` is the makespan a client with no overhead at all would get
over the simulator's own seeded draws. Targets: <= 1.02 (sequential <= 1.01). The event
loop's lag (p99, how late a 50 ms sleeper woke) and the client's CPU are beside it.

    python benchmarks/bench_strategy_ideal.py                 # full (about 6 minutes)
    python benchmarks/bench_strategy_ideal.py --quick         # N=1000 only
    python benchmarks/bench_strategy_ideal.py --save          # results/strategies-vs-ideal.md
    python benchmarks/bench_strategy_ideal.py --http-client httpx
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from bench_common import RESULTS, Report, loadavg, log

from nem_llm.jobs.bench import BenchConfig, BenchRow, run_bench


def _rows(args: argparse.Namespace) -> list[BenchRow]:
    rows: list[BenchRow] = []
    sizes = (1000,) if args.quick else (1000, 5000)
    for n in sizes:
        for c in (64, 256):
            log(f"gather, as_completed: N={n}, C={c}")
            config = BenchConfig(
                n=n,
                concurrency=c,
                scenarios=("gather", "as_completed"),
                http_client=args.http_client,
                gc_freeze=args.gc_freeze,
            )
            rows += asyncio.run(run_bench(config)).rows
    log("sequential: 20 queries")
    config = BenchConfig(
        n=1000, scenarios=("sequential",), http_client=args.http_client, gc_freeze=args.gc_freeze
    )
    rows += asyncio.run(run_bench(config)).rows
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N=1000 only")
    ap.add_argument("--save", action="store_true", help="write results/strategies-vs-ideal.md")
    ap.add_argument("--out", type=Path, default=None, help="with --save: write here instead")
    ap.add_argument("--http-client", choices=("httpx", "aiohttp"), default="aiohttp")
    ap.add_argument(
        "--no-gc-tuning",
        dest="gc_freeze",
        action="store_false",
        help="measure an untuned collector (nem-llm match/serve/bench tune it by default)",
    )
    args = ap.parse_args(argv)
    rep = Report()
    rep.out("# Strategies vs a zero-overhead client (same simulator latency draws)")
    rep.out()
    before = loadavg()
    rows = _rows(args)
    rep.out(
        f"Transport {args.http_client}; gc tuned {'on' if args.gc_freeze else 'off'}; "
        f"load average before {before}, after {loadavg()} (2 shared cores)."
    )
    rep.out()
    failed = 0
    table = []
    for row in rows:
        ratio = row.makespan_s / row.ideal_s if row.ideal_s else float("nan")
        target = 1.01 if row.strategy == "sequential" else 1.02
        ok = ratio <= target and row.errors == 0
        failed += not ok
        table.append(
            [
                row.strategy,
                row.n,
                row.concurrency,
                f"{row.makespan_s:.2f}",
                f"{row.ideal_s:.2f}" if row.ideal_s else "-",
                f"{ratio:.3f}",
                f"<= {target}",
                "PASS" if ok else "FAIL",
                f"{row.loop_lag_p99_ms:.0f}" if row.loop_lag_p99_ms is not None else "-",
                f"{1000 * row.client_cpu_s / row.n:.2f}" if row.client_cpu_s else "-",
                row.errors,
            ]
        )
    rep.table(
        [
            "strategy",
            "N",
            "C",
            "makespan s",
            "ideal s",
            "makespan / ideal",
            "target",
            "result",
            "loop lag p99 ms",
            "client CPU ms/query",
            "errors",
        ],
        table,
    )
    if args.save:
        out = args.out or RESULTS / "strategies-vs-ideal.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(rep.text(), encoding="utf-8")
        print(f"saved {out}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
