#!/usr/bin/env python
"""Micro-batching with the real MiniLM embedder: batched vs unbatched vs one big encode.

Part 3 of the governance benchmarks (``bench_governance.py`` runs every part); see
benchmarks/README.md for the target and how to read the table.

    python benchmarks/bench_microbatch.py            # full run
    python benchmarks/bench_microbatch.py --quick    # smaller N
    python benchmarks/bench_microbatch.py --save
        # also writes benchmarks/results/governance-microbatch.md
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import bench_common as common
from bench_common import (
    Report,
    load_catalog_rows,
    load_queries,
    log,
)

# ----------------------------------------------------------------------------- part 3


def _batches(matcher: Any) -> int:
    """Encoder batches so far (a private counter: 0 if the internals moved)."""
    runtime = getattr(matcher, "_runtime", None)
    return int(getattr(getattr(runtime, "batcher", None), "batches", 0) or 0)


def part_microbatch(rep: Report, args: argparse.Namespace, _catalog: list | None = None) -> None:
    from nem_llm import Matcher
    from nem_llm._retrieval.embedding import SentenceTransformerEmbedder
    from nem_llm._text import validate_query

    n = 512
    rounds = 1 if args.quick else 3
    catalog = load_catalog_rows(args.data, 300)
    texts = load_queries(args.data, n)
    rep.out("## 3. Micro-batching with the real MiniLM embedder (no LLM)")
    rep.out()
    rep.out(
        f"{n} concurrent `matcher.match_async(q)` calls (asyncio.gather), distinct queries "
        f"from languages_queries.jsonl, catalog of {len(catalog)} rows, no client, "
        "accept_threshold=0 and margin=0 (no LLM). Default micro-batcher (max_batch_size=64, "
        "max_wait=5 ms) vs `Matcher(..., batching=False)` vs one `embedder.encode(texts)` of "
        f"the same {n} texts (encode only: no search). Model loaded and warmed before timing; "
        f"{rounds} interleaved round(s), median. "
        "Targets: batched >= 4x unbatched, batched >= 0.7x one big encode."
    )
    rep.out()
    embedder = SentenceTransformerEmbedder()
    log("part 3: loading MiniLM")
    embedder.encode(["warm-up text"] * 64)

    async def main() -> dict[str, list[float]]:
        batched = Matcher(catalog, embedder=embedder, accept_threshold=0.0, margin=0.0)
        unbatched = Matcher(
            catalog, embedder=embedder, accept_threshold=0.0, margin=0.0, batching=False
        )
        await batched.fit_async()
        await unbatched.fit_async()
        times: dict[str, list[float]] = defaultdict(list)
        normalized = [validate_query(t) for t in texts]
        errors = 0
        try:
            for m in (batched, unbatched):  # warm both paths
                await asyncio.gather(*(m.match_async(t) for t in texts[:64]))
            for rnd in range(rounds):
                log(f"part 3: round {rnd + 1}")
                t0 = time.perf_counter()
                vecs = embedder.encode(texts)
                times["big encode"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                batched.index.search(vecs, normalized, batched.top_k)
                times["search"].append(time.perf_counter() - t0)
                for name, m in (("batched", batched), ("unbatched", unbatched)):
                    b0 = _batches(m)
                    t0 = time.perf_counter()
                    res = await asyncio.gather(*(m.match_async(t) for t in texts))
                    times[name].append(time.perf_counter() - t0)
                    errors += sum(1 for r in res if r.status == "error")
                    times[name + " batches"].append(float(_batches(m) - b0))
            times["errors"] = [float(errors)]
        finally:
            await batched.aclose()
            await unbatched.aclose()
        return times

    times = asyncio.run(main())
    times["big encode + search"] = [
        a + b for a, b in zip(times["big encode"], times["search"], strict=True)
    ]
    tput = {
        k: n / statistics.median(v)
        for k, v in times.items()
        if k in ("batched", "unbatched", "big encode", "big encode + search")
    }
    rows = []
    for name, desc in (
        ("batched", "match_async x512, micro-batched (default)"),
        ("unbatched", "match_async x512, batching=False"),
        ("big encode", "embedder.encode(512 texts), one call  (target baseline)"),
        ("big encode + search", "one encode + one index.search (no event loop; for reference)"),
    ):
        batches = times.get(name + " batches")
        rows.append(
            [
                desc,
                f"{statistics.median(times[name]):.3f}",
                f"{tput[name]:.0f}",
                f"{tput['batched'] / tput[name]:.2f}",
                f"{statistics.median(batches):.0f}" if batches else "-",
            ]
        )
    rep.table(["path", "wall s (median)", "texts/s", "batched / this", "encoder batches"], rows)
    x_unb = tput["batched"] / tput["unbatched"]
    x_big = tput["batched"] / tput["big encode"]
    errs = int(times["errors"][0])
    rep.check("3. micro-batching vs unbatched", ">= 4x", f"{x_unb:.2f}x", x_unb >= 4 and not errs)
    rep.check("3. micro-batching vs one big encode", ">= 0.7x", f"{x_big:.2f}x", x_big >= 0.7)


def main(argv: Sequence[str] | None = None) -> int:
    return common.main(
        argv,
        description=__doc__.split("\n\n")[0],
        parts={"3": part_microbatch},
        result_name="governance-microbatch",
    )


if __name__ == "__main__":
    sys.exit(main())
