#!/usr/bin/env python
"""Structured records: nem_llm's field model beside Splink, GoldenMatch and recordlinkage.

On the development record sets (``{febrl4,dblp_acm,restaurants}_records_*.jsonl``) every
method links each query record to one catalog entity or to none, and the table reports,
per set and method: accuracy (right entity, or "none" when the entity is absent; an
undecided query counts as wrong), link precision and recall, the share left undecided
(review), and CPU seconds; once without labels, once with the labels of a seeded half of
the queries (evaluated on the other half). A second table compares blocking: the pair
recall (share of gold pairs among the candidate pairs) of nem_llm's retrieval (top-k of
each query) against each peer's blocking rules and a character 3-gram TF-IDF top-k (the
field model is also run on the latter, its CPU included). A third table deduplicates
febrl4's catalog and queries pooled (pair precision and recall of the clusters).

The peers run in their own virtualenv (``--peers-venv``, default ``/tmp/nem_llm_peers``),
which the script creates and fills from PyPI when it is missing, and each peer run is a
child process of that interpreter (``--worker``), so its imports never touch nem_llm's.
CPU seconds are the process CPU time (all threads) of the linkage work itself, records
already in memory; nem_llm's retrieval (its blocking step) is reported on its own line.

    python benchmarks/bench_records.py                      # all sets, all methods
    python benchmarks/bench_records.py --sets restaurants --save
    python benchmarks/bench_records.py --no-peers            # nem_llm only

``--save`` writes ``benchmarks/results/records.md`` (``--out`` another path).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
# shared/data beside the repository (or beside a parent of a worktree)
DEFAULT_DATA = next(
    (p / "shared" / "data" for p in ROOT.parents if (p / "shared" / "data").is_dir()),
    ROOT.parent / "shared" / "data",
)
SETS = ("febrl4", "dblp_acm", "restaurants")
PEER_PACKAGES = ("splink==5.0.*", "goldenmatch==3.22.*", "recordlinkage==0.16.*")
DEFAULT_VENV = Path(os.environ.get("NEM_LLM_PEERS_VENV", "/tmp/nem_llm_peers"))
SEED = 0

# The fields every method compares (nem_llm infers kinds over all attributes and skips
# febrl4's `name`, which repeats first + last).
FIELDS = {
    "febrl4": ["first", "last", "address", "suburb", "state", "postcode", "dob"],
    "dblp_acm": ["title", "authors", "year"],
    "restaurants": ["name", "addr", "city"],
}

# Each peer configured as its documentation suggests for such data: blocking keys (the
# "*_key" columns are derived in `_peer_rows`), comparisons, and EM training blocks.
SPLINK: dict[str, dict[str, Any]] = {
    "febrl4": {
        "comparisons": [
            ("NameComparison", "first", {}),
            ("NameComparison", "last", {}),
            ("JaroWinklerAtThresholds", "address", {"score_threshold_or_thresholds": [0.9, 0.7]}),
            ("NameComparison", "suburb", {}),
            ("ExactMatch", "state", {}),
            (
                "DamerauLevenshteinAtThresholds",
                "postcode",
                {"distance_threshold_or_thresholds": [1, 2]},
            ),
            ("DamerauLevenshteinAtThresholds", "dob", {"distance_threshold_or_thresholds": [1, 2]}),
        ],
        "tf": ["first", "last", "suburb"],
        "blocking": [["first", "last"], ["dob"], ["postcode"], ["suburb", "state"]],
        "deterministic": [["first", "last", "dob"]],
        "recall": 0.7,
        "training": [["first", "last"], ["dob"]],
    },
    "dblp_acm": {
        "comparisons": [
            (
                "JaroWinklerAtThresholds",
                "title",
                {"score_threshold_or_thresholds": [0.95, 0.88, 0.7]},
            ),
            ("JaroWinklerAtThresholds", "authors", {"score_threshold_or_thresholds": [0.9, 0.7]}),
            ("ExactMatch", "year", {}),
        ],
        "tf": [],
        "blocking": [["year"], ["title_key"]],
        "deterministic": [["title"]],
        "recall": 0.7,
        "training": [["title_key"], ["year"]],
    },
    "restaurants": {
        "comparisons": [
            ("NameComparison", "name", {}),
            ("JaroWinklerAtThresholds", "addr", {"score_threshold_or_thresholds": [0.9, 0.7]}),
            ("JaroWinklerAtThresholds", "city", {"score_threshold_or_thresholds": [0.9]}),
        ],
        "tf": ["name", "city"],
        "blocking": [["city"], ["name_key"], ["addr_key"]],
        "deterministic": [["name", "city"]],
        "recall": 0.6,
        "training": [["name_key", "city"], ["addr_key"]],
    },
}
# recordlinkage: the same blocks; string fields by Jaro-Winkler >= 0.85, the rest exact
# (binary features, as ECM needs)
RECORDLINKAGE: dict[str, dict[str, list[str]]] = {
    "febrl4": {
        "strings": ["first", "last", "address", "suburb"],
        "exact": ["state", "postcode", "dob"],
    },
    "dblp_acm": {"strings": ["title", "authors"], "exact": ["year"]},
    "restaurants": {"strings": ["name", "addr", "city"], "exact": []},
}
# GoldenMatch "weighted": one weighted Jaro-Winkler matchkey (weights), blocking columns
GOLDENMATCH: dict[str, dict[str, Any]] = {
    "febrl4": {
        "fuzzy": {
            "first": 0.2,
            "last": 0.25,
            "address": 0.15,
            "suburb": 0.1,
            "postcode": 0.1,
            "dob": 0.2,
        },
        "blocking": ["postcode"],
    },
    "dblp_acm": {"fuzzy": {"title": 0.7, "authors": 0.2, "year": 0.1}, "blocking": ["year"]},
    # city blocking loses half the pairs here ("new york" vs "new york city")
    "restaurants": {"fuzzy": {"name": 0.5, "addr": 0.35, "city": 0.15}, "blocking": ["name_key"]},
}


# ----------------------------------------------------------------------------- data


def load(data: Path, name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The catalog and queries of one record set."""

    def read(path: Path) -> list[dict[str, Any]]:
        with path.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    return (
        read(data / f"{name}_records_catalog.jsonl"),
        read(data / f"{name}_records_queries.jsonl"),
    )


