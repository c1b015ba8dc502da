"""The public surface of ``nem_llm``: one place, a sorted ``__all__``, pinned here."""

from __future__ import annotations

import importlib.metadata

import nem_llm

EXPORTED = [
    "AdjudicationError",
    "Attempt",
    "BudgetExceededError",
    "Calibration",
    "Candidate",
    "CatalogColumns",
    "CatalogError",
    "ConfigError",
    "Diagnosis",
    "Entity",
    "Explanation",
    "InputError",
    "LLMError",
    "Limits",
    "MatchResult",
    "Matcher",
    "MatcherSettings",
    "NemLLMError",
    "NotReadyError",
    "QueryError",
    "RouteEstimate",
    "RunStats",
    "Thresholds",
    "Usage",
    "__version__",
]

REQUIRED = {
    "Matcher",
    "Entity",
    "MatchResult",
    "Limits",
    "Candidate",
    "RunStats",
    "NemLLMError",
    "CatalogError",
    "QueryError",
    "NotReadyError",
}


def test_all_is_pinned() -> None:
    assert nem_llm.__all__ == EXPORTED


def test_all_is_sorted() -> None:
    assert nem_llm.__all__ == sorted(nem_llm.__all__)


def test_the_issue_names_are_exported() -> None:
    assert set(nem_llm.__all__) >= REQUIRED


def test_the_quickstart_import_works() -> None:
    from nem_llm import Entity, Matcher, MatchResult
    from nem_llm.matcher import Matcher as DefinedMatcher

    assert Matcher is DefinedMatcher
    assert Entity.__name__ == "Entity" and MatchResult.__name__ == "MatchResult"


def test_every_exported_name_exists_and_is_defined_inside_the_package() -> None:
    for name in nem_llm.__all__:
        member = getattr(nem_llm, name)
        if name != "__version__":
            assert member.__module__.startswith("nem_llm."), name


def test_version_matches_the_installed_distribution() -> None:
    assert nem_llm.__version__ == importlib.metadata.version("nem_llm")
