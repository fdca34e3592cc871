"""A proxy worker's counters for metrics, and its answers on the control channel (``probe``, ``stats``).

Counting on the request path is plain ints in dicts and lists (:class:`RequestCounters`); nothing here
touches prometheus_client. The supervisor asks each worker for a :class:`WorkerStats` snapshot over the
control channel (:mod:`verdigris.proxy.control`) and turns the sum into Prometheus metrics
(:mod:`verdigris.proxy.metrics`).

Label cardinality is bounded: at most ``MAX_APPS`` distinct apps and ``MAX_REGIONS`` regions are
counted by name (later ones count as ``"other"``), and at most ``MAX_INSTANCES`` instances are reported
in the in-flight gauge (the most loaded ones; the rest are summed as ``"other"``).
"""

from __future__ import annotations

import asyncio
import os
import time
from bisect import bisect_left
from collections.abc import Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Final

import msgspec

from verdigris.proxy.balance import Forward, Queue, Route
from verdigris.proxy.errors import Reject
from verdigris.proxy.shared_load import SharedLoadTracker

if TYPE_CHECKING:
    from verdigris.proxy.server import Request, Worker

LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
"""Upper bounds (seconds, inclusive) of the request latency histogram; one more bucket for +Inf."""
MAX_APPS: Final = 1000
MAX_REGIONS: Final = 100
MAX_INSTANCES: Final = 1000
OTHER: Final = "other"
NONE: Final = "none"
"""The app / region label of a request that was not routed to one (bad host, no such app...)."""
PROBE_HOST: Final = "probe.verdigris.invalid"
"""The host a probe routes when the supervisor names none (an honest lookup that finds no app)."""


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "aborted"


class RequestCounters:
    """Requests by (app, region, status class), a latency histogram, upstream errors by kind."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str], int] = {}
        self.latency = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.app_latency: dict[str, list[int]] = {}
        """The same histogram per app label (bounded like the apps of ``requests``)."""
        self.app_latency_sum: dict[str, float] = {}
        self.upstream_errors: dict[str, int] = {}
        self.instance_errors: dict[tuple[str, str, str], int] = {}
        """Upstream errors by (app, instance, kind); :func:`snapshot` drops instances gone from the table."""
        self._apps: set[str] = set()
        self._regions: set[str] = set()

    def finished(self, req: Request, now: float | None = None) -> None:
        """Count a request whose answer is done (``req.status`` 0: none was sent; 101: a tunnel, not in
        the latency histogram)."""
        elapsed = (time.monotonic() if now is None else now) - req.started
        app = req.app or NONE
        if app not in self._apps:
            if len(self._apps) >= MAX_APPS:
                app = OTHER
            else:
                self._apps.add(app)
        region = req.region or NONE
        if region not in self._regions:
            if len(self._regions) >= MAX_REGIONS:
                region = OTHER
            else:
                self._regions.add(region)
        key = (app, region, status_class(req.status))
        self.requests[key] = self.requests.get(key, 0) + 1
        if req.status == 101:
            return  # a WebSocket tunnel: how long it stayed open is not a latency
        bucket = bisect_left(LATENCY_BUCKETS, elapsed)
        self.latency[bucket] += 1
        self.latency_sum += elapsed
        per_app = self.app_latency.get(app)
        if per_app is None:
            per_app = self.app_latency[app] = [0] * (len(LATENCY_BUCKETS) + 1)
        per_app[bucket] += 1
        self.app_latency_sum[app] = self.app_latency_sum.get(app, 0.0) + elapsed

    def upstream_error(self, kind: str, app: str = "", instance: str = "") -> None:
        self.upstream_errors[kind] = self.upstream_errors.get(kind, 0) + 1
        if instance:  # per instance too: tells one bad instance (or network path) from a stalled proxy
            key = (app, instance, kind)
            self.instance_errors[key] = self.instance_errors.get(key, 0) + 1


class WorkerStats(msgspec.Struct, forbid_unknown_fields=False):
    """One worker's snapshot: counters since it started, and gauges now."""

    pid: int
    counters: dict[str, int]
    """``Worker.stats``: ``requests``, ``error_<code>``, ``queue_full``, ``replays``..."""
    requests: list[tuple[str, str, str, int]]
    """(app, region, status class, count)."""
    latency: list[int]
    """Per bucket of :data:`LATENCY_BUCKETS` and +Inf (not cumulative)."""
    latency_sum: float
    upstream_errors: dict[str, int]
    in_flight: int
    waiting: int
    connections: int
    instances: list[tuple[str, str, int]]
    """(instance, app, in-flight slots)."""
    table_ready: bool
    table_counts: dict[str, int]
    table_stats: dict[str, int]
    """The routing table's :class:`~verdigris.proxy.table.TableStats`, including ``apply_refused`` (changes
    the table lock refused to apply: exported as ``verdigris_proxy_table_apply_refused_total``)."""
    table_problems: int
    outliers: dict[str, int]
    instance_errors: list[tuple[str, str, str, int]] = []
    """(app, instance, kind, count) of instances still in the routing table."""
    instance_ejected: list[tuple[str, str, float]] = []
    """(app, instance, seconds of ejection left) of those instances that passive health ejected."""
    app_latency: dict[str, list[int]] = {}
    """Per app label: ``latency`` of its requests."""
    app_latency_sum: dict[str, float] = {}


