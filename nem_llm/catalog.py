"""Load and validate entity catalogs (dicts, ``Entity`` models, JSONL, CSV, TSV or Parquet)."""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError

from ._parquet import PARQUET_SUFFIX, iter_parquet_rows
from ._sniff import delimiter_hint, ends_inside_quotes, sniff_delimiter
from .errors import CatalogError, ConfigError
from .models import Entity

__all__ = ["Catalog", "CatalogColumns", "EntitySource", "load_catalog"]

EntitySource = str | os.PathLike[str] | Iterable[Entity | Mapping[str, Any]]

_CORE_FIELDS = ("id", "name", "aliases", "description")


@dataclass(frozen=True, kw_only=True)
class CatalogColumns:
    """Which source columns (CSV, Parquet) or fields (JSONL, dicts) hold id, name, aliases, ...

    Every other column or field becomes an entity attribute (never an error).

    Example:
        >>> CatalogColumns(id="code", name="label", aliases="alt_names", alias_separator=";")
        ... # doctest: +ELLIPSIS
        CatalogColumns(id='code', name='label', aliases='alt_names', ...)

    Args:
        id, name, aliases, description: source column names.
        alias_separator: splits an aliases value given as one string. ``None`` (default):
            ``|`` in CSV, TSV and Parquet files (``Python|CPython|py3``); in JSONL and dicts
            aliases must then be a list. A file whose aliases are separated otherwise
            (``CPython;py3``) needs it set, or each cell is one alias.
    """

    id: str = "id"
    name: str = "name"
    aliases: str = "aliases"
    description: str = "description"
    alias_separator: str | None = None

    def __post_init__(self) -> None:
        names = [self.id, self.name, self.aliases, self.description]
        for field_name, value in zip(_CORE_FIELDS, names, strict=True):
            if not isinstance(value, str) or not value:
                raise CatalogError(f"column for {field_name!r} must be a non-empty string")
        if len(set(names)) != len(names):
            raise CatalogError(f"columns must be distinct, got {names}")
        if self.alias_separator is not None and not self.alias_separator:
            raise CatalogError("alias_separator must not be empty")

    @classmethod
    def parse(cls, spec: str, *, alias_separator: str | None = None) -> CatalogColumns:
        """Build from ``"id=code,name=label,aliases=alt"`` (the CLI's ``--catalog-columns``)."""
        fields: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = part.partition("=")
            key, value = key.strip(), value.strip()
            if not sep or key not in _CORE_FIELDS or not value:
                raise CatalogError(
                    f"bad column mapping {part!r}: use field=column with field one of "
                    f"{', '.join(_CORE_FIELDS)}"
                )
            fields[key] = value
        return cls(**fields, alias_separator=alias_separator)

    def remap(self, raw: Mapping[str, Any], *, from_csv: bool = False) -> dict[str, Any]:
        """One source row as Entity fields: core columns renamed, the rest in ``attributes``."""
        source = {
            "id": self.id,
            "name": self.name,
            "aliases": self.aliases,
            "description": self.description,
        }
        data: dict[str, Any] = {}
        for field_name, column in source.items():
            if column in raw:
                data[field_name] = raw[column]
        attributes: dict[str, Any] = {}
        given = raw.get("attributes")
        taken = set(source.values())
        for key, value in raw.items():
            if key in taken or key is None:
                continue
            if key == "attributes" and isinstance(given, Mapping):
                continue
            attributes[str(key)] = value
        if isinstance(given, Mapping):
            attributes = {**attributes, **{str(k): v for k, v in given.items()}}
        if attributes:
            data["attributes"] = attributes
        aliases = data.get("aliases")
        separator = self.alias_separator or ("|" if from_csv else None)
        if isinstance(aliases, str) and separator is not None:
            data["aliases"] = [a.strip() for a in aliases.split(separator) if a.strip()]
        return data


DEFAULT_COLUMNS = CatalogColumns()

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

    def attribute_names(self) -> frozenset[str]:
        """Every attribute name some entity has."""
        return frozenset(k for e in self.entities for k in e.attributes)

    def where_mask(self, where: Mapping[str, Any]) -> npt.NDArray[np.bool_]:
        """Entities passing a filter: ``{"country": "FR"}`` (equality) or
        ``{"country": ["FR", "BE"]}`` (membership); several keys must all hold.

        Values compare as given and as strings (CSV attributes are strings: ``{"pop": 5}``
        matches ``"5"``).

        Raises:
            ConfigError: an empty filter, or an attribute no entity has.
        """
        if not isinstance(where, Mapping) or not where:
            raise ConfigError(f"where must be a non-empty mapping, got {where!r:.80}")
        known = self.attribute_names()
        mask = np.ones(len(self.entities), dtype=bool)
        for key, wanted in where.items():
            if key not in known:
                shown = ", ".join(sorted(known)[:10]) or "none"
                raise ConfigError(
                    f"filter on attribute {key!r}, which no entity has (attributes: {shown})"
                )
            values = (
                list(wanted) if isinstance(wanted, list | tuple | set | frozenset) else [wanted]
            )
            accepted = {_as_key(v) for v in values}
            mask &= np.fromiter(
                (_as_key(e.attributes.get(key, _MISSING)) in accepted for e in self.entities),
                dtype=bool,
                count=len(self.entities),
            )
        return mask

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


_MISSING = object()


