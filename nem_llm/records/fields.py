"""Field kinds: what each attribute holds (a name, free text, a number, a date, a code, a category).

:func:`infer_fields` reads a catalog's attribute values and says, per attribute, which
:data:`FieldKind` it is and why (one sentence, for ``explain``); the user overrides any of
them by name. The kind chooses how two values are compared (``comparisons.py``).

The rules look at the shape of the values only (digits, lengths, tokens, how many distinct
values), never at the attribute's name, so they hold for catalogs in any language.
"""

from __future__ import annotations

import datetime as _dt
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import permutations
from typing import Any, Literal, get_args

from .._text import fold

__all__ = [
    "FIELD_KINDS",
    "FieldKind",
    "FieldSpec",
    "as_text",
    "infer_fields",
    "infer_kind",
    "normalize_value",
]

FieldKind = Literal["name", "text", "number", "date", "code", "category", "skip"]
#: Every kind; ``skip``: the field is not compared (derived from others, or empty).
FIELD_KINDS: tuple[str, ...] = get_args(FieldKind)

# how many values of a field the rules read (a spread over the catalog)
_SAMPLE = 500
_DATE_FORMATS = (
    re.compile(r"^(\d{4})(\d{2})(\d{2})$"),  # 19651013
    re.compile(r"^(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})(?:[ T].*)?$"),  # 1965-10-13
    re.compile(r"^(\d{1,2})[-/.](\d{1,2})[-/.](\d{4})$"),  # 13/10/1965 (day or month first)
)
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
# folded text is ASCII: these are its letters and digits
_NOT_ALNUM = re.compile(r"[^a-z0-9]+")
_NOT_DIGIT = re.compile(r"[^0-9]+")
_APOSTROPHES = re.compile(r"['`]")


@dataclass(frozen=True)
class FieldSpec:
    """One attribute as the record model compares it.

    Example:
        >>> FieldSpec("dob", "date")
        FieldSpec(name='dob', kind='date', reason='')

    Args:
        name: the attribute's key in entity and query attributes.
        kind: how its values are compared (see :data:`FieldKind`).
        reason: why this kind (set by :func:`infer_fields`; "" when given by the user).
    """

    name: str
    kind: FieldKind
    reason: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"a field name must be a non-empty string, got {self.name!r}")
        if self.kind not in FIELD_KINDS:
            raise ValueError(
                f"field {self.name!r}: kind must be one of {', '.join(FIELD_KINDS)}, "
                f"got {self.kind!r}"
            )


def as_text(value: Any) -> str | None:
    """A raw attribute value as a string, or ``None`` when it is missing.

    ``None``, NaN, empty and whitespace-only strings, and empty lists are missing; lists
    are joined with ", "; dates become ``YYYY-MM-DD``; numbers their shortest form.
    """
    if value is None:
        return None
    if type(value) is str:  # the common case first
        return " ".join(value.split()) or None
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return repr(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, _dt.datetime | _dt.date):
        return value.strftime("%Y-%m-%d")
    if isinstance(value, list | tuple):
        parts = [p for p in (as_text(v) for v in value) if p is not None]
        return ", ".join(parts) if parts else None
    text = " ".join(str(value).split())
    return text or None


def _date_digits(text: str) -> str | None:
    """``YYYYMMDD`` of a date written in one of the common forms, else ``None``."""
    for i, pattern in enumerate(_DATE_FORMATS):
        found = pattern.match(text)
        if not found:
            continue
        parts = found.groups()
        if i == 2:  # day (or month) first: keep the order given, the year goes first
            year, first, second = parts[2], parts[1], parts[0]
        else:
            year, first, second = parts[0], parts[1], parts[2]
        if not 1000 <= int(year) <= 2999 or not 1 <= int(first) <= 31:
            return None
        if not 1 <= int(second) <= 31 or min(int(first), int(second)) > 12:
            return None
        return f"{year}{int(first):02d}{int(second):02d}"
    return None


def normalize_value(value: Any, kind: FieldKind) -> str | None:
    """The form of a value that comparisons read: folded to lowercase ASCII, per kind.

    - name, category: letters and digits; other characters split words ("o'brien" ->
      "obrien", "bel-air" -> "bel air").
    - text: words of letters and digits, separated by single spaces.
    - code: letters and digits only ("310-475-3585" -> "3104753585").
    - date: ``YYYYMMDD`` when the value reads as a date, else its digits.
    - number: the number's shortest form (parsed again by the comparison).

    Example:
        >>> normalize_value("Ελλάδα", "name"), normalize_value("SW1A 1AA", "code")
        ('ellada', 'sw1a1aa')
    """
    text = as_text(value)
    if text is None or kind == "skip":
        return None
    folded = text.lower() if text.isascii() else fold(text)
    if kind == "code":
        out = _NOT_ALNUM.sub("", folded)
    elif kind == "date":
        out = _date_digits(folded.strip()) or _NOT_DIGIT.sub("", folded)
    elif kind == "number":
        cleaned = folded.replace(",", "").replace(" ", "")
        out = cleaned if _NUMBER.match(cleaned) else ""
    else:
        # apostrophes join ("o'brien" is "obrien"), other punctuation separates
        out = " ".join(_NOT_ALNUM.sub(" ", _APOSTROPHES.sub("", folded)).split())
    return out or None


