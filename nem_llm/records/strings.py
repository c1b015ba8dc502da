"""Vectorised string similarities over aligned pairs: Jaro-Winkler, bounded edit distance, Jaccard.

Every function takes two equal-length sequences of strings (pair ``i`` is ``left[i]``,
``right[i]``) and returns one number per pair, computed with numpy over all pairs at once:
the loops run over character positions (a few dozen), never over pairs (tens of
thousands). Strings are compared as given: fold them first (``nem_llm._text.fold``).

Pure Python Jaro-Winkler runs at roughly 100k short pairs a second; these run at millions
(measured in ``docs/records.md``), which is what scoring 50k candidate pairs on eight fields
at the cost of one retrieval needs.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "MAX_CHARS",
    "codepoints",
    "edit_distance",
    "jaro_winkler",
    "matrix_overlap",
    "set_jaccard",
    "set_overlap",
    "token_matrix",
    "token_sets",
    "trigram_matrix",
]

_NON_WORD = re.compile(r"[^\w]+|_")

#: Strings are compared on their first MAX_CHARS characters (Jaro-Winkler and edit
#: distance are for short values: names, codes, dates; long text goes to ``set_jaccard``).
MAX_CHARS = 32

Floats = npt.NDArray[np.float64]
Ints = npt.NDArray[np.int64]


def codepoints(values: Sequence[str], width: int | None = None) -> tuple[Ints, Ints]:
    """Strings as a ``(n, width)`` array of code points (0-padded) and their lengths.

    Args:
        values: the strings (cut to ``width`` characters).
        width: columns; defaults to the longest string, at most ``MAX_CHARS``.
    """
    n = len(values)
    if width is None:
        width = min(MAX_CHARS, max((len(v) for v in values), default=1)) or 1
    if n == 0:
        return np.zeros((0, width), dtype=np.int64), np.zeros(0, dtype=np.int64)
    arr = np.asarray(values, dtype=f"<U{width}")
    codes = arr.view(np.uint32).reshape(n, width).astype(np.int64)
    lengths = np.char.str_len(arr).astype(np.int64)
    return codes, lengths


def _pad(codes: Ints, lengths: Ints, fill: int) -> Ints:
    """``codes`` with every position past a string's length set to ``fill``."""
    out = codes.copy()
    out[np.arange(codes.shape[1])[None, :] >= lengths[:, None]] = fill
    return out


def jaro_winkler(
    left: Sequence[str], right: Sequence[str], *, prefix_weight: float = 0.1
) -> Floats:
    """Jaro-Winkler similarity of each pair, in [0, 1] (1: equal; two empty strings: 1).

    The Winkler boost (``prefix_weight`` per common leading character, at most 4) applies
    when the Jaro similarity exceeds 0.7, as in Winkler (1990) and most libraries.

    Example:
        >>> jaro_winkler(["martha", "dwayne"], ["marhta", "duane"]).round(3).tolist()
        [0.961, 0.84]
    """
    if len(left) != len(right):
        raise ValueError("left and right must have the same length")
    # candidate pairs repeat (common first names against common first names): each
    # distinct pair once
    index: dict[tuple[str, str], int] = {}
    where = np.fromiter(
        (index.setdefault(pair, len(index)) for pair in zip(left, right, strict=True)),
        dtype=np.int64,
        count=len(left),
    )
    distinct_left = [a for a, _ in index]
    distinct_right = [b for _, b in index]
    out = np.zeros(len(index))
    # the work grows with the square of the width: short pairs run in their own buckets
    for rows, width in _buckets(distinct_left, distinct_right):
        out[rows] = _jaro_winkler(
            [distinct_left[i] for i in rows],
            [distinct_right[i] for i in rows],
            width,
            prefix_weight,
        )
    return out[where]


def _buckets(left: Sequence[str], right: Sequence[str]) -> list[tuple[Ints, int]]:
    """Pair positions grouped by the width their longer string needs (8, 16, MAX_CHARS)."""
    longest = np.maximum(
        np.char.str_len(np.asarray(left, dtype=str)), np.char.str_len(np.asarray(right, dtype=str))
    )
    out: list[tuple[Ints, int]] = []
    low = -1
    for width in (8, 16, MAX_CHARS):
        rows = np.flatnonzero((longest > low) & ((longest <= width) | (width == MAX_CHARS)))
        if len(rows):
            out.append((rows, width))
        low = width
    return out


