"""The lexical channel: character n-gram TF-IDF over ``lexical_form`` text, and its shortlist.

The vectorizer is fitted once per build; incremental updates transform new forms with the
fitted vocabulary and IDF (n-grams unseen at build time are ignored), so an updated index
scores exactly like itself, not like a fresh build (rebuild after large changes).

The shortlist for ANN search reads an inverted index (n-gram -> forms) but skips n-grams
in more than ``df_cap`` forms: their postings are long and their IDF weight small, so they
rarely decide who is in the top k, and candidates are re-scored exactly anyway.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp
from sklearn.feature_extraction.text import TfidfVectorizer

from .._text import lexical_form

__all__ = ["fit_vectorizer", "load_vectorizer", "save_vectorizer", "shortlist"]

I64 = npt.NDArray[np.int64]


def _vectorizer(vocabulary: dict[str, int] | None = None) -> TfidfVectorizer:
    return TfidfVectorizer(
        analyzer="char_wb",
        ngram_range=(2, 4),
        lowercase=False,
        preprocessor=lexical_form,
        sublinear_tf=True,
        dtype=np.float32,
        strip_accents=None,
        vocabulary=vocabulary,
    )


def fit_vectorizer(forms: Sequence[str]) -> tuple[TfidfVectorizer, sp.csr_matrix]:
    """Fit on the catalog's forms; returns the vectorizer and the (forms x n-grams) matrix."""
    vectorizer = _vectorizer()
    matrix = vectorizer.fit_transform(list(forms)).tocsr()
    return vectorizer, matrix


def save_vectorizer(vectorizer: TfidfVectorizer, directory: Path) -> None:
    """Write the vocabulary (JSON) and IDF weights (npy) to ``directory``."""
    vocab = {k: int(v) for k, v in vectorizer.vocabulary_.items()}
    (directory / "vocabulary.json").write_text(json.dumps(vocab), encoding="utf-8")
    np.save(directory / "idf.npy", np.asarray(vectorizer.idf_, dtype=np.float64))


def load_vectorizer(directory: Path) -> TfidfVectorizer:
    """Rebuild a fitted vectorizer from :func:`save_vectorizer`'s files (no refit)."""
    vocab = json.loads((directory / "vocabulary.json").read_text(encoding="utf-8"))
    vectorizer = _vectorizer(vocab)
    vectorizer.idf_ = np.load(directory / "idf.npy")  # the setter also fixes the vocabulary
    return vectorizer


def shortlist(
    queries: sp.csr_matrix,
    inverted: sp.csr_matrix,
    rare: npt.NDArray[np.bool_],
    n: int,
) -> tuple[I64, I64]:
    """Per query, up to ``n`` form positions with the highest score over rare n-grams.

    Args:
        queries: (queries x n-grams) TF-IDF rows.
        inverted: (n-grams x forms) postings with TF-IDF weights.
        rare: per n-gram, whether its postings are short enough to read.

    Returns:
        Flat ``(rows, forms)``: the query (row of ``queries``) and one of its forms, by row.
    """
    q = queries.tocsr(copy=True)
    q.data = q.data * rare[q.indices]
    q.eliminate_zeros()
    scores = (q @ inverted).tocsr()
    lens = np.diff(scores.indptr)
    keep = np.ones(len(scores.data), dtype=bool)
    for row in np.flatnonzero(lens > n).tolist():  # only long rows need choosing
        lo, hi = scores.indptr[row], scores.indptr[row + 1]
        cut = np.ones(hi - lo, dtype=bool)
        cut[np.argpartition(-scores.data[lo:hi], n - 1)[:n]] = False
        keep[lo:hi][cut] = False
    rows = np.repeat(np.arange(scores.shape[0], dtype=np.int64), lens)
    return rows[keep], scores.indices[keep].astype(np.int64)
