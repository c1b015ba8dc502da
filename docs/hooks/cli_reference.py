"""MkDocs hook: the CLI reference, generated from the typer app when the site is built.

A page holding the marker below gets typer's own Markdown for ``nem_llm.cli.app`` (what
``typer nem_llm.cli utils docs`` prints), made in this process: an app that fails to
import fails the build. mkdocs-typer2 does the same, but its in-process engine cannot
read typer 0.29's parameters (``TyperOption`` has no ``.type``) and its subprocess engine
leaves the page blank when the command fails, which ``--strict`` would not notice.
"""

from __future__ import annotations

import re
from typing import Any

MARKER = "<!-- nem-llm CLI reference -->"


def cli_markdown() -> str:
    """The Markdown of every ``nem-llm`` command, headings one level below the page's."""
    import typer
    from typer.cli import get_docs_for_click

    from nem_llm.cli import app

    command = typer.main.get_command(app)
    text = get_docs_for_click(obj=command, ctx=typer.Context(command), name="nem-llm")
    return re.sub(r"^(#+) ", r"#\1 ", text, flags=re.MULTILINE)


def on_page_markdown(markdown: str, **_: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_markdown())
