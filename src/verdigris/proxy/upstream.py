"""Connections to instances: a bounded pool of idle keep-alive connections per instance, and the reading
of one HTTP/1.1 response with ``httptools`` (head first, then the body as it arrives).

:class:`UpstreamConn` is the connection's asyncio Protocol itself (no streams): the bytes an instance
sends are fed to the response parser as they arrive (``data_received``), and the request's task waits on
one future only when what it needs (the head, more body, the end) has not arrived yet."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Final

import httptools

POOL_IDLE_TIMEOUT: Final = 4.0
"""Seconds an idle pooled connection is kept. Bounded so that an instance nobody sends requests to
really ends up with no connection (the machines agent's autostop looks for established connections,
docs/machines.md), and kept below the usual server-side keep-alive timeouts (5 s and up), so that a
connection the instance is about to close is rarely reused."""
READ_BUFFER_HIGH: Final = 256 * 1024
"""Bytes of a response body (or tunnel) received and not yet taken before the instance stops being read
(backpressure: the client is slower than the instance)."""


class UpstreamError(Exception):
    """The instance broke the exchange: ``kind`` is ``refused``, ``timeout`` or ``bad_response``."""

    def __init__(self, kind: str, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.kind = kind
        self.sent = sent
        """False when nothing of the request may have reached the instance (safe to retry)."""


class UpstreamConn(asyncio.Protocol):
    """One connection to an instance (its asyncio Protocol), with a response parser per exchange."""

    __slots__ = (
        "_body",
        "_buffered",
        "_can_write",
        "_clean",
        "_deadline",
        "_done",
        "_eof",
        "_error",
        "_expired",
        "_got_any",
        "_head_done",
        "_headers",
        "_loop",
        "_lost",
        "_parser",
        "_paused",
        "_stray",
        "_timer",
        "_tunnel",
        "_until_close",
        "_upgraded",
        "_waiter",
        "home",
        "idle_since",
        "instance_id",
        "keep_alive",
        "reusable",
        "reused",
        "status",
        "transport",
        "tunnel_data",
    )

    def __init__(self, instance_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.instance_id = instance_id
        self.transport: asyncio.Transport | None = None
        self.reused = False
        self.keep_alive = False
        self.status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._buffered = 0
        """Bytes in ``_body`` / ``_tunnel`` (reading pauses over ``READ_BUFFER_HIGH``)."""
        self._paused = False
        self._clean = False
        """The last exchange's answer ended where the parser found its end: the parser is reusable."""
        self._head_done = False
        self._done = False
        self._until_close = False
        self._got_any = False
        """Bytes of this exchange's answer have arrived."""
        self._stray = False
        """Bytes arrived that no request asked for (after a complete answer): never reused."""
        self._eof = False
        self._error: UpstreamError | None = None
        self._lost: OSError | None = None
        """Set once the connection is gone: what ``drain`` raises."""
        self._upgraded = False
        """A ``101`` head has been parsed: the bytes that follow are the tunnel's (``_tunnel``)."""
        self._tunnel: list[bytes] = []
        self._parser = httptools.HttpResponseParser(self)
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        self._can_write: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        """When the current wait expires (None: no wait armed; ``_timer`` may still be pending)."""
        self._expired = False
        self.idle_since = 0.0
        """Loop time it was put back in the pool (idle connections older than the pool's bound are closed)."""
        self.reusable = True
        """False for a connection that carried an Upgrade request: never returned to the pool."""
        self.tunnel_data: bytes | None = None
        """After a ``101 Switching Protocols`` head: the bytes that came with it (the tunnel's first)."""
        self.home: Callable[[UpstreamConn], None] | None = None
        """A dedicated connection's owner (a client connection of a ``connections`` app):
        :meth:`UpstreamPool.release` gives it back there, not to the pool, when it may be reused."""

    # ---------------------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport

    def data_received(self, data: bytes) -> None:
        if self._upgraded:
            self._tunnel.append(data)
            self._took(len(data))
        elif self._done or self._error is not None:
            self._stray = True  # nobody asked for these bytes (or the answer is already broken)
        else:
            self._got_any = True
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as e:  # a 101 head: what follows is not HTTP any more
                self._upgraded = True
                self.tunnel_data = data[e.args[0] :]
            except httptools.HttpParserError as e:
                self._error = UpstreamError(
                    "bad_response", f"instance {self.instance_id} sent invalid HTTP: {e}"
                )
            if self._buffered > READ_BUFFER_HIGH:
                self._pause()
        self._wake()

    def eof_received(self) -> bool | None:
        self._eof_seen()
        return True  # half-closed: the answer may still be read (closed by whoever holds it)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = exc if isinstance(exc, OSError) else ConnectionResetError("Connection lost")
        if exc is not None and self._error is None and not self._done and not self._expired:
            self._error = UpstreamError("bad_response", f"instance {self.instance_id}: {exc}")
        self._eof_seen()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        w = self._can_write
        if w is not None and not w.done():
            w.set_result(None)

    def pause_writing(self) -> None:
        if self._can_write is None or self._can_write.done():
            self._can_write = self._loop.create_future()

    def resume_writing(self) -> None:
        w = self._can_write
        if w is not None and not w.done():
            w.set_result(None)

    # ---------------------------------------------------------------------------- httptools callbacks

    def on_message_begin(self) -> None:
        if self._done:
            self._stray = True  # a second answer in the same read: never asked for

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._stray:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self._stray:
            return
        self._head_done = True
        self.status = status = self._parser.get_status_code()
        if status == 101:
            self._upgraded = True
        self._until_close = True
        for n, _ in self._headers:
            low = n.lower()
            if low == b"content-length" or low == b"transfer-encoding":
                self._until_close = False
                break

    def on_body(self, body: bytes) -> None:
        if not self._stray:
            self._body.append(body)
            self._buffered += len(body)

    def on_message_complete(self) -> None:
        if not self._stray:
            self._done = True
            self.keep_alive = self._parser.should_keep_alive()
            # the parser itself found the end (not a HEAD answer's head, a 1xx...): it can parse the
            # next answer on this connection as it is
            self._clean = self._head_done and self.status >= 200 and not self._upgraded

    # ---------------------------------------------------------------------------- plumbing

    def _eof_seen(self) -> None:
        if self._eof:
            return
        self._eof = True
        if self._head_done and not self._done and self._until_close and self._error is None:
            self._done = True  # EOF ends a close-delimited body
            self.keep_alive = False
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def _took(self, n: int) -> None:
        self._buffered += n
        if self._buffered > READ_BUFFER_HIGH:
            self._pause()

    def _pause(self) -> None:
        if not self._paused and self.transport is not None and not self._eof:
            self._paused = True
            self.transport.pause_reading()

    def _taken(self) -> None:
        self._buffered = 0
        if self._paused:
            self._paused = False
            if self.transport is not None and not self._eof:
                self.transport.resume_reading()

    async def _wait(self, timeout: float) -> None:
        """Until something arrives (bytes, the end, an error) or ``timeout``: then the connection is
        aborted and :class:`UpstreamError` ``timeout`` raised."""
        loop = self._loop
        # one timer per connection, re-armed lazily (a timer per read costs a TimerHandle and a cancel)
        self._deadline = deadline = loop.time() + timeout
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = loop.call_at(deadline, self._fire)
        self._waiter = waiter = loop.create_future()
        try:
            await waiter
        finally:
            self._deadline = None
            self._waiter = None
        if self._expired:
            raise self._timeout()

    def _fire(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self._eof:
            return
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._fire)
            return
        self._expired = True
        if self.transport is not None:
            self.transport.abort()  # never used again
        self._wake()

    def _timeout(self) -> UpstreamError:
        return UpstreamError("timeout", f"instance {self.instance_id} did not answer in time")

    # ---------------------------------------------------------------------------- the exchange

    @property
    def writer(self) -> UpstreamConn:
        """The writing side (``write`` / ``drain`` / ``close``): the connection itself."""
        return self

    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    @property
    def write_paused(self) -> bool:
        return self._can_write is not None and not self._can_write.done()

    async def drain(self) -> None:
        """Until the instance's socket takes more. Like ``StreamWriter.drain``: the error the connection
        was lost with, or ``ConnectionResetError`` once it is lost."""
        if self._lost is not None:
            raise self._lost
        if self.transport is not None and self.transport.is_closing():
            await asyncio.sleep(0)  # connection_lost may be due
        w = self._can_write
        if w is not None and not w.done():
            await w
        if self._lost is not None:
            raise self._lost

    @property
    def done(self) -> bool:
        """The response has been read to its end (its body may still be buffered here)."""
        return self._done

    @property
    def usable(self) -> bool:
        # bytes that arrived on an idle connection were never asked for (a stray second response):
        # reading them as the next request's answer would hand one client another's response
        t = self.transport
        return (
            t is not None
            and not t.is_closing()
            and not self._eof
            and not self._stray
            and not self._upgraded  # a 101 answer: no more HTTP on it
        )

    def start_exchange(self) -> None:
        if not self._clean:  # else the parser ended a message and waits for the next: kept
            self._parser = httptools.HttpResponseParser(self)
        self._clean = False
        self._headers, self._body = [], []
        self._buffered = 0
        self._head_done = self._done = self._until_close = self._got_any = False
        self.status = 0
        self.keep_alive = False

    def complete_body(self, *, head_only: bool = False) -> list[bytes] | None:
        """The whole body when it has already arrived (the exchange is then complete), else None (read
        it with :meth:`body`). A synchronous fast path: no async generator per response."""
        if head_only or self.status in (204, 304) or 100 <= self.status < 200:
            self.keep_alive = self.keep_alive and self._done
            self._done = True
            return []
        if not self._done or self._error is not None:
            return None
        chunks, self._body = self._body, []
        self._taken()
        return chunks

    async def read_head(self, timeout: float) -> list[tuple[bytes, bytes]]:
        while not self._head_done:
            if self._error is not None:
                raise self._error
            if self._expired:
                raise self._timeout()
            if self._eof:
                raise UpstreamError(
                    "bad_response",
                    f"instance {self.instance_id} closed the connection before answering",
                    sent=self._got_any or not self.reused,
                )
            await self._wait(timeout)
        return self._headers

    async def body(self, timeout: float, *, head_only: bool = False) -> AsyncIterator[bytes]:
        """The response body as it arrives; the exchange is complete when the iterator ends."""
        if head_only or self.status in (204, 304) or 100 <= self.status < 200:
            self.keep_alive = self.keep_alive and self._done
            self._done = True
            return
        while True:
            if self._error is not None:
                raise self._error
            if self._body:
                chunks, self._body = self._body, []
                self._taken()
                for c in chunks:
                    yield c
                continue
            if self._done:
                return
            if self._expired:
                raise self._timeout()
            if self._eof:
                raise UpstreamError("bad_response", f"instance {self.instance_id} closed mid-response")
            await self._wait(timeout)

    async def read_tunnel(self) -> bytes:
        """After a ``101``: the next bytes the instance sends (``b""`` once it has closed)."""
        while not self._tunnel:
            if self._eof or self._expired:
                return b""
            waiter = self._waiter = self._loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        data = b"".join(self._tunnel)
        self._tunnel.clear()
        self._taken()
        return data

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            t.close()


