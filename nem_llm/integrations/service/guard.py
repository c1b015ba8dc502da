"""The ASGI guard in front of every route: auth, the body, disconnects, shutdown, metrics.

One middleware does what every request needs before a handler runs, so the lean
``POST /v1/match`` endpoint and FastAPI's routes get the same treatment:

- the bearer token is checked before anything is read (entity writes need the admin key
  when one is set: 403 with the other key);
- the whole body is read within ``body_timeout`` (408 after; 413 past the size limit) and
  must be JSON: a JSON body declared as another type (curl's ``-d`` says
  ``application/x-www-form-urlencoded``) is read as JSON, anything else is 415;
- a listener turns the client's hang-up into a cancellation of the request's work
  (499 in the metrics, body read included);
- a request the server cancels at shutdown is answered 503 ``shutting_down`` (never
  uvicorn's 500 and its traceback).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import Iterable
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_json
from .metrics import path_label
from .state import ServiceState

__all__ = ["Guard", "bearer_token", "route_path"]

_JSON = b"application/json"


def route_path(scope: Scope) -> str:
    """The request path inside the app (``root_path`` removed when mounted under a prefix)."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("/", ""):
        return path[len(root) :] or "/"
    return path


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """The token of ``Authorization: Bearer <token>`` (read as FastAPI's HTTPBearer), or b""."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else b""
    return b""


def _guarded(path: str) -> bool:
    """Paths behind the bearer token: the API and the metrics (not the probes nor the docs)."""
    return path.startswith("/v1/") or path == "/metrics"


def _is_write(method: str, path: str) -> bool:
    """Entity administration: the requests the admin key guards."""
    return method != "GET" and (path == "/v1/entities" or path.startswith("/v1/entities/"))


def _is_json(content_type: bytes) -> bool:
    media = content_type.partition(b";")[0].strip().lower()
    return media == _JSON or (media.startswith(b"application/") and media.endswith(b"+json"))


class Guard:
    """Pure ASGI middleware: auth, the body, metrics, cancel on disconnect, shutdown.

    It hands the request to the app, or to a fast endpoint of ``fast`` (ASGI apps by
    method and path, served without FastAPI's routing: ``POST /v1/match``), with the body
    already read. Meanwhile one listener awaits ``http.disconnect``: if the client goes
    away before the response is complete, the request's task is cancelled, and with it the
    request's matching and LLM calls; the request then counts as 499.

    Args:
        app: the FastAPI app.
        state: the app's state (limits, metrics, requests in flight).
        api_key: the bearer token of ``/v1/*`` and ``/metrics`` (``None``: open).
        admin_key: the bearer token entity writes need (``None``: ``api_key`` suffices).
        fast: lean endpoints by (method, path).
    """

    def __init__(
        self,
        app: ASGIApp,
        state: ServiceState,
        api_key: str | None = None,
        admin_key: str | None = None,
        fast: dict[tuple[str, str], ASGIApp] | None = None,
    ) -> None:
        self.app = app
        self.state = state
        self.api_key = api_key.encode() if api_key is not None else None
        self.admin_key = admin_key.encode() if admin_key is not None else None
        self.fast = fast or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = self.state
        method, path = scope["method"], route_path(scope)
        status = 0
        started = time.perf_counter()
        task = asyncio.current_task()
        assert task is not None
        state.tasks.add(task)
        try:
            status = await self._handle(scope, receive, send, method, path, task)
        finally:
            state.tasks.discard(task)
            state.metrics.answered(method, path_label(path), status, time.perf_counter() - started)

    def _refused(
        self, method: str, path: str, headers: list[tuple[bytes, bytes]]
    ) -> Response | None:
        """The 401/403 answer of a request without the token its path needs, or None."""
        if not _guarded(path) or (self.api_key is None and self.admin_key is None):
            return None
        token = bearer_token(headers)
        admin = self.admin_key is not None and hmac.compare_digest(token, self.admin_key)
        user = self.api_key is not None and hmac.compare_digest(token, self.api_key)
        if self.admin_key is not None and _is_write(method, path):
            if admin:
                return None
            if user:
                message = "entity writes need the admin key (--admin-key-env)"
                return error_json(403, "forbidden", message, "Authorization")
        elif admin or user or self.api_key is None:
            return None
        return error_json(401, "unauthorized", "missing or wrong bearer token", "Authorization")

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
        refused = self._refused(method, path, headers)
        if refused is not None:
            await refused(scope, receive, send)
            return refused.status_code
        try:
            body = await self._body(scope, receive, send, headers)
        except asyncio.CancelledError:
            if not await self._shut_down(scope, receive, send, task, 0):
                raise
            return 503
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
            if not await self._shut_down(scope, receive, send, task, status):
                raise
            return status or 503
        finally:
            in_app = False
            listener.cancel()
        return status

    async def _shut_down(
        self, scope: Scope, receive: Receive, send: Send, task: asyncio.Task[Any], status: int
    ) -> bool:
        """Answer a request the server cancelled (the drain timeout passed) with 503.

        The work is stopped already; the request ends here, quietly (no traceback per
        request in the log: the drain logs how many it cancelled). Returns ``False`` when
        the task was cancelled more than once (someone else's cancel: re-raise it).
        """
        if status == 0:
            with contextlib.suppress(Exception):
                answer = error_json(503, "shutting_down", "the service shut down", close=True)
                await answer(scope, receive, send)
        return task.uncancel() == 0

    async def _body(
        self, scope: Scope, receive: Receive, send: Send, headers: list[tuple[bytes, bytes]]
    ) -> bytes | int:
        """The whole request body, or the status answered instead (408, 413, 415, or 499
        when the client left)."""
        limits = self.state.limits
        limit = limits.max_body_bytes
        too_large = f"request body exceeds {limit} bytes"
        content_type: bytes | None = None
        for name, value in headers:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await error_json(413, "request_too_large", too_large, "body")(scope, receive, send)
                return 413
            if name == b"content-type":
                content_type = value
        chunks: list[bytes] = []
        size = 0
        more = True
        try:
            async with asyncio.timeout(limits.body_timeout):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        self.state.metrics.disconnects.inc()
                        return 499
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        answer = error_json(413, "request_too_large", too_large, "body")
                        await answer(scope, receive, send)
                        return 413
                    chunks.append(chunk)
                    more = message.get("more_body", False)
        except TimeoutError:
            self.state.metrics.timeouts.labels("body").inc()
            message_ = f"the request body did not arrive within {limits.body_timeout:g} s"
            answer = error_json(408, "request_timeout", message_, "body", close=True)
            await answer(scope, receive, send)
            return 408
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if body and content_type is not None and not _is_json(content_type):
            return await self._as_json(scope, receive, send, body, content_type)
        return body

    async def _as_json(
        self, scope: Scope, receive: Receive, send: Send, body: bytes, content_type: bytes
    ) -> bytes | int:
        """A body declared as another media type: read as JSON if it is JSON, else 415."""
        try:
            json.loads(body)
        except ValueError:
            declared = content_type.decode("latin-1")
            message = (
                f"Content-Type {declared!r} with a body that is not JSON: send JSON "
                "(Content-Type: application/json)"
            )
            await error_json(415, "unsupported_media_type", message, "Content-Type")(
                scope, receive, send
            )
            return 415
        scope["headers"] = [
            (name, _JSON if name == b"content-type" else value)
            for name, value in scope.get("headers", [])
        ]
        return body
