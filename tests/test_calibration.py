"""Safe routing: calibration never opens a route below its target; label-free estimates;
filters, prompt attributes and the seed API's ``threshold=`` through the Matcher."""

from __future__ import annotations

import json
import random
from typing import Any

import httpx
import numpy as np
import openai
import pytest

from nem_llm._llm.adjudication import render_messages
from nem_llm._retrieval.calibration import (
    Example,
    estimate,
    exact_rule_from_catalog,
    make_probes,
)
from nem_llm._retrieval.routing import RouteFeatures, route
from nem_llm.catalog import load_catalog
from nem_llm.config import CLOSED_ACCEPT, CLOSED_NOVEL
from nem_llm.errors import ConfigError
from nem_llm.matcher import Matcher
from nem_llm.models import Candidate
from nem_llm.testing import FakeEmbedder, FakeLLM


def _random_examples(rng: random.Random, n: int) -> list[Example]:
    out = []
    for _ in range(n):
        absent = rng.random() < rng.choice([0.05, 0.3, 0.8])
        top = rng.random()
        margin = rng.random() * top
        right = not absent and rng.random() < top  # higher scores are right more often
        same = rng.random() < 0.05
        exact = rng.random() < 0.05
        out.append(Example(RouteFeatures(top, margin, exact, same), right, absent))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_calibration_never_opens_a_route_below_its_target(seed: int) -> None:
    """Property: on its own examples, whatever an open route decides reaches the target."""
    rng = random.Random(seed)
    examples = _random_examples(rng, rng.choice([30, 200, 1500]))
    targets = (rng.choice([0.8, 0.9, 0.99]), rng.choice([0.8, 0.95]))
    cal = estimate(examples, matched_target=targets[0], novel_target=targets[1])
    t = cal.thresholds
    matched = [
        e
        for e in examples
        if (cal.exact and e.features.exact)
        or (
            not e.features.same_name_tie
            and e.features.top >= t["accept"]
            and e.features.margin >= t["margin"]
            and e.features.top >= t["novel"]
        )
    ]
    novel = [
        e for e in examples if e.features.top < t["novel"] and not (cal.exact and e.features.exact)
    ]
    if cal.matched.open:
        assert sum(e.top_is_right for e in matched) / len(matched) >= targets[0]
    else:
        assert t["accept"] == CLOSED_ACCEPT and not cal.exact
    if cal.novel.open:
        assert sum(e.absent for e in novel) / len(novel) >= targets[1]
    else:
        assert t["novel"] == CLOSED_NOVEL


def test_exact_rule_census_closes_on_a_catalog_of_same_named_places() -> None:
    unique = load_catalog([{"id": str(i), "name": f"Place {i}"} for i in range(50)])
    assert exact_rule_from_catalog(unique)[0] == 1.0
    shared = load_catalog(
        [{"id": f"{c}{i}", "name": f"Place {i}", "country": c} for i in range(25) for c in "AB"]
    )
    precision, _ = exact_rule_from_catalog(shared)
    assert precision < 0.99  # every name belongs to two entities


def test_probes_are_deterministic_and_never_an_own_form_except_aliases() -> None:
    catalog = load_catalog(
        [
            {"id": str(i), "name": f"Saint Julien en Genevois {i}", "aliases": [f"SJG {i}"]}
            for i in range(30)
        ]
    )
    probes = make_probes(catalog, seed=3)
    assert probes == make_probes(catalog, seed=3)
    for p in probes:
        own = {f.casefold() for f in catalog.entities[p.entity].surface_forms()}
        assert (p.text.casefold() in own) == (p.kind == "alias"), p


def _synthetic_catalog(n: int = 300) -> list[dict[str, Any]]:
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ten", "ra", "vo", "shi", "dan", "bel", "qu", "or", "zen"]
    names: set[str] = set()
    while len(names) < n:
        names.add(" ".join("".join(rng.sample(syllables, 3)).title() for _ in range(2)))
    return [{"id": f"E{i}", "name": name} for i, name in enumerate(sorted(names))]


