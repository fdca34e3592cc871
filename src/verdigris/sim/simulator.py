"""A deterministic discrete-event simulator for the sans-IO gossip cores.

Many :class:`~verdigris.gossip.membership.Membership` instances run in one process on a virtual clock.
The simulator owns the only clock and, apart from each node's own seeded ``random.Random``, the only
randomness (latency, loss), all derived from one seed, so a run is a pure function of its seed and
script: :meth:`Simulator.trace_digest` hashes every datagram sent and every event emitted, and the same
seed gives the same digest in any process (nothing iterates a hash-ordered set).

Cost model: one binary heap holds datagram deliveries, node timers and scripted actions. A node is only
touched when a datagram reaches it or its own deadline (``get_timer()``) comes due; a node's timer entry
is re-pushed only when its deadline changes, and superseded entries are skipped when popped. Simulating
a second therefore costs in proportion to the datagrams and timer firings in it, not to the number of
nodes times the number of ticks, which is what makes 1,000 nodes cheap and 10,000 a matter of memory
(each node's member table) rather than of the event loop.

Faults: seeded latency (a minimum plus an exponential tail), uniform loss, per-link loss, crashes and
restarts (a restart is a fresh ``Membership`` with the same id and address, as after a reboot), and
partitions (groups of nodes that only reach their own group).
"""

from __future__ import annotations

import hashlib
import heapq
import random
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from verdigris.gossip import wire
from verdigris.gossip.membership import (
    Addr,
    JoinFailed,
    Limits,
    MemberEvent,
    Membership,
    Timing,
)

__all__ = ["Network", "SimStats", "Simulator"]

_DELIVER: Final = 0
_TIMER: Final = 1
_ACTION: Final = 2
_PORT: Final = 7946
_SEND_REC: Final = struct.Struct("<dii")


@dataclass(frozen=True, slots=True, kw_only=True)
class Network:
    """Default link behaviour: one-way delay is ``latency_min`` plus an exponential tail of mean
    ``latency_jitter``; each datagram is lost with probability ``loss``."""

    latency_min: float = 0.0005
    latency_jitter: float = 0.001
    loss: float = 0.0

    def __post_init__(self) -> None:
        if self.latency_min < 0 or self.latency_jitter < 0 or not 0.0 <= self.loss <= 1.0:
            raise ValueError("Network: latencies >= 0 and 0 <= loss <= 1")


@dataclass(slots=True)
class SimStats:
    """What the network did: datagrams sent, delivered and dropped (by cause), timer firings, events."""

    sent: int = 0
    delivered: int = 0
    lost: int = 0
    partitioned: int = 0
    to_down_node: int = 0
    unroutable: int = 0
    timers: int = 0
    events: int = 0
    max_datagram: int = 0
    bytes_sent: int = 0


class _Node:
    __slots__ = (
        "addr",
        "generation",
        "group",
        "id",
        "index",
        "m",
        "metadata",
        "timer_at",
        "timer_token",
        "timing",
    )

    def __init__(
        self, index: int, node_id: str, addr: Addr, metadata: Mapping[str, str], timing: Timing
    ) -> None:
        self.index = index
        self.id = node_id
        self.addr = addr
        self.metadata = dict(metadata)
        self.timing = timing
        self.m: Membership | None = None
        self.generation = 0
        self.group = 0
        self.timer_at: float | None = None
        self.timer_token = 0


