"""Keyword options passed to a Matcher method only when set, and only if it takes them."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from ..errors import ConfigError

__all__ = ["call_options"]


def call_options(fn: Callable[..., Any], **options: Any) -> dict[str, Any]:
    """Return the options that are set (not ``None``), checked against ``fn``'s signature.

    Options left at ``None`` are dropped, so callers work with Matchers that predate an
    option; a set option that ``fn`` does not accept raises instead of being ignored.

    Raises:
        ConfigError: naming the option ``fn`` does not take.
    """
    params = inspect.signature(fn).parameters
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    chosen: dict[str, Any] = {}
    for name, value in options.items():
        if value is None:
            continue
        if name not in params and not open_kwargs:
            raise ConfigError(
                f"{name}: not supported by {getattr(fn, '__qualname__', fn)} in this "
                "version of nem_llm"
            )
        chosen[name] = value
    return chosen
