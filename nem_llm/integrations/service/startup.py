"""What a serving process starts from: the live catalog of a saved index, or a catalog file.

Entity writes change the index (saved to ``index_dir`` after each), not the catalog file.
A restart must therefore serve the index's own catalog, changes included; the file only
seeds an index that does not exist yet. (Serving the file against an index it no longer
describes would find the index stale and never become ready.)
"""

from __future__ import annotations

from pathlib import Path

from ..._retrieval.index import HybridIndex
from ...catalog import Catalog
from ...errors import ConfigError

__all__ = ["serving_catalog"]

_MANIFEST = "manifest.json"


def serving_catalog(
    catalog_file: Path | None, index_dir: Path | None
) -> tuple[Catalog | Path, str | None]:
    """The entities to serve, and a note for the operator (or ``None``).

    With a saved index in ``index_dir``, its catalog as last saved (the entity changes
    made over HTTP included); else ``catalog_file``, which seeds the index.

    Raises:
        ConfigError: no index and no catalog file, a missing file, or a saved index whose
            catalog cannot be read (the message names the directory).
    """
    if index_dir is not None and (index_dir / _MANIFEST).exists():
        try:
            saved = HybridIndex.saved_catalog(index_dir)
        except ConfigError as exc:
            if "old format" not in str(exc) or catalog_file is None:
                raise
            # an index saved before catalogs were saved with it: the file is the catalog
            return catalog_file, f"{exc}; serving {catalog_file} (entity changes are lost)"
        note = (
            f"serving the live catalog of the index at {index_dir} ({len(saved.entities)} "
            "entities, entity changes included)"
        )
        if catalog_file is not None:
            note += f"; {catalog_file} only seeds a new index (remove {index_dir} to rebuild)"
        return saved, note
    if catalog_file is None:
        where = f"no index at {index_dir} to serve" if index_dir is not None else "no catalog"
        raise ConfigError(f"{where}: pass --catalog FILE (it seeds the index)")
    if not catalog_file.is_file():
        raise ConfigError(f"{catalog_file}: catalog file not found")
    return catalog_file, None
