#!/usr/bin/env python
"""Governance benchmarks for nem_llm: strategies, per-call overhead, micro-batching, memory.

Runs offline. The LLM is the nem_llm simulator (``nem_llm.sim``) started in a separate
PROCESS, so its CPU never competes with the client's event loop for the GIL.

    python benchmarks/bench_governance.py            # full run (~5 minutes on 2 cores)
    python benchmarks/bench_governance.py --quick    # smaller N (~1.5 minutes)
    python benchmarks/bench_governance.py --save     # also write benchmarks/results/governance.md
    python benchmarks/bench_governance.py --parts 1,3 --transport httpx

Parts (targets in brackets; see benchmarks/README.md):

1. Strategy efficiency: makespan of gather / as_completed / sequential against a fake LLM
   with fixed latency L [makespan <= 1.10 x max(ceil(N/C) * L, N / rate)].
2. Governance overhead: client CPU per LLM call, the full Matcher path vs the raw openai
   client (and raw + instructor alone) at L=0 [ours <= 2.0 x raw]; a cProfile breakdown;
   and the transport (httpx vs aiohttp) throughput at several concurrencies.
3. Micro-batching with the real MiniLM embedder: 512 concurrent ``match_async`` calls,
   batched vs ``batching=False`` vs one big ``encode`` [>= 4x unbatched, >= 0.7x big encode].
4. Memory: 100k queries through ``match_stream_async`` (consumed and dropped) in a fresh
   child process [peak RSS growth over the built matcher < 300 MB]; ``match_batch_async``
   (returns the full list) for contrast.

Timings on a shared 2-core machine are noisy: every comparison is a ratio of numbers
measured side by side in one run. Never assert these timings in tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import datetime as _dt
import gc
import inspect
import io
import json
import math
import os
import platform
import pstats
import resource
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data"
SIM_MODEL = "nem-llm-sim"

# the benchmarks decide themselves whether a Matcher has an LLM client
for _var in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
    os.environ.pop(_var, None)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ----------------------------------------------------------------------------- output


class Report:
    """Prints markdown as it goes and keeps it for ``--save``."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.checks: list[tuple[str, str, str, bool | None]] = []

    def out(self, text: str = "") -> None:
        print(text, flush=True)
        self.lines.append(text)

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.out("| " + " | ".join(headers) + " |")
        self.out("|" + "|".join("---" for _ in headers) + "|")
        for row in rows:
            self.out("| " + " | ".join(_fmt(v) for v in row) + " |")
        self.out()

    def check(self, name: str, target: str, measured: str, ok: bool | None) -> None:
        self.checks.append((name, target, measured, ok))

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
    if value is None:
        return "-"
    return str(value)


