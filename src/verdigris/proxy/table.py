"""The proxy's routing table: an in-memory view of the platform state, fed by agent subscriptions.

The facts live in the store (ARCHITECTURE.md, principle 2); each proxy worker keeps only this view, built
from one subscription per table (:data:`QUERIES`) on the local agent and updated incrementally from their
change events. It answers the questions the balancer asks on every request, each in O(1) or in the size
of the answer: which app serves this host, what are the app's limits, which instances does it have in a
region, is this instance healthy, which regions is the app in.

Sans-IO: the table never opens a connection. The server reads the NDJSON streams
(:class:`verdigris.api.client.CorrosionClient`) and hands every event to :meth:`RoutingTable.feed`::

    table = RoutingTable()
    for name, sql in QUERIES.items():                    # one stream each
        stream = client.subscribe(sql)                    # later: subscribe_by_id(id, from_=last)
        table.attached(name, stream.query_id)
        async for event in stream:
            problem = table.feed(name, event)
            if problem is not None and problem.resubscribe:
                ...                                        # reconnect *without* from= (fresh snapshot)

Rules, and why:

* **Per-table queries, joined in memory.** A join (instances x checks) would repeat every instance per
  check and turn one check flapping into an update of a wide row; per-table streams keep each change
  small and let health be a counter of failing checks per instance.
* **Snapshots swap atomically.** A (re)subscription streams ``columns``, rows, then ``eoq``. The rows are
  staged aside and replace the previous ones only at ``eoq``, so a worker keeps serving on its last
  complete table while the agent restarts or a resubscription is in flight.
* **Resumable, never silently gapped.** Change ids increase by exactly one per subscription. The table
  keeps the last one (:meth:`RoutingTable.resume_point`); a change at or below it is a duplicate from a
  resume and is ignored; a change beyond ``last + 1`` is a gap, is not applied, and asks for a fresh
  snapshot.
* **Bad rows are counted, not fatal.** A row of the wrong shape is kept under its row id (so a later
  update or delete of it works) but contributes nothing to routing; a value out of its domain (an
  unknown concurrency type, a negative limit) falls back to the documented default. Both are reported.
  Nothing in :meth:`RoutingTable.feed` raises on any input.

Health: an instance is *healthy* when its state is ``started``, its address parses, and every one of its
checks is ``passing`` (an instance without checks is healthy once started). The healthy instances of
each (app, region) are kept as a set, updated on the (rare) machine and check changes, so that the
balancer never evaluates health on the (frequent) requests. Passive health (outlier ejection) and load
are the balancer's business (:mod:`verdigris.proxy.balance`).

Locking: the table is read on every request (the balancer's :meth:`~verdigris.proxy.balance.Balancer.choose`
takes the read side of :attr:`RoutingTable.lock`) and changed by the subscriptions (:meth:`RoutingTable.feed`
takes the write side around each event). The lock is the project's :class:`~verdigris.watchdog.rwlock.RWLock`
(``[proxy] table_lock = "project"``), which refuses a read→write upgrade with an error instead of
deadlocking; ``"plain"`` (:class:`~verdigris.watchdog.rwlock.PlainRWLock`, fault injection only) is the
naive lock behind the original outage.

The incident switch (``[proxy.fault] incident_row``, fault injection only; :class:`IncidentRow`): a *change*
(insert, update or delete; not the rows of a snapshot, so a restarted worker loads the row and lives) of
that one row is applied the way the outage's code did it: under the read side of the table lock, and
then, lower in the same call tree, under the write side. With the plain lock the worker's thread (its
event loop) waits for itself forever; the supervisor's probe times out and the watchdog replaces it. With
the project lock :class:`~verdigris.watchdog.rwlock.LockUpgradeError` is raised at once: that one change is
refused (not applied, its change id consumed so that the stream goes on without a gap), logged as one
``table_apply_refused`` error event carrying both stacks, counted in :attr:`TableStats.apply_refused`, and
the table keeps serving and applying every other change.

Host names: lower case, no port, no trailing dot. ``*.example.com`` matches any name that ends in
``.example.com`` (at any depth, not ``example.com`` itself); an exact name beats every wildcard, and the
longest matching wildcard wins.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from sys import intern
from typing import Final, Literal, TypeAlias

from verdigris.api.wire import Change, Columns, EndOfQuery, Error, Event, Notify, Row
from verdigris.store.types import SqlValue
from verdigris.watchdog.rwlock import LockError, PlainRWLock, RWLock, SyncRWLock

log = logging.getLogger("verdigris.proxy.table")

Concurrency: TypeAlias = Literal["connections", "requests"]
ProblemKind: TypeAlias = Literal[
    "gap", "protocol", "bad_row", "coerced", "stream_error", "unknown_subscription", "refused"
]

QUERIES: Final[Mapping[str, str]] = {
    "apps": "SELECT name, org, concurrency, soft_limit, hard_limit FROM apps",
    "hostnames": "SELECT hostname, app FROM hostnames",
    "app_regions": "SELECT app, region FROM app_regions",
    "machines": "SELECT id, app, region, state, address FROM machines",
    "services": "SELECT app, port, protocol, handlers, internal_port, force_https FROM services",
    "checks": "SELECT machine, name, status FROM checks",
    "proxies": "SELECT id, region, address FROM proxies",
    "region_rtt": "SELECT src, dst, rtt_ms FROM region_rtt",
}
"""The subscriptions the table is built from: name -> SQL. Each is a plain single-table SELECT, which the
agent maintains incrementally by primary key."""

_REQUIRED: Final[Mapping[str, tuple[str, ...]]] = {
    "apps": ("name", "org", "concurrency", "soft_limit", "hard_limit"),
    "hostnames": ("hostname", "app"),
    "app_regions": ("app", "region"),
    "machines": ("id", "app", "region", "state", "address"),
    "services": ("app", "port", "protocol", "handlers", "internal_port", "force_https"),
    "checks": ("machine", "name", "status"),
    "proxies": ("id", "region", "address"),
    "region_rtt": ("src", "dst", "rtt_ms"),
}

PRIMARY_KEYS: Final[Mapping[str, tuple[str, ...]]] = {
    "apps": ("name",),
    "hostnames": ("hostname",),
    "app_regions": ("app", "region"),
    "machines": ("id",),
    "services": ("app", "port"),
    "checks": ("machine", "name"),
    "proxies": ("id",),
    "region_rtt": ("src", "dst"),
}
"""The primary key columns of each subscribed table (schemas/platform.sql), for :class:`IncidentRow`."""

OPTIONAL: Final = frozenset({"proxies", "region_rtt"})
"""Subscriptions :attr:`RoutingTable.ready` does not wait for: without them (an agent whose schema does
not have the tables yet) the proxy routes locally and cannot forward to other regions."""

DEFAULT_CONCURRENCY: Final[Concurrency] = "requests"
HOST_CACHE_SIZE: Final = 4096
"""Distinct Host header values whose answer is memoised (see :meth:`RoutingTable.app_for_host`)."""
MAX_PROBLEMS: Final = 100
"""Recent problems kept for inspection (older ones are only counted)."""

_HOST_RE: Final = re.compile(r"[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*")
"""A DNS name (underscores tolerated, as in service names); IP literals are matched separately."""
_PORT_RE: Final = re.compile(r"[0-9]{1,5}")


# ------------------------------------------------------------------------------------------------ records


@dataclass(frozen=True, slots=True)
class App:
    """An app and its per-instance concurrency limits (0 means no limit)."""

    name: str
    org: str
    concurrency: Concurrency
    soft_limit: int
    hard_limit: int


@dataclass(frozen=True, slots=True)
class Instance:
    """An instance (machine) of an app. ``host``/``port`` are parsed from ``address``; ``None`` when the
    address is missing or malformed, which makes the instance unroutable."""

    id: str
    app: str
    region: str
    state: str
    address: str | None
    host: str | None
    port: int | None


@dataclass(frozen=True, slots=True)
class Service:
    """A public port of an app: how to handle it and where to send it on the instance."""

    app: str
    port: int
    protocol: str
    handlers: tuple[str, ...]
    internal_port: int
    force_https: bool


@dataclass(frozen=True, slots=True)
class _Hostname:
    hostname: str
    app: str


@dataclass(frozen=True, slots=True)
class _AppRegion:
    app: str
    region: str


@dataclass(frozen=True, slots=True)
class _Check:
    machine: str
    name: str
    passing: bool


@dataclass(frozen=True, slots=True)
class PeerProxy:
    """A proxy registered in the ``proxies`` table: where a request forwarded to its region goes."""

    id: str
    region: str
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class _Rtt:
    src: str
    dst: str
    rtt_ms: float


class Distances(Mapping[str, float]):
    """Region -> RTT in ms from ``region``, read live from the table's ``region_rtt`` rows (a pair
    measured only the other way round counts too). Given to the balancer as its ``distances``."""

    def __init__(self, table: RoutingTable, region: str) -> None:
        self._table = table
        self._region = region

    def __getitem__(self, dst: str) -> float:
        rtt = self._table._rtt
        v = rtt.get(self._region, {}).get(dst)
        if v is None:
            v = rtt.get(dst, {}).get(self._region)
        if v is None:
            raise KeyError(dst)
        return v

    def __iter__(self) -> Iterator[str]:
        rtt = self._table._rtt
        keys = set(rtt.get(self._region, ()))
        keys.update(src for src, d in rtt.items() if self._region in d)
        return iter(sorted(keys))

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __bool__(self) -> bool:  # an empty view is still the live one
        return True


_Record: TypeAlias = App | Instance | Service | _Hostname | _AppRegion | _Check | PeerProxy | _Rtt


@dataclass(frozen=True, slots=True)
class IncidentRow:
    """The row whose changes trigger the incident (``[proxy.fault] incident_row``): a subscribed table and
    its primary key value, written ``"<table>:<key>"``, the parts of a composite key separated by ``/``
    (``"apps:incident-trigger"``, ``"checks:m1/http"``). Key values compare as text (``services:web/80``)."""

    table: str
    key: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> IncidentRow:
        """``"<table>:<key>"`` -> IncidentRow; ValueError saying what is wrong."""
        table, sep, key = text.partition(":")
        if not sep or not table or not key:
            raise ValueError(
                f'expected "<table>:<primary key value>" (e.g. "apps:incident-trigger"), got {text!r}'
            )
        columns = PRIMARY_KEYS.get(table)
        if columns is None:
            raise ValueError(f"unknown table {table!r} (known: {', '.join(sorted(PRIMARY_KEYS))})")
        parts = tuple(key.split("/")) if len(columns) > 1 else (key,)
        if len(parts) != len(columns) or not all(parts):
            raise ValueError(
                f"table {table} has the primary key ({', '.join(columns)}): write {len(columns)} "
                f"non-empty value(s) separated by '/', got {key!r}"
            )
        return cls(table, parts)

    def matches(self, index: Mapping[str, int], values: Sequence[SqlValue]) -> bool:
        """Whether a row of this table (``values`` in the column order of ``index``) is this row."""
        for column, want in zip(PRIMARY_KEYS[self.table], self.key, strict=True):
            i = index.get(column)
            if i is None or i >= len(values):
                return False
            v = values[i]
            if v is None or (str(v) if not isinstance(v, str) else v) != want:
                return False
        return True

    def __str__(self) -> str:
        return f"{self.table}:{'/'.join(self.key)}"


@dataclass(frozen=True, slots=True)
class FeedProblem:
    """Something :meth:`RoutingTable.feed` could not apply as is. ``resubscribe`` means the view of this
    subscription can no longer be trusted to follow the agent: reconnect *without* ``from=``."""

    subscription: str
    kind: ProblemKind
    message: str
    resubscribe: bool


@dataclass
class TableStats:
    """Counters, for metrics."""

    events: int = 0
    snapshots: int = 0
    changes: int = 0
    duplicates: int = 0
    gaps: int = 0
    protocol_errors: int = 0
    bad_rows: int = 0
    coerced: int = 0
    stream_errors: int = 0
    apply_refused: int = 0
    """Changes refused because applying them would have deadlocked on the table lock (the incident)."""


class _BadRow(Exception):
    """Internal: a row that cannot be decoded (never escapes :meth:`RoutingTable.feed`)."""


@dataclass
class _Feed:
    """The state of one subscription."""

    name: str
    query_id: str | None = None
    index: dict[str, int] | None = None
    """Column name -> position, from the last complete ``columns`` event."""
    rows: dict[int, _Record | None] = field(default_factory=dict)
    """Row id -> decoded record (``None``: a bad row, kept so that its update/delete can be applied)."""
    staging: dict[int, _Record | None] | None = None
    staging_index: dict[str, int] | None = None
    last_change_id: int | None = None
    ready: bool = False
    """A complete snapshot has been applied at least once."""


# ------------------------------------------------------------------------------------------------ helpers


def make_lock(kind: str) -> SyncRWLock:
    """The table lock of ``[proxy] table_lock``: ``"project"`` -> :class:`RWLock` (refuses an upgrade),
    ``"plain"`` -> :class:`PlainRWLock` (deadlocks on one: fault injection only)."""
    if kind == "project":
        return RWLock("routing table")
    if kind == "plain":
        return PlainRWLock("routing table")
    raise ValueError(f"table lock: expected 'project' or 'plain', got {kind!r}")


def normalize_host(host: str) -> str | None:
    """The routing key of a Host header value: lower case, port and trailing dot removed, brackets kept
    for IPv6 literals. ``None`` when it is not a host name or IP literal."""
    h = host.strip().lower()
    if not h or len(h) > 260:
        return None
    if h.startswith("["):
        end = h.find("]")
        if end < 0:
            return None
        rest = h[end + 1 :]
        if rest and not (rest.startswith(":") and _PORT_RE.fullmatch(rest[1:])):
            return None
        inner = h[1:end]
        if not inner or any(c not in "0123456789abcdef:." for c in inner):
            return None
        return h[: end + 1]
    if ":" in h:
        h, _, port = h.rpartition(":")
        if not _PORT_RE.fullmatch(port):
            return None
    if h.endswith("."):
        h = h[:-1]
    if not h or len(h) > 253 or not _HOST_RE.fullmatch(h):
        return None
    return h


def parse_address(address: str | None) -> tuple[str, int] | None:
    """``'host:port'`` or ``'[v6]:port'`` -> ``(host, port)`` (brackets removed); ``None`` if malformed."""
    if not address:
        return None
    a = address.strip()
    if a.startswith("["):
        end = a.find("]")
        if end < 0 or not a[end + 1 :].startswith(":"):
            return None
        host, port_s = a[1:end], a[end + 2 :]
    else:
        host, sep, port_s = a.rpartition(":")
        if not sep or ":" in host:
            return None
    if not host or any(c.isspace() or ord(c) < 0x21 for c in host) or not _PORT_RE.fullmatch(port_s):
        return None
    port = int(port_s)
    if not 0 < port < 65536:
        return None
    return host, port


def _drop(index: dict[str, dict[str, dict[str, Instance]]], inst: Instance) -> None:
    """Remove ``inst`` from an app -> region -> id index, pruning empty levels."""
    by_region = index.get(inst.app)
    if by_region is None:
        return
    ids = by_region.get(inst.region)
    if ids is None:
        return
    ids.pop(inst.id, None)
    if not ids:
        del by_region[inst.region]
        if not by_region:
            del index[inst.app]


def _columns_of(sql: str) -> list[str]:
    """The column names of one of our :data:`QUERIES` (``SELECT a, b FROM t``)."""
    select = sql.split(" FROM ", 1)[0].removeprefix("SELECT ")
    return [c.strip() for c in select.split(",")]


def _text(values: list[SqlValue], index: Mapping[str, int], col: str) -> str:
    v = values[index[col]]
    if isinstance(v, str):
        return v
    if v is None:
        return ""
    raise _BadRow(f"column {col!r} holds {type(v).__name__} {v!r}, expected text")


def _opt_text(values: list[SqlValue], index: Mapping[str, int], col: str) -> str | None:
    v = values[index[col]]
    if v is None or isinstance(v, str):
        return v
    raise _BadRow(f"column {col!r} holds {type(v).__name__} {v!r}, expected text")


def _int(values: list[SqlValue], index: Mapping[str, int], col: str) -> int:
    v = values[index[col]]
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if v is None:
        return 0
    raise _BadRow(f"column {col!r} holds {type(v).__name__} {v!r}, expected an integer")


def _key(value: str, what: str) -> str:
    if not value:
        raise _BadRow(f"empty {what}")
    return value


# ------------------------------------------------------------------------------------------------ table


class RoutingTable:
    """The in-memory routing state of one proxy worker. See the module docstring."""

    def __init__(self, *, lock: SyncRWLock | None = None, incident_row: IncidentRow | None = None) -> None:
        self.lock: SyncRWLock = lock if lock is not None else RWLock("routing table")
        """Read side: a routing decision (the balancer); write side: applying a subscription event."""
        self.incident_row = incident_row
        """Fault injection: changes of this row are applied the way the outage's code did (module doc)."""
        self._feeds: dict[str, _Feed] = {name: _Feed(name) for name in QUERIES}
        self.stats = TableStats()
        self.problems: deque[FeedProblem] = deque(maxlen=MAX_PROBLEMS)
        self.version = 0
        """Increases whenever the routing state changes (for caches keyed on it)."""
        self._change_waiters: list[asyncio.Future[None]] = []
        self._warnings: list[str] = []
        self._host_cache: dict[str, str | None] = {}
        self._host_cache_version = -1
        # Derived indexes.
        self._apps: dict[str, App] = {}
        self._exact: dict[str, str] = {}
        self._wildcard: dict[str, str] = {}
        """Suffix without ``*.`` -> app."""
        self._summary: dict[str, dict[str, int]] = {}
        """app -> region -> 1 (the global summary rows)."""
        self._machines: dict[str, Instance] = {}
        self._by_app_region: dict[str, dict[str, dict[str, Instance]]] = {}
        """app -> region -> id -> instance."""
        self._services: dict[str, dict[int, Service]] = {}
        self._checks: dict[str, dict[str, bool]] = {}
        """machine -> check name -> passing."""
        self._failing: dict[str, int] = {}
        """machine -> number of checks not passing (absent: zero)."""
        self._healthy: dict[str, dict[str, dict[str, Instance]]] = {}
        """app -> region -> id -> instance, for healthy instances only: kept up to date on every machine or
        check change (rare) so that choosing an instance (every request) never evaluates health."""
        self._proxies: dict[str, dict[str, PeerProxy]] = {}
        """region -> proxy id -> proxy (the ``proxies`` rows)."""
        self._rtt: dict[str, dict[str, float]] = {}
        """src -> dst -> RTT in ms (the ``region_rtt`` rows)."""

    # -------------------------------------------------------------------------------- subscriptions

    def _bump(self) -> None:
        """The routing state changed: a new :attr:`version`, and whoever awaits :meth:`next_change` wakes."""
        self.version += 1
        if self._change_waiters:
            waiters, self._change_waiters = self._change_waiters, []
            for waiter in waiters:
                if not waiter.done():  # a waiter whose wait timed out is cancelled
                    waiter.set_result(None)

    async def next_change(self) -> None:
        """Return after the routing state's next change (:attr:`version` moves). For the rare code that
        waits on the table (a request held for a woken app) instead of polling it; the table is fed on
        the same event loop."""
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._change_waiters.append(waiter)
        await waiter

    @property
    def subscriptions(self) -> tuple[str, ...]:
        return tuple(self._feeds)

    @property
    def ready(self) -> bool:
        """Every subscription has delivered a complete snapshot at least once."""
        return all(f.ready for f in self._feeds.values() if f.name not in OPTIONAL)

    def attached(self, name: str, query_id: str | None) -> None:
        """Record the agent's id of subscription ``name`` (``corro-query-id``), to resume it later."""
        feed = self._feeds.get(name)
        if feed is not None:
            feed.query_id = query_id

    def resume_point(self, name: str) -> tuple[str | None, int | None]:
        """``(query id, last change id)`` of subscription ``name``: resume with
        ``subscribe_by_id(query_id, from_=last)`` when both are known, else subscribe afresh."""
        feed = self._feeds.get(name)
        if feed is None or not feed.ready:
            return (None, None)
        return (feed.query_id, feed.last_change_id)

    def load(self, name: str, rows: Iterable[Sequence[SqlValue]], change_id: int = 0) -> list[FeedProblem]:
        """Apply a whole snapshot of subscription ``name`` at once, rows in the column order of its
        :data:`QUERIES` statement (for static tables, tools and benchmarks). Returns the problems."""
        columns = _columns_of(QUERIES[name]) if name in QUERIES else []
        events: list[Event] = [Columns(columns)]
        events.extend(Row(i, list(values)) for i, values in enumerate(rows, 1))
        events.append(EndOfQuery(0.0, change_id))
        return [p for e in events if (p := self.feed(name, e)) is not None]

    def feed(self, name: str, event: Event) -> FeedProblem | None:
        """Apply one event of subscription ``name`` under the write side of :attr:`lock`. Returns ``None``
        when applied (or a harmless duplicate), else what went wrong; never raises (with the plain lock
        and the incident switch it may block forever: that is the incident)."""
        incident = self.incident_row
        if incident is not None and name == incident.table and isinstance(event, Change):
            feed = self._feeds.get(name)
            if feed is not None and feed.index is not None and incident.matches(feed.index, event.values):
                return self._feed_incident(name, event, incident)
        with self.lock.write():
            return self._feed(name, event)

    def _feed_incident(self, name: str, event: Change, incident: IncidentRow) -> FeedProblem | None:
        """Fault injection: the outage's code path, on purpose. The row is looked at under the read side,
        and the apply below takes the write side while the read side is still held."""
        try:
            # as the outage's `if let Some(row) = table.read().get(key) { ... }`: the read guard lives on
            # while the apply below asks for the write side -- the incident, on purpose (fault injection)
            with self.lock.read():
                return self._apply_under_read(name, event)  # lockcheck: ok
        except LockError as e:  # the project's lock: refused at once, with both stacks
            return self._refused(name, event, incident, e)

    def _apply_under_read(self, name: str, event: Change) -> FeedProblem | None:
        """Lower in the same call tree: the write side, asked while the caller holds the read side."""
        with self.lock.write():
            return self._feed(name, event)

    def _refused(self, name: str, event: Change, incident: IncidentRow, error: LockError) -> FeedProblem:
        """One change refused by the project's lock: consume its change id (the read side is released
        now, so the write side can be had), count it, log one error event with both stacks."""
        with self.lock.write():
            self.stats.events += 1
            self.stats.apply_refused += 1
            feed = self._feeds[name]
            if feed.last_change_id is not None and event.change_id == feed.last_change_id + 1:
                feed.last_change_id = event.change_id  # not applied, but the stream goes on with no gap
        log.error(
            "table_apply_refused subscription=%s row=%s kind=%s change_id=%d error_type=%s error=%s",
            name,
            json.dumps(str(incident)),
            event.kind,
            event.change_id,
            type(error).__name__,
            json.dumps(str(error)),
        )
        return self._problem(
            name,
            "refused",
            f"{event.kind} of row {incident} (change {event.change_id}) refused: {type(error).__name__} "
            "(both stacks are in the error logged with it)",
            False,
        )

    def _feed(self, name: str, event: Event) -> FeedProblem | None:
        self.stats.events += 1
        feed = self._feeds.get(name)
        if feed is None:
            return self._problem(name, "unknown_subscription", f"no subscription named {name!r}", False)
        try:
            match event:
                case Columns(columns):
                    return self._on_columns(feed, columns)
                case Row(rowid, values):
                    return self._on_row(feed, rowid, values)
                case EndOfQuery(_, change_id):
                    return self._on_eoq(feed, change_id)
                case Change(kind, rowid, values, change_id):
                    return self._on_change(feed, kind, rowid, values, change_id)
                case Error(message):
                    self.stats.stream_errors += 1
                    feed.staging = None
                    return self._problem(name, "stream_error", f"the agent ended the stream: {message}", True)
                case Notify():
                    return self._protocol(feed, "a notify event on a subscription stream")
        except Exception as e:  # pragma: no cover - defensive: feed() must never raise
            return self._protocol(feed, f"internal error applying {type(event).__name__}: {e!r}")
        return self._protocol(feed, f"unexpected event {event!r}")  # pragma: no cover

    # -------------------------------------------------------------------------------- event handling

    def _on_columns(self, feed: _Feed, columns: list[str]) -> FeedProblem | None:
        index: dict[str, int] = {}
        for i, c in enumerate(columns):
            index.setdefault(c, i)
        missing = [c for c in _REQUIRED.get(feed.name, ()) if c not in index]
        if missing:
            feed.staging = None
            self.stats.protocol_errors += 1
            return self._problem(
                feed.name,
                "protocol",
                f"the result has no column {', '.join(missing)} (schema too old?)",
                False,
            )
        feed.staging = {}
        feed.staging_index = index
        return None

    def _on_row(self, feed: _Feed, rowid: int, values: list[SqlValue]) -> FeedProblem | None:
        if feed.staging is None or feed.staging_index is None:
            return self._protocol(feed, "a row outside a snapshot (no columns event before it)")
        rec, problem = self._decode(feed, feed.staging_index, values)
        feed.staging[rowid] = rec
        return problem

    def _on_eoq(self, feed: _Feed, change_id: int | None) -> FeedProblem | None:
        if feed.staging is None or feed.staging_index is None:
            return self._protocol(feed, "end of rows outside a snapshot")
        for rec in feed.rows.values():
            if rec is not None:
                self._remove(rec)
        feed.rows, feed.index = feed.staging, feed.staging_index
        feed.staging = feed.staging_index = None
        for rec in feed.rows.values():
            if rec is not None:
                self._add(rec)
        feed.last_change_id = change_id if change_id is not None else 0
        feed.ready = True
        self.stats.snapshots += 1
        self._bump()
        return None

    def _on_change(
        self, feed: _Feed, kind: str, rowid: int, values: list[SqlValue], change_id: int
    ) -> FeedProblem | None:
        if feed.index is None or feed.staging is not None:
            return self._protocol(feed, f"change {change_id} outside the change phase (no snapshot applied)")
        last = feed.last_change_id or 0
        if change_id <= last:
            self.stats.duplicates += 1
            return None
        if change_id != last + 1:
            self.stats.gaps += 1
            return self._problem(
                feed.name, "gap", f"change {change_id} follows {last}: changes were missed", True
            )
        feed.last_change_id = change_id
        self.stats.changes += 1
        self._bump()
        old = feed.rows.pop(rowid, None)
        if old is not None:
            self._remove(old)
        if kind == "delete":
            return None
        rec, problem = self._decode(feed, feed.index, values)
        feed.rows[rowid] = rec
        if rec is not None:
            self._add(rec)
        return problem

    def _decode(
        self, feed: _Feed, index: Mapping[str, int], values: list[SqlValue]
    ) -> tuple[_Record | None, FeedProblem | None]:
        self._warnings.clear()
        try:
            if any(i >= len(values) for i in index.values()):
                raise _BadRow(f"{len(values)} values for {len(index)} columns")
            rec = _DECODERS[feed.name](values, index, self._warnings)
        except _BadRow as e:
            self.stats.bad_rows += 1
            return None, self._problem(feed.name, "bad_row", f"row ignored: {e}", False)
        if self._warnings:
            self.stats.coerced += 1
            return rec, self._problem(feed.name, "coerced", "; ".join(self._warnings), False)
        return rec, None

    def _protocol(self, feed: _Feed, message: str) -> FeedProblem:
        self.stats.protocol_errors += 1
        feed.staging = None
        return self._problem(feed.name, "protocol", message, True)

    def _problem(self, name: str, kind: ProblemKind, message: str, resubscribe: bool) -> FeedProblem:
        p = FeedProblem(name, kind, message, resubscribe)
        self.problems.append(p)
        return p

    # -------------------------------------------------------------------------------- derived indexes

    def _add(self, rec: _Record) -> None:
        match rec:
            case App():
                self._apps[rec.name] = rec
            case _Hostname(hostname, app):
                if hostname.startswith("*."):
                    self._wildcard[hostname[2:]] = app
                else:
                    self._exact[hostname] = app
            case _AppRegion(app, region):
                self._summary.setdefault(app, {})[region] = 1
            case Instance():
                self._machines[rec.id] = rec
                self._by_app_region.setdefault(rec.app, {}).setdefault(rec.region, {})[rec.id] = rec
                self._recheck(rec.id)
            case Service():
                self._services.setdefault(rec.app, {})[rec.port] = rec
            case PeerProxy():
                self._proxies.setdefault(rec.region, {})[rec.id] = rec
            case _Rtt(src, dst, rtt_ms):
                self._rtt.setdefault(src, {})[dst] = rtt_ms
            case _Check(machine, name, passing):
                checks = self._checks.setdefault(machine, {})
                if name in checks and not checks[name]:
                    self._dec_failing(machine)
                checks[name] = passing
                if not passing:
                    self._failing[machine] = self._failing.get(machine, 0) + 1
                self._recheck(machine)

    def _remove(self, rec: _Record) -> None:
        """Undo :meth:`_add` of ``rec``; only if the index still holds this very record (a duplicate key
        from another row must not be removed with it)."""
        match rec:
            case App():
                if self._apps.get(rec.name) == rec:
                    del self._apps[rec.name]
            case _Hostname(hostname, app):
                d, k = (
                    (self._wildcard, hostname[2:]) if hostname.startswith("*.") else (self._exact, hostname)
                )
                if d.get(k) == app:
                    del d[k]
            case _AppRegion(app, region):
                regions = self._summary.get(app)
                if regions is not None:
                    regions.pop(region, None)
                    if not regions:
                        del self._summary[app]
            case Instance():
                if self._machines.get(rec.id) == rec:
                    del self._machines[rec.id]
                    _drop(self._by_app_region, rec)
                    _drop(self._healthy, rec)
            case Service():
                ports = self._services.get(rec.app)
                if ports is not None and ports.get(rec.port) == rec:
                    del ports[rec.port]
                    if not ports:
                        del self._services[rec.app]
            case PeerProxy():
                by_id = self._proxies.get(rec.region)
                if by_id is not None and by_id.get(rec.id) == rec:
                    del by_id[rec.id]
                    if not by_id:
                        del self._proxies[rec.region]
            case _Rtt(src, dst, rtt_ms):
                dsts = self._rtt.get(src)
                if dsts is not None and dsts.get(dst) == rtt_ms:
                    del dsts[dst]
                    if not dsts:
                        del self._rtt[src]
            case _Check(machine, name, passing):
                checks = self._checks.get(machine)
                if checks is None or checks.get(name) != passing:
                    return
                del checks[name]
                if not passing:
                    self._dec_failing(machine)
                if not checks:
                    del self._checks[machine]
                self._recheck(machine)

    def _recheck(self, machine: str) -> None:
        inst = self._machines.get(machine)
        if inst is None:
            return
        if self.is_healthy(inst):
            self._healthy.setdefault(inst.app, {}).setdefault(inst.region, {})[inst.id] = inst
        else:
            _drop(self._healthy, inst)

    def _dec_failing(self, machine: str) -> None:
        n = self._failing.get(machine, 0) - 1
        if n > 0:
            self._failing[machine] = n
        else:
            self._failing.pop(machine, None)

    # -------------------------------------------------------------------------------- queries

    def app(self, name: str) -> App | None:
        return self._apps.get(name)

    def app_for_host(self, host: str) -> str | None:
        """The app serving Host header value ``host``: an exact name first, then the longest wildcard.

        Answers are memoised per raw header value (clients repeat the same few), in a bounded cache that
        is emptied whenever the table changes or the cache fills up."""
        if self._host_cache_version != self.version or len(self._host_cache) >= HOST_CACHE_SIZE:
            self._host_cache.clear()
            self._host_cache_version = self.version
        try:
            return self._host_cache[host]
        except KeyError:
            pass
        app = self._lookup_host(host)
        self._host_cache[host] = app
        return app

    def _lookup_host(self, host: str) -> str | None:
        h = normalize_host(host)
        if h is None:
            return None
        app = self._exact.get(h)
        if app is not None:
            return app
        if not self._wildcard or h.startswith("["):
            return None
        i = h.find(".")
        while i >= 0:
            app = self._wildcard.get(h[i + 1 :])
            if app is not None:
                return app
            i = h.find(".", i + 1)
        return None

    def instance(self, instance_id: str) -> Instance | None:
        return self._machines.get(instance_id)

    def instances(self, app: str, region: str | None = None) -> Iterable[Instance]:
        """The app's instances (of every state), in ``region`` or everywhere."""
        by_region = self._by_app_region.get(app)
        if not by_region:
            return ()
        if region is not None:
            return by_region.get(region, {}).values()
        return [i for ids in by_region.values() for i in ids.values()]

    def healthy_instances(self, app: str, region: str) -> Collection[Instance]:
        """The app's healthy instances in ``region`` (the balancer's candidates, before load and passive
        health), without evaluating anything: the set is maintained as changes arrive."""
        return self._healthy.get(app, {}).get(region, {}).values()

    def is_healthy(self, inst: Instance) -> bool:
        """Started, routable address, and no check other than passing."""
        return inst.state == "started" and inst.port is not None and inst.id not in self._failing

    def unhealthy_reason(self, inst: Instance) -> str | None:
        """Why :meth:`is_healthy` is false, for error messages; ``None`` when healthy."""
        if inst.state != "started":
            return f"instance {inst.id} is {inst.state or 'in no state'}"
        if inst.port is None:
            return f"instance {inst.id} has no valid address ({inst.address!r})"
        failing = sorted(name for name, ok in self._checks.get(inst.id, {}).items() if not ok)
        if failing:
            return f"instance {inst.id} is failing checks: {', '.join(failing)}"
        return None

    def checks(self, instance_id: str) -> Mapping[str, bool]:
        """Check name -> passing, for one instance."""
        return self._checks.get(instance_id, {})

    def regions(self, app: str) -> set[str]:
        """Regions the app is in: the global summary plus the regions of instances this table knows."""
        out = set(self._summary.get(app, ()))
        out.update(self._by_app_region.get(app, ()))
        return out

    def services(self, app: str) -> Mapping[int, Service]:
        return self._services.get(app, {})

    def proxies(self, region: str) -> Collection[PeerProxy]:
        """The proxies registered in ``region`` (``proxies`` rows with a valid address)."""
        return self._proxies.get(region, {}).values()

    def distances(self, region: str) -> Distances:
        """A live view of the RTTs from ``region`` (``region_rtt``), for :class:`Balancer` ``distances``."""
        return Distances(self, region)

    def counts(self) -> dict[str, int]:
        """Sizes of the derived indexes (for metrics and tests)."""
        return {
            "apps": len(self._apps),
            "hostnames": len(self._exact) + len(self._wildcard),
            "machines": len(self._machines),
            "checks": sum(len(c) for c in self._checks.values()),
            "failing_instances": len(self._failing),
            "healthy_instances": sum(len(ids) for r in self._healthy.values() for ids in r.values()),
            "services": sum(len(s) for s in self._services.values()),
            "app_regions": sum(len(r) for r in self._summary.values()),
            "proxies": sum(len(p) for p in self._proxies.values()),
            "region_rtt": sum(len(d) for d in self._rtt.values()),
        }


