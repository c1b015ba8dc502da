"""The ``nem-llm`` command line, run the way a user runs it: a subprocess per command.

Every command runs ``python -m nem_llm.cli`` with ``cwd`` in a temporary directory, an
explicit environment (``OPENAI_*`` removed unless a test points them at the simulator)
and a timeout. Each process loads the real offline MiniLM embedder, so commands that do
not depend on each other run in parallel inside a module-scoped fixture (``sim_runs``,
``offline_runs``, ``fatal_runs``, ``eval_runs``) and several tests check one behaviour each
on their output.
The tests that need the simulator's request log to themselves (resume, cache, Ctrl-C) run
their commands one after another. Nothing sleeps to assert: waits poll with deadlines.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nem_llm.models import MatchResult
from nem_llm.sim import SimConfig, SimServer, run_simulator

DATA = Path(__file__).parent / "data" / "cli"
CATALOG = DATA / "catalog.jsonl"  # 25 countries
MENTIONS = DATA / "mentions.csv"  # id,text,note: 17 rows, texts from LABELLED
LABELLED = DATA / "labelled.jsonl"  # qid,query,gold_id: 21 rows, 5 with gold_id null
SECRET = "sk-test-secret"
RUN_TIMEOUT = 110.0  # one CLI process, model load included, on a busy 2-core machine
SIM_LATENCY = 0.2
MATCH_CORE = ["--strategy", "as_completed", "--query-column", "text", "--id-column", "id"]


# ----------------------------------------------------------------------------- helpers


@dataclass
class Run:
    """One finished CLI process."""

    args: list[str]
    cwd: Path
    returncode: int
    stdout: str
    stderr: str

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]

    def explain(self) -> str:
        return (
            f"nem-llm {' '.join(self.args)}\n-> exit {self.returncode}\n"
            f"--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-3000:]}"
        )


_STARTED: list[subprocess.Popen[bytes]] = []


class Started:
    """A CLI process running in the background; stdout/stderr go to files (no pipe stalls)."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.args = args
        self.cwd = cwd
        logs = cwd.parent / f"{cwd.name}-logs"
        logs.mkdir(exist_ok=True)
        n = len(list(logs.glob("*.out")))
        self.out_path = logs / f"{n}.out"
        self.err_path = logs / f"{n}.err"
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nem_llm.cli", *args],
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
            )
        _STARTED.append(self.proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def finish(self, timeout: float = RUN_TIMEOUT) -> Run:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail(f"nem-llm {' '.join(self.args)} did not finish in {timeout:g} s")
        return Run(
            args=self.args,
            cwd=self.cwd,
            returncode=self.proc.returncode,
            stdout=self.out_path.read_text(encoding="utf-8", errors="replace"),
            stderr=self.err_path.read_text(encoding="utf-8", errors="replace"),
        )


# the thresholds that were the defaults before label-free calibration
# no labelled sample, no audit: these tests count the LLM calls of the rows themselves
NO_SAMPLE = ["--label-budget", "0", "--audit-rate", "0"]
FIXED_THRESHOLDS = [
    "--accept-threshold", "0.92", "--margin", "0.05", "--novel-threshold", "0.45", *NO_SAMPLE
]  # fmt: skip


def cli_env(base_url: str | None = None) -> dict[str, str]:
    """The environment of a user's shell, minus any real OpenAI settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env["PYTHONIOENCODING"] = "utf-8"
    env["COLUMNS"] = "120"
    env["OMP_NUM_THREADS"] = "1"  # several CLI processes share two cores
    if base_url is not None:
        env["OPENAI_BASE_URL"] = base_url
        env["OPENAI_API_KEY"] = SECRET
    return env


def nem(args: list[str], cwd: Path, env: dict[str, str]) -> Run:
    return Started(args, cwd, env).finish()


def nem_many(cases: dict[str, tuple[list[str], Path, dict[str, str]]]) -> dict[str, Run]:
    """Run independent commands in parallel; return their results by name."""
    deadline = time.monotonic() + RUN_TIMEOUT
    started = {name: Started(args, cwd, env) for name, (args, cwd, env) in cases.items()}
    return {
        name: s.finish(timeout=max(deadline - time.monotonic(), 1.0)) for name, s in started.items()
    }


def match_args(queries: Path | str, out: str = "results.jsonl", *extra: str) -> list[str]:
    return [
        "match", "--catalog", str(CATALOG), "--queries", str(queries), "--out", out,
        *MATCH_CORE, "--model", "sim", *extra,
    ]  # fmt: skip


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Parse a results file strictly: UTF-8, one JSON object per line, nothing else."""
    text = path.read_bytes().decode("utf-8")
    assert text == "" or text.endswith("\n"), f"{path} ends with a torn line"
    return [json.loads(line) for line in text.splitlines()]


def by_id(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for row in rows}


def input_ids(path: Path) -> list[str]:
    with path.open(encoding="utf-8", newline="") as fh:
        return [row["id"] for row in csv.DictReader(fh)]


def gold_by_query() -> dict[str, str | None]:
    rows = [json.loads(line) for line in LABELLED.read_text(encoding="utf-8").splitlines()]
    return {row["query"]: row["gold_id"] for row in rows}


def poll(check: Callable[[], bool], what: str, deadline_s: float = 60.0) -> None:
    deadline = time.monotonic() + deadline_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {deadline_s:g} s waiting for {what}")
        time.sleep(0.02)


def wait_idle(sim: SimServer) -> int:
    """Wait until the simulator has answered (or dropped) everything and its log has stopped
    growing for half a second (a killed client's last bytes may still be in transit); return the
    log's size."""
    seen: list[tuple[float, int]] = []

    def settled() -> bool:
        now, size = time.monotonic(), len(sim.requests)
        if sim.in_flight or (seen and seen[0][1] != size):
            seen.clear()
        if not sim.in_flight:
            seen.append((now, size))
        return bool(seen) and now - seen[0][0] >= 0.5

    poll(settled, "the simulator to go idle", 15.0)
    return len(sim.requests)


def line_count(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "text"])
        writer.writerows(rows)


