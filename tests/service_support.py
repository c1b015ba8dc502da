"""Helpers of the service tests (``test_service*.py``): a real server on a real socket.

Each test builds a fresh app with ``create_app`` around a small Matcher (FakeEmbedder; the
LLM is ``FakeLLM`` or the simulator), runs it with uvicorn in a thread on a free port and
talks to it with httpx or a raw socket. Waits for a condition poll (the test's timeout
bounds them); no assertion is on time.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
from prometheus_client import parser as prometheus_parser

from nem_llm import Matcher
from nem_llm.integrations.service import GracefulServer, create_app, server_config
from nem_llm.testing import FakeEmbedder, FakeLLM

TOKEN = "test-bearer-token-123"
ADMIN = "test-admin-token-456"
OPENAI_KEY = "sk-test-SECRET-openai-key-0123456789"
CATALOG = Path(__file__).parent / "data" / "cli" / "catalog.jsonl"
PLACES = [
    {"id": "PAR-FR", "name": "Paris", "attributes": {"country": "FR"}},
    {"id": "PAR-US", "name": "Paris", "aliases": ["Paris TX"], "attributes": {"country": "US"}},
]


class Running:
    """A uvicorn server (the ``GracefulServer`` of ``nem-llm serve``) running an app in a
    thread."""

    def __init__(self, app: Any, *, drain_timeout: float | None = None, **config: Any) -> None:
        config.setdefault("log_level", "warning")
        cfg = server_config(app, port=0, drain_timeout=drain_timeout, **config)
        self.server = GracefulServer(cfg)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.app = app

    def start(self) -> str:
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive())
        assert self.server.started, "uvicorn did not start"
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.port = port
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()

    @property
    def state(self) -> Any:
        """The app's ``ServiceState``."""
        return self.app.state.nem_llm


@contextmanager
def serve(
    app: Any, *, wait_ready: bool = True, drain_timeout: float | None = None, **config: Any
) -> Iterator[Running]:
    running = Running(app, drain_timeout=drain_timeout, **config)
    running.start()
    try:
        if wait_ready:
            wait_for(lambda: app.state.nem_llm.matcher.ready)
        yield running
    finally:
        running.stop()


def app_for(matcher: Matcher, **kwargs: Any) -> Any:
    """A fresh app that closes its matcher (and the LLM connections it owns) on shutdown."""
    return create_app(matcher, close_matcher=True, **kwargs)


def wait_for(condition: Callable[[], bool], interval: float = 0.01) -> None:
    """Poll until ``condition()`` holds (the test timeout bounds the wait)."""
    while not condition():
        time.sleep(interval)


def fake_client(llm: FakeLLM, *, api_key: str = "test") -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.MockTransport(llm))
    return openai.AsyncOpenAI(api_key=api_key, base_url="http://fake/v1", http_client=http)


def post(running: Running, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(running.url + path, json=body, timeout=30, **kwargs)


def metric_families(text: str) -> dict[str, Any]:
    """Prometheus text -> metric families by name."""
    return {f.name: f for f in prometheus_parser.text_string_to_metric_families(text)}


def metric(running: Running, name: str, **labels: str) -> float:
    """One sample of ``/metrics`` (0 when absent)."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    found = metric_families(httpx.get(running.url + "/metrics", headers=auth).text)
    if name not in found:
        return 0.0
    for sample in found[name].samples:
        if sample.name.endswith("_total") or sample.name == name:
            if all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dead_port() -> int:
    """A port nobody listens on."""
    return free_port()


def raw_request(port: int, head: bytes, body: bytes = b"") -> socket.socket:
    """Open a connection and send ``head`` (and ``body``) as they are."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(60)
    sock.sendall(head + body)
    return sock


def raw_post(port: int, body: dict[str, Any], path: str = "/v1/match") -> socket.socket:
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode()
    return raw_request(port, head, data)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one response (status, headers, body as far as the peer sent) until it closes
    the connection or the ``Content-Length`` is read."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed without a response: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "-1"))
    while length < 0 or len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def sim_matcher(countries: list[dict[str, Any]], base_url: str, **options: Any) -> Matcher:
    """A matcher whose every query goes to the LLM at ``base_url`` (its own client: no
    connection outlives the server)."""
    return Matcher(
        countries,
        embedder=FakeEmbedder(),
        base_url=base_url,
        api_key="sim",
        model="nem-llm-sim",
        accept_threshold=1.01,
        **options,
    )


def serve_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env