# ------------------------------------------------------------------------------------------------ decoders


def _decode_app(values: list[SqlValue], ix: Mapping[str, int], warn: list[str]) -> App:
    name = _key(_text(values, ix, "name"), "app name")
    conc = _text(values, ix, "concurrency")
    if conc not in ("connections", "requests"):
        warn.append(f"app {name}: unknown concurrency {conc!r}, using {DEFAULT_CONCURRENCY!r}")
        conc = DEFAULT_CONCURRENCY
    soft, hard = _int(values, ix, "soft_limit"), _int(values, ix, "hard_limit")
    if soft < 0 or hard < 0:
        warn.append(f"app {name}: negative limit (soft {soft}, hard {hard}) means no limit")
        soft, hard = max(soft, 0), max(hard, 0)
    concurrency: Concurrency = "connections" if conc == "connections" else "requests"
    return App(name, _text(values, ix, "org"), concurrency, soft, hard)


def _decode_hostname(values: list[SqlValue], ix: Mapping[str, int], warn: list[str]) -> _Hostname:
    raw = _text(values, ix, "hostname")
    app = _key(_text(values, ix, "app"), "app name")
    wildcard = raw.startswith("*.")
    h = raw.strip().lower().rstrip(".")
    base = h[2:] if wildcard else h
    if not base or not _HOST_RE.fullmatch(base) or len(base) > 253:
        raise _BadRow(f"hostname {raw!r} is not a host name or '*.' wildcard")
    return _Hostname(("*." if wildcard else "") + base, app)


