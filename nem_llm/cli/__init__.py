"""The ``nem-llm`` command line: one module per command, all on one typer app.

match, index build, eval, dedupe, review, discover, report, bench, serve, sim, local-llm.
The
matching options of ``match``, ``eval`` and ``serve`` are generated from
:class:`~nem_llm.MatcherSettings` (``_settings.py``), never declared here again.
"""

from __future__ import annotations

# each module registers its command on the app
from . import (  # noqa: F401
    bench,
    dedupe,
    discover,
    eval_,
    index,
    match,
    report,
    review,
    serve,
    sim,
)
from ._app import app, main

__all__ = ["app", "main"]
