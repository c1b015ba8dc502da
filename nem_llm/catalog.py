"""Load and validate entity catalogs (dicts, ``Entity`` models, JSONL or CSV files)."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import CatalogError
from .models import Entity

__all__ = ["Catalog", "EntitySource", "load_catalog"]

EntitySource = str | os.PathLike[str] | Iterable[Entity | Mapping[str, Any]]

# The longest name or alias we embed; longer surface forms are almost always a data error.
MAX_FORM_CHARS = 10_000


@dataclass(frozen=True)
class Catalog:
    """A validated catalog: entities in order, plus the flat list of surface forms.

    ``forms[i]`` is a string to embed and ``form_entity[i]`` the position of its entity.
    """

    entities: tuple[Entity, ...]
    forms: tuple[str, ...]
    form_entity: tuple[int, ...]
    by_id: Mapping[str, int]

    def __len__(self) -> int:
        return len(self.entities)

    @classmethod
    def from_entities(
        cls, entities: Sequence[Entity], *, include_description: bool = False
    ) -> Catalog:
        """Flatten entities into surface forms (see ``Entity.surface_forms``)."""
        forms: list[str] = []
        owner: list[int] = []
        for i, entity in enumerate(entities):
            for form in entity.surface_forms(include_description=include_description):
                forms.append(form)
                owner.append(i)
        return cls(
            entities=tuple(entities),
            forms=tuple(forms),
            form_entity=tuple(owner),
            by_id={e.id: i for i, e in enumerate(entities)},
        )


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "entity"
    msg = str(err["msg"])
    if err["type"] == "missing":
        return f"missing required field {loc!r}"
    if err["type"] == "extra_forbidden":
        return f"unknown field {loc!r} (allowed: id, name, aliases, description, attributes)"
    return f"field {loc!r}: {msg}"


def _coerce(raw: Any, source: str, line: int | None) -> Entity:
    if isinstance(raw, Entity):
        return raw
    if not isinstance(raw, Mapping):
        raise CatalogError(
            f"expected an object with id and name, got {type(raw).__name__}",
            source=source,
            line=line,
        )
    data = dict(raw)
    # ids are often numeric in user files; accept them as strings, reject anything else
    if isinstance(data.get("id"), int) and not isinstance(data.get("id"), bool):
        data["id"] = str(data["id"])
    if data.get("description") is None:
        data.pop("description", None)
    if data.get("aliases") is None:
        data.pop("aliases", None)
    aliases = data.get("aliases")
    if aliases is not None:
        if isinstance(aliases, str) or not isinstance(aliases, list):
            raise CatalogError(
                f"'aliases' must be a list of strings, got {type(aliases).__name__}",
                source=source,
                line=line,
            )
        for j, alias in enumerate(aliases):
            if not isinstance(alias, str):
                raise CatalogError(
                    f"alias {j} must be a string, got {type(alias).__name__} ({alias!r})",
                    source=source,
                    line=line,
                )
    try:
        entity = Entity.model_validate(data)
    except ValidationError as exc:
        raise CatalogError(_first_error(exc), source=source, line=line) from None
    for form in entity.surface_forms():
        if len(form) > MAX_FORM_CHARS:
            raise CatalogError(
                f"name or alias of {len(form):,} characters (limit {MAX_FORM_CHARS:,})",
                source=source,
                line=line,
            )
    return entity


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                raise CatalogError(
                    f"invalid UTF-8 at byte {exc.start}", source=str(path), line=lineno
                ) from None
            if not text.strip():
                continue
            try:
                # without its line break, a decode error's column is a column of this line
                yield lineno, json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                raise CatalogError(
                    f"malformed JSON: {exc.msg} (column {exc.colno})", source=str(path), line=lineno
                ) from None


def _read_csv(path: Path, *, delimiter: str = ",") -> Iterator[tuple[int, Any]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise CatalogError(
            f"invalid UTF-8 at byte {exc.start}", source=str(path), line=line
        ) from None
    # newline="": the csv module splits records itself (str.splitlines would also break rows
    # at U+2028, U+0085, ... inside names and descriptions)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    fields = reader.fieldnames or []
    for required in ("id", "name"):
        if required not in fields:
            raise CatalogError(
                f"CSV header has no {required!r} column (found: {', '.join(fields) or 'none'})",
                source=str(path),
                line=1,
            )
    for row in reader:
        line = reader.line_num
        entity: dict[str, Any] = {"id": row.get("id"), "name": row.get("name")}
        if row.get("aliases"):
            entity["aliases"] = [a.strip() for a in str(row["aliases"]).split("|") if a.strip()]
        if row.get("description"):
            entity["description"] = row["description"]
        extra = {k: v for k, v in row.items() if k not in {"id", "name", "aliases", "description"}}
        if extra:
            entity["attributes"] = {k: v for k, v in extra.items() if k is not None}
        yield line, entity


def load_catalog(source: EntitySource | Catalog, *, include_description: bool = False) -> Catalog:
    """Validate entities from a list of dicts/``Entity`` models or a JSONL/CSV path.

    CSV files need ``id`` and ``name`` columns; ``aliases`` are ``|``-separated; other
    columns become ``attributes``.

    Raises:
        CatalogError: naming the row (1-based line for files, ``entities[i]`` for lists):
            duplicate ids, missing or empty names, non-string aliases, malformed lines,
            invalid UTF-8, an empty catalog.
    """
    if isinstance(source, Catalog):
        return source
    if isinstance(source, Entity | Mapping):
        raise CatalogError("expected a list of entities or a path, got a single entity")
    rows: Iterable[tuple[int, Any]]
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        label = str(path)
        if not path.is_file():
            raise CatalogError("file not found", source=label)
        suffix = path.suffix.lower()
        if suffix in {".jsonl", ".ndjson", ".json"}:
            rows = _read_jsonl(path)
        elif suffix in {".csv", ".tsv"}:
            rows = _read_csv(path, delimiter="\t" if suffix == ".tsv" else ",")
        else:
            raise CatalogError("unknown catalog format (use .jsonl or .csv)", source=label)
        line_label = label
    else:
        rows = ((i, raw) for i, raw in enumerate(source))
        label = "entities"
        line_label = ""

    entities: list[Entity] = []
    seen: dict[str, int] = {}
    for line, raw in rows:
        where = line_label if line_label else f"entities[{line}]"
        entity = _coerce(raw, where, line if line_label else None)
        if entity.id in seen:
            first = f"line {seen[entity.id]}" if line_label else f"entities[{seen[entity.id]}]"
            raise CatalogError(
                f"duplicate id {entity.id!r} (first seen at {first})",
                source=where,
                line=line if line_label else None,
            )
        seen[entity.id] = line
        entities.append(entity)
    if not entities:
        raise CatalogError("catalog is empty", source=label)
    return Catalog.from_entities(entities, include_description=include_description)
