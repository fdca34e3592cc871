"""Epidemic broadcast of change sets, as a sans-IO state machine.

A :class:`Broadcaster` spreads every version a node writes, and every piece of a version it learns that
was *new to it*, to a few random members per gossip interval, a bounded number of times, the way
memberlist spreads membership updates and Corrosion spreads changes::

    b = Broadcaster(is_new=new_to(store.books), rng=random.Random(seed))
    b.local_commit(store.changeset(store.site_id, version), now)     # after a local write
    pieces = b.receive(payload, sender_addr, now)                      # a family-2 datagram arrived
    result = store.merge(pieces)                                       # caller merges what was new
    for actor, version, _ in result.rejected: b.discard(actor, version)
    for payload, addr in b.tick(now, live_members): send(payload, addr)  # every gossip interval
    deadline = b.get_timer()

Rules, and why:

* **Pieces fit one datagram.** A version is split (:func:`~verdigris.store.split_changeset_groups`) into
  seq-range pieces whose encoding fits ``max_payload`` (1,100 bytes by default: an Ethernet MTU minus IP,
  UDP and the encryption envelope). The store reassembles pieces into whole versions. A single change too
  big for a datagram even alone (a huge value) is not broadcast: its piece is left to sync, which streams
  over TCP, and counted in ``stats.oversized``; the other pieces of the version still go out.
* **Only what was new is passed on.** ``receive`` asks the injected ``is_new(actor, version, seqs)``
  (normally :func:`new_to` over the store's books) *before* the caller merges, returns only the new pieces
  and queues exactly those for relay. A piece the node already had, or already has queued, is counted as
  a duplicate and goes no further, which is what stops an epidemic from echoing forever.
* **Bounded retransmission.** Each tick sends to ``fanout`` random members, packing as many pieces as fit
  into one datagram per member, fewest transmissions first, then oldest. A piece is transmitted at most
  ``retransmit_mult * ceil(log10(N + 1))`` times in total (N = members + this node, as memberlist), never
  twice to the same member and never back to the member it came from.
* **Bounded queue.** At most ``max_queue_entries`` pieces and ``max_queue_bytes`` encoded bytes. When a new
  piece would exceed either, pieces are dropped, **most transmissions already done first, then oldest**:
  those have had the most chances to spread and are the likeliest to be known already, while a fresh
  piece has reached nobody yet. Anything dropped is still recovered by sync.
* **Rate limit.** A token bucket of ``rate_bytes_per_sec`` with ``burst_bytes`` capacity, refilled from the
  ``now`` passed in; a datagram that does not fit the tokens is held (its pieces keep their count) until
  a later tick.

Public API: :class:`Broadcaster`, :class:`BroadcastConfig`, :class:`BroadcastStats`, :class:`Member`,
:data:`IsNew`, :func:`new_to`, :func:`retransmit_limit`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Final, Protocol, TypeAlias

import msgspec

from verdigris.gossip.changes_wire import (
    BroadcastWireError,
    broadcast_overhead,
    decode_broadcast,
    encode_broadcast,
    encode_piece,
)
from verdigris.store.store import ActorBooks, split_changeset_groups
from verdigris.store.types import Change, Changeset

__all__ = [
    "Addr",
    "BroadcastConfig",
    "BroadcastStats",
    "Broadcaster",
    "IsNew",
    "Member",
    "new_to",
    "retransmit_limit",
]

Addr: TypeAlias = tuple[str, int]
"""A UDP address, ``(host, port)``, as membership uses it."""

IsNew: TypeAlias = Callable[[bytes, int, tuple[int, int]], bool]
"""``is_new(actor, version, (first_seq, last_seq))``: would merging this piece teach this node something?"""

PieceKey: TypeAlias = tuple[bytes, int, tuple[int, int]]

_MIN_PIECE: Final = (
    40  # no encoded piece is smaller (16-byte actor and header); below this a datagram is full
)
_SCAN_LIMIT: Final = 1024  # queued pieces examined to fill one datagram, so a tick's cost is bounded
_MAX_MISSES: Final = 32  # pieces skipped for lack of room before a datagram is considered full
_encoder = msgspec.msgpack.Encoder()


class Member(Protocol):
    """What the broadcaster needs of a live member; membership's ``MemberInfo`` has it."""

    @property
    def id(self) -> str: ...

    @property
    def addr(self) -> Addr: ...


