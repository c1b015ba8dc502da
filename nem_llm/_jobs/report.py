"""The run report behind ``nem-llm report``: one self-contained HTML file of charts.

Results in (the ``nem-llm match`` JSONL, or ``MatchResult`` rows), optionally labels
(``{"qid"?, "query", "gold_id"}`` JSONL, the development sets' shape) and discovery
proposals; one HTML file out that needs no network to view: charts are matplotlib SVG
inlined in the page, there is no script. What it shows, each readable in seconds:

- summary figures (rows, statuses, LLM calls, tokens, cost; accuracy with labels);
- the top-candidate score distribution by status;
- the route chosen per score band (embedding accept / novel, LLM, cache, person, review);
- with labels: precision and coverage of auto-accepting the top candidate against the
  accept threshold, and the most frequent confusions;
- LLM calls, tokens and cost accumulated over the rows (in the file's row order: rows
  carry no clock time), retries by cause and 429s;
- the largest novel clusters (from a proposals file of ``nem-llm discover``; without one,
  discovery's clustering on character n-grams of the novel mentions).

Charts need matplotlib (the ``report`` extra).
"""

from __future__ import annotations

import html
import io
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .._text import normalize
from ..config import Thresholds
from ..errors import ConfigError, InputError
from ..models import MatchResult
from .discovery import ClusterConfig, cluster_mentions, similarity_matrix
from .io import read_jsonl_rows, read_result_rows
from .labels import read_labels

__all__ = [
    "ReportData",
    "build_report",
    "confusions",
    "largest_novel_groups",
    "load_gold_labels",
    "render_html",
    "threshold_curve",
    "write_report",
]

_STATUS_COLORS = {
    "matched": "#2a9d8f",
    "novel": "#e9c46a",
    "review": "#f4a261",
    "error": "#e76f51",
}
_ROUTES = (
    ("accepted by embedding", "#2a9d8f"),
    ("novel by embedding", "#e9c46a"),
    ("LLM: matched", "#264653"),
    ("LLM: none", "#8ab17d"),
    ("cache", "#6d597a"),
    ("person", "#457b9d"),
    ("review", "#f4a261"),
    ("error", "#e76f51"),
)
_BANDS = np.linspace(0.0, 1.0, 11)
_MAX_REPORT_MENTIONS = 3000  # distinct novel mentions clustered for the novel chart
_COUNT_AXES = {"rows", "attempts", "mentions", "LLM calls", "tokens"}


@dataclass
class ReportData:
    """What the report draws: result rows, their gold ids (if labelled), novel clusters."""

    results: list[MatchResult]
    golds: list[str | None] | None = None
    clusters: list[tuple[str, int, list[str]]] = field(default_factory=list)
    accept_threshold: float = Thresholds().accept
    title: str = "nem-llm run report"
    source: str = ""


def load_gold_labels(
    path: str | os.PathLike[str],
) -> tuple[dict[str, str | None], dict[str, str | None]]:
    """Read labels into (qid/id -> gold, normalized query -> gold); no gold id = novel.

    The labels are read as ``nem-llm eval`` reads them (:func:`~nem_llm._jobs.labels.read_labels`).

    Raises:
        InputError: a row without a query or a ``gold_id`` (names the line).
    """
    by_id: dict[str, str | None] = {}
    by_query: dict[str, str | None] = {}
    for label in read_labels(path).items:
        if label.row_id is not None:
            by_id[label.row_id] = label.gold_id
        by_query.setdefault(normalize(label.query), label.gold_id)
    return by_id, by_query


def _read_results(path: str | os.PathLike[str]) -> tuple[list[MatchResult], list[str | None]]:
    results: list[MatchResult] = []
    ids: list[str | None] = []
    for line, row in read_result_rows(path):
        try:
            results.append(MatchResult.model_validate(row))
        except ValueError as exc:
            raise InputError(f"not a result row: {exc}", source=str(path), line=line) from None
        ids.append(row.get("id") if isinstance(row.get("id"), str) else None)
    return results, ids


