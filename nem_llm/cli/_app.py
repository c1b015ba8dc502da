"""The typer app every command registers on, and what the commands share.

User errors (bad files, bad options) print one line ``error: ...`` and exit with status 2;
``--debug`` shows the traceback. The OpenAI key is read from the environment by the
openai client and is never printed or written.
"""

from __future__ import annotations

import asyncio
import os
import sys
import traceback
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import NemLLMError

__all__ = [
    "app",
    "as_coro",
    "err",
    "escape",
    "fail",
    "main",
    "out",
    "run",
    "say",
    "stats_table",
    "warn",
]

T = TypeVar("T")

app = typer.Typer(
    name="nem-llm",
    help="LLM-assisted entity matching: link messy mentions to a catalog.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # click's plain help: wraps at any width without cutting option names, and shows
    # "[report]" in a help text as written (rich markup would eat it)
    rich_markup_mode=None,
)

try:  # help text wraps at spaces only, so "--alias-separator" is never cut at its hyphen
    from typer._click._textwrap import TextWrapper as _HelpWrapper

    _HelpWrapper.wordsep_re = _HelpWrapper.wordsep_simple_re
except ImportError:  # another typer layout: hyphenated names may wrap (cosmetic)
    pass

err = Console(stderr=True)
out = Console()

_debug = False


def say(message: str) -> None:
    """Print one line of plain text to stderr: no rich markup, so ``[...]`` stays as written."""
    err.print(message, markup=False, highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """Print ``warning: message`` to stderr (its brackets kept: no rich markup)."""
    err.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print ``error: message`` (its brackets kept: no rich markup) and return the exit."""
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine; user errors become one line and exit status 2."""
    try:
        return asyncio.run(main())
    except NemLLMError as exc:
        if _debug:
            traceback.print_exc()
        raise fail(str(exc)) from None
    except (OSError, ValueError) as exc:
        if _debug:
            traceback.print_exc()
        raise fail(f"{type(exc).__name__}: {exc}") from None


async def as_coro(fn: Callable[[], T]) -> T:
    """Run a sync job function under :func:`run` (its errors become one line, exit 2)."""
    return fn()


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    global _debug
    _debug = debug
    # the model loader's own tqdm bar ("Loading weights") is noise next to ours, and
    # --quiet must print nothing; read when transformers is first imported (lazily)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def stats_table(title: str, stats: Any, extra: dict[str, str] | None = None) -> Table:
    """A run's figures as a two-column table."""
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("what")
    table.add_column("value", justify="right")
    for k, v in (extra or {}).items():
        table.add_row(escape(k), escape(v))  # paths and names may hold "[...]"
    table.add_row("results", str(stats.total))
    for status, n in sorted(stats.by_status.items()):
        table.add_row(f"  status {escape(status)}", str(n))
    for who, n in sorted(stats.by_decided_by.items()):
        table.add_row(f"  decided by {escape(who)}", str(n))
    table.add_row("LLM calls", str(stats.llm_calls))
    table.add_row("LLM attempts", str(stats.llm_attempts))
    retries = ", ".join(f"{k} {v}" for k, v in sorted(stats.retries_by_cause.items()))
    table.add_row("retries", escape(f"{stats.retries}" + (f" ({retries})" if retries else "")))
    table.add_row("429s received", str(stats.rate_limited))
    table.add_row("tokens", f"{stats.usage.total_tokens:,}")
    table.add_row("cost", f"${stats.usage.cost_usd:.4f}")
    table.add_row("wall time", f"{stats.wall_time_s:.1f} s")
    if stats.latency_p50_s is not None:
        table.add_row(
            "latency p50 / p95", f"{stats.latency_p50_s:.3f} / {stats.latency_p95_s:.3f} s"
        )
    return table


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
