"""The provider Batch API engine: request lines, splitting, parsing, and whole runs against
the simulator over real HTTP (the official AsyncOpenAI client), including a SIGKILL while
a batch is in flight."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import instructor
import pytest
from openai import AsyncOpenAI

from nem_llm import Matcher, MatcherSettings
from nem_llm._jobs.batch import MatchJob, run_match_job
from nem_llm._jobs.batch_api import BatchApiOptions, BatchApiSummary, run_batch_api_job
from nem_llm._llm.adjudication import Adjudicator, choice_model
from nem_llm._llm.batch_api import (
    BATCH_PRICE_FACTOR,
    InvalidAnswer,
    batch_prices,
    parse_answer,
    parse_custom_id,
    parse_result_line,
    reask_body,
    request_body,
    request_line,
    split_lines,
)
from nem_llm.config import Limits
from nem_llm.errors import LLMError
from nem_llm.sim import BatchSimConfig, SimConfig, SimServer, run_simulator
from nem_llm.testing import FakeEmbedder

FIXTURES = Path(__file__).parent / "data"
CATALOG = FIXTURES / "restaurants_catalog.jsonl"
QUERIES = FIXTURES / "restaurants_queries.jsonl"
N_QUERIES = sum(1 for line in QUERIES.read_text().splitlines() if line.strip())
SECRET = "sk-test-secret-never-written-0123456789"
MESSAGES = [{"role": "system", "content": "pick"}, {"role": "user", "content": "<query>x</query>"}]


def completion(arguments: dict[str, Any], tokens: tuple[int, int] = (100, 10)) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "finish_reason": "tool_calls",
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {
                                "name": "EntityChoice",
                                "arguments": json.dumps(arguments),
                            },
                        }
                    ],
                },
            }
        ],
        "usage": {
            "prompt_tokens": tokens[0],
            "completion_tokens": tokens[1],
            "total_tokens": sum(tokens),
        },
    }


# -- request lines (pure) -----------------------------------------------------------------


def test_a_request_line_has_the_batch_api_shape() -> None:
    line = json.loads(request_line("key:3:0", request_body(MESSAGES, 2, model="gpt-4o-mini")))
    assert set(line) == {"custom_id", "method", "url", "body"}
    assert (line["custom_id"], line["method"], line["url"]) == (
        "key:3:0",
        "POST",
        "/v1/chat/completions",
    )
    assert line["body"]["model"] == "gpt-4o-mini"
    assert line["body"]["messages"] == MESSAGES
    assert line["body"]["tool_choice"] == {"type": "function", "function": {"name": "EntityChoice"}}


def test_custom_id_round_trips_run_key_row_and_round() -> None:
    assert parse_custom_id("abc:12:1") == ("abc", 12, 1)


async def _live_bodies(answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the live path (instructor through the official client) sends, in order."""
    seen: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=completion(answers[len(seen) - 1]))

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    client = AsyncOpenAI(api_key="k", base_url="http://x/v1", http_client=http, max_retries=0)
    adjudicator = Adjudicator(instructor.from_openai(client), "gpt-4o-mini")
    await adjudicator.decide_async(MESSAGES, ("A", "B"), request_timeout=5)
    await client.close()
    return seen


async def test_the_request_body_is_exactly_what_the_live_path_sends() -> None:
    (live,) = await _live_bodies([{"choice": "1", "confidence": 0.9, "reason": "r"}])
    mine = request_body(MESSAGES, 2, model="gpt-4o-mini", create_kwargs={"temperature": 0.0})
    assert mine == live


async def test_the_reask_body_is_exactly_what_instructor_sends_live() -> None:
    bad = {"choice": "7", "confidence": 0.9, "reason": "r"}
    live = await _live_bodies([bad, {"choice": "1", "confidence": 0.9, "reason": "r"}])
    first = request_body(MESSAGES, 2, model="gpt-4o-mini", create_kwargs={"temperature": 0.0})
    with pytest.raises(InvalidAnswer) as caught:
        parse_answer(completion(bad), ("A", "B"), prices=(1.0, 1.0))
    assert reask_body(first, completion(bad), caught.value) == live[1]


def test_split_lines_starts_a_new_file_at_the_line_limit() -> None:
    files = split_lines([f"line{i}" for i in range(7)], max_lines=3)
    assert [len(f) for f in files] == [3, 3, 1]


