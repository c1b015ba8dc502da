"""The routing model: fit on labels, cross-validated cuts, never below its target, never
overriding a threshold rule; explain names it; a per-call threshold= routes without it.

Cheap under load: the gradient-boosted trees run on one native thread here (their OpenMP
pool, sized to the cores, spins against the other jobs of a shared 2-core machine: 60 s
instead of 3 for one fit and 2,000 decisions), the fitted model of the interaction data is
shared by the tests that read it, and 2,000 fresh labels are scored in one batch (a few of
them through ``decide`` too, which must agree).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from nem_llm._retrieval.calibration import Example, estimate, with_route_model
from nem_llm._retrieval.route_model import MIN_LABELS, RouteModel, fit_route_model, vector
from nem_llm._retrieval.routing import RouteFeatures, route
from nem_llm.config import Thresholds
from nem_llm.matcher import Matcher
from nem_llm.models import Candidate
from nem_llm.testing import FakeEmbedder


def _interaction(rng: random.Random) -> tuple[RouteFeatures, bool, bool]:
    """A catalog where an exact hit across scripts is always right, while exact hits in
    the same script and high scores are right only 85% of the time: no single threshold
    reaches 0.99, the two features together do."""
    exact, cross = rng.random() < 0.4, rng.random() < 0.5
    top, margin = 0.5 + rng.random() / 2, rng.random() * 0.3
    f = RouteFeatures(top, margin, exact, False, dense=top, lexical=top, cross_script=cross)
    absent = not (exact and cross) and rng.random() < 0.05
    right = not absent and ((exact and cross) or rng.random() < 0.85)
    return f, right, absent


def _fit(rows: list[tuple[RouteFeatures, bool, bool]], **kw: Any) -> Any:
    n = len(rows)
    return fit_route_model(
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [False] * n,
        [False] * n,
        matched_target=kw.get("matched_target", 0.99),
        novel_target=kw.get("novel_target", 0.95),
    )


@pytest.fixture(autouse=True, scope="module")
def _one_native_thread() -> Iterator[None]:
    """The trees' OpenMP pool on one thread: the same model, at a cost a busy machine keeps."""
    from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]

    with threadpool_limits(limits=1):
        yield


INTERACTION_SEED = 0


@pytest.fixture(scope="module")
def interaction() -> tuple[list[tuple[RouteFeatures, bool, bool]], Any, random.Random]:
    """2,000 labels of the interaction catalog, the model fit on them, and the generator
    (which goes on to draw the fresh labels)."""
    rng = random.Random(INTERACTION_SEED)
    train = [_interaction(rng) for _ in range(2000)]
    return train, _fit(train), rng


def _matched(model: RouteModel, features: list[RouteFeatures]) -> list[bool]:
    """Whether ``model`` decides "matched" for each row, scored in one batch."""
    assert model.matched is not None
    p = model.matched.predict_proba(np.array([vector(f) for f in features]))[:, 1]
    return [
        bool(x >= model.matched_cut) and not f.same_name_tie
        for x, f in zip(p, features, strict=True)
    ]


def test_the_model_learns_what_no_threshold_can_and_holds_on_new_labels(
    interaction: tuple[list[tuple[RouteFeatures, bool, bool]], Any, random.Random],
) -> None:
    train, fit, rng = interaction
    rules = estimate([Example(f, r, a) for f, r, a in train], source="labels")
    assert not rules.matched.open  # the thresholds alone cannot reach 0.99 here

    assert fit.model is not None and fit.model.matched is not None
    decided, right = fit.matched
    assert right / decided >= 0.99 and decided > 300  # ~400 exact hits across scripts

    fresh = [_interaction(rng) for _ in range(2000)]
    batch = _matched(fit.model, [f for f, _, _ in fresh])
    for (f, _, _), matched in list(zip(fresh, batch, strict=True))[
        :: len(fresh) // 40
    ]:  # decide agrees
        d = fit.model.decide(f)
        assert (d is not None and d[0] == "matched") == matched
    taken = [(f, r) for (f, r, _), matched in zip(fresh, batch, strict=True) if matched]
    region = sum(f.exact and f.cross_script for f, _, _ in fresh)  # ~400
    assert len(taken) > region / 2
    assert sum(r for _, r in taken) / len(taken) >= 0.99
    # what it takes is the interaction (a few others fit inside the 1% it may spend)
    assert sum(f.exact and f.cross_script for f, _ in taken) / len(taken) >= 0.95


