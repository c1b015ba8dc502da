"""The HTTP transport of the openai clients nem_llm makes itself: aiohttp when installed.

Measured on 2 cores against the simulator at zero latency (benchmarks/bench_overhead.py),
the raw ``chat.completions.create`` with openai's aiohttp client
(``openai.DefaultAioHttpClient``, extra ``openai[aiohttp]``) costs 1.4-1.9 ms of CPU per
call against 2.7-4.5 ms with its default httpx client, and pushes 1.3-2.7x the calls per
second at concurrency 16-256. A client the user passes in keeps its own transport.
"""

from __future__ import annotations

import importlib.util

import httpx
import openai

__all__ = ["aiohttp_installed", "make_async_client"]


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
