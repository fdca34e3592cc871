"""Wire format of the SWIM membership protocol.

A datagram is one version byte followed by one msgpack-encoded :class:`Packet`. Every packet names its
cluster (so two clusters sharing a network never merge), its sender and the sender's incarnation, carries
at most one control message (:class:`Ping`, :class:`Ack`, :class:`PingReq`, :class:`Nack`,
:class:`Announce`, :class:`Feed`) and piggybacks any number of membership updates (:class:`Alive`,
:class:`Suspect`, :class:`Dead`, :class:`Left`). Structs are encoded as msgpack arrays with a small integer
tag, which keeps a typical update around 20–40 bytes so a 1,200-byte datagram carries dozens of them.

Updates are encoded once, when they enter the broadcast queue, and spliced into each packet as raw bytes
(:func:`encode_head` + :func:`assemble`), so the hot path never re-encodes them and the core can count
bytes exactly before it builds a datagram.

Decoding never raises anything but :class:`DecodeError`: datagrams come from the network and the
membership core must count and drop garbage, not crash on it. Every field is bounded by the schema
(string lengths, integer ranges, list lengths), so a decoded packet is safe to act on.

The bytes here are plaintext. Encryption (an AES-GCM keyring, as memberlist does it) belongs to an
envelope layer that wraps these bytes; the core reserves room for its overhead (see
``Limits.envelope_reserve`` in :mod:`verdigris.gossip.membership`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Final, TypeAlias

import msgspec

__all__ = [
    "MAX_DATAGRAM",
    "PROTOCOL_VERSION",
    "Ack",
    "Alive",
    "Announce",
    "Control",
    "Dead",
    "DecodeError",
    "Feed",
    "Left",
    "Nack",
    "Packet",
    "Ping",
    "PingReq",
    "Suspect",
    "Update",
    "assemble",
    "decode_packet",
    "encode_checked",
    "encode_head",
    "encode_packet",
    "encode_update",
]

PROTOCOL_VERSION: Final = 1
"""First byte of every datagram. A node drops datagrams of any other version (counted as bad packets)."""

MAX_DATAGRAM: Final = 65_507
"""The largest UDP payload; anything longer cannot have come off the wire and is rejected unread."""

NodeId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
ClusterId = Annotated[str, msgspec.Meta(max_length=64)]
Seq = Annotated[int, msgspec.Meta(ge=0, le=0xFFFF_FFFF)]
Incarnation = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Host = Annotated[str, msgspec.Meta(min_length=1, max_length=253)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65_535)]
MetaKey = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
MetaValue = Annotated[str, msgspec.Meta(max_length=256)]
Metadata = Annotated[dict[MetaKey, MetaValue], msgspec.Meta(max_length=16)]


class DecodeError(Exception):
    """A datagram that is not a valid packet of this protocol version and cluster."""


# --- control messages (at most one per packet) ---------------------------------------------------------


class Ping(msgspec.Struct, frozen=True, array_like=True, gc=False, tag=1):
    """Are you alive? ``target`` is the id the prober believes lives at this address."""

    seq: Seq
    target: NodeId


class Ack(msgspec.Struct, frozen=True, array_like=True, gc=False, tag=2):
    """Answer to a :class:`Ping`, or one relayed by an indirect prober for a :class:`PingReq`."""

    seq: Seq


class PingReq(msgspec.Struct, frozen=True, array_like=True, gc=False, tag=3):
    """Ask the receiver to ping ``target`` for us and relay the ack (SWIM's indirect probe).

    ``nack`` asks for a :class:`Nack` if the target does not answer in time (Lifeguard), which tells the
    requester that the relay itself is reachable, so a silent probe is less likely to be its own fault.
    """

    seq: Seq
    target: NodeId
    host: Host
    port: Port
    nack: bool


class Nack(msgspec.Struct, frozen=True, array_like=True, gc=False, tag=4):
    """The relay of a :class:`PingReq` did not hear from the target within its timeout."""

    seq: Seq


class Announce(msgspec.Struct, frozen=True, array_like=True, gc=False, tag=5):
    """Tell me who is in the cluster; answered by one (or, when ``full``, several) :class:`Feed` packets."""

    seq: Seq
    full: bool


class Feed(msgspec.Struct, frozen=True, array_like=True, gc=False, tag=6):
    """Answer to :class:`Announce`; the member records travel as the packet's updates."""

    seq: Seq


# --- membership updates (piggybacked) ---------------------------------------------------------------------


class Alive(msgspec.Struct, frozen=True, array_like=True, gc=False, tag=16):
    """``node`` is alive at ``incarnation``, reachable at ``host:port``, with this metadata."""

    node: NodeId
    incarnation: Incarnation
    host: Host
    port: Port
    meta: Metadata


class Suspect(msgspec.Struct, frozen=True, array_like=True, gc=False, tag=17):
    """``by`` failed to reach ``node`` at ``incarnation``; ``by`` counts as one independent confirmation."""

    node: NodeId
    incarnation: Incarnation
    by: NodeId


class Dead(msgspec.Struct, frozen=True, array_like=True, gc=False, tag=18):
    """``by`` declared ``node`` dead at ``incarnation`` (its suspicion timed out)."""

    node: NodeId
    incarnation: Incarnation
    by: NodeId


class Left(msgspec.Struct, frozen=True, array_like=True, gc=False, tag=19):
    """``node`` left the cluster gracefully at ``incarnation``."""

    node: NodeId
    incarnation: Incarnation


Control: TypeAlias = Ping | Ack | PingReq | Nack | Announce | Feed
Update: TypeAlias = Alive | Suspect | Dead | Left


class Packet(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """One datagram's content. ``updates`` is last so encoded updates can be appended as raw bytes."""

    cluster: ClusterId
    sender: NodeId
    incarnation: Incarnation
    msg: Control | None
    updates: Annotated[list[Update], msgspec.Meta(max_length=4096)]


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Packet)
_VERSION_BYTE: Final = bytes([PROTOCOL_VERSION])
_EMPTY_ARRAY: Final = 0x90


def encode_update(update: Update) -> bytes:
    """Encode one update for the broadcast queue (spliced into packets later by :func:`assemble`)."""
    return _encoder.encode(update)


def encode_checked(update: Update) -> bytes:
    """Encode an update we originate, checking it against the same bounds a receiver enforces.

    Raises ``ValueError`` when it would be rejected on arrival (an id too long, too much metadata...),
    so a misconfigured node fails at start-up instead of being silently ignored by the whole cluster.
    """
    data = _encoder.encode(update)
    try:
        msgspec.msgpack.decode(data, type=type(update))
    except msgspec.ValidationError as exc:
        raise ValueError(f"invalid {type(update).__name__}: {exc}") from None
    return data


def encode_head(cluster: str, sender: str, incarnation: int, msg: Control | None) -> bytes:
    """Encode everything of a packet but its updates; ``len(head) + 5`` bounds the packet's overhead."""
    body = _encoder.encode(Packet(cluster, sender, incarnation, msg, []))
    # The empty update list is the last byte (fixarray 0x90); drop it so assemble() can put the real one.
    assert body[-1] == _EMPTY_ARRAY
    return _VERSION_BYTE + body[:-1]


def assemble(head: bytes, updates: Sequence[bytes]) -> bytes:
    """Join a head from :func:`encode_head` with encoded updates into one datagram."""
    n = len(updates)
    if n < 16:
        prefix = bytes([_EMPTY_ARRAY | n])
    elif n < 0x1_0000:
        prefix = b"\xdc" + n.to_bytes(2, "big")
    else:
        prefix = b"\xdd" + n.to_bytes(4, "big")
    return b"".join((head, prefix, *updates))


def encode_packet(
    cluster: str, sender: str, incarnation: int, msg: Control | None, updates: Sequence[Update] = ()
) -> bytes:
    """Encode a whole packet in one call (tests and tools; the core uses the two-step form)."""
    return assemble(encode_head(cluster, sender, incarnation, msg), [encode_update(u) for u in updates])


def decode_packet(data: bytes | bytearray | memoryview, cluster: str) -> Packet:
    """Decode one datagram of ``cluster``; raise :class:`DecodeError` (and nothing else) if it is not one."""
    n = len(data)
    if n == 0:
        raise DecodeError("empty datagram")
    if n > MAX_DATAGRAM:
        raise DecodeError(f"datagram of {n} bytes exceeds {MAX_DATAGRAM}")
    view = memoryview(data)
    if view[0] != PROTOCOL_VERSION:
        raise DecodeError(f"unsupported protocol version {view[0]}")
    try:
        packet = _decoder.decode(view[1:])
    except (msgspec.MsgspecError, ValueError, TypeError, OverflowError, RecursionError) as exc:
        raise DecodeError(f"malformed packet: {exc}") from None
    if packet.cluster != cluster:
        raise DecodeError(f"packet for cluster {packet.cluster!r}, not {cluster!r}")
    return packet
