"""Connections to instances: a bounded pool of idle keep-alive connections per instance, and the reading
of one HTTP/1.1 response with ``httptools`` (head first, then the body as it arrives)."""

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


class UpstreamError(Exception):
    """The instance broke the exchange: ``kind`` is ``refused``, ``timeout`` or ``bad_response``."""

    def __init__(self, kind: str, message: str, *, sent: bool = True) -> None:
        super().__init__(message)
        self.kind = kind
        self.sent = sent
        """False when nothing of the request may have reached the instance (safe to retry)."""


class UpstreamConn:
    """One connection to an instance, with a response parser per exchange."""

    __slots__ = (
        "_body",
        "_done",
        "_expired",
        "_head_done",
        "_headers",
        "_loop",
        "_parser",
        "_until_close",
        "home",
        "idle_since",
        "instance_id",
        "keep_alive",
        "reader",
        "reusable",
        "reused",
        "status",
        "tunnel_data",
        "writer",
    )

    def __init__(self, instance_id: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.instance_id = instance_id
        self.reader = reader
        self.writer = writer
        self.reused = False
        self.keep_alive = False
        self.status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._head_done = False
        self._done = False
        self._until_close = False
        self._parser = httptools.HttpResponseParser(self)
        self._loop = asyncio.get_running_loop()
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

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._head_done = True
        self.status = self._parser.get_status_code()
        self._until_close = True
        for n, _ in self._headers:
            low = n.lower()
            if low == b"content-length" or low == b"transfer-encoding":
                self._until_close = False
                break

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._done = True
        self.keep_alive = self._parser.should_keep_alive()

    @property
    def done(self) -> bool:
        """The response has been read to its end (its body may still be buffered here)."""
        return self._done

    @property
    def usable(self) -> bool:
        # bytes already waiting on an idle connection were never asked for (a stray second response):
        # reading them as the next request's answer would hand one client another's response
        return (
            not self.writer.is_closing()
            and not self.reader.at_eof()
            and not getattr(self.reader, "_buffer", b"")
        )

    def start_exchange(self) -> None:
        self._parser = httptools.HttpResponseParser(self)
        self._headers, self._body = [], []
        self._head_done = self._done = self._until_close = False
        self.status = 0
        self.keep_alive = False

    def _expire(self) -> None:
        self._expired = True
        self.writer.transport.abort()  # the pending read ends (the connection is never used again)

    async def _feed(self, timeout: float) -> bool:
        reader = self.reader
        expiry = None
        if not getattr(reader, "_buffer", b""):
            # a plain timer that aborts the connection: wait_for / asyncio.timeout cost a task or two
            # getpid syscalls per read on 3.11
            expiry = self._loop.call_later(timeout, self._expire)
        try:
            data = await reader.read(65536)
        except OSError as e:
            if self._expired:
                raise self._timeout() from None
            raise UpstreamError("bad_response", f"instance {self.instance_id}: {e}") from None
        finally:
            if expiry is not None:
                expiry.cancel()
        if self._expired:
            raise self._timeout()
        if not data:
            if self._head_done and not self._done and self._until_close:
                self._done = True  # EOF ends a close-delimited body
                self.keep_alive = False
            return False
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:  # a 101 head: what follows is not HTTP any more
            self.tunnel_data = data[e.args[0] :]
        except httptools.HttpParserError as e:
            raise UpstreamError(
                "bad_response", f"instance {self.instance_id} sent invalid HTTP: {e}"
            ) from None
        return True

    def _timeout(self) -> UpstreamError:
        return UpstreamError("timeout", f"instance {self.instance_id} did not answer in time")

    def complete_body(self, *, head_only: bool = False) -> list[bytes] | None:
        """The whole body when it has already arrived (the exchange is then complete), else None (read
        it with :meth:`body`). A synchronous fast path: no async generator per response."""
        if head_only or self.status in (204, 304) or 100 <= self.status < 200:
            self.keep_alive = self.keep_alive and self._done
            self._done = True
            return []
        if not self._done:
            return None
        chunks, self._body = self._body, []
        return chunks

    async def read_head(self, timeout: float) -> list[tuple[bytes, bytes]]:
        got_any = False
        while not self._head_done:
            if not await self._feed(timeout):
                raise UpstreamError(
                    "bad_response",
                    f"instance {self.instance_id} closed the connection before answering",
                    sent=got_any or not self.reused,
                )
            got_any = True
        return self._headers

    async def body(self, timeout: float, *, head_only: bool = False) -> AsyncIterator[bytes]:
        """The response body as it arrives; the exchange is complete when the iterator ends."""
        if head_only or self.status in (204, 304) or 100 <= self.status < 200:
            self.keep_alive = self.keep_alive and self._done
            self._done = True
            return
        while True:
            if self._body:
                chunks, self._body = self._body, []
                for c in chunks:
                    yield c
            if self._done:
                return
            if not await self._feed(timeout):
                if self._body:
                    continue
                if not self._done:
                    raise UpstreamError("bad_response", f"instance {self.instance_id} closed mid-response")

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()


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
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, limit=65536), self.connect_timeout
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
        return UpstreamConn(instance_id, reader, writer)

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
