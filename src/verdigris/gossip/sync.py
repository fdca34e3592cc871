"""Anti-entropy sync, sans-IO: when to sync, with whom, what to ask, and the stream protocol.

Broadcast is fast but lossy (datagrams drop, queues overflow, nodes restart); sync is the repair path
that makes every node end up with every version. Periodically a node opens a stream to a few peers and,
on each, plays the client of this protocol::

    client → server   SyncRequest(SyncState)        what I have (heads) and lack (gaps, partial versions)
    server → client   SyncChanges(pieces)  × n      what I have of it, in bounded chunks
    server → client   SyncEnd(truncated)            or SyncReject(reason) instead of all of the above

Frames are length-prefixed (:mod:`verdigris.gossip.changes_wire`). The server answers from any
:class:`ChangeSource` (the :class:`~verdigris.store.Store` is one, structurally): the versions of every
actor it knows, not only its own, that the client lacks: the client's gaps and partial versions, the
versions above the client's head for each actor, and every version of actors the client has never heard
of. That is what lets a node that missed a thousand versions, or a whole actor, catch up from anyone.

**Splitting needs across peers** (:func:`split_sync_state`). A client syncing with ``k`` peers at once
sends each a different :class:`SyncState`, so no two are asked for the same thing:

* gaps (version ranges below the client's head) are cut into chunks of at least ``chunk_versions``
  versions, dealt round-robin to the ``k`` peers from a random starting peer; partial versions are dealt
  the same way, one version at a time;
* every peer gets all heads, so none of them sends what the client already has; the versions *above* the
  heads (and of actors the client does not know) are split by actor: peer ``i`` of ``k`` serves only the
  actors with ``share_of(actor, k) == i`` (a hash of the actor id);
* a peer that lacks (or fails to send) its share leaves it for the next round, which deals shares again
  to other peers in another order, so everything is eventually fetched from someone who has it.

Bounds (principle 5): the state a client sends is capped (actors, gap ranges, partial versions, seq ranges
per partial; the rest waits for the next round, rotated at random); a server sends at most
``max_frames`` frames of at most ``max_changes_per_frame`` changes (about ``target_frame_bytes`` each);
each side refuses a frame longer than its limit as soon as the length prefix arrives; every state has a
deadline (:meth:`SyncClient.get_timer`, :meth:`SyncServer.get_timer`). A peer that stalls, sends garbage
or closes early ends the session with a :class:`SyncFailed` event; nothing it sent after the last valid
frame reaches the store, and nothing raises.

Public API: :class:`ChangeSource`, :class:`SyncConfig`, :func:`build_sync_state`,
:func:`split_sync_state`, :func:`share_of`, :class:`SyncScheduler`, :class:`SyncClient`,
:class:`SyncServer`, :class:`Phase`, :class:`FailKind`, the events (:class:`ChangesReceived`,
:class:`RequestReceived`, :class:`SyncDone`, :class:`SyncFailed`), :class:`SyncStats` and
:func:`reject_frame`.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import math
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias, TypeVar

from verdigris.gossip.broadcast import Member
from verdigris.gossip.changes_wire import (
    PROTOCOL_VERSION,
    ActorNeed,
    FrameReader,
    PartialNeed,
    SyncChanges,
    SyncEnd,
    SyncReject,
    SyncRequest,
    SyncState,
    SyncWireError,
    decode_sync,
    encode_piece,
    encode_sync,
    encode_sync_changes,
    frame,
    sync_changes_overhead,
)
from verdigris.store.ranges import RangeSet
from verdigris.store.store import ActorBooks, split_changeset
from verdigris.store.types import Changeset

__all__ = [
    "ChangeSource",
    "ChangesReceived",
    "FailKind",
    "Phase",
    "RequestReceived",
    "SyncClient",
    "SyncConfig",
    "SyncDone",
    "SyncEvent",
    "SyncFailed",
    "SyncScheduler",
    "SyncServer",
    "SyncStats",
    "build_sync_state",
    "reject_frame",
    "share_of",
    "split_sync_state",
]


class ChangeSource(Protocol):
    """What a sync server reads; :class:`~verdigris.store.Store` satisfies it as it is."""

    def books(self) -> Mapping[bytes, ActorBooks]: ...

    def changesets_for(self, actor: bytes, start: int, end: int) -> list[Changeset]: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class SyncConfig:
    """Limits and timeouts of sync sessions (both sides) and of the state a client builds."""

    # What a client asks for (bounds the request frame).
    max_actors: int = 16_384
    max_need_ranges: int = 4096
    max_partials: int = 1024
    max_partial_seq_ranges: int = 16
    chunk_versions: int = 64
    """Smallest chunk of a gap dealt to one peer when needs are split across peers."""
    # What a server sends.
    max_changes_per_frame: int = 512
    target_frame_bytes: int = 64 * 1024
    max_frames: int = 1024
    """Frames of changes per session; the server ends with ``truncated=True`` when it stops there."""
    read_batch_versions: int = 64
    """Versions read from the source per call, so a huge range never sits in memory at once."""
    send_buffer_bytes: int = 256 * 1024
    """About how much :meth:`SyncServer.data_to_send` returns per call (the driver calls again after
    draining), so a slow reader never makes the server materialise the whole answer."""
    # Both sides.
    max_frame_bytes: int = 16 * 1024 * 1024
    """Longest changes frame accepted (a single change larger than this cannot be synced)."""
    max_request_bytes: int = 2 * 1024 * 1024
    request_timeout: float = 10.0
    """Server: seconds to receive the whole request."""
    idle_timeout: float = 15.0
    """Client: seconds without a byte from the server."""
    session_timeout: float = 120.0
    """Either side: seconds for the whole session."""

    def __post_init__(self) -> None:
        positive = (
            self.max_actors,
            self.max_need_ranges,
            self.max_partials,
            self.max_partial_seq_ranges,
            self.chunk_versions,
            self.max_changes_per_frame,
            self.target_frame_bytes,
            self.max_frames,
            self.read_batch_versions,
            self.send_buffer_bytes,
        )
        if min(positive) < 1:
            raise ValueError("SyncConfig: limits must be >= 1")
        if self.max_actors > 65_536 or self.max_partials > 8192 or self.max_partial_seq_ranges > 64:
            raise ValueError("SyncConfig: state limits exceed what the wire format accepts")
        if self.max_frame_bytes < self.target_frame_bytes or self.max_request_bytes < 1024:
            raise ValueError("SyncConfig: max_frame_bytes >= target_frame_bytes, max_request_bytes >= 1024")
        if min(self.request_timeout, self.idle_timeout, self.session_timeout) <= 0:
            raise ValueError("SyncConfig: timeouts must be > 0")


# --- what to ask --------------------------------------------------------------------------------------


def share_of(actor: bytes, count: int) -> int:
    """Which of ``count`` peers serves ``actor``'s versions above the client's head."""
    if count <= 1:
        return 0
    return int.from_bytes(hashlib.blake2b(actor, digest_size=8).digest(), "big") % count


def _gaps(books: ActorBooks) -> list[tuple[int, int]]:
    # ActorBooks.needs() without its per-version loop: gaps of the known set minus partial versions.
    head = books.head
    if head == 0:
        return []
    partials = sorted(books.partials)
    out: list[tuple[int, int]] = []
    for s, e in books.known.gaps(1, head):
        start = s
        for v in partials[bisect.bisect_left(partials, s) : bisect.bisect_right(partials, e)]:
            if start < v:
                out.append((start, v - 1))
            start = v + 1
        if start <= e:
            out.append((start, e))
    return out


def build_sync_state(
    source: ChangeSource, actor: bytes, rng: random.Random, config: SyncConfig | None = None
) -> SyncState:
    """What this node (``actor``) has and lacks, within the config's bounds.

    When a bound is hit, a random subset (actors) or a random rotation (gaps, partials) is kept, so
    successive rounds cover everything; with too many actors ``complete`` is cleared, so servers do not
    take the actors left out for unknown ones.
    """
    cfg = config or SyncConfig()
    books = source.books()
    actors = sorted(a for a, b in books.items() if b.head > 0)
    complete = True
    if len(actors) > cfg.max_actors:
        keep = set(rng.sample(actors, cfg.max_actors - 1))
        keep.add(actor)
        actors = [a for a in actors if a in keep]
        complete = False
    heads = [(a, books[a].head) for a in actors]
    others = [a for a in actors if a != actor]
    start = rng.randrange(len(others)) if others else 0
    rotated = others[start:] + others[:start]
    needs: list[ActorNeed] = []
    partials: list[PartialNeed] = []
    ranges_left = cfg.max_need_ranges
    for a in rotated:
        b = books[a]
        if ranges_left > 0:
            gaps = _gaps(b)[:ranges_left]
            if gaps:
                needs.append(ActorNeed(a, gaps))
                ranges_left -= len(gaps)
        for v in sorted(b.partials):
            if len(partials) >= cfg.max_partials:
                break
            seqs, last = b.partials[v]
            missing = seqs.gaps(0, last)[: cfg.max_partial_seq_ranges]
            if missing:
                partials.append(PartialNeed(a, v, missing))
    return SyncState(actor=actor, heads=heads, needs=needs, partials=partials, complete=complete)


def split_sync_state(
    state: SyncState, count: int, rng: random.Random, config: SyncConfig | None = None
) -> list[SyncState]:
    """Deal ``state`` out to ``count`` peers so no two are asked for the same versions (the rule is in
    the module docstring). Returns one state per peer, in peer order."""
    if count <= 1:
        return [state]
    cfg = config or SyncConfig()
    total = sum(e - s + 1 for n in state.needs for s, e in n.ranges)
    # Chunks no smaller than chunk_versions, and few enough to keep each peer's request small.
    chunk = max(cfg.chunk_versions, math.ceil(total / (count * 64)))
    needs: list[dict[bytes, list[tuple[int, int]]]] = [{} for _ in range(count)]
    partials: list[list[PartialNeed]] = [[] for _ in range(count)]
    turn = rng.randrange(count)
    for need in state.needs:
        for s, e in need.ranges:
            while s <= e:
                end = min(e, s + chunk - 1)
                needs[turn].setdefault(need.actor, []).append((s, end))
                turn = (turn + 1) % count
                s = end + 1
    for p in state.partials:
        partials[turn].append(p)
        turn = (turn + 1) % count
    return [
        SyncState(
            actor=state.actor,
            heads=state.heads,
            needs=[ActorNeed(a, r) for a, r in needs[i].items()],
            partials=partials[i],
            complete=state.complete,
            share=(i, count),
        )
        for i in range(count)
    ]


# --- when and with whom -------------------------------------------------------------------------------

_M = TypeVar("_M", bound=Member)


class SyncScheduler:
    """Decides when to sync and with which peers (sans-IO: ``now`` in, deadlines out).

    Rounds come after a random delay between ``min_interval`` and a ceiling that doubles after every
    round that brought nothing (we were in sync) up to ``max_interval``, and falls back to
    ``min_interval`` after a round that brought changes (we were behind, so more may be missing): a
    random backoff between 1 and 15 s by default, like Corrosion's. Each round picks up to
    ``peers_per_round`` members, those synced least recently first (never-synced first, ties broken at
    random), skipping those with a session still running.
    """

    def __init__(
        self,
        rng: random.Random,
        *,
        min_interval: float = 1.0,
        max_interval: float = 15.0,
        peers_per_round: int = 3,
        now: float = 0.0,
    ) -> None:
        if not 0 < min_interval <= max_interval or peers_per_round < 1:
            raise ValueError("SyncScheduler: 0 < min_interval <= max_interval, peers_per_round >= 1")
        self._rng = rng
        self.min_interval = min_interval
        self.max_interval = max_interval
        self.peers_per_round = peers_per_round
        self._ceiling = min_interval
        self._next = now + rng.uniform(0.0, min_interval)
        self._last_sync: dict[str, float] = {}
        self._in_flight: set[str] = set()
        self._round_received = 0
        self._round_pending = 0
        self._round_ok = False

    def get_timer(self) -> float:
        """When the next round is due."""
        return self._next

    def due(self, now: float) -> bool:
        return now >= self._next

    @property
    def in_flight(self) -> frozenset[str]:
        return frozenset(self._in_flight)

    def choose_peers(self, now: float, members: Sequence[_M]) -> list[_M]:
        """Start a round: the members to sync with (possibly none), and schedule the next round. Report
        each session's end with :meth:`session_done` (by member id)."""
        live = {m.id for m in members}
        self._last_sync = {k: v for k, v in self._last_sync.items() if k in live}
        candidates = [m for m in members if m.id not in self._in_flight]
        keyed = sorted(candidates, key=lambda m: (self._last_sync.get(m.id, -math.inf), self._rng.random()))
        chosen = keyed[: self.peers_per_round]
        self._in_flight.update(m.id for m in chosen)
        self._round_received = 0
        self._round_pending = len(chosen)
        self._round_ok = False
        self._schedule(now)
        return chosen

    def session_done(self, peer: str, now: float, *, ok: bool, received: int) -> None:
        """Report a finished session (``received``: changesets that were new). A failed peer still counts
        as recently tried, so the next round prefers others."""
        self._in_flight.discard(peer)
        self._last_sync[peer] = now
        self._round_received += received
        self._round_ok = self._round_ok or ok
        self._round_pending = max(0, self._round_pending - 1)
        if self._round_pending == 0:
            if self._round_received > 0:
                self._ceiling = self.min_interval
                self._next = min(self._next, now + self.min_interval)
            elif self._round_ok:
                self._ceiling = min(self.max_interval, self._ceiling * 2)

    def _schedule(self, now: float) -> None:
        self._next = now + self._rng.uniform(self.min_interval, self._ceiling)