def test_split_lines_starts_a_new_file_at_the_byte_limit() -> None:
    # each line is 10 bytes with its newline: 25 bytes hold two
    files = split_lines(["x" * 9] * 5, max_bytes=25)
    assert [len(f) for f in files] == [2, 2, 1]


def test_split_lines_rejects_a_line_larger_than_a_file() -> None:
    with pytest.raises(ValueError, match="line 1"):
        split_lines(["ok", "x" * 100], max_bytes=50)


def test_an_output_line_parses_to_its_body() -> None:
    raw = {"id": "r", "custom_id": "k:0:0", "response": {"status_code": 200, "body": {"a": 1}}}
    outcome = parse_result_line(json.dumps(raw))
    assert outcome.ok and outcome.body == {"a": 1}


def test_an_error_line_parses_to_its_status_and_code() -> None:
    body = {"error": {"message": "boom", "type": "server_error", "code": None}}
    raw = {"custom_id": "k:0:0", "response": {"status_code": 500, "body": body}, "error": None}
    outcome = parse_result_line(json.dumps(raw))
    assert (outcome.ok, outcome.status_code, outcome.error_code) == (False, 500, "server")
    assert outcome.error is not None and "server_error" in outcome.error  # the provider's code


def test_an_expired_line_parses_to_the_batch_api_code() -> None:
    raw = {"custom_id": "k:0:0", "response": None, "error": {"code": "batch_expired"}}
    outcome = parse_result_line(json.dumps(raw))
    assert (outcome.ok, outcome.error_code) == (False, "batch_api")
    assert outcome.error is not None and "batch_expired" in outcome.error


def test_a_valid_answer_maps_its_number_back_to_the_candidate_id() -> None:
    decision = parse_answer(
        completion({"choice": "2", "confidence": 0.7, "reason": "r"}), ("A", "B"), prices=(0, 0)
    )
    assert (decision.entity_id, decision.confidence) == ("B", 0.7)


def test_an_invalid_answer_raises_with_the_tokens_it_cost() -> None:
    with pytest.raises(InvalidAnswer) as caught:
        parse_answer(
            completion({"choice": "9", "confidence": 1, "reason": ""}, (1000, 0)),
            ("A", "B"),
            prices=(2.0, 0.0),
        )
    assert caught.value.usage.total_tokens == 1000
    assert caught.value.usage.cost_usd == pytest.approx(0.002)


def test_the_batch_price_is_half_the_live_price() -> None:
    assert BATCH_PRICE_FACTOR == 0.5
    assert batch_prices("gpt-4o-mini") == (0.075, 0.30)
    assert batch_prices("x", Limits(input_usd_per_mtok=1.0, output_usd_per_mtok=4.0)) == (
        0.5,
        2.0,
    )


def test_choice_model_is_the_one_the_live_path_uses() -> None:
    # the engine validates with the live response model: same class object per k
    assert choice_model(3) is choice_model(3)


# -- whole runs against the simulator ------------------------------------------------------

FACTORY = partial(Matcher, embedder=FakeEmbedder())
FAST = BatchApiOptions(poll_interval=0.0)


def job_for(tmp_path: Path, name: str, base_url: str, **kwargs: Any) -> MatchJob:
    # accept_threshold > 1: every non-novel row goes to the LLM (the most batch lines)
    return MatchJob(
        catalog=CATALOG,
        queries=QUERIES,
        out=tmp_path / f"{name}.jsonl",
        # no labelled sample: these tests count what goes through batches
        settings=MatcherSettings(
            base_url=base_url,
            accept_threshold=1.5,
            novel_threshold=0.0,
            label_budget=0,
            **kwargs,
        ),
    )


async def run_batch(
    sim: SimServer, job: MatchJob, options: BatchApiOptions = FAST
) -> BatchApiSummary:
    client = AsyncOpenAI(base_url=sim.base_url, api_key=SECRET, max_retries=0)
    try:
        summary = await run_batch_api_job(
            job, client=client, options=options, matcher_factory=FACTORY
        )
    finally:
        await client.close()
    assert isinstance(summary, BatchApiSummary)
    return summary


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    async with SimServer(SimConfig()) as server:
        yield server


async def serve(batch: BatchSimConfig) -> SimServer:
    server = SimServer(SimConfig(), batch=batch)
    await server.start()
    return server


