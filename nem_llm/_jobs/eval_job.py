"""The job behind ``nem-llm eval``: labelled queries in, an ``EvalReport`` out."""

from __future__ import annotations

import json
import random
import tempfile
import warnings
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from openai import AsyncOpenAI

from .._matching.pipeline import tapped
from .._text import fold
from ..catalog import load_catalog
from ..errors import ConfigError
from ..matcher import Matcher
from ..models import Candidate, MatchResult
from ..settings import MatcherSettings
from .evaluation import RECALL_KS, EvalReport, evaluate
from .labels import Labels, read_labels

__all__ = ["run_eval"]

_RETRIEVE_CHUNK = 256


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


def _oracle_gold(labels: Labels, directory: str) -> str:
    """The labels as the simulator's gold JSONL (whatever format they were read from)."""
    path = Path(directory) / "gold.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for label in labels.items:
            fh.write(json.dumps({"query": label.query, "gold_id": label.gold_id}) + "\n")
    return str(path)


async def run_eval(
    *,
    catalog: Path,
    queries: Path,
    settings: MatcherSettings | None = None,
    llm: str = "off",
    oracle_error_rate: float = 0.1,
    oracle_error_profile: str = "uniform",
    limit: int | None = None,
    calibrate_fraction: float = 0.0,
    seed: int = 0,
    mode: str | None = "zero-shot",
    fit_options: dict[str, Any] | None = None,
    name: str = "",
    progress: Any = None,
    keep_results: list[tuple[MatchResult, str | None]] | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> EvalReport:
    """Evaluate retrieval, routing and end-to-end decisions on labelled queries.

    ``llm``: ``"off"`` (ambiguous queries stay ``review``), ``"env"`` (the OPENAI_*
    settings), or ``"sim"`` (the simulator's oracle, wrong ``oracle_error_rate`` of the
    time; a simulator, not a model).

    ``keep_results``: a list that receives every evaluated ``(result, gold_id)`` pair
    (``nem-llm eval --report`` draws the run report from them).

    ``calibrate_fraction > 0``: a seeded random share of the queries is the labelled data
    given to ``fit_async(training_data, mode=mode)`` (it calibrates the thresholds and, in
    modes "aliases" and "full", trains) and the report covers only the rest; it also counts
    the evaluated queries that appear verbatim among the labelled ones and reports R@10 on
    the others (a learned alias that memorises a repeated string is a real win, not a sign
    that the model generalises).

    ``settings``: how to match (``llm="off"`` turns its LLM off; ``"sim"`` points it at
    the simulator).

    ``queries``: labelled queries read by :func:`~nem_llm._jobs.labels.read_labels` (JSONL,
    CSV, TSV or Parquet; an empty or null ``gold_id`` is "not in the catalog"). Each gold
    id that is not in the catalog is reported once to ``on_warning`` (default: a
    ``UserWarning``).
    """
    if not 0.0 <= calibrate_fraction < 1.0:
        raise ConfigError(f"calibrate_fraction must be in [0, 1), got {calibrate_fraction}")
    settings = settings or MatcherSettings()
    if llm not in ("off", "env", "sim"):
        raise ConfigError(f"llm must be off, env or sim, got {llm!r}")
    entities = load_catalog(
        catalog, include_description=settings.index_description, columns=settings.columns
    )
    labels = read_labels(queries, catalog_ids=entities.by_id.keys(), limit=limit)
    for message in labels.warnings():
        (on_warning or _warn)(message)
    texts = [label.query for label in labels.items]
    items = [label.as_query() for label in labels.items]  # records keep their fields
    golds = [label.gold_id for label in labels.items]
    training: list[tuple[str, str | None]] = []
    if calibrate_fraction > 0:
        order = list(range(len(texts)))
        random.Random(seed).shuffle(order)
        cut = int(len(order) * calibrate_fraction)
        training = [(texts[i], golds[i]) for i in order[:cut]]
        keep = sorted(order[cut:])
        texts, golds = [texts[i] for i in keep], [golds[i] for i in keep]
        items = [items[i] for i in keep]
    async with AsyncExitStack() as stack:
        client: AsyncOpenAI | None = None
        if llm == "off":
            settings = settings.replace(llm=False)
        if llm == "sim":
            from ..sim import SimConfig, SimServer

            scratch = stack.enter_context(tempfile.TemporaryDirectory(prefix="nem-eval-"))
            sim = await stack.enter_async_context(
                SimServer(
                    SimConfig(
                        policy="oracle",
                        gold_path=_oracle_gold(labels, scratch),
                        catalog_path=str(catalog),  # the rewrite call answers names
                        oracle_error_rate=oracle_error_rate,
                        error_profile=oracle_error_profile,  # type: ignore[arg-type]
                        seed=1,
                    )
                )
            )
            client = AsyncOpenAI(base_url=sim.base_url, api_key="sim", max_retries=0)
            settings = settings.replace(model="nem-llm-sim")
        if settings.cache is None:  # as a job does: the labelled sample is never paid twice
            cache_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nem-eval-")))
            settings = settings.replace(cache=cache_dir / "decisions.sqlite")
        matcher = Matcher(entities, settings, client=client)
        await stack.enter_async_context(matcher)
        await matcher.fit_async(
            training or None,
            workload=items,
            mode=mode,  # type: ignore[arg-type]  # checked by fit_async
            show_progress=progress is not None,
            **(fit_options or {}),
        )
        if progress is not None and matcher.calibration is not None:
            fitted = matcher.calibration
            for route_name, est in (("auto-match", fitted.matched), ("auto-novel", fitted.novel)):
                state = "open" if est.open else "closed"
                progress.print(
                    f"{name or 'eval'}: {route_name} route {state}: {est.reason}",
                    markup=False,
                    highlight=False,
                )
        k = max(RECALL_KS)
        index = matcher.index
        # one retrieval per query at the largest k, shared by the recall columns and the
        # matching (which routes its head); with ANN search the shortlist grows with k
        # (a top 10 is then not the head of a top 50): the recall retrieval stays apart
        share = index is not None and not index.use_ann
        retrieved: list[list[Candidate]] = []
        if not share:
            for lo in range(0, len(texts), _RETRIEVE_CHUNK):
                retrieved.extend(
                    await matcher.retrieve_async(texts[lo : lo + _RETRIEVE_CHUNK], top_k=k)
                )
        task = None
        if progress is not None:
            from rich.markup import escape
            from rich.progress import Progress

            bar = stack.enter_context(Progress(console=progress, transient=True))
            task = bar.add_task(f"eval {escape(name)}", total=len(texts))

        def on_progress(done: int, total: int | None) -> None:
            if task is not None:
                bar.update(task, completed=done)

        if share:
            with tapped(k) as tap:
                results = await matcher.match_batch_async(items, on_progress=on_progress)
            # a query that failed validation (an error record) retrieved nothing
            retrieved = [tap.found.get(i, []) for i in range(len(texts))]
        else:
            results = await matcher.match_batch_async(items, on_progress=on_progress)
        if client is not None:
            await client.close()
    if keep_results is not None:
        keep_results.extend(zip(results, golds, strict=True))
    profile = "" if oracle_error_profile == "uniform" else f" {oracle_error_profile}"
    label = {
        "off": "off",
        "env": settings.model,
        "sim": f"sim oracle err={oracle_error_rate:g}{profile}",
    }[llm]
    report = evaluate(results, golds, retrieved, name=name, llm=label)
    report.calibrated_on = len(training)
    report.rewritten = sum(1 for r in results if r.rewritten_as)
    missed = [
        i
        for i, g in enumerate(golds)
        if g is not None and g not in {c.entity_id for c in retrieved[i][: settings.top_k]}
    ]
    if settings.rewrite and missed:
        report.rewrite_recovered = sum(1 for i in missed if results[i].entity_id == golds[i]) / len(
            missed
        )
    report.mode = mode or "auto"
    if training:
        seen = {fold(t) for t, _ in training}
        unseen = [i for i, t in enumerate(texts) if fold(t) not in seen]
        report.seen_in_training = len(texts) - len(unseen)
        with_gold = [i for i in unseen if golds[i] is not None]
        if with_gold:
            hits = sum(1 for i in with_gold if golds[i] in {c.entity_id for c in retrieved[i][:10]})
            report.recall_at_10_unseen = hits / len(with_gold)
    report.thresholds = matcher.thresholds.as_dict()
    cal = matcher.calibration
    if cal is not None and cal.labelled:
        # the labelled sample is LLM work of this run: counted in the share and the spend
        # (its queries were then answered from the cache, at no cost, in ``results``)
        n = max(report.queries, 1)
        report.labelled = cal.labelled
        report.llm_share = min(1.0, report.llm_share + cal.labelled / n)
        report.tokens += cal.label_usage.total_tokens
        report.cost_usd += cal.label_usage.cost_usd
    if cal is not None:
        report.calibration_source = cal.source
        report.expected_accept_precision = cal.matched.expected_precision
        report.expected_novel_precision = cal.novel.expected_precision
    return report
