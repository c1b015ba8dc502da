"""Whether the LLM answers: a cached reachability probe (``GET /models``)."""

from __future__ import annotations

import asyncio
import time

import openai

from .redaction import Redactor

__all__ = ["LLMProbe"]


class LLMProbe:
    """Asks the LLM endpoint whether it answers, at most once per ``interval`` seconds.

    Any HTTP answer but 401/403 counts as reachable: the probe lists models with the
    matcher's own client (no retries) and a per-call timeout.
    """

    def __init__(
        self,
        client: openai.AsyncOpenAI | None,
        redactor: Redactor,
        *,
        interval: float,
        timeout: float,
    ) -> None:
        self.client = client
        self.redactor = redactor
        self.interval = interval
        self.timeout = timeout
        self._last: tuple[float, str, str | None] | None = None
        self._lock = asyncio.Lock()

    async def check(self) -> tuple[str, str | None]:
        """``("reachable" | "unreachable" | "not_configured", detail)``, cached a while."""
        client = self.client
        if client is None:
            return "not_configured", None
        async with self._lock:
            now = time.monotonic()
            if self._last is not None and now - self._last[0] < self.interval:
                return self._last[1], self._last[2]
            state, detail = "reachable", None
            try:
                await client.models.list(timeout=self.timeout)
            except openai.APIStatusError as exc:
                if exc.status_code in (401, 403):
                    state = "unreachable"
                    detail = f"the LLM rejected the credentials ({exc.status_code})"
            except Exception as exc:  # connection refused, timeout, TLS, ...
                state, detail = "unreachable", f"{type(exc).__name__}: {exc}"
            detail = self.redactor.text(detail) if detail else None
            self._last = (time.monotonic(), state, detail)
            return state, detail
