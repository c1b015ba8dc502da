"""The Ray Data engine on a real local Ray (one per module: start-up costs seconds)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from nem_llm import Matcher, MatcherSettings
from nem_llm._jobs.batch import MatchJob, run_match_job
from nem_llm.config import Limits
from nem_llm.sim import SimConfig, run_simulator
from nem_llm.testing import FakeEmbedder

ray = pytest.importorskip("ray")

from nem_llm.integrations.ray import (  # noqa: E402
    match_dataset,
    prepare_index,
    run_ray_job,
    split_limits,
)

# Ray Data copies its own deprecated context fields internally (ray 2.60): not our code
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
    # a real local Ray on 2 shared cores: start-up and actor pools take minutes under load
    pytest.mark.timeout(600),
]

FIXTURES = Path(__file__).parent / "data"
CATALOG = FIXTURES / "restaurants_catalog.jsonl"
QUERIES = FIXTURES / "restaurants_queries.jsonl"


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _temp_dir=str(tmp_path_factory.mktemp("r")),
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    with run_simulator(SimConfig(seed=3)) as sim:
        yield sim.base_url


def test_split_limits_never_lets_the_fleet_exceed_the_global_limits() -> None:
    limits = Limits(concurrency=16, rpm=600, tpm=90_000, budget_tokens=1001, budget_usd=1.0)
    share = split_limits(limits, 3)
    assert share.rpm is not None and share.tpm is not None
    assert 3 * share.rpm <= 600 and 3 * share.tpm <= 90_000
    assert share.budget_tokens is not None and 3 * share.budget_tokens <= 1001
    assert share.budget_usd is not None and 3 * share.budget_usd <= 1.0
    assert 3 * share.concurrency <= 16


def test_prepare_index_saves_the_index_once(tmp_path: Path) -> None:
    embedder = FakeEmbedder()
    settings = MatcherSettings(index_dir=tmp_path / "idx")
    prepare_index(CATALOG, settings, embedder)
    calls = embedder.calls
    prepare_index(CATALOG, settings, embedder)
    assert calls > 0 and embedder.calls == calls


def _job(tmp_path: Path, name: str, base_url: str) -> MatchJob:
    return MatchJob(
        catalog=CATALOG,
        queries=QUERIES,
        out=tmp_path / f"{name}.jsonl",
        settings=MatcherSettings(base_url=base_url, accept_threshold=0.8, label_budget=0),
    )


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.usefixtures("local_ray")
def test_the_ray_engine_writes_the_local_engines_rows(tmp_path: Path, sim_url: str) -> None:
    local = _job(tmp_path, "local", sim_url)
    asyncio.run(run_match_job(local, matcher_factory=partial(Matcher, embedder=FakeEmbedder())))
    remote = _job(tmp_path, "ray", sim_url)
    summary = run_ray_job(remote, actors=2, embedder=FakeEmbedder())
    keys = ("id", "index", "line", "status", "entity_id", "decided_by", "reason")
    want = [{k: r[k] for k in keys} for r in _rows(local.out)]
    got = [{k: r[k] for k in keys} for r in _rows(remote.out)]
    assert got == want
    assert summary.rows_total == len(want)
    assert {r["decided_by"] for r in got} >= {"llm"}


@pytest.mark.usefixtures("local_ray")
def test_match_dataset_keeps_every_rows_id(tmp_path: Path) -> None:
    items = [{"id": f"row{i}", "query": q} for i, q in enumerate(["jiraffe", "fenix", "spago"])]
    ds = ray.data.from_items(items)
    out = match_dataset(
        ds,
        catalog=str(CATALOG),
        settings=MatcherSettings(index_dir=tmp_path / "idx", llm=False),
        actors=2,
        embedder=FakeEmbedder(),
    )
    rows = out.take_all()
    assert sorted(r["id"] for r in rows) == ["row0", "row1", "row2"]
    by_id = {r["id"]: r for r in rows}
    assert (by_id["row0"]["status"], by_id["row0"]["entity_id"]) == ("matched", "zagat-25")