def llm_rows(n: int) -> list[tuple[str, str]]:
    """``n`` distinct queries near catalog names (with --accept-threshold 1.01 and
    --novel-threshold 0 every one goes to the LLM; the oracle answers "none" for them)."""
    names = [json.loads(line)["name"] for line in CATALOG.read_text("utf-8").splitlines()]
    return [(f"r{i:03d}", f"{names[i % len(names)]} office {i}") for i in range(n)]


ALL_TO_LLM = ["--accept-threshold", "1.01", "--novel-threshold", "0", *NO_SAMPLE]


def table_value(stderr: str, label: str) -> str:
    """A value from the summary table (``label │ value``)."""
    match = re.search(rf"{re.escape(label)}\W+?([\d][\d,.]*)", stderr)
    assert match, f"{label!r} not in the summary table:\n{stderr}"
    return match.group(1).replace(",", "")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _reap_cli_processes() -> Iterator[None]:
    """Kill any CLI process a failed test left running (only the ones started here)."""
    yield
    while _STARTED:
        proc = _STARTED.pop()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def sim() -> Iterator[SimServer]:
    """An OpenAI-compatible simulator answering from the labelled set (the oracle)."""
    config = SimConfig(
        policy="oracle",
        gold_path=str(LABELLED),
        latency="fixed",
        latency_p50=SIM_LATENCY,
        seed=3,
    )
    with run_simulator(config) as server:
        yield server


