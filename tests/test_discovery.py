"""Novel-entity discovery: clustering novel mentions, LLM proposals (simulated), promote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from openai import AsyncOpenAI

from nem_llm._jobs.discovery import (
    ClusterConfig,
    cluster_mentions,
    discover_async,
    novel_mentions,
    promote,
    similarity_matrix,
    write_proposals,
)
from nem_llm.catalog import load_catalog
from nem_llm.config import Limits
from nem_llm.errors import InputError
from nem_llm.models import Candidate, MatchResult
from nem_llm.sim import SimConfig, SimServer, run_simulator
from nem_llm.testing import FakeEmbedder, FakeLLM

# three missing entities, mentioned several ways, and two one-off mentions
GROUPS = {
    "croatian": ["Kroatisch", "Kroatisch", "Croate", "Croata", "Kroatiska", "хорватский"],
    "miwok": ["Zentral-Sierra-Miwok", "Miwok, Zentral-Sierra", "Miwok Sierra centrale"],
    "meohang": ["Ost-Meohang", "Meohang, Östliches", "Meohang orientale"],
}
LONERS = ["Quechua de Ayacucho", "Tlingit"]
CATALOG = [
    {"id": "hrv-old", "name": "Old Croatian", "aliases": []},
    {"id": "eng", "name": "English", "aliases": ["Englisch"]},
]


def _results(path: Path) -> Path:
    rows = []
    texts = [t for group in GROUPS.values() for t in group] + LONERS
    for i, text in enumerate(texts):
        cands = [Candidate(entity_id="hrv-old", name="Old Croatian", score=0.4)]
        r = MatchResult(query=text, index=i, status="novel", candidates=cands)
        rows.append({"id": f"q{i}", **r.model_dump(mode="json")})
    rows.append(MatchResult(query="English", status="matched", entity_id="eng").model_dump())
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


@pytest.fixture
def results(tmp_path: Path) -> Path:
    return _results(tmp_path / "out.jsonl")


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in CATALOG), encoding="utf-8")
    return path


def _mentions_by_cluster(rows: list[Any]) -> list[set[str]]:
    return [set(r.mentions) for r in rows]


def test_novel_mentions_are_distinct_counted_and_most_frequent_first(results: Path) -> None:
    mentions = novel_mentions(results)
    assert mentions[0].text == "Kroatisch" and mentions[0].count == 2
    assert len(mentions) == sum(len(set(g)) for g in GROUPS.values()) + len(LONERS)
    assert "English" not in {m.text for m in mentions}  # matched rows are not novel


def test_clustering_recovers_known_clusters_and_drops_singletons() -> None:
    rng = np.random.default_rng(7)
    sizes = [6, 5, 4, 3, 2]  # five clusters, then five loners
    centres = np.linalg.qr(rng.standard_normal((64, 10)))[0].T  # orthonormal directions
    points, truth = [], []
    for k, size in enumerate(sizes):
        points += [centres[k] + 0.05 * rng.standard_normal(64) for _ in range(size)]
        truth += [k] * size
    points += [centres[5 + j] for j in range(5)]
    truth += [-1] * 5
    vectors = np.array(points)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    clusters = cluster_mentions(vectors @ vectors.T, [1] * len(truth), ClusterConfig())
    found = sorted(sorted(truth[i] for i in c.members) for c in clusters)
    assert found == sorted([k] * size for k, size in enumerate(sizes))


def test_similar_spellings_cluster_by_character_ngrams() -> None:
    texts = ["Zentral-Sierra-Miwok", "Miwok, Zentral-Sierra", "zentral sierra miwok", *LONERS]
    sim = similarity_matrix(texts, None, lexical_weight=1.0)
    clusters = cluster_mentions(sim, [1] * len(texts), ClusterConfig(lexical_weight=1.0))
    assert [c.members for c in clusters] == [(0, 1, 2)]


def test_points_without_close_neighbours_make_no_clusters() -> None:
    sim = np.eye(4)  # nothing is similar to anything else
    assert cluster_mentions(sim, [1, 1, 1, 1], ClusterConfig()) == []


def test_a_mention_repeated_min_size_times_is_a_cluster() -> None:
    clusters = cluster_mentions(np.eye(3), [1, 2, 1], ClusterConfig(min_size=2))
    assert [(c.members, c.size) for c in clusters] == [((1,), 2)]


def test_unstable_clusters_are_dropped() -> None:
    # a chain: 0-1 similar at the threshold's edge, so the pair exists at 0.4 but not at 0.35
    sim = np.array([[1.0, 0.62, 0.0], [0.62, 1.0, 0.0], [0.0, 0.0, 1.0]])
    loose = ClusterConfig(min_stability=0.0)
    assert len(cluster_mentions(sim, [1, 1, 1], loose)) == 1
    assert cluster_mentions(sim, [1, 1, 1], ClusterConfig(min_stability=0.9)) == []


def test_hdbscan_is_available_as_the_other_method() -> None:
    rng = np.random.default_rng(0)
    centres = np.eye(8)[:2]
    points = np.vstack([c + 0.01 * rng.standard_normal((6, 8)) for c in centres])
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    config = ClusterConfig(method="hdbscan", min_size=3, min_stability=0.0)
    clusters = cluster_mentions(points @ points.T, [1] * 12, config)
    assert sorted(c.members for c in clusters) == [tuple(range(6)), tuple(range(6, 12))]


async def test_simulator_proposes_the_most_frequent_mention_as_the_name(
    results: Path, catalog: Path, tmp_path: Path
) -> None:
    async with SimServer(SimConfig()) as sim:
        client = AsyncOpenAI(base_url=sim.base_url, api_key="sim", max_retries=0)
        rows = await discover_async(
            results,
            catalog=catalog,
            client=client,
            model="nem-llm-sim",
            embedder=FakeEmbedder(),
            cache=tmp_path / "cache.sqlite",
        )
        await client.close()
        calls = len(sim.requests)
    croatian = next(r for r in rows if "Kroatisch" in r.mentions)
    assert croatian.status == "proposed" and croatian.proposal is not None
    assert croatian.proposal.name == "Kroatisch"
    assert croatian.proposal.is_new and croatian.proposed_id == "new-kroatisch"
    assert set(croatian.proposal.members) == set(croatian.mentions)
    assert calls == len(rows) == sum(r.llm_calls for r in rows)


async def test_proposals_are_cached(results: Path, catalog: Path, tmp_path: Path) -> None:
    llm = FakeLLM()
    http = httpx.AsyncClient(transport=httpx.MockTransport(llm))
    client = AsyncOpenAI(api_key="t", base_url="http://fake/v1", http_client=http)
    kwargs: dict[str, Any] = {
        "catalog": catalog,
        "client": client,
        "embedder": FakeEmbedder(),
        "cache": tmp_path / "cache.sqlite",
    }
    first = await discover_async(results, **kwargs)
    sent = len(llm.requests)
    again = await discover_async(results, **kwargs)
    await client.close()
    assert sent == len(first) > 0
    assert len(llm.requests) == sent
    assert {r.status for r in again} == {"cached"}
    assert [r.proposal for r in again] == [r.proposal for r in first]


async def test_an_existing_entity_the_retrieval_missed_comes_back_with_its_id(
    tmp_path: Path, catalog: Path
) -> None:
    rows = [
        MatchResult(
            query=text,
            status="novel",
            candidates=[Candidate(entity_id="hrv-old", name="Old Croatian", score=0.4)],
        ).model_dump()
        for text in ["Old Croatian", "old croatian", "Old-Croatian"]
    ]
    results = tmp_path / "old.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    llm = FakeLLM()
    http = httpx.AsyncClient(transport=httpx.MockTransport(llm))
    client = AsyncOpenAI(api_key="t", base_url="http://fake/v1", http_client=http)
    found = await discover_async(results, catalog=catalog, client=client, embedder=FakeEmbedder())
    await client.close()
    assert [(r.proposal.is_new, r.proposal.existing_id) for r in found if r.proposal] == [
        (False, "hrv-old")
    ]
    assert found[0].proposed_id is None


async def test_budget_stops_the_proposal_calls(results: Path, catalog: Path) -> None:
    llm = FakeLLM()
    http = httpx.AsyncClient(transport=httpx.MockTransport(llm))
    client = AsyncOpenAI(api_key="t", base_url="http://fake/v1", http_client=http)
    rows = await discover_async(
        results,
        catalog=catalog,
        client=client,
        embedder=FakeEmbedder(),
        limits=Limits(concurrency=1, budget_tokens=1),  # the first call spends it
    )
    await client.close()
    assert len(rows) >= 2
    assert [r.status for r in rows].count("proposed") == 1
    assert {r.status for r in rows} == {"proposed", "budget"}
    assert len(llm.requests) == 1


async def test_without_an_llm_clusters_are_still_written(results: Path, tmp_path: Path) -> None:
    rows = await discover_async(results, embedder=FakeEmbedder())
    out = write_proposals(rows, tmp_path / "proposals.jsonl")
    written = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert {r["status"] for r in written} == {"no_llm"}
    assert written[0]["size"] >= written[-1]["size"]


async def test_promote_appends_approved_new_entities_and_aliases(
    results: Path, catalog: Path, tmp_path: Path
) -> None:
    llm = FakeLLM()
    http = httpx.AsyncClient(transport=httpx.MockTransport(llm))
    client = AsyncOpenAI(api_key="t", base_url="http://fake/v1", http_client=http)
    rows = await discover_async(results, catalog=catalog, client=client, embedder=FakeEmbedder())
    await client.close()
    rows[0].approved = True
    out = write_proposals(rows, tmp_path / "proposals.jsonl")
    summary = promote(out, catalog)
    entities = load_catalog(catalog).entities
    assert (summary.added, summary.skipped) == (1, len(rows) - 1)
    added = entities[-1]
    assert added.id == rows[0].proposed_id and added.name == rows[0].proposal.name  # type: ignore[union-attr]
    assert set(rows[0].mentions) <= {added.name, *added.aliases}


def test_promote_rejects_an_id_already_in_the_catalog(tmp_path: Path, catalog: Path) -> None:
    proposals = tmp_path / "p.jsonl"
    row = {"approved": True, "proposed_id": "eng", "proposal": {"name": "X", "is_new": True}}
    proposals.write_text(json.dumps(row) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"p\.jsonl:1: id 'eng' is already in the catalog"):
        promote(proposals, catalog)


def _discover_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``nem-llm discover ARGS`` as a user would (no OPENAI_* from the environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    return subprocess.run(
        [sys.executable, "-m", "nem_llm.cli", "discover", *args],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def _discover_with_sim(results: Path, catalog: Path, out: Path) -> list[dict[str, Any]]:
    """Discover with the simulator; the proposals written, all of them ``proposed``."""
    with run_simulator(SimConfig()) as sim:
        found = _discover_cli(
            "--catalog", str(catalog), "--results", str(results), "--out", str(out),
            "--base-url", sim.base_url, "--model", "nem-llm-sim", "--lexical-weight", "1",
        )  # fmt: skip
    assert found.returncode == 0, found.stderr
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert rows and {r["status"] for r in rows} == {"proposed"}
    return rows


def test_cli_discovers_with_the_simulator_then_promotes(
    results: Path, catalog: Path, tmp_path: Path
) -> None:
    out = tmp_path / "proposals.jsonl"
    rows = _discover_with_sim(results, catalog, out)
    rows[0]["approved"] = True
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    promoted = _discover_cli("--catalog", str(catalog), "--promote", str(out))
    assert promoted.returncode == 0, promoted.stderr
    assert "1 entities added" in promoted.stderr
    assert load_catalog(catalog).entities[-1].id == rows[0]["proposed_id"]


def test_cli_discovers_from_parquet_results_as_from_jsonl(
    results: Path, catalog: Path, tmp_path: Path
) -> None:
    """``match --out r.parquet`` writes Parquet results; discover reads them like JSONL."""
    from nem_llm._parquet import write_parquet_rows

    rows = [json.loads(line) for line in results.read_text(encoding="utf-8").splitlines()]
    parquet = tmp_path / "out.parquet"
    write_parquet_rows(parquet, lambda: iter(rows))  # the writer behind `match --out`
    assert [(m.text, m.count) for m in novel_mentions(parquet)] == [
        (m.text, m.count) for m in novel_mentions(results)
    ]
    proposals = _discover_with_sim(parquet, catalog, tmp_path / "proposals.jsonl")
    mentions = {m for r in proposals for m in r["mentions"]}
    assert mentions <= {t for group in GROUPS.values() for t in group}


def test_promote_removes_the_stale_index_of_a_match_job(tmp_path: Path, catalog: Path) -> None:
    index = tmp_path / "out.jsonl.state" / "index"
    index.mkdir(parents=True)
    (index / "manifest.json").write_text("{}", encoding="utf-8")
    proposals = tmp_path / "p.jsonl"
    row = {"approved": True, "proposed_id": "new-x", "proposal": {"name": "X", "is_new": True}}
    proposals.write_text(json.dumps(row) + "\n", encoding="utf-8")
    summary = promote(proposals, catalog, state=index.parent)
    assert summary.index_removed == index and not index.exists()
    assert load_catalog(catalog).entities[-1].id == "new-x"
