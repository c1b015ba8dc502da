"""The Matcher's public contract: async API, its sync twins, batches, bad input, readiness."""

from __future__ import annotations

import asyncio
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import openai
import pytest
import respx

from nem_llm.errors import NemLLMError, NotReadyError, QueryError
from nem_llm.matcher import Matcher
from nem_llm.models import DecidedBy, Entity, MatchResult, MatchStatus, RunStats
from nem_llm.testing import FakeEmbedder, FakeLLM

LLM_BASE = "http://llm.test/v1"
LIMIT = 50  # max_query_chars in these tests


# fixed thresholds (the defaults before label-free calibration): these tests are about the
# API's mechanics; a 5-entity catalog is too small for the estimate to open a route
FIXED: dict[str, Any] = {"accept_threshold": 0.92, "margin": 0.05, "novel_threshold": 0.45}


@pytest.fixture(autouse=True)
def no_llm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


@pytest.fixture
async def matcher(countries: list[dict[str, Any]]) -> AsyncIterator[Matcher]:
    """A fitted matcher, used through its async API."""
    async with Matcher(countries, embedder=FakeEmbedder(), max_query_chars=LIMIT, **FIXED) as m:
        await m.fit_async()
        yield m


@pytest.fixture
async def unfitted(countries: list[dict[str, Any]]) -> AsyncIterator[Matcher]:
    async with Matcher(countries, embedder=FakeEmbedder()) as m:
        yield m


@pytest.fixture
def sync_matcher(countries: list[dict[str, Any]]) -> Iterator[Matcher]:
    """An unfitted matcher for the sync twins; closed with close()."""
    m = Matcher(countries, embedder=FakeEmbedder(), **FIXED)
    yield m
    m.close()


# -- match_async ---------------------------------------------------------------------------


async def test_match_async_of_a_string_returns_one_match_result(matcher: Matcher) -> None:
    result = await matcher.match_async("USA")
    assert isinstance(result, MatchResult)
    assert (result.query, result.index, result.status) == ("USA", 0, "matched")
    assert (result.entity_id, result.entity_name) == ("US", "United States")
    assert result.score == 1.0 and result.decided_by == "embedding"
    assert result.candidates[0].entity_id == "US" and result.error is None


async def test_match_async_of_a_list_returns_a_list_in_input_order(matcher: Matcher) -> None:
    results = await matcher.match_async(["zzzz", "USA", "Deutschland"])
    assert [(r.index, r.query, r.status) for r in results] == [
        (0, "zzzz", "novel"),
        (1, "USA", "matched"),
        (2, "Deutschland", "matched"),
    ]


async def test_match_async_normalizes_whitespace_before_matching(matcher: Matcher) -> None:
    result = await matcher.match_async("  Deutschland \n")
    assert (result.query, result.entity_id) == ("  Deutschland \n", "DE")


async def test_top_k_limits_the_candidates(matcher: Matcher) -> None:
    assert len((await matcher.match_async("United")).candidates) == 5  # top_k defaults to 5
    assert len((await matcher.match_async("United", top_k=2)).candidates) == 2
    [result] = await matcher.match_batch_async(["United"], top_k=3)
    assert len(result.candidates) == 3


async def test_entities_may_be_entity_models(countries: list[dict[str, Any]]) -> None:
    entities = [Entity(**row) for row in countries]
    async with Matcher(entities, embedder=FakeEmbedder()) as m:
        await m.fit_async()
        assert (await m.match_async("Österreich")).entity_id == "AT"


def test_match_status_and_decided_by_vocabularies() -> None:
    assert set(typing.get_args(MatchStatus)) == {"matched", "novel", "review", "error"}
    assert set(typing.get_args(DecidedBy)) == {"embedding", "llm", "cache", "human"}
    fields = set(MatchResult.model_fields)
    assert {
        "query",
        "index",
        "status",
        "entity_id",
        "score",
        "decided_by",
        "candidates",
        "reason",
        "usage",
        "attempts",
        "error",
    } <= fields


# -- match_batch_async ---------------------------------------------------------------------


