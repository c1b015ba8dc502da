"""The simulator answers the rewrite call (tool ``CatalogNames``: which names has the entity?).

Over real HTTP with the official AsyncOpenAI client and instructor, as the matcher sends it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import instructor
import pytest
from instructor.core.exceptions import InstructorRetryException
from openai import AsyncOpenAI
from pydantic import BaseModel, Field

from nem_llm.errors import ConfigError
from nem_llm.sim import SimConfig, SimServer


class CatalogNames(BaseModel):
    names: list[str]


class EntityChoice(BaseModel):
    entity_id: Literal["US", "DE", "none"]
    confidence: float = Field(ge=0, le=1)
    reason: str


ENTITIES = [
    {"id": "US", "name": "United States", "aliases": ["USA", "United States of America"]},
    {"id": "DE", "name": "Germany", "aliases": ["Deutschland"]},
    {"id": "FR", "name": "France", "aliases": []},
]
FORMS = {e["id"]: {e["name"], *e["aliases"]} for e in ENTITIES}
GOLD = [
    {"query": "Vereinigte Staaten", "gold_id": "US"},
    {"query": "Atlantis", "gold_id": None},
]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    return {
        "gold_path": _jsonl(tmp_path / "gold.jsonl", GOLD),
        "catalog_path": _jsonl(tmp_path / "catalog.jsonl", ENTITIES),
    }


def _messages(query: str) -> list[Any]:
    return [
        {"role": "system", "content": "You know the names entities have in a catalog."},
        {
            "role": "user",
            "content": "Which name(s) does the mentioned entity most likely have in the "
            f"catalog?\n<query>\n{query}\n</query>",
        },
    ]


async def _ask(
    sim: SimServer,
    query: str,
    model: type[BaseModel] = CatalogNames,
    mode: instructor.Mode = instructor.Mode.TOOLS,
    max_retries: int = 0,
    messages: list[Any] | None = None,
) -> Any:
    raw = AsyncOpenAI(base_url=sim.base_url, api_key="sim", max_retries=0, timeout=10.0)
    try:
        client = instructor.from_openai(raw, mode=mode)
        return await client.chat.completions.create(
            model="any",
            response_model=model,
            messages=messages or _messages(query),
            max_retries=max_retries,
        )
    finally:
        await raw.close()


async def test_oracle_names_the_gold_entity_by_its_name_or_an_alias(
    files: dict[str, str],
) -> None:
    answers = []
    for seed in range(12):
        async with SimServer(SimConfig(policy="oracle", seed=seed, **files)) as sim:
            answers.append(await _ask(sim, "Vereinigte Staaten"))
    assert all(len(a.names) == 1 and a.names[0] in FORMS["US"] for a in answers)
    assert len({a.names[0] for a in answers}) > 1  # the name and the aliases both come up


async def test_the_same_query_gets_the_same_name_whatever_the_order(
    files: dict[str, str],
) -> None:
    async with SimServer(SimConfig(policy="oracle", seed=4, **files)) as sim:
        answers = [await _ask(sim, "Vereinigte Staaten") for _ in range(6)]
    assert len({a.names[0] for a in answers}) == 1


async def test_null_gold_gets_no_names(files: dict[str, str]) -> None:
    async with SimServer(SimConfig(policy="oracle", **files)) as sim:
        answer = await _ask(sim, "Atlantis")
    assert answer.names == []


async def test_unknown_query_gets_no_names(files: dict[str, str]) -> None:
    async with SimServer(SimConfig(policy="oracle", **files)) as sim:
        answer = await _ask(sim, "never labelled")
    assert answer.names == []


async def test_oracle_error_names_another_entity(files: dict[str, str]) -> None:
    config = SimConfig(policy="oracle", oracle_error_rate=1.0, seed=5, **files)
    async with SimServer(config) as sim:
        answers = [await _ask(sim, "Vereinigte Staaten") for _ in range(6)]
    names = {a.names[0] for a in answers}
    assert names <= {"Germany", "France"}


async def test_error_rate_is_drawn_with_the_seed(files: dict[str, str]) -> None:
    async def run() -> list[list[str]]:
        config = SimConfig(policy="oracle", oracle_error_rate=0.5, seed=11, **files)
        async with SimServer(config) as sim:
            return [(await _ask(sim, "Vereinigte Staaten")).names for _ in range(10)]

    first = await run()
    assert first == await run()
    assert any(n[0] in FORMS["US"] for n in first)
    assert any(n[0] not in FORMS["US"] for n in first)


async def test_without_a_catalog_the_answer_is_empty(files: dict[str, str]) -> None:
    async with SimServer(SimConfig(policy="oracle", gold_path=files["gold_path"])) as sim:
        answer = await _ask(sim, "Vereinigte Staaten")
    assert answer.names == []


async def test_a_names_schema_under_another_tool_name_is_the_rewrite_call(
    files: dict[str, str],
) -> None:
    class Rewrite(BaseModel):
        names: list[str]

    async with SimServer(SimConfig(policy="oracle", **files)) as sim:
        answer = await _ask(sim, "Vereinigte Staaten", model=Rewrite)
    assert answer.names[0] in FORMS["US"]


@pytest.mark.parametrize("mode", [instructor.Mode.JSON, instructor.Mode.MD_JSON])
async def test_json_modes_get_names_in_content(
    files: dict[str, str], mode: instructor.Mode
) -> None:
    async with SimServer(SimConfig(policy="oracle", **files)) as sim:
        answer = await _ask(sim, "Vereinigte Staaten", mode=mode)
    assert answer.names[0] in FORMS["US"]


async def test_adjudication_is_still_answered_with_the_gold_id(files: dict[str, str]) -> None:
    messages = _messages("Vereinigte Staaten")
    messages[1]["content"] += (
        "\n<candidates>\n[1] id: DE | name: Germany\n[2] id: US | name: United States\n"
        "</candidates>"
    )
    async with SimServer(SimConfig(policy="oracle", **files)) as sim:
        raw = AsyncOpenAI(base_url=sim.base_url, api_key="sim", max_retries=0, timeout=10.0)
        try:
            client = instructor.from_openai(raw, mode=instructor.Mode.TOOLS)
            choice = await client.chat.completions.create(
                model="any", response_model=EntityChoice, messages=messages, max_retries=0
            )
        finally:
            await raw.close()
    assert choice.entity_id == "US"


async def test_invalid_fault_is_a_validation_error_reasked(files: dict[str, str]) -> None:
    config = SimConfig(policy="oracle", rate_invalid=1.0, **files)
    async with SimServer(config) as sim:
        with pytest.raises(InstructorRetryException):
            await _ask(sim, "Vereinigte Staaten", max_retries=1)
        assert sim.stats()["invalid"] == 2  # the first answer and the re-ask


async def test_rewrite_calls_are_logged_with_tokens(files: dict[str, str]) -> None:
    async with SimServer(SimConfig(policy="oracle", **files)) as sim:
        await _ask(sim, "Vereinigte Staaten")
        (record,) = sim.requests
    assert record.kind == "ok" and record.status == 200
    assert record.prompt_tokens > 0 and record.completion_tokens > 0


def test_a_bad_catalog_file_is_refused(tmp_path: Path, files: dict[str, str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        SimServer(SimConfig(policy="oracle", gold_path=files["gold_path"], catalog_path=str(bad)))


def test_catalog_path_must_be_a_string() -> None:
    with pytest.raises(ConfigError, match="catalog_path"):
        SimConfig(catalog_path=42)  # type: ignore[arg-type]


class ChoiceOrNames(BaseModel):
    entity_id: Literal["DE", "FR", "none"]
    confidence: float = Field(ge=0, le=1)
    reason: str
    names: list[str] = []


async def _adjudicate_with_names(sim: SimServer) -> Any:
    messages = _messages("Vereinigte Staaten")  # gold US is not among the candidates
    messages[1]["content"] += (
        "\n<candidates>\n[1] id: DE | name: Germany\n[2] id: FR | name: France\n</candidates>"
    )
    return await _ask(sim, "Vereinigte Staaten", ChoiceOrNames, messages=messages)


async def test_an_adjudication_asking_for_names_gets_them_with_its_none(
    files: dict[str, str],
) -> None:
    async with SimServer(SimConfig(policy="oracle", **files)) as sim:
        answer = await _adjudicate_with_names(sim)
    assert answer.entity_id == "none"
    assert answer.names and answer.names[0] in FORMS["US"]


async def test_names_with_an_adjudication_share_its_one_error_draw(
    files: dict[str, str],
) -> None:
    # every answer wrong: a wrong candidate (never a none with the right name)
    config = SimConfig(policy="oracle", oracle_error_rate=1.0, seed=3, **files)
    async with SimServer(config) as sim:
        answers = [await _adjudicate_with_names(sim) for _ in range(10)]
    assert {a.entity_id for a in answers} <= {"DE", "FR"}
    assert all(a.names == [] for a in answers)