def log(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def verdict(ok: bool | None) -> str:
    return "PASS" if ok else ("n/a" if ok is None else "FAIL")


# ----------------------------------------------------------------------------- data


def _read_jsonl(path: Path, key: str, limit: int | None = None) -> list[Any]:
    out = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            out.append(row if key == "*" else row[key])
            if limit is not None and len(out) >= limit:
                break
    return out


def load_catalog_rows(data: Path, n: int) -> list[dict[str, Any]]:
    path = data / "languages_catalog.jsonl"
    if path.exists():
        rows = _read_jsonl(path, "*", n)
        return [{"id": r["id"], "name": r["name"], "aliases": r.get("aliases") or []} for r in rows]
    return [{"id": f"E{i:05d}", "name": f"Entity number {i}", "aliases": []} for i in range(n)]


def load_queries(data: Path, n: int) -> list[str]:
    """``n`` distinct realistic queries (the languages dataset), else generated strings."""
    path = data / "languages_queries.jsonl"
    seen: dict[str, None] = {}
    if path.exists():
        for q in _read_jsonl(path, "query"):
            if q.strip():
                seen.setdefault(q, None)
            if len(seen) >= n:
                break
    base = list(seen) or [f"entity named {i}" for i in range(100)]
    out = list(seen)
    i = 0
    while len(out) < n:  # distinct continuation if the file is short or absent
        out.append(f"{base[i % len(base)]} #{i}")
        i += 1
    return out[:n]


def query_stream(base: Sequence[str], n: int) -> Iterator[str]:
    """``n`` distinct queries, made lazily (no list of n strings in memory)."""
    m = len(base)
    for i in range(n):
        yield f"{base[i % m]} #{i}" if i >= m else base[i]


# ----------------------------------------------------------------------------- processes


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of another process (Linux /proc), 0.0 elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


class SimProcess:
    """The simulator in its own process: ``serve_forever`` with a fixed latency."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.proc: subprocess.Popen[str] | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def cpu_seconds(self) -> float:
        return proc_cpu_seconds(self.proc.pid) if self.proc else 0.0

    def __enter__(self) -> SimProcess:
        code = (
            "from nem_llm.sim import SimConfig, serve_forever\n"
            f"cfg = SimConfig(latency='fixed', latency_p50={self.latency!r}, model={SIM_MODEL!r})\n"
            "serve_forever(cfg, '127.0.0.1', 0, on_ready=lambda s: print(s.port, flush=True))\n"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=str(ROOT)
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip():
            self.__exit__()
            raise RuntimeError("the simulator process did not start")
        self.port = int(line)
        deadline = time.monotonic() + 30
        while True:  # ready when GET /v1/models answers
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.__exit__()
                raise RuntimeError("the simulator did not answer GET /v1/models")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        self.proc.terminate()  # serve_forever stops cleanly on SIGTERM
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def make_client(base_url: str, transport: str, timeout: float = 120.0) -> Any:
    from openai import AsyncOpenAI

    kwargs: dict[str, Any] = {}
    if transport == "aiohttp":
        from openai import DefaultAioHttpClient

        kwargs["http_client"] = DefaultAioHttpClient(timeout=timeout)
    return AsyncOpenAI(base_url=base_url, api_key="sim", max_retries=0, timeout=timeout, **kwargs)


def aiohttp_available() -> bool:
    try:
        import httpx_aiohttp  # noqa: F401
        from openai import DefaultAioHttpClient  # noqa: F401
    except ImportError:
        return False
    return True


async def pool(n_workers: int, items: Sequence[Any], fn: Callable[[Any], Awaitable[Any]]) -> list:
    """Run ``fn`` on every item with ``n_workers`` tasks (the raw-client baseline)."""
    it = iter(items)
    out: list[Any] = []

    async def work() -> None:
        for item in it:
            out.append(await fn(item))

    await asyncio.gather(*(work() for _ in range(n_workers)))
    return out


# ----------------------------------------------------------------------------- matcher


def make_matcher(catalog: list[dict[str, Any]], **kwargs: Any) -> Any:
    from nem_llm import Matcher
    from nem_llm.testing import FakeEmbedder

    kwargs.setdefault("embedder", FakeEmbedder())
    return Matcher(catalog, **kwargs)


def llm_matcher(catalog: list[dict[str, Any]], client: Any, concurrency: int) -> Any:
    """Every query goes to the LLM: accept > 1 and novel = 0."""
    from nem_llm import Limits

    return make_matcher(
        catalog,
        client=client,
        model=SIM_MODEL,
        limits=Limits(concurrency=concurrency, timeout=120.0),
        accept_threshold=1.01,
        novel_threshold=0.0,
    )


def check_llm_results(results: Sequence[Any], n: int) -> int:
    """How many results are NOT an LLM decision (errors, wrong routing, missing)."""
    bad = sum(1 for r in results if r.decided_by != "llm" or r.status == "error")
    return bad + abs(n - len(results))


# ----------------------------------------------------------------------------- part 1


@dataclass
class StrategyRun:
    strategy: str
    transport: str
    n: int
    c: int
    latency: float
    makespan: float = 0.0
    cpu: float = 0.0
    bad: int = 0

    @property
    def bound(self) -> float:
        if self.strategy == "sequential":
            return self.n * self.latency
        return math.ceil(self.n / self.c) * self.latency  # no rate limit: N / rate = 0

    @property
    def ratio(self) -> float:
        return self.makespan / self.bound


async def _strategy_case(run: StrategyRun, base_url: str, catalog: list, queries: list) -> None:
    client = make_client(base_url, run.transport)
    matcher = llm_matcher(catalog, client, run.c)
    try:
        await matcher.fit_async()
        await matcher.match_async("warm-up query")  # lazy imports, first connection
        gc.collect()
        cpu0, t0 = time.process_time(), time.perf_counter()
        results = await matcher.match_batch_async(queries, strategy=run.strategy)
        run.makespan = time.perf_counter() - t0
        run.cpu = time.process_time() - cpu0
        run.bad = check_llm_results(results, run.n)
    finally:
        await matcher.aclose()
        await client.close()


def part_strategies(rep: Report, args: argparse.Namespace, catalog: list) -> None:
    L, C = 1.0, 50
    n = 200 if args.quick else 1000
    n_seq = 10 if args.quick else 30
    rep.out("## 1. Strategy efficiency (fake LLM, fixed latency, simulator in its own process)")
    rep.out()
    rep.out(
        f"N={n} (sequential: N={n_seq}), concurrency C={C}, latency L={L:g} s, no rate limit: "
        f"bound = ceil(N/C)*L (sequential: N*L). `Matcher.match_batch_async(strategy=...)`, "
        "accept_threshold=1.01 and novel_threshold=0 (every query goes to the LLM), "
        "FakeEmbedder, catalog of "
        f"{len(catalog)} rows, distinct queries. Target: makespan <= 1.10 x bound."
    )
    rep.out()
    runs: list[StrategyRun] = []
    with SimProcess(L) as sim:
        for transport in args.transports:
            for strategy in ("gather", "as_completed"):
                runs.append(StrategyRun(strategy, transport, n, C, L))
        runs.append(StrategyRun("sequential", args.transports[0], n_seq, 1, L))
        for run in runs:
            log(f"part 1: {run.strategy} / {run.transport}, N={run.n}")
            queries = load_queries(args.data, run.n)
            asyncio.run(_strategy_case(run, sim.base_url, catalog, queries))
    rows = []
    for run in runs:
        rows.append(
            [
                run.strategy,
                run.transport,
                run.n,
                run.c if run.strategy != "sequential" else 1,
                f"{run.makespan:.2f}",
                f"{run.bound:.0f}",
                f"{run.ratio:.3f}",
                f"{run.n / run.makespan:.1f}",
                f"{1000 * run.cpu / run.n:.2f}",
                f"{100 * run.cpu / run.makespan:.0f}%",
                run.bad,
                verdict(run.ratio <= 1.10 and run.bad == 0),
            ]
        )
        rep.check(
            f"1. {run.strategy} makespan ({run.transport}, N={run.n})",
            "<= 1.10 x bound, 0 errors",
            f"{run.ratio:.3f} x ({run.makespan:.2f} s / {run.bound:.0f} s), {run.bad} errors",
            run.ratio <= 1.10 and run.bad == 0,
        )
    rep.table(
        [
            "strategy",
            "transport",
            "N",
            "C",
            "makespan s",
            "bound s",
            "ratio",
            "req/s",
            "client CPU ms/query",
            "client CPU",
            "errors",
            "<= 1.10x",
        ],
        rows,
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

    from nem_llm.llm.adjudication import render_messages
    from nem_llm.text import validate_query

    matcher = make_matcher(catalog, accept_threshold=0.0, margin=0.0)  # no LLM
    await matcher.fit_async()
    results = await matcher.match_batch_async(queries)
    msgs, ids, raw = [], [], []
    for q, r in zip(queries, results, strict=True):
        m = render_messages(validate_query(q), r.candidates, matcher.catalog)
        t = tuple(c.id for c in r.candidates)
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
    from nem_llm.llm.adjudication import choice_model

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
    from nem_llm.llm.adjudication import choice_model

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
    bad: int = 0

    @property
    def cpu_ms(self) -> float:
        return 1000 * min(self.cpu) / self.n

    @property
    def server_ms(self) -> float:
        return 1000 * statistics.median(self.server_cpu) / self.n if self.server_cpu else 0.0

    @property
    def rate(self) -> float:
        return self.n / statistics.median(self.wall)


FULL = "matcher (full)"
WARM = "matcher (full), warm response-model cache"
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
    from nem_llm.llm.adjudication import Adjudicator, estimate_tokens
    from nem_llm.llm.governor import Governor

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
            paced = "pace" in inspect.signature(adj.decide).parameters
            extra: dict[str, Any] = {"pace": gov.pace} if paced else {}

            async def one(i: int) -> Any:
                m = prep.messages[i]
                return await gov.call(
                    lambda: adj.decide(m, prep.ids[i], request_timeout=120.0, **extra),
                    estimated_tokens=estimate_tokens(m),
                    usage_of=lambda d: d.usage,
                )

            def ok(r: Any) -> bool:
                return r.value.entity_id is not None

        else:  # the Matcher paths
            if case == "matcher, no LLM":
                matcher = make_matcher(catalog, accept_threshold=0.0, margin=0.0)
            else:
                matcher = llm_matcher(catalog, client, concurrency)
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
        return cpu, wall, server, bad
    finally:
        if matcher is not None:
            await matcher.aclose()
        await client.close()


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
        "minimum taken. Client CPU = `time.process_time()` of this process over the timed "
        "run (all its threads, the embedding thread included); the simulator's CPU is "
        "measured apart from /proc. Every case sends the same messages and tools payload "
        "(the raw case sends instructor's Mode.TOOLS kwargs, precomputed). Response-model "
        "and tool-schema caches are cleared before each timed run (distinct queries have "
        "distinct candidate lists, as on a real catalog). "
        "Target: matcher (full) <= 2.0 x raw."
    )
    rep.out()
    rep.table(["case", "what runs per call"], [[c, CASE_NOTES[c]] for c in CASES])
    queries = load_queries(args.data, n + warm)
    prep = asyncio.run(_prepare(catalog, queries, warm=warm))
    runs: dict[tuple[str, str], OverheadRun] = {}
    with SimProcess(0.0) as sim:
        for rnd in range(rounds):
            for transport in args.transports:
                for case in CASES:
                    if case == "matcher, no LLM" and transport != args.transports[0]:
                        continue
                    log(f"part 2: round {rnd + 1}, {case} / {transport}")
                    run = runs.setdefault((case, transport), OverheadRun(case, transport, n))
                    cpu, wall, server, bad = asyncio.run(
                        _overhead_case(case, transport, sim.base_url, catalog, prep, conc, sim)
                    )
                    run.cpu.append(cpu)
                    run.wall.append(wall)
                    run.server_cpu.append(server)
                    run.bad += bad
        rows = []
        for transport in args.transports:
            raw = runs[("raw", transport)]
            for case in CASES:
                run = runs.get((case, transport))
                if run is None:
                    continue
                rows.append(
                    [
                        case,
                        transport,
                        f"{run.cpu_ms:.2f}",
                        f"{run.cpu_ms / raw.cpu_ms:.2f}",
                        f"{run.rate:.0f}",
                        f"{run.server_ms:.2f}",
                        run.bad,
                    ]
                )
            full = runs[(FULL, transport)]
            ratio = full.cpu_ms / raw.cpu_ms
            rep.check(
                f"2. client CPU per LLM call, matcher vs raw openai ({transport})",
                "<= 2.0 x raw",
                f"{ratio:.2f} x ({full.cpu_ms:.2f} vs {raw.cpu_ms:.2f} ms/call)",
                ratio <= 2.0 and full.bad == 0,
            )
        rep.table(
            [
                "case",
                "transport",
                "client CPU ms/call",
                "x raw",
                "calls/s (wall)",
                "simulator CPU ms/call",
                "bad results",
            ],
            rows,
        )
        for transport in args.transports:
            r = {c: runs[(c, transport)].cpu_ms for c in CASES if (c, transport) in runs}
            no_llm = runs[("matcher, no LLM", args.transports[0])].cpu_ms
            warm_full = r[WARM]
            rep.out(
                f"Layers ({transport}, ms of client CPU per call): openai client "
                f"{r['raw']:.2f}; instructor adds {r['raw+instructor'] - r['raw']:.2f}; "
                f"response-model builds (cold - warm cache) "
                f"{r[FULL] - warm_full:.2f}; retrieval + result assembly (no-LLM path) "
                f"{no_llm:.2f}; the rest of our path (governor, adjudicator, prompt, routing, "
                f"strategies, stats) {warm_full - no_llm - r['raw+instructor']:.2f}."
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
        for c in (1, 16, 50, 128):
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


# ----------------------------------------------------------------------------- part 3


def _batches(matcher: Any) -> int:
    """Encoder batches so far (a private counter: 0 if the internals moved)."""
    runtime = getattr(matcher, "_runtime", None)
    return int(getattr(getattr(runtime, "batcher", None), "batches", 0) or 0)


def part_microbatch(rep: Report, args: argparse.Namespace) -> None:
    from nem_llm import Matcher
    from nem_llm.retrieval.embedding import SentenceTransformerEmbedder
    from nem_llm.text import validate_query

    n = 512
    rounds = 1 if args.quick else 3
    catalog = load_catalog_rows(args.data, 300)
    texts = load_queries(args.data, n)
    rep.out("## 3. Micro-batching with the real MiniLM embedder (no LLM)")
    rep.out()
    rep.out(
        f"{n} concurrent `matcher.match_async(q)` calls (asyncio.gather), distinct queries "
        f"from languages_queries.jsonl, catalog of {len(catalog)} rows, no client, "
        "accept_threshold=0 and margin=0 (no LLM). Default micro-batcher (max_batch_size=64, "
        "max_wait=5 ms) vs `Matcher(..., batching=False)` vs one `embedder.encode(texts)` of "
        f"the same {n} texts (encode only: no search). Model loaded and warmed before timing; "
        f"{rounds} interleaved round(s), median. "
        "Targets: batched >= 4x unbatched, batched >= 0.7x one big encode."
    )
    rep.out()
    embedder = SentenceTransformerEmbedder()
    log("part 3: loading MiniLM")
    embedder.encode(["warm-up text"] * 64)

    async def main() -> dict[str, list[float]]:
        batched = Matcher(catalog, embedder=embedder, accept_threshold=0.0, margin=0.0)
        unbatched = Matcher(
            catalog, embedder=embedder, accept_threshold=0.0, margin=0.0, batching=False
        )
        await batched.fit_async()
        await unbatched.fit_async()
        times: dict[str, list[float]] = defaultdict(list)
        normalized = [validate_query(t) for t in texts]
        errors = 0
        try:
            for m in (batched, unbatched):  # warm both paths
                await asyncio.gather(*(m.match_async(t) for t in texts[:64]))
            for rnd in range(rounds):
                log(f"part 3: round {rnd + 1}")
                t0 = time.perf_counter()
                vecs = embedder.encode(texts)
                times["big encode"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                batched.index.search(vecs, normalized, batched.top_k)
                times["search"].append(time.perf_counter() - t0)
                for name, m in (("batched", batched), ("unbatched", unbatched)):
                    b0 = _batches(m)
                    t0 = time.perf_counter()
                    res = await asyncio.gather(*(m.match_async(t) for t in texts))
                    times[name].append(time.perf_counter() - t0)
                    errors += sum(1 for r in res if r.status == "error")
                    times[name + " batches"].append(float(_batches(m) - b0))
            times["errors"] = [float(errors)]
        finally:
            await batched.aclose()
            await unbatched.aclose()
        return times

    times = asyncio.run(main())
    times["big encode + search"] = [
        a + b for a, b in zip(times["big encode"], times["search"], strict=True)
    ]
    tput = {
        k: n / statistics.median(v)
        for k, v in times.items()
        if k in ("batched", "unbatched", "big encode", "big encode + search")
    }
    rows = []
    for name, desc in (
        ("batched", "match_async x512, micro-batched (default)"),
        ("unbatched", "match_async x512, batching=False"),
        ("big encode", "embedder.encode(512 texts), one call  (target baseline)"),
        ("big encode + search", "one encode + one index.search (no event loop; for reference)"),
    ):
        batches = times.get(name + " batches")
        rows.append(
            [
                desc,
                f"{statistics.median(times[name]):.3f}",
                f"{tput[name]:.0f}",
                f"{tput['batched'] / tput[name]:.2f}",
                f"{statistics.median(batches):.0f}" if batches else "-",
            ]
        )
    rep.table(["path", "wall s (median)", "texts/s", "batched / this", "encoder batches"], rows)
    x_unb = tput["batched"] / tput["unbatched"]
    x_big = tput["batched"] / tput["big encode"]
    errs = int(times["errors"][0])
    rep.check("3. micro-batching vs unbatched", ">= 4x", f"{x_unb:.2f}x", x_unb >= 4 and not errs)
    rep.check("3. micro-batching vs one big encode", ">= 0.7x", f"{x_big:.2f}x", x_big >= 0.7)


# ----------------------------------------------------------------------------- part 4


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset VmHWM (Linux >= 4.0: write 5 to clear_refs) so the peak is this run's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def memory_child(mode: str, n: int, data: Path) -> dict[str, Any]:
    """Runs in a fresh process: peak RSS of streaming (or batching) ``n`` queries."""
    catalog = load_catalog_rows(data, 300)
    base = load_queries(data, 5000)

    async def main() -> dict[str, Any]:
        matcher = make_matcher(catalog, accept_threshold=0.0, margin=0.0)  # no LLM
        await matcher.fit_async()
        await matcher.match_batch_async(base[:256])  # warm: imports, the batcher, the pool
        gc.collect()
        baseline_kb = _status_kb("VmRSS") or 0
        maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        reset = _reset_peak()
        t0 = time.perf_counter()
        count = 0
        if mode == "stream":
            async for _r in matcher.match_stream_async(
                query_stream(base, n), strategy="as_completed"
            ):
                count += 1  # consume and drop
        else:
            results = await matcher.match_batch_async(query_stream(base, n))
            count = len(results)
        wall = time.perf_counter() - t0
        end_kb = _status_kb("VmRSS") or 0
        hwm_kb = _status_kb("VmHWM") if reset else None
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        await matcher.aclose()
        peak_kb = hwm_kb if hwm_kb is not None else maxrss
        return {
            "mode": mode,
            "n": n,
            "count": count,
            "wall_s": wall,
            "baseline_mb": baseline_kb / 1024,
            "peak_mb": peak_kb / 1024,
            "end_mb": end_kb / 1024,
            "growth_mb": (peak_kb - baseline_kb) / 1024,
            "peak_reset": reset,
            "maxrss_before_mb": maxrss_before / 1024,
        }

    return asyncio.run(main())


def part_memory(rep: Report, args: argparse.Namespace) -> None:
    n = 20_000 if args.quick else 100_000
    rep.out("## 4. Memory: streaming vs returning the full list (no LLM, FakeEmbedder)")
    rep.out()
    rep.out(
        f"{n:,} distinct queries from a lazy generator, catalog of 300 rows, no LLM "
        "(accept_threshold=0, margin=0), each mode in a fresh child process. Baseline = RSS "
        "after building the matcher's index and a warm-up; peak = VmHWM reset just before the "
        "run (falls back to ru_maxrss). Target: streaming peak RSS growth < 300 MB."
    )
    rep.out()
    rows = []
    got = {}
    for mode in ("stream", "batch"):
        log(f"part 4: {mode}, N={n:,} (child process)")
        proc = subprocess.run(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--memory-child",
                mode,
                "--memory-n",
                str(n),
                "--data",
                str(args.data),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            rep.out(f"memory child {mode} failed:\n```\n{proc.stderr[-2000:]}\n```")
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        got[mode] = res
        api = (
            "match_stream_async(as_completed), consume+drop"
            if mode == "stream"
            else "match_batch_async (full list kept)"
        )
        rows.append(
            [
                api,
                f"{res['count']:,}",
                f"{res['wall_s']:.1f}",
                f"{res['count'] / res['wall_s']:.0f}",
                f"{res['baseline_mb']:.0f}",
                f"{res['peak_mb']:.0f}",
                f"{res['growth_mb']:.1f}",
                f"{1024 * 1024 * res['growth_mb'] / max(res['count'], 1):.0f}",
            ]
        )
    rep.table(
        [
            "API",
            "results",
            "wall s",
            "queries/s",
            "baseline RSS MB",
            "peak RSS MB",
            "growth MB",
            "bytes/query",
        ],
        rows,
    )
    s = got.get("stream")
    if s is None:
        rep.check("4. streaming peak RSS growth", "< 300 MB", "child failed", False)
    else:
        ok = s["growth_mb"] < 300 and s["count"] == n
        rep.check(
            f"4. streaming peak RSS growth (N={n:,})",
            "< 300 MB",
            f"{s['growth_mb']:.1f} MB ({s['count']:,} results)",
            ok,
        )


# ----------------------------------------------------------------------------- main


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info

        pools = [f"{p['internal_api']} x{p['num_threads']}" for p in threadpool_info()]
    except Exception:  # threadpoolctl is optional (sklearn brings it)
        return ""
    return f"Native thread pools: {', '.join(pools) or 'none loaded'}."


def header(rep: Report, args: argparse.Namespace) -> None:
    def ver(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "absent"

    rep.out(f"# nem_llm governance benchmarks{' (QUICK)' if args.quick else ''}")
    rep.out()
    import nem_llm

    rep.out(
        f"nem_llm imported from `{Path(nem_llm.__file__).parent}`; "
        f"`{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`."
    )
    rep.out()
    rep.out(
        f"{_dt.datetime.now().isoformat(timespec='seconds')}, Python {platform.python_version()}"
        f", {os.cpu_count()} CPUs, load average at start {loadavg()}; "
        + ", ".join(
            f"{p} {ver(p)}"
            for p in (
                "nem_llm",
                "openai",
                "instructor",
                "httpx",
                "httpx-aiohttp",
                "aiohttp",
                "pydantic",
                "torch",
                "sentence-transformers",
            )
        )
        + f". Transports: {', '.join(args.transports)}."
    )
    rep.out()
    rep.out(
        "Shared 2-core machine: absolute timings move with other jobs; read the ratios "
        "(measured side by side in this run)."
    )
    rep.out()


def summary(rep: Report, args: argparse.Namespace, started: float) -> int:
    rep.out("## Summary against targets")
    rep.out()
    rep.table(
        ["check", "target", "measured", "result"],
        [[name, target, measured, verdict(ok)] for name, target, measured, ok in rep.checks],
    )
    failed = [c for c in rep.checks if c[3] is False]
    if info := blas_info():
        rep.out(f"{info} (numpy's OpenBLAS and torch's OpenMP each size to the core count.)")
        rep.out()
    rep.out(
        f"{len(rep.checks) - len(failed)} passed, {len(failed)} failed; "
        f"total {time.perf_counter() - started:.0f} s, load average at end {loadavg()}."
    )
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller N everywhere")
    ap.add_argument(
        "--save",
        action="store_true",
        help="write results/governance.md (governance-quick.md with --quick)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="with --save: write here instead (e.g. a run against a patched copy)",
    )
    ap.add_argument("--parts", default="1,2,3,4", help="comma-separated parts to run")
    ap.add_argument(
        "--transport",
        choices=("httpx", "aiohttp", "both"),
        default="both",
        help="openai transport(s); 'both' falls back to httpx without aiohttp",
    )
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared/data directory")
    ap.add_argument("--profile-out", default=None, help="dump part 2's pstats here")
    ap.add_argument("--memory-child", choices=("stream", "batch"), help=argparse.SUPPRESS)
    ap.add_argument("--memory-n", type=int, default=100_000, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, args.memory_n, args.data)))
        return 0

    if args.transport == "both":
        args.transports = ["httpx", "aiohttp"] if aiohttp_available() else ["httpx"]
    elif args.transport == "aiohttp" and not aiohttp_available():
        ap.error('aiohttp transport needs: pip install "openai[aiohttp]"')
    else:
        args.transports = [args.transport]
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}

    started = time.perf_counter()
    rep = Report()
    header(rep, args)
    if args.transport == "both" and args.transports == ["httpx"]:
        rep.out('(aiohttp transport not installed: `pip install "openai[aiohttp]"`)')
        rep.out()
    catalog = load_catalog_rows(args.data, 200)
    if "1" in parts:
        part_strategies(rep, args, catalog)
    if "2" in parts:
        part_overhead(rep, args, catalog)
    if "3" in parts:
        part_microbatch(rep, args)
    if "4" in parts:
        part_memory(rep, args)
    code = summary(rep, args, started)
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = args.out or RESULTS / ("governance-quick.md" if args.quick else "governance.md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(rep.text(), encoding="utf-8")
        print(f"saved {out}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
