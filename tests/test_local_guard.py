"""The small-model guard: which local answers stand and which come back as review."""

from __future__ import annotations

import pytest

from nem_llm._llm.local_guard import GuardPolicy, apply_guard, judge, policy_for
from nem_llm.errors import ConfigError
from nem_llm.models import Candidate, MatchResult

POLICY = GuardPolicy(min_confidence=0.5, close=0.05, min_score=0.5, none_below=0.6)


def _cands(*scored: tuple[str, float]) -> list[Candidate]:
    return [Candidate(entity_id=i, name=i.lower(), score=s) for i, s in scored]


def test_the_top_candidate_chosen_confidently_is_accepted() -> None:
    assert judge(_cands(("NL", 0.93), ("CH", 0.61)), "NL", 0.8, POLICY).accept


def test_a_candidate_against_a_clear_retrieval_lead_is_refused() -> None:
    verdict = judge(_cands(("NL", 0.93), ("CH", 0.61)), "CH", 0.99, POLICY)
    assert not verdict.accept
    assert "retrieval lead" in verdict.reason


def test_a_candidate_close_to_the_top_may_be_chosen() -> None:
    assert judge(_cands(("SK", 0.70), ("SI", 0.68)), "SI", 0.9, POLICY).accept


def test_a_weak_candidate_is_not_matched_even_when_it_is_the_top() -> None:
    verdict = judge(_cands(("FI", 0.25), ("GR", 0.25)), "FI", 0.99, POLICY)
    assert not verdict.accept
    assert "weak candidate" in verdict.reason


def test_a_low_confidence_answer_is_refused_even_for_the_top() -> None:
    verdict = judge(_cands(("NL", 0.93), ("CH", 0.61)), "NL", 0.3, POLICY)
    assert not verdict.accept
    assert "unsure" in verdict.reason


def test_none_against_a_strong_top_candidate_is_refused() -> None:
    assert not judge(_cands(("FI", 0.72), ("AT", 0.50)), None, 0.9, POLICY).accept


def test_none_with_a_weak_top_candidate_is_accepted() -> None:
    assert judge(_cands(("FI", 0.41), ("AT", 0.40)), None, 0.9, POLICY).accept


def test_an_id_that_was_not_offered_is_refused() -> None:
    assert not judge(_cands(("NL", 0.93)), "XX", 0.99, POLICY).accept


def test_a_missing_confidence_is_refused() -> None:
    assert not judge(_cands(("NL", 0.93)), "NL", None, POLICY).accept


def test_apply_guard_turns_a_refused_match_into_review_with_the_suggestion() -> None:
    result = MatchResult(
        query="the netherlands",
        status="matched",
        entity_id="CH",
        entity_name="ch",
        score=0.61,
        decided_by="llm",
        confidence=0.9,
        candidates=_cands(("NL", 0.93), ("CH", 0.61)),
    )
    guarded = apply_guard(result, POLICY)
    assert guarded.status == "review"
    assert guarded.entity_id is None
    assert guarded.confidence == 0.9
    assert "suggested CH" in guarded.reason
    assert guarded.score == 0.93


def test_apply_guard_leaves_routed_results_alone() -> None:
    result = MatchResult(
        query="USA",
        status="matched",
        entity_id="US",
        score=0.99,
        decided_by="embedding",
        candidates=_cands(("US", 0.99)),
    )
    assert apply_guard(result, POLICY) is result


def test_only_local_model_names_get_a_policy() -> None:
    assert policy_for("local/smollm2-135m") is not None
    assert policy_for("gpt-4o-mini") is None


@pytest.mark.parametrize("field", ["min_confidence", "close", "min_score", "none_below"])
def test_a_policy_value_outside_0_1_is_a_config_error(field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        GuardPolicy(**{field: 1.5})
