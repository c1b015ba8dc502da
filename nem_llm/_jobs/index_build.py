"""``nem-llm index build``: encode a catalog in resumable chunks, then save the index.

Encoding is the slow part (MiniLM: ~1,000 forms/s on two cores, hours for millions of
forms). Each chunk of encoded forms is written to ``<out>/.chunks/`` as it finishes, named
for the catalog fingerprint and embedder, so an interrupted build (Ctrl-C, a crash)
resumes at the first missing chunk. The index itself is saved atomically (see
``HybridIndex.save``) and the chunks are removed afterwards.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .._retrieval.embedding import Embedder
from .._retrieval.index import HybridIndex, IndexMode, catalog_fingerprint
from ..catalog import Catalog

__all__ = ["build_index"]

ChunkHook = Callable[[int, int], None]


def _save_chunk(path: Path, vectors: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, vectors)
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def build_index(
    catalog: Catalog,
    embedder: Embedder,
    out: Path,
    *,
    index: IndexMode = "auto",
    lexical_weight: float = 0.5,
    chunk_size: int = 20_000,
    on_chunk: ChunkHook | None = None,
) -> HybridIndex:
    """Encode ``catalog``'s forms chunk by chunk (resuming saved chunks), build, save.

    Args:
        on_chunk: ``hook(forms_done, forms_total)`` after every chunk (progress).
    """
    forms = list(catalog.forms)
    key = f"{catalog_fingerprint(catalog)[:16]}-{embedder.name.replace('/', '_')}"
    chunks = out / ".chunks" / key
    chunks.mkdir(parents=True, exist_ok=True)
    parts = []
    for n, lo in enumerate(range(0, len(forms), chunk_size)):
        path = chunks / f"{n:06d}.npy"
        if path.exists():
            vectors = np.load(path)
        else:
            vectors = np.asarray(embedder.encode(forms[lo : lo + chunk_size]), dtype=np.float32)
            _save_chunk(path, vectors)
        parts.append(vectors)
        if on_chunk is not None:
            on_chunk(min(lo + chunk_size, len(forms)), len(forms))
    built = HybridIndex(
        catalog,
        np.concatenate(parts) if parts else np.zeros((0, 1), dtype=np.float32),
        lexical_weight=lexical_weight,
        embedder_name=embedder.name,
        index=index,
    )
    built.save(out)
    shutil.rmtree(out / ".chunks", ignore_errors=True)
    return built
