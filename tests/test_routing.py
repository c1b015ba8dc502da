"""Routing (matched / novel / adjudicate) and threshold calibration, pure and through Matcher."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest
import respx

from nem_llm._retrieval.calibration import Example, calibrate
from nem_llm._retrieval.routing import RouteFeatures, route
from nem_llm.config import CLOSED_ACCEPT, CLOSED_NOVEL, Thresholds
from nem_llm.errors import ConfigError
from nem_llm.matcher import Matcher
from nem_llm.models import Candidate
from nem_llm.testing import FakeEmbedder, FakeLLM

LLM_BASE = "http://llm.test/v1"
DEFAULT = Thresholds(accept=0.9, margin=0.05, novel=0.4)


def cands(*scores: float) -> list[Candidate]:
    return [Candidate(entity_id=f"e{i}", name=f"E{i}", score=s) for i, s in enumerate(scores)]


def ex(top: float, margin: float, *, gold: bool = False, none: bool = False) -> Example:
    return Example(RouteFeatures(top, margin, False, False), top_is_right=gold, absent=none)


# -- route(): pure -------------------------------------------------------------------------


def test_clear_winner_is_matched() -> None:
    r = route(cands(0.95, 0.5), DEFAULT)
    assert r.kind == "matched"
    assert r.top_score == 0.95
    assert r.margin == pytest.approx(0.45)


def test_high_score_without_margin_over_runner_up_is_adjudicated() -> None:
    r = route(cands(0.95, 0.93), DEFAULT)
    assert r.kind == "adjudicate"
    assert "ahead of the runner-up" in r.reason


def test_score_between_novel_and_accept_is_adjudicated() -> None:
    r = route(cands(0.6, 0.1), DEFAULT)
    assert r.kind == "adjudicate"
    assert "between novel_threshold" in r.reason


def test_score_below_novel_threshold_is_novel() -> None:
    r = route(cands(0.39, 0.1), DEFAULT)
    assert r.kind == "novel"
    assert "novel_threshold" in r.reason


def test_no_candidates_is_novel() -> None:
    r = route([], DEFAULT)
    assert (r.kind, r.top_score, r.margin) == ("novel", None, None)


def test_single_candidate_leads_by_its_whole_score() -> None:
    r = route(cands(0.91), DEFAULT)
    assert r.kind == "matched"
    assert r.margin == 0.91


def test_thresholds_are_inclusive() -> None:
    t = Thresholds(accept=0.75, margin=0.25, novel=0.5)
    assert route(cands(0.75, 0.5), t).kind == "matched"
    assert route(cands(0.5, 0.0), t).kind == "adjudicate"


def test_novel_is_checked_before_accept() -> None:
    # a novel threshold above accept wins: nothing under it is ever auto-accepted
    t = Thresholds(accept=0.5, margin=0.0, novel=0.8)
    assert route(cands(0.7), t).kind == "novel"


def test_accept_threshold_above_one_never_matches_by_embedding() -> None:
    t = Thresholds(accept=1.01, margin=0.0, novel=0.4)
    assert route(cands(1.0, 0.0), t).kind == "adjudicate"


EXACT = Thresholds(accept=1.01, margin=0.0, novel=0.0, exact=True)


def named(*names: str) -> list[Candidate]:
    return [Candidate(entity_id=f"e{i}", name=n, score=0.9 - i / 10) for i, n in enumerate(names)]


def test_an_exact_hit_with_no_near_twin_is_matched() -> None:
    r = route(named("Bubi", "Kubiana", "Ubangi"), EXACT, "bubi")
    assert (r.kind, r.rule) == ("matched", "exact")


@pytest.mark.parametrize(
    "runner_up",
    [
        "Bube",  # one substitution
        "Kwa'",  # one insertion ("Kwa")
        "Bimoba",  # contains the query ("Moba")
        "Chinook Jargon",  # contains it as words
    ],
)
def test_an_exact_hit_with_a_near_twin_goes_to_the_llm(runner_up: str) -> None:
    top = {"Bube": "Bubi", "Kwa'": "Kwa", "Bimoba": "Moba", "Chinook Jargon": "Chinook"}
    query = top[runner_up]
    r = route(named(query, "Unrelated", runner_up), EXACT, query)
    assert r.kind == "adjudicate"
    assert r.rule == "closed"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"accept": -0.1},
        {"margin": float("nan")},
        {"novel": 1.5},
        {"accept": True},
        {"novel": "0.5"},
    ],
)
def test_invalid_thresholds_are_config_errors(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Thresholds(**kwargs)


# -- calibrate(): pure ---------------------------------------------------------------------


def labelled_set() -> list[Example]:
    """20 examples (x100) whose best thresholds at target 0.99 are worked out by hand.

    Each appears 100 times: a rule must decide about 100 examples without a mistake before
    it can open at 0.99 (calibration's one imaginary mistake).
    """
    return 100 * [
        # right top candidate, clear lead
        *(ex(t, 0.3, gold=True) for t in (0.99, 0.98, 0.97, 0.96, 0.95, 0.90, 0.85)),
        ex(0.96, 0.02),  # wrong top candidate in a near-tie
        ex(0.80, 0.3),  # wrong top candidate with a clear lead: caps accept above 0.80
        ex(0.75, 0.3, gold=True),
        ex(0.50, 0.1, gold=True),  # the lowest example whose entity is in the catalog
        # entities absent from the catalog
        *(ex(t, 0.05, none=True) for t in (0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40, 0.42)),
    ]


def test_calibrate_picks_the_widest_precise_accept_rule_and_the_highest_precise_novel_cut() -> None:
    # accept: margins 0.00-0.02 accept only >= 0.97 (the 0.96 tie holds a wrong one: 4/5);
    # every margin from 0.03 to 0.2 drops the near-tie and accepts the 7 right answers down
    # to 0.85; on that tie the largest margin, 0.2, is kept.
    # novel: "top < 0.50" catches the 9 absent entities and nothing else; the threshold sits
    # midway between the highest absent one (0.42) and that cut.
    got = calibrate(labelled_set(), target_precision=0.99)
    assert (got.accept, got.margin) == (0.85, 0.2)
    assert got.novel == pytest.approx(0.46)
    assert got.calibrated


def test_calibrate_breaks_coverage_ties_towards_the_larger_margin() -> None:
    examples = [
        ex(0.99, 0.3, gold=True),
        ex(0.97, 0.005, gold=True),
        ex(0.95, 0.005),  # wrong: stops margin 0.0 at 0.97 (2 accepted)
        ex(0.90, 0.3, gold=True),  # margin >= 0.01 skips both near-ties: 0.99, 0.90 (2 accepted)
        ex(0.80, 0.3),
        *(ex(0.1, 0.0, none=True) for _ in range(15)),
    ]
    got = calibrate(100 * examples, target_precision=0.99)
    assert (got.accept, got.margin) == (0.90, 0.2)


def test_calibrate_closes_both_routes_with_too_few_examples() -> None:
    got = calibrate(labelled_set()[:19], target_precision=0.99)
    assert (got.accept, got.novel, got.exact) == (CLOSED_ACCEPT, CLOSED_NOVEL, False)


def test_a_handful_of_perfect_examples_does_not_open_a_route_at_099() -> None:
    examples = [ex(0.95, 0.3, gold=True) for _ in range(50)] + [
        ex(0.1, 0.0, none=True) for _ in range(50)
    ]
    got = calibrate(examples, target_precision=0.99)
    # 50 right of 50: the 90% lower bound is 0.968 < 0.99; 200 of 200: 0.992
    assert (got.accept, got.novel) == (CLOSED_ACCEPT, CLOSED_NOVEL)
    assert calibrate(examples * 4, target_precision=0.99).accept == 0.95
    assert (got.accept, got.novel, got.exact) == (CLOSED_ACCEPT, CLOSED_NOVEL, False)


def test_calibrate_closes_the_accept_route_when_no_rule_reaches_the_target() -> None:
    examples = [ex(0.95, 0.3) for _ in range(20)]  # the top candidate is always wrong
    got = calibrate(examples, target_precision=0.99)
    assert got.accept == CLOSED_ACCEPT  # never the (less safe) default
    assert got.novel == CLOSED_NOVEL  # no absent example: nothing to call novel on


def test_calibrate_lower_target_precision_accepts_more() -> None:
    strict = calibrate(labelled_set(), target_precision=0.99)
    # margin 0.10, accept 0.50: 9 right out of 10 (0.9), the wrong one at 0.80 let in
    loose = calibrate(labelled_set(), target_precision=0.85)
    assert (loose.accept, loose.margin) == (0.50, 0.10)
    assert loose.accept < strict.accept


# -- through the Matcher -------------------------------------------------------------------


@pytest.fixture
def llm_mock() -> Iterator[respx.MockRouter]:
    with respx.mock(base_url=LLM_BASE, assert_all_called=False) as mock:
        yield mock


@pytest.fixture
async def client() -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(api_key="test", base_url=LLM_BASE) as c:
        yield c


@pytest.fixture
def no_llm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


async def test_exact_alias_is_matched_by_embedding_without_an_llm_call(
    countries: list[dict[str, Any]],
    client: openai.AsyncOpenAI,
    llm_mock: respx.MockRouter,
) -> None:
    llm = llm_mock.post("/chat/completions").mock(side_effect=FakeLLM())
    async with Matcher(countries, client=client, embedder=FakeEmbedder()) as matcher:
        await matcher.fit_async()
        result = await matcher.match_async("USA")
    assert (result.status, result.entity_id, result.decided_by) == ("matched", "US", "embedding")
    assert result.score == 1.0
    assert llm.call_count == 0


async def test_unrelated_query_is_novel_without_an_llm_call(
    countries: list[dict[str, Any]],
    client: openai.AsyncOpenAI,
    llm_mock: respx.MockRouter,
) -> None:
    llm = llm_mock.post("/chat/completions").mock(side_effect=FakeLLM())
    async with Matcher(
        countries, client=client, embedder=FakeEmbedder(), novel_threshold=0.45
    ) as matcher:
        await matcher.fit_async()
        result = await matcher.match_async("zzzz")
    assert (result.status, result.entity_id, result.decided_by) == ("novel", None, "embedding")
    assert result.score is not None and result.score < matcher.thresholds.novel
    assert llm.call_count == 0


async def test_ambiguous_query_without_an_llm_is_review_with_candidates(
    countries: list[dict[str, Any]], no_llm_env: None
) -> None:
    async with Matcher(countries, embedder=FakeEmbedder()) as matcher:
        assert not matcher.llm_configured
        await matcher.fit_async()
        result = await matcher.match_async("United")  # United States or United Kingdom?
    assert result.status == "review"
    assert result.entity_id is None and result.decided_by is None and result.error is None
    assert [c.entity_id for c in result.candidates[:2]] == ["US", "UK"]
    assert "no LLM configured" in result.reason


async def test_ambiguous_queries_in_a_batch_without_an_llm_are_review_records(
    countries: list[dict[str, Any]], no_llm_env: None
) -> None:
    async with Matcher(countries, embedder=FakeEmbedder()) as matcher:
        await matcher.fit_async()
        results = await matcher.match_batch_async(["United", "USA", "America"])
    assert [r.status for r in results] == ["review", "matched", "review"]


async def test_openai_base_url_in_the_environment_configures_an_llm(
    countries: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", LLM_BASE)
    async with Matcher(countries, embedder=FakeEmbedder()) as matcher:
        assert matcher.llm_configured


async def test_accept_threshold_above_one_sends_even_exact_matches_to_the_llm(
    countries: list[dict[str, Any]],
    client: openai.AsyncOpenAI,
    llm_mock: respx.MockRouter,
) -> None:
    llm = llm_mock.post("/chat/completions").mock(side_effect=FakeLLM())
    async with Matcher(
        countries,
        client=client,
        embedder=FakeEmbedder(),
        accept_threshold=1.01,
        novel_threshold=0.45,
    ) as matcher:
        await matcher.fit_async()
        result = await matcher.match_async("USA")
        novel = await matcher.match_async("zzzz")
    assert (result.status, result.entity_id, result.decided_by) == ("matched", "US", "llm")
    assert (novel.status, novel.decided_by) == ("novel", "embedding")
    assert llm.call_count == 1


TRAINING: list[tuple[str, str | None]] = [
    ("USA", "US"),
    ("Deutschland", "DE"),
    ("Austria", "AT"),
    ("France", "FR"),
    ("Great Britain", "UK"),
    ("Germany!", "DE"),
    ("Untied States", "US"),
    ("Grmany", "DE"),
    ("Britain", "UK"),
    ("Francia", "FR"),
    ("America", "US"),
    ("Frankreich", "FR"),
    ("United", "UK"),
    ("zzzz", None),
    ("qwxy", None),
    ("Japan", None),
    ("Brazil", None),
    ("Mexico", None),
    ("Canada", None),
    ("Italy", None),
    ("Spain", None),
    ("Australia", None),  # close to Austria, and absent
]


async def test_fit_with_training_data_calibrates_thresholds_to_the_target_precision(
    countries: list[dict[str, Any]], no_llm_env: None
) -> None:
    async with Matcher(countries, embedder=FakeEmbedder()) as matcher:
        # repeated labels weigh as evidence: a rule must decide about 33 of them without a
        # mistake to open at 0.95
        await matcher.fit_async(TRAINING * 60, mode="zero-shot", target_precision=0.95)
        results = await matcher.match_batch_async([q for q, _ in TRAINING])
    assert matcher.thresholds.calibrated
    assert matcher.calibration is not None and matcher.calibration.source == "labels"
    assert matcher.thresholds.accept < Thresholds().accept  # it learnt to accept more
    gold = dict(TRAINING)
    matched = [r for r in results if r.status == "matched"]
    novel = [r for r in results if r.status == "novel"]
    assert len(matched) > 5  # the default accept threshold (0.92) auto-accepts only 5
    assert all(r.entity_id == gold[r.query] for r in matched)
    assert all(gold[r.query] is None for r in novel)
    assert results[TRAINING.index(("Australia", None))].status == "review"


async def test_fit_with_too_few_examples_keeps_the_given_thresholds(
    countries: list[dict[str, Any]], no_llm_env: None
) -> None:
    async with Matcher(countries, embedder=FakeEmbedder(), accept_threshold=0.8) as matcher:
        await matcher.fit_async(TRAINING[:5])
    assert matcher.thresholds.accept == 0.8  # the user's, kept
    assert matcher.calibration is not None and matcher.calibration.source == "probes"


@pytest.mark.parametrize("target", [0.0, 1.5])
async def test_fit_rejects_a_target_precision_outside_0_1(
    countries: list[dict[str, Any]], target: float
) -> None:
    async with Matcher(countries, embedder=FakeEmbedder()) as matcher:
        with pytest.raises(ConfigError, match="target_precision"):
            await matcher.fit_async(TRAINING, target_precision=target)


async def test_fit_rejects_training_data_that_is_not_pairs(
    countries: list[dict[str, Any]],
) -> None:
    async with Matcher(countries, embedder=FakeEmbedder()) as matcher:
        with pytest.raises(ConfigError, match=r"training_data\[1\]"):
            await matcher.fit_async([("USA", "US"), "Germany"])  # type: ignore[list-item]
