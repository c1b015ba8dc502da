"""Run ``nem-llm eval`` over every labelled set in ../shared/data and print one table.

Usage: python benchmarks/eval_all.py [--data DIR] [--out benchmarks/results/eval.md]

Per set: LLM off with default thresholds; LLM off with thresholds calibrated on a random
half (target precision 0.99; the other half is evaluated); and the simulator's oracle
(right 90% of the time: a simulator, not a model) with the same calibration.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

from nem_llm.jobs.eval_job import run_eval
from nem_llm.jobs.evaluation import EvalReport, render_eval_table

SETS = {  # set -> index "name, description" too (record-like catalogs)
    "restaurants": True,
    "dblp_acm": True,
    "febrl4": True,
    "languages": False,
}
RUNS = [("off", 0.0), ("off", 0.5), ("sim", 0.5)]


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path(__file__).parents[2] / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "eval.md")
    parser.add_argument("--sets", nargs="*", default=list(SETS))
    args = parser.parse_args()
    reports: list[EvalReport] = []
    for name in args.sets:
        for llm, frac in RUNS:
            started = time.perf_counter()
            report = await run_eval(
                catalog=args.data / f"{name}_catalog.jsonl",
                queries=args.data / f"{name}_queries.jsonl",
                llm=llm,
                oracle_error_rate=0.1,
                index_description=SETS[name],
                calibrate_fraction=frac,
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