async def test_match_batch_async_returns_one_result_per_query_in_input_order(
    matcher: Matcher,
) -> None:
    queries = ["USA", "zzzz", "United", "Austria"] * 25
    results = await matcher.match_batch_async(queries, batch_size=8)
    assert [r.index for r in results] == list(range(100))
    assert [r.query for r in results] == queries
    assert [r.status for r in results[:4]] == ["matched", "novel", "review", "matched"]


async def test_match_batch_async_reports_progress_after_each_result(matcher: Matcher) -> None:
    seen: list[tuple[int, int | None]] = []
    await matcher.match_batch_async(
        ["USA", "zzzz", "Austria"], on_progress=lambda done, total: seen.append((done, total))
    )
    assert seen == [(1, 3), (2, 3), (3, 3)]


async def test_match_batch_async_awaits_an_async_progress_callback(matcher: Matcher) -> None:
    seen: list[int] = []

    async def on_progress(done: int, total: int | None) -> None:
        await asyncio.sleep(0)
        seen.append(done)

    await matcher.match_batch_async(["USA", "zzzz"], on_progress=on_progress)
    assert seen == [1, 2]


async def test_progress_total_is_none_for_an_input_without_a_length(matcher: Matcher) -> None:
    seen: list[tuple[int, int | None]] = []
    results = await matcher.match_batch_async(
        (q for q in ["USA", "Austria"]), on_progress=lambda d, t: seen.append((d, t))
    )
    assert [r.entity_id for r in results] == ["US", "AT"]
    assert seen == [(1, None), (2, None)]


async def test_match_batch_async_records_run_stats(matcher: Matcher) -> None:
    await matcher.match_batch_async(["USA", "zzzz", "", "Austria"])
    stats = matcher.last_run_stats
    assert isinstance(stats, RunStats)
    assert stats.total == 4
    assert stats.by_status == {"matched": 2, "novel": 1, "error": 1}
    assert stats.llm_calls == 0


# -- bad queries ---------------------------------------------------------------------------

BAD_QUERIES = [
    pytest.param("", "query is empty", id="empty"),
    pytest.param(" \t\n ", "query is empty", id="whitespace"),
    pytest.param(42, "must be a string, got int", id="int"),
    pytest.param(None, "must be a string, got NoneType", id="none"),
    pytest.param("x" * (LIMIT + 1), f"limit {LIMIT}", id="too-long"),
    pytest.param("bad \udcff surrogate", "invalid character", id="surrogate"),
]


@pytest.mark.parametrize(("query", "why"), BAD_QUERIES)
async def test_a_bad_single_query_raises_query_error(
    matcher: Matcher, query: Any, why: str
) -> None:
    with pytest.raises(QueryError, match=why):
        await matcher.match_async(query)


@pytest.mark.parametrize(("query", "why"), BAD_QUERIES)
async def test_a_bad_query_in_a_batch_is_an_error_record_and_the_rest_match(
    matcher: Matcher, query: Any, why: str
) -> None:
    first, bad, last = await matcher.match_batch_async(["USA", query, "Austria"])
    assert (first.status, first.entity_id) == ("matched", "US")
    assert (last.status, last.entity_id) == ("matched", "AT")
    assert (bad.index, bad.status, bad.entity_id) == (1, "error", None)
    assert bad.error_type == "input"
    assert bad.error is not None and why in bad.error and "queries[1]" in bad.error


async def test_a_bad_query_in_a_list_given_to_match_async_is_an_error_record(
    matcher: Matcher,
) -> None:
    results = await matcher.match_async(["USA", ""])
    assert [r.status for r in results] == ["matched", "error"]


async def test_a_query_of_exactly_max_query_chars_is_accepted(matcher: Matcher) -> None:
    result = await matcher.match_async("Austria " + "x" * (LIMIT - 8))
    assert len(result.query) == LIMIT
    assert result.status != "error"


async def test_diagnose_rejects_a_bad_query(matcher: Matcher) -> None:
    with pytest.raises(QueryError):
        await matcher.diagnose_async("   ")


