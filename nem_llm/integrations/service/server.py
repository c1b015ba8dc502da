"""How ``nem-llm serve`` runs an app: uvicorn's configuration and its HTTP protocol.

:func:`server_config` refuses to open the service to the network without a key, and
gives uvicorn an HTTP protocol with what it lacks: a header read timeout (a connection
that has not sent a complete request head within ``ServiceLimits.header_timeout`` gets
408 and is closed; uvicorn itself waits forever) and a gentler shutdown (an idle
keep-alive connection is not cut at once: a request already on the wire is answered,
``Connection: close``, before its keep-alive timer closes it). :func:`run_server` runs
the server (a :class:`GracefulServer`) and turns a start that cannot succeed into an
error naming the reason.

Shutdown and the listen backlog: the kernel completes a client's TCP handshake before the
server accepts the connection, so under load connections wait in the listening socket's
backlog; closing the listener resets them (the client sees "connection reset by peer"
having sent its request). :class:`GracefulServer` accepts what the backlog holds before
it closes the listener, and those connections are served like the others at shutdown
(the request answered, ``Connection: close``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import os
import socket
from typing import Any

import uvicorn
from fastapi import FastAPI

from ...errors import ConfigError
from .limits import ServiceLimits
from .state import ServiceState

__all__ = ["GracefulServer", "run_server", "server_config"]

log = logging.getLogger("nem_llm.service")


def _http_base() -> type[Any]:
    """uvicorn's HTTP protocol class: httptools' (the ``service`` extra) or h11's."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is part of the service extra
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol
    return HttpToolsProtocol


def _protocol(header_timeout: float, on_timeout: Any) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol with a header read timeout and a gentle shutdown."""
    base = _http_base()

    class GuardedHTTP(base):  # type: ignore[valid-type,misc]
        _timer: asyncio.TimerHandle | None = None
        _partial = False  # bytes of a request head arrived, the head is not complete
        _stopping = False

        def connection_made(self, transport: asyncio.Transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is None or self.cycle.response_complete:
                self._partial = True  # between requests: part of the next head
                self._arm()
                return
            self._partial = False
            self._disarm()
            if self._stopping:  # shutting down: answer this one, then close
                self.cycle.keep_alive = False

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def shutdown(self) -> None:
            self._stopping = True
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.keep_alive = False
                return
            # idle: the client may have sent a request already; its keep-alive timer (or
            # the header timer) closes the connection unless a request comes first
            if self.timeout_keep_alive_task is None and self._timer is None:
                self.transport.close()

        def _arm(self) -> None:
            if self._timer is None:
                self._timer = self.loop.call_later(header_timeout, self._timed_out)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _timed_out(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            if self._partial:  # a client that started a request is told why
                on_timeout()
                body = (
                    b'{"error":{"type":"request_timeout","message":"the request headers did '
                    b'not arrive within %g s","field":null}}' % header_timeout
                )
                self.transport.write(
                    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
                )
            self.transport.close()

    return GuardedHTTP


def _nothing() -> None:
    pass


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def server_config(
    app: FastAPI,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    drain_timeout: float | None = None,
    log_level: str = "info",
    access_log: bool = True,
    insecure_no_auth: bool = False,
) -> uvicorn.Config:
    """The uvicorn configuration ``nem-llm serve`` runs ``app`` (from :func:`create_app`, or
    an app of yours that mounts one: then the defaults of ``ServiceLimits`` apply) with.

    On SIGTERM/Ctrl-C uvicorn stops accepting connections and lets in-flight requests
    finish for up to ``drain_timeout`` seconds (default: the app's
    ``ServiceLimits.drain_timeout``), then cancels them (they are answered 503). Run it
    with :class:`GracefulServer` (as :func:`run_server` does) so that the connections
    still queued in the listen backlog at that moment are answered too, not reset.
    ``access_log=False`` drops uvicorn's line per request (about a tenth of the server's
    CPU per single-query request, measured: ``/metrics`` counts requests either way).

    Raises:
        ConfigError: ``host`` is not a loopback address and the app has no ``api_key``,
            unless ``insecure_no_auth`` (anyone who reaches the port could match, read
            the metrics and delete entities).
    """
    state: ServiceState | None = getattr(app.state, "nem_llm", None)
    keyed = state is not None and state.api_key_set
    if not _loopback(host) and not keyed and not insecure_no_auth:
        raise ConfigError(
            f"refusing to serve {host} without a key: anyone who can reach it could match, "
            "read /metrics and change entities; set --api-key-env (and --admin-key-env for "
            "entity writes), or pass --insecure-no-auth"
        )
    limits = state.limits if state is not None else ServiceLimits()
    if drain_timeout is None:
        drain_timeout = limits.drain_timeout
    on_timeout = state.metrics.timeouts.labels("headers").inc if state is not None else _nothing
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=max(1, math.ceil(drain_timeout)),
        server_header=False,
        http=_protocol(limits.header_timeout, on_timeout),
    )


class GracefulServer(uvicorn.Server):
    """uvicorn's server, except that a shutdown answers the connections still queued.

    uvicorn's shutdown closes the listening socket first; the connections the kernel has
    completed and queued but the event loop has not accepted yet (a busy loop under load)
    are then reset by the kernel. This server first accepts every queued connection,
    closes the listener straight after (no await in between: a client that connects later
    is refused, not reset), and hands the accepted ones to the HTTP protocol, so uvicorn's
    graceful shutdown treats them as it treats the connections accepted before.
    """

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        queued = []
        for server in self.servers:
            for listener in server.sockets or ():
                queued += _accept_queued(listener.fileno(), self.config.backlog)
            server.close()
        if queued:
            log.info("serving %d connection(s) queued at shutdown", len(queued))
            loop = asyncio.get_running_loop()
            for conn in queued:
                try:
                    await loop.connect_accepted_socket(self._protocol, conn)
                except OSError:  # the client left meanwhile
                    conn.close()
        await super().shutdown(sockets)

    def _protocol(self) -> asyncio.Protocol:
        """The HTTP protocol for one connection, as uvicorn's ``startup`` makes it."""
        protocol: asyncio.Protocol = self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )
        return protocol


def _accept_queued(fd: int, limit: int) -> list[socket.socket]:
    """Accept (without blocking) up to ``limit`` connections queued on the listener ``fd``."""
    accepted: list[socket.socket] = []
    with socket.socket(fileno=os.dup(fd)) as listener:  # the same socket, its own fd
        listener.setblocking(False)
        while len(accepted) < limit:
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. out of file descriptors: serve what we have
                log.warning("accepting the connections queued at shutdown: %s", exc)
                break
            accepted.append(conn)
    return accepted


def run_server(config: uvicorn.Config) -> None:
    """Serve until SIGTERM/Ctrl-C; a start that cannot succeed stops the server.

    When the index cannot be built (a corrupt or incompatible ``index_dir``, ...) the
    server shuts down at once instead of answering 503 forever.

    Raises:
        ConfigError: the index could not be built (the message says why).
    """
    server = GracefulServer(config)
    state: ServiceState = config.app.state.nem_llm  # type: ignore[union-attr]
    state.on_fit_error = lambda _reason: setattr(server, "should_exit", True)
    server.run()
    if state.fit_error is not None:
        raise ConfigError(state.fit_error)
