"""Files and messages: what ``nem-llm`` does with the files new users write.

Job-level tests run ``run_match_job`` in this process with the fake embedder and no LLM
(cheap, deterministic); command-level tests run the typer app in this process
(``typer.testing.CliRunner``) for what fails before any model is loaded.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from nem_llm import Matcher, MatcherSettings
from nem_llm.jobs.batch import run_match_job
from nem_llm.jobs.runs import MatchJob
from nem_llm.testing import FakeEmbedder

FACTORY = partial(Matcher, embedder=FakeEmbedder())
CATALOG = """id,name,aliases
US,United States,USA|America
DE,Germany,Deutschland
FR,France,
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def job(tmp_path: Path, queries: Path, out: str = "out.jsonl", **kwargs: Any) -> MatchJob:
    catalog = write(tmp_path / "catalog.csv", CATALOG)
    return MatchJob(
        catalog=catalog,
        queries=queries,
        out=tmp_path / out,
        settings=MatcherSettings(llm=False),
        **kwargs,
    )


# -- item 11: a stray quote loses no row ---------------------------------------------------


async def test_a_stray_quote_loses_no_row_and_progress_reaches_its_total(tmp_path: Path) -> None:
    lines = [f"q{i:02d}," + ('"haskel' if i == 8 else f"query {i}") for i in range(15)]
    queries = write(tmp_path / "q.csv", "id,query\n" + "\n".join(lines) + "\n")
    seen: list[tuple[int, int | None]] = []
    summary = await run_match_job(
        job(tmp_path, queries),
        on_progress=lambda done, total, _: seen.append((done, total)),
        matcher_factory=FACTORY,
    )
    out = rows(tmp_path / "out.jsonl")
    assert summary.rows_total == len(out) == 15
    assert [r["line"] for r in out] == list(range(2, 17))
    errors = [r for r in out if r["status"] == "error"]
    assert [(r["line"], r["error_type"]) for r in errors] == [(10, "input")]
    assert "never closed" in errors[0]["error"]
    assert seen[-1] == (15, 15)


# -- item 13: Parquet out ------------------------------------------------------------------


async def test_parquet_out_holds_the_rows_the_jsonl_out_holds(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    queries = write(tmp_path / "q.csv", "id;query\nq1;USA\nq2;\nq3;Deutschland\nq4;Atlantis\n")
    await run_match_job(job(tmp_path, queries, "a.jsonl"), matcher_factory=FACTORY)
    await run_match_job(job(tmp_path, queries, "b.parquet"), matcher_factory=FACTORY)
    expected = rows(tmp_path / "a.jsonl")
    got = pq.read_table(tmp_path / "b.parquet").to_pylist()
    keys = ("id", "line", "index", "query", "status", "entity_id", "decided_by", "error")
    assert [{k: r[k] for k in keys} for r in got] == [{k: r[k] for k in keys} for r in expected]
    assert [len(r["candidates"]) for r in got] == [len(r["candidates"]) for r in expected]
    assert not (tmp_path / "b.parquet.tmp").exists()


def test_parquet_out_without_pyarrow_is_refused_up_front_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys

    from nem_llm.errors import ConfigError

    queries = write(tmp_path / "q.csv", "id,query\nq1,USA\n")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ConfigError, match=r"--out r\.parquet needs pyarrow.*nem_llm\[frames\]"):
        job(tmp_path, queries, "r.parquet")


async def test_parquet_queries_and_catalog_match_like_csv(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.Table.from_pylist(
            [
                {"id": "US", "name": "United States", "aliases": ["USA", "America"]},
                {"id": "DE", "name": "Germany", "aliases": ["Deutschland"]},
                {"id": "FR", "name": "France", "aliases": []},
            ]
        ),
        tmp_path / "c.parquet",
    )
    pq.write_table(
        pa.Table.from_pylist([{"id": "q1", "query": "USA"}, {"id": "q2", "query": "Germany"}]),
        tmp_path / "q.parquet",
    )
    queries = write(tmp_path / "q.csv", "id,query\nq1,USA\nq2,Germany\n")
    await run_match_job(job(tmp_path, queries, "csv.jsonl"), matcher_factory=FACTORY)
    parquet_job = MatchJob(
        catalog=tmp_path / "c.parquet",
        queries=tmp_path / "q.parquet",
        out=tmp_path / "pq.jsonl",
        settings=MatcherSettings(llm=False),
    )
    await run_match_job(parquet_job, matcher_factory=FACTORY)
    keys = ("id", "status", "entity_id", "score")
    from_csv = [{k: r[k] for k in keys} for r in rows(tmp_path / "csv.jsonl")]
    assert [{k: r[k] for k in keys} for r in rows(tmp_path / "pq.jsonl")] == from_csv
    assert [r["line"] for r in rows(tmp_path / "pq.jsonl")] == [1, 2]
