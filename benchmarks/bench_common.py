#!/usr/bin/env python
"""Shared helpers of the governance benchmarks: output, data, the simulator process, matchers.

Each ``bench_*.py`` script is one part; ``bench_governance.py`` runs them all. They share one
command line (:func:`main`): ``--quick``, ``--save``, ``--transport``, ``--data``. The
process probes (the simulator in a child process, CPU seconds, load, the client) are the
harness of ``nem-llm bench`` (``nem_llm._jobs.bench.probes``), not copies of it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from nem_llm._jobs.bench import probes
from nem_llm.sim import SimConfig

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
    return probes.process_cpu(pid) or 0.0


def loadavg() -> str:
    """The load averages as one string ("?" where there are none)."""
    loads = probes.load_avg()
    return "?" if loads is None else " ".join(f"{x:.2f}" for x in loads)


class SimProcess(probes.SimProcess):
    """The simulator in its own process with a fixed latency: the harness's, one server."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        super().__init__([SimConfig(latency="fixed", latency_p50=latency, model=SIM_MODEL)])

    @property
    def base_url(self) -> str:
        return str(self.base_urls[0])

    def cpu_seconds(self) -> float:  # type: ignore[override]  # 0.0 where /proc is absent
        return super().cpu_seconds() or 0.0


def make_client(base_url: str, transport: str, timeout: float = 120.0) -> Any:
    """The harness's client: no retries of its own, on the httpx or aiohttp transport."""
    return probes.make_client(base_url, "sim", transport, timeout=timeout)  # type: ignore[arg-type]


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


def llm_matcher(catalog: list[dict[str, Any]], client: Any, concurrency: int, **kwargs: Any) -> Any:
    """Every query goes to the LLM: accept > 1 and novel = 0."""
    from nem_llm import Limits

    return make_matcher(
        catalog,
        client=client,
        model=SIM_MODEL,
        limits=Limits(concurrency=concurrency, timeout=120.0),
        accept_threshold=1.01,
        novel_threshold=0.0,
        **kwargs,
    )


def check_llm_results(results: Sequence[Any], n: int) -> int:
    """How many results are NOT an LLM decision (errors, wrong routing, missing)."""
    bad = sum(1 for r in results if r.decided_by != "llm" or r.status == "error")
    return bad + abs(n - len(results))


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


PartFn = Callable[["Report", argparse.Namespace, list[dict[str, Any]]], None]


def main(
    argv: Sequence[str] | None,
    *,
    description: str,
    parts: dict[str, PartFn],
    result_name: str,
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    special: Callable[[argparse.Namespace], int | None] | None = None,
) -> int:
    """The command line every benchmark script shares: run ``parts``, print, maybe save.

    ``parts`` maps a part number to ``fn(report, args, catalog)``. ``--save`` writes
    ``results/<result_name>.md`` (``<result_name>-quick.md`` with ``--quick``).
    ``special`` may handle the arguments itself (a child process mode) and return a code.
    """
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="smaller N everywhere")
    ap.add_argument(
        "--save",
        action="store_true",
        help=f"write results/{result_name}.md ({result_name}-quick.md with --quick)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="with --save: write here instead (e.g. a run against a patched copy)",
    )
    if len(parts) > 1:
        ap.add_argument("--parts", default=",".join(parts), help="comma-separated parts to run")
    ap.add_argument(
        "--transport",
        choices=("httpx", "aiohttp", "both"),
        default="both",
        help="openai transport(s); 'both' falls back to httpx without aiohttp",
    )
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="shared/data directory")
    if extra is not None:
        extra(ap)
    args = ap.parse_args(argv)
    if special is not None and (code := special(args)) is not None:
        return code

    if args.transport == "both":
        args.transports = ["httpx", "aiohttp"] if aiohttp_available() else ["httpx"]
    elif args.transport == "aiohttp" and not aiohttp_available():
        ap.error('aiohttp transport needs: pip install "openai[aiohttp]"')
    else:
        args.transports = [args.transport]
    chosen = {p.strip() for p in getattr(args, "parts", ",".join(parts)).split(",") if p.strip()}

    started = time.perf_counter()
    rep = Report()
    header(rep, args)
    if args.transport == "both" and args.transports == ["httpx"]:
        rep.out('(aiohttp transport not installed: `pip install "openai[aiohttp]"`)')
        rep.out()
    catalog = load_catalog_rows(args.data, 200)
    for key, fn in parts.items():
        if key in chosen:
            fn(rep, args, catalog)
    code = summary(rep, args, started)
    if args.save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        name = f"{result_name}-quick.md" if args.quick else f"{result_name}.md"
        out = args.out or RESULTS / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(rep.text(), encoding="utf-8")
        print(f"saved {out}", file=sys.stderr)
    return code
