"""The service's life over a real socket: readiness, deadlines, disconnects, writes, shutdown.

Nothing here asserts on time: a deadline of a fraction of a second is checked against an
LLM that takes a minute, and every wait polls for a condition (the test timeout bounds it).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx
import openai
import pytest

pytest.importorskip("fastapi", reason="needs the service extra: pip install 'nem_llm[service]'")
pytest.importorskip("uvicorn")

from service_support import (
    PLACES,
    Running,
    app_for,
    dead_port,
    fake_client,
    metric_families,
    post,
    raw_post,
    read_response,
    serve,
    sim_matcher,
    wait_for,
)

from nem_llm import Limits, Matcher
from nem_llm.integrations.service import ServiceLimits
from nem_llm.integrations.service.health import LLMHealth
from nem_llm.models import MatchResult
from nem_llm.sim import SimConfig, run_simulator
from nem_llm.testing import FakeEmbedder, FakeLLM

pytestmark = pytest.mark.timeout(60)

ONE_TRY = Limits(max_attempts=1)  # no backoff between attempts: the tests stay quick


@pytest.fixture
def matcher(countries: list[dict[str, Any]]) -> Matcher:
    return Matcher(countries, embedder=FakeEmbedder(), llm=False)


@pytest.fixture
def server(matcher: Matcher) -> Iterator[Running]:
    with serve(app_for(matcher)) as running:
        yield running


@contextmanager
def logged(name: str) -> Iterator[list[logging.LogRecord]]:
    """The records ``name``'s logger handles meanwhile (uvicorn's do not reach the root)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


# -- readiness ---------------------------------------------------------------------------


def test_readyz_is_ready_with_index_built_and_no_llm_configured(server: Running) -> None:
    r = httpx.get(server.url + "/readyz")
    assert r.status_code == 200
    assert r.json() == {"ready": True, "index_built": True, "llm": "not_configured", "detail": None}


def test_readyz_reports_a_reachable_llm(countries: list[dict[str, Any]]) -> None:
    m = Matcher(countries, embedder=FakeEmbedder(), client=fake_client(FakeLLM()))
    with serve(app_for(m)) as running:
        r = httpx.get(running.url + "/readyz")
    assert (r.status_code, r.json()["llm"]) == (200, "reachable")


def test_readyz_is_503_when_the_llm_is_unreachable(countries: list[dict[str, Any]]) -> None:
    client = openai.AsyncOpenAI(api_key="x", base_url=f"http://127.0.0.1:{dead_port()}/v1")
    m = Matcher(countries, embedder=FakeEmbedder(), client=client)
    with serve(app_for(m)) as running:
        r = httpx.get(running.url + "/readyz")
    assert r.status_code == 503
    assert (r.json()["ready"], r.json()["llm"]) == (False, "unreachable")


def test_a_dead_llm_is_named_connection_in_results_and_in_readyz(
    countries: list[dict[str, Any]],
) -> None:
    client = openai.AsyncOpenAI(api_key="x", base_url=f"http://127.0.0.1:{dead_port()}/v1")
    m = Matcher(
        countries, embedder=FakeEmbedder(), client=client, accept_threshold=1.01, limits=ONE_TRY
    )
    with serve(app_for(m)) as running:
        result = post(running, "/v1/match", {"query": "Germani"}).json()
        ready = httpx.get(running.url + "/readyz").json()
    assert (result["status"], result["error_type"]) == ("error", "connection")
    assert ready["detail"].startswith("connection:")


def _failing_llm() -> tuple[FakeLLM, list[bool]]:
    """A FakeLLM that answers 500 while ``down[0]`` (its model list always answers)."""
    down = [True]

    def policy(_query: str, ids: tuple[str, ...]) -> str | httpx.Response:
        if down[0]:
            return httpx.Response(500, json={"error": {"message": "overloaded"}})
        return ids[0]

    return FakeLLM(policy), down


def test_readyz_is_503_once_llm_calls_fail_in_a_row(countries: list[dict[str, Any]]) -> None:
    llm, _ = _failing_llm()
    m = Matcher(
        countries,
        embedder=FakeEmbedder(),
        client=fake_client(llm),
        accept_threshold=1.01,
        limits=ONE_TRY,
    )
    with serve(app_for(m, limits=ServiceLimits(llm_failures=2))) as running:
        post(running, "/v1/match", {"query": "Germani"})
        after_one = httpx.get(running.url + "/readyz")
        post(running, "/v1/match", {"query": "Frankreich"})
        after_two = httpx.get(running.url + "/readyz")
    assert after_one.status_code == 200
    assert after_two.status_code == 503
    body = after_two.json()
    assert (body["ready"], body["llm"]) == (False, "failing")
    assert "(server)" in body["detail"]


