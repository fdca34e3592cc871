"""Wire format of change dissemination: epidemic broadcast datagrams and anti-entropy sync frames.

Payloads of every gossip transport are multiplexed by their first byte, the *family*: 1 membership
(:mod:`verdigris.gossip.wire`), 2 broadcast (:data:`FAMILY_BROADCAST`), 3 sync (:data:`FAMILY_SYNC`).
After the family byte comes one msgpack-encoded message: a tagged, array-like :mod:`msgspec` struct whose
first field ``v`` is the protocol version, so a later version can add message kinds (new tags) or fields
without being mistaken for this one.

* **Broadcast** (one UDP datagram): :class:`BroadcastChanges`, a list of changeset *pieces*
  (:class:`~verdigris.store.Changeset` with a seq range), each encoded once by :func:`encode_piece` and
  spliced into datagrams as raw bytes by :func:`encode_broadcast`, so the sender knows each datagram's size
  exactly before it builds it and a relay forwards the bytes it received without re-encoding them.
* **Sync** (a reliable byte stream): length-prefixed frames (:func:`frame`, :class:`FrameReader`; a 4-byte
  big-endian length, then the payload). The client sends one :class:`SyncRequest` carrying its
  :class:`SyncState`; the server answers with :class:`SyncChanges` frames and one :class:`SyncEnd`, or a
  :class:`SyncReject`.

Decoding is the trust boundary (ARCHITECTURE principle 6): :func:`decode_broadcast` raises only
:class:`BroadcastWireError` and :func:`decode_sync` / :class:`FrameReader` only :class:`SyncWireError`,
whatever the bytes. Beyond msgspec's schema checks, every decoded changeset is checked for what would hurt
the store rather than be refused by it: integers that SQLite cannot hold (they would make a merge raise
instead of reject), values of types SQLite cannot hold, changes that do not belong to their changeset.
Sizes are bounded by the datagram / frame length limits and by list-length limits in the schema.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Annotated, Any, Final, TypeAlias

import msgspec

from verdigris.store.types import Changeset

__all__ = [
    "FAMILY_BROADCAST",
    "FAMILY_SYNC",
    "FRAME_HEADER",
    "MAX_DATAGRAM",
    "MAX_I64",
    "PROTOCOL_VERSION",
    "ActorNeed",
    "BroadcastChanges",
    "BroadcastWireError",
    "FrameReader",
    "PartialNeed",
    "SyncChanges",
    "SyncEnd",
    "SyncMessage",
    "SyncReject",
    "SyncRequest",
    "SyncState",
    "SyncWireError",
    "WireError",
    "broadcast_overhead",
    "changeset_problem",
    "decode_broadcast",
    "decode_sync",
    "encode_broadcast",
    "encode_piece",
    "encode_sync",
    "encode_sync_changes",
    "frame",
    "sync_changes_overhead",
]

FAMILY_BROADCAST: Final = 2
"""First byte of a broadcast datagram payload."""
FAMILY_SYNC: Final = 3
"""First byte of every sync frame payload."""
PROTOCOL_VERSION: Final = 1
"""The ``v`` field of every message this module encodes; others are refused on decode."""
MAX_DATAGRAM: Final = 65_507
"""The largest UDP payload; a longer broadcast payload cannot have come off the wire."""
MAX_I64: Final = 2**63 - 1
"""SQLite's largest integer: larger versions, seqs or values would make the store raise, not reject."""
FRAME_HEADER: Final = 4
"""Bytes of the big-endian length prefix of a sync frame."""

_MIN_I64: Final = -(2**63)
_ACTOR_LEN: Final = 16

ActorId = Annotated[bytes, msgspec.Meta(min_length=_ACTOR_LEN, max_length=_ACTOR_LEN)]
Version = Annotated[int, msgspec.Meta(ge=1, le=MAX_I64)]
Head = Annotated[int, msgspec.Meta(ge=0, le=MAX_I64)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=MAX_I64)]
ProtoVersion = Annotated[int, msgspec.Meta(ge=0, le=255)]
Reason = Annotated[str, msgspec.Meta(max_length=256)]


