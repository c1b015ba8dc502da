"""The openai clients nem_llm makes itself: aiohttp transport when installed, no retries."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
import respx

from nem_llm._llm.transport import aiohttp_installed, make_async_client, skip_param_transform

BASE = "http://llm.test/v1"


@pytest.mark.skipif(not aiohttp_installed(), reason="openai[aiohttp] not installed")
async def test_auto_transport_is_aiohttp_when_installed() -> None:
    from httpx_aiohttp import HttpxAiohttpClient

    client = make_async_client(base_url="http://127.0.0.1:9/v1", api_key="k", timeout=5.0)
    async with client:
        assert isinstance(client._client, HttpxAiohttpClient)
        assert client.max_retries == 0


async def test_httpx_transport_can_be_chosen() -> None:
    from httpx_aiohttp import HttpxAiohttpClient

    client = make_async_client(
        base_url="http://127.0.0.1:9/v1", api_key="k", timeout=5.0, transport="httpx"
    )
    async with client:
        assert not isinstance(client._client, HttpxAiohttpClient)


def _completion() -> dict[str, object]:
    return {
        "id": "c1",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "ok"},
            }
        ],
    }


async def test_skipping_the_param_transform_sends_the_same_body() -> None:
    params: dict[str, Any] = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Pick one."},
            {"role": "user", "content": "<query>Deutschland</query>"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "EntityChoice",
                    "parameters": {
                        "type": "object",
                        "properties": {"choice": {"enum": ["1", "none"], "type": "string"}},
                        "required": ["choice"],
                    },
                },
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "EntityChoice"}},
        "temperature": 0.0,
        "extra_body": {"seed": 7},
    }
    bodies = []
    with respx.mock(base_url=BASE) as mock:
        route = mock.post("/chat/completions").respond(json=_completion())
        async with openai.AsyncOpenAI(base_url=BASE, api_key="k", max_retries=0) as client:
            await client.chat.completions.create(**params)
            plain = skip_param_transform(client.with_options(timeout=5.0))
            await plain.chat.completions.create(**params)
            await client.chat.completions.create(**params)  # the original is untouched
            assert client.chat.completions.create.__name__ == "create"
            assert plain.chat.completions.create.__name__ == "create_plain"
        bodies = [json.loads(call.request.content) for call in route.calls]
    assert bodies[0] == bodies[1] == bodies[2]
    assert bodies[0]["seed"] == 7 and bodies[0]["messages"][1]["content"].endswith("</query>")
