"""The presence publisher: the coarse global facts a region contributes (docs/regions.md, "Coarse
global state").

In region mode every agent runs one :class:`PresencePublisher`. It derives, from the LOCAL database's
regional ``machines`` rows of its region, what the global tables should say about this region, and writes
the global tables only where the stored rows differ:

* ``app_regions``: one row ``(app, region, capacity)`` for every app with at least one instance in state
  ``'started'`` here (health is ignored on purpose: a flapping check must not cause a global write);
  ``capacity`` is :func:`capacity_bucket` of the started count. An app with none has no row.
* ``region_rtt``: for every other region seen in the global cluster's membership, the median of the
  global runtime's smoothed probe RTTs to that region's alive members, rounded up by :func:`rtt_bucket_ms`.

**Who writes.** The region's designated writer (:func:`designated_writer`: the alive member of the
regional cluster with the smallest node id, as each node sees its membership) writes at once. Any other
node writes an ``app_regions`` mismatch only once it has lasted ``takeover_delay`` (:class:`MismatchTracker`),
which covers a designated writer that died before membership noticed. ``region_rtt`` is written by the
designated writer only (each node measures its own RTTs: two writers would disagree and take turns).
Concurrent writers are harmless: the desired ``app_regions`` value is a pure function of the region's
replicated state, so they write the same value, and the store's last-writer-wins merge keeps one.

**Gone regions.** When every node of a region is gone, nobody of that region is left to delete its rows,
so other regions' proxies would keep forwarding to it. Every publisher therefore also looks, in the
GLOBAL cluster's membership, for regions that have ``app_regions`` rows or ``region_rtt`` rows (as
``src`` or ``dst``) but no member alive or suspect (:func:`gone_regions`); one that stays so for
``gone_region_after_ms`` (:class:`MismatchTracker`, keyed by region) has its rows deleted by the
global designated writer (:func:`designated_writer` over the global cluster: the smallest alive global
member id), or by any other node once it has lasted the takeover delay longer. Deleting is safe: a
region that comes back rewrites its rows (they now differ from the stored ones).

**When.** A store commit listener (on the writer thread) only posts a wake-up to the loop when a commit
touched ``machines`` or ``app_regions``; the loop waits ``debounce``, reads on a reader thread, diffs, and
writes (at most :data:`MAX_WRITES_PER_ROUND` statements per transaction, the rest in the next round). A
timer evaluates every ``interval`` as well, to repair. Every statement is guarded so that it changes
nothing if the stored row already holds the value (no version is made for a no-op). Nothing is written
before the node has settled (:meth:`PresencePublisher.settled`). Failures are logged and counted, never
raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from verdigris.api.threads import StoreThreads
from verdigris.config import PresenceConfig
from verdigris.gossip.membership import MemberInfo, MemberState
from verdigris.runtime import GossipRuntime
from verdigris.store.store import CommitNotice, Store
from verdigris.store.types import Statement

log = logging.getLogger("verdigris.presence")

WATCHED_TABLES = frozenset({"machines", "app_regions"})
"""Commits touching these tables trigger an evaluation."""
MAX_WRITES_PER_ROUND = 256
"""The most statements one evaluation writes (one transaction); the rest wait for the next round."""
REQUIRED_COLUMNS: Mapping[str, frozenset[str]] = {
    "machines": frozenset({"app", "region", "state"}),
    "app_regions": frozenset({"app", "region", "capacity", "updated_at"}),
    "region_rtt": frozenset({"src", "dst", "rtt_ms", "updated_at"}),
}

_MIN_WAIT = 0.05
"""Seconds: the shortest wait between two evaluations not triggered by a commit."""
_UNSETTLED_POLL = 0.5
"""Seconds between evaluations while the node has not settled yet."""

APP_REGIONS = "app_regions"
REGION_RTT = "region_rtt"


# ------------------------------------------------------------------------------------------ pure parts


def capacity_bucket(started: int) -> int:
    """The coarse capacity hint of ``started`` instances: the count rounded DOWN to a power of two
    (0 → 0, 1 → 1, 2–3 → 2, 4–7 → 4, 8–15 → 8, ...), i.e. "at least this many"."""
    if started <= 0:
        return 0
    return 1 << (started.bit_length() - 1)


def rtt_bucket_ms(rtt_seconds: float) -> int:
    """A round trip in seconds rounded UP to the 1-2-5 series in milliseconds (1, 2, 5, 10, 20, 50, 100,
    200, 500, 1000, 2000, ...); anything up to 1 ms is 1."""
    ms = rtt_seconds * 1000.0
    if not ms > 1.0:  # also NaN
        return 1
    decade: int = 10 ** max(0, math.floor(math.log10(ms)) - 1)
    while True:
        for step in (1, 2, 5):
            bucket = step * decade
            if bucket >= ms:
                return bucket
        decade *= 10


RTT_HYSTERESIS = 0.2
"""A published RTT bucket is kept while the median stays within 20 % outside of it (see
:func:`keep_rtt_bucket`), so a round trip hovering at a bucket boundary does not rewrite the row."""


def _rtt_bucket_below(bucket: int) -> int:
    """The bucket of the 1-2-5 series just below ``bucket`` (0 below 1)."""
    below = 0
    candidate = 1
    while candidate < bucket:
        below = candidate
        candidate = rtt_bucket_ms((candidate + 0.5) / 1000.0)
    return below


def keep_rtt_bucket(stored: float | None, rtt_seconds: float) -> int:
    """The bucket to publish for a median of ``rtt_seconds`` when ``stored`` is published: the stored
    bucket while the median is within it widened by :data:`RTT_HYSTERESIS` on both sides, else
    :func:`rtt_bucket_ms`."""
    bucket = rtt_bucket_ms(rtt_seconds)
    if stored is None or stored < 1 or stored != int(stored) or bucket == stored:
        return bucket
    kept = int(stored)
    if rtt_bucket_ms(kept / 1000.0) != kept:  # not a bucket of the series (written by someone else)
        return bucket
    ms = rtt_seconds * 1000.0
    low = _rtt_bucket_below(kept) * (1.0 - RTT_HYSTERESIS)
    high = kept * (1.0 + RTT_HYSTERESIS)
    return kept if low <= ms <= high else bucket


def desired_app_regions(started: Mapping[str, int]) -> dict[str, int]:
    """app → capacity bucket, for every app with at least one started instance."""
    return {app: capacity_bucket(n) for app, n in started.items() if n > 0}


def desired_region_rtt(
    own_region: str, members: Iterable[MemberInfo], stored: Mapping[str, float] | None = None
) -> dict[str, int]:
    """dst region → bucketed median of the smoothed RTTs to its alive members (those with a measured
    RTT), keeping a ``stored`` bucket the median has not clearly left (:func:`keep_rtt_bucket`); regions
    without a measured member, and ``own_region``, are left out."""
    by_region: dict[str, list[float]] = {}
    for m in members:
        region = m.metadata.get("region", "")
        if m.state is not MemberState.ALIVE or m.rtt is None or not region or region == own_region:
            continue
        by_region.setdefault(region, []).append(m.rtt)
    stored = stored or {}
    return {
        region: keep_rtt_bucket(stored.get(region), statistics.median(rtts))
        for region, rtts in by_region.items()
    }


@dataclass(frozen=True, order=True)
class Write:
    """One global row to set (``value`` is the capacity or the rtt bucket) or delete (``value`` None).
    ``key`` is the row's other key column: the app for ``app_regions``, the dst region for ``region_rtt``."""

    table: str
    key: str
    value: int | None