async def test_label_free_calibration_on_a_synthetic_catalog_opens_safe_routes() -> None:
    entities = _synthetic_catalog()
    async with Matcher(entities, embedder=FakeEmbedder(), llm=False) as matcher:
        await matcher.fit_async()
        cal = matcher.calibration
        assert cal is not None and cal.source == "probes" and cal.examples > 500
        assert cal.matched.open and cal.matched.expected_precision is not None
        assert cal.matched.expected_precision >= 0.99
        # real mentions: a typo'd name of a present entity, and names of no entity
        rng = random.Random(1)
        present = [e["name"][:-1] + "x" for e in rng.sample(entities, 60)]
        absent = ["Completely Unrelated Words", "Nothing Like It", "Xyzzy Plugh"]
        results = await matcher.match_batch_async(present + absent)
    matched = [r for r in results[: len(present)] if r.status == "matched"]
    wrong = [r for r in matched if r.entity_id != entities_by_name(entities, r.query)]
    assert not wrong
    assert all(r.status != "matched" for r in results[len(present) :])


def entities_by_name(entities: list[dict[str, Any]], query: str) -> str:
    """The id whose name the (typo'd) query came from."""
    return next(e["id"] for e in entities if e["name"][:-1] == query[:-1])


async def test_closed_routes_are_named_by_diagnose_and_calibration() -> None:
    tiny = [{"id": "A", "name": "Alpha"}, {"id": "B", "name": "Beta"}]
    # a target no evidence can prove: the novel route stays closed
    unprovable = {"novel_target_precision": 0.9999}
    async with Matcher(tiny, embedder=FakeEmbedder(), llm=False, **unprovable) as matcher:
        await matcher.fit_async()
        assert matcher.calibration is not None
        assert not matcher.calibration.novel.open
        assert "no score cut reaches precision" in matcher.calibration.novel.reason
        diagnosis = await matcher.diagnose_async("Gamma")
    assert any("auto-novel route is closed" in h for h in diagnosis.hints)
    assert diagnosis.route == "adjudicate"


PLACES = [
    {"id": "AD-CAN", "name": "Canillo", "country": "AD", "type": "parish"},
    {"id": "FR-CAN", "name": "Canillo", "country": "FR", "type": "commune"},
    {"id": "FR-PAR", "name": "Paris", "country": "FR", "type": "commune"},
    {"id": "US-PAR", "name": "Paris", "country": "US", "type": "city", "pop": {"2020": 24171}},
]


async def test_same_named_entities_never_auto_match_and_explain_says_why() -> None:
    async with Matcher(PLACES, embedder=FakeEmbedder(), llm=False, accept_threshold=0.5) as m:
        await m.fit_async()
        explanation = await m.explain_match_async("Canillo")
    assert explanation.route == "adjudicate"
    assert "same name" in explanation.route_reason


async def test_where_filter_never_returns_a_candidate_outside_it() -> None:
    async with Matcher(PLACES, embedder=FakeEmbedder(), llm=False, accept_threshold=0.5) as m:
        await m.fit_async()
        one = await m.match_async("Canillo", where={"country": "AD"})
        many = await m.match_batch_async(
            ["Paris", "Paris", "Canillo"],
            where=[{"country": "US"}, {"country": ["FR", "AD"]}, None],
        )
        with pytest.raises(ConfigError, match="no entity has"):
            await m.match_async("Paris", where={"region": "x"})
    assert [c.entity_id for c in one.candidates] == ["AD-CAN"]
    assert one.status == "matched" and one.entity_id == "AD-CAN"
    assert {c.entity_id for c in many[0].candidates} == {"US-PAR"}
    assert all(c.entity_id.startswith(("FR", "AD")) for c in many[1].candidates)
    assert len(many[2].candidates) == 4


def test_prompt_attributes_go_into_the_prompt_within_their_budget() -> None:
    catalog = load_catalog(PLACES)
    cands = [Candidate(entity_id=e["id"], name=e["name"], score=0.9) for e in PLACES]
    messages = render_messages(
        "Paris, Texas", cands, catalog, attributes=["country", "pop"], attribute_chars=40
    )
    user = messages[-1]["content"]
    assert "attributes: country=AD" in user
    assert 'country=US; pop={"2020": 24171}' in user  # a non-scalar as JSON text
    lines = [line for line in user.splitlines() if "attributes:" in line]
    assert all(len(line.split("attributes: ")[1]) <= 40 for line in lines)
    short = render_messages("Paris", cands, catalog, attributes=["pop"], attribute_chars=8)
    assert 'attributes: pop={"2…' in short[-1]["content"]  # cut to its budget
    plain = render_messages("Paris", cands, catalog)[-1]["content"]
    assert "attributes" not in plain


