"""The decision cache: an LLM decision is never paid for twice.

:class:`DecisionCache` maps :func:`decision_key` (normalized query, candidate ids, model,
prompt version) to a :class:`CachedDecision`, so a repeated query or a rerun never pays
for the same LLM decision twice. Beside it, the ``reviewed`` table holds decisions a person
made (``nem-llm review import``), keyed by the normalized query alone: they hold whatever
the candidates, model or prompt, and the Matcher consults them before routing. It is a
SQLite file in WAL mode (see ``nem_llm._sqlite`` for the threading model and durability);
it may share its file with run checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from .._sqlite import SQLiteStore, StoreError, check_key, immediate
from ..errors import InputError
from ..models import Usage

__all__ = ["CachedDecision", "DecisionCache", "ReviewedLabel", "decision_key"]


def decision_key(
    normalized_query: str, candidate_ids: Sequence[str], model: str, prompt_version: str
) -> str:
    """Return the cache key of one LLM decision: a sha256 hex digest of its inputs.

    The parts are encoded as one JSON list ``[query, [ids...], model, prompt_version]``, so
    no two different inputs share an encoding. Candidate order matters as given (the prompt
    lists candidates in that order). Anything else that changes the prompt (entity names,
    descriptions, the template) must be reflected in ``prompt_version`` by the caller.

    Example:
        >>> decision_key("usa", ["US", "UM"], "gpt-4o-mini", "v1")[:12]
        '697d28410abf'
    """
    if not isinstance(normalized_query, str):
        raise InputError(
            f"must be a str, got {type(normalized_query).__name__}", source="normalized_query"
        )
    if isinstance(candidate_ids, (str, bytes)) or not isinstance(candidate_ids, Sequence):
        raise InputError(
            f"must be a sequence of str ids, got {type(candidate_ids).__name__}",
            source="candidate_ids",
        )
    ids = list(candidate_ids)
    for i, cid in enumerate(ids):
        if not isinstance(cid, str):
            raise InputError(
                f"must be a str, got {type(cid).__name__}", source=f"candidate_ids[{i}]"
            )
    for name, value in (("model", model), ("prompt_version", prompt_version)):
        if not isinstance(value, str):
            raise InputError(f"must be a str, got {type(value).__name__}", source=name)
    # ensure_ascii keeps the encoding total (lone surrogates become escapes, not errors)
    payload = json.dumps([normalized_query, ids, model, prompt_version], separators=(",", ":"))
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


class CachedDecision(BaseModel):
    """One LLM decision as the cache keeps it.

    ``entity_id`` is the chosen catalog id, or ``None`` when the model answered "none"
    (novel). ``usage`` is what the decision cost when it was first made; a cache hit costs
    nothing.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    entity_id: str | None
    confidence: float | None = None
    reason: str = ""
    usage: Usage = Field(default_factory=Usage)
    model: str
    created_at: float = Field(default_factory=time.time)


