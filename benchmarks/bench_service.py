"""Benchmark the HTTP service (`nem-llm serve`) and `match_frame`; prints a Markdown table.

Three parts (``--parts``), each in its own processes so they do not share a GIL:

1. throughput: the restaurants queries through a server subprocess (as ``nem-llm serve
   --no-access-log`` runs it), ``--clients`` concurrent keep-alive HTTP clients, 1 and 10
   queries per request, retrieval only (no LLM), against the same queries through
   ``match_batch_async`` in-process, in ``--rounds`` rounds. Clients (``--client``):
   ``raw``, a minimal HTTP/1.1 client (pre-encoded requests; it reads the status, the
   headers and the ``Content-Length`` body and parses the JSON), and a pooled ``aiohttp``
   session; they run on the same cores as the server, so their CPU is reported beside.
2. sim: the server with the simulator behind it (lognormal latency, p50 0.5 s; client and
   simulator RPM ``--sim-rpm``): ``--streams`` concurrent ``/v1/match:stream`` requests of
   ``--per-stream`` queries each, every query adjudicated. Checks: no 429, the simulator
   never saw more than RPM/6 requests in any 10 s window (nor RPM in 60 s), every query
   answered exactly once.
3. frame: ``match_frame`` on ``--frame-rows`` rows of a pandas DataFrame vs
   ``match_batch_async`` on a list: wall time and peak RSS growth (each in a fresh process).

The embedder is ``nem_llm.testing.FakeEmbedder`` unless ``--embedder minilm``: with the
real model, encoding would dominate both sides of every comparison and add noise; the
service overhead is what is measured. Run: ``python benchmarks/bench_service.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")
# the same torch threads in every process of the comparison (set before torch is imported)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _data_dir() -> Path:
    for base in (ROOT.parent, ROOT.parent.parent):
        if (base / "shared" / "data" / "restaurants_catalog.jsonl").exists():
            return base / "shared" / "data"
    return ROOT / "tests" / "data"


def _load(data: Path) -> tuple[list[dict[str, Any]], list[str]]:
    catalog = [json.loads(line) for line in (data / "restaurants_catalog.jsonl").open()]
    queries = [json.loads(line)["query"] for line in (data / "restaurants_queries.jsonl").open()]
    return catalog, queries


def _cycle(items: list[str], n: int) -> list[str]:
    return [items[i % len(items)] for i in range(n)]


def _embedder(kind: str) -> Any:
    if kind == "fake":
        from nem_llm.testing import FakeEmbedder

        return FakeEmbedder()
    return None  # the Matcher's default: all-MiniLM-L6-v2


def _batching(args: argparse.Namespace) -> dict[str, Any]:
    """The micro-batcher settings of every Matcher of the run (the Matcher's when unset)."""
    return {"max_batch_size": args.max_batch_size} if args.max_batch_size else {}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux ``/proc``; NaN elsewhere)."""
    from nem_llm._jobs.bench.probes import process_cpu  # after OMP_NUM_THREADS is set

    cpu = process_cpu(pid)
    return float("nan") if cpu is None else cpu


async def _embed_counts(url: str) -> tuple[float, float]:
    """The server's micro-batches and the texts in them so far (from ``/metrics``)."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as r:
        text = await r.text()
    found = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return found["nem_llm_embed_batches_total"], found["nem_llm_embed_texts_total"]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# -- the server subprocess ---------------------------------------------------------------


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from nem_llm import Limits, Matcher
    from nem_llm.integrations.service import ServiceLimits, create_app, server_config

    catalog, _ = _load(Path(args.data))
    kwargs: dict[str, Any] = {"llm": False}
    if args.sim_url:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(base_url=args.sim_url, api_key="sim")
        kwargs = {
            "client": client,
            "model": "nem-llm-sim",
            "limits": Limits(concurrency=64, rpm=args.sim_rpm),
            "accept_threshold": 1.01,  # every query goes to the LLM
            "novel_threshold": 0.0,
        }
    matcher = Matcher(catalog, embedder=_embedder(args.embedder), **_batching(args), **kwargs)
    app = create_app(
        matcher, limits=ServiceLimits(max_queries=10_000), close_matcher=True, tune_gc=True
    )
    # nem-llm serve --no-access-log --log-level warning (--access-log: uvicorn's line per request)
    config = server_config(
        app,
        port=args.serve,
        log_level="info" if args.access_log else "warning",
        access_log=args.access_log,
    )
    config.backlog = 4096
    uvicorn.Server(config).run()


