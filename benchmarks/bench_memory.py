#!/usr/bin/env python
"""Memory: 100k queries through match_stream_async vs match_batch_async, each in a fresh child.

Part 4 of the governance benchmarks (``bench_governance.py`` runs every part); see
benchmarks/README.md for the target and how to read the table.

    python benchmarks/bench_memory.py            # full run
    python benchmarks/bench_memory.py --quick    # smaller N
    python benchmarks/bench_memory.py --save
        # also writes benchmarks/results/governance-memory.md
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bench_common as common
from bench_common import (
    Report,
    load_catalog_rows,
    load_queries,
    log,
    make_matcher,
    query_stream,
)

# ----------------------------------------------------------------------------- part 4


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM (Linux >= 4.0: write 5 to clear_refs) so the peak is this run's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def memory_child(mode: str, n: int, data: Path) -> dict[str, Any]:
    """Runs in a fresh process: peak RSS of streaming (or batching) ``n`` queries."""
    catalog = load_catalog_rows(data, 300)
    base = load_queries(data, 5000)

    async def main() -> dict[str, Any]:
        matcher = make_matcher(catalog, accept_threshold=0.0, margin=0.0)  # no LLM
        await matcher.fit_async()
        await matcher.match_batch_async(base[:256])  # warm: imports, the batcher, the pool
        gc.collect()
        baseline_kb = _status_kb("VmRSS") or 0
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        reset = _reset_peak()
        t0 = time.perf_counter()
        count = 0
        if mode == "stream":
            async for _r in matcher.match_stream_async(
                query_stream(base, n), strategy="as_completed"
            ):
                count += 1  # consume and drop
        else:
            results = await matcher.match_batch_async(query_stream(base, n))
            count = len(results)
        wall = time.perf_counter() - t0
        end_kb = _status_kb("VmRSS") or 0
        hwm_kb = _status_kb("VmHWM") if reset else None
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        await matcher.aclose()
        peak_kb = hwm_kb if hwm_kb is not None else maxrss
        return {
            "mode": mode,
            "n": n,
            "count": count,
            "wall_s": wall,
            "baseline_mb": baseline_kb / 1024,
            "peak_mb": peak_kb / 1024,
            "end_mb": end_kb / 1024,
            "growth_mb": (peak_kb - baseline_kb) / 1024,
            "peak_reset": reset,
            "maxrss_before_mb": maxrss_before / 1024,
        }

    return asyncio.run(main())


def part_memory(rep: Report, args: argparse.Namespace, _catalog: list | None = None) -> None:
    n = 20_000 if args.quick else 100_000
    rep.out("## 4. Memory: streaming vs returning the full list (no LLM, FakeEmbedder)")
    rep.out()
    rep.out(
        f"{n:,} distinct queries from a lazy generator, catalog of 300 rows, no LLM "
        "(accept_threshold=0, margin=0), each mode in a fresh child process. Baseline = RSS "
        "after building the matcher's index and a warm-up; peak = VmHWM reset just before the "
        "run (falls back to ru_maxrss). Target: streaming peak RSS growth < 300 MB."
    )
    rep.out()
    rows = []
    got = {}
    for mode in ("stream", "batch"):
        log(f"part 4: {mode}, N={n:,} (child process)")
        proc = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--memory-child",
                mode,
                "--memory-n",
                str(n),
                "--data",
                str(args.data),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            rep.out(f"memory child {mode} failed:\n```\n{proc.stderr[-2000:]}\n```")
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        got[mode] = res
        api = (
            "match_stream_async(as_completed), consume+drop"
            if mode == "stream"
            else "match_batch_async (full list kept)"
        )
        rows.append(
            [
                api,
                f"{res['count']:,}",
                f"{res['wall_s']:.1f}",
                f"{res['count'] / res['wall_s']:.0f}",
                f"{res['baseline_mb']:.0f}",
                f"{res['peak_mb']:.0f}",
                f"{res['growth_mb']:.1f}",
                f"{1024 * 1024 * res['growth_mb'] / max(res['count'], 1):.0f}",
            ]
        )
    rep.table(
        [
            "API",
            "results",
            "wall s",
            "queries/s",
            "baseline RSS MB",
            "peak RSS MB",
            "growth MB",
            "bytes/query",
        ],
        rows,
    )
    s = got.get("stream")
    if s is None:
        rep.check("4. streaming peak RSS growth", "< 300 MB", "child failed", False)
    else:
        ok = s["growth_mb"] < 300 and s["count"] == n
        rep.check(
            f"4. streaming peak RSS growth (N={n:,})",
            "< 300 MB",
            f"{s['growth_mb']:.1f} MB ({s['count']:,} results)",
            ok,
        )


def main(argv: Sequence[str] | None = None) -> int:
    return common.main(
        argv,
        description=__doc__.split("\n\n")[0],
        parts={"4": part_memory},
        result_name="governance-memory",
        extra=memory_args,
        special=memory_child_mode,
    )


def memory_args(ap: argparse.ArgumentParser) -> None:
    """The hidden options of the child process that :func:`part_memory` starts."""
    ap.add_argument("--memory-child", choices=("stream", "batch"), help=argparse.SUPPRESS)
    ap.add_argument("--memory-n", type=int, default=100_000, help=argparse.SUPPRESS)


def memory_child_mode(args: argparse.Namespace) -> int | None:
    """In the child: measure, print the JSON, and stop (``None``: not a child)."""
    if not args.memory_child:
        return None
    print(json.dumps(memory_child(args.memory_child, args.memory_n, args.data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
