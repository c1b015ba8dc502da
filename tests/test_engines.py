"""Engine parity: every engine honours every option with the local engine's rows, or refuses.

The matrix is engine (ray, batch-api) x option (where, prompt attributes, rewrite, encoder,
saved index, catalog column mapping, strategy, threshold). Each cell runs the same job on
the local engine and on the other one against one simulator over real HTTP (and a real
local Ray cluster) and compares the result rows: status, entity, who decided, every
candidate with its score, the prompt tokens the LLM was sent (an option that changes the
prompt and is dropped shows here) and the names a rewrite used. A refusal is a
``ConfigError`` naming the option, before any work.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nem_llm import MatcherSettings
from nem_llm._jobs.runs import MatchJob
from nem_llm.catalog import CatalogColumns
from nem_llm.errors import ConfigError
from nem_llm.integrations.engines import make_engine
from nem_llm.sim import BatchSimConfig, SimConfig, run_simulator
from nem_llm.testing import FakeEmbedder

ray = pytest.importorskip("ray")

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*"),
    # a real local Ray on 2 shared cores: start-up and actor pools take minutes under load
    pytest.mark.timeout(900),
]

CATALOG = """code,label,alt,country,type
AD-CAN,Canillo,,AD,parish
FR-CAN,Canillo,,FR,commune
FR-PAR,Paris,Lutece|Lutetia,FR,commune
US-PAR,Paris,,US,city
US-AUS,Austin,,US,city
FR-ANT,Antibes,Antipolis,FR,commune
"""
QUERIES = """id,text,cc
q1,Canillo,AD
q2,Canillo,FR
q3,Paris,US
q4,Lutetia,
q5,Parls,FR
q6,Austn,
q7,Atlantis,
q8,Antipol,FR
"""
#: the gold answers the simulator's oracle gives (by query text; null: not in the catalog)
GOLD = {"Canillo": "AD-CAN", "Paris": "US-PAR", "Lutetia": "FR-PAR", "Parls": "FR-PAR",
        "Austn": "US-AUS", "Atlantis": None, "Antipol": "FR-ANT"}  # fmt: skip
COLUMNS = CatalogColumns(id="code", name="label", aliases="alt")
RENAMED = CatalogColumns(id="ident", name="title", aliases="others", alias_separator=";")
# every non-novel row goes to the LLM, so options that shape the prompt reach it; no
# labelled sample and no audit unless the case sets them (they would answer some rows
# from the cache and hide the prompt's tokens)
BASE: dict[str, Any] = {
    "columns": COLUMNS,
    "accept_threshold": 1.5,
    "novel_threshold": 0.0,
    "label_budget": 0,
    "audit_rate": 0.0,
}

#: option -> (settings changes, job changes)
OPTIONS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "where": ({}, {"where": {"country": "cc"}}),
    "prompt_attributes": ({"prompt_attributes": ("country", "type")}, {}),
    "rewrite": ({"rewrite": True, "novel_threshold": 0.99}, {}),
    "encoder": ({"encoder": "torch"}, {}),
    "index_dir": ({"index_dir": "SAVED"}, {}),
    "columns": ({"columns": RENAMED}, {}),
    "strategy": ({}, {"strategy": "sequential"}),
    "threshold": ({"accept_threshold": 0.6, "margin": 0.0}, {}),
    "label_budget": ({"label_budget": 3}, {}),
    "audit_rate": ({"audit_rate": 1.0, "accept_threshold": 0.6, "margin": 0.0}, {}),
}
#: what an engine refuses, by option (everything else it must honour)
REFUSED = {("batch-api", "rewrite"), ("batch-api", "audit_rate")}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("engines")
    (root / "places.csv").write_text(CATALOG, encoding="utf-8")
    (root / "mentions.csv").write_text(QUERIES, encoding="utf-8")
    # the same places under other column names, aliases split by ";"
    renamed = CATALOG.replace("code,label,alt", "ident,title,others").replace("|", ";")
    (root / "renamed.csv").write_text(renamed, encoding="utf-8")
    # the simulator names entities for the rewrite call from a plain JSONL catalog
    with (root / "places.jsonl").open("w", encoding="utf-8") as fh:
        for line in CATALOG.splitlines()[1:]:
            code, label, alt, *_ = line.split(",")
            entity = {"id": code, "name": label, "aliases": [a for a in alt.split("|") if a]}
            fh.write(json.dumps(entity) + "\n")
    lines = [json.dumps({"query": q, "gold_id": g}) for q, g in GOLD.items()]
    (root / "gold.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def sim_url(files: Path) -> Iterator[str]:
    # an oracle: its answers (and the rewrite call's catalog names) depend on the
    # candidates it is shown; batches complete at once
    config = SimConfig(
        seed=3,
        policy="oracle",
        gold_path=str(files / "gold.jsonl"),
        catalog_path=str(files / "places.jsonl"),
    )
    with run_simulator(config, batch=BatchSimConfig()) as sim:
        yield sim.base_url


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


@pytest.fixture(autouse=True)
def llm_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sim")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def _job(root: Path, name: str, option: str, sim_url: str) -> MatchJob:
    changes, job_changes = OPTIONS[option]
    settings = dict(BASE, base_url=sim_url, model="sim", **changes)
    if settings.get("index_dir") == "SAVED":
        saved = root / f"saved-{name}"
        shutil.copytree(root / "saved", saved)
        settings["index_dir"] = saved
    catalog = root / ("renamed.csv" if option == "columns" else "places.csv")
    return MatchJob(
        catalog=catalog,
        queries=root / "mentions.csv",
        out=root / f"{name}.jsonl",
        settings=MatcherSettings(**settings),
        query_column="text",
        id_column="id",
        **job_changes,
    )


def _run(engine: str, job: MatchJob, embedder: Any) -> list[dict[str, Any]]:
    options: dict[str, Any] = {"embedder": embedder}
    if engine == "ray":
        options["actors"] = 2
    elif engine == "batch-api":
        options["poll_interval"] = 0.05
    runner = make_engine(engine, **options)
    runner.check(job)
    asyncio.run(runner.run_async(job, stop=None, on_progress=None))
    return [json.loads(line) for line in job.out.read_text(encoding="utf-8").splitlines()]


def _view(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What must agree across engines.

    Prices differ (the Batch API costs half). A repeated query is answered from the
    decision cache where its twin finished first (the local engine's sequential strategy)
    and by the LLM where both ran at once (or on two Ray actors, which share no cache):
    either way the LLM decided, on the same prompt, so a query's prompt tokens are read
    from whichever of its rows called the LLM.
    """
    sent = {r["query"]: r["usage"]["prompt_tokens"] for r in rows if r["decided_by"] == "llm"}
    return [
        {
            "id": r["id"],
            "index": r["index"],
            "status": r["status"],
            "entity_id": r["entity_id"],
            "decided_by": "llm" if r["decided_by"] == "cache" else r["decided_by"],
            "candidates": [(c["entity_id"], c["score"]) for c in r["candidates"]],
            "prompt_tokens": sent.get(r["query"]),
            "rewritten_as": r["rewritten_as"],
            "audit": r["audit"],
            "error_type": r["error_type"],
        }
        for r in sorted(rows, key=lambda r: r["index"])
    ]