def diff(table: str, desired: Mapping[str, int], stored: Mapping[str, float]) -> list[Write]:
    """The writes that make ``stored`` equal ``desired``: an upsert where the value is missing or
    different, a delete where a stored row is not desired. Sorted, so rounds are deterministic."""
    writes = [Write(table, k, v) for k, v in desired.items() if k not in stored or stored[k] != v]
    writes += [Write(table, k, None) for k in stored if k not in desired]
    return sorted(writes, key=lambda w: (w.table, w.key))


def statements(region: str, writes: Iterable[Write], now_ms: int) -> list[Statement]:
    """SQL for ``writes`` of this region. Each statement is guarded: it changes nothing (and makes no
    version) when the stored row already holds the value, or is already absent."""
    out: list[Statement] = []
    for w in writes:
        if w.table == APP_REGIONS:
            if w.value is None:
                out.append(Statement("DELETE FROM app_regions WHERE app = ? AND region = ?", [w.key, region]))
            else:
                out.append(
                    Statement(
                        "INSERT INTO app_regions (app, region, capacity, updated_at) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (app, region) DO UPDATE SET capacity = excluded.capacity, "
                        "updated_at = excluded.updated_at WHERE capacity IS NOT excluded.capacity",
                        [w.key, region, w.value, now_ms],
                    )
                )
        elif w.table == REGION_RTT:
            if w.value is None:
                out.append(Statement("DELETE FROM region_rtt WHERE src = ? AND dst = ?", [region, w.key]))
            else:
                out.append(
                    Statement(
                        "INSERT INTO region_rtt (src, dst, rtt_ms, updated_at) VALUES (?, ?, ?, ?) "
                        "ON CONFLICT (src, dst) DO UPDATE SET rtt_ms = excluded.rtt_ms, "
                        "updated_at = excluded.updated_at WHERE rtt_ms IS NOT excluded.rtt_ms",
                        [region, w.key, w.value, now_ms],
                    )
                )
        else:
            raise ValueError(f"unknown presence table {w.table!r}")
    return out


