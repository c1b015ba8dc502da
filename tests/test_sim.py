"""Tests of the OpenAI-compatible simulator, end to end with the real openai + instructor."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import aiohttp
import httpx
import instructor
import openai
import pytest
from instructor.core.exceptions import InstructorRetryException
from openai import AsyncOpenAI
from pydantic import BaseModel, Field

from nem_llm.sim import (
    KINDS,
    RequestRecord,
    SimConfig,
    SimServer,
    lognormal_sigma,
    max_in_window,
    run_simulator,
    sample_latency,
)
from nem_llm.sim.protocol import allowed_ids_from_schema, extract_query, parse_request


class EntityChoice(BaseModel):
    entity_id: Literal["a1", "b2", "none"]
    confidence: float = Field(ge=0, le=1)
    reason: str


USER = (
    "Pick the catalog entity the query refers to, or none.\n"
    "<query>\nUSA\n</query>\n"
    "<candidates>\n"
    "[1] id: a1 | name: United States of America | aliases: US, America\n"
    "[2] id: b2 | name: United Kingdom | aliases: UK\n"
    "</candidates>"
)
MESSAGES: list[Any] = [
    {"role": "system", "content": "You resolve entity mentions."},
    {"role": "user", "content": USER},
]


@asynccontextmanager
async def patched(
    sim: SimServer,
    mode: instructor.Mode = instructor.Mode.TOOLS,
    client_timeout: float = 10.0,
) -> AsyncIterator[instructor.AsyncInstructor]:
    raw = AsyncOpenAI(base_url=sim.base_url, api_key="sim", max_retries=0, timeout=client_timeout)
    try:
        yield instructor.from_openai(raw, mode=mode)
    finally:
        await raw.close()


@asynccontextmanager
async def plain(sim: SimServer, client_timeout: float = 10.0) -> AsyncIterator[AsyncOpenAI]:
    client = AsyncOpenAI(
        base_url=sim.base_url, api_key="sim", max_retries=0, timeout=client_timeout
    )
    try:
        yield client
    finally:
        await client.close()


async def choose(
    sim: SimServer, mode: instructor.Mode = instructor.Mode.TOOLS, max_retries: int = 0
) -> tuple[EntityChoice, Any]:
    async with patched(sim, mode) as client:
        return await client.chat.completions.create_with_completion(
            model="any-model",
            response_model=EntityChoice,
            messages=MESSAGES,
            max_retries=max_retries,
        )


async def wait_until(predicate: Callable[[], bool], within: float = 2.0) -> bool:
    for _ in range(int(within / 0.01)):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


def gold_file(tmp_path: Path, rows: list[dict[str, Any]]) -> str:
    path = tmp_path / "gold.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------- answers


async def test_top_policy_tools_mode_end_to_end() -> None:
    async with SimServer(SimConfig(seed=1)) as sim:
        choice, completion = await choose(sim)
        assert choice.entity_id == "a1"
        assert 0 <= choice.confidence <= 1
        assert choice.reason
        assert completion.choices[0].finish_reason == "tool_calls"
        call = completion.choices[0].message.tool_calls[0]
        assert call.id.startswith("call_")
        assert call.function.name == "EntityChoice"  # the forced tool_choice
        assert json.loads(call.function.arguments)["entity_id"] == "a1"
        assert completion.model == "nem-llm-sim"
        usage = completion.usage
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert usage.completion_tokens == math.ceil(len(call.function.arguments) / 4)
        assert usage.prompt_tokens > math.ceil(len(USER) / 4)  # the tool schema counts too
        assert sim.stats()["ok"] == 1


@pytest.mark.parametrize(
    "mode", [instructor.Mode.JSON, instructor.Mode.MD_JSON, instructor.Mode.JSON_SCHEMA]
)
async def test_json_modes_answer_in_content(mode: instructor.Mode) -> None:
    async with SimServer(SimConfig()) as sim:
        choice, completion = await choose(sim, mode)
        assert choice.entity_id == "a1"
        message = completion.choices[0].message
        assert message.tool_calls is None
        assert json.loads(message.content)["entity_id"] == "a1"
        assert completion.choices[0].finish_reason == "stop"


async def test_oracle_policy_answers_the_gold_id(tmp_path: Path) -> None:
    path = gold_file(
        tmp_path,
        [
            {"qid": 1, "query": "USA", "gold_id": "b2"},
            {"qid": 2, "query": "Atlantis", "gold_id": None},
        ],
    )
    async with SimServer(SimConfig(policy="oracle", gold_path=path)) as sim:
        choice, _ = await choose(sim)
        assert choice.entity_id == "b2"  # the label, even though a1 is ranked first


async def test_oracle_unknown_query_or_gold_not_offered_gives_none(tmp_path: Path) -> None:
    path = gold_file(tmp_path, [{"qid": 1, "query": "USA", "gold_id": "zz9"}])
    async with SimServer(SimConfig(policy="oracle", gold_path=path)) as sim:
        choice, _ = await choose(sim)
        assert choice.entity_id == "none"  # gold id not among the candidates
    path = gold_file(tmp_path, [{"qid": 1, "query": "Deutschland", "gold_id": "a1"}])
    async with SimServer(SimConfig(policy="oracle", gold_path=path)) as sim:
        choice, _ = await choose(sim)
        assert choice.entity_id == "none"  # unknown query


async def test_oracle_error_rate_one_gives_a_wrong_answer(tmp_path: Path) -> None:
    path = gold_file(tmp_path, [{"qid": 1, "query": "USA", "gold_id": "b2"}])
    cfg = SimConfig(policy="oracle", gold_path=path, oracle_error_rate=1.0, seed=3)
    async with SimServer(cfg) as sim:
        for _ in range(5):
            choice, _ = await choose(sim)
            assert choice.entity_id in ("a1", "none")


def test_bad_gold_file_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "gold.jsonl"
    path.write_text('{"query": "USA", "gold_id": "a1"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"gold.jsonl:2"):
        SimServer(SimConfig(policy="oracle", gold_path=str(path)))
    with pytest.raises(ValueError, match="cannot be read"):
        SimServer(SimConfig(policy="oracle", gold_path=str(tmp_path / "missing.jsonl")))


# ---------------------------------------------------------------------- rate limits


async def test_rpm_limit_gives_429_with_retry_after() -> None:
    async with SimServer(SimConfig(rpm=2)) as sim, plain(sim) as client:
        for _ in range(2):
            await client.chat.completions.create(model="m", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="m", messages=MESSAGES)
        response = info.value.response
        assert response.status_code == 429
        retry_after = int(response.headers["retry-after"])
        assert 1 <= retry_after <= 60
        assert 59 <= retry_after  # the first request freed its slot ~60 s from now
        assert 0 < int(response.headers["retry-after-ms"]) <= 60_000
        error = response.json()["error"]
        assert error["code"] == "rate_limit_exceeded"
        assert error["type"] == "requests"
        assert error["param"] is None
        assert error["message"].startswith("Rate limit reached for requests")
        assert [r.kind for r in sim.requests] == ["ok", "ok", "rate_limited"]
        assert sim.requests[-1].status == 429


async def test_tpm_limit_gives_429_of_type_tokens() -> None:
    async with SimServer(SimConfig(tpm=100)) as sim, plain(sim) as client:
        await client.chat.completions.create(model="m", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="m", messages=MESSAGES)
        assert info.value.response.json()["error"]["type"] == "tokens"
        assert int(info.value.response.headers["retry-after"]) >= 1


async def test_rate_limited_requests_do_not_count_in_the_window() -> None:
    async with SimServer(SimConfig(rpm=1)) as sim, plain(sim) as client:
        await client.chat.completions.create(model="m", messages=MESSAGES)
        for _ in range(3):
            with pytest.raises(openai.RateLimitError):
                await client.chat.completions.create(model="m", messages=MESSAGES)
        accepted = [r.arrival for r in sim.requests if r.kind != "rate_limited"]
        assert max_in_window(accepted) == 1


# ---------------------------------------------------------------------- injected faults


@pytest.mark.parametrize(
    ("rate", "status", "error_type"),
    [
        ("rate_500", 500, openai.InternalServerError),
        ("rate_503", 503, openai.InternalServerError),
        ("rate_429", 429, openai.RateLimitError),
    ],
)
async def test_injected_error_statuses(
    rate: str, status: int, error_type: type[openai.APIStatusError]
) -> None:
    kwargs: dict[str, Any] = {rate: 1.0, "retry_after": 2.0}
    async with SimServer(SimConfig(**kwargs)) as sim, plain(sim) as client:
        with pytest.raises(error_type) as info:
            await client.chat.completions.create(model="m", messages=MESSAGES)
        assert info.value.status_code == status
        body = info.value.response.json()["error"]
        if status == 429:
            assert info.value.response.headers["retry-after"] == "2"
            assert body["code"] == "rate_limit_exceeded"
        else:
            assert body == {
                "message": "simulated server error",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        record = sim.requests[0]
        assert (record.status, record.kind) == (status, f"fault_{status}")


async def test_malformed_answers_make_instructor_give_up_after_reasks() -> None:
    async with SimServer(SimConfig(rate_malformed=1.0)) as sim:
        with pytest.raises(InstructorRetryException):
            await choose(sim, max_retries=2)
        assert [r.kind for r in sim.requests] == ["malformed"] * 3
        assert all(r.status == 200 for r in sim.requests)


async def test_invalid_id_is_a_validation_error() -> None:
    async with SimServer(SimConfig(rate_invalid=1.0)) as sim:
        with pytest.raises(InstructorRetryException) as info:
            await choose(sim, max_retries=1)
        assert "not-a-candidate" in str(info.value) or "entity_id" in str(info.value)
        assert sim.stats()["invalid"] == 2


async def test_fault_draws_are_reproducible_with_a_seed() -> None:
    async def kinds(seed: int) -> list[str]:
        cfg = SimConfig(seed=seed, rate_500=0.3, rate_invalid=0.3)
        async with SimServer(cfg) as sim, plain(sim) as client:
            for _ in range(20):
                try:
                    await client.chat.completions.create(model="m", messages=MESSAGES)
                except openai.InternalServerError:
                    pass
            return [r.kind for r in sim.requests]

    first = await kinds(7)
    assert first == await kinds(7)
    assert {"ok", "fault_500", "invalid"} <= set(first)


async def test_hang_until_client_timeout_then_clean_stop() -> None:
    sim = SimServer(SimConfig(rate_hang=1.0))
    await sim.start()
    try:
        async with plain(sim, client_timeout=0.3) as client:
            with pytest.raises(openai.APITimeoutError):
                await client.chat.completions.create(model="m", messages=MESSAGES)
        # the client gave up and closed its connection: the hung handler is cancelled
        assert await wait_until(lambda: sim.in_flight == 0)
    finally:
        began = time.monotonic()
        await sim.stop()
    assert time.monotonic() - began < 3.0
    assert [(r.kind, r.status) for r in sim.requests] == [("hang", 0)]
    assert sim.in_flight == 0


async def test_stop_ends_a_request_still_hanging() -> None:
    sim = SimServer(SimConfig(rate_hang=1.0))
    await sim.start()
    async with httpx.AsyncClient(timeout=30.0) as http:
        pending = asyncio.ensure_future(
            http.post(f"{sim.base_url}/chat/completions", json={"messages": MESSAGES})
        )
        assert await wait_until(lambda: sim.in_flight == 1)
        began = time.monotonic()
        await sim.stop()
        assert time.monotonic() - began < 3.0
        try:
            response = await pending
            assert response.status_code == 503
        except httpx.HTTPError:
            pass  # the connection closed first: also fine
    assert sim.requests[0].kind == "hang"


# ---------------------------------------------------------------------- latency


def test_fixed_latency_is_exact() -> None:
    cfg = SimConfig(latency="fixed", latency_p50=0.25)
    rng = random.Random(0)
    assert {sample_latency(cfg, rng) for _ in range(100)} == {0.25}


def test_uniform_latency_stays_in_bounds() -> None:
    cfg = SimConfig(latency="uniform", latency_min=0.1, latency_max=0.3)
    rng = random.Random(0)
    draws = [sample_latency(cfg, rng) for _ in range(5000)]
    assert 0.1 <= min(draws) and max(draws) <= 0.3
    assert statistics.mean(draws) == pytest.approx(0.2, abs=0.01)


def test_lognormal_latency_hits_p50_and_p99() -> None:
    cfg = SimConfig(latency="lognormal", latency_p50=0.2, latency_p99=1.0, seed=5)
    rng = random.Random(cfg.seed)
    draws = sorted(sample_latency(cfg, rng) for _ in range(40_000))
    assert statistics.median(draws) == pytest.approx(0.2, rel=0.05)
    assert draws[int(0.99 * len(draws))] == pytest.approx(1.0, rel=0.1)
    assert lognormal_sigma(0.2, 1.0) == pytest.approx(math.log(5) / 2.326)
    again = random.Random(cfg.seed)
    assert sample_latency(cfg, again) == sample_latency(cfg, random.Random(cfg.seed))


async def test_latency_is_slept_and_logged() -> None:
    async with SimServer(SimConfig(latency_p50=0.2)) as sim:
        began = time.monotonic()
        await choose(sim)
        assert time.monotonic() - began >= 0.2
        assert sim.requests[0].latency == 0.2


# ---------------------------------------------------------------------- window counting


def test_max_in_window_counts() -> None:
    assert max_in_window([]) == 0
    assert max_in_window([5.0]) == 1
    assert max_in_window([0.0, 60.0]) == 1  # exactly 60 s apart: never one window
    assert max_in_window([0.0, 59.999]) == 2
    assert max_in_window([0.0, 30.0, 59.9, 60.0, 61.0]) == 4
    assert max_in_window([0.0, 10.0, 59.9, 60.0, 70.0]) == 3
    assert max_in_window([120.0, 0.0, 60.0, 1.0, 61.0, 119.0]) == 3  # unsorted input
    assert max_in_window([0.0, 0.0, 0.0]) == 3
    assert max_in_window([0.0, 0.5, 1.0, 1.5], window=1.0) == 2
    with pytest.raises(ValueError):
        max_in_window([0.0], window=0)


# ---------------------------------------------------------------------- HTTP surface


async def test_models_endpoint() -> None:
    async with SimServer(SimConfig(model="sim-4o")) as sim, plain(sim) as client:
        page = await client.models.list()
        assert [m.id for m in page.data] == ["sim-4o"]
        assert page.data[0].owned_by == "nem-llm-sim"
        assert sim.base_url == f"http://127.0.0.1:{sim.port}/v1"


async def test_bad_request_is_400() -> None:
    async with SimServer(SimConfig()) as sim, httpx.AsyncClient() as http:
        response = await http.post(f"{sim.base_url}/chat/completions", content=b"{not json")
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert sim.requests[0].kind == "bad_request"


async def test_request_log_records_arrival_and_status() -> None:
    async with SimServer(SimConfig(rpm=1)) as sim, plain(sim) as client:
        before = time.monotonic()
        await client.chat.completions.create(model="m", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="m", messages=MESSAGES)
        after = time.monotonic()
    records = sim.requests
    assert all(isinstance(r, RequestRecord) for r in records)
    assert [r.status for r in records] == [200, 429]
    assert all(before <= r.arrival <= after for r in records)
    assert records[0].arrival <= records[1].arrival
    assert records[0].prompt_tokens > 0 and records[0].completion_tokens > 0
    stats = sim.stats()
    assert list(stats) == list(KINDS)
    assert (stats["ok"], stats["rate_limited"], sum(stats.values())) == (1, 1, 2)


async def test_many_concurrent_requests_with_latency() -> None:
    n = 200
    async with SimServer(SimConfig(latency_p50=0.2)) as sim:
        connector = aiohttp.TCPConnector(limit=n)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def one() -> int:
                url = f"{sim.base_url}/chat/completions"
                async with http.post(url, json={"messages": MESSAGES}) as response:
                    await response.read()
                    return response.status

            began = time.monotonic()
            statuses = await asyncio.gather(*(one() for _ in range(n)))
            elapsed = time.monotonic() - began
    assert statuses == [200] * n
    assert elapsed < 3.0  # the 0.2 s sleeps overlap: the server is not the bottleneck
    assert sim.stats()["ok"] == n


# ---------------------------------------------------------------------- sync runner, CLI


def test_run_simulator_from_sync_code() -> None:
    with run_simulator(SimConfig(latency_p50=0.01)) as sim:
        with openai.OpenAI(base_url=sim.base_url, api_key="sim", max_retries=0) as raw:
            client = instructor.from_openai(raw)
            choice = client.chat.completions.create(
                model="m", response_model=EntityChoice, messages=MESSAGES
            )
        assert choice.entity_id == "a1"
    assert sim.stats()["ok"] == 1
    assert not [t for t in threading.enumerate() if t.name == "nem-llm-sim"]


def test_run_simulator_stops_with_a_request_hanging() -> None:
    with run_simulator(SimConfig(rate_hang=1.0)) as sim, httpx.Client(timeout=0.3) as http:
        with pytest.raises(httpx.TimeoutException):
            http.post(f"{sim.base_url}/chat/completions", json={"messages": MESSAGES})
    assert sim.requests[0].kind == "hang"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_forever_stops_cleanly_on_a_signal(sig: signal.Signals) -> None:
    code = (
        "import signal\n"
        "from nem_llm.sim import SimConfig, serve_forever\n"
        # a shell's background job starts with SIGINT ignored: restore Python's default
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "serve_forever(SimConfig(), '127.0.0.1', 0,"
        " on_ready=lambda sim: print(sim.base_url, flush=True))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:")
        response = httpx.get(f"{base_url}/models", timeout=5.0)
        assert response.json()["data"][0]["id"] == "nem-llm-sim"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out == "" and err == ""


# ---------------------------------------------------------------------- config, parsing


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"latency": "gamma"}, "latency must be one of"),
        ({"latency": "lognormal", "latency_p50": 0.1}, "latency_p99"),
        ({"latency": "lognormal", "latency_p50": 0.0, "latency_p99": 1.0}, "latency_p50 > 0"),
        ({"latency": "uniform", "latency_min": 0.5, "latency_max": 0.1}, "latency_max"),
        ({"latency_p50": -1.0}, "latency_p50"),
        ({"rpm": 0}, "rpm must be > 0"),
        ({"tpm": float("nan")}, "tpm"),
        ({"rate_500": 1.5}, "rate_500"),
        ({"rate_500": 0.6, "rate_503": 0.6}, "sum to"),
        ({"policy": "oracle"}, "gold_path"),
        ({"policy": "best"}, "policy must be one of"),
        ({"oracle_error_rate": -0.1}, "oracle_error_rate"),
        ({"seed": "x"}, "seed"),
    ],
)
def test_config_validation(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SimConfig(**kwargs)


def test_allowed_ids_resolve_refs_and_fall_back_to_the_candidates_block() -> None:
    schema = EntityChoice.model_json_schema()
    assert allowed_ids_from_schema(schema) == ["a1", "b2", "none"]
    ref_schema = {
        "$defs": {"Choice": {"enum": ["x", "none"], "type": "string"}},
        "properties": {"entity_id": {"$ref": "#/$defs/Choice"}},
    }
    assert allowed_ids_from_schema(ref_schema) == ["x", "none"]
    parsed = parse_request({"messages": MESSAGES})
    assert parsed.allowed == ("a1", "b2", "none")
    assert parsed.tool_name is None
    assert parsed.query == "USA"


def test_query_is_stripped_and_unescaped() -> None:
    text = "<query>\n  AT&amp;T <query> inc\n</query> trailing </query>"
    assert extract_query(text) == "AT&T <query> inc\n</query> trailing"
    assert extract_query("no query here") is None


async def test_oracle_answers_nem_llms_numbered_choice_with_the_gold_candidates_number(
    tmp_path: Path,
) -> None:
    from nem_llm._llm.adjudication import choice_model, render_messages
    from nem_llm.catalog import load_catalog
    from nem_llm.models import Candidate

    catalog = load_catalog(
        [{"id": "a1", "name": "Alpha"}, {"id": "b2", "name": "Beta"}, {"id": "c3", "name": "C"}]
    )
    candidates = [Candidate(entity_id=i, name=i, score=0.5) for i in ("a1", "b2", "c3")]
    messages = render_messages("USA", candidates, catalog)
    path = gold_file(tmp_path, [{"qid": 1, "query": "USA", "gold_id": "b2"}])
    async with SimServer(SimConfig(policy="oracle", gold_path=path)) as sim:
        raw = openai.AsyncOpenAI(base_url=sim.base_url, api_key="sim", max_retries=0)
        try:
            client = instructor.from_openai(raw, mode=instructor.Mode.TOOLS)
            choice = await client.chat.completions.create(
                model="sim", response_model=choice_model(3), messages=messages, max_retries=0
            )
        finally:
            await raw.close()
    assert choice.choice == "2"  # type: ignore[attr-defined]  # b2 is candidate [2]