def _read_clusters(path: str | os.PathLike[str]) -> list[tuple[str, int, list[str]]]:
    out: list[tuple[str, int, list[str]]] = []
    for _, row in read_jsonl_rows(path):
        proposal = row.get("proposal") or {}
        members = [str(m) for m in row.get("mentions") or []]
        name = proposal.get("name") if isinstance(proposal, dict) else None
        out.append(
            (str(name or (members[0] if members else "?")), int(row.get("size", 0)), members)
        )
    return sorted(out, key=lambda c: -c[1])


def build_report(
    results: str | os.PathLike[str],
    *,
    labels: str | os.PathLike[str] | None = None,
    proposals: str | os.PathLike[str] | None = None,
    accept_threshold: float | None = None,
    title: str | None = None,
) -> ReportData:
    """Read a results file (and labels, proposals) into :class:`ReportData`.

    Results join labels by row id (``qid``/``id``) first, then by normalized query.

    Raises:
        InputError: a missing or damaged file (names the line).
    """
    rows, ids = _read_results(results)
    golds: list[str | None] | None = None
    if labels is not None:
        by_id, by_query = load_gold_labels(labels)
        golds = []
        for result, rid in zip(rows, ids, strict=True):
            if rid is not None and rid in by_id:
                golds.append(by_id[rid])
            else:
                golds.append(by_query.get(normalize(result.query)))
    data = ReportData(
        results=rows,
        golds=golds,
        clusters=_read_clusters(proposals) if proposals is not None else [],
        source=str(results),
    )
    if accept_threshold is not None:
        data.accept_threshold = accept_threshold
    if title:
        data.title = title
    return data


# -- charts ------------------------------------------------------------------------------


def _figure(width: float = 6.4, height: float = 3.4) -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:  # pragma: no cover - matplotlib is in the dev extra
        raise ConfigError("the report needs matplotlib: pip install 'nem_llm[report]'") from exc
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig


def _svg(fig: Any, salt: str) -> str:
    import matplotlib
    from matplotlib.ticker import MaxNLocator

    for ax in fig.axes:  # counts are whole numbers
        for axis in (ax.xaxis, ax.yaxis):
            if axis.get_scale() == "linear" and axis.get_label_text() in _COUNT_AXES:
                axis.set_major_locator(MaxNLocator(integer=True))

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]


def _top_score(r: MatchResult) -> float | None:
    return r.candidates[0].score if r.candidates else r.score


def _route(r: MatchResult) -> str:
    if r.status == "error":
        return "error"
    if r.status == "review":
        return "review"
    if r.decided_by == "human":
        return "person"
    if r.decided_by == "cache":
        return "cache"
    if r.decided_by == "llm":
        return "LLM: matched" if r.status == "matched" else "LLM: none"
    return "accepted by embedding" if r.status == "matched" else "novel by embedding"


def _chart_scores(data: ReportData) -> Any:
    fig = _figure()
    ax = fig.add_subplot()
    for status, color in _STATUS_COLORS.items():
        scores = [
            s for r in data.results if r.status == status and (s := _top_score(r)) is not None
        ]
        if scores:
            ax.hist(
                scores,
                bins=_BANDS * 1.0,
                histtype="step",
                linewidth=2,
                color=color,
                label=f"{status} ({len(scores):,})",
            )
    ax.axvline(data.accept_threshold, color="#555", linestyle="--", linewidth=1)
    ax.set_xlabel("top candidate score")
    ax.set_ylabel("rows")
    ax.set_xlim(0, 1)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=False, fontsize=8)
    return fig


def _chart_routes(data: ReportData) -> Any:
    fig = _figure()
    ax = fig.add_subplot()
    counts = {name: np.zeros(len(_BANDS) - 1) for name, _ in _ROUTES}
    for r in data.results:
        s = _top_score(r)
        band = min(int((s or 0.0) * 10), 9)
        counts[_route(r)][band] += 1
    labels = [f"{lo:.1f}" for lo in _BANDS[:-1]]
    bottom = np.zeros(len(labels))
    for name, color in _ROUTES:
        if counts[name].any():
            ax.bar(labels, counts[name], bottom=bottom, color=color, label=name, width=0.8)
            bottom += counts[name]
    ax.set_xlabel("top candidate score band (lower edge)")
    ax.set_ylabel("rows")
    ax.legend(frameon=False, fontsize=7, ncols=2)
    return fig


