"""SWIM cluster membership with the Lifeguard refinements, as a sans-IO state machine.

:class:`Membership` decides who is in the cluster and who is alive. It never touches a socket, a clock or
a global random source: a driver (the asyncio runtime, or the simulator in :mod:`verdigris.sim`) hands it
datagrams and the current time, and collects the datagrams, the next timer deadline and the events it
produces, in the style of aioquic's ``QuicConnection``::

    m = Membership("node-a", ("10.0.0.1", 7946), rng=random.Random(seed))
    m.join(seeds, now)
    ...                                       # whenever something happens:
    m.receive_datagram(data, addr, now)       # a datagram arrived, or
    m.handle_timer(now)                       # the deadline from get_timer() passed
    for data, addr in m.datagrams_to_send(now): ...
    while (event := m.next_event()) is not None: ...
    deadline = m.get_timer()

The protocol, as memberlist and foca implement it (SWIM, Das et al. 2002; Lifeguard, Dadgar et al. 2018):

* **Probing.** Every probe interval a node pings the next member of a shuffled round-robin list (so each
  member is probed at least once every two rounds, which bounds detection time). No ack within the probe
  timeout → it asks ``indirect_checks`` other members to ping the target for it (``PingReq``). No ack
  through any path by the end of the interval → the target becomes *suspect*.
* **Suspicion** lasts from ``max`` down to ``min`` (``min = suspicion_mult · max(1, log10 N) · probe
  interval``, ``max = suspicion_max_timeout_mult · min``), shrinking logarithmically as independent
  members confirm it (memberlist's formula, see :func:`suspicion_timeout`). If it runs out the member is
  *dead*. A member that hears it is suspected refutes it by raising its incarnation; one that hears it is
  dead renews its identity the same way and announces itself again. So that it hears in time, a probe
  of a suspect carries the suspicion (Lifeguard's buddy system), and any packet from a member held
  suspect, dead or left is answered with that verdict (rate-limited); gossip to the recently dead carries
  theirs.
* **Lifeguard local health.** Relays answer a ``PingReq`` they could not complete with a ``Nack``. A
  prober that got no ack *and* fewer nacks than expected concludes the fault may be its own: its
  awareness score rises (also on every refutation) and stretches its probe interval and timeout, and falls
  again with every successful probe. A slow node thus stops accusing healthy ones.
* **Dissemination.** Membership updates ride on every packet (pings, acks, gossip every gossip interval
  to ``gossip_nodes`` members), each sent at most ``retransmit_mult · ceil(log10(N + 1))`` times, fewest
  transmissions first.
* **Join** announces to seeds (retried with exponential backoff, bounded); the answer is a feed of
  member records, up to ``Limits.feed_max_datagrams`` datagrams. What a node learns from a feed is not
  relayed (it is old news to the cluster; relaying it would cost every join N · retransmit-limit
  transmissions per member), so gaps are repaired by pulls instead: one a few gossip rounds after
  joining, then a full pull from a random member every ``push_pull_period`` (memberlist's push/pull,
  over datagrams), and an announce to any member whose packets show it is unknown to us or newer than
  we know. **Leave** broadcasts a ``Left`` record, which everyone keeps as *left*, not *dead*.

Bounds (principle 5): every datagram fits ``Limits.max_datagram`` minus room for an encryption envelope;
the broadcast queue, relayed probes, member table and event queue each have a size and a drop rule (see
:class:`Limits`); dead and left members are pruned after ``Timing.dead_prune_after``.

Public API: :class:`Membership`, :class:`Timing`, :class:`Limits`, :class:`MemberInfo`,
:class:`MemberState`, :class:`MembershipStats`, the events (:class:`MemberUp`, :class:`MemberSuspect`,
:class:`MemberDown`, :class:`MemberLeft`, :class:`MemberUpdated`, :class:`JoinFailed`) and
:func:`suspicion_timeout`.
"""

from __future__ import annotations

import enum
import heapq
import math
import random
import sys
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, TypeAlias

import msgspec

from verdigris.gossip.wire import (
    Ack,
    Alive,
    Announce,
    Control,
    Dead,
    DecodeError,
    Feed,
    Left,
    Nack,
    Ping,
    PingReq,
    Suspect,
    Update,
    assemble,
    decode_packet,
    encode_checked,
    encode_head,
    encode_update,
)

__all__ = [
    "Addr",
    "JoinFailed",
    "Limits",
    "MemberDown",
    "MemberEvent",
    "MemberInfo",
    "MemberLeft",
    "MemberState",
    "MemberSuspect",
    "MemberUp",
    "MemberUpdated",
    "Membership",
    "MembershipStats",
    "Timing",
    "suspicion_timeout",
]

Addr: TypeAlias = tuple[str, int]
"""A UDP address, ``(host, port)``; ``verdigris.config.Addr`` is one."""

_SEQ_MOD: Final = 1 << 32
_ARRAY_HEADER_MAX: Final = 5  # msgpack array32 header; the largest the update list can need
_MIN_UPDATE: Final = 8  # no encoded update is smaller; below this much room a packet is full
_MAX_MISSES: Final = 32  # updates too big for the room left that a packet build skips before giving up


