"""The routing model's cost and what it decides, beside the thresholds alone.

For each set: a random half of the labelled queries (seed 0) calibrates thresholds
(``estimate`` on labels, as ``fit`` does when the labels decide both routes) and fits the
routing model (``with_route_model``); the other half is routed twice, by the thresholds
alone and with the model, in alternating rounds so both see the same machine. Rows:
seconds to fit the model, routing time per query (the model is consulted only for
queries the thresholds leave to the LLM), the ratio, retrieval time per query (batched,
for scale), and per variant the share decided
without the LLM and the precision measured on the evaluated half.

Usage: ``python benchmarks/bench_route_model.py [--data ../shared/data] [--sets ...]
[--save]`` (results in ``benchmarks/results/route-model.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path

from nem_llm._retrieval.calibration import Example, estimate, labelled_examples, with_route_model
from nem_llm._retrieval.route_model import RouteModel
from nem_llm._retrieval.routing import route
from nem_llm.catalog import load_catalog
from nem_llm.config import Thresholds
from nem_llm.matcher import Matcher
from nem_llm.models import Candidate

HERE = Path(__file__).resolve().parent
DESCRIPTION = {"restaurants": True, "dblp_acm": True, "febrl4": True, "languages": False}


def _route_all(
    found: list[list[Candidate]], queries: list[str], t: Thresholds, model: RouteModel | None
) -> tuple[float, list[str]]:
    started = time.perf_counter()
    kinds = [route(c, t, q, model).kind for c, q in zip(found, queries, strict=True)]
    return time.perf_counter() - started, kinds


def _quality(kinds: list[str], examples: list[Example]) -> tuple[float, float, float]:
    """(decided share, auto-accept precision, auto-novel precision) on labelled examples."""
    acc = [e for k, e in zip(kinds, examples, strict=True) if k == "matched"]
    nov = [e for k, e in zip(kinds, examples, strict=True) if k == "novel"]
    p_acc = sum(e.top_is_right for e in acc) / len(acc) if acc else float("nan")
    p_nov = sum(e.absent for e in nov) / len(nov) if nov else float("nan")
    return (len(acc) + len(nov)) / len(kinds), p_acc, p_nov


async def run_set(data: Path, name: str, rounds: int) -> list[str]:
    text = (data / f"{name}_queries.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    queries = [r["query"] for r in rows]
    golds = [r["gold_id"] for r in rows]
    catalog = load_catalog(data / f"{name}_catalog.jsonl", include_description=DESCRIPTION[name])
    async with Matcher(catalog, llm=False) as matcher:
        await matcher.fit_async()
        started = time.perf_counter()
        found = await matcher.retrieve_async(queries, top_k=matcher.top_k)
        retrieval_ms = (time.perf_counter() - started) / len(queries) * 1e3
    examples = labelled_examples(found, queries, golds)
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    half = len(order) // 2
    train = [examples[i] for i in order[:half]]
    test = sorted(order[half:])
    started = time.perf_counter()
    cal, model = with_route_model(estimate(train, source="labels"), train)
    fit_s = time.perf_counter() - started
    t = Thresholds.from_calibration(cal)
    f_test = [found[i] for i in test]
    q_test = [queries[i] for i in test]
    e_test = [examples[i] for i in test]
    alone = with_model = 0.0
    kinds_alone: list[str] = []
    kinds_model: list[str] = []
    for _ in range(rounds):  # alternate, so both variants see the same machine
        dt, kinds_alone = _route_all(f_test, q_test, t, None)
        alone += dt
        dt, kinds_model = _route_all(f_test, q_test, t, model)
        with_model += dt
    n = len(test) * rounds
    out = []
    for label, seconds, kinds in (
        ("thresholds alone", alone, kinds_alone),
        ("with the routing model", with_model, kinds_model),
    ):
        decided, p_acc, p_nov = _quality(kinds, e_test)
        ratio = seconds / alone if alone else float("nan")
        out.append(
            f"| {name} | {label} | {len(train)} | {fit_s if model else 0:.1f} | "
            f"{seconds / n * 1e3:.3f} | {ratio:.1f}x | {retrieval_ms:.2f} | {decided:.3f} | "
            f"{p_acc:.3f} | {p_nov:.3f} |"
        )
    print(f"{name}: {cal.routing_model}", flush=True)
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--sets", nargs="*", default=["languages", "febrl4"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    lines = [
        f"Load average before: {os.getloadavg()[0]:.2f}. Labelled half: seed 0.",
        "",
        "| set | routing | labels | model fit s | routing ms per query | vs thresholds "
        "| retrieval ms per query | decided without LLM | auto-accept P | auto-novel P |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in args.sets:
        lines.extend(await run_set(args.data, name, args.rounds))
    lines.append(f"\nLoad average after: {os.getloadavg()[0]:.2f}.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.save:
        (HERE / "results" / "route-model.md").write_text(text, encoding="utf-8")


if __name__ == "__main__":
    asyncio.run(main())
