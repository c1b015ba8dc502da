#!/usr/bin/env python
"""Scale-out benchmarks: the provider Batch API engine, and the Ray Data engine.

Runs offline against the nem_llm simulator (``nem_llm.sim``).

    python benchmarks/bench_scaleout.py                 # both parts
    python benchmarks/bench_scaleout.py --parts batch   # Batch API only
    python benchmarks/bench_scaleout.py --quick         # 2,000 queries instead of 10,000
    python benchmarks/bench_scaleout.py --save          # also write results/scaleout.md

Part ``batch``: N queries (the ``languages`` development set, every row sent to the LLM:
accept_threshold 1.5, novel_threshold 0) through ``--llm-mode batch-api`` with 5% error
lines and 3% schema-invalid answers; the job runs in a child process that is SIGKILLed
while its first batch is in_progress, then rerun to the end. Checked: exactly N results,
0 duplicate submissions (the simulator's log), and the request count, tokens and cost
beside live mode on the same input (live: 5% HTTP 500s and 3% invalid answers, the same
fault mix). The embedder is ``nem_llm.testing.FakeEmbedder`` (no MiniLM) so the run stays
short on a shared machine: what is measured is the LLM path, not embedding.

Part ``ray``: the Ray Data engine against the local engine on a development-set sample
(same simulator seed): row-for-row equality of ids, statuses and entity ids, and the wall
time ratio Ray/local with Ray's start-up measured separately, actors=1 and actors=2.

Timings on a shared 2-core machine are noisy: compare numbers measured side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
# the development sets: beside the repository (main) or two levels up (a worktree)
DATA = next(
    (
        p
        for p in (ROOT.parent / "shared" / "data", ROOT.parents[1] / "shared" / "data")
        if p.is_dir()
    ),
    ROOT.parent / "shared" / "data",
)
sys.path.insert(0, str(ROOT))

from nem_llm.sim import BatchSimConfig, SimConfig, run_simulator  # noqa: E402

RUNNER = """
import asyncio, json, sys
from functools import partial
from pathlib import Path
from nem_llm import Matcher, MatcherSettings
from nem_llm._jobs.batch import MatchJob
from nem_llm._jobs.batch_api import BatchApiOptions, run_batch_api_job
from nem_llm.testing import FakeEmbedder

catalog, queries, out, base_url, poll = sys.argv[1:6]
job = MatchJob(catalog=Path(catalog), queries=Path(queries), out=Path(out),
               settings=MatcherSettings(base_url=base_url,
               accept_threshold=1.5, novel_threshold=0.0, label_budget=0))
summary = asyncio.run(run_batch_api_job(
    job, options=BatchApiOptions(poll_interval=float(poll)),
    matcher_factory=partial(Matcher, embedder=FakeEmbedder())))
print(json.dumps({"batches": summary.batches, "usage": summary.stats.usage.model_dump(),
                  "by_status": summary.stats.by_status}))