async def test_batch_mode_writes_one_row_per_input_row_equal_to_live_mode(
    sim: SimServer, tmp_path: Path
) -> None:
    await run_batch(sim, job_for(tmp_path, "batch", sim.base_url))
    await run_match_job(job_for(tmp_path, "live", sim.base_url), matcher_factory=FACTORY)
    batch, live = rows(tmp_path / "batch.jsonl"), rows(tmp_path / "live.jsonl")
    assert len(batch) == N_QUERIES
    keys = ("id", "index", "status", "entity_id", "decided_by", "confidence", "reason")
    assert [{k: r[k] for k in keys} for r in batch] == [{k: r[k] for k in keys} for r in live]


async def test_batch_mode_costs_half_of_live_mode(sim: SimServer, tmp_path: Path) -> None:
    batch = await run_batch(sim, job_for(tmp_path, "batch", sim.base_url))
    live = await run_match_job(job_for(tmp_path, "live", sim.base_url), matcher_factory=FACTORY)
    assert batch.stats.usage.total_tokens == live.stats.usage.total_tokens
    assert batch.stats.usage.cost_usd == pytest.approx(live.stats.usage.cost_usd / 2)


async def test_files_are_split_at_the_line_limit(sim: SimServer, tmp_path: Path) -> None:
    options = BatchApiOptions(poll_interval=0.0, max_lines=5)
    summary = await run_batch(sim, job_for(tmp_path, "batch", sim.base_url), options)
    assert summary.batches == math.ceil(N_QUERIES / 5)
    uploads = [r for r in sim.batches.log if r.kind == "upload"]
    assert max(r.lines for r in uploads) == 5


async def test_a_finished_run_rerun_submits_nothing(sim: SimServer, tmp_path: Path) -> None:
    job = job_for(tmp_path, "batch", sim.base_url)
    await run_batch(sim, job)
    created = len(sim.batches.batch_ids())
    await run_batch(sim, job)
    assert len(sim.batches.batch_ids()) == created
    assert len(rows(job.out)) == N_QUERIES


async def test_schema_invalid_answers_are_reasked_in_a_follow_up_batch(tmp_path: Path) -> None:
    sim = await serve(BatchSimConfig(rate_invalid_answer=0.3, seed=1))
    try:
        summary = await run_batch(sim, job_for(tmp_path, "batch", sim.base_url))
    finally:
        await sim.stop()
    out = rows(tmp_path / "batch.jsonl")
    assert summary.batches >= 2
    assert (
        sum(1 for r in out if r["status"] == "matched")
        + sum(1 for r in out if r["error_type"] == "invalid_answer")
        == N_QUERIES
    )
    assert any(a["reasks"] > 0 for r in out for a in r["attempts"])


async def test_answers_still_invalid_after_max_reasks_become_error_records(
    tmp_path: Path,
) -> None:
    sim = await serve(BatchSimConfig(rate_invalid_answer=1.0))
    try:
        job = job_for(tmp_path, "batch", sim.base_url, limits=Limits(max_reasks=1))
        summary = await run_batch(sim, job)
    finally:
        await sim.stop()
    out = rows(tmp_path / "batch.jsonl")
    assert {(r["status"], r["error_type"]) for r in out} == {("error", "invalid_answer")}
    assert summary.batches == 2  # the first ask and one re-ask


async def test_error_lines_are_resubmitted_at_most_max_resubmits_times(tmp_path: Path) -> None:
    sim = await serve(BatchSimConfig(rate_error_line=1.0))
    try:
        options = BatchApiOptions(poll_interval=0.0, max_resubmits=1)
        await run_batch(sim, job_for(tmp_path, "batch", sim.base_url), options)
    finally:
        await sim.stop()
    out = rows(tmp_path / "batch.jsonl")
    assert {(r["status"], r["error_type"]) for r in out} == {("error", "server")}
    assert all(len(r["attempts"]) == 2 for r in out)
    assert sim.batches.duplicate_submissions() == 0


async def test_expired_lines_are_resubmitted_and_then_answered(tmp_path: Path) -> None:
    sim = await serve(BatchSimConfig(outcomes=("expired",), expired_done_fraction=0.5))
    try:
        summary = await run_batch(sim, job_for(tmp_path, "batch", sim.base_url))
    finally:
        await sim.stop()
    out = rows(tmp_path / "batch.jsonl")
    assert summary.batches == 2
    assert {r["status"] for r in out} == {"matched"}
    expired = [r for r in out if "batch_expired" in (r["attempts"][0]["error"] or "")]
    assert len(expired) == N_QUERIES - N_QUERIES // 2


