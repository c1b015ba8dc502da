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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import scipy.sparse as sp

from ..catalog import Catalog
from ..errors import CatalogError, ConfigError
from ..models import Candidate, Entity
from .ann import DenseANN, faiss_available
from .arrays import (
    Hits,
    dense_top,
    keep_rows,
    ragged_top,
    row_dots,
    segment_argmax,
    take_rows,
)
from .embedding import DEFAULT_MODEL_NAME
from .encoders import encoder_of
from .lexical import fit_vectorizer, load_vectorizer, save_vectorizer, shortlist

__all__ = ["ANN_MIN_FORMS", "HybridIndex", "IndexMode", "catalog_fingerprint"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
_QUERY_CHUNK = 64  # queries scored at once: bounds the (queries x forms) score matrix
# Forms per query from each of the dense and lexical ANN shortlists: at least 100, and one
# in 1,500 forms. Measured at 1.1M forms of near-duplicate names (bench_scale.py): 100 gave
# 0.95 agreement with exact top-10, 300 0.99, 600 1.0 (at 31x the speed of exact search).
_SHORTLIST = 100
_SHORTLIST_SHARE = 1_500
_EXACT_SUBSET = 20_000  # a filter allowing at most this many forms: exact over them
_ANN_ADD_CHUNK = 4_096  # vectors added to the ANN index while searches wait (a moment)
# A lexical index of at most this many (n-gram x form) cells is also kept dense (64 MB)
_DENSE_LEXICAL = 16_000_000
# Below this many multiply-adds (queries x forms x dim) dense products run on one BLAS
# thread. OpenBLAS's helper threads busy-wait after a product (CPU taken from the encoder
# and the event loop) and lose to one thread on a busy machine: 64 queries x 1,000 forms
# took 12.6-22 ms on two threads vs 1.5 ms on one, x 100,000 forms 169 vs 120 ms (load 4.3,
# two cores). Only exact search over several 100k forms is left to use both cores.
_SMALL_PRODUCT = 8_000_000_000
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
    starts: I64  # first form of each entity
    counts: I64  # forms of each entity
    owners: I64  # entity of each form
    slots: I64  # stable ANN id of each form
    form_of_slot: I64  # current form of each slot (-1: removed)
    entity_ids: tuple[str, ...]  # each entity's id and name, for the candidates
    entity_names: tuple[str, ...]

    # the lexical postings as one dense (n-grams x forms) array, for a small catalog (made
    # on first use): a batch's lexical scores are then one sparse x dense product, several
    # times faster than a sparse x sparse one made dense after
    dense_inverted: list[npt.NDArray[np.float32]] = field(default_factory=list)

    def inverted_array(self) -> npt.NDArray[np.float32] | None:
        """:attr:`inverted` as a dense array if it has at most ``_DENSE_LEXICAL`` cells."""
        inv = self.inverted
        if inv is None or inv.shape[0] * inv.shape[1] > _DENSE_LEXICAL:
            return None
        if not self.dense_inverted:
            self.dense_inverted.append(inv.toarray().astype(np.float32))
        return self.dense_inverted[0]

    @property
    def single_form(self) -> bool:
        """Whether every entity has one form (then form and entity positions coincide)."""
        return len(self.starts) == len(self.owners)


def _state(
    catalog: Catalog,
    vectors: npt.NDArray[Any],
    lex_forms: sp.csr_matrix | None,
    slots: I64,
    *,
    inverted: sp.csr_matrix | None = None,
) -> _State:
    owners = np.asarray(catalog.form_entity, dtype=np.int64)
    form_of_slot = np.full(int(slots.max()) + 1 if len(slots) else 0, -1, dtype=np.int64)
    form_of_slot[slots] = np.arange(len(slots), dtype=np.int64)
    # forms of one entity are contiguous: reduceat over these starts gives per-entity max
    starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]]).astype(np.int64)
    return _State(
        catalog=catalog,
        vectors=vectors,
        lex_forms=lex_forms,
        inverted=inverted if inverted is not None or lex_forms is None else lex_forms.T.tocsr(),
        starts=starts,
        counts=np.diff(np.r_[starts, len(owners)]).astype(np.int64),
        owners=owners,
        slots=slots,
        form_of_slot=form_of_slot,
        entity_ids=tuple(e.id for e in catalog.entities),
        entity_names=tuple(e.name for e in catalog.entities),
    )


