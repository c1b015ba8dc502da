"""Deduplication: clusters of confident links, one golden record each by the survivorship rule."""

from __future__ import annotations

import numpy as np
import pytest

from nem_llm.records.dedupe import clusters, golden_records


def test_a_duplicate_of_a_duplicate_is_in_the_same_cluster() -> None:
    ids = clusters(5, [0, 1, 3], [1, 2, 4], [0.999, 0.995, 0.999])
    assert ids.tolist() == [0, 0, 0, 3, 3]


def test_links_below_the_threshold_join_nothing() -> None:
    assert clusters(3, [0, 1], [1, 2], [0.999, 0.5]).tolist() == [0, 0, 2]
    assert clusters(3, [0, 1], [1, 2], [0.999, 0.5], threshold=0.4).tolist() == [0, 0, 0]


def test_long_chains_in_any_order_end_in_one_cluster() -> None:
    rng = np.random.default_rng(0)
    order = rng.permutation(999)
    ids = clusters(1000, order, order + 1, np.ones(999))
    assert set(ids.tolist()) == {0}


def test_misaligned_links_are_refused() -> None:
    with pytest.raises(ValueError, match="same length"):
        clusters(2, [0], [1, 0], [1.0])


def test_the_value_most_members_agree_on_survives_as_written() -> None:
    rows = [{"name": "Ann Lee"}, {"name": "ANN LEE"}, {"name": "Anne Lee"}]
    golden = golden_records(rows, [0, 0, 0])[0]
    assert golden.values == {"name": "Ann Lee"}
    assert golden.members == (0, 1, 2)


def test_a_tied_vote_goes_to_the_most_complete_member() -> None:
    rows = [{"city": "Oslo"}, {"city": "Bergen", "dob": "1970-01-02", "phone": "1"}]
    golden = golden_records(rows, [0, 0])[0]
    assert golden.values == {"city": "Bergen", "dob": "1970-01-02", "phone": "1"}
    assert golden.sources == {"city": 1, "dob": 1, "phone": 1}


def test_a_tie_between_equally_complete_members_goes_to_the_first() -> None:
    rows = [{"city": "Oslo"}, {"city": "Bergen"}]
    assert golden_records(rows, [0, 0])[0].values == {"city": "Oslo"}


def test_missing_values_never_survive_over_present_ones() -> None:
    rows: list[dict[str, str | None]] = [{"email": None}, {"email": ""}, {"email": "a@b.org"}]
    assert golden_records(rows, [0, 0, 0])[0].values == {"email": "a@b.org"}


def test_one_golden_record_per_cluster_in_cluster_order() -> None:
    rows = [{"n": "a"}, {"n": "b"}, {"n": "a"}]
    goldens = golden_records(rows, clusters(3, [0], [2], [1.0]))
    assert [(g.cluster, g.members) for g in goldens] == [(0, (0, 2)), (1, (1,))]