# --- events -------------------------------------------------------------------------------------------


class Phase(enum.Enum):
    """States of a session. Client: RECEIVING → DONE | FAILED. Server: AWAIT_REQUEST → SENDING → DONE,
    or → FAILED from either."""

    AWAIT_REQUEST = "await-request"
    SENDING = "sending"
    RECEIVING = "receiving"
    DONE = "done"
    FAILED = "failed"


class FailKind(enum.Enum):
    TIMEOUT = "timeout"
    """The peer stalled: no request, no data, or the session ran past its deadline."""
    PROTOCOL = "protocol"
    """Bytes that are not this protocol: garbage, a bad frame, an unexpected message."""
    OVERSIZED = "oversized"
    """A frame longer than allowed."""
    CLOSED = "closed"
    """The stream ended before the session did."""
    REJECTED = "rejected"
    """The server refused (busy, bad request)."""
    SOURCE = "source"
    """The server's change source failed while reading."""
    ABORTED = "aborted"
    """The driver gave up (e.g. connection error)."""


@dataclass(frozen=True, slots=True)
class ChangesReceived:
    """Client: pieces to merge into the store (one valid frame's worth)."""

    changesets: list[Changeset]


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """Server: the client's request arrived and is valid; changes follow from :meth:`data_to_send`."""

    state: SyncState


