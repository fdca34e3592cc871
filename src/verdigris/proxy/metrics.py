"""The proxy's Prometheus metrics, served by the supervisor at ``[proxy] metrics_listen`` (``/metrics``).

Workers count with plain ints (:mod:`verdigris.proxy.stats`); on each scrape the supervisor asks every
worker for a snapshot over its control channel (bounded by ``probe_deadline``) and :class:`ProxyCollector`
sums them. A worker that does not answer contributes its last snapshot (``verdigris_proxy_stats_timeouts_total``
counts it). Counters stay monotonic across worker restarts: the last snapshot of a worker that died is
kept in :class:`Totals` (``retired``), so only what it counted since the scrape before its death is lost.

Series, all prefixed ``verdigris_proxy_``:

- ``requests_total{app,region,status}`` (status class ``2xx``..., ``aborted``: none sent), the
  ``request_duration_seconds`` histogram and ``app_request_duration_seconds{app}``, ``errors_total{code}`` (the proxy's own error answers),
  ``upstream_errors_total{kind}`` (refused, connect_timeout, timeout, bad_response, reset),
  ``instance_upstream_errors_total{app,instance,kind}`` (instances in the routing table only),
  ``instance_ejected_seconds{app,instance}`` (ejection left after upstream errors),
  ``replays_total{outcome}`` (routed, fallback, failed, refused), ``queued_total``,
  ``queue_wait_seconds_total``, ``queue_rejections_total{reason}`` (full, timeout),
  ``client_timeouts_total{kind}``, ``ejections_total``, ``events_total{event}`` (any other worker counter);
- gauges summed over workers: ``in_flight_requests``, ``waiting_requests``, ``client_connections``,
  ``instance_in_flight{instance,app}``;
- per worker (``worker`` label): ``worker_up``, ``worker_pid``, ``worker_restarts_total``,
  ``probe_timeouts_total``, ``probe_errors_total``, ``stats_timeouts_total``, ``event_loop_lag_seconds``,
  ``probe_rtt_seconds``, ``probe_route_seconds``, ``table_ready``, ``table_entries{kind}``,
  ``table_problems``, ``worker_restart_backoff_seconds``, ``worker_stuck_seconds``,
  ``worker_uptime_seconds``; and ``table_events_total{kind}``,
  ``outlier_events_total{kind}`` summed; ``table_apply_refused_total`` (changes the table lock refused
  to apply instead of deadlocking: the incident switch with the project's lock, docs/watchdog.md);
- the watchdog (:mod:`verdigris.proxy.watchdog`): ``watchdog_restarts_total{reason}`` (probe_timeout:
  stuck, replaced; startup_timeout: no first answer in 30 s, replaced; exited: died on its own),
  the ``watchdog_detection_seconds`` histogram (a stuck worker's unanswered probe, from its send to the
  decision) and ``watchdog_last_detection_seconds``, ``watchdog_stall_causes_total{cause}`` (the main
  thread's innermost frame, ``file.py:function``; at most 50, then ``other``),
  ``watchdog_stack_dumps_total{result}`` (complete, threads, tasks, none) and ``watchdog_stack_files``.

``GET /events`` on the same server lists the last watchdog events as JSON (:mod:`verdigris.dashboard.events`).

With ``[proxy] fault_injection = true`` (tests only) the same server also takes ``POST
/fault/stall?worker=N&seconds=S`` and ``POST /fault/crashloop?worker=N&times=K``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from verdigris.dashboard.events import add_events_route
from verdigris.proxy.control import ControlError
from verdigris.proxy.stats import LATENCY_BUCKETS, WorkerStats
from verdigris.proxy.watchdog import DETECTION_BUCKETS

if TYPE_CHECKING:
    from verdigris.proxy.worker import Supervisor

P = "verdigris_proxy_"


def _add(into: dict[str, int], src: dict[str, int]) -> None:
    for k, v in src.items():
        into[k] = into.get(k, 0) + v


@dataclass
class Totals:
    """The counters of one or more worker snapshots, summed."""

    counters: dict[str, int] = field(default_factory=dict)
    requests: dict[tuple[str, str, str], int] = field(default_factory=dict)
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    latency_sum: float = 0.0
    upstream_errors: dict[str, int] = field(default_factory=dict)
    table_stats: dict[str, int] = field(default_factory=dict)
    outliers: dict[str, int] = field(default_factory=dict)
    instance_errors: dict[tuple[str, str, str], int] = field(default_factory=dict)
    """(app, instance, kind) -> upstream errors."""
    app_latency: dict[str, list[int]] = field(default_factory=dict)
    app_latency_sum: dict[str, float] = field(default_factory=dict)

    def add(self, s: WorkerStats) -> None:
        _add(self.counters, s.counters)
        for app, region, status, n in s.requests:
            key = (app, region, status)
            self.requests[key] = self.requests.get(key, 0) + n
        for i, n in enumerate(s.latency[: len(self.latency)]):
            self.latency[i] += n
        self.latency_sum += s.latency_sum
        _add(self.upstream_errors, s.upstream_errors)
        _add(self.table_stats, s.table_stats)
        _add(self.outliers, s.outliers)
        for app, instance, kind, n in s.instance_errors:
            key = (app, instance, kind)
            self.instance_errors[key] = self.instance_errors.get(key, 0) + n
        for app, counts in s.app_latency.items():
            into = self.app_latency.setdefault(app, [0] * len(self.latency))
            for i, n in enumerate(counts[: len(into)]):
                into[i] += n
            self.app_latency_sum[app] = self.app_latency_sum.get(app, 0.0) + s.app_latency_sum.get(app, 0.0)

    def copy(self) -> Totals:
        return Totals(
            dict(self.counters),
            dict(self.requests),
            list(self.latency),
            self.latency_sum,
            dict(self.upstream_errors),
            dict(self.table_stats),
            dict(self.outliers),
            dict(self.instance_errors),
            {app: list(counts) for app, counts in self.app_latency.items()},
            dict(self.app_latency_sum),
        )


_REPLAYS = {"replays": "routed", "replay_fallback": "fallback", "replay_failed": "failed"}
_REPLAYS["replay_refused"] = "refused"
_QUEUE = {"queue_full": "full", "queue_timeout": "timeout"}
_SKIP = {"requests", "queued", "queue_wait_us", "ejections", "upstream_broken_mid_response"}


class ProxyCollector(Collector):
    """Turns the supervisor's state and the workers' last snapshots into metric families."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor

    def collect(self) -> Iterable[Metric]:
        return list(self._collect())

    def _collect(self) -> Iterator[Metric]:
        sup = self.sup
        slots = sup.slots
        t = sup.retired.copy()
        live = [(s.index, s.last_stats) for s in slots if s.last_stats is not None]
        for _, st in live:
            t.add(st)
        c = t.counters

        m = CounterMetricFamily(
            P + "requests", "Requests answered, by app, responding region and status class.",
            labels=["app", "region", "status"],
        )  # fmt: skip
        for (app, region, status), n in sorted(t.requests.items()):
            m.add_metric([app, region, status], n)
        yield m
        cumulative, acc = [], 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), t.latency, strict=True):
            acc += n
            cumulative.append((_le(bound), acc))
        h = HistogramMetricFamily(
            P + "request_duration_seconds",
            "From the request head parsed to the answer sent (whole body streamed).",
            buckets=cumulative,
            sum_value=t.latency_sum,
        )
        yield h
        h = HistogramMetricFamily(
            P + "app_request_duration_seconds",
            "Latency per app (as request_duration_seconds; app labels bounded as in requests_total).",
            labels=["app"],
        )
        for app, counts in sorted(t.app_latency.items()):
            cumulative, acc = [], 0
            for bound, n in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
                acc += n
                cumulative.append((_le(bound), acc))
            h.add_metric([app], cumulative, t.app_latency_sum.get(app, 0.0))
        yield h
        m = CounterMetricFamily(
            P + "errors", "Error answers of the proxy itself, by error code.", labels=["code"]
        )
        for k, n in sorted(c.items()):
            if k.startswith("error_"):
                m.add_metric([k[6:]], n)
        yield m
        m = CounterMetricFamily(
            P + "upstream_errors", "Failed exchanges with instances, by kind.", labels=["kind"]
        )
        for kind in ("refused", "connect_timeout", "timeout", "bad_response", "reset"):
            m.add_metric([kind], t.upstream_errors.get(kind, 0))
        for kind, n in sorted(t.upstream_errors.items()):
            if kind not in ("refused", "connect_timeout", "timeout", "bad_response", "reset"):
                m.add_metric([kind], n)
        yield m
        yield _instance_errors(sup.retired, [st for _, st in live])
        yield _instance_ejected([st for _, st in live])
        m = CounterMetricFamily(P + "replays", "fly-replay handling, by outcome.", labels=["outcome"])
        for key, outcome in _REPLAYS.items():
            m.add_metric([outcome], c.get(key, 0))
        yield m
        yield CounterMetricFamily(
            P + "queued",
            "Requests that waited for a slot (every instance at its limit).",
            value=c.get("queued", 0),
        )
        yield CounterMetricFamily(
            P + "queue_wait_seconds",
            "Time requests spent waiting for a slot.",
            value=c.get("queue_wait_us", 0) / 1e6,
        )
        m = CounterMetricFamily(
            P + "queue_rejections", "Requests refused by the wait queue.", labels=["reason"]
        )
        for key, reason in _QUEUE.items():
            m.add_metric([reason], c.get(key, 0))
        yield m
        m = CounterMetricFamily(
            P + "client_timeouts", "Client connections timed out, by kind.", labels=["kind"]
        )
        for k, n in sorted(c.items()):
            if k.startswith("timeouts_"):
                m.add_metric([k[9:]], n)
        yield m
        yield CounterMetricFamily(
            P + "ejections", "Instances ejected by passive health checks.", value=c.get("ejections", 0)
        )
        m = CounterMetricFamily(P + "events", "Other worker counters, by name.", labels=["event"])
        for k, n in sorted(c.items()):
            if not (k in _SKIP or k in _REPLAYS or k in _QUEUE or k.startswith(("error_", "timeouts_"))):
                m.add_metric([k], n)
        yield m
        m = CounterMetricFamily(P + "table_events", "Routing table feed events, by kind.", labels=["kind"])
        for k, n in sorted(t.table_stats.items()):
            m.add_metric([k], n)
        yield m
        yield CounterMetricFamily(
            P + "table_apply_refused",
            "Subscription changes refused because applying them would deadlock on the table lock.",
            value=t.table_stats.get("apply_refused", 0),
        )
        m = CounterMetricFamily(P + "outlier_events", "Passive health events, by kind.", labels=["kind"])
        for k, n in sorted(t.outliers.items()):
            m.add_metric([k], n)
        yield m

        # gauges, summed over the workers' last snapshots
        yield GaugeMetricFamily(
            P + "in_flight_requests", "Requests being handled.", value=sum(st.in_flight for _, st in live)
        )
        yield GaugeMetricFamily(
            P + "waiting_requests", "Requests waiting for a slot.", value=sum(st.waiting for _, st in live)
        )
        yield GaugeMetricFamily(
            P + "client_connections", "Open client connections.", value=sum(st.connections for _, st in live)
        )
        per_inst: dict[tuple[str, str], int] = {}
        for _, st in live:
            for iid, app, n in st.instances:
                per_inst[(iid, app)] = per_inst.get((iid, app), 0) + n
        g = GaugeMetricFamily(
            P + "instance_in_flight", "In-flight requests per instance (capped).", labels=["instance", "app"]
        )
        for (iid, app), n in sorted(per_inst.items()):
            g.add_metric([iid, app], n)
        yield g

        # per worker
        ready = GaugeMetricFamily(
            P + "table_ready", "The worker's routing table is complete.", labels=["worker"]
        )
        entries = GaugeMetricFamily(
            P + "table_entries", "Routing table entries, by kind.", labels=["worker", "kind"]
        )
        problems = GaugeMetricFamily(
            P + "table_problems", "Recent routing feed problems kept (bounded).", labels=["worker"]
        )
        for i, st in live:
            w = str(i)
            ready.add_metric([w], 1 if st.table_ready else 0)
            for kind, n in sorted(st.table_counts.items()):
                entries.add_metric([w, kind], n)
            problems.add_metric([w], st.table_problems)
        yield ready
        yield entries
        yield problems
        yield GaugeMetricFamily(P + "workers", "Worker processes configured.", value=len(slots))
        now = time.monotonic()
        fams: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "up": GaugeMetricFamily(P + "worker_up", "1 if the worker answered its last probe in time.", labels=["worker"]),
            "pid": GaugeMetricFamily(P + "worker_pid", "The worker's process id.", labels=["worker"]),
            "restarts": CounterMetricFamily(P + "worker_restarts", "Workers restarted after dying.", labels=["worker"]),
            "probe_timeouts": CounterMetricFamily(
                P + "probe_timeouts", "Probes not answered within probe_deadline.", labels=["worker"]
            ),
            "probe_errors": CounterMetricFamily(
                P + "probe_errors", "Probes that failed otherwise (channel closed or busy).", labels=["worker"]
            ),
            "stats_timeouts": CounterMetricFamily(
                P + "stats_timeouts", "Scrapes for which the worker gave no snapshot in time.", labels=["worker"]
            ),
            "lag": GaugeMetricFamily(
                P + "event_loop_lag_seconds", "How long the worker's loop took to take the last probe.", labels=["worker"]
            ),
            "rtt": GaugeMetricFamily(P + "probe_rtt_seconds", "Round trip of the last probe.", labels=["worker"]),
            "route": GaugeMetricFamily(
                P + "probe_route_seconds", "Time of the routing decision in the last probe.", labels=["worker"]
            ),
            "age": GaugeMetricFamily(
                P + "worker_stats_age_seconds", "Age of the worker's snapshot used here.", labels=["worker"]
            ),
            "backoff": GaugeMetricFamily(
                P + "worker_restart_backoff_seconds", "Delay before the slot's last restart (crash-loop backoff).", labels=["worker"]
            ),
            "stuck": GaugeMetricFamily(
                P + "worker_stuck_seconds", "How long the worker has not answered probes (0: it answers).", labels=["worker"]
            ),
            "uptime": GaugeMetricFamily(
                P + "worker_uptime_seconds", "Time since the slot's current process was started.", labels=["worker"]
            ),
        }  # fmt: skip
        for s in slots:
            lw = [str(s.index)]
            fams["up"].add_metric(lw, 1 if s.up else 0)
            fams["pid"].add_metric(lw, s.pid)
            fams["restarts"].add_metric(lw, s.restarts)
            fams["probe_timeouts"].add_metric(lw, s.probe_timeouts)
            fams["probe_errors"].add_metric(lw, s.probe_errors)
            fams["stats_timeouts"].add_metric(lw, s.stats_timeouts)
            if s.lag is not None:
                fams["lag"].add_metric(lw, s.lag)
            if s.rtt is not None:
                fams["rtt"].add_metric(lw, s.rtt)
            if s.route_us is not None:
                fams["route"].add_metric(lw, s.route_us / 1e6)
            if s.stats_at is not None:
                fams["age"].add_metric(lw, now - s.stats_at)
            fams["backoff"].add_metric(lw, s.backoff.delay)
            # a stall in progress and a recent restart, for `verdigris doctor` (rates alone miss both)
            fams["stuck"].add_metric(lw, now - s.stuck_since if s.stuck_since is not None else 0.0)
            if s.started_at:
                fams["uptime"].add_metric(lw, now - s.started_at)
        yield from fams.values()
        yield from _watchdog(sup)


