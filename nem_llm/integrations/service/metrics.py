"""The service's Prometheus metrics: requests, results, and the matcher's LLM totals."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from ...matcher import Matcher
from ...models import MatchResult

__all__ = ["Metrics", "path_label"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PATHS = ("/v1/match", "/v1/match:stream", "/v1/entities", "/healthz", "/readyz", "/metrics")


def path_label(path: str) -> str:
    """The ``path`` label of a request: a known path, the entity template, or ``other``."""
    if path in _PATHS:
        return path
    if path.startswith("/v1/entities/"):
        return "/v1/entities/{entity_id}"
    return "other"


class _GovernorCollector:
    """Reads the matcher's totals at scrape time: LLM calls, retries, tokens, cost (the
    governor) and the micro-batches the embedder was given."""

    def __init__(self, matcher: Matcher) -> None:
        self.matcher = matcher

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self.matcher.governor_stats
        calls = CounterMetricFamily("nem_llm_llm_calls", "LLM calls (one per adjudication).")
        attempts = CounterMetricFamily("nem_llm_llm_attempts", "LLM attempts, retries included.")
        failures = CounterMetricFamily("nem_llm_llm_failures", "LLM calls that failed for good.")
        retries = CounterMetricFamily(
            "nem_llm_llm_retries", "LLM retries by cause.", labels=["cause"]
        )
        limited = CounterMetricFamily("nem_llm_llm_rate_limited", "429 answers received.")
        tokens = CounterMetricFamily("nem_llm_llm_tokens", "Tokens spent.", labels=["kind"])
        cost = CounterMetricFamily("nem_llm_llm_cost_usd", "Dollars spent (list prices).")
        in_flight = GaugeMetricFamily("nem_llm_llm_in_flight", "LLM calls in flight.")
        if stats is None:
            for family in (calls, attempts, failures, limited, cost):
                family.add_metric([], 0.0)
            for kind in ("prompt", "completion"):
                tokens.add_metric([kind], 0.0)
            in_flight.add_metric([], 0.0)
        else:
            calls.add_metric([], stats.calls)
            attempts.add_metric([], stats.attempts)
            failures.add_metric([], stats.failures)
            for cause, n in sorted(stats.retries_by_cause.items()):
                retries.add_metric([cause], n)
            limited.add_metric([], stats.rate_limited)
            tokens.add_metric(["prompt"], stats.usage.prompt_tokens)
            tokens.add_metric(["completion"], stats.usage.completion_tokens)
            cost.add_metric([], stats.usage.cost_usd)
            in_flight.add_metric([], stats.in_flight)
        yield from (calls, attempts, failures, retries, limited, tokens, cost, in_flight)

        n_batches, n_texts = self.matcher.micro_batches
        batches = CounterMetricFamily(
            "nem_llm_embed_batches", "Micro-batches encoded (texts / batches: their mean size)."
        )
        batches.add_metric([], n_batches)
        texts = CounterMetricFamily("nem_llm_embed_texts", "Queries encoded in micro-batches.")
        texts.add_metric([], n_texts)
        yield from (batches, texts)
        yield from self._audit()

    def _audit(self) -> Iterator[Metric]:
        """The running audit per route: audited and agreeing auto decisions, the agreement's
        upper bound, and whether the audit closed the route."""
        audited = CounterMetricFamily(
            "nem_llm_audit_audited", "Auto decisions audited by the LLM.", labels=["route"]
        )
        agreeing = CounterMetricFamily(
            "nem_llm_audit_agreeing", "Audited decisions the LLM agreed with.", labels=["route"]
        )
        bound = GaugeMetricFamily(
            "nem_llm_audit_agreement_upper_bound",
            "One-sided 90% upper bound of the route's agreement with the LLM.",
            labels=["route"],
        )
        closed = GaugeMetricFamily(
            "nem_llm_audit_route_closed", "1 when the audit closed the route.", labels=["route"]
        )
        auditor = getattr(self.matcher, "auditor", None)
        report = auditor.report() if auditor is not None else {}
        for route, row in report.items():
            audited.add_metric([route], row.audited)
            agreeing.add_metric([route], row.agreeing)
            if row.agreement_upper_bound is not None:
                bound.add_metric([route], row.agreement_upper_bound)
            closed.add_metric([route], 1.0 if row.closed else 0.0)
        yield from (audited, agreeing, bound, closed)


class Metrics:
    """The service's Prometheus registry (one per app, so tests can build many apps)."""

    def __init__(self, matcher: Matcher) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "nem_llm_http_requests",
            "HTTP requests answered.",
            ["method", "path", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "nem_llm_http_request_duration_seconds",
            "HTTP request latency.",
            ["method", "path"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "nem_llm_http_requests_in_flight", "HTTP requests in flight.", registry=r
        )
        self.disconnects = Counter(
            "nem_llm_http_client_disconnects",
            "Requests whose client left before the answer (during the body or the work).",
            registry=r,
        )
        self.timeouts = Counter(
            "nem_llm_http_read_timeouts",
            "Connections that sent no complete headers or body in time (answered 408).",
            ["part"],
            registry=r,
        )
        self.results = Counter(
            "nem_llm_results", "Match results.", ["status", "decided_by"], registry=r
        )
        self.result_seconds = Histogram(
            "nem_llm_result_duration_seconds",
            "Latency of one query.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.llm_attempt_seconds = Histogram(
            "nem_llm_llm_attempt_duration_seconds",
            "Latency of one LLM attempt.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_GovernorCollector(matcher))
        # labelled children, looked up once per label set (``labels()`` takes a lock and
        # builds a tuple on every call: measurable at thousands of requests a second)
        self._answered: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}
        self._decided: dict[tuple[str, str | None], Counter] = {}

    def answered(self, method: str, path: str, status: int, seconds: float) -> None:
        """Count one answered request and its latency."""
        key = (method, path, status)
        children = self._answered.get(key)
        if children is None:
            children = (
                self.requests.labels(method, path, str(status)),
                self.request_seconds.labels(method, path),
            )
            self._answered[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe(self, result: MatchResult) -> None:
        """Count one result by status and decider, with its latency and LLM attempts."""
        key = (result.status, result.decided_by)
        counter = self._decided.get(key)
        if counter is None:
            counter = self.results.labels(result.status, result.decided_by or "none")
            self._decided[key] = counter
        counter.inc()
        self.result_seconds.observe(result.latency_s)
        for attempt in result.attempts:
            self.llm_attempt_seconds.observe(attempt.latency_s)
