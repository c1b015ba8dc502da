"""The HTTP service: a FastAPI app over one Matcher (``nem-llm serve``, ``create_app``).

Endpoints::

    POST   /v1/match            one query (-> MatchResult) or a list (-> list, input order)
    POST   /v1/match:stream     NDJSON, one MatchResult a line as each finishes (``index`` kept)
    POST   /v1/entities         add entities (when the Matcher has an incremental index)
    PUT    /v1/entities         replace entities by id (same)
    DELETE /v1/entities/{id}    remove one entity (same)
    GET    /healthz             alive
    GET    /readyz              index built and the LLM reachable (or not configured)
    GET    /metrics             Prometheus text format
    GET    /docs                OpenAPI (the response models are nem_llm's public models)

One Matcher serves every request, so concurrent requests share its micro-batcher and its
governor (one RPM/TPM budget, one 429 cooldown): 200 clients of one query each become
micro-batches of ~100 queries (``nem_llm_embed_texts / nem_llm_embed_batches`` in
``/metrics``). ``POST /v1/match`` is served by a lean ASGI endpoint beside FastAPI's
routing (the same models, errors and auth; the FastAPI route documents it): see
``benchmarks/results/service.md`` for what each request costs. With ``api_key`` set,
``/v1/*`` and ``/metrics`` need ``Authorization: Bearer <key>`` (compared in constant
time); the probes and the docs stay open. Request limits answer 413 (body) or 422
(queries, query length) with ``{"error": {"type", "field", "message"}}``. A client that
disconnects cancels its work (and so its LLM calls); on shutdown in-flight requests
drain up to ``ServiceLimits.drain_timeout`` and are cancelled after. Secrets (the LLM
client's API key and the bearer token) are replaced by ``[redacted]`` in every response
body and log line.

Example:
    >>> app = create_app(Matcher("entities.jsonl"), api_key="s3cret")  # doctest: +SKIP
    >>> uvicorn.run(app)                                               # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import importlib.metadata
import logging
import math
import time
import traceback
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import openai
import uvicorn
from fastapi import APIRouter, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._gc import tune_gc
from ..errors import ConfigError, InputError, NemLLMError, NotReadyError
from ..matcher import Matcher
from ..models import Entity, Explanation, MatchResult

__all__ = [
    "EntitiesRequest",
    "ErrorResponse",
    "MatchRequest",
    "ReadyStatus",
    "ServiceLimits",
    "StreamRequest",
    "create_app",
    "server_config",
    "tune_gc",
]

log = logging.getLogger("nem_llm.service")
T = TypeVar("T")

REDACTED = "[redacted]"
_RESULTS = TypeAdapter(list[MatchResult])
_EXPLANATIONS = TypeAdapter(list[Explanation])
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PATHS = ("/v1/match", "/v1/match:stream", "/v1/entities", "/healthz", "/readyz", "/metrics")


@dataclass(frozen=True, kw_only=True)
class ServiceLimits:
    """Request limits and the shutdown drain of the HTTP service.

    Example:
        >>> ServiceLimits(max_queries=100, max_query_chars=500).max_body_bytes
        1048576

    Args:
        max_body_bytes: larger request bodies are answered 413 (field ``body``).
        max_queries: more queries in one request are answered 422 (field ``query``/``queries``).
        max_query_chars: a longer query is answered 422 naming it (``query[3]``).
        drain_timeout: seconds in-flight requests may run on after shutdown starts.
        max_explain_concurrency: explanations of a list computed at once.
    """

    max_body_bytes: int = 1_048_576
    max_queries: int = 1_000
    max_query_chars: int = 2_000
    drain_timeout: float = 30.0
    max_explain_concurrency: int = 64

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_queries", "max_query_chars", "max_explain_concurrency"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if not self.drain_timeout >= 0:
            raise ConfigError(f"drain_timeout must be >= 0, got {self.drain_timeout!r}")


# -- request and response models ---------------------------------------------------------


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")

    top_k: int | None = Field(default=None, ge=1, le=1000, description="Candidates retrieved.")
    threshold: float | None = Field(
        default=None, description="Per-request threshold (passed to the Matcher when set)."
    )
    where: dict[str, Any] | list[dict[str, Any] | None] | None = Field(
        default=None,
        description=(
            "Filter on entity attributes: a value (equality) or a list (membership). With a "
            "list of queries, also a list of filters (or nulls), one per query: a filter that "
            "fails makes its query an `error` result and leaves the others alone."
        ),
    )


class MatchRequest(_Options):
    """Body of ``POST /v1/match``: one query or a list, and the options."""

    query: str | list[str] = Field(description="One query, or a list (results in input order).")
    explain: bool = Field(default=False, description="Return Explanations (route, reasons).")


class StreamRequest(_Options):
    """Body of ``POST /v1/match:stream``: the queries and the options."""

    queries: list[str]


class EntitiesRequest(BaseModel):
    """Body of ``POST /v1/entities``."""

    model_config = ConfigDict(extra="forbid")

    entities: list[Entity] = Field(min_length=1)


class ErrorDetail(BaseModel):
    """What went wrong, and which field of the request (if one) caused it."""

    type: str
    message: str
    field: str | None = None


class ErrorResponse(BaseModel):
    """Every error answer of the service."""

    error: ErrorDetail


class ReadyStatus(BaseModel):
    """Body of ``GET /readyz``."""

    ready: bool
    index_built: bool
    llm: Literal["not_configured", "reachable", "unreachable"]
    detail: str | None = None


class EntitiesChanged(BaseModel):
    """Body answering entity administration."""

    added: int = 0
    updated: int = 0
    removed: int = 0


class _ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.type = type_
        self.message = message
        self.field = field


# -- secrets -----------------------------------------------------------------------------


class _Redactor:
    """Replace known secrets in text and bytes (keys shorter than 6 chars are not secrets)."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        self.secrets = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)
        self._bytes = [s.encode() for s in self.secrets]

    def text(self, value: str) -> str:
        for secret in self.secrets:
            value = value.replace(secret, REDACTED)
        return value

    def data(self, value: bytes) -> bytes:
        for secret in self._bytes:
            value = value.replace(secret, REDACTED.encode())
        return value


