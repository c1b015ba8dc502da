"""Secrets out of every answer and log line: the bearer token and the LLM client's key."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["REDACTED", "RedactingRecords", "Redactor"]

REDACTED = "[redacted]"


class Redactor:
    """Replace known secrets in text and bytes (keys shorter than 6 chars are not secrets)."""

    def __init__(self, secrets: Iterable[str | None]) -> None:
        self.secrets = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)
        self._bytes = [s.encode() for s in self.secrets]

    def text(self, value: str) -> str:
        """``value`` with every secret replaced by ``[redacted]``."""
        for secret in self.secrets:
            value = value.replace(secret, REDACTED)
        return value

    def data(self, value: bytes) -> bytes:
        """The bytes twin of :meth:`text` (response bodies)."""
        for secret in self._bytes:
            value = value.replace(secret, REDACTED.encode())
        return value


class RedactingRecords:
    """A log-record factory that redacts secrets from every record, whichever library logs.

    Installed for the app's lifetime (instructor and openai log provider error messages,
    which may quote a key); tracebacks are formatted and redacted up front.
    """

    def __init__(self, redactor: Redactor, previous: Callable[..., logging.LogRecord]) -> None:
        self.redactor = redactor
        self.previous = previous

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self.previous(*args, **kwargs)
        message = record.getMessage()
        redacted = self.redactor.text(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and record.exc_info[0] is not None:
            text = "".join(traceback.format_exception(*record.exc_info))
            record.exc_text = self.redactor.text(text).rstrip("\n")
        return record