@pytest.fixture(scope="module")
def sim_runs(sim: SimServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """The issue's happy-path command against the simulator, as is (input order) and with
    ``--order completion --quiet`` (two processes in parallel; the tests of --order and of
    --quiet each check their own flag on the second)."""
    env = cli_env(sim.base_url)
    # fixed thresholds: these runs test the job's mechanics, not calibration (a catalog of
    # 25 entities is too small for the label-free estimate to open a route)
    base = ["--concurrency", "4", "--stats-json", "stats.json", *FIXED_THRESHOLDS]
    cases = {
        "input": match_args(MENTIONS, "results.jsonl", *base),
        "completion_quiet": match_args(
            MENTIONS, "results.jsonl", *base, "--order", "completion", "--quiet"
        ),
    }
    runs = nem_many(
        {name: (args, tmp_path_factory.mktemp(name), env) for name, args in cases.items()}
    )
    wait_idle(sim)
    return runs


@pytest.fixture(scope="module")
def offline_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """``match`` without an LLM endpoint: JSONL input, and a file of bad rows (in parallel)."""
    bad = tmp_path_factory.mktemp("bad_rows")
    lines = [
        b'{"id": "ok1", "text": "Germany"}',
        b'{"id": "broken", "text": "France"',  # malformed JSON (line 2)
        b'{"id": "ok2", "text": "Italia"}',
        b'{"id": "empty", "text": ""}',
        b'{"id": "blank", "text": "  \\t  "}',
        b'{"id": "huge", "text": "' + b"x" * 1_000_000 + b'"}',  # a 1 MB query
        b'{"id": "latin1", "text": "Espa\xf1a"}',  # invalid UTF-8 (a Latin-1 byte)
        b'{"id": "ok1", "text": "Holland"}',  # duplicate id
        b'{"id": "ok3", "text": "USA"}',
    ]
    (bad / "bad.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    env = cli_env()
    jsonl_args = [
        "match", "--catalog", str(CATALOG), "--queries", str(LABELLED), "--out", "results.jsonl",
        "--query-column", "query", "--id-column", "qid", "--stats-json", "stats.json",
        *FIXED_THRESHOLDS,
    ]  # fmt: skip
    return nem_many(
        {
            "bad_rows": (
                match_args("bad.jsonl", "results.jsonl", "--stats-json", "s.json"),
                bad,
                env,
            ),
            "jsonl": (jsonl_args, tmp_path_factory.mktemp("jsonl"), env),
        }
    )


@pytest.fixture(scope="module")
def eval_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """``eval`` on the labelled set, without an LLM and with the simulated oracle."""
    cwd = tmp_path_factory.mktemp("eval")
    env = cli_env()
    args = ["eval", "--catalog", str(CATALOG), "--queries", str(LABELLED), *FIXED_THRESHOLDS]
    oracle = ["--llm", "sim", "--oracle-error-rate", "0.0"]
    return nem_many(
        {
            "eval_off": ([*args, "--json", "off.json"], cwd, env),
            "eval_sim": ([*args, *oracle, "--json", "sim.json"], cwd, env),
        }
    )


@pytest.fixture(scope="module")
def fatal_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Commands that must stop before any work with exit status 2 (in parallel)."""
    good = CATALOG.read_text(encoding="utf-8").splitlines()
    dup = tmp_path_factory.mktemp("catalog_dup")
    # line 3 repeats line 1's id
    dup_lines = [good[0], good[1], json.dumps({"id": "US", "name": "Estados Unidos"}), *good[2:]]
    (dup / "dup_catalog.jsonl").write_text("\n".join(dup_lines) + "\n", encoding="utf-8")
    empty = tmp_path_factory.mktemp("catalog_empty_name")
    empty_lines = [good[0], json.dumps({"id": "XX", "name": "   "}), *good[1:]]
    (empty / "blank_catalog.jsonl").write_text("\n".join(empty_lines) + "\n", encoding="utf-8")
    env = cli_env()
    missing_column = match_args(MENTIONS)
    missing_column[missing_column.index("--query-column") + 1] = "mention_text"
    dup_args = match_args(MENTIONS)
    dup_args[dup_args.index("--catalog") + 1] = "dup_catalog.jsonl"
    empty_args = match_args(MENTIONS)
    empty_args[empty_args.index("--catalog") + 1] = "blank_catalog.jsonl"
    no_catalog = match_args(MENTIONS)
    no_catalog[no_catalog.index("--catalog") + 1] = "no_such_catalog.jsonl"
    no_queries = match_args("no_such_queries.csv")
    mk = tmp_path_factory.mktemp
    return nem_many(
        {
            "missing_column": (missing_column, mk("missing_column"), env),
            "missing_column_debug": (["--debug", *missing_column], mk("debug"), env),
            "catalog_dup": (dup_args, dup, env),
            "catalog_empty_name": (empty_args, empty, env),
            "no_catalog": (no_catalog, mk("no_catalog"), env),
            "no_queries": (no_queries, mk("no_queries"), env),
        }
    )


# ----------------------------------------------------------------------------- match: happy path


def test_match_exits_zero_with_one_row_per_input_row(sim_runs: dict[str, Run]) -> None:
    run = sim_runs["input"]
    assert run.returncode == 0, run.explain()
    rows = read_rows(run.cwd / "results.jsonl")
    ids = input_ids(MENTIONS)
    assert len(rows) == len(ids) == 17
    assert Counter(row["id"] for row in rows) == Counter(ids)


def test_match_rows_keep_the_input_id_and_carry_the_full_match_result(
    sim_runs: dict[str, Run],
) -> None:
    run = sim_runs["input"]
    assert run.returncode == 0, run.explain()
    with MENTIONS.open(encoding="utf-8", newline="") as fh:
        text_of = {row["id"]: row["text"] for row in csv.DictReader(fh)}
    gold = gold_by_query()
    rows = read_rows(run.cwd / "results.jsonl")
    for row in rows:
        assert row["query"] == text_of[row["id"]]
        assert isinstance(row["line"], int) and row["line"] >= 2  # line 1 is the CSV header
        result = MatchResult.model_validate(
            {k: v for k, v in row.items() if k not in ("id", "line")}
        )
        assert result.status in ("matched", "novel"), row
        assert result.candidates, row
        if result.decided_by == "llm":
            # the oracle answers the gold label: the CLI must carry it through unchanged
            assert result.entity_id == gold[result.query], row
            assert result.attempts and result.attempts[-1].outcome == "ok"
            assert result.usage.total_tokens > 0
        else:
            assert result.decided_by == "embedding"
            assert result.attempts == [] and result.usage.total_tokens == 0
    decided = Counter(row["decided_by"] for row in rows)
    assert decided["llm"] >= 3 and decided["embedding"] >= 3, decided


def test_match_default_order_is_input_order(sim_runs: dict[str, Run]) -> None:
    run = sim_runs["input"]
    assert run.returncode == 0, run.explain()
    rows = read_rows(run.cwd / "results.jsonl")
    assert [row["id"] for row in rows] == input_ids(MENTIONS)
    assert [row["index"] for row in rows] == list(range(len(rows)))


def test_match_order_completion_writes_rows_as_they_finish(sim_runs: dict[str, Run]) -> None:
    run = sim_runs["completion_quiet"]
    assert run.returncode == 0, run.explain()
    rows = read_rows(run.cwd / "results.jsonl")
    assert Counter(row["id"] for row in rows) == Counter(input_ids(MENTIONS))
    # the checkpoint numbers rows as they are recorded: that is the completion order
    db = run.cwd / "results.jsonl.state" / "run.sqlite"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        finished = [idx for (idx,) in conn.execute("SELECT idx FROM run_rows ORDER BY seq")]
    conn.close()
    assert [row["index"] for row in rows] == finished
    # LLM answers take SIM_LATENCY each; the embedding-decided rows overtake them
    assert finished != sorted(finished)


def test_match_prints_summary_table_on_stderr(sim_runs: dict[str, Run]) -> None:
    run = sim_runs["input"]
    assert run.returncode == 0, run.explain()
    rows = read_rows(run.cwd / "results.jsonl")
    for status, n in Counter(row["status"] for row in rows).items():
        assert table_value(run.stderr, f"status {status}") == str(n)
    for who, n in Counter(row["decided_by"] for row in rows).items():
        assert table_value(run.stderr, f"decided by {who}") == str(n)
    n_llm = sum(row["decided_by"] == "llm" for row in rows)
    assert table_value(run.stderr, "LLM calls") == str(n_llm)
    tokens = sum(row["usage"]["total_tokens"] for row in rows)
    assert table_value(run.stderr, "tokens") == str(tokens)
    assert float(table_value(run.stderr, "wall time")) > 0
    assert "Traceback" not in run.stderr


def test_match_quiet_prints_no_table_or_progress(sim_runs: dict[str, Run]) -> None:
    run = sim_runs["completion_quiet"]
    assert run.returncode == 0, run.explain()
    assert len(read_rows(run.cwd / "results.jsonl")) == 17
    assert run.stdout == ""
    assert run.stderr.strip() == "", run.explain()
    assert json.loads((run.cwd / "stats.json").read_text(encoding="utf-8"))["total"] == 17


def test_match_stats_json_is_machine_readable(sim_runs: dict[str, Run]) -> None:
    run = sim_runs["input"]
    assert run.returncode == 0, run.explain()
    rows = read_rows(run.cwd / "results.jsonl")
    stats = json.loads((run.cwd / "stats.json").read_text(encoding="utf-8"))
    assert stats["total"] == stats["rows_total"] == len(rows)
    assert stats["rows_resumed"] == 0 and stats["interrupted"] is False
    assert stats["by_status"] == dict(Counter(row["status"] for row in rows))
    assert stats["by_decided_by"] == dict(Counter(row["decided_by"] for row in rows))
    assert stats["llm_calls"] == sum(row["decided_by"] == "llm" for row in rows)
    assert stats["usage"]["total_tokens"] == sum(r["usage"]["total_tokens"] for r in rows) > 0
    assert stats["wall_time_s"] > 0


def test_match_never_prints_or_writes_the_api_key(sim_runs: dict[str, Run]) -> None:
    for name, run in sim_runs.items():
        assert run.returncode == 0, run.explain()
        # the key was in play: these runs called the LLM with it
        assert any(row["decided_by"] == "llm" for row in read_rows(run.cwd / "results.jsonl"))
        assert SECRET not in run.stdout and SECRET not in run.stderr, name
        files = [p for p in run.cwd.rglob("*") if p.is_file()]
        assert any(p.name == "run.sqlite" for p in files)
        for path in files:  # results, stats, run.sqlite (+ -wal/-shm), the index
            assert SECRET.encode() not in path.read_bytes(), path


# ----------------------------------------------------------------------------- match: input


def test_match_reads_jsonl_queries(offline_runs: dict[str, Run]) -> None:
    run = offline_runs["jsonl"]
    assert run.returncode == 0, run.explain()
    rows = read_rows(run.cwd / "results.jsonl")
    labelled = [json.loads(line) for line in LABELLED.read_text("utf-8").splitlines()]
    assert [row["id"] for row in rows] == [item["qid"] for item in labelled]
    assert [row["query"] for row in rows] == [item["query"] for item in labelled]
    assert [row["line"] for row in rows] == list(range(1, len(labelled) + 1))
    # no OPENAI_* in the environment: the ambiguous rows wait for review, nothing fails
    assert {row["status"] for row in rows} <= {"matched", "novel", "review"}
    assert any(row["status"] == "review" for row in rows)
    assert by_id(rows)["q01"]["entity_id"] == "US"
    assert "LLM" in run.stderr and "not configured" in run.stderr


def _bad_rows(offline_runs: dict[str, Run]) -> dict[str, dict[str, Any]]:
    run = offline_runs["bad_rows"]
    assert run.returncode == 0, run.explain()
    rows = read_rows(run.cwd / "results.jsonl")
    assert len(rows) == 9  # one per input row, bad ones included
    assert [row["line"] for row in rows] == list(range(1, 10))
    for row in rows:
        if row["status"] == "error":
            assert row["error_type"] == "input" and row["decided_by"] is None, row
            assert row["error"].startswith(f"line {row['line']}: "), row
            assert row["usage"]["total_tokens"] == 0 and row["attempts"] == []
    return {f"line{row['line']}": row for row in rows}


def test_malformed_json_line_becomes_error_row_and_run_continues(
    offline_runs: dict[str, Run],
) -> None:
    rows = _bad_rows(offline_runs)
    assert rows["line2"]["status"] == "error"
    assert "malformed JSON" in rows["line2"]["error"]
    # the rows after it were matched as usual
    assert rows["line3"]["status"] == "matched" and rows["line3"]["entity_id"] == "IT"
    assert rows["line9"]["status"] == "matched" and rows["line9"]["entity_id"] == "US"


def test_empty_and_whitespace_queries_become_error_rows(offline_runs: dict[str, Run]) -> None:
    rows = _bad_rows(offline_runs)
    for key, row_id in (("line4", "empty"), ("line5", "blank")):
        assert rows[key]["id"] == row_id
        assert rows[key]["status"] == "error"
        assert "empty query" in rows[key]["error"]


def test_megabyte_query_becomes_error_row(offline_runs: dict[str, Run]) -> None:
    rows = _bad_rows(offline_runs)
    row = rows["line6"]
    assert row["id"] == "huge" and row["status"] == "error"
    assert "1,000,000 characters" in row["error"]
    # the error row does not copy the megabyte into the output
    assert (offline_runs["bad_rows"].cwd / "results.jsonl").stat().st_size < 100_000


def test_invalid_utf8_row_becomes_error_row(offline_runs: dict[str, Run]) -> None:
    rows = _bad_rows(offline_runs)
    row = rows["line7"]
    assert row["id"] == "latin1" and row["status"] == "error"
    assert "invalid UTF-8" in row["error"]


def test_duplicate_input_id_makes_the_second_row_an_error(offline_runs: dict[str, Run]) -> None:
    rows = _bad_rows(offline_runs)
    first, second = rows["line1"], rows["line8"]
    assert first["id"] == second["id"] == "ok1"
    assert first["status"] == "matched" and first["entity_id"] == "DE"
    assert second["status"] == "error"
    assert "duplicate id 'ok1'" in second["error"] and "line 1" in second["error"]


def _assert_fatal(run: Run, *needles: str) -> str:
    assert run.returncode == 2, run.explain()
    assert "Traceback" not in run.stderr, run.explain()
    assert len(run.stderr_lines) == 1, run.explain()
    line = run.stderr_lines[0]
    assert line.startswith("error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    assert not (run.cwd / "results.jsonl").exists()  # stopped before any work
    return line


def test_missing_query_column_is_fatal_with_one_line(fatal_runs: dict[str, Run]) -> None:
    _assert_fatal(fatal_runs["missing_column"], str(MENTIONS), "mention_text")


def test_catalog_with_duplicate_ids_is_fatal(fatal_runs: dict[str, Run]) -> None:
    line = _assert_fatal(fatal_runs["catalog_dup"], "dup_catalog.jsonl", "'US'")
    assert re.search(r"\bline 3\b|:3\b", line), line


def test_catalog_with_empty_name_is_fatal(fatal_runs: dict[str, Run]) -> None:
    line = _assert_fatal(fatal_runs["catalog_empty_name"], "blank_catalog.jsonl", "name")
    assert re.search(r"\bline 2\b|:2\b", line), line


def test_nonexistent_catalog_file_exits_2(fatal_runs: dict[str, Run]) -> None:
    _assert_fatal(fatal_runs["no_catalog"], "no_such_catalog.jsonl", "not found")


def test_nonexistent_queries_file_exits_2(fatal_runs: dict[str, Run]) -> None:
    _assert_fatal(fatal_runs["no_queries"], "no_such_queries.csv", "not found")


def test_debug_shows_traceback_for_fatal_error(fatal_runs: dict[str, Run]) -> None:
    run = fatal_runs["missing_column_debug"]
    assert run.returncode == 2, run.explain()
    assert "Traceback (most recent call last)" in run.stderr
    assert "InputError" in run.stderr
    assert run.stderr_lines[-1].startswith("error: ") and "mention_text" in run.stderr_lines[-1]


# ----------------------------------------------------------------------------- resume and cache


def test_resume_after_sigkill_repeats_at_most_concurrency_llm_calls(
    sim: SimServer, tmp_path: Path
) -> None:
    concurrency = 2
    rows_in = llm_rows(60)
    write_csv(tmp_path / "q.csv", rows_in)
    args = match_args("q.csv", "results.jsonl", "--concurrency", str(concurrency), *ALL_TO_LLM)
    args += ["--stats-json", "stats.json"]
    env = cli_env(sim.base_url)
    before = wait_idle(sim)

    first = Started(args, tmp_path, env)
    out = tmp_path / "results.jsonl"
    poll(lambda: line_count(out) >= 15 or first.proc.poll() is not None, "15 rows", 90.0)
    os.kill(first.pid, signal.SIGKILL)
    killed = first.finish()
    assert killed.returncode == -signal.SIGKILL, killed.explain()
    assert line_count(out) < len(rows_in), "the first run finished before the kill"

    second = nem(args, tmp_path, env)
    assert second.returncode == 0, second.explain()
    calls = wait_idle(sim) - before  # both runs

    rows = read_rows(out)
    assert sorted(row["id"] for row in rows) == [row_id for row_id, _ in rows_in]
    assert [row["id"] for row in rows] == [row_id for row_id, _ in rows_in]  # input order
    assert all(row["decided_by"] in ("llm", "cache") for row in rows), Counter(
        (row["status"], row["decided_by"]) for row in rows
    )
    stats = json.loads((tmp_path / "stats.json").read_text(encoding="utf-8"))  # second run
    resumed = stats["rows_resumed"]
    assert resumed >= 15
    assert stats["rows_total"] == len(rows_in)
    # The rerun decided the rows the checkpoint lacked: by an LLM call, or from the cache
    # when the first run got the answer but died before recording the row.
    from_cache = sum(row["decided_by"] == "cache" for row in rows)
    assert stats["llm_calls"] == len(rows_in) - resumed - from_cache
    assert from_cache <= concurrency
    # Every query text is distinct and the simulator injects no faults, so each request is
    # one row's decision: requests beyond one per row were repeated by the rerun.
    repeated = calls - len(rows_in)
    assert 0 <= repeated <= concurrency, (calls, resumed, from_cache)
    assert calls - stats["llm_calls"] >= resumed  # the first run paid for what it recorded


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*-logs"))
    return dst


def test_rerun_after_deleting_output_rebuilds_it_from_the_checkpoint(
    sim: SimServer, sim_runs: dict[str, Run], tmp_path: Path
) -> None:
    """The identical command finds its finished run in the state dir: no LLM calls."""
    done = sim_runs["input"]
    assert done.returncode == 0, done.explain()
    cwd = _copy_run(done.cwd, tmp_path / "copy")
    original = (cwd / "results.jsonl").read_text(encoding="utf-8")
    (cwd / "results.jsonl").unlink()
    before = wait_idle(sim)
    run = nem(done.args, cwd, cli_env(sim.base_url))
    assert run.returncode == 0, run.explain()
    assert wait_idle(sim) == before  # nothing asked of the LLM
    assert (cwd / "results.jsonl").read_text(encoding="utf-8") == original


def test_rerun_with_a_new_run_key_is_answered_by_the_decision_cache(
    sim: SimServer, sim_runs: dict[str, Run], tmp_path: Path
) -> None:
    """A new run that keeps every decision valid is answered from the cache.

    The run key (batch._run_meta) hashes the catalog and queries files by content plus the
    knobs that change answers (columns, model, top_k, thresholds, index_description, prompt
    version); --out, --order, --strategy and --concurrency are not in it. So a different
    --out with the same --state, or --order completion, would resume the same finished run
    and replay its checkpoint, never reaching the cache. The same rows in reverse order make
    a new queries file, hence a new run, whose queries and candidates are unchanged.
    """
    done = sim_runs["input"]
    assert done.returncode == 0, done.explain()
    cwd = _copy_run(done.cwd, tmp_path / "copy")
    first = by_id(read_rows(cwd / "results.jsonl"))
    lines = MENTIONS.read_text(encoding="utf-8").splitlines()
    (cwd / "reversed.csv").write_text(
        "\n".join([lines[0], *reversed(lines[1:])]) + "\n", encoding="utf-8"
    )
    args = list(done.args)
    args[args.index("--queries") + 1] = "reversed.csv"
    before = wait_idle(sim)
    run = nem(args, cwd, cli_env(sim.base_url))
    assert run.returncode == 0, run.explain()
    assert wait_idle(sim) == before  # zero new LLM requests
    rows = read_rows(cwd / "results.jsonl")
    assert [row["id"] for row in rows] == list(reversed(input_ids(MENTIONS)))
    assert len(rows) == len(first)
    for row in rows:
        was = first[row["id"]]
        assert (row["status"], row["entity_id"]) == (was["status"], was["entity_id"])
        expected = "cache" if was["decided_by"] == "llm" else was["decided_by"]
        assert row["decided_by"] == expected, row
        if expected == "cache":
            assert row["usage"]["total_tokens"] == 0 and row["attempts"] == []
    assert sum(row["decided_by"] == "cache" for row in rows) >= 3
    assert table_value(run.stderr, "decided by cache") == str(
        sum(row["decided_by"] == "cache" for row in rows)
    )


def test_sigint_stops_dispatch_exits_130_and_rerun_completes(
    sim: SimServer, tmp_path: Path
) -> None:
    concurrency = 2
    rows_in = llm_rows(40)
    write_csv(tmp_path / "q.csv", rows_in)
    args = match_args("q.csv", "results.jsonl", "--concurrency", str(concurrency), *ALL_TO_LLM)
    env = cli_env(sim.base_url)
    wait_idle(sim)

    first = Started(args, tmp_path, env)
    out = tmp_path / "results.jsonl"
    poll(lambda: line_count(out) >= 4 or first.proc.poll() is not None, "4 rows", 90.0)
    assert first.proc.poll() is None, "the run ended before Ctrl-C"
    interrupted_at = time.monotonic()
    os.kill(first.pid, signal.SIGINT)
    stopped = first.finish()
    assert stopped.returncode == 130, stopped.explain()
    assert "run the same command to resume" in stopped.stderr, stopped.explain()
    assert "Traceback" not in stopped.stderr
    wait_idle(sim)
    # dispatch stopped: at most the calls already admitted can start after the signal
    late = [r for r in sim.requests if r.arrival > interrupted_at]
    assert len(late) <= concurrency, len(late)
    assert line_count(out) < len(rows_in)

    rerun = nem(args, tmp_path, env)
    assert rerun.returncode == 0, rerun.explain()
    rows = read_rows(out)
    assert [row["id"] for row in rows] == [row_id for row_id, _ in rows_in]


# ----------------------------------------------------------------------------- eval


def _report(run: Run, name: str) -> dict[str, Any]:
    assert run.returncode == 0, run.explain()
    return dict(json.loads((run.cwd / name).read_text(encoding="utf-8")))


def test_eval_prints_every_metric(eval_runs: dict[str, Run]) -> None:
    run = eval_runs["eval_off"]
    report = _report(run, "off.json")
    head, _, row = [line for line in run.stdout.splitlines() if line.startswith("|")]
    columns = [c.strip() for c in head.strip("|").split("|")]
    for column in ("R@1", "R@5", "R@10", "R@50", "auto-accept P", "auto-accept cov",
                   "novel P", "novel R", "accuracy", "to LLM", "tokens", "cost $"):  # fmt: skip
        assert column in columns, column
    cells = dict(zip(columns, (c.strip() for c in row.strip("|").split("|")), strict=True))

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    for k in (1, 5, 10, 50):
        assert cells[f"R@{k}"] == fmt(report["recall_at"][str(k)])
    assert cells["auto-accept P"] == fmt(report["auto_accept_precision"])
    assert cells["auto-accept cov"] == fmt(report["auto_accept_coverage"])
    assert cells["novel P"] == fmt(report["novel_precision"])
    assert cells["novel R"] == fmt(report["novel_recall"])
    assert cells["accuracy"] == fmt(report["accuracy"])
    assert cells["to LLM"] == fmt(report["llm_share"])
    assert cells["tokens"] == str(report["tokens"])
    assert cells["cost $"] == f"{report['cost_usd']:.4f}"
    assert cells["queries"] == "21"
    assert cells["auto-novel P"] == fmt(report["auto_novel_precision"])
    assert cells["auto-novel cov"] == fmt(report["auto_novel_coverage"])


def test_eval_json_agrees_with_an_independent_computation(
    eval_runs: dict[str, Run], offline_runs: dict[str, Run]
) -> None:
    """Recompute the figures from ``nem-llm match`` output on the same set (same catalog,
    default thresholds and top_k, no LLM) and the gold labels."""
    report = _report(eval_runs["eval_off"], "off.json")
    match_run = offline_runs["jsonl"]
    assert match_run.returncode == 0, match_run.explain()
    rows = read_rows(match_run.cwd / "results.jsonl")
    labelled = [json.loads(x) for x in LABELLED.read_text(encoding="utf-8").splitlines()]
    gold = {item["qid"]: item["gold_id"] for item in labelled}
    n = len(rows)
    present = [r for r in rows if gold[r["id"]] is not None]
    absent = [r for r in rows if gold[r["id"]] is None]
    assert (report["queries"], report["with_gold"], report["without_gold"]) == (21, 16, 5)

    def recall(k: int) -> float:
        hits = sum(gold[r["id"]] in [c["entity_id"] for c in r["candidates"][:k]] for r in present)
        return hits / len(present)

    assert report["recall_at"]["1"] == pytest.approx(recall(1))
    assert report["recall_at"]["5"] == pytest.approx(recall(5))
    # 25 entities: the top 50 holds the whole catalog, so every gold id is retrieved
    assert report["recall_at"]["50"] == 1.0
    assert report["recall_at"]["10"] >= report["recall_at"]["5"] >= report["recall_at"]["1"]

    auto = [r for r in rows if r["status"] == "matched" and r["decided_by"] == "embedding"]
    novel = [r for r in rows if r["status"] == "novel"]
    right = [
        r for r in rows
        if (r["status"] == "matched" and r["entity_id"] == gold[r["id"]])
        or (r["status"] == "novel" and gold[r["id"]] is None)
    ]  # fmt: skip
    assert auto and novel
    assert report["auto_accept_coverage"] == pytest.approx(len(auto) / n)
    assert report["auto_accept_precision"] == pytest.approx(
        sum(r["entity_id"] == gold[r["id"]] for r in auto) / len(auto)
    )
    assert report["novel_precision"] == pytest.approx(
        sum(gold[r["id"]] is None for r in novel) / len(novel)
    )
    assert report["novel_recall"] == pytest.approx(
        sum(r["status"] == "novel" for r in absent) / len(absent)
    )
    assert report["accuracy"] == pytest.approx(len(right) / n)
    assert report["review_share"] == pytest.approx(sum(r["status"] == "review" for r in rows) / n)
    assert report["llm_share"] == 0.0 and report["tokens"] == 0 and report["cost_usd"] == 0.0


def test_eval_with_simulated_oracle_llm_is_at_least_as_accurate(
    eval_runs: dict[str, Run], offline_runs: dict[str, Run]
) -> None:
    off = _report(eval_runs["eval_off"], "off.json")
    on = _report(eval_runs["eval_sim"], "sim.json")
    assert off["review_share"] > 0  # there is something for the LLM to decide
    assert on["accuracy"] >= off["accuracy"]
    assert on["llm_share"] > 0 and on["tokens"] > 0
    # By hand: the error-free oracle answers every ambiguous query with its gold id when
    # retrieval offered it (else "none"), so the mistakes left are the embedding's own (as in
    # the ``match`` output without an LLM) and retrieval misses; every absent query ends
    # novel, by embedding or by the oracle's "none".
    rows = read_rows(offline_runs["jsonl"].cwd / "results.jsonl")
    labelled = [json.loads(x) for x in LABELLED.read_text(encoding="utf-8").splitlines()]
    gold = {item["qid"]: item["gold_id"] for item in labelled}
    ambiguous = [r for r in rows if r["status"] == "review"]
    oracle_right = sum(
        gold[r["id"]] is None or gold[r["id"]] in [c["entity_id"] for c in r["candidates"]]
        for r in ambiguous
    )
    embedding_right = sum(
        r["decided_by"] == "embedding"
        and (r["entity_id"] == gold[r["id"]] if r["status"] == "matched" else gold[r["id"]] is None)
        for r in rows
    )
    assert on["llm_share"] == pytest.approx(len(ambiguous) / len(rows))
    assert on["accuracy"] == pytest.approx((embedding_right + oracle_right) / len(rows))
    assert on["novel_recall"] == 1.0
    assert on["review_share"] == 0.0 and on["error_share"] == 0.0
    assert on["recall_at"] == off["recall_at"]  # retrieval does not depend on the LLM
    assert "sim" in on["llm"]