async def test_a_failed_batch_makes_its_rows_typed_error_records(tmp_path: Path) -> None:
    sim = await serve(BatchSimConfig(outcomes=("failed",)))
    try:
        await run_batch(sim, job_for(tmp_path, "batch", sim.base_url))
    finally:
        await sim.stop()
    out = rows(tmp_path / "batch.jsonl")
    assert len(out) == N_QUERIES
    assert {(r["status"], r["error_type"]) for r in out} == {("error", "batch_api")}


async def test_rows_beyond_the_budget_become_review_records(sim: SimServer, tmp_path: Path) -> None:
    job = job_for(tmp_path, "batch", sim.base_url, limits=Limits(budget_tokens=2000))
    await run_batch(sim, job)
    out = rows(tmp_path / "batch.jsonl")
    assert len(out) == N_QUERIES
    budget = [r for r in out if r["error_type"] == "budget"]
    assert budget and all(r["status"] == "review" for r in budget)
    assert any(r["status"] == "matched" for r in out)


async def test_a_lost_create_is_found_by_its_metadata_not_repeated(
    sim: SimServer, tmp_path: Path
) -> None:
    job = job_for(tmp_path, "batch", sim.base_url)
    stopped = BatchApiOptions(poll_interval=0.0, wait=False)
    await run_batch(sim, job, stopped)  # submitted, polled once, left in flight
    # pretend the process died between the provider's create and our recording the id
    import sqlite3

    db = sqlite3.connect(job.state_dir / "run.sqlite")
    with db:
        db.execute("UPDATE batches SET state = 'creating', batch_id = NULL, status = NULL")
    db.close()
    await run_batch(sim, job)
    assert len(sim.batches.batch_ids()) == 1
    assert sim.batches.duplicate_submissions() == 0
    assert len(rows(job.out)) == N_QUERIES


async def test_stop_leaves_batches_in_flight_for_the_next_run(tmp_path: Path) -> None:
    sim = await serve(BatchSimConfig(completion_delay=0.5))
    try:
        job = job_for(tmp_path, "batch", sim.base_url)
        client = AsyncOpenAI(base_url=sim.base_url, api_key=SECRET, max_retries=0)
        stop = asyncio.Event()
        stop.set()  # Ctrl-C before the first poll ends
        try:
            first = await run_batch_api_job(
                job, client=client, options=FAST, stop=stop, matcher_factory=FACTORY
            )
        finally:
            await client.close()
        assert first.interrupted
        second = await run_batch(sim, job, BatchApiOptions(poll_interval=0.1))
    finally:
        await sim.stop()
    assert not second.interrupted
    assert len(sim.batches.batch_ids()) == 1
    assert len(rows(job.out)) == N_QUERIES