def retransmit_limit(mult: int, n: int) -> int:
    """Transmissions per piece in a cluster of ``n`` nodes: ``mult * ceil(log10(n + 1))`` (memberlist)."""
    return mult * math.ceil(math.log10(n + 1))


def new_to(books: Callable[[], Mapping[bytes, ActorBooks]]) -> IsNew:
    """An :data:`IsNew` over a store's bookkeeping (``new_to(store.books)``): a piece is new unless its
    version is complete here, or is partial here with the piece's seq range already received."""

    def is_new(actor: bytes, version: int, seqs: tuple[int, int]) -> bool:
        b = books().get(actor)
        if b is None:
            return True
        if version in b.known:
            return False
        partial = b.partials.get(version)
        return partial is None or not partial[0].covers(seqs[0], seqs[1])

    return is_new


@dataclass(frozen=True, slots=True, kw_only=True)
class BroadcastConfig:
    """Tuning of a :class:`Broadcaster`; the defaults are memberlist's LAN gossip figures."""

    interval: float = 0.2
    """Seconds between ticks (memberlist GossipInterval, LAN)."""
    fanout: int = 3
    """Members sent to per tick (memberlist GossipNodes)."""
    max_datagrams_per_target: int = 8
    """Datagrams each of those members may get in one tick while pieces wait (bounded by the rate limit)."""
    retransmit_mult: int = 4
    """Transmissions per piece = retransmit_mult * ceil(log10(N + 1))."""
    max_payload: int = 1100
    """Largest datagram payload, family byte included, before the encryption envelope."""
    max_queue_entries: int = 10_000
    max_queue_bytes: int = 8 * 1024 * 1024
    rate_bytes_per_sec: float = 10 * 1024 * 1024
    """Payload bytes per second this node may broadcast (Corrosion's default budget is 10 MiB/s)."""
    burst_bytes: int = 256 * 1024
    """Token bucket capacity: bytes that may go out at once after a quiet spell."""

    def __post_init__(self) -> None:
        if (
            self.interval <= 0
            or self.fanout < 1
            or self.retransmit_mult < 1
            or self.max_datagrams_per_target < 1
        ):
            raise ValueError(
                "BroadcastConfig: interval > 0, fanout >= 1, retransmit_mult >= 1, max_datagrams_per_target >= 1"
            )
        if not 128 <= self.max_payload <= 65_507:
            raise ValueError("BroadcastConfig: 128 <= max_payload <= 65507")
        if self.max_queue_entries < 1 or self.max_queue_bytes < self.max_payload:
            raise ValueError("BroadcastConfig: max_queue_entries >= 1, max_queue_bytes >= max_payload")
        if self.rate_bytes_per_sec <= 0 or self.burst_bytes < self.max_payload:
            raise ValueError("BroadcastConfig: rate_bytes_per_sec > 0, burst_bytes >= max_payload")


@dataclass(slots=True)
class BroadcastStats:
    """Counters since start (gauges are properties of the :class:`Broadcaster`)."""

    local_changesets: int = 0
    local_pieces: int = 0
    """Pieces of local versions queued."""
    oversized: int = 0
    """Pieces too big for one datagram even alone: local ones not broadcast, relayed ones not relayed."""
    received_payloads: int = 0
    bad_payloads: int = 0
    """Payloads that failed to decode (counted and dropped)."""
    received_pieces: int = 0
    new_pieces: int = 0
    """Received pieces that were new here: returned for merging and queued for relay."""
    duplicate_pieces: int = 0
    """Received pieces this node already had or had queued: dropped, not relayed."""
    sent_payloads: int = 0
    sent_bytes: int = 0
    transmissions: int = 0
    """Piece sends (one piece in one datagram to one member)."""
    expired: int = 0
    """Pieces retired after their last allowed transmission."""
    dropped: int = 0
    """Pieces dropped because the queue was full."""
    discarded: int = 0
    """Pieces removed by :meth:`Broadcaster.discard`."""
    rate_limited: int = 0
    """Datagrams held back because the byte budget was spent."""