@dataclass(frozen=True, slots=True)
class SyncDone:
    """Client: the server finished; ``truncated`` means it stopped at its limit (sync again soon)."""

    frames: int
    changesets: int
    truncated: bool


@dataclass(frozen=True, slots=True)
class SyncFailed:
    """Either side: the session ended in error. Nothing more will be accepted or produced."""

    kind: FailKind
    reason: str


SyncEvent: TypeAlias = ChangesReceived | RequestReceived | SyncDone | SyncFailed


@dataclass(slots=True)
class SyncStats:
    """Counters across sessions, for a driver to keep: feed it every event of every session."""

    sessions_done: int = 0
    truncated: int = 0
    sessions_failed: int = 0
    failures: dict[FailKind, int] = field(default_factory=dict)
    """Failed sessions by kind (client and server side alike)."""
    changesets_received: int = 0
    requests_served: int = 0

    def observe(self, events: Iterable[SyncEvent]) -> None:
        for ev in events:
            if isinstance(ev, ChangesReceived):
                self.changesets_received += len(ev.changesets)
            elif isinstance(ev, SyncDone):
                self.sessions_done += 1
                self.truncated += ev.truncated
            elif isinstance(ev, SyncFailed):
                self.sessions_failed += 1
                self.failures[ev.kind] = self.failures.get(ev.kind, 0) + 1
            else:
                self.requests_served += 1