class WireError(Exception):
    """Bytes that are not a valid message of this protocol version (the message says why)."""


class BroadcastWireError(WireError):
    """A broadcast datagram payload could not be decoded."""


class SyncWireError(WireError):
    """A sync frame (or the framing of the stream) could not be decoded."""


# --- broadcast ------------------------------------------------------------------------------------------


class BroadcastChanges(msgspec.Struct, frozen=True, array_like=True, tag=1):
    """One broadcast datagram: changeset pieces, each a seq range of one version of one actor."""

    v: ProtoVersion
    changesets: Annotated[list[Changeset], msgspec.Meta(max_length=4096)]


class _BroadcastOut(msgspec.Struct, frozen=True, array_like=True, tag=1):
    # Encoding twin of BroadcastChanges: pieces already encoded, spliced in as raw msgpack.
    v: int
    changesets: list[msgspec.Raw]


class _BroadcastRaw(msgspec.Struct, frozen=True, array_like=True, tag=1):
    # Decoding twin of BroadcastChanges: keeps each piece's bytes so a relay forwards them as received.
    v: ProtoVersion
    changesets: Annotated[list[msgspec.Raw], msgspec.Meta(max_length=4096)]


# --- sync -------------------------------------------------------------------------------------------------


class ActorNeed(msgspec.Struct, frozen=True, array_like=True):
    """Versions of ``actor`` below the requester's head that it has not got at all."""

    actor: ActorId
    ranges: Annotated[list[tuple[Version, Version]], msgspec.Meta(max_length=4096)]


class PartialNeed(msgspec.Struct, frozen=True, array_like=True):
    """A version the requester holds in part: the seq ranges it still misses."""

    actor: ActorId
    version: Version
    seqs: Annotated[list[tuple[Seq, Seq]], msgspec.Meta(max_length=64)]


class SyncState(msgspec.Struct, frozen=True, array_like=True):
    """What a sync client has and lacks; the server answers with what it has of the lacks.

    ``heads`` gives, per actor, the highest version the client knows of (complete or partial); the server
    sends the versions above it. ``complete`` says ``heads`` lists every actor the client knows, so an
    actor absent from it is unknown to the client and is served from version 1; a client that had to
    truncate its heads clears it, and the server then serves listed actors only. ``share = (i, n)``
    restricts the above-head part to actors with ``share_of(actor, n) == i`` (see
    :func:`verdigris.gossip.sync.share_of`), so ``n`` servers asked at once split that part between them.
    ``actor`` is the client's own actor, never served back to it.
    """

    actor: ActorId
    heads: Annotated[list[tuple[ActorId, Head]], msgspec.Meta(max_length=65_536)]
    needs: Annotated[list[ActorNeed], msgspec.Meta(max_length=65_536)]
    partials: Annotated[list[PartialNeed], msgspec.Meta(max_length=8192)]
    complete: bool = True
    share: tuple[Annotated[int, msgspec.Meta(ge=0, le=1023)], Annotated[int, msgspec.Meta(ge=1, le=1024)]] = (
        0,
        1,
    )


class SyncRequest(msgspec.Struct, frozen=True, array_like=True, tag=1):
    """Client → server, the first and only frame the client sends."""

    v: ProtoVersion
    state: SyncState


class SyncChanges(msgspec.Struct, frozen=True, array_like=True, tag=2):
    """Server → client: a chunk of changeset pieces."""

    v: ProtoVersion
    changesets: Annotated[list[Changeset], msgspec.Meta(max_length=65_536)]


class _SyncChangesOut(msgspec.Struct, frozen=True, array_like=True, tag=2):
    v: int
    changesets: list[msgspec.Raw]


class SyncEnd(msgspec.Struct, frozen=True, array_like=True, tag=3):
    """Server → client: the last frame. ``truncated``: the server stopped at its per-session limit, so
    some of what was asked may be left for the next sync."""

    v: ProtoVersion
    truncated: bool
    frames: Annotated[int, msgspec.Meta(ge=0, le=MAX_I64)]


class SyncReject(msgspec.Struct, frozen=True, array_like=True, tag=4):
    """Server → client instead of changes: busy, or the request was bad."""

    v: ProtoVersion
    reason: Reason


