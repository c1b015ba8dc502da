"""Array helpers of the hybrid index's top-k search (pure numpy/scipy, values in, values out):
a batch's chosen candidates as flat arrays, per-row and per-segment selection with the
index's tie rule, and row copies of large arrays without fancy indexing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

__all__ = [
    "TIE",
    "Hits",
    "dense_top",
    "keep_rows",
    "ordered",
    "ragged_top",
    "row_dots",
    "segment_argmax",
    "take_rows",
]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
# Scores closer than this may round to the same reported value (6 decimals): a tie.
TIE = 2e-6


@dataclass(frozen=True)
class Hits:
    """A batch's chosen candidates, flat and in output order: query ``i`` owns positions
    ``bounds[i]:bounds[i + 1]``."""

    rows: I64  # the query (a row of the batch)
    entities: I64
    forms: I64  # the entity's best form for that query
    scores: F32  # combined, unrounded
    bounds: I64

    @staticmethod
    def empty(n_rows: int) -> Hits:
        none = np.zeros(0, dtype=np.int64)
        return Hits(none, none, none, np.zeros(0, np.float32), np.zeros(n_rows + 1, np.int64))


def row_dots(a: sp.csr_matrix, b: sp.csr_matrix) -> F32:
    """The dot product of each row of ``a`` with the same row of ``b`` (one sparse
    element-wise product: no (rows x rows) product matrix)."""
    return np.asarray(a.multiply(b).sum(axis=1), dtype=np.float32).ravel()


def segment_argmax(values: F32, maxima: F32, starts: I64, lens: I64) -> I64:
    """The position in ``values`` of the first maximum of each segment (none empty);
    ``maxima`` holds each segment's maximum."""
    pos = np.flatnonzero(values == np.repeat(maxima, lens))
    return pos[np.searchsorted(pos, starts)]


def dense_top(scores: F32, k: int) -> I64:
    """The columns of each row's ``k`` best scores, best first (see :func:`ordered`)."""
    n_rows, n = scores.shape
    if k < n:
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        top = np.tile(np.arange(n, dtype=np.int64), (n_rows, 1))
    picked = np.take_along_axis(scores, top, axis=1)
    if k < n:
        # the k-th place among ties goes to the first entity: rows where one left out is
        # within rounding of the last one taken are chosen again, in the reported order
        floor = picked.min(axis=1) - TIE
        for row in np.flatnonzero((scores >= floor[:, None]).sum(axis=1) > k).tolist():
            near = np.flatnonzero(scores[row] >= floor[row])
            top[row] = near[ordered(scores[row, near], near)][:k]
            picked[row] = scores[row, top[row]]
    order = np.lexsort((top, -np.round(picked, 6)), axis=1)
    return np.take_along_axis(top, order, axis=1).astype(np.int64, copy=False)


def ragged_top(rows: I64, entities: I64, scores: F32, k: int, n_rows: int) -> tuple[I64, I64]:
    """Each row's ``k`` best (row, entity) pairs, best first: their positions, and where
    each row's start (``n_rows + 1`` bounds). ``rows`` is sorted."""
    order = np.lexsort((entities, -np.round(scores, 6), rows))
    counts = np.bincount(rows, minlength=n_rows)
    first = np.cumsum(counts) - counts
    rank = np.arange(len(order)) - first[rows[order]]
    bounds = np.r_[0, np.cumsum(np.minimum(counts, k))].astype(np.int64)
    return order[rank < k], bounds


def take_rows(
    array: npt.NDArray[Any], kept: npt.NDArray[np.int64], extra: npt.NDArray[Any] | None
) -> npt.NDArray[Any]:
    """``array[kept]`` followed by ``extra``, written into one new array (one copy)."""
    n_extra = 0 if extra is None else len(extra)
    out = np.empty((len(kept) + n_extra, *array.shape[1:]), dtype=array.dtype)
    # kept rows come in long runs (few removals): copy run by run (memcpy speed; np.take
    # with a row index is ~5x slower on a million rows)
    breaks = np.flatnonzero(np.diff(kept) != 1) + 1
    at = 0
    for run in np.split(kept, breaks) if len(kept) else []:
        out[at : at + len(run)] = array[run[0] : run[-1] + 1]
        at += len(run)
    if extra is not None:
        out[len(kept) :] = extra
    return out


def keep_rows(
    matrix: sp.csr_matrix, keep: npt.NDArray[np.bool_], extra: sp.csr_matrix | None
) -> sp.csr_matrix:
    """The rows of a CSR matrix where ``keep``, then ``extra``'s rows: a masked copy of the
    arrays (scipy's fancy row indexing is several times slower on a million rows)."""
    nnz = np.diff(matrix.indptr)
    parts_data, parts_idx = [matrix.data], [matrix.indices]
    row_nnz = nnz
    if not keep.all():
        mask = np.repeat(keep, nnz)
        parts_data, parts_idx = [matrix.data[mask]], [matrix.indices[mask]]
        row_nnz = nnz[keep]
    if extra is not None:
        parts_data.append(extra.data.astype(matrix.data.dtype))
        parts_idx.append(extra.indices.astype(matrix.indices.dtype))
        row_nnz = np.r_[row_nnz, np.diff(extra.indptr)]
    indptr = np.r_[0, np.cumsum(row_nnz)].astype(matrix.indptr.dtype)
    return sp.csr_matrix(
        (np.concatenate(parts_data), np.concatenate(parts_idx), indptr),
        shape=(len(row_nnz), matrix.shape[1]),
    )


def ordered(scores: npt.NDArray[np.float32], entities: npt.NDArray[np.int64]) -> Any:
    """Order best first by the score as reported (6 decimals), ties in catalog order.

    Duplicate entities differ only by float noise that depends on how the texts were
    batched; their order must not (it decides "top" answers).
    """
    return np.lexsort((entities, -np.round(scores, 6)))
