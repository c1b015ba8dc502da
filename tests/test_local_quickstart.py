"""The quickstart tells the truth: its claim is the measured one, and it holds on a sample.

``examples/quickstart.py`` prints a sentence about the small local model. Its figures are
those ``benchmarks/bench_local_models.py`` measured (checked here without the model), and
with the real model (``local_llm``) the claim is measured again on a sample of ambiguous
development-set queries shipped in ``tests/data/local_ambiguous.jsonl``, and the quickstart
itself runs: an absent query never comes back as a match.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import instructor
import pytest
from openai import AsyncOpenAI

from nem_llm._llm.adjudication import Adjudicator
from nem_llm._llm.local_guard import judge
from nem_llm._llm.local_llm import LocalLLMServer, local_llm_available
from nem_llm._llm.local_models import DEFAULT_MODEL, MODELS
from nem_llm.models import Candidate

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "local-models.json"
SAMPLE = Path(__file__).parent / "data" / "local_ambiguous.jsonl"
AVAILABLE, REASON = local_llm_available()
requires_local_llm = pytest.mark.skipif(not AVAILABLE, reason=f"local LLM not installed: {REASON}")


def _quickstart() -> ModuleType:
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _measured() -> dict[str, Any]:
    data = json.loads(RESULTS.read_text(encoding="utf-8"))
    (figures,) = [
        f for f in data["figures"] if f["model"] == DEFAULT_MODEL and f["runtime"] == "transformers"
    ]
    return {"queries": data["items"], **figures}


def test_the_quickstarts_claim_is_the_benchmarks_measurement() -> None:
    claim, measured = _quickstart().LOCAL_CLAIM, _measured()
    assert claim["queries"] == measured["queries"]
    for key in ("accepted", "accuracy_accepted", "top_accuracy_accepted", "top_accuracy"):
        assert claim[key] == pytest.approx(measured[key], abs=0.005), key
    assert claim["model_accuracy"] == pytest.approx(measured["accuracy"], abs=0.005)


def test_the_claim_sentence_shows_the_measured_figures() -> None:
    quickstart = _quickstart()
    text = quickstart.claim_text(quickstart.LOCAL_CLAIM)
    assert f"On {quickstart.LOCAL_CLAIM['queries']} ambiguous" in text
    assert f"{quickstart.LOCAL_CLAIM['accuracy_accepted']:.0%}" in text
    assert "review" in text


def _sample() -> list[dict[str, Any]]:
    return [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines()]


@pytest.mark.local_llm
@requires_local_llm
@pytest.mark.timeout(900)
async def test_behind_the_guard_the_model_is_at_least_as_accurate_as_the_top_candidate() -> None:
    items = _sample()
    policy = MODELS[DEFAULT_MODEL].guard
    accepted = right = top_right = 0
    with LocalLLMServer(threads=1) as srv:
        client = AsyncOpenAI(base_url=srv.base_url, api_key="local", max_retries=0)
        adjudicator = Adjudicator(
            instructor.from_openai(client, mode=instructor.Mode.TOOLS), srv.model, max_reasks=0
        )
        for item in items:
            cands = [Candidate(**c) for c in item["candidates"]]
            ids = tuple(c.entity_id for c in cands)
            d = await adjudicator.decide_async(item["messages"], ids, request_timeout=300)
            if judge(cands, d.entity_id, d.confidence, policy).accept:
                accepted += 1
                right += d.entity_id == item["gold_id"]
                top_right += ids[0] == item["gold_id"]
        await client.close()
    assert accepted > 0
    assert right >= top_right


@pytest.mark.local_llm
@requires_local_llm
@pytest.mark.timeout(900)
def test_the_quickstart_marks_uncertain_rows_and_never_matches_the_absent_query() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    done = subprocess.run(
        [sys.executable, "examples/quickstart.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=880,
        env={**env, "COLUMNS": "200"},
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    header = next(line for line in lines if "status" in line and "confidence" in line)
    assert "decided by" in header
    atlantis = next(line for line in lines if "Atlantis" in line)
    assert " matched " not in atlantis
    assert "small local model" in done.stdout
    assert _quickstart().claim_text(_quickstart().LOCAL_CLAIM) in " ".join(done.stdout.split())
