"""The record model: weights learned without labels link noisy records and leave absent ones.

The records here are made up (seeded): people with names, dates of birth and postcodes,
queried with typos, swapped digits and missing fields; a catalog in another script; part
numbers that differ by one digit; a catalog of two entities.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from nem_llm.records import decide, fit_record_model
from nem_llm.records.fields import FieldSpec

FIRST = [
    "anna",
    "ben",
    "carla",
    "dmitri",
    "elena",
    "farid",
    "greta",
    "hiro",
    "ines",
    "jonas",
    "kofi",
    "lena",
    "marek",
    "nadia",
    "oskar",
    "priya",
    "quinn",
    "rosa",
    "sven",
    "tariq",
]
# a few surnames are very common, most are rare (term frequencies matter)
LAST = (
    ["smith"] * 12
    + ["nguyen"] * 8
    + [f"sur{chr(97 + i)}{chr(97 + j)}" for i in range(8) for j in range(10)]
)


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 3:
        return word
    k = rng.randrange(1, len(word) - 1)
    return word[:k] + word[k + 1] + word[k] + word[k + 2 :]  # swap two neighbours


def _people(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "first": rng.choice(FIRST),
            "last": rng.choice(LAST),
            "dob": f"{rng.randint(1930, 2005)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
            "postcode": str(rng.randint(2000, 7999)),
        }
        for _ in range(n)
    ]


def _noisy(person: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    out = dict(person)
    field = rng.choice(["first", "last", "dob", "postcode", None])
    if field in ("first", "last", "dob"):
        out[field] = _typo(out[field], rng)
    elif field == "postcode":
        out.pop("postcode")
    return out


def _candidates(
    queries: list[dict[str, Any]], catalog: list[dict[str, Any]], k: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """A stand-in for retrieval: each query's k entities sharing the most field values."""
    qi, ei = [], []
    for q, record in enumerate(queries):
        shared = [sum(record.get(f) == e.get(f) for f in record) for e in catalog]
        for e in sorted(range(len(catalog)), key=lambda i: (-shared[i], i))[:k]:
            qi.append(q)
            ei.append(e)
    return np.array(qi), np.array(ei)


@pytest.fixture(scope="module")
def people() -> dict[str, Any]:
    rng = random.Random(7)
    catalog = _people(300, seed=1)
    present = rng.sample(range(300), 200)
    queries = [_noisy(catalog[i], rng) for i in present]
    absent = _people(60, seed=2)
    queries += absent
    gold: list[int | None] = [*present, *([None] * len(absent))]
    qi, ei = _candidates(queries, catalog)
    return {"catalog": catalog, "queries": queries, "gold": gold, "qi": qi, "ei": ei}


def _accuracy(decided: Any, gold: list[int | None]) -> tuple[float, float]:
    right = links = wrong = 0
    for q, status in enumerate(decided.status):
        if status == "matched":
            links += 1
            right += int(decided.entity[q]) == gold[q]
            wrong += int(decided.entity[q]) != gold[q]
        elif status == "novel":
            right += gold[q] is None
    return right / len(gold), 1 - wrong / max(links, 1)


def test_without_labels_noisy_copies_are_linked_and_absent_people_called_novel(
    people: dict[str, Any],
) -> None:
    model = fit_record_model(people["catalog"], people["queries"], people["qi"], people["ei"])
    scores = model.score(people["queries"], people["qi"], people["ei"])
    decided = decide(model.posteriors(scores), people["qi"], people["ei"])
    accuracy, precision = _accuracy(decided, people["gold"])
    assert precision == 1.0
    assert accuracy >= 0.95


def test_the_share_of_queries_with_a_match_is_learned(people: dict[str, Any]) -> None:
    model = fit_record_model(people["catalog"], people["queries"], people["qi"], people["ei"])
    assert model.rho == pytest.approx(200 / 260, abs=0.05)


