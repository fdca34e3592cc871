"""Prometheus metrics of the gossip runtime.

The cores (membership, broadcaster, sync), the codecs and the runtime each keep plain counters as they go;
:class:`GossipCollector` reads them when Prometheus scrapes, so nothing is counted twice and the hot paths
never touch a metrics library. It is registered in the agent's own registry (see
:mod:`verdigris.api.metrics`), and runs on the event loop like everything else that reads the runtime.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from verdigris.gossip.membership import MemberState

if TYPE_CHECKING:
    from verdigris.runtime.gossip import GossipRuntime

__all__ = ["GossipCollector"]


class GossipCollector:
    """Reads a :class:`~verdigris.runtime.gossip.GossipRuntime`'s counters at every scrape."""

    def __init__(self, runtime: GossipRuntime) -> None:
        self._runtime = runtime

    def collect(self) -> Iterable[Metric]:
        rt = self._runtime
        m = rt._membership
        b = rt.broadcaster
        st = rt.stats

        members = GaugeMetricFamily(
            "verdigris_gossip_members",
            "Members known, by state (this node included, as alive).",
            labels=["state"],
        )
        counts = dict.fromkeys((s.value for s in MemberState), 0)
        if m is not None:
            for info in m.members():
                counts[info.state.value] += 1
            counts[MemberState.ALIVE.value] += 0 if m.has_left else 1
        for state, n in counts.items():
            members.add_metric([state], n)
        yield members

        bad = CounterMetricFamily(
            "verdigris_gossip_bad_packets",
            "Packets and frames dropped as bad input, by transport and reason "
            "(envelope reasons from the codec, then undecodable payloads).",
            labels=["transport", "reason"],
        )
        for transport, codec in (("udp", rt.udp_codec), ("tcp", rt.tcp_codec)):
            for reason, n in codec.stats.items():
                bad.add_metric([transport, reason], n)
        bad.add_metric(["udp", "unknown_family"], st.unknown_family)
        bad.add_metric(["udp", "membership_invalid"], m.stats.bad_packets if m is not None else 0)
        bad.add_metric(["udp", "broadcast_invalid"], b.stats.bad_payloads)
        yield bad

        stream = CounterMetricFamily(
            "verdigris_gossip_stream_errors", "Sync streams cut off, by reason.", labels=["reason"]
        )
        for reason, n in sorted(st.stream_errors.items()):
            stream.add_metric([reason], n)
        yield stream

        datagrams = CounterMetricFamily(
            "verdigris_gossip_datagrams", "Datagrams sent and received.", labels=["direction"]
        )
        datagrams.add_metric(["in"], st.datagrams_in)
        datagrams.add_metric(["out"], st.datagrams_out)
        yield datagrams

        faults = CounterMetricFamily(
            "verdigris_gossip_fault_dropped",
            "Traffic dropped by fault injection (datagrams in/out, sync connections refused).",
            labels=["what"],
        )
        faults.add_metric(["datagram_in"], rt.faults.dropped_in)
        faults.add_metric(["datagram_out"], rt.faults.dropped_out)
        faults.add_metric(["connection"], rt.faults.refused)
        yield faults

        bs = b.stats
        broadcasts = CounterMetricFamily(
            "verdigris_gossip_broadcasts",
            "Broadcast datagrams sent and received; dropped counts pieces (queue full, merge queue full).",
            labels=["event"],
        )
        broadcasts.add_metric(["sent"], bs.sent_payloads)
        broadcasts.add_metric(["received"], bs.received_payloads)
        broadcasts.add_metric(["dropped"], bs.dropped + st.merge_dropped)
        yield broadcasts

        pieces = CounterMetricFamily(
            "verdigris_gossip_broadcast_pieces",
            "Change set pieces through the broadcaster.",
            labels=["event"],
        )
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
            pieces.add_metric([event], n)
        yield pieces

        queue = GaugeMetricFamily("verdigris_gossip_queue", "Items waiting, by queue.", labels=["queue"])
        queue.add_metric(["broadcast_pieces"], b.queued)
        queue.add_metric(["broadcast_bytes"], b.queued_bytes)
        queue.add_metric(["merge"], rt.queue_size())
        yield queue

        sessions = CounterMetricFamily(
            "verdigris_gossip_sync_sessions",
            "Sync sessions, by role and result (ok, or why they failed).",
            labels=["role", "result"],
        )
        for (role, result), n in sorted(st.sessions.items()):
            sessions.add_metric([role, result], n)
        yield sessions

        merged = CounterMetricFamily(
            "verdigris_gossip_changes_merged",
            "Remote changes that won and were written, by source.",
            labels=["source"],
        )
        versions = CounterMetricFamily(
            "verdigris_gossip_versions_merged", "Remote versions completed, by source.", labels=["source"]
        )
        for source in sorted(st.changes_merged):
            merged.add_metric([source], st.changes_merged[source])
            versions.add_metric([source], st.versions_merged[source])
        yield merged
        yield versions

        problems = CounterMetricFamily(
            "verdigris_gossip_merge_problems",
            "Merges that failed, versions the store refused.",
            labels=["kind"],
        )
        problems.add_metric(["failed"], st.merge_failures)
        problems.add_metric(["rejected"], st.merge_rejected)
        yield problems