# --- configuration -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Timing:
    """Protocol timing. Defaults are memberlist's LAN defaults; :meth:`wan` gives foca's ``new_wan``.

    Change single fields with :func:`dataclasses.replace`. Times are in seconds.
    """

    probe_interval: float = 1.0
    """How often a node probes one member (stretched by the local health score)."""
    probe_timeout: float = 0.5
    """How long to wait for a direct ack before asking others to probe; about a p99 round trip."""
    indirect_checks: int = 3
    """How many members are asked to probe for us when the direct probe times out."""
    nack_ratio: float = 0.8
    """A relay nacks after this fraction of the requester's indirect window (probe interval − timeout),
    so the nack lands before the requester closes the round (Lifeguard: 80 %)."""
    gossip_interval: float = 0.2
    """How often pending updates are pushed to ``gossip_nodes`` random members (only while any are)."""
    gossip_nodes: int = 3
    retransmit_mult: int = 4
    """Each update is sent ``retransmit_mult · ceil(log10(N + 1))`` times by each node that learns it."""
    suspicion_mult: float = 4.0
    """Minimum suspicion is ``suspicion_mult · max(1, log10 N) · probe_interval``."""
    suspicion_max_timeout_mult: float = 6.0
    """Suspicion starts at this multiple of the minimum and shrinks with confirmations."""
    awareness_max_multiplier: int = 8
    """Upper bound of the local health multiplier on probe interval and timeout (score 0..max-1)."""
    gossip_to_the_dead_time: float = 30.0
    """Dead members stay gossip targets this long, so a falsely dead node hears of it and renews."""
    push_pull_interval: float = 30.0
    """Period of the full-state pull from a random member (memberlist's push/pull, scaled the same way
    for large clusters, see :meth:`push_pull_period`): it repairs whatever gossip missed. Each such tick
    also announces to one dead member, which heals partitions (like Serf's reconnect)."""
    join_backoff_initial: float = 1.0
    join_backoff_max: float = 30.0
    join_max_attempts: int = 10
    """Join retries stop after this many announce rounds without an answer (then :class:`JoinFailed`)."""
    dead_prune_after: float = 24 * 3600.0
    """Dead and left members are forgotten after this long. Keep it long: a forgotten member can be
    resurrected by a stale ``Alive`` still circulating, which a remembered one cannot."""

    def __post_init__(self) -> None:
        positive = ("probe_interval", "probe_timeout", "gossip_interval", "push_pull_interval")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"Timing.{name} must be positive")
        if self.probe_timeout >= self.probe_interval:
            raise ValueError("Timing.probe_timeout must be shorter than probe_interval")
        if not 0 < self.nack_ratio < 1:
            raise ValueError("Timing.nack_ratio must be between 0 and 1")
        if self.indirect_checks < 0 or self.gossip_nodes < 1 or self.retransmit_mult < 1:
            raise ValueError("Timing: indirect_checks >= 0, gossip_nodes >= 1, retransmit_mult >= 1")
        if self.suspicion_mult <= 0 or self.suspicion_max_timeout_mult < 1:
            raise ValueError("Timing: suspicion_mult > 0 and suspicion_max_timeout_mult >= 1")
        if self.awareness_max_multiplier < 1:
            raise ValueError("Timing.awareness_max_multiplier must be at least 1")
        if not 0 < self.join_backoff_initial <= self.join_backoff_max or self.join_max_attempts < 1:
            raise ValueError("Timing: 0 < join_backoff_initial <= join_backoff_max, join_max_attempts >= 1")
        if self.dead_prune_after <= 0 or self.gossip_to_the_dead_time < 0:
            raise ValueError("Timing: dead_prune_after > 0, gossip_to_the_dead_time >= 0")

    @classmethod
    def lan(cls) -> Timing:
        """memberlist's ``DefaultLANConfig``: probe 1 s, timeout 500 ms, gossip 200 ms to 3, mult 4/4."""
        return cls()

    @classmethod
    def wan(cls) -> Timing:
        """Like foca's ``Config::new_wan`` (memberlist's WAN config), which Corrosion uses.

        Probe 5 s, timeout 3 s, gossip 500 ms to 4 members, suspicion multiplier 6, announce every 60 s.
        """
        return cls(
            probe_interval=5.0,
            probe_timeout=3.0,
            gossip_interval=0.5,
            gossip_nodes=4,
            suspicion_mult=6.0,
            gossip_to_the_dead_time=60.0,
            push_pull_interval=60.0,
            join_backoff_initial=2.0,
            join_backoff_max=60.0,
        )

    @property
    def nack_timeout(self) -> float:
        """How long a relay waits for the target before it nacks."""
        return self.nack_ratio * (self.probe_interval - self.probe_timeout)

    def push_pull_period(self, n: int) -> float:
        """Full-state pull period for ``n`` members: one more interval per doubling beyond 32 members,
        as memberlist scales its push/pull, so the cluster-wide cost grows like N log N, not N²."""
        if n <= 32:
            return self.push_pull_interval
        return self.push_pull_interval * (1 + math.ceil(math.log2(n / 32)))

    def retransmit_limit(self, n: int) -> int:
        """How many times one node sends one update, for a cluster of ``n`` members."""
        return self.retransmit_mult * max(1, math.ceil(math.log10(n + 1)))

    def suspicion_bounds(self, n: int) -> tuple[float, float]:
        """``(min, max)`` suspicion timeout for a cluster of ``n`` members."""
        lo = self.suspicion_mult * max(1.0, math.log10(max(1, n))) * self.probe_interval
        return lo, lo * self.suspicion_max_timeout_mult

    def suspicion_confirmations(self, n: int) -> int:
        """Independent confirmations that drive suspicion to its minimum (memberlist: mult − 2).

        With too few other members to ever confirm (``n − 2 < k``) none are expected, and suspicion
        lasts exactly the minimum.
        """
        k = int(self.suspicion_mult) - 2
        return 0 if n - 2 < k or k < 1 else k


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Sizes of everything that could otherwise grow without bound."""

    max_datagram: int = 1200
    """Largest UDP payload sent, envelope included: fits the IPv6 minimum MTU with headers to spare."""
    envelope_reserve: int = 64
    """Bytes left for the envelope that seals the plaintext (AES-GCM framing is 29 bytes as in
    memberlist, 37 with a sealed timestamp); the rest is headroom for its evolution."""
    max_members: int = 65_536
    """Members beyond this are not added (counted in ``stats.members_dropped``)."""
    broadcast_queue: int = 8192
    """Pending updates (one per member). When full, the update already sent most often is dropped."""
    max_relays: int = 256
    """Indirect probes relayed for others at once; further ``PingReq`` are dropped (and counted)."""
    event_queue: int = 65_536
    """Undrained events kept; when full the oldest is dropped (``stats.events_dropped``)."""
    feed_max_datagrams: int = 32
    """Datagrams in the answer to a joining node's announce (about 40 members each without metadata)."""

    def __post_init__(self) -> None:
        if self.max_datagram - self.envelope_reserve < 512:
            raise ValueError("Limits: max_datagram - envelope_reserve must leave at least 512 bytes")
        for name in ("max_members", "broadcast_queue", "max_relays", "event_queue", "feed_max_datagrams"):
            if getattr(self, name) < 1:
                raise ValueError(f"Limits.{name} must be at least 1")

    @property
    def plaintext(self) -> int:
        """Largest plaintext packet the core produces."""
        return self.max_datagram - self.envelope_reserve


def suspicion_timeout(confirmations: int, k: int, lo: float, hi: float) -> float:
    """Total suspicion timeout after ``confirmations`` of the ``k`` wanted (memberlist's formula).

    ``hi − (log(c + 1) / log(k + 1)) · (hi − lo)``, floored at ``lo``: the first confirmations cut the
    most, because each is independent evidence and the first is the most informative.
    """
    if k < 1:
        return lo
    frac = math.log(confirmations + 1) / math.log(k + 1)
    return max(lo, hi - frac * (hi - lo))


