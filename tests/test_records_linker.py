"""RecordLinker: fit on candidates, then each query's decision with every field's part."""

from __future__ import annotations

import random

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


def test_another_shop_at_a_catalog_address_waits_when_the_name_identifies() -> None:
    rng = random.Random(11)
    syllables = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "zu", "pe", "si", "do", "ga"]

    def word() -> str:
        return "".join(rng.choice(syllables) for _ in range(3))

    catalog = [
        {"name": f"{word()} {word()}", "addr": f"{rng.randint(10, 9999)} {word()} st."}
        for _ in range(200)
    ]
    queries = [dict(e) for e in catalog[:100]]
    queries += [{"name": f"{word()} {word()}", "addr": e["addr"]} for e in catalog[100:108]]
    # each query's candidates: its address's entity and four others
    candidates = [[i, *range(190, 194)] for i in range(108)]
    plain = RecordLinker.fit(catalog, queries, candidates)
    named = RecordLinker.fit(catalog, queries, candidates, identifying=["name"])
    assert [link.status for link in plain.link(queries, candidates)[100:]] == ["matched"] * 8
    links = named.link(queries, candidates)
    assert [link.entity for link in links[:100]] == list(range(100))
    assert "matched" not in [link.status for link in links[100:]]


def test_an_identifying_field_must_be_compared() -> None:
    with pytest.raises(ValueError, match="not compared"):
        RecordLinker.fit(CATALOG, QUERIES, CANDIDATES, identifying=["email"])