# -- readiness -----------------------------------------------------------------------------

BEFORE_FIT: list[Callable[[Matcher], Awaitable[Any]]] = [
    lambda m: m.match_async("USA"),
    lambda m: m.match_async(["USA"]),
    lambda m: m.match_batch_async(["USA"]),
    lambda m: m.explain_match_async("USA"),
]


@pytest.mark.parametrize("call", BEFORE_FIT, ids=["match", "match-list", "batch", "explain"])
async def test_matching_before_fit_raises_not_ready_naming_fit(
    unfitted: Matcher, call: Callable[[Matcher], Awaitable[Any]]
) -> None:
    with pytest.raises(NotReadyError, match=r"fit_async\(\)"):
        await call(unfitted)


def test_sync_match_before_fit_raises_not_ready(sync_matcher: Matcher) -> None:
    with pytest.raises(NotReadyError, match=r"fit\(\)"):
        sync_matcher.match("USA")


async def test_diagnose_before_fit_says_the_index_is_not_built(unfitted: Matcher) -> None:
    diagnosis = await unfitted.diagnose_async("USA")
    assert not diagnosis.ready and diagnosis.route is None
    assert any("fit" in hint for hint in diagnosis.hints)


async def test_ready_after_fit(unfitted: Matcher) -> None:
    assert not unfitted.ready
    await unfitted.fit_async()
    assert unfitted.ready


# -- explain and diagnose ------------------------------------------------------------------


async def test_explain_match_says_how_the_query_was_routed(matcher: Matcher) -> None:
    explanation = await matcher.explain_match_async("USA")
    assert explanation.result.entity_id == "US"
    assert explanation.route == "matched"
    assert (
        explanation.route_reason == "the query is a name or alias of 'US' and of no other candidate"
    )
    assert explanation.thresholds == {"accept": 0.92, "margin": 0.05, "novel": 0.45, "exact": 1.0}
    assert explanation.candidates == explanation.result.candidates
    assert explanation.llm_reason is None


async def test_diagnose_explains_an_ambiguous_query_and_hints_at_the_missing_llm(
    matcher: Matcher,
) -> None:
    diagnosis = await matcher.diagnose_async("United")
    assert diagnosis.ready and not diagnosis.llm_configured
    assert diagnosis.route == "adjudicate"
    assert diagnosis.top_score == diagnosis.candidates[0].score
    assert diagnosis.margin_to_runner_up == pytest.approx(
        diagnosis.candidates[0].score - diagnosis.candidates[1].score
    )
    assert any("no LLM configured" in hint for hint in diagnosis.hints)


@pytest.fixture
def llm_mock() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=LLM_BASE, assert_all_called=False) as mock:
        yield mock


async def test_explain_match_carries_the_llm_reason(
    countries: list[dict[str, Any]], llm_mock: respx.MockRouter
) -> None:
    fake = FakeLLM()
    llm_mock.post("/chat/completions").mock(side_effect=fake)
    async with (
        openai.AsyncOpenAI(api_key="test", base_url=LLM_BASE) as client,
        Matcher(
            countries,
            client=client,
            embedder=FakeEmbedder(),
            accept_threshold=1.01,
            novel_threshold=0.45,
        ) as m,
    ):
        await m.fit_async()
        explanation = await m.explain_match_async("USA")
        diagnosis = await m.diagnose_async("USA")
    assert explanation.route == "adjudicate"
    assert explanation.result.decided_by == "llm"
    assert explanation.llm_reason == "fake policy"
    assert diagnosis.route == "adjudicate"
    assert len(fake.requests) == 1  # diagnose makes no LLM call


# -- sync twins ----------------------------------------------------------------------------


def test_sync_fit_and_match_from_plain_sync_code(sync_matcher: Matcher) -> None:
    assert sync_matcher.fit() is sync_matcher
    result = sync_matcher.match("USA")
    assert (result.status, result.entity_id) == ("matched", "US")
    assert [r.entity_id for r in sync_matcher.match(["Deutschland", "Austria"])] == ["DE", "AT"]