class _Piece:
    __slots__ = ("data", "key", "order", "sent_to", "transmits")

    def __init__(self, key: PieceKey, data: bytes, order: int, origin: Addr | None) -> None:
        self.key = key
        self.data = data
        self.order = order
        self.transmits = 0
        self.sent_to: set[Addr] = {origin} if origin is not None else set()


class Broadcaster:
    """Queue and spread changeset pieces; see the module docstring for the rules.

    ``node_id``, when given, keeps this node out of the members it sends to even if the caller's member
    list includes it. ``rng`` is the only randomness used (which members get each tick's datagrams).
    """

    def __init__(
        self,
        *,
        is_new: IsNew,
        rng: random.Random,
        config: BroadcastConfig | None = None,
        node_id: str | None = None,
    ) -> None:
        self.config = config or BroadcastConfig()
        self.stats = BroadcastStats()
        self._is_new = is_new
        self._rng = rng
        self._node_id = node_id
        # Pieces by transmissions done: _buckets[t] maps order -> piece. A bucket is kept in ascending
        # order (= age) except when a move appended out of order; such buckets are listed in _unsorted and
        # sorted lazily before they are read in order.
        self._buckets: list[dict[int, _Piece]] = []
        self._unsorted: set[int] = set()
        self._by_key: dict[PieceKey, _Piece] = {}
        self._bytes = 0
        self._order = 0
        self._tokens = float(self.config.burst_bytes)
        self._refilled_at: float | None = None
        self._next_tick: float | None = None
        self.last_error: str | None = None
        """Why the last bad payload was refused (for logs)."""

    # ------------------------------------------------------------------------------------------- gauges

    @property
    def queued(self) -> int:
        """Pieces waiting to be (re)transmitted."""
        return len(self._by_key)

    @property
    def queued_bytes(self) -> int:
        return self._bytes

    def queued_keys(self) -> list[PieceKey]:
        """``(actor, version, seqs)`` of every queued piece (tests and introspection)."""
        return list(self._by_key)

    def transmits_of(self, key: PieceKey) -> int | None:
        piece = self._by_key.get(key)
        return None if piece is None else piece.transmits

    # ------------------------------------------------------------------------------------------- inputs

    def local_commit(self, changeset: Changeset, now: float) -> int:
        """Queue a version this node just wrote; return how many pieces were queued. Pieces too big for a
        datagram are left to sync (``stats.oversized``)."""
        self.stats.local_changesets += 1
        queued = 0
        for cs, data in self._split(changeset):
            if data is None:
                self.stats.oversized += 1
                continue
            if self._enqueue((cs.actor, cs.version, cs.seqs), data, None, now):
                queued += 1
        self.stats.local_pieces += queued
        return queued

    def receive(self, payload: bytes, sender: Addr | None, now: float) -> list[Changeset]:
        """Handle a broadcast payload from ``sender``; return the pieces that are new here (for the caller
        to merge). Those are queued for relay; everything else is counted and dropped. Never raises on
        bad input: a payload that does not decode is counted in ``stats.bad_payloads``."""
        self.stats.received_payloads += 1
        try:
            decoded = decode_broadcast(payload)
        except BroadcastWireError as exc:
            self.stats.bad_payloads += 1
            self.last_error = str(exc)
            return []
        out: list[Changeset] = []
        seen: set[PieceKey] = set()
        for cs, data in decoded:
            self.stats.received_pieces += 1
            key = (cs.actor, cs.version, cs.seqs)
            queued = self._by_key.get(key)
            if queued is not None or key in seen or not self._is_new(cs.actor, cs.version, cs.seqs):
                self.stats.duplicate_pieces += 1
                if queued is not None and sender is not None:
                    queued.sent_to.add(sender)  # it has it: no need to send it there
                continue
            seen.add(key)
            self.stats.new_pieces += 1
            out.append(cs)
            if len(data) + broadcast_overhead(1) > self.config.max_payload:
                self.stats.oversized += 1  # a sender with a larger budget; sync will spread it
                continue
            self._enqueue(key, data, sender, now)
        return out

    def discard(self, actor: bytes, version: int) -> int:
        """Drop queued pieces of a version (e.g. the store rejected it); return how many."""
        keys = [k for k in self._by_key if k[0] == actor and k[1] == version]
        for k in keys:
            self._remove(self._by_key[k])
        self.stats.discarded += len(keys)
        return len(keys)

    # ------------------------------------------------------------------------------------------- output

    def get_timer(self) -> float | None:
        """When :meth:`tick` should next run, or None while nothing is queued."""
        if not self._by_key:
            return None
        deadline = self._next_tick if self._next_tick is not None else 0.0
        if self._tokens < self.config.max_payload and self._refilled_at is not None:
            refill = (
                self._refilled_at + (self.config.max_payload - self._tokens) / self.config.rate_bytes_per_sec
            )
            deadline = max(deadline, refill)
        return deadline

    def tick(
        self, now: float, members: Sequence[Member], *, addrs: AbstractSet[Addr] | None = None
    ) -> list[tuple[bytes, Addr]]:
        """One gossip round: datagrams for up to ``fanout`` random members of ``members`` (the live
        members, this node excluded or filtered by ``node_id``).

        For large clusters a caller that keeps its member view up to date (the simulator) can make a tick
        cost O(fanout) instead of O(N): build the broadcaster without ``node_id`` and pass a view that
        already excludes this node (it is then used as given, not copied), and ``addrs``, the set of the
        addresses of ``members``, kept alongside (otherwise it is built here for every tick).
        """
        cfg = self.config
        self._next_tick = now + cfg.interval
        self._refill(now)
        if self._node_id is None and isinstance(members, Sequence):
            peers: Sequence[Member] = members
        else:
            peers = [m for m in members if m.id != self._node_id]
        limit = retransmit_limit(cfg.retransmit_mult, len(peers) + 1)
        self._expire(limit)
        if not self._by_key or not peers:
            return []
        targets = self._rng.sample(peers, min(cfg.fanout, len(peers)))
        everyone = addrs if addrs is not None else frozenset(m.addr for m in peers)
        out: list[tuple[bytes, Addr]] = []
        for member in targets:
            addr = member.addr
            # Several datagrams per target while a backlog remains: one datagram per target and tick
            # capped the whole cluster near a dozen writes/s (measured with 32 agents).
            for _ in range(cfg.max_datagrams_per_target):
                taken = self._fill(addr, everyone)
                if not taken:
                    break
                payload = encode_broadcast([p.data for p in taken])
                if len(payload) > self._tokens:
                    self.stats.rate_limited += 1
                    return out
                self._tokens -= len(payload)
                out.append((payload, addr))
                self.stats.sent_payloads += 1
                self.stats.sent_bytes += len(payload)
                self.stats.transmissions += len(taken)
                for piece in taken:
                    piece.sent_to.add(addr)
                    if everyone <= piece.sent_to:
                        self._move(piece, limit, limit)  # every live member has it: retire early
                    else:
                        self._move(piece, piece.transmits + 1, limit)
        return out

    # ------------------------------------------------------------------------------------------- internals

    def _split(self, cs: Changeset) -> list[tuple[Changeset, bytes | None]]:
        """Pieces of ``cs`` that each fit a datagram alone, with their encoding (None: too big)."""
        budget = self.config.max_payload - broadcast_overhead(1)
        whole = encode_piece(cs)
        if len(whole) <= budget or len(cs.changes) <= 1:
            return [(cs, whole if len(whole) <= budget else None)]
        # Envelope without changes, plus room for the change list's header to grow to 5 bytes: pieces
        # have seq numbers no larger than the whole's, so their envelopes are no larger either.
        envelope = len(encode_piece(msgspec.structs.replace(cs, changes=[]))) + 4
        groups: list[list[Change]] = []
        group: list[Change] = []
        used = envelope
        for ch in cs.changes:
            size = len(_encoder.encode(ch))
            if group and used + size > budget:
                groups.append(group)
                group, used = [], envelope
            group.append(ch)
            used += size
        groups.append(group)
        out: list[tuple[Changeset, bytes | None]] = []
        for piece in split_changeset_groups(cs, groups):
            data = encode_piece(piece)
            out.append((piece, data if len(data) <= budget else None))
        return out

    def _enqueue(self, key: PieceKey, data: bytes, origin: Addr | None, now: float) -> bool:
        if key in self._by_key:
            return False
        cfg = self.config
        while self._by_key and (
            len(self._by_key) + 1 > cfg.max_queue_entries or self._bytes + len(data) > cfg.max_queue_bytes
        ):
            self._drop_one()
        self._order += 1
        piece = _Piece(key, data, self._order, origin)
        self._by_key[key] = piece
        self._bytes += len(data)
        self._put(piece)
        if self._next_tick is None or self._next_tick < now:
            self._next_tick = now
        return True

    def _bucket(self, t: int) -> dict[int, _Piece]:
        while len(self._buckets) <= t:
            self._buckets.append({})
        if t in self._unsorted:
            self._buckets[t] = dict(sorted(self._buckets[t].items()))
            self._unsorted.discard(t)
        return self._buckets[t]

    def _put(self, piece: _Piece) -> None:
        while len(self._buckets) <= piece.transmits:
            self._buckets.append({})
        bucket = self._buckets[piece.transmits]
        if bucket and next(reversed(bucket)) > piece.order:
            self._unsorted.add(piece.transmits)
        bucket[piece.order] = piece

    def _remove(self, piece: _Piece) -> None:
        del self._buckets[piece.transmits][piece.order]
        del self._by_key[piece.key]
        self._bytes -= len(piece.data)

    def _move(self, piece: _Piece, transmits: int, limit: int) -> None:
        del self._buckets[piece.transmits][piece.order]
        if transmits >= limit:
            del self._by_key[piece.key]
            self._bytes -= len(piece.data)
            self.stats.expired += 1
            return
        piece.transmits = transmits
        self._put(piece)

    def _drop_one(self) -> None:
        # The drop rule: most transmissions done first, then oldest.
        for t in range(len(self._buckets) - 1, -1, -1):
            if self._buckets[t]:
                bucket = self._bucket(t)
                self._remove(bucket[next(iter(bucket))])
                self.stats.dropped += 1
                return

    def _expire(self, limit: int) -> None:
        # The cluster may have shrunk since pieces were counted: retire those past the current limit.
        for t in range(limit, len(self._buckets)):
            bucket = self._buckets[t]
            for piece in list(bucket.values()):
                self._remove(piece)
                self.stats.expired += 1

    def _fill(self, addr: Addr, everyone: AbstractSet[Addr]) -> list[_Piece]:
        """Pieces for one datagram to ``addr``: fewest transmissions first, then oldest. Pieces met on the
        way that every live member already has are retired (in a small cluster they would otherwise
        wait forever for transmissions that can no longer happen)."""
        budget = self.config.max_payload
        taken: list[_Piece] = []
        spent: list[_Piece] = []
        used = 0
        scanned = misses = 0
        try:
            for t in range(len(self._buckets)):
                if not self._buckets[t]:
                    continue
                for piece in self._bucket(t).values():
                    scanned += 1
                    if scanned > _SCAN_LIMIT or misses > _MAX_MISSES:
                        return taken
                    if addr in piece.sent_to:
                        if everyone <= piece.sent_to:
                            spent.append(piece)
                        continue
                    size = len(piece.data)
                    if used + size + broadcast_overhead(len(taken) + 1) > budget:
                        misses += 1
                        continue
                    taken.append(piece)
                    used += size
                    if budget - used - broadcast_overhead(len(taken) + 1) < _MIN_PIECE:
                        return taken
            return taken
        finally:
            for piece in spent:
                self._remove(piece)
                self.stats.expired += 1

    def _refill(self, now: float) -> None:
        if self._refilled_at is not None and now > self._refilled_at:
            self._tokens = min(
                float(self.config.burst_bytes),
                self._tokens + (now - self._refilled_at) * self.config.rate_bytes_per_sec,
            )
        if self._refilled_at is None or now > self._refilled_at:
            self._refilled_at = now
