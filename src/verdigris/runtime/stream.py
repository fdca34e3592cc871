"""Sealed byte streams: how a sync session's bytes cross TCP.

The sync protocol (:mod:`verdigris.gossip.sync`) is a plain byte-stream protocol with its own framing. This
module is the layer under it, and the only one that touches the socket: it cuts the protocol's bytes into
chunks, seals each chunk with the cluster's :class:`~verdigris.gossip.codec.PacketCodec` (the same AES-GCM
envelope as every datagram, so one keyring and one rotation cover both transports), and sends each as a
length-prefixed frame::

    frame      = length (u32 big-endian, ≤ MAX_FRAME) ‖ sealed packet
    plaintext  = session id (8 bytes) ‖ direction (1 byte) ‖ sequence number (u32) ‖ data

Why the header inside the seal: the codec stops forgery and replays of single packets, but a stream is a
*sequence*. The session id (random, chosen by the client; the server adopts it from the first frame), the
direction and a per-direction counter starting at 0 make every frame valid in exactly one place of exactly
one session, so frames cannot be reordered, dropped, reflected back at their sender or spliced in from
another session without the receiver noticing.

The client's first frame is a :class:`Hello` naming its node and gossip address, so that the server can
apply fault injection (and log) by peer address even though the TCP source port is ephemeral.

Every read and write has a timeout. Anything wrong (a frame over the limit, a frame that does not open, a
header out of place, a stall, a blocked peer) raises :class:`StreamError` with a short ``reason`` that the
runtime counts; the caller then drops the connection. Nothing here retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import time
from collections.abc import Callable
from typing import Annotated, Final

import msgspec

from verdigris.gossip.codec import DecodeError, PacketCodec

__all__ = [
    "HEADER",
    "MAX_FRAME",
    "SESSION_ID_SIZE",
    "TO_CLIENT",
    "TO_SERVER",
    "Hello",
    "SealedStream",
    "StreamError",
    "decode_hello",
    "encode_hello",
]

MAX_FRAME: Final = 64 * 1024
"""Largest sealed frame (length prefix excluded), sent or accepted."""
HEADER: Final = struct.Struct(">8sBI")
"""Session id, direction, sequence number: the start of every frame's plaintext."""
SESSION_ID_SIZE: Final = 8
TO_SERVER: Final = 0
TO_CLIENT: Final = 1
_LEN: Final = struct.Struct(">I")
_HELLO_VERSION: Final = 1


class StreamError(Exception):
    """The stream cannot go on. ``reason`` is short and machine-readable (a metrics label)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Hello(msgspec.Struct, frozen=True, array_like=True):
    """The client's first frame: who is calling (by node id and advertised gossip address)."""

    v: int
    node: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    host: Annotated[str, msgspec.Meta(min_length=1, max_length=253)]
    port: Annotated[int, msgspec.Meta(ge=1, le=65_535)]


_hello_decoder = msgspec.msgpack.Decoder(Hello)


def encode_hello(node: str, addr: tuple[str, int]) -> bytes:
    return msgspec.msgpack.encode(Hello(_HELLO_VERSION, node, addr[0], addr[1]))


def decode_hello(data: bytes) -> Hello:
    """The hello in ``data``; :class:`StreamError` ("bad_hello") for anything else."""
    try:
        hello = _hello_decoder.decode(data)
    except (msgspec.MsgspecError, ValueError, TypeError, RecursionError) as e:
        raise StreamError("bad_hello", str(e)) from None
    if hello.v != _HELLO_VERSION:
        raise StreamError("bad_hello", f"unsupported hello version {hello.v}")
    return hello


