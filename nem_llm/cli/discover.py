"""``nem-llm discover``: cluster novel rows and propose new entities."""

from __future__ import annotations

import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import NemLLMError
from ._app import app, as_coro, fail, run, say


class MethodOpt(StrEnum):
    agglomerative = "agglomerative"
    hdbscan = "hdbscan"


@app.command()
def discover(
    catalog: Annotated[Path, typer.Option(help="The catalog (JSONL to --promote into).")],
    results: Annotated[
        Path | None,
        typer.Option(help="Results of `nem-llm match`: JSONL, or Parquet (.parquet)."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Proposals JSONL to write.")] = None,
    promote: Annotated[
        Path | None,
        typer.Option(help="Add the approved proposals of this file to the catalog, then stop."),
    ] = None,
    model: Annotated[str, typer.Option(help="The chat model that names the clusters.")] = (
        "gpt-4o-mini"
    ),
    base_url: Annotated[
        str | None, typer.Option(help="OpenAI-compatible endpoint (default: OPENAI_BASE_URL).")
    ] = None,
    concurrency: Annotated[int, typer.Option(help="LLM calls in flight.")] = 8,
    rpm: Annotated[float | None, typer.Option(help="Requests per minute cap.")] = None,
    tpm: Annotated[float | None, typer.Option(help="Tokens per minute cap.")] = None,
    budget_usd: Annotated[float | None, typer.Option(help="Stop LLM calls past this.")] = None,
    budget_tokens: Annotated[int | None, typer.Option(help="Stop LLM calls past this.")] = None,
    timeout: Annotated[float, typer.Option(help="Seconds per LLM attempt.")] = 60.0,
    max_attempts: Annotated[int, typer.Option(help="Attempts per LLM call.")] = 5,
    method: Annotated[MethodOpt, typer.Option(help="Clustering method.")] = (
        MethodOpt.agglomerative
    ),
    threshold: Annotated[
        float, typer.Option(help="Largest distance inside a cluster (agglomerative).")
    ] = 0.4,
    min_size: Annotated[int, typer.Option(help="Drop clusters with fewer mentions.")] = 2,
    lexical_weight: Annotated[
        float, typer.Option(help="Weight of character n-grams vs embeddings.")
    ] = 0.7,
    cache: Annotated[
        Path | None, typer.Option(help="Proposal cache (default: <out>.cache.sqlite).")
    ] = None,
    state: Annotated[
        Path | None,
        typer.Option(help="With --promote: the match job's state dir (its index is reset)."),
    ] = None,
) -> None:
    """Cluster the novel rows and ask the LLM for a proposed entity per cluster."""
    from .._jobs import discovery as d

    if promote is not None:
        summary = run(lambda: as_coro(lambda: d.promote(promote, catalog, state=state)))
        if summary.index_removed is not None:
            index_note = (
                f"removed the saved index {summary.index_removed}: the next `nem-llm "
                "match` rebuilds it for the changed catalog"
            )
        else:
            index_note = (
                "a match job's saved index is for the old catalog: pass --state "
                "<out>.state to remove it (or match with a new --state)"
            )
        say(
            f"catalog {catalog}: {summary.added} entities added, {summary.aliases_added} "
            f"aliases added to existing ones, {summary.skipped} proposals not approved; "
            + index_note
        )
        return
    if results is None or out is None:
        raise fail("--results and --out are needed (or --promote PROPOSALS)")
    limits = _limits_of(
        concurrency=concurrency,
        rpm=rpm,
        tpm=tpm,
        timeout=timeout,
        max_attempts=max_attempts,
        budget_usd=budget_usd,
        budget_tokens=budget_tokens,
    )
    try:
        config = d.ClusterConfig(
            method=method.value,
            threshold=threshold,
            min_size=min_size,
            lexical_weight=lexical_weight,
        )
    except NemLLMError as exc:
        raise fail(str(exc)) from None

    async def main() -> Any:
        from openai import AsyncOpenAI

        url = base_url or os.environ.get("OPENAI_BASE_URL")
        key = os.environ.get("OPENAI_API_KEY")
        client = None
        if url or key:
            client = AsyncOpenAI(base_url=url, api_key=key or "not-needed", max_retries=0)
        try:
            rows = await d.discover_async(
                results,
                catalog=catalog,
                client=client,
                model=model,
                limits=limits,
                config=config,
                cache=cache or out.with_name(out.name + ".cache.sqlite"),
            )
        finally:
            if client is not None:
                await client.close()
        d.write_proposals(rows, out)
        return rows

    rows = run(main)
    by_status: dict[str, int] = {}
    for row in rows:
        by_status[row.status] = by_status.get(row.status, 0) + 1
    parts = ", ".join(f"{n} {s}" for s, n in sorted(by_status.items()))
    tokens = sum(r.usage.total_tokens for r in rows)
    say(
        f"{len(rows)} clusters ({parts or 'none'}), {sum(r.llm_calls for r in rows)} LLM "
        f'calls, {tokens:,} tokens: {out}; set "approved": true on the ones to keep, '
        "then `nem-llm discover --promote`"
    )


def _limits_of(**kwargs: Any) -> Any:
    from ..config import Limits

    try:
        return Limits(**{k: v for k, v in kwargs.items() if v is not None})
    except NemLLMError as exc:
        raise fail(str(exc)) from None
