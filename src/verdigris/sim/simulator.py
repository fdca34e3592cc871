"""A deterministic discrete-event simulator for the sans-IO gossip cores.

Many nodes run in one process on a virtual clock. Each runs the very objects the agent runs:
:class:`~verdigris.gossip.membership.Membership` and, with ``changes=Changes()``, a
:class:`~verdigris.gossip.broadcast.Broadcaster` and anti-entropy sync
(:class:`~verdigris.gossip.sync.SyncScheduler`, :class:`~verdigris.gossip.sync.SyncClient`,
:class:`~verdigris.gossip.sync.SyncServer`) over a :class:`~verdigris.gossip.versions.VersionSource`, the
version-only stand-in for the store. The simulator owns the only clock and, apart from the cores' own
seeded ``random.Random`` s, the only randomness (latency, loss, driver choices), all derived from one
seed, so a run is a pure function of its seed and script: :meth:`Simulator.trace_digest` hashes every
datagram, every stream chunk, every sync session and every membership event, and the same seed gives the
same digest in any process (nothing iterates a hash-ordered set).

**Two membership modes.**

* *SWIM* (the default, ``membership=None``): every node runs its own ``Membership``; the member view its
  broadcaster and sync scheduler get is the members its own membership holds **alive**, kept up to date
  from its events (as the runtime's ``_alive_members()``). Failure detection, false suspicions, partitions
  and their healing all act on dissemination exactly as they would in the agent. Memory is what limits
  it: every node holds a record of every member (about 480 bytes), so N nodes cost about 480·N² bytes
  (1,000 nodes ≈ 0.5 GB; 10,000 would need ≈ 48 GB).
* *Static* (``membership=StaticMembership()``): no ``Membership`` objects. All nodes share one compact view
  (:class:`~verdigris.sim.views.PeerView`, one record per node) and each sees it minus itself, which is
  what SWIM converges to in a stable cluster. A crashed node stays in everyone's view (datagrams to it are
  lost, syncs with it fail) unless ``detect_after`` removes it after that long, standing in for failure
  detection; a partition does not change views. This is the legitimate model for dissemination
  measurements (how fast an update spreads, how sync repairs loss), where membership is settled, and it
  makes 10,000 nodes cost tens of megabytes. It does not model membership churn: false suspicions, nodes
  held dead after a long partition, joins.

**Driving, as the runtime drives the cores** (:class:`Changes` mirrors ``RuntimeSettings``' defaults):
a node's one timer is the earliest of its cores' deadlines; the broadcaster ticks when its
``get_timer()`` is due (so a node relays a new piece as soon as it gets it, then every gossip interval)
or, with ``Changes(ticker=True)``, on a fixed ticker of random phase as memberlist's gossip loop does;
received broadcast pieces and synced changesets are merged at once (pieces the source refuses are
discarded from the relay queue); a due sync round deals the node's needs to the peers the scheduler
picks; a member that comes up is synced with at once (``urgent_sync``); a member held dead is
re-contacted every ``reconnect_interval`` (Serf's reconnect, which heals partitions); a join that failed
while the node is alone is retried with backoff.

**Network.** Datagrams (membership and broadcast, told apart by their first byte as on the wire) get
seeded latency (a minimum plus an exponential tail), uniform or per-link loss, and are dropped across a
partition or to a crashed node. A sync session is an in-memory byte stream: the request reaches the
server after a handshake (three one-way delays); the server's answer is produced at once and its chunks
arrive in order, each after its own one-way delay (TCP's loss repair is not modelled: streams do not lose
bytes). A connection to a crashed or cut-off node fails after ``connect_timeout``; a stream cut by a
partition, or whose server crashed, goes silent and the client's idle timeout ends it; a server that
restarted since the connection was opened resets it.

**Faults.** :meth:`crash` loses everything of a node but its source's books (the store's persisted
bookkeeping); :meth:`restart` boots it again with new cores (incarnation 0) over the same source;
:meth:`partition` / :meth:`heal`; :meth:`set_loss` per link; ``network.loss`` and :meth:`set_network`.

Cost model: one binary heap holds datagram deliveries, stream chunks, node timers and scripted actions. A
node is touched only when something reaches it or its own deadline comes due, and its timer entry is
re-pushed only when the deadline changes (superseded entries are skipped when popped), so simulating a
second costs in proportion to the messages and timer firings in it, not to the number of nodes times the
number of ticks.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import random
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from verdigris.gossip import wire
from verdigris.gossip.broadcast import BroadcastConfig, Broadcaster, new_to
from verdigris.gossip.changes_wire import FAMILY_BROADCAST
from verdigris.gossip.membership import (
    Addr,
    JoinFailed,
    Limits,
    MemberDown,
    MemberEvent,
    MemberLeft,
    Membership,
    MemberSuspect,
    MemberUp,
    Timing,
)
from verdigris.gossip.sync import (
    ChangesReceived,
    Phase,
    SyncClient,
    SyncConfig,
    SyncDone,
    SyncEvent,
    SyncFailed,
    SyncScheduler,
    SyncServer,
    build_sync_state,
    split_sync_state,
)
from verdigris.gossip.versions import VersionSource
from verdigris.sim.views import Peer, PeerView, Without
from verdigris.store.types import Changeset

__all__ = ["Changes", "Network", "SimStats", "Simulator", "StaticMembership", "VersionVia"]

VersionVia = Literal["local", "broadcast", "sync"]

_DELIVER: Final = 0
_TIMER: Final = 1
_ACTION: Final = 2
_REQUEST: Final = 3
_CHUNK: Final = 4
_CONNFAIL: Final = 5
_PORT: Final = 7946
_SEND_REC: Final = struct.Struct("<dii")
_BCAST: Final = FAMILY_BROADCAST


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


@dataclass(frozen=True, slots=True, kw_only=True)
class Changes:
    """Change dissemination on every node, driven as the gossip runtime drives it.

    The defaults are the runtime's (``RuntimeSettings``, LAN profile). Sync sessions are served at once
    (the model has no server-side queueing), so ``max_server_sessions`` has no counterpart here.
    """

    broadcast: BroadcastConfig = field(default_factory=BroadcastConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    sync_rounds: bool = True
    """Periodic anti-entropy rounds (off: broadcast only, plus urgent syncs if those are on)."""
    sync_min_interval: float = 1.0
    sync_max_interval: float = 15.0
    sync_peers_per_round: int = 3
    max_client_sessions: int = 6
    connect_timeout: float = 3.0
    urgent_sync: bool = True
    """SWIM mode: sync with a member as soon as it comes up (after 0.1-0.6 s), as the runtime does."""
    urgent_sync_pending: int = 3
    urgent_sync_repeat: float = 3.0
    reconnect_interval: float | None = 5.0
    """SWIM mode: re-join one member held dead every ``interval · U(0.5, 1)`` s (None: never)."""
    rejoin_backoff_initial: float = 2.0
    rejoin_backoff_max: float = 60.0
    ticker: bool = False
    """Tick broadcasters on a fixed ticker of random phase (memberlist's gossip loop) instead of when
    ``Broadcaster.get_timer()`` says: a piece then waits for the next tick instead of going out at once."""

    def __post_init__(self) -> None:
        if not 0 < self.sync_min_interval <= self.sync_max_interval or self.sync_peers_per_round < 1:
            raise ValueError("Changes: 0 < sync_min_interval <= sync_max_interval, sync_peers_per_round >= 1")
        if self.max_client_sessions < 1 or self.connect_timeout <= 0:
            raise ValueError("Changes: max_client_sessions >= 1, connect_timeout > 0")


@dataclass(frozen=True, slots=True, kw_only=True)
class StaticMembership:
    """Static membership: one shared view of every started node instead of a ``Membership`` per node."""

    detect_after: float | None = None
    """Remove a crashed node from every view this long after the crash (None: it stays in them)."""
    rejoin_after: float = 0.0
    """Put a restarted node back in every view this long after the restart."""
    sync_sample: int = 64
    """A sync round chooses among a uniform random sample of this many members (all of them when there
    are fewer), so a round costs O(sample), not O(N). With N ≫ rounds the scheduler's own rule (least
    recently synced first) picks uniformly random peers either way."""

    def __post_init__(self) -> None:
        if self.detect_after is not None and self.detect_after < 0:
            raise ValueError("StaticMembership: detect_after >= 0")
        if self.rejoin_after < 0 or self.sync_sample < 1:
            raise ValueError("StaticMembership: rejoin_after >= 0, sync_sample >= 1")


@dataclass(slots=True)
class SimStats:
    """What the network and the nodes did."""

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
    broadcast_datagrams: int = 0
    """Broadcast datagrams sent (also counted in ``sent``)."""
    broadcast_versions: int = 0
    """Versions completed at some node from a broadcast."""
    sync_sessions: int = 0
    sync_ok: int = 0
    sync_failed: int = 0
    sync_bytes: int = 0
    """Stream bytes, both ways."""
    sync_versions: int = 0
    """Versions completed at some node from a sync."""
    local_versions: int = 0
    rejected: int = 0
    """Pieces the source refused."""


class _Session:
    """One sync session, seen from both ends."""

    __slots__ = ("broken", "client", "last", "node", "peer", "received", "scheduled", "sid")

    def __init__(self, sid: int, client: SyncClient, node: int, peer: Peer, scheduled: bool) -> None:
        self.sid = sid
        self.client = client
        self.node = node
        self.peer = peer
        self.scheduled = scheduled
        self.last = 0.0  # delivery time of the last chunk to the client (streams deliver in order)
        self.broken = False
        self.received = 0


class _Node:
    __slots__ = (
        "actor",
        "addr",
        "bc",
        "bc_at",
        "clients",
        "dead",
        "generation",
        "group",
        "id",
        "index",
        "m",
        "metadata",
        "peer",
        "reconnect_at",
        "rejoin_at",
        "rejoin_backoff",
        "rng",
        "sched",
        "seeds",
        "source",
        "tick_phase",
        "timer_at",
        "timer_token",
        "timing",
        "urgent",
        "urgent_last",
        "view",
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
        self.peer = Peer(node_id, addr, index)
        self.actor = hashlib.blake2b(node_id.encode(), digest_size=16).digest()
        self.source: VersionSource | None = None
        self.bc: Broadcaster | None = None
        self.bc_at: float | None = None
        self.sched: SyncScheduler | None = None
        self.clients: dict[int, _Session] = {}
        self.view: PeerView | Without | None = None
        self.rng: random.Random | None = None
        self.tick_phase = 0.0
        self.dead: dict[int, None] = {}
        self.urgent: dict[int, float] = {}
        self.urgent_last: dict[int, float] = {}
        self.reconnect_at: float | None = None
        self.rejoin_at: float | None = None
        self.rejoin_backoff = 0.0
        self.seeds: list[Addr] = []


class Simulator:
    """N nodes, one virtual clock, one seed. Script it, then :meth:`run_until` a time.

    ``membership=None`` runs SWIM on every node, ``StaticMembership()`` a shared static view (see the
    module docstring). ``changes=Changes()`` adds broadcast and sync; without it only membership runs.
    ``on_event(time, node_id, event)`` sees every membership event as it is emitted; with ``keep_events``
    they are also kept in :attr:`events` (leave it off for large runs: a join of N nodes makes N² events).
    ``on_version(time, node_id, actor, version, via)`` sees every version a node completes.
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
        membership: StaticMembership | None = None,
        changes: Changes | None = None,
        on_version: Callable[[float, str, bytes, int, VersionVia], None] | None = None,
    ) -> None:
        if membership is not None and changes is None:
            raise ValueError("static membership simulates nothing without changes=Changes()")
        self.seed = seed
        self.network = network if network is not None else Network()
        self.timing = timing if timing is not None else Timing()
        self.limits = limits if limits is not None else Limits()
        self.cluster = cluster
        self.static = membership
        self.changes = changes
        self.now = 0.0
        self.stats = SimStats()
        self.events: list[tuple[float, str, MemberEvent]] = []
        self._keep_events = keep_events
        self._on_event = on_event
        self._on_version = on_version
        self._rng = random.Random(f"{seed}/network")
        self._heap: list[tuple[float, int, int, int, Any, Any]] = []
        self._seq = 0
        self._sid = 0
        self._nodes: list[_Node] = []
        self._by_id: dict[str, _Node] = {}
        self._by_addr: dict[Addr, int] = {}
        self._link_loss: dict[tuple[int, int], float] = {}
        self._digest = hashlib.blake2b(digest_size=16)
        self._shared = PeerView(self._by_addr)

    # --- topology --------------------------------------------------------------------------------------

    def add_node(
        self,
        node_id: str | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
        timing: Timing | None = None,
    ) -> str:
        """Create a node (not yet started: see :meth:`join` / :meth:`bootstrap`) and return its id."""
        index = len(self._nodes)
        nid = node_id if node_id is not None else f"n{index}"
        if nid in self._by_id:
            raise ValueError(f"duplicate node id {nid!r}")
        addr = (f"10.{(index >> 16) & 0xFF}.{(index >> 8) & 0xFF}.{index & 0xFF}", _PORT)
        node = _Node(index, nid, addr, metadata or {}, timing or self.timing)
        if self.static is None:
            node.m = self._new_membership(node)
        if self.changes is not None:
            node.source = VersionSource(node.actor)
            node.view = PeerView(self._by_addr) if self.static is None else Without(self._shared, index)
        self._nodes.append(node)
        self._by_id[nid] = node
        self._by_addr[addr] = index
        return nid

    def add_nodes(self, n: int) -> list[str]:
        return [self.add_node() for _ in range(n)]

    def node(self, node_id: str) -> Membership:
        """The live ``Membership`` of ``node_id``; KeyError if it is crashed (or in static mode)."""
        m = self._by_id[node_id].m
        if m is None:
            raise KeyError(f"{node_id} is down" if self.static is None else "static membership")
        return m

    def source(self, node_id: str) -> VersionSource:
        """The node's version books (kept across crashes, like the store's)."""
        src = self._by_id[node_id].source
        if src is None:
            raise KeyError("no changes layer: Simulator(changes=Changes())")
        return src

    def broadcaster(self, node_id: str) -> Broadcaster:
        bc = self._by_id[node_id].bc
        if bc is None:
            raise KeyError(f"{node_id} is not running")
        return bc

    def actor(self, node_id: str) -> bytes:
        """The node's actor id (its site id) in the books."""
        return self._by_id[node_id].actor

    def view(self, node_id: str) -> list[str]:
        """Ids of the members the node's broadcaster and sync see (alive members, itself excluded)."""
        v = self._by_id[node_id].view
        return [] if v is None else [p.id for p in v]

    def addr(self, node_id: str) -> Addr:
        return self._by_id[node_id].addr

    def node_ids(self) -> list[str]:
        return [n.id for n in self._nodes]

    def is_up(self, node_id: str) -> bool:
        """Not crashed (in SWIM mode a node is up from :meth:`add_node`, before it joins)."""
        node = self._by_id[node_id]
        return node.m is not None if self.static is None else node.bc is not None

    def is_running(self, node_id: str) -> bool:
        """Started, not crashed, not left: its changes layer runs."""
        return self._by_id[node_id].bc is not None

    # --- script ----------------------------------------------------------------------------------------

    def join(self, node_id: str, seeds: Sequence[str] = (), *, at: float | None = None) -> None:
        """Start ``node_id`` and join it through ``seeds`` (node ids), now or at virtual time ``at``.
        In static mode the node just starts (and enters every view)."""
        if at is not None and at > self.now:
            seed_list = list(seeds)
            self.at(at, lambda: self.join(node_id, seed_list))
            return
        node = self._by_id[node_id]
        self._start(node)
        if node.m is not None:
            node.seeds = [self._by_id[s].addr for s in seeds]
            node.m.join(node.seeds, self.now)
        self._flush(node)

    def bootstrap(self, node_ids: Sequence[str] | None = None) -> None:
        """Start ``node_ids`` (default: all) as an already formed cluster, skipping the join storm.

        In SWIM mode each node starts with no seeds and is handed, as one large feed datagram straight
        into ``receive_datagram`` (the public interface, nothing internal), the records a seed's feed would
        carry for every other node. A cold join of N nodes costs O(N² · log N) gossip; this costs O(N²)
        table inserts, which is what makes a 1,000-node test about failure detection cheap.
        """
        nodes = [self._by_id[nid] for nid in (node_ids if node_ids is not None else self.node_ids())]
        for node in nodes:
            self.join(node.id)
        if self.static is not None or len(nodes) < 2:
            return
        records = []
        for node in nodes:
            m = self.node(node.id)
            host, port = node.addr
            records.append(wire.encode_update(wire.Alive(node.id, m.incarnation, host, port, node.metadata)))
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
        """Leave gracefully (SWIM mode); the node's changes layer stops at once."""
        node = self._by_id[node_id]
        self.node(node_id).leave(self.now)
        self._stop_changes(node)
        self._flush(node)

    def crash(self, node_id: str) -> None:
        """Stop the node dead: no more timers, incoming datagrams dropped; in-flight ones still land.
        Everything but its source's books is lost."""
        node = self._by_id[node_id]
        node.m = None
        self._stop_changes(node)
        node.timer_at = None
        node.timer_token += 1
        static = self.static
        if static is not None and static.detect_after is not None:
            gen = node.generation
            self.at(self.now + static.detect_after, lambda: self._detect(node, gen))

    def restart(self, node_id: str, seeds: Sequence[str] = ()) -> None:
        """Boot a crashed node again with new cores (incarnation 0) over its persisted books, and join it
        via ``seeds`` (SWIM mode) or put it back in the shared view (static mode)."""
        node = self._by_id[node_id]
        if self.is_up(node_id):
            raise RuntimeError(f"{node_id} is up; crash it first")
        node.generation += 1
        if self.static is None:
            node.m = self._new_membership(node)
            if isinstance(node.view, PeerView):
                node.view.clear()
        node.dead.clear()
        node.urgent.clear()
        node.urgent_last.clear()
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

    def set_network(self, network: Network) -> None:
        """Change the default link behaviour from now on (e.g. stop the loss)."""
        self.network = network

    def at(self, time: float, action: Callable[[], None]) -> None:
        """Run ``action`` (a script step: crash, partition...) at virtual ``time``."""
        self._push(max(time, self.now), _ACTION, -1, action, None)

    def write(self, node_id: str, last_seq: int = 0) -> tuple[bytes, int]:
        """A local transaction on a running node: a new version of ``last_seq + 1`` seqs, booked and
        handed to its broadcaster. Returns ``(actor, version)``."""
        node = self._by_id[node_id]
        bc, src = node.bc, node.source
        if bc is None or src is None:
            raise RuntimeError(f"{node_id} is not running")
        cs = src.commit(last_seq)
        self.stats.local_versions += 1
        self._version(node, cs.actor, cs.version, "local")
        bc.local_commit(cs, self.now)
        self._flush(node)
        return cs.actor, cs.version

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
                if b[0] == _BCAST:
                    bc = node.bc
                    if bc is None:
                        stats.to_down_node += 1
                        continue
                    stats.delivered += 1
                    pieces = bc.receive(b, a, t)
                    if pieces:
                        self._merge(node, pieces, "broadcast")
                    self._reschedule(node)
                    continue
                m = node.m
                if m is None:
                    stats.to_down_node += 1
                    continue
                stats.delivered += 1
                m.receive_datagram(b, a, t)
                self._flush(node)
            elif kind == _TIMER:
                node = nodes[index]
                if node.timer_token != a:
                    continue  # superseded or crashed
                node.timer_at = None
                stats.timers += 1
                self._on_timer(node, t)
            elif kind == _ACTION:
                a()
            elif kind == _CHUNK:
                self._on_chunk(nodes[index], a, b, t)
            elif kind == _REQUEST:
                self._on_request(nodes[index], a, b, t)
            else:
                self._on_connfail(nodes[index], a, t)
        if end > self.now:
            self.now = end

    def run_for(self, duration: float) -> None:
        self.run_until(self.now + duration)

    def trace_digest(self) -> str:
        """Hash of every datagram (time, source, destination, bytes), stream chunk, sync session and
        membership event so far."""
        return self._digest.hexdigest()

    # --- convergence -----------------------------------------------------------------------------------

    def books_of(self, node_id: str) -> dict[bytes, list[tuple[int, int]]]:
        """Complete versions per actor (as ranges) that the node holds."""
        src = self.source(node_id)
        return {a: list(b.known) for a, b in sorted(src.books().items()) if b.head > 0}

    def lacking(self, node_id: str) -> bool:
        """True if the node knows of versions it does not have (gaps or partial versions)."""
        src = self.source(node_id)
        return any(b.partials for b in src.books().values()) or bool(src.needs())

    def converged(self, node_ids: Sequence[str] | None = None) -> bool:
        """Every running node (or each of ``node_ids``) holds the same complete versions and lacks none."""
        ids = [n.id for n in self._nodes if n.bc is not None] if node_ids is None else list(node_ids)
        if not ids:
            return True
        first = self.books_of(ids[0])
        return all(not self.lacking(i) and self.books_of(i) == first for i in ids)

    # --- internals: nodes ------------------------------------------------------------------------------

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

    def _start(self, node: _Node) -> None:
        """Start the changes layer of a node (if there is one and it is not running)."""
        cfg = self.changes
        if cfg is None or node.bc is not None:
            return
        src = node.source
        assert src is not None
        tag = f"{self.seed}/{node.id}/{node.generation}"
        node.rng = random.Random(f"{tag}/driver")
        node.bc = Broadcaster(is_new=new_to(src.books), rng=random.Random(f"{tag}/bc"), config=cfg.broadcast)
        node.bc_at = None
        node.tick_phase = node.rng.uniform(0.0, cfg.broadcast.interval)
        if cfg.sync_rounds:
            node.sched = SyncScheduler(
                random.Random(f"{tag}/sync"),
                min_interval=cfg.sync_min_interval,
                max_interval=cfg.sync_max_interval,
                peers_per_round=cfg.sync_peers_per_round,
                now=self.now,
            )
        if self.static is None:
            if cfg.reconnect_interval is not None:
                node.reconnect_at = self.now + cfg.reconnect_interval * node.rng.uniform(0.5, 1.0)
            node.rejoin_backoff = cfg.rejoin_backoff_initial
        else:
            delay = self.static.rejoin_after if node.generation > 0 else 0.0
            if delay == 0.0:
                self._shared.add(node.peer)
            else:
                gen = node.generation
                self.at(self.now + delay, lambda: self._rejoin_view(node, gen))

    def _stop_changes(self, node: _Node) -> None:
        node.bc = None
        node.bc_at = None
        node.sched = None
        node.clients = {}
        node.urgent.clear()
        node.reconnect_at = node.rejoin_at = None

    def _detect(self, node: _Node, gen: int) -> None:
        if node.generation == gen and node.bc is None:
            self._shared.remove(node.index)

    def _rejoin_view(self, node: _Node, gen: int) -> None:
        if node.generation == gen and node.bc is not None:
            self._shared.add(node.peer)

    def _on_timer(self, node: _Node, t: float) -> None:
        m = node.m
        if m is not None:
            mt = m.get_timer()
            if mt is not None and mt <= t:
                m.handle_timer(t)
        cfg = self.changes
        if cfg is not None and node.bc is not None:
            self._pump(node)  # membership first: its events update the view the others use
            bc = node.bc
            if node.bc_at is not None and node.bc_at <= t:
                view = node.view
                assert view is not None
                for payload, addr in bc.tick(t, view, addrs=view.addrs):
                    self._transmit(node, payload, addr)
            sched = node.sched
            if sched is not None and sched.due(t):
                self._sync_round(node, sched, cfg, t)
            if node.clients:
                for s in list(node.clients.values()):
                    ct = s.client.get_timer()
                    if ct is not None and ct <= t:
                        self._client_events(node, s, s.client.handle_timer(t), t)
            if node.urgent:
                self._run_urgent(node, cfg, t)
            if node.reconnect_at is not None and node.reconnect_at <= t:
                self._reconnect(node, cfg, t)
            if node.rejoin_at is not None and node.rejoin_at <= t:
                node.rejoin_at = None
                if node.m is not None:
                    node.m.join(node.seeds, t)
        self._flush(node)

    def _flush(self, node: _Node) -> None:
        """Collect what a node produced after being touched: datagrams, events, its next deadline."""
        if node.m is not None:
            self._pump(node)
        self._reschedule(node)

    def _pump(self, node: _Node) -> None:
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

    def _reschedule(self, node: _Node) -> None:
        now = self.now
        m = node.m
        t = m.get_timer() if m is not None else None
        if node.bc is not None:
            t = self._changes_deadline(node, t)
        if t != node.timer_at:
            node.timer_token += 1
            node.timer_at = t
            if t is not None:
                self._push(t if t > now else now, _TIMER, node.index, node.timer_token, None)

    def _changes_deadline(self, node: _Node, best: float | None) -> float | None:
        bc = node.bc
        assert bc is not None
        bt = bc.get_timer()
        if bt is not None and self.changes is not None and self.changes.ticker:
            interval = self.changes.broadcast.interval
            k = math.ceil((bt - node.tick_phase) / interval - 1e-9)
            bt = node.tick_phase + k * interval
        node.bc_at = bt
        cands: list[float | None] = [bt, node.reconnect_at, node.rejoin_at]
        if node.sched is not None:
            cands.append(node.sched.get_timer())
        for s in node.clients.values():
            cands.append(s.client.get_timer())
        if node.urgent:
            cands.append(min(node.urgent.values()))
        for c in cands:
            if c is not None and (best is None or c < best):
                best = c
        return best

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
        if self.changes is not None and node.bc is not None:
            self._view_event(node, event)

    def _view_event(self, node: _Node, event: MemberEvent) -> None:
        """Keep the node's view = the members its membership holds alive (the runtime's view)."""
        view = node.view
        assert isinstance(view, PeerView)
        cfg = self.changes
        assert cfg is not None
        if isinstance(event, JoinFailed):
            m = node.m
            if m is not None and m.num_alive() <= 1:
                node.rejoin_at = self.now + node.rejoin_backoff
                node.rejoin_backoff = min(node.rejoin_backoff * 2, cfg.rejoin_backoff_max)
            return
        other = self._by_id.get(event.member.id)
        if other is None:
            return
        j = other.index
        if isinstance(event, MemberUp):
            view.add(other.peer)
            node.dead.pop(j, None)
            node.rejoin_at = None
            node.rejoin_backoff = cfg.rejoin_backoff_initial
            if cfg.urgent_sync and j not in node.urgent and len(node.urgent) < cfg.urgent_sync_pending:
                last = node.urgent_last.get(j)
                if last is None or self.now - last >= cfg.urgent_sync_repeat:
                    assert node.rng is not None
                    node.urgent[j] = self.now + node.rng.uniform(0.1, 0.6)
        elif isinstance(event, MemberSuspect):
            view.remove(j)
        elif isinstance(event, MemberDown):
            view.remove(j)
            node.dead[j] = None
        elif isinstance(event, MemberLeft):
            view.remove(j)
            node.dead.pop(j, None)

    def _reconnect(self, node: _Node, cfg: Changes, t: float) -> None:
        assert node.rng is not None and cfg.reconnect_interval is not None
        node.reconnect_at = t + cfg.reconnect_interval * node.rng.uniform(0.5, 1.0)
        if node.dead and node.m is not None:
            target = self._nodes[node.rng.choice(list(node.dead))]
            node.m.join([target.addr], t)

    # --- internals: broadcast and merging --------------------------------------------------------------

    def _merge(self, node: _Node, pieces: list[Changeset], via: VersionVia) -> int:
        src = node.source
        assert src is not None
        result = src.merge(pieces)
        if result.rejected:
            self.stats.rejected += len(result.rejected)
            if node.bc is not None:
                for actor, version, _ in result.rejected:
                    node.bc.discard(actor, version)
        for actor, version in result.applied_versions:
            self._version(node, actor, version, via)
        return len(result.applied_versions) + len(result.buffered)

    def _version(self, node: _Node, actor: bytes, version: int, via: VersionVia) -> None:
        if via == "broadcast":
            self.stats.broadcast_versions += 1
        elif via == "sync":
            self.stats.sync_versions += 1
        if self._on_version is not None:
            self._on_version(self.now, node.id, actor, version, via)

    def _transmit(self, src: _Node, data: bytes, dst: Addr) -> None:
        stats = self.stats
        stats.sent += 1
        size = len(data)
        stats.bytes_sent += size
        if size > stats.max_datagram:
            stats.max_datagram = size
        if data[0] == _BCAST:
            stats.broadcast_datagrams += 1
        j = self._by_addr.get(dst, -1)
        digest = self._digest
        digest.update(_SEND_REC.pack(self.now, src.index, j))
        digest.update(data)
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

    def _delay(self) -> float:
        net = self.network
        delay = net.latency_min
        if net.latency_jitter > 0.0:
            delay += self._rng.expovariate(1.0 / net.latency_jitter)
        return delay

    # --- internals: sync -------------------------------------------------------------------------------

    def _sync_round(self, node: _Node, sched: SyncScheduler, cfg: Changes, t: float) -> None:
        view = node.view
        assert view is not None and node.rng is not None
        members: Sequence[Peer] = view
        static = self.static
        if static is not None and len(view) > static.sync_sample:
            members = node.rng.sample(view, static.sync_sample)
        peers = sched.choose_peers(t, members)
        room = max(0, cfg.max_client_sessions - len(node.clients))
        for extra in peers[room:]:
            sched.session_done(extra.id, t, ok=False, received=0)
        peers = peers[:room]
        if not peers:
            return
        src = node.source
        assert src is not None
        state = build_sync_state(src, node.actor, node.rng, cfg.sync)
        parts = split_sync_state(state, len(peers), node.rng, cfg.sync)
        for peer, part in zip(peers, parts, strict=True):
            self._open(node, peer, part, t, scheduled=True)

    def _run_urgent(self, node: _Node, cfg: Changes, t: float) -> None:
        sched = node.sched
        busy = {s.peer.index for s in node.clients.values()}
        for j, due in list(node.urgent.items()):
            if due > t:
                continue
            if len(node.clients) >= cfg.max_client_sessions:
                return
            del node.urgent[j]
            view = node.view
            assert isinstance(view, PeerView)
            peer = self._nodes[j].peer
            if not view.has(j) or j in busy or (sched is not None and peer.id in sched.in_flight):
                continue
            node.urgent_last[j] = t
            src = node.source
            assert src is not None and node.rng is not None
            self._open(node, peer, build_sync_state(src, node.actor, node.rng, cfg.sync), t, scheduled=False)
            busy.add(j)

    def _open(self, node: _Node, peer: Peer, state: Any, t: float, *, scheduled: bool) -> None:
        cfg = self.changes
        assert cfg is not None
        self._sid += 1
        client = SyncClient(state, t, config=cfg.sync)
        s = _Session(self._sid, client, node.index, peer, scheduled)
        node.clients[s.sid] = s
        self.stats.sync_sessions += 1
        request = client.data_to_send()
        self.stats.sync_bytes += len(request)
        self._digest.update(_SEND_REC.pack(t, node.index, peer.index))
        self._digest.update(b"sync-open")
        self._digest.update(request)
        target = self._nodes[peer.index]
        if target.bc is None or target.group != node.group:
            self._push(t + cfg.connect_timeout, _CONNFAIL, node.index, s, None)
            return
        arrive = t + self._delay() + self._delay() + self._delay()  # SYN, SYN-ACK, then the request
        s.last = arrive
        self._push(arrive, _REQUEST, peer.index, s, (target.generation, request))

    def _on_request(self, srv: _Node, s: _Session, b: tuple[int, bytes], t: float) -> None:
        gen, request = b
        if srv.bc is None:
            return  # crashed: silence, the client's idle timeout ends the session
        if srv.generation != gen:
            self._stream(s, srv, b"", t)  # restarted since the handshake: reset
            return
        if srv.group != self._nodes[s.node].group:
            s.broken = True
            return
        cfg = self.changes
        src = srv.source
        assert cfg is not None and src is not None
        server = SyncServer(src, t, config=cfg.sync)
        server.receive_data(request, t)
        while True:
            out = server.data_to_send()
            if out:
                self._stream(s, srv, out, t)
            if not out or server.phase is Phase.DONE or server.phase is Phase.FAILED:
                break
        self._stream(s, srv, b"", t)

    def _stream(self, s: _Session, srv: _Node, data: bytes, t: float) -> None:
        at = t + self._delay()
        if at < s.last:
            at = s.last
        s.last = at
        self.stats.sync_bytes += len(data)
        self._digest.update(_SEND_REC.pack(t, srv.index, s.node))
        self._digest.update(b"sync-data")
        self._digest.update(data)
        self._push(at, _CHUNK, s.node, s, data)

    def _on_chunk(self, node: _Node, s: _Session, data: bytes, t: float) -> None:
        if node.clients.get(s.sid) is not s or s.broken:
            return  # the client crashed meanwhile, or the stream was cut
        if node.group != self._nodes[s.peer.index].group:
            s.broken = True  # cut in flight: silence from now on
            return
        self._client_events(node, s, s.client.receive_data(data, t), t)
        self._reschedule(node)

    def _on_connfail(self, node: _Node, s: _Session, t: float) -> None:
        if node.clients.get(s.sid) is not s:
            return
        self._client_events(node, s, s.client.abort("connect failed"), t)
        self._reschedule(node)

    def _client_events(self, node: _Node, s: _Session, events: list[SyncEvent], t: float) -> None:
        for ev in events:
            if isinstance(ev, ChangesReceived):
                s.received += self._merge(node, ev.changesets, "sync")
            elif isinstance(ev, SyncDone | SyncFailed):
                node.clients.pop(s.sid, None)
                ok = isinstance(ev, SyncDone)
                if ok:
                    self.stats.sync_ok += 1
                else:
                    self.stats.sync_failed += 1
                self._digest.update(f"S{t!r}|{node.index}|{s.peer.index}|{ok}|{s.received}".encode())
                if s.scheduled and node.sched is not None:
                    node.sched.session_done(s.peer.id, t, ok=ok, received=s.received)

    def _push(self, time: float, kind: int, index: int, a: Any, b: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (time, self._seq, kind, index, a, b))
