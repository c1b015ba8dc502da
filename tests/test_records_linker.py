"""RecordLinker: fit on candidates, then each query's decision with every field's part."""

from __future__ import annotations

import pytest

from nem_llm.records import RecordLinker

CATALOG = [
    {"name": "Ann Lee", "dob": "1970-01-02", "city": "Oslo"},
    {"name": "Bo Chen", "dob": "1981-05-06", "city": "Bergen"},
    {"name": "Cy Roe", "dob": "1990-12-24", "city": "Oslo"},
]
QUERIES = [
    {"name": "ann lee", "dob": "19700102", "city": "oslo"},
    {"name": "Dee Fox", "dob": "1955-07-07", "city": "Tromso"},
]
CANDIDATES = [[0, 2], [1, 2]]


def test_each_query_is_linked_or_left_with_its_candidates_ranked() -> None:
    linker = RecordLinker.fit(CATALOG, QUERIES, CANDIDATES)
    links = linker.link(QUERIES, CANDIDATES)
    assert [(link.status, link.entity) for link in links] == [("matched", 0), ("novel", None)]
    assert [c.entity for c in links[0].candidates] == [0, 2]


def test_a_candidates_fields_add_up_to_its_match_weight() -> None:
    linker = RecordLinker.fit(CATALOG, QUERIES, CANDIDATES)
    best = linker.link(QUERIES, CANDIDATES)[0].candidates[0]
    assert [(f.field, f.level) for f in best.fields] == [
        ("name", "exact"),
        ("dob", "exact"),
        ("city", "exact"),
    ]
    assert best.prior_bits + sum(f.bits for f in best.fields) == pytest.approx(best.weight)


def test_a_query_with_no_candidate_is_novel() -> None:
    linker = RecordLinker.fit(CATALOG, QUERIES, CANDIDATES)
    link = linker.link([{"name": "x"}], [[]])[0]
    assert (link.status, link.candidates, link.none_probability) == ("novel", (), 1.0)


def test_queries_and_candidate_lists_must_align() -> None:
    linker = RecordLinker.fit(CATALOG, QUERIES, CANDIDATES)
    with pytest.raises(ValueError, match="candidate lists"):
        linker.link(QUERIES, CANDIDATES[:1])
