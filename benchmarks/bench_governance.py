#!/usr/bin/env python
"""Governance benchmarks for nem_llm: strategies, per-call overhead, micro-batching, memory.

Runs offline. The LLM is the nem_llm simulator (``nem_llm.sim``) started in a separate
PROCESS, so its CPU never competes with the client's event loop for the GIL.

    python benchmarks/bench_governance.py            # full run (~5 minutes on 2 cores)
    python benchmarks/bench_governance.py --quick    # smaller N (~1.5 minutes)
    python benchmarks/bench_governance.py --save     # also write results/governance.md
    python benchmarks/bench_governance.py --parts 1,3 --transport httpx

Parts (targets in brackets; see benchmarks/README.md):

1. Strategy efficiency: makespan of gather / as_completed / sequential against a fake LLM
   with fixed latency L [makespan <= 1.10 x max(ceil(N/C) * L, N / rate)].
2. Governance overhead: client CPU per LLM call, the full Matcher path vs the raw openai
   client (and raw + instructor alone) at L=0 [ours <= 2.0 x raw]; a cProfile breakdown;
   and the transport (httpx vs aiohttp) throughput at several concurrencies.
3. Micro-batching with the real MiniLM embedder: 512 concurrent ``match_async`` calls,
   batched vs ``batching=False`` vs one big ``encode`` [>= 4x unbatched, >= 0.7x big encode].
4. Memory: 100k queries through ``match_stream_async`` (consumed and dropped) in a fresh
   child process [peak RSS growth over the built matcher < 300 MB]; ``match_batch_async``
   (returns the full list) for contrast.

Each part is also a script of its own: bench_strategies.py (1), bench_overhead.py (2),
bench_microbatch.py (3), bench_memory.py (4); helpers shared by all are in bench_common.py.

Timings on a shared 2-core machine are noisy: every comparison is a ratio of numbers
measured side by side in one run. Never assert these timings in tests.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import bench_common as common
from bench_memory import memory_args, memory_child_mode, part_memory
from bench_microbatch import part_microbatch
from bench_overhead import overhead_args, part_overhead
from bench_strategies import part_strategies


def _extra(ap: argparse.ArgumentParser) -> None:
    overhead_args(ap)
    memory_args(ap)


def main(argv: Sequence[str] | None = None) -> int:
    return common.main(
        argv,
        description=__doc__.split("\n\n")[0],
        parts={
            "1": part_strategies,
            "2": part_overhead,
            "3": part_microbatch,
            "4": part_memory,
        },
        result_name="governance",
        extra=_extra,
        special=memory_child_mode,
    )


if __name__ == "__main__":
    sys.exit(main())
