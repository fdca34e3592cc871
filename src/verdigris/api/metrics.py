"""Prometheus metrics of the agent's API.

Each agent has its own :class:`~prometheus_client.CollectorRegistry` rather than the process-global
one, so that several agents in one process (tests, the simulator) never mix their numbers, and
creating a second agent never fails with "duplicated timeseries".

The gossip runtime's metrics join the same registry (:mod:`verdigris.runtime.metrics`); the endpoint
lets them read the store's books on the writer thread before each scrape (bounded wait). Every family is
listed in docs/metrics.md.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from verdigris.runtime.metrics import refresh as refresh_gossip


class ApiMetrics:
    """The API's counters, gauges and histograms, registered in ``registry``."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "verdigris_api_requests",
            "HTTP API requests, by endpoint, method and response status.",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "verdigris_api_request_duration_seconds",
            "Time to answer an API request (for streams: until the stream ended).",
            ["endpoint"],
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 60),
        )
        self.bad_requests = Counter(
            "verdigris_api_bad_requests",
            "Requests refused as bad input (4xx), by endpoint.",
            ["endpoint"],
            registry=r,
        )
        self.transactions = Counter(
            "verdigris_api_transactions",
            "Transactions by outcome: committed (made a version), unchanged (changed nothing), failed.",
            ["result"],
            registry=r,
        )
        self.statements = Counter(
            "verdigris_api_statements", "Statements executed in transactions.", registry=r
        )
        self.rows_affected = Counter(
            "verdigris_api_rows_affected", "Rows affected by committed transactions.", registry=r
        )
        self.rows_streamed = Counter(
            "verdigris_api_rows_streamed", "Rows sent by queries and subscriptions.", ["endpoint"], registry=r
        )
        self.db_version = Gauge(
            "verdigris_db_version", "The latest version of this node's own actor.", registry=r
        )
        self.active_streams = Gauge(
            "verdigris_api_active_streams", "Open streaming responses, by endpoint.", ["endpoint"], registry=r
        )
        self.subscriptions = Gauge("verdigris_subscriptions", "Subscriptions the agent keeps.", registry=r)
        self.slow_clients = Counter(
            "verdigris_api_slow_clients",
            "Streaming clients disconnected because they did not keep up.",
            ["endpoint"],
            registry=r,
        )
        self.subscription_lag = Histogram(
            "verdigris_subscription_lag_seconds",
            "From a commit (local or merged) to its subscription events handed to the subscribers' "
            "queues, measured from the earliest commit of the matcher's batch.",
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )

    def track_subscriptions(self, count: Callable[[], int]) -> None:
        """Report ``count()`` as the number of subscriptions at every scrape."""
        self.subscriptions.set_function(lambda: float(count()))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def metrics_app(metrics: ApiMetrics) -> web.Application:
    """A tiny app serving ``GET /metrics`` (and ``/``) in Prometheus' text format."""

    async def handle(request: web.Request) -> web.Response:
        await refresh_gossip(metrics.registry)  # the books are read on the writer thread (bounded)
        body = metrics.render()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    app.router.add_get("/", handle)
    return app
