"""instructor's async-validator walk: once per class of ours, every time for anyone else's."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from instructor.v2.validation import async_validators
from pydantic import BaseModel

from nem_llm._llm import instructor_checks
from nem_llm._llm.adjudication import choice_model
from nem_llm.matcher import Matcher
from nem_llm.testing import FakeEmbedder, FakeLLM

ORIGINAL = getattr(
    async_validators.reject_async_validators,
    "__wrapped__",
    async_validators.reject_async_validators,
)


@pytest.fixture
def walks(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every model instructor's own check walks, in every instructor module that calls it."""
    seen: list[Any] = []

    def counting(model: Any) -> None:
        seen.append(model)
        ORIGINAL(model)

    # the modules that call the check
    import instructor.v2.core.client
    import instructor.v2.core.patch
    import instructor.v2.core.retry  # noqa: F401

    for name, module in list(sys.modules.items()):
        current = getattr(module, "reject_async_validators", None)
        if name.startswith("instructor") and current is not None:
            monkeypatch.setattr(module, "reject_async_validators", counting)
    monkeypatch.setattr(instructor_checks, "_original", lambda: counting)
    monkeypatch.setattr(instructor_checks, "_TRUSTED", set())
    choice_model.cache_clear()  # our classes are trusted when built: build them afresh
    yield seen
    choice_model.cache_clear()


async def test_our_response_model_is_walked_once_not_per_request(walks: list[Any]) -> None:
    http = httpx.AsyncClient(transport=httpx.MockTransport(FakeLLM(lambda _q, ids: ids[0])))
    client = openai.AsyncOpenAI(api_key="t", base_url="http://fake/v1", http_client=http)
    entities = [{"id": f"E{i}", "name": f"Entity number {i}"} for i in range(5)]
    async with Matcher(
        entities,
        client=client,
        embedder=FakeEmbedder(),
        accept_threshold=1.01,
        novel_threshold=0.0,
    ) as matcher:
        await matcher.fit_async()
        results = await matcher.match_batch_async(["entity 1", "entity 2", "entity 3"])

    assert [r.decided_by for r in results] == ["llm"] * 3
    assert len(walks) == 1


def test_other_models_are_still_checked_on_every_call(walks: list[Any]) -> None:
    class Declared(BaseModel):
        name: str

        async def check(self) -> None:  # marked as instructor marks an async validator
            return None

        check.__async_validator__ = ("name",)  # type: ignore[attr-defined]

    instructor_checks.install()

    for _ in range(2):
        with pytest.raises(ValueError, match="async validators are not supported"):
            async_validators.reject_async_validators(Declared)
    assert walks.count(Declared) == 2
