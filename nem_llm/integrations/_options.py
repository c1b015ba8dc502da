"""Keyword options passed to a Matcher method only when set, and only if it takes them."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
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
    chosen = {name: value for name, value in options.items() if value is not None}
    if not chosen:  # the common case, and a hot path of the HTTP service: no signature
        return chosen
    params, open_kwargs = _parameters(getattr(fn, "__func__", fn))
    for name in chosen:
        if name not in params and not open_kwargs:
            raise ConfigError(
                f"{name}: not supported by {getattr(fn, '__qualname__', fn)} in this "
                "version of nem_llm"
            )
    return chosen


@functools.lru_cache(maxsize=64)
def _parameters(fn: Callable[..., Any]) -> tuple[Mapping[str, inspect.Parameter], bool]:
    """``fn``'s parameters and whether it takes ``**kwargs`` (read once per function)."""
    params = inspect.signature(fn).parameters
    return params, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
