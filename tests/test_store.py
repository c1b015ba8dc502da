"""Tests for the SQLite stores: decision cache (llm.cache), run checkpoints (jobs.checkpoint)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from nem_llm._jobs import checkpoint as checkpoint_module
from nem_llm._jobs.checkpoint import DoneIndexes, RunStore
from nem_llm._llm.cache import CachedDecision, DecisionCache, decision_key
from nem_llm._sqlite import SCHEMA_VERSION, StoreError
from nem_llm.errors import InputError, NemLLMError
from nem_llm.models import Usage

KEY_PARTS = ("usa", ["US", "UM"], "gpt-4o-mini", "v1")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


def _decision(entity_id: str | None = "US", **overrides: object) -> CachedDecision:
    fields: dict[str, object] = {
        "entity_id": entity_id,
        "confidence": 0.9,
        "reason": "USA is the usual short form of United States",
        "usage": Usage(prompt_tokens=120, completion_tokens=15, total_tokens=135, cost_usd=2e-5),
        "model": "gpt-4o-mini",
        "created_at": 1_700_000_000.0,
    }
    fields.update(overrides)
    return CachedDecision.model_validate(fields)


# -- decision_key ------------------------------------------------------------------------


def test_decision_key_is_a_stable_sha256_hex() -> None:
    key = decision_key(*KEY_PARTS)
    assert key == decision_key("usa", ("US", "UM"), "gpt-4o-mini", "v1")
    # pinned: changing the encoding would silently orphan every existing cache file
    assert key == "697d28410abf67754b84c448e29f77bc2249f4bf25c19db4068a11348f5b0019"


@pytest.mark.parametrize(
    "changed",
    [
        ("USA", ["US", "UM"], "gpt-4o-mini", "v1"),
        ("usa", ["US"], "gpt-4o-mini", "v1"),
        ("usa", ["US", "UM", "AS"], "gpt-4o-mini", "v1"),
        ("usa", ["US", "UM"], "gpt-4o", "v1"),
        ("usa", ["US", "UM"], "gpt-4o-mini", "v2"),
    ],
    ids=["query", "fewer-candidates", "more-candidates", "model", "prompt-version"],
)
def test_decision_key_changes_with_each_part(changed: tuple[str, list[str], str, str]) -> None:
    assert decision_key(*changed) != decision_key(*KEY_PARTS)


def test_decision_key_depends_on_candidate_order() -> None:
    assert decision_key("usa", ["UM", "US"], "m", "v1") != decision_key(
        "usa", ["US", "UM"], "m", "v1"
    )


def test_decision_key_encoding_is_unambiguous_across_part_boundaries() -> None:
    keys = {
        decision_key("a", ["b", "c"], "m", "v"),
        decision_key("a", ["b,c"], "m", "v"),
        decision_key('a","b', ["c"], "m", "v"),
        decision_key("a", ["b", "c", "m"], "", "v"),
        decision_key("a", [], "m", "v"),
        decision_key("a", [""], "m", "v"),
    }
    assert len(keys) == 6


def test_decision_key_rejects_a_string_as_candidate_ids() -> None:
    with pytest.raises(InputError, match="candidate_ids"):
        decision_key("usa", "US", "m", "v1")


# -- DecisionCache -------------------------------------------------------------------------


def test_cache_miss_returns_none() -> None:
    with DecisionCache(":memory:") as cache:
        assert cache.get(decision_key(*KEY_PARTS)) is None
        assert len(cache) == 0


def test_cache_round_trip_survives_reopen(db_path: Path) -> None:
    key = decision_key(*KEY_PARTS)
    novel_key = decision_key("atlantis", ["US"], "gpt-4o-mini", "v1")
    with DecisionCache(db_path) as cache:
        cache.put(key, _decision())
        cache.put(novel_key, _decision(None, confidence=None, reason="not in the catalog"))
    with DecisionCache(str(db_path)) as cache:
        assert cache.get(key) == _decision()
        assert cache.get(novel_key) == _decision(None, confidence=None, reason="not in the catalog")
        assert len(cache) == 2
        assert key in cache


def test_cache_put_replaces_an_existing_entry() -> None:
    key = decision_key(*KEY_PARTS)
    with DecisionCache(":memory:") as cache:
        cache.put(key, _decision("US"))
        cache.put(key, _decision("UM"))
        got = cache.get(key)
        assert got is not None and got.entity_id == "UM"
        assert len(cache) == 1


async def test_cache_aget_and_aput_work_from_asyncio(db_path: Path) -> None:
    key = decision_key(*KEY_PARTS)
    with DecisionCache(db_path) as cache:
        assert await cache.get_async(key) is None
        await cache.put_async(key, _decision())
        assert await cache.get_async(key) == _decision()


async def test_cache_aput_from_many_concurrent_tasks_keeps_every_entry(db_path: Path) -> None:
    keys = [decision_key(f"q{i}", ["A", "B"], "m", "v1") for i in range(300)]
    with DecisionCache(db_path) as cache:

        async def put_then_get(i: int) -> CachedDecision | None:
            await cache.put_async(keys[i], _decision(f"E{i}"))
            return await cache.get_async(keys[i])

        got = await asyncio.gather(*(put_then_get(i) for i in range(len(keys))))
        assert [d.entity_id if d else None for d in got] == [f"E{i}" for i in range(len(keys))]
        assert len(cache) == len(keys)


async def test_cache_async_calls_do_not_block_the_event_loop(db_path: Path) -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    with DecisionCache(db_path) as cache:
        task = asyncio.create_task(ticker())
        for i in range(50):
            await cache.put_async(decision_key(f"q{i}", [], "m", "v"), _decision())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # the loop kept running other tasks while the writes happened on the worker thread
    assert ticks >= 50


# -- RunStore: rows ------------------------------------------------------------------------


def test_record_is_idempotent_per_index() -> None:
    with RunStore(":memory:") as runs:
        runs.open_run("run", {})
        assert runs.record("run", 3, '{"v": "first"}') is True
        assert runs.record("run", 3, '{"v": "second"}') is False
        assert list(runs.iter_rows("run")) == [(3, '{"v": "first"}')]
        assert runs.count("run") == 1


def test_record_many_stores_new_rows_and_skips_known_indexes() -> None:
    with RunStore(":memory:") as runs:
        runs.open_run("run", {})
        runs.record("run", 1, "old")
        stored = runs.record_many("run", [(0, "a"), (1, "b"), (2, "c"), (2, "dup")])
        assert stored == 2
        assert list(runs.iter_rows("run")) == [(0, "a"), (1, "old"), (2, "c")]


def test_record_many_is_all_or_nothing_on_bad_input() -> None:
    with RunStore(":memory:") as runs:
        runs.open_run("run", {})
        with pytest.raises(InputError, match="row"):
            runs.record_many("run", [(0, "a"), (1, b"not text")])  # type: ignore[list-item]
        assert runs.count("run") == 0


def test_runs_are_kept_apart() -> None:
    with RunStore(":memory:") as runs:
        runs.open_run("a", {})
        runs.open_run("b", {})
        runs.record("a", 0, "a0")
        runs.record("b", 0, "b0")
        assert list(runs.iter_rows("a")) == [(0, "a0")]
        assert list(runs.iter_rows("b", "completion")) == [(0, "b0")]


def test_done_indexes_survive_reopen(db_path: Path) -> None:
    with RunStore(db_path) as runs:
        runs.open_run("run", {"model": "m"})
        for i in (0, 1, 2, 5, 8):
            runs.record("run", i, json.dumps({"index": i}))
    with RunStore(db_path) as runs:
        runs.open_run("run", {"model": "m"})
        done = runs.done_indexes("run")
        assert set(done) == {0, 1, 2, 5, 8}
        assert runs.count("run") == 5


def test_done_indexes_is_a_compact_set_with_fast_membership() -> None:
    dense = DoneIndexes(range(0, 10_000, 2))
    sparse = DoneIndexes(np.array([7, 3, 10**15, 3]))
    for done in (dense, sparse):
        assert done.array.dtype == np.int64
        assert not done.array.flags.writeable
    assert 4 in dense and 5 not in dense and 10_000 not in dense and -2 not in dense
    assert "4" not in dense and None not in dense  # type: ignore[comparison-overlap]
    assert np.int64(6) in dense
    assert list(sparse) == [3, 7, 10**15] and 10**15 in sparse and 8 not in sparse
    assert sparse == {3, 7, 10**15}  # type: ignore[comparison-overlap]  # Set semantics
    assert dense.missing(6).tolist() == [1, 3, 5]
    assert len(dense & {0, 1, 2}) == 2


def test_iter_rows_orders_by_input_index_or_by_completion() -> None:
    with RunStore(":memory:") as runs:
        runs.open_run("run", {})
        for i in (5, 2, 9, 0):
            runs.record("run", i, f"row{i}")
        assert list(runs.iter_rows("run", "input")) == [
            (0, "row0"),
            (2, "row2"),
            (5, "row5"),
            (9, "row9"),
        ]
        assert [i for i, _ in runs.iter_rows("run", "completion")] == [5, 2, 9, 0]


def test_iter_rows_pages_through_many_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoint_module, "_PAGE_SIZE", 7)
    order = list(range(100))
    random.Random(0).shuffle(order)
    with RunStore(":memory:") as runs:
        runs.open_run("run", {})
        runs.record_many("run", ((i, str(i)) for i in order))
        assert [i for i, _ in runs.iter_rows("run", "input")] == list(range(100))
        assert [i for i, _ in runs.iter_rows("run", "completion")] == order


def test_iter_rows_rejects_an_unknown_order() -> None:
    with RunStore(":memory:") as runs:
        runs.open_run("run", {})
        with pytest.raises(InputError, match="completion"):
            runs.iter_rows("run", "random")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("index", "row"), [(-1, "x"), (True, "x"), (1.0, "x"), ("1", "x"), (1, None), (1, 5)]
)
def test_record_rejects_bad_index_or_row(index: object, row: object) -> None:
    with RunStore(":memory:") as runs:
        runs.open_run("run", {})
        with pytest.raises(InputError):
            runs.record("run", index, row)  # type: ignore[arg-type]


def test_record_into_a_run_that_was_never_opened_raises() -> None:
    with RunStore(":memory:") as runs, pytest.raises(StoreError, match="open_run"):
        runs.record("nope", 0, "x")


# -- RunStore: runs ------------------------------------------------------------------------


def test_open_run_reuses_a_run_with_equal_meta(db_path: Path) -> None:
    with RunStore(db_path) as runs:
        runs.open_run("run", {"model": "m", "k": 10, "inputs": ["a.csv"]})
        runs.record("run", 0, "x")
    with RunStore(db_path) as runs:
        assert runs.has_run("run")
        runs.open_run("run", {"inputs": ("a.csv",), "k": 10.0, "model": "m"})
        assert runs.count("run") == 1


def test_open_run_with_different_meta_raises_naming_the_differences(db_path: Path) -> None:
    with RunStore(db_path) as runs:
        runs.open_run("run", {"model": "gpt-4o-mini", "k": 10})
        with pytest.raises(StoreError, match="different settings") as info:
            runs.open_run("run", {"model": "gpt-4o", "k": 10, "budget": 5})
    message = str(info.value)
    assert "model: stored 'gpt-4o-mini', given 'gpt-4o'" in message
    assert "budget: stored <absent>, given 5" in message
    assert str(db_path) in message


def test_open_run_rejects_meta_that_is_not_json() -> None:
    with RunStore(":memory:") as runs, pytest.raises(InputError, match="meta"):
        runs.open_run("run", {"when": object()})


def test_mark_complete_is_remembered(db_path: Path) -> None:
    with RunStore(db_path) as runs:
        runs.open_run("run", {})
        assert runs.is_complete("run") is False
        runs.mark_complete("run")
    with RunStore(db_path) as runs:
        assert runs.is_complete("run") is True


async def test_async_run_methods_match_their_sync_twins(db_path: Path) -> None:
    with RunStore(db_path) as runs:
        await runs.open_run_async("run", {"n": 1})
        results = await asyncio.gather(
            *(runs.record_async("run", i % 50, str(i)) for i in range(100))
        )
        assert sum(results) == 50
        assert await runs.record_many_async("run", [(49, "dup"), (50, "new")]) == 1
        assert set(await runs.done_indexes_async("run")) == set(range(51))
        await runs.mark_complete_async("run")
        assert runs.is_complete("run")


def test_cache_and_run_store_share_one_file(db_path: Path) -> None:
    key = decision_key(*KEY_PARTS)
    with DecisionCache(db_path) as cache, RunStore(db_path) as runs:
        runs.open_run("run", {})
        cache.put(key, _decision())
        runs.record("run", 0, "x")
    with DecisionCache(db_path) as cache, RunStore(db_path) as runs:
        assert cache.get(key) == _decision()
        assert set(runs.done_indexes("run")) == {0}


# -- durability ----------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, sys
    from nem_llm._jobs.checkpoint import RunStore

    runs = RunStore(sys.argv[1])
    runs.open_run("run", {"n": 1})
    i = 0
    while True:
        runs.record("run", i, json.dumps({"index": i}))
        print(i, flush=True)
        i += 1
    """
)


