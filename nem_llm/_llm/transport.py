"""The HTTP transport of the openai clients nem_llm makes itself: aiohttp when installed.

Measured on 2 cores against the simulator at zero latency (benchmarks/bench_overhead.py),
the raw ``chat.completions.create`` with openai's aiohttp client
(``openai.DefaultAioHttpClient``, extra ``openai[aiohttp]``) costs 1.4-1.9 ms of CPU per
call against 2.7-4.5 ms with its default httpx client, and pushes 1.3-2.7x the calls per
second at concurrency 16-256. A client the user passes in keeps its own transport.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import httpx
import openai

from ..errors import ConfigError

__all__ = ["aiohttp_installed", "make_async_client", "resolve_client", "skip_param_transform"]

#: ``chat.completions.create`` parameters nem_llm sends as plain JSON (they bypass
#: openai's per-call parameter transform, see :func:`skip_param_transform`).
_PLAIN_JSON_PARAMS = ("messages", "tools", "tool_choice", "response_format")


def aiohttp_installed() -> bool:
    """Whether openai's aiohttp transport can be used (``httpx-aiohttp`` is importable)."""
    return importlib.util.find_spec("httpx_aiohttp") is not None


def make_async_client(
    *, base_url: str | None, api_key: str, timeout: float, transport: str = "auto"
) -> openai.AsyncOpenAI:
    """An ``AsyncOpenAI`` without retries (the governor retries), on the chosen transport.

    Args:
        transport: ``"auto"`` (aiohttp when installed, else httpx), ``"aiohttp"`` or
            ``"httpx"``.
    """
    http_client: httpx.AsyncClient | None = None
    if transport == "aiohttp" or (transport == "auto" and aiohttp_installed()):
        http_client = openai.DefaultAioHttpClient(timeout=timeout)
    return openai.AsyncOpenAI(
        base_url=base_url,
        api_key=api_key,
        max_retries=0,
        timeout=timeout,
        http_client=http_client,
    )


def skip_param_transform(client: openai.AsyncOpenAI) -> openai.AsyncOpenAI:
    """Make ``client.chat.completions.create`` send its JSON parameters as they are.

    openai walks every request's parameters against its TypedDict definitions
    (``async_maybe_transform``: key aliases, file encodings) before it serialises them. For
    the plain JSON that nem_llm sends (two messages and one tool schema) the walk changes
    nothing, yet it was the largest single cost in a profile of the client at concurrency
    256 (92 recursive calls and ~1.6 ms of profiled CPU per request). Passed as
    ``extra_body``, which openai merges into the request body as given (and which wins
    over the named parameters), the same JSON is sent without the walk: a request test
    checks the bodies are identical.

    Patches only this client object's ``chat.completions`` (give it a copy made by
    ``with_options`` for a client the user owns); returns the client.
    """
    completions = client.chat.completions
    create = completions.create

    async def create_plain(*, extra_body: dict[str, Any] | None = None, **params: Any) -> Any:
        body = dict(extra_body or {})
        for key in _PLAIN_JSON_PARAMS:
            if key in params:
                value = params.pop(key)
                body[key] = list(value) if key in ("messages", "tools") else value
        return await create(messages=[], extra_body=body, **params)

    completions.create = create_plain  # type: ignore[method-assign, assignment]
    return client


def resolve_client(
    client: openai.AsyncOpenAI | None,
    *,
    base_url: str | None,
    api_key: str | None,
    timeout: float,
) -> tuple[openai.AsyncOpenAI | None, bool]:
    """The client the governor calls, and whether nem_llm made it (and so closes it).

    A client the user passes keeps its connection pool; its own retries are turned off
    (one retry layer: the governor's). Without one, a client is made from ``base_url`` /
    ``api_key`` or ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``; with none of them, ``None``
    (ambiguous queries come back as ``review``).
    """
    if client is not None:
        if not isinstance(client, openai.AsyncOpenAI):
            raise ConfigError(f"client must be an openai.AsyncOpenAI, got {type(client).__name__}")
        return client.with_options(max_retries=0, timeout=timeout), False
    base_url = base_url or os.environ.get("OPENAI_BASE_URL")
    api_key = api_key or os.environ.get("OPENAI_API_KEY")
    if not base_url and not api_key:
        return None, False
    made = make_async_client(  # aiohttp when installed: measured cheaper per call
        base_url=base_url,
        api_key=api_key or "not-needed",  # local servers (llama.cpp, vLLM) want none
        timeout=timeout,
    )
    return made, True