def designated_writer(self_id: str, members: Iterable[MemberInfo]) -> str:
    """The region's designated writer as this node sees it: the smallest node id among itself and the
    regional cluster's members in state alive."""
    return min([self_id, *(m.id for m in members if m.state is MemberState.ALIVE)])


class MismatchTracker:
    """Since when each mismatching row (table, key) has been mismatching, to let a node that is not the
    designated writer take over once a mismatch has lasted ``delay`` seconds. A row that matches again
    is forgotten; its next mismatch starts a new wait."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._since: dict[tuple[str, str], float] = {}

    def update(self, mismatching: Iterable[tuple[str, str]], now: float) -> None:
        current = set(mismatching)
        self._since = {k: self._since.get(k, now) for k in current}

    def due(self, now: float) -> set[tuple[str, str]]:
        return {k for k, since in self._since.items() if now - since >= self.delay}

    def next_deadline(self) -> float | None:
        """When the oldest mismatch becomes due (None: nothing mismatches)."""
        return min(self._since.values()) + self.delay if self._since else None

    def __len__(self) -> int:
        return len(self._since)

    def since(self) -> dict[tuple[str, str], float]:
        """Each tracked key and since when it has been mismatching."""
        return dict(self._since)


GONE = "gone"
"""The tracker key's first part (and the write reason) of a gone region."""


def gone_regions(own_region: str, stored_regions: Iterable[str], members: Iterable[MemberInfo]) -> set[str]:
    """The regions named by global rows (``stored_regions``) that have no member alive or suspect in the
    global cluster (``members``, as :meth:`Membership.members` lists them: this node excluded, which is
    why ``own_region`` never counts as gone). The empty region name is never gone (nobody owns it)."""
    present = {
        m.metadata.get("region", "")
        for m in members
        if m.state is MemberState.ALIVE or m.state is MemberState.SUSPECT
    }
    return {r for r in stored_regions if r and r != own_region and r not in present}


def gone_statements(region: str) -> list[tuple[str, Statement]]:
    """(table, statement) deleting every global presence row of ``region``: its ``app_regions`` rows and
    the ``region_rtt`` rows from or to it."""
    return [
        (APP_REGIONS, Statement("DELETE FROM app_regions WHERE region = ?", [region])),
        (REGION_RTT, Statement("DELETE FROM region_rtt WHERE src = ? OR dst = ?", [region, region])),
    ]


# ------------------------------------------------------------------------------------------ the publisher


@dataclass
class PresenceStats:
    evaluations: int = 0
    writes: dict[tuple[str, str], int] = field(default_factory=dict)
    """(table, reason) → rows written; reason ``designated``, ``takeover`` or ``gone`` (rows of a gone
    region deleted)."""
    transactions: int = 0
    errors: int = 0
    last_error: str | None = None
    last_error_at: float | None = None
    """Unix time of the last error."""
    designated: bool = False
    pending: int = 0
    """Mismatching app_regions rows at the last evaluation."""
    regions_cleaned: int = 0
    """Gone regions whose rows this node deleted (a region counts once per cleanup that deleted rows)."""
    gone: list[str] = field(default_factory=list)
    """Regions with global rows and no alive global member, at the last evaluation (sorted)."""
    global_designated: bool = False
    """Whether this node was the global designated writer (gone-region cleanup) at the last evaluation."""


@dataclass(frozen=True)
class _Snapshot:
    started: dict[str, int]
    stored_apps: dict[str, float]
    stored_rtt: dict[str, float]
    regions: set[str] = field(default_factory=set)
    """Every region named by a global row: ``app_regions.region``, ``region_rtt.src`` and ``dst``."""


