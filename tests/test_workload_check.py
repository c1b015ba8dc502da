"""The label-free novel route checked on the workload itself (``_retrieval/workload.py``).

Probes are copies of the catalog's names; a workload whose queries fall below the novel
cut far more often than even absent probes do is not described by them (translations,
other scripts), and there a low score does not mean "absent": the route closes. A workload
like the catalog's names keeps it open.
"""

from __future__ import annotations

import random

import pytest

from nem_llm import Matcher
from nem_llm._retrieval.workload import MIN_WORKLOAD, novel_ceiling, workload_check
from nem_llm.models import Calibration, RouteEstimate
from nem_llm.testing import FakeEmbedder

SYLLABLES = ["ka", "lo", "mi", "ru", "te", "sa", "bo", "ni", "da", "ve", "zu", "pe", "go", "ri"]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(3, 4))).title()


def _typo(text: str, rng: random.Random) -> str:
    i = rng.randrange(1, len(text) - 1)
    return text[:i] + text[i + 1 :]


@pytest.fixture(scope="module")
def catalog() -> tuple[list[dict[str, str]], list[str], list[str]]:
    rng = random.Random(3)
    names = sorted({f"{_word(rng)} {_word(rng)}" for _ in range(700)})
    rng.shuffle(names)
    kept, gone = names[:300], names[300:400]
    entities = [{"id": f"e{i}", "name": n} for i, n in enumerate(kept)]
    like = [_typo(n, rng) for n in kept[:150]] + gone  # the catalog's kind of names
    # the same entities written in a script the catalog never uses
    han = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 400))
    other = ["".join(rng.choice(han) for _ in range(4)) for _ in range(250)]
    return entities, like, other


def _fit(entities: list[dict[str, str]], workload: list[str] | None) -> Calibration:
    with Matcher(entities, llm=False, embedder=FakeEmbedder()) as m:
        m.fit(show_progress=False, workload=workload)
        assert m.calibration is not None
        return m.calibration


def test_a_workload_like_the_catalogs_names_keeps_the_novel_route(
    catalog: tuple[list[dict[str, str]], list[str], list[str]],
) -> None:
    entities, like, _ = catalog
    assert _fit(entities, None).novel.open  # the probes open it: what the check is about
    assert _fit(entities, like).novel.open


def test_a_workload_in_a_script_the_catalog_never_uses_closes_the_novel_route(
    catalog: tuple[list[dict[str, str]], list[str], list[str]],
) -> None:
    entities, _, other = catalog
    cal = _fit(entities, other)
    assert not cal.novel.open
    assert cal.novel.reason.startswith("closed by the workload")
    with Matcher(entities, llm=False, embedder=FakeEmbedder()) as m:
        m.fit(show_progress=False, workload=other)
        assert all(r.status != "novel" for r in m.match_batch(other[:40]))


def _probes(coverage: float, *, open_: bool = True) -> Calibration:
    return Calibration(
        source="probes",
        examples=1000,
        thresholds={"accept": 0.9, "margin": 0.1, "novel": 0.4, "exact": 1.0},
        exact=True,
        matched=RouteEstimate(open=True, target=0.99),
        novel=RouteEstimate(open=open_, target=0.95, expected_coverage=coverage),
    )


def test_the_ceiling_is_what_a_workload_of_absent_entities_only_could_show() -> None:
    cal = _probes(0.05)  # estimated at an absent share of 0.25: absent probes below 20%
    assert novel_ceiling(cal) == pytest.approx(0.2)
    assert workload_check(cal, 25, 200).novel.open  # 12.5%: possible
    assert workload_check(cal, 25, 100).novel.open  # 25% of 100: its bound is not above
    closed = workload_check(cal, 90, 200)  # 45%: the probes do not describe it
    assert not closed.novel.open and closed.thresholds["novel"] == 0.0
    assert workload_check(cal, MIN_WORKLOAD - 1, MIN_WORKLOAD - 1).novel.open  # too few
    assert novel_ceiling(_probes(0.05, open_=False)) is None
    assert novel_ceiling(_probes(0.05).model_copy(update={"source": "labels"})) is None
