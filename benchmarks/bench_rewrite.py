"""LLM query rewriting on ``languages``: what it recovers, at what oracle error, for how many calls.

The simulator's oracle answers every call (adjudication and rewrite) from the gold labels,
wrong at its error rate, so these figures measure the plumbing, never a model. Rows:

- misses: evaluated queries with a gold entity that the first retrieval's top-k missed;
- reachable: those misses not auto-matched by retrieval alone (an exact hit on another
  entity's name is decided before any LLM call, so no rewrite can reach it);
- sent to rewrite: the misses the rewrite path ran for (the LLM answered "none", which
  with rewriting on carries the names it expects, or retrieval alone called them novel);
- recovered: misses whose final answer is the gold entity (the issue's figure), and the
  same share among the misses sent to rewrite;
- bound: what a pipeline that loses nothing else reaches: a reachable miss needs one right
  answer (the "none" with the entity's name; that name then routes to a match without a
  second call when it is an exact hit), right with probability ``1 - error``;
- rewritten right: of the queries the rewrite matched, the share matched to the gold;
- LLM calls per query: successful LLM answers (adjudications and rewrites) per evaluated
  query, with rewriting off and on.

Usage: ``python benchmarks/bench_rewrite.py [--data ../shared/data] [--limit 1500]``
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from nem_llm import MatcherSettings
from nem_llm._jobs.eval_job import run_eval
from nem_llm.models import MatchResult


def _calls(results: list[tuple[MatchResult, str | None]]) -> int:
    return sum(1 for r, _ in results for a in r.attempts if a.outcome == "ok")


async def _run(
    data: Path, index: Path, limit: int, error: float, rewrite: bool
) -> list[tuple[MatchResult, str | None]]:
    kept: list[tuple[MatchResult, str | None]] = []
    await run_eval(
        catalog=data / "languages_catalog.jsonl",
        queries=data / "languages_queries.jsonl",
        settings=MatcherSettings(rewrite=rewrite, index_dir=index),
        llm="sim",
        oracle_error_rate=error,
        limit=limit,
        keep_results=kept,
    )
    return kept


async def main(data: Path, limit: int, errors: list[float]) -> str:
    """Run the rewrite eval at each oracle error rate and return the markdown table."""
    rows = [
        "| oracle error | queries | misses | reachable | sent to rewrite | recovered "
        "| recovered of sent | bound (1-e) x reachable | rewritten right "
        "| LLM calls/query off | on | extra | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        index = Path(tmp) / "index"
        for error in errors:
            started = time.perf_counter()
            off = await _run(data, index, limit, error, rewrite=False)
            on = await _run(data, index, limit, error, rewrite=True)
            wall = time.perf_counter() - started
            top_k = 5
            misses = [
                i
                for i, (r, gold) in enumerate(on)
                if gold is not None
                and gold not in {c.entity_id for c in off[i][0].candidates[:top_k]}
            ]
            reachable = [i for i in misses if off[i][0].decided_by != "embedding"
                         or off[i][0].status != "matched"]  # fmt: skip
            sent = [i for i in misses if on[i][0].rewritten_as or _asked(on[i][0])]
            rewritten = [i for i, (r, _) in enumerate(on) if r.rewritten_as and r.entity_id]
            right = sum(1 for i in rewritten if on[i][0].entity_id == on[i][1])
            recovered = [i for i in misses if on[i][0].entity_id == on[i][1]]
            rec_sent = [i for i in sent if on[i][0].entity_id == on[i][1]]
            n = len(on)
            calls_off, calls_on = _calls(off) / n, _calls(on) / n
            bound = (1 - error) * len(reachable) / max(len(misses), 1)
            rows.append(
                f"| {error:g} | {n} | {len(misses)} | {len(reachable)} | {len(sent)} "
                f"| {len(recovered) / max(len(misses), 1):.3f} "
                f"| {len(rec_sent) / max(len(sent), 1):.3f} | {bound:.3f} "
                f"| {right}/{len(rewritten)} "
                f"| {calls_off:.3f} | {calls_on:.3f} | {calls_on - calls_off:+.3f} | {wall:.0f} |"
            )
    return "\n".join(rows)


def _asked(result: MatchResult) -> bool:
    """The rewrite path ran (its reason says so even when it named nothing new)."""
    reason = result.reason or ""
    return "rewrit" in reason or "no other name" in reason


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).parents[2] / "shared/data")
    parser.add_argument("--limit", type=int, default=1500)
    parser.add_argument("--errors", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    table = asyncio.run(main(args.data, args.limit, args.errors))
    print(table)
    if args.out is not None:
        args.out.write_text(
            f"languages, first {args.limit} queries, simulator oracle (plumbing, not a model)"
            f"\n\n{table}\n"
        )