def test_an_llm_answer_makes_the_service_ready_again(countries: list[dict[str, Any]]) -> None:
    llm, down = _failing_llm()
    m = Matcher(
        countries,
        embedder=FakeEmbedder(),
        client=fake_client(llm),
        accept_threshold=1.01,
        limits=ONE_TRY,
    )
    with serve(app_for(m, limits=ServiceLimits(llm_failures=1))) as running:
        post(running, "/v1/match", {"query": "Germani"})
        failing = httpx.get(running.url + "/readyz")
        down[0] = False
        answered = post(running, "/v1/match", {"query": "Frankreich"}).json()
        ready = httpx.get(running.url + "/readyz")
    assert (failing.status_code, answered["decided_by"], ready.status_code) == (503, "llm", 200)


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _failed(code: str) -> MatchResult:
    return MatchResult(query="q", index=0, status="error", error="boom", error_type=code)


def test_llm_failures_stop_counting_after_their_window() -> None:
    clock = _Clock()
    health = LLMHealth(failures=2, window=60.0, clock=clock)
    for _ in range(2):
        health.observe(_failed("connection"))
    clock.now = 60.0
    failing_at_the_end = health.failing()
    clock.now = 60.5
    assert failing_at_the_end is not None and "(connection)" in failing_at_the_end
    assert health.failing() is None


def test_failures_that_are_not_the_llms_do_not_count() -> None:
    health = LLMHealth(failures=1, window=60.0)
    for code in ("input", "config", "invalid_answer", "budget", "rate_limit"):
        health.observe(_failed(code))
    assert health.failing() is None


# -- the deadline of a request ------------------------------------------------------------


@pytest.fixture
def hanging() -> Iterator[Any]:
    """An LLM that answers after a minute."""
    with run_simulator(SimConfig(latency="fixed", latency_p50=60.0)) as sim:
        yield sim


def test_a_query_the_llm_does_not_decide_in_time_is_a_deadline_record(
    countries: list[dict[str, Any]], hanging: Any
) -> None:
    m = sim_matcher(countries, hanging.base_url)
    # 2 s: long enough for the call to reach the LLM on a loaded machine (at 0.3 s a busy
    # one could pass the deadline before sending it, and there would be no call to cancel)
    with serve(app_for(m, limits=ServiceLimits(deadline=2.0))) as running:
        r = post(running, "/v1/match", {"query": "Germani"})
        wait_for(lambda: len(hanging.requests) == 1)
    assert r.status_code == 200
    assert (r.json()["status"], r.json()["error_type"]) == ("error", "deadline")
    assert [x.status for x in hanging.requests] == [0]  # its LLM call was cancelled


def test_a_list_past_its_deadline_keeps_the_results_that_were_decided(
    countries: list[dict[str, Any]], hanging: Any
) -> None:
    m = Matcher(
        countries,
        embedder=FakeEmbedder(),
        base_url=hanging.base_url,
        api_key="sim",
        model="nem-llm-sim",
        accept_threshold=0.99,  # an exact alias is matched; "Germani" goes to the LLM
        novel_threshold=0.0,
    )
    with serve(app_for(m, limits=ServiceLimits(deadline=0.3))) as running:
        results = post(running, "/v1/match", {"query": ["USA", "Germani"]}).json()
    assert [(r["index"], r["status"]) for r in results] == [(0, "matched"), (1, "error")]
    assert results[1]["error_type"] == "deadline"


def test_a_stream_past_its_deadline_ends_with_a_deadline_line_per_unanswered_query(
    countries: list[dict[str, Any]], hanging: Any
) -> None:
    m = sim_matcher(countries, hanging.base_url)
    with serve(app_for(m, limits=ServiceLimits(deadline=0.3))) as running:
        r = post(running, "/v1/match:stream", {"queries": ["Germani", "Frankreich"]})
    lines = sorted((json.loads(x) for x in r.text.splitlines()), key=lambda x: x["index"])
    assert [(x["index"], x["error_type"]) for x in lines] == [(0, "deadline"), (1, "deadline")]


