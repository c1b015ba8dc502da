"""Query validation and normalization (pure functions)."""

from __future__ import annotations

import re
import unicodedata

from anyascii import anyascii

from .errors import QueryError

__all__ = ["DEFAULT_MAX_QUERY_CHARS", "fold", "lexical_form", "normalize", "validate_query"]

# Queries longer than this are almost always a data error (a whole document in a cell);
# the embedder would truncate them to 256 tokens anyway.
DEFAULT_MAX_QUERY_CHARS = 10_000

_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    """NFKC-normalize, trim and collapse whitespace; case is kept (the embedder uses it)."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text)).strip()


def fold(text: str) -> str:
    """Transliterate to ASCII and lowercase: "Ελλάδα" -> "ellada", "Côte" -> "cote".

    anyascii romanizes every script (Greek, Cyrillic, Arabic, Hebrew, Devanagari, CJK, kana,
    hangul, ...) and drops accents, so names written in two scripts share character n-grams.
    """
    return anyascii(text).lower()


def lexical_form(text: str) -> str:
    """What the lexical channel reads: the lowercased text, plus its folded form if different.

    Keeping both means an exact match in the original script still scores highest, while a
    query in another script (or without accents) still shares n-grams with the catalog.
    """
    lower = text.lower()
    folded = fold(text)
    return lower if folded == lower else f"{lower} {folded}"


def validate_query(
    query: object, *, index: int | None = None, max_chars: int = DEFAULT_MAX_QUERY_CHARS
) -> str:
    """Return the normalized query or raise ``QueryError`` saying what is wrong with it.

    Raises:
        QueryError: not a string, empty or whitespace only, longer than ``max_chars``, or
            containing unpaired surrogates (undecodable bytes).
    """
    where = f"queries[{index}]" if index is not None else "query"
    if not isinstance(query, str):
        raise QueryError(f"query must be a string, got {type(query).__name__}", source=where)
    if len(query) > max_chars:
        raise QueryError(f"query is {len(query):,} characters (limit {max_chars:,})", source=where)
    try:
        query.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise QueryError(f"query has an invalid character at {exc.start}", source=where) from None
    norm = normalize(query)
    if not norm:
        raise QueryError("query is empty", source=where)
    return norm
