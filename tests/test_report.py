"""The run report: one self-contained HTML page of charts, checked in a real headless browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nem_llm._jobs.report import (
    ReportData,
    build_report,
    confusions,
    largest_novel_groups,
    render_html,
    threshold_curve,
    write_report,
)
from nem_llm.models import Attempt, Candidate, MatchResult, Usage

CLI_DATA = Path(__file__).parent / "data" / "cli"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
RUN_CHARTS = {"scores", "routes", "spend", "retries", "novel"}
LABEL_CHARTS = {"threshold", "confusions"}


def _cands(top: str, score: float) -> list[Candidate]:
    other = "DE" if top != "DE" else "US"
    return [
        Candidate(entity_id=top, name=top, score=score),
        Candidate(entity_id=other, name=other, score=0.3),
    ]


def _results() -> list[MatchResult]:
    retry = Attempt(number=1, outcome="retry", error_type="rate_limit", status_code=429)
    ok = Attempt(number=2, outcome="ok", usage=Usage(total_tokens=120, cost_usd=0.001))
    return [
        MatchResult(query="USA", status="matched", entity_id="US", decided_by="embedding",
                    candidates=_cands("US", 0.97), score=0.97),
        MatchResult(query="Amerika", status="matched", entity_id="US", decided_by="llm",
                    candidates=_cands("US", 0.7), attempts=[retry, ok],
                    usage=Usage(total_tokens=120, cost_usd=0.001)),
        MatchResult(query="Deutschland", status="matched", entity_id="US", decided_by="llm",
                    candidates=_cands("US", 0.6), attempts=[ok],
                    usage=Usage(total_tokens=100, cost_usd=0.001)),
        MatchResult(query="Atlantis", status="novel", decided_by="embedding",
                    candidates=_cands("DE", 0.2)),
        MatchResult(query="atlantis", status="novel", decided_by="embedding",
                    candidates=_cands("DE", 0.2)),
        MatchResult(query="Mars", status="review", candidates=_cands("DE", 0.5)),
    ]  # fmt: skip


GOLDS: list[str | None] = ["US", "US", "DE", None, None, None]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    results = tmp_path / "out.jsonl"
    rows = [{"id": f"q{i}", **r.model_dump(mode="json")} for i, r in enumerate(_results())]
    results.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    labels = tmp_path / "gold.jsonl"
    labels.write_text(
        "".join(
            json.dumps({"qid": f"q{i}", "query": r.query, "gold_id": g}) + "\n"
            for i, (r, g) in enumerate(zip(_results(), GOLDS, strict=True))
        ),
        encoding="utf-8",
    )
    return {"results": results, "labels": labels}


def _chart_ids(page: str) -> set[str]:
    return set(re.findall(r'<figure class="chart" id="chart-([a-z]+)">\s*<figcaption>.*?<svg', page,
                          flags=re.S))  # fmt: skip


def test_threshold_curve_counts_precision_and_coverage_of_the_top_candidate() -> None:
    curve = threshold_curve(_results(), GOLDS, [0.0, 0.65, 0.99])
    # at 0: 6 accepted, top right for USA, Amerika (Deutschland's top is US, gold DE)
    assert curve[0] == (0.0, 2 / 6, 1.0)
    assert curve[1] == (0.65, 1.0, 2 / 6)
    assert curve[2] == (0.99, None, 0.0)


def test_confusions_count_wrong_answers_only() -> None:
    assert confusions(_results(), GOLDS) == [("DE", "US", 1), ("novel", "review", 1)]


def test_report_without_labels_has_the_run_charts_only(files: dict[str, Path]) -> None:
    page = write_report(build_report(files["results"]), files["results"].with_suffix(".html"))
    text = page.read_text(encoding="utf-8")
    assert _chart_ids(text) == RUN_CHARTS
    assert "accuracy" not in text


def test_report_with_labels_adds_threshold_and_confusion_charts(files: dict[str, Path]) -> None:
    data = build_report(files["results"], labels=files["labels"])
    assert data.golds == GOLDS
    text = write_report(data, files["results"].with_suffix(".html")).read_text(encoding="utf-8")
    assert _chart_ids(text) == RUN_CHARTS | LABEL_CHARTS
    assert "<b>0.667</b><span>accuracy</span>" in text  # USA, Amerika, Atlantis x2 of 6


def test_labels_join_by_query_when_ids_differ(files: dict[str, Path], tmp_path: Path) -> None:
    labels = tmp_path / "by_query.jsonl"
    labels.write_text('{"query": " Deutschland", "gold_id": "DE"}\n', encoding="utf-8")
    data = build_report(files["results"], labels=labels)
    assert data.golds == [None, None, "DE", None, None, None]


def test_novel_chart_clusters_mentions_without_proposals(tmp_path: Path) -> None:
    rows = [
        MatchResult(query=q, status="novel")
        for q in ["Kroatisch", "kroatisch", "Kroatisch", "Tlingit", "Meohang"]
    ]
    data = ReportData(results=rows)
    assert largest_novel_groups(data) == [("Kroatisch", 3)]


def test_novel_chart_names_clusters_after_the_proposals(
    files: dict[str, Path], tmp_path: Path
) -> None:
    proposals = tmp_path / "proposals.jsonl"
    rows = [
        {"size": 2, "mentions": ["Atlantis", "atlantis"], "proposal": {"name": "Atlantis"}},
        {"size": 5, "mentions": ["Mu", "Lemuria"], "proposal": None},
    ]
    proposals.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = build_report(files["results"], proposals=proposals)
    assert largest_novel_groups(data) == [("Mu", 5), ("Atlantis", 2)]


def test_report_with_one_novel_row_renders(tmp_path: Path) -> None:
    data = ReportData(results=[MatchResult(query="Atlantis", status="novel")])
    assert "chart-novel" in render_html(data)


def test_report_is_self_contained(files: dict[str, Path]) -> None:
    data = build_report(files["results"], labels=files["labels"])
    text = write_report(data, files["results"].with_suffix(".html")).read_text(encoding="utf-8")
    assert "<script" not in text
    references = re.findall(r'(?:src|href)\s*=\s*"([^"]*)"|url\(([^)]*)\)', text)
    external = [
        ref for pair in references for ref in pair if ref and not ref.startswith(("data:", "#"))
    ]
    assert external == []


def test_cli_report_writes_the_page(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "cli.html"
    run = subprocess.run(
        [sys.executable, "-m", "nem_llm.cli", "report", "--results", str(files["results"]),
         "--labels", str(files["labels"]), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert _chart_ids(out.read_text(encoding="utf-8")) == RUN_CHARTS | LABEL_CHARTS


def test_eval_writes_the_same_report(tmp_path: Path) -> None:
    out = tmp_path / "eval.html"
    run = subprocess.run(
        [sys.executable, "-m", "nem_llm.cli", "eval", "--catalog", str(CLI_DATA / "catalog.jsonl"),
         "--queries", str(CLI_DATA / "labelled.jsonl"), "--report", str(out)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    text = out.read_text(encoding="utf-8")
    assert _chart_ids(text) == RUN_CHARTS | LABEL_CHARTS
    assert "<b>21</b><span>rows</span>" in text


# -- a real browser ------------------------------------------------------------------------


def _chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
         "--disable-background-networking", "--no-first-run", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
         *args],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip


def _console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_ci_installs_chromium_and_requires_the_browser_test() -> None:
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text(encoding="utf-8")
    steps = ci.split("README test command")[0]  # before the tests run
    assert "apt-get install -y -qq chromium" in steps
    assert "export NEM_LLM_REQUIRE_CHROMIUM=1" in steps


def test_report_renders_in_headless_chromium(files: dict[str, Path], tmp_path: Path) -> None:
    if CHROMIUM is None:
        if os.environ.get("NEM_LLM_REQUIRE_CHROMIUM"):  # CI installs it: a skip would hide it
            pytest.fail("NEM_LLM_REQUIRE_CHROMIUM is set but chromium is not installed")
        pytest.skip("needs Debian chromium: apt-get install -y chromium")
    page = write_report(
        build_report(files["results"], labels=files["labels"]), tmp_path / "report.html"
    )
    # the control: a console error on a page must show up in what we read
    control = tmp_path / "control.html"
    control.write_text('<!doctype html><script>console.error("control-error")</script>')
    seen = _chromium(["--dump-dom", control.as_uri()], tmp_path / "profile-control")
    assert any("control-error" in m for m in _console_messages(seen.stderr))

    loaded = _chromium(["--dump-dom", page.as_uri()], tmp_path / "profile-dom")
    shot = tmp_path / "report.png"
    drawn = _chromium(
        [f"--screenshot={shot}", "--window-size=1400,2600", "--hide-scrollbars", page.as_uri()],
        tmp_path / "profile-shot",
    )

    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert _chart_ids(loaded.stdout) == RUN_CHARTS | LABEL_CHARTS  # the DOM the browser built
    assert _console_messages(loaded.stderr) == []
    assert _console_messages(drawn.stderr) == []
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 20_000  # charts, not a blank page