"""


def _queries(n: int, tmp: Path) -> Path:
    """The first ``n`` distinct queries of the languages development set."""
    path = tmp / "queries.jsonl"
    seen: set[str] = set()
    with (DATA / "languages_queries.jsonl").open() as src, path.open("w") as dst:
        for line in src:
            row = json.loads(line)
            if row["query"] in seen:
                continue
            seen.add(row["query"])
            dst.write(json.dumps({"id": f"q{len(seen)}", "query": row["query"]}) + "\n")
            if len(seen) >= n:
                break
    return path


def bench_batch(n: int) -> list[tuple[str, str]]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    catalog = DATA / "languages_catalog.jsonl"
    queries = _queries(n, tmp)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")}
    env["OPENAI_API_KEY"] = "sk-bench-not-a-real-key"
    env["PYTHONPATH"] = str(ROOT)
    script = tmp / "runner.py"
    script.write_text(RUNNER)
    batch = BatchSimConfig(
        seed=7, completion_delay=4.0, rate_error_line=0.05, rate_invalid_answer=0.03
    )
    rows: list[tuple[str, str]] = []
    with run_simulator(SimConfig(seed=7), batch=batch) as sim:
        args = [sys.executable, str(script), str(catalog), str(queries), str(tmp / "out.jsonl")]
        args += [sim.base_url, "0.5"]
        started = time.monotonic()
        first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL)
        while not any(r.kind == "retrieve" for r in list(sim.batches.log)):
            if first.poll() is not None:
                raise SystemExit("the first run ended before polling")
            time.sleep(0.05)
        first.send_signal(signal.SIGKILL)
        first.wait()
        killed_after = time.monotonic() - started
        done = subprocess.run(args, env=env, check=True, capture_output=True, text=True)
        batch_wall = time.monotonic() - started
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        out = [json.loads(line) for line in (tmp / "out.jsonl").read_text().splitlines()]
        log = sim.batches.log
        http_batch = len(log)
        lines_sent = sum(sim.batches.submissions().values())
        dups = sim.batches.duplicate_submissions()
        creates = sum(1 for r in log if r.kind == "create")

    # live mode on the same input, the same fault mix on the chat endpoint
    from functools import partial

    from nem_llm import Matcher, MatcherSettings
    from nem_llm._jobs.batch import MatchJob, run_match_job
    from nem_llm.config import Limits
    from nem_llm.testing import FakeEmbedder

    live_config = SimConfig(seed=7, rate_500=0.05, rate_invalid=0.03)
    with run_simulator(live_config) as sim:
        job = MatchJob(
            catalog=catalog,
            queries=queries,
            out=tmp / "live.jsonl",
            settings=MatcherSettings(
                base_url=sim.base_url,
                accept_threshold=1.5,
                novel_threshold=0.0,
                limits=Limits(concurrency=32, backoff_initial=0.01, backoff_max=0.05),
            ),
        )
        started = time.monotonic()
        live = asyncio.run(
            run_match_job(job, matcher_factory=partial(Matcher, embedder=FakeEmbedder()))
        )
        live_wall = time.monotonic() - started
        live_http = len(sim.requests)

    usage = summary["usage"]
    rows += [
        ("queries (all sent to the LLM)", f"{n:,}"),
        ("results written (batch-api)", f"{len(out):,}"),
        ("distinct row indexes", f"{len({r['index'] for r in out}):,}"),
        ("by status (batch-api)", json.dumps(summary["by_status"])),
        ("first run SIGKILLed while polling after", f"{killed_after:.1f} s"),
        ("batches created / duplicate submissions", f"{creates} / {dups}"),
        ("request lines submitted (incl. re-asks, resubmits)", f"{lines_sent:,}"),
        ("HTTP requests: batch-api / live", f"{http_batch:,} / {live_http:,}"),
        (
            "tokens: batch-api / live",
            f"{usage['total_tokens']:,} / {live.stats.usage.total_tokens:,}",
        ),
        (
            "cost USD: batch-api / live",
            f"{usage['cost_usd']:.4f} / {live.stats.usage.cost_usd:.4f}",
        ),
        ("by status (live)", json.dumps(live.stats.by_status)),
        (
            "wall: batch-api (sim delay 4 s a batch) / live",
            f"{batch_wall:.1f} s / {live_wall:.1f} s",
        ),
    ]
    return rows


def bench_ray(n: int) -> list[tuple[str, str]]:
    """Local engine vs Ray engine (actors 1 and 2) on the first ``n`` restaurants queries."""
    import shutil

    import ray

    from nem_llm import MatcherSettings
    from nem_llm._jobs.batch import MatchJob, run_match_job
    from nem_llm.integrations.ray import prepare_index, run_ray_job

    tmp = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    catalog = DATA / "restaurants_catalog.jsonl"
    queries = tmp / "queries.jsonl"
    with (DATA / "restaurants_queries.jsonl").open() as src:
        queries.write_text("".join(line for _, line in zip(range(n), src, strict=False)))
    index = tmp / "index"
    started = time.monotonic()
    prepare_index(catalog, MatcherSettings(index_dir=index))  # the real MiniLM, once
    index_s = time.monotonic() - started

    def job(name: str, url: str) -> MatchJob:
        out = tmp / f"{name}.jsonl"
        state = tmp / f"{name}.state"
        shutil.copytree(index, state / "index")  # every engine loads the same saved index
        return MatchJob(
            catalog=catalog,
            queries=queries,
            out=out,
            settings=MatcherSettings(base_url=url),
            state=state,
        )

    walls: dict[str, float] = {}
    outs: dict[str, list[dict[str, Any]]] = {}
    with run_simulator(SimConfig(seed=5, latency_p50=0.05)) as sim:
        local = job("local", sim.base_url)
        started = time.monotonic()
        asyncio.run(run_match_job(local))
        walls["local"] = time.monotonic() - started
        outs["local"] = [json.loads(x) for x in local.out.read_text().splitlines()]
        started = time.monotonic()
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=tempfile.mkdtemp(prefix="ray"),
        )
        ray_start = time.monotonic() - started
        try:
            for actors in (1, 2):
                name = f"ray{actors}"
                started = time.monotonic()
                run_ray_job(job(name, sim.base_url), actors=actors)
                walls[name] = time.monotonic() - started
                outs[name] = [
                    json.loads(x) for x in (tmp / f"{name}.jsonl").read_text().splitlines()
                ]
        finally:
            ray.shutdown()

    def key(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(r["id"], r["status"], r["entity_id"]) for r in rows]

    routed = sum(1 for r in outs["local"] if r["decided_by"] == "llm")
    return [
        ("queries (restaurants dev set) / sent to the LLM", f"{n:,} / {routed:,}"),
        ("index build (MiniLM, once, shared)", f"{index_s:.1f} s"),
        ("Ray start-up (ray.init, num_cpus=2)", f"{ray_start:.1f} s"),
        ("wall: local engine", f"{walls['local']:.1f} s"),
        ("wall: ray actors=1 / actors=2", f"{walls['ray1']:.1f} s / {walls['ray2']:.1f} s"),
        (
            "ratio ray/local: actors=1 / actors=2",
            f"{walls['ray1'] / walls['local']:.2f} / {walls['ray2'] / walls['local']:.2f}",
        ),
        ("ratio actors=2 / actors=1", f"{walls['ray2'] / walls['ray1']:.2f}"),
        (
            "rows equal to local (id, status, entity_id): actors=1 / 2",
            f"{key(outs['ray1']) == key(outs['local'])} / "
            f"{key(outs['ray2']) == key(outs['local'])}",
        ),
    ]


def _table(title: str, rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    lines = [f"## {title}", "", f"| {'what':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="batch,ray")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    # live mode's injected 500s are retried by design; instructor logs every one of them
    logging.getLogger("instructor").setLevel(logging.CRITICAL)
    parts = set(args.parts.split(","))
    load = os.getloadavg()
    report = [f"# bench_scaleout ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n"]
    report.append(
        f"load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"cpus: {os.cpu_count()}\n"
    )
    if "batch" in parts:
        n = 2_000 if args.quick else 10_000
        report.append(_table(f"Batch API engine, {n:,} queries", bench_batch(n)))
    if "ray" in parts:
        n = 200 if args.quick else 533
        report.append(_table(f"Ray Data engine vs local engine, {n:,} queries", bench_ray(n)))
    text = "\n".join(report)
    print(text)
    if args.save:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "scaleout.md").write_text(text)


if __name__ == "__main__":
    main()
