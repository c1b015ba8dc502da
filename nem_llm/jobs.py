"""Batch jobs over files, as a library: what ``nem-llm match`` runs (:class:`MatchJob`), the
review queue round trip, and the Batch API job.

The implementation lives in the internal ``nem_llm._jobs`` package; import from here.
"""

from __future__ import annotations

from ._jobs.batch_api import run_batch_api_job
from ._jobs.review import export_review, import_review, load_labels
from ._jobs.runs import JobSummary, MatchJob

__all__ = [
    "JobSummary",
    "MatchJob",
    "export_review",
    "import_review",
    "load_labels",
    "run_batch_api_job",
]