def test_an_explanation_past_its_deadline_is_504(
    countries: list[dict[str, Any]], hanging: Any
) -> None:
    m = sim_matcher(countries, hanging.base_url)
    with serve(app_for(m, limits=ServiceLimits(deadline=0.3))) as running:
        r = post(running, "/v1/match", {"query": "Germani", "explain": True})
    assert (r.status_code, r.json()["error"]["type"]) == (504, "deadline")


# -- entity writes beside matching ---------------------------------------------------------


class GatedEmbedder(FakeEmbedder):
    """Holds the encoding of texts that start with "gated" until released."""

    def __init__(self) -> None:
        super().__init__()
        self.writing = threading.Event()
        self.release = threading.Event()

    def encode(self, texts: Sequence[str]) -> Any:
        if any(t.startswith("gated") for t in texts):
            self.writing.set()
            self.release.wait()
        return super().encode(texts)


def test_a_match_is_answered_while_an_entity_write_is_still_encoding() -> None:
    embedder = GatedEmbedder()
    m = Matcher(PLACES, embedder=embedder, llm=False)
    big = {"id": "BIG", "name": "Bigville", "aliases": [f"gated alias {i}" for i in range(50)]}
    written: list[httpx.Response] = []
    with serve(app_for(m)) as running:
        writer = threading.Thread(
            target=lambda: written.append(post(running, "/v1/entities", {"entities": [big]}))
        )
        writer.start()
        try:
            wait_for(embedder.writing.is_set)
            during = post(running, "/v1/match", {"query": "Paris"})
        finally:
            embedder.release.set()
            writer.join()
        after = post(running, "/v1/match", {"query": "gated alias 7"}).json()
    assert during.status_code == 200
    assert written[0].status_code == 201
    assert after["candidates"][0]["entity_id"] == "BIG"


# -- disconnects and shutdown --------------------------------------------------------------


def test_a_disconnecting_client_cancels_its_llm_calls(countries: list[dict[str, Any]]) -> None:
    with run_simulator(SimConfig(latency="fixed", latency_p50=60.0)) as sim:
        m = sim_matcher(countries, sim.base_url)
        app = app_for(m)
        with serve(app) as running:
            sock = raw_post(running.port, {"query": ["Germani", "Frankreich"]})
            wait_for(lambda: sim.in_flight == 2)
            sock.close()
            wait_for(lambda: len(sim.requests) == 2)
            wait_for(lambda: m.governor_stats is not None and m.governor_stats.in_flight == 0)
            families = metric_families(httpx.get(running.url + "/metrics").text)
    assert [r.status for r in sim.requests] == [0, 0]  # the server hung up on the simulator
    assert families["nem_llm_http_client_disconnects"].samples[0].value == 1.0


def test_a_disconnecting_stream_client_cancels_its_llm_calls(
    countries: list[dict[str, Any]],
) -> None:
    with run_simulator(SimConfig(latency="fixed", latency_p50=60.0)) as sim:
        m = sim_matcher(countries, sim.base_url)
        with serve(app_for(m)) as running:
            client = httpx.Client(timeout=30)
            with client.stream(
                "POST",
                running.url + "/v1/match:stream",
                json={"queries": ["Germani", "Osterreich"]},
            ):
                wait_for(lambda: sim.in_flight == 2)
            client.close()
            wait_for(lambda: len(sim.requests) == 2)
    assert [r.status for r in sim.requests] == [0, 0]


def test_shutdown_drains_in_flight_requests(countries: list[dict[str, Any]]) -> None:
    with run_simulator(SimConfig(latency="fixed", latency_p50=0.5)) as sim:
        m = sim_matcher(countries, sim.base_url)
        running = Running(app_for(m))
        running.start()
        wait_for(lambda: m.ready)
        answers: list[httpx.Response] = []
        caller = threading.Thread(
            target=lambda: answers.append(post(running, "/v1/match", {"query": "Germani"}))
        )
        caller.start()
        wait_for(lambda: sim.in_flight == 1)
        running.stop()  # as on SIGTERM: stop accepting, let in-flight requests finish
        caller.join()
    assert answers[0].status_code == 200
    assert answers[0].json()["decided_by"] == "llm"
    assert [r.status for r in sim.requests] == [200]


