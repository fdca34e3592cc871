"""The control channel between the proxy's supervisor and each of its workers.

One ``socket.socketpair()`` per worker, created by the supervisor at spawn; the worker's end is passed
to the child process. Both sides speak length-prefixed frames: a 4-byte big-endian length, then that
many bytes of JSON (msgspec). The supervisor sends :class:`ControlRequest` (``id``, ``op``, ``args``),
the worker answers each with a :class:`ControlReply` carrying the same ``id``.

The worker serves requests *from its event loop* (:class:`ControlServer` is an asyncio reader, not a
thread), so an answer proves the loop runs. Every request the supervisor makes
(:meth:`ControlClient.call`) is bounded by a timeout and by a cap on outstanding requests; nothing on
either side waits on the other without a deadline.

Operations (the worker's handlers are in :mod:`verdigris.proxy.stats`):

- ``probe`` (``{"sent": <time.monotonic() of the supervisor>, "host": <optional>}``): answers
  ``{"lag": s, "route_us": us, "decision": str, "ready": bool}``; ``lag`` is how long the worker's loop
  took to get to the request (CLOCK_MONOTONIC is system-wide, so both processes share it), ``route_us``
  the time of one real routing decision (a host lookup and ``Balancer.choose_for_host`` without taking a
  slot).
- ``stats``: answers a :class:`~verdigris.proxy.stats.WorkerStats` snapshot (for metrics).
- ``stall`` / ``crash``: fault injection (:mod:`verdigris.proxy.watchdog`), only in a worker whose
  ``[proxy] fault_injection`` is on (``worker_main`` adds them with :func:`add_process_handlers`).

An unknown ``op`` or a handler that fails gets ``{"ok": false, "error": ...}``; a frame that cannot be
decoded (oversize, truncated, not JSON, not a request) raises :class:`FrameError` on the reading side,
which logs it and closes the channel — it never crashes the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable, Mapping
from typing import Any, Final, TypeVar

import msgspec

log = logging.getLogger("verdigris.proxy.control")

HEADER: Final = struct.Struct(">I")
MAX_FRAME: Final = 16 * 1024 * 1024
"""Largest frame accepted (a stats snapshot of a busy worker is a few hundred KiB at most)."""
MAX_PENDING: Final = 64
"""Outstanding requests per channel; beyond it :meth:`ControlClient.call` fails at once."""
MAX_WRITE_BUFFER: Final = 1024 * 1024
"""Bytes queued towards a peer that does not read (e.g. a stopped worker) before calls fail at once."""


class FrameError(Exception):
    """A frame that cannot be read: oversize, truncated, not JSON, or not the expected message."""


class ChannelClosed(Exception):
    """The peer closed the channel (cleanly, between frames)."""


class ControlError(Exception):
    """A request that failed: timed out, channel closed or busy, or the worker answered with an error."""


class ControlTimeout(ControlError):
    """The worker did not answer in time."""


class ControlRequest(msgspec.Struct, forbid_unknown_fields=True):
    id: int
    op: str
    args: dict[str, Any] = {}


class ControlReply(msgspec.Struct, forbid_unknown_fields=True):
    id: int
    ok: bool
    result: Any = None
    error: str | None = None


_encoder = msgspec.json.Encoder()
_request_decoder = msgspec.json.Decoder(ControlRequest)
_reply_decoder = msgspec.json.Decoder(ControlReply)

M = TypeVar("M", ControlRequest, ControlReply)


def encode_frame(message: ControlRequest | ControlReply) -> bytes:
    body = _encoder.encode(message)
    if len(body) > MAX_FRAME:
        raise FrameError(f"message of {len(body)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes, kind: type[M]) -> M:
    """Decode one frame's body as ``kind``; :class:`FrameError` says what is wrong."""
    decoder: Any = _request_decoder if kind is ControlRequest else _reply_decoder
    try:
        message: M = decoder.decode(body)
    except msgspec.ValidationError as e:
        raise FrameError(f"not a valid {kind.__name__}: {e}") from None
    except msgspec.DecodeError as e:
        raise FrameError(f"not JSON: {e} (starts {body[:32]!r})") from None
    return message


async def read_frame(reader: asyncio.StreamReader, max_frame: int = MAX_FRAME) -> bytes:
    """One frame's body. :class:`ChannelClosed` at a clean end of stream, :class:`FrameError` for an
    oversize length or a stream that ends inside a frame."""
    try:
        head = await reader.readexactly(HEADER.size)
    except asyncio.IncompleteReadError as e:
        if not e.partial:
            raise ChannelClosed("the peer closed the channel") from None
        raise FrameError(f"truncated frame: {len(e.partial)} of {HEADER.size} header bytes") from None
    (length,) = HEADER.unpack(head)
    if length > max_frame:
        raise FrameError(f"frame of {length} bytes exceeds the {max_frame}-byte limit")
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError as e:
        raise FrameError(f"truncated frame: {len(e.partial)} of {length} body bytes") from None


