"""DataFrames round trips: integrations.frames.match_frame(_async) on pandas, polars, pyarrow."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from nem_llm import ConfigError, Matcher
from nem_llm.integrations.frames import RESULT_COLUMNS, match_frame, match_frame_async
from nem_llm.testing import FakeEmbedder, FakeLLM

pd = pytest.importorskip("pandas", reason="needs the frames extra")
pl = pytest.importorskip("polars", reason="needs the frames extra")
pa = pytest.importorskip("pyarrow", reason="needs the frames extra")

pytestmark = pytest.mark.timeout(60)

QUERIES = ["USA", "Deutschland", None, "Atlantis", "Great Britain"]
EXPECTED_IDS = ["US", "DE", None, None, "UK"]


def make_frame(kind: str, data: dict[str, list[Any]]) -> Any:
    if kind == "pandas":
        return pd.DataFrame(data, index=[10 * i for i in range(len(next(iter(data.values()))))])
    if kind == "polars":
        return pl.DataFrame(data)
    return pa.table(data)


def to_rows(frame: Any) -> list[dict[str, Any]]:
    if isinstance(frame, pd.DataFrame):
        return [
            {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
            for row in frame.to_dict("records")
        ]
    if isinstance(frame, pl.DataFrame):
        return frame.to_dicts()
    return frame.to_pylist()


@pytest.fixture
async def matcher(countries: list[dict[str, Any]]) -> Any:
    m = Matcher(countries, embedder=FakeEmbedder(), llm=False)
    await m.fit_async()
    yield m
    await m.aclose()


KINDS = ["pandas", "polars", "arrow"]


@pytest.mark.parametrize("kind", KINDS)
async def test_match_frame_adds_the_result_columns_row_for_row(matcher: Matcher, kind: str) -> None:
    frame = make_frame(kind, {"name": QUERIES, "row": list(range(5))})
    out = await match_frame_async(matcher, frame)
    assert type(out) is type(frame)
    rows = to_rows(out)
    assert [r["row"] for r in rows] == list(range(5))
    assert [r["entity_id"] for r in rows] == EXPECTED_IDS
    statuses = [r["status"] for r in rows]
    assert statuses[:3] + statuses[4:] == ["matched", "matched", "error", "matched"]
    assert statuses[3] in ("novel", "review")  # "Atlantis": not in the catalog
    assert list(rows[0]) == ["name", "row", *RESULT_COLUMNS]


@pytest.mark.parametrize("kind", KINDS)
async def test_match_frame_scores_are_null_only_where_there_is_no_score(
    matcher: Matcher, kind: str
) -> None:
    rows = to_rows(await match_frame_async(matcher, make_frame(kind, {"name": QUERIES})))
    assert [r["score"] is None for r in rows] == [False, False, True, False, False]
    assert rows[0]["score"] == pytest.approx(1.0)
    assert all(r["cost"] == 0.0 for r in rows)


@pytest.mark.parametrize("kind", KINDS)
async def test_match_frame_leaves_the_input_frame_unchanged(matcher: Matcher, kind: str) -> None:
    frame = make_frame(kind, {"name": QUERIES})
    await match_frame_async(matcher, frame)
    assert list(to_rows(frame)[0]) == ["name"]


def test_match_frame_keeps_the_pandas_index(countries: list[dict[str, Any]]) -> None:
    with Matcher(countries, embedder=FakeEmbedder(), llm=False) as m:
        m.fit()
        out = match_frame(m, pd.DataFrame({"q": ["USA", "France"]}, index=["a", "b"]), column="q")
    assert list(out.index) == ["a", "b"]
    assert out.loc["b", "entity_id"] == "FR"


@pytest.mark.parametrize("kind", KINDS)
async def test_match_frame_candidates_column_only_when_asked(matcher: Matcher, kind: str) -> None:
    frame = make_frame(kind, {"name": ["USA", "France"]})
    rows = to_rows(await match_frame_async(matcher, frame, candidates=True, top_k=2))
    assert rows[0]["candidates"][0]["entity_id"] == "US"
    assert len(rows[1]["candidates"]) == 2
    assert "candidates" not in to_rows(await match_frame_async(matcher, frame))[0]


@pytest.mark.parametrize("kind", KINDS)
async def test_match_frame_prefix_avoids_a_clash(matcher: Matcher, kind: str) -> None:
    frame = make_frame(kind, {"name": ["USA"], "status": ["raw"]})
    with pytest.raises(ConfigError, match="prefix="):
        await match_frame_async(matcher, frame)
    rows = to_rows(await match_frame_async(matcher, frame, prefix="match_"))
    assert (rows[0]["status"], rows[0]["match_status"]) == ("raw", "matched")


async def test_match_frame_names_a_missing_column(matcher: Matcher) -> None:
    with pytest.raises(ConfigError, match="'text' is not in the frame"):
        await match_frame_async(matcher, pd.DataFrame({"name": ["USA"]}), column="text")


async def test_match_frame_rejects_what_is_not_a_frame(matcher: Matcher) -> None:
    with pytest.raises(ConfigError, match="pandas or polars DataFrame or a pyarrow Table"):
        await match_frame_async(matcher, [{"name": "USA"}])


async def test_match_frame_carries_the_llm_cost(countries: list[dict[str, Any]]) -> None:
    http = httpx.AsyncClient(transport=httpx.MockTransport(FakeLLM()))
    client = openai.AsyncOpenAI(api_key="t", base_url="http://fake/v1", http_client=http)
    m = Matcher(countries, embedder=FakeEmbedder(), client=client, accept_threshold=1.01)
    await m.fit_async()
    try:
        out = await match_frame_async(m, pl.DataFrame({"name": ["Germani"]}))
    finally:
        await m.aclose()
    row = out.to_dicts()[0]
    assert (row["decided_by"], row["entity_id"]) == ("llm", "DE")
    assert row["cost"] > 0


@pytest.mark.parametrize("kind", KINDS)
async def test_match_frame_where_columns_filter_each_row(kind: str) -> None:
    entities = [
        {"id": "PAR-FR", "name": "Paris", "attributes": {"country": "FR"}},
        {"id": "PAR-US", "name": "Paris", "attributes": {"country": "US"}},
    ]
    async with Matcher(entities, embedder=FakeEmbedder(), llm=False) as m:
        await m.fit_async()
        frame = make_frame(kind, {"name": ["Paris", "Paris"], "cc": ["US", "FR"]})
        out = await match_frame_async(m, frame, where_columns={"country": "cc"}, candidates=True)
    rows = to_rows(out)
    assert [[c["entity_id"] for c in r["candidates"]] for r in rows] == [["PAR-US"], ["PAR-FR"]]