def reject_frame(reason: str) -> bytes:
    """A complete :class:`SyncReject` frame, for a driver that refuses a session outright (busy)."""
    return frame(encode_sync(SyncReject(PROTOCOL_VERSION, reason[:256])))


# --- client -------------------------------------------------------------------------------------------


class SyncClient:
    """One sync session, client side. Send :meth:`data_to_send` (the request), feed what the server
    sends to :meth:`receive_data` (``b""`` for end of stream), merge the pieces of every
    :class:`ChangesReceived`, and honour :meth:`get_timer` / :meth:`handle_timer`."""

    def __init__(self, state: SyncState, now: float, *, config: SyncConfig | None = None) -> None:
        self.config = cfg = config or SyncConfig()
        request = frame(encode_sync(SyncRequest(PROTOCOL_VERSION, state)))
        if len(request) - 4 > cfg.max_request_bytes:
            raise ValueError(
                f"sync state of {len(request)} bytes exceeds max_request_bytes; lower the state limits"
            )
        self.state = state
        self.phase = Phase.RECEIVING
        self._out = request
        self._reader = FrameReader(cfg.max_frame_bytes)
        self._started = now
        self._last_activity = now
        self.frames = 0
        self.changesets = 0
        self.bytes_received = 0
        self.ignored_bytes = 0
        """Bytes that arrived after the session ended (not acted on)."""
        self.error: SyncFailed | None = None

    def data_to_send(self) -> bytes:
        out, self._out = self._out, b""
        return out

    def get_timer(self) -> float | None:
        if self.phase is not Phase.RECEIVING:
            return None
        cfg = self.config
        return min(self._last_activity + cfg.idle_timeout, self._started + cfg.session_timeout)

    def handle_timer(self, now: float) -> list[SyncEvent]:
        deadline = self.get_timer()
        if deadline is None or now < deadline:
            return []
        return [self._fail(FailKind.TIMEOUT, "server stalled")]

    def abort(self, reason: str) -> list[SyncEvent]:
        """The driver ends the session (connection error, shutdown)."""
        if self.phase is not Phase.RECEIVING:
            return []
        return [self._fail(FailKind.ABORTED, reason)]

    def receive_data(self, data: bytes, now: float) -> list[SyncEvent]:
        if self.phase is not Phase.RECEIVING:
            self.ignored_bytes += len(data)
            return []
        if not data:
            return [self._fail(FailKind.CLOSED, "server closed the stream before the end frame")]
        self._last_activity = now
        self.bytes_received += len(data)
        events: list[SyncEvent] = []
        try:
            payloads = self._reader.feed(data)
        except SyncWireError as exc:
            # Frames completed in the same chunk as a bad length are dropped with it: the session is
            # over, and what they carried comes again from the next sync.
            kind = FailKind.OVERSIZED if "exceeds" in str(exc) else FailKind.PROTOCOL
            return [self._fail(kind, str(exc))]
        for payload in payloads:
            if self.phase is not Phase.RECEIVING:
                self.ignored_bytes += len(payload)
                continue
            try:
                msg = decode_sync(payload)
            except SyncWireError as exc:
                events.append(self._fail(FailKind.PROTOCOL, str(exc)))
                break
            if isinstance(msg, SyncChanges):
                if self.frames >= self.config.max_frames:
                    events.append(self._fail(FailKind.PROTOCOL, "server sent more frames than allowed"))
                    break
                self.frames += 1
                self.changesets += len(msg.changesets)
                if msg.changesets:
                    events.append(ChangesReceived(msg.changesets))
            elif isinstance(msg, SyncEnd):
                self.phase = Phase.DONE
                events.append(SyncDone(self.frames, self.changesets, msg.truncated))
            elif isinstance(msg, SyncReject):
                events.append(self._fail(FailKind.REJECTED, msg.reason))
            else:
                events.append(self._fail(FailKind.PROTOCOL, "unexpected request frame from the server"))
        return events

    def _fail(self, kind: FailKind, reason: str) -> SyncFailed:
        self.phase = Phase.FAILED
        self.error = SyncFailed(kind, reason)
        return self.error


