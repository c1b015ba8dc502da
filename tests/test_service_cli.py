"""``nem-llm serve`` as an operator runs it: a process, its flags, its exit status.

The commands run in a subprocess through the real CLI (``nem_llm.cli.main``), with one
change: the embedder is the ``FakeEmbedder`` (the launcher below patches the matcher's
encoder factory), so a start takes a second instead of a model load; the model path is
covered by ``test_cli.py``. Waits poll with the test timeout as their bound.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi", reason="needs the service extra: pip install 'nem_llm[service]'")
uvicorn = pytest.importorskip("uvicorn")

from service_support import (  # noqa: E402
    CATALOG,
    OPENAI_KEY,
    TOKEN,
    app_for,
    free_port,
    raw_post,
    read_response,
    serve,
    serve_env,
    wait_for,
)

from nem_llm import Matcher  # noqa: E402
from nem_llm.errors import ConfigError  # noqa: E402
from nem_llm.integrations.service import server_config  # noqa: E402
from nem_llm.sim import SimConfig, run_simulator  # noqa: E402
from nem_llm.testing import FakeEmbedder  # noqa: E402

pytestmark = pytest.mark.timeout(120)

# the CLI with the FakeEmbedder as every matcher's encoder
LAUNCH = """
import sys
import nem_llm.matcher
from nem_llm.testing import FakeEmbedder
nem_llm.matcher.make_embedder = lambda *args, **kwargs: FakeEmbedder()
from nem_llm.cli import main
sys.argv = ["nem-llm", *sys.argv[1:]]
main()
"""


@pytest.fixture
def matcher(countries: list[dict[str, Any]]) -> Matcher:
    return Matcher(countries, embedder=FakeEmbedder(), llm=False)


class Serving:
    """A ``nem-llm serve`` process; its output goes to a file (no pipe stalls)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", LAUNCH, "serve", *args, "--port", str(self.port)],
                env=env or serve_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, self.text()
            try:
                return httpx.get(self.url + "/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, interval=0.1)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@contextmanager
def serving(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Serving]:
    server = Serving(args, log, env)
    try:
        yield server
    finally:
        server.kill()


def test_serve_command_serves_the_catalog_with_auth_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    log = tmp_path / "serve.log"
    with run_simulator(SimConfig()) as sim:
        env = serve_env(
            NEM_TEST_TOKEN=TOKEN, OPENAI_API_KEY=OPENAI_KEY, OPENAI_BASE_URL=sim.base_url
        )
        args = ["--catalog", str(CATALOG), "--api-key-env", "NEM_TEST_TOKEN"]
        with serving(args, log, env) as server:
            server.wait_ready()
            auth = {"Authorization": f"Bearer {TOKEN}"}
            url = server.url + "/v1/match"
            r = httpx.post(url, json={"query": "USA"}, headers=auth, timeout=30)
            denied = httpx.post(url, json={"query": "USA"}, timeout=30)
            code = server.stop()
    text = log.read_text(encoding="utf-8", errors="replace")
    assert (r.status_code, r.json()["entity_id"]) == (200, "US")
    assert denied.status_code == 401
    # uvicorn shuts down cleanly, then re-raises the signal (exit status of a SIGTERM)
    assert code in (0, -signal.SIGTERM), text
    assert "Application shutdown complete" in text
    assert '"POST /v1/match HTTP/1.1" 200' in text  # the access log is on by default
    assert TOKEN not in text
    assert OPENAI_KEY not in text


def _answer(sock: socket.socket) -> int | str:
    """The status of the response on ``sock``, or how the connection ended without one."""
    try:
        return read_response(sock)[0]
    except OSError as exc:  # ConnectionResetError, "closed without a response", a timeout
        return f"{type(exc).__name__}: {exc}"
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("latency", "drain", "answered"),
    [(1.0, 30, 200), (30.0, 1, 503)],
    ids=["drained", "past-the-drain-timeout"],
)
def test_sigterm_under_load_answers_every_connection_none_is_reset(
    tmp_path: Path, latency: float, drain: int, answered: int
) -> None:
    """50 clients of a slow LLM, SIGTERM: each gets an HTTP answer (200, or 503 past the
    drain), none a reset. Half are in flight; the other half connected and sent their
    request while the server was stopped (SIGSTOP), so they wait unaccepted in the listen
    backlog when the shutdown begins, as under a load the loop cannot keep up with."""
    queries = ["Germani", "Untied States", "Grate Britain", "Deutschlnd", "Frnce"]
    with run_simulator(SimConfig(latency="fixed", latency_p50=latency)) as sim:
        env = serve_env(OPENAI_API_KEY=OPENAI_KEY, OPENAI_BASE_URL=sim.base_url)
        args = ["--catalog", str(CATALOG), "--model", "nem-llm-sim", "--no-access-log",
                "--accept-threshold", "1.01", "--concurrency", "64",
                "--drain-timeout", str(drain)]  # fmt: skip
        with serving(args, tmp_path / "serve.log", env) as server:
            server.wait_ready()
            clients = [raw_post(server.port, {"query": queries[i % 5]}) for i in range(25)]
            wait_for(lambda: sim.in_flight == 25)  # every one is at the LLM
            server.proc.send_signal(signal.SIGSTOP)
            try:
                clients += [raw_post(server.port, {"query": queries[i % 5]}) for i in range(25)]
                time.sleep(0.3)  # uvicorn's 0.1 s tick comes due: SIGTERM is seen at once
                server.proc.send_signal(signal.SIGTERM)
            finally:
                server.proc.send_signal(signal.SIGCONT)
            with ThreadPoolExecutor(len(clients)) as pool:
                answers = list(pool.map(_answer, clients))
            code = server.proc.wait(timeout=60)
            text = server.text()
    assert code in (0, -signal.SIGTERM), text
    assert [a for a in answers if a not in (200, 503)] == [], text
    # drained: the in-flight ones got their full answer; past the drain: 503 shutting_down
    assert answers.count(answered) >= 25, answers


