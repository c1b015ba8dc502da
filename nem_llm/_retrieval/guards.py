"""Structural guards: two mistakes scores cannot see, caught from the strings themselves.

- **A number or code that differs.** "Product 1011" scores 0.84 against "Product 101" with
  a clear lead: the names differ only in a number, and the number is the identity. A
  candidate whose name carries number or code tokens (a digit in the token, or a roman
  numeral such as "III") that are not all in the query is never auto-accepted
  (:func:`number_conflict`).
- **A person name written another way.** "J. Smith", "Smith, John" or "Tolkien" score low
  against "John Smith" / "J. R. R. Tolkien" and would be called novel. A query whose every
  token is a token of a candidate's name, or an initial of one, in any order, with at
  least one whole word in common, is never auto-novel (:func:`name_compatible`).

Both are pure functions of a query and its candidates; routing applies them before its
thresholds and its model, and calibration estimates each rule on the examples the guards
leave it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

from .._text import fold
from ..models import Candidate

__all__ = ["code_tokens", "identity_form", "name_compatible", "name_tokens", "number_conflict"]

_TOKEN = re.compile(r"[a-z0-9]+")
_ROMAN = frozenset(
    "ii iii iv vi vii viii ix xi xii xiii xiv xv xvi xvii xviii xix xx".split()
)  # fmt: skip


# Routing reads the same catalog names over and over (every query's candidates): their
# tokens are kept, bounded, rather than folded and split again for each query.
_CACHED = 1 << 16


def code_tokens(text: str) -> list[str]:
    """The number and code tokens of ``text`` (folded): "Boeing 737-800" -> ["737", "800"]."""
    return list(_code_tokens(text))


@lru_cache(maxsize=_CACHED)
def _code_tokens(text: str) -> tuple[str, ...]:
    out = []
    for token in _TOKEN.findall(fold(text)):
        if token in _ROMAN or not token.isalpha():  # a digit in it, or a roman numeral
            out.append((token.lstrip("0") or "0") if token.isdigit() else token)
    return tuple(out)


def name_tokens(text: str) -> list[str]:
    """The word tokens of ``text`` (folded, letters and digits): "Smith, J." -> ["smith", "j"]."""
    return list(_name_tokens(text))


@lru_cache(maxsize=_CACHED)
def _name_tokens(text: str) -> tuple[str, ...]:
    return tuple(_TOKEN.findall(fold(text)))


def identity_form(candidate: Candidate) -> str:
    """The candidate's name or the alias the query matched, never a "name, description"
    record form (its numbers are details such as street numbers, not the identity)."""
    form = candidate.matched_form or candidate.name
    if form != candidate.name and form.startswith(candidate.name + ", "):
        return candidate.name
    return form


def number_conflict(query: str, candidate: Candidate) -> bool:
    """Whether the candidate's name carries a number or code the query does not have."""
    theirs = _code_tokens(identity_form(candidate))
    if not theirs:
        return False
    ours = set(_code_tokens(query))
    return any(token not in ours for token in theirs)


def _fits(query: Sequence[str], form: Sequence[str]) -> bool:
    """Every query token is a distinct form token, or an initial of one (or has one as its
    initial), and at least one is a whole word of two letters or more."""
    free = list(form)
    whole = False
    # whole words first, so an initial does not take the token a word needs
    for token in sorted(query, key=len, reverse=True):
        if token in free:
            free.remove(token)
            whole = whole or len(token) >= 2
            continue
        match = next(
            (
                f
                for f in free
                if (len(token) == 1 and f[0] == token) or (len(f) == 1 and token[0] == f)
            ),
            None,
        )
        if match is None:
            return False
        free.remove(match)
    return whole


def name_compatible(query: str, candidates: Sequence[Candidate]) -> Candidate | None:
    """The first candidate whose name (or matched alias) the query fits by whole words and
    initials in any order ("J. Smith", "Smith John", "Tolkien"), or ``None``."""
    tokens = _name_tokens(query)
    if not tokens or len(tokens) > 8:
        return None
    for candidate in candidates:
        for form in {candidate.name, identity_form(candidate)}:
            if _fits(tokens, _name_tokens(form)):
                return candidate
    return None