def _decode_app_region(values: list[SqlValue], ix: Mapping[str, int], warn: list[str]) -> _AppRegion:
    return _AppRegion(_key(_text(values, ix, "app"), "app name"), _key(_text(values, ix, "region"), "region"))


def _decode_machine(values: list[SqlValue], ix: Mapping[str, int], warn: list[str]) -> Instance:
    iid = _key(_text(values, ix, "id"), "machine id")
    address = _opt_text(values, ix, "address")
    hp = parse_address(address)
    return Instance(
        id=iid,
        app=intern(_text(values, ix, "app")),  # shared by many rows: one copy each (memory per 100k)
        region=intern(_text(values, ix, "region")),
        state=intern(_text(values, ix, "state")),
        address=address,
        host=hp[0] if hp else None,
        port=hp[1] if hp else None,
    )


def _decode_service(values: list[SqlValue], ix: Mapping[str, int], warn: list[str]) -> Service:
    handlers = tuple(h.strip() for h in _text(values, ix, "handlers").split(",") if h.strip())
    return Service(
        app=_key(_text(values, ix, "app"), "app name"),
        port=_int(values, ix, "port"),
        protocol=_text(values, ix, "protocol"),
        handlers=handlers,
        internal_port=_int(values, ix, "internal_port"),
        force_https=bool(_int(values, ix, "force_https")),
    )


