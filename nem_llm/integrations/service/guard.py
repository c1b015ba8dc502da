"""The ASGI guard in front of every route: auth, the body limit, disconnects, metrics.

One middleware does what every request needs before a handler runs, so the lean
``POST /v1/match`` endpoint and FastAPI's routes get the same treatment: the bearer token
is checked before anything is read, the whole body is read (413 past the limit), and a
listener turns the client's hang-up into a cancellation of the request's work.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_json
from .metrics import path_label
from .state import ServiceState

__all__ = ["Guard", "bearer_token", "route_path"]


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


class Guard:
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
        state: ServiceState,
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
            if not hmac.compare_digest(bearer_token(headers), self.api_key):
                message = "missing or wrong bearer token"
                await error_json(401, "unauthorized", message, "Authorization")(
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
                    await error_json(503, "shutting_down", "the service shut down")(
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
                await error_json(413, "request_too_large", too_large, "body")(scope, receive, send)
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
                await error_json(413, "request_too_large", too_large, "body")(scope, receive, send)
                return 413
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
