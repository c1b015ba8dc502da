#!/usr/bin/env python
"""The query path without the LLM vs its own encoder: queries/s of matching and of encoding.

Two catalogs, each with 10,000 queries and no LLM (ambiguous queries come back ``review``):

- ``seed``: the seeds' example, 1,000 entities ``Product i``; queries ``Product i`` /
  ``product i`` for i drawn from 0-1,199 (a sixth are not in the catalog). Exact search.
- ``100k``: 100,000 synthetic names (``bench_scale.synthetic_catalog``: development-set
  names with prefixes, suffixes and borrowed words, 10% with an alias), noisy queries
  (``bench_scale.noisy_queries``). ANN search (faiss IVF shortlist re-scored exactly), as
  ``search="auto"`` picks from 100,000 forms. The index is built once with the real
  encoder and kept in ``--cache`` (minutes here); later runs load it.

Per round, side by side: one batched encode of the 10,000 normalized queries
(``matcher.embedder.encode``), then ``match_batch_async(queries, batch_size=100)``. The table
gives the best of ``--rounds`` for each, their ratio (target >= 0.8), the ratio's range over
the rounds, process CPU per query, and the load average before and after (2 shared cores).

    python benchmarks/bench_path.py                      # both catalogs, 3 rounds
    python benchmarks/bench_path.py --catalogs seed --rounds 5
    python benchmarks/bench_path.py --save               # writes results/path.md
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import Report, loadavg
from bench_scale import noisy_queries, synthetic_catalog

HERE = Path(__file__).resolve().parent
N_QUERIES = 10_000


def seed_example() -> tuple[list[dict[str, Any]], list[str]]:
    """The seeds' example: 1,000 ``Product i`` and 10,000 queries."""
    entities = [{"id": f"p{i}", "name": f"Product {i}"} for i in range(1000)]
    rng = np.random.default_rng(0)
    numbers = rng.integers(0, 1200, N_QUERIES)
    queries = [f"product {int(i)}" if j % 3 else f"Product {int(i)}" for j, i in enumerate(numbers)]
    return entities, queries


def large_catalog(n: int) -> tuple[list[dict[str, Any]], list[str]]:
    catalog = synthetic_catalog(n)
    entities = [e.model_dump(include={"id", "name", "aliases"}) for e in catalog.entities]
    return entities, noisy_queries(catalog, N_QUERIES, seed=7)


async def measure(
    name: str, entities: list[dict[str, Any]], queries: list[str], rounds: int, cache: Path
) -> dict[str, Any]:
    from nem_llm import Matcher
    from nem_llm._text import validate_query

    matcher = Matcher(entities, encoder="onnx-int8", index_dir=cache / name)
    async with matcher:
        t = time.perf_counter()
        await matcher.fit_async(show_progress=False)
        fit_s = time.perf_counter() - t
        index = matcher.index
        assert index is not None
        normalized = [validate_query(q) for q in queries]
        await matcher.match_batch_async(queries[:300], batch_size=100)  # warm-up
        matcher.embedder.encode(normalized[:300])
        load_before = loadavg()
        enc: list[tuple[float, float]] = []
        path: list[tuple[float, float]] = []
        statuses: collections.Counter[str] = collections.Counter()
        for _ in range(rounds):
            w, c = time.perf_counter(), time.process_time()
            matcher.embedder.encode(normalized)
            enc.append((time.perf_counter() - w, time.process_time() - c))
            w, c = time.perf_counter(), time.process_time()
            results = await matcher.match_batch_async(queries, batch_size=100)
            path.append((time.perf_counter() - w, time.process_time() - c))
            statuses = collections.Counter(r.status for r in results)
        n = len(queries)
        best_enc = min(e for e, _ in enc)
        best_path = min(p for p, _ in path)
        ratios = [e / p for (e, _), (p, _) in zip(enc, path, strict=True)]
        return {
            "catalog": name,
            "entities": len(index.catalog.entities),
            "forms": len(index.catalog.forms),
            "search": "ann" if index.use_ann else "exact",
            "encode_qps": n / best_enc,
            "path_qps": n / best_path,
            "ratio": best_enc / best_path,
            "ratio_range": f"{min(ratios):.2f}-{max(ratios):.2f}",
            "encode_cpu_ms": 1000 * min(c for _, c in enc) / n,
            "path_cpu_ms": 1000 * min(c for _, c in path) / n,
            "statuses": dict(statuses),
            "fit_s": fit_s,
            "load": f"{load_before} -> {loadavg()}",
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--catalogs", default="seed,100k")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path("/tmp/nem-llm-bench-path"))
    parser.add_argument("--save", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "path.md")
    args = parser.parse_args(argv)
    import nem_llm

    report = Report()
    report.out("# The query path without the LLM vs one batched encode")
    report.out()
    report.out(f"nem_llm: `{nem_llm.__file__}`; {os.cpu_count()} cores; encoder onnx-int8")
    report.out()
    rows = []
    for name in args.catalogs.split(","):
        entities, queries = seed_example() if name == "seed" else large_catalog(100_000)
        row = asyncio.run(measure(name, entities, queries, args.rounds, args.cache))
        print(row, file=sys.stderr, flush=True)
        rows.append(row)
    report.table(
        [
            "catalog",
            "entities / forms",
            "search",
            "encode q/s",
            "path q/s",
            "ratio [>= 0.8]",
            "ratio per round",
            "CPU ms/query encode | path",
            "load (1, 5, 15 min) before -> after",
        ],
        [
            [
                r["catalog"],
                f"{r['entities']:,} / {r['forms']:,}",
                r["search"],
                r["encode_qps"],
                r["path_qps"],
                f"{r['ratio']:.2f}",
                r["ratio_range"],
                f"{r['encode_cpu_ms']:.2f} | {r['path_cpu_ms']:.2f}",
                r["load"],
            ]
            for r in rows
        ],
    )
    report.out(
        "Best of each over the rounds; encode and path alternate within a round. Statuses: "
        + "; ".join(f"{r['catalog']} {r['statuses']}" for r in rows)
    )
    if args.save:
        args.out.write_text(report.text(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
