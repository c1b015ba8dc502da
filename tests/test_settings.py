"""MatcherSettings: one declaration of every option, and every surface built from it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import typer

from nem_llm import Limits, MatcherSettings
from nem_llm.catalog import CatalogColumns
from nem_llm.cli import app
from nem_llm.cli._settings import FLAGS
from nem_llm.cli.eval_ import EVAL_FLAGS
from nem_llm.cli.match import JOB_FLAGS
from nem_llm.cli.serve import SERVE_FLAGS
from nem_llm.errors import ConfigError
from nem_llm.matcher import Matcher
from nem_llm.testing import FakeEmbedder

HIDDEN = {"index", "llm_mode"}  # deprecated spellings, kept hidden


def _flags(command: str) -> set[str]:
    group = typer.main.get_command(app)
    params = group.commands[command].params  # type: ignore[attr-defined]
    return {p.name for p in params if p.name not in HIDDEN}


def _settings_flags(exclude: set[str] = frozenset()) -> set[str]:  # type: ignore[assignment]
    return {flag for field, flags in FLAGS.items() if field not in exclude for flag in flags}


def test_every_settings_field_has_a_flag_mapping() -> None:
    assert set(FLAGS) == set(MatcherSettings.model_fields)
    limit_flags = set(FLAGS["limits"])
    assert limit_flags == {f.name for f in dataclasses.fields(Limits)}


def test_match_flags_are_the_settings_flags_plus_the_job_flags() -> None:
    flags = _flags("match")
    assert flags - JOB_FLAGS == _settings_flags()
    assert JOB_FLAGS <= flags


def test_eval_flags_are_the_settings_flags_plus_its_own() -> None:
    flags = _flags("eval")
    # eval's --llm is off|env|sim (the simulator is an eval option), not the settings bool
    assert flags - EVAL_FLAGS == _settings_flags({"llm"})
    assert EVAL_FLAGS <= flags


def test_serve_flags_are_the_settings_flags_plus_the_server_flags() -> None:
    flags = _flags("serve")
    assert flags - SERVE_FLAGS == _settings_flags()
    assert SERVE_FLAGS <= flags


def test_settings_round_trip_through_json() -> None:
    s = MatcherSettings(
        top_k=7,
        limits=Limits(concurrency=4, rpm=600),
        columns=CatalogColumns(id="code", alias_separator=";"),
        prompt_attributes=("country", "type"),
        index_dir=Path("idx"),
    )
    assert MatcherSettings.model_validate_json(s.model_dump_json()) == s


def test_the_fingerprint_is_stable_and_covers_options_that_change_answers() -> None:
    base = MatcherSettings()
    assert base.fingerprint() == MatcherSettings().fingerprint()
    for change in (
        {"top_k": 9},
        {"model": "other"},
        {"accept_threshold": 0.9},
        {"prompt_attributes": ("country",)},
        {"rewrite": True},
        {"encoder": "torch"},
        {"limits": Limits(budget_usd=1.0)},
        {"columns": CatalogColumns(name="label")},
    ):
        assert base.replace(**change).fingerprint() != base.fingerprint(), change


def test_the_fingerprint_ignores_speed_and_location() -> None:
    base = MatcherSettings()
    for change in (
        {"index_dir": Path("/tmp/x")},
        {"cache": Path("c.sqlite")},
        {"max_batch_size": 8},
        {"limits": Limits(concurrency=2, rpm=10)},
    ):
        assert base.replace(**change).fingerprint() == base.fingerprint(), change


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"top_k": 0}, "top_k"),
        ({"lexical_weight": 2}, "lexical_weight"),
        ({"encoder": "gpu"}, "encoder"),
        ({"search": "fast"}, "search"),
        ({"target_precision": 0}, "target_precision"),
        ({"accept_threshold": float("nan")}, "accept_threshold"),
        ({"limits": Limits(concurrency=1), "nope": 1}, "nope"),
    ],
)
def test_a_bad_option_is_a_config_error_naming_it(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        MatcherSettings().replace(**options)


def test_a_bad_limit_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match="concurrency"):
        MatcherSettings.of(limits={"concurrency": 0})


def test_the_matcher_takes_settings_or_keywords_alike(countries: list[dict[str, Any]]) -> None:
    a = Matcher(countries, MatcherSettings(top_k=3, rewrite=True), embedder=FakeEmbedder())
    b = Matcher(countries, top_k=3, rewrite=True, embedder=FakeEmbedder())
    c = Matcher(countries, MatcherSettings(top_k=9), top_k=3, rewrite=True, embedder=FakeEmbedder())
    try:
        assert a.settings == b.settings == c.settings
    finally:
        for m in (a, b, c):
            m.close()


RENAMED = [("index", "search", "exact"), ("index_path", "index_dir", Path("idx"))]


@pytest.mark.parametrize(("old", "new", "value"), RENAMED)
def test_old_option_spellings_warn_and_still_work(
    countries: list[dict[str, Any]], old: str, new: str, value: Any
) -> None:
    with pytest.warns(DeprecationWarning, match=f"{new}="):
        m = Matcher(countries, embedder=FakeEmbedder(), **{old: value})
    try:
        assert getattr(m.settings, new) == value
    finally:
        m.close()


def test_an_unknown_matcher_option_is_refused(countries: list[dict[str, Any]]) -> None:
    with pytest.raises(ConfigError, match="topk"):
        Matcher(countries, embedder=FakeEmbedder(), topk=3)
