"""The state one app holds: its matcher, limits, metrics, requests in flight, readiness."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

from ...matcher import Matcher
from ...models import MatchResult
from .errors import ApiError
from .health import LLMHealth, LLMProbe
from .limits import ServiceLimits
from .metrics import Metrics
from .redaction import Redactor

__all__ = ["ServiceState"]

log = logging.getLogger("nem_llm.service")


class ServiceState:
    """Per-app state (``app.state.nem_llm``): everything the routes and the guard share.

    Args:
        matcher: the one Matcher every request shares.
        limits: request limits and the shutdown drain.
        redactor: the secrets to keep out of answers and logs.
        probe: the LLM reachability probe behind ``/readyz``.
        api_key_set: whether the API needs a bearer token.
    """

    def __init__(
        self,
        matcher: Matcher,
        limits: ServiceLimits,
        redactor: Redactor,
        probe: LLMProbe,
        *,
        api_key_set: bool = False,
    ) -> None:
        self.matcher = matcher
        self.limits = limits
        self.redactor = redactor
        self.probe = probe
        self.metrics = Metrics(matcher)
        self.tasks: set[asyncio.Task[Any]] = set()  # the requests in flight
        self.metrics.in_flight.set_function(lambda: len(self.tasks))
        self.health = LLMHealth(failures=limits.llm_failures, window=limits.llm_failure_window)
        self.draining = False
        self.api_key_set = api_key_set
        self.fit_task: asyncio.Task[Matcher] | None = None
        self.fit_error: str | None = None
        #: called with the reason when the index cannot be built (``run_server`` stops)
        self.on_fit_error: Callable[[str], None] | None = None

    def observe(self, results: Iterable[MatchResult]) -> None:
        """Count results in the metrics and in the LLM's health."""
        for result in results:
            self.metrics.observe(result)
            if self.matcher.llm_configured:
                self.health.observe(result)

    def require_ready(self) -> None:
        """Raise the 503 of a service shutting down or whose index is not built yet."""
        if self.draining:
            raise ApiError(503, "shutting_down", "the service is shutting down")
        if not self.matcher.ready:
            detail = self.fit_error or "the index is being built"
            raise ApiError(503, "not_ready", detail)

    async def drain(self) -> None:
        """Wait for in-flight requests up to the drain timeout, then cancel the rest."""
        pending = set(self.tasks)
        if pending:
            log.info("draining %d in-flight request(s)", len(pending))
            _, pending = await asyncio.wait(pending, timeout=self.limits.drain_timeout)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("cancelled %d request(s) after the drain timeout", len(pending))
            await asyncio.wait(pending)
