"""ANN search (faiss shortlist re-scored exactly): agreement with exact, filters, persistence."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nem_llm._retrieval.index import HybridIndex, catalog_fingerprint
from nem_llm.catalog import Catalog, load_catalog
from nem_llm.errors import ConfigError
from nem_llm.matcher import Matcher
from nem_llm.testing import FakeEmbedder

pytest.importorskip("faiss")

_SYLLABLES = ["ka", "lo", "mi", "ran", "tes", "vu", "gor", "na", "bel", "sha", "ti", "ox"]


def synthetic_entities(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Pronounceable names with an alias each and a ``region`` attribute."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))).title()
        alias = f"{name} {rng.choice(['City', 'Town', 'Port', 'Hills'])}"
        out.append({"id": f"E{i}", "name": name, "aliases": [alias], "region": f"R{i % 10}"})
    return out


def noisy(text: str, rng: random.Random) -> str:
    """Drop one character: a typo-like query."""
    i = rng.randrange(len(text))
    return text[:i] + text[i + 1 :]


@pytest.fixture(scope="module")
def embedder() -> FakeEmbedder:
    return FakeEmbedder(dim=64)


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog(synthetic_entities(600))


@pytest.fixture(scope="module")
def vectors(catalog: Catalog, embedder: FakeEmbedder) -> np.ndarray:
    return embedder.encode(list(catalog.forms))


@pytest.fixture(scope="module")
def queries(catalog: Catalog) -> list[str]:
    rng = random.Random(1)
    return [noisy(catalog.entities[rng.randrange(len(catalog))].name, rng) for _ in range(80)]


@pytest.fixture(scope="module")
def ann(catalog: Catalog, vectors: np.ndarray) -> HybridIndex:
    return HybridIndex(catalog, vectors, index="ann")


@pytest.fixture(scope="module")
def exact(catalog: Catalog, vectors: np.ndarray) -> HybridIndex:
    # the ANN index stores float16 vectors: give exact search the same values
    return HybridIndex(catalog, vectors.astype(np.float16).astype(np.float32), index="exact")


def test_forced_ann_uses_a_faiss_index_on_a_small_catalog(ann: HybridIndex) -> None:
    assert ann.use_ann and ann.form_vectors.dtype == np.float16


def test_auto_stays_exact_on_a_small_catalog(catalog: Catalog, vectors: np.ndarray) -> None:
    assert not HybridIndex(catalog, vectors, index="auto").use_ann


def test_ann_top_10_agrees_with_exact(
    ann: HybridIndex, exact: HybridIndex, embedder: FakeEmbedder, queries: list[str]
) -> None:
    qv = embedder.encode(queries)
    got = ann.search(qv, queries, 10)
    want = exact.search(qv, queries, 10)
    # ties at the 10th place may resolve either way: compare the scores, best first
    for a, e in zip(got, want, strict=True):
        assert [c.score for c in a] == pytest.approx([c.score for c in e], abs=2e-6)


def test_ann_scores_equal_exact_scores_of_the_same_candidates(
    ann: HybridIndex, exact: HybridIndex, embedder: FakeEmbedder, queries: list[str]
) -> None:
    qv = embedder.encode(queries[:10])
    everything = exact.search(qv, queries[:10], len(exact.catalog))
    for got, full in zip(ann.search(qv, queries[:10], 10), everything, strict=True):
        by_id = {c.entity_id: c for c in full}
        for c in got:
            assert c.score == pytest.approx(by_id[c.entity_id].score, abs=2e-6)
            assert c.matched_form == by_id[c.entity_id].matched_form


def test_ann_filter_returns_only_allowed_entities(
    ann: HybridIndex, embedder: FakeEmbedder, queries: list[str]
) -> None:
    allowed = np.array([e.attributes["region"] == "R3" for e in ann.catalog.entities])
    for found in ann.search(embedder.encode(queries), queries, 10, allowed=allowed):
        assert len(found) == 10
        assert all(
            ann.catalog.entities[ann.catalog.by_id[c.entity_id]].attributes["region"] == "R3"
            for c in found
        )


def test_ann_filter_of_far_entities_still_returns_them(
    ann: HybridIndex, embedder: FakeEmbedder
) -> None:
    allowed = np.zeros(len(ann.catalog), dtype=bool)
    allowed[[5, 77]] = True
    [found] = ann.search(embedder.encode(["zzzz qqqq"]), ["zzzz qqqq"], 10, allowed=allowed)
    assert sorted(c.entity_id for c in found) == ["E5", "E77"]


def test_ann_filter_allowing_nothing_returns_empty_lists(
    ann: HybridIndex, embedder: FakeEmbedder
) -> None:
    none = np.zeros(len(ann.catalog), dtype=bool)
    assert ann.search(embedder.encode(["a", "b"]), ["a", "b"], 5, allowed=none) == [[], []]


def test_saved_ann_index_loads_with_the_same_results(
    ann: HybridIndex, embedder: FakeEmbedder, queries: list[str], tmp_path: Path
) -> None:
    ann.save(tmp_path / "idx")
    loaded = HybridIndex.load(tmp_path / "idx", ann.catalog, embedder_name=ann.embedder_name)
    qv = embedder.encode(queries)
    assert loaded.use_ann
    assert loaded.search(qv, queries, 10) == ann.search(qv, queries, 10)


def test_load_without_a_catalog_restores_the_saved_one(ann: HybridIndex, tmp_path: Path) -> None:
    ann.save(tmp_path / "idx")
    loaded = HybridIndex.load(tmp_path / "idx")
    assert catalog_fingerprint(loaded.catalog) == catalog_fingerprint(ann.catalog)


def test_load_refuses_an_index_of_another_catalog(ann: HybridIndex, tmp_path: Path) -> None:
    ann.save(tmp_path / "idx")
    changed = load_catalog(synthetic_entities(600)[:-1])
    with pytest.raises(ConfigError, match="different catalog"):
        HybridIndex.load(tmp_path / "idx", changed)


def test_manifest_carries_the_catalog_fingerprint(ann: HybridIndex, tmp_path: Path) -> None:
    ann.save(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["fingerprint"] == catalog_fingerprint(ann.catalog)
    assert manifest["index"] == "ann"


def test_dense_bytes_per_entity_shrink_under_ann(ann: HybridIndex, exact: HybridIndex) -> None:
    assert ann.dense_nbytes_per_entity() < exact.dense_nbytes_per_entity()


def test_matcher_index_option_reaches_the_index(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with Matcher(catalog, embedder=FakeEmbedder(dim=64), search="ann") as matcher:
        matcher.fit()
        assert matcher.index is not None and matcher.index.use_ann
        assert matcher.match("Kalo").candidates


def test_unknown_index_mode_is_refused(catalog: Catalog, vectors: np.ndarray) -> None:
    with pytest.raises(ConfigError, match="index must be"):
        HybridIndex(catalog, vectors, index="fast")  # type: ignore[arg-type]
