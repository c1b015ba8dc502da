"""Griffe extension: nem_llm's docstrings as the API reference should show them.

- The package writes its doctests under ``Example:`` (singular); griffe's Google-style
  parser reads only ``Examples:`` as an examples section and shows ``Example:`` as a note
  of plain text, so the ``>>>`` lines would lose their code formatting.
- Sphinx roles (``:class:`~nem_llm.Limits```) are not Markdown: they would show raw.
  They become code spans (``Limits``; the full path without ``~``).

Both are rewritten in the docstrings griffe loads, for the docs only.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SINGULAR = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|func|meth|attr|data|mod|exc|obj):`(?P<short>~)?(?P<path>[\w.]+)`")


def _code_span(match: re.Match[str]) -> str:
    path = match["path"]
    return f"`{path.rsplit('.', 1)[-1] if match['short'] else path}`"


class DocstringMarkup(griffe.Extension):
    """Read ``Example:`` sections as ``Examples:``; Sphinx roles as code spans."""

    def on_instance(self, *, obj: griffe.Object, **_: Any) -> None:
        if obj.docstring is not None:
            text = _SINGULAR.sub(r"\g<indent>Examples:", obj.docstring.value)
            obj.docstring.value = _ROLE.sub(_code_span, text)
