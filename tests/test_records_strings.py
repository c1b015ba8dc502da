"""Vectorised string similarities: they agree with the textbook definitions, pair by pair."""

from __future__ import annotations

import random

import numpy as np
import pytest

from nem_llm.records.strings import (
    codepoints,
    edit_distance,
    jaro_winkler,
    matrix_overlap,
    set_jaccard,
    set_overlap,
    token_matrix,
    token_sets,
    trigram_matrix,
)


def _jaro_winkler_reference(a: str, b: str) -> float:
    """Jaro-Winkler one pair at a time, as Winkler (1990) defines it."""
    if not a and not b:
        return 1.0
    window = max(max(len(a), len(b)) // 2 - 1, 0)
    used_b = [False] * len(b)
    matched_a: list[str] = []
    for i, ch in enumerate(a):
        for j in range(max(0, i - window), min(len(b), i + window + 1)):
            if not used_b[j] and b[j] == ch:
                used_b[j] = True
                matched_a.append(ch)
                break
    m = len(matched_a)
    if m == 0:
        return 0.0
    matched_b = [ch for j, ch in enumerate(b) if used_b[j]]
    t = sum(x != y for x, y in zip(matched_a, matched_b, strict=True)) / 2
    jaro = (m / len(a) + m / len(b) + (m - t) / m) / 3
    prefix = 0
    for x, y in zip(a[:4], b[:4], strict=False):
        if x != y:
            break
        prefix += 1
    return jaro + prefix * 0.1 * (1 - jaro) if jaro > 0.7 else jaro


def _osa_reference(a: str, b: str) -> int:
    """Optimal string alignment distance one pair at a time."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(len(a) + 1):
        d[i][0] = i
    for j in range(len(b) + 1):
        d[0][j] = j
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def _random_pairs(n: int, alphabet: str, longest: int, seed: int) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    left = ["".join(rng.choices(alphabet, k=rng.randint(0, longest))) for _ in range(n)]
    right = []
    for word in left:
        if rng.random() < 0.5 and word:  # a typo of it
            k = rng.randrange(len(word))
            word = word[:k] + rng.choice(alphabet) + word[k + 1 :]
        else:
            word = "".join(rng.choices(alphabet, k=rng.randint(0, longest)))
        right.append(word)
    return left, right


def test_jaro_winkler_of_the_textbook_examples() -> None:
    got = jaro_winkler(["martha", "dwayne", "dixon"], ["marhta", "duane", "dicksonx"])
    assert got.round(3).tolist() == [0.961, 0.84, 0.813]


def test_jaro_winkler_agrees_with_the_definition_on_random_pairs_of_every_length() -> None:
    left, right = _random_pairs(600, "abcde", 30, seed=1)
    expected = [_jaro_winkler_reference(a, b) for a, b in zip(left, right, strict=True)]
    assert np.allclose(jaro_winkler(left, right), expected)


def test_jaro_winkler_of_equal_strings_is_one_and_of_disjoint_ones_zero() -> None:
    assert jaro_winkler(["anna", ""], ["anna", ""]).tolist() == [1.0, 1.0]
    assert jaro_winkler(["abc"], ["xyz"]).tolist() == [0.0]


def test_jaro_winkler_compares_other_scripts_by_code_point() -> None:
    assert jaro_winkler(["Ελλάδα"], ["Ελλάδα"]).tolist() == [1.0]
    assert 0.8 < jaro_winkler(["Москва"], ["Москве"])[0] < 1.0


def test_edit_distance_counts_a_swap_of_neighbours_as_one_edit() -> None:
    assert edit_distance(["19651013", "4223"], ["19651031", "4232"]).tolist() == [1, 1]


def test_edit_distance_agrees_with_the_definition_and_stops_at_the_cap() -> None:
    left, right = _random_pairs(400, "0123", 9, seed=2)
    expected = [min(_osa_reference(a, b), 3) for a, b in zip(left, right, strict=True)]
    assert edit_distance(left, right, cap=3).tolist() == expected


def test_edit_distance_of_long_values_agrees_with_the_definition() -> None:
    left, right = _random_pairs(300, "0123", 20, seed=3)
    expected = [min(_osa_reference(a, b), 2) for a, b in zip(left, right, strict=True)]
    assert edit_distance(left, right, cap=2).tolist() == expected


def test_pairs_of_unequal_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="same length"):
        jaro_winkler(["a"], [])
    with pytest.raises(ValueError, match="same length"):
        edit_distance(["a", "b"], ["a"])


def test_codepoints_pads_with_zero_and_cuts_at_the_width() -> None:
    codes, lengths = codepoints(["ab", "abcdef"], width=4)
    assert codes.tolist() == [[97, 98, 0, 0], [97, 98, 99, 100]]
    assert lengths.tolist() == [2, 4]


def test_trigrams_of_words_padded_so_split_and_joined_words_share_most() -> None:
    joined, split = token_sets(["pinehill", "pine hill"], grams=3)
    assert " pi" in joined and "ll " in joined
    assert len(joined & split) / len(joined | split) > 0.5


def test_set_overlap_and_jaccard_of_indexed_pairs() -> None:
    sets = [frozenset({"a", "b", "c"}), frozenset({"b", "c", "d"}), frozenset()]
    li, ri = np.array([0, 0, 2]), np.array([1, 0, 2])
    inter, nl, nr = set_overlap(sets, sets, li, ri)
    assert inter.tolist() == [2.0, 3.0, 0.0]
    assert (nl.tolist(), nr.tolist()) == ([3, 3, 0], [3, 3, 0])
    assert set_jaccard(sets, sets, li, ri).tolist() == [0.5, 1.0, 0.0]


def test_trigram_matrix_holds_the_same_sets_as_token_sets() -> None:
    values = ["8 stanley street, miami", "pine hill", "pinehill", "", "a", "ünïcode  wörd"]
    by_sets = token_matrix(token_sets(values, grams=3))
    by_numpy = trigram_matrix(values)
    everything = np.repeat(np.arange(len(values)), len(values))
    against = np.tile(np.arange(len(values)), len(values))
    assert (
        matrix_overlap(by_sets, by_sets, everything, against)[0].tolist()
        == matrix_overlap(by_numpy, by_numpy, everything, against)[0].tolist()
    )
    assert np.diff(by_numpy.indptr).tolist() == [len(t) for t in token_sets(values, grams=3)]
