"""``nem-llm index build``'s job: chunked, resumable encoding, then an atomic save."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nem_llm._jobs.index_build import build_index
from nem_llm._retrieval.index import HybridIndex
from nem_llm.catalog import load_catalog
from nem_llm.testing import FakeEmbedder

ROOT = Path(__file__).parent.parent
CATALOG = ROOT / "tests" / "data" / "cli" / "catalog.jsonl"  # 25 countries
MENTIONS = ROOT / "tests" / "data" / "cli" / "mentions.csv"  # 17 rows


class CrashingEmbedder(FakeEmbedder):
    """Raises KeyboardInterrupt (a Ctrl-C) on its n-th call."""

    def __init__(self, crash_on: int) -> None:
        super().__init__()
        self.crash_on = crash_on

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if self.calls + 1 == self.crash_on:
            self.calls += 1
            raise KeyboardInterrupt
        return super().encode(texts)


def test_built_index_loads_with_its_catalog(
    countries: list[dict[str, Any]], tmp_path: Path
) -> None:
    catalog = load_catalog(countries)
    build_index(catalog, FakeEmbedder(), tmp_path / "idx", chunk_size=4)
    loaded = HybridIndex.load(tmp_path / "idx", catalog)
    [found] = loaded.search(FakeEmbedder().encode(["Germany"]), ["Germany"], 1)
    assert found[0].entity_id == "DE"
    assert not (tmp_path / "idx" / ".chunks").exists()


def test_an_interrupted_build_resumes_at_the_first_missing_chunk(
    countries: list[dict[str, Any]], tmp_path: Path
) -> None:
    catalog = load_catalog(countries)  # 11 forms: chunks of 4, 4, 3
    with pytest.raises(KeyboardInterrupt):
        build_index(catalog, CrashingEmbedder(crash_on=3), tmp_path / "idx", chunk_size=4)
    assert not (tmp_path / "idx" / "manifest.json").exists()
    again = FakeEmbedder()
    build_index(catalog, again, tmp_path / "idx", chunk_size=4)
    assert again.texts_encoded == len(catalog.forms) - 8
    assert HybridIndex.load(tmp_path / "idx", catalog).catalog is catalog


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "nem_llm.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.timeout(400)
def test_match_reuses_an_index_built_by_the_cli(tmp_path: Path) -> None:
    built = _cli("index", "build", "--catalog", str(CATALOG), "--out", "idx", "-q", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    assert "index saved to idx" in built.stderr
    matched = _cli(
        "match", "--catalog", str(CATALOG), "--queries", str(MENTIONS), "--out", "out.jsonl",
        "--index", "idx", "-q", cwd=tmp_path,
    )  # fmt: skip
    assert matched.returncode == 0, matched.stderr
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 17
    assert not (tmp_path / "out.jsonl.state" / "index").exists()  # nothing rebuilt