def _as_key(value: Any) -> Any:
    """A filter value's comparison key: strings as given, scalars as their string form."""
    if value is _MISSING:
        return _MISSING
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float | str):
        return str(value)
    return json.dumps(value, sort_keys=True, default=str)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "entity"
    msg = str(err["msg"])
    if err["type"] == "missing":
        return f"missing required field {loc!r}"
    if err["type"] == "extra_forbidden":
        return f"unknown field {loc!r} (allowed: id, name, aliases, description, attributes)"
    return f"field {loc!r}: {msg}"


def _coerce(
    raw: Any, source: str, line: int | None, columns: CatalogColumns = DEFAULT_COLUMNS
) -> Entity:
    if isinstance(raw, Entity):
        return raw
    if not isinstance(raw, Mapping):
        raise CatalogError(
            f"expected an object with id and name, got {type(raw).__name__}",
            source=source,
            line=line,
        )
    data = columns.remap(raw)
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


def _read_csv(
    path: Path, *, delimiter: str | None = ",", columns: CatalogColumns = DEFAULT_COLUMNS
) -> Iterator[tuple[int, Any]]:
    """Rows of a CSV/TSV catalog, mapped; ``delimiter=None``: sniffed from the header."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise CatalogError(
            f"invalid UTF-8 at byte {exc.start}", source=str(path), line=line
        ) from None
    # newline="": the csv module splits records itself (str.splitlines would also break rows
    # at U+2028, U+0085, ... inside names and descriptions)
    if delimiter is None:
        header = next((line for line in text.splitlines() if line.strip()), "")
        delimiter = sniff_delimiter(header)
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    fields = reader.fieldnames or []
    for required, column in (("id", columns.id), ("name", columns.name)):
        if column not in fields:
            raise CatalogError(
                f"CSV header has no {column!r} column for {required!r} "
                f"(found: {', '.join(fields) or 'none'})"
                + delimiter_hint(
                    list(fields), delimiter, "use commas, semicolons, tabs or '|' (sniffed)"
                ),
                source=str(path),
                line=1,
            )
    start = reader.line_num + 1  # the line the next record starts on
    n_lines = text.count("\n") + (0 if text.endswith("\n") else 1)
    for row in reader:
        # an empty cell is an absent value (an empty id or name stays, to be reported)
        keep = {columns.id, columns.name}
        cells = {k: v for k, v in row.items() if k is not None and (v != "" or k in keep)}
        if reader.line_num > start and reader.line_num >= n_lines:  # the last record
            _check_closed(text, start, reader.line_num, delimiter, path)
        yield start, columns.remap(cells, from_csv=True)
        start = reader.line_num + 1


def _check_closed(text: str, start: int, end: int, delimiter: str, path: Path) -> None:
    """A quote that is never closed swallows every later line into one field (the csv
    module says nothing): the last record, run over several lines to the end of the file
    and still inside quotes (the queries' reader scans the same way), is that, and the
    catalog is refused naming the line."""
    if ends_inside_quotes(text.split("\n")[start - 1 : end], delimiter):
        raise CatalogError(
            "a quote opened on this line is never closed: the rest of the file would be one field",
            source=str(path),
            line=start,
        )


def _plain(value: Any) -> Any:
    """A Parquet cell as a JSON-like value (dates, decimals, bytes: their text)."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def _read_parquet(path: Path, columns: CatalogColumns) -> Iterator[tuple[int, Any]]:
    """Rows of a Parquet catalog (row numbers 1-based), mapped; null cells are absent."""
    keep = {columns.id, columns.name}
    for number, row in iter_parquet_rows(path, CatalogError):
        cells = {k: _plain(v) for k, v in row.items() if v is not None or k in keep}
        yield number, columns.remap(cells, from_csv=True)


def load_catalog(
    source: EntitySource | Catalog,
    *,
    include_description: bool = False,
    columns: CatalogColumns | None = None,
) -> Catalog:
    """Validate entities from a list of dicts/``Entity`` models or a file.

    Files: ``.jsonl``/``.ndjson``/``.json`` (one object per line), ``.csv`` (its delimiter
    sniffed from the header: comma, semicolon, tab or ``|``), ``.tsv``, ``.parquet``
    (through pyarrow; "line" in messages is the row number). Rows need an id and a name
    (columns ``id`` and ``name`` unless ``columns`` maps others); in CSV, TSV and Parquet an
    aliases cell given as one string is split on ``columns.alias_separator`` (``|``); every
    other column or field becomes an attribute.

    Raises:
        CatalogError: naming the row (1-based line for files, ``entities[i]`` for lists):
            duplicate ids, missing or empty names, non-string aliases, malformed lines,
            invalid UTF-8, an empty catalog.
    """
    if isinstance(source, Catalog):
        return source
    if isinstance(source, Entity | Mapping):
        raise CatalogError("expected a list of entities or a path, got a single entity")
    cols = columns or DEFAULT_COLUMNS
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
            rows = _read_csv(path, delimiter="\t" if suffix == ".tsv" else None, columns=cols)
            cols = DEFAULT_COLUMNS  # rows come out already mapped
        elif suffix == PARQUET_SUFFIX:
            rows = _read_parquet(path, cols)
            cols = DEFAULT_COLUMNS
        else:
            raise CatalogError(
                "unknown catalog format (use .jsonl, .csv, .tsv or .parquet)", source=label
            )
        line_label = label
    else:
        rows = ((i, raw) for i, raw in enumerate(source))
        label = "entities"
        line_label = ""

    entities: list[Entity] = []
    seen: dict[str, int] = {}
    for line, raw in rows:
        where = line_label if line_label else f"entities[{line}]"
        entity = _coerce(raw, where, line if line_label else None, cols)
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