def labelled_half(n: int, seed: int = SEED) -> list[int]:
    """A seeded half of ``range(n)``: the queries whose labels the labelled runs see."""
    import random

    rng = random.Random(seed)
    return sorted(rng.sample(range(n), n // 2))


def candidate_id(candidate: Any) -> str:
    """A retrieved candidate's entity id (``Candidate.entity_id``; ``.id`` before it)."""
    return str(getattr(candidate, "entity_id", None) or candidate.id)


# ----------------------------------------------------------------------------- metrics


def score(
    decisions: Sequence[str | bool | None], golds: Sequence[str | None], rows: Sequence[int]
) -> dict[str, float]:
    """Accuracy, link precision and recall, novel precision, review share over ``rows``.

    A decision is an entity id (linked), ``None`` (novel) or ``False`` (undecided).
    """
    n = len(rows)
    links = [i for i in rows if isinstance(decisions[i], str)]
    right_links = sum(1 for i in links if decisions[i] == golds[i])
    novel_right = sum(1 for i in rows if decisions[i] is None and golds[i] is None)
    with_gold = sum(1 for i in rows if golds[i] is not None)
    novel = sum(1 for i in rows if decisions[i] is None)
    return {
        "accuracy": (right_links + novel_right) / n if n else 0.0,
        "precision": right_links / len(links) if links else float("nan"),
        "novel precision": novel_right / novel if novel else float("nan"),
        "recall": right_links / with_gold if with_gold else float("nan"),
        "review": sum(1 for i in rows if decisions[i] is False) / n if n else 0.0,
    }


def pair_recall(pairs: set[tuple[int, str]], golds: Sequence[str | None]) -> float:
    """Share of (query, gold entity) pairs among the candidate pairs."""
    wanted = [(i, g) for i, g in enumerate(golds) if g is not None]
    return sum(1 for p in wanted if p in pairs) / len(wanted) if wanted else float("nan")


# ----------------------------------------------------------------------------- nem_llm


def retrieve(
    catalog: list[dict[str, Any]], queries: list[dict[str, Any]], top_k: int, encoder: str | None
) -> tuple[list[list[str]], float]:
    """nem_llm's retrieval (the blocking step): each query's top-k entity ids, CPU seconds."""
    from nem_llm import Matcher

    async def run() -> list[list[str]]:
        # thresholds given: fit builds the index and skips the probe calibration, which
        # only routing needs
        options: dict[str, Any] = {"encoder": encoder} if encoder else {}
        matcher = Matcher(
            catalog,
            llm=False,
            index_description=True,
            accept_threshold=0.9,
            margin=0.05,
            novel_threshold=0.3,
            **options,
        )
        try:
            await matcher.fit_async(show_progress=False)
            found = await matcher.retrieve_async([q["query"] for q in queries], top_k=top_k)
        finally:
            await matcher.aclose()
        return [[candidate_id(c) for c in cands] for cands in found]

    start = time.process_time()
    ids = asyncio.run(run())
    return ids, time.process_time() - start


def lexical_blocking(
    catalog: list[dict[str, Any]], queries: list[dict[str, Any]], top_k: int
) -> tuple[list[list[str]], float]:
    """A cheaper blocking to compare with: character 3-gram TF-IDF (what nem_llm's lexical
    channel reads) of "name, description" against the query text, top k by cosine."""
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer

    start = time.process_time()
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 3), sublinear_tf=True)
    entities = vectorizer.fit_transform(
        [f"{e['name']}, {e.get('description', '')}" for e in catalog]
    )
    found = vectorizer.transform([q["query"] for q in queries])
    ids: list[list[str]] = []
    for chunk in range(0, found.shape[0], 512):
        sims = (found[chunk : chunk + 512] @ entities.T).toarray()
        k = min(top_k, sims.shape[1])
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(sims, top, axis=1).argsort(axis=1)[:, ::-1]
        for row in np.take_along_axis(top, order, axis=1):
            ids.append([catalog[int(e)]["id"] for e in row])
    return ids, time.process_time() - start


