"""Where a request goes: a pure decision from the routing table, the load, passive health and the request.

:meth:`Balancer.choose` answers one of four :data:`Decision` values, and nothing else happens: no socket,
no clock, no randomness it was not handed (ARCHITECTURE.md, principle 1)::

    balancer = Balancer(table, region="ams", rng=random.Random(seed), distances={"fra": 9.0, "iad": 80.0})
    req = parse_routing_headers(headers)                 # fly-prefer-region, fly-force-instance-id, ...
    decision = balancer.choose_for_host(host, req, now=loop.time()) if isinstance(req, RouteRequest) else req
    match decision:
        case Route(instance, slot):   ...  # connect; slot.release() exactly when the request/connection ends
        case Forward(region):         ...  # one hop to a proxy in `region`
        case Queue():                 ...  # wait (bounded, with a timeout) for a release, then choose again
        case Reject(status, code):    ...  # answer the client

The rules, and why:

* **Healthy, started, local first.** Candidates are the app's instances in this region that the table
  calls healthy (started, routable, all checks passing), that passive health has not ejected and that
  the request does not exclude (a replay's ``elsewhere=true``). Requests leave the region only when no
  local candidate is below its hard limit: a local instance over its *soft* limit is still closer than
  any remote one.
* **Least loaded, limits honoured.** Load is the number of in-flight slots the :class:`LoadTracker` has
  handed out for an instance, in the app's unit (``requests``: one per request; ``connections``: one per
  client connection, held by the server while it lasts). With several worker processes the tracker is a
  :class:`~verdigris.proxy.shared_load.SharedLoadTracker` and loads are totals over every worker.
  Instances below ``soft_limit`` are preferred; one at or over it gets traffic only when all candidates
  are; one at ``hard_limit`` gets none. Among the least loaded, ties are broken by the injected
  ``random.Random``, so a run is reproducible from its seed. A limit of 0 means no limit.
* **The slot is taken in the decision.** A :class:`Route` carries the :class:`Slot` it acquired, so no
  caller can route past the hard limit by forgetting to count; :meth:`Slot.release` is idempotent, so no
  caller can release twice. Under a hard limit the slot is taken with
  :meth:`LoadTracker.try_acquire` (atomic across workers): if another worker took the last slot since
  the loads were read, the choice is made again.
* **Then the nearest region**, by the ``distances`` map (RTT from this region; unknown = farthest, ties
  at random), among the regions the app is in (global summary plus the table's own instances). A request
  that was already forwarded once (``may_forward=False``) is never forwarded again: one hop at most.
* **Queue when full.** When every local candidate is at its hard limit and there is nowhere to forward,
  the answer is :class:`Queue`; the server waits with a bound and a timeout, then answers 503.
* **Under the table's read side.** :meth:`Balancer.choose` and :meth:`Balancer.choose_for_host` hold the
  read side of :attr:`RoutingTable.lock` for the whole decision (one acquire per request); the
  subscriptions' apply path takes the write side. The supervisor's probe routes through
  :meth:`Balancer.choose_for_host` too, so a worker whose lock is stuck stops answering probes.
* **Request headers** (as Fly's): ``fly-force-instance-id`` routes to that instance or fails clearly,
  never elsewhere; ``fly-prefer-instance-id`` routes there when it can take the request, else as usual;
  ``fly-force-region`` keeps the request in that region (forwarding there if it is not this one);
  ``fly-prefer-region`` tries that region first, then as usual. A region list (from ``fly-replay``) is
  tried in order; ``any`` in it means "as usual" at that point.

Passive health: :class:`OutlierDetector` ejects an instance after consecutive connect failures or a burst
of consecutive 5xx responses, for ``base_ejection`` seconds doubling on each repeat up to
``max_ejection``; times come in as ``now``.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Container, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final, TypeAlias

from verdigris.proxy.errors import ErrorCode, Reject
from verdigris.proxy.table import App, Instance, RoutingTable, normalize_host

ANY_REGION: Final = "any"
"""In a region list: every region, in the usual order (local, then nearest)."""

PREFER_REGION_HEADER: Final = "fly-prefer-region"
FORCE_REGION_HEADER: Final = "fly-force-region"
PREFER_INSTANCE_HEADER: Final = "fly-prefer-instance-id"
FORCE_INSTANCE_HEADER: Final = "fly-force-instance-id"
ROUTING_HEADERS: Final = (
    PREFER_REGION_HEADER,
    FORCE_REGION_HEADER,
    PREFER_INSTANCE_HEADER,
    FORCE_INSTANCE_HEADER,
)

REGION_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
"""A region code (Fly's are three letters; ours may be longer, e.g. ``eu-west``)."""
INSTANCE_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
"""An instance id as accepted in headers: safe to echo into another header."""


# ------------------------------------------------------------------------------------------------ requests


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What the client (routing headers) or a replay asks of the routing, beyond the app."""

    regions: tuple[str, ...] = (ANY_REGION,)
    """Regions to try, in order; ``any`` = local then nearest. Without ``any``, only these regions."""
    force_instance: str | None = None
    """Only this instance, or a clear error."""
    prefer_instance: str | None = None
    """This instance when it can take the request, else the usual choice."""
    exclude: frozenset[str] = frozenset()
    """Instances not to use (``elsewhere=true`` of a replay excludes the instance that asked)."""
    may_forward: bool = True
    """False for a request another proxy already forwarded here: one hop at most."""


DEFAULT_REQUEST: Final = RouteRequest()


def parse_routing_headers(
    headers: Iterable[tuple[str, str]], *, may_forward: bool = True
) -> RouteRequest | Reject:
    """The :class:`RouteRequest` of a client request's ``fly-*`` routing headers (names in any case).

    A malformed value or a header given twice is a 400 ``bad_routing_header`` (never guessed at); an empty
    value counts as absent. ``force`` beats ``prefer`` for the same dimension.
    """
    found: dict[str, str] = {}
    for name, value in headers:
        key = name.lower()
        if key not in ROUTING_HEADERS:
            continue
        if key in found:
            return Reject(400, ErrorCode.BAD_ROUTING_HEADER, f"{key} given more than once")
        found[key] = value.strip(" \t")
    if not found and may_forward:
        return DEFAULT_REQUEST  # the usual request (immutable: no new object per request)
    regions: tuple[str, ...] = (ANY_REGION,)
    for key, strict in ((FORCE_REGION_HEADER, True), (PREFER_REGION_HEADER, False)):
        value = found.get(key, "").lower()
        if not value:
            continue
        if not REGION_RE.fullmatch(value):
            return Reject(400, ErrorCode.BAD_ROUTING_HEADER, f"{key}: {value[:64]!r} is not a region code")
        if value != ANY_REGION:
            regions = (value,) if strict else (value, ANY_REGION)
        break
    ids: dict[str, str | None] = {}
    for key in (FORCE_INSTANCE_HEADER, PREFER_INSTANCE_HEADER):
        value = found.get(key, "")
        if value and not INSTANCE_ID_RE.fullmatch(value):
            return Reject(400, ErrorCode.BAD_ROUTING_HEADER, f"{key}: {value[:64]!r} is not an instance id")
        ids[key] = value or None
    force = ids[FORCE_INSTANCE_HEADER]
    return RouteRequest(
        regions=regions,
        force_instance=force,
        prefer_instance=None if force else ids[PREFER_INSTANCE_HEADER],
        may_forward=may_forward,
    )


# ------------------------------------------------------------------------------------------------ load


class Slot:
    """One unit of in-flight load on an instance, held from :class:`Route` until :meth:`release`."""

    __slots__ = ("_released", "_tracker", "instance_id")

    def __init__(self, tracker: LoadTracker, instance_id: str) -> None:
        self._tracker = tracker
        self.instance_id = instance_id
        self._released = False

    @property
    def released(self) -> bool:
        return self._released

    def release(self) -> bool:
        """Give the slot back; True the first time, False (and nothing happens) after that."""
        if self._released:
            return False
        self._released = True
        self._tracker._release(self.instance_id)
        return True

    def __repr__(self) -> str:
        return f"Slot({self.instance_id!r}, released={self._released})"


class LoadTracker:
    """In-flight slots per instance, counted in this process (a single worker, unit tests).
    :class:`~verdigris.proxy.shared_load.SharedLoadTracker` counts across worker processes."""

    def __init__(self) -> None:
        self._load: dict[str, int] = {}
        self.total = 0
        """Slots this tracker handed out and that are not released."""
        self.lookup: Callable[[str, int], int] = self._load.get
        """``lookup(instance_id, 0)``: the load, in the fastest form (the balancer's hot path)."""

    def load(self, instance_id: str) -> int:
        return self._load.get(instance_id, 0)

    def acquire(self, instance_id: str) -> Slot:
        """Take a slot unconditionally (no limit to honour)."""
        self._load[instance_id] = self._load.get(instance_id, 0) + 1
        self.total += 1
        return Slot(self, instance_id)

    def try_acquire(self, instance_id: str, limit: int) -> Slot | None:
        """Take a slot if the load is below ``limit`` (0: no limit), atomically; else ``None``."""
        if 0 < limit <= self._load.get(instance_id, 0):
            return None
        return self.acquire(instance_id)

    def _release(self, instance_id: str) -> None:
        n = self._load.get(instance_id, 0) - 1
        if n > 0:
            self._load[instance_id] = n
        else:
            self._load.pop(instance_id, None)
        self.total -= 1

    def loads(self) -> dict[str, int]:
        """Instance id -> slots held (instances with none are absent)."""
        return dict(self._load)


# ------------------------------------------------------------------------------------------------ passive health


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    """When to eject an instance, and for how long. Defaults follow Envoy's outlier detection (which
    ejects after 5 consecutive 5xx for 30 s × the number of ejections), with connect failures counted
    apart and sooner: a refused connection says more than one error response."""

    consecutive_connect_failures: int = 3
    consecutive_5xx: int = 5
    base_ejection: float = 30.0
    max_ejection: float = 300.0
    """Longest ejection; also how long an instance must stay clean for its ejection count to reset."""
    max_tracked: int = 100_000
    """Bound on instances with failure state (principle 5); beyond it new failures are only counted."""


@dataclass(slots=True)
class _Outlier:
    connect_failures: int = 0
    errors_5xx: int = 0
    ejected_until: float = -math.inf
    ejections: int = 0


@dataclass
class OutlierStats:
    ejections: int = 0
    connect_failures: int = 0
    responses_5xx: int = 0
    untracked: int = 0


class OutlierDetector:
    """Passive health: consecutive connect failures or 5xx responses eject an instance for a while.

    A success (any response below 500) resets the instance's counters. Failures reported while the
    instance is ejected (requests that were already in flight) do not extend the ejection. Each ejection
    lasts ``base_ejection * 2**(n-1)`` (capped at ``max_ejection``), ``n`` counting the ejections since
    the instance last stayed clean for ``max_ejection``.
    """

    def __init__(self, config: OutlierConfig | None = None) -> None:
        self.config = config or OutlierConfig()
        self.stats = OutlierStats()
        self._state: dict[str, _Outlier] = {}

    def is_ejected(self, instance_id: str, now: float) -> bool:
        st = self._state.get(instance_id)
        return st is not None and now < st.ejected_until

    def ejected_until(self, instance_id: str, now: float) -> float | None:
        """When the ejection of ``instance_id`` ends, or ``None`` if it is not ejected at ``now``."""
        st = self._state.get(instance_id)
        return st.ejected_until if st is not None and now < st.ejected_until else None

    def connect_failed(self, instance_id: str, now: float) -> bool:
        """A connection to the instance failed (refused, reset, timed out). True if this ejected it."""
        self.stats.connect_failures += 1
        st = self._track(instance_id, now)
        if st is None:
            return False
        st.connect_failures += 1
        if st.connect_failures >= self.config.consecutive_connect_failures:
            self._eject(st, now)
            return True
        return False

    def response(self, instance_id: str, status: int, now: float) -> bool:
        """The instance answered with ``status``. True if this ejected it."""
        if status < 500:
            st = self._state.get(instance_id)
            if st is not None and now >= st.ejected_until:
                st.connect_failures = st.errors_5xx = 0
                if now - st.ejected_until > self.config.max_ejection:
                    del self._state[instance_id]
            return False
        self.stats.responses_5xx += 1
        st = self._track(instance_id, now)
        if st is None:
            return False
        st.errors_5xx += 1
        if st.errors_5xx >= self.config.consecutive_5xx:
            self._eject(st, now)
            return True
        return False

    def forget(self, instance_id: str) -> None:
        """Drop the state of an instance that is gone."""
        self._state.pop(instance_id, None)

    def prune(self, now: float, keep: Container[str] | None = None) -> int:
        """Drop state that no longer matters (ejection over and decayed, no pending failures) and, when
        ``keep`` is given, the state of every instance not in it. Returns the number dropped."""
        drop = [
            iid
            for iid, st in self._state.items()
            if (keep is not None and iid not in keep)
            or (
                now - st.ejected_until > self.config.max_ejection
                and st.connect_failures == 0
                and st.errors_5xx == 0
            )
        ]
        for iid in drop:
            del self._state[iid]
        return len(drop)

    def __len__(self) -> int:
        return len(self._state)

    def _track(self, instance_id: str, now: float) -> _Outlier | None:
        st = self._state.get(instance_id)
        if st is None:
            if len(self._state) >= self.config.max_tracked:
                self.stats.untracked += 1
                return None
            st = self._state[instance_id] = _Outlier()
        if now < st.ejected_until:
            return None
        return st

    def _eject(self, st: _Outlier, now: float) -> None:
        cfg = self.config
        if now - st.ejected_until > cfg.max_ejection:
            st.ejections = 0
        st.ejections += 1
        duration = min(cfg.base_ejection * 2.0 ** min(st.ejections - 1, 30), cfg.max_ejection)
        st.ejected_until = now + duration
        st.connect_failures = st.errors_5xx = 0
        self.stats.ejections += 1


# ------------------------------------------------------------------------------------------------ decisions


@dataclass(frozen=True, slots=True)
class Route:
    """Send the request to ``instance`` (in this region). ``slot`` is already acquired when the balancer
    was asked to acquire: release it exactly when the request (or connection) ends."""

    instance: Instance
    slot: Slot | None


@dataclass(frozen=True, slots=True)
class Forward:
    """Send the request to a proxy in ``region`` (one hop; the forwarded request has ``may_forward``
    false there). ``instance`` is set when the request targets that instance (forced or preferred)."""

    region: str
    app: str
    instance: str | None = None
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Queue:
    """Every candidate is at its hard limit and there is nowhere else to go: wait (bounded, with a
    timeout) for a slot of ``app`` (of ``instance`` if set) to be released, then choose again."""

    app: str
    instance: str | None = None
    reason: str = ""


Decision: TypeAlias = Route | Forward | Queue | Reject


class _FullType:
    """Internal marker: local candidates exist but all are at their hard limit."""


_FULL: Final = _FullType()
_TAKE_ATTEMPTS: Final = 4
"""Choices per region when the chosen instance's last slot is taken meanwhile (by another worker)."""


class Balancer:
    """Chooses an instance (or another region, a wait, or a refusal) for each request. See the module
    docstring for the rules."""

    def __init__(
        self,
        table: RoutingTable,
        region: str,
        *,
        rng: random.Random,
        distances: Mapping[str, float] | None = None,
        load: LoadTracker | None = None,
        outliers: OutlierDetector | None = None,
    ) -> None:
        self.table = table
        self.region = region
        self.rng = rng
        self.distances: Mapping[str, float] = distances or {}
        self.load = load if load is not None else LoadTracker()
        self.outliers = outliers if outliers is not None else OutlierDetector()

    def choose_for_host(
        self, host: str, req: RouteRequest = DEFAULT_REQUEST, *, now: float, acquire: bool = True
    ) -> Decision:
        """:meth:`choose` for the app serving Host header value ``host`` (host lookup and decision under
        one hold of the table's read side)."""
        with self.table.lock.read():
            app = self.table.app_for_host(host)
            if app is None:
                if normalize_host(host) is None:
                    return Reject(400, ErrorCode.BAD_HOST, f"{host[:256]!r} is not a host name")
                return Reject(404, ErrorCode.NO_SUCH_APP, f"no app is registered for host {host[:256]!r}")
            return self._choose(app, req, now, acquire)

    def choose(
        self, app_name: str, req: RouteRequest = DEFAULT_REQUEST, *, now: float, acquire: bool = True
    ) -> Decision:
        """Where a request for ``app_name`` goes. With ``acquire``, a :class:`Route` holds a slot. The
        table is read under the read side of its lock (:attr:`RoutingTable.lock`)."""
        with self.table.lock.read():
            return self._choose(app_name, req, now, acquire)

    def _choose(self, app_name: str, req: RouteRequest, now: float, acquire: bool) -> Decision:
        app = self.table.app(app_name)
        if app is None:
            return Reject(404, ErrorCode.NO_SUCH_APP, f"no app named {app_name[:256]!r}")
        if req.force_instance is not None:
            return self._forced(app, req.force_instance, req, now, acquire)
        if req.prefer_instance is not None:
            preferred = self._preferred(app, req.prefer_instance, req, now, acquire)
            if preferred is not None:
                return preferred
        tried: set[str] = set()
        full = blocked = False
        first = req.regions[0] if req.regions else None
        if first == ANY_REGION or first == self.region:  # the usual request: this region first, no walk
            pick = self._take_local(app, req, now, acquire)
            if isinstance(pick, Route):
                return pick
            full = pick is _FULL
            tried.add(self.region)
        for region in self._steps(app.name, req.regions):
            if region in tried:
                continue
            tried.add(region)
            if region == self.region:
                pick = self._take_local(app, req, now, acquire)
                if isinstance(pick, Route):
                    return pick
                full = full or pick is _FULL
            elif region in self.table.regions(app.name):
                if req.may_forward:
                    return Forward(
                        region, app.name, None, f"no instance of {app.name} can take it in {self.region}"
                    )
                blocked = True
        if full:
            return Queue(app.name, None, f"every usable instance of {app.name} is at its hard limit")
        if blocked:
            return Reject(
                503,
                ErrorCode.NO_HEALTHY_INSTANCE,
                f"no usable instance of {app.name} in {self.region}, and the request was already forwarded once",
            )
        if ANY_REGION not in req.regions:
            return Reject(
                503,
                ErrorCode.NO_INSTANCE_IN_REGION,
                f"no usable instance of {app.name} in {', '.join(req.regions) or 'no region'}",
            )
        return Reject(503, ErrorCode.NO_HEALTHY_INSTANCE, f"no usable instance of {app.name}")

    def usable(self, inst: Instance, req: RouteRequest, now: float) -> bool:
        """Healthy in the table, not ejected, not excluded (limits aside)."""
        return (
            self.table.is_healthy(inst)
            and inst.id not in req.exclude
            and not self.outliers.is_ejected(inst.id, now)
        )

    def below_hard_limit(self, app: App, instance_id: str) -> bool:
        return app.hard_limit <= 0 or self.load.load(instance_id) < app.hard_limit

    # -------------------------------------------------------------------------------- internals

    def _route(self, inst: Instance, acquire: bool, hard_limit: int) -> Route | None:
        """A Route holding a slot of ``inst`` (with ``acquire``), or ``None`` if it is at its hard limit
        after all: the tracker takes the slot atomically, and other workers may have taken the last one
        since the loads were read."""
        if not acquire:
            return Route(inst, None)
        if hard_limit <= 0:
            return Route(inst, self.load.acquire(inst.id))
        slot = self.load.try_acquire(inst.id, hard_limit)
        return None if slot is None else Route(inst, slot)

    def _take_local(self, app: App, req: RouteRequest, now: float, acquire: bool) -> Route | _FullType | None:
        """:meth:`_pick_local`, and its slot. When the slot is gone by the time it is taken (another worker
        took it), choose again with the new loads, a few times at most, then call the region full."""
        for _ in range(_TAKE_ATTEMPTS):
            pick = self._pick_local(app, req, now)
            if not isinstance(pick, Instance):
                return pick
            route = self._route(pick, acquire, app.hard_limit)
            if route is not None:
                return route
        return _FULL

    def _steps(self, app: str, regions: tuple[str, ...]) -> Iterator[str]:
        """Regions to try, in order; ``any`` expands (lazily: the local pick usually ends the walk) to
        this region, then the app's other regions nearest first."""
        for r in regions:
            if r == ANY_REGION:
                yield self.region
                yield from self._remote_regions(app)
            else:
                yield r

    def _remote_regions(self, app: str) -> list[str]:
        others = [r for r in self.table.regions(app) if r != self.region]
        others.sort()  # a stable base order, so that the random tie-breaks depend only on the seed
        keyed = [(self.distances.get(r, math.inf), self.rng.random(), r) for r in others]
        keyed.sort()
        return [r for _, _, r in keyed]

    def _pick_local(self, app: App, req: RouteRequest, now: float) -> Instance | _FullType | None:
        """The least loaded usable local instance below its hard limit (preferring those below the soft
        limit), ``_FULL`` when usable ones exist but all are at their hard limit, else ``None``. The hot
        path of every request: one pass over the healthy local instances, no allocation but the pools."""
        hard, soft = app.hard_limit, app.soft_limit
        lookup = self.load.lookup
        ejected = self.outliers._state  # usually empty: skip the lookup entirely then
        exclude = req.exclude
        under: list[Instance] = []  # below the soft limit, least loaded so far
        under_n = math.inf
        over: list[Instance] = []  # at/over the soft limit, below the hard limit
        over_n = math.inf
        seen = False
        for inst in self.table.healthy_instances(app.name, self.region):
            iid = inst.id
            if exclude and iid in exclude:
                continue
            if ejected:
                st = ejected.get(iid)
                if st is not None and now < st.ejected_until:
                    continue
            seen = True
            n = lookup(iid, 0)
            if 0 < hard <= n:
                continue
            if soft <= 0 or n < soft:
                if n < under_n:
                    under, under_n = [inst], n
                elif n == under_n:
                    under.append(inst)
            elif not under:
                if n < over_n:
                    over, over_n = [inst], n
                elif n == over_n:
                    over.append(inst)
        pool = under or over
        if pool:
            return pool[0] if len(pool) == 1 else self.rng.choice(pool)
        return _FULL if seen else None

    def _forced(self, app: App, iid: str, req: RouteRequest, now: float, acquire: bool) -> Decision:
        inst = self.table.instance(iid)
        if inst is None or inst.app != app.name:
            return Reject(404, ErrorCode.NO_SUCH_INSTANCE, f"app {app.name} has no instance {iid}")
        if inst.region != self.region:
            if not req.may_forward:
                return Reject(
                    503,
                    ErrorCode.INSTANCE_UNAVAILABLE,
                    f"instance {iid} is in {inst.region}, and the request was already forwarded once",
                )
            return Forward(inst.region, app.name, iid, f"instance {iid} is in {inst.region}")
        if iid in req.exclude:
            return Reject(503, ErrorCode.INSTANCE_UNAVAILABLE, f"instance {iid} is excluded (elsewhere=true)")
        reason = self.table.unhealthy_reason(inst)
        if reason is not None:
            return Reject(503, ErrorCode.INSTANCE_UNAVAILABLE, reason)
        until = self.outliers.ejected_until(iid, now)
        if until is not None:
            return Reject(
                503,
                ErrorCode.INSTANCE_UNAVAILABLE,
                f"instance {iid} is ejected after failures for {until - now:.1f} s more",
            )
        full = Queue(app.name, iid, f"instance {iid} is at its hard limit ({app.hard_limit})")
        if not self.below_hard_limit(app, iid):
            return full
        return self._route(inst, acquire, app.hard_limit) or full

    def _preferred(self, app: App, iid: str, req: RouteRequest, now: float, acquire: bool) -> Decision | None:
        inst = self.table.instance(iid)
        if inst is None or inst.app != app.name or not self.usable(inst, req, now):
            return None
        if inst.region == self.region:
            return self._route(inst, acquire, app.hard_limit) if self.below_hard_limit(app, iid) else None
        if req.may_forward and (ANY_REGION in req.regions or inst.region in req.regions):
            return Forward(inst.region, app.name, iid, f"preferred instance {iid} is in {inst.region}")
        return None


__all__ = [
    "ANY_REGION",
    "DEFAULT_REQUEST",
    "FORCE_INSTANCE_HEADER",
    "FORCE_REGION_HEADER",
    "PREFER_INSTANCE_HEADER",
    "PREFER_REGION_HEADER",
    "ROUTING_HEADERS",
    "Balancer",
    "Decision",
    "Forward",
    "LoadTracker",
    "OutlierConfig",
    "OutlierDetector",
    "OutlierStats",
    "Queue",
    "Reject",
    "Route",
    "RouteRequest",
    "Slot",
    "parse_routing_headers",
]
