"""Files and messages: what ``nem-llm`` does with the files new users write.

Job-level tests run ``run_match_job`` in this process with the fake embedder and no LLM
(cheap, deterministic); command-level tests run the typer app in this process
(``typer.testing.CliRunner``) for what fails before any model is loaded.
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from nem_llm import Matcher, MatcherSettings
from nem_llm._jobs.batch import run_match_job
from nem_llm._jobs.runs import MatchJob
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


# -- item 14: messages -----------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def commands() -> list[tuple[tuple[str, ...], Any]]:
    import typer

    from nem_llm.cli import app

    found: list[tuple[tuple[str, ...], Any]] = []

    def walk(cmd: Any, path: tuple[str, ...]) -> None:
        if hasattr(cmd, "commands"):
            for name, sub in cmd.commands.items():
                walk(sub, (*path, name))
        else:
            found.append((path, cmd))

    walk(typer.main.get_command(app), ())
    return found


def help_text(path: tuple[str, ...], columns: int = 80) -> str:
    from typer.testing import CliRunner

    from nem_llm.cli import app

    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("path", [p for p, _ in commands()], ids=" ".join)
def test_help_at_80_columns_shows_every_option_name_in_full(path: tuple[str, ...]) -> None:
    text = help_text(path)
    words = {word.strip(",") for word in text.split()}
    cmd = dict(commands())[path]
    for param in cmd.params:
        if getattr(param, "hidden", False):
            continue
        for name in param.opts:
            if name.startswith("-"):
                assert name in words, f"{' '.join(path)}: {name} is cut in:\n{text}"
    assert max(len(line) for line in text.splitlines()) <= 80
    # a flag named inside a help text is not cut at one of its hyphens either
    assert not re.search(r"--[a-z]+(-[a-z]+)*-\n", text), text


@pytest.mark.parametrize("path", [p for p, _ in commands()], ids=" ".join)
def test_plain_flags_show_no_type(path: tuple[str, ...]) -> None:
    assert "<bool>" not in help_text(path)


@pytest.mark.parametrize("path", [p for p, _ in commands()], ids=" ".join)
def test_every_flag_has_help(path: tuple[str, ...]) -> None:
    """Every option and argument of every command (sim and serve included) says what it is."""
    cmd = dict(commands())[path]
    missing = [
        p.opts[0]
        for p in cmd.params
        if not getattr(p, "hidden", False) and not (getattr(p, "help", None) or "").strip()
    ]
    assert missing == [], f"{' '.join(path)}: no help for {missing}"


def test_every_command_is_checked_for_help() -> None:
    """The walk behind the help tests finds the commands, sim and serve among them."""
    paths = {p for p, _ in commands()}
    assert {("sim",), ("serve",), ("discover",), ("match",)} <= paths


def test_help_keeps_brackets_and_documents_formats_and_the_alias_separator() -> None:
    text = " ".join(help_text(("match",), columns=200).split())
    assert "nem_llm[frames]" in text
    assert "Parquet" in text and "--delimiter" in text
    assert "--alias-separator <str> Splits a catalog's aliases cell" in text
    assert "default '|' (Python|CPython|py3)" in text


def test_say_warn_fail_and_the_stats_table_keep_brackets(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from nem_llm.cli._app import err, fail, say, stats_table, warn
    from nem_llm.models import RunStats

    say("report written: out[1].html")
    warn("pip install 'nem_llm[report]'")
    fail("no [bold]tags[/bold] here")
    err.print(stats_table("t", RunStats(), {"output": "results[v2].jsonl"}))
    text = capsys.readouterr().err
    assert "out[1].html" in text
    assert "warning: pip install 'nem_llm[report]'" in text
    assert "error: no [bold]tags[/bold] here" in text
    assert "results[v2].jsonl" in text


def _prints_needing_escape(path: Path) -> list[str]:
    """``x.print(f"...{value}...")`` calls that could let rich markup eat ``[...]``."""
    import ast

    bad: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "print"
            and node.args
        ):
            continue
        if any(k.arg == "markup" for k in node.keywords):
            continue
        arg = node.args[0]
        values = (
            [v.value for v in arg.values if isinstance(v, ast.FormattedValue)]
            if isinstance(arg, ast.JoinedStr)
            else []
        )
        unescaped = [
            v
            for v in values
            if not (isinstance(v, ast.Call) and getattr(v.func, "id", "") == "escape")
        ]
        renders = isinstance(arg, ast.Call) and getattr(
            arg.func, "attr", getattr(arg.func, "id", "")
        ).startswith("render")
        if unescaped or renders:
            bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return bad


def test_every_print_of_interpolated_text_escapes_rich_markup() -> None:
    files = sorted((ROOT / "nem_llm" / "cli").glob("*.py")) + sorted(
        (ROOT / "nem_llm" / "_jobs").rglob("*.py")
    )
    assert len(files) > 30  # the globs still find the packages
    bad = [where for path in files for where in _prints_needing_escape(path)]
    assert bad == []


# -- item 12: one label reader -----------------------------------------------------------------

LABELS_CSV = "qid,query,gold_id\nl1,USA,US\nl2,Atlantis,\nl3,Deutschland,DE\nl4,Narnia,NA\n"


def test_an_empty_gold_cell_is_absent_and_every_format_reads_the_same(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nem_llm._jobs.labels import read_labels

    csv_path = write(tmp_path / "l.csv", LABELS_CSV)
    jsonl_path = write(
        tmp_path / "l.jsonl",
        '{"qid": "l1", "query": "USA", "gold_id": "US"}\n'
        '{"qid": "l2", "query": "Atlantis", "gold_id": null}\n'
        '{"qid": "l3", "query": "Deutschland", "gold_id": "DE"}\n'
        '{"qid": "l4", "query": "Narnia", "gold_id": "NA"}\n',
    )
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"qid": "l1", "query": "USA", "gold_id": "US"},
                {"qid": "l2", "query": "Atlantis", "gold_id": None},
                {"qid": "l3", "query": "Deutschland", "gold_id": "DE"},
                {"qid": "l4", "query": "Narnia", "gold_id": "NA"},
            ]
        ),
        tmp_path / "l.parquet",
    )
    expected = [("USA", "US"), ("Atlantis", None), ("Deutschland", "DE"), ("Narnia", "NA")]
    for path in (csv_path, jsonl_path, tmp_path / "l.parquet"):
        labels = read_labels(path)
        assert labels.pairs() == expected, path
        assert [label.row_id for label in labels.items] == ["l1", "l2", "l3", "l4"]


def test_each_unknown_gold_id_gets_one_warning_naming_it(tmp_path: Path) -> None:
    from nem_llm._jobs.labels import read_labels

    path = write(tmp_path / "l.csv", LABELS_CSV + "l5,Narnia!,NA\nl6,Oz,OZ\n")
    labels = read_labels(path, catalog_ids={"US", "DE", "FR"})
    assert labels.unknown == {"NA": [5, 6], "OZ": [7]}
    warnings = labels.warnings()
    assert len(warnings) == 2
    assert warnings[0].startswith(f"{path}:5: gold id 'NA' is not in the catalog (and 1 more")
    assert warnings[1].startswith(f"{path}:7: gold id 'OZ' is not in the catalog")


def test_a_labels_file_without_gold_ids_is_one_clear_error(tmp_path: Path) -> None:
    from nem_llm._jobs.labels import read_labels
    from nem_llm.errors import InputError

    path = write(tmp_path / "l.csv", "qid,query\nl1,USA\n")
    with pytest.raises(InputError, match=r"l\.csv:2: no 'gold_id' field"):
        read_labels(path)


async def test_eval_reads_a_csv_with_empty_gold_cells_as_absent_and_warns_per_unknown_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nem_llm._jobs.eval_job as eval_job

    monkeypatch.setattr(eval_job, "Matcher", FACTORY)
    catalog = write(tmp_path / "catalog.csv", CATALOG)
    labels = write(tmp_path / "l.csv", LABELS_CSV)
    kept: list[tuple[Any, str | None]] = []
    said: list[str] = []
    report = await eval_job.run_eval(
        catalog=catalog,
        queries=labels,
        settings=MatcherSettings(),
        keep_results=kept,
        on_warning=said.append,
    )
    assert [gold for _, gold in kept] == ["US", None, "DE", "NA"]
    assert report.queries == 4
    assert len(said) == 1 and "gold id 'NA' is not in the catalog" in said[0]


async def test_report_labels_reads_the_csv_eval_reads(tmp_path: Path) -> None:
    from nem_llm._jobs.report import build_report

    queries = write(tmp_path / "q.csv", "id,query\nl1,USA\nl2,Atlantis\nl3,Deutschland\n")
    await run_match_job(job(tmp_path, queries), matcher_factory=FACTORY)
    labels = write(tmp_path / "l.csv", LABELS_CSV)
    data = build_report(tmp_path / "out.jsonl", labels=labels)
    assert data.golds == ["US", None, "DE"]


def test_review_labels_are_read_by_the_same_reader(tmp_path: Path) -> None:
    from nem_llm._jobs.review import load_labels

    path = write(
        tmp_path / "labels.jsonl", '{"query": "a", "gold_id": ""}\n{"query": "b", "gold_id": "X"}\n'
    )
    assert load_labels(path) == [("a", None), ("b", "X")]


async def test_report_and_review_read_parquet_results(tmp_path: Path) -> None:
    from nem_llm._jobs.report import build_report
    from nem_llm._jobs.review import export_review

    queries = write(tmp_path / "q.csv", "id,query\nl1,USA\nl2,Atlantis\nl3,Deutschland\n")
    await run_match_job(job(tmp_path, queries, "r.parquet"), matcher_factory=FACTORY)
    data = build_report(tmp_path / "r.parquet", labels=write(tmp_path / "l.csv", LABELS_CSV))
    assert [r.query for r in data.results] == ["USA", "Atlantis", "Deutschland"]
    assert data.golds == ["US", None, "DE"]
    assert export_review(tmp_path / "r.parquet", tmp_path / "review.csv").rows_read == 3
