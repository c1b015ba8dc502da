"""The guard in front of every endpoint, over a real socket: keys, bodies, limits, timeouts.

What an operator allows a request (its size, its options, its time to arrive) and who
may do what (the API key, the admin key for entity writes).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

pytest.importorskip("fastapi", reason="needs the service extra: pip install 'nem_llm[service]'")
pytest.importorskip("uvicorn")

from service_support import (
    ADMIN,
    PLACES,
    TOKEN,
    Running,
    app_for,
    metric,
    post,
    raw_request,
    read_response,
    serve,
    wait_for,
)

from nem_llm import Matcher
from nem_llm.errors import ConfigError
from nem_llm.integrations.service import ServiceLimits, create_app
from nem_llm.testing import FakeEmbedder

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def matcher(countries: list[dict[str, Any]]) -> Matcher:
    return Matcher(countries, embedder=FakeEmbedder(), llm=False)


@pytest.fixture
def server(matcher: Matcher) -> Iterator[Running]:
    with serve(app_for(matcher)) as running:
        yield running


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


def test_entity_writes_need_the_admin_key_when_one_is_set() -> None:
    m = Matcher(PLACES, embedder=FakeEmbedder(), llm=False)
    lyon = {"entities": [{"id": "LYO", "name": "Lyon"}]}
    with serve(app_for(m, api_key=TOKEN, admin_key=ADMIN)) as running:
        user = post(running, "/v1/entities", lyon, headers={"Authorization": f"Bearer {TOKEN}"})
        admin = post(running, "/v1/entities", lyon, headers={"Authorization": f"Bearer {ADMIN}"})
        delete = httpx.delete(
            running.url + "/v1/entities/LYO", headers={"Authorization": f"Bearer {TOKEN}"}
        )
    assert (user.status_code, user.json()["error"]["type"]) == (403, "forbidden")
    assert admin.status_code == 201
    assert delete.status_code == 403


def test_the_admin_key_also_opens_matching(matcher: Matcher) -> None:
    with serve(app_for(matcher, api_key=TOKEN, admin_key=ADMIN)) as running:
        r = post(
            running, "/v1/match", {"query": "USA"}, headers={"Authorization": f"Bearer {ADMIN}"}
        )
    assert r.status_code == 200


def test_entity_writes_without_any_key_are_401_when_only_an_admin_key_is_set(
    matcher: Matcher,
) -> None:
    with serve(app_for(matcher, admin_key=ADMIN)) as running:
        write = post(running, "/v1/entities", {"entities": [{"id": "X", "name": "X"}]})
        match = post(running, "/v1/match", {"query": "USA"})
    assert (write.status_code, match.status_code) == (401, 200)


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


# -- bodies: JSON whatever the declared type --------------------------------------------


def test_a_json_body_declared_as_a_form_is_read_as_json(server: Running) -> None:
    # what `curl -d '{"query": "USA"}'` sends
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    r = httpx.post(server.url + "/v1/match", content=b'{"query": "USA"}', headers=headers)
    assert (r.status_code, r.json()["entity_id"]) == (200, "US")


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_plain_curl_example_is_answered(server: Running) -> None:
    run = subprocess.run(
        ["curl", "-s", "-d", '{"query": "USA"}', server.url + "/v1/match"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert json.loads(run.stdout)["entity_id"] == "US"


def test_a_json_body_of_another_declared_type_is_read_as_json_by_every_route(
    countries: list[dict[str, Any]],
) -> None:
    m = Matcher(countries, embedder=FakeEmbedder(), llm=False)
    text = {"Content-Type": "text/plain"}
    entity = json.dumps({"entities": [{"id": "NL", "name": "Netherlands"}]}).encode()
    with serve(app_for(m)) as running:
        stream = httpx.post(
            running.url + "/v1/match:stream", content=b'{"queries": ["USA"]}', headers=text
        )
        added = httpx.post(running.url + "/v1/entities", content=entity, headers=text)
    assert (stream.status_code, json.loads(stream.text)["entity_id"]) == (200, "US")
    assert added.status_code == 201


def test_a_body_that_is_not_json_is_415_naming_the_content_type(server: Running) -> None:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    r = httpx.post(server.url + "/v1/match", content=b"query=USA", headers=headers)
    assert r.status_code == 415
    error = r.json()["error"]
    assert (error["type"], error["field"]) == ("unsupported_media_type", "Content-Type")
    assert "application/x-www-form-urlencoded" in error["message"]


def test_a_body_without_a_media_type_is_read_as_json(server: Running) -> None:
    r = httpx.post(server.url + "/v1/match", content=b'{"query": "USA"}')
    assert (r.status_code, r.json()["entity_id"]) == (200, "US")


# -- what a request may ask: the operator's caps ------------------------------------------


def test_a_top_k_over_the_matchers_own_is_refused_by_default(server: Running) -> None:
    r = post(server, "/v1/match", {"query": "USA", "top_k": 1000})
    assert r.status_code == 422
    error = r.json()["error"]
    assert (error["type"], error["field"]) == ("limit_exceeded", "top_k")
    assert "limit of 5" in error["message"] and "refused" in error["message"]


def test_a_top_k_up_to_max_top_k_is_served(matcher: Matcher) -> None:
    with serve(app_for(matcher, limits=ServiceLimits(max_top_k=10))) as running:
        allowed = post(running, "/v1/match", {"query": "USA", "top_k": 10})
        refused = post(running, "/v1/match:stream", {"queries": ["USA"], "top_k": 11})
    assert (allowed.status_code, len(allowed.json()["candidates"])) == (200, 5)
    assert (refused.status_code, refused.json()["error"]["field"]) == (422, "top_k")


def test_a_request_threshold_is_refused_unless_the_operator_allows_it(server: Running) -> None:
    r = post(server, "/v1/match", {"query": "USA", "threshold": 5})
    assert r.status_code == 422
    error = r.json()["error"]
    assert (error["type"], error["field"]) == ("option_not_allowed", "threshold")
    assert "--allow-request-thresholds" in error["message"]


def test_max_top_k_below_the_matchers_top_k_is_a_config_error(matcher: Matcher) -> None:
    with pytest.raises(ConfigError, match="max_top_k"):
        create_app(matcher, limits=ServiceLimits(max_top_k=2))


@pytest.mark.parametrize("top_k", [True, "5", 5.0])
def test_top_k_must_be_an_integer(server: Running, top_k: Any) -> None:
    r = post(server, "/v1/match", {"query": "USA", "top_k": top_k})
    assert (r.status_code, r.json()["error"]["field"]) == (422, "top_k")


def test_a_threshold_that_is_not_a_number_is_422(matcher: Matcher) -> None:
    limits = ServiceLimits(allow_request_thresholds=True)
    with serve(app_for(matcher, limits=limits)) as running:
        r = httpx.post(running.url + "/v1/match", content=b'{"query": "USA", "threshold": NaN}')
    assert (r.status_code, r.json()["error"]["field"]) == (422, "threshold")


def test_an_entity_with_more_aliases_than_allowed_is_422_naming_it() -> None:
    m = Matcher(PLACES, embedder=FakeEmbedder(), llm=False)
    many = {"id": "LYO", "name": "Lyon", "aliases": ["a", "b", "c", "d"]}
    with serve(app_for(m, limits=ServiceLimits(max_aliases=3))) as running:
        r = post(running, "/v1/entities", {"entities": [PLACES[0] | {"id": "X"}, many]})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "entities[1].aliases"


# -- time to arrive: header and body read timeouts ------------------------------------------


def test_a_request_whose_headers_never_complete_gets_408_and_is_closed(matcher: Matcher) -> None:
    with serve(app_for(matcher, limits=ServiceLimits(header_timeout=0.2))) as running:
        sock = raw_request(running.port, b"POST /v1/match HTTP/1.1\r\nHost: x\r\n")
        status, headers, body = read_response(sock)
        closed = sock.recv(1) == b""
        sock.close()
        timeouts = metric(running, "nem_llm_http_read_timeouts", part="headers")
    assert (status, headers["connection"], closed) == (408, "close", True)
    assert json.loads(body)["error"]["type"] == "request_timeout"
    assert timeouts == 1.0


def test_a_body_that_never_completes_gets_408_naming_body(matcher: Matcher) -> None:
    head = b"POST /v1/match HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    with serve(app_for(matcher, limits=ServiceLimits(body_timeout=0.2))) as running:
        sock = raw_request(running.port, head, b'{"query": ')
        status, headers, body = read_response(sock)
        sock.close()
    assert (status, headers["connection"]) == (408, "close")
    assert json.loads(body)["error"]["field"] == "body"


def test_a_client_that_leaves_during_its_body_counts_as_a_disconnect(matcher: Matcher) -> None:
    head = b"POST /v1/match HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    with serve(app_for(matcher)) as running:
        sock = raw_request(running.port, head, b'{"query": ')
        wait_for(lambda: len(running.state.tasks) == 1)  # the guard awaits the rest
        sock.close()
        wait_for(lambda: not running.state.tasks)
        assert metric(running, "nem_llm_http_client_disconnects") == 1.0


def test_a_client_still_sending_its_body_at_shutdown_gets_503(matcher: Matcher) -> None:
    head = b"POST /v1/match HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    running = Running(app_for(matcher), drain_timeout=0.1)  # uvicorn rounds up to 1 s
    running.start()
    wait_for(lambda: matcher.ready)
    sock = raw_request(running.port, head, b'{"query": ')
    wait_for(lambda: len(running.state.tasks) == 1)
    stopper = threading.Thread(target=running.stop)
    stopper.start()
    status, _, body = read_response(sock)
    stopper.join()
    sock.close()
    assert (status, json.loads(body)["error"]["type"]) == (503, "shutting_down")


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