def test_serve_keeps_the_live_catalog_across_restarts(tmp_path: Path) -> None:
    args = ["--catalog", str(CATALOG), "--index-dir", str(tmp_path / "idx"), "--no-llm"]
    freedonia = {"entities": [{"id": "FRE", "name": "Freedonia"}]}
    with serving(args, tmp_path / "first.log") as first:
        first.wait_ready()
        added = httpx.post(first.url + "/v1/entities", json=freedonia, timeout=30)
        first.stop()
    with serving(args, tmp_path / "second.log") as second:
        second.wait_ready()  # before: 503 "stale" forever
        found = httpx.post(second.url + "/v1/match", json={"query": "Freedonia"}, timeout=30)
        note = second.text()
    assert added.status_code == 201
    assert found.json()["entity_id"] == "FRE"
    assert "live catalog" in note


def test_serve_exits_non_zero_naming_why_when_the_index_cannot_be_loaded(
    tmp_path: Path,
) -> None:
    index = tmp_path / "idx"
    Matcher(CATALOG, embedder=FakeEmbedder(dim=64), llm=False, index_dir=index).fit(
        show_progress=False
    )  # vectors of another embedder than the server's
    args = ["serve", "--index-dir", str(index), "--no-llm", "--port", str(free_port())]
    run = subprocess.run(
        [sys.executable, "-c", LAUNCH, *args],
        env=serve_env(),
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert run.returncode == 2, run.stderr
    assert "built with embedder 'fake-trigram-64'" in run.stderr


def test_serve_without_a_catalog_or_an_index_says_what_it_needs(tmp_path: Path) -> None:
    run = subprocess.run(
        [sys.executable, "-c", LAUNCH, "serve", "--index-dir", str(tmp_path / "none")],
        env=serve_env(),
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert run.returncode == 2
    assert "--catalog" in run.stderr


def test_serve_refuses_to_listen_off_localhost_without_a_key() -> None:
    run = subprocess.run(
        [sys.executable, "-c", LAUNCH, "serve", "--catalog", str(CATALOG), "--host", "0.0.0.0"],
        env=serve_env(),
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert run.returncode == 2
    assert "--api-key-env" in run.stderr and "--insecure-no-auth" in run.stderr


@pytest.mark.parametrize(
    ("options", "host"),
    [
        ({"api_key": TOKEN}, "0.0.0.0"),
        ({}, "::1"),
        ({}, "localhost"),
    ],
)
def test_server_config_allows_a_keyed_or_local_server(
    matcher: Matcher, options: dict[str, Any], host: str
) -> None:
    assert server_config(app_for(matcher, **options), host=host).host == host


def test_server_config_allows_an_open_server_off_localhost_only_when_insecure(
    matcher: Matcher,
) -> None:
    app = app_for(matcher)
    with pytest.raises(ConfigError, match="--insecure-no-auth"):
        server_config(app, host="0.0.0.0")
    assert server_config(app, host="0.0.0.0", insecure_no_auth=True).host == "0.0.0.0"


def test_server_config_can_drop_the_access_log(matcher: Matcher) -> None:
    app = app_for(matcher)
    assert (server_config(app).access_log, server_config(app, access_log=False).access_log) == (
        True,
        False,
    )


class _AccessLines(logging.Handler):
    """Formats uvicorn's access records as its own handler does; keeps lines and errors."""

    def __init__(self) -> None:
        super().__init__()
        fmt = '%(client_addr)s - "%(request_line)s" %(status_code)s'
        self.setFormatter(uvicorn.logging.AccessFormatter(fmt, use_colors=False))
        self.lines: list[str] = []
        self.errors: list[Exception] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(self.format(record))
        except Exception as exc:
            self.errors.append(exc)


def test_a_secret_in_the_query_string_is_redacted_in_the_access_log(matcher: Matcher) -> None:
    handler = _AccessLines()
    access = logging.getLogger("uvicorn.access")
    with serve(app_for(matcher, api_key=TOKEN), log_level="info") as running:
        access.addHandler(handler)
        try:
            httpx.get(running.url + f"/healthz?token={TOKEN}")
        finally:
            access.removeHandler(handler)
    assert handler.errors == []
    assert [line for line in handler.lines if "/healthz?token=[redacted]" in line]
    assert not [line for line in handler.lines if TOKEN in line]


UNSET = ("--api-key-env", "NEM_TEST_UNSET_TOKEN")


def test_serve_command_fails_clearly_when_the_api_key_variable_is_unset() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "nem_llm.cli", "serve", "--catalog", str(CATALOG), *UNSET],
        env=serve_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "NEM_TEST_UNSET_TOKEN" in run.stderr


_TUNED = """
import asyncio, gc
from nem_llm import Matcher
from nem_llm.integrations.service import create_app
from nem_llm.testing import FakeEmbedder

async def main():
    m = Matcher([{"id": "US", "name": "USA"}], embedder=FakeEmbedder(), llm=False)
    app = create_app(m, tune_gc=True, close_matcher=True)
    before = (gc.get_freeze_count(), gc.get_threshold()[0])
    async with app.router.lifespan_context(app):
        while gc.get_freeze_count() == 0:  # the index is built in the background
            await asyncio.sleep(0.01)
        print(*before, m.ready, gc.get_threshold()[0])

asyncio.run(main())
"""


def test_tune_gc_freezes_the_built_index_and_raises_the_first_threshold() -> None:
    # in a child process: the collector's settings are process-wide
    run = subprocess.run(
        [sys.executable, "-c", _TUNED], env=serve_env(), capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    frozen_before, threshold_before, ready, threshold = run.stdout.split()
    assert (frozen_before, ready) == ("0", "True")
    assert int(threshold) == max(int(threshold_before), 10_000)
