"""The app factory: :func:`create_app` wires state, guard and routes, with a lifespan."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp

from ..._gc import tune_gc as _tune_gc
from ...errors import ConfigError
from ...matcher import Matcher
from .guard import Guard
from .health import LLMProbe
from .limits import ServiceLimits
from .redaction import RedactingRecords, Redactor
from .routes import Routes
from .schemas import ErrorResponse
from .state import ServiceState

__all__ = ["create_app"]

log = logging.getLogger("nem_llm.service")


def create_app(
    matcher: Matcher,
    *,
    api_key: str | None = None,
    admin_key: str | None = None,
    limits: ServiceLimits | None = None,
    close_matcher: bool = False,
    probe_interval: float = 15.0,
    probe_timeout: float = 3.0,
    tune_gc: bool = False,
) -> FastAPI:
    """Build the FastAPI app serving ``matcher`` (a fresh app each call; no globals).

    The index is built in the background at startup (``/readyz`` says when it is ready).
    ``POST /v1/match`` is served by a lean endpoint beside FastAPI's routing (same models,
    same errors; the FastAPI route documents it in the OpenAPI schema).

    Args:
        matcher: the one Matcher of this process; every request shares it.
        api_key: when set, ``/v1/*`` and ``/metrics`` require ``Authorization: Bearer <it>``.
        admin_key: when set, entity writes (``POST``/``PUT``/``DELETE /v1/entities``)
            require this key instead (403 with ``api_key``); it also opens the rest.
        limits: request limits and the shutdown drain.
        close_matcher: close the matcher on shutdown (``nem-llm serve`` owns its matcher).
        probe_interval: seconds ``/readyz`` caches the LLM reachability probe.
        probe_timeout: seconds the probe (``GET /models``) may take.
        tune_gc: once the index is built, :func:`~nem_llm.integrations.service.tune_gc`
            (on by ``nem-llm serve``; process-wide, so off by default for an app in your
            own stack).

    Raises:
        ConfigError: ``limits.max_top_k`` below the matcher's ``top_k``.
    """
    limits = limits or ServiceLimits()
    if limits.max_top_k is not None and limits.max_top_k < matcher.settings.top_k:
        raise ConfigError(
            f"max_top_k {limits.max_top_k} is below the matcher's top_k "
            f"{matcher.settings.top_k}: raise it or lower top_k"
        )
    client = matcher.client
    redactor = Redactor([api_key, admin_key, client.api_key if client is not None else None])
    probe = LLMProbe(client, redactor, interval=probe_interval, timeout=probe_timeout)
    state = ServiceState(matcher, limits, redactor, probe, api_key_set=api_key is not None)

    def fit_done(task: asyncio.Task[Matcher]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            state.fit_error = redactor.text(f"building the index failed: {exc}")
            log.error("%s", state.fit_error)
            if state.on_fit_error is not None:
                state.on_fit_error(state.fit_error)
        elif tune_gc:
            _tune_gc()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        records: RedactingRecords | None = None
        if redactor.secrets:
            records = RedactingRecords(redactor, logging.getLogRecordFactory())
            logging.setLogRecordFactory(records)
        if not matcher.ready:
            state.fit_task = asyncio.create_task(matcher.fit_async(), name="nem-llm-fit")
            state.fit_task.add_done_callback(fit_done)
        elif tune_gc:
            _tune_gc()
        try:
            yield
        finally:
            state.draining = True
            await state.drain()
            if state.fit_task is not None and not state.fit_task.done():
                state.fit_task.cancel()
                await asyncio.gather(state.fit_task, return_exceptions=True)
            if close_matcher:
                await matcher.aclose()
            if records is not None and logging.getLogRecordFactory() is records:
                logging.setLogRecordFactory(records.previous)

    app = FastAPI(
        title="nem_llm",
        summary="LLM-assisted entity matching over HTTP.",
        version=_version(),
        lifespan=lifespan,
        responses={
            422: {"model": ErrorResponse, "description": "Invalid request or limit exceeded."},
            413: {"model": ErrorResponse, "description": "Request body too large."},
            503: {"model": ErrorResponse, "description": "Not ready, or shutting down."},
        },
    )
    routes = Routes(state)
    fast: dict[tuple[str, str], ASGIApp] = {("POST", "/v1/match"): routes.match_fast}
    app.add_middleware(Guard, state=state, api_key=api_key, admin_key=admin_key, fast=fast)
    routes.register(app, api_key=api_key or admin_key)
    app.state.nem_llm = state
    return app


def _version() -> str:
    try:
        return importlib.metadata.version("nem_llm")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
        return "0"
