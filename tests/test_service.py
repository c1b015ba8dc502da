"""The HTTP service over a real socket: uvicorn in a thread on a free port.

Each test builds a fresh app with ``create_app`` around a small Matcher (FakeEmbedder; the
LLM is ``FakeLLM`` or the simulator) and talks to it with httpx. Waits for a condition
poll with a deadline (the test's timeout bounds them); no assertion is on time.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

pytest.importorskip("fastapi", reason="needs the service extra: pip install 'nem_llm[service]'")
uvicorn = pytest.importorskip("uvicorn")
prometheus_parser = pytest.importorskip("prometheus_client.parser")

from fastapi import FastAPI  # noqa: E402

from nem_llm import Matcher  # noqa: E402
from nem_llm.integrations.service import (  # noqa: E402
    ServiceLimits,
    create_app,
    server_config,
)
from nem_llm.sim import SimConfig, run_simulator  # noqa: E402
from nem_llm.testing import FakeEmbedder, FakeLLM  # noqa: E402

pytestmark = pytest.mark.timeout(60)

TOKEN = "test-bearer-token-123"
OPENAI_KEY = "sk-test-SECRET-openai-key-0123456789"


class Running:
    """A uvicorn server running an app in a thread."""

    def __init__(self, app: Any, *, drain_timeout: float | None = None) -> None:
        config = server_config(app, port=0, log_level="warning", drain_timeout=drain_timeout)
        self.server = uvicorn.Server(config)
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


@contextmanager
def serve(
    app: Any, *, wait_ready: bool = True, drain_timeout: float | None = None
) -> Iterator[Running]:
    running = Running(app, drain_timeout=drain_timeout)
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


@pytest.fixture
def matcher(countries: list[dict[str, Any]]) -> Matcher:
    return Matcher(countries, embedder=FakeEmbedder(), llm=False)


@pytest.fixture
def server(matcher: Matcher) -> Iterator[Running]:
    with serve(app_for(matcher)) as running:
        yield running


def post(running: Running, path: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(running.url + path, json=body, timeout=30, **kwargs)


# -- endpoints ---------------------------------------------------------------------------


def test_healthz_answers_ok(server: Running) -> None:
    r = httpx.get(server.url + "/healthz")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})


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
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    client = openai.AsyncOpenAI(api_key="x", base_url=f"http://127.0.0.1:{dead}/v1")
    m = Matcher(countries, embedder=FakeEmbedder(), client=client)
    with serve(app_for(m)) as running:
        r = httpx.get(running.url + "/readyz")
    assert r.status_code == 503
    assert (r.json()["ready"], r.json()["llm"]) == (False, "unreachable")


def test_match_one_query_answers_a_match_result(server: Running) -> None:
    r = post(server, "/v1/match", {"query": "USA"})
    assert r.status_code == 200
    body = r.json()
    assert (body["status"], body["entity_id"], body["decided_by"]) == ("matched", "US", "embedding")


def test_match_a_list_answers_results_in_input_order(server: Running) -> None:
    r = post(server, "/v1/match", {"query": ["Germany", "USA", "Austria"]})
    assert r.status_code == 200
    assert [(x["index"], x["entity_id"]) for x in r.json()] == [(0, "DE"), (1, "US"), (2, "AT")]


def test_match_top_k_limits_the_candidates(server: Running) -> None:
    r = post(server, "/v1/match", {"query": "USA", "top_k": 2})
    assert len(r.json()["candidates"]) == 2


def test_match_explain_answers_an_explanation(server: Running) -> None:
    r = post(server, "/v1/match", {"query": "USA", "explain": True})
    body = r.json()
    assert (body["route"], body["result"]["entity_id"]) == ("matched", "US")
    assert "accept" in body["thresholds"]


def test_match_explain_of_a_list_answers_one_explanation_per_query(server: Running) -> None:
    r = post(server, "/v1/match", {"query": ["USA", "Germany"], "explain": True})
    assert [e["result"]["entity_id"] for e in r.json()] == ["US", "DE"]


def test_match_an_empty_query_is_422_naming_the_field(server: Running) -> None:
    r = post(server, "/v1/match", {"query": "   "})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "query"


def test_stream_answers_one_ndjson_line_per_query_with_its_index(server: Running) -> None:
    queries = ["USA", "Germany", "Austria", "France"]
    with httpx.stream(
        "POST", server.url + "/v1/match:stream", json={"queries": queries}, timeout=30
    ) as r:
        assert r.headers["content-type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert sorted((x["index"], x["query"]) for x in lines) == list(enumerate(queries))


def test_stream_rejects_explain_naming_the_field(server: Running) -> None:
    r = post(server, "/v1/match:stream", {"queries": ["USA"], "explain": True})
    assert (r.status_code, r.json()["error"]["field"]) == (422, "explain")


def test_match_where_filters_on_entity_attributes() -> None:
    entities = [
        {"id": "PAR-FR", "name": "Paris", "attributes": {"country": "FR"}},
        {"id": "PAR-US", "name": "Paris", "aliases": ["Paris TX"], "attributes": {"country": "US"}},
    ]
    m = Matcher(entities, embedder=FakeEmbedder(), llm=False)
    with serve(app_for(m)) as running:
        r = post(running, "/v1/match", {"query": "Paris", "where": {"country": "US"}})
    assert r.status_code == 200
    assert {c["entity_id"] for c in r.json()["candidates"]} == {"PAR-US"}


def test_match_where_on_an_unknown_attribute_is_422_naming_where(server: Running) -> None:
    r = post(server, "/v1/match", {"query": "USA", "where": {"no_such_attribute": 1}})
    assert (r.status_code, r.json()["error"]["field"]) == (422, "where")


def test_match_threshold_overrides_the_accept_threshold(countries: list[dict[str, Any]]) -> None:
    m = Matcher(countries, embedder=FakeEmbedder(), llm=False, accept_threshold=0.92)
    with serve(app_for(m)) as running:
        default = post(running, "/v1/match", {"query": "United Statess"}).json()
        strict = post(running, "/v1/match", {"query": "United Statess", "threshold": 1.01}).json()
    assert (default["status"], strict["status"]) == ("matched", "review")


# -- entity administration -----------------------------------------------------------------


PLACES = [
    {"id": "PAR-FR", "name": "Paris", "attributes": {"country": "FR"}},
    {"id": "PAR-US", "name": "Paris", "aliases": ["Paris TX"], "attributes": {"country": "US"}},
]


@pytest.fixture
def places() -> Iterator[Running]:
    """A server over the real incremental index (Matcher.add/update/remove_entities_async)."""
    with serve(app_for(Matcher(PLACES, embedder=FakeEmbedder(), llm=False))) as running:
        yield running


def candidate_ids(running: Running, query: str, **options: Any) -> list[str]:
    r = post(running, "/v1/match", {"query": query, **options})
    assert r.status_code == 200, r.text
    return [c["entity_id"] for c in r.json()["candidates"]]


def test_an_entity_added_over_http_is_found_by_the_next_request(places: Running) -> None:
    assert "LYO" not in candidate_ids(places, "Lyon", where={"country": "FR"})
    lyon = {"id": "LYO", "name": "Lyon", "attributes": {"country": "FR"}}
    r = post(places, "/v1/entities", {"entities": [lyon]})
    assert (r.status_code, r.json()) == (201, {"added": 1, "updated": 0, "removed": 0})
    assert candidate_ids(places, "Lyon", where={"country": "FR"})[0] == "LYO"


def test_an_entity_updated_over_http_is_found_by_its_new_alias(places: Running) -> None:
    paname = {"id": "PAR-FR", "name": "Paris", "aliases": ["Paname"], "attributes": {}}
    r = httpx.put(places.url + "/v1/entities", json={"entities": [paname]})
    assert (r.status_code, r.json()["updated"]) == (200, 1)
    assert candidate_ids(places, "Paname")[0] == "PAR-FR"


def test_an_entity_deleted_over_http_is_never_returned(places: Running) -> None:
    assert "PAR-FR" in candidate_ids(places, "Paris")
    r = httpx.delete(places.url + "/v1/entities/PAR-FR")
    assert (r.status_code, r.json()["removed"]) == (200, 1)
    assert candidate_ids(places, "Paris") == ["PAR-US"]


def test_deleting_an_unknown_entity_is_404(places: Running) -> None:
    r = httpx.delete(places.url + "/v1/entities/nope")
    assert (r.status_code, r.json()["error"]["field"]) == (404, "entity_id")


def test_deleting_the_last_entity_is_422_and_keeps_it(places: Running) -> None:
    assert httpx.delete(places.url + "/v1/entities/PAR-FR").status_code == 200
    r = httpx.delete(places.url + "/v1/entities/PAR-US")
    assert (r.status_code, r.json()["error"]["field"]) == (422, "entity_id")
    assert candidate_ids(places, "Paris") == ["PAR-US"]


def test_adding_a_present_id_is_422_naming_entities(places: Running) -> None:
    r = post(places, "/v1/entities", {"entities": [{"id": "PAR-US", "name": "Paris, Texas"}]})
    assert (r.status_code, r.json()["error"]["field"]) == (422, "entities")


def test_updating_an_unknown_id_is_422_naming_entities(places: Running) -> None:
    r = httpx.put(places.url + "/v1/entities", json={"entities": [{"id": "X", "name": "X"}]})
    assert (r.status_code, r.json()["error"]["field"]) == (422, "entities")


# -- filters -------------------------------------------------------------------------------


def test_a_list_takes_one_filter_per_query(places: Running) -> None:
    body = {"query": ["Paris", "Paris"], "where": [{"country": "US"}, None]}
    results = post(places, "/v1/match", body).json()
    assert [c["entity_id"] for c in results[0]["candidates"]] == ["PAR-US"]
    assert {c["entity_id"] for c in results[1]["candidates"]} == {"PAR-FR", "PAR-US"}


def test_a_failing_filter_of_a_list_makes_only_its_query_an_error(places: Running) -> None:
    body = {"query": ["Paris", "Paris"], "where": [{"country": "FR"}, {"no_such_attribute": 1}]}
    r = post(places, "/v1/match", body)
    assert r.status_code == 200
    first, second = r.json()
    assert (first["status"], [c["entity_id"] for c in first["candidates"]]) == (
        "review",
        ["PAR-FR"],
    )
    assert (second["status"], second["error_type"]) == ("error", "config")
    assert "no_such_attribute" in second["error"]


def test_a_stream_takes_one_filter_per_query(places: Running) -> None:
    body = {"queries": ["Paris", "Paris"], "where": [{"country": "US"}, {"no_such": 1}]}
    r = post(places, "/v1/match:stream", body)
    lines = sorted((json.loads(x) for x in r.text.splitlines()), key=lambda x: x["index"])
    assert [c["entity_id"] for c in lines[0]["candidates"]] == ["PAR-US"]
    assert lines[1]["status"] == "error"


def test_a_list_of_filters_of_another_length_is_422_naming_where(places: Running) -> None:
    r = post(places, "/v1/match", {"query": ["Paris", "Lyon"], "where": [{"country": "FR"}]})
    assert (r.status_code, r.json()["error"]["field"]) == (422, "where")


def test_one_query_with_a_list_of_filters_is_422_naming_where(places: Running) -> None:
    r = post(places, "/v1/match", {"query": "Paris", "where": [{"country": "FR"}]})
    assert (r.status_code, r.json()["error"]["field"]) == (422, "where")


def test_a_shared_filter_on_an_unknown_attribute_is_422_for_a_list(places: Running) -> None:
    r = post(places, "/v1/match", {"query": ["Paris", "Lyon"], "where": {"no_such": 1}})
    assert (r.status_code, r.json()["error"]["field"]) == (422, "where")


def test_a_stream_with_a_filter_on_an_unknown_attribute_is_422_naming_where(
    places: Running,
) -> None:
    r = post(places, "/v1/match:stream", {"queries": ["Paris"], "where": {"no_such": 1}})
    assert (r.status_code, r.json()["error"]["field"]) == (422, "where")


def test_explain_of_a_list_takes_one_filter_per_query(places: Running) -> None:
    body = {"query": ["Paris", "Paris"], "where": [{"country": "US"}, None], "explain": True}
    first, second = post(places, "/v1/match", body).json()
    assert [c["entity_id"] for c in first["candidates"]] == ["PAR-US"]
    assert len(second["candidates"]) == 2


# -- auth ----------------------------------------------------------------------------------


@pytest.fixture
def guarded(matcher: Matcher) -> Iterator[Running]:
    with serve(app_for(matcher, api_key=TOKEN)) as running:
        yield running


def test_auth_off_needs_no_token(server: Running) -> None:
    assert post(server, "/v1/match", {"query": "USA"}).status_code == 200


def test_auth_on_rejects_a_missing_token_with_401(guarded: Running) -> None:
    r = post(guarded, "/v1/match", {"query": "USA"})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["field"] == "Authorization"


def test_auth_on_rejects_a_wrong_token_with_401(guarded: Running) -> None:
    r = post(guarded, "/v1/match", {"query": "USA"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401


def test_auth_on_accepts_the_right_token(guarded: Running) -> None:
    r = post(guarded, "/v1/match", {"query": "USA"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200


def test_auth_on_guards_metrics_but_not_the_probes(guarded: Running) -> None:
    assert httpx.get(guarded.url + "/metrics").status_code == 401
    assert httpx.get(guarded.url + "/healthz").status_code == 200
    assert httpx.get(guarded.url + "/readyz").status_code == 200


# -- limits --------------------------------------------------------------------------------


@pytest.fixture
def limited(matcher: Matcher) -> Iterator[Running]:
    limits = ServiceLimits(max_body_bytes=2_000, max_queries=3, max_query_chars=20)
    with serve(app_for(matcher, limits=limits)) as running:
        yield running


def test_a_body_over_the_limit_is_413_naming_body(limited: Running) -> None:
    r = post(limited, "/v1/match", {"query": "x" * 5_000})
    assert r.status_code == 413
    assert r.json()["error"]["field"] == "body"


def test_a_chunked_body_over_the_limit_is_413(limited: Running) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"query": "'
        for _ in range(10):
            yield b"x" * 500
        yield b'"}'

    r = httpx.post(limited.url + "/v1/match", content=chunks())
    assert r.status_code == 413


def test_too_many_queries_is_422_naming_query(limited: Running) -> None:
    r = post(limited, "/v1/match", {"query": ["a", "b", "c", "d"]})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "query"


def test_a_query_over_the_length_limit_is_422_naming_it(limited: Running) -> None:
    r = post(limited, "/v1/match", {"query": ["USA", "y" * 21]})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "query[1]"


def test_a_stream_query_over_the_length_limit_is_422_naming_it(limited: Running) -> None:
    r = post(limited, "/v1/match:stream", {"queries": ["z" * 21]})
    assert (r.status_code, r.json()["error"]["field"]) == (422, "queries[0]")


def test_a_query_of_the_wrong_type_is_422_naming_it(server: Running) -> None:
    r = post(server, "/v1/match", {"query": ["USA", 3]})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "query[1]"


def test_a_body_that_is_not_json_is_422(server: Running) -> None:
    headers = {"Content-Type": "application/json"}
    r = httpx.post(server.url + "/v1/match", content=b'{"query": "US', headers=headers)
    assert (r.status_code, r.json()["error"]["type"]) == (422, "invalid_request")


def test_a_body_of_another_media_type_is_422(server: Running) -> None:
    headers = {"Content-Type": "text/plain"}
    r = httpx.post(server.url + "/v1/match", content=b'{"query": "USA"}', headers=headers)
    assert (r.status_code, r.json()["error"]["type"]) == (422, "invalid_request")


def test_a_body_without_a_media_type_is_read_as_json(server: Running) -> None:
    r = httpx.post(server.url + "/v1/match", content=b'{"query": "USA"}')
    assert (r.status_code, r.json()["entity_id"]) == (200, "US")


def test_the_app_mounted_under_a_prefix_serves_and_guards_its_endpoints(
    countries: list[dict[str, Any]],
) -> None:
    m = Matcher(countries, embedder=FakeEmbedder(), llm=False)
    inner = app_for(m, api_key=TOKEN)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with inner.router.lifespan_context(inner):
            yield

    outer = FastAPI(lifespan=lifespan)
    outer.mount("/nem", inner)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with serve(outer, wait_ready=False, drain_timeout=5.0) as running:
        wait_for(lambda: m.ready)
        refused = post(running, "/nem/v1/match", {"query": "USA"})
        one = post(running, "/nem/v1/match", {"query": "USA"}, headers=auth)
        many = post(running, "/nem/v1/match:stream", {"queries": ["USA"]}, headers=auth)
    assert refused.status_code == 401
    assert (one.status_code, one.json()["entity_id"]) == (200, "US")
    assert (many.status_code, json.loads(many.text)["entity_id"]) == (200, "US")


# -- metrics and OpenAPI -------------------------------------------------------------------


def _families(text: str) -> dict[str, Any]:
    return {f.name: f for f in prometheus_parser.text_string_to_metric_families(text)}


def test_metrics_parse_and_count_results_by_status_and_decider(server: Running) -> None:
    post(server, "/v1/match", {"query": ["USA", "Germany"]})
    r = httpx.get(server.url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    families = _families(r.text)
    results = {
        (s.labels["status"], s.labels["decided_by"]): s.value
        for s in families["nem_llm_results"].samples
        if s.name == "nem_llm_results_total"
    }
    assert results == {("matched", "embedding"): 2.0}


def test_metrics_list_requests_latency_in_flight_and_llm_totals(server: Running) -> None:
    post(server, "/v1/match", {"query": "USA"})
    families = _families(httpx.get(server.url + "/metrics").text)
    for name in (
        "nem_llm_http_requests",
        "nem_llm_http_request_duration_seconds",
        "nem_llm_http_requests_in_flight",
        "nem_llm_result_duration_seconds",
        "nem_llm_llm_calls",
        "nem_llm_llm_retries",
        "nem_llm_llm_rate_limited",
        "nem_llm_llm_tokens",
        "nem_llm_llm_cost_usd",
        "nem_llm_llm_attempt_duration_seconds",
        "nem_llm_llm_in_flight",
    ):
        assert name in families, name
    ok = [
        s
        for s in families["nem_llm_http_requests"].samples
        if s.labels.get("path") == "/v1/match" and s.labels.get("status") == "200"
    ]
    assert ok[0].value == 1.0


def test_metrics_count_the_micro_batches_the_embedder_was_given(server: Running) -> None:
    def counted() -> tuple[float, float]:
        families = _families(httpx.get(server.url + "/metrics").text)
        batches = families["nem_llm_embed_batches"].samples[0].value
        return batches, families["nem_llm_embed_texts"].samples[0].value

    before = counted()
    post(server, "/v1/match", {"query": ["USA", "Germany", "France"]})
    after = counted()
    assert after[1] - before[1] == 3.0
    assert 1.0 <= after[0] - before[0] <= 3.0


def test_metrics_count_llm_calls_and_tokens(countries: list[dict[str, Any]]) -> None:
    m = Matcher(
        countries, embedder=FakeEmbedder(), client=fake_client(FakeLLM()), accept_threshold=1.01
    )
    with serve(app_for(m)) as running:
        r = post(running, "/v1/match", {"query": "Germani"})
        families = _families(httpx.get(running.url + "/metrics").text)
    assert r.json()["decided_by"] == "llm"
    calls = families["nem_llm_llm_calls"].samples[0].value
    tokens = {s.labels["kind"]: s.value for s in families["nem_llm_llm_tokens"].samples}
    assert calls == 1.0
    assert tokens["prompt"] > 0


def test_openapi_lists_every_endpoint_and_the_public_models(server: Running) -> None:
    schema = httpx.get(server.url + "/openapi.json").json()
    assert set(schema["paths"]) == {
        "/v1/match",
        "/v1/match:stream",
        "/v1/entities",
        "/v1/entities/{entity_id}",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    assert {"MatchResult", "Explanation", "Candidate", "ReadyStatus"} <= set(
        schema["components"]["schemas"]
    )
    assert httpx.get(server.url + "/docs").status_code == 200


# -- secrets -------------------------------------------------------------------------------


def test_the_openai_key_never_appears_in_responses_metrics_or_logs(
    countries: list[dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    def leaky(_query: str, _ids: tuple[str, ...]) -> httpx.Response:
        message = f"Incorrect API key provided: {OPENAI_KEY}"
        return httpx.Response(401, json={"error": {"message": message, "type": "auth"}})

    llm = FakeLLM(leaky)
    m = Matcher(
        countries,
        embedder=FakeEmbedder(),
        client=fake_client(llm, api_key=OPENAI_KEY),
        accept_threshold=1.01,
    )
    caplog.set_level("DEBUG")
    with serve(app_for(m, api_key=TOKEN)) as running:
        auth = {"Authorization": f"Bearer {TOKEN}"}
        bodies = [
            post(running, "/v1/match", {"query": "Germani"}, headers=auth).text,
            post(running, "/v1/match", {"query": ["Germani"]}, headers=auth).text,
            post(running, "/v1/match:stream", {"queries": ["Germani"]}, headers=auth).text,
            httpx.get(running.url + "/metrics", headers=auth).text,
            httpx.get(running.url + "/readyz").text,
            httpx.get(running.url + "/openapi.json").text,
        ]
    assert llm.requests, "the LLM was called"
    assert "Incorrect API key" in bodies[0]
    for body in bodies:
        assert OPENAI_KEY not in body
        assert TOKEN not in body
    assert OPENAI_KEY not in caplog.text
    assert TOKEN not in caplog.text


# -- disconnects and shutdown --------------------------------------------------------------


def _sim_matcher(countries: list[dict[str, Any]], base_url: str) -> Matcher:
    # the matcher makes (and so closes) its own client: no connection outlives the server
    return Matcher(
        countries,
        embedder=FakeEmbedder(),
        base_url=base_url,
        api_key="sim",
        model="nem-llm-sim",
        accept_threshold=1.01,
    )


def _raw_post(port: int, body: dict[str, Any]) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(
        b"POST /v1/match HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def test_a_disconnecting_client_cancels_its_llm_calls(countries: list[dict[str, Any]]) -> None:
    with run_simulator(SimConfig(latency="fixed", latency_p50=60.0)) as sim:
        m = _sim_matcher(countries, sim.base_url)
        app = app_for(m)
        with serve(app) as running:
            sock = _raw_post(running.port, {"query": ["Germani", "Frankreich"]})
            wait_for(lambda: sim.in_flight == 2)
            sock.close()
            wait_for(lambda: len(sim.requests) == 2)
            wait_for(lambda: m.governor_stats is not None and m.governor_stats.in_flight == 0)
            families = _families(httpx.get(running.url + "/metrics").text)
    assert [r.status for r in sim.requests] == [0, 0]  # the server hung up on the simulator
    assert families["nem_llm_http_client_disconnects"].samples[0].value == 1.0


def test_a_disconnecting_stream_client_cancels_its_llm_calls(
    countries: list[dict[str, Any]],
) -> None:
    with run_simulator(SimConfig(latency="fixed", latency_p50=60.0)) as sim:
        m = _sim_matcher(countries, sim.base_url)
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
        m = _sim_matcher(countries, sim.base_url)
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
        m = _sim_matcher(countries, sim.base_url)
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


# -- nem-llm serve ---------------------------------------------------------------------------

CATALOG = Path(__file__).parent / "data" / "cli" / "catalog.jsonl"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def test_serve_command_serves_the_catalog_with_auth_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    port = _free_port()
    log = tmp_path / "serve.log"
    with run_simulator(SimConfig()) as sim, log.open("wb") as out:
        env = _serve_env(
            NEM_TEST_TOKEN=TOKEN, OPENAI_API_KEY=OPENAI_KEY, OPENAI_BASE_URL=sim.base_url
        )
        args = ["serve", "--catalog", str(CATALOG), "--port", str(port)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "nem_llm.cli", *args, "--api-key-env", "NEM_TEST_TOKEN"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"

            def ready() -> bool:
                assert proc.poll() is None, log.read_text()
                try:
                    return httpx.get(url + "/readyz").status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(ready, interval=0.2)
            auth = {"Authorization": f"Bearer {TOKEN}"}
            r = httpx.post(url + "/v1/match", json={"query": "USA"}, headers=auth, timeout=30)
            denied = httpx.post(url + "/v1/match", json={"query": "USA"}, timeout=30)
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text(encoding="utf-8", errors="replace")
    assert (r.status_code, r.json()["entity_id"]) == (200, "US")
    assert denied.status_code == 401
    # uvicorn shuts down cleanly, then re-raises the signal (exit status of a SIGTERM)
    assert code in (0, -signal.SIGTERM), text
    assert "Application shutdown complete" in text
    assert '"POST /v1/match HTTP/1.1" 200' in text  # the access log is on by default
    assert TOKEN not in text
    assert OPENAI_KEY not in text


def test_server_config_can_drop_the_access_log(matcher: Matcher) -> None:
    app = app_for(matcher)
    assert (server_config(app).access_log, server_config(app, access_log=False).access_log) == (
        True,
        False,
    )


UNSET = ("--api-key-env", "NEM_TEST_UNSET_TOKEN")


def test_serve_command_fails_clearly_when_the_api_key_variable_is_unset() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "nem_llm.cli", "serve", "--catalog", str(CATALOG), *UNSET],
        env=_serve_env(),
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
        [sys.executable, "-c", _TUNED], env=_serve_env(), capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    frozen_before, threshold_before, ready, threshold = run.stdout.split()
    assert (frozen_before, ready) == ("0", "True")
    assert int(threshold) == max(int(threshold_before), 10_000)