def infer_kind(values: Sequence[str]) -> tuple[FieldKind, str]:
    """The kind of a field from its (non-missing, string) values, and why in one sentence."""
    n = len(values)
    if n == 0:
        return "skip", "no entity has a value"
    folded = [(v.lower() if v.isascii() else fold(v)).strip() for v in values]
    share = _share(folded)
    if share(lambda v: _date_digits(v) is not None) >= 0.9:
        return "date", "at least 90% of its values read as dates"
    numeric = share(lambda v: bool(_NUMBER.match(v.replace(",", ""))))
    if numeric >= 0.9:
        digits = [v for v in folded if v.isdigit()]
        if digits and len(digits) >= 0.9 * n:
            if share(lambda v: v.isdigit() and len(v) == 4 and 1000 <= int(v) <= 2100) >= 0.95:
                return "number", "whole numbers between 1000 and 2100 (years)"
            lengths = Counter(len(v) for v in digits)
            common_length, count = lengths.most_common(1)[0]
            leading_zero = any(len(v) > 1 and v[0] == "0" for v in digits)
            if leading_zero or (common_length >= 4 and count >= 0.9 * len(digits)):
                return "code", "digit strings of one length or with leading zeros (codes)"
        return "number", "at least 90% of its values are numbers"
    if share(_code_like) >= 0.9:
        return "code", "short values made mostly of digits (codes, phone numbers)"
    distinct = len(set(folded))
    if n >= 20 and distinct <= min(50, int(math.sqrt(n))):
        return "category", f"{distinct} distinct values over {n} entities"
    tokens = sorted(len(v.split()) for v in folded)
    lengths_sorted = sorted(len(v) for v in folded)
    median_tokens = tokens[n // 2]
    median_length = lengths_sorted[n // 2]
    with_digits = share(lambda v: any(ch.isdigit() for ch in v))
    if median_tokens >= 4 or median_length > 30 or with_digits >= 0.3:
        return "text", "long or numbered values (free text, titles, addresses)"
    return "name", "short values of a few words (names)"


def _share(values: Sequence[str]) -> Any:
    def share(test: Any) -> float:
        return sum(1 for v in values if test(v)) / len(values) if values else 0.0

    return share


def _code_like(value: str) -> bool:
    """A short value of at most three parts, at least half of its characters digits or a
    digit in every part ("310-475-3585", "SW1A 1AA", "AB-1234")."""
    alnum = [ch for ch in value if ch.isalnum()]
    parts = value.split()
    if not alnum or len(parts) > 3:
        return False
    if all(any(ch.isdigit() for ch in part) for part in parts):
        return True
    return sum(ch.isdigit() for ch in alnum) >= 0.5 * len(alnum)


def _derived_from(
    name: str, columns: Mapping[str, list[str | None]], kinds: Mapping[str, FieldKind]
) -> tuple[str, ...] | None:
    """Other fields whose values, joined with spaces, give this one's (in >= 90% of rows)."""
    own = columns[name]
    others = [k for k in columns if k != name and kinds.get(k) in {"name", "text", "category"}]
    rows = [i for i, v in enumerate(own) if v is not None][:300]
    if not rows:
        return None

    def joins(parts: tuple[str, ...], i: int) -> bool:
        return " ".join(p for p in (columns[k][i] for k in parts) if p is not None) == own[i]

    head = rows[:20]
    for size in (2, 3):
        for parts in permutations(others, size):
            if sum(joins(parts, i) for i in head) < 0.8 * len(head):
                continue  # most candidates fail on the first rows already
            if sum(joins(parts, i) for i in rows) >= 0.9 * len(rows):
                return parts
    return None


def infer_fields(
    records: Iterable[Mapping[str, Any]],
    *,
    kinds: Mapping[str, FieldKind] | None = None,
) -> tuple[FieldSpec, ...]:
    """One :class:`FieldSpec` per attribute of ``records`` (the catalog's attributes).

    A field whose values are the space-joined values of two or three other fields in at
    least 90% of records (a full name beside first and last names) is ``skip``: comparing
    it too would count the same evidence twice. ``kinds`` overrides the inferred kind of
    any field by name (``{"zip": "code", "notes": "skip"}``), and adds fields no record
    has yet.

    Example:
        >>> [f.kind for f in infer_fields([{"dob": "1965-10-13", "zip": "02139"}] * 3)]
        ['date', 'code']
    """
    rows = list(records)
    given = dict(kinds or {})
    names: list[str] = []
    for row in rows:
        for key in row:
            if key not in names:
                names.append(key)
    for key in given:
        if key not in names:
            names.append(key)
    step = max(1, len(rows) // _SAMPLE)
    sample = rows[::step]
    raw = {k: [as_text(r.get(k)) for r in sample] for k in names}
    inferred: dict[str, tuple[FieldKind, str]] = {}
    for key in names:
        if key in given:
            inferred[key] = (given[key], "")
        else:
            inferred[key] = infer_kind([v for v in raw[key] if v is not None])
    kind_of = {k: v[0] for k, v in inferred.items()}
    folded = {k: [None if v is None else normalize_value(v, "name") for v in raw[k]] for k in names}
    specs: list[FieldSpec] = []
    for key in names:
        kind, reason = inferred[key]
        if key not in given and kind in {"name", "text"}:
            parts = _derived_from(key, folded, kind_of)
            if parts is not None:
                kind = "skip"
                reason = f"its values are those of {' + '.join(parts)} (the same evidence)"
        specs.append(FieldSpec(key, kind, reason))
    return tuple(specs)