async def test_the_llm_sees_the_chosen_attributes() -> None:
    seen: list[str] = []

    def policy(query: str, ids: list[str]) -> str:
        return ids[0]

    llm = FakeLLM(policy)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content)["messages"][-1]["content"])
        return llm(request)

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    client = openai.AsyncOpenAI(api_key="t", base_url="http://fake/v1", http_client=http)
    async with Matcher(
        PLACES, client=client, embedder=FakeEmbedder(), prompt_attributes=["country", "type"]
    ) as m:
        await m.fit_async()
        await m.match_async("Canillo")
    await http.aclose()
    assert seen and "country=AD; type=parish" in seen[0] and "country=FR; type=commune" in seen[0]


def test_prompt_attributes_naming_an_unknown_attribute_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no entity has"):
        Matcher(PLACES, embedder=FakeEmbedder(), llm=False, prompt_attributes=["colour"])


async def test_threshold_overrides_the_accept_threshold_for_one_call() -> None:
    entities = [{"id": "A", "name": "Alpha Centauri"}, {"id": "B", "name": "Zeta Reticuli"}]
    async with Matcher(
        entities,
        embedder=FakeEmbedder(),
        llm=False,
        accept_threshold=0.99,
        margin=0.0,
        novel_threshold=0.05,
    ) as m:
        await m.fit_async()
        strict = await m.match_batch_async(["Alpha Centaur"])
        loose = await m.match_batch_async(["Alpha Centaur"], threshold=0.3)
        single = await m.match_async("Alpha Centaur", threshold=0.3)
    assert strict[0].status == "review"
    assert loose[0].status == "matched" and loose[0].entity_id == "A"
    assert single.status == "matched"
    assert m.thresholds.accept == 0.99  # the matcher's own threshold is unchanged


def test_route_without_candidates_and_with_closed_routes_says_so() -> None:
    from nem_llm.config import Thresholds

    closed = Thresholds(accept=CLOSED_ACCEPT, margin=0.0, novel=CLOSED_NOVEL, exact=False)
    r = route([Candidate(entity_id="a", name="A", score=0.2)], closed, "q")
    assert (r.kind, r.rule) == ("adjudicate", "closed")
    assert "both auto routes are closed" in r.reason
    assert route([], closed, "q").kind == "novel"
    assert np.isclose(closed.accept, 1.01)


def _ex(top: float, margin: float, *, right: bool = False, absent: bool = False) -> Example:
    return Example(RouteFeatures(top, margin, False, False), right, absent)


def test_labels_too_few_to_open_a_route_take_the_probes_rule_unless_they_contradict_it() -> None:
    from nem_llm._retrieval.calibration import combine

    probes = estimate(
        [_ex(0.95, 0.3, right=True)] * 400 + [_ex(0.1, 0.0, absent=True)] * 400,
        source="probes",
    )
    assert probes.matched.open and probes.novel.open
    agreeing = [_ex(0.96, 0.3, right=True)] * 30 + [_ex(0.05, 0.0, absent=True)] * 30
    labels = estimate(agreeing, source="labels")  # 30 each: too few to open at 0.99
    assert not labels.matched.open
    merged = combine(labels, probes, agreeing)
    assert merged.source == "labels+probes"
    assert merged.matched.open and merged.thresholds["accept"] == probes.thresholds["accept"]
    assert "the labels agree (30 of 30" in merged.matched.reason
    contradicting = [_ex(0.96, 0.3, right=False)] * 30 + [_ex(0.05, 0.0, absent=True)] * 30
    vetoed = combine(estimate(contradicting, source="labels"), probes, contradicting)
    assert not vetoed.matched.open and vetoed.thresholds["accept"] == CLOSED_ACCEPT
