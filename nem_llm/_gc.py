"""Python's cyclic garbage collector, tuned for long matching runs (a base module).

A built index, the catalog and the imported libraries are ~250k long-lived objects; every
full pass of the collector walks them all and stalls the event loop for 100-350 ms on
these machines, which shows as loop lag and as LLM calls started late. The applications
(``nem-llm serve``, ``nem-llm match``, ``nem-llm bench``) tune the collector once the
index is built; a library user running long async work can do the same.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["GC_GEN0_THRESHOLD", "tune_gc", "tuned_gc"]

GC_GEN0_THRESHOLD = 10_000


def tune_gc() -> None:
    """Tune Python's cyclic garbage collector for serving (call once the index is built).

    ``gc.collect()`` then ``gc.freeze()``: the catalog, the index and the imported
    libraries (~250k objects) leave the collector's sight, so its passes walk only the
    requests' objects; and a first-generation threshold of ``GC_GEN0_THRESHOLD``
    allocations instead of 700, so fewer passes walk the objects of the requests in flight
    (200 concurrent requests keep thousands alive). Measured with 200 concurrent
    single-query requests: ~12% less CPU per request in-process (5% for
    ``match_batch_async``); without the freeze a full pass stalls the loop for 100+ ms.
    """
    gc.collect()
    gc.freeze()
    gen0, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(max(gen0, GC_GEN0_THRESHOLD), gen1, gen2)


@contextmanager
def tuned_gc() -> Iterator[None]:
    """:func:`tune_gc` for the duration of a block; the collector is restored after it."""
    before = gc.get_threshold()
    tune_gc()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