# --- server -------------------------------------------------------------------------------------------

_Work: TypeAlias = tuple[bytes, int, int, list[tuple[int, int]] | None]
"""``(actor, start, end, None)``: a version range; ``(actor, version, version, seqs)``: a partial need."""


class SyncServer:
    """One sync session, server side, reading from a :class:`ChangeSource`.

    Feed the client's bytes to :meth:`receive_data`; once it returns :class:`RequestReceived`, call
    :meth:`data_to_send` whenever the stream can take more (each call returns about
    ``send_buffer_bytes``, producing frames lazily) until :attr:`phase` is DONE or FAILED, then close.
    A bad request is answered with a :class:`SyncReject` frame before the session fails.
    """

    def __init__(self, source: ChangeSource, now: float, *, config: SyncConfig | None = None) -> None:
        self.config = cfg = config or SyncConfig()
        self.source = source
        self.phase = Phase.AWAIT_REQUEST
        self._reader = FrameReader(cfg.max_request_bytes)
        self._started = now
        self._out = bytearray()
        self._pieces: Iterator[Changeset] | None = None
        self._pending: tuple[Changeset, bytes] | None = None
        self.request: SyncState | None = None
        self.frames = 0
        self.changesets = 0
        self.changes = 0
        self.oversized = 0
        """Pieces left out because a single one exceeded ``max_frame_bytes``."""
        self.truncated = False
        self.error: SyncFailed | None = None

    def get_timer(self) -> float | None:
        cfg = self.config
        if self.phase is Phase.AWAIT_REQUEST:
            return self._started + min(cfg.request_timeout, cfg.session_timeout)
        if self.phase is Phase.SENDING:
            return self._started + cfg.session_timeout
        return None

    def handle_timer(self, now: float) -> list[SyncEvent]:
        deadline = self.get_timer()
        if deadline is None or now < deadline:
            return []
        what = "no request in time" if self.phase is Phase.AWAIT_REQUEST else "session ran past its deadline"
        return [self._fail(FailKind.TIMEOUT, what, reject=False)]

    def abort(self, reason: str) -> list[SyncEvent]:
        if self.phase in (Phase.DONE, Phase.FAILED):
            return []
        return [self._fail(FailKind.ABORTED, reason, reject=False)]

    def receive_data(self, data: bytes, now: float) -> list[SyncEvent]:
        if self.phase is not Phase.AWAIT_REQUEST:
            if data and self.phase is Phase.SENDING:
                return [self._fail(FailKind.PROTOCOL, "client sent data after its request")]
            return []  # end of stream after the request, or anything once the session is over
        if not data:
            return [self._fail(FailKind.CLOSED, "client closed the stream before its request", reject=False)]
        try:
            payloads = self._reader.feed(data)
        except SyncWireError as exc:
            kind = FailKind.OVERSIZED if "exceeds" in str(exc) else FailKind.PROTOCOL
            return [self._fail(kind, str(exc))]
        if not payloads:
            return []
        if len(payloads) > 1 or self._reader.buffered:
            return [self._fail(FailKind.PROTOCOL, "client sent data after its request")]
        try:
            msg = decode_sync(payloads[0])
        except SyncWireError as exc:
            return [self._fail(FailKind.PROTOCOL, str(exc))]
        if not isinstance(msg, SyncRequest):
            return [self._fail(FailKind.PROTOCOL, "expected a request frame")]
        self.request = msg.state
        try:
            work = self._plan(msg.state)
        except Exception as exc:  # a store read error ends this session, never the node
            return [self._fail(FailKind.SOURCE, f"reading books failed: {exc}")]
        self._pieces = self._generate(work)
        self.phase = Phase.SENDING
        return [RequestReceived(msg.state)]

    def data_to_send(self) -> bytes:
        cfg = self.config
        while self.phase is Phase.SENDING and len(self._out) < cfg.send_buffer_bytes:
            if self.frames >= cfg.max_frames:
                try:
                    self.truncated = self._peek() is not None
                except Exception as exc:
                    self._fail(FailKind.SOURCE, f"reading changes failed: {exc}")
                    break
                self._finish()
                break
            try:
                payload = self._next_frame()
            except Exception as exc:  # a store read error ends this session, never the node
                self._fail(FailKind.SOURCE, f"reading changes failed: {exc}")
                break
            if payload is None:
                self._finish()
                break
            self._out += frame(payload)
            self.frames += 1
        out = bytes(self._out)
        self._out.clear()
        return out

    # ------------------------------------------------------------------------------------------- internals

    def _finish(self) -> None:
        self._out += frame(encode_sync(SyncEnd(PROTOCOL_VERSION, self.truncated, self.frames)))
        self.phase = Phase.DONE
        self._pieces = None
        self._pending = None

    def _fail(self, kind: FailKind, reason: str, *, reject: bool = True) -> SyncFailed:
        if reject and self.phase is not Phase.FAILED:
            self._out += reject_frame(reason)
        self.phase = Phase.FAILED
        self._pieces = None
        self._pending = None
        self.error = SyncFailed(kind, reason)
        return self.error

    def _plan(self, state: SyncState) -> list[_Work]:
        """Everything to serve, decided now from a snapshot of the books (they change while we send):
        version ranges this server has completely, and partial needs of versions it has completely. Order: the client's gaps, its partial versions, then what lies above its heads."""
        books = self.source.books()
        known: dict[bytes, list[tuple[int, int]]] = {}

        def have(actor: bytes) -> list[tuple[int, int]]:
            ranges = known.get(actor)
            if ranges is None:
                b = books.get(actor)
                ranges = known[actor] = list(b.known) if b is not None else []
            return ranges

        work: list[_Work] = []
        for need in state.needs:
            if need.actor == state.actor:
                continue
            for s, e in need.ranges:
                work.extend(_intersect(need.actor, s, e, have(need.actor)))
        for p in state.partials:
            if p.actor != state.actor and RangeSet(have(p.actor)).covers(p.version, p.version):
                work.append((p.actor, p.version, p.version, list(p.seqs)))
        heads = dict(state.heads)
        index, count = state.share
        for actor in sorted(books):
            if actor == state.actor or share_of(actor, count) != index:
                continue
            if actor in heads:
                head = heads[actor]
            elif state.complete:
                head = 0
            else:
                continue
            work.extend(_intersect(actor, head + 1, books[actor].head, have(actor)))
        return work

    def _generate(self, work: list[_Work]) -> Iterator[Changeset]:
        cfg = self.config
        for actor, start, end, seqs in work:
            if seqs is None:
                for lo in range(start, end + 1, cfg.read_batch_versions):
                    hi = min(end, lo + cfg.read_batch_versions - 1)
                    for cs in self.source.changesets_for(actor, lo, hi):
                        yield from split_changeset(cs, cfg.max_changes_per_frame)
            else:
                found = self.source.changesets_for(actor, start, start)
                if not found:
                    continue
                for piece in _partial_pieces(found[0], seqs):
                    yield from split_changeset(piece, cfg.max_changes_per_frame)

    def _peek(self) -> tuple[Changeset, bytes] | None:
        while self._pending is None and self._pieces is not None:
            cs = next(self._pieces, None)
            if cs is None:
                self._pieces = None
                break
            data = encode_piece(cs)
            if len(data) + sync_changes_overhead(1) > self.config.max_frame_bytes:
                self.oversized += 1
                continue
            self._pending = (cs, data)
        return self._pending

    def _next_frame(self) -> bytes | None:
        cfg = self.config
        pieces: list[bytes] = []
        size = changes = 0
        while (nxt := self._peek()) is not None:
            cs, data = nxt
            n = len(cs.changes)
            if pieces and (
                size + len(data) + sync_changes_overhead(len(pieces) + 1) > cfg.target_frame_bytes
                or changes + n > cfg.max_changes_per_frame
            ):
                break
            pieces.append(data)
            size += len(data)
            changes += n
            self.changesets += 1
            self.changes += n
            self._pending = None
        return encode_sync_changes(pieces) if pieces else None