def test_u_from_random_pairs_only_also_links(people: dict[str, Any]) -> None:
    model = fit_record_model(
        people["catalog"], people["queries"], people["qi"], people["ei"], u_source="random"
    )
    scores = model.score(people["queries"], people["qi"], people["ei"])
    decided = decide(model.posteriors(scores), people["qi"], people["ei"])
    accuracy, precision = _accuracy(decided, people["gold"])
    assert precision == 1.0 and accuracy >= 0.9


def test_a_shared_rare_surname_weighs_more_than_a_shared_common_one(
    people: dict[str, Any],
) -> None:
    model = fit_record_model(people["catalog"], people["queries"], people["qi"], people["ei"])
    catalog = people["catalog"]
    common = next(i for i, e in enumerate(catalog) if e["last"] == "smith")
    rare = next(i for i, e in enumerate(catalog) if e["last"].startswith("sur"))
    queries = [{"last": "smith"}, {"last": catalog[rare]["last"]}]
    scores = model.score(queries, [0, 1], [common, rare])
    last = model.fields.index("last")
    assert scores.contributions[1, last] > scores.contributions[0, last] + 2


def test_a_missing_value_is_no_evidence_either_way(people: dict[str, Any]) -> None:
    model = fit_record_model(people["catalog"], people["queries"], people["qi"], people["ei"])
    scores = model.score([{"first": "anna"}], [0], [0])
    missing = [f for f in model.fields if f != "first"]
    for name in missing:
        assert scores.contributions[0, model.fields.index(name)] == 0.0


def test_posteriors_of_a_query_add_up_to_one(people: dict[str, Any]) -> None:
    model = fit_record_model(people["catalog"], people["queries"], people["qi"], people["ei"])
    scores = model.score(people["queries"], people["qi"], people["ei"])
    post = model.posteriors(scores)
    total = np.bincount(people["qi"], weights=post.pair) + post.none
    assert np.allclose(total, 1.0)


def test_the_explanation_names_each_field_its_level_and_contribution(
    people: dict[str, Any],
) -> None:
    model = fit_record_model(people["catalog"], people["queries"], people["qi"], people["ei"])
    query = dict(people["catalog"][0])
    scores = model.score([query], [0], [0])
    rows = model.explain(scores, 0)
    assert [r[:2] for r in rows] == [(f, "exact") for f in model.fields]
    assert sum(r[2] for r in rows) == pytest.approx(scores.weight[0] - scores.prior_weight[0])


def test_two_identical_candidates_share_the_probability_and_the_query_waits() -> None:
    catalog = [{"title": "Book review column", "year": "2002"}] * 2 + [
        {"title": f"Paper number {w}", "year": str(1990 + i % 10)}
        for i, w in enumerate("alpha beta gamma delta epsilon zeta eta theta iota".split())
    ]
    queries = [{"title": "Book Review Column", "year": "2002"}]
    model = fit_record_model(catalog, queries, [0, 0, 0], [0, 1, 2])
    scores = model.score(queries, [0, 0, 0], [0, 1, 2])
    post = model.posteriors(scores)
    assert post.pair[0] == pytest.approx(post.pair[1])
    assert decide(post, [0, 0, 0], [0, 1, 2]).status == ("undecided",)


def test_labels_fix_their_queries_and_teach_the_weights(people: dict[str, Any]) -> None:
    gold = people["gold"]
    labels = {q: gold[q] for q in range(0, len(gold), 2)}
    model = fit_record_model(
        people["catalog"], people["queries"], people["qi"], people["ei"], labels=labels
    )
    assert model.report is not None and model.report.labelled == len(labels)
    scores = model.score(people["queries"], people["qi"], people["ei"])
    decided = decide(model.posteriors(scores), people["qi"], people["ei"])
    assert _accuracy(decided, gold)[1] == 1.0


def test_a_tiny_catalog_still_links_an_exact_record() -> None:
    catalog = [{"name": "Ann Lee", "dob": "1970-01-02"}, {"name": "Bo Chen", "dob": "1981-05-06"}]
    queries = [{"name": "ann lee", "dob": "19700102"}]
    model = fit_record_model(catalog, queries, [0, 0], [0, 1])
    scores = model.score(queries, [0, 0], [0, 1])
    decided = decide(model.posteriors(scores), [0, 0], [0, 1])
    assert decided.status == ("matched",) and decided.entity.tolist() == [0]