def test_sync_match_batch_from_plain_sync_code(sync_matcher: Matcher) -> None:
    sync_matcher.fit()
    seen: list[int] = []
    results = sync_matcher.match_batch(
        ["USA", "", "zzzz"], batch_size=2, on_progress=lambda d, t: seen.append(d)
    )
    assert [r.status for r in results] == ["matched", "error", "novel"]
    assert seen == [1, 2, 3]


def test_sync_explain_and_diagnose_from_plain_sync_code(sync_matcher: Matcher) -> None:
    assert not sync_matcher.diagnose("USA").ready
    sync_matcher.fit()
    assert sync_matcher.explain_match("USA").route == "matched"
    assert sync_matcher.diagnose("United").route == "adjudicate"


def test_sync_single_bad_query_raises_query_error(sync_matcher: Matcher) -> None:
    sync_matcher.fit()
    with pytest.raises(QueryError):
        sync_matcher.match("")


async def test_sync_twins_work_while_an_event_loop_runs_in_the_calling_thread(
    countries: list[dict[str, Any]],
) -> None:
    # as in Jupyter: plain calls from a cell while the notebook's loop is running
    asyncio.get_running_loop()
    matcher = Matcher(countries, embedder=FakeEmbedder(), **FIXED)
    try:
        matcher.fit()
        result = matcher.match("USA")
        batch = matcher.match_batch(["Deutschland", "zzzz"])
        explanation = matcher.explain_match("Austria")
    finally:
        matcher.close()
    assert (result.status, result.entity_id) == ("matched", "US")
    assert [r.status for r in batch] == ["matched", "novel"]
    assert explanation.result.entity_id == "AT"


def test_sync_close_is_idempotent(sync_matcher: Matcher) -> None:
    sync_matcher.fit()
    sync_matcher.close()
    sync_matcher.close()


def test_sync_close_of_an_unused_matcher_returns(countries: list[dict[str, Any]]) -> None:
    Matcher(countries, embedder=FakeEmbedder()).close()


# -- closing -------------------------------------------------------------------------------


async def test_matching_after_aclose_raises(countries: list[dict[str, Any]]) -> None:
    matcher = Matcher(countries, embedder=FakeEmbedder(), **FIXED)
    await matcher.fit_async()
    await matcher.aclose()
    with pytest.raises(NemLLMError, match="closed"):
        await matcher.match_async("USA")


async def test_async_with_closes_the_matcher(countries: list[dict[str, Any]]) -> None:
    async with Matcher(countries, embedder=FakeEmbedder()) as matcher:
        await matcher.fit_async()
    with pytest.raises(NemLLMError, match="closed"):
        await matcher.match_async("USA")


def batcher_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "nem-llm-microbatcher"]


async def test_aclose_stops_the_micro_batcher(countries: list[dict[str, Any]]) -> None:
    matcher = Matcher(countries, embedder=FakeEmbedder(), **FIXED)
    await matcher.fit_async()
    await matcher.match_async("USA")
    assert len(batcher_tasks()) == 1
    await matcher.aclose()
    assert batcher_tasks() == []


async def test_sync_close_after_async_use_inside_a_running_loop_does_not_raise(
    countries: list[dict[str, Any]],
) -> None:
    # Jupyter: `await matcher.fit_async()` in one cell, `matcher.close()` in a later one
    matcher = Matcher(countries, embedder=FakeEmbedder(), **FIXED)
    await matcher.fit_async()
    await matcher.match_async("USA")
    matcher.close()
    with pytest.raises(NemLLMError, match="closed"):
        await matcher.match_async("USA")


async def test_sync_close_after_async_use_inside_a_running_loop_stops_the_micro_batcher(
    countries: list[dict[str, Any]],
) -> None:
    matcher = Matcher(countries, embedder=FakeEmbedder(), **FIXED)
    await matcher.fit_async()
    await matcher.match_async("USA")
    matcher.close()
    for _ in range(10):  # the loop-bound part is released once this loop runs again
        await asyncio.sleep(0)
    assert batcher_tasks() == []
