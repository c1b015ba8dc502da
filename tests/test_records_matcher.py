"""Record queries through the Matcher, the CLI's --fields, frames and ``nem-llm dedupe``.

A small people catalog of our own (names, street, town, birth date) with mentions that
carry the same fields, typo'd or missing; no LLM, no labels: the field model fit on the
workload routes them.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from nem_llm import Matcher
from nem_llm._jobs.dedupe import dedupe_catalog
from nem_llm.testing import FakeEmbedder

FIRST = ["anna", "ben", "clara", "david", "emma", "felix", "greta", "hugo", "ida", "jonas",
         "karl", "lena", "max", "nora", "otto", "paula", "quinn", "rosa", "sam",
         "tina"]  # fmt: skip
LAST = ["meier", "schulz", "wagner", "becker", "hoffmann", "koch", "richter", "klein", "wolf",
        "neumann", "schwarz", "braun", "zimmer", "kruger", "hartmann", "lange"]  # fmt: skip
TOWNS = ["berlin", "hamburg", "munich", "cologne", "bremen", "dresden", "leipzig", "essen"]


def _typo(text: str, rng: random.Random) -> str:
    if len(text) < 4:
        return text
    i = rng.randrange(1, len(text) - 1)
    return text[:i] + text[i + 1 :]


@pytest.fixture(scope="module")
def people() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[str | None]]:
    rng = random.Random(11)
    catalog: list[dict[str, Any]] = []
    for i in range(160):
        first, last = rng.choice(FIRST), rng.choice(LAST)
        attrs = {
            "first": first,
            "last": last,
            "street": f"{rng.randrange(1, 200)} {rng.choice(['main', 'park', 'mill'])} street",
            "town": rng.choice(TOWNS),
            "dob": f"19{rng.randrange(30, 99)}{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}",
        }
        catalog.append({"id": f"p{i}", "name": f"{first} {last}", "attributes": attrs})
    queries: list[dict[str, Any]] = []
    gold: list[str | None] = []
    for e in catalog[:120]:  # present, typo'd or with a field missing
        attrs = dict(e["attributes"])
        field = rng.choice(["first", "last", "street"])
        attrs[field] = _typo(attrs[field], rng)
        if rng.random() < 0.3:
            attrs.pop("town")
        queries.append({"query": f"{attrs['first']} {attrs.get('last', '')}", "attributes": attrs})
        gold.append(e["id"])
    for _ in range(40):  # absent people: new names, towns and dates
        attrs = {"first": rng.choice(FIRST), "last": rng.choice(["vogel", "haas", "frank"]),
                 "street": f"{rng.randrange(200, 400)} river road", "town": "kiel",
                 "dob": f"20{rng.randrange(0, 9)}0101"}  # fmt: skip
        queries.append({"query": f"{attrs['first']} {attrs['last']}", "attributes": attrs})
        gold.append(None)
    return catalog, queries, gold


def _scored(results: list[Any], gold: list[str | None]) -> tuple[float, int, int]:
    """(accuracy, auto decisions, wrong auto decisions)."""
    right = sum(
        (r.status == "matched" and r.entity_id == g) or (r.status == "novel" and g is None)
        for r, g in zip(results, gold, strict=True)
    )
    auto = [(r, g) for r, g in zip(results, gold, strict=True) if r.decided_by == "embedding"]
    wrong = sum(
        (r.status == "matched" and r.entity_id != g) or (r.status == "novel" and g is not None)
        for r, g in auto
    )
    return right / len(gold), len(auto), wrong


@pytest.fixture(autouse=True)
def no_llm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def test_record_queries_are_routed_by_their_fields_without_labels_or_an_llm(
    people: tuple[list[dict[str, Any]], list[dict[str, Any]], list[str | None]],
) -> None:
    catalog, queries, gold = people
    with Matcher(catalog, llm=False, embedder=FakeEmbedder(), index_description=True) as m:
        m.fit(workload=queries, show_progress=False)
        assert m.policy.fields is not None
        assert set(m.policy.fields.fields) >= {"first", "last", "dob"}
        results = m.match_batch(queries)
    accuracy, auto, wrong = _scored(results, gold)
    assert wrong <= 0.01 * auto
    assert auto >= 0.8 * len(queries)
    assert accuracy >= 0.8
    decided = next(r for r in results if r.fields is not None and r.status == "matched")
    assert decided.fields is not None and decided.fields.probability >= 0.5
    assert set(decided.fields.contributions) == set(m.policy.fields.fields)


def test_a_text_query_against_a_record_catalog_keeps_working(
    people: tuple[list[dict[str, Any]], list[dict[str, Any]], list[str | None]],
) -> None:
    catalog, queries, _ = people
    with Matcher(catalog, llm=False, embedder=FakeEmbedder()) as m:
        m.fit(workload=queries, show_progress=False)
        result = m.match(catalog[0]["name"])
    assert result.fields is None  # no fields given: routed on the text, as before
    assert result.status in ("matched", "review")


def test_a_records_attributes_must_be_a_mapping() -> None:
    with Matcher([{"id": "a", "name": "Ann"}], llm=False, embedder=FakeEmbedder()) as m:
        m.fit(show_progress=False)
        [bad] = m.match_batch([{"query": "Ann", "attributes": ["not", "a", "mapping"]}])
    assert (bad.status, bad.error_type) == ("error", "input")


@pytest.mark.timeout(600)
def test_the_cli_reads_record_rows_by_their_fields_columns(
    tmp_path: Path,
    people: tuple[list[dict[str, Any]], list[dict[str, Any]], list[str | None]],
) -> None:
    catalog, queries, _ = people
    (tmp_path / "people.jsonl").write_text("".join(json.dumps(e) + "\n" for e in catalog))
    with (tmp_path / "mentions.jsonl").open("w") as fh:
        for i, q in enumerate(queries):
            fh.write(json.dumps({"id": f"q{i}", "query": q["query"], **q["attributes"]}) + "\n")
    args = [sys.executable, "-m", "nem_llm.cli", "match", "--catalog", "people.jsonl",
            "--queries", "mentions.jsonl", "--out", "out.jsonl", "--llm", "off", "--quiet",
            "--index-description"]  # fmt: skip
    fields = [
        x for f in ("first", "last", "street", "town", "dob") for x in ("--fields", f"{f}={f}")
    ]
    done = subprocess.run([*args, *fields], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert len(rows) == len(queries)
    assert sum(r["fields"] is not None for r in rows) == len(rows)


async def test_dedupe_clusters_a_catalogs_duplicates_with_one_golden_record_each() -> None:
    rng = random.Random(3)
    base = [
        {"first": f, "last": last, "town": rng.choice(TOWNS), "dob": f"19{50 + i:02d}0101"}
        for i, (f, last) in enumerate(zip(FIRST, LAST, strict=False))
    ]
    entities = [{"id": f"e{i}", "name": f"{b['first']} {b['last']}", "attributes": b}
                for i, b in enumerate(base)]  # fmt: skip
    # three duplicates: typo'd names, a missing town
    for i, j in ((0, 100), (3, 101), (7, 102)):
        dup = dict(base[i], last=_typo(base[i]["last"], rng))
        dup.pop("town")
        entities.append({"id": f"e{j}", "name": f"{dup['first']} {dup['last']}", "attributes": dup})
    result = await dedupe_catalog(entities, embedder=FakeEmbedder(), threshold=0.9)
    by_id = {e.id: result.cluster_of[i] for i, e in enumerate(result.catalog.entities)}
    for i, j in ((0, 100), (3, 101), (7, 102)):
        assert by_id[f"e{i}"] == by_id[f"e{j}"]
    assert result.duplicates == 6 and len(result.golden) == 3
    golden = {g["cluster"]: g for g in result.golden}["e0"]
    assert golden["last"] == base[0]["last"] and golden["town"] == base[0]["town"]


def test_a_frames_columns_are_a_records_fields(
    people: tuple[list[dict[str, Any]], list[dict[str, Any]], list[str | None]],
) -> None:
    pd = pytest.importorskip("pandas")
    from nem_llm.integrations.frames import match_frame

    catalog, queries, _ = people
    frame = pd.DataFrame(
        [{"text": q["query"], **{f"q_{k}": v for k, v in q["attributes"].items()}}
         for q in queries]
    )  # fmt: skip
    fields = {f: f"q_{f}" for f in ("first", "last", "street", "town", "dob")}
    with Matcher(catalog, llm=False, embedder=FakeEmbedder(), index_description=True) as m:
        m.fit(workload=queries, show_progress=False)
        out = match_frame(m, frame, column="text", fields=fields)
        plain = m.match_batch(queries)
    got = [None if pd.isna(e) else e for e in out["entity_id"].tolist()]
    assert got == [r.entity_id for r in plain]
    assert out["status"].tolist() == [r.status for r in plain]


def test_the_report_draws_the_closest_record_call_as_a_waterfall(
    people: tuple[list[dict[str, Any]], list[dict[str, Any]], list[str | None]],
) -> None:
    pytest.importorskip("matplotlib")
    from nem_llm._jobs.report import ReportData, hardest_record, render_html

    catalog, queries, _ = people
    with Matcher(catalog, llm=False, embedder=FakeEmbedder(), index_description=True) as m:
        m.fit(workload=queries, show_progress=False)
        results = m.match_batch(queries)
    hardest = hardest_record(results)
    assert hardest is not None and hardest.fields is not None
    assert all(
        abs(hardest.fields.probability - 0.5) <= abs(r.fields.probability - 0.5)
        for r in results
        if r.fields is not None
    )
    page = render_html(ReportData(results=results, golds=None, title="t", source="s"))
    assert 'id="chart-waterfall"' in page and "field by field" in page


def test_a_route_the_user_closes_is_closed_for_the_fields_too(
    people: tuple[list[dict[str, Any]], list[dict[str, Any]], list[str | None]],
) -> None:
    catalog, queries, _ = people
    closed = {"accept_threshold": 1.5, "novel_threshold": 0.0}  # every query to the LLM
    with Matcher(catalog, llm=False, embedder=FakeEmbedder(), **closed) as m:
        m.fit(workload=queries, show_progress=False)
        results = m.match_batch(queries[:20])
    assert all(r.decided_by != "embedding" for r in results)
    assert all(r.fields is not None for r in results)  # the evidence is still shown


async def test_the_simulators_oracle_knows_a_record_querys_gold_by_its_text(
    people: tuple[list[dict[str, Any]], list[dict[str, Any]], list[str | None]],
    tmp_path: Path,
) -> None:
    """A record query's prompt block is its text plus a ``fields:`` line: the oracle
    still finds its gold (with no error it answers every query right, over real HTTP)."""
    from openai import AsyncOpenAI

    from nem_llm.sim import SimConfig, SimServer

    catalog, queries, gold = people
    path = tmp_path / "gold.jsonl"
    path.write_text(
        "".join(
            json.dumps({"query": q["query"], "gold_id": g}) + "\n"
            for q, g in zip(queries, gold, strict=True)
        )
    )
    config = SimConfig(policy="oracle", gold_path=str(path), oracle_error_rate=0.0, seed=1)
    closed = {"accept_threshold": 1.5, "novel_threshold": 0.0}  # every query to the LLM
    async with SimServer(config) as sim:
        client = AsyncOpenAI(base_url=sim.base_url, api_key="sim", max_retries=0)
        async with Matcher(catalog, client=client, embedder=FakeEmbedder(), label_budget=0,
                           audit_rate=0.0, **closed) as m:  # fmt: skip
            await m.fit_async(workload=queries, show_progress=False)
            results = await m.match_batch_async(queries[:30] + queries[-10:])
        await client.close()
    wanted = gold[:30] + gold[-10:]
    assert all(r.decided_by == "llm" for r in results)
    texts = Counter(q["query"] for q in queries)  # the oracle knows a text's one gold
    in_reach = [
        (r, g)
        for r, g in zip(results, wanted, strict=True)
        if texts[r.query] == 1 and (g is None or g in {c.entity_id for c in r.candidates})
    ]
    assert len(in_reach) >= 20 and all(r.entity_id == g for r, g in in_reach)
