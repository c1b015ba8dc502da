"""Calibration on the workload with the LLM as the teacher, and the audit while running.

The pure parts (the stratified sample, the teacher's veto, the auditor) on made-up
numbers; the whole path with a fake LLM over httpx and with the simulator's oracle over
real HTTP (plumbing: a simulator's oracle measures the plumbing, never a model).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from nem_llm import Matcher, MatcherSettings
from nem_llm._matching.audit import MIN_AUDITS, Auditor
from nem_llm._retrieval.calibration import Example, stratified_sample, teacher_check
from nem_llm._retrieval.routing import RouteFeatures
from nem_llm.models import Calibration, RouteEstimate
from nem_llm.sim import SimConfig, SimServer
from nem_llm.testing import FakeEmbedder, FakeLLM

# -- the stratified sample ---------------------------------------------------------------


def _f(top: float, margin: float = 0.3, exact: bool = False, words: int = 2) -> RouteFeatures:
    return RouteFeatures(top, margin, exact, False, query_tokens=words)


def test_the_sample_spreads_over_the_strata_and_stands_for_the_whole() -> None:
    rng = random.Random(0)
    common = [_f(rng.uniform(0.9, 0.99), exact=True, words=1) for _ in range(900)]
    rare = [_f(rng.uniform(0.4, 0.49), margin=0.01) for _ in range(100)]
    picked = stratified_sample(common + rare, 50, seed=1)
    assert len(picked) == 50
    taken_rare = [w for i, w in picked if i >= 900]
    # the rare stratum is labelled more than its 10% share, each of its labels weighing less
    assert len(taken_rare) > 5
    weights = [w for _, w in picked]
    assert sum(weights) / len(weights) == pytest.approx(1.0)
    assert stratified_sample(common + rare, 50, seed=1) == picked  # seeded


def test_a_budget_beyond_the_workload_labels_all_of_it() -> None:
    assert stratified_sample([_f(0.5), _f(0.9)], 10) == [(0, 1.0), (1, 1.0)]
    assert stratified_sample([_f(0.5)], 0) == []


# -- the teacher's veto ------------------------------------------------------------------


def _open(accept: float = 0.8) -> Calibration:
    return Calibration(
        source="probes",
        examples=1000,
        thresholds={"accept": accept, "margin": 0.05, "novel": 0.3, "exact": 1.0},
        matched=RouteEstimate(open=True, target=0.99, reason="probes"),
        novel=RouteEstimate(open=True, target=0.95, reason="probes"),
    )


def _examples(right: int, wrong: int, top: float = 0.9) -> list[Example]:
    made = [Example(_f(top), True, False) for _ in range(right)]
    return made + [Example(_f(top), False, True) for _ in range(wrong)]


def test_a_teacher_that_disagrees_now_and_then_leaves_a_route_open() -> None:
    # 2 disagreements in 200: the teacher's own errors as likely as the rule's
    checked = teacher_check(_open(), _examples(198, 2))
    assert checked.matched.open
    assert "the LLM agrees on 0.990" in checked.matched.reason


def test_a_teacher_that_disagrees_often_closes_the_route() -> None:
    checked = teacher_check(_open(), _examples(180, 20))
    assert not checked.matched.open
    assert checked.thresholds["accept"] > 1
    assert "closed" in checked.matched.reason


# -- the auditor -------------------------------------------------------------------------


def test_the_audit_draws_the_same_queries_every_time() -> None:
    auditor = Auditor(0.1, {"matched": 0.99})
    queries = [f"q{i}" for i in range(2000)]
    drawn = [q for q in queries if auditor.picks(q)]
    assert 120 <= len(drawn) <= 280
    assert drawn == [q for q in queries if Auditor(0.1, {"matched": 0.99}).picks(q)]
    assert not any(Auditor(0.0, {}).picks(q) for q in queries)


def test_a_route_closes_only_on_evidence_after_enough_audits() -> None:
    auditor = Auditor(1.0, {"matched": 0.99})
    for _ in range(MIN_AUDITS - 1):
        assert not auditor.record("matched", agrees=False)
    assert not auditor.closed("matched")  # too few audits to judge
    assert auditor.record("matched", agrees=False)
    assert auditor.closed("matched")
    report = auditor.report()["matched"]
    assert (report.audited, report.agreeing, report.closed) == (MIN_AUDITS, 0, True)


def test_an_agreeing_audit_never_closes_a_route() -> None:
    auditor = Auditor(1.0, {"novel": 0.95})
    for _ in range(500):
        auditor.record("novel", agrees=True)
    assert not auditor.closed("novel")


# -- the whole path ----------------------------------------------------------------------

COUNTRIES: list[dict[str, Any]] = [
    {"id": "US", "name": "United States", "aliases": ["USA", "America"]},
    {"id": "DE", "name": "Germany", "aliases": ["Deutschland"]},
    {"id": "FR", "name": "France", "aliases": ["French Republic"]},
    {"id": "GB", "name": "United Kingdom", "aliases": ["UK", "Great Britain"]},
    {"id": "AT", "name": "Austria", "aliases": ["Österreich"]},
    {"id": "CH", "name": "Switzerland", "aliases": ["Schweiz", "Suisse"]},
    {"id": "IT", "name": "Italy", "aliases": ["Italia"]},
    {"id": "ES", "name": "Spain", "aliases": ["España"]},
]
MENTIONS = {
    "USA": "US", "Deutschland": "DE", "Germny": "DE", "Untied Kingdom": "GB", "Frnace": "FR",
    "Espana": "ES", "Italie": "IT", "Schweitz": "CH", "Austrai": "AT", "Atlantis": None,
    "Narnia": None, "Republic of Germany": "DE", "Great Britian": "GB", "Amerika": "US",
}  # fmt: skip


@pytest.fixture
def no_llm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


@pytest.mark.usefixtures("no_llm_env")
async def test_fit_labels_a_sample_of_the_workload_and_never_pays_for_it_twice(
    tmp_path: Path,
) -> None:
    gold = tmp_path / "gold.jsonl"
    gold.write_text("".join(json.dumps({"query": q, "gold_id": g}) + "\n"
                            for q, g in MENTIONS.items()))  # fmt: skip
    config = SimConfig(policy="oracle", gold_path=str(gold), seed=2)
    async with SimServer(config) as sim:
        client = AsyncOpenAI(base_url=sim.base_url, api_key="sim", max_retries=0)
        settings = MatcherSettings(model="nem-llm-sim", cache=tmp_path / "c.sqlite", audit_rate=0)
        async with Matcher(COUNTRIES, settings, client=client, embedder=FakeEmbedder()) as m:
            await m.fit_async(workload=list(MENTIONS), label_budget=6, show_progress=False)
            cal = m.calibration
            assert cal is not None
            assert cal.labelled == 6 and cal.label_usage.total_tokens > 0
            asked = len(sim.requests)
            assert asked == 6
            results = await m.match_batch_async(list(MENTIONS))
        await client.close()
    # the six labelled queries are answered from the cache when they reach the LLM
    fresh = sum(1 for r in results if r.decided_by == "llm")
    assert len(sim.requests) == asked + fresh
    assert "labelled" not in cal.source  # the source says where the rules came from
    assert cal.source.startswith(("workload", "probes"))


@pytest.mark.usefixtures("no_llm_env")
async def test_an_audit_that_disagrees_turns_rows_to_review_and_closes_the_route() -> None:
    # an LLM that always says "none of these": every audited auto-match disagrees
    llm = FakeLLM(lambda query, ids: "none")
    http = httpx.AsyncClient(transport=httpx.MockTransport(llm))
    client = AsyncOpenAI(api_key="t", base_url="http://fake/v1", http_client=http)
    exact = [name for e in COUNTRIES for name in (e["name"], *e["aliases"])]
    queries = (exact * 4)[: MIN_AUDITS + 10]
    settings = MatcherSettings(audit_rate=1.0, label_budget=0)
    async with Matcher(COUNTRIES, settings, client=client, embedder=FakeEmbedder()) as m:
        await m.fit_async(show_progress=False)
        results = await m.match_batch_async(queries, strategy="sequential")
        stats = m.last_run_stats
    await http.aclose()
    assert stats is not None and stats.audit["matched"].closed
    audited = [r for r in results if r.audit is not None]
    assert len(audited) == MIN_AUDITS
    assert all(r.status == "review" and not r.audit.agrees for r in audited)
    # once closed, the exact hits go to the LLM (which says none: novel, by the LLM)
    after = results[MIN_AUDITS:]
    assert after and all(r.decided_by == "llm" for r in after)


def test_the_difficulty_profile_puts_the_oracles_errors_on_ambiguous_requests(
    tmp_path: Path,
) -> None:
    from nem_llm.sim.config import DIFFICULTY
    from nem_llm.sim.protocol import ParsedRequest

    assert DIFFICULTY["first"] < 1 < DIFFICULTY["other"]
    gold = tmp_path / "gold.jsonl"
    gold.write_text(json.dumps({"query": "q", "gold_id": "a"}) + "\n")
    config = SimConfig(policy="oracle", gold_path=str(gold), oracle_error_rate=0.2,
                       error_profile="difficulty", seed=5)  # fmt: skip
    sim = SimServer(config)
    wrong: Counter[str] = Counter()
    for where, allowed in (("first", ("a", "b", "none")), ("other", ("b", "a", "none"))):
        request = ParsedRequest("m", "tool", allowed, "q", 10)
        for _ in range(400):
            wrong[where] += sim._choose(request)[0] != "a"
    # 0.2 x 0.2 = 4% when the gold entity comes first, 0.2 x 2.5 = 50% when it does not
    assert wrong["first"] < 0.1 * 400 < 0.3 * 400 < wrong["other"]