async def open_channel(sock: socket.socket) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Streams over one end of a socketpair (works with uvloop too)."""
    sock.setblocking(False)
    return await asyncio.open_unix_connection(sock=sock)


# ------------------------------------------------------------------------------------------------ worker side

Handler = Callable[[Mapping[str, Any]], Any]

_process_handlers: dict[str, Handler] = {}


def add_process_handlers(handlers: Mapping[str, Handler]) -> None:
    """Ops served by every :class:`ControlServer` created afterwards in this process (ops that need no
    worker state, e.g. fault injection); a server's own handlers take precedence."""
    _process_handlers.update(handlers)


class ControlServer:
    """The worker's end: reads requests on its event loop and answers each at once with ``handlers[op]``.

    ``on_close`` is called when the channel ends (the supervisor went away, or sent garbage)."""

    def __init__(
        self, sock: socket.socket, handlers: Mapping[str, Handler], on_close: Callable[[], None] | None = None
    ) -> None:
        self.sock = sock
        self.handlers = {**_process_handlers, **handlers}
        self.on_close = on_close
        self.served = 0
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            reader, self._writer = await open_channel(self.sock)
            while True:
                request = decode_body(await read_frame(reader), ControlRequest)
                reply = self.answer(request)
                try:
                    frame = encode_frame(reply)
                except (FrameError, TypeError, ValueError, msgspec.EncodeError) as e:
                    log.error("control op %s: cannot send its answer: %s", request.op, e)
                    frame = encode_frame(ControlReply(request.id, False, error=f"unencodable answer: {e}"))
                self._writer.write(frame)
                self.served += 1
        except ChannelClosed:
            pass
        except FrameError as e:
            log.error("control channel: %s; closing it", e)
        except (ConnectionError, OSError) as e:
            log.warning("control channel: %s", e)
        finally:
            if self._writer is not None:
                self._writer.close()
            if self.on_close is not None:
                self.on_close()

    def answer(self, request: ControlRequest) -> ControlReply:
        handler = self.handlers.get(request.op)
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return ControlReply(request.id, False, error=f"unknown op {request.op!r} (known: {known})")
        try:
            return ControlReply(request.id, True, result=handler(request.args))
        except Exception as e:
            log.exception("control op %s failed", request.op)
            return ControlReply(request.id, False, error=f"{type(e).__name__}: {e}")

    async def close(self) -> None:
        self.on_close = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


# ------------------------------------------------------------------------------------------------ supervisor side


class ControlClient:
    """The supervisor's end of one worker's channel: concurrent requests matched to replies by id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._pending: dict[int, asyncio.Future[ControlReply]] = {}
        self._next = 0
        self.closed: str | None = None
        """Why the channel is closed, once it is."""
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, sock: socket.socket) -> ControlClient:
        reader, writer = await open_channel(sock)
        return cls(reader, writer)

    async def _read(self) -> None:
        why = "closed by the worker"
        try:
            while True:
                reply = decode_body(await read_frame(self._reader), ControlReply)
                fut = self._pending.pop(reply.id, None)
                if fut is not None and not fut.done():
                    fut.set_result(reply)
                # else: the answer to a request that already timed out
        except ChannelClosed:
            pass
        except FrameError as e:
            why = str(e)
            log.error("control channel: %s; closing it", e)
        except (ConnectionError, OSError) as e:
            why = str(e)
        finally:
            self._shut(why)

    def _shut(self, why: str) -> None:
        if self.closed is None:
            self.closed = why
        self._writer.close()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(ControlError(f"control channel closed: {self.closed}"))
        self._pending.clear()

    async def call(self, op: str, args: dict[str, Any] | None = None, *, timeout: float) -> Any:
        """Send ``op`` and wait at most ``timeout`` seconds for the answer's ``result``."""
        if self.closed is not None:
            raise ControlError(f"control channel closed: {self.closed}")
        if len(self._pending) >= MAX_PENDING:
            raise ControlError(f"{len(self._pending)} requests already outstanding")
        transport = self._writer.transport
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            raise ControlError("the worker is not reading its control channel")
        self._next += 1
        rid = self._next
        fut: asyncio.Future[ControlReply] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            self._writer.write(encode_frame(ControlRequest(rid, op, args or {})))
            reply = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise ControlTimeout(f"{op}: no answer within {timeout:g} s") from None
        finally:
            self._pending.pop(rid, None)
        if not reply.ok:
            raise ControlError(f"{op}: {reply.error}")
        return reply.result

    async def close(self) -> None:
        self._shut("closed by the supervisor")
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


__all__ = [
    "MAX_FRAME",
    "ChannelClosed",
    "ControlClient",
    "ControlError",
    "ControlReply",
    "ControlRequest",
    "ControlServer",
    "ControlTimeout",
    "FrameError",
    "add_process_handlers",
    "decode_body",
    "encode_frame",
    "read_frame",
]
