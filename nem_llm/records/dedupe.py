"""Duplicates within one catalog: clusters of confident links, and one golden record each.

:func:`clusters` joins records linked with probability at least ``threshold`` into
connected components (a duplicate of a duplicate is the same entity). :func:`golden_records`
then builds one record per cluster by this **survivorship rule**, field by field:

1. the value most members agree on (compared in their normalised form: case, accents,
   spacing and punctuation do not split a vote) wins;
2. a tie goes to the value of the most complete member (the most non-missing fields);
3. a remaining tie goes to the member that comes first in the catalog.

The winning value is returned as that member wrote it. Records keep their position in
the catalog as their id; the cluster id is the position of its first member. Pure: values
in, values out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .fields import as_text, normalize_value

__all__ = ["GoldenRecord", "clusters", "golden_records"]

Ints = npt.NDArray[np.int64]


@dataclass(frozen=True)
class GoldenRecord:
    """One cluster's surviving record.

    Attributes:
        cluster: the cluster id (the position of its first member).
        members: the members' positions, in catalog order.
        values: the surviving value of each field (fields no member has are left out).
        sources: per field, the position of the member whose value survived.
    """

    cluster: int
    members: tuple[int, ...]
    values: dict[str, Any]
    sources: dict[str, int]


def clusters(
    records: int,
    left: Sequence[int] | Ints,
    right: Sequence[int] | Ints,
    probability: Sequence[float] | npt.NDArray[np.float64],
    *,
    threshold: float = 0.99,
) -> Ints:
    """The cluster id of each of ``records`` records: connected components of confident links.

    Args:
        records: how many records there are (positions ``0..records-1``).
        left, right, probability: scored pairs and their match probabilities.
        threshold: pairs at or above it are links.

    Returns:
        Per record, its cluster id: the smallest position in its component (a record
        with no link is its own cluster).

    Example:
        >>> clusters(4, [0, 2], [1, 3], [0.999, 0.2]).tolist()
        [0, 0, 2, 3]
    """
    li = np.asarray(left, dtype=np.int64)
    ri = np.asarray(right, dtype=np.int64)
    p = np.asarray(probability, dtype=np.float64)
    if not len(li) == len(ri) == len(p):
        raise ValueError("left, right and probability must have the same length")
    keep = p >= threshold
    parent = np.arange(records, dtype=np.int64)
    a, b = li[keep], ri[keep]
    # union by smallest root, repeated until no link joins two roots (pointer jumping)
    while len(a):
        ra, rb = _roots(parent, a), _roots(parent, b)
        differ = ra != rb
        if not differ.any():
            break
        lo = np.minimum(ra[differ], rb[differ])
        hi = np.maximum(ra[differ], rb[differ])
        np.minimum.at(parent, hi, lo)
        a, b = a[differ], b[differ]
    return _roots(parent, np.arange(records, dtype=np.int64))


def _roots(parent: Ints, nodes: Ints) -> Ints:
    """The root of each node (following parents until they point to themselves)."""
    out = parent[nodes]
    while True:
        nxt = parent[out]
        if np.array_equal(nxt, out):
            return out
        out = nxt


def golden_records(
    records: Sequence[Mapping[str, Any]], cluster_of: Sequence[int] | Ints
) -> list[GoldenRecord]:
    """One :class:`GoldenRecord` per cluster, by the survivorship rule of the module docstring.

    Example:
        >>> rows = [{"name": "Ann Lee", "city": "Oslo"}, {"name": "ann lee", "city": None},
        ...         {"name": "Anne Lee", "city": "Oslo"}]
        >>> golden_records(rows, [0, 0, 0])[0].values
        {'name': 'Ann Lee', 'city': 'Oslo'}
    """
    ids = np.asarray(cluster_of, dtype=np.int64)
    if len(ids) != len(records):
        raise ValueError(f"{len(records)} records but {len(ids)} cluster ids")
    members: dict[int, list[int]] = {}
    for i, c in enumerate(ids.tolist()):
        members.setdefault(c, []).append(i)
    completeness = [sum(as_text(v) is not None for v in r.values()) for r in records]
    out: list[GoldenRecord] = []
    for cluster in sorted(members):
        rows = members[cluster]
        fields: list[str] = []
        for i in rows:
            fields.extend(k for k in records[i] if k not in fields)
        values: dict[str, Any] = {}
        sources: dict[str, int] = {}
        for name in fields:
            votes: dict[str, list[int]] = {}
            for i in rows:
                key = normalize_value(records[i].get(name), "name")
                if key is not None:
                    votes.setdefault(key, []).append(i)
            if not votes:
                continue
            # most votes, then the most complete member, then the first member
            best = max(
                votes.values(),
                key=lambda who: (len(who), max(completeness[i] for i in who), -min(who)),
            )
            source = min(best, key=lambda i: (-completeness[i], i))
            values[name] = records[source][name]
            sources[name] = source
        out.append(GoldenRecord(cluster, tuple(rows), values, sources))
    return out
