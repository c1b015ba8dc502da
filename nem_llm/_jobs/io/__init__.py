"""Stream query files (JSONL, CSV, TSV, text, Parquet) row by row and write results safely.

Batch jobs read files of millions of rows, so every reader here is lazy and works in
constant memory (apart from the set of ids seen, for the duplicate check): files are read
as binary lines and each line is decoded on its own, so one line of invalid UTF-8 spoils
only its own row.

Two kinds of problem, the same split as :func:`nem_llm.catalog.load_catalog` uses for its
messages (``"invalid UTF-8 at byte 17"``, ``"malformed JSON: ... (column 5)"``,
``"duplicate id 'q7' (first seen at line 3)"``):

* **Fatal** problems make the whole file unusable and raise :class:`~nem_llm.errors.InputError`
  naming the file (and the line, where there is one): the file is missing, has an unknown
  extension or is empty; a CSV header lacks the query or id column; the first non-empty
  line of a JSONL file is not JSON at all. :func:`read_queries` raises them when it is
  *called*, before any row is consumed, so a job fails before it loads a model.
* **Row-level** problems become a :class:`QueryRow` whose ``error`` says what is wrong
  (``query`` is then ``None``); reading continues with the next row.

Results are written with :class:`AtomicLineWriter` (one ``os.write`` per row on an
``O_APPEND`` descriptor) and read back with :func:`read_jsonl_rows` (or
:func:`read_result_rows`, which also reads Parquet); on resume, :func:`repair_jsonl_tail`
cuts the torn last line a crash may have left.

The modules, one concern each: ``_lines`` (binary lines, decoding), ``rows`` (the row
value and the column checks), one reader per format (``jsonl``, ``delimited``, ``text``,
``parquet``), ``queries`` (:func:`read_queries`, the extension table), ``results``.
"""

from __future__ import annotations

from ..._sniff import sniff_delimiter
from ._lines import MAX_LINE_BYTES, EncodingErrors
from .queries import FORMATS, count_rows, read_queries
from .results import AtomicLineWriter, read_jsonl_rows, read_result_rows, repair_jsonl_tail
from .rows import QUERY_COLUMNS, QueryRow

__all__ = [
    "FORMATS",
    "MAX_LINE_BYTES",
    "QUERY_COLUMNS",
    "AtomicLineWriter",
    "EncodingErrors",
    "QueryRow",
    "count_rows",
    "read_jsonl_rows",
    "read_queries",
    "read_result_rows",
    "repair_jsonl_tail",
    "sniff_delimiter",
]
