"""The review queue: export unsure rows to a CSV, import a person's decisions as labels."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from nem_llm import MatcherSettings
from nem_llm._jobs.batch import MatchJob, run_match_job
from nem_llm._jobs.review import LABELS_FILE, export_review, import_review, load_labels
from nem_llm._llm.cache import DecisionCache
from nem_llm.errors import InputError
from nem_llm.matcher import Matcher
from nem_llm.models import Candidate, MatchResult
from nem_llm.testing import FakeEmbedder, FakeLLM

QUERIES = ["USA", "Deutschland", "Grossbritannien", "Atlantis", "Frankreich"]


def _result(query: str, status: str, **fields: Any) -> dict[str, Any]:
    cands = [
        Candidate(entity_id="US", name="United States", score=0.71),
        Candidate(entity_id="UK", name="United Kingdom", score=0.64),
    ]
    row = MatchResult(query=query, status=status, candidates=cands, **fields)  # type: ignore[arg-type]
    return {"id": query.lower(), "line": 1, **row.model_dump(mode="json")}


def _write_results(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        return list(csv.DictReader(fh))


def _fill(path: Path, decide: Callable[[dict[str, str]], str]) -> None:
    rows = _read_csv(path)
    for row in rows:
        row["decision"] = decide(row)
    with path.open("w", encoding="utf-8-sig", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_export_queues_review_novel_and_low_confidence_rows(tmp_path: Path) -> None:
    results = _write_results(
        tmp_path / "out.jsonl",
        [
            _result("USA", "matched", entity_id="US", decided_by="embedding", score=0.99),
            _result("Amerika", "review", reason="ambiguous; no LLM configured"),
            _result("Atlantis", "novel", decided_by="embedding"),
            _result("Vereinigte", "matched", entity_id="US", decided_by="llm", confidence=0.4),
            _result("Staaten", "matched", entity_id="US", decided_by="llm", confidence=0.95),
        ],
    )
    summary = export_review(results, tmp_path / "review.csv")
    rows = _read_csv(tmp_path / "review.csv")
    assert [(r["query"], r["why"]) for r in rows] == [
        ("Amerika", "review"),
        ("Atlantis", "novel"),
        ("Vereinigte", "low confidence"),
    ]
    assert summary.rows_read == 5
    assert rows[0]["reason"] == "ambiguous; no LLM configured"
    assert (rows[0]["candidate_1_id"], rows[0]["candidate_2_name"]) == ("US", "United Kingdom")
    assert all(r["decision"] == "" for r in rows)


def test_export_without_novel_skips_novel_rows(tmp_path: Path) -> None:
    results = _write_results(
        tmp_path / "out.jsonl",
        [_result("Atlantis", "novel", decided_by="embedding"), _result("Amerika", "review")],
    )
    export_review(results, tmp_path / "review.csv", include_novel=False)
    assert [r["query"] for r in _read_csv(tmp_path / "review.csv")] == ["Amerika"]


def test_formula_like_cells_are_escaped_and_restored_on_import(tmp_path: Path) -> None:
    results = _write_results(tmp_path / "out.jsonl", [_result("=cmd|' /c calc'!A1", "review")])
    export_review(results, tmp_path / "review.csv")
    assert _read_csv(tmp_path / "review.csv")[0]["query"] == "'=cmd|' /c calc'!A1"
    _fill(tmp_path / "review.csv", lambda row: "US")
    (tmp_path / "state").mkdir()
    import_review(tmp_path / "review.csv", tmp_path / "state")
    assert load_labels(tmp_path / "state" / LABELS_FILE) == [("=cmd|' /c calc'!A1", "US")]


def test_import_of_an_unknown_id_names_the_csv_line(tmp_path: Path) -> None:
    results = _write_results(
        tmp_path / "out.jsonl", [_result("Amerika", "review"), _result("Atlantis", "novel")]
    )
    export_review(results, tmp_path / "review.csv")
    _fill(tmp_path / "review.csv", lambda row: "NOPE" if row["query"] == "Atlantis" else "US")
    (tmp_path / "state").mkdir()
    with pytest.raises(InputError, match=r"review\.csv:3: decision 'NOPE'") as caught:
        import_review(tmp_path / "review.csv", tmp_path / "state")
    assert caught.value.line == 3
    assert not (tmp_path / "state" / LABELS_FILE).exists()  # nothing written


def test_import_accepts_any_catalog_id_when_given_the_catalog(tmp_path: Path) -> None:
    results = _write_results(tmp_path / "out.jsonl", [_result("Deutschland", "novel")])
    export_review(results, tmp_path / "review.csv")
    _fill(tmp_path / "review.csv", lambda row: "DE")
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text(
        '{"id": "US", "name": "United States"}\n{"id": "DE", "name": "Germany"}\n',
        encoding="utf-8",
    )
    (tmp_path / "state").mkdir()
    import_review(tmp_path / "review.csv", tmp_path / "state", catalog=catalog)
    assert load_labels(tmp_path / "state" / LABELS_FILE) == [("Deutschland", "DE")]


def test_import_rejects_one_query_decided_two_ways(tmp_path: Path) -> None:
    results = _write_results(
        tmp_path / "out.jsonl", [_result("Amerika", "review"), _result("Amerika", "review")]
    )
    export_review(results, tmp_path / "review.csv")
    answers = iter(["US", "none"])
    _fill(tmp_path / "review.csv", lambda row: next(answers))
    (tmp_path / "state").mkdir()
    with pytest.raises(InputError, match=r"csv:3: .*decided 'none' here and 'US' on line 2"):
        import_review(tmp_path / "review.csv", tmp_path / "state")


def test_import_stores_reviewed_labels_and_a_labels_file(tmp_path: Path) -> None:
    results = _write_results(
        tmp_path / "out.jsonl",
        [_result("Amerika", "review"), _result("Atlantis", "novel"), _result("Mars", "novel")],
    )
    export_review(results, tmp_path / "review.csv")
    answers = {"Amerika": "US", "Atlantis": "NONE", "Mars": ""}
    _fill(tmp_path / "review.csv", lambda row: answers[row["query"]])
    (tmp_path / "state").mkdir()
    summary = import_review(tmp_path / "review.csv", tmp_path / "state")
    assert (summary.decisions, summary.blank) == (2, 1)
    assert load_labels(tmp_path / "state" / LABELS_FILE) == [("Amerika", "US"), ("Atlantis", None)]
    with DecisionCache(tmp_path / "state" / "run.sqlite") as cache:
        reviewed = cache.reviewed()
    assert {q: r.entity_id for q, r in reviewed.items()} == {"Amerika": "US", "Atlantis": None}


# -- the round trip through a real match job -----------------------------------------------


@pytest.fixture
def job(tmp_path: Path, countries: list[dict[str, Any]]) -> MatchJob:
    catalog = tmp_path / "catalog.jsonl"
    catalog.write_text("".join(json.dumps(e) + "\n" for e in countries), encoding="utf-8")
    queries = tmp_path / "mentions.txt"
    queries.write_text("\n".join(QUERIES) + "\n", encoding="utf-8")
    # accept_threshold > 1: every non-novel query goes to the LLM
    return MatchJob(
        catalog=catalog,
        queries=queries,
        out=tmp_path / "out.jsonl",
        settings=MatcherSettings(
            accept_threshold=1.01, novel_threshold=0.0, model="fake", label_budget=0
        ),
    )


def _factory(llm: FakeLLM) -> Callable[..., Matcher]:
    def make(catalog: Any, settings: MatcherSettings, **kwargs: Any) -> Matcher:
        http = httpx.AsyncClient(transport=httpx.MockTransport(llm))
        client = AsyncOpenAI(api_key="test", base_url="http://fake/v1", http_client=http)
        return Matcher(catalog, settings, client=client, embedder=FakeEmbedder(), **kwargs)

    return make


def _rows(path: Path) -> dict[str, dict[str, Any]]:
    return {r["query"]: r for r in map(json.loads, path.read_text().splitlines())}


async def test_rerun_after_import_makes_no_llm_calls_and_returns_reviewed_answers(
    job: MatchJob, tmp_path: Path
) -> None:
    # the LLM is unsure about everything: every row is queued for review
    llm = FakeLLM(lambda query, ids: {"entity_id": ids[0], "confidence": 0.3})
    await run_match_job(job, matcher_factory=_factory(llm))
    first_calls = len(llm.requests)
    assert first_calls == len(QUERIES)
    export_review(job.out, tmp_path / "review.csv")
    answers = {"USA": "US", "Deutschland": "DE", "Grossbritannien": "UK", "Atlantis": "none"}
    _fill(tmp_path / "review.csv", lambda row: answers.get(row["query"], ""))
    summary = import_review(tmp_path / "review.csv", job.state_dir, catalog=job.catalog)
    assert summary.rows_reopened == 4

    rerun = await run_match_job(job, matcher_factory=_factory(llm))

    assert len(llm.requests) == first_calls  # no LLM call on the rerun
    assert (rerun.rows_resumed, rerun.stats.total) == (1, 4)
    rows = _rows(job.out)
    assert list(rows) == QUERIES  # input order, every row once
    for query, answer in answers.items():
        assert rows[query]["decided_by"] == "human"
        assert rows[query]["entity_id"] == (None if answer == "none" else answer)
    assert rows["Atlantis"]["status"] == "novel"
    assert rows["Frankreich"]["decided_by"] == "llm"  # not reviewed: kept as it was


async def test_reviewed_labels_win_in_a_fresh_matcher_sharing_the_cache(
    tmp_path: Path, countries: list[dict[str, Any]]
) -> None:
    results = _write_results(tmp_path / "out.jsonl", [_result("Amerika", "review")])
    export_review(results, tmp_path / "review.csv")
    _fill(tmp_path / "review.csv", lambda row: "US")
    (tmp_path / "state").mkdir()
    import_review(tmp_path / "review.csv", tmp_path / "state")
    llm = FakeLLM()
    settings = MatcherSettings(cache=tmp_path / "state" / "run.sqlite", accept_threshold=1.01)
    async with _factory(llm)(countries, settings) as matcher:
        await matcher.fit_async()
        result = await matcher.match_async("  Amerika ")
    assert (result.entity_id, result.decided_by, llm.requests) == ("US", "human", [])


def test_cli_import_error_exits_2_naming_the_line(tmp_path: Path) -> None:
    results = _write_results(tmp_path / "out.jsonl", [_result("Amerika", "review")])
    cli = [sys.executable, "-m", "nem_llm.cli", "review"]
    export = subprocess.run(
        [*cli, "export", "--results", str(results), "--to", str(tmp_path / "review.csv")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert export.returncode == 0, export.stderr
    _fill(tmp_path / "review.csv", lambda row: "XX")
    (tmp_path / "state").mkdir()
    imported = subprocess.run(
        [*cli, "import", str(tmp_path / "review.csv"), "--state", str(tmp_path / "state")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert imported.returncode == 2
    assert "review.csv:2: decision 'XX'" in imported.stderr


async def test_the_labels_file_trains_a_matcher(
    tmp_path: Path, countries: list[dict[str, Any]]
) -> None:
    queries = [f"United States {i}" for i in range(12)] + [f"Atlantis {i}" for i in range(12)]
    results = _write_results(tmp_path / "out.jsonl", [_result(q, "review") for q in queries])
    export_review(results, tmp_path / "review.csv")
    _fill(tmp_path / "review.csv", lambda row: "US" if "United" in row["query"] else "none")
    (tmp_path / "state").mkdir()
    summary = import_review(tmp_path / "review.csv", tmp_path / "state")
    labels = load_labels(summary.labels_file)
    async with Matcher(countries, embedder=FakeEmbedder()) as matcher:
        await matcher.fit_async(training_data=labels)  # calibration needs >= 20 labels
    assert len(labels) == 24
    assert matcher.thresholds.calibrated
