"""Scraping a region's proxies for the dashboard: ``/metrics`` (Prometheus text) and ``/events`` (JSON).

:class:`ProxyScraper` fetches every proxy at once with a short timeout (a proxy that does not answer is
shown as down, it never holds the page up) and keeps the result for ``cache_seconds``, so that several
pages polling one agent cost one scrape per second. Rates come from successive scrapes: each proxy keeps
a short history of its per-app counters and a rate is the difference between the newest sample and the
oldest one within ``window`` seconds (at least two samples ``min_interval`` apart), so the figure is
smooth yet follows a change within a few seconds. A counter that went down (a restarted proxy) counts
from zero.

What is read (docs/proxy.md, "Metrics"):

* ``verdigris_proxy_requests_total{app,region,status}`` — requests and errors (status ``5xx``) per app;
* ``verdigris_proxy_instance_in_flight{instance,app}`` — load per instance;
* ``verdigris_proxy_instance_upstream_errors_total{app,instance,kind}`` — upstream errors per instance
  (also read from ``upstream_errors_total`` if that carries ``app`` and ``instance`` labels), and
  ``verdigris_proxy_instance_ejected_seconds{app,instance}`` — ejection left after errors;
* ``verdigris_proxy_watchdog_restarts_total{reason}``, ``verdigris_proxy_worker_up{worker}``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from verdigris.watchdog.rwlock import AsyncRWLock

P: Final = "verdigris_proxy_"
ERROR_STATUS: Final = "5xx"


@dataclass(frozen=True)
class ProxyTarget:
    """A row of the global ``proxies`` table."""

    id: str
    region: str
    address: str
    metrics: str | None


@dataclass
class Sample:
    """What one scrape of one proxy said."""

    requests: dict[str, float] = field(default_factory=dict)
    """app -> requests answered (every status class)."""
    errors: dict[str, float] = field(default_factory=dict)
    """app -> requests answered with a 5xx status."""
    in_flight: dict[tuple[str, str], float] = field(default_factory=dict)
    """(app, instance) -> requests in flight."""
    upstream_errors: dict[tuple[str, str, str], float] = field(default_factory=dict)
    """(app, instance, kind) -> failed exchanges; app and instance are '' when the proxy does not say."""
    per_instance_errors: bool = False
    """The proxy reports upstream errors per instance (an instance without a series had none)."""
    ejected: dict[tuple[str, str], float] = field(default_factory=dict)
    """(app, instance) -> seconds of passive-health ejection left."""
    watchdog_restarts: dict[str, float] = field(default_factory=dict)
    workers_up: int = 0
    workers: int = 0


def parse_metrics(text: str) -> Sample:
    """The figures the dashboard uses from a proxy's ``/metrics`` text; ValueError if it is not
    Prometheus text."""
    sample = Sample()
    for family in text_string_to_metric_families(text):
        if family.name == P + "instance_upstream_errors":
            sample.per_instance_errors = True  # present even with no series yet: then no errors
        for s in family.samples:
            name, labels, value = s.name, s.labels, float(s.value)
            if name == P + "requests_total":
                app = labels.get("app", "")
                sample.requests[app] = sample.requests.get(app, 0.0) + value
                if labels.get("status") == ERROR_STATUS:
                    sample.errors[app] = sample.errors.get(app, 0.0) + value
            elif name == P + "instance_in_flight":
                key = (labels.get("app", ""), labels.get("instance", ""))
                sample.in_flight[key] = sample.in_flight.get(key, 0.0) + value
            elif name in (P + "upstream_errors_total", P + "instance_upstream_errors_total"):
                ukey = (labels.get("app", ""), labels.get("instance", ""), labels.get("kind", ""))
                sample.upstream_errors[ukey] = sample.upstream_errors.get(ukey, 0.0) + value
                sample.per_instance_errors |= bool(ukey[1])
            elif name == P + "instance_ejected_seconds":
                ekey = (labels.get("app", ""), labels.get("instance", ""))
                sample.ejected[ekey] = max(sample.ejected.get(ekey, 0.0), value)
            elif name == P + "watchdog_restarts_total":
                reason = labels.get("reason", "")
                sample.watchdog_restarts[reason] = value
            elif name == P + "worker_up":
                sample.workers += 1
                sample.workers_up += 1 if value >= 1 else 0
    return sample


@dataclass
class ProxyState:
    """One proxy as the dashboard shows it."""

    target: ProxyTarget
    up: bool
    error: str | None
    sample: Sample | None
    rates: dict[str, tuple[float, float]] | None
    """app -> (requests/s, errors/s) (an app the proxy never saw: none); None until two samples are far
    enough apart."""
    events: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        s = self.sample
        return {
            "id": self.target.id,
            "region": self.target.region,
            "address": self.target.address,
            "metrics": self.target.metrics,
            "up": self.up,
            "error": self.error,
            "workers": s.workers if s else None,
            "workers_up": s.workers_up if s else None,
            "requests_per_s": None
            if self.rates is None
            else round(sum(r for r, _ in self.rates.values()), 3),
            "errors_per_s": None if self.rates is None else round(sum(e for _, e in self.rates.values()), 3),
            "watchdog_restarts": dict(s.watchdog_restarts) if s else {},
        }


class _History:
    """Per-app (requests, errors) counters of one proxy over the last ``window`` seconds."""

    def __init__(self, window: float, min_interval: float) -> None:
        self.window = window
        self.min_interval = min_interval
        self.points: deque[tuple[float, dict[str, float], dict[str, float]]] = deque()

    def add(self, at: float, sample: Sample) -> dict[str, tuple[float, float]] | None:
        """Record ``sample``; the rates since the oldest sample kept, or None when it is too recent."""
        points = self.points
        if points:
            _, last_requests, _ = points[-1]
            if any(sample.requests.get(app, 0.0) < n for app, n in last_requests.items()):
                points.clear()  # counters went back: the proxy restarted; start over
        points.append((at, dict(sample.requests), dict(sample.errors)))
        while len(points) > 2 and at - points[1][0] >= self.window:
            points.popleft()
        first_at, first_requests, first_errors = points[0]
        elapsed = at - first_at
        if elapsed < self.min_interval:
            return None
        return {
            app: (
                max(0.0, n - first_requests.get(app, 0.0)) / elapsed,
                max(0.0, sample.errors.get(app, 0.0) - first_errors.get(app, 0.0)) / elapsed,
            )
            for app, n in sample.requests.items()
        }


class ProxyScraper:
    """Scrapes proxies with a shared session; see the module docstring."""

    def __init__(
        self,
        *,
        timeout: float = 0.8,
        cache_seconds: float = 0.9,
        window: float = 5.0,
        min_interval: float = 0.5,
    ) -> None:
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self.window = window
        self.min_interval = min_interval
        self._session: aiohttp.ClientSession | None = None
        self._history: dict[str, _History] = {}
        self._cached: tuple[float, tuple[ProxyTarget, ...], list[ProxyState]] | None = None
        # one fetch at a time, the others wait for its result (bounded: a fetch is bounded by its timeout)
        self._lock = AsyncRWLock("dashboard proxy scrape cache", timeout=3 * timeout + 1)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def states(self, targets: Sequence[ProxyTarget]) -> list[ProxyState]:
        """Every target's state: from the cache when the same targets were scraped less than
        ``cache_seconds`` ago, else scraped now (concurrent callers share one scrape)."""
        key = tuple(sorted(targets, key=lambda t: t.id))
        async with self._lock.write():
            cached = self._cached
            now = time.monotonic()
            if cached is not None and cached[1] == key and now - cached[0] < self.cache_seconds:
                return cached[2]
            if self._session is None:
                self._session = aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self.timeout),
                    connector=aiohttp.TCPConnector(limit=32, force_close=False),
                )
            states = list(await asyncio.gather(*(self._one(self._session, t) for t in key)))
            for gone in set(self._history) - {t.id for t in key}:
                del self._history[gone]
            self._cached = (time.monotonic(), key, states)
            return states

    async def _one(self, session: aiohttp.ClientSession, target: ProxyTarget) -> ProxyState:
        if not target.metrics:
            return ProxyState(target, False, "no metrics address registered", None, None, [])
        base = f"http://{target.metrics}"
        metrics_get, events_get = await asyncio.gather(
            self._get(session, base + "/metrics"),
            self._get(session, base + "/events"),
            return_exceptions=True,
        )
        if isinstance(metrics_get, BaseException):
            return ProxyState(target, False, _describe(metrics_get), None, None, [])
        try:
            sample = parse_metrics(metrics_get.decode("utf-8", "replace"))
        except ValueError as e:
            return ProxyState(target, False, f"unreadable /metrics: {e}", None, None, [])
        history = self._history.setdefault(target.id, _History(self.window, self.min_interval))
        rates = history.add(time.monotonic(), sample)
        events: list[dict[str, Any]] = []
        if not isinstance(events_get, BaseException):  # a proxy without /events: no event list
            events = _events_of(events_get, target)
        return ProxyState(target, True, None, sample, rates, events)

    @staticmethod
    async def _get(session: aiohttp.ClientSession, url: str) -> bytes:
        async with session.get(url) as response:
            if response.status != 200:
                raise aiohttp.ClientResponseError(
                    response.request_info, (), status=response.status, message=response.reason or ""
                )
            return await response.read()


def _events_of(body: bytes, target: ProxyTarget) -> list[dict[str, Any]]:
    try:
        doc = json.loads(body)
    except ValueError:
        return []
    raw = doc.get("events") if isinstance(doc, dict) else None
    if not isinstance(raw, list):
        return []
    return [{**e, "proxy": target.id, "region": target.region} for e in raw if isinstance(e, dict)]


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    if isinstance(e, aiohttp.ClientResponseError):
        return f"HTTP {e.status}"
    return str(e) or type(e).__name__


__all__ = ["ProxyScraper", "ProxyState", "ProxyTarget", "Sample", "parse_metrics"]
