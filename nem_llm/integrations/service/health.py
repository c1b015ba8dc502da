"""Whether the LLM answers: a cached probe (``GET /models``) and the recent calls' fate.

The probe alone says little: an endpoint can list its models and still hang on every
completion. :class:`LLMHealth` therefore watches the results the service returns, and
``/readyz`` answers 503 while the last few LLM calls all failed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import openai

from ..._llm.governor import classify_error
from ...models import MatchResult
from .redaction import Redactor

__all__ = ["LLM_FAILURES", "LLMHealth", "LLMProbe"]

#: The ``error_type`` codes that say the LLM (not the query) failed.
LLM_FAILURES = frozenset({"connection", "timeout", "server", "auth", "deadline"})


class LLMHealth:
    """Counts LLM calls that failed in a row; an answer from the LLM resets the count.

    Example:
        >>> health = LLMHealth(failures=3, window=60.0)
        >>> health.failing() is None
        True

    Args:
        failures: failed calls in a row that make the LLM count as failing ...
        window: ... for this many seconds after the last of them (then traffic may come
            back and try it again).
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(
        self, *, failures: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failures = failures
        self.window = window
        self.clock = clock
        self.in_a_row = 0
        self._last: tuple[float, str, str] | None = None

    def observe(self, result: MatchResult) -> None:
        """Take one result into account (only LLM answers and LLM failures count)."""
        if result.decided_by == "llm":
            self.in_a_row = 0
        elif result.status == "error" and result.error_type in LLM_FAILURES:
            self.in_a_row += 1
            self._last = (self.clock(), result.error_type, result.error or "")

    def failing(self) -> str | None:
        """Why the LLM counts as failing now (``"the last 3 LLM calls failed (connection):
        ..."``), or ``None``."""
        if self.in_a_row < self.failures or self._last is None:
            return None
        at, code, message = self._last
        if self.clock() - at > self.window:
            return None
        return f"the last {self.in_a_row} LLM calls failed ({code}): {message}"


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
                # named as results name it: a refused connection is "connection", even
                # where the transport reports a connect timeout
                state, detail = "unreachable", f"{classify_error(exc).cause}: {exc}"
            detail = self.redactor.text(detail) if detail else None
            self._last = (time.monotonic(), state, detail)
            return state, detail
