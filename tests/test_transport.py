"""The openai clients nem_llm makes itself: aiohttp transport when installed, no retries."""

from __future__ import annotations

import pytest

from nem_llm.llm.transport import aiohttp_installed, make_async_client


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