def threshold_curve(
    results: Sequence[MatchResult], golds: Sequence[str | None], thresholds: Iterable[float]
) -> list[tuple[float, float | None, float]]:
    """(threshold, precision, coverage) of auto-accepting the top candidate at each threshold.

    Precision: share of accepted rows whose top candidate is the gold id (a gold of None
    counts as wrong); coverage: accepted rows over all rows.
    """
    tops = [(_top_score(r), r.candidates[0].entity_id if r.candidates else None) for r in results]
    n = len(tops)
    out: list[tuple[float, float | None, float]] = []
    for t in thresholds:
        accepted = [
            (cid, gold)
            for (s, cid), gold in zip(tops, golds, strict=True)
            if s is not None and s >= t
        ]
        right = sum(1 for cid, gold in accepted if gold is not None and cid == gold)
        out.append(
            (t, right / len(accepted) if accepted else None, len(accepted) / n if n else 0.0)
        )
    return out


def _chart_threshold(data: ReportData) -> Any:
    assert data.golds is not None
    fig = _figure()
    ax = fig.add_subplot()
    curve = threshold_curve(data.results, data.golds, np.linspace(0.3, 1.0, 71))
    xs = [t for t, _, _ in curve]
    ax.plot(
        xs,
        [p if p is not None else np.nan for _, p, _ in curve],
        color="#264653",
        linewidth=2,
        label="precision",
    )
    ax.plot(xs, [c for _, _, c in curve], color="#e76f51", linewidth=2, label="coverage")
    ax.axvline(
        data.accept_threshold,
        color="#555",
        linestyle="--",
        linewidth=1,
        label=f"accept threshold {data.accept_threshold:g}",
    )
    ax.set_xlabel("accept threshold (top candidate score)")
    ax.set_ylim(0, 1.02)
    ax.legend(frameon=False, fontsize=8)
    return fig


def _chart_spend(data: ReportData) -> Any:
    fig = _figure(6.4, 3.6)
    ax1, ax2 = fig.subplots(1, 2)
    calls = np.cumsum([1 if r.attempts else 0 for r in data.results])
    tokens = np.cumsum([r.usage.total_tokens for r in data.results])
    cost = float(sum(r.usage.cost_usd for r in data.results))
    x = np.arange(1, len(data.results) + 1)
    ax1.plot(x, calls, color="#264653")
    ax1.set_title("LLM calls", fontsize=9)
    ax1.set_ylabel("LLM calls")
    ax2.plot(x, tokens, color="#6d597a")
    ax2.set_title(f"tokens (total cost ${cost:.4f})", fontsize=9)
    ax2.set_ylabel("tokens")
    for ax, series in ((ax1, calls), (ax2, tokens)):
        ax.set_xlabel("rows (file order)")
        ax.set_ylim(0, max(1.0, float(series[-1]) * 1.05 if len(series) else 1.0))
    return fig


