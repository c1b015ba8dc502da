"""Evaluation metrics over labelled queries (pure: results and gold ids in, a report out)."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, Field

from ..models import Candidate, MatchResult

__all__ = ["RECALL_KS", "EvalReport", "evaluate", "render_eval_table"]

RECALL_KS = (1, 5, 10, 50)


class EvalReport(BaseModel):
    """What ``nem-llm eval`` prints. Ratios are in [0, 1]; ``None`` when undefined."""

    name: str = ""
    queries: int
    with_gold: int
    without_gold: int
    recall_at: dict[int, float | None] = Field(default_factory=dict)
    auto_accept_precision: float | None
    auto_accept_coverage: float
    novel_precision: float | None
    novel_recall: float | None
    auto_novel_precision: float | None = None
    auto_novel_coverage: float = 0.0
    accuracy: float
    llm_share: float
    review_share: float
    error_share: float
    tokens: int
    cost_usd: float
    llm: str = "off"
    calibrated_on: int = 0
    #: workload queries the LLM labelled at fit (counted in ``llm_share`` and ``tokens``)
    labelled: int = 0
    thresholds: dict[str, float] = Field(default_factory=dict)
    calibration_source: str = ""
    mode: str = "zero-shot"
    rewritten: int = 0
    rewrite_recovered: float | None = None
    seen_in_training: int = 0
    recall_at_10_unseen: float | None = None
    expected_accept_precision: float | None = None
    expected_novel_precision: float | None = None


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def evaluate(
    results: Sequence[MatchResult],
    golds: Sequence[str | None],
    retrieved: Sequence[Sequence[Candidate]],
    *,
    name: str = "",
    llm: str = "off",
) -> EvalReport:
    """Score results against gold ids (``None`` = not in the catalog).

    - recall@k: share of queries WITH a gold id whose gold is in the top k ``retrieved``
      (the ceiling of the whole system: the LLM cannot recover a missed candidate).
    - auto-accept precision/coverage: of the queries matched by embeddings alone, the
      share that are right; and their share of all queries.
    - novel precision/recall: predicted novel (by embeddings or the LLM) vs gold ``None``.
    - accuracy: matched to the gold id, or novel when gold is ``None``; ``review`` and
      ``error`` count as wrong.
    """
    if not len(results) == len(golds) == len(retrieved):
        raise ValueError("results, golds and retrieved must have the same length")
    n = len(results)
    with_gold = [i for i, g in enumerate(golds) if g is not None]
    recall: dict[int, float | None] = {}
    for k in RECALL_KS:
        hits = sum(1 for i in with_gold if golds[i] in {c.entity_id for c in retrieved[i][:k]})
        recall[k] = _ratio(hits, len(with_gold))
    auto = [
        i for i, r in enumerate(results) if r.status == "matched" and r.decided_by == "embedding"
    ]
    auto_right = sum(1 for i in auto if results[i].entity_id == golds[i])
    novel = [i for i, r in enumerate(results) if r.status == "novel"]
    auto_novel = [i for i in novel if results[i].decided_by == "embedding"]
    absent = [i for i, g in enumerate(golds) if g is None]
    right = sum(
        1
        for r, g in zip(results, golds, strict=True)
        if (r.status == "matched" and r.entity_id == g) or (r.status == "novel" and g is None)
    )
    tokens = sum(r.usage.total_tokens for r in results)
    return EvalReport(
        name=name,
        queries=n,
        with_gold=len(with_gold),
        without_gold=len(absent),
        recall_at=recall,
        auto_accept_precision=_ratio(auto_right, len(auto)),
        auto_accept_coverage=len(auto) / n if n else 0.0,
        novel_precision=_ratio(sum(1 for i in novel if golds[i] is None), len(novel)),
        novel_recall=_ratio(sum(1 for i in absent if results[i].status == "novel"), len(absent)),
        auto_novel_precision=_ratio(
            sum(1 for i in auto_novel if golds[i] is None), len(auto_novel)
        ),
        auto_novel_coverage=len(auto_novel) / n if n else 0.0,
        accuracy=right / n if n else 0.0,
        llm_share=sum(1 for r in results if r.attempts or r.decided_by == "llm") / n if n else 0.0,
        review_share=sum(1 for r in results if r.status == "review") / n if n else 0.0,
        error_share=sum(1 for r in results if r.status == "error") / n if n else 0.0,
        tokens=tokens,
        cost_usd=sum(r.usage.cost_usd for r in results),
        llm=llm,
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def render_eval_table(reports: Sequence[EvalReport]) -> str:
    """A markdown table, one row per report.

    "auto-accept P" and "auto-novel P" are measured on the evaluated queries; "est." is
    what calibration expected (on probes of the catalog, or on held-out labels).
    "R@10 unseen (seen)": recall@10 of the evaluated queries whose text is not among the
    labelled ones, and how many are.
    """
    head = (
        "| set | llm | calib | queries | R@1 | R@5 | R@10 | R@50 | auto-accept P | auto-accept cov "
        "| novel P | novel R | accuracy | to LLM | review | tokens | cost $ "
        "| est. auto-accept P | auto-novel P | est. auto-novel P | auto-novel cov "
        "| R@10 unseen (seen) |"
    )
    lines = [head, "|" + "---|" * 22]
    for r in reports:
        source = r.calibration_source or "-"
        if r.calibrated_on:
            source = f"{r.calibrated_on} labels, {r.mode}"
        if r.labelled:
            source += f"; {r.labelled} LLM-labelled"
        if r.rewrite_recovered is not None:
            source += f"; rewrite recovered {r.rewrite_recovered:.3f} of misses"
        unseen = f"{_fmt(r.recall_at_10_unseen)} ({r.seen_in_training})" if r.calibrated_on else "-"
        lines.append(
            f"| {r.name} | {r.llm} | {source} | {r.queries} | "
            + " | ".join(_fmt(r.recall_at.get(k)) for k in RECALL_KS)
            + f" | {_fmt(r.auto_accept_precision)} | {_fmt(r.auto_accept_coverage)} "
            f"| {_fmt(r.novel_precision)} | {_fmt(r.novel_recall)} | {_fmt(r.accuracy)} "
            f"| {_fmt(r.llm_share)} | {_fmt(r.review_share)} | {r.tokens} | {r.cost_usd:.4f} "
            f"| {_fmt(r.expected_accept_precision)} | {_fmt(r.auto_novel_precision)} "
            f"| {_fmt(r.expected_novel_precision)} | {_fmt(r.auto_novel_coverage)} | {unseen} |"
        )
    return "\n".join(lines)
