"""Instructor's per-request response-model check, done once per class for our own models.

instructor (1.15) walks the response model for async validators (which its runtime
refuses) at every layer of every request: seven walks per ``create_with_completion``, each
about 75 us of typing introspection on a 3-field model, about 0.5 ms of CPU per LLM call
(15% of the openai client's own cost per request). The walk's answer depends only on the
class, and our response models (:func:`nem_llm._llm.adjudication.choice_model`) are a few
classes built once. :func:`trust` runs instructor's check once for such a class and
remembers it; :func:`install` wraps instructor's function so trusted classes skip the
repeat walks. Every other model (a user's own, say) still gets instructor's full check on
every call. If instructor moves or renames the function, nothing is wrapped and every call
is checked as before.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

__all__ = ["install", "trust"]

_NAME = "reject_async_validators"
_TRUSTED: set[int] = set()  # ids of classes checked once (kept alive by their lru_cache)
_KEEP: list[type] = []  # ...and by this list, so an id is never reused by another class


def _original() -> Callable[[Any], None] | None:
    try:
        from instructor.v2.validation import async_validators
    except ImportError:  # another instructor layout: nothing to wrap
        return None
    fn = getattr(async_validators, _NAME, None)
    return getattr(fn, "__wrapped__", fn)


def trust(model: type) -> None:
    """Run instructor's check on ``model`` now (raising as it would) and skip it later."""
    check = _original()
    if check is None or id(model) in _TRUSTED:
        return
    check(model)
    _KEEP.append(model)
    _TRUSTED.add(id(model))


def install() -> None:
    """Wrap instructor's check in every loaded instructor module (idempotent)."""
    original = _original()
    if original is None:
        return

    def reject_async_validators(response_model: Any) -> None:
        if id(response_model) in _TRUSTED:
            return
        original(response_model)

    reject_async_validators.__wrapped__ = original  # type: ignore[attr-defined]
    for name, module in list(sys.modules.items()):
        if name.startswith("instructor") and getattr(module, _NAME, None) is original:
            setattr(module, _NAME, reject_async_validators)
