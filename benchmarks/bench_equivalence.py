#!/usr/bin/env python
"""Behaviour check: the same candidates, scores and routes from two versions of nem_llm.

Run it once with each version first on the path, then compare the two dumps:

    PYTHONPATH=/tmp/base python benchmarks/bench_equivalence.py --dump /tmp/before.json
    PYTHONPATH=$PWD      python benchmarks/bench_equivalence.py --dump /tmp/after.json
    python benchmarks/bench_equivalence.py --compare /tmp/before.json /tmp/after.json

The sample is fixed: four catalogs (1,000 ``Product i`` names; the languages and restaurants
development catalogs, many aliases and scripts; 150,000 synthetic names from
``bench_scale.py``), searched exactly and through the ANN shortlist, with and without a
filter, at k = 1, 10 and 50, then again after an incremental update. Vectors come from the
cheap hashed projection of ``bench_scale.py`` (deterministic, no model), so both versions
search the very same vectors. Each query's routes under the default thresholds are
compared too.

Two dumps agree when every query has the same candidates in the same order with scores
(combined, dense, lexical) within 1e-5 and the same matched forms and routes; a different
id is allowed only where its score ties the other's (within 1e-5) at a cut-off: which of
two tied entities is the k-th is not a behaviour. Likewise a different matched form (with
its own dense and lexical parts) at the same combined score: which of an entity's tied
forms is the first maximum is float noise (the BLAS thread count changes it). Exit status 1
on any disagreement.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

TOL = 1e-5
DATA = Path(os.environ.get("NEM_LLM_DATA", "/work/shared/data"))


def _queries(catalog: Any, n: int, seed: int) -> list[str]:
    from bench_scale import noisy_queries

    return noisy_queries(catalog, n, seed=seed)


def dump(path: Path) -> None:
    """Search the fixed sample with the imported nem_llm; write every answer to ``path``."""
    from bench_scale import CheapEmbedder, synthetic_catalog

    import nem_llm
    from nem_llm._retrieval.index import HybridIndex
    from nem_llm._retrieval.routing import route
    from nem_llm._text import validate_query
    from nem_llm.catalog import load_catalog
    from nem_llm.config import Thresholds

    embedder = CheapEmbedder()
    products = load_catalog([{"id": f"p{i}", "name": f"Product {i}"} for i in range(1000)])
    rng = np.random.default_rng(0)
    product_queries = [
        validate_query(f"product {int(i)}" if j % 3 else f"Product {int(i)}")
        for j, i in enumerate(rng.integers(0, 1200, 600))
    ]
    catalogs: list[tuple[str, Any, list[str]]] = [("products", products, product_queries)]
    for name in ("languages", "restaurants"):
        cat = load_catalog(DATA / f"{name}_catalog.jsonl")
        with (DATA / f"{name}_queries.jsonl").open(encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
        qs = [validate_query(r["query"]) for r in rows[:: max(1, len(rows) // 600)]]
        catalogs.append((name, cat, qs))
    synth = synthetic_catalog(150_000)
    catalogs.append(("synthetic150k", synth, _queries(synth, 400, seed=3)))

    out: dict[str, Any] = {"nem_llm": nem_llm.__file__, "runs": {}}
    thresholds = Thresholds()
    for name, catalog, queries in catalogs:
        vectors = embedder.encode(list(catalog.forms))
        qv = embedder.encode(queries)
        allowed = np.zeros(len(catalog.entities), dtype=bool)
        allowed[::7] = True
        small = np.zeros(len(catalog.entities), dtype=bool)
        small[:40] = True
        for mode in ("exact", "ann"):
            index = HybridIndex(catalog, vectors, index=mode)
            for k in (1, 10, 50):
                for fname, mask in (("none", None), ("every7th", allowed), ("first40", small)):
                    if mode == "exact" and k == 50 and fname != "none":
                        continue
                    found = index.search(qv, queries, k, allowed=mask)
                    out["runs"][f"{name}/{mode}/k{k}/{fname}"] = [
                        _row(cands, route(cands, thresholds, q) if k == 10 else None)
                        for q, cands in zip(queries, found, strict=True)
                    ]
            # an incremental update: remove every 5th of the first 500, add 50 new entities
            gone = [catalog.entities[i].id for i in range(0, min(500, len(catalog.entities)), 5)]
            added = load_catalog(
                [
                    {"id": f"new{i}", "name": f"{catalog.entities[i].name} Annex", "aliases": ["x"]}
                    for i in range(1, 51)
                ]
            )
            index.apply_changes(
                remove=gone, add=added, add_vectors=embedder.encode(list(added.forms))
            )
            found = index.search(qv, queries, 10)
            out["runs"][f"{name}/{mode}/updated"] = [_row(c, None) for c in found]
        print(f"{name}: {len(catalog.entities):,} entities, {len(queries)} queries", flush=True)
    path.write_text(json.dumps(out), encoding="utf-8")


def _row(cands: Any, r: Any) -> dict[str, Any]:
    return {
        "ids": [c.entity_id for c in cands],
        "scores": [[c.score, c.dense_score, c.lexical_score] for c in cands],
        "forms": [c.matched_form for c in cands],
        "route": None if r is None else [r.kind, r.rule],
    }


def compare(a_path: Path, b_path: Path) -> int:
    """Print the differences between two dumps; 0 if they agree."""
    a = json.loads(a_path.read_text(encoding="utf-8"))["runs"]
    b = json.loads(b_path.read_text(encoding="utf-8"))["runs"]
    bad = 0
    tie_swaps = 0
    worst = 0.0
    queries = 0
    for run in sorted(a):
        if run not in b:
            print(f"{run}: missing in {b_path}")
            bad += 1
            continue
        for q, (x, y) in enumerate(zip(a[run], b[run], strict=True)):
            queries += 1
            problem, swaps, diff = _diff(x, y)
            tie_swaps += swaps
            worst = max(worst, diff)
            if problem:
                bad += 1
                if bad <= 20:
                    print(f"{run} query {q}: {problem}")
    print(
        f"{queries:,} query answers in {len(a)} runs: {bad} disagreements, "
        f"{tie_swaps} tied candidates swapped, largest score difference {worst:.2e}"
    )
    return 1 if bad else 0


def _diff(x: dict[str, Any], y: dict[str, Any]) -> tuple[str, int, float]:
    if len(x["ids"]) != len(y["ids"]):
        return f"{len(x['ids'])} vs {len(y['ids'])} candidates", 0, 0.0
    worst = 0.0
    swaps = 0
    for i, (ia, ib) in enumerate(zip(x["ids"], y["ids"], strict=True)):
        sa, sb = x["scores"][i], y["scores"][i]
        d = abs(sa[0] - sb[0])
        worst = max(worst, d)
        if d > TOL:
            return f"position {i}: score {sa[0]} vs {sb[0]}", swaps, worst
        if ia != ib:
            # allowed only if the other version has this id at a tied score, or it was
            # cut off among ties at the end of the list
            others = dict(zip(y["ids"], (s[0] for s in y["scores"]), strict=True))
            if ia in others and abs(others[ia] - sa[0]) > TOL:
                return f"position {i}: {ia} vs {ib}", swaps, worst
            if ia not in others and abs(x["scores"][-1][0] - sa[0]) > TOL:
                return f"position {i}: {ia} vs {ib} (not a tie at the cut-off)", swaps, worst
            swaps += 1
            continue
        if x["forms"][i] != y["forms"][i]:
            # two forms of one entity at the same combined score (float noise, e.g. of
            # the BLAS thread count, decides which is the first maximum): a tie, like ids
            swaps += 1
            continue
        for part in (1, 2):
            if (sa[part] is None) != (sb[part] is None):
                return f"position {i}: part {part} None in one", swaps, worst
            if sa[part] is not None:
                worst = max(worst, abs(sa[part] - sb[part]))
                if abs(sa[part] - sb[part]) > TOL:
                    return f"position {i}: part {part} {sa[part]} vs {sb[part]}", swaps, worst
    if x["route"] != y["route"]:
        return f"route {x['route']} vs {y['route']}", swaps, worst
    return "", swaps, worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", type=Path)
    parser.add_argument("--compare", type=Path, nargs=2)
    args = parser.parse_args(argv)
    if args.dump:
        dump(args.dump)
    if args.compare:
        return compare(*args.compare)
    return 0


if __name__ == "__main__":
    sys.exit(main())