SyncMessage: TypeAlias = SyncRequest | SyncChanges | SyncEnd | SyncReject

_encoder = msgspec.msgpack.Encoder()
_piece_decoder = msgspec.msgpack.Decoder(Changeset)
_broadcast_decoder = msgspec.msgpack.Decoder(_BroadcastRaw)
_sync_decoder = msgspec.msgpack.Decoder(SyncMessage)
_BROADCAST_BYTE: Final = bytes([FAMILY_BROADCAST])
_SYNC_BYTE: Final = bytes([FAMILY_SYNC])
_LEN: Final = struct.Struct(">I")
_DECODE_ERRORS: Final = (msgspec.MsgspecError, ValueError, TypeError, OverflowError, RecursionError)


# --- checks beyond the schema -------------------------------------------------------------------------


def _sql_value_ok(v: Any) -> bool:
    t = type(v)
    if t is int:
        return bool(_MIN_I64 <= v <= MAX_I64)
    return v is None or t is str or t is bytes or t is float


def _int_ok(v: int, lo: int = 0) -> bool:
    return type(v) is int and lo <= v <= MAX_I64


def changeset_problem(cs: Changeset) -> str | None:
    """Why a decoded changeset must not reach the store, or None. Cheap checks only: the store itself
    refuses what does not fit its schema (unknown tables, columns, key arity)."""
    if len(cs.actor) != _ACTOR_LEN:
        return "actor id must be 16 bytes"
    if not _int_ok(cs.version, 1):
        return "version out of range"
    s, e = cs.seqs
    if not (_int_ok(s) and _int_ok(e) and _int_ok(cs.last_seq) and s <= e <= cs.last_seq):
        return "bad seq range"
    if not _int_ok(cs.ts, _MIN_I64):
        return "timestamp out of range"
    for ch in cs.changes:
        if ch.site_id != cs.actor or ch.db_version != cs.version:
            return "change does not belong to its changeset"
        if not (type(ch.seq) is int and s <= ch.seq <= e):
            return "change seq outside the changeset's range"
        if not (_int_ok(ch.col_version, 1) and _int_ok(ch.cl, 1)):
            return "column version or causal length out of range"
        if not _sql_value_ok(ch.val) or not all(_sql_value_ok(p) for p in ch.pk):
            return "value SQLite cannot hold"
        if not ch.pk or len(ch.pk) > 64:
            return "bad primary key"
    return None


def _check_changesets(changesets: Sequence[Changeset], error: type[WireError]) -> None:
    for cs in changesets:
        problem = changeset_problem(cs)
        if problem is not None:
            raise error(f"bad changeset: {problem}")


# --- broadcast encode/decode --------------------------------------------------------------------------


def encode_piece(cs: Changeset) -> bytes:
    """Encode one changeset piece for :func:`encode_broadcast` / :func:`encode_sync_changes`."""
    return _encoder.encode(cs)


def broadcast_overhead(pieces: int) -> int:
    """Bytes a broadcast payload adds around ``pieces`` encoded pieces (family byte, message header)."""
    # family byte + fixarray(3) header + tag + version + list header (1, 3 or 5 bytes)
    return 4 + (1 if pieces < 16 else 3 if pieces < 0x1_0000 else 5)


def encode_broadcast(pieces: Sequence[bytes]) -> bytes:
    """A broadcast datagram payload made of pieces from :func:`encode_piece`."""
    body = _encoder.encode(_BroadcastOut(PROTOCOL_VERSION, [msgspec.Raw(p) for p in pieces]))
    return _BROADCAST_BYTE + body