@pytest.mark.timeout(60)
def test_sigkill_mid_run_keeps_every_record_that_returned(db_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(db_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdout is not None and child.stderr is not None
        printed: list[int] = []
        while len(printed) < 300:
            line = child.stdout.readline()
            if not line:
                pytest.fail(f"child exited early: {child.stderr.read()}")
            printed.append(int(line))
        os.kill(child.pid, signal.SIGKILL)  # mid-stream: it is recording as fast as it can
        rest = child.stdout.read()
        child.stderr.read()
        assert child.wait() == -signal.SIGKILL
    printed += [int(line) for line in rest.splitlines(keepends=True) if line.endswith("\n")]

    with RunStore(db_path) as runs:
        done = runs.done_indexes("run")
        rows = dict(runs.iter_rows("run"))
    assert set(printed) <= done
    # at most one more: committed, then killed before it could print
    assert set(done) == set(range(len(done))) and len(done) - len(printed) in (0, 1)
    assert all(json.loads(rows[i]) == {"index": i} for i in printed)


# -- errors --------------------------------------------------------------------------------


def test_path_in_a_missing_directory_raises_store_error(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "dir" / "store.db"
    with pytest.raises(StoreError, match="does not exist") as info:
        RunStore(path)
    assert str(path.parent) in str(info.value)


def test_file_that_is_not_a_database_raises_store_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("these are my notes, not a database\n" * 100)
    with pytest.raises(StoreError, match="not a SQLite database") as info:
        DecisionCache(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, NemLLMError)


def test_foreign_sqlite_database_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.close()
    with pytest.raises(StoreError, match="not a nem_llm store"):
        RunStore(path)


def test_database_from_a_newer_schema_version_is_refused(db_path: Path) -> None:
    RunStore(db_path).close()
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.close()
    with pytest.raises(StoreError, match="newer nem_llm"):
        DecisionCache(db_path)


def test_write_while_another_connection_holds_the_lock_fails_fast_and_clearly(
    db_path: Path,
) -> None:
    with RunStore(db_path, timeout=0.2) as runs:
        runs.open_run("run", {})
        other = sqlite3.connect(db_path, isolation_level=None)
        try:
            other.execute("BEGIN EXCLUSIVE")
            started = time.monotonic()
            with pytest.raises(StoreError, match="database is locked") as info:
                runs.record("run", 0, "x")
            assert time.monotonic() - started < 5
            assert str(db_path) in str(info.value)
            other.execute("ROLLBACK")
            assert runs.record("run", 0, "x") is True
        finally:
            other.close()


def test_closed_store_raises_store_error() -> None:
    cache = DecisionCache(":memory:")
    cache.close()
    cache.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        cache.get(decision_key(*KEY_PARTS))