def nem_llm_field_model(
    catalog: list[dict[str, Any]],
    queries: list[dict[str, Any]],
    candidates: list[list[str]],
    labels: dict[int, str | None] | None,
    **options: Any,
) -> tuple[list[str | bool | None], float]:
    """nem_llm's record model on the candidate pairs: decisions per query, CPU seconds."""
    import numpy as np

    from nem_llm.records import decide, fit_record_model

    start = time.process_time()
    position = {e["id"]: i for i, e in enumerate(catalog)}
    qi = np.array([q for q, ids in enumerate(candidates) for _ in ids], dtype=np.int64)
    ei = np.array([position[e] for ids in candidates for e in ids], dtype=np.int64)
    entities = [e.get("attributes", {}) for e in catalog]
    records = [q.get("attributes", {}) for q in queries]
    label_pos = None
    if labels is not None:
        label_pos = {q: (None if g is None else position[g]) for q, g in labels.items()}
    model = fit_record_model(entities, records, qi, ei, labels=label_pos, **options)
    scores = model.score(records, qi, ei)
    decided = decide(model.posteriors(scores, len(records)), qi, ei)
    out: list[str | bool | None] = []
    for q, status in enumerate(decided.status):
        if status == "matched":
            out.append(catalog[int(decided.entity[q])]["id"])
        else:
            out.append(None if status == "novel" else False)
    return out, time.process_time() - start


