#!/usr/bin/env python
"""Strategy efficiency: makespan of gather / as_completed / sequential vs a fixed-latency LLM.

Part 1 of the governance benchmarks (``bench_governance.py`` runs every part); see
benchmarks/README.md for the target and how to read the table.

    python benchmarks/bench_strategies.py            # full run
    python benchmarks/bench_strategies.py --quick    # smaller N
    python benchmarks/bench_strategies.py --save
        # also writes benchmarks/results/governance-strategies.md
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import bench_common as common
from bench_common import (
    Report,
    SimProcess,
    check_llm_results,
    llm_matcher,
    load_queries,
    log,
    make_client,
    verdict,
)

from nem_llm._jobs.bench import theoretical_bound

# ----------------------------------------------------------------------------- part 1


@dataclass
class StrategyRun:
    strategy: str
    transport: str
    n: int
    c: int
    latency: float
    makespan: float = 0.0
    cpu: float = 0.0
    bad: int = 0

    @property
    def bound(self) -> float:
        """The harness's bound: ceil(N / C) x L (C = 1 for sequential; no rate limit)."""
        return theoretical_bound(
            self.n, 1 if self.strategy == "sequential" else self.c, self.latency
        )

    @property
    def ratio(self) -> float:
        return self.makespan / self.bound


async def _strategy_case(run: StrategyRun, base_url: str, catalog: list, queries: list) -> None:
    client = make_client(base_url, run.transport)
    matcher = llm_matcher(catalog, client, run.c)
    try:
        await matcher.fit_async()
        await matcher.match_async("warm-up query")  # lazy imports, first connection
        gc.collect()
        cpu0, t0 = time.process_time(), time.perf_counter()
        results = await matcher.match_batch_async(queries, strategy=run.strategy)
        run.makespan = time.perf_counter() - t0
        run.cpu = time.process_time() - cpu0
        run.bad = check_llm_results(results, run.n)
    finally:
        await matcher.aclose()
        await client.close()


def part_strategies(rep: Report, args: argparse.Namespace, catalog: list) -> None:
    L, C = 1.0, 50
    n = 200 if args.quick else 1000
    n_seq = 10 if args.quick else 30
    rep.out("## 1. Strategy efficiency (fake LLM, fixed latency, simulator in its own process)")
    rep.out()
    rep.out(
        f"N={n} (sequential: N={n_seq}), concurrency C={C}, latency L={L:g} s, no rate limit: "
        f"bound = ceil(N/C)*L (sequential: N*L). `Matcher.match_batch_async(strategy=...)`, "
        "accept_threshold=1.01 and novel_threshold=0 (every query goes to the LLM), "
        "FakeEmbedder, catalog of "
        f"{len(catalog)} rows, distinct queries. Target: makespan <= 1.10 x bound."
    )
    rep.out()
    runs: list[StrategyRun] = []
    with SimProcess(L) as sim:
        for transport in args.transports:
            for strategy in ("gather", "as_completed"):
                runs.append(StrategyRun(strategy, transport, n, C, L))
        runs.append(StrategyRun("sequential", args.transports[0], n_seq, 1, L))
        for run in runs:
            log(f"part 1: {run.strategy} / {run.transport}, N={run.n}")
            queries = load_queries(args.data, run.n)
            asyncio.run(_strategy_case(run, sim.base_url, catalog, queries))
    rows = []
    for run in runs:
        rows.append(
            [
                run.strategy,
                run.transport,
                run.n,
                run.c if run.strategy != "sequential" else 1,
                f"{run.makespan:.2f}",
                f"{run.bound:.0f}",
                f"{run.ratio:.3f}",
                f"{run.n / run.makespan:.1f}",
                f"{1000 * run.cpu / run.n:.2f}",
                f"{100 * run.cpu / run.makespan:.0f}%",
                run.bad,
                verdict(run.ratio <= 1.10 and run.bad == 0),
            ]
        )
        rep.check(
            f"1. {run.strategy} makespan ({run.transport}, N={run.n})",
            "<= 1.10 x bound, 0 errors",
            f"{run.ratio:.3f} x ({run.makespan:.2f} s / {run.bound:.0f} s), {run.bad} errors",
            run.ratio <= 1.10 and run.bad == 0,
        )
    rep.table(
        [
            "strategy",
            "transport",
            "N",
            "C",
            "makespan s",
            "bound s",
            "ratio",
            "req/s",
            "client CPU ms/query",
            "client CPU",
            "errors",
            "<= 1.10x",
        ],
        rows,
    )


def main(argv: Sequence[str] | None = None) -> int:
    return common.main(
        argv,
        description=__doc__.split("\n\n")[0],
        parts={"1": part_strategies},
        result_name="governance-strategies",
    )


if __name__ == "__main__":
    sys.exit(main())
