"""Measure the "full" fit mode on ``languages``: fine-tuning speed and the retrieval it buys.

Usage: python benchmarks/bench_finetune.py [--data DIR] [--max-seconds 600] [--threads 1]
       [--out benchmarks/results/finetune.md]

Split (as ``nem-llm eval --calibrate 0.5 --seed 0``): the queries are shuffled with
``random.Random(0)``; the first half trains (its labelled queries -> gold name and each
gold alias, plus the catalog's own alias -> name pairs), the other half is evaluated.
The base and the tuned model then encode the catalog's forms and the evaluated queries;
the table gives R@1/R@10 of dense-only cosine and of the hybrid index (dense + character
TF-IDF, lexical weight 0.5, the Matcher's default), on all evaluated queries with a gold
id and on those whose text does not appear verbatim among the training half.

Training is bounded by one epoch and ``--max-seconds``; the machine's load average is
printed beside the speed (the machine is shared: figures move with it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from nem_llm._retrieval.embedding import SentenceTransformerEmbedder, default_model_path
from nem_llm._retrieval.index import HybridIndex
from nem_llm._retrieval.learning import finetune, pairs_from_catalog, pairs_from_labels
from nem_llm._text import normalize
from nem_llm.catalog import Catalog, load_catalog

KS = (1, 10)


def _load_queries(path: Path) -> list[tuple[str, str | None]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                rows.append((normalize(row["query"]), row["gold_id"]))
    return rows


def _recall(ranked: Sequence[Sequence[str]], golds: Sequence[str], k: int) -> float:
    hits = sum(1 for ids, gold in zip(ranked, golds, strict=True) if gold in ids[:k])
    return hits / len(golds) if golds else float("nan")


def _rank(
    catalog: Catalog, embedder: SentenceTransformerEmbedder, queries: list[str]
) -> dict[str, list[list[str]]]:
    """Top-10 entity ids per query: dense-only and hybrid."""
    started = time.perf_counter()
    forms = embedder.encode(list(catalog.forms))
    qv = embedder.encode(queries)
    seconds = time.perf_counter() - started
    print(f"  encoded {len(forms):,} forms + {len(qv):,} queries in {seconds:.0f} s")
    owners = np.asarray(catalog.form_entity)
    starts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
    ids = [e.id for e in catalog.entities]
    dense: list[list[str]] = []
    for lo in range(0, len(qv), 256):
        scores = np.maximum.reduceat(qv[lo : lo + 256] @ forms.T, starts, axis=1)
        top = np.argsort(-scores, axis=1, kind="stable")[:, : max(KS)]
        dense.extend([ids[j] for j in row] for row in top)
    index = HybridIndex(catalog, forms, lexical_weight=0.5, embedder_name=embedder.name)
    hybrid = [[c.entity_id for c in cands] for cands in index.search(qv, queries, max(KS))]
    return {"dense": dense, "hybrid": hybrid}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=Path(__file__).parents[2] / "shared" / "data")
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads while training")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--no-base", action="store_true", help="skip the base model's rows")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "finetune.md"
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    catalog = load_catalog(args.data / "languages_catalog.jsonl")
    rows = _load_queries(args.data / "languages_queries.jsonl")
    order = list(range(len(rows)))
    random.Random(args.seed).shuffle(order)
    cut = len(order) // 2
    train = [rows[i] for i in order[:cut]]
    held = [rows[i] for i in sorted(order[cut:]) if rows[i][1] is not None]
    train_texts = {q for q, _ in train}
    queries = [q for q, _ in held]
    golds = [str(g) for _, g in held]
    unseen = [i for i, q in enumerate(queries) if q not in train_texts]
    pairs = pairs_from_catalog(catalog) + pairs_from_labels(train, catalog)
    print(
        f"languages: {len(catalog):,} entities, {len(catalog.forms):,} forms; train half "
        f"{len(train):,} queries -> {len(pairs):,} pairs; evaluated {len(held):,} with a gold "
        f"id, {len(held) - len(unseen):,} of them verbatim in the training half"
    )

    results: dict[str, dict[str, list[list[str]]]] = {}
    if not args.no_base:
        print("base model:")
        base = SentenceTransformerEmbedder(default_model_path())
        results["base"] = _rank(catalog, base, queries)

    load_before = os.getloadavg()[0]
    cpu_before = time.process_time()
    with tempfile.TemporaryDirectory(prefix="nem-llm-ft-") as tmp:
        out = Path(tmp) / "tuned"
        result = finetune(
            default_model_path(),
            pairs,
            out,
            epochs=1,
            max_seconds=args.max_seconds,
            batch_size=args.batch_size,
            learning_rate=args.learning_rate,
            seed=args.seed,
            num_threads=args.threads,
            show_progress=True,
        )
        load_after = os.getloadavg()[0]
        cpu = time.process_time() - cpu_before  # this process only: loading + training + saving
        minutes_10k = (
            10_000 / result.pairs_per_second / 60 if result.pairs_per_second else float("inf")
        )
        speed = (
            f"fine-tune (lr {args.learning_rate:g}): {result.steps} steps x {args.batch_size} "
            f"in {result.seconds:.0f} s, "
            f"{result.pairs_per_second:.1f} pairs/s (10,000 pairs: {minutes_10k:.1f} min), "
            f"stopped by {result.stopped_by}, torch threads {args.threads}, "
            f"{result.pairs_per_second * result.seconds / cpu:.1f} pairs per CPU-second, "
            f"load average {load_before:.1f} -> {load_after:.1f} on {os.cpu_count()} cores"
        )
        print(speed)
        print("tuned model:")
        results["tuned"] = _rank(catalog, SentenceTransformerEmbedder(out), queries)

    lines = [
        "| model | retrieval | R@1 | R@10 | R@10 not seen verbatim in training |",
        "|---|---|---|---|---|",
    ]
    unseen_golds = [golds[i] for i in unseen]
    for model_name, by_kind in results.items():
        for kind, ranked in by_kind.items():
            r1, r10 = _recall(ranked, golds, 1), _recall(ranked, golds, 10)
            r10_unseen = _recall([ranked[i] for i in unseen], unseen_golds, 10)
            lines.append(f"| {model_name} | {kind} | {r1:.3f} | {r10:.3f} | {r10_unseen:.3f} |")
    header = (
        f"languages, seed {args.seed}: trained on the first half ({len(pairs):,} pairs), "
        f"evaluated on the other half: {len(held):,} queries with a gold id, "
        f"{len(unseen):,} of them not verbatim in the training half."
    )
    text = "\n".join([header, "", speed, "", *lines, ""])
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