def snapshot(worker: Worker) -> WorkerStats:
    m = worker.metrics
    loads = dict(
        worker.balancer.load._load
    )  # this worker's own slots (a shared tracker's loads() is fleet-wide)
    top = sorted(loads.items(), key=lambda kv: -kv[1])
    instances: list[tuple[str, str, int]] = []
    for iid, n in top[:MAX_INSTANCES]:
        inst = worker.table.instance(iid)
        instances.append((iid, inst.app if inst is not None else "", n))
    rest = sum(n for _, n in top[MAX_INSTANCES:])
    if rest:
        instances.append((OTHER, OTHER, rest))
    errors = m.instance_errors
    for key in [k for k in errors if worker.table.instance(k[1]) is None]:
        del errors[key]  # bounded cardinality: an instance gone from the table loses its series
    # An ejected instance gets no more requests, so no more errors: its ejection is the lasting evidence.
    now = asyncio.get_running_loop().time()
    ejected: list[tuple[str, str, float]] = []
    for app, iid in dict.fromkeys((a, i) for a, i, _ in errors):
        until = worker.balancer.outliers.ejected_until(iid, now)
        if until is not None:
            ejected.append((app, iid, until - now))
    return WorkerStats(
        pid=os.getpid(),
        counters=dict(worker.stats),
        requests=[(a, r, c, n) for (a, r, c), n in m.requests.items()],
        latency=list(m.latency),
        latency_sum=m.latency_sum,
        upstream_errors=dict(m.upstream_errors),
        in_flight=worker.in_flight,
        waiting=worker.waiting,
        connections=len(worker.connections),
        instances=instances,
        table_ready=worker.table.ready,
        table_counts=worker.table.counts(),
        table_stats={k: int(v) for k, v in asdict(worker.table.stats).items()},
        table_problems=len(worker.table.problems),
        outliers={k: int(v) for k, v in asdict(worker.balancer.outliers.stats).items()},
        instance_errors=[(a, i, k, n) for (a, i, k), n in errors.items()],
        instance_ejected=ejected,
        app_latency={app: list(counts) for app, counts in m.app_latency.items()},
        app_latency_sum=dict(m.app_latency_sum),
    )


def probe(worker: Worker, args: Mapping[str, Any]) -> dict[str, Any]:
    """The answer to a ``probe``: the loop's lag and one real (slot-free) routing decision, made on the
    event loop by the function requests use (``Balancer.choose_for_host``: the routing table's read side,
    host lookup in the table, then the balancer), plus the lock a hard-limited slot takes across workers: with shared load counts the
    probe takes and releases that ``flock`` (``SharedLoad.try_add`` with a limit of 0 counts nothing), so
    a worker whose routing would block on it answers late too. ``lock``: ``ok``, ``busy`` (not taken
    within ``LOCK_TIMEOUT``, or refused during the lock backoff, as a request would be) or ``none``."""
    now = time.monotonic()
    sent = args.get("sent")
    lag = max(0.0, now - sent) if isinstance(sent, int | float) else 0.0
    host = args.get("host")
    host = host if isinstance(host, str) and host else PROBE_HOST
    t0 = time.perf_counter()
    d = worker.balancer.choose_for_host(host, now=asyncio.get_running_loop().time(), acquire=False)
    lock = "none"
    tracker = worker.balancer.load
    if isinstance(tracker, SharedLoadTracker):
        shared = tracker.shared
        before = shared.lock_timeouts + shared.lock_refusals
        shared.try_add(shared.cell(host), 0)  # the hard-limit path; with a limit of 0 it never counts
        lock = "ok" if shared.lock_timeouts + shared.lock_refusals == before else "busy"
    route_us = (time.perf_counter() - t0) * 1e6
    if isinstance(d, Route):
        decision = f"route {d.instance.id}"
    elif isinstance(d, Reject):
        decision = f"reject {d.status} {d.code}"
    elif isinstance(d, Queue):
        decision = "queue"
    elif isinstance(d, Forward):
        decision = f"forward {d.region}"
    else:
        decision = type(d).__name__
    return {
        "lag": lag,
        "route_us": route_us,
        "decision": decision,
        "ready": worker.table.ready,
        "lock": lock,
        "pid": os.getpid(),
    }


__all__ = [
    "LATENCY_BUCKETS",
    "MAX_APPS",
    "RequestCounters",
    "WorkerStats",
    "probe",
    "snapshot",
    "status_class",
]