class _RedactingRecords:
    """A log-record factory that redacts secrets from every record, whichever library logs.

    Installed for the app's lifetime (instructor and openai log provider error messages,
    which may quote a key); tracebacks are formatted and redacted up front.
    """

    def __init__(self, redactor: _Redactor, previous: Callable[..., logging.LogRecord]) -> None:
        self.redactor = redactor
        self.previous = previous

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.previous(*args, **kwargs)
        message = record.getMessage()
        redacted = self.redactor.text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_info[0] is not None:
            text = "".join(traceback.format_exception(*record.exc_info))
            record.exc_text = self.redactor.text(text).rstrip("\n")
        return record


# -- metrics -----------------------------------------------------------------------------


class _GovernorCollector:
    """Reads the matcher's totals at scrape time: LLM calls, retries, tokens, cost (the
    governor) and the micro-batches the embedder was given."""

    def __init__(self, matcher: Matcher) -> None:
        self.matcher = matcher

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self.matcher.governor_stats
        calls = CounterMetricFamily("nem_llm_llm_calls", "LLM calls (one per adjudication).")
        attempts = CounterMetricFamily("nem_llm_llm_attempts", "LLM attempts, retries included.")
        failures = CounterMetricFamily("nem_llm_llm_failures", "LLM calls that failed for good.")
        retries = CounterMetricFamily(
            "nem_llm_llm_retries", "LLM retries by cause.", labels=["cause"]
        )
        limited = CounterMetricFamily("nem_llm_llm_rate_limited", "429 answers received.")
        tokens = CounterMetricFamily("nem_llm_llm_tokens", "Tokens spent.", labels=["kind"])
        cost = CounterMetricFamily("nem_llm_llm_cost_usd", "Dollars spent (list prices).")
        in_flight = GaugeMetricFamily("nem_llm_llm_in_flight", "LLM calls in flight.")
        if stats is None:
            for family in (calls, attempts, failures, limited, cost):
                family.add_metric([], 0.0)
            for kind in ("prompt", "completion"):
                tokens.add_metric([kind], 0.0)
            in_flight.add_metric([], 0.0)
        else:
            calls.add_metric([], stats.calls)
            attempts.add_metric([], stats.attempts)
            failures.add_metric([], stats.failures)
            for cause, n in sorted(stats.retries_by_cause.items()):
                retries.add_metric([cause], n)
            limited.add_metric([], stats.rate_limited)
            tokens.add_metric(["prompt"], stats.usage.prompt_tokens)
            tokens.add_metric(["completion"], stats.usage.completion_tokens)
            cost.add_metric([], stats.usage.cost_usd)
            in_flight.add_metric([], stats.in_flight)
        yield from (calls, attempts, failures, retries, limited, tokens, cost, in_flight)

        # the micro-batcher exists once a query was matched on this loop
        runtime = getattr(self.matcher, "_runtime", None)
        batcher = getattr(runtime, "batcher", None)
        batches = CounterMetricFamily(
            "nem_llm_embed_batches", "Micro-batches encoded (texts / batches: their mean size)."
        )
        batches.add_metric([], getattr(batcher, "batches", 0))
        texts = CounterMetricFamily("nem_llm_embed_texts", "Queries encoded in micro-batches.")
        texts.add_metric([], getattr(batcher, "items", 0))
        yield from (batches, texts)


