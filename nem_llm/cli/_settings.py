"""``MatcherSettings`` as command-line flags: every field a flag, generated, never retyped.

:func:`with_settings` adds one option per settings field to a command (the governor's
``Limits`` flattened into ``--concurrency``, ``--rpm``, ...; the catalog column mapping as
``--catalog-columns`` and ``--alias-separator``) and hands the command one validated
:class:`~nem_llm.MatcherSettings`. ``FLAGS`` says which flags each field has; a test
fails when a field has no flag or a flag no field.

Old spellings still work with a warning: ``--index DIR`` (now ``--index-dir``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from ..catalog import CatalogColumns
from ..config import LIMITS_HELP, Limits
from ..errors import NemLLMError
from ..settings import MatcherSettings
from ._app import fail, warn

__all__ = ["FLAGS", "settings_flags", "with_settings"]

F = TypeVar("F", bound=Callable[..., Any])

_LIMIT_FIELDS = tuple(f.name for f in dataclasses.fields(Limits))
#: settings field -> the command parameters (flags) that set it
FLAGS: dict[str, tuple[str, ...]] = {
    name: (name,) for name in MatcherSettings.model_fields if name not in ("limits", "columns")
}
FLAGS["limits"] = _LIMIT_FIELDS
FLAGS["columns"] = ("catalog_columns", "alias_separator")

_EXTRA_HELP = {
    "catalog_columns": "Map catalog columns, e.g. id=code,name=label,aliases=alt_names.",
    "alias_separator": "Splits a catalog's aliases cell (CSV, TSV, Parquet) into aliases; "
    "default '|' (Python|CPython|py3): set ';' for CPython;py3, or each cell is one alias.",
    "prompt_attributes": "Entity attributes shown to the LLM, comma-separated (country,type).",
}
# flags whose value is parsed from text (comma lists, mappings)
_TEXT = {"prompt_attributes"}


def _parameter(name: str, annotation: Any, default: Any, help_text: str) -> inspect.Parameter:
    kind = annotation  # typer reads Literal choices itself
    if name in _TEXT:
        kind, default = str | None, None
    if kind is bool:
        option = typer.Option(f"--{name.replace('_', '-')}/--no-{name.replace('_', '-')}",
                              help=help_text)  # fmt: skip
    else:
        option = typer.Option(help=help_text, show_default=default is not None)
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[kind, option],
    )


def settings_flags(
    exclude: Iterable[str] = (), defaults: dict[str, Any] | None = None
) -> list[inspect.Parameter]:
    """One command parameter per settings flag (minus the fields in ``exclude``);
    ``defaults`` overrides a field's default for this command."""
    skip = set(exclude)
    params: list[inspect.Parameter] = []
    hints = typing.get_type_hints(MatcherSettings)
    base = MatcherSettings(**(defaults or {}))
    for name, field in MatcherSettings.model_fields.items():
        if name in skip:
            continue
        if name == "limits":
            limit_hints = typing.get_type_hints(Limits)
            for limit in _LIMIT_FIELDS:
                default = getattr(base.limits, limit)
                params.append(_parameter(limit, limit_hints[limit], default, LIMITS_HELP[limit]))
        elif name == "columns":
            for flag in FLAGS["columns"]:
                params.append(_parameter(flag, str | None, None, _EXTRA_HELP[flag]))
        else:
            help_text = _EXTRA_HELP.get(name) or field.description or ""
            params.append(_parameter(name, hints[name], getattr(base, name), help_text))
    params.append(
        inspect.Parameter(
            "index",
            inspect.Parameter.KEYWORD_ONLY,
            default=None,
            annotation=Annotated[Path | None, typer.Option(hidden=True, help="Deprecated.")],
        )
    )
    return params


def settings_from(values: dict[str, Any], exclude: Iterable[str] = ()) -> MatcherSettings:
    """Validated settings from the flags' values (a ConfigError names a bad one)."""
    old_index = values.pop("index", None)
    if old_index is not None:
        warn("--index DIR is deprecated: use --index-dir DIR")
        if values.get("index_dir") is None:
            values["index_dir"] = old_index
    options: dict[str, Any] = {}
    limits = {k: values.pop(k) for k in _LIMIT_FIELDS if k in values}
    if limits:
        options["limits"] = Limits(**limits)
    spec, separator = values.pop("catalog_columns", None), values.pop("alias_separator", None)
    if spec or separator:
        options["columns"] = CatalogColumns.parse(spec or "", alias_separator=separator)
    for name, value in values.items():
        if name in _TEXT and value is None:
            continue
        options[name] = value
    for name in exclude:
        options.pop(name, None)
    return MatcherSettings.of(**options)


def with_settings(
    *, exclude: Iterable[str] = (), defaults: dict[str, Any] | None = None
) -> Callable[[F], F]:
    """Give a command every settings flag; it receives ``settings: MatcherSettings``.

    ``exclude``: fields the command does not take (it declares its own flag instead).
    ``defaults``: this command's own defaults for some fields (shown in ``--help``).
    """
    skipped = tuple(exclude)

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "settings"]
        extra = settings_flags(skipped, defaults)
        names = {p.name for p in extra}
        clash = names & {p.name for p in own}
        if clash:
            raise TypeError(f"{fn.__name__} declares settings flags itself: {sorted(clash)}")

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            values = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
            try:
                settings = settings_from(values, skipped)
            except NemLLMError as exc:
                raise fail(str(exc)) from None
            return fn(settings=settings, **kwargs)

        command.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[*own, *extra]
        )
        annotations = dict(getattr(fn, "__annotations__", {}))
        annotations.pop("settings", None)
        annotations.update({p.name: p.annotation for p in extra})
        command.__annotations__ = annotations
        return typing.cast(F, command)

    return decorate
