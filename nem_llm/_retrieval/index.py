"""Exact hybrid top-k search: dense cosine + character n-gram TF-IDF, best surface form wins.

Every surface form (name and each alias) has a dense unit vector and a TF-IDF vector. A
form's score is ``(1 - w) * dense + w * lexical`` (``w`` = ``lexical_weight``), clipped to
[0, 1]; an entity's score is its best form's score. Exact search is numpy matrix products
and ``argpartition`` (~56 ms for 64 queries over 100k forms on two cores, linear in size).
Large catalogs use an ANN shortlist (faiss IVF, see ``ann.py``, plus a lexical shortlist
from an inverted n-gram index, see ``lexical.py``) whose candidates are re-scored exactly:
the scores returned are the exact scores of those candidates.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from ..catalog import Catalog
from ..errors import CatalogError, ConfigError
from ..models import Candidate, Entity
from .ann import DenseANN, faiss_available
from .embedding import DEFAULT_MODEL_NAME
from .encoders import encoder_of
from .lexical import fit_vectorizer, load_vectorizer, save_vectorizer, shortlist

__all__ = ["ANN_MIN_FORMS", "HybridIndex", "IndexMode", "catalog_fingerprint"]

F32 = npt.NDArray[np.float32]
_QUERY_CHUNK = 64  # queries scored at once: bounds the (queries x forms) score matrix
# Forms per query from each of the dense and lexical ANN shortlists: at least 100, and one
# in 1,500 forms. Measured at 1.1M forms of near-duplicate names (bench_scale.py): 100 gave
# 0.95 agreement with exact top-10, 300 0.99, 600 1.0 (at 31x the speed of exact search).
_SHORTLIST = 100
_SHORTLIST_SHARE = 1_500
_EXACT_SUBSET = 20_000  # a filter allowing at most this many forms: exact over them
_ANN_ADD_CHUNK = 4_096  # vectors added to the ANN index while searches wait (a moment)
# Below this many multiply-adds (queries x forms x dim, ~1 ms on one core) the dense product
# runs on one BLAS thread: OpenBLAS's helper threads cost more than they save on a product
# this small, and they busy-wait after it (CPU taken from the encoder and the event loop).
_SMALL_PRODUCT = 32_000_000
_blas_lock = threading.Lock()
_blas_controller: Any = None


def _one_blas_thread(work: int) -> AbstractContextManager[Any]:
    """Limit BLAS to one thread for a small product (a no-op for big ones)."""
    global _blas_controller
    if work >= _SMALL_PRODUCT:
        return nullcontext()
    if _blas_controller is None:
        with _blas_lock:
            if _blas_controller is None:
                try:
                    from threadpoolctl import (  # type: ignore[import-untyped]  # sklearn needs it
                        ThreadpoolController,
                    )

                    _blas_controller = ThreadpoolController()
                except Exception:  # pragma: no cover - threadpoolctl missing or broken
                    _blas_controller = False
    if not _blas_controller:
        return nullcontext()
    return _blas_controller.limit(limits=1, user_api="blas")  # type: ignore[no-any-return]


def catalog_fingerprint(catalog: Catalog) -> str:
    """A hash of every surface form and its owner: a saved index is valid for this only."""
    h = hashlib.sha256()
    for form, owner in zip(catalog.forms, catalog.form_entity, strict=True):
        h.update(catalog.entities[owner].id.encode("utf-8", "surrogatepass"))
        h.update(b"\x1f")
        h.update(form.encode("utf-8", "surrogatepass"))
        h.update(b"\x1e")
    return h.hexdigest()


IndexMode = Literal["auto", "exact", "ann"]
# "auto" switches to ANN at this many surface forms. Below it exact search costs at most
# ~60 ms per 64 queries on two idle cores (DESIGN.md), needs no faiss training at build
# time and is exact; above it exact grows linearly (bench_scale.py: ~0.5 s at 55k forms on
# two cores under load 12, ANN ~0.2 s there, and 10x+ apart at 1M).
ANN_MIN_FORMS = 100_000
_MANIFEST = "manifest.json"
_VERSION_DIR = re.compile(r"v\d{6}-[0-9a-f]{8}(\.tmp)?")


@dataclass(frozen=True)
class _State:
    """Everything a search reads; updates build a new one and swap it in (atomic)."""

    catalog: Catalog
    vectors: npt.NDArray[Any]  # (forms, dim) float32 or float16 unit rows
    lex_forms: sp.csr_matrix | None  # (forms x n-grams)
    inverted: sp.csr_matrix | None  # (n-grams x forms), the same weights transposed
    starts: npt.NDArray[np.int64]  # first form of each entity
    owners: npt.NDArray[np.int64]  # entity of each form
    slots: npt.NDArray[np.int64]  # stable ANN id of each form
    form_of_slot: npt.NDArray[np.int64]  # current form of each slot (-1: removed)

    def ends(self) -> npt.NDArray[np.int64]:
        ends: npt.NDArray[np.int64] = np.r_[self.starts[1:], len(self.catalog.forms)]
        return ends.astype(np.int64)


def _state(
    catalog: Catalog,
    vectors: npt.NDArray[Any],
    lex_forms: sp.csr_matrix | None,
    slots: npt.NDArray[np.int64],
    *,
    inverted: sp.csr_matrix | None = None,
) -> _State:
    owners = np.asarray(catalog.form_entity, dtype=np.int64)
    form_of_slot = np.full(int(slots.max()) + 1 if len(slots) else 0, -1, dtype=np.int64)
    form_of_slot[slots] = np.arange(len(slots), dtype=np.int64)
    return _State(
        catalog=catalog,
        vectors=vectors,
        lex_forms=lex_forms,
        inverted=inverted if inverted is not None or lex_forms is None else lex_forms.T.tocsr(),
        # forms of one entity are contiguous: reduceat over these starts gives per-entity max
        starts=np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]]).astype(np.int64),
        owners=owners,
        slots=slots,
        form_of_slot=form_of_slot,
    )


def _forms_of(st: _State, entities: npt.NDArray[np.int64]) -> tuple[Any, Any]:
    """Form positions of ``entities`` (sorted) and each entity's first position in them."""
    lo = st.starts[entities]
    counts = st.ends()[entities] - lo
    offsets = np.r_[0, np.cumsum(counts)[:-1]].astype(np.int64)
    forms = np.repeat(lo - offsets, counts) + np.arange(int(counts.sum()), dtype=np.int64)
    return forms, offsets