def decode_broadcast(payload: bytes | bytearray | memoryview) -> list[tuple[Changeset, bytes]]:
    """Decode a broadcast payload into ``(piece, its encoded bytes)`` pairs; raise
    :class:`BroadcastWireError` (and nothing else) if it is not a valid one."""
    n = len(payload)
    if n == 0:
        raise BroadcastWireError("empty payload")
    if n > MAX_DATAGRAM:
        raise BroadcastWireError(f"payload of {n} bytes exceeds {MAX_DATAGRAM}")
    view = memoryview(payload)
    if view[0] != FAMILY_BROADCAST:
        raise BroadcastWireError(f"not a broadcast payload (family {view[0]})")
    try:
        msg = _broadcast_decoder.decode(view[1:])
        if msg.v != PROTOCOL_VERSION:
            raise BroadcastWireError(f"unsupported protocol version {msg.v}")
        out = [(_piece_decoder.decode(raw), bytes(raw)) for raw in msg.changesets]
    except _DECODE_ERRORS as exc:
        raise BroadcastWireError(f"malformed broadcast: {exc}") from None
    _check_changesets([cs for cs, _ in out], BroadcastWireError)
    return out


# --- sync encode/decode -------------------------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    """Length-prefix one frame payload for the stream."""
    return _LEN.pack(len(payload)) + payload


def encode_sync(msg: SyncMessage) -> bytes:
    """A sync frame payload (family byte + message); wrap with :func:`frame` for the stream."""
    return _SYNC_BYTE + _encoder.encode(msg)


def encode_sync_changes(pieces: Sequence[bytes]) -> bytes:
    """A :class:`SyncChanges` frame payload made of pieces from :func:`encode_piece`."""
    return _SYNC_BYTE + _encoder.encode(_SyncChangesOut(PROTOCOL_VERSION, [msgspec.Raw(p) for p in pieces]))


def sync_changes_overhead(pieces: int) -> int:
    """Bytes a :class:`SyncChanges` payload adds around ``pieces`` encoded pieces."""
    return broadcast_overhead(pieces)


def decode_sync(payload: bytes | bytearray | memoryview) -> SyncMessage:
    """Decode one sync frame payload; raise :class:`SyncWireError` (and nothing else) if it is not a
    valid message of this version."""
    if len(payload) == 0:
        raise SyncWireError("empty frame")
    view = memoryview(payload)
    if view[0] != FAMILY_SYNC:
        raise SyncWireError(f"not a sync frame (family {view[0]})")
    try:
        msg: SyncMessage = _sync_decoder.decode(view[1:])
    except _DECODE_ERRORS as exc:
        raise SyncWireError(f"malformed sync frame: {exc}") from None
    if msg.v != PROTOCOL_VERSION:
        raise SyncWireError(f"unsupported protocol version {msg.v}")
    if isinstance(msg, SyncChanges):
        _check_changesets(msg.changesets, SyncWireError)
    elif isinstance(msg, SyncRequest):
        _check_state(msg.state)
    return msg


def _check_state(state: SyncState) -> None:
    index, count = state.share
    if index >= count:
        raise SyncWireError(f"bad share {index}/{count}")
    for need in state.needs:
        for s, e in need.ranges:
            if s > e:
                raise SyncWireError(f"bad version range {s}..{e}")
    for p in state.partials:
        for s, e in p.seqs:
            if s > e:
                raise SyncWireError(f"bad seq range {s}..{e}")


class FrameReader:
    """Cuts a byte stream into frame payloads. Holds at most one partial frame; a length above
    ``max_frame`` is refused as soon as its header arrives, before any of its bytes are buffered."""

    __slots__ = ("_buf", "_pos", "max_frame")

    def __init__(self, max_frame: int) -> None:
        if max_frame < 1:
            raise ValueError("max_frame must be >= 1")
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        """Add received bytes; return the payloads of the frames they complete."""
        self._buf += data
        out: list[bytes] = []
        buf = self._buf
        pos = self._pos
        while len(buf) - pos >= FRAME_HEADER:
            (n,) = _LEN.unpack_from(buf, pos)
            if n == 0:
                raise SyncWireError("empty frame")
            if n > self.max_frame:
                raise SyncWireError(f"frame of {n} bytes exceeds the limit of {self.max_frame}")
            if len(buf) - pos - FRAME_HEADER < n:
                break
            out.append(bytes(buf[pos + FRAME_HEADER : pos + FRAME_HEADER + n]))
            pos += FRAME_HEADER + n
        # Compact once the consumed prefix dominates, so the buffer stays about one frame long.
        if pos and pos * 2 >= len(buf):
            del buf[:pos]
            pos = 0
        self._pos = pos
        return out
