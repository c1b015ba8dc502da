"""The local model's OpenAI-compatible server and the decision stage's guard, end to end.

The model is replaced by a fixed chooser (no torch, no weights): what is tested is the
protocol instructor speaks to the server, the answer derived from one constrained choice,
and that answers of a bundled local model (``local/...``) pass the guard.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import instructor
import pytest
from openai import AsyncOpenAI

from nem_llm import Matcher
from nem_llm._llm.adjudication import Adjudicator
from nem_llm._llm.local_server import answer_arguments, make_server
from nem_llm.testing import FakeEmbedder

CATALOG = [
    {"id": "NL", "name": "Netherlands", "aliases": ["Holland"]},
    {"id": "CH", "name": "Switzerland"},
    {"id": "SE", "name": "Sweden"},
]
MESSAGES = [{"role": "system", "content": "pick"}, {"role": "user", "content": "q"}]


class FixedChooser:
    """Answers every call with the option at ``index`` and probability ``p``."""

    def __init__(self, index: int = 0, p: float = 0.9) -> None:
        self.index, self.p = index, p
        self.options: list[list[str]] = []

    def __call__(
        self, messages: Sequence[dict[str, str]], options: Sequence[str]
    ) -> tuple[int, list[float], int]:
        self.options.append(list(options))
        rest = (1 - self.p) / max(len(options) - 1, 1)
        probs = [self.p if i == self.index else rest for i in range(len(options))]
        return self.index, probs, 42


@pytest.fixture
def chooser() -> FixedChooser:
    return FixedChooser()


@pytest.fixture
def server(chooser: FixedChooser) -> Iterator[str]:
    srv = make_server("127.0.0.1", 0, chooser, "local/smollm2-135m")
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join()


def _adjudicator(base_url: str, mode: instructor.Mode) -> tuple[Adjudicator, AsyncOpenAI]:
    client = AsyncOpenAI(base_url=base_url, api_key="local", max_retries=0)
    return Adjudicator(instructor.from_openai(client, mode=mode), "local/smollm2-135m"), client


@pytest.mark.parametrize("mode", [instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA])
async def test_the_server_answers_instructor_with_the_chosen_candidate(
    server: str, chooser: FixedChooser, mode: instructor.Mode
) -> None:
    chooser.index, chooser.p = 1, 0.8
    adjudicator, client = _adjudicator(server, mode)
    decision = await adjudicator.decide_async(MESSAGES, ("NL", "CH", "SE"), request_timeout=10)
    await client.close()
    assert decision.entity_id == "CH"
    assert decision.confidence == pytest.approx(0.8)
    assert chooser.options == [["1", "2", "3", "none"]]
    assert decision.usage.prompt_tokens == 42


async def test_none_is_one_of_the_choices(server: str, chooser: FixedChooser) -> None:
    chooser.index = 3
    adjudicator, client = _adjudicator(server, instructor.Mode.TOOLS)
    decision = await adjudicator.decide_async(MESSAGES, ("NL", "CH", "SE"), request_timeout=10)
    await client.close()
    assert decision.entity_id is None


def test_a_request_without_an_answer_schema_is_a_400(server: str) -> None:
    response = httpx.post(
        f"{server}/chat/completions", json={"model": "x", "messages": MESSAGES}, timeout=10
    )
    assert response.status_code == 400
    assert "tool call" in response.json()["error"]["message"]


def test_the_answer_fills_a_names_list_with_nothing() -> None:
    schema: dict[str, Any] = {
        "properties": {
            "choice": {"enum": ["1", "none"], "type": "string"},
            "confidence": {"type": "number"},
            "reason": {"type": "string"},
            "names": {"type": "array", "items": {"type": "string"}},
        }
    }
    args, _ = answer_arguments(schema, FixedChooser(1, 0.7), MESSAGES, "m")
    assert args["choice"] == "none"
    assert args["confidence"] == 0.7
    assert args["names"] == []
    assert "none 0.70" in args["reason"]


async def _match(base_url: str, model: str, query: str) -> Any:
    async with Matcher(
        CATALOG,
        base_url=base_url,
        api_key="local",
        model=model,
        embedder=FakeEmbedder(),
        accept_threshold=1.01,  # every query goes to the LLM
        novel_threshold=0.0,
    ) as matcher:
        await matcher.fit_async()
        return await matcher.match_async(query)


async def test_a_local_models_answer_against_a_clear_lead_comes_back_as_review(
    server: str, chooser: FixedChooser
) -> None:
    chooser.index, chooser.p = 2, 0.99  # the third candidate, far behind the top
    result = await _match(server, "local/smollm2-135m", "Netherlands")
    assert result.candidates[0].entity_id == "NL"
    assert (result.status, result.entity_id, result.decided_by) == ("review", None, "llm")
    assert f"suggested {result.candidates[2].entity_id}" in result.reason


async def test_the_same_answer_from_another_model_is_not_guarded(
    server: str, chooser: FixedChooser
) -> None:
    chooser.index, chooser.p = 2, 0.99
    result = await _match(server, "some-capable-model", "Netherlands")
    assert result.status == "matched"
    assert result.entity_id == result.candidates[2].entity_id


async def test_a_confident_local_answer_for_the_top_candidate_stands(
    server: str, chooser: FixedChooser
) -> None:
    chooser.index, chooser.p = 0, 0.95
    result = await _match(server, "local/smollm2-135m", "Netherlands")
    assert (result.status, result.entity_id, result.confidence) == ("matched", "NL", 0.95)
