"""Novel-entity discovery on the development sets: cluster purity, coverage, LLM calls.

The development sets' null-gold queries carry ``novel_entity_id``: the entity removed
from the catalog that they mention (languages 2,413 such queries, febrl4 500). They are
fed to discovery as the ``novel`` rows of a run (as if routing had called exactly them
novel; they carry no candidates), and the clusters are scored against that truth:

- purity: share of clustered mentions whose cluster's majority entity is theirs;
- coverage: share of removed entities with >= 3 mentions that are the majority of a
  kept cluster;
- LLM calls per proposal: the full ``discover_async`` against the simulator (one
  structured call per cluster; the simulator names each cluster after its most frequent
  mention).

Usage: ``python benchmarks/bench_discovery.py [--data ../shared/data] [--out results/discovery.md]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
from openai import AsyncOpenAI

from nem_llm._jobs.discovery import (
    ClusterConfig,
    cluster_mentions,
    discover_async,
    novel_mentions,
    similarity_matrix,
)
from nem_llm._retrieval.embedding import SentenceTransformerEmbedder
from nem_llm.models import MatchResult
from nem_llm.sim import SimConfig, SimServer

SETS = ("languages", "febrl4")
HERE = Path(__file__).resolve().parent


class _Precomputed:
    """An embedder that answers from vectors computed once (the bench encodes once)."""

    name = "precomputed"

    def __init__(self, texts: Sequence[str], vectors: npt.NDArray[np.float32]) -> None:
        self._rows = {t: v for t, v in zip(texts, vectors, strict=True)}

    def encode(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        return np.array([self._rows[t] for t in texts], dtype=np.float32)


def _write_novel_rows(data: Path, name: str, out: Path) -> list[str]:
    """Write the set's novel-entity queries as novel result rows; return their truth."""
    truth: list[str] = []
    with out.open("w", encoding="utf-8") as fh:
        for line in (data / f"{name}_queries.jsonl").open(encoding="utf-8"):
            row = json.loads(line)
            if row.get("gold_id") is None and row.get("novel_entity_id"):
                result = MatchResult(query=row["query"], status="novel", index=len(truth))
                fh.write(json.dumps(result.model_dump(mode="json"), ensure_ascii=False) + "\n")
                truth.append(row["novel_entity_id"])
    return truth


def _score(
    clusters: Sequence[Sequence[int]], lines: Sequence[Sequence[int]], truth: Sequence[str]
) -> tuple[float | None, float | None, int, int]:
    """(purity, coverage of entities with >= 3 mentions, clusters, mentions clustered)."""
    pure = total = 0
    covered: set[str] = set()
    for members in clusters:
        owners = Counter(truth[line - 1] for i in members for line in lines[i])
        entity, count = owners.most_common(1)[0]
        pure += count
        total += sum(owners.values())
        covered.add(entity)
    big = {e for e, n in Counter(truth).items() if n >= 3}
    purity = pure / total if total else None
    return purity, len(covered & big) / len(big) if big else None, len(clusters), total


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


async def _llm_calls_per_proposal(results: Path, config: ClusterConfig, embedder: object) -> str:
    async with SimServer(SimConfig()) as sim:
        client = AsyncOpenAI(base_url=sim.base_url, api_key="sim", max_retries=0)
        rows = await discover_async(
            results,
            client=client,
            model="nem-llm-sim",
            config=config,
            embedder=embedder,  # type: ignore[arg-type]
        )
        await client.close()
        proposed = sum(1 for r in rows if r.proposal is not None)
        return f"{len(sim.requests) / proposed:.2f}" if proposed else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "discovery.md")
    args = parser.parse_args()
    default = ClusterConfig()
    variants = {
        f"agglomerative t={default.threshold} (default)": default,
        "agglomerative, no stability filter": replace(default, min_stability=0.0),
        "agglomerative, embeddings only (w=0)": replace(default, lexical_weight=0.0),
        "agglomerative, min size 3": replace(default, min_size=3),
        "hdbscan": replace(default, method="hdbscan"),
    }
    header = (
        "| set | method | novel mentions | entities >= 3 mentions | clusters | "
        "mentions clustered | purity | coverage | LLM calls / proposal | cluster time |"
    )
    lines = [header, "|" + "---|" * 10]
    embedder = SentenceTransformerEmbedder()
    with tempfile.TemporaryDirectory() as tmp:
        for name in SETS:
            results = Path(tmp) / f"{name}.jsonl"
            truth = _write_novel_rows(args.data, name, results)
            mentions = novel_mentions(results)
            texts = [m.text for m in mentions]
            started = time.perf_counter()
            vectors = embedder.encode(texts)
            print(f"{name}: {len(texts)} distinct mentions encoded in "
                  f"{time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
            big = sum(1 for n in Counter(truth).values() if n >= 3)
            for label, config in variants.items():
                started = time.perf_counter()
                sim = similarity_matrix(texts, vectors, config.lexical_weight)
                clusters = cluster_mentions(sim, [m.count for m in mentions], config)
                took = time.perf_counter() - started
                purity, coverage, n, clustered = _score(
                    [c.members for c in clusters], [m.lines for m in mentions], truth
                )
                calls = "-"
                if config is default:
                    calls = asyncio.run(
                        _llm_calls_per_proposal(results, config, _Precomputed(texts, vectors))
                    )
                row = (
                    f"| {name} | {label} | {len(truth):,} | {big} | {n} | {clustered:,} | "
                    f"{_fmt(purity)} | {_fmt(coverage)} | "
                    f"{calls} | {took:.1f} s |"
                )
                print(row, flush=True)
                lines.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