class SealedStream:
    """One TCP connection carrying sealed frames (see the module docstring).

    ``session`` is the session id for a client (8 random bytes) and ``None`` for a server, which adopts
    the id of the first frame it receives. ``sends`` is this end's direction (:data:`TO_SERVER` for a
    client). ``blocked``, when given, is asked before every read and write; when it answers True the
    stream fails with "blocked" (fault injection cuts running sessions, not just new ones). ``clock`` is
    the wall clock the codec needs; ``randbytes`` the nonce source.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        codec: PacketCodec,
        *,
        session: bytes | None,
        sends: int,
        io_timeout: float,
        blocked: Callable[[], bool] | None = None,
        clock: Callable[[], float] = time.time,
        randbytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        if session is not None and len(session) != SESSION_ID_SIZE:
            raise ValueError(f"session id must be {SESSION_ID_SIZE} bytes")
        if codec.max_packet > MAX_FRAME:
            raise ValueError(f"the codec's packets may exceed the {MAX_FRAME}-byte frame limit")
        self._reader = reader
        self._writer = writer
        self._codec = codec
        self._session = session
        self._sends = sends
        self._receives = TO_CLIENT if sends == TO_SERVER else TO_SERVER
        self._send_seq = 0
        self._recv_seq = 0
        self.io_timeout = io_timeout
        self.blocked = blocked
        self._clock = clock
        self._randbytes = randbytes
        self.max_chunk = codec.max_payload - HEADER.size
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def session(self) -> bytes | None:
        return self._session

    def _check_blocked(self) -> None:
        if self.blocked is not None and self.blocked():
            raise StreamError("blocked", "the peer is blocked by fault injection")

    async def send(self, data: bytes) -> None:
        """Seal and send ``data`` (in as many frames as it takes), then wait for the socket to drain."""
        if not data:
            return
        self._check_blocked()
        if self._session is None:
            raise StreamError("protocol", "a server cannot send before the client's first frame")
        view = memoryview(data)
        parts: list[bytes] = []
        for start in range(0, len(view), self.max_chunk):
            plain = (
                HEADER.pack(self._session, self._sends, self._send_seq) + view[start : start + self.max_chunk]
            )
            self._send_seq += 1
            packet = self._codec.seal(plain, self._clock(), self._randbytes(12))
            parts.append(_LEN.pack(len(packet)))
            parts.append(packet)
        payload = b"".join(parts)
        try:
            self._writer.write(payload)
            await asyncio.wait_for(self._writer.drain(), self.io_timeout)
        except TimeoutError:
            raise StreamError("timeout", "the peer stopped reading") from None
        except (ConnectionError, OSError) as e:
            raise StreamError("connection", str(e)) from None
        self.bytes_sent += len(payload)

    async def recv(self, timeout: float | None = None) -> bytes:
        """The data of the next frame; ``b""`` when the peer closed cleanly between frames.

        ``timeout`` bounds the wait for the whole frame (default ``io_timeout``).
        """
        self._check_blocked()
        limit = self.io_timeout if timeout is None else max(0.0, timeout)
        try:
            async with asyncio.timeout(limit):
                try:
                    head = await self._reader.readexactly(_LEN.size)
                except asyncio.IncompleteReadError as e:
                    if not e.partial:
                        return b""
                    raise StreamError("truncated", "the stream ended inside a frame header") from None
                (size,) = _LEN.unpack(head)
                if size > MAX_FRAME:
                    raise StreamError("too_large", f"frame of {size} bytes, limit {MAX_FRAME}")
                if size == 0:
                    raise StreamError("truncated", "empty frame")
                try:
                    packet = await self._reader.readexactly(size)
                except asyncio.IncompleteReadError:
                    raise StreamError("truncated", "the stream ended inside a frame") from None
        except TimeoutError:
            raise StreamError("timeout", f"nothing from the peer for {limit:.1f} s") from None
        except (ConnectionError, OSError) as e:
            raise StreamError("connection", str(e)) from None
        self._check_blocked()
        self.bytes_received += _LEN.size + size
        try:
            plain = self._codec.open(packet, self._clock())
        except DecodeError as e:
            raise StreamError(e.reason, e.detail) from None
        if len(plain) < HEADER.size:
            raise StreamError("bad_header", "frame shorter than its header")
        session, direction, seq = HEADER.unpack_from(plain)
        if direction != self._receives:
            raise StreamError("bad_header", "frame of the wrong direction (reflected?)")
        if self._session is None:
            if seq != 0:
                raise StreamError("bad_header", "the first frame must have sequence number 0")
            self._session = session
        elif session != self._session:
            raise StreamError("bad_header", "frame of another session")
        if seq != self._recv_seq:
            raise StreamError("bad_header", f"frame {seq} where {self._recv_seq} was due")
        self._recv_seq += 1
        return plain[HEADER.size :]

    def close(self) -> None:
        """Close the connection without waiting (idempotent)."""
        with contextlib.suppress(Exception):
            self._writer.close()

    async def aclose(self, timeout: float = 1.0) -> None:
        """Close and wait (bounded) for the transport to finish."""
        self.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), timeout)
