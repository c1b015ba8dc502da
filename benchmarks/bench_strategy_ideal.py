#!/usr/bin/env python
"""Strategies against a zero-overhead client on the same latency draws (``nem-llm bench``).

Runs ``nem_llm._jobs.bench.run_bench`` (the simulator in its own process, log-normal latency
p50 1 s / p99 3 s, seed 0, every query to the LLM) for gather and as_completed at
concurrency 64 and 256, N=1000 and N=5000, and sequential (20 queries), and prints
``makespan / ideal``: ``ideal`` is the makespan a client with no overhead at all would get
over the simulator's own seeded draws. Targets: <= 1.02 (sequential <= 1.01). The event
loop's lag (p99, how late a 50 ms sleeper woke) and the client's CPU are beside it.

For reference, ``raw openai`` rows run the bare ``AsyncOpenAI`` client (same transport, one
warm-up call first) with the same number of workers, sending the exact bodies the Matcher
would send (pre-rendered: no retrieval, routing, governor or instructor), against a fresh
simulator with the same seeded draws: what the client library alone costs at that
concurrency.

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

from nem_llm._jobs.bench import (
    BenchConfig,
    BenchRow,
    SimProcess,
    ideal_makespan,
    make_catalog,
    make_client,
    make_queries,
    run_bench,
    self_cpu,
    simulated_latencies,
)
from nem_llm._llm.adjudication import choice_model
from nem_llm._matching.decision import Pending
from nem_llm.matcher import Matcher
from nem_llm.testing import FakeEmbedder


async def _raw_row(n: int, c: int, http_client: str) -> BenchRow:
    """The bare openai client sending the Matcher's own bodies with ``c`` workers."""
    config = BenchConfig(n=n, concurrency=c, http_client=http_client)  # type: ignore[arg-type]
    sim = config.sim_config(rpm=None)
    async with SimProcess([sim]) as proc:
        client = make_client(proc.base_urls[0], config.api_key, config.http_client)
        matcher = Matcher(
            make_catalog(config.catalog_size),
            client=client,
            model=config.model,
            top_k=config.top_k,
            accept_threshold=1.01,
            novel_threshold=0.0,
            embedder=FakeEmbedder(),
        )
        await matcher.fit_async()
        bodies = []
        for i, query in enumerate(make_queries(n + 1, config.catalog_size)):
            planned = await matcher.prepare_async(i, query)
            assert isinstance(planned, Pending)
            bodies.append((matcher.decider.request_body(planned), len(planned.ids)))
        await matcher.aclose()

        async def one(body: dict, k: int) -> None:
            response = await client.chat.completions.create(**body)
            call = response.choices[0].message.tool_calls[0]  # type: ignore[index]
            choice_model(k).model_validate_json(call.function.arguments)  # type: ignore[union-attr]

        await one(*bodies[0])  # warm-up: the client's first call pays its set-up
        work = iter(bodies[1:])

        async def worker() -> None:
            for body, k in work:
                await one(body, k)

        loop = asyncio.get_running_loop()
        cpu0, started = self_cpu(), loop.time()
        await asyncio.gather(*(worker() for _ in range(c)))
        makespan, cpu = loop.time() - started, self_cpu() - cpu0
        await client.close()
    draws = simulated_latencies(sim, n + 1)[1:]
    return BenchRow(
        scenario="raw openai",
        strategy="raw openai",
        concurrency=c,
        rpm=None,
        n=n,
        subset_of=None,
        makespan_s=makespan,
        bound_s=0.0,
        throughput_rps=n / makespan,
        ideal_s=ideal_makespan(draws, c),
        client_cpu_s=cpu,
    )


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
            log(f"raw openai client: N={n}, C={c}")
            rows.append(asyncio.run(_raw_row(n, c, args.http_client)))
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
        raw = row.strategy == "raw openai"
        target = 1.01 if row.strategy == "sequential" else 1.02
        ok = ratio <= target and row.errors == 0
        failed += not ok and not raw
        table.append(
            [
                row.strategy,
                row.n,
                row.concurrency,
                f"{row.makespan_s:.2f}",
                f"{row.ideal_s:.2f}" if row.ideal_s else "-",
                f"{ratio:.3f}",
                "reference" if raw else f"<= {target}",
                "-" if raw else "PASS" if ok else "FAIL",
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
