"""The HTTP service's endpoints over a real socket: matching, filters, entities, metrics.

Each test builds a fresh app around a small Matcher (see ``service_support``). The guard
(auth, bodies, limits, timeouts) is in ``test_service_guard.py``, readiness, deadlines and
shutdown in ``test_service_lifecycle.py``, the ``nem-llm serve`` command in
``test_service_cli.py``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytest.importorskip("fastapi", reason="needs the service extra: pip install 'nem_llm[service]'")
pytest.importorskip("uvicorn")

from service_support import (
    OPENAI_KEY,
    PLACES,
    TOKEN,
    Running,
    app_for,
    fake_client,
    metric_families,
    post,
    serve,
)

from nem_llm import Matcher
from nem_llm.integrations.service import ServiceLimits
from nem_llm.testing import FakeEmbedder, FakeLLM

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def matcher(countries: list[dict[str, Any]]) -> Matcher:
    return Matcher(countries, embedder=FakeEmbedder(), llm=False)


@pytest.fixture
def server(matcher: Matcher) -> Iterator[Running]:
    with serve(app_for(matcher)) as running:
        yield running


# -- endpoints ---------------------------------------------------------------------------


def test_healthz_answers_ok(server: Running) -> None:
    r = httpx.get(server.url + "/healthz")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})


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


def test_match_threshold_overrides_the_accept_threshold_where_allowed(
    countries: list[dict[str, Any]],
) -> None:
    m = Matcher(countries, embedder=FakeEmbedder(), llm=False, accept_threshold=0.92)
    limits = ServiceLimits(allow_request_thresholds=True)
    with serve(app_for(m, limits=limits)) as running:
        default = post(running, "/v1/match", {"query": "United Statess"}).json()
        strict = post(running, "/v1/match", {"query": "United Statess", "threshold": 1.01}).json()
    assert (default["status"], strict["status"]) == ("matched", "review")


# -- entity administration -----------------------------------------------------------------


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


def test_an_entity_whose_id_holds_a_slash_can_be_deleted(places: Running) -> None:
    doi = {"id": "10.1000/xyz", "name": "Lutetia"}
    assert post(places, "/v1/entities", {"entities": [doi]}).status_code == 201
    r = httpx.delete(places.url + "/v1/entities/10.1000%2Fxyz")
    assert (r.status_code, r.json()["removed"]) == (200, 1)
    assert "10.1000/xyz" not in candidate_ids(places, "Lutetia")


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


# -- metrics and OpenAPI -------------------------------------------------------------------


def test_metrics_parse_and_count_results_by_status_and_decider(server: Running) -> None:
    post(server, "/v1/match", {"query": ["USA", "Germany"]})
    r = httpx.get(server.url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    families = metric_families(r.text)
    results = {
        (s.labels["status"], s.labels["decided_by"]): s.value
        for s in families["nem_llm_results"].samples
        if s.name == "nem_llm_results_total"
    }
    assert results == {("matched", "embedding"): 2.0}


def test_metrics_list_requests_latency_in_flight_and_llm_totals(server: Running) -> None:
    post(server, "/v1/match", {"query": "USA"})
    families = metric_families(httpx.get(server.url + "/metrics").text)
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
        families = metric_families(httpx.get(server.url + "/metrics").text)
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
        families = metric_families(httpx.get(running.url + "/metrics").text)
    assert r.json()["decided_by"] == "llm"
    calls = families["nem_llm_llm_calls"].samples[0].value
    tokens = {s.labels["kind"]: s.value for s in families["nem_llm_llm_tokens"].samples}
    assert calls == 1.0
    assert tokens["prompt"] > 0


def test_metrics_report_the_audit_per_route(countries: list[dict[str, Any]]) -> None:
    """Every auto decision audited (audit_rate 1) by an LLM that always answers "none":
    /metrics shows the matched route audited, never agreed with, and its bound."""
    llm = FakeLLM(lambda _query, _ids: "none")
    m = Matcher(
        countries, embedder=FakeEmbedder(), client=fake_client(llm), audit_rate=1.0, label_budget=0
    )
    with serve(app_for(m)) as running:
        answers = [post(running, "/v1/match", {"query": q}).json() for q in ("Germany", "France")]
        families = metric_families(httpx.get(running.url + "/metrics").text)
    assert all(a["decided_by"] == "embedding" or a["status"] == "review" for a in answers)
    audited = {s.labels["route"]: s.value for s in families["nem_llm_audit_audited"].samples}
    agreeing = {s.labels["route"]: s.value for s in families["nem_llm_audit_agreeing"].samples}
    bound = families["nem_llm_audit_agreement_upper_bound"].samples
    assert audited.get("matched") == 2.0 and agreeing.get("matched") == 0.0
    assert bound and bound[0].value < 1.0
    assert len(llm.requests) == 2


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


def test_a_record_query_is_matched_by_its_fields_over_http() -> None:
    people = [
        {"id": f"p{i}", "name": f"{first} {last}",
         "attributes": {"first": first, "last": last, "dob": f"19{50 + i:02d}0101"}}
        for i, (first, last) in enumerate(
            (f, la) for f in ("ann", "bo", "cy", "di", "ed", "flo") for la in ("lee", "li", "ng")
        )
    ]  # fmt: skip
    workload = [{"query": e["name"], "attributes": dict(e["attributes"])} for e in people] * 2
    matcher = Matcher(people, embedder=FakeEmbedder(), llm=False, index_description=True)
    matcher.fit(workload=workload, show_progress=False)
    with serve(app_for(matcher)) as running:
        record = {"query": "", "attributes": {"first": "ann", "last": "lee", "dob": "19500101"}}
        one = post(running, "/v1/match", {"query": record})
        many = post(running, "/v1/match", {"query": [record, "bo li"]})
        bad = post(running, "/v1/match", {"query": {"attributes": "not a mapping"}})
    assert one.status_code == 200, one.text
    assert one.json()["fields"]["entity_id"] == "p0"
    assert [r["fields"] is not None for r in many.json()] == [True, False]
    assert bad.status_code == 422
