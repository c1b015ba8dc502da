"""Routes on the development sets: label-free, calibrated on an LLM-labelled workload sample,
with labels on half, against sending every query to the LLM (issue 22's table).

Usage: python benchmarks/eval_routes.py [--data DIR] [--sets ...] [--limit N] [--out FILE]

Per set, rows (the simulator's oracle is plumbing, not a model: its errors fall on
ambiguous queries, ``--oracle-error-profile difficulty``):

- ``off``: no LLM, no labels (probes of the catalog, structural guards);
- ``sim e, 200 labels``: the LLM labels a stratified sample of 200 workload queries at fit
  (counted in the LLM share and the tokens), oracle error e = 2% and 10%;
- ``sim e, all to LLM``: every query to the LLM (accept > 1, novel 0), the baseline;
- ``off, labels on half``: calibrated on a seeded half, evaluated on the other.

Columns: auto-accept precision and coverage, auto-novel precision and coverage, accuracy,
LLM share (the sample included), tokens. Record sets run as records (their fields).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from pathlib import Path

from nem_llm import MatcherSettings
from nem_llm._jobs.eval_job import run_eval
from nem_llm._jobs.evaluation import EvalReport

SETS = {  # set -> (catalog, queries): record sets as records
    "restaurants": ("restaurants_records_catalog.jsonl", "restaurants_records_queries.jsonl"),
    "dblp_acm": ("dblp_acm_records_catalog.jsonl", "dblp_acm_records_queries.jsonl"),
    "febrl4": ("febrl4_records_catalog.jsonl", "febrl4_records_queries.jsonl"),
    "languages": ("languages_catalog.jsonl", "languages_queries.jsonl"),
}
RECORDS = {"restaurants", "dblp_acm", "febrl4"}
# (label, llm, oracle error, label budget, all to the LLM, labelled share)
RUNS = [
    ("off", "off", 0.0, 0, False, 0.0),
    ("sim 2%, 200 labels", "sim", 0.02, 200, False, 0.0),
    ("sim 10%, 200 labels", "sim", 0.10, 200, False, 0.0),
    ("sim 2%, all to LLM", "sim", 0.02, 0, True, 0.0),
    ("sim 10%, all to LLM", "sim", 0.10, 0, True, 0.0),
    ("off, labels on half", "off", 0.0, 0, False, 0.5),
]


def _sample(path: Path, limit: int | None, tmp: Path) -> Path:
    """A seeded sample of ``limit`` queries (the whole file when it has fewer)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if limit is None or len(lines) <= limit:
        return path
    rows = random.Random(0).sample(lines, limit)
    out = tmp / path.name
    out.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return out


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).parents[2] / "shared" / "data")
    parser.add_argument("--sets", nargs="*", default=list(SETS))
    parser.add_argument("--limit", type=int, default=3000, help="queries per set (seeded)")
    parser.add_argument("--runs", nargs="*", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "routes.md")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="eval-routes-"))
    lines = [
        f"`python benchmarks/eval_routes.py --limit {args.limit}`; load {os.getloadavg()[0]:.1f}"
        " at start; the simulator's oracle (difficulty profile) is plumbing, not a model",
        "",
        "| set | run | queries | auto-accept P | cov | auto-novel P | cov | accuracy "
        "| LLM share | tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    runs = [RUNS[i] for i in args.runs] if args.runs else RUNS
    for name in args.sets:
        catalog_file, queries_file = SETS[name]
        queries = _sample(args.data / queries_file, args.limit, tmp)
        for label, llm, error, budget, all_llm, share in runs:
            started = time.perf_counter()
            settings = MatcherSettings(
                index_description=name in RECORDS,
                label_budget=budget,
                audit_rate=0.0,
                **({"accept_threshold": 1.5, "novel_threshold": 0.0} if all_llm else {}),
            )
            report: EvalReport = await run_eval(
                catalog=args.data / catalog_file,
                queries=queries,
                settings=settings,
                llm=llm,
                oracle_error_rate=error,
                oracle_error_profile="difficulty",
                calibrate_fraction=share,
                name=name,
            )
            row = (
                f"| {name} | {label} | {report.queries} | "
                f"{_fmt(report.auto_accept_precision)} | {report.auto_accept_coverage:.3f} | "
                f"{_fmt(report.auto_novel_precision)} | {report.auto_novel_coverage:.3f} | "
                f"{report.accuracy:.3f} | {report.llm_share:.3f} | {report.tokens} |"
            )
            lines.append(row)
            print(row, f"({time.perf_counter() - started:.0f} s)", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(json.dumps({"written": str(args.out)}))


if __name__ == "__main__":
    asyncio.run(main())
