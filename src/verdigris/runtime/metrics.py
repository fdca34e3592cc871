"""Prometheus metrics of the gossip runtime.

The cores (membership, broadcaster, sync), the codecs and the runtime each keep plain counters as they go;
:class:`GossipCollector` reads them when Prometheus scrapes, so nothing is counted twice and the hot paths
never touch a metrics library. It is registered in the agent's own registry (see
:mod:`verdigris.api.metrics`), and runs on the event loop like everything else that reads the runtime.

An agent in region mode runs two runtimes (one per scope) into one registry. Each metric family must then
appear once, so one collector per registry (:func:`attach` / :func:`detach`) reports every runtime attached
to it, and when any of them has a scope every sample carries a ``scope`` label (``regional``, ``global``;
``all`` for an unscoped runtime). A single-cluster agent's metrics have no ``scope`` label, as before.

Two readings cannot be taken on the loop: what the node lacks (sync needs, gaps) lives in the store's
books, which belong to the writer thread. :func:`refresh`, awaited by the metrics endpoint before each
scrape, reads them there with a bounded wait (a busy writer leaves the previous reading in place; at most
one reading per runtime is pending). The apply batch latency is a :class:`Durations` the writer thread
fills as it merges.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from verdigris.gossip.membership import MemberState

if TYPE_CHECKING:
    from verdigris.runtime.gossip import GossipRuntime
    from verdigris.store.store import ActorBooks, Store

__all__ = ["APPLY_BUCKETS", "BooksReading", "Durations", "GossipCollector", "attach", "detach", "refresh"]

APPLY_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds (seconds) of the apply batch latency histogram; one more bucket for +Inf."""
BOOKS_READ_TIMEOUT: Final = 1.0
"""Longest a scrape waits for the writer thread to read the books."""


class Durations:
    """A histogram kept as plain numbers, so the writer thread can observe without a metrics library.
    Observed from one thread and read from another: under the GIL each increment is whole, a scrape may
    at worst see the sum one observation ahead of the buckets."""

    def __init__(self, buckets: tuple[float, ...] = APPLY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.buckets, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """Prometheus' ``(le, count)`` pairs, cumulative, ending with ``+Inf``."""
        out, acc = [], 0
        for bound, n in zip((*self.buckets, float("inf")), list(self.counts), strict=True):
            acc += n
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), float(acc)))
        return out


@dataclass(frozen=True, slots=True)
class BooksReading:
    """What the node lacks of other actors' versions, from the store's books."""

    missing: int = 0
    """Versions below an actor's known head not received at all (what sync asks for)."""
    partial: int = 0
    """Versions received in part (chunked versions waiting for their other pieces)."""
    gaps: int = 0
    """Distinct runs of missing or partial versions (holes in the known versions)."""


def read_books(books: Mapping[bytes, ActorBooks]) -> BooksReading:
    """Sum the needs over every actor's books. Call it where the books are stable (the writer thread)."""
    missing = partial = gaps = 0
    for b in books.values():
        head = b.head
        if not head:
            continue
        holes = b.known.gaps(1, head)
        gaps += len(holes)
        partial += len(b.partials)
        missing += sum(e - s + 1 for s, e in holes) - len(b.partials)
    return BooksReading(missing=max(0, missing), partial=partial, gaps=gaps)


def _read_store_books(store: Store, scope: str | None) -> BooksReading:
    return read_books(store.books(scope) if scope is not None else store.books())


async def refresh(registry: CollectorRegistry, timeout: float = BOOKS_READ_TIMEOUT) -> None:
    """Before a scrape: read the books of every runtime reported in ``registry`` on the writer thread,
    waiting at most ``timeout`` seconds (see the module docstring)."""
    collector = _SHARED.get(registry)
    if collector is not None:
        await collector.refresh(timeout)


_SHARED: weakref.WeakKeyDictionary[CollectorRegistry, GossipCollector] = weakref.WeakKeyDictionary()


def attach(registry: CollectorRegistry, runtime: GossipRuntime) -> None:
    """Report ``runtime`` in ``registry`` (registering the registry's gossip collector on first use)."""
    collector = _SHARED.get(registry)
    if collector is None:
        collector = _SHARED[registry] = GossipCollector()
        registry.register(collector)
    collector.add(runtime)