def _intersect(actor: bytes, start: int, end: int, have: list[tuple[int, int]]) -> list[_Work]:
    out: list[_Work] = []
    if start > end:
        return out
    for s, e in have:
        if e < start:
            continue
        if s > end:
            break
        out.append((actor, max(s, start), min(e, end), None))
    return out


def _partial_pieces(cs: Changeset, seqs: list[tuple[int, int]]) -> list[Changeset]:
    """Pieces of a complete version covering the seq ranges a client misses.

    Ranges are clipped to this server's ``last_seq``: changes past it were superseded here, and a piece
    claiming the smaller ``last_seq`` lets the client complete the version (the store takes the smallest
    claim). A range wholly past it becomes the one-seq piece at ``last_seq``, which carries that claim.
    """
    last = cs.last_seq
    out: list[Changeset] = []
    done: set[tuple[int, int]] = set()
    for s, e in seqs:
        lo, hi = min(s, last), min(e, last)
        if (lo, hi) in done:
            continue
        done.add((lo, hi))
        out.append(
            Changeset(
                actor=cs.actor,
                version=cs.version,
                changes=[c for c in cs.changes if lo <= c.seq <= hi],
                seqs=(lo, hi),
                last_seq=last,
                ts=cs.ts,
            )
        )
    return out