def _pair_dots(queries: sp.csr_matrix, rows: sp.csr_matrix, bounds: list[int]) -> F32:
    """Dot product of each row with its query's row; query ``i`` owns rows
    ``bounds[i]:bounds[i + 1]``. One scatter into a dense lookup per query: no product
    matrix (a (queries x rows) sparse product would compute every cross pair too)."""
    table = np.zeros(queries.shape[1], dtype=np.float32)
    prod = np.zeros(len(rows.data), dtype=np.float32)
    for i in range(queries.shape[0]):
        qcols = queries.indices[queries.indptr[i] : queries.indptr[i + 1]]
        table[qcols] = queries.data[queries.indptr[i] : queries.indptr[i + 1]]
        lo, hi = rows.indptr[bounds[i]], rows.indptr[bounds[i + 1]]
        prod[lo:hi] = rows.data[lo:hi] * table[rows.indices[lo:hi]]
        table[qcols] = 0.0
    owner = np.repeat(np.arange(rows.shape[0]), np.diff(rows.indptr))
    return np.bincount(owner, weights=prod, minlength=rows.shape[0]).astype(np.float32)


def _take_rows(
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


def _keep_rows(
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


class HybridIndex:
    """Top-k over a catalog's surface forms: exact, or an ANN shortlist re-scored exactly.

    Build it from form vectors; ``search`` is pure (arrays in, candidates out) and
    thread-safe. ``index="auto"`` uses ANN (faiss, the ``[ann]`` extra) from
    ``ANN_MIN_FORMS`` forms; ``"ann"`` forces it, ``"exact"`` never uses it. Under ANN the
    vectors are stored as float16 (half the memory; R@10 unchanged on the development
    sets) and every returned score is the exact score of that candidate.

    Example:
        >>> index = HybridIndex(catalog, embedder.encode(list(catalog.forms)), index="ann")
        ... # doctest: +SKIP
    """

    def __init__(
        self,
        catalog: Catalog,
        form_vectors: npt.NDArray[Any],
        *,
        lexical_weight: float = 0.5,
        embedder_name: str = "",
        index: IndexMode = "auto",
        nprobe: int = 32,
        _restored: tuple[Any, ...] | None = None,
    ) -> None:
        if form_vectors.shape[0] != len(catalog.forms):
            raise ConfigError(
                f"index has {form_vectors.shape[0]} vectors for {len(catalog.forms)} forms"
            )
        if not 0.0 <= lexical_weight <= 1.0:
            raise ConfigError(f"lexical_weight must be in [0, 1], got {lexical_weight}")
        if index not in ("auto", "exact", "ann"):
            raise ConfigError(f'index must be "auto", "exact" or "ann", got {index!r}')
        self.lexical_weight = lexical_weight
        self.embedder_name = embedder_name
        self.mode = index
        self.nprobe = nprobe
        self.version = 0
        self.use_ann = index == "ann" or (
            index == "auto" and len(catalog.forms) >= ANN_MIN_FORMS and faiss_available()
        )
        dtype = np.float16 if self.use_ann else np.float32
        vectors = (
            form_vectors
            if form_vectors.dtype == dtype and isinstance(form_vectors, np.memmap)
            else np.ascontiguousarray(form_vectors, dtype=dtype)
        )
        if _restored is not None:
            self._vectorizer, lex_forms, slots, self._ann = _restored
        else:
            self._vectorizer, lex_forms = (
                fit_vectorizer(catalog.forms) if lexical_weight > 0 else (None, None)
            )
            slots = np.arange(len(catalog.forms), dtype=np.int64)
            self._ann = DenseANN.build(vectors, slots, nprobe=nprobe) if self.use_ann else None
        self._state = _state(catalog, vectors, lex_forms, slots)
        self._rare = self._rare_ngrams(self._state)
        self._update_lock = threading.Lock()  # one writer at a time
        self._search_lock = threading.Lock()  # the ANN index: searched or changed, not both

    @property
    def catalog(self) -> Catalog:
        return self._state.catalog

    @property
    def form_vectors(self) -> npt.NDArray[Any]:
        return self._state.vectors

    @property
    def dim(self) -> int:
        return int(self._state.vectors.shape[1])

    def _rare_ngrams(self, st: _State) -> npt.NDArray[np.bool_] | None:
        if st.inverted is None:
            return None
        df = np.diff(st.inverted.indptr)
        cap = max(2_000, len(st.catalog.forms) // 200)
        return np.asarray(df <= cap)

    def dense_nbytes_per_entity(self) -> float:
        """Bytes of the dense part (stored vectors plus the ANN codes) per entity."""
        st = self._state
        total = st.vectors.nbytes + (self._ann.nbytes() if self._ann is not None else 0)
        return total / max(1, len(st.catalog.entities))

    # -- scoring -------------------------------------------------------------------------

    def _query_lexical(self, queries: Sequence[str]) -> sp.csr_matrix | None:
        if self.lexical_weight == 0 or self._vectorizer is None:
            return None
        return self._vectorizer.transform(list(queries)).tocsr()

    def _combine(self, dense: F32, lex: F32 | None) -> F32:
        w = self.lexical_weight
        if w > 0 and lex is not None:
            dense *= 1.0 - w
            dense += w * lex
        np.clip(dense, 0.0, 1.0, out=dense)
        return dense

    def _all_scores(self, st: _State, query_vecs: F32, qlex: sp.csr_matrix | None) -> F32:
        """(queries x forms) combined scores over every form."""
        vectors = st.vectors
        work = query_vecs.shape[0] * vectors.shape[0] * vectors.shape[1]
        with _one_blas_thread(work):
            if vectors.dtype == np.float32:
                dense: F32 = query_vecs @ vectors.T
            else:  # float16 rows: upcast in slices (numpy has no fast half-precision GEMM)
                dense = np.empty((query_vecs.shape[0], vectors.shape[0]), dtype=np.float32)
                for lo in range(0, vectors.shape[0], 65_536):
                    part = np.asarray(vectors[lo : lo + 65_536], dtype=np.float32)
                    dense[:, lo : lo + 65_536] = query_vecs @ part.T
        lex = None
        if qlex is not None and st.inverted is not None:
            lex = np.asarray((qlex @ st.inverted).todense(), dtype=np.float32)
        return self._combine(dense, lex)

    def _subset_scores(
        self, st: _State, query_vecs: F32, qlex: sp.csr_matrix | None, forms: Any
    ) -> F32:
        """(queries x len(forms)) combined scores over the given forms only."""
        dense: F32 = query_vecs @ np.asarray(st.vectors[forms], dtype=np.float32).T
        lex = None
        if qlex is not None and st.lex_forms is not None:
            lex = np.asarray((qlex @ st.lex_forms[forms].T).todense(), dtype=np.float32)
        return self._combine(dense, lex)

    # -- search --------------------------------------------------------------------------

    def search(
        self,
        query_vecs: F32,
        queries: Sequence[str],
        k: int,
        *,
        allowed: npt.NDArray[np.bool_] | Callable[[Catalog], npt.NDArray[np.bool_]] | None = None,
    ) -> list[list[Candidate]]:
        """Top-``k`` candidates per query, best first.

        Args:
            query_vecs: ``(n, dim)`` unit vectors of the normalized queries.
            queries: the normalized query texts (for the lexical part).
            k: candidates per query (capped at the catalog size).
            allowed: a boolean mask over entities (a filter): no other entity is returned;
                or a function of the catalog searched that returns it (entity changes may
                swap the catalog in another thread at any time).
        """
        if query_vecs.ndim != 2 or query_vecs.shape[0] != len(queries):
            raise ConfigError("query_vecs must be (len(queries), dim)")
        st = self._state
        if callable(allowed):
            allowed = allowed(st.catalog)
        n_entities = len(st.catalog.entities)
        n_allowed = n_entities
        if allowed is not None:
            if allowed.shape != (n_entities,):
                raise ConfigError(f"allowed must be a mask of {n_entities} entities")
            n_allowed = int(allowed.sum())
            if n_allowed == 0:
                return [[] for _ in queries]
            k = min(k, n_allowed)
        k = max(1, min(k, n_entities))
        query_vecs = np.asarray(query_vecs, dtype=np.float32)
        out: list[list[Candidate]] = []
        for lo in range(0, len(queries), _QUERY_CHUNK):
            hi = lo + _QUERY_CHUNK
            qv, qs = query_vecs[lo:hi], queries[lo:hi]
            qlex = self._query_lexical(qs)
            if self._ann is not None:
                out.extend(self._ann_search(st, qv, qlex, k, allowed))
                continue
            entities = None
            if allowed is not None and n_allowed < n_entities // 4:
                entities = np.flatnonzero(allowed)  # a small filtered subset: score only it
            out.extend(self._top_k(st, qv, qlex, k, allowed, entities))
        return out

    def _ann_search(
        self,
        st: _State,
        qv: F32,
        qlex: sp.csr_matrix | None,
        k: int,
        allowed: npt.NDArray[np.bool_] | None,
    ) -> list[list[Candidate]]:
        """Per query: the dense and lexical shortlists (widened for a filter), re-scored
        exactly; exact search over the allowed entities when the filter is small or a
        shortlist holds fewer than ``k`` allowed entities."""
        assert self._ann is not None
        n_forms = len(st.catalog.forms)
        allowed_forms = n_forms if allowed is None else int(allowed[st.owners].sum())
        if allowed is not None and (allowed_forms <= _EXACT_SUBSET or allowed_forms < n_forms / 20):
            return self._top_k(st, qv, qlex, k, allowed, np.flatnonzero(allowed))
        widen = n_forms / max(1, allowed_forms)
        n = min(n_forms, int(max(_SHORTLIST, n_forms // _SHORTLIST_SHARE, 4 * k) * widen))
        with self._search_lock:
            slots = self._ann.search(qv, n, nprobe=int(self.nprobe * min(widen, 4.0)))
        lexical: list[npt.NDArray[np.int64]] = []
        if qlex is not None and st.inverted is not None and self._rare is not None:
            lexical = shortlist(qlex, st.inverted, self._rare, n)
        per_query: list[npt.NDArray[np.int64]] = []
        short: list[int] = []
        for row in range(qv.shape[0]):
            found = slots[row][(slots[row] >= 0) & (slots[row] < len(st.form_of_slot))]
            forms = st.form_of_slot[found]
            if lexical:
                forms = np.concatenate([forms[forms >= 0], lexical[row]])
            entities = np.unique(st.owners[forms[forms >= 0]])
            if allowed is not None:
                entities = entities[allowed[entities]]
            if len(entities) < k:
                short.append(row)
            per_query.append(entities)
        out = self._rescore(st, qv, qlex, k, per_query)
        everyone = np.flatnonzero(allowed) if allowed is not None else None
        for row in short:  # rare: fall back to exact search for this query
            qrow = qlex[row] if qlex is not None else None
            out[row] = self._top_k(st, qv[row : row + 1], qrow, k, allowed, everyone)[0]
        return out

    def _rescore(
        self,
        st: _State,
        qv: F32,
        qlex: sp.csr_matrix | None,
        k: int,
        per_query: list[npt.NDArray[np.int64]],
    ) -> list[list[Candidate]]:
        """Exact scores of each query's own candidate entities (all their forms)."""
        q_rows, form_parts, seg_starts = [], [], []
        base = 0
        for row, entities in enumerate(per_query):
            forms, offsets = _forms_of(st, entities)
            form_parts.append(forms)
            seg_starts.append(offsets + base)
            q_rows.append(np.full(len(forms), row, dtype=np.int64))
            base += len(forms)
        forms = np.concatenate(form_parts)
        qi = np.concatenate(q_rows)
        vecs = np.asarray(st.vectors[forms], dtype=np.float32)
        dense = np.einsum("ij,ij->i", vecs, qv[qi]).astype(np.float32)
        lex = None
        if qlex is not None and st.lex_forms is not None:
            bounds = np.cumsum([0] + [len(f) for f in form_parts]).tolist()
            lex = _pair_dots(qlex, st.lex_forms[forms], bounds)
        scores = self._combine(dense[None, :], None if lex is None else lex[None, :])[0]
        out: list[list[Candidate]] = []
        for row, entities in enumerate(per_query):
            starts = seg_starts[row]
            if len(entities) == 0:
                out.append([])
                continue
            seg_lo = int(starts[0])
            seg = scores[seg_lo : seg_lo + len(form_parts[row])]
            ends = np.r_[starts[1:], seg_lo + len(seg)]
            ent_scores = np.maximum.reduceat(seg, starts - seg_lo)
            kk = min(k, len(entities))
            top = np.argpartition(-ent_scores, kk - 1)[:kk]
            top = top[_best_first(ent_scores[top], entities[top])]
            cands = []
            for col in top:
                lo, hi = int(starts[col]), int(ends[col])
                best = lo + int(np.argmax(scores[lo:hi]))
                cands.append(
                    self._candidate(
                        st, qv[row], int(entities[col]), int(forms[best]), float(ent_scores[col])
                    )
                )
            out.append(cands)
        return out

    def _top_k(
        self,
        st: _State,
        qv: F32,
        qlex: sp.csr_matrix | None,
        k: int,
        allowed: npt.NDArray[np.bool_] | None,
        entities: npt.NDArray[np.int64] | None,
    ) -> list[list[Candidate]]:
        """Exact top-k over all entities (``entities`` None) or over a sorted subset."""
        if entities is None:
            form_scores = self._all_scores(st, qv, qlex)
            forms = None
            ent_scores = np.maximum.reduceat(form_scores, st.starts, axis=1)
            if allowed is not None:
                ent_scores[:, ~allowed] = -1.0  # below every real score (they are >= 0)
            ent_ids = None
            offsets = st.starts
        else:
            forms, offsets = _forms_of(st, entities)
            form_scores = self._subset_scores(st, qv, qlex, forms)
            ent_scores = np.maximum.reduceat(form_scores, offsets, axis=1)
            ent_ids = entities
        n = ent_scores.shape[1]
        kk = min(k, n)
        if kk < n:
            top = np.argpartition(-ent_scores, kk - 1, axis=1)[:, :kk]
        else:
            top = np.tile(np.arange(n), (ent_scores.shape[0], 1))
        ends = np.r_[offsets[1:], form_scores.shape[1]]
        out = []
        for row in range(ent_scores.shape[0]):
            positions = top[row] if ent_ids is None else ent_ids[top[row]]
            idx = top[row][_best_first(ent_scores[row, top[row]], positions)]
            cands = []
            for col in idx:
                start, end = int(offsets[col]), int(ends[col])
                best = start + int(np.argmax(form_scores[row, start:end]))
                form = best if forms is None else int(forms[best])
                entity = int(col) if ent_ids is None else int(ent_ids[col])
                cands.append(
                    self._candidate(st, qv[row], entity, form, float(ent_scores[row, col]))
                )
            out.append(cands)
        return out

    def _candidate(self, st: _State, qvec: F32, entity: int, form: int, score: float) -> Candidate:
        dense = float(qvec @ np.asarray(st.vectors[form], dtype=np.float32))
        w = self.lexical_weight
        # the lexical part, recovered from the combined score (exact unless clipped)
        lexical = (score - (1.0 - w) * dense) / w if w > 0 else None
        ent = st.catalog.entities[entity]
        return Candidate(
            entity_id=ent.id,
            name=ent.name,
            score=round(score, 6),
            dense_score=round(dense, 6),
            lexical_score=None if lexical is None else round(min(max(lexical, 0.0), 1.0), 6),
            matched_form=st.catalog.forms[form],
        )

    # -- incremental updates -------------------------------------------------------------

    def apply_changes(
        self,
        *,
        remove: Sequence[str] = (),
        add: Catalog | None = None,
        add_vectors: npt.NDArray[Any] | None = None,
    ) -> None:
        """Remove entities by id and append new ones (their forms and vectors): no rebuild.

        New forms are read by the build-time lexical vocabulary; the ANN index gets the new
        vectors under fresh slots and drops the removed ones. The new state is built aside
        while searches go on (safe from another thread than the searches'); they are held
        only while the ANN index changes, a chunk at a time, and for the swap: they see
        the old or the new catalog, never a mix.

        Raises:
            CatalogError: an unknown id to remove, or an added id already present.
        """
        with self._update_lock:
            st = self._state
            cat = st.catalog
            gone = set(remove)
            for entity_id in gone:
                if entity_id not in cat.by_id:
                    raise CatalogError(f"cannot remove unknown entity id {entity_id!r}")
            added = add.entities if add is not None else ()
            for e in added:
                if e.id in cat.by_id and e.id not in gone:
                    raise CatalogError(f"entity id {e.id!r} is already in the catalog")
            if len(gone) == len(cat.entities) and not added:
                raise CatalogError("cannot remove every entity: a catalog is never empty")
            if add is not None and (add_vectors is None or len(add_vectors) != len(add.forms)):
                raise ConfigError("add_vectors must hold one vector per added form")
            keep_ent = np.ones(len(cat.entities), dtype=bool)
            keep_ent[[cat.by_id[i] for i in gone]] = False
            keep_forms = keep_ent[st.owners]
            kept = np.flatnonzero(keep_forms)
            remap = np.cumsum(keep_ent) - 1
            n_kept = int(keep_ent.sum())
            entities = tuple(e for e, keep in zip(cat.entities, keep_ent, strict=True) if keep)
            forms = cat.forms if not gone else tuple(cat.forms[i] for i in kept.tolist())
            owners = tuple(remap[st.owners[kept]].tolist())
            new_vectors: npt.NDArray[Any] | None = None
            new_lex: sp.csr_matrix | None = None
            next_slot = len(st.form_of_slot)
            new_slots = np.arange(next_slot, next_slot + (len(add.forms) if add else 0))
            if add is not None and add_vectors is not None:
                entities += add.entities
                forms += add.forms
                owners += tuple(o + n_kept for o in add.form_entity)
                new_vectors = np.asarray(add_vectors, dtype=st.vectors.dtype)
                if self._vectorizer is not None:
                    new_lex = self._vectorizer.transform(list(add.forms)).tocsr()
            catalog = Catalog(
                entities=entities,
                forms=forms,
                form_entity=owners,
                by_id={e.id: i for i, e in enumerate(entities)},
            )
            lex = None if st.lex_forms is None else _keep_rows(st.lex_forms, keep_forms, new_lex)
            slots = np.concatenate([st.slots[kept], new_slots]).astype(np.int64)
            vectors = _take_rows(st.vectors, kept, new_vectors)
            new_state = _state(catalog, vectors, lex, slots)
            rare = self._rare_ngrams(new_state)
            if self._ann is not None:
                # a search of the old state skips slots it does not know (new ones) and
                # misses removed ones: the ANN index may change before the swap
                with self._search_lock:
                    self._ann.remove(st.slots[~keep_forms])
                if add is not None and add_vectors is not None:
                    dense = np.asarray(add_vectors, dtype=np.float32)
                    for lo in range(0, len(dense), _ANN_ADD_CHUNK):
                        with self._search_lock:
                            hi = lo + _ANN_ADD_CHUNK
                            self._ann.add(dense[lo:hi], new_slots[lo:hi])
            with self._search_lock:
                self._state, self._rare = new_state, rare
                self.version += 1

    # -- persistence ---------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the index to ``path`` (a directory), atomically.

        Each save writes a new version directory next to ``manifest.json``, then replaces
        the manifest in one ``os.replace``: a crash mid-save leaves the previous version
        current and loadable. Vectors and the lexical matrix are ``.npy`` files (loaded
        memory-mapped); the catalog is saved too, so :meth:`load` can restore it.
        """
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        st = self._state
        name = f"v{self.version:06d}-{uuid.uuid4().hex[:8]}"
        tmp = d / f"{name}.tmp"
        tmp.mkdir()
        np.save(tmp / "form_vectors.npy", st.vectors)
        np.save(tmp / "slots.npy", st.slots)
        np.save(tmp / "form_entity.npy", st.owners)
        if st.lex_forms is not None and self._vectorizer is not None:
            np.save(tmp / "lex_data.npy", st.lex_forms.data)
            np.save(tmp / "lex_indices.npy", st.lex_forms.indices)
            np.save(tmp / "lex_indptr.npy", st.lex_forms.indptr)
            save_vectorizer(self._vectorizer, tmp)
        if self._ann is not None:
            self._ann.save(tmp / "ann.faiss")
        with (tmp / "entities.jsonl").open("w", encoding="utf-8") as f:
            for e in st.catalog.entities:
                f.write(e.model_dump_json() + "\n")
        (tmp / "forms.json").write_text(json.dumps(st.catalog.forms), encoding="utf-8")
        for file in tmp.iterdir():
            with file.open("rb") as fh:
                os.fsync(fh.fileno())
        tmp.rename(d / name)
        manifest: dict[str, Any] = {
            "format": 2,
            "version": self.version,
            "current": name,
            "fingerprint": catalog_fingerprint(st.catalog),
            "embedder": self.embedder_name,
            "lexical_weight": self.lexical_weight,
            "forms": len(st.catalog.forms),
            "entities": len(st.catalog.entities),
            "index": "ann" if self._ann is not None else "exact",
            "lexical": st.lex_forms is not None,
            "lex_shape": list(st.lex_forms.shape) if st.lex_forms is not None else None,
        }
        staged = d / f"{_MANIFEST}.tmp"
        staged.write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        with staged.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(staged, d / _MANIFEST)
        for old in d.iterdir():  # earlier versions and crashed saves
            if old.is_dir() and _VERSION_DIR.fullmatch(old.name) and old.name != name:
                shutil.rmtree(old, ignore_errors=True)
        (d / "form_vectors.npy").unlink(missing_ok=True)  # format 1 leftovers

    @staticmethod
    def read_manifest(path: str | Path) -> dict[str, Any]:
        """The manifest of a saved index (``fingerprint``, ``version``, ``embedder``, ...)."""
        d = Path(path)
        try:
            manifest: dict[str, Any] = json.loads((d / _MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load index from {d}: {exc}") from exc
        return manifest

    @staticmethod
    def saved_catalog(path: str | Path) -> Catalog:
        """The catalog a saved index (format 2) was built for, as it was saved."""
        d = Path(path)
        manifest = HybridIndex.read_manifest(d)
        if manifest.get("format") != 2:
            raise ConfigError(f"index at {d} does not store its catalog (old format)")
        v = d / str(manifest["current"])
        try:
            with (v / "entities.jsonl").open(encoding="utf-8") as f:
                entities = tuple(Entity.model_validate_json(line) for line in f)
            forms = tuple(json.loads((v / "forms.json").read_text(encoding="utf-8")))
            owners = tuple(np.load(v / "form_entity.npy").tolist())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the catalog of the index at {d}: {exc}") from exc
        return Catalog(
            entities=entities,
            forms=forms,
            form_entity=owners,
            by_id={e.id: i for i, e in enumerate(entities)},
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        catalog: Catalog | None = None,
        *,
        embedder_name: str | None = None,
        lexical_weight: float | None = None,
        index: IndexMode | None = None,
        nprobe: int = 32,
    ) -> HybridIndex:
        """Load an index saved by :meth:`save` (vectors memory-mapped).

        ``catalog`` None restores the saved catalog. ``lexical_weight`` overrides the saved
        weight (vectors do not depend on it). ``index`` asks for a mode: an ANN index is
        rebuilt from the vectors when the saved one is exact, and vice versa.

        Raises:
            ConfigError: missing files, or the index was built for another catalog (a stale
                index) or embedder.
        """
        d = Path(path)
        manifest = cls.read_manifest(d)
        if catalog is None:
            catalog = cls.saved_catalog(d)
        if manifest.get("fingerprint") != catalog_fingerprint(catalog):
            raise ConfigError(f"index at {d} was built for a different catalog (stale): rebuild it")
        if embedder_name is not None and manifest.get("embedder") != embedder_name:
            saved_by = str(manifest.get("embedder"))
            known = "@" in saved_by or saved_by.startswith(DEFAULT_MODEL_NAME)
            which = f"encoder={encoder_of(saved_by)!r}" if known else repr(saved_by)
            raise ConfigError(
                f"index at {d} was built with embedder {saved_by!r}, not {embedder_name!r}: "
                f"vectors of two embedders cannot be mixed; load it with {which} "
                f"or rebuild it (remove {d})"
            )
        saved_w = float(manifest.get("lexical_weight", 0.5))
        weight = lexical_weight if lexical_weight is not None else saved_w
        embedder = str(manifest.get("embedder", ""))
        mode: IndexMode = index or ("ann" if manifest.get("index") == "ann" else "auto")
        v = d / str(manifest.get("current", ""))
        try:
            if manifest.get("format") != 2:
                vectors = np.load(d / "form_vectors.npy")
                return cls(catalog, vectors, lexical_weight=weight, embedder_name=embedder)
            vectors = np.load(v / "form_vectors.npy", mmap_mode="r")
            slots = np.load(v / "slots.npy")
            vectorizer, lex = None, None
            if manifest.get("lexical"):
                lex = sp.csr_matrix(
                    (
                        np.load(v / "lex_data.npy", mmap_mode="r"),
                        np.load(v / "lex_indices.npy", mmap_mode="r"),
                        np.load(v / "lex_indptr.npy", mmap_mode="r"),
                    ),
                    shape=tuple(manifest["lex_shape"]),
                    copy=False,
                )
                vectorizer = load_vectorizer(v)
            use_ann = mode == "ann" or (
                mode == "auto" and len(catalog.forms) >= ANN_MIN_FORMS and faiss_available()
            )
            ann = None
            if use_ann:
                vectors = np.asarray(vectors, dtype=np.float16)
                ann = (
                    DenseANN.load(v / "ann.faiss", nprobe=nprobe)
                    if (v / "ann.faiss").exists()
                    else DenseANN.build(vectors, slots, nprobe=nprobe)
                )
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"cannot load index from {d}: {exc}") from exc
        if (weight > 0) != bool(manifest.get("lexical")):
            # the lexical matrix was (not) saved: refit rather than guess
            return cls(catalog, vectors, lexical_weight=weight, embedder_name=embedder, index=mode)
        loaded = cls(
            catalog,
            vectors,
            lexical_weight=weight,
            embedder_name=embedder,
            index="ann" if use_ann else "exact",
            nprobe=nprobe,
            _restored=(vectorizer, lex, slots, ann),
        )
        loaded.version = int(manifest.get("version", 0))
        return loaded


def _best_first(scores: npt.NDArray[np.float32], entities: npt.NDArray[np.int64]) -> Any:
    """Order best first by the score as reported (6 decimals), ties in catalog order.

    Duplicate entities differ only by float noise that depends on how the texts were
    batched; their order must not (it decides "top" answers).
    """
    return np.lexsort((entities, -np.round(scores, 6)))