class _Metrics:
    """The service's Prometheus registry (one per app, so tests can build many apps)."""

    def __init__(self, matcher: Matcher) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "nem_llm_http_requests",
            "HTTP requests answered.",
            ["method", "path", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "nem_llm_http_request_duration_seconds",
            "HTTP request latency.",
            ["method", "path"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "nem_llm_http_requests_in_flight", "HTTP requests in flight.", registry=r
        )
        self.disconnects = Counter(
            "nem_llm_http_client_disconnects", "Requests cancelled by their client.", registry=r
        )
        self.results = Counter(
            "nem_llm_results", "Match results.", ["status", "decided_by"], registry=r
        )
        self.result_seconds = Histogram(
            "nem_llm_result_duration_seconds",
            "Latency of one query.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.llm_attempt_seconds = Histogram(
            "nem_llm_llm_attempt_duration_seconds",
            "Latency of one LLM attempt.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_GovernorCollector(matcher))
        # labelled children, looked up once per label set (``labels()`` takes a lock and
        # builds a tuple on every call: measurable at thousands of requests a second)
        self._answered: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._decided: dict[tuple[str, str | None], Counter] = {}

    def answered(self, method: str, path: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency."""
        key = (method, path, status)
        children = self._answered.get(key)
        if children is None:
            children = (
                self.requests.labels(method, path, str(status)),
                self.request_seconds.labels(method, path),
            )
            self._answered[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe(self, results: Iterable[MatchResult]) -> None:
        for result in results:
            key = (result.status, result.decided_by)
            counter = self._decided.get(key)
            if counter is None:
                counter = self.results.labels(result.status, result.decided_by or "none")
                self._decided[key] = counter
            counter.inc()
            self.result_seconds.observe(result.latency_s)
            for attempt in result.attempts:
                self.llm_attempt_seconds.observe(attempt.latency_s)


def _path_label(path: str) -> str:
    if path in _PATHS:
        return path
    if path.startswith("/v1/entities/"):
        return "/v1/entities/{entity_id}"
    return "other"


# -- state and the ASGI guard ------------------------------------------------------------


class _State:
    """Per-app state: the matcher, limits, metrics, in-flight requests, readiness."""

    def __init__(
        self,
        matcher: Matcher,
        limits: ServiceLimits,
        redactor: _Redactor,
        probe_interval: float,
        probe_timeout: float,
    ) -> None:
        self.matcher = matcher
        self.limits = limits
        self.redactor = redactor
        self.metrics = _Metrics(matcher)
        self.tasks: set[asyncio.Task[Any]] = set()  # the requests in flight
        self.metrics.in_flight.set_function(lambda: len(self.tasks))
        self.draining = False
        self.fit_task: asyncio.Task[Matcher] | None = None
        self.fit_error: str | None = None
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self._probe: tuple[float, str, str | None] | None = None
        self._probe_lock = asyncio.Lock()

    def require_ready(self) -> None:
        if self.draining:
            raise _ApiError(503, "shutting_down", "the service is shutting down")
        if not self.matcher.ready:
            detail = self.fit_error or "the index is being built"
            raise _ApiError(503, "not_ready", detail)

    async def probe_llm(self) -> tuple[str, str | None]:
        """Whether the LLM answers (any HTTP answer but 401/403 counts); cached a while."""
        client = self.matcher.client
        if client is None:
            return "not_configured", None
        async with self._probe_lock:
            now = time.monotonic()
            if self._probe is not None and now - self._probe[0] < self.probe_interval:
                return self._probe[1], self._probe[2]
            state, detail = "reachable", None
            try:
                # the matcher's own client (max_retries=0); a per-call timeout, no new client
                await client.models.list(timeout=self.probe_timeout)
            except openai.APIStatusError as exc:
                if exc.status_code in (401, 403):
                    state, detail = (
                        "unreachable",
                        f"the LLM rejected the credentials ({exc.status_code})",
                    )
            except Exception as exc:  # connection refused, timeout, TLS, ...
                state, detail = "unreachable", f"{type(exc).__name__}: {exc}"
            detail = self.redactor.text(detail) if detail else None
            self._probe = (time.monotonic(), state, detail)
            return state, detail

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


def _error_json(status: int, type_: str, message: str, field: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(type=type_, message=message, field=field))
    response = JSONResponse(body.model_dump(), status_code=status)
    if status == 401:
        response.headers["WWW-Authenticate"] = "Bearer"
    elif status == 503:
        response.headers["Retry-After"] = "1"
    return response


def _route_path(scope: Scope) -> str:
    """The request path inside the app (``root_path`` removed when mounted under a prefix)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("/", ""):
        return path[len(root) :] or "/"
    return path


def _bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The token of ``Authorization: Bearer <token>`` (read as FastAPI's HTTPBearer), or b""."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else b""
    return b""


def _guarded(path: str) -> bool:
    """Paths behind the bearer token: the API and the metrics (not the probes nor the docs)."""
    return path.startswith("/v1/") or path == "/metrics"


class _Guard:
    """Pure ASGI middleware: auth, body-size limit, metrics, cancel on disconnect, drain.

    It checks the bearer token (before reading anything), reads the whole body (answering
    413 past the limit), and hands it to the app, or to a fast endpoint of ``fast`` (ASGI
    apps by method and path, served without FastAPI's routing: ``POST /v1/match``).
    Meanwhile one listener awaits ``http.disconnect``: if the client goes away before the
    response is complete, the request's task is cancelled, and with it the request's
    matching and LLM calls; the request then counts as 499.
    """

    def __init__(
        self,
        app: ASGIApp,
        state: _State,
        api_key: str | None = None,
        fast: dict[tuple[str, str], ASGIApp] | None = None,
    ) -> None:
        self.app = app
        self.state = state
        self.api_key = api_key.encode() if api_key is not None else None
        self.fast = fast or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        metrics = state.metrics
        method, path = scope["method"], _route_path(scope)
        status = 0
        started = time.perf_counter()
        task = asyncio.current_task()
        assert task is not None
        state.tasks.add(task)
        try:
            status = await self._handle(scope, receive, send, method, path, task)
        finally:
            state.tasks.discard(task)
            metrics.answered(method, _path_label(path), status, time.perf_counter() - started)

    async def _handle(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        method: str,
        path: str,
        task: asyncio.Task[Any],
    ) -> int:
        headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
        if self.api_key is not None and _guarded(path):
            if not hmac.compare_digest(_bearer_token(headers), self.api_key):
                message = "missing or wrong bearer token"
                await _error_json(401, "unauthorized", message, "Authorization")(
                    scope, receive, send
                )
                return 401
        body = await self._body(scope, receive, send, headers)
        if isinstance(body, int):
            return body
        app = self.fast.get((method, path), self.app)
        delivered = False
        disconnected: asyncio.Event | None = None
        in_app = True
        complete = False
        hung_up = False
        status = 0

        async def replay() -> Message:
            nonlocal delivered, disconnected
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            disconnected = disconnected or asyncio.Event()
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def tracked_send(message: Message) -> None:
            nonlocal status, complete
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                complete = True
            await send(message)

        async def listen() -> None:
            nonlocal hung_up
            while (await receive())["type"] != "http.disconnect":
                pass
            if disconnected is not None:
                disconnected.set()
            if in_app and not complete:
                hung_up = True
                task.cancel()

        # one listener task per request; the app runs in the request's own task
        listener = asyncio.get_running_loop().create_task(listen())
        try:
            await app(scope, replay, tracked_send)
        except asyncio.CancelledError:
            if hung_up and task.uncancel() == 0:  # our own cancel, for a client that left
                self.state.metrics.disconnects.inc()
                return 499
            # the server gave up on us (drain timeout): the work is stopped, say why, go
            # on being cancelled
            if status == 0:
                with contextlib.suppress(Exception):
                    await _error_json(503, "shutting_down", "the service shut down")(
                        scope, receive, send
                    )
            raise
        finally:
            in_app = False
            listener.cancel()
        return status

    async def _body(
        self, scope: Scope, receive: Receive, send: Send, headers: list[tuple[bytes, bytes]]
    ) -> bytes | int:
        """The whole request body, or the status answered instead (413, or 499 on hang-up)."""
        limit = self.state.limits.max_body_bytes
        too_large = f"request body exceeds {limit} bytes"
        for name, value in headers:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _error_json(413, "request_too_large", too_large, "body")(scope, receive, send)
                return 413
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return 499
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _error_json(413, "request_too_large", too_large, "body")(scope, receive, send)
                return 413
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


# -- the app -----------------------------------------------------------------------------


class _NDJSONResponse(Response):
    """Streams NDJSON lines with plain awaits (no task group).

    Starlette's ``StreamingResponse`` runs the body in an anyio task group; cancelling
    it there interrupts the clean-up of the Matcher's stream, so httpcore never closes the
    LLM connection of a cancelled call (the provider keeps working for nobody). Here a
    disconnect cancels the request task (see ``_Guard``) and the clean-up runs whole.
    """

    media_type = "application/x-ndjson"

    def __init__(self, lines: AsyncGenerator[bytes, None]) -> None:
        super().__init__(media_type=self.media_type)
        self.lines = lines

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(k, v) for k, v in self.raw_headers if k != b"content-length"]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        async with aclosing(self.lines):
            async for line in self.lines:
                await send({"type": "http.response.body", "body": line, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _field_of(loc: Sequence[int | str]) -> str | None:
    """``("body", "query", "list[str]", 3)`` -> ``"query[3]"`` (pydantic's union tags dropped)."""
    parts = [p for p in loc if p != "body" and not (isinstance(p, str) and _is_type_tag(p))]
    if not parts:
        return None
    out = str(parts[0])
    for p in parts[1:]:
        out += f"[{p}]" if isinstance(p, int) else f".{p}"
    return out


def _is_type_tag(part: str) -> bool:
    return part in {"str", "int", "float", "bool", "dict", "list"} or "[" in part


def _invalid_json(errors: Sequence[Any]) -> JSONResponse:
    """The 422 answer of a body that fails validation, naming its deepest field."""
    # the deepest location names the field best (a union reports every branch)
    first = max(errors, key=lambda e: len(e.get("loc", ()))) if errors else {}
    message = str(first.get("msg", "invalid request"))
    return _error_json(422, "invalid_request", message, _field_of(first.get("loc", ())))


ModelT = TypeVar("ModelT", bound=BaseModel)


def _parse_body(model: type[ModelT], scope: Scope, body: bytes) -> ModelT:
    """Validate a JSON body as FastAPI reads it (a body of another media type is invalid).

    Raises:
        ValidationError: the body is not JSON or does not fit ``model``.
    """
    for name, value in scope.get("headers", []):
        if name == b"content-type" and b"json" not in value.lower():
            return model.model_validate(body)  # raises: bytes are not an object
    return model.model_validate_json(body or b"null")


def _check_queries(queries: list[str], name: str, limits: ServiceLimits) -> None:
    if len(queries) > limits.max_queries:
        raise _ApiError(
            422,
            "too_many_queries",
            f"{len(queries)} queries in one request; at most {limits.max_queries}",
            name,
        )
    for i, q in enumerate(queries):
        if len(q) > limits.max_query_chars:
            raise _ApiError(
                422,
                "query_too_long",
                f"query of {len(q)} characters; at most {limits.max_query_chars}",
                f"{name}[{i}]",
            )


def _check_where(where: object, queries: int, many: bool) -> None:
    """A list of filters needs a list of queries, one filter per query."""
    if not isinstance(where, list):
        return
    if not many:
        raise _ApiError(
            422, "invalid_option", "one query takes one filter (an object), not a list", "where"
        )
    if len(where) != queries:
        raise _ApiError(
            422, "invalid_option", f"{len(where)} filters for {queries} queries", "where"
        )


def _options_for(_fn: Any, body: _Options) -> dict[str, Any]:
    """A request's per-call options that are set (every match method takes them all)."""
    options = {"top_k": body.top_k, "threshold": body.threshold, "where": body.where}
    return {name: value for name, value in options.items() if value is not None}


def create_app(
    matcher: Matcher,
    *,
    api_key: str | None = None,
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
        limits: request limits and the shutdown drain.
        close_matcher: close the matcher on shutdown (``nem-llm serve`` owns its matcher).
        probe_interval: seconds ``/readyz`` caches the LLM reachability probe.
        probe_timeout: seconds the probe (``GET /models``) may take.
        tune_gc: once the index is built, :func:`tune_gc` (on by ``nem-llm serve``;
            process-wide, so off by default for an app in your own stack).
    """
    limits = limits or ServiceLimits()
    client = matcher.client
    redactor = _Redactor([api_key, client.api_key if client is not None else None])
    state = _State(matcher, limits, redactor, probe_interval, probe_timeout)
    records: _RedactingRecords | None = None

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        nonlocal records
        if redactor.secrets:
            records = _RedactingRecords(redactor, logging.getLogRecordFactory())
            logging.setLogRecordFactory(records)
        if not matcher.ready:
            state.fit_task = asyncio.create_task(matcher.fit_async(), name="nem-llm-fit")
            state.fit_task.add_done_callback(_fit_done)
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

    def _fit_done(task: asyncio.Task[Matcher]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            state.fit_error = redactor.text(f"building the index failed: {exc}")
            log.error("%s", state.fit_error)
        elif tune_gc:
            _tune_gc()

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
    fast: dict[tuple[str, str], ASGIApp] = {}
    app.add_middleware(_Guard, state=state, api_key=api_key, fast=fast)

    def api_error(exc: _ApiError) -> JSONResponse:
        return _error_json(exc.status, exc.type, redactor.text(exc.message), exc.field)

    def nem_error(exc: NemLLMError) -> JSONResponse:
        message = redactor.text(str(exc))
        if isinstance(exc, NotReadyError):
            return _error_json(503, "not_ready", message)
        if isinstance(exc, ConfigError):
            field = next((f for f in ("where", "threshold", "top_k") if f in message), None)
            return _error_json(422, "invalid_option", message, field)
        if isinstance(exc, InputError):
            return _error_json(422, "invalid_query", message, "query")
        log.error("request failed: %s", message)
        return _error_json(500, type(exc).__name__, message)

    @app.exception_handler(_ApiError)
    async def _api_error(_request: Request, exc: _ApiError) -> JSONResponse:
        return api_error(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _invalid_json(exc.errors())

    @app.exception_handler(NemLLMError)
    async def _nem_error(_request: Request, exc: NemLLMError) -> JSONResponse:
        return nem_error(exc)

    # _Guard enforces the token (one check for every route, the fast one included); this
    # dependency only declares the scheme in the OpenAPI schema
    bearer = HTTPBearer(auto_error=False, description="The key named by --api-key-env.")
    guarded = [Security(bearer)] if api_key is not None else []
    v1 = APIRouter(prefix="/v1", dependencies=guarded)

    def json_bytes(payload: bytes) -> Response:
        return Response(redactor.data(payload), media_type="application/json")

    async def call(body: _Options, work: Awaitable[T], where: str = "where") -> T:
        """Await a Matcher call; a ConfigError names the request option it came from."""
        with options_named(body, where):
            return await work

    @contextlib.contextmanager
    def options_named(body: _Options, where: str = "where") -> Iterator[None]:
        """A ConfigError raised inside becomes a 422 naming the request option it is about."""
        try:
            yield
        except ConfigError as exc:
            message = redactor.text(str(exc))
            field = next(
                (
                    f
                    for f in ("threshold", "top_k")
                    if f in message and getattr(body, f) is not None
                ),
                where if body.where is not None else None,
            )
            raise _ApiError(422, "invalid_option", message, field) from None

    async def matched(body: MatchRequest) -> Response:
        """The answer of ``POST /v1/match`` (both endpoints below serve it)."""
        state.require_ready()
        many = isinstance(body.query, list)
        queries = body.query if isinstance(body.query, list) else [body.query]
        _check_queries(queries, "query", limits)
        _check_where(body.where, len(queries), many)
        if body.explain:
            opts = _options_for(matcher.explain_match_async, body)
            gate = asyncio.Semaphore(limits.max_explain_concurrency)

            async def explain(i: int, q: str) -> Explanation:
                if not isinstance(body.where, list):
                    async with gate:
                        return await call(body, matcher.explain_match_async(q, **opts))
                # one filter per query: a failing one is named by its index
                own = {**opts, "where": body.where[i]}
                async with gate:
                    return await call(body, matcher.explain_match_async(q, **own), f"where[{i}]")

            explanations = list(
                await asyncio.gather(*(explain(i, q) for i, q in enumerate(queries)))
            )
            state.metrics.observe(e.result for e in explanations)
            if not many:
                return json_bytes(explanations[0].model_dump_json().encode())
            return json_bytes(_EXPLANATIONS.dump_json(explanations))
        if not many:
            opts = _options_for(matcher.match_async, body)
            result = await call(body, matcher.match_async(queries[0], **opts))
            state.metrics.observe([result])
            return json_bytes(result.model_dump_json().encode())
        opts = _options_for(matcher.match_batch_async, body)
        # no more workers than queries: a request of 10 should not start 64 tasks
        results = await call(
            body,
            matcher.match_batch_async(
                queries, strategy="gather", batch_size=min(64, len(queries)), **opts
            ),
        )
        state.metrics.observe(results)
        return json_bytes(_RESULTS.dump_json(results))

    @v1.post(
        "/match",
        response_model=MatchResult | Explanation | list[MatchResult] | list[Explanation],
        summary="Match one query or a list (input order).",
    )
    async def match(body: MatchRequest) -> Response:
        # documents the endpoint; _Guard hands POST /v1/match to match_fast instead
        return await matched(body)

    async def match_fast(scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /v1/match`` without FastAPI's routing, dependencies and wrappers."""
        try:
            body = _parse_body(MatchRequest, scope, (await receive())["body"])
            response = await matched(body)
        except ValidationError as exc:
            response = _invalid_json(exc.errors(include_url=False))
        except _ApiError as exc:
            response = api_error(exc)
        except NemLLMError as exc:
            response = nem_error(exc)
        await response(scope, receive, send)

    fast["POST", "/v1/match"] = match_fast

    @v1.post(
        "/match:stream",
        summary="Match many queries; NDJSON, one MatchResult a line, as each finishes.",
        response_class=_NDJSONResponse,
        status_code=200,
        responses={200: {"content": {"application/x-ndjson": {}}, "model": MatchResult}},
    )
    async def match_stream(body: StreamRequest) -> Response:
        state.require_ready()
        _check_queries(body.queries, "queries", limits)
        _check_where(body.where, len(body.queries), many=True)
        opts = _options_for(matcher.match_stream_async, body)
        if isinstance(body.where, dict):
            # checked before the 200 goes out: the Matcher checks a shared filter only once
            # the stream is read, when an error can no longer change the status
            with options_named(body):
                matcher.catalog.where_mask(body.where)
        stream = matcher.match_stream_async(body.queries, strategy="as_completed", **opts)

        async def lines() -> AsyncGenerator[bytes, None]:
            async with aclosing(stream):
                async for result in stream:
                    state.metrics.observe([result])
                    yield redactor.data(result.model_dump_json().encode()) + b"\n"

        return _NDJSONResponse(lines())

    @v1.post(
        "/entities",
        response_model=EntitiesChanged,
        status_code=201,
        summary="Add entities to the live index (no rebuild).",
        responses={422: {"model": ErrorResponse}},
    )
    async def add_entities(body: EntitiesRequest) -> EntitiesChanged:
        state.require_ready()
        try:
            await matcher.add_entities_async(body.entities)
        except InputError as exc:  # a duplicate id, an invalid entity
            raise _ApiError(422, "invalid_entities", str(exc), "entities") from None
        return EntitiesChanged(added=len(body.entities))

    @v1.put(
        "/entities",
        response_model=EntitiesChanged,
        summary="Replace entities by id in the live index.",
        responses={422: {"model": ErrorResponse}},
    )
    async def update_entities(body: EntitiesRequest) -> EntitiesChanged:
        state.require_ready()
        try:
            await matcher.update_entities_async(body.entities)
        except InputError as exc:  # an unknown id, an invalid entity
            raise _ApiError(422, "invalid_entities", str(exc), "entities") from None
        return EntitiesChanged(updated=len(body.entities))

    @v1.delete(
        "/entities/{entity_id}",
        response_model=EntitiesChanged,
        summary="Remove one entity from the live index.",
        responses={404: {"model": ErrorResponse}, 422: {"model": ErrorResponse}},
    )
    async def remove_entity(entity_id: str) -> EntitiesChanged:
        state.require_ready()
        try:
            await matcher.remove_entities_async([entity_id])
        except (InputError, KeyError) as exc:
            if entity_id not in matcher.catalog.by_id:
                raise _ApiError(
                    404, "not_found", f"no entity with id {entity_id!r}", "entity_id"
                ) from None
            # the id is there, the change is refused (the last entity of the catalog)
            raise _ApiError(422, "invalid_entities", str(exc), "entity_id") from None
        return EntitiesChanged(removed=1)

    app.include_router(v1)

    @app.get("/healthz", summary="Alive.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=ReadyStatus,
        summary="Ready: index built and the LLM reachable (or not configured).",
        responses={503: {"model": ReadyStatus}},
    )
    async def readyz() -> JSONResponse:
        llm, detail = await state.probe_llm()
        built = matcher.ready
        if state.draining:
            detail = "shutting down"
        elif not built:
            detail = state.fit_error or "the index is being built"
        ready = built and llm != "unreachable" and not state.draining
        body = ReadyStatus(ready=ready, index_built=built, llm=llm, detail=detail)  # type: ignore[arg-type]
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    @app.get(
        "/metrics",
        summary="Prometheus metrics (text format).",
        response_class=Response,
        dependencies=guarded,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
    )
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.state.nem_llm = state
    return app


_tune_gc = tune_gc  # create_app's parameter of the same name hides it there


def server_config(
    app: FastAPI,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    drain_timeout: float | None = None,
    log_level: str = "info",
    access_log: bool = True,
) -> uvicorn.Config:
    """The uvicorn configuration ``nem-llm serve`` runs ``app`` with.

    On SIGTERM/Ctrl-C uvicorn stops accepting connections and lets in-flight requests
    finish for up to ``drain_timeout`` seconds (default: the app's
    ``ServiceLimits.drain_timeout``), then cancels them. ``access_log=False`` drops
    uvicorn's line per request (about a tenth of the server's CPU per single-query
    request, measured: ``/metrics`` counts requests either way).
    """
    if drain_timeout is None:
        drain_timeout = app.state.nem_llm.limits.drain_timeout
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=max(1, math.ceil(drain_timeout)),
        server_header=False,
    )


def _version() -> str:
    try:
        return importlib.metadata.version("nem_llm")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
        return "0"