def _instance_errors(retired: Totals, live: list[WorkerStats]) -> Metric:
    """Upstream errors per (app, instance, kind). Live workers report only instances still in their
    routing table; what dead workers counted is kept only for instances a live worker still reports, so
    the series of an instance removed from the table disappear (bounded cardinality)."""
    counts: dict[tuple[str, str, str], int] = {}
    for st in live:
        for app, instance, kind, n in st.instance_errors:
            counts[(app, instance, kind)] = counts.get((app, instance, kind), 0) + n
    reported = {(app, instance) for app, instance, _ in counts}
    for key in [k for k in retired.instance_errors if (k[0], k[1]) not in reported]:
        del retired.instance_errors[key]
    for key, n in retired.instance_errors.items():
        counts[key] = counts.get(key, 0) + n
    m = CounterMetricFamily(
        P + "instance_upstream_errors",
        "Failed exchanges with instances, by app, instance and kind (instances in the routing table).",
        labels=["app", "instance", "kind"],
    )
    for (app, instance, kind), n in sorted(counts.items()):
        m.add_metric([app, instance, kind], n)
    return m


def _instance_ejected(live: list[WorkerStats]) -> Metric:
    """Seconds of ejection left per (app, instance) ejected after upstream errors (longest over workers)."""
    left: dict[tuple[str, str], float] = {}
    for st in live:
        for app, instance, seconds in st.instance_ejected:
            left[(app, instance)] = max(left.get((app, instance), 0.0), seconds)
    g = GaugeMetricFamily(
        P + "instance_ejected_seconds",
        "Ejection time left of instances that passive health ejected after upstream errors.",
        labels=["app", "instance"],
    )
    for (app, instance), seconds in sorted(left.items()):
        g.add_metric([app, instance], seconds)
    return g