class Simulator:
    """N membership nodes, one virtual clock, one seed. Script it, then :meth:`run_until` a time.

    ``on_event(time, node_id, event)`` sees every event as it is emitted; with ``keep_events`` they are
    also appended to :attr:`events` (leave it off for large runs: a join of N nodes makes N² events).
    """

    def __init__(
        self,
        seed: int,
        *,
        network: Network | None = None,
        timing: Timing | None = None,
        limits: Limits | None = None,
        cluster: str = "sim",
        keep_events: bool = False,
        on_event: Callable[[float, str, MemberEvent], None] | None = None,
    ) -> None:
        self.seed = seed
        self.network = network if network is not None else Network()
        self.timing = timing if timing is not None else Timing()
        self.limits = limits if limits is not None else Limits()
        self.cluster = cluster
        self.now = 0.0
        self.stats = SimStats()
        self.events: list[tuple[float, str, MemberEvent]] = []
        self._keep_events = keep_events
        self._on_event = on_event
        self._rng = random.Random(f"{seed}/network")
        self._heap: list[tuple[float, int, int, int, Any, Any]] = []
        self._seq = 0
        self._nodes: list[_Node] = []
        self._by_id: dict[str, _Node] = {}
        self._by_addr: dict[Addr, int] = {}
        self._link_loss: dict[tuple[int, int], float] = {}
        self._digest = hashlib.blake2b(digest_size=16)

    # --- topology --------------------------------------------------------------------------------------

    def add_node(
        self,
        node_id: str | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
        timing: Timing | None = None,
    ) -> str:
        """Create a node (not yet started: see :meth:`join`) and return its id."""
        index = len(self._nodes)
        nid = node_id if node_id is not None else f"n{index}"
        if nid in self._by_id:
            raise ValueError(f"duplicate node id {nid!r}")
        addr = (f"10.{(index >> 16) & 0xFF}.{(index >> 8) & 0xFF}.{index & 0xFF}", _PORT)
        node = _Node(index, nid, addr, metadata or {}, timing or self.timing)
        node.m = self._new_membership(node)
        self._nodes.append(node)
        self._by_id[nid] = node
        self._by_addr[addr] = index
        return nid

    def add_nodes(self, n: int) -> list[str]:
        return [self.add_node() for _ in range(n)]

    def node(self, node_id: str) -> Membership:
        """The live ``Membership`` of ``node_id``; KeyError if it is crashed."""
        m = self._by_id[node_id].m
        if m is None:
            raise KeyError(f"{node_id} is down")
        return m

    def addr(self, node_id: str) -> Addr:
        return self._by_id[node_id].addr

    def node_ids(self) -> list[str]:
        return [n.id for n in self._nodes]

    def is_up(self, node_id: str) -> bool:
        return self._by_id[node_id].m is not None

    # --- script ----------------------------------------------------------------------------------------

    def join(self, node_id: str, seeds: Sequence[str] = (), *, at: float | None = None) -> None:
        """Start ``node_id`` and join it through ``seeds`` (node ids), now or at virtual time ``at``."""
        if at is not None and at > self.now:
            seed_list = list(seeds)
            self.at(at, lambda: self.join(node_id, seed_list))
            return
        node = self._by_id[node_id]
        self.node(node_id).join([self._by_id[s].addr for s in seeds], self.now)
        self._flush(node)

    def bootstrap(self, node_ids: Sequence[str] | None = None) -> None:
        """Start ``node_ids`` (default: all) as an already formed cluster, skipping the join storm.

        Each node starts with no seeds and is handed, as one large feed datagram straight into
        ``receive_datagram`` (the public interface, nothing internal), the records a seed's feed would
        carry for every other node. A cold join of N nodes costs O(N² · log N) gossip; this costs O(N²)
        table inserts, which is what makes a 1,000-node test about failure detection cheap.
        """
        nodes = [self._by_id[nid] for nid in (node_ids if node_ids is not None else self.node_ids())]
        for node in nodes:
            self.join(node.id)
        records = []
        for node in nodes:
            m = self.node(node.id)
            host, port = node.addr
            records.append(wire.encode_update(wire.Alive(node.id, m.incarnation, host, port, node.metadata)))
        if len(nodes) < 2:
            return
        chunks: list[list[bytes]] = [[]]
        size = 0
        for raw in records:
            if size + len(raw) > wire.MAX_DATAGRAM - 1024 or len(chunks[-1]) >= 4000:
                chunks.append([])
                size = 0
            chunks[-1].append(raw)
            size += len(raw)
        for i, node in enumerate(nodes):
            m = self.node(node.id)
            sender = nodes[1 if i == 0 else 0]
            head = wire.encode_head(self.cluster, sender.id, 0, wire.Feed(0))
            for chunk in chunks:
                m.receive_datagram(wire.assemble(head, chunk), sender.addr, self.now)
            self._flush(node)

    def leave(self, node_id: str) -> None:
        node = self._by_id[node_id]
        self.node(node_id).leave(self.now)
        self._flush(node)

    def crash(self, node_id: str) -> None:
        """Stop the node dead: no more timers, incoming datagrams dropped; in-flight ones still land."""
        node = self._by_id[node_id]
        node.m = None
        node.timer_at = None
        node.timer_token += 1

    def restart(self, node_id: str, seeds: Sequence[str] = ()) -> None:
        """Boot a crashed node again with empty state (incarnation 0) and join it via ``seeds``."""
        node = self._by_id[node_id]
        if node.m is not None:
            raise RuntimeError(f"{node_id} is up; crash it first")
        node.generation += 1
        node.m = self._new_membership(node)
        self.join(node_id, seeds)

    def partition(self, *groups: Iterable[str]) -> None:
        """Cut the network: each group reaches only itself; nodes in no group form one more group."""
        for n in self._nodes:
            n.group = 0
        for i, group in enumerate(groups, start=1):
            for nid in group:
                self._by_id[nid].group = i

    def heal(self) -> None:
        for n in self._nodes:
            n.group = 0

    def set_loss(self, a: str, b: str, loss: float, *, both_ways: bool = True) -> None:
        """Loss probability on the link a→b (and b→a), overriding the network default."""
        ia, ib = self._by_id[a].index, self._by_id[b].index
        self._link_loss[(ia, ib)] = loss
        if both_ways:
            self._link_loss[(ib, ia)] = loss

    def at(self, time: float, action: Callable[[], None]) -> None:
        """Run ``action`` (a script step: crash, partition...) at virtual ``time``."""
        self._push(max(time, self.now), _ACTION, -1, action, None)

    # --- running ---------------------------------------------------------------------------------------

    def run_until(self, end: float) -> None:
        """Process everything due up to virtual time ``end``, then set the clock to ``end``."""
        heap = self._heap
        nodes = self._nodes
        stats = self.stats
        pop = heapq.heappop
        while heap and heap[0][0] <= end:
            t, _, kind, index, a, b = pop(heap)
            self.now = t
            if kind == _DELIVER:
                node = nodes[index]
                m = node.m
                if m is None:
                    stats.to_down_node += 1
                    continue
                stats.delivered += 1
                m.receive_datagram(b, a, t)
                self._flush(node)
            elif kind == _TIMER:
                node = nodes[index]
                m = node.m
                if m is None or node.timer_token != a:
                    continue  # superseded or crashed
                node.timer_at = None
                stats.timers += 1
                m.handle_timer(t)
                self._flush(node)
            else:
                a()
        if end > self.now:
            self.now = end

    def run_for(self, duration: float) -> None:
        self.run_until(self.now + duration)

    def trace_digest(self) -> str:
        """Hash of every datagram (time, source, destination, bytes) and every event so far."""
        return self._digest.hexdigest()

    # --- internals -------------------------------------------------------------------------------------

    def _new_membership(self, node: _Node) -> Membership:
        rng = random.Random(f"{self.seed}/{node.id}/{node.generation}")
        return Membership(
            node.id,
            node.addr,
            rng=rng,
            cluster=self.cluster,
            metadata=node.metadata,
            timing=node.timing,
            limits=self.limits,
        )

    def _push(self, time: float, kind: int, index: int, a: Any, b: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (time, self._seq, kind, index, a, b))

    def _flush(self, node: _Node) -> None:
        """Collect what a node produced after being touched: datagrams, events, its next deadline."""
        m = node.m
        if m is None:
            return
        now = self.now
        for data, dst in m.datagrams_to_send(now):
            self._transmit(node, data, dst)
        event = m.next_event()
        while event is not None:
            self._record(node, event)
            event = m.next_event()
        t = m.get_timer()
        if t != node.timer_at:
            node.timer_token += 1
            node.timer_at = t
            if t is not None:
                self._push(t if t > now else now, _TIMER, node.index, node.timer_token, None)

    def _transmit(self, src: _Node, data: bytes, dst: Addr) -> None:
        stats = self.stats
        stats.sent += 1
        size = len(data)
        stats.bytes_sent += size
        if size > stats.max_datagram:
            stats.max_datagram = size
        j = self._by_addr.get(dst, -1)
        self._digest.update(_SEND_REC.pack(self.now, src.index, j))
        self._digest.update(data)
        if j < 0:
            stats.unroutable += 1
            return
        target = self._nodes[j]
        if target.group != src.group:
            stats.partitioned += 1
            return
        net = self.network
        loss = self._link_loss.get((src.index, j), net.loss) if self._link_loss else net.loss
        rng = self._rng
        if loss > 0.0 and rng.random() < loss:
            stats.lost += 1
            return
        delay = net.latency_min
        if net.latency_jitter > 0.0:
            delay += rng.expovariate(1.0 / net.latency_jitter)
        self._push(self.now + delay, _DELIVER, j, src.addr, data)

    def _record(self, node: _Node, event: MemberEvent) -> None:
        self.stats.events += 1
        if isinstance(event, JoinFailed):
            text = f"E{self.now!r}|{node.id}|JoinFailed|{event.attempts}"
        else:
            mi = event.member
            text = f"E{self.now!r}|{node.id}|{type(event).__name__}|{mi.id}|{mi.incarnation}"
        self._digest.update(text.encode())
        if self._keep_events:
            self.events.append((self.now, node.id, event))
        if self._on_event is not None:
            self._on_event(self.now, node.id, event)