class PresencePublisher:
    """One agent's presence publisher: ``await start()``, then ``await stop()``. See the module docstring.

    Args:
        store, threads: the node's store and its threads (reads on a reader thread, writes on the writer).
        regional, global_: the two runtimes of region mode.
        region: this node's region (``gossip.region``).
        config: ``[presence]``.
        registry: where to report metrics (none when None).
        clock: monotonic seconds (tests inject their own).
    """

    def __init__(
        self,
        *,
        store: Store,
        threads: StoreThreads,
        regional: GossipRuntime,
        global_: GossipRuntime,
        region: str,
        config: PresenceConfig,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._threads = threads
        self._regional = regional
        self._global = global_
        self.region = region
        self.config = config
        self._registry = registry
        self._collector: _PresenceCollector | None = None
        self._clock = clock
        self.stats = PresenceStats()
        self.tracker = MismatchTracker(config.takeover_delay_ms / 1000.0)
        self.gone_tracker = MismatchTracker(config.gone_region_after_ms / 1000.0)
        """Since when each region (key ``("gone", region)``) has had rows and no alive global member."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._started_at = clock()
        self._schema_problem: str | None = None
        self._closing = False
        self._was_settled = False
        if registry is not None:  # reported from construction until stop()
            self._collector = _PresenceCollector(self)
            registry.register(self._collector)

    # ------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._started_at = self._clock()
        self._store.add_commit_listener(self._on_commit)
        self._task = self._loop.create_task(self._run(), name="presence")
        self._wake.set()  # a first evaluation right away

    async def stop(self) -> None:
        self._closing = True
        self._store.remove_commit_listener(self._on_commit)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._collector is not None and self._registry is not None:
            with contextlib.suppress(KeyError):
                self._registry.unregister(self._collector)
            self._collector = None

    def _on_commit(self, notice: CommitNotice) -> None:
        """On the writer thread: only post a wake-up to the loop. Never raises."""
        if self._closing or self._loop is None or WATCHED_TABLES.isdisjoint(notice.tables):
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self._loop.call_soon_threadsafe(self._wake.set)

    # ------------------------------------------------------------------------------------ queries

    @property
    def node_id(self) -> str:
        return self._regional.node_id

    def designated_writer(self) -> str:
        return designated_writer(self.node_id, self._regional.membership.members())

    def is_designated(self) -> bool:
        return self.designated_writer() == self.node_id

    def global_designated_writer(self) -> str:
        """The gone-region cleaner: the smallest alive member id of the GLOBAL cluster, this node included."""
        return designated_writer(self._global.node_id, self._global.membership.members())

    def is_global_designated(self) -> bool:
        return self.global_designated_writer() == self._global.node_id

    def _gone_delay(self, global_designated: bool) -> float:
        """How long a region must have been gone before this node deletes its rows."""
        delay = self.gone_tracker.delay
        return delay if global_designated else delay + self.tracker.delay

    def _gone_deadline(self) -> float | None:
        """When the oldest gone region becomes due for this node (None: no region is gone)."""
        first = self.gone_tracker.next_deadline()
        if first is None or not self._was_settled:  # unsettled: polled anyway, deletes nothing
            return None
        try:
            designated = self.is_global_designated()
        except Exception:
            designated = False
        return first if designated else first + self.tracker.delay

    def settled(self) -> bool:
        """Whether this node may write: it has synced with a member of its region at least once (so its
        regional state is not a stale copy from before a restart), or it has been up for the takeover
        delay (a region of one node)."""
        synced = self._regional.stats.sessions.get(("client", "ok"), 0) > 0
        return synced or self._clock() - self._started_at >= self.tracker.delay

    def info(self) -> dict[str, Any]:
        """For the admin ``ping``."""
        s = self.stats
        try:
            writer: str | None = self.designated_writer()
        except Exception:  # the runtime is not started, or closing
            writer = None
        return {
            "designated": writer == self.node_id,
            "designated_writer": writer,
            "settled": self.settled(),
            "evaluations": s.evaluations,
            "writes": {f"{t}/{r}": n for (t, r), n in sorted(s.writes.items())},
            "pending": s.pending,
            "errors": s.errors,
            "last_error": s.last_error,
            "inactive": self._schema_problem,
            "global_designated": s.global_designated,
            "gone_regions": list(s.gone),
            "regions_cleaned": s.regions_cleaned,
        }

    # ------------------------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        interval = self.config.interval_ms / 1000.0
        debounce = self.config.debounce_ms / 1000.0
        next_repair = self._clock() + interval
        while True:
            try:
                now = self._clock()
                deadline = next_repair
                takeover = self.tracker.next_deadline()
                if takeover is not None and not self.is_designated_safe():
                    deadline = min(deadline, takeover)
                gone = self._gone_deadline()
                if gone is not None:
                    deadline = min(deadline, gone)
                if not self._was_settled:  # look again soon: settling is not announced by a commit
                    deadline = min(deadline, now + _UNSETTLED_POLL)
                with contextlib.suppress(TimeoutError):
                    # A floor, so that no condition can make the loop spin.
                    await asyncio.wait_for(self._wake.wait(), max(_MIN_WAIT, deadline - now))
                if self._wake.is_set() and debounce > 0:
                    await asyncio.sleep(debounce)
                self._wake.clear()
                if self._clock() >= next_repair:
                    next_repair = self._clock() + interval
                if await self.evaluate():
                    self._wake.set()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._failed(e)
                # Do not spin on a persistent failure: wait for the next trigger or repair round.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), min(interval, 1.0))

    def is_designated_safe(self) -> bool:
        """:meth:`is_designated`, False when membership cannot be read (not started, closing)."""
        try:
            return self.is_designated()
        except Exception:
            return False

    def _failed(self, error: BaseException) -> None:
        s = self.stats
        s.errors += 1
        s.last_error = f"{type(error).__name__}: {error}"
        s.last_error_at = time.time()
        log.error("presence evaluation failed: %s", s.last_error, exc_info=error)

    def _check_schema(self) -> str | None:
        tables = self._store.schema.tables
        for name, needed in REQUIRED_COLUMNS.items():
            table = tables.get(name)
            if table is None:
                return f"the schema has no table {name}"
            missing = needed - {c.name for c in table.columns}
            if missing:
                return f"the table {name} lacks {', '.join(sorted(missing))}"
        return None

    async def evaluate(self) -> bool:
        """One round: read, diff, write what this node should. Returns whether writes were left over
        (the caller runs another round at once)."""
        problem = self._check_schema()
        if problem != self._schema_problem:
            if problem is not None:
                log.warning("presence publisher inactive: %s (docs/regions.md)", problem)
            self._schema_problem = problem
        if problem is not None:
            return False
        self.stats.evaluations += 1
        region = self.region
        snap = await self._threads.read(lambda conn: _read(conn, region))
        app_writes = diff(APP_REGIONS, desired_app_regions(snap.started), snap.stored_apps)
        now = self._clock()
        self.tracker.update(((w.table, w.key) for w in app_writes), now)
        self.stats.pending = len(app_writes)
        designated = self.is_designated()
        self.stats.designated = designated
        gone = gone_regions(region, snap.regions, self._global.membership.members())
        self.gone_tracker.update(((GONE, r) for r in gone), now)
        self.stats.gone = sorted(gone)
        global_designated = self.is_global_designated()
        self.stats.global_designated = global_designated
        self._was_settled = self.settled()
        if not self._was_settled:
            return False
        since = self.gone_tracker.since()
        gone_delay = self._gone_delay(global_designated)
        due_gone = sorted(r for (_, r), t in since.items() if now - t >= gone_delay)
        # Two statements per region, first in the transaction, never split across two rounds.
        gone_left = len(due_gone) > MAX_WRITES_PER_ROUND // 2
        due_gone = due_gone[: MAX_WRITES_PER_ROUND // 2]
        gone_todo = [(r, table, stmt) for r in due_gone for table, stmt in gone_statements(r)]
        if designated:
            rtt = desired_region_rtt(region, self._global.membership.members(), snap.stored_rtt)
            # Only set: a region that went quiet keeps its last row (no churn on a partition).
            rtt_writes = [w for w in diff(REGION_RTT, rtt, snap.stored_rtt) if w.value is not None]
            todo = [(w, "designated") for w in app_writes + rtt_writes]
        else:
            due = self.tracker.due(now)
            todo = [(w, "takeover") for w in app_writes if (w.table, w.key) in due]
        if not todo and not gone_todo:
            return False
        batch = todo[: MAX_WRITES_PER_ROUND - len(gone_todo)]
        stmts = [stmt for _, _, stmt in gone_todo]
        stmts += statements(region, (w for w, _ in batch), int(time.time() * 1000))
        result = await self._threads.write(self._store.transact, stmts)
        self.stats.transactions += 1
        self._count_gone(gone_todo, result.results[: len(gone_todo)], since, now, global_designated)
        for (w, reason), res in zip(batch, result.results[len(gone_todo) :], strict=True):
            if res.rows_affected > 0:
                key = (w.table, reason)
                self.stats.writes[key] = self.stats.writes.get(key, 0) + 1
                log.info(
                    "presence (%s): %s %s/%s -> %s",
                    reason,
                    w.table,
                    region,
                    w.key,
                    "deleted" if w.value is None else w.value,
                )
        return len(todo) > len(batch) or gone_left

    def _count_gone(
        self,
        done: list[tuple[str, str, Statement]],
        results: list[Any],
        since: Mapping[tuple[str, str], float],
        now: float,
        global_designated: bool,
    ) -> None:
        """Counts and logs (one line per region that had rows) the deletes of gone regions."""
        deleted: dict[str, dict[str, int]] = {}
        for (r, table, _), res in zip(done, results, strict=True):
            deleted.setdefault(r, {})[table] = res.rows_affected
        for r, by_table in deleted.items():
            for table, n in by_table.items():
                if n > 0:
                    key = (table, GONE)
                    self.stats.writes[key] = self.stats.writes.get(key, 0) + n
            if sum(by_table.values()) == 0:
                continue  # another node deleted them first
            self.stats.regions_cleaned += 1
            log.info(
                "presence (gone%s): region %s has had no alive member in the global cluster for %.0f s: "
                "deleted %d app_regions and %d region_rtt rows",
                "" if global_designated else ", takeover",
                r,
                now - since.get((GONE, r), now),
                by_table.get(APP_REGIONS, 0),
                by_table.get(REGION_RTT, 0),
            )


def _read(conn: Any, region: str) -> _Snapshot:
    """On a reader thread: started instances per app in this region, and this region's global rows. One
    statement, so one consistent snapshot (reader connections may not open transactions)."""
    snap = _Snapshot({}, {}, {})
    rows = conn.execute(
        "SELECT 'm', app, count(*) FROM machines WHERE state = 'started' AND region IN (?1, '') "
        "GROUP BY app "
        "UNION ALL SELECT 'a', app, capacity FROM app_regions WHERE region = ?1 "
        "UNION ALL SELECT 'r', dst, rtt_ms FROM region_rtt WHERE src = ?1 "
        "UNION ALL SELECT 'g', region, 0 FROM (SELECT region FROM app_regions "
        "UNION SELECT src FROM region_rtt UNION SELECT dst FROM region_rtt)",
        (region,),
    )
    for kind, key, value in rows:
        if kind == "m":
            snap.started[str(key)] = int(value)
        elif kind == "a":
            snap.stored_apps[str(key)] = value
        elif kind == "g":
            if key is not None:
                snap.regions.add(str(key))
        else:
            snap.stored_rtt[str(key)] = value
    return snap


class _PresenceCollector(Collector):
    """Reads the publisher's stats when Prometheus scrapes."""

    def __init__(self, publisher: PresencePublisher) -> None:
        self._p = publisher

    def collect(self) -> Iterator[Any]:
        s = self._p.stats
        writes = CounterMetricFamily(
            "verdigris_presence_writes",
            "Global rows written by the presence publisher, by table and reason (designated, takeover, "
            "gone).",
            labels=["table", "reason"],
        )
        for table in (APP_REGIONS, REGION_RTT):
            for reason in ("designated", "takeover", GONE):
                writes.add_metric([table, reason], s.writes.get((table, reason), 0))
        yield writes
        yield CounterMetricFamily(
            "verdigris_presence_evaluations", "Presence evaluations run.", value=s.evaluations
        )
        yield CounterMetricFamily(
            "verdigris_presence_errors", "Presence evaluations that failed.", value=s.errors
        )
        yield GaugeMetricFamily(
            "verdigris_presence_last_error_timestamp_seconds",
            "Unix time of the presence publisher's last error (0: none).",
            value=s.last_error_at or 0.0,
        )
        yield GaugeMetricFamily(
            "verdigris_presence_designated",
            "1 when this node is its region's designated presence writer.",
            value=1.0 if s.designated else 0.0,
        )
        yield GaugeMetricFamily(
            "verdigris_presence_pending",
            "This region's app_regions rows that differ from the desired state (last evaluation).",
            value=s.pending,
        )
