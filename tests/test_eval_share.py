"""nem-llm eval retrieves once per query: the matching's own retrieval, widened to the
recall columns' k, gives the same matching and the same recall lists as apart."""

from __future__ import annotations

from typing import Any

import pytest

from nem_llm._matching.pipeline import tapped
from nem_llm.matcher import Matcher
from nem_llm.models import MatchResult
from nem_llm.testing import FakeEmbedder


@pytest.fixture(autouse=True)
def no_llm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def _same(result: MatchResult) -> dict[str, Any]:
    return result.model_dump(exclude={"latency_s"})


async def test_a_tapped_batch_matches_alike_and_keeps_the_wide_retrieval() -> None:
    entities = [{"id": f"p{i}", "name": f"Product {i % 40}"} for i in range(80)]  # twins
    queries = ["product 3", "Product 12", "item 7", "product 39", "nothing like it"]
    async with Matcher(entities, embedder=FakeEmbedder(), top_k=5, llm=False) as matcher:
        await matcher.fit_async()
        plain = await matcher.match_batch_async(queries, batch_size=2)
        with tapped(50) as tap:
            shared = await matcher.match_batch_async(queries, batch_size=2)
        apart = await matcher.retrieve_async(queries, top_k=50)
    assert [_same(r) for r in shared] == [_same(r) for r in plain]
    assert sorted(tap.found) == list(range(len(queries)))
    for i, result in enumerate(shared):
        wide = tap.found[i]
        assert len(wide) == 50
        assert [c.entity_id for c in wide] == [c.entity_id for c in apart[i]]
        assert [c.entity_id for c in wide[:5]] == [c.entity_id for c in result.candidates]
