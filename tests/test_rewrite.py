"""LLM query rewriting: a mention retrieval missed is rewritten once into the catalog's
names, retrieved again and adjudicated again; cached; at most one extra call per query.
Against the simulator's oracle over real HTTP (it measures the plumbing, not a model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest

from nem_llm.matcher import Matcher
from nem_llm.sim import SimConfig, SimServer
from nem_llm.testing import FakeEmbedder

ENTITIES: list[dict[str, Any]] = [
    {"id": "DE", "name": "Germany"},
    {"id": "GR", "name": "Greece"},
    {"id": "FI", "name": "Finland"},
    {"id": "HU", "name": "Hungary"},
    {"id": "JP", "name": "Japan"},
    {"id": "CN", "name": "China"},
]
GOLD = [
    {"query": "Bundesrepublik", "gold_id": "DE"},  # shares nothing with "Germany"
    {"query": "Suomi", "gold_id": "FI"},
    {"query": "Atlantis", "gold_id": None},
]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
async def sim(tmp_path: Path) -> Any:
    config = SimConfig(
        policy="oracle",
        gold_path=_jsonl(tmp_path / "gold.jsonl", GOLD),
        catalog_path=_jsonl(tmp_path / "catalog.jsonl", ENTITIES),
        oracle_error_rate=0.0,
        seed=1,
    )
    async with SimServer(config) as server:
        yield server


@pytest.fixture
async def client(sim: Any) -> Any:
    async with openai.AsyncOpenAI(base_url=sim.base_url, api_key="sim", max_retries=0) as c:
        yield c


def _matcher(client: Any, cache: str | None = None, **extra: Any) -> Matcher:
    options: dict[str, Any] = {"accept_threshold": 1.01, "novel_threshold": 0.0, **extra}
    return Matcher(
        ENTITIES,
        client=client,
        model="nem-llm-sim",
        embedder=FakeEmbedder(),
        top_k=2,  # so the gold entity is not among the first candidates
        rewrite=True,
        cache=cache,
        **options,
    )


async def test_a_missed_mention_is_rewritten_retrieved_again_and_matched(
    sim: Any, client: Any
) -> None:
    async with _matcher(client) as m:  # an audit (accept > 1): the LLM sees every match
        await m.fit_async()
        first = await m.match_async("Bundesrepublik")
    assert first.status == "matched" and first.entity_id == "DE"
    assert first.rewritten_as == ["Germany"]
    assert first.reason.startswith("rewritten as ['Germany']")
    # adjudicate (none of the 2 candidates; the names come with the "none"), adjudicate again
    assert [r.kind for r in sim.requests] == ["ok", "ok"]
    assert len(first.attempts) == 2 and first.usage.total_tokens > 0


async def test_a_rewritten_name_that_routes_to_a_match_needs_no_second_call(
    sim: Any, client: Any
) -> None:
    async with _matcher(client, accept_threshold=0.99) as m:  # exact hits are auto-matched
        await m.fit_async()
        result = await m.match_async("Bundesrepublik")
    assert (result.status, result.entity_id, result.decided_by) == ("matched", "DE", "llm")
    assert result.rewritten_as == ["Germany"]
    # routed to a match by the name (an exact hit of one entity's name), not by the LLM
    assert result.reason == (
        "rewritten as ['Germany']: the query is a name or alias of 'DE' and of no other candidate"
    )
    assert len(sim.requests) == 1 and len(result.attempts) == 1


async def test_a_query_routed_novel_without_the_llm_gets_one_rewrite_call(
    sim: Any, client: Any
) -> None:
    async with _matcher(client, accept_threshold=0.99, novel_threshold=0.999) as m:
        await m.fit_async()
        result = await m.match_async("Bundesrepublik")
    assert (result.status, result.entity_id, result.rewritten_as) == ("matched", "DE", ["Germany"])
    # retrieval alone called it novel: the rewrite call, then an adjudication of its names
    # (the LLM named them without judging any candidate)
    assert len(sim.requests) == 2 and len(result.attempts) == 2


async def test_an_absent_entity_stays_novel_after_at_most_one_rewrite(
    sim: Any, client: Any
) -> None:
    async with _matcher(client) as m:
        await m.fit_async()
        result = await m.match_async("Atlantis")
    assert result.status == "novel" and result.entity_id is None
    assert "no other name" in result.reason  # the oracle answers no names for absent gold
    assert len(sim.requests) == 1  # the adjudication, whose "none" carried no name


async def test_rewrites_are_cached(sim: Any, client: Any, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache.sqlite")
    async with _matcher(client, cache=cache) as m:
        await m.fit_async()
        await m.match_async("Suomi")
    calls = len(sim.requests)
    async with _matcher(client, cache=cache) as again:
        await again.fit_async()
        result = await again.match_async("Suomi")
    assert result.entity_id == "FI" and result.rewritten_as == ["Finland"]
    assert len(sim.requests) == calls  # every decision and the rewrite came from the cache
