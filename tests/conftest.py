"""Shared fixtures: small catalogs, fake embedder, and an event-loop hygiene guard."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from nem_llm.testing import FakeEmbedder

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FIXTURES = Path(__file__).parent / "data"


@pytest.fixture(autouse=True)
def _sync_test_event_loop(request: pytest.FixtureRequest) -> Iterator[None]:
    """Give each sync test its own loop and close it afterwards.

    The looptime plugin asks the policy for a loop even in sync tests; on Python 3.11 that
    creates one nobody closes, whose ResourceWarning then fails a later test (warnings are
    errors here).
    """
    if inspect.iscoroutinefunction(request.function):
        yield
        return
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        yield
    finally:
        asyncio.set_event_loop(None)
        loop.close()


@pytest.fixture(autouse=True, scope="session")
def _encoder_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """ONNX exports (the default encoder with the [fast] extra) go to a temp dir, not ~/.cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("NEM_LLM_CACHE", str(tmp_path_factory.mktemp("nem-llm-cache")))
    yield
    patch.undo()


@pytest.fixture
def countries() -> list[dict[str, Any]]:
    return [
        {"id": "US", "name": "United States", "aliases": ["USA", "United States of America"]},
        {"id": "DE", "name": "Germany", "aliases": ["Deutschland"]},
        {"id": "UK", "name": "United Kingdom", "aliases": ["Great Britain", "UK"]},
        {"id": "FR", "name": "France", "aliases": ["République française"]},
        {"id": "AT", "name": "Austria", "aliases": ["Österreich"]},
    ]


@pytest.fixture
def fake_embedder() -> FakeEmbedder:
    return FakeEmbedder()


@pytest.fixture
async def no_loop_errors() -> AsyncIterator[None]:
    """Fail on anything the loop reports (exceptions never retrieved, tasks destroyed while
    pending) and on tasks left behind after the test; concurrency test files opt in with
    ``pytestmark = pytest.mark.usefixtures("no_loop_errors")``."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    yield
    loop.set_exception_handler(None)
    assert errors == []
    assert asyncio.all_tasks() == {asyncio.current_task()}, "a test left tasks behind"