def test_shutdown_cancels_what_is_still_running_after_the_drain_timeout(
    countries: list[dict[str, Any]],
) -> None:
    with run_simulator(SimConfig(latency="fixed", latency_p50=60.0)) as sim:
        m = sim_matcher(countries, sim.base_url)
        running = Running(app_for(m), drain_timeout=0.1)  # uvicorn rounds up to 1 s
        running.start()
        wait_for(lambda: m.ready)
        answers: list[httpx.Response] = []
        caller = threading.Thread(
            target=lambda: answers.append(post(running, "/v1/match", {"query": "Germani"}))
        )
        caller.start()
        wait_for(lambda: sim.in_flight == 1)
        running.stop()
        caller.join()
        wait_for(lambda: len(sim.requests) == 1)
    assert answers[0].status_code == 503
    assert answers[0].json()["error"]["type"] == "shutting_down"
    assert [r.status for r in sim.requests] == [0]  # its LLM call was cancelled


def test_shutdown_logs_no_traceback_for_the_requests_it_cancels(
    countries: list[dict[str, Any]],
) -> None:
    with run_simulator(SimConfig(latency="fixed", latency_p50=60.0)) as sim:
        m = sim_matcher(countries, sim.base_url)
        running = Running(app_for(m), drain_timeout=0.1)
        # after uvicorn's logging set-up (it replaces the handlers of its loggers)
        with logged("uvicorn.error") as records:
            running.start()
            wait_for(lambda: m.ready)
            answers: list[httpx.Response] = []
            caller = threading.Thread(
                target=lambda: answers.append(post(running, "/v1/match", {"query": "Germani"}))
            )
            caller.start()
            wait_for(lambda: sim.in_flight == 1)
            running.stop()
            caller.join()
    assert answers[0].status_code == 503
    assert [r.getMessage() for r in records if "Cancel 1 running task" in r.getMessage()]
    assert not [r for r in records if r.exc_info or "Exception in ASGI" in r.getMessage()]


def test_a_request_on_an_idle_keep_alive_connection_at_shutdown_is_answered(
    matcher: Matcher,
) -> None:
    running = Running(app_for(matcher))
    running.server.config.timeout_keep_alive = 60  # idle connections stay until shutdown
    running.start()
    wait_for(lambda: matcher.ready)
    with httpx.Client(timeout=30) as client:
        first = client.post(running.url + "/v1/match", json={"query": "USA"})
        stopper = threading.Thread(target=running.stop)
        stopper.start()
        wait_for(lambda: not running.server.servers[0].is_serving())  # shutdown has begun
        second = client.post(running.url + "/v1/match", json={"query": "Germany"})
        stopper.join()
    assert (first.status_code, second.status_code) == (200, 200)
    assert second.headers["connection"] == "close"


def test_connections_still_queued_unaccepted_at_shutdown_are_answered(
    matcher: Matcher,
) -> None:
    """Connections the kernel completed but the loop has not accepted yet (a busy loop,
    under load) when the shutdown begins are answered: closing the listener resets them."""
    running = Running(app_for(matcher))
    running.start()
    wait_for(lambda: matcher.ready)
    busy, clients_sent = threading.Event(), threading.Event()

    def busy_loop() -> None:  # the loop accepts nothing until the shutdown has begun
        busy.set()
        clients_sent.wait()
        running.server.should_exit = True
        time.sleep(0.3)  # past uvicorn's 0.1 s tick: the shutdown runs before any accept

    running.server.servers[0].get_loop().call_soon_threadsafe(busy_loop)
    busy.wait()
    clients = [raw_post(running.port, {"query": q}) for q in ("USA", "Germany", "UK")]
    clients_sent.set()
    try:
        answers = [read_response(sock)[0] for sock in clients]  # uvicorn alone: reset
    finally:
        running.stop()
        for sock in clients:
            sock.close()
    assert answers == [200, 200, 200]


def test_match_answers_503_until_the_index_is_built(countries: list[dict[str, Any]]) -> None:
    gate = threading.Event()

    class SlowEmbedder(FakeEmbedder):
        def encode(self, texts: Any) -> Any:
            gate.wait()
            return super().encode(texts)

    m = Matcher(countries, embedder=SlowEmbedder(), llm=False)
    with serve(app_for(m), wait_ready=False) as running:
        before = post(running, "/v1/match", {"query": "USA"})
        ready_before = httpx.get(running.url + "/readyz")
        gate.set()
        wait_for(lambda: m.ready)
        after = post(running, "/v1/match", {"query": "USA"})
    assert (before.status_code, before.json()["error"]["type"]) == (503, "not_ready")
    assert ready_before.status_code == 503
    assert after.status_code == 200
