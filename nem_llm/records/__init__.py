"""Structured records: compare field by field, weigh by a Fellegi-Sunter model fit without labels.

The pieces, each pure (values in, values out):

- ``fields``: what each attribute holds (:func:`infer_fields`; override by name).
- ``strings``: vectorised Jaro-Winkler, edit distance and Jaccard over aligned pairs.
- ``comparisons``: per kind, the comparison levels of two values (null ... exact).
- ``model``: a :class:`RecordModel` scores pairs (match weight, probability, each field's
  part) and gives each query's posteriors.
- ``fit``: :func:`fit_record_model` learns m, u and the share of queries with a match by
  EM over candidate pairs (no labels needed; labels fix their queries).
- ``decision``: matched / novel / undecided per query from its candidates' posteriors.
- ``dedupe``: clusters of confident links within a catalog and golden records.
- ``linker``: :class:`RecordLinker`, all of the above behind ``fit`` and ``link`` (what the
  matcher holds: per query a decision and every candidate's per-field contributions).

Example:
    >>> from nem_llm.records import decide, fit_record_model
    >>> catalog = [{"name": "Ann Lee", "dob": "1970-01-02"},
    ...            {"name": "Bo Chen", "dob": "1981-05-06"}]
    >>> queries = [{"name": "ann lee", "dob": "19700102"}]
    >>> model = fit_record_model(catalog, queries, [0, 0], [0, 1])
    >>> scores = model.score(queries, [0, 0], [0, 1])
    >>> decide(model.posteriors(scores), [0, 0], [0, 1]).status
    ('matched',)
"""

from __future__ import annotations

from .comparisons import LEVELS, Column, Comparison, comparison_for
from .decision import Decision, Decisions, cut_for_precision, decide
from .dedupe import GoldenRecord, clusters, golden_records
from .fields import FIELD_KINDS, FieldKind, FieldSpec, infer_fields, infer_kind, normalize_value
from .fit import fit_record_model
from .linker import CandidateScore, FieldScore, RecordLink, RecordLinker
from .model import FitReport, PairScores, Posteriors, RecordModel

__all__ = [
    "FIELD_KINDS",
    "LEVELS",
    "CandidateScore",
    "Column",
    "Comparison",
    "Decision",
    "Decisions",
    "FieldKind",
    "FieldScore",
    "FieldSpec",
    "FitReport",
    "GoldenRecord",
    "PairScores",
    "Posteriors",
    "RecordLink",
    "RecordLinker",
    "RecordModel",
    "clusters",
    "comparison_for",
    "cut_for_precision",
    "decide",
    "fit_record_model",
    "golden_records",
    "infer_fields",
    "infer_kind",
    "normalize_value",
]