def _retry_counts(results: Sequence[MatchResult]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for r in results:
        for a in r.attempts:
            if a.status_code == 429:
                counts["429 received"] += 1
            if a.outcome == "retry":
                counts[f"retry: {a.error_type or 'unknown'}"] += 1
            elif a.outcome == "failed":
                counts[f"failed: {a.error_type or 'unknown'}"] += 1
            if a.reasks:
                counts["re-asks (invalid answer)"] += a.reasks
    return counts


def _chart_retries(data: ReportData) -> Any:
    counts = _retry_counts(data.results)
    fig = _figure(6.4, 2.8)
    ax = fig.add_subplot()
    if counts:
        names = sorted(counts, key=lambda k: -counts[k])[:10]
        ax.barh(names[::-1], [counts[n] for n in names[::-1]], color="#e76f51")
        ax.set_xlabel("attempts")
    else:
        ax.text(0.5, 0.5, "no retries, no 429s", ha="center", va="center", fontsize=12)
        ax.set_axis_off()
    return fig


def hardest_record(results: Sequence[MatchResult]) -> MatchResult | None:
    """The record query whose best candidate's probability is nearest 1/2 (the closest call
    of the field model), or ``None`` without record queries."""
    records = [r for r in results if r.fields is not None and r.fields.contributions]
    if not records:
        return None
    return min(records, key=lambda r: abs(r.fields.probability - 0.5) if r.fields else 1.0)


def _chart_waterfall(result: MatchResult) -> Any:
    """A record query's match weight built up field by field (bits: log2 Bayes factors)."""
    evidence = result.fields
    assert evidence is not None
    steps = [("prior", evidence.prior_bits), *evidence.contributions.items()]
    fig = _figure(6.4, 2.8 + 0.15 * len(steps))
    ax = fig.add_subplot()
    level = 0.0
    for i, (_, bits) in enumerate(steps):
        color = "#2a9d8f" if bits >= 0 else "#e76f51"
        ax.bar(i, bits, bottom=level, color=color)
        level += bits
    ax.bar(len(steps), level, color="#264653")
    labels = [f"{n}\n{evidence.levels.get(n, '')}" for n, _ in steps] + ["weight"]
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.axhline(0, color="#888", linewidth=0.8)
    ax.set_ylabel("bits")
    return fig


def confusions(
    results: Sequence[MatchResult], golds: Sequence[str | None], top: int = 12
) -> list[tuple[str, str, int]]:
    """The most frequent (gold, answer) pairs among wrong answers; ``novel`` stands for None."""
    pairs: Counter[tuple[str, str]] = Counter()
    for r, gold in zip(results, golds, strict=True):
        answer = r.entity_id if r.status == "matched" else r.status
        if r.status == "novel" and gold is None:
            continue
        if r.status == "matched" and answer == gold:
            continue
        pairs[(gold or "novel", answer or "?")] += 1
    return [(g, a, n) for (g, a), n in pairs.most_common(top)]


def _chart_bars(items: Sequence[tuple[str, int]], color: str, xlabel: str) -> Any:
    fig = _figure(6.4, max(1.6, 0.3 * len(items) + 0.8))
    ax = fig.add_subplot()
    if items:
        ax.barh([label for label, _ in items][::-1], [n for _, n in items][::-1], color=color)
        ax.set_xlabel(xlabel)
        ax.tick_params(axis="y", labelsize=8)
    else:
        ax.text(0.5, 0.5, "nothing to show", ha="center", va="center", fontsize=12)
        ax.set_axis_off()
    return fig


def _short(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def largest_novel_groups(data: ReportData, top: int = 12) -> list[tuple[str, int]]:
    """(label, mentions) of the largest novel clusters: the proposals', or clustered here."""
    if data.clusters:
        return [(_short(name), size) for name, size, _ in data.clusters[:top]]
    # without proposals: discovery's clustering on character n-grams alone (no embedder)
    counts = Counter(normalize(r.query) for r in data.results if r.status == "novel")
    texts = [t for t, _ in counts.most_common(_MAX_REPORT_MENTIONS)]
    config = ClusterConfig(lexical_weight=1.0)
    clusters = cluster_mentions(
        similarity_matrix(texts, None, 1.0), [counts[t] for t in texts], config
    )
    return [(_short(texts[min(c.members)]), c.size) for c in clusters[:top]]


# -- the page ----------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1400px;
color:#1d3557;background:#fafafa;padding:0 16px}
h1{margin:0 0 4px}p.meta{color:#666;margin:0 0 16px;font-size:13px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin-bottom:18px}
.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:10px 14px;min-width:110px}
.card b{display:block;font-size:22px}.card span{font-size:12px;color:#555}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:14px}
figure.chart{background:#fff;border:1px solid #ddd;border-radius:8px;margin:0;padding:10px}
figure.chart svg{width:100%;height:auto}
figcaption{font-weight:600;margin-bottom:4px}figcaption small{font-weight:400;color:#666}
table{border-collapse:collapse;font-size:13px;background:#fff}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
"""


def _card(value: str, label: str) -> str:
    return f'<div class="card"><b>{html.escape(value)}</b><span>{html.escape(label)}</span></div>'


def _cards(data: ReportData) -> list[str]:
    rs = data.results
    status: Counter[str] = Counter(r.status for r in rs)
    calls = sum(1 for r in rs if r.attempts)
    tokens = sum(r.usage.total_tokens for r in rs)
    cost = sum(r.usage.cost_usd for r in rs)
    cards = [_card(f"{len(rs):,}", "rows")]
    cards += [_card(f"{status.get(s, 0):,}", s) for s in _STATUS_COLORS]
    cards += [_card(f"{calls:,}", "LLM calls"), _card(f"{tokens:,}", "tokens")]
    cards.append(_card(f"${cost:.4f}", "cost"))
    if data.golds is not None:
        right = sum(
            1
            for r, g in zip(rs, data.golds, strict=True)
            if (r.status == "matched" and r.entity_id == g) or (r.status == "novel" and g is None)
        )
        cards.append(_card(f"{right / len(rs):.3f}" if rs else "n/a", "accuracy"))
    return cards


def render_html(data: ReportData) -> str:
    """The report page: a self-contained HTML document (inline SVG charts, no script)."""
    charts: list[tuple[str, str, str, Any]] = [
        (
            "scores",
            "Score distribution by status",
            "top candidate score; dashed: accept threshold",
            _chart_scores(data),
        ),
        (
            "routes",
            "Route chosen per score band",
            "who decided, by top candidate score",
            _chart_routes(data),
        ),
    ]
    if data.golds is not None:
        charts.append(
            (
                "threshold",
                "Precision and coverage vs accept threshold",
                "auto-accepting the top candidate, against the labels",
                _chart_threshold(data),
            )
        )
        conf = [
            (f"{_short(g, 18)} → {_short(a, 18)}", n)
            for g, a, n in confusions(data.results, data.golds)
        ]
        charts.append(
            (
                "confusions",
                "Most frequent confusions",
                "gold → answer, wrong answers only",
                _chart_bars(conf, "#e76f51", "rows"),
            )
        )
    charts += [
        (
            "spend",
            "LLM calls, tokens and cost over the run",
            "accumulated in row order",
            _chart_spend(data),
        ),
        ("retries", "Retries and 429s", "attempts by outcome and cause", _chart_retries(data)),
        (
            "novel",
            "Largest novel clusters",
            "from the discovery proposals"
            if data.clusters
            else "novel mentions clustered by character n-grams; named by the most frequent",
            _chart_bars(largest_novel_groups(data), "#e9c46a", "mentions"),
        ),
    ]
    hardest = hardest_record(data.results)
    if hardest is not None and hardest.fields is not None:
        charts.append(
            (
                "waterfall",
                "Match weight, field by field",
                f"the closest call of the field model: {_short(hardest.query)!r} vs "
                f"{hardest.fields.entity_id} (P = {hardest.fields.probability:.3f})",
                _chart_waterfall(hardest),
            )
        )
    figures = []
    for key, title, note, fig in charts:
        figures.append(
            f'<figure class="chart" id="chart-{key}"><figcaption>{html.escape(title)} '
            f"<small>{html.escape(note)}</small></figcaption>{_svg(fig, key)}</figure>"
        )
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{html.escape(data.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(data.title)}</h1>",
        f'<p class="meta">{html.escape(data.source)} · accept threshold '
        f"{data.accept_threshold:g}{' · with labels' if data.golds is not None else ''}</p>",
        '<section class="cards">',
        *_cards(data),
        "</section>",
        '<section class="grid">',
        *figures,
        "</section></body></html>",
    ]
    return "\n".join(parts)


def write_report(data: ReportData, out: str | os.PathLike[str]) -> Path:
    """Render ``data`` and write the HTML file (atomically); return its path."""
    path = Path(out)
    text = render_html(data)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path
