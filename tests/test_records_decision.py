"""Decisions per query: the most probable outcome, taken only when the route stays precise."""

from __future__ import annotations

import numpy as np
import pytest

from nem_llm.records.decision import cut_for_precision, decide, expected_precision_cut
from nem_llm.records.model import Posteriors


def _posteriors(rows: list[list[float]]) -> tuple[Posteriors, np.ndarray, np.ndarray]:
    """Per query, its candidates' posteriors (none = 1 - their sum); entity j is position j."""
    qi, ei, pair = [], [], []
    for q, row in enumerate(rows):
        for e, p in enumerate(row):
            qi.append(q)
            ei.append(e)
            pair.append(p)
    none = np.array([1.0 - sum(row) for row in rows])
    return Posteriors(np.array(pair), none, len(rows)), np.array(qi), np.array(ei)


def test_a_clear_candidate_is_matched_a_clear_none_novel_and_a_split_undecided() -> None:
    post, qi, ei = _posteriors([[0.999, 0.001], [0.0005, 0.0005], [0.5, 0.49]])
    decided = decide(post, qi, ei)
    assert decided.status == ("matched", "novel", "undecided")
    assert decided.entity.tolist() == [0, -1, -1]
    assert decided.best_entity.tolist() == [0, 0, 0]


def test_a_query_without_candidates_is_novel() -> None:
    post = Posteriors(np.zeros(0), np.ones(1), 1)
    assert decide(post, [], []).status == ("novel",)


def test_a_route_takes_its_least_certain_decisions_only_while_it_stays_precise() -> None:
    # nine sure matches and one at 0.9: the mean is 0.99, all ten are taken;
    # a second 0.9 would bring the mean under 0.99: neither 0.9 is taken
    post, qi, ei = _posteriors([[1.0]] * 9 + [[0.9]])
    assert decide(post, qi, ei).status.count("matched") == 10
    post, qi, ei = _posteriors([[1.0]] * 9 + [[0.9], [0.9]])
    assert decide(post, qi, ei).status.count("matched") == 9


def test_a_guess_never_rides_on_a_sure_route() -> None:
    post, qi, ei = _posteriors([[1.0]] * 500 + [[0.6]])
    assert decide(post, qi, ei).status[-1] == "undecided"
    assert decide(post, qi, ei, min_probability=0.5).status[-1] == "matched"


def test_without_a_target_every_outcome_above_the_floor_is_taken() -> None:
    post, qi, ei = _posteriors([[0.7], [0.7]])
    assert decide(post, qi, ei, target_precision=None).status == ("matched", "matched")


def test_cuts_below_one_half_or_targets_outside_the_unit_interval_are_refused() -> None:
    post, qi, ei = _posteriors([[1.0]])
    with pytest.raises(ValueError, match="min_probability"):
        decide(post, qi, ei, min_probability=0.4)
    with pytest.raises(ValueError, match="target_precision"):
        decide(post, qi, ei, target_precision=1.5)


def test_expected_precision_cut_is_the_last_probability_keeping_the_mean() -> None:
    assert expected_precision_cut(np.array([1.0, 1.0, 0.98, 0.6]), 0.99) == 0.98
    assert expected_precision_cut(np.array([0.5]), 0.99) > 1.0


def test_labelled_cut_counts_one_unseen_error() -> None:
    # 99 right at 0.95: precision 99/100 = 0.99 with the unseen error
    assert cut_for_precision([0.95] * 99, [True] * 99) == 0.95
    assert cut_for_precision([0.95] * 98, [True] * 98) is None


def test_labelled_cut_stops_before_the_errors() -> None:
    confidence = [0.99] * 200 + [0.7] * 10
    correct = [True] * 200 + [False] * 10
    assert cut_for_precision(confidence, correct) == 0.99


def test_a_pair_held_for_review_leaves_its_query_undecided() -> None:
    post, qi, ei = _posteriors([[1.0], [1.0]])
    decided = decide(post, qi, ei, review=[False, True])
    assert decided.status == ("matched", "undecided")


def test_the_novel_route_has_its_own_target() -> None:
    # ten sure "none" and one at 0.8: mean 0.98, under 0.99 but over 0.95
    post, qi, ei = _posteriors([[0.0]] * 10 + [[0.2]])
    assert decide(post, qi, ei, novel_target_precision=0.99).status[-1] == "undecided"
    assert decide(post, qi, ei, novel_target_precision=0.95).status[-1] == "novel"