def _watchdog(sup: Supervisor) -> Iterator[Metric]:
    w = sup.watchdog
    m = CounterMetricFamily(
        P + "watchdog_restarts",
        "Workers restarted, by reason (stuck workers are replaced).",
        labels=["reason"],
    )
    for reason, n in sorted(w.restarts.items()):
        m.add_metric([reason], n)
    yield m
    cumulative, acc = [], 0
    for bound, n in zip((*DETECTION_BUCKETS, float("inf")), w.detection, strict=True):
        acc += n
        cumulative.append((_le(bound), acc))
    yield HistogramMetricFamily(
        P + "watchdog_detection_seconds",
        "A stuck worker's unanswered probe: from its send to the decision to replace the worker.",
        buckets=cumulative,
        sum_value=w.detection_sum,
    )
    g = GaugeMetricFamily(P + "watchdog_last_detection_seconds", "The last stuck worker's detection time.")
    if w.last_detection is not None:
        g.add_metric([], w.last_detection)
    yield g
    m = CounterMetricFamily(
        P + "watchdog_stall_causes",
        "Stuck workers by the innermost frame of their main thread.",
        labels=["cause"],
    )
    for cause, n in sorted(w.causes.items()):
        m.add_metric([cause], n)
    yield m
    m = CounterMetricFamily(
        P + "watchdog_stack_dumps",
        "Stack dumps of stuck workers, by what was obtained in time.",
        labels=["result"],
    )
    for result, n in sorted(w.dumps.items()):
        m.add_metric([result], n)
    yield m
    yield GaugeMetricFamily(P + "watchdog_stack_files", "Stack files kept in stack_dir.", value=w.stack_files)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def metrics_app(supervisor: Supervisor) -> web.Application:
    """``GET /metrics`` (and ``/``): fresh snapshots from every worker (bounded wait), then the text."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(supervisor))

    async def handle(request: web.Request) -> web.Response:
        await supervisor.refresh_stats()
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    app.router.add_get("/", handle)
    add_events_route(app)  # GET /events: recent watchdog events, for the dashboard (docs/dashboard.md)
    if supervisor.config.fault_injection:
        _fault_routes(app, supervisor)
    return app


def _fault_routes(app: web.Application, sup: Supervisor) -> None:
    """``POST /fault/stall?worker=N&seconds=S``, ``POST /fault/crashloop?worker=N&times=K`` (fault
    injection only)."""

    def worker_arg(request: web.Request) -> int:
        try:
            index = int(request.query.get("worker", "0"))
        except ValueError:
            raise web.HTTPBadRequest(text="worker: expected an integer") from None
        if not 0 <= index < len(sup.slots):
            raise web.HTTPBadRequest(text=f"worker: 0 to {len(sup.slots) - 1}")
        return index

    async def stall(request: web.Request) -> web.Response:
        index = worker_arg(request)
        try:
            seconds = float(request.query.get("seconds", "5"))
            return web.json_response(await sup.fault_stall(index, seconds))
        except ValueError:
            raise web.HTTPBadRequest(text="seconds: expected a number") from None
        except ControlError as e:
            raise web.HTTPConflict(text=str(e)) from None

    async def crashloop(request: web.Request) -> web.Response:
        index = worker_arg(request)
        try:
            times = int(request.query.get("times", "3"))
            return web.json_response(await sup.fault_crashloop(index, times))
        except ValueError:
            raise web.HTTPBadRequest(text="times: expected an integer") from None
        except ControlError as e:
            raise web.HTTPConflict(text=str(e)) from None

    app.router.add_post("/fault/stall", stall)
    app.router.add_post("/fault/crashloop", crashloop)


__all__ = ["ProxyCollector", "Totals", "metrics_app"]
