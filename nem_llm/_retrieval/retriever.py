"""The retrieval stage: the index, candidate filters, and catalog changes.

:class:`Retriever` owns the :class:`~nem_llm._retrieval.index.HybridIndex` and the encoder
that feeds it. Every search (and the encoding of its queries) runs in one worker thread
(the ``executor``), never on the event loop: :meth:`Retriever.search_batch` is the function
the Matcher's micro-batcher calls with a flush of concurrent queries, and
:meth:`Retriever.retrieve_many` searches large lists straight away (calibration). Entity
changes are encoded and built in a thread of their own, beside the searches, and swapped
in at once: a large change never holds queries up (so the embedder is called from two
threads; the torch and onnx encoders were checked to give the same vectors that way).

Filters (``where``) are turned into a boolean mask over the catalog once and kept; entity
changes outdate a mask, which is then recomputed for the catalog a search reads, so a
search never sees a mask of another catalog.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..catalog import Catalog, EntitySource, load_catalog
from ..errors import ConfigError, NotReadyError
from ..models import Candidate
from ..settings import SearchMode
from .embedding import Embedder
from .index import HybridIndex

__all__ = ["Retriever", "SearchItem", "Where", "Wheres", "where_lookup"]

#: A candidate filter on entity attributes: ``{"country": "FR"}`` (equality) or
#: ``{"country": ["FR", "BE"]}`` (membership); every key must hold.
Where = Mapping[str, Any]
#: One filter for every query, or one per query (a sequence, or a function of the query's
#: position; ``None`` = no filter for that one).
Wheres = Where | Sequence[Where | None] | Callable[[int], Where | None] | None
#: One query of a flush: (normalized text, k, filter key or None).
SearchItem = tuple[str, int, str | None]

# texts per worker-thread call of retrieve_many (calibration, probes)
_CHUNK = 256


def where_lookup(where: Wheres, check: Callable[[Where], object]) -> Callable[[int], Where | None]:
    """Per-position filter lookup; a shared filter is checked now (a clear ConfigError)."""
    if where is None:
        return lambda i: None
    if isinstance(where, Mapping):
        check(where)
        shared = where
        return lambda i: shared
    if callable(where):
        return where
    if isinstance(where, str | bytes) or not isinstance(where, Sequence):
        raise ConfigError(
            f"where must be a mapping or a sequence of mappings, got {type(where).__name__}"
        )
    rows = where

    def lookup(i: int) -> Where | None:
        if i >= len(rows):
            raise ConfigError(f"no filter for query {i}: where has {len(rows)} entries")
        return rows[i]

    return lookup


class Retriever:
    """Candidates for normalized queries: encode, search, filter (in one worker thread).

    Args:
        catalog: the validated catalog.
        embedder: the encoder of catalog forms and queries (fine-tuning may replace it).
        lexical_weight: weight of the character n-gram score in a form's score.
        search: ``"exact"``, ``"ann"`` or ``"auto"``.
        executor: the one worker thread every encode and search runs in.
    """

    def __init__(
        self,
        catalog: Catalog,
        embedder: Embedder,
        *,
        lexical_weight: float,
        search: SearchMode,
        index_description: bool,
        executor: ThreadPoolExecutor,
    ) -> None:
        self.catalog = catalog
        self.embedder = embedder
        self.lexical_weight = lexical_weight
        self.search = search
        self.index_description = index_description
        self.executor = executor
        self.index: HybridIndex | None = None
        # filter key -> (the catalog its mask was computed on, the mask, the filter)
        self._masks: dict[str, tuple[Catalog, npt.NDArray[np.bool_], Where]] = {}
        self._write_lock = threading.Lock()  # entity changes, one at a time

    def require_index(self) -> HybridIndex:
        """The built index, or a :class:`NotReadyError` that says what to call."""
        if self.index is None:
            raise NotReadyError(
                "the matcher is not ready: call `await matcher.fit_async()` (or "
                "`matcher.fit()`) before matching"
            )
        return self.index

    # -- building ------------------------------------------------------------------------

    def build(self, index_dir: Path | None) -> HybridIndex:
        """Load the index saved in ``index_dir``, or encode the catalog (and save it there)."""
        if index_dir is not None and (index_dir / "manifest.json").exists():
            return HybridIndex.load(
                index_dir,
                self.catalog,
                embedder_name=self.embedder.name,
                lexical_weight=self.lexical_weight,
                index=self.search,
            )
        vectors = self.embedder.encode(list(self.catalog.forms))
        index = HybridIndex(
            self.catalog,
            vectors,
            lexical_weight=self.lexical_weight,
            embedder_name=self.embedder.name,
            index=self.search,
        )
        if index_dir is not None:
            index.save(index_dir)
        return index

    # -- searching -----------------------------------------------------------------------

    def mask_key(self, where: Where | None) -> str | None:
        """A filter's key (its mask is computed once and kept); checks the filter now."""
        if where is None:
            return None
        if not isinstance(where, Mapping):
            raise ConfigError(f"where must be a mapping, got {type(where).__name__}")
        key = json.dumps(dict(where), sort_keys=True, default=str)
        if key not in self._masks:
            self._masks[key] = (self.catalog, self.catalog.where_mask(where), where)
        return key

    def search_batch(self, items: list[SearchItem]) -> list[list[Candidate]]:
        """Encode and search one flush (in the worker thread, never on the event loop)."""
        index = self.require_index()
        texts = [text for text, _, _ in items]
        vectors = np.asarray(self.embedder.encode(texts), dtype=np.float32)
        out: list[list[Candidate]] = [[] for _ in items]
        groups: dict[str | None, list[int]] = {}
        for i, (_, _, mask_key) in enumerate(items):
            groups.setdefault(mask_key, []).append(i)
        for mask_key, rows in groups.items():
            k = max(items[i][1] for i in rows)
            allowed = functools.partial(self._allowed, mask_key) if mask_key is not None else None
            found = index.search(vectors[rows], [texts[i] for i in rows], k, allowed=allowed)
            for i, cands in zip(rows, found, strict=True):
                out[i] = cands[: items[i][1]]
        return out

    async def retrieve_many_async(self, texts: Sequence[str], k: int) -> list[list[Candidate]]:
        """Search a long list straight in the worker thread, in large chunks (no
        micro-batcher, no loop binding): for calibration."""
        loop = asyncio.get_running_loop()
        found: list[list[Candidate]] = []
        for lo in range(0, len(texts), _CHUNK):
            chunk: list[SearchItem] = [(t, k, None) for t in texts[lo : lo + _CHUNK]]
            found.extend(await loop.run_in_executor(self.executor, self.search_batch, chunk))
        return found

    def _allowed(self, key: str, catalog: Catalog) -> npt.NDArray[np.bool_]:
        """A filter's mask over ``catalog``, the one being searched (entity changes outdate
        older masks; the index asks with the catalog of the state it searches, so a search
        never sees a mask of another catalog)."""
        seen, mask, where = self._masks[key]
        if seen is not catalog:
            try:
                mask = catalog.where_mask(where)
            except ConfigError:  # the last entity with the filter's attribute was removed
                mask = np.zeros(len(catalog.entities), dtype=bool)
            self._masks[key] = (catalog, mask, where)
        return mask

    # -- catalog changes -----------------------------------------------------------------

    async def change_entities_async(
        self,
        *,
        remove: Sequence[str] = (),
        add: EntitySource | None = None,
        replace: bool = False,
        index_dir: Path | None = None,
    ) -> Catalog:
        """Add, remove or replace entities in the built index; returns the new catalog.

        Only the new surface forms are encoded. A change is built aside, in a thread of its
        own, while queries go on being answered from the index as it was; then the new
        state is swapped in at once (``HybridIndex.apply_changes``) and saved to
        ``index_dir`` when given. Changes run one at a time; the next query sees them.
        (The embedder is called from this thread and the search thread at once.)
        """
        index = self.require_index()
        if isinstance(remove, str):
            raise ConfigError("ids must be a list of entity ids, not one string")
        if isinstance(add, list | tuple) and not add:
            add = None

        def work() -> None:
            with self._write_lock:
                new = None
                if add:
                    new = load_catalog(add, include_description=self.index_description)
                gone = [e.id for e in new.entities] if new is not None and replace else remove
                vectors = self.embedder.encode(list(new.forms)) if new is not None else None
                index.apply_changes(remove=list(gone), add=new, add_vectors=vectors)
                if index_dir is not None:
                    index.save(index_dir)

        # not the search thread (self.executor): a large change must not hold queries up
        await asyncio.get_running_loop().run_in_executor(None, work)
        self.catalog = index.catalog
        return index.catalog
