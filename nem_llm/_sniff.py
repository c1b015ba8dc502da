"""The field delimiter of a delimited text file, sniffed from its header line.

Users' ``.csv`` files are not all comma-separated (a spreadsheet in a German locale writes
semicolons); the header line says which: the candidate seen most often outside quotes.
"""

from __future__ import annotations

__all__ = ["SNIFFED_DELIMITERS", "delimiter_hint", "sniff_delimiter"]

#: Delimiters a header line is sniffed for (``.csv`` files without an explicit one).
SNIFFED_DELIMITERS = (",", ";", "\t", "|")
_NAMES = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}


def _count_outside_quotes(text: str, delimiter: str) -> int:
    """How often ``delimiter`` occurs in ``text`` outside double quotes."""
    count = 0
    quoted = False
    for c in text:
        if c == '"':
            quoted = not quoted
        elif c == delimiter and not quoted:
            count += 1
    return count


def sniff_delimiter(header: str, default: str = ",") -> str:
    """The delimiter of a header line: the candidate seen most often outside quotes.

    Ties go to ``default``; a header with none of :data:`SNIFFED_DELIMITERS` (one column)
    keeps ``default``.

    Example:
        >>> sniff_delimiter("id;query;country")
        ';'
        >>> sniff_delimiter("query")
        ','
    """
    counts = {d: _count_outside_quotes(header, d) for d in SNIFFED_DELIMITERS}
    best = max(SNIFFED_DELIMITERS, key=lambda d: (counts[d], d == default))
    return best if counts[best] > 0 else default


def delimiter_hint(header: list[str], delimiter: str, advice: str) -> str:
    """What to add to a missing-column error when the header may be split wrongly.

    Empty unless the header came out as one column (the wrong delimiter's signature);
    ``advice`` says what to do (``"name it with --delimiter"``).
    """
    if len(header) != 1:
        return ""
    name = _NAMES.get(delimiter, repr(delimiter))
    return (
        f"; split on the {name}, the header is one column: if the file uses another "
        f"delimiter, {advice}"
    )