class UpstreamPool:
    """Idle keep-alive connections per instance, at most ``max_idle`` each (the oldest closed first)."""

    def __init__(
        self, max_idle: int, connect_timeout: float, idle_timeout: float = POOL_IDLE_TIMEOUT
    ) -> None:
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self._idle: dict[str, deque[UpstreamConn]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        """One timer for the whole pool (not one per connection): closes connections idle too long."""
        self.connects = 0
        self.reuses = 0

    async def acquire(self, instance_id: str, host: str, port: int) -> UpstreamConn:
        idle = self._idle.get(instance_id)
        while idle:
            conn = idle.pop()
            if conn.usable:
                conn.reused = True
                self.reuses += 1
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: UpstreamConn(instance_id, loop), host, port),
                self.connect_timeout,
            )
        except TimeoutError:
            raise UpstreamError(
                "connect_timeout", f"connecting to instance {instance_id} timed out", sent=False
            ) from None
        except OSError as e:
            raise UpstreamError(
                "refused", f"instance {instance_id} refused the connection: {e.strerror or e}", sent=False
            ) from None
        self.connects += 1
        return conn

    def release(self, conn: UpstreamConn) -> None:
        """Keep ``conn`` for reuse if its exchange ended cleanly with keep-alive, else close it."""
        ok = conn.keep_alive and conn._done and conn.usable and conn.reusable
        if not (ok and (self.max_idle > 0 or conn.home is not None)):
            conn.close()
            return
        if conn.home is not None:
            conn.home(conn)
            return
        idle = self._idle.setdefault(conn.instance_id, deque())
        conn.idle_since = conn._loop.time()
        idle.append(conn)
        while len(idle) > self.max_idle:
            idle.popleft().close()
        if self._sweeper is None:
            self._sweeper = conn._loop.call_later(self.idle_timeout, self._sweep, conn._loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the connections idle for ``idle_timeout`` or more (the oldest are on the left)."""
        self._sweeper = None
        limit = loop.time() - self.idle_timeout
        oldest: float | None = None
        for instance_id in list(self._idle):
            idle = self._idle[instance_id]
            while idle and idle[0].idle_since <= limit:
                idle.popleft().close()
            if not idle:
                del self._idle[instance_id]
            elif oldest is None or idle[0].idle_since < oldest:
                oldest = idle[0].idle_since
        if oldest is not None:
            self._sweeper = loop.call_later(max(0.05, oldest - limit), self._sweep, loop)

    def drop_instance(self, instance_id: str) -> None:
        for conn in self._idle.pop(instance_id, ()):
            conn.close()

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


__all__ = ["UpstreamConn", "UpstreamError", "UpstreamPool"]
