"""Tests of the strategy benchmark (nem_llm._jobs.bench) and the fault soak (nem_llm._jobs.soak)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from openai import OpenAI

from nem_llm._jobs.bench import (
    DEFAULT_SCENARIOS,
    BenchConfig,
    BenchReport,
    BenchRow,
    bound_ratio,
    ideal_makespan,
    make_catalog,
    make_queries,
    mean_latency,
    parse_scenario,
    read_json,
    render_table,
    resolve_rpm,
    run_bench,
    simulated_latencies,
    theoretical_bound,
    write_json,
    write_plot,
)
from nem_llm._jobs.soak import render_soak, run_soak, soak_checks
from nem_llm.errors import ConfigError
from nem_llm.models import Attempt, MatchResult
from nem_llm.sim import SimConfig, run_simulator

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ pure functions


def test_mean_latency_of_each_distribution() -> None:
    sigma = math.log(3.0) / 2.326
    assert mean_latency("lognormal", 1.0, p99=3.0) == pytest.approx(math.exp(sigma**2 / 2))
    assert mean_latency("lognormal", 1.0, p99=3.0) == pytest.approx(1.1180, abs=1e-4)
    assert mean_latency("lognormal", 2.0, p99=2.0) == 2.0  # sigma 0: the median
    assert mean_latency("fixed", 0.25) == 0.25
    assert mean_latency("uniform", 0.0, low=0.5, high=1.5) == 1.0
    with pytest.raises(ConfigError):
        mean_latency("lognormal", 1.0)


def test_theoretical_bound_fixed_latency_counts_whole_waves() -> None:
    assert theoretical_bound(1000, 64, 1.0) == 16.0  # ceil(1000 / 64) = 16 waves
    assert theoretical_bound(1024, 64, 1.0) == 16.0
    assert theoretical_bound(1025, 64, 1.0) == 17.0
    assert theoretical_bound(20, 1, 0.05) == pytest.approx(1.0)
    assert theoretical_bound(0, 4, 1.0) == 0.0


def test_theoretical_bound_random_latency_uses_the_mean_per_slot() -> None:
    assert theoretical_bound(1000, 64, 1.118, random_latency=True) == pytest.approx(17.46875)


def test_theoretical_bound_takes_the_rate_limit_when_it_binds() -> None:
    # N / RPM * 60 = 1000 / 1800 * 60 = 33.3 s > 16 s of latency
    assert theoretical_bound(1000, 64, 1.0, 1800) == pytest.approx(1000 / 30)
    # the latency term binds: 1000 / 6000 * 60 = 10 s < 16 s
    assert theoretical_bound(1000, 64, 1.0, 6000) == 16.0
    assert theoretical_bound(1000, 64, 1.0, None) == 16.0


def test_theoretical_bound_rejects_nonsense() -> None:
    with pytest.raises(ConfigError):
        theoretical_bound(10, 0, 1.0)
    with pytest.raises(ConfigError):
        theoretical_bound(-1, 1, 1.0)
    with pytest.raises(ConfigError):
        theoretical_bound(10, 1, -1.0)


def test_ideal_makespan_list_schedules_in_order() -> None:
    assert ideal_makespan([1.0] * 5, 2) == 3.0  # waves of 2: 1 + 1 + 1
    assert ideal_makespan([3.0, 1.0, 1.0, 1.0], 2) == 3.0  # the short ones share a slot
    assert ideal_makespan([0.5, 0.5, 0.5], 3, rpm=60) == 2.5  # starts at 0, 1, 2
    assert ideal_makespan([0.1] * 4, 1, rpm=6000) == pytest.approx(0.4)  # slots bind
    assert ideal_makespan([], 4) == 0.0
    with pytest.raises(ConfigError):
        ideal_makespan([1.0], 0)


def test_simulated_latencies_match_the_simulators_log() -> None:
    config = SimConfig(seed=7, latency="lognormal", latency_p50=0.005, latency_p99=0.02)
    with run_simulator(config) as sim:
        client = OpenAI(base_url=sim.base_url, api_key="sim", max_retries=0)
        for query in ("a", "b", "c", "d"):
            client.chat.completions.create(
                model="nem-llm-sim",
                messages=[{"role": "user", "content": f"<query>{query}</query>"}],
            )
        client.close()
        logged = [r.latency for r in sorted(sim.requests, key=lambda r: r.arrival)]
    assert logged == simulated_latencies(config, 4)


def test_bound_ratio() -> None:
    assert bound_ratio(20.0, 16.0) == 1.25
    assert bound_ratio(16.0, 16.0) == 1.0
    assert bound_ratio(1.0, 0.0) is None


def test_resolve_rpm_keeps_the_client_at_two_thirds_of_the_server() -> None:
    assert resolve_rpm(None, None) == (1800.0, 2700.0)
    assert resolve_rpm(600, None) == (600.0, 900.0)
    assert resolve_rpm(None, 900) == (600.0, 900.0)
    assert resolve_rpm(600, 5000) == (600.0, 5000.0)
    with pytest.raises(ConfigError):
        resolve_rpm(0, None)
    with pytest.raises(ConfigError):
        resolve_rpm(None, -5)


def test_parse_scenario() -> None:
    assert parse_scenario("sequential") == ("sequential", False)
    assert parse_scenario("gather+rpm") == ("gather", True)
    assert parse_scenario("as_completed+rpm") == ("as_completed", True)
    assert [parse_scenario(s)[0] for s in DEFAULT_SCENARIOS] == [
        "sequential",
        "gather",
        "as_completed",
        "gather",
        "as_completed",
    ]
    with pytest.raises(ConfigError, match="unknown strategy"):
        parse_scenario("map")
    with pytest.raises(ConfigError, match="suffix"):
        parse_scenario("gather+tpm")


def test_synthetic_catalog_and_queries_are_distinct() -> None:
    catalog = make_catalog(200)
    assert len(catalog) == 200
    assert catalog[0] == {"id": "E0001", "name": "Entity 0001"}
    assert len({e["id"] for e in catalog}) == 200
    queries = make_queries(1000, 200)
    assert len(set(queries)) == 1000
    assert queries[0] == "entity 0001 mention 0"


def test_bench_config_validates() -> None:
    assert BenchConfig().effective_sequential_n == 20
    assert BenchConfig(n=5).effective_sequential_n == 5
    assert BenchConfig(sequential_n=50).effective_sequential_n == 50
    for bad in (
        {"n": 0},
        {"concurrency": 0},
        {"sequential_n": 0},
        {"scenarios": ("gather", "bogus")},
        {"scenarios": ()},
        {"rpm": -1.0},
        {"latency": "lognormal", "latency_p99": None},
        {"http_client": "requests"},
    ):
        with pytest.raises(ConfigError):
            BenchConfig(**bad)  # type: ignore[arg-type]


def _report() -> BenchReport:
    rows = [
        BenchRow(
            scenario="sequential",
            strategy="sequential",
            concurrency=1,
            n=20,
            subset_of=1000,
            makespan_s=22.5,
            bound_s=22.36,
            ratio=22.5 / 22.36,
            throughput_rps=20 / 22.5,
            p50_s=1.0,
            p95_s=2.5,
            first_result_s=1.1,
            tokens=8260,
            ideal_s=22.4,
            client_cpu_s=0.1,
            loop_lag_mean_ms=1.5,
            loop_lag_p99_ms=4.0,
            completion_times=[1.1 * (i + 1) for i in range(20)],
        ),
        BenchRow(
            scenario="gather+rpm",
            strategy="gather",
            concurrency=64,
            rpm=1800.0,
            n=1000,
            makespan_s=34.5,
            bound_s=1000 / 30,
            ratio=34.5 / (1000 / 30),
            throughput_rps=1000 / 34.5,
            p50_s=1.1,
            p95_s=2.9,
            first_result_s=34.5,
            retries=3,
            rate_limited=2,
            tokens=413000,
            errors=1,
            client_cpu_s=8.0,
            sim_cpu_s=1.0,
            completion_times=[0.5 + i * 0.034 for i in range(1000)],
        ),
    ]
    return BenchReport(
        target="simulator",
        n=1000,
        concurrency=64,
        rpm=1800.0,
        sim_rpm=2700.0,
        sequential_n=20,
        latency="lognormal",
        latency_p50_s=1.0,
        latency_p99_s=3.0,
        latency_mean_s=1.118,
        cpu_count=2,
        load_avg_before=[0.5, 0.4, 0.3],
        load_avg_after=[1.5, 0.6, 0.4],
        rows=rows,
    )


def test_render_table_exactly() -> None:
    expected = "\n".join(
        [
            "| strategy | n | concurrency | rpm | makespan | bound | ratio | ideal | throughput "
            "| p50 | p95 | first result | retries | 429s | tokens | errors |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            "| sequential * | 20 | 1 | - | 22.50 s | 22.36 s | 1.01x | 22.40 s | 0.9/s | 1.00 s "
            "| 2.50 s | 1.10 s | 0 | 0 | 8260 | 0 |",
            "| gather+rpm | 1000 | 64 | 1800 | 34.50 s | 33.33 s | 1.03x | - | 29.0/s | 1.10 s "
            "| 2.90 s | 34.50 s | 3 | 2 | 413000 | 1 |",
            "",
            "simulator, lognormal latency; client rpm 1800, simulator rpm 2700 (+rpm scenarios "
            "only). bound = max(N x mean latency / C, N / rpm x 60) with mean latency 1.118 s "
            "(simulator).",
            "ideal = a zero-overhead client against the same seeded latency draws (makespan / "
            "ideal is the client's overhead; ideal / bound the last wave's tail).",
            "\\* sequential: the first 20 of the 1000 queries (N x L would take ~19 min).",
            "client CPU per query: sequential 5.0 ms; gather+rpm 8.0 ms (+ simulator 1.0 ms).",
            "client event-loop lag, mean/p99: sequential 1.5/4 ms.",
            "machine: 2 CPUs, load average 0.50 before, 1.50 after (1 min).",
        ]
    )
    assert render_table(_report()) == expected


def test_json_round_trip(tmp_path: Path) -> None:
    report = _report()
    path = tmp_path / "bench.json"
    write_json(report, path)
    assert read_json(path) == report
    text = path.read_text()
    for key in ("makespan_s", "bound_s", "ratio", "first_result_s", "rate_limited"):
        assert f'"{key}"' in text


def test_write_plot_makes_a_png(tmp_path: Path) -> None:
    path = tmp_path / "bench.png"
    write_plot(_report(), path)
    assert path.read_bytes()[:8] == PNG_MAGIC


def _result(index: int, status: str = "matched", **fields: object) -> MatchResult:
    return MatchResult(query=f"q{index}", index=index, status=status, **fields)  # type: ignore[arg-type]


def test_soak_checks_find_each_breach() -> None:
    attempt = Attempt(number=1, outcome="failed", error_type="server")
    good = [_result(0), _result(1, "error", error_type="server", attempts=[attempt])]
    assert all(soak_checks(2, good, [0.0, 1.0], rpm=2).values())
    checks = soak_checks(2, [_result(0), _result(0)], [0.0], rpm=2)
    assert not checks["no_duplicate_indexes"]
    assert not checks["every_index_present"]
    assert soak_checks(2, [_result(0)], [0.0], rpm=2)["exactly_n_results"] is False
    untyped = [_result(0), _result(1, "error", error_type="server")]  # no attempt log
    assert not soak_checks(2, untyped, [], rpm=2)["errors_typed_with_attempts"]
    assert not soak_checks(2, good, [0.0, 1.0, 59.0], rpm=2)["rpm_never_exceeded"]
    assert soak_checks(2, good, [0.0, 1.0, 60.0], rpm=2)["rpm_never_exceeded"]


# ------------------------------------------------------------------ end to end


async def test_run_bench_tiny_end_to_end(tmp_path: Path) -> None:
    config = BenchConfig(n=20, concurrency=4, latency="fixed", latency_p50=0.05, latency_p99=None)
    seen: dict[str, int] = {}

    def progress(scenario: str, done: int, total: int) -> None:
        seen[scenario] = max(seen.get(scenario, 0), done)
        assert done <= total

    report = await run_bench(config, on_progress=progress)
    assert [row.scenario for row in report.rows] == list(DEFAULT_SCENARIOS)
    assert seen == {name: 20 for name in DEFAULT_SCENARIOS}
    by_name = {row.scenario: row for row in report.rows}
    assert by_name["sequential"].concurrency == 1
    assert by_name["sequential"].subset_of == 20
    assert by_name["gather+rpm"].rpm == 1800.0
    assert by_name["gather"].rpm is None
    for row in report.rows:
        assert row.n == 20
        assert len(row.completion_times) == 20
        assert row.errors == 0
        assert row.rate_limited == 0
        assert row.tokens > 0
        assert row.ratio is not None and row.ratio >= 0.95
        assert row.makespan_s >= row.completion_times[-1] - 1e-6
        assert row.client_cpu_s is not None and row.client_cpu_s > 0
        assert row.loop_lag_mean_ms is not None and row.ideal_s is not None
    # the bounds: ceil(20 / C) * 0.05, and 20 / 1800 * 60 for the rpm scenarios
    assert by_name["sequential"].bound_s == pytest.approx(1.0)
    assert by_name["gather"].bound_s == pytest.approx(0.25)
    assert by_name["as_completed+rpm"].bound_s == pytest.approx(20 / 30)
    # gather hands results over at the end; as_completed streams them
    assert by_name["gather"].first_result_s == pytest.approx(by_name["gather"].makespan_s)
    assert by_name["as_completed"].first_result_s < by_name["as_completed"].makespan_s  # type: ignore[operator]

    table = render_table(report)
    for name in DEFAULT_SCENARIOS:
        assert f"| {name} |" in table
    png, js = tmp_path / "out.png", tmp_path / "out.json"
    write_plot(report, png)
    write_json(report, js)
    assert png.stat().st_size > 0 and png.read_bytes()[:8] == PNG_MAGIC
    assert read_json(js) == report


async def test_soak_small_keeps_the_contract() -> None:
    n, rpm = 300, 3000.0
    report = await run_soak(
        n,
        rpm=rpm,
        concurrency=16,
        latency_p50=0.01,
        latency_p99=0.05,
        retry_after=0.05,
        attempt_timeout=0.5,
        max_attempts=2,  # so some items do fail for good and must come back as records
    )
    assert report.results == n
    assert report.duplicate_indexes == 0
    assert report.missing_indexes == 0
    assert report.untyped_errors == 0
    assert report.max_requests_in_60s <= rpm
    assert report.ok, report.checks
    assert sum(report.by_status.values()) == n
    assert report.by_status.get("error", 0) > 0
    assert sum(report.by_error_type.values()) == report.by_status["error"]
    # every fault kind happened and was seen by the client
    assert report.rate_limited > 0
    assert {"fault_429", "hang", "invalid"} <= set(report.server_by_kind)
    assert report.retries_by_cause.get("rate_limit", 0) > 0
    assert report.retries_by_cause.get("timeout", 0) > 0
    assert report.reasks > 0
    text = render_soak(report)
    assert f"results: {n} (duplicates 0, missing 0)" in text
    assert "FAILED" not in text