def dedupe_union(
    catalog: list[dict[str, Any]], queries: list[dict[str, Any]], k: int = 5
) -> dict[str, float]:
    """Deduplicate catalog and queries pooled (a query and its gold entity are duplicates):
    3-gram TF-IDF neighbours (self excluded), the field model with pairs judged alone,
    clusters of links >= 0.99, golden records. Pair precision and recall, CPU seconds."""
    import itertools

    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer

    from nem_llm.records import clusters, fit_record_model, golden_records

    rows = [e.get("attributes", {}) for e in catalog] + [q.get("attributes", {}) for q in queries]
    texts = [f"{e['name']}, {e.get('description', '')}" for e in catalog]
    texts += [q["query"] for q in queries]
    truth = [e["id"] for e in catalog]
    truth += [q.get("gold_id") or f"absent-{i}" for i, q in enumerate(queries)]
    start = time.process_time()
    vectors = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 3), sublinear_tf=True)
    matrix = vectors.fit_transform(texts)
    left: list[int] = []
    right: list[int] = []
    for chunk in range(0, matrix.shape[0], 512):
        sims = (matrix[chunk : chunk + 512] @ matrix.T).toarray()
        sims[np.arange(sims.shape[0]), chunk + np.arange(sims.shape[0])] = -1.0
        for r, row in enumerate(np.argpartition(-sims, k - 1, axis=1)[:, :k]):
            left.extend([chunk + r] * k)
            right.extend(int(j) for j in row)
    li, ri = np.array(left), np.array(right)
    model = fit_record_model(rows, rows, li, ri, exclusive=False, exclude_self=True)
    cluster_of = clusters(len(rows), li, ri, model.fitted_scores().probability)
    golden = golden_records(rows, cluster_of)
    cpu = time.process_time() - start

    def pairs(labels: Sequence[Any]) -> set[tuple[int, int]]:
        groups: dict[Any, list[int]] = {}
        for i, label in enumerate(labels):
            groups.setdefault(label, []).append(i)
        return {p for g in groups.values() for p in itertools.combinations(g, 2)}

    found, wanted = pairs(cluster_of.tolist()), pairs(truth)
    return {
        "records": len(rows),
        "clusters": len(golden),
        "true clusters": len(set(truth)),
        "precision": len(found & wanted) / max(len(found), 1),
        "recall": len(found & wanted) / max(len(wanted), 1),
        "cpu": cpu,
    }


# ----------------------------------------------------------------------------- peers