class ReviewedLabel(BaseModel):
    """A decision a person made for one normalized query: a catalog id, or ``None`` (novel)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    query: str = Field(min_length=1)
    entity_id: str | None
    note: str = ""
    created_at: float = Field(default_factory=time.time)


class DecisionCache(SQLiteStore):
    """Persistent map from :func:`decision_key` to :class:`CachedDecision`.

    Args:
        path: Database file (created if missing; its directory must exist), or
            ``":memory:"`` for a private in-memory cache (tests).
        timeout: Seconds to wait for another writer's lock before raising StoreError.

    Every method is thread-safe; ``get_async``/``put_async`` run on the store's worker thread and
    never block the event loop. ``put`` overwrites an existing entry (latest wins).

    Example:
        >>> with DecisionCache(":memory:") as cache:
        ...     key = decision_key("usa", ["US", "UM"], "gpt-4o-mini", "v1")
        ...     cache.put(key, CachedDecision(entity_id="US", model="gpt-4o-mini"))
        ...     cache.get(key).entity_id
        'US'
    """

    TABLES: ClassVar[tuple[str, ...]] = (
        """CREATE TABLE IF NOT EXISTS decisions (
        key TEXT PRIMARY KEY,
        entity_id TEXT,
        confidence REAL,
        reason TEXT NOT NULL,
        usage TEXT NOT NULL,
        model TEXT NOT NULL,
        created_at REAL NOT NULL
    ) WITHOUT ROWID""",
        """CREATE TABLE IF NOT EXISTS reviewed (
        query TEXT PRIMARY KEY,
        entity_id TEXT,
        note TEXT NOT NULL,
        created_at REAL NOT NULL
    ) WITHOUT ROWID""",
    )

    def get(self, key: str) -> CachedDecision | None:
        """Return the decision stored under ``key``, or None on a miss."""
        return self._call(self._get, check_key(key))

    def put(self, key: str, decision: CachedDecision) -> None:
        """Store ``decision`` under ``key`` (replacing any previous one); durable on return."""
        self._call(self._put, check_key(key), _check_decision(decision))

    async def get_async(self, key: str) -> CachedDecision | None:
        """Async :meth:`get`: runs on the store's worker thread."""
        return await self._acall(self._get, check_key(key))

    async def put_async(self, key: str, decision: CachedDecision) -> None:
        """Async :meth:`put`: runs on the store's worker thread; durable once awaited."""
        await self._acall(self._put, check_key(key), _check_decision(decision))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._call(self._get, key) is not None

    def __len__(self) -> int:
        return self._call(self._len)

    def put_reviewed(self, labels: Sequence[ReviewedLabel]) -> None:
        """Store reviewed labels (latest wins per query) in one transaction; durable on return."""
        for i, label in enumerate(labels):
            if not isinstance(label, ReviewedLabel):
                raise InputError(
                    f"must be a ReviewedLabel, got {type(label).__name__}", source=f"labels[{i}]"
                )
        self._call(self._put_reviewed, list(labels))

    def reviewed(self) -> dict[str, ReviewedLabel]:
        """Return every reviewed label by normalized query (a snapshot; the table is small)."""
        return self._call(self._reviewed)

    async def reviewed_async(self) -> dict[str, ReviewedLabel]:
        """Async :meth:`reviewed`: runs on the store's worker thread."""
        return await self._acall(self._reviewed)

    # worker-thread bodies

    def _put_reviewed(self, labels: list[ReviewedLabel]) -> None:
        conn = self._connection()
        with immediate(conn):
            conn.executemany(
                "INSERT OR REPLACE INTO reviewed (query, entity_id, note, created_at)"
                " VALUES (?, ?, ?, ?)",
                ((r.query, r.entity_id, r.note, r.created_at) for r in labels),
            )

    def _reviewed(self) -> dict[str, ReviewedLabel]:
        rows = (
            self._connection()
            .execute("SELECT query, entity_id, note, created_at FROM reviewed")
            .fetchall()
        )
        return {q: ReviewedLabel(query=q, entity_id=e, note=n, created_at=t) for q, e, n, t in rows}

    def _get(self, key: str) -> CachedDecision | None:
        row = (
            self._connection()
            .execute(
                "SELECT entity_id, confidence, reason, usage, model, created_at"
                " FROM decisions WHERE key = ?",
                (key,),
            )
            .fetchone()
        )
        if row is None:
            return None
        entity_id, confidence, reason, usage, model, created_at = row
        try:
            return CachedDecision(
                entity_id=entity_id,
                confidence=confidence,
                reason=reason,
                usage=Usage.model_validate_json(usage),
                model=model,
                created_at=created_at,
            )
        except ValueError as exc:  # pydantic.ValidationError is a ValueError
            raise StoreError(
                f"{self._path}: cached decision {key!r} is unreadable: {exc}", path=self._path
            ) from exc

    def _put(self, key: str, decision: CachedDecision) -> None:
        self._connection().execute(
            "INSERT OR REPLACE INTO decisions"
            " (key, entity_id, confidence, reason, usage, model, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                key,
                decision.entity_id,
                decision.confidence,
                decision.reason,
                decision.usage.model_dump_json(),
                decision.model,
                decision.created_at,
            ),
        )

    def _len(self) -> int:
        return int(self._connection().execute("SELECT count(*) FROM decisions").fetchone()[0])


def _check_decision(decision: object) -> CachedDecision:
    if not isinstance(decision, CachedDecision):
        raise InputError(
            f"must be a CachedDecision, got {type(decision).__name__}", source="decision"
        )
    return decision
