"""Incremental catalog updates: add/remove/update without a rebuild, persisted atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nem_llm._retrieval.index import HybridIndex, catalog_fingerprint
from nem_llm.catalog import load_catalog
from nem_llm.errors import CatalogError
from nem_llm.matcher import Matcher
from nem_llm.testing import FakeEmbedder

pytest.importorskip("faiss")


@pytest.fixture(autouse=True)
def no_llm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


@pytest.fixture(params=["exact", "ann"])
def matcher(request: pytest.FixtureRequest, countries: list[dict[str, Any]]) -> Any:
    with Matcher(countries, embedder=FakeEmbedder(), search=request.param) as m:
        m.fit()
        yield m


def ids(matcher: Matcher, query: str, k: int = 10) -> list[str]:
    return [c.entity_id for c in matcher.match(query, top_k=k).candidates]


def test_added_entity_is_found_by_the_next_query(matcher: Matcher) -> None:
    matcher.add_entities([{"id": "IT", "name": "Italy", "aliases": ["Italia"]}])
    assert ids(matcher, "Italia")[0] == "IT"
    assert matcher.catalog.by_id["IT"] == len(matcher.catalog) - 1


def test_removed_entity_is_never_returned(matcher: Matcher) -> None:
    matcher.remove_entities(["DE"])
    assert "DE" not in ids(matcher, "Deutschland")
    assert "DE" not in matcher.catalog.by_id


def test_updated_entity_is_found_by_its_new_alias(matcher: Matcher) -> None:
    matcher.update_entities([{"id": "AT", "name": "Austria", "aliases": ["Ostarrichi"]}])
    found = matcher.match("Ostarrichi").candidates
    assert (found[0].entity_id, found[0].matched_form) == ("AT", "Ostarrichi")
    assert "Österreich" not in matcher.catalog.forms


async def test_async_add_is_awaitable(countries: list[dict[str, Any]]) -> None:
    async with Matcher(countries, embedder=FakeEmbedder(), search="ann") as m:
        await m.fit_async()
        await m.add_entities_async([{"id": "ES", "name": "Spain", "aliases": ["España"]}])
        assert (await m.match_async("Espana")).candidates[0].entity_id == "ES"


def test_adding_a_present_id_is_refused(matcher: Matcher) -> None:
    with pytest.raises(CatalogError, match="already in the catalog"):
        matcher.add_entities([{"id": "DE", "name": "Germany again"}])


def test_removing_an_unknown_id_is_refused(matcher: Matcher) -> None:
    with pytest.raises(CatalogError, match="unknown entity id 'XX'"):
        matcher.remove_entities(["XX"])


def test_a_refused_change_leaves_the_index_as_it_was(matcher: Matcher) -> None:
    before = ids(matcher, "Germany")
    with pytest.raises(CatalogError):
        matcher.update_entities([{"id": "XX", "name": "Nowhere"}])
    assert ids(matcher, "Germany") == before


def test_changes_are_persisted_with_the_new_fingerprint(
    countries: list[dict[str, Any]], tmp_path: Path
) -> None:
    path = tmp_path / "idx"
    with Matcher(countries, embedder=FakeEmbedder(), search="ann", index_dir=path) as m:
        m.fit()
        m.add_entities([{"id": "IT", "name": "Italy"}])
        m.remove_entities(["FR"])
        live = m.catalog
    loaded = HybridIndex.load(path)
    assert catalog_fingerprint(loaded.catalog) == catalog_fingerprint(live)
    assert HybridIndex.read_manifest(path)["version"] == 2
    [found] = loaded.search(FakeEmbedder().encode(["Italy"]), ["Italy"], 10)
    assert found[0].entity_id == "IT" and "FR" not in {c.entity_id for c in found}


def test_a_matcher_reopens_an_updated_index_with_the_saved_catalog(
    countries: list[dict[str, Any]], tmp_path: Path
) -> None:
    path = tmp_path / "idx"
    with Matcher(countries, embedder=FakeEmbedder(), index_dir=path) as m:
        m.fit()
        m.add_entities([{"id": "IT", "name": "Italy"}])
    saved = HybridIndex.saved_catalog(path)
    embedder = FakeEmbedder()
    # fixed thresholds: the catalog changed, so a label-free calibration would probe again
    fixed = {"accept_threshold": 0.92, "margin": 0.05, "novel_threshold": 0.45}
    with Matcher(saved, embedder=embedder, index_dir=path, **fixed) as m:
        m.fit()
        assert embedder.texts_encoded == 0  # loaded, not rebuilt
        assert m.match("Italy").candidates[0].entity_id == "IT"


def test_the_original_catalog_is_refused_by_an_updated_index(
    countries: list[dict[str, Any]], tmp_path: Path
) -> None:
    path = tmp_path / "idx"
    with Matcher(countries, embedder=FakeEmbedder(), index_dir=path) as m:
        m.fit()
        m.add_entities([{"id": "IT", "name": "Italy"}])
    with pytest.raises(Exception, match="different catalog"):
        HybridIndex.load(path, load_catalog(countries))


def test_a_crash_mid_save_leaves_the_previous_index_usable(
    countries: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "idx"
    catalog = load_catalog(countries)
    embedder = FakeEmbedder()
    index = HybridIndex(catalog, embedder.encode(list(catalog.forms)), index="ann")
    index.save(path)
    new = load_catalog([{"id": "IT", "name": "Italy"}])
    index.apply_changes(add=new, add_vectors=embedder.encode(list(new.forms)))
    calls = {"n": 0}
    real_save = np.save

    def crash_on_third_file(file: Any, arr: Any, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk gone")
        real_save(file, arr, *args, **kwargs)

    monkeypatch.setattr(np, "save", crash_on_third_file)
    with pytest.raises(OSError, match="disk gone"):
        index.save(path)
    monkeypatch.setattr(np, "save", real_save)
    old = HybridIndex.load(path)
    assert catalog_fingerprint(old.catalog) == catalog_fingerprint(catalog)
    [found] = old.search(embedder.encode(["Germany"]), ["Germany"], 3)
    assert found[0].entity_id == "DE"


def test_the_next_save_after_a_crash_clears_the_half_written_version(
    countries: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "idx"
    catalog = load_catalog(countries)
    index = HybridIndex(catalog, FakeEmbedder().encode(list(catalog.forms)))
    monkeypatch.setattr(np, "save", _raise)
    with pytest.raises(OSError):
        index.save(path)
    monkeypatch.undo()
    index.save(path)
    assert sorted(p.name for p in path.iterdir() if p.is_dir()) == [
        HybridIndex.read_manifest(path)["current"]
    ]


def _raise(*args: Any, **kwargs: Any) -> None:
    raise OSError("disk gone")


def test_removing_every_entity_is_refused(matcher: Matcher) -> None:
    with pytest.raises(CatalogError, match="never empty"):
        matcher.remove_entities([e.id for e in matcher.catalog.entities])


@pytest.fixture(params=["exact", "ann"])
def places(request: pytest.FixtureRequest) -> Any:
    entities = [
        {"id": "PAR-FR", "name": "Paris", "attributes": {"country": "FR"}},
        {"id": "PAR-US", "name": "Paris", "aliases": ["Paris TX"], "attributes": {"country": "US"}},
    ]
    with Matcher(entities, embedder=FakeEmbedder(), search=request.param) as m:
        m.fit()
        yield m


def test_a_filter_used_before_an_addition_sees_the_added_entity(places: Matcher) -> None:
    assert "LYO" not in ids_of(places.match("Lyon", where={"country": "FR"}))
    places.add_entities([{"id": "LYO", "name": "Lyon", "attributes": {"country": "FR"}}])
    assert ids_of(places.match("Lyon", where={"country": "FR"}))[0] == "LYO"


def test_a_filter_used_before_an_update_follows_the_updated_attributes(places: Matcher) -> None:
    assert ids_of(places.match("Paris", where={"country": "US"})) == ["PAR-US"]
    places.update_entities([{"id": "PAR-US", "name": "Paris", "attributes": {"country": "FR"}}])
    assert ids_of(places.match("Paris", where={"country": "US"})) == []
    assert set(ids_of(places.match("Paris", where={"country": "FR"}))) == {"PAR-FR", "PAR-US"}


def ids_of(result: Any) -> list[str]:
    return [c.entity_id for c in result.candidates]
