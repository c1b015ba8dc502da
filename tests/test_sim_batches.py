"""The simulator's Batch API, driven by the official AsyncOpenAI client over real HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from openai import AsyncOpenAI, BadRequestError

from nem_llm._llm.adjudication import choice_model
from nem_llm._llm.batch_api import request_body, request_line
from nem_llm.sim import BatchSimConfig, SimConfig, SimServer

pytestmark = pytest.mark.usefixtures("no_loop_errors")

CANDIDATES = (
    "<candidates>\n[1] id: US | name: United States\n[2] id: DE | name: Germany\n</candidates>"
)


def body(query: str = "usa") -> dict[str, Any]:
    messages = [
        {"role": "system", "content": "pick one"},
        {"role": "user", "content": f"<query>{query}</query>\n{CANDIDATES}"},
    ]
    return request_body(messages, 2, model="m", create_kwargs={"temperature": 0.0})


def jsonl(n: int, prefix: str = "run:") -> bytes:
    return "".join(request_line(f"{prefix}{i}:0", body(f"q{i}")) + "\n" for i in range(n)).encode()


async def start(batch: BatchSimConfig) -> tuple[SimServer, AsyncOpenAI]:
    sim = SimServer(SimConfig(), batch=batch)
    await sim.start()
    return sim, AsyncOpenAI(base_url=sim.base_url, api_key="sim", max_retries=0)


@pytest.fixture
async def api() -> AsyncIterator[tuple[SimServer, AsyncOpenAI]]:
    sim, client = await start(BatchSimConfig())
    yield sim, client
    await client.close()
    await sim.stop()


async def submit(client: AsyncOpenAI, data: bytes, **metadata: str) -> str:
    file = await client.files.create(file=("in.jsonl", data), purpose="batch")
    batch = await client.batches.create(
        input_file_id=file.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata=metadata or None,
    )
    return batch.id


async def lines(client: AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    content = await client.files.content(file_id)
    return [json.loads(raw) for raw in content.text.splitlines()]


async def test_a_batch_completes_with_one_output_line_per_request(
    api: tuple[SimServer, AsyncOpenAI],
) -> None:
    _, client = api
    batch = await client.batches.retrieve(await submit(client, jsonl(3)))
    assert batch.status == "completed"
    assert batch.request_counts is not None and batch.request_counts.completed == 3
    out = await lines(client, batch.output_file_id)
    assert sorted(line["custom_id"] for line in out) == ["run:0:0", "run:1:0", "run:2:0"]
    assert batch.error_file_id is None


async def test_batch_answers_follow_the_live_endpoints_policy(
    api: tuple[SimServer, AsyncOpenAI],
) -> None:
    _, client = api
    live = await client.chat.completions.create(**body("q0"))
    batch = await client.batches.retrieve(await submit(client, jsonl(1)))
    (line,) = await lines(client, batch.output_file_id)
    answer = line["response"]["body"]["choices"][0]["message"]["tool_calls"][0]
    assert live.choices[0].message.tool_calls is not None
    live_call = live.choices[0].message.tool_calls[0]
    assert json.loads(answer["function"]["arguments"]) == json.loads(
        live_call.function.arguments  # type: ignore[union-attr]
    )


async def test_a_batch_stays_in_progress_until_its_completion_delay() -> None:
    sim, client = await start(BatchSimConfig(completion_delay=3600))
    try:
        batch = await client.batches.retrieve(await submit(client, jsonl(2)))
        assert batch.status == "in_progress"
        assert batch.output_file_id is None
    finally:
        await client.close()
        await sim.stop()


async def test_error_lines_go_to_the_error_file_with_their_status() -> None:
    sim, client = await start(BatchSimConfig(rate_error_line=1.0))
    try:
        batch = await client.batches.retrieve(await submit(client, jsonl(2)))
        errors = await lines(client, batch.error_file_id)
        assert [e["response"]["status_code"] for e in errors] == [500, 500]
        assert batch.output_file_id is None
    finally:
        await client.close()
        await sim.stop()


async def test_invalid_answers_fail_the_response_models_validation() -> None:
    sim, client = await start(BatchSimConfig(rate_invalid_answer=1.0))
    try:
        batch = await client.batches.retrieve(await submit(client, jsonl(1)))
        (line,) = await lines(client, batch.output_file_id)
        call = line["response"]["body"]["choices"][0]["message"]["tool_calls"][0]
        choice = json.loads(call["function"]["arguments"])["choice"]
        assert choice not in choice_model(2).model_json_schema()["properties"]["choice"]["enum"]
    finally:
        await client.close()
        await sim.stop()


async def test_an_expired_batch_answers_part_and_reports_the_rest_expired() -> None:
    config = BatchSimConfig(outcomes=("expired",), expired_done_fraction=0.5)
    sim, client = await start(config)
    try:
        batch = await client.batches.retrieve(await submit(client, jsonl(4)))
        assert batch.status == "expired"
        assert len(await lines(client, batch.output_file_id)) == 2
        errors = await lines(client, batch.error_file_id)
        assert [e["error"]["code"] for e in errors] == ["batch_expired", "batch_expired"]
    finally:
        await client.close()
        await sim.stop()


async def test_a_failed_batch_has_errors_and_no_output() -> None:
    sim, client = await start(BatchSimConfig(outcomes=("failed",)))
    try:
        batch = await client.batches.retrieve(await submit(client, jsonl(2)))
        assert batch.status == "failed"
        assert batch.errors is not None and batch.errors.data
        assert batch.output_file_id is None and batch.error_file_id is None
    finally:
        await client.close()
        await sim.stop()


async def test_a_file_with_a_repeated_custom_id_fails_validation(
    api: tuple[SimServer, AsyncOpenAI],
) -> None:
    _, client = api
    line = request_line("run:0:0", body())
    batch = await client.batches.retrieve(await submit(client, f"{line}\n{line}\n".encode()))
    assert batch.status == "failed"
    assert batch.errors is not None and batch.errors.data
    assert batch.errors.data[0].code == "duplicate_custom_id"


async def test_a_cancelled_batch_ends_cancelled() -> None:
    sim, client = await start(BatchSimConfig(completion_delay=3600))
    try:
        batch_id = await submit(client, jsonl(2))
        assert (await client.batches.cancel(batch_id)).status == "cancelling"
        batch = await client.batches.retrieve(batch_id)
        assert batch.status == "cancelled"
        errors = await lines(client, batch.error_file_id)
        assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    finally:
        await client.close()
        await sim.stop()


async def test_list_returns_batches_newest_first_with_metadata(
    api: tuple[SimServer, AsyncOpenAI],
) -> None:
    _, client = api
    first = await submit(client, jsonl(1, "a:"), run="a")
    second = await submit(client, jsonl(1, "b:"), run="b")
    page = await client.batches.list(limit=10)
    assert [b.id for b in page.data] == [second, first]
    assert page.data[0].metadata == {"run": "b"}


async def test_the_log_counts_a_resubmitted_custom_id_as_a_duplicate(
    api: tuple[SimServer, AsyncOpenAI],
) -> None:
    sim, client = api
    await submit(client, jsonl(2))
    assert sim.batches.duplicate_submissions() == 0
    await submit(client, jsonl(1))
    assert sim.batches.duplicate_submissions() == 1
    assert sim.batches.submissions()["run:0:0"] == 2


async def test_an_upload_with_another_purpose_is_rejected(
    api: tuple[SimServer, AsyncOpenAI],
) -> None:
    _, client = api
    with pytest.raises(BadRequestError):
        await client.files.create(file=("in.jsonl", jsonl(1)), purpose="assistants")
