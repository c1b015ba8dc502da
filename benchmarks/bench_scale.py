#!/usr/bin/env python
"""Scale benchmark: ANN vs exact hybrid search at 1M entities, memory, incremental updates.

Runs offline, bounded (~10-15 minutes on 2 busy cores, peak RSS printed; keep it < 8 GB):

    python benchmarks/bench_scale.py                 # 1,000,000 entities
    python benchmarks/bench_scale.py --entities 200000 --skip-dev
    python benchmarks/bench_scale.py --save          # also write benchmarks/results/scale.md

Parts:

1. Synthetic catalog: names built from the development sets' names (languages, restaurants,
   febrl4 people, dblp_acm titles) with systematic variation (prefixes, suffixes, a word
   borrowed from another name; 10% carry an alias: the words reordered). Vectors come from
   a cheap embedder (hashed character n-grams through a fixed random projection to 384
   dims, unit length): similar strings get similar vectors, like MiniLM on names, at
   ~50x its speed. The lexical channel is the real one.
2. 64 noisy queries (a dropped character, lower case, a dropped word): exact top-10 vs ANN
   top-10 (agreement = share of exact top-10 ids ANN returns), time per batch, both
   measured side by side; the lexical channel's cost alone (exact product vs shortlist).
3. Memory: dense bytes per entity (float16 vectors + IVF-SQ8 codes), peak RSS.
4. Incremental: add / remove / update 1,000 entities (encoding included), save time.
5. Development sets with real MiniLM vectors (cached by /tmp/scale_cache/encode.py-style
   runs; computed here when missing): R@10 exact vs ``index="ann"`` forced, and the dense
   shortlist recall of IVF-SQ8 vs HNSW32 at equal shortlist size.

Ratios are from one run on a shared machine: the load average is printed with them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.feature_extraction.text import HashingVectorizer

from nem_llm._retrieval.index import HybridIndex
from nem_llm._retrieval.lexical import shortlist
from nem_llm._text import validate_query
from nem_llm.catalog import Catalog, load_catalog
from nem_llm.models import Entity

DATA = Path(os.environ.get("NEM_LLM_DATA", "/work/shared/data"))
CACHE = Path(os.environ.get("NEM_LLM_SCALE_CACHE", "/tmp/scale_cache"))
DEV_SETS = ("restaurants", "dblp_acm", "febrl4", "languages")
DIM = 384
# languages has 23k queries: every 8th (2.9k) keeps the MiniLM encoding to minutes here
QUERY_STEP = {"languages": 8}
rows: list[tuple[str, str]] = []


def report(label: str, value: str) -> None:
    rows.append((label, value))
    print(f"{label:<58} {value}", flush=True)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


class CheapEmbedder:
    """Hashed char 2-4-grams through a fixed Gaussian projection: dense unit vectors."""

    name = "cheap-hash-proj-384"

    def __init__(self, n_features: int = 2**15) -> None:
        self._hash = HashingVectorizer(
            analyzer="char_wb", ngram_range=(2, 4), n_features=n_features, lowercase=True
        )
        rng = np.random.default_rng(42)
        self._proj = rng.standard_normal((n_features, DIM), dtype=np.float32)

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        out = np.empty((len(texts), DIM), dtype=np.float32)
        for lo in range(0, len(texts), 50_000):
            x = self._hash.transform(texts[lo : lo + 50_000]).astype(np.float32)
            v = np.asarray(x @ self._proj, dtype=np.float32)
            v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)
            out[lo : lo + len(v)] = v
        return out


def base_names() -> list[str]:
    names: list[str] = []
    for name in DEV_SETS:
        with (DATA / f"{name}_catalog.jsonl").open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                text = str(row["name"])
                names.append(" ".join(text.split()[:6]))
    return sorted(set(names))


def synthetic_catalog(n: int, seed: int = 0) -> Catalog:
    rng = random.Random(seed)
    bases = base_names()
    words = sorted({w for b in bases for w in b.split() if len(w) > 3})
    prefixes = ["", "", "New ", "North ", "South ", "Upper ", "St. ", "Greater ", "Old "]
    suffixes = ["", "", " Inc", " Group", " & Sons", " International", " Holdings", " Ltd"]
    entities = []
    for i in range(n):
        base = bases[i % len(bases)]
        name = f"{rng.choice(prefixes)}{base} {rng.choice(words)}{rng.choice(suffixes)}"
        aliases = []
        if rng.random() < 0.1:
            parts = name.split()
            aliases.append(" ".join(parts[1:] + parts[:1]))
        entities.append(Entity(id=f"S{i}", name=name, aliases=aliases))
    return Catalog.from_entities(entities)


def noisy_queries(catalog: Catalog, n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name = catalog.entities[rng.randrange(len(catalog.entities))].name
        kind = rng.randrange(3)
        if kind == 0 and len(name) > 4:
            i = rng.randrange(len(name))
            name = name[:i] + name[i + 1 :]
        elif kind == 1:
            name = name.lower()
        elif len(name.split()) > 2:
            parts = name.split()
            del parts[rng.randrange(len(parts))]
            name = " ".join(parts)
        out.append(validate_query(name))
    return out


def agreement(got: list[list[Any]], want: list[list[Any]], *, tol: float = 0.0) -> float:
    """Share of exact top-k ids that ANN returns; with ``tol``, an ANN candidate scoring
    within ``tol`` of the exact k-th score also agrees (a tie resolved the other way)."""
    shares = []
    for a, e in zip(got, want, strict=True):
        ids = {c.entity_id for c in e}
        floor = min((c.score for c in e), default=1.0) - tol
        hits = sum(c.entity_id in ids or (tol > 0 and c.score >= floor) for c in a)
        shares.append(min(hits, len(e)) / max(1, len(e)))
    return float(np.mean(shares))


def part_million(n: int, work: Path) -> None:
    print(f"\n== {n:,} synthetic entities ==", flush=True)
    catalog, t = timed(lambda: synthetic_catalog(n))
    report("catalog synthesis (entities, forms)", f"{n:,}, {len(catalog.forms):,} ({t:.0f} s)")
    embedder = CheapEmbedder()
    vectors, t = timed(lambda: embedder.encode(list(catalog.forms)))
    report("cheap embedder (forms/s)", f"{len(catalog.forms) / t:,.0f}")
    ann, t_build = timed(lambda: HybridIndex(catalog, vectors, index="ann"))
    report("ANN index build (TF-IDF fit + IVF-SQ8 train/add)", f"{t_build:.0f} s")
    report("peak RSS after ANN build", f"{peak_rss_gb():.2f} GB")
    st = ann._state
    exact = HybridIndex(
        catalog,
        vectors,
        index="exact",
        _restored=(ann._vectorizer, st.lex_forms, st.slots, None),
    )
    vectors = None  # the float32 copy lives on in the exact index only
    report("peak RSS with the exact index too", f"{peak_rss_gb():.2f} GB")
    report(
        "dense bytes/entity: exact float32 | ANN f16 + SQ8 codes",
        f"{exact.dense_nbytes_per_entity():,.0f} | {ann.dense_nbytes_per_entity():,.0f}",
    )

    queries = noisy_queries(catalog, 64)
    qv = embedder.encode(queries)
    want, t_exact = timed(lambda: exact.search(qv, queries, 10))
    _, t_exact2 = timed(lambda: exact.search(qv, queries, 10))
    ann.search(qv, queries, 10)  # warm-up
    t_ann = []
    got: list[list[Any]] = []
    for _ in range(5):
        got, t = timed(lambda: ann.search(qv, queries, 10))
        t_ann.append(t)
    t_e, t_a = min(t_exact, t_exact2), statistics.median(t_ann)
    report("top-10, 64 queries: exact (best of 2)", f"{t_e * 1000:,.0f} ms")
    report("top-10, 64 queries: ANN (median of 5)", f"{t_a * 1000:,.0f} ms")
    report("speed-up ANN vs exact [>= 10x]", f"{t_e / t_a:.1f}x")
    report(
        "agreement with exact top-10 [>= 0.99]: ids | ties counted",
        f"{agreement(got, want):.4f} | {agreement(got, want, tol=1e-4):.4f}",
    )
    top1 = np.mean(
        [bool(a) and bool(e) and a[0].id == e[0].id for a, e in zip(got, want, strict=True)]
    )
    report("top-1 agreement", f"{top1:.4f}")
    exact_ids = {(i, c.entity_id): c.score for i, found in enumerate(want) for c in found}
    diffs = [
        abs(c.score - exact_ids[(i, c.entity_id)])
        for i, found in enumerate(got)
        for c in found
        if (i, c.entity_id) in exact_ids
    ]
    report("max |ANN score - exact score| (float16 vectors)", f"{max(diffs):.5f}")

    qlex = ann._query_lexical(queries)
    assert qlex is not None and st.inverted is not None and ann._rare is not None
    _, t_lex_exact = timed(lambda: np.asarray((qlex @ st.inverted).todense()))
    _, t_lex_short = timed(lambda: shortlist(qlex, st.inverted, ann._rare, 100))
    report(
        "lexical channel, 64 queries: exact product | shortlist",
        f"{t_lex_exact * 1000:,.0f} ms | {t_lex_short * 1000:,.0f} ms",
    )

    allowed = np.zeros(len(catalog.entities), dtype=bool)
    allowed[::10] = True
    fexact, _ = timed(lambda: exact.search(qv, queries, 10, allowed=allowed))
    fgot, t_f = timed(lambda: ann.search(qv, queries, 10, allowed=allowed))
    report(
        "filter (10% of entities): ANN ms, agreement",
        f"{t_f * 1000:,.0f} ms, {agreement(fgot, fexact):.4f}",
    )
    exact = None  # frees the float32 copy before the updates

    new_entities = [
        {"id": f"N{i}", "name": f"Added Entity {i} {catalog.entities[i].name}"} for i in range(1000)
    ]

    def add() -> None:
        new = load_catalog(new_entities)
        ann.apply_changes(add=new, add_vectors=embedder.encode(list(new.forms)))

    _, t_add = timed(add)
    report("add 1,000 entities (encode + update) [< 5 s]", f"{t_add:.2f} s")
    _, t_rm = timed(lambda: ann.apply_changes(remove=[f"S{i}" for i in range(1000)]))
    report("remove 1,000 entities [< 5 s]", f"{t_rm:.2f} s")
    updated = [{"id": f"N{i}", "name": f"Renamed {i}", "aliases": ["x"]} for i in range(1000)]

    def update() -> None:
        new = load_catalog(updated)
        ann.apply_changes(
            remove=[e["id"] for e in updated],
            add=new,
            add_vectors=embedder.encode(list(new.forms)),
        )

    _, t_up = timed(update)
    report("update 1,000 entities [< 5 s]", f"{t_up:.2f} s")
    [found] = ann.search(embedder.encode(["Renamed 7"]), ["Renamed 7"], 1)
    report("updated entity found by its new name", str(found[0].entity_id == "N7"))

    _, t_save = timed(lambda: ann.save(work / "idx"))
    size = sum(p.stat().st_size for p in (work / "idx").rglob("*") if p.is_file())
    report("save (versioned, atomic) | on disk per entity", f"{t_save:.0f} s | {size / n:,.0f} B")
    loaded, t_load = timed(lambda: HybridIndex.load(work / "idx", ann.catalog))
    report("load (vectors memory-mapped, catalog given)", f"{t_load:.1f} s")
    del loaded
    report("peak RSS, whole 1M run", f"{peak_rss_gb():.2f} GB")


def dev_vectors(name: str) -> tuple[Catalog, list[str], list[str | None], Any, Any]:
    catalog = load_catalog(DATA / f"{name}_catalog.jsonl")
    with (DATA / f"{name}_queries.jsonl").open(encoding="utf-8") as f:
        rows_ = [json.loads(line) for line in f]
    rows_ = rows_[:: QUERY_STEP.get(name, 1)]
    queries = [validate_query(r["query"]) for r in rows_]
    golds = [r.get("gold_id") for r in rows_]
    fv, qv = CACHE / f"{name}_forms.npy", CACHE / f"{name}_queries.npy"
    if not (fv.exists() and qv.exists()):
        from nem_llm._retrieval.embedding import SentenceTransformerEmbedder

        emb = SentenceTransformerEmbedder()
        CACHE.mkdir(parents=True, exist_ok=True)
        np.save(fv, np.asarray(emb.encode(list(catalog.forms)), dtype=np.float32))
        np.save(qv, np.asarray(emb.encode(queries), dtype=np.float32))
    return catalog, queries, golds, np.load(fv), np.load(qv)


def recall_at(found: list[list[Any]], golds: list[str | None], k: int) -> float:
    hits = [g in {c.entity_id for c in f[:k]} for f, g in zip(found, golds, strict=True) if g]
    return float(np.mean(hits)) if hits else float("nan")


def dense_shortlist_recall(vectors: Any, qv: Any, n: int) -> tuple[float, float]:
    """Share of the exact dense top-n that IVF-SQ8 (nprobe 32) and HNSW32 (ef 128) return."""
    import faiss

    truth = np.argsort(-(qv @ vectors.T), axis=1)[:, :n]
    from nem_llm._retrieval.ann import DenseANN

    ivf = DenseANN.build(vectors, np.arange(len(vectors), dtype=np.int64))
    got_ivf = ivf.search(qv, n)
    hnsw = faiss.IndexHNSWFlat(vectors.shape[1], 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.add(np.ascontiguousarray(vectors))
    hnsw.hnsw.efSearch = max(128, n)
    _, got_hnsw = hnsw.search(np.ascontiguousarray(qv), n)

    def share(got: Any) -> float:
        return float(np.mean([len(set(g) & set(t)) / n for g, t in zip(got, truth, strict=True)]))

    return share(got_ivf), share(got_hnsw)


def part_dev() -> None:
    print("\n== development sets, real MiniLM vectors ==", flush=True)
    for name in DEV_SETS:
        catalog, queries, golds, fv, qv = dev_vectors(name)
        exact = HybridIndex(catalog, fv, index="exact")
        ann = HybridIndex(catalog, fv, index="ann")
        r_e = recall_at(exact.search(qv, queries, 10), golds, 10)
        r_a = recall_at(ann.search(qv, queries, 10), golds, 10)
        report(
            f"{name}: forms; R@10 exact | ann | delta [<= 0.005]",
            f"{len(catalog.forms):,}; {r_e:.4f} | {r_a:.4f} | {r_a - r_e:+.4f}",
        )
        ivf, hnsw = dense_shortlist_recall(fv, qv[:2000], 100)
        report(f"{name}: dense top-100 recall IVF-SQ8 | HNSW32", f"{ivf:.4f} | {hnsw:.4f}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entities", type=int, default=1_000_000)
    parser.add_argument("--skip-dev", action="store_true")
    parser.add_argument("--skip-million", action="store_true")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args(argv)
    report("load average (1 min) at start", f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if not args.skip_dev:
        part_dev()
    if not args.skip_million:
        with tempfile.TemporaryDirectory(prefix="nem-llm-scale-") as tmp:
            part_million(args.entities, Path(tmp))
    report("load average (1 min) at end", f"{os.getloadavg()[0]:.1f}")
    if args.save:
        out = Path(__file__).parent / "results" / "scale.md"
        lines = ["| measure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
        out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