def _jaro_winkler(
    left: Sequence[str], right: Sequence[str], width: int, prefix_weight: float
) -> Floats:
    """Jaro-Winkler of pairs whose strings are compared on ``width`` characters."""
    n = len(left)
    a, la = codepoints(left, width)
    b, lb = codepoints(right, width)
    # distinct pads: a padding position never matches anything
    a = _pad(a, la, -1)
    b = _pad(b, lb, -2)
    window = np.maximum(np.maximum(la, lb) // 2 - 1, 0)
    max_window = int(window.max())
    matched_a = np.zeros((n, width), dtype=bool)
    matched_b = np.zeros((n, width), dtype=bool)
    for i in range(width):
        ai = a[:, i]
        free = ai >= 0  # this position of `left` exists and is not matched yet
        if not free.any():
            break
        for j in range(max(0, i - max_window), min(width, i + max_window + 1)):
            hit = free & (ai == b[:, j]) & ~matched_b[:, j] & (abs(i - j) <= window)
            if hit.any():
                matched_a[hit, i] = True
                matched_b[hit, j] = True
                free &= ~hit
    m = matched_a.sum(axis=1)
    # the k-th matched character of each side, in order: transpositions are where they differ
    rank_a = np.cumsum(matched_a, axis=1) - 1
    rank_b = np.cumsum(matched_b, axis=1) - 1
    seq_a = np.full((n, width), -1, dtype=np.int64)
    seq_b = np.full((n, width), -1, dtype=np.int64)
    rows_a, cols_a = np.nonzero(matched_a)
    seq_a[rows_a, rank_a[rows_a, cols_a]] = a[rows_a, cols_a]
    rows_b, cols_b = np.nonzero(matched_b)
    seq_b[rows_b, rank_b[rows_b, cols_b]] = b[rows_b, cols_b]
    half_t = ((seq_a != seq_b) & (np.arange(width)[None, :] < m[:, None])).sum(axis=1) / 2.0
    with np.errstate(divide="ignore", invalid="ignore"):
        jaro = np.where(
            m > 0,
            (m / np.maximum(la, 1) + m / np.maximum(lb, 1) + (m - half_t) / np.maximum(m, 1)) / 3.0,
            0.0,
        )
    same_prefix = np.cumprod(a[:, :4] == b[:, :4], axis=1).sum(axis=1)
    boost = np.where(jaro > 0.7, same_prefix * prefix_weight * (1.0 - jaro), 0.0)
    out = jaro + boost
    out[(la == 0) & (lb == 0)] = 1.0
    return np.asarray(np.clip(out, 0.0, 1.0), dtype=np.float64)


def edit_distance(left: Sequence[str], right: Sequence[str], *, cap: int = 3) -> Ints:
    """Edit distance of each pair, counting an adjacent transposition as one edit, capped.

    The optimal-string-alignment distance (Damerau-Levenshtein without editing a substring
    twice): "19651013" vs "19651031" is 1. Distances above ``cap`` come back as ``cap``.

    Example:
        >>> edit_distance(["4223", "4223", "4223"], ["4223", "4232", "9999"]).tolist()
        [0, 1, 3]
    """
    if len(left) != len(right):
        raise ValueError("left and right must have the same length")
    n = len(left)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    width = min(MAX_CHARS, max(max(map(len, left)), max(map(len, right)), 1))
    a, la = codepoints(left, width)
    b, lb = codepoints(right, width)
    # the bag distance (characters one side has more of) is a lower bound: on long values
    # pairs already past the cap skip the dynamic programme (on short ones it costs more
    # than the programme it saves)
    near = np.arange(n) if width <= 12 else np.flatnonzero(_bag_distance(a, la, b, lb) <= cap)
    out = np.full(n, cap, dtype=np.int64)
    if len(near):
        out[near] = _osa(a[near], la[near], b[near], lb[near], width, cap)
    return out


def _bag_distance(a: Ints, la: Ints, b: Ints, lb: Ints) -> Ints:
    """max(|A - B|, |B - A|) of the pairs' character multisets (a lower bound on edits)."""
    # each code point hashed into 64 bins: a collision only lowers the bound
    width = a.shape[1]
    valid_a = np.arange(width)[None, :] < la[:, None]
    valid_b = np.arange(width)[None, :] < lb[:, None]
    rows = np.repeat(np.arange(len(a)) * 64, width)
    size = len(a) * 64
    ha = np.bincount(rows + (a % 64).ravel(), weights=valid_a.ravel(), minlength=size)
    hb = np.bincount(rows + (b % 64).ravel(), weights=valid_b.ravel(), minlength=size)
    diff = (ha - hb).reshape(len(a), 64)
    more_a = np.where(diff > 0, diff, 0).sum(axis=1)
    more_b = np.where(diff < 0, -diff, 0).sum(axis=1)
    return np.asarray(np.maximum(more_a, more_b), dtype=np.int64)


def _osa(a: Ints, la: Ints, b: Ints, lb: Ints, width: int, cap: int) -> Ints:
    """The capped optimal-string-alignment distance of padded code point rows."""
    n = len(a)
    a = _pad(a, la, -1)
    b = _pad(b, lb, -2)
    big = width + cap + 1
    # rows of the dynamic programme, all pairs at once: prev2, prev, cur over j = 0..width
    cols = np.arange(width + 1, dtype=np.int64)
    prev2 = np.zeros((n, width + 1), dtype=np.int64)
    prev = np.broadcast_to(cols, (n, width + 1)).copy()
    answer = np.where(la == 0, lb, big)
    for i in range(1, width + 1):
        cur = np.empty_like(prev)
        cur[:, 0] = i
        ai = a[:, i - 1]
        for j in range(1, width + 1):
            cost = (ai != b[:, j - 1]).astype(np.int64)
            best = np.minimum(np.minimum(prev[:, j] + 1, cur[:, j - 1] + 1), prev[:, j - 1] + cost)
            if i > 1 and j > 1:
                swap = (ai == b[:, j - 2]) & (a[:, i - 2] == b[:, j - 1])
                best = np.where(swap, np.minimum(best, prev2[:, j - 2] + 1), best)
            cur[:, j] = best
        done = la == i
        if done.any():
            answer = np.where(done, cur[np.arange(n), lb], answer)
        prev2, prev = prev, cur
    return np.minimum(answer, cap)


def token_sets(values: Sequence[str], *, grams: int = 0) -> list[frozenset[str]]:
    """Each string's set of word tokens (``grams=0``) or of character n-grams of its words.

    Tokens are runs of letters and digits; n-grams are taken of each token padded with a
    space on both sides, so "pine hill" and "pinehill" share most of theirs.
    """
    seen: dict[str, frozenset[str]] = {}  # values repeat (cities, states): split each once
    out: list[frozenset[str]] = []
    for value in values:
        found = seen.get(value)
        if found is None:
            tokens = _NON_WORD.sub(" ", value).split()
            if grams <= 0:
                found = frozenset(tokens)
            else:
                padded = [f" {token} " for token in tokens]
                found = frozenset(
                    p[k : k + grams] for p in padded for k in range(max(len(p) - grams + 1, 1))
                )
            seen[value] = found
        out.append(found)
    return out


def trigram_matrix(values: Sequence[str]) -> Any:
    """The character trigrams of each value's words as a sparse 0/1 matrix (scipy CSR).

    The same sets as ``token_sets(values, grams=3)`` (words padded with a space on both
    sides), computed with numpy: the trigrams are the 3-character windows of the value
    with its words joined by single spaces and padded, except those centred on a space
    (they span two words). A trigram's column is its three code points packed into one
    integer, mixed into 32 bits: columns agree between matrices built apart; two trigrams
    share one with a chance of about one in four billion.
    """
    from scipy import sparse

    padded = [" " + " ".join(_NON_WORD.sub(" ", v).split()) + " " for v in values]
    n = len(padded)
    width = max((len(p) for p in padded), default=3)
    if n == 0:
        return sparse.csr_matrix((0, 2**32))
    codes = np.asarray(padded, dtype=f"<U{width}").view(np.uint32).reshape(n, width)
    codes = codes.astype(np.uint64)
    lengths = np.char.str_len(np.asarray(padded, dtype=str))
    start = np.arange(width - 2)[None, :]
    keep = (start + 2 < lengths[:, None]) & (codes[:, 1:-1] != ord(" "))
    packed = (codes[:, :-2] << np.uint64(42)) | (codes[:, 1:-1] << np.uint64(21)) | codes[:, 2:]
    # a multiplicative hash spreads the packed code over 32 bits
    mixed = (packed * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)
    rows = np.broadcast_to(np.arange(n)[:, None], keep.shape)[keep]
    cols = mixed[keep].astype(np.int64)
    matrix = sparse.csr_matrix(
        (np.ones(len(cols)), (rows, cols)), shape=(n, 2**32), dtype=np.float64
    )
    matrix.sum_duplicates()
    matrix.data = np.minimum(matrix.data, 1.0)
    return matrix


def token_matrix(sets: Sequence[frozenset[str]]) -> Any:
    """The sets as a sparse 0/1 matrix (scipy CSR), one row per set.

    A token's column is its CRC-32, the same in every matrix and every process, so the
    matrices of two columns built apart can be multiplied row by row; two tokens share a
    column with a chance of about one in four billion.
    """
    from scipy import sparse

    ids: dict[str, int] = {}
    indptr = np.zeros(len(sets) + 1, dtype=np.int64)
    indices: list[int] = []
    for i, tokens in enumerate(sets):
        for t in tokens:
            col = ids.get(t)
            if col is None:
                col = ids[t] = zlib.crc32(t.encode("utf-8"))
            indices.append(col)
        indptr[i + 1] = len(indices)
    data = np.ones(len(indices), dtype=np.float64)
    # duplicate columns within a row (a CRC collision) are summed: clip back to 0/1
    matrix = sparse.csr_matrix(
        (data, np.asarray(indices, dtype=np.int64), indptr), shape=(len(sets), 2**32)
    )
    matrix.sum_duplicates()
    matrix.data = np.minimum(matrix.data, 1.0)
    return matrix


def matrix_overlap(
    left: Any, right: Any, left_index: Ints, right_index: Ints
) -> tuple[Floats, Ints, Ints]:
    """``|A & B|``, ``|A|``, ``|B|`` of rows ``left[left_index[i]]`` and ``right[right_index[i]]``
    of two :func:`token_matrix` matrices."""
    sizes_l = np.diff(left.indptr)[left_index].astype(np.int64)
    sizes_r = np.diff(right.indptr)[right_index].astype(np.int64)
    if not len(left_index):
        return np.zeros(0), sizes_l, sizes_r
    inter = np.asarray(left[left_index].multiply(right[right_index]).sum(axis=1)).ravel()
    return inter.astype(np.float64), sizes_l, sizes_r


def set_overlap(
    left: Sequence[frozenset[str]],
    right: Sequence[frozenset[str]],
    left_index: Ints,
    right_index: Ints,
) -> tuple[Floats, Ints, Ints]:
    """``|A & B|``, ``|A|`` and ``|B|`` of pairs of sets (pair ``i``: ``left[left_index[i]]``,
    ``right[right_index[i]]``).

    The sets become sparse incidence matrices (:func:`token_matrix`), so each pair costs a
    row-wise product, not a Python set operation.
    """
    return matrix_overlap(token_matrix(left), token_matrix(right), left_index, right_index)


def set_jaccard(
    left: Sequence[frozenset[str]],
    right: Sequence[frozenset[str]],
    left_index: Ints,
    right_index: Ints,
) -> Floats:
    """Jaccard similarity ``|A & B| / |A | B|`` of the pairs (two empty sets score 0).

    Example:
        >>> sets = [frozenset("ab"), frozenset("bc")]
        >>> set_jaccard(sets, sets, np.array([0]), np.array([1])).tolist()
        [0.3333333333333333]
    """
    inter, sizes_l, sizes_r = set_overlap(left, right, left_index, right_index)
    union = sizes_l + sizes_r - inter
    return np.asarray(np.where(union > 0, inter / np.maximum(union, 1), 0.0), dtype=np.float64)
