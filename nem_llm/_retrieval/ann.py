"""Approximate dense shortlists with faiss (IVF + 8-bit scalar quantizer), updatable in place.

The ANN index only proposes candidates; :class:`~nem_llm._retrieval.index.HybridIndex`
re-scores them exactly. Ids in the faiss index are stable *slots* (a form keeps its slot
across updates), so removing and adding forms never renumbers the index.

Why IVF and not HNSW (measured, benchmarks/bench_scale.py): faiss HNSW cannot remove
vectors (incremental updates need ``remove_ids``), and IVF-SQ8 takes 392 bytes per vector
(codes + id) where HNSW32-Flat takes ~1.8 KB. The price: on real MiniLM vectors of the
development sets the dense top-100 alone recalls less (IVF-SQ8 nprobe 32: 0.79-0.998;
HNSW32 efSearch 128: 0.98-1.0); with the lexical shortlist and exact re-scoring, R@10 with
``index="ann"`` stays within 0.0004 of exact on all four sets. Worth revisiting (HNSW with
tombstones, or a higher ``nprobe``) for catalogs whose names share few n-grams.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..errors import ConfigError

__all__ = ["DenseANN", "faiss_available"]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
_TRAIN_SAMPLE = 100_000  # k-means training points (enough for 4k lists; bounds build time)
_MIN_PER_LIST = 39  # faiss wants >= 39 training points per centroid
_SMALL_SEARCH = 256  # queries searched at once on one OpenMP thread (a micro-batch)


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError(
            'ANN search needs faiss-cpu: pip install "nem_llm[ann]" (or use search="exact")'
        ) from exc
    return faiss


def faiss_available() -> bool:
    """Whether faiss-cpu can be imported."""
    try:
        _faiss()
    except ConfigError:
        return False
    return True


def default_nlist(n: int) -> int:
    """Inverted lists for ``n`` vectors: ~4 sqrt(n), at most n / 39 (k-means needs points)."""
    return max(1, min(int(4 * math.sqrt(n)), n // _MIN_PER_LIST))


class DenseANN:
    """An inner-product IVF-SQ8 index over unit vectors, keyed by int64 slots.

    Thread-safe: searches and updates hold one lock (faiss indexes are not safe to search
    while being modified).
    """

    def __init__(self, index: Any, *, nprobe: int = 32) -> None:
        self._index = index
        self._lock = threading.Lock()
        self.nprobe = nprobe
        _faiss().extract_index_ivf(index).nprobe = min(nprobe, index.nlist)

    @classmethod
    def build(cls, vectors: npt.NDArray[Any], slots: I64, *, nprobe: int = 32) -> DenseANN:
        """Train on a sample and add every vector (float16 or float32 rows)."""
        faiss = _faiss()
        n, dim = vectors.shape
        nlist = default_nlist(n)
        index = faiss.index_factory(dim, f"IVF{nlist},SQ8", faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(n, size=min(n, max(_TRAIN_SAMPLE, nlist * 40)), replace=False))
        index.train(np.ascontiguousarray(vectors[sample], dtype=np.float32))
        ann = cls(index, nprobe=nprobe)
        ann.add(vectors, slots)
        return ann

    @property
    def size(self) -> int:
        return int(self._index.ntotal)

    def add(self, vectors: npt.NDArray[Any], slots: I64, *, chunk: int = 65_536) -> None:
        """Add vectors under the given slots (in chunks: bounds the float32 copy)."""
        with self._lock:
            for lo in range(0, len(slots), chunk):
                part = np.ascontiguousarray(vectors[lo : lo + chunk], dtype=np.float32)
                self._index.add_with_ids(part, np.ascontiguousarray(slots[lo : lo + chunk]))

    def remove(self, slots: I64) -> None:
        """Remove the vectors stored under these slots."""
        if len(slots) == 0:
            return
        faiss = _faiss()
        with self._lock:
            self._index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(slots)))

    def search(self, query_vecs: F32, n: int, *, nprobe: int | None = None) -> I64:
        """The ``n`` nearest slots per query (``-1`` pads when fewer exist)."""
        faiss = _faiss()
        params = faiss.SearchParametersIVF(nprobe=min(nprobe or self.nprobe, self._index.nlist))
        with self._lock:
            # a query micro-batch searches on one OpenMP thread: more only spin-wait on a
            # busy machine (50 queries x 110k forms: 2.27 vs 1.80 ms wall per query of the
            # whole search, two shared cores); faiss's setting is process-wide: restored
            threads = faiss.omp_get_max_threads()
            small = len(query_vecs) <= _SMALL_SEARCH and threads > 1
            if small:
                faiss.omp_set_num_threads(1)
            try:
                _, ids = self._index.search(
                    np.ascontiguousarray(query_vecs, dtype=np.float32), n, params=params
                )
            finally:
                if small:
                    faiss.omp_set_num_threads(threads)
        return np.asarray(ids, dtype=np.int64)

    def save(self, path: Path) -> None:
        with self._lock:
            _faiss().write_index(self._index, str(path))

    @classmethod
    def load(cls, path: Path, *, nprobe: int = 32) -> DenseANN:
        return cls(_faiss().read_index(str(path)), nprobe=nprobe)

    def nbytes(self) -> int:
        """Approximate memory: codes plus ids (centroids are negligible)."""
        ivf = _faiss().extract_index_ivf(self._index)
        return int(self._index.ntotal) * (int(ivf.code_size) + 8)