def _decode_check(values: list[SqlValue], ix: Mapping[str, int], warn: list[str]) -> _Check:
    return _Check(
        _key(_text(values, ix, "machine"), "machine id"),
        intern(_text(values, ix, "name")),
        _text(values, ix, "status") == "passing",
    )


def _decode_proxy(values: list[SqlValue], ix: Mapping[str, int], warn: list[str]) -> PeerProxy:
    pid = _key(_text(values, ix, "id"), "proxy id")
    region = _key(_text(values, ix, "region"), "region")
    address = _text(values, ix, "address")
    hp = parse_address(address)
    if hp is None:
        raise _BadRow(f"proxy {pid}: address {address!r} is not host:port")
    return PeerProxy(pid, region, hp[0], hp[1])


def _decode_rtt(values: list[SqlValue], ix: Mapping[str, int], warn: list[str]) -> _Rtt:
    src = _key(_text(values, ix, "src"), "region")
    dst = _key(_text(values, ix, "dst"), "region")
    v = values[ix["rtt_ms"]]
    if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0 or v == float("inf"):
        raise _BadRow(f"rtt {src} -> {dst}: {v!r} is not a number of milliseconds")
    return _Rtt(src, dst, float(v))


_DECODERS: Final[Mapping[str, Callable[[list[SqlValue], Mapping[str, int], list[str]], _Record]]] = {
    "apps": _decode_app,
    "hostnames": _decode_hostname,
    "app_regions": _decode_app_region,
    "machines": _decode_machine,
    "services": _decode_service,
    "checks": _decode_check,
    "proxies": _decode_proxy,
    "region_rtt": _decode_rtt,
}


__all__ = [
    "DEFAULT_CONCURRENCY",
    "OPTIONAL",
    "PRIMARY_KEYS",
    "QUERIES",
    "App",
    "Concurrency",
    "Distances",
    "FeedProblem",
    "IncidentRow",
    "Instance",
    "PeerProxy",
    "ProblemKind",
    "RoutingTable",
    "Service",
    "TableStats",
    "make_lock",
    "normalize_host",
    "parse_address",
]
