"""Prometheus metrics of the gossip runtime.

The cores (membership, broadcaster, sync), the codecs and the runtime each keep plain counters as they go;
:class:`GossipCollector` reads them when Prometheus scrapes, so nothing is counted twice and the hot paths
never touch a metrics library. It is registered in the agent's own registry (see
:mod:`verdigris.api.metrics`), and runs on the event loop like everything else that reads the runtime.

An agent in region mode runs two runtimes (one per scope) into one registry. Each metric family must then
appear once, so one collector per registry (:func:`attach` / :func:`detach`) reports every runtime attached
to it, and when any of them has a scope every sample carries a ``scope`` label (``regional``, ``global``;
``all`` for an unscoped runtime). A single-cluster agent's metrics have no ``scope`` label, as before.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from verdigris.gossip.membership import MemberState

if TYPE_CHECKING:
    from verdigris.runtime.gossip import GossipRuntime

__all__ = ["GossipCollector", "attach", "detach"]

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

    def add(self, runtime: GossipRuntime) -> None:
        if runtime not in self.runtimes:
            self.runtimes.append(runtime)

    def remove(self, runtime: GossipRuntime) -> None:
        if runtime in self.runtimes:
            self.runtimes.remove(runtime)

    def collect(self) -> Iterable[Metric]:
        runtimes = list(self.runtimes)
        scoped = any(rt.scope is not None for rt in runtimes)
        extra = ["scope"] if scoped else []

        def family(
            kind: type[CounterMetricFamily | GaugeMetricFamily], name: str, doc: str, labels: list[str]
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
        )
