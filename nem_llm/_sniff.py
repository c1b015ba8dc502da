"""The field delimiter of a delimited text file, sniffed from its header line.

Users' ``.csv`` files are not all comma-separated (a spreadsheet in a German locale writes
semicolons); the header line says which: the candidate seen most often outside quotes.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = [
    "CSV_QUOTED",
    "SNIFFED_DELIMITERS",
    "delimiter_hint",
    "ends_inside_quotes",
    "scan_csv_line",
    "sniff_delimiter",
]

#: Delimiters a header line is sniffed for (``.csv`` files without an explicit one).
SNIFFED_DELIMITERS = (",", ";", "\t", "|")
_NAMES = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}


# States of a simplified copy of the csv module's parser, used to find where a record ends
# when the csv module cannot say (a quote never closed: it reads to the end of the file).
_CSV_START, _CSV_FIELD, CSV_QUOTED, _CSV_AFTER_QUOTE = range(4)


def scan_csv_line(text: str, state: int, delimiter: str) -> int:
    """Return the CSV parser state after ``text``; ``CSV_QUOTED`` means the record goes on."""
    i = 0
    n = len(text)
    while i < n:
        if state == CSV_QUOTED:
            j = text.find('"', i)
            if j < 0:
                return CSV_QUOTED
            state, i = _CSV_AFTER_QUOTE, j + 1
            continue
        c = text[i]
        i += 1
        if state == _CSV_FIELD:
            if c == delimiter or c in "\r\n":
                state = _CSV_START
        elif c == '"':
            state = CSV_QUOTED  # opens a quoted field, or (after a quote) is an escaped quote
        elif c == delimiter or c in "\r\n":
            state = _CSV_START
        else:
            state = _CSV_FIELD
    return state


def ends_inside_quotes(lines: Iterable[str], delimiter: str) -> bool:
    """Whether a record's physical lines leave a quoted field open (its quote is never
    closed)."""
    state = _CSV_START
    for text in lines:
        state = scan_csv_line(text, CSV_QUOTED if state == CSV_QUOTED else _CSV_START, delimiter)
    return state == CSV_QUOTED


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
