"""The endpoints: one method each on :class:`Routes`, a small class over the app's state.

``POST /v1/match`` is served twice over: :meth:`Routes.match_fast` is a lean ASGI endpoint
the guard hands the request to (no FastAPI routing, dependencies or wrappers: see
``benchmarks/results/service.md`` for what that saves), and the FastAPI route
:meth:`Routes.match` documents it in the OpenAPI schema. Both answer through
:meth:`Routes.matched`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Iterator
from contextlib import aclosing
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, TypeAdapter, ValidationError
from starlette.types import Receive, Scope, Send

from ...errors import ConfigError, InputError, NemLLMError
from ...models import Explanation, MatchResult
from .errors import ApiError, error_json, invalid_json, nem_error_json
from .limits import check_aliases, check_options, check_queries, check_where
from .results import ResultStream, deadline_result
from .schemas import (
    EntitiesChanged,
    EntitiesRequest,
    ErrorResponse,
    MatchOptions,
    MatchRequest,
    ReadyStatus,
    StreamRequest,
    plain,
)
from .state import ServiceState

__all__ = ["Routes"]

T = TypeVar("T")
ModelT = TypeVar("ModelT", bound=BaseModel)

_RESULTS = TypeAdapter(list[MatchResult])
_EXPLANATIONS = TypeAdapter(list[Explanation])


def parse_body(model: type[ModelT], body: bytes) -> ModelT:
    """Validate a JSON body (the guard has made sure it is JSON, whatever its declared type).

    Raises:
        ValidationError: the body is not JSON or does not fit ``model``.
    """
    return model.model_validate_json(body or b"null")


class Routes:
    """Every endpoint of the service, as methods over one :class:`ServiceState`."""

    def __init__(self, state: ServiceState) -> None:
        self.state = state
        self.matcher = state.matcher
        self.redactor = state.redactor

    # -- answers -------------------------------------------------------------------------

    def api_error(self, exc: ApiError) -> JSONResponse:
        """The answer an :class:`ApiError` asks for (secrets redacted)."""
        return error_json(exc.status, exc.type, self.redactor.text(exc.message), exc.field)

    def nem_error(self, exc: NemLLMError) -> JSONResponse:
        """The answer to one of nem_llm's errors."""
        return nem_error_json(exc, self.redactor)

    def json_bytes(self, payload: bytes) -> Response:
        """A JSON answer from serialised bytes (secrets redacted)."""
        return Response(self.redactor.data(payload), media_type="application/json")

    @contextlib.contextmanager
    def options_named(self, body: MatchOptions, where: str = "where") -> Iterator[None]:
        """A ConfigError raised inside becomes a 422 naming the request option it is about."""
        try:
            yield
        except ConfigError as exc:
            message = self.redactor.text(str(exc))
            field = next(
                (
                    f
                    for f in ("threshold", "top_k")
                    if f in message and getattr(body, f) is not None
                ),
                where if body.where is not None else None,
            )
            raise ApiError(422, "invalid_option", message, field) from None

    async def call(self, body: MatchOptions, work: Awaitable[T], where: str = "where") -> T:
        """Await a Matcher call; a ConfigError names the request option it came from."""
        with self.options_named(body, where):
            return await work

    # -- matching ------------------------------------------------------------------------

    def _checked(
        self, body: MatchOptions, queries: list[str | dict[str, Any]], name: str, many: bool
    ) -> None:
        """Refuse what the limits do not allow: sizes, options, filters."""
        self.state.require_ready()
        limits = self.state.limits
        check_queries(queries, name, limits)
        check_options(body.top_k, body.threshold, limits, self.matcher.settings.top_k)
        check_where(body.where, len(queries), many)

    async def matched(self, body: MatchRequest) -> Response:
        """The answer of ``POST /v1/match`` (both endpoints serve it)."""
        many = isinstance(body.query, list)
        queries = [plain(q) for q in (body.query if isinstance(body.query, list) else [body.query])]
        self._checked(body, queries, "query", many)
        seconds = self.state.limits.deadline
        deadline_at = asyncio.get_running_loop().time() + seconds
        if body.explain:
            explanations = await self._explained(body, queries, deadline_at)
            self.state.observe(e.result for e in explanations)
            if not many:
                return self.json_bytes(explanations[0].model_dump_json().encode())
            return self.json_bytes(_EXPLANATIONS.dump_json(explanations))
        opts = body.matcher_options()
        if not many:
            try:
                async with asyncio.timeout_at(deadline_at):
                    result = await self.call(body, self.matcher.match_async(queries[0], **opts))
            except TimeoutError:
                result = deadline_result(0, queries[0], seconds)
            self.state.observe((result,))
            return self.json_bytes(result.model_dump_json().encode())
        found: dict[int, MatchResult] = {}
        # no more workers than queries: a request of 10 should not start 64 tasks
        stream = self.matcher.match_stream_async(
            queries, strategy="gather", batch_size=min(64, len(queries)), **opts
        )
        try:
            with self.options_named(body):
                async with asyncio.timeout_at(deadline_at), aclosing(stream):
                    async for result in stream:
                        found[result.index] = result
        except TimeoutError:
            pass
        results = [found.get(i) or deadline_result(i, q, seconds) for i, q in enumerate(queries)]
        self.state.observe(results)
        return self.json_bytes(_RESULTS.dump_json(results))

    async def _explained(
        self, body: MatchRequest, queries: list[str | dict[str, Any]], deadline_at: float
    ) -> list[Explanation]:
        """One explanation per query, at most ``max_explain_concurrency`` at once (504 at
        the deadline: an explanation needs a decision)."""
        opts = body.matcher_options()
        gate = asyncio.Semaphore(self.state.limits.max_explain_concurrency)

        async def explain(i: int, q: Any) -> Explanation:
            if not isinstance(body.where, list):
                async with gate:
                    return await self.call(body, self.matcher.explain_match_async(q, **opts))
            # one filter per query: a failing one is named by its index
            own = {**opts, "where": body.where[i]}
            async with gate:
                work = self.matcher.explain_match_async(q, **own)
                return await self.call(body, work, f"where[{i}]")

        try:
            async with asyncio.timeout_at(deadline_at):
                return list(await asyncio.gather(*(explain(i, q) for i, q in enumerate(queries))))
        except TimeoutError:
            seconds = self.state.limits.deadline
            message = f"the request's deadline ({seconds:g} s) passed before a decision"
            raise ApiError(504, "deadline", message) from None

    async def match(self, body: MatchRequest) -> Response:
        """Match one query or a list (input order)."""
        # documents the endpoint; the guard hands POST /v1/match to match_fast instead
        return await self.matched(body)

    async def match_fast(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /v1/match`` without FastAPI's routing, dependencies and wrappers."""
        try:
            body = parse_body(MatchRequest, (await receive())["body"])
            response = await self.matched(body)
        except ValidationError as exc:
            response = invalid_json(exc.errors(include_url=False))
        except ApiError as exc:
            response = self.api_error(exc)
        except NemLLMError as exc:
            response = self.nem_error(exc)
        await response(scope, receive, send)

    async def match_stream(self, body: StreamRequest) -> Response:
        """Match many queries; NDJSON, one MatchResult a line, as each finishes."""
        queries = [plain(q) for q in body.queries]
        self._checked(body, queries, "queries", many=True)
        seconds = self.state.limits.deadline
        deadline_at = asyncio.get_running_loop().time() + seconds
        opts = body.matcher_options()
        if isinstance(body.where, dict):
            # checked before the 200 goes out: the Matcher checks a shared filter only once
            # the stream is read, when an error can no longer change the status
            with self.options_named(body):
                self.matcher.catalog.where_mask(body.where)
        stream = self.matcher.match_stream_async(queries, strategy="as_completed", **opts)

        def line(result: MatchResult) -> bytes:
            self.state.observe((result,))
            return self.redactor.data(result.model_dump_json().encode()) + b"\n"

        return ResultStream(stream, queries, deadline_at=deadline_at, seconds=seconds, line=line)

    # -- entity administration -----------------------------------------------------------

    async def add_entities(self, body: EntitiesRequest) -> EntitiesChanged:
        """Add entities to the live index (no rebuild)."""
        self.state.require_ready()
        check_aliases(body.entities, self.state.limits)
        try:
            await self.matcher.add_entities_async(body.entities)
        except InputError as exc:  # a duplicate id, an invalid entity
            raise ApiError(422, "invalid_entities", str(exc), "entities") from None
        return EntitiesChanged(added=len(body.entities))

    async def update_entities(self, body: EntitiesRequest) -> EntitiesChanged:
        """Replace entities by id in the live index."""
        self.state.require_ready()
        check_aliases(body.entities, self.state.limits)
        try:
            await self.matcher.update_entities_async(body.entities)
        except InputError as exc:  # an unknown id, an invalid entity
            raise ApiError(422, "invalid_entities", str(exc), "entities") from None
        return EntitiesChanged(updated=len(body.entities))

    async def remove_entity(self, entity_id: str) -> EntitiesChanged:
        """Remove one entity from the live index."""
        self.state.require_ready()
        try:
            await self.matcher.remove_entities_async([entity_id])
        except (InputError, KeyError) as exc:
            if entity_id not in self.matcher.catalog.by_id:
                raise ApiError(
                    404, "not_found", f"no entity with id {entity_id!r}", "entity_id"
                ) from None
            # the id is there, the change is refused (the last entity of the catalog)
            raise ApiError(422, "invalid_entities", str(exc), "entity_id") from None
        return EntitiesChanged(removed=1)

    # -- probes and metrics --------------------------------------------------------------

    async def healthz(self) -> dict[str, str]:
        """Alive."""
        return {"status": "ok"}

    async def readyz(self) -> JSONResponse:
        """Ready: index built and the LLM reachable (or not configured)."""
        state = self.state
        llm, detail = await state.probe.check()
        failing = state.health.failing() if llm == "reachable" else None
        if failing is not None:
            llm, detail = "failing", self.redactor.text(failing)
        built = self.matcher.ready
        if state.draining:
            detail = "shutting down"
        elif not built:
            detail = state.fit_error or "the index is being built"
        ready = built and llm in ("reachable", "not_configured") and not state.draining
        body = ReadyStatus(ready=ready, index_built=built, llm=llm, detail=detail)  # type: ignore[arg-type]
        return JSONResponse(body.model_dump(), status_code=200 if ready else 503)

    async def metrics(self) -> Response:
        """Prometheus metrics (text format)."""
        registry = self.state.metrics.registry
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    # -- wiring --------------------------------------------------------------------------

    def register(self, app: FastAPI, *, api_key: str | None) -> None:
        """Add every route and the error handlers to ``app``."""
        app.add_exception_handler(ApiError, self._on_api_error)  # type: ignore[arg-type]
        app.add_exception_handler(RequestValidationError, self._on_invalid)  # type: ignore[arg-type]
        app.add_exception_handler(NemLLMError, self._on_nem_error)  # type: ignore[arg-type]
        # the guard enforces the token (one check for every route, the fast one included);
        # this dependency only declares the scheme in the OpenAPI schema
        bearer = HTTPBearer(auto_error=False, description="The key named by --api-key-env.")
        guarded = [Security(bearer)] if api_key is not None else []
        v1 = APIRouter(prefix="/v1", dependencies=guarded)
        v1.add_api_route(
            "/match",
            self.match,
            methods=["POST"],
            response_model=MatchResult | Explanation | list[MatchResult] | list[Explanation],
            summary="Match one query or a list (input order).",
        )
        v1.add_api_route(
            "/match:stream",
            self.match_stream,
            methods=["POST"],
            summary="Match many queries; NDJSON, one MatchResult a line, as each finishes.",
            response_class=ResultStream,
            status_code=200,
            responses={200: {"content": {"application/x-ndjson": {}}, "model": MatchResult}},
        )
        changed: dict[int | str, dict[str, Any]] = {422: {"model": ErrorResponse}}
        v1.add_api_route(
            "/entities",
            self.add_entities,
            methods=["POST"],
            response_model=EntitiesChanged,
            status_code=201,
            summary="Add entities to the live index (no rebuild).",
            responses=changed,
        )
        v1.add_api_route(
            "/entities",
            self.update_entities,
            methods=["PUT"],
            response_model=EntitiesChanged,
            summary="Replace entities by id in the live index.",
            responses=changed,
        )
        v1.add_api_route(
            # an id may hold "/" (as in "10.1000/xyz"): the rest of the path is the id
            "/entities/{entity_id:path}",
            self.remove_entity,
            methods=["DELETE"],
            response_model=EntitiesChanged,
            summary="Remove one entity from the live index.",
            responses={404: {"model": ErrorResponse}, **changed},
        )
        app.include_router(v1)
        app.add_api_route("/healthz", self.healthz, methods=["GET"], summary="Alive.")
        app.add_api_route(
            "/readyz",
            self.readyz,
            methods=["GET"],
            response_model=ReadyStatus,
            summary="Ready: index built and the LLM reachable (or not configured).",
            responses={503: {"model": ReadyStatus}},
        )
        app.add_api_route(
            "/metrics",
            self.metrics,
            methods=["GET"],
            summary="Prometheus metrics (text format).",
            response_class=Response,
            dependencies=guarded,
            responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
        )

    async def _on_api_error(self, _request: Request, exc: ApiError) -> JSONResponse:
        return self.api_error(exc)

    async def _on_invalid(self, _request: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid_json(exc.errors())

    async def _on_nem_error(self, _request: Request, exc: NemLLMError) -> JSONResponse:
        return self.nem_error(exc)