async def test_stop_during_planning_resumes_planning_on_the_next_run(
    sim: SimServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nem_llm._jobs.batch_api as engine

    monkeypatch.setattr(engine, "_PLAN_CHUNK", 4)
    job = job_for(tmp_path, "batch", sim.base_url)
    client = AsyncOpenAI(base_url=sim.base_url, api_key=SECRET, max_retries=0)
    stop = asyncio.Event()
    stop.set()
    try:
        first = await run_batch_api_job(
            job, client=client, options=FAST, stop=stop, matcher_factory=FACTORY
        )
    finally:
        await client.close()
    assert first.interrupted
    assert sim.batches.batch_ids() == []  # stopped after the first chunk of 4 rows
    await run_batch(sim, job)
    assert sorted(r["index"] for r in rows(job.out)) == list(range(N_QUERIES))
    assert sim.batches.duplicate_submissions() == 0


async def test_a_provider_error_while_polling_is_one_clear_error(tmp_path: Path) -> None:
    sim = await serve(BatchSimConfig(completion_delay=3600))
    try:
        job = job_for(tmp_path, "batch", sim.base_url)
        await run_batch(sim, job, BatchApiOptions(poll_interval=0.0, wait=False))
    finally:
        await sim.stop()
    async with SimServer(SimConfig()) as other:  # a provider that never saw the batch
        with pytest.raises(LLMError, match=r"Batch API failed.*run the same command again"):
            await run_batch(other, job)


# -- a real process killed while its batch is in flight -----------------------------------

RUNNER = """
import asyncio, sys
from functools import partial
from pathlib import Path
from nem_llm import Matcher, MatcherSettings
from nem_llm._jobs.batch import MatchJob
from nem_llm._jobs.batch_api import BatchApiOptions, run_batch_api_job
from nem_llm.testing import FakeEmbedder

catalog, queries, out, base_url = sys.argv[1:5]
job = MatchJob(catalog=Path(catalog), queries=Path(queries), out=Path(out),
               settings=MatcherSettings(base_url=base_url, accept_threshold=1.5,
                                        novel_threshold=0.0, label_budget=0))
asyncio.run(run_batch_api_job(job, options=BatchApiOptions(poll_interval=0.05),
                              matcher_factory=partial(Matcher, embedder=FakeEmbedder())))
"""


def _run_args(tmp_path: Path, base_url: str) -> tuple[list[str], dict[str, str]]:
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["OPENAI_API_KEY"] = SECRET
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    args = [sys.executable, str(script), str(CATALOG), str(QUERIES), str(tmp_path / "out.jsonl")]
    return [*args, base_url], env


def _wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory: pytest.TempPathFactory) -> tuple[SimServer, Path]:
    """A run SIGKILLed while its batch is in_progress, then the same command run again."""
    tmp_path = tmp_path_factory.mktemp("killed")
    config = BatchSimConfig(completion_delay=3.0)
    with run_simulator(SimConfig(), batch=config) as server:
        args, env = _run_args(tmp_path, server.base_url)
        first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL)
        try:
            _wait_for(
                lambda: any(r.kind == "retrieve" for r in list(server.batches.log)),
                "the first poll",
            )
            first.send_signal(signal.SIGKILL)
        finally:
            first.wait(timeout=30)
        polls_before = sum(1 for r in server.batches.log if r.kind == "retrieve")
        assert polls_before >= 1
        subprocess.run(args, env=env, check=True, timeout=120, stdout=subprocess.DEVNULL)
    return server, tmp_path


def test_a_run_killed_while_polling_resumes_without_resubmitting(
    killed_and_resumed: tuple[SimServer, Path],
) -> None:
    server, _ = killed_and_resumed
    assert len(server.batches.batch_ids()) == 1
    assert server.batches.duplicate_submissions() == 0


def test_a_run_killed_while_polling_loses_no_row(
    killed_and_resumed: tuple[SimServer, Path],
) -> None:
    _, tmp_path = killed_and_resumed
    out = rows(tmp_path / "out.jsonl")
    assert sorted(r["index"] for r in out) == list(range(N_QUERIES))
    assert {r["status"] for r in out} == {"matched"}


def test_no_file_written_contains_the_api_key(
    killed_and_resumed: tuple[SimServer, Path],
) -> None:
    _, tmp_path = killed_and_resumed
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaks == []


# -- the command line -------------------------------------------------------------------


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nem_llm.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_cli_match_in_batch_api_mode_reports_batches_and_writes_every_row(
    tmp_path: Path,
) -> None:
    with run_simulator(SimConfig(), batch=BatchSimConfig(rate_error_line=0.2)) as server:
        _, env = _run_args(tmp_path, server.base_url)
        env["OPENAI_BASE_URL"] = server.base_url
        args = ["match", "--catalog", str(CATALOG), "--queries", str(QUERIES)]
        args += ["--out", "out.jsonl", "--model", "sim", "--accept-threshold", "1.5"]
        args += ["--label-budget", "0"]
        done = _cli([*args, "--llm-mode", "batch-api", "--poll-interval", "0.05"], env, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "batch 1 (" in done.stderr and "completed" in done.stderr
    assert len(rows(tmp_path / "out.jsonl")) == N_QUERIES


def test_cli_rejects_the_ray_engine_with_the_batch_api(tmp_path: Path) -> None:
    args = ["match", "--catalog", str(CATALOG), "--queries", str(QUERIES), "--out", "o.jsonl"]
    done = _cli([*args, "--engine", "ray", "--llm-mode", "batch-api"], dict(os.environ), tmp_path)
    assert done.returncode == 2
    assert "--engine ray and --llm-mode batch-api are two engines" in done.stderr