def test_records_written_in_another_script_link_to_their_latin_entities() -> None:
    cities = [
        "moskva",
        "sankt peterburg",
        "novosibirsk",
        "ekaterinburg",
        "kazan",
        "samara",
        "omsk",
        "rostov",
        "ufa",
        "perm",
    ]
    cyrillic = {"moskva": "Москва", "kazan": "Казань", "omsk": "Омск"}
    catalog = [
        {"name": f"{FIRST[i]} {LAST[20 + i]}", "city": c, "phone": f"+7 495 {1000 + i}"}
        for i, c in enumerate(cities)
    ]
    queries = []
    for i, city in enumerate(cities):
        if city in cyrillic:
            queries.append(
                {
                    "name": catalog[i]["name"].title(),
                    "city": cyrillic[city],
                    "phone": f"+7 (495) {1000 + i}",
                }
            )
    queries.append({"name": "Иван Петров", "city": "Тверь", "phone": "+7 (482) 2000"})
    qi = np.repeat(np.arange(len(queries)), len(catalog))
    ei = np.tile(np.arange(len(catalog)), len(queries))
    model = fit_record_model(catalog, queries, qi, ei)
    decided = decide(model.posteriors(model.score(queries, qi, ei)), qi, ei)
    want = [cities.index(c) for c in cities if c in cyrillic]
    assert decided.entity[:3].tolist() == want
    assert decided.status[3] == "novel"


def test_part_numbers_one_digit_apart_are_different_parts() -> None:
    rng = random.Random(3)
    catalog = [
        {"part": f"AX-{n:05d}", "maker": rng.choice(["acme", "globex", "initech"])}
        for n in rng.sample(range(10_000, 99_999), 200)
    ]
    queries = [dict(catalog[i]) for i in range(100)]
    # each query's candidates: itself and its part number's neighbours by one digit
    qi, ei = [], []
    for q in range(100):
        for e in range(len(catalog)):
            a, b = catalog[q]["part"], catalog[e]["part"]
            if e == q or sum(x != y for x, y in zip(a, b, strict=True)) == 1 or e < 3:
                qi.append(q)
                ei.append(e)
    for k in range(30):  # parts of another series, in no catalog entry
        queries.append({"part": f"QZ-{k:05d}", "maker": "acme"})
        qi += [100 + k] * 3
        ei += [k, k + 1, k + 2]
    fields = [FieldSpec("part", "code"), FieldSpec("maker", "category")]
    model = fit_record_model(catalog, queries, qi, ei, fields=fields)
    decided = decide(model.posteriors(model.score(queries, qi, ei)), qi, ei)
    assert decided.entity[:100].tolist() == list(range(100))
    assert "matched" not in decided.status[100:]


def test_pairs_judged_alone_for_deduplication(people: dict[str, Any]) -> None:
    catalog = people["catalog"][:100]
    qi, ei = _candidates(catalog, catalog, k=5)
    keep = qi != ei
    model = fit_record_model(
        catalog, catalog, qi[keep], ei[keep], exclusive=False, exclude_self=True
    )
    scores = model.score(catalog, qi[keep], ei[keep])
    same = [catalog[a] == catalog[b] for a, b in zip(qi[keep], ei[keep], strict=True)]
    assert all(p > 0.5 for p, s in zip(scores.probability, same, strict=True) if s)
    assert model.exclusive is False


def test_misaligned_pairs_and_positions_out_of_range_are_refused() -> None:
    catalog = [{"name": "a"}, {"name": "b"}]
    with pytest.raises(ValueError, match="query positions"):
        fit_record_model(catalog, catalog, [0, 1], [0])
    with pytest.raises(ValueError, match="out of range"):
        fit_record_model(catalog, catalog, [0], [5])


def test_a_catalog_with_nothing_to_compare_is_refused() -> None:
    with pytest.raises(ValueError, match="no field to compare"):
        fit_record_model([{"notes": "x"}], [{"notes": "x"}], [0], [0], kinds={"notes": "skip"})
