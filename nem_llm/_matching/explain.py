"""What ``explain_match`` and ``diagnose`` say: pure assembly of a route and its hints."""

from __future__ import annotations

from .._retrieval.policy import RoutePolicy
from .._retrieval.routing import Route
from ..config import Thresholds
from ..models import Candidate, Diagnosis, Explanation, MatchResult

__all__ = ["diagnosis", "explanation"]


def explanation(result: MatchResult, route: Route, thresholds: Thresholds) -> Explanation:
    """A matched query's explanation: candidates, route, thresholds, the LLM's reason."""
    return Explanation(
        result=result,
        candidates=result.candidates,
        route=route.kind,
        route_reason=route.reason,
        thresholds=thresholds.as_dict(),
        llm_reason=result.reason if result.decided_by in ("llm", "cache") else None,
    )


def diagnosis(
    query: str,
    normalized: str,
    route: Route | None,
    candidates: list[Candidate],
    policy: RoutePolicy,
    llm_configured: bool,
) -> Diagnosis:
    """Why a query routes as it does (``route`` is ``None`` before ``fit``), with hints."""
    hints: list[str] = []
    if not llm_configured:
        hints.append(
            "no LLM configured: ambiguous queries come back as 'review' (pass client= "
            "or set OPENAI_API_KEY / OPENAI_BASE_URL)"
        )
    thresholds = policy.thresholds.as_dict()
    if route is None:
        hints.insert(0, "not ready: call fit_async() / fit() to build the index")
        return Diagnosis(
            query=query,
            normalized_query=normalized,
            ready=False,
            llm_configured=llm_configured,
            route=None,
            route_reason="index not built",
            top_score=None,
            margin_to_runner_up=None,
            thresholds=thresholds,
            hints=hints,
        )
    if route.kind == "adjudicate" and route.margin is not None and route.margin < 0.02:
        hints.append("near-tie between the top candidates: check for duplicate entities")
    if route.kind == "novel" and candidates:
        hints.append(
            f"closest entity {candidates[0].entity_id!r} scored {candidates[0].score:.3f}; add "
            "an alias if it is the same entity"
        )
    cal = policy.calibration
    if cal is not None:
        for name, est in (("auto-match", cal.matched), ("auto-novel", cal.novel)):
            if not est.open:
                hints.append(f"the {name} route is closed: {est.reason}")
        if cal.routing_model:
            hints.append(cal.routing_model)
        if cal.source == "probes":
            hints.append(
                "thresholds were estimated from probes of the catalog; labelled examples "
                "(fit_async(training_data=...)) calibrate them on real queries"
            )
    return Diagnosis(
        query=query,
        normalized_query=normalized,
        ready=True,
        llm_configured=llm_configured,
        route=route.kind,
        route_reason=route.reason,
        top_score=route.top_score,
        margin_to_runner_up=route.margin,
        thresholds=thresholds,
        hints=hints,
        candidates=candidates,
    )
