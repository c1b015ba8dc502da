"""What the workload alone, without labels, can say about a label-free route.

Probes are noisy copies of the catalog's own names, with the entity present or taken out.
Without labels nothing tells whether a real mention is in the catalog, but one thing is
checkable on the workload itself: how many of its queries fall in a route's region. Under
the probes' model, the share of queries below the novel cut is at most the share of absent
probes there (the share a workload of absent entities only would show). A workload with
clearly more queries there is not what the probes describe: mentions the catalog's names do
not predict (translations, other scripts, another naming convention), where a low score
says nothing about absence. The novel route then closes; the LLM or labels can open it.
"""

from __future__ import annotations

from ..config import CLOSED_NOVEL
from ..models import Calibration, RouteEstimate
from .bounds import lower_bound
from .calibration import PROBE_NOVEL_SHARE

__all__ = ["MIN_WORKLOAD", "novel_ceiling", "workload_check"]

#: workload queries needed before their share can close a route
MIN_WORKLOAD = 50


def novel_ceiling(calibration: Calibration) -> float | None:
    """The largest share of queries the probes allow below the novel cut: the estimate's
    coverage is taken at the lowest absent share the probes assume, so absent probes fall
    there at most ``coverage / share`` of the time (``None``: the route is not a probe
    estimate)."""
    novel = calibration.novel
    if calibration.source != "probes" or not novel.open or novel.expected_coverage is None:
        return None
    return min(1.0, novel.expected_coverage / PROBE_NOVEL_SHARE[0])


def workload_check(calibration: Calibration, below: int, n: int) -> Calibration:
    """Close a probe-calibrated novel route that ``below`` of ``n`` workload queries (routed
    novel by it) contradict: the one-sided 90% Wilson lower bound of their share is above
    :func:`novel_ceiling`. Otherwise the calibration is returned as it is."""
    ceiling = novel_ceiling(calibration)
    if ceiling is None or n < MIN_WORKLOAD:
        return calibration
    if float(lower_bound(below, n, 1.0)) <= ceiling:
        return calibration
    cut = calibration.thresholds["novel"]
    novel = RouteEstimate(
        open=False,
        target=calibration.novel.target,
        reason=(
            f"closed by the workload: {below} of {n} queries ({below / n:.1%}) score below "
            f"the novel cut {cut:.3f}, more than the probes allow even if none of them were "
            f"in the catalog (at most {ceiling:.1%}): these mentions are not like the "
            "catalog's names, so a low score does not say the entity is absent"
        ),
    )
    thresholds = dict(calibration.thresholds, novel=CLOSED_NOVEL)
    return calibration.model_copy(update={"novel": novel, "thresholds": thresholds})