# --- public data -----------------------------------------------------------------------------------------


class MemberState(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"
    LEFT = "left"


_ALIVE: Final = MemberState.ALIVE
_SUSPECT: Final = MemberState.SUSPECT
_DEAD: Final = MemberState.DEAD
_LEFT: Final = MemberState.LEFT


class MemberInfo(msgspec.Struct, frozen=True, gc=False):
    """An immutable snapshot of one member as this node sees it.

    A frozen ``msgspec.Struct`` rather than a dataclass: one is built per event, and a join of N nodes
    makes N² events, where construction cost shows (about 10× cheaper).
    """

    id: str
    addr: Addr
    state: MemberState
    incarnation: int
    metadata: Mapping[str, str]
    rtt: float | None
    """Smoothed round trip of direct probes (EWMA, 1/8 gain, as TCP's SRTT); None before the first."""
    last_seen: float | None
    """When a packet from it last arrived while it was alive or suspect."""


@dataclass(frozen=True, slots=True)
class MemberUp:
    """A member became alive: newly learned, or back from suspect, dead or left."""

    member: MemberInfo


@dataclass(frozen=True, slots=True)
class MemberSuspect:
    member: MemberInfo


@dataclass(frozen=True, slots=True)
class MemberDown:
    """A member was declared dead (its suspicion ran out, here or elsewhere)."""

    member: MemberInfo


@dataclass(frozen=True, slots=True)
class MemberLeft:
    member: MemberInfo


@dataclass(frozen=True, slots=True)
class MemberUpdated:
    """An alive member changed its address or metadata (at a higher incarnation)."""

    member: MemberInfo


@dataclass(frozen=True, slots=True)
class JoinFailed:
    """No seed answered within ``Timing.join_max_attempts`` announce rounds."""

    seeds: tuple[Addr, ...]
    attempts: int


MemberEvent: TypeAlias = MemberUp | MemberSuspect | MemberDown | MemberLeft | MemberUpdated | JoinFailed


@dataclass(slots=True)
class MembershipStats:
    """Counters for metrics and tests. Bad input is counted here, never raised."""

    packets_received: int = 0
    packets_sent: int = 0
    bad_packets: int = 0
    misdirected: int = 0
    probes: int = 0
    probe_failures: int = 0
    indirect_probes: int = 0
    acks_relayed: int = 0
    nacks_received: int = 0
    relays_dropped: int = 0
    broadcasts_dropped: int = 0
    members_dropped: int = 0
    events_dropped: int = 0
    refutations: int = 0
    renewals: int = 0
    notices: int = 0
    join_attempts: int = 0
    feeds_sent: int = 0


# --- internals -------------------------------------------------------------------------------------------

_EMPTY_META: Final[dict[str, str]] = {}


class _Phase(enum.Enum):
    IDLE = "idle"  # constructed, join() not called yet: no timers
    RUNNING = "running"
    LEAVING = "leaving"  # Left is being disseminated; no probing
    LEFT = "left"  # inert


class _Suspicion:
    __slots__ = ("confirmers", "hi", "k", "lo", "n", "start", "token")

    def __init__(self, start: float, k: int, lo: float, hi: float, by: str) -> None:
        self.start = start
        self.k = k
        self.lo = lo
        self.hi = hi
        self.n = 0
        # Dict, not set: iteration order must not depend on string hashing (determinism).
        self.confirmers: dict[str, None] = {by: None}
        self.token = 0


class _Member:
    __slots__ = (
        "addr",
        "alive_raw",
        "id",
        "incarnation",
        "last_seen",
        "meta",
        "notice_at",
        "rtt",
        "state",
        "state_change",
        "suspicion",
    )

    def __init__(self, mid: str, addr: Addr, meta: dict[str, str], incarnation: int, now: float) -> None:
        self.id = mid
        self.addr = addr
        self.meta = meta
        self.incarnation = incarnation
        self.state = _ALIVE
        self.state_change = now
        self.rtt: float | None = None
        self.last_seen: float | None = None
        self.suspicion: _Suspicion | None = None
        self.alive_raw: bytes | None = None
        self.notice_at = -math.inf


class _Probe:
    __slots__ = ("acked", "expected_nacks", "nacks", "sent", "seq", "target")

    def __init__(self, seq: int, target: str, sent: float) -> None:
        self.seq = seq
        self.target = target
        self.sent = sent
        self.acked = False
        self.expected_nacks = 0
        self.nacks = 0


class _Relay:
    __slots__ = ("nack", "requester", "seq")

    def __init__(self, requester: Addr, seq: int, nack: bool) -> None:
        self.requester = requester
        self.seq = seq
        self.nack = nack


class _Join:
    __slots__ = ("attempts", "backoff", "next_at", "seeds")

    def __init__(self, seeds: tuple[Addr, ...], now: float, backoff: float) -> None:
        self.seeds = seeds
        self.attempts = 0
        self.next_at = now
        self.backoff = backoff


class _BroadcastQueue:
    """Pending updates, one per member, handed out fewest-transmissions-first, newest first among equals.

    Bucket ``t`` holds the updates sent ``t`` times so far, in insertion order (a dict), so picking an
    update is a ``popitem`` and re-filing a batch one ``dict.update``: this is the hottest loop of a join
    storm. A newer update about a member replaces the older one (it supersedes it). When full, the oldest
    update of the highest bucket is dropped: it has already reached the most nodes.
    """

    __slots__ = ("_buckets", "_cap", "_keys", "dropped")

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._buckets: list[dict[str, bytes]] = [{}]
        self._keys: set[str] = set()  # membership only, never iterated (iteration order is hash order)
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def put(self, key: str, payload: bytes) -> None:
        if key in self._keys:
            for bucket in self._buckets:
                if bucket.pop(key, None) is not None:
                    break
        else:
            if len(self._keys) >= self._cap:
                self._drop_one()
            self._keys.add(key)
        self._buckets[0][key] = payload

    def _drop_one(self) -> None:
        for bucket in reversed(self._buckets):
            if bucket:
                key = next(iter(bucket))
                del bucket[key]
                self._keys.discard(key)
                self.dropped += 1
                return

    def take(self, budget: int, limit: int) -> list[bytes]:
        """Updates that fit in ``budget`` bytes; each counts as sent once more and retires at ``limit``."""
        if not self._keys or budget < _MIN_UPDATE:
            return []
        out: list[bytes] = []
        buckets = self._buckets
        misses = 0
        refile: list[tuple[int, list[tuple[str, bytes]]]] = []
        for t, bucket in enumerate(buckets):
            if not bucket:
                continue
            taken: list[tuple[str, bytes]] = []
            skipped: list[tuple[str, bytes]] = []
            while bucket:
                item = bucket.popitem()  # newest first
                n = len(item[1])
                if n <= budget:
                    out.append(item[1])
                    taken.append(item)
                    budget -= n
                    if budget < _MIN_UPDATE:
                        break
                else:
                    skipped.append(item)
                    misses += 1
                    if misses > _MAX_MISSES:
                        break
            if skipped:
                bucket.update(reversed(skipped))
            if taken:
                refile.append((t + 1, taken))
            if budget < _MIN_UPDATE or misses > _MAX_MISSES:
                break
        # Re-file after the scan, so that nothing is picked twice for one packet.
        for nt, taken in refile:
            if nt >= limit:
                self._keys.difference_update([key for key, _ in taken])
                continue
            if nt == len(buckets):
                buckets.append({})
            buckets[nt].update(reversed(taken))
        return out


# --- the state machine ----------------------------------------------------------------------------------


class Membership:
    """One node's SWIM + Lifeguard membership: bytes and time in; datagrams, deadlines and events out.

    ``rng`` is the only source of randomness (probe order, gossip targets, jitter), so a seeded one makes
    a run reproducible. ``node_id`` names this node for life; ``incarnation`` only ever grows, and a
    restarted node may start from 0: the cluster tells it the incarnation to beat.
    """

    def __init__(
        self,
        node_id: str,
        addr: Addr,
        *,
        rng: random.Random,
        cluster: str = "verdigris",
        metadata: Mapping[str, str] | None = None,
        timing: Timing | None = None,
        limits: Limits | None = None,
        incarnation: int = 0,
    ) -> None:
        self._id = node_id
        self._addr: Addr = (addr[0], addr[1])
        self._cluster = cluster
        self._meta: dict[str, str] = dict(metadata) if metadata else _EMPTY_META
        self._inc = incarnation
        self._rng = rng
        self.timing = timing if timing is not None else Timing()
        self.limits = limits if limits is not None else Limits()
        self.stats = MembershipStats()
        if len(cluster) > 64:
            raise ValueError("cluster id must be at most 64 characters")
        self._alive_raw: bytes | None = self._checked_alive(self._meta, incarnation)

        self._phase = _Phase.IDLE
        self._now = -math.inf
        self._members: dict[str, _Member] = {}
        self._live: list[str] = []  # alive + suspect, for O(1) random choice
        self._live_pos: dict[str, int] = {}
        self._down: dict[str, float] = {}  # dead + left -> when; insertion order == time order
        self._order: list[str] = []  # probe round
        self._order_idx = 0
        self._queue = _BroadcastQueue(self.limits.broadcast_queue)
        self._outbox: list[tuple[bytes, Addr]] = []
        self._events: deque[MemberEvent] = deque()
        self._seq = rng.randrange(_SEQ_MOD)
        self._score = 0  # Lifeguard local health (awareness); 0 is healthy
        self._probe: _Probe | None = None
        self._next_probe_at: float | None = None
        self._indirect_at: float | None = None
        self._next_gossip_at: float | None = None
        self._next_announce_at: float | None = None
        self._leave_deadline: float | None = None
        self._join: _Join | None = None
        self._relays: dict[int, _Relay] = {}
        # Relay deadlines are fixed offsets from arrival, hence monotonic: FIFO queues, no heap.
        self._relay_q: deque[tuple[float, int]] = deque()  # nack due
        self._relay_expiry: deque[tuple[float, int]] = deque()  # forget (a late ack is still relayed)
        self._susp_heap: list[tuple[float, int, str]] = []
        self._token = 0
        self._asks_left = 0  # announces to unknown senders left this probe round
        self._asked: dict[str, float] = {}

    # --- read-only views -------------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self._id

    @property
    def addr(self) -> Addr:
        return self._addr

    @property
    def incarnation(self) -> int:
        return self._inc

    @property
    def metadata(self) -> Mapping[str, str]:
        return MappingProxyType(self._meta)

    @property
    def health_score(self) -> int:
        """Lifeguard awareness: 0 is healthy; probe interval and timeout are scaled by score + 1."""
        return self._score

    @property
    def has_left(self) -> bool:
        """True once :meth:`leave` has finished disseminating and the node has gone quiet."""
        return self._phase is _Phase.LEFT

    def members(self) -> list[MemberInfo]:
        """Every member known, in any state, except this node itself."""
        return [self._info(m) for m in self._members.values()]

    def member(self, node_id: str) -> MemberInfo | None:
        m = self._members.get(node_id)
        return None if m is None else self._info(m)

    def num_alive(self) -> int:
        """Members alive or suspect, this node included (the N of the protocol's formulas)."""
        return len(self._live) + 1

    # --- driver interface ------------------------------------------------------------------------------

    def join(self, seeds: Sequence[Addr], now: float) -> None:
        """Start the protocol and announce this node to ``seeds`` until one answers.

        With no seeds (the first node of a cluster) the node just starts. Retries back off exponentially
        from ``Timing.join_backoff_initial`` to ``join_backoff_max`` (each interval jittered down by up to
        20 %) and give up after ``join_max_attempts`` rounds with a :class:`JoinFailed` event.
        """
        self._now = now
        if self._phase is _Phase.LEAVING or self._phase is _Phase.LEFT:
            raise RuntimeError("cannot join after leave()")
        if self._phase is _Phase.IDLE:
            self._phase = _Phase.RUNNING
            t = self.timing
            self._next_probe_at = now + self._rng.uniform(0.0, t.probe_interval)
            self._next_announce_at = now + t.push_pull_interval * self._rng.uniform(0.75, 1.25)
            self._broadcast(self._id, self._self_alive())
        targets = tuple((h, p) for h, p in seeds if (h, p) != self._addr)
        self._join = _Join(targets, now, self.timing.join_backoff_initial) if targets else None
        if self._join is not None:
            self._join_attempt(now)

    def leave(self, now: float) -> None:
        """Leave gracefully: stop probing, disseminate ``Left``, then go quiet (see :attr:`has_left`)."""
        self._now = now
        if self._phase is _Phase.IDLE:
            self._phase = _Phase.LEFT
            return
        if self._phase is not _Phase.RUNNING:
            return
        self._phase = _Phase.LEAVING
        self._probe = None
        self._next_probe_at = self._indirect_at = self._next_announce_at = None
        self._join = None
        self._broadcast(self._id, encode_update(Left(self._id, self._inc)))
        limit = self.timing.retransmit_limit(self.num_alive())
        self._leave_deadline = now + self.timing.gossip_interval * (limit + 2)
        self._gossip_tick(now)

    def update_metadata(self, metadata: Mapping[str, str], now: float) -> None:
        """Change this node's metadata; it spreads as a new incarnation (seen as :class:`MemberUpdated`)."""
        self._now = now
        meta = dict(metadata) if metadata else _EMPTY_META
        running = self._phase is _Phase.RUNNING
        inc = self._inc + 1 if running else self._inc
        raw = self._checked_alive(meta, inc)
        self._meta, self._inc, self._alive_raw = meta, inc, raw
        if running:
            self._broadcast(self._id, raw)

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Addr]]:
        """Datagrams produced since the last call, each at most ``Limits.plaintext`` bytes."""
        out = self._outbox
        self._outbox = []
        return out

    def next_event(self) -> MemberEvent | None:
        return self._events.popleft() if self._events else None

    def get_timer(self) -> float | None:
        """The earliest time at which :meth:`handle_timer` has work, or None when there is none."""
        if self._phase is _Phase.LEFT or self._phase is _Phase.IDLE:
            return None
        best = math.inf
        for t in (
            self._next_probe_at,
            self._indirect_at,
            self._next_gossip_at,
            self._next_announce_at,
            self._leave_deadline,
        ):
            if t is not None and t < best:
                best = t
        if self._join is not None and self._join.next_at < best:
            best = self._join.next_at
        if self._relay_q and self._relay_q[0][0] < best:
            best = self._relay_q[0][0]
        if self._relay_expiry and self._relay_expiry[0][0] < best:
            best = self._relay_expiry[0][0]
        heap = self._susp_heap
        while heap and not self._suspicion_live(heap[0]):
            heapq.heappop(heap)
        if heap and heap[0][0] < best:
            best = heap[0][0]
        return None if best == math.inf else best

    def handle_timer(self, now: float) -> None:
        """Do whatever is due at ``now`` (it is harmless to call early or twice)."""
        self._now = now
        phase = self._phase
        if phase is _Phase.LEFT or phase is _Phase.IDLE:
            return
        self._expire_relays(now)
        if self._indirect_at is not None and self._indirect_at <= now:
            self._indirect_at = None
            self._probe_indirect(now)
        heap = self._susp_heap
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if self._suspicion_live(entry):
                self._declare_dead(self._members[entry[2]], now)
        if self._next_probe_at is not None and self._next_probe_at <= now:
            self._probe_round(now)
        if self._next_gossip_at is not None and self._next_gossip_at <= now:
            self._gossip_tick(now)
        if self._join is not None and self._join.next_at <= now:
            self._join_attempt(now)
        if self._next_announce_at is not None and self._next_announce_at <= now:
            self._announce_tick(now)
        if self._phase is _Phase.LEAVING:
            assert self._leave_deadline is not None
            if self._id not in self._queue or now >= self._leave_deadline:
                self._finish_leave()

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        """Process one datagram from ``addr``. Garbage is counted in ``stats.bad_packets`` and dropped."""
        self._now = now
        self.stats.packets_received += 1
        if self._phase is _Phase.LEFT:
            return
        try:
            packet = decode_packet(data, self._cluster)
        except DecodeError:
            self.stats.bad_packets += 1
            return
        sender = packet.sender
        if sender == self._id:
            self.stats.bad_packets += 1  # our own packet looped back, or an id clash
            return
        running = self._phase is _Phase.RUNNING
        m = self._members.get(sender)
        if m is not None:
            state = m.state
            if state is _ALIVE or state is _SUSPECT:
                m.last_seen = now
            if state is not _ALIVE and running and packet.incarnation <= m.incarnation:
                self._notify(m, addr, now)
        members = self._members
        msg = packet.msg
        # A feed is old news to the cluster (the sender already knew it all), so what we learn from it
        # is not relayed; relaying it would multiply the gossip load of every join by N.
        relay = not isinstance(msg, Feed)
        for update in packet.updates:
            if isinstance(update, Alive):
                # Fast path: most of what arrives is an Alive we already know (each update is heard
                # about retransmit_limit times), and only a newer incarnation can change anything.
                known = members.get(update.node)
                if known is not None and update.incarnation <= known.incarnation:
                    continue
                if update.node != self._id:
                    self._on_alive(update, known, now, relay)
                    continue
            self._apply(update, now)
        if running:
            known = members.get(sender)
            if known is None or packet.incarnation > known.incarnation:
                self._ask(sender, addr, now)
        if msg is None:
            return
        if isinstance(msg, Ping):
            if msg.target == self._id:
                self._send(addr, Ack(msg.seq))
            else:
                self.stats.misdirected += 1
        elif isinstance(msg, Ack):
            self._on_ack(msg.seq, sender, now)
        elif isinstance(msg, PingReq):
            self._on_ping_req(msg, addr, now)
        elif isinstance(msg, Nack):
            p = self._probe
            if p is not None and p.seq == msg.seq and p.nacks < p.expected_nacks:
                p.nacks += 1
                self.stats.nacks_received += 1
        elif isinstance(msg, Announce):
            if self._phase is _Phase.RUNNING:
                self._send_feed(addr, msg.seq, msg.full)
        elif self._join is not None:  # Feed: a seed answered, so we are in
            self._join = None
            # Members that joined around the same time may be in neither the seed's feed nor (since
            # nodes that learn from feeds do not relay) the gossip we get: pull again once their
            # Alive has had time to reach the seeds.
            settle = now + self.timing.retransmit_limit(self.num_alive()) * self.timing.gossip_interval
            if self._next_announce_at is None or settle < self._next_announce_at:
                self._next_announce_at = settle

    # --- updates ---------------------------------------------------------------------------------------

    def _apply(self, u: Update, now: float) -> None:
        if u.node == self._id:
            self._about_self(u, now)
            return
        m = self._members.get(u.node)
        if isinstance(u, Alive):
            self._on_alive(u, m, now, True)
            return
        if m is None or u.incarnation < m.incarnation:
            return  # never heard of it (we only learn members from Alive), or stale
        state = m.state
        if isinstance(u, Suspect):
            if state is _ALIVE:
                self._suspect(m, u.incarnation, u.by, now)
                self._broadcast(m.id, encode_update(u))
            elif state is _SUSPECT:
                self._set_incarnation(m, u.incarnation)
                if self._confirm(m, u.by):
                    self._broadcast(m.id, encode_update(u))
        elif isinstance(u, Dead):
            if state is _ALIVE or state is _SUSPECT:
                self._mark_down(m, _DEAD, u.incarnation, now)
                self._broadcast(m.id, encode_update(u))
                self._emit(MemberDown(self._info(m)))
            else:
                self._set_incarnation(m, u.incarnation)
        elif state is not _LEFT:  # Left beats every other state at the same incarnation
            self._mark_down(m, _LEFT, u.incarnation, now)
            self._broadcast(m.id, encode_update(u))
            self._emit(MemberLeft(self._info(m)))

    def _on_alive(self, u: Alive, m: _Member | None, now: float, relay: bool) -> None:
        if m is not None and u.incarnation <= m.incarnation:
            return
        raw: bytes | None = None
        if relay:
            raw = encode_update(u)
            if len(raw) > self.limits.plaintext // 2:
                self.stats.bad_packets += 1  # could never be forwarded within our datagram size
                return
        if m is None:
            if len(self._members) >= self.limits.max_members:
                self.stats.members_dropped += 1
                return
            meta = u.meta if u.meta else _EMPTY_META
            m = _Member(u.node, (sys.intern(u.host), u.port), meta, u.incarnation, now)
            m.alive_raw = raw
            self._members[m.id] = m
            self._add_live(m)
            if raw is not None:
                self._broadcast(m.id, raw)
            self._emit(MemberUp(self._info(m)))
            return
        changed = (u.host, u.port) != m.addr or u.meta != m.meta
        if changed:
            m.addr = (sys.intern(u.host), u.port)
            m.meta = u.meta if u.meta else _EMPTY_META
        self._set_incarnation(m, u.incarnation)
        m.alive_raw = raw
        old = m.state
        if raw is not None:
            self._broadcast(m.id, raw)
        if old is _ALIVE:
            if changed:
                self._emit(MemberUpdated(self._info(m)))
            return
        m.state = _ALIVE
        m.state_change = now
        m.suspicion = None
        if old is not _SUSPECT:
            self._down.pop(m.id, None)
            self._add_live(m)
        self._emit(MemberUp(self._info(m)))

    def _about_self(self, u: Update, now: float) -> None:
        if self._phase is _Phase.LEAVING or self._phase is _Phase.LEFT:
            return
        if isinstance(u, Alive):
            if u.incarnation > self._inc or (
                u.incarnation == self._inc and ((u.host, u.port) != self._addr or u.meta != self._meta)
            ):
                self._refute(u.incarnation)  # an older life of ours, or an impostor: outbid it
        elif u.incarnation >= self._inc:
            if isinstance(u, Suspect):
                self._refute(u.incarnation)
            else:
                self._renew(u.incarnation, now)

    def _outbid(self, incarnation: int) -> None:
        """Announce ourselves alive above ``incarnation``; Lifeguard counts the need against our health."""
        self._inc = incarnation + 1
        self._alive_raw = None
        self._adjust_health(1)
        self._broadcast(self._id, self._self_alive())

    def _refute(self, incarnation: int) -> None:
        self._outbid(incarnation)
        self.stats.refutations += 1

    def _renew(self, incarnation: int, now: float) -> None:
        """We were declared dead (or left, in an earlier life): come back under a new incarnation.

        Members that think us dead neither probe nor gossip to us for long, so besides broadcasting we
        announce ourselves directly to a few of them.
        """
        self._outbid(incarnation)
        self.stats.renewals += 1
        for m in self._sample_live(self.timing.indirect_checks, exclude=None):
            self._send_announce(m.addr, full=False)

    def _ask(self, sender: str, addr: Addr, now: float) -> None:
        """The sender is unknown to us, or its packet shows a newer incarnation than we hold (we missed
        its Alive while it circulated): announce to it, and its feed will start with its own record.

        Rate-limited: once a probe interval per sender, ``indirect_checks`` per probe round in all.
        """
        if self._asks_left <= 0:
            return
        asked = self._asked.get(sender)
        if asked is not None and now - asked < self.timing.probe_interval:
            return
        self._asks_left -= 1
        if len(self._asked) >= 1024:
            self._asked.clear()
        self._asked[sender] = now
        self._send_announce(addr, full=False)

    def _notify(self, m: _Member, addr: Addr, now: float) -> None:
        """A member we hold suspect, dead or left is talking to us: tell it, so it can refute or renew.

        This extends Lifeguard's buddy system (a probe of a suspect carries the suspicion) to every
        packet the member sends us, so it learns within one of its own probes even after the rumour
        has stopped circulating. Rate-limited to once a probe interval per member.
        """
        if now - m.notice_at < self.timing.probe_interval:
            return
        m.notice_at = now
        self.stats.notices += 1
        notice: Update
        if m.state is _SUSPECT:
            notice = Suspect(m.id, m.incarnation, self._id)
        elif m.state is _DEAD:
            notice = Dead(m.id, m.incarnation, self._id)
        else:
            notice = Left(m.id, m.incarnation)
        self._send(addr, None, first=(encode_update(notice),))

    # --- suspicion -------------------------------------------------------------------------------------

    def _suspect(self, m: _Member, incarnation: int, by: str, now: float) -> None:
        n = self.num_alive()
        k = self.timing.suspicion_confirmations(n)
        lo, hi = self.timing.suspicion_bounds(n)
        s = _Suspicion(now, k, lo, hi, by)
        self._set_incarnation(m, incarnation)
        m.state = _SUSPECT
        m.state_change = now
        m.suspicion = s
        self._arm(m.id, s, now + suspicion_timeout(0, k, lo, hi))
        self._emit(MemberSuspect(self._info(m)))

    def _confirm(self, m: _Member, by: str) -> bool:
        """Count an independent confirmation; True if it was new (and so worth re-broadcasting)."""
        s = m.suspicion
        if s is None or s.n >= s.k or by in s.confirmers:
            return False
        s.confirmers[by] = None
        s.n += 1
        self._arm(m.id, s, s.start + suspicion_timeout(s.n, s.k, s.lo, s.hi))
        return True

    def _arm(self, mid: str, s: _Suspicion, deadline: float) -> None:
        self._token += 1
        s.token = self._token
        heapq.heappush(self._susp_heap, (deadline, self._token, mid))

    def _suspicion_live(self, entry: tuple[float, int, str]) -> bool:
        m = self._members.get(entry[2])
        return m is not None and m.suspicion is not None and m.suspicion.token == entry[1]

    def _declare_dead(self, m: _Member, now: float) -> None:
        self._mark_down(m, _DEAD, m.incarnation, now)
        self._broadcast(m.id, encode_update(Dead(m.id, m.incarnation, self._id)))
        self._emit(MemberDown(self._info(m)))

    # --- probing ---------------------------------------------------------------------------------------

    def _probe_round(self, now: float) -> None:
        """Close the previous probe (suspecting its target if nothing came back) and start the next."""
        p = self._probe
        if p is not None and not p.acked:
            self._probe_failed(p, now)
        self._prune(now)
        t = self.timing
        self._asks_left = t.indirect_checks
        scale = self._score + 1
        self._next_probe_at = now + t.probe_interval * scale
        target = self._next_target()
        if target is None:
            self._probe = None
            self._indirect_at = None
            return
        seq = self._next_seq()
        self._probe = _Probe(seq, target.id, now)
        self._indirect_at = now + t.probe_timeout * scale
        self.stats.probes += 1
        if target.state is _SUSPECT:
            # Tell a suspect that it is one, so it can refute even if the rumour has stopped circulating
            # (memberlist does the same).
            rumour = encode_update(Suspect(target.id, target.incarnation, self._id))
            self._send(target.addr, Ping(seq, target.id), first=(rumour,))
        else:
            self._send(target.addr, Ping(seq, target.id))

    def _probe_indirect(self, now: float) -> None:
        p = self._probe
        if p is None or p.acked:
            return
        m = self._members.get(p.target)
        if m is None:
            return
        relays = self._sample_live(self.timing.indirect_checks, exclude=p.target)
        req = PingReq(p.seq, m.id, m.addr[0], m.addr[1], True)
        for r in relays:
            self._send(r.addr, req)
        p.expected_nacks = len(relays)
        self.stats.indirect_probes += len(relays)

    def _probe_failed(self, p: _Probe, now: float) -> None:
        self.stats.probe_failures += 1
        # Lifeguard: missing nacks mean our own messages may be the ones getting lost.
        if p.expected_nacks > 0:
            self._adjust_health(p.expected_nacks - p.nacks)
        else:
            self._adjust_health(1)
        m = self._members.get(p.target)
        if m is None:
            return
        if m.state is _ALIVE:
            self._suspect(m, m.incarnation, self._id, now)
            self._broadcast(m.id, encode_update(Suspect(m.id, m.incarnation, self._id)))
        elif m.state is _SUSPECT and self._confirm(m, self._id):
            self._broadcast(m.id, encode_update(Suspect(m.id, m.incarnation, self._id)))

    def _on_ack(self, seq: int, sender: str, now: float) -> None:
        p = self._probe
        if p is not None and p.seq == seq:
            if not p.acked:
                p.acked = True
                self._indirect_at = None
                self._adjust_health(-1)
                m = self._members.get(p.target)
                if m is not None and sender == p.target:
                    sample = now - p.sent
                    m.rtt = sample if m.rtt is None else m.rtt + (sample - m.rtt) / 8
            return
        relay = self._relays.pop(seq, None)
        if relay is not None:
            self.stats.acks_relayed += 1
            self._send(relay.requester, Ack(relay.seq))

    def _on_ping_req(self, msg: PingReq, addr: Addr, now: float) -> None:
        if msg.target == self._id:
            self._send(addr, Ack(msg.seq))
            return
        if len(self._relays) >= self.limits.max_relays:
            self.stats.relays_dropped += 1
            return
        seq = self._next_seq()
        self._relays[seq] = _Relay(addr, msg.seq, msg.nack)
        self._relay_q.append((now + self.timing.nack_timeout, seq))
        self._send((msg.host, msg.port), Ping(seq, msg.target))

    def _expire_relays(self, now: float) -> None:
        q = self._relay_q
        expiry = self._relay_expiry
        while q and q[0][0] <= now:
            _, seq = q.popleft()
            relay = self._relays.get(seq)
            if relay is not None:
                if relay.nack:
                    self._send(relay.requester, Nack(relay.seq))
                expiry.append((now + self.timing.probe_interval, seq))
        while expiry and expiry[0][0] <= now:
            self._relays.pop(expiry.popleft()[1], None)

    def _next_target(self) -> _Member | None:
        members = self._members
        for _ in range(2):
            order = self._order
            while self._order_idx < len(order):
                m = members.get(order[self._order_idx])
                self._order_idx += 1
                if m is not None and (m.state is _ALIVE or m.state is _SUSPECT):
                    return m
            # Round over: reshuffle, which also drops members that died or left meanwhile.
            self._order = list(self._live)
            self._rng.shuffle(self._order)
            self._order_idx = 0
            if not self._order:
                return None
        return None

    def _adjust_health(self, delta: int) -> None:
        self._score = min(max(self._score + delta, 0), self.timing.awareness_max_multiplier - 1)

    # --- dissemination ---------------------------------------------------------------------------------

    def _broadcast(self, key: str, payload: bytes) -> None:
        q = self._queue
        before = q.dropped
        q.put(key, payload)
        self.stats.broadcasts_dropped += q.dropped - before
        if self._next_gossip_at is None and self._phase is not _Phase.IDLE:
            # News goes out at once when nothing was pending (later rounds keep the interval): waiting a
            # full interval at every hop made detection spread slower than memberlist's.
            self._next_gossip_at = self._now

    def _gossip_tick(self, now: float) -> None:
        if self._queue:
            for m in self._gossip_targets(self.timing.gossip_nodes, now):
                if m.state is _DEAD and now - m.notice_at >= self.timing.probe_interval:
                    # Gossip to the dead carries the verdict, so a falsely dead node renews at once.
                    m.notice_at = now
                    self._send(m.addr, None, first=(encode_update(Dead(m.id, m.incarnation, self._id)),))
                elif not self._send(m.addr, None):
                    break
        self._next_gossip_at = now + self.timing.gossip_interval if self._queue else None

    def _gossip_targets(self, k: int, now: float) -> list[_Member]:
        members = self._members
        live = self._live
        recent: list[_Member] = []
        cutoff = now - self.timing.gossip_to_the_dead_time
        for mid in reversed(self._down):
            if self._down[mid] < cutoff or len(recent) >= 16:
                break
            m = members[mid]
            if m.state is _DEAD:
                recent.append(m)
        total = len(live) + len(recent)
        if total == 0:
            return []
        picks = self._rng.sample(range(total), min(k, total))
        nl = len(live)
        return [members[live[i]] if i < nl else recent[i - nl] for i in picks]

    def _send(self, addr: Addr, msg: Control | None, first: Sequence[bytes] = ()) -> bool:
        """Queue one packet to ``addr``: ``msg``, ``first``, then as many pending updates as fit."""
        head = encode_head(self._cluster, self._id, self._inc, msg)
        budget = self.limits.plaintext - len(head) - _ARRAY_HEADER_MAX
        parts = list(first)
        for p in parts:
            budget -= len(p)
        parts.extend(self._queue.take(budget, self.timing.retransmit_limit(self.num_alive())))
        if msg is None and not parts:
            return False
        self._outbox.append((assemble(head, parts), addr))
        self.stats.packets_sent += 1
        return True

    # --- join, announce, leave -------------------------------------------------------------------------

    def _join_attempt(self, now: float) -> None:
        j = self._join
        assert j is not None
        t = self.timing
        if j.attempts >= t.join_max_attempts:
            self._join = None
            self._emit(JoinFailed(j.seeds, j.attempts))
            return
        j.attempts += 1
        self.stats.join_attempts += 1
        for seed in j.seeds:
            self._send_announce(seed, full=True)
        j.next_at = now + j.backoff * self._rng.uniform(0.8, 1.0)
        j.backoff = min(j.backoff * 2, t.join_backoff_max)

    def _announce_tick(self, now: float) -> None:
        t = self.timing
        period = t.push_pull_period(self.num_alive())
        self._next_announce_at = now + period * self._rng.uniform(0.75, 1.25)
        for m in self._sample_live(1, exclude=None):
            self._send_announce(m.addr, full=True)
        dead = [mid for mid in self._down if self._members[mid].state is _DEAD]
        if dead:
            self._send_announce(self._members[self._rng.choice(dead)].addr, full=False)

    def _send_announce(self, addr: Addr, *, full: bool) -> None:
        # Our own Alive goes first so the receiver can add (or revive) us before it answers.
        self._send(addr, Announce(self._next_seq(), full), first=(self._self_alive(),))

    def _send_feed(self, addr: Addr, seq: int, full: bool) -> None:
        """Answer an announce with member records: one datagram, or up to ``feed_max_datagrams``."""
        head = encode_head(self._cluster, self._id, self._inc, Feed(seq))
        room = self.limits.plaintext - len(head) - _ARRAY_HEADER_MAX
        datagrams = self.limits.feed_max_datagrams if full else 1
        live = self._live
        want = min(len(live), datagrams * room // 24 + 1)
        picks = self._rng.sample(live, want)
        records = [self._self_alive()]
        records.extend(self._member_alive(self._members[mid]) for mid in picks)
        parts: list[bytes] = []
        budget = room
        for raw in records:
            if len(raw) > budget:
                self._outbox.append((assemble(head, parts), addr))
                self.stats.packets_sent += 1
                datagrams -= 1
                if datagrams == 0:
                    parts = []
                    break
                parts, budget = [], room
            parts.append(raw)
            budget -= len(raw)
        if parts:
            self._outbox.append((assemble(head, parts), addr))
            self.stats.packets_sent += 1
        self.stats.feeds_sent += 1

    def _finish_leave(self) -> None:
        self._phase = _Phase.LEFT
        self._next_gossip_at = self._leave_deadline = None
        self._relays.clear()
        self._relay_q.clear()
        self._relay_expiry.clear()
        self._susp_heap.clear()
        self._queue = _BroadcastQueue(self.limits.broadcast_queue)

    # --- bookkeeping -----------------------------------------------------------------------------------

    def _checked_alive(self, meta: dict[str, str], incarnation: int) -> bytes:
        """Our own ``Alive``, validated as receivers will validate it; ValueError if it would not pass."""
        host, port = self._addr
        raw = encode_checked(Alive(self._id, incarnation, host, port, meta))
        if len(raw) > self.limits.plaintext // 2:
            raise ValueError("node id, address and metadata must encode to at most half a datagram")
        return raw

    def _self_alive(self) -> bytes:
        if self._alive_raw is None:
            host, port = self._addr
            self._alive_raw = encode_checked(Alive(self._id, self._inc, host, port, self._meta))
        return self._alive_raw

    def _member_alive(self, m: _Member) -> bytes:
        if m.alive_raw is None:
            m.alive_raw = encode_update(Alive(m.id, m.incarnation, m.addr[0], m.addr[1], m.meta))
        return m.alive_raw

    def _set_incarnation(self, m: _Member, incarnation: int) -> None:
        if incarnation != m.incarnation:
            m.incarnation = incarnation
            m.alive_raw = None

    def _add_live(self, m: _Member) -> None:
        if m.id in self._live_pos:
            return
        self._live_pos[m.id] = len(self._live)
        self._live.append(m.id)
        # Insert into the current probe round at a random place (memberlist does the same), so that
        # new members are not all probed last.
        order = self._order
        n = len(order)
        order.append(m.id)
        j = int(self._rng.random() * (n + 1))
        order[j], order[n] = order[n], order[j]

    def _remove_live(self, mid: str) -> None:
        pos = self._live_pos.pop(mid, None)
        if pos is None:
            return
        last = self._live.pop()
        if last != mid:
            self._live[pos] = last
            self._live_pos[last] = pos

    def _mark_down(self, m: _Member, state: MemberState, incarnation: int, now: float) -> None:
        self._set_incarnation(m, incarnation)
        m.state = state
        m.state_change = now
        m.suspicion = None
        self._remove_live(m.id)
        self._down.pop(m.id, None)
        self._down[m.id] = now

    def _prune(self, now: float) -> None:
        cutoff = now - self.timing.dead_prune_after
        down = self._down
        while down:
            mid = next(iter(down))
            if down[mid] > cutoff:
                break
            del down[mid]
            del self._members[mid]

    def _sample_live(self, k: int, *, exclude: str | None) -> list[_Member]:
        live = self._live
        picks = self._rng.sample(live, min(len(live), k + (exclude is not None)))
        return [self._members[mid] for mid in picks if mid != exclude][:k]

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) % _SEQ_MOD
        return self._seq

    def _emit(self, event: MemberEvent) -> None:
        if len(self._events) >= self.limits.event_queue:
            self._events.popleft()
            self.stats.events_dropped += 1
        self._events.append(event)

    @staticmethod
    def _info(m: _Member) -> MemberInfo:
        return MemberInfo(m.id, m.addr, m.state, m.incarnation, MappingProxyType(m.meta), m.rtt, m.last_seen)