def detach(registry: CollectorRegistry, runtime: GossipRuntime) -> None:
    """Stop reporting ``runtime``; the collector leaves the registry with its last runtime."""
    collector = _SHARED.get(registry)
    if collector is None:
        return
    collector.remove(runtime)
    if not collector.runtimes:
        del _SHARED[registry]
        with contextlib.suppress(KeyError):
            registry.unregister(collector)


class GossipCollector:
    """Reads the counters of one or more :class:`~verdigris.runtime.gossip.GossipRuntime` at every scrape."""

    def __init__(self, *runtimes: GossipRuntime) -> None:
        self.runtimes: list[GossipRuntime] = list(runtimes)
        self.readings: dict[int, BooksReading] = {}
        """id(runtime) -> its last books reading."""
        self._reading: dict[int, asyncio.Future[BooksReading]] = {}

    async def refresh(self, timeout: float) -> None:
        for rt in list(self.runtimes):
            key = id(rt)
            if key in self._reading:
                continue  # the previous reading is still waiting for the writer thread
            future = asyncio.ensure_future(rt._threads.write(_read_store_books, rt._store, rt.scope))
            self._reading[key] = future

            def done(f: asyncio.Future[BooksReading], key: int = key) -> None:
                self._reading.pop(key, None)
                if not f.cancelled() and f.exception() is None:
                    self.readings[key] = f.result()

            future.add_done_callback(done)
        pending = list(self._reading.values())
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    def add(self, runtime: GossipRuntime) -> None:
        if runtime not in self.runtimes:
            self.runtimes.append(runtime)

    def remove(self, runtime: GossipRuntime) -> None:
        if runtime in self.runtimes:
            self.runtimes.remove(runtime)
        self.readings.pop(id(runtime), None)

    def collect(self) -> Iterable[Metric]:
        runtimes = list(self.runtimes)
        scoped = any(rt.scope is not None for rt in runtimes)
        extra = ["scope"] if scoped else []

        def family(
            kind: type[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily],
            name: str,
            doc: str,
            labels: list[str],
        ) -> Any:
            return kind(name, doc, labels=extra + labels)

        members = family(
            GaugeMetricFamily,
            "verdigris_gossip_members",
            "Members known, by state (this node included, as alive).",
            ["state"],
        )
        bad = family(
            CounterMetricFamily,
            "verdigris_gossip_bad_packets",
            "Packets and frames dropped as bad input, by transport and reason "
            "(envelope reasons from the codec, then undecodable payloads).",
            ["transport", "reason"],
        )
        stream = family(
            CounterMetricFamily,
            "verdigris_gossip_stream_errors",
            "Sync streams cut off, by reason.",
            ["reason"],
        )
        datagrams = family(
            CounterMetricFamily, "verdigris_gossip_datagrams", "Datagrams sent and received.", ["direction"]
        )
        wire_bytes = family(
            CounterMetricFamily,
            "verdigris_gossip_bytes",
            "Bytes on the wire by transport and direction (UDP datagrams as sealed; TCP sync frames, "
            "added when a sync session ends).",
            ["transport", "direction"],
        )
        faults = family(
            CounterMetricFamily,
            "verdigris_gossip_fault_dropped",
            "Traffic dropped by fault injection (datagrams in/out, sync connections refused).",
            ["what"],
        )
        broadcasts = family(
            CounterMetricFamily,
            "verdigris_gossip_broadcasts",
            "Broadcast datagrams sent and received; dropped counts pieces (queue full, merge queue full).",
            ["event"],
        )
        pieces = family(
            CounterMetricFamily,
            "verdigris_gossip_broadcast_pieces",
            "Change set pieces through the broadcaster.",
            ["event"],
        )
        queue = family(GaugeMetricFamily, "verdigris_gossip_queue", "Items waiting, by queue.", ["queue"])
        sessions = family(
            CounterMetricFamily,
            "verdigris_gossip_sync_sessions",
            "Sync sessions, by role and result (ok, or why they failed).",
            ["role", "result"],
        )
        merged = family(
            CounterMetricFamily,
            "verdigris_gossip_changes_merged",
            "Remote changes that won and were written, by source.",
            ["source"],
        )
        versions = family(
            CounterMetricFamily,
            "verdigris_gossip_versions_merged",
            "Remote versions completed, by source.",
            ["source"],
        )
        problems = family(
            CounterMetricFamily,
            "verdigris_gossip_merge_problems",
            "Merges that failed, versions the store refused.",
            ["kind"],
        )
        apply_seconds = family(
            HistogramMetricFamily,
            "verdigris_gossip_apply_batch_seconds",
            "Time to merge one batch of received change sets into the store, on the writer thread.",
            [],
        )
        apply_lag = family(
            GaugeMetricFamily,
            "verdigris_gossip_apply_lag_seconds",
            "Age of the oldest received change set not merged yet (waiting or being merged); 0 if none.",
            [],
        )
        needs = family(
            GaugeMetricFamily,
            "verdigris_gossip_sync_needs",
            "Versions of other actors this node knows it lacks, by kind: missing (not received at all, "
            "below the actor's known head), partial (received in part). Sync asks peers for them.",
            ["kind"],
        )
        gaps = family(
            GaugeMetricFamily,
            "verdigris_gossip_gaps",
            "Holes in the known versions of other actors: runs of missing or partial versions.",
            [],
        )
        now = time.monotonic()

        for rt in runtimes:
            p = [rt.scope or "all"] if scoped else []
            m = rt._membership
            b = rt.broadcaster
            st = rt.stats

            counts = dict.fromkeys((s.value for s in MemberState), 0)
            if m is not None:
                for info in m.members():
                    counts[info.state.value] += 1
                counts[MemberState.ALIVE.value] += 0 if m.has_left else 1
            for state, n in counts.items():
                members.add_metric([*p, state], n)

            for transport, codec in (("udp", rt.udp_codec), ("tcp", rt.tcp_codec)):
                for reason, n in codec.stats.items():
                    bad.add_metric([*p, transport, reason], n)
            bad.add_metric([*p, "udp", "unknown_family"], st.unknown_family)
            bad.add_metric([*p, "udp", "membership_invalid"], m.stats.bad_packets if m is not None else 0)
            bad.add_metric([*p, "udp", "broadcast_invalid"], b.stats.bad_payloads)

            for reason, n in sorted(st.stream_errors.items()):
                stream.add_metric([*p, reason], n)

            datagrams.add_metric([*p, "in"], st.datagrams_in)
            datagrams.add_metric([*p, "out"], st.datagrams_out)
            for transport in ("udp", "tcp"):
                for direction in ("in", "out"):
                    wire_bytes.add_metric([*p, transport, direction], st.bytes.get((transport, direction), 0))

            faults.add_metric([*p, "datagram_in"], rt.faults.dropped_in)
            faults.add_metric([*p, "datagram_out"], rt.faults.dropped_out)
            faults.add_metric([*p, "connection"], rt.faults.refused)

            bs = b.stats
            broadcasts.add_metric([*p, "sent"], bs.sent_payloads)
            broadcasts.add_metric([*p, "received"], bs.received_payloads)
            broadcasts.add_metric([*p, "dropped"], bs.dropped + st.merge_dropped)

            for event, n in (
                ("local", bs.local_pieces),
                ("received", bs.received_pieces),
                ("new", bs.new_pieces),
                ("duplicate", bs.duplicate_pieces),
                ("transmitted", bs.transmissions),
                ("expired", bs.expired),
                ("dropped", bs.dropped),
                ("oversized", bs.oversized),
                ("discarded", bs.discarded),
            ):
                pieces.add_metric([*p, event], n)

            queue.add_metric([*p, "broadcast_pieces"], b.queued)
            queue.add_metric([*p, "broadcast_bytes"], b.queued_bytes)
            queue.add_metric([*p, "merge"], rt.queue_size())

            for (role, result), n in sorted(st.sessions.items()):
                sessions.add_metric([*p, role, result], n)

            for source in sorted(st.changes_merged):
                merged.add_metric([*p, source], st.changes_merged[source])
                versions.add_metric([*p, source], st.versions_merged[source])

            problems.add_metric([*p, "failed"], st.merge_failures)
            problems.add_metric([*p, "rejected"], st.merge_rejected)

            apply_seconds.add_metric(p, st.apply_seconds.cumulative(), st.apply_seconds.sum)
            apply_lag.add_metric(p, rt.apply_lag(now))
            reading = self.readings.get(id(rt))
            if reading is not None:  # none before the first scrape's reading (or a writer busy since)
                needs.add_metric([*p, "missing"], reading.missing)
                needs.add_metric([*p, "partial"], reading.partial)
                gaps.add_metric(p, reading.gaps)

        yield from (
            members,
            bad,
            stream,
            datagrams,
            wire_bytes,
            faults,
            broadcasts,
            pieces,
            queue,
            sessions,
            merged,
            versions,
            problems,
            apply_seconds,
            apply_lag,
            needs,
            gaps,
        )