def _aligned(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    """Equal rows; prompt tokens compared where both engines sent the query's prompt (a
    row answered from a labelled sample's cache on one side shows none)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x["prompt_tokens"] is None or y["prompt_tokens"] is None:
            x, y = dict(x, prompt_tokens=None), dict(y, prompt_tokens=None)
        assert x == y
    return True


@pytest.fixture(scope="module")
def saved_index(files: Path) -> Path:
    """An index built once with the fake encoder: engines must load it, never rebuild."""
    from nem_llm import Matcher

    settings = MatcherSettings(**dict(BASE, index_dir=files / "saved", llm=False))
    with Matcher(files / "places.csv", settings, embedder=FakeEmbedder()) as m:
        m.fit()
    return files / "saved"


@pytest.mark.usefixtures("local_ray", "saved_index")
@pytest.mark.parametrize("engine", ["ray", "batch-api"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_an_engine_gives_the_local_rows_or_refuses_the_option(
    files: Path, sim_url: str, engine: str, option: str
) -> None:
    # the encoder case runs the real encoders (torch here); the others a fake one
    embedder = None if option == "encoder" else FakeEmbedder()
    job = _job(files, f"{engine}-{option}", option, sim_url)
    if (engine, option) in REFUSED:
        with pytest.raises(ConfigError, match=option.replace("_", "[-_]")):
            make_engine(engine).check(job)
        return
    local = _run("local", _job(files, f"local-{engine}-{option}", option, sim_url), embedder)
    other = _run(engine, job, embedder)
    assert _aligned(_view(other), _view(local))
    assert len(local) == len(QUERIES.splitlines()) - 1
    if option == "rewrite":
        assert any(r["rewritten_as"] for r in local)  # the option really did something
    if option == "audit_rate":
        assert any(r["audit"] for r in local)  # auto decisions were audited
    if option == "prompt_attributes":
        plain = _run("local", _job(files, f"plain-{engine}", "strategy", sim_url), embedder)
        assert sum(r["usage"]["prompt_tokens"] for r in local) > sum(
            r["usage"]["prompt_tokens"] for r in plain
        )
    if option == "index_dir":
        manifest = Path(job.settings.index_dir or "") / "manifest.json"
        built = (files / "saved" / "manifest.json").read_bytes()
        assert manifest.read_bytes() == built  # loaded, not rebuilt


def test_every_engine_is_made_by_name_and_an_unknown_one_is_refused() -> None:
    for name in ("local", "ray", "batch-api"):
        assert make_engine(name).name == name
    with pytest.raises(ConfigError, match="spark"):
        make_engine("spark")
