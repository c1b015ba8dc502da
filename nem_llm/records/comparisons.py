"""Comparison levels per field kind: how much two values of one field agree, as a small integer.

Each kind has an ordered list of levels, as Splink's comparison library does: level 0 is
"null" (either side missing: no evidence either way), level 1 "else" (they disagree), and
the last level is "exact". A pair lands on the highest level whose test it passes:

========  =========================================================================
kind      levels (low to high, after null)
========  =========================================================================
name      else, Jaro-Winkler >= 0.80, one's words within the other's,
          Jaro-Winkler >= 0.92 or the same words in another order, exact
text      else, similarity >= 0.25 / 0.45 / 0.65 / 0.85, exact; the similarity is the
          Jaccard of the words' character trigrams or, if higher, the share of the
          shorter value's words (two or more) found in the longer; both sides carrying
          numbers and sharing none is "else" (a house number, a volume, "part 2")
code      else, two edits, one edit (a swap of neighbours counts as one), exact
date      else, same year, one edit or day and month swapped, exact
number    else, close, near, exact (near and close: within the 2% and 10% quantiles
          of the differences between random pairs of the catalog's values)
category  else, Jaro-Winkler >= 0.90, exact
========  =========================================================================

:func:`comparison_for` builds a kind's :class:`Comparison` from the catalog's values (the
numeric scale, the term frequencies, the chance two entities share a value);
:meth:`Comparison.levels` compares aligned pairs, vectorised. Everything is pure: values
in, arrays out.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .fields import FieldKind, FieldSpec, normalize_value
from .strings import (
    codepoints,
    edit_distance,
    jaro_winkler,
    matrix_overlap,
    token_matrix,
    token_sets,
    trigram_matrix,
)

__all__ = ["COINCIDENCE", "LEVELS", "Column", "Comparison", "comparison_for", "fit_comparison"]

Ints = npt.NDArray[np.int64]
Levels = npt.NDArray[np.int8]

#: The level labels of each kind, lowest first; index 0 is always "null" and the last is
#: always "exact" (the level term-frequency adjustments apply to).
LEVELS: dict[FieldKind, tuple[str, ...]] = {
    "name": ("null", "else", "jw>=0.80", "words within", "jw>=0.92 or same words", "exact"),
    "text": (
        "null",
        "else",
        "jaccard>=0.25",
        "jaccard>=0.45",
        "jaccard>=0.65",
        "jaccard>=0.85",
        "exact",
    ),
    "code": ("null", "else", "2 edits", "1 edit", "exact"),
    "date": ("null", "else", "same year", "1 edit or swap", "exact"),
    "number": ("null", "else", "close", "near", "exact"),
    "category": ("null", "else", "jw>=0.90", "exact"),
    "skip": ("null",),
}

#: Before the catalog says otherwise: the chance that two distinct entities have equal
#: values of a field of each kind (a name is rarely shared; a category often). Worth
#: ``PRIOR_PAIRS`` pairs of entities: negligible from a few hundred entities on.
COINCIDENCE: dict[str, float] = {
    "name": 0.01,
    "text": 0.001,
    "code": 0.001,
    "date": 0.001,
    "number": 0.01,
    "category": 0.2,
    "skip": 1.0,
}
PRIOR_PAIRS = 10.0

_TEXT_CUTS = (0.25, 0.45, 0.65, 0.85)
_TRIGRAMS = 3


@dataclass
class Column:
    """One field of a set of records, normalised once and compared many times.

    ``values[i]`` is record ``i``'s normalised value (``None``: missing); ``numbers`` its
    numeric value (number fields); ``cache`` what comparisons derive from the values
    (word sets, trigram sets), built on first use.
    """

    values: npt.NDArray[np.object_]
    present: npt.NDArray[np.bool_]
    numbers: npt.NDArray[np.float64] | None = None
    cache: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.values)


@dataclass(frozen=True)
class Comparison:
    """How one field is compared: its spec, level labels, and what the catalog taught.

    Args:
        spec: the field and its kind.
        labels: level names, index 0 "null", the last "exact".
        near, close: number fields: absolute differences counted as near and as close.
        frequencies: each value's share of the non-missing values (for term-frequency
            adjustments of the exact level).
        coincidence: the chance that two distinct catalog entities have equal values (the
            exact level's u among random pairs), with the kind's prior (``COINCIDENCE``).
    """

    spec: FieldSpec
    labels: tuple[str, ...]
    near: float = 0.0
    close: float = 0.0
    frequencies: dict[str, float] = field(default_factory=dict)
    coincidence: float = 1e-6

    @property
    def exact_level(self) -> int:
        """The index of the "exact" level (the highest)."""
        return len(self.labels) - 1

    def prepare(self, raw: Sequence[Any]) -> Column:
        """Normalise raw attribute values (any type; ``None`` = missing) of this field."""
        kind = self.spec.kind
        seen: dict[
            tuple[type, Any], str | None
        ] = {}  # values repeat (a city, a year): normalise each once

        def norm(value: Any) -> str | None:
            key = (type(value), value)  # True and 1 are equal keys, not equal values
            try:
                return seen[key]
            except KeyError:
                out = seen[key] = normalize_value(value, kind)
                return out
            except TypeError:  # unhashable (a list)
                return normalize_value(value, kind)

        values = np.array([norm(v) for v in raw] + [None], dtype=object)[:-1]
        present = np.array([v is not None for v in values], dtype=bool)
        column = Column(values, present)
        if kind == "number":
            numbers = np.full(len(values), np.nan)
            for i, v in enumerate(values):
                if v is not None:
                    numbers[i] = float(v)
            column.numbers = numbers
            column.present &= ~np.isnan(numbers)
        return column

    def levels(self, left: Column, right: Column, li: Ints, ri: Ints) -> Levels:
        """The level of each pair ``(left[li[k]], right[ri[k]])``: an int8 array."""
        out = np.zeros(len(li), dtype=np.int8)
        if self.spec.kind == "skip" or len(li) == 0:
            return out
        both = left.present[li] & right.present[ri]
        rows = np.flatnonzero(both)
        if len(rows) == 0:
            return out
        a = left.values[li[rows]]
        b = right.values[ri[rows]]
        exact = a == b
        levels = np.ones(len(rows), dtype=np.int8)
        levels[exact] = self.exact_level
        todo = np.flatnonzero(~exact)
        if len(todo):
            levels[todo] = _KIND_LEVELS[self.spec.kind](
                self, left, right, li[rows][todo], ri[rows][todo]
            )
        out[rows] = levels
        return out


def _name_levels(c: Comparison, left: Column, right: Column, li: Ints, ri: Ints) -> Levels:
    a = list(left.values[li])
    b = list(right.values[ri])
    jw = jaro_winkler(a, b)
    # word sets matter only where a side has two words or more (most names have one)
    same_words = np.zeros(len(li), dtype=bool)
    within = np.zeros(len(li), dtype=bool)
    several = np.flatnonzero(_several_words(left)[li] | _several_words(right)[ri])
    if len(several):
        ls, rs = _sets(left, "words"), _sets(right, "words")
        for k in several.tolist():
            x, y = ls[li[k]], rs[ri[k]]
            same_words[k] = x == y
            within[k] = bool(x & y) and (x <= y or y <= x)
    return np.select([(jw >= 0.92) | same_words, within, jw >= 0.80], [4, 3, 2], default=1).astype(
        np.int8
    )


def _text_levels(c: Comparison, left: Column, right: Column, li: Ints, ri: Ints) -> Levels:
    # similar: trigram Jaccard, or the share of the shorter value's words (two or more)
    # found in the longer ("854 7th ave. between 54th and 55th sts." vs "854 seventh ave.")
    inter, nl, nr = matrix_overlap(_matrix(left, "trigrams"), _matrix(right, "trigrams"), li, ri)
    union = nl + nr - inter
    sim = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    inter, nl, nr = matrix_overlap(_matrix(left, "words"), _matrix(right, "words"), li, ri)
    shorter = np.minimum(nl, nr)
    contained = np.where(shorter >= 2, inter / np.maximum(shorter, 1), 0.0)
    sim = np.maximum(sim, contained)
    out = np.ones(len(li), dtype=np.int8)
    for level, cut in enumerate(_TEXT_CUTS, start=2):
        out[sim >= cut] = level
    # numbers are identifiers (a house number, a volume, "part 2"): both sides have some
    # and share none -> they disagree, however alike the words
    num_inter, num_l, num_r = matrix_overlap(
        _matrix(left, "numbers"), _matrix(right, "numbers"), li, ri
    )
    out[(num_l > 0) & (num_r > 0) & (num_inter == 0)] = 1
    return out


def _code_levels(c: Comparison, left: Column, right: Column, li: Ints, ri: Ints) -> Levels:
    d = edit_distance(list(left.values[li]), list(right.values[ri]), cap=3)
    return np.select([d <= 1, d <= 2], [3, 2], default=1).astype(np.int8)


def _date_levels(c: Comparison, left: Column, right: Column, li: Ints, ri: Ints) -> Levels:
    a = list(left.values[li])
    b = list(right.values[ri])
    d = edit_distance(a, b, cap=2)
    # YYYYMMDD digits side by side: the same year, and day and month swapped
    ca, la = codepoints(a, 8)
    cb, lb = codepoints(b, 8)
    year = (la >= 4) & (lb >= 4) & (ca[:, :4] == cb[:, :4]).all(axis=1)
    swapped = (
        year
        & (la == 8)
        & (lb == 8)
        & (ca[:, 4:6] == cb[:, 6:8]).all(axis=1)
        & (ca[:, 6:8] == cb[:, 4:6]).all(axis=1)
    )
    return np.select([(d <= 1) | swapped, year], [3, 2], default=1).astype(np.int8)


def _number_levels(c: Comparison, left: Column, right: Column, li: Ints, ri: Ints) -> Levels:
    assert left.numbers is not None and right.numbers is not None
    d = np.abs(left.numbers[li] - right.numbers[ri])
    return np.select([d <= c.near, d <= c.close], [3, 2], default=1).astype(np.int8)


def _category_levels(c: Comparison, left: Column, right: Column, li: Ints, ri: Ints) -> Levels:
    jw = jaro_winkler(list(left.values[li]), list(right.values[ri]))
    return np.where(jw >= 0.90, 2, 1).astype(np.int8)


# kind -> how two non-missing, unequal values of it are leveled
_KIND_LEVELS: dict[str, Callable[[Comparison, Column, Column, Ints, Ints], Levels]] = {
    "name": _name_levels,
    "text": _text_levels,
    "code": _code_levels,
    "date": _date_levels,
    "number": _number_levels,
    "category": _category_levels,
}


def _sets(column: Column, what: str) -> list[frozenset[str]]:
    """The column's word, trigram or number sets (``what``), built once per column."""
    found: list[frozenset[str]] | None = column.cache.get(what)
    if found is None:
        values = [v or "" for v in column.values]
        if what == "numbers":
            words = _sets(column, "words")
            found = [frozenset(w for w in s if w.isdigit()) for s in words]
        else:
            found = token_sets(values, grams=_TRIGRAMS if what == "trigrams" else 0)
        column.cache[what] = found
    return found


def _several_words(column: Column) -> npt.NDArray[np.bool_]:
    """Per value, whether it has a space (normalised values: two words or more)."""
    if "several" not in column.cache:
        text = np.asarray([v or "" for v in column.values], dtype=str)
        column.cache["several"] = np.char.find(text, " ") >= 0
    found: npt.NDArray[np.bool_] = column.cache["several"]
    return found


def _matrix(column: Column, what: str) -> Any:
    """The column's sets of ``what`` as a sparse matrix (``token_matrix``), built once."""
    key = f"{what}:matrix"
    if key not in column.cache:
        if what == "trigrams":  # the same sets, built in numpy
            column.cache[key] = trigram_matrix([v or "" for v in column.values])
        else:
            column.cache[key] = token_matrix(_sets(column, what))
    return column.cache[key]


def comparison_for(
    spec: FieldSpec, catalog: Sequence[Any], *, others: Sequence[Any] = (), seed: int = 0
) -> Comparison:
    """The comparison of one field, fitted to the catalog's raw values of it.

    Number fields learn ``near`` and ``close`` from the differences of random pairs of
    catalog values (the 2% and 10% quantiles, at least the smallest non-zero difference),
    so "near" means the same on any scale. Every kind learns each value's frequency, over
    the catalog's values and ``others`` (the queries' values, as Splink counts term
    frequencies over both sides of a link): an address five queries share is weak
    evidence even if one entity has it.
    """
    blank = Comparison(spec, LEVELS[spec.kind])
    other = blank.prepare(others) if len(others) else None
    return fit_comparison(spec, blank.prepare(catalog), other, seed=seed)


def fit_comparison(
    spec: FieldSpec, catalog: Column, others: Column | None = None, *, seed: int = 0
) -> Comparison:
    """:func:`comparison_for` from already prepared columns (``Comparison.prepare`` of any
    comparison of the same kind: preparing reads only the kind)."""
    labels = LEVELS[spec.kind]
    present = [v for v in catalog.values[catalog.present]]
    counts = Counter(present)
    n = len(present)
    same = sum(k * (k - 1) for k in counts.values())
    # what the catalog shows, and where it shows little (a few entities) what the kind says
    coincidence = (same + PRIOR_PAIRS * COINCIDENCE[spec.kind]) / (n * (n - 1) + PRIOR_PAIRS)
    if others is not None:
        counts.update(v for v in others.values[others.present])
    total = max(sum(counts.values()), 1)
    frequencies = {v: k / total for v, k in counts.items()}
    near = close = 0.0
    if spec.kind == "number" and catalog.numbers is not None and n:
        numbers = catalog.numbers[catalog.present]
        rng = np.random.default_rng(seed)
        diffs = np.abs(
            numbers[rng.integers(0, len(numbers), 20_000)]
            - numbers[rng.integers(0, len(numbers), 20_000)]
        )
        positive = diffs[diffs > 0]
        step = float(positive.min()) if len(positive) else 0.0
        near = max(float(np.quantile(diffs, 0.02)), step)
        close = max(float(np.quantile(diffs, 0.10)), 2 * near)
    return Comparison(
        spec, labels, near=near, close=close, frequencies=frequencies, coincidence=coincidence
    )