@pytest.mark.parametrize("seed", range(3))
def test_labels_that_say_nothing_open_no_route(seed: int) -> None:
    """Labels independent of every feature (90% right, 5% absent): no region of them is
    0.99 right or 0.95 absent, so cross-validation must refuse both routes."""
    rng = random.Random(seed)
    rows = []
    for _ in range(1500):
        top = rng.random()
        f = RouteFeatures(top, rng.random() * top, rng.random() < 0.3, False, dense=top)
        absent = rng.random() < 0.05
        rows.append((f, not absent and rng.random() < 0.9, absent))
    fit = _fit(rows)
    assert fit.model is None and fit.matched is None and fit.novel is None
    assert fit.reason.startswith("no routing model")


def test_too_few_labels_fit_no_model() -> None:
    rng = random.Random(1)
    fit = _fit([_interaction(rng) for _ in range(MIN_LABELS - 1)])
    assert fit.model is None
    assert f"needs {MIN_LABELS}" in fit.reason


def test_with_route_model_reports_rule_and_model_together() -> None:
    rng = random.Random(2)
    examples = [Example(f, r, a) for f, r, a in (_interaction(rng) for _ in range(2000))]
    cal, model = with_route_model(estimate(examples, source="labels"), examples)
    assert model is not None
    assert cal.matched.open and "routing model" in cal.matched.reason
    assert cal.matched.expected_precision is not None
    assert cal.matched.expected_precision >= 0.99
    assert cal.routing_model is not None and "cross-validated on 2000 labels" in cal.routing_model


class _Sure:
    """A classifier double: the same probability for every row."""

    def __init__(self, p: float) -> None:
        self.p = p

    def predict_proba(self, x: Any) -> Any:
        return np.array([[1 - self.p, self.p]] * len(x))


SURE_MATCH = RouteModel(_Sure(0.999), 0.99, None, 1.0, 500)
SURE_NOVEL = RouteModel(None, 1.0, _Sure(0.97), 0.95, 500)
T = Thresholds(accept=0.95, margin=0.1, novel=0.3, exact=True)


def _cands(*scores: float, names: tuple[str, ...] = ()) -> list[Candidate]:
    return [
        Candidate(entity_id=f"e{i}", name=names[i] if names else f"Entity {chr(65 + i)}", score=s)
        for i, s in enumerate(scores)
    ]


def test_the_model_decides_only_what_the_thresholds_leave_and_says_so() -> None:
    r = route(_cands(0.7, 0.5), T, "query", SURE_MATCH)
    assert (r.kind, r.rule) == ("matched", "model")
    assert "routing model" in r.reason and "'e0'" in r.reason and "0.999" in r.reason
    r = route(_cands(0.7, 0.5), T, "query", SURE_NOVEL)
    assert (r.kind, r.rule) == ("novel", "model") and "not in the catalog" in r.reason
    # the threshold rules come first: a score below novel stays a threshold decision
    assert route(_cands(0.2, 0.1), T, "query", SURE_MATCH).rule == "novel"
    assert route(_cands(0.99, 0.5), T, "query", SURE_NOVEL).rule == "threshold"
    assert route(_cands(0.7, 0.5, names=("Aka", "Bob")), T, "aka", SURE_NOVEL).rule == "exact"
    # same-named entities are never told apart by the model either
    tie = route(_cands(0.7, 0.7, names=("Paris", "Paris")), T, "Pariss", SURE_MATCH)
    assert (tie.kind, tie.rule) == ("adjudicate", "same_name")


CATALOG = [{"id": f"E{i}{side}", "name": f"Place {i} {side}"} for i in range(80) for side in "NS"]


async def test_matcher_fit_reports_the_model_explain_names_it_and_threshold_skips_it() -> None:
    labels: list[tuple[str, str | None]] = [
        (f"place {i} {side}".upper(), f"E{i}{side}") for i in range(80) for side in "NS"
    ]
    async with Matcher(CATALOG, embedder=FakeEmbedder(), llm=False) as m:
        await m.fit_async(labels, mode="zero-shot")
        assert m.calibration is not None and m.calibration.routing_model
        before = await m.explain_match_async("place 7")  # two near-tied candidates
        m.route_model = SURE_MATCH  # a double: sure of every top candidate
        explained = await m.explain_match_async("place 7")
        result = await m.match_async("place 7")
        overridden = await m.match_async("place 7", threshold=0.99)
        diagnosis = await m.diagnose_async("place 7")
    assert before.route == "adjudicate"
    assert explained.route == "matched" and "routing model" in explained.route_reason
    assert result.status == "matched" and result.decided_by == "embedding"
    assert "routing model" in result.reason
    assert overridden.status == "review" and "routing model" not in overridden.reason
    assert m.calibration.routing_model in diagnosis.hints