def _forms_of(st: _State, entities: I64) -> tuple[I64, I64, I64]:
    """The form positions of ``entities``, entity after entity, and where each entity's
    forms start in that list and how many there are."""
    lens = st.counts[entities]
    starts = np.cumsum(lens) - lens
    forms = np.repeat(st.starts[entities] - starts, lens) + np.arange(int(lens.sum()))
    return forms.astype(np.int64, copy=False), starts, lens


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
            table = st.inverted_array()
            product = qlex @ (st.inverted if table is None else table)
            lex = np.asarray(product.todense() if table is None else product, dtype=np.float32)
        return self._combine(dense, lex)

    def _subset_scores(
        self, st: _State, query_vecs: F32, qlex: sp.csr_matrix | None, forms: Any
    ) -> F32:
        """(queries x len(forms)) combined scores over the given forms only."""
        vectors = np.asarray(st.vectors[forms], dtype=np.float32)
        with _one_blas_thread(query_vecs.shape[0] * vectors.size):
            dense: F32 = query_vecs @ vectors.T
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

        Ties (equal scores as reported, 6 decimals) are ordered by catalog position, and
        the ``k``-th place goes to the first of tied entities: a top-``k`` list is the
        head of a top-``K`` list for ``K > k`` (exact search).

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
            out.extend(self._candidates(st, qv, self._top_k(st, qv, qlex, k, allowed, entities)))
        return out

    def _ann_search(
        self,
        st: _State,
        qv: F32,
        qlex: sp.csr_matrix | None,
        k: int,
        allowed: npt.NDArray[np.bool_] | None,
    ) -> list[list[Candidate]]:
        """The dense and lexical shortlists of the batch (widened for a filter), re-scored
        exactly; exact search over the allowed entities when the filter is small or a
        query's shortlist holds fewer than ``k`` allowed entities."""
        assert self._ann is not None
        n_forms = len(st.catalog.forms)
        n_entities = len(st.catalog.entities)
        allowed_forms = n_forms if allowed is None else int(allowed[st.owners].sum())
        if allowed is not None and (allowed_forms <= _EXACT_SUBSET or allowed_forms < n_forms / 20):
            hits = self._top_k(st, qv, qlex, k, allowed, np.flatnonzero(allowed))
            return self._candidates(st, qv, hits)
        widen = n_forms / max(1, allowed_forms)
        n = min(n_forms, int(max(_SHORTLIST, n_forms // _SHORTLIST_SHARE, 4 * k) * widen))
        with self._search_lock:
            slots = self._ann.search(qv, n, nprobe=int(self.nprobe * min(widen, 4.0)))
        found = (slots >= 0) & (slots < len(st.form_of_slot))
        rows = np.nonzero(found)[0]
        forms = st.form_of_slot[slots[found]]
        if qlex is not None and st.inverted is not None and self._rare is not None:
            lex_rows, lex_forms = shortlist(qlex, st.inverted, self._rare, n)
            rows = np.concatenate([rows, lex_rows])
            forms = np.concatenate([forms, lex_forms])
        live = forms >= 0
        # each query's candidate entities, once each: (row, entity) sorted by row, entity
        pairs = np.unique(rows[live].astype(np.int64) * n_entities + st.owners[forms[live]])
        pair_rows, pair_entities = np.divmod(pairs, n_entities)
        if allowed is not None:
            keep = allowed[pair_entities]
            pair_rows, pair_entities = pair_rows[keep], pair_entities[keep]
        hits = self._rescore(st, qv, qlex, k, pair_rows, pair_entities)
        out = self._candidates(st, qv, hits)
        counts = np.bincount(pair_rows, minlength=qv.shape[0])
        everyone = np.flatnonzero(allowed) if allowed is not None else None
        for row in np.flatnonzero(counts < k).tolist():  # rare: exact search for this query
            qrow = qlex[row] if qlex is not None else None
            exact = self._top_k(st, qv[row : row + 1], qrow, k, allowed, everyone)
            out[row] = self._candidates(st, qv[row : row + 1], exact)[0]
        return out

    def _rescore(
        self,
        st: _State,
        qv: F32,
        qlex: sp.csr_matrix | None,
        k: int,
        rows: I64,
        entities: I64,
    ) -> Hits:
        """Exact scores of each query's own candidate entities (all their forms), top ``k``.

        ``rows`` and ``entities`` pair each query (a row of ``qv``) with one of its
        candidate entities, sorted by row.
        """
        if len(entities) == 0:
            return Hits.empty(qv.shape[0])
        forms, seg_starts, seg_lens = _forms_of(st, entities)
        form_rows = np.repeat(rows, seg_lens)
        vecs = np.asarray(st.vectors[forms], dtype=np.float32)
        scores = np.einsum("ij,ij->i", vecs, qv[form_rows]).astype(np.float32, copy=False)
        lex = None
        if qlex is not None and st.lex_forms is not None:
            lex = row_dots(qlex[form_rows], st.lex_forms[forms])
        scores = self._combine(scores[None, :], None if lex is None else lex[None, :])[0]
        ent_scores = np.maximum.reduceat(scores, seg_starts)
        best = segment_argmax(scores, ent_scores, seg_starts, seg_lens)
        order, bounds = ragged_top(rows, entities, ent_scores, k, qv.shape[0])
        return Hits(rows[order], entities[order], forms[best[order]], ent_scores[order], bounds)

    def _top_k(
        self,
        st: _State,
        qv: F32,
        qlex: sp.csr_matrix | None,
        k: int,
        allowed: npt.NDArray[np.bool_] | None,
        entities: npt.NDArray[np.int64] | None,
    ) -> Hits:
        """Exact top-k over all entities (``entities`` None) or over a sorted subset."""
        if entities is None:
            form_scores = self._all_scores(st, qv, qlex)
            ent_scores = np.maximum.reduceat(form_scores, st.starts, axis=1)
            if allowed is not None:
                ent_scores[:, ~allowed] = -1.0  # below every real score (they are >= 0)
            offsets, counts = st.starts, st.counts
            subset_forms = None
        else:
            subset_forms, offsets, counts = _forms_of(st, entities)
            form_scores = self._subset_scores(st, qv, qlex, subset_forms)
            ent_scores = np.maximum.reduceat(form_scores, offsets, axis=1)
        cols = dense_top(ent_scores, min(k, ent_scores.shape[1]))
        n_rows, kk = cols.shape
        rows = np.repeat(np.arange(n_rows, dtype=np.int64), kk)
        flat = cols.ravel()
        scores = ent_scores[rows, flat]
        if st.single_form and subset_forms is None:
            best = flat  # one form per entity: its form is the entity's position
        else:  # the first best form of each chosen entity
            lens = counts[flat]
            starts = np.cumsum(lens) - lens
            cand = np.repeat(offsets[flat] - starts, lens) + np.arange(int(lens.sum()))
            values = form_scores[np.repeat(rows, lens), cand]
            best = cand[segment_argmax(values, scores, starts, lens)]
        if entities is not None and subset_forms is not None:
            flat, best = entities[flat], subset_forms[best]
        bounds = np.arange(0, n_rows * kk + 1, kk, dtype=np.int64)
        return Hits(rows, flat, best, scores, bounds)

    def _candidates(self, st: _State, qv: F32, hits: Hits) -> list[list[Candidate]]:
        """The batch's candidate lists from its flat hits (scores reported to 6 decimals)."""
        vecs = np.asarray(st.vectors[hits.forms], dtype=np.float32)
        dense = np.einsum("ij,ij->i", vecs, qv[hits.rows]).astype(np.float64)
        score = hits.scores.astype(np.float64)
        w = self.lexical_weight
        scores = [round(x, 6) for x in score.tolist()]
        denses = [round(x, 6) for x in dense.tolist()]
        lexicals: list[float | None]
        if w > 0:
            # the lexical part, recovered from the combined score (exact unless clipped)
            lexical = np.clip((score - (1.0 - w) * dense) / w, 0.0, 1.0)
            lexicals = [round(x, 6) for x in lexical.tolist()]
        else:
            lexicals = [None] * len(scores)
        ids, names, forms = st.entity_ids, st.entity_names, st.catalog.forms
        make = Candidate.model_construct  # the fields are of their types: no validation
        flat = [
            make(
                entity_id=ids[e],
                name=names[e],
                score=s,
                dense_score=d,
                lexical_score=x,
                matched_form=forms[f],
            )
            for e, f, s, d, x in zip(
                hits.entities.tolist(), hits.forms.tolist(), scores, denses, lexicals, strict=True
            )
        ]
        b = hits.bounds.tolist()
        return [flat[b[i] : b[i + 1]] for i in range(len(b) - 1)]

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
            lex = None if st.lex_forms is None else keep_rows(st.lex_forms, keep_forms, new_lex)
            slots = np.concatenate([st.slots[kept], new_slots]).astype(np.int64)
            vectors = take_rows(st.vectors, kept, new_vectors)
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