class Server:
    """A server subprocess; ready once /readyz answers 200."""

    def __init__(self, args: argparse.Namespace, sim_url: str | None = None) -> None:
        self.port = _free_port()
        cmd = [sys.executable, __file__, "--serve", str(self.port), "--data", args.data]
        cmd += ["--embedder", args.embedder, "--sim-rpm", str(args.sim_rpm)]
        cmd += ["--max-batch-size", str(args.max_batch_size)]
        cmd += ["--access-log"] if args.access_log else []
        if sim_url:
            cmd += ["--sim-url", sim_url]
        # access-log lines go to /dev/null (written all the same: their cost is measured)
        self.proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL if args.access_log else None)
        self.url = f"http://127.0.0.1:{self.port}"

    async def ready(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError("the server exited")
                try:
                    async with session.get(self.url + "/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


# -- 1. throughput -----------------------------------------------------------------------


class _KeepAlive(asyncio.Protocol):
    """A minimal HTTP/1.1 keep-alive client connection: one request at a time.

    The cheapest honest client: it writes pre-encoded requests and reads the status line,
    the headers and a ``Content-Length`` body (what the service answers), nothing else.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport (uvloop's too)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.waiter is None:
            return
        head = bytes(self.buffer[:end]).lower()
        at = head.find(b"content-length:")
        if at < 0:
            self._fail(ConnectionError("a response without Content-Length"))
            return
        length = int(head[at + 15 : head.find(b"\r\n", at) if b"\r\n" in head[at:] else None])
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4 : end + 4 + length])
        del self.buffer[: end + 4 + length]
        waiter, self.waiter = self.waiter, None
        waiter.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionError(f"connection lost: {exc}"))

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        self.waiter = None

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return await self.waiter


async def _http_run(
    server: Server, queries: list[str], clients: int, per_request: int, kind: str = "raw"
) -> dict[str, Any]:
    """``clients`` concurrent keep-alive clients posting ``per_request`` queries a request."""
    import aiohttp

    url = server.url
    # bodies encoded up front: the client's CPU competes with the server's on 2 cores
    bodies = [
        json.dumps({"query": queries[i : i + per_request] if per_request > 1 else queries[i]})
        for i in range(0, len(queries), per_request)
    ]
    source = iter(bodies)
    latencies: list[float] = []
    errors = 0
    answered = 0

    async def client(post: Callable[[str], Awaitable[tuple[int, bytes]]]) -> None:
        nonlocal errors, answered
        for body in source:
            t = time.perf_counter()
            try:
                status, raw = await post(body)
                data = json.loads(raw)
            except (aiohttp.ClientError, ConnectionError, ValueError):
                errors += 1
                continue
            if status != 200:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t)
            answered += len(data) if isinstance(data, list) else 1

    batches, texts = await _embed_counts(url)
    async with contextlib.AsyncExitStack() as stack:
        if kind == "aiohttp":
            connector = aiohttp.TCPConnector(limit=clients)
            timeout = aiohttp.ClientTimeout(total=300)
            session = await stack.enter_async_context(
                aiohttp.ClientSession(connector=connector, timeout=timeout)
            )
            headers = {"Content-Type": "application/json"}

            async def post_aiohttp(body: str) -> tuple[int, bytes]:
                async with session.post(url + "/v1/match", data=body, headers=headers) as r:
                    return r.status, await r.read()

            posts = [post_aiohttp] * clients
        else:
            loop = asyncio.get_running_loop()
            posts = []
            for _ in range(clients):
                transport, conn = await loop.create_connection(_KeepAlive, "127.0.0.1", server.port)
                stack.callback(transport.close)

                async def post_raw(body: str, conn: _KeepAlive = conn) -> tuple[int, bytes]:
                    data = body.encode()
                    head = (
                        "POST /v1/match HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
                    )
                    return await conn.request(head.encode() + data)

                posts.append(post_raw)
        server_cpu, client_cpu = _cpu_seconds(server.proc.pid), time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(client(post) for post in posts))
        wall = time.perf_counter() - started
        server_cpu = _cpu_seconds(server.proc.pid) - server_cpu
        client_cpu = time.process_time() - client_cpu
    batches_after, texts_after = await _embed_counts(url)
    return {
        "server_cpu_us": 1e6 * server_cpu / max(1, answered),
        "client_cpu_us": 1e6 * client_cpu / max(1, answered),
        "client_share": client_cpu / (client_cpu + server_cpu),
        "batch": (texts_after - texts) / max(1.0, batches_after - batches),
        "queries": answered,
        "requests": len(bodies),
        "wall_s": wall,
        "qps": answered / wall,
        "p50_ms": 1000 * _pct(latencies, 0.5),
        "p95_ms": 1000 * _pct(latencies, 0.95),
        "errors": errors,
    }


async def _in_process(
    args: argparse.Namespace, queries: list[str], batch_size: int = 64
) -> dict[str, Any]:
    """``match_batch_async`` on the queries (``batch_size`` 64: its default)."""
    from nem_llm import Matcher
    from nem_llm.integrations.service import tune_gc

    catalog, _ = _load(Path(args.data))
    async with Matcher(
        catalog, embedder=_embedder(args.embedder), llm=False, **_batching(args)
    ) as m:
        await m.fit_async()
        tune_gc()  # as the server does once its index is built
        await m.match_batch_async(queries[:200])  # warm-up, as the server's
        batcher = m._runtime.batcher if m._runtime is not None else None
        before = (batcher.batches, batcher.items) if batcher is not None else (0, 0)
        cpu, started = time.process_time(), time.perf_counter()
        results = await m.match_batch_async(queries, batch_size=batch_size)
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu
        after = (batcher.batches, batcher.items) if batcher is not None else (0, 0)
    errors = sum(r.status == "error" for r in results)
    return {
        "queries": len(results),
        "wall_s": wall,
        "qps": len(results) / wall,
        "errors": errors,
        "server_cpu_us": 1e6 * cpu / len(results),
        "batch": (after[1] - before[1]) / max(1, after[0] - before[0]),
    }


async def throughput(args: argparse.Namespace) -> list[dict[str, Any]]:
    """``--rounds`` rounds, each: the in-process baseline, then every HTTP run; one more
    in-process run closes the last round. Each HTTP run is compared with the mean of the
    in-process runs just before and after it (the machine is shared: its load moves)."""
    _, base = _load(Path(args.data))
    queries = _cycle(base, args.n)
    local = [await _in_process(args, queries)]
    runs: dict[str, list[dict[str, Any]]] = {}
    server = Server(args)
    try:
        await server.ready()
        await _http_run(server, queries[:400], 50, 1)  # warm-up
        for _ in range(args.rounds):
            for kind in args.client.split(","):
                for per in (1, 10) if kind == "raw" else (1,):
                    res = await _http_run(server, queries, args.clients, per, kind)
                    label = f"HTTP ({kind} client), {args.clients} clients, {per}/request"
                    runs.setdefault(label, []).append(res)
            # the server idles meanwhile (its process waits on its socket)
            local.append(await _in_process(args, queries))
    finally:
        server.stop()
    rows = [_summary("in-process match_batch_async (the baseline)", local)]
    for label, results in runs.items():
        for i, res in enumerate(results):
            res["ratio"] = res["qps"] / ((local[i]["qps"] + local[i + 1]["qps"]) / 2)
        rows.append(_summary(label, results))
    # not in the baseline: as many queries in flight as the HTTP clients (bigger batches)
    wide = await _in_process(args, queries, batch_size=args.clients)
    rows.append(_summary(f"(in-process, batch_size={args.clients})", [wide]))
    return rows


def _summary(name: str, results: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of the runs' figures; the ratios' median, minimum and maximum."""
    out: dict[str, Any] = {"name": name, "runs": len(results)}
    for key in results[0]:
        if isinstance(results[0][key], int | float):
            out[key] = statistics.median(r[key] for r in results)
    if "ratio" in results[0]:
        ratios = [r["ratio"] for r in results]
        out["ratio_min"], out["ratio_max"] = min(ratios), max(ratios)
    out["errors"] = sum(r["errors"] for r in results)
    return out


# -- 2. simulator behind the server ------------------------------------------------------


async def _stream_clients(url: str, queries: list[str], streams: int, per: int) -> dict[str, Any]:
    import aiohttp

    lines_ok = 0
    bad_streams = 0
    errors = 0
    statuses: dict[str, int] = {}
    latencies: list[float] = []

    async def one(session: aiohttp.ClientSession, chunk: list[str]) -> None:
        nonlocal lines_ok, bad_streams, errors
        seen: list[int] = []
        started = time.perf_counter()
        try:
            async with session.post(url + "/v1/match:stream", json={"queries": chunk}) as r:
                if r.status != 200:
                    bad_streams += 1
                    return
                async for raw in r.content:
                    if not raw.strip():
                        continue
                    item = json.loads(raw)
                    seen.append(item["index"])
                    statuses[item["status"]] = statuses.get(item["status"], 0) + 1
                    latencies.append(time.perf_counter() - started)
        except aiohttp.ClientError:
            errors += 1
            return
        if sorted(seen) == list(range(len(chunk))):
            lines_ok += len(seen)
        else:
            bad_streams += 1

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t = time.perf_counter()
        chunks = [queries[i * per : (i + 1) * per] for i in range(streams)]
        await asyncio.gather(*(one(session, c) for c in chunks))
        wall = time.perf_counter() - t
    return {
        "answered": lines_ok,
        "bad_streams": bad_streams,
        "errors": errors,
        "statuses": statuses,
        "wall_s": wall,
        "p50_s": _pct(latencies, 0.5),
        "p95_s": _pct(latencies, 0.95),
    }


async def sim_part(args: argparse.Namespace) -> dict[str, Any]:
    from nem_llm.sim import SimConfig, max_in_window, run_simulator

    _, base = _load(Path(args.data))
    total = args.streams * args.per_stream
    queries = _cycle(base, total)
    config = SimConfig(latency="lognormal", latency_p50=0.5, latency_p99=2.0, rpm=args.sim_rpm)
    with run_simulator(config) as sim:
        server = Server(args, sim_url=sim.base_url)
        try:
            await server.ready()
            res = await _stream_clients(server.url, queries, args.streams, args.per_stream)
        finally:
            server.stop()
        arrivals = [r.arrival for r in sim.requests]
        stats = sim.stats()
    return {
        **res,
        "queries": total,
        "sim_requests": len(arrivals),
        "sim_429": stats["rate_limited"],
        "max_in_60s": max_in_window(arrivals, 60.0),
        "max_in_10s": max_in_window(arrivals, 10.0),
        "rpm": args.sim_rpm,
    }


# -- 3. match_frame vs match_batch_async -------------------------------------------------


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _frame_child(args: argparse.Namespace) -> None:
    import pandas as pd

    from nem_llm import Matcher

    catalog, base = _load(Path(args.data))
    queries = _cycle(base, args.frame_rows)
    frame = pd.DataFrame({"name": queries}) if args.frame_child == "frame" else None

    async def main() -> dict[str, Any]:
        async with Matcher(catalog, embedder=_embedder(args.embedder), llm=False) as m:
            await m.fit_async()
            await m.match_batch_async(base[:100])
            before = _rss_mb()
            t = time.perf_counter()
            if frame is not None:
                from nem_llm.integrations.frames import match_frame_async

                out = await match_frame_async(m, frame)
                n = len(out)
            else:
                results = await m.match_batch_async(queries)
                n = len(results)
            wall = time.perf_counter() - t
            return {"rows": n, "wall_s": wall, "peak_rss_growth_mb": _rss_mb() - before}

    print(json.dumps(asyncio.run(main())))


def frame_part(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for mode in ("list", "frame"):
        cmd = [sys.executable, __file__, "--frame-child", mode, "--data", args.data]
        cmd += ["--frame-rows", str(args.frame_rows), "--embedder", args.embedder]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        name = "match_batch_async(list)" if mode == "list" else "match_frame_async(pandas)"
        rows.append({"name": name, **json.loads(out.stdout.strip().splitlines()[-1])})
    return rows


# -- report ------------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    out = [f"load average at start: {report['load']}", ""]
    if "throughput" in report:
        rows = report["throughput"]
        base = rows[0]["qps"]
        out += [
            "| run | runs | queries | queries/s | vs in-process (min-max) | p50 ms | p95 ms "
            "| errors | server CPU us/query | client CPU us/query | client CPU share "
            "| mean batch |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        nan = float("nan")
        for r in rows:
            ratio = f"{r.get('ratio', r['qps'] / base):.2f}x"
            if "ratio_min" in r:
                ratio += f" ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})"
            out.append(
                f"| {r['name']} | {r['runs']} | {r['queries']:.0f} | {r['qps']:.0f} | "
                f"{ratio} | {r.get('p50_ms', nan):.1f} | "
                f"{r.get('p95_ms', nan):.1f} | {r['errors']} | {r['server_cpu_us']:.0f} | "
                f"{r.get('client_cpu_us', nan):.0f} | {r.get('client_share', nan):.0%} | "
                f"{r['batch']:.1f} |"
            )
        out.append("")
    if "sim" in report:
        s = report["sim"]
        out += [
            "| check | value |",
            "|---|---|",
            f"| streamed queries (streams x queries) | {s['queries']} |",
            f"| answered exactly once | {s['answered']} |",
            f"| bad streams / client errors | {s['bad_streams']} / {s['errors']} |",
            f"| statuses | {s['statuses']} |",
            f"| simulator requests | {s['sim_requests']} |",
            f"| 429s | {s['sim_429']} |",
            f"| max requests in any 10 s (RPM/6 = {s['rpm'] / 6:.0f}) | {s['max_in_10s']} |",
            f"| max requests in any 60 s (RPM = {s['rpm']:.0f}) | {s['max_in_60s']} |",
            f"| wall | {s['wall_s']:.1f} s |",
            f"| per-line latency p50 / p95 | {s['p50_s']:.2f} / {s['p95_s']:.2f} s |",
            "",
        ]
    if "frame" in report:
        out += ["| run | rows | wall s | peak RSS growth MB |", "|---|---|---|---|"]
        for r in report["frame"]:
            out.append(
                f"| {r['name']} | {r['rows']} | {r['wall_s']:.1f} | {r['peak_rss_growth_mb']:.0f} |"
            )
    return "\n".join(out)


def _run(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` on uvloop when installed (the server's loop: the same on both sides)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(work)
    return uvloop.run(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="throughput,sim,frame")
    parser.add_argument("--data", default=str(_data_dir()))
    parser.add_argument("--embedder", choices=["fake", "minilm"], default="fake")
    parser.add_argument("--n", type=int, default=4000, help="queries of the throughput runs")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the throughput runs")
    parser.add_argument(
        "--client",
        default="raw,aiohttp",
        help="HTTP clients to run: raw (a minimal keep-alive client), aiohttp, or both",
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=0, help="the Matcher's micro-batch cap (both sides)"
    )
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--per-stream", type=int, default=10)
    parser.add_argument("--sim-rpm", type=float, default=1500.0)
    parser.add_argument("--frame-rows", type=int, default=100_000)
    parser.add_argument(
        "--access-log", action="store_true", help="the server logs a line per request"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--sim-url", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--frame-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        _serve(args)
        return
    if args.frame_child is not None:
        _frame_child(args)
        return
    parts = set(args.parts.split(","))
    report: dict[str, Any] = {"load": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    report["args"] = {k: v for k, v in vars(args).items() if k not in ("json",)}
    if "throughput" in parts:
        report["throughput"] = _run(throughput(args))
    if "sim" in parts:
        report["sim"] = _run(sim_part(args))
    if "frame" in parts:
        report["frame"] = frame_part(args)
    text = render(report)
    print(text)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str), encoding="utf-8")


if __name__ == "__main__":
    main()
