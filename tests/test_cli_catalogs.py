"""``nem-llm match`` with catalogs as users have them: mapped columns, per-row filters
(``--where``), attributes in the prompt; run as a user runs it (a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CATALOG = """code,label,alt,country,type
AD-CAN,Canillo,,AD,parish
FR-CAN,Canillo,,FR,commune
FR-PAR,Paris,Lutece|Lutetia,FR,commune
US-PAR,Paris,,US,city
"""
QUERIES = """id,text,cc
q1,Canillo,AD
q2,Canillo,FR
q3,Paris,US
q4,Lutetia,
"""


def _run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "places.csv").write_text(CATALOG, encoding="utf-8")
    (tmp_path / "mentions.csv").write_text(QUERIES, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    args = [
        "match", "--catalog", "places.csv", "--queries", "mentions.csv", "--out", "out.jsonl",
        "--query-column", "text", "--id-column", "id", "--catalog-columns",
        "id=code,name=label,aliases=alt", "--quiet", *extra,
    ]  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "nem_llm.cli", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_where_filters_each_row_by_its_own_column(tmp_path: Path) -> None:
    run = _run(tmp_path, "--where", "country=cc", "--accept-threshold", "0.5")
    assert run.returncode == 0, run.stderr
    lines = (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()
    rows = {r["id"]: r for r in map(json.loads, lines)}
    assert [c["entity_id"] for c in rows["q1"]["candidates"]] == ["AD-CAN"]
    assert {c["entity_id"] for c in rows["q2"]["candidates"]} == {"FR-CAN", "FR-PAR"}
    assert {c["entity_id"] for c in rows["q3"]["candidates"]} == {"US-PAR"}
    assert len(rows["q4"]["candidates"]) == 4  # empty value: no filter
    assert rows["q1"]["entity_id"] == "AD-CAN" and rows["q2"]["entity_id"] == "FR-CAN"
    assert rows["q3"]["entity_id"] == "US-PAR"
    assert rows["q4"]["entity_id"] == "FR-PAR"  # a mapped alias column: "Lutetia"


def test_where_on_an_attribute_no_entity_has_is_one_clear_error(tmp_path: Path) -> None:
    run = _run(tmp_path, "--where", "region=cc")
    assert run.returncode == 2
    assert "no entity in places.csv has the attribute 'region'" in run.stderr
    assert "Traceback" not in run.stderr


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--where", "country"], "use ATTRIBUTE=COLUMN"),
        (["--prompt-attributes", "colour"], "no entity has"),
    ],
)
def test_bad_catalog_options_are_one_line_errors(
    tmp_path: Path, extra: list[str], message: str
) -> None:
    run = _run(tmp_path, *extra)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr
