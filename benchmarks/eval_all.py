"""Run ``nem-llm eval`` over every labelled set in ../shared/data and print one table.

Usage: python benchmarks/eval_all.py [--data DIR] [--out benchmarks/results/eval.md]

Per set, four rows: without labels (thresholds estimated from probes of the catalog) and
with labels on a random half (seed 0; the other half is evaluated), each with the LLM off
and with the simulator's oracle (right 90% of the time: it measures the plumbing, not a
model). Targets: 0.99 auto-match precision, 0.95 auto-novel precision.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from nem_llm import MatcherSettings
from nem_llm._jobs.eval_job import run_eval
from nem_llm._jobs.evaluation import EvalReport, render_eval_table

SETS = {  # set -> index "name, description" too (record-like catalogs)
    "restaurants": True,
    "dblp_acm": True,
    "febrl4": True,
    "languages": False,
}
RUNS = [  # (llm, labelled share, fit mode)
    ("off", 0.0, "zero-shot"),
    ("sim", 0.0, "zero-shot"),
    ("off", 0.5, "zero-shot"),
    ("sim", 0.5, "zero-shot"),
    ("off", 0.5, "aliases"),
    ("sim", 0.5, "aliases"),
]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path(__file__).parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval.md")
    parser.add_argument("--sets", nargs="*", default=list(SETS))
    parser.add_argument(
        "--runs", nargs="*", type=int, help="indexes into RUNS (default: all)", default=None
    )
    args = parser.parse_args()
    reports: list[EvalReport] = []
    for name in args.sets:
        for llm, frac, mode in [RUNS[i] for i in args.runs] if args.runs else RUNS:
            started = time.perf_counter()
            report = await run_eval(
                catalog=args.data / f"{name}_catalog.jsonl",
                queries=args.data / f"{name}_queries.jsonl",
                settings=MatcherSettings(index_description=SETS[name]),
                llm=llm,
                oracle_error_rate=0.1,
                calibrate_fraction=frac,
                mode=mode,
                seed=0,
                name=name,
            )
            reports.append(report)
            print(
                render_eval_table([report]).splitlines()[-1],
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
    table = render_eval_table(reports)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    asyncio.run(main())