def ensure_peers_venv(venv: Path) -> Path:
    """The peers' interpreter, creating the virtualenv and installing them if missing."""
    python = venv / "bin" / "python"
    check = "import splink, goldenmatch, recordlinkage"
    if (
        python.exists()
        and subprocess.run([python, "-c", check], capture_output=True).returncode == 0
    ):
        return python
    print(f"creating the peers' virtualenv in {venv} ({', '.join(PEER_PACKAGES)})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)
    return python


def run_peer(python: Path, peer: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Run one peer in the peers' interpreter (a child process) and read its answer."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(json.dumps(payload))
        proc = subprocess.run(
            [
                python,
                str(Path(__file__).resolve()),
                "--worker",
                peer,
                "--input",
                str(src),
                "--output",
                str(dst),
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return {"error": " / ".join(tail)}
        result: dict[str, Any] = json.loads(dst.read_text())
        return result


def _peer_rows(set_name: str, rows: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """Peer input rows: the set's fields lowercased (None when missing) plus blocking keys."""
    out = []
    for i, row in enumerate(rows):
        attrs = row.get("attributes", {})
        rec: dict[str, Any] = {"unique_id": f"{prefix}{i}"}
        for f in FIELDS[set_name]:
            value = attrs.get(f)
            rec[f] = None if value in (None, "") else " ".join(str(value).lower().split())
        rec["title_key"] = (rec.get("title") or "")[:8] or None
        rec["name_key"] = (rec.get("name") or "")[:4] or None
        rec["addr_key"] = ((rec.get("addr") or "").split() or [None])[0]
        out.append(rec)
    return out


# The worker functions run inside the peers' interpreter: they import only the peer.


def _worker_splink(
    p: dict[str, Any], labels: dict[int, str | None] | None, pairs: list[list[int]] | None
) -> dict[str, Any]:
    import pandas as pd
    import splink.comparison_library as cl  # type: ignore[import-not-found]
    from splink import (  # type: ignore[import-not-found, unused-ignore]
        DuckDBAPI,
        Linker,
        SettingsCreator,
        block_on,
    )

    cfg = SPLINK[p["set"]]
    left = pd.DataFrame(p["query_rows"])
    right = pd.DataFrame(p["entity_rows"])
    if pairs is not None:  # nem_llm's candidate pairs as the blocking step
        cands: dict[int, list[str]] = {}
        for q, e in pairs:
            cands.setdefault(q, []).append(f"e{e}")
        left["cand"] = [cands.get(i, []) for i in range(len(left))]
        right["cand"] = [[] for _ in range(len(right))]
        # a join on "the entity is among the query's candidates" (either side may be l)
        rule = "list_contains(l.cand, r.unique_id) or list_contains(r.cand, l.unique_id)"
        blocking = [rule]
        training = [rule]
    else:
        blocking = [block_on(*b) for b in cfg["blocking"]]
        training = [block_on(*b) for b in cfg["training"]]
    comparisons = []
    for kind, column, kwargs in cfg["comparisons"]:
        comp = getattr(cl, kind)(column, **kwargs)
        if column in cfg["tf"]:
            comp = comp.configure(term_frequency_adjustments=True)
        comparisons.append(comp)
    settings = SettingsCreator(
        link_type="link_only",
        comparisons=comparisons,
        blocking_rules_to_generate_predictions=blocking,
        retain_matching_columns=False,
    )
    db = DuckDBAPI()
    linker = Linker(
        [
            db.register(left, dataset_display_name="queries"),
            db.register(right, dataset_display_name="entities"),
        ],
        settings,
        log_level=None,
    )
    linker.training.estimate_probability_two_random_records_match(
        [block_on(*rule) for rule in cfg["deterministic"]], recall=cfg["recall"]
    )
    linker.training.estimate_u_using_random_sampling(max_pairs=1e6, seed=SEED)
    for rule in training:
        linker.training.estimate_parameters_using_expectation_maximisation(rule)
    if labels:
        rows = [
            {
                "source_dataset_l": "queries",
                "unique_id_l": f"q{q}",
                "source_dataset_r": "entities",
                "unique_id_r": f"e{g}",
            }
            for q, g in labels.items()
            if g is not None
        ]
        table = db.register(pd.DataFrame(rows), dataset_display_name="labels")
        linker.training.estimate_m_from_pairwise_labels(table)
    predictions = linker.inference.predict().as_pandas_dataframe()
    best: dict[int, tuple[float, int]] = {}
    found: set[tuple[int, int]] = set()
    for row in predictions.itertuples():
        a, b = str(row.unique_id_l), str(row.unique_id_r)
        q_id, e_id = (a, b) if a.startswith("q") else (b, a)
        qn, en = int(q_id[1:]), int(e_id[1:])
        found.add((qn, en))
        prob = float(row.match_probability)
        if prob > best.get(qn, (-1.0, -1))[0]:
            best[qn] = (prob, en)
    decisions = [best[q][1] if q in best and best[q][0] >= 0.5 else None for q in range(len(left))]
    return {"decisions": decisions, "pairs": sorted(found)}


def _worker_recordlinkage(
    p: dict[str, Any], labels: dict[int, str | None] | None, pairs: list[list[int]] | None
) -> dict[str, Any]:
    import pandas as pd
    import recordlinkage as rl  # type: ignore[import-not-found]

    cfg = RECORDLINKAGE[p["set"]]
    left = pd.DataFrame(p["query_rows"]).set_index("unique_id")
    right = pd.DataFrame(p["entity_rows"]).set_index("unique_id")
    indexer = rl.Index()
    for block in SPLINK[p["set"]]["blocking"]:
        indexer.block(left_on=block, right_on=block)
    links = indexer.index(left, right)
    compare = rl.Compare()
    for f in cfg["strings"]:
        compare.string(f, f, method="jarowinkler", threshold=0.85, label=f)
    for f in cfg["exact"]:
        compare.exact(f, f, label=f)
    features = compare.compute(links, left, right)
    if labels:
        gold = pd.MultiIndex.from_tuples(
            [(f"q{q}", f"e{g}") for q, g in labels.items() if g is not None]
        )
        seen = features.index.get_level_values(0).isin([f"q{q}" for q in labels])
        train = features[seen]
        model = rl.LogisticRegressionClassifier()
        model.fit(train, gold.intersection(train.index))
    else:
        model = rl.ECMClassifier(binarize=None)
        model.fit(features)
    prob = model.prob(features)
    best: dict[int, tuple[float, int]] = {}
    for (a, b), value in prob.items():
        q, e = int(a[1:]), int(b[1:])
        if value > best.get(q, (-1.0, -1))[0]:
            best[q] = (float(value), e)
    decisions = [best[q][1] if q in best and best[q][0] >= 0.5 else None for q in range(len(left))]
    found = sorted({(int(a[1:]), int(b[1:])) for a, b in links})
    return {"decisions": decisions, "pairs": found}


def _worker_goldenmatch(
    p: dict[str, Any],
    labels: dict[int, str | None] | None,
    pairs: list[list[int]] | None,
    weighted: bool,
) -> dict[str, Any]:
    import goldenmatch as gm  # type: ignore[import-not-found]
    import pyarrow as pa

    left = pa.Table.from_pylist(p["query_rows"])
    right = pa.Table.from_pylist(p["entity_rows"])
    keys = ["unique_id", "title_key", "name_key", "addr_key"]
    if weighted:
        # blocking keys stay columns of the frames, out of the scoring
        cfg = GOLDENMATCH[p["set"]]
        result = gm.match_df(
            left, right, fuzzy=cfg["fuzzy"], blocking=cfg["blocking"], exclude_columns=keys
        )
    else:
        result = gm.match_df(left, right, exclude_columns=keys)
    best: dict[int, tuple[float, int]] = {}
    if result.matched is not None and result.matched.num_rows:
        for row in result.matched.to_pylist():
            q = int(str(row["target_unique_id"])[1:])
            e = int(str(row["ref_unique_id"])[1:])
            value = float(row["__match_score__"])
            if value > best.get(q, (-1.0, -1))[0]:
                best[q] = (value, e)
    decisions = [best[q][1] if q in best else None for q in range(left.num_rows)]
    return {"decisions": decisions, "pairs": None}


PEERS: dict[str, Callable[..., dict[str, Any]]] = {
    "splink": _worker_splink,
    "splink on nem_llm's candidates": lambda p, labels, pairs: _worker_splink(
        p, labels, p["candidate_pairs"]
    ),
    "recordlinkage (ECM; labels: logistic regression)": _worker_recordlinkage,
    "goldenmatch zero-config": lambda p, labels, pairs: _worker_goldenmatch(
        p, labels, pairs, False
    ),
    "goldenmatch weighted": lambda p, labels, pairs: _worker_goldenmatch(p, labels, pairs, True),
}
# peers that take no labels
NO_LABELS = {"goldenmatch zero-config", "goldenmatch weighted"}


def worker(peer: str, src: Path, dst: Path) -> None:
    """Run one peer on one payload, labelled or not; write decisions, pairs and CPU."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    payload = json.loads(src.read_text())
    labels = payload.get("labels")
    if labels is not None:
        labels = {int(k): v for k, v in labels.items()}
    # imported before the clock starts, as nem_llm's are
    import importlib

    for module in ("pandas", "pyarrow", peer.split()[0]):
        importlib.import_module(module)
    start = time.process_time()
    out = PEERS[peer](payload, labels, None)
    out["cpu"] = time.process_time() - start
    dst.write_text(json.dumps(out))


# ----------------------------------------------------------------------------- report


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "n/a"
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    return str(value)


class Table:
    """Rows printed as they come, kept for the saved report."""

    def __init__(self, headers: Sequence[str], *, live: bool = True) -> None:
        self.lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        self.live = live
        if live:
            print("\n".join(self.lines), flush=True)

    def add(self, *cells: Any) -> None:
        line = "| " + " | ".join(_fmt(c) for c in cells) + " |"
        self.lines.append(line)
        if self.live:
            print(line, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default=",".join(SETS))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--encoder", default=None, help="nem_llm encoder for retrieval")
    parser.add_argument("--peers-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--peers", default=None, help="comma-separated subset of peers")
    parser.add_argument("--save", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS / "records.md")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.input, args.output)
        return 0

    import nem_llm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for var in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
        os.environ.pop(var, None)
    peers = [] if args.no_peers else list(PEERS)
    if args.peers:
        peers = [p for p in PEERS if any(p.startswith(x) for x in args.peers.split(","))]
    python = ensure_peers_venv(args.peers_venv) if peers else None
    header = [
        "# Structured records: nem_llm's field model and the record-linkage peers",
        "",
        f"- {time.strftime('%Y-%m-%d %H:%M')}, {platform.platform()}, "
        f"{os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.2f}",
        f"- nem_llm from {Path(nem_llm.__file__).parent}; peers in {args.peers_venv}",
        f"- retrieval: top {args.top_k} of nem_llm's Matcher (index_description=True, "
        f"encoder {args.encoder or 'default'}); labels: a seeded half of the queries, "
        "scores on the other half",
        "",
    ]
    print("\n".join(header), flush=True)
    results = Table(
        [
            "set",
            "method",
            "labels",
            "queries",
            "accuracy",
            "link P",
            "link R",
            "novel P",
            "review",
            "CPU s",
            "load",
        ]
    )
    blocking = Table(["set", "blocking", "pairs", "pair recall", "CPU s"], live=False)
    for set_name in args.sets.split(","):
        catalog, queries = load(args.data, set_name)
        golds = [q.get("gold_id") for q in queries]
        half = labelled_half(len(queries))
        labelled = set(half)
        evaluated = [i for i in range(len(queries)) if i not in labelled]
        everyone = list(range(len(queries)))
        labels = {q: golds[q] for q in half}
        candidates, retrieval_cpu = retrieve(catalog, queries, args.top_k, args.encoder)
        pairs = {(q, e) for q, ids in enumerate(candidates) for e in ids}
        blocking.add(
            set_name,
            f"nem_llm retrieval, top {args.top_k}",
            len(pairs),
            pair_recall(pairs, golds),
            retrieval_cpu,
        )
        variants: tuple[tuple[str, dict[str, Any]], ...] = (
            ("nem_llm field model", {}),
            ("nem_llm field model, u from random pairs", {"u_source": "random"}),
        )
        for (method, options), (label_name, given, rows) in itertools.product(
            variants, (("none", None, everyone), ("half", labels, evaluated))
        ):
            decisions, cpu = nem_llm_field_model(catalog, queries, candidates, given, **options)
            m = score(decisions, golds, rows)
            results.add(
                set_name,
                method,
                label_name,
                len(rows),
                m["accuracy"],
                m["precision"],
                m["recall"],
                m["novel precision"],
                m["review"],
                cpu,
                os.getloadavg()[0],
            )
        # the same field model on a cheaper blocking (no embeddings)
        lexical, lexical_cpu = lexical_blocking(catalog, queries, args.top_k)
        lexical_pairs = {(q, e) for q, ids in enumerate(lexical) for e in ids}
        blocking.add(
            set_name,
            f"character 3-gram TF-IDF, top {args.top_k}",
            len(lexical_pairs),
            pair_recall(lexical_pairs, golds),
            lexical_cpu,
        )
        decisions, cpu = nem_llm_field_model(catalog, queries, lexical, None)
        m = score(decisions, golds, everyone)
        results.add(
            set_name,
            "nem_llm field model on 3-gram TF-IDF blocking (CPU with blocking)",
            "none",
            len(everyone),
            m["accuracy"],
            m["precision"],
            m["recall"],
            m["novel precision"],
            m["review"],
            cpu + lexical_cpu,
            os.getloadavg()[0],
        )
        if python is None:
            continue
        position = {e["id"]: i for i, e in enumerate(catalog)}
        payload = {
            "set": set_name,
            "query_rows": _peer_rows(set_name, queries, "q"),
            "entity_rows": _peer_rows(set_name, catalog, "e"),
            "candidate_pairs": [[q, position[e]] for q, ids in enumerate(candidates) for e in ids],
        }
        for peer in peers:
            for label_name, given, rows in (("none", None, everyone), ("half", labels, evaluated)):
                if given is not None and peer in NO_LABELS:
                    continue
                labelled_payload = dict(payload)
                if given is not None:
                    labelled_payload["labels"] = {
                        str(q): (None if g is None else position[g]) for q, g in given.items()
                    }
                out = run_peer(python, peer, labelled_payload)
                if "error" in out:
                    results.add(
                        set_name,
                        peer,
                        label_name,
                        len(rows),
                        None,
                        None,
                        None,
                        None,
                        None,
                        None,
                        f"failed: {out['error'][:200]}",
                    )
                    continue
                decisions = [None if d is None else catalog[int(d)]["id"] for d in out["decisions"]]
                m = score(decisions, golds, rows)
                results.add(
                    set_name,
                    peer,
                    label_name,
                    len(rows),
                    m["accuracy"],
                    m["precision"],
                    m["recall"],
                    m["novel precision"],
                    m["review"],
                    out["cpu"],
                    os.getloadavg()[0],
                )
                if (
                    label_name == "none"
                    and out.get("pairs") is not None
                    and "candidates" not in peer
                ):
                    found = {(q, catalog[e]["id"]) for q, e in out["pairs"]}
                    blocking.add(
                        set_name,
                        f"{peer}: its blocking rules",
                        len(found),
                        pair_recall(found, golds),
                        None,
                    )
    print("\n" + "\n".join(blocking.lines), flush=True)
    dedupe = Table(
        ["set", "records", "clusters", "true clusters", "pair P", "pair R", "CPU s", "load"],
        live=False,
    )
    if "febrl4" in args.sets.split(","):
        catalog, queries = load(args.data, "febrl4")
        d = dedupe_union(catalog, queries)
        dedupe.add(
            "febrl4 catalog + queries pooled",
            d["records"],
            d["clusters"],
            d["true clusters"],
            d["precision"],
            d["recall"],
            d["cpu"],
            os.getloadavg()[0],
        )
        print("\n" + "\n".join(dedupe.lines), flush=True)
    text = "\n".join(
        [
            *header,
            "## Linkage",
            "",
            *results.lines,
            "",
            "## Blocking",
            "",
            *blocking.lines,
            "",
            "## Deduplication (3-gram TF-IDF neighbours, links >= 0.99, golden records)",
            "",
            *(dedupe.lines if len(dedupe.lines) > 2 else ["(febrl4 not run)"]),
            "",
        ]
    )
    if args.save:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text, encoding="utf-8")
        print(f"\nsaved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
