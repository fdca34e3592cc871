"""The proxy's HTTP server: an asyncio Protocol per client connection, parsing HTTP/1.1 with ``httptools``,
routing each request with the sans-IO core (:mod:`~verdigris.proxy.balance`,
:mod:`~verdigris.proxy.replay`) and forwarding it over pooled upstream connections
(:mod:`~verdigris.proxy.upstream`). One :class:`Worker` per process; :mod:`verdigris.proxy.worker` runs
several accepting from one listening socket that the supervisor binds (:func:`bind_listener`) and hands
to each of them. See docs/proxy.md, "The server".
"""

from __future__ import annotations

import asyncio
import http
import logging
import os
import random
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from typing import Final

import httptools

from verdigris.proxy.balance import (
    ANY_REGION,
    ROUTING_HEADERS,
    Balancer,
    Forward,
    LoadTracker,
    Queue,
    Route,
    RouteRequest,
    Slot,
)
from verdigris.proxy.config import ProxyConfig
from verdigris.proxy.control import ControlServer
from verdigris.proxy.errors import ErrorCode, Reject
from verdigris.proxy.feed import TableFeed
from verdigris.proxy.forward import EXCLUDE_HEADER, PEER_RESPONSE_HEADERS, Forwarder, ForwardFailed, Remote
from verdigris.proxy.replay import (
    REPLAY_FAILED_HEADER,
    REPLAY_HEADER,
    REPLAY_SRC_HEADER,
    Deliver,
    ReadReplayBody,
    ReplaySession,
    Responder,
)
from verdigris.proxy.shared_load import SharedLoad, SharedLoadHandle, SharedLoadTracker
from verdigris.proxy.stats import RequestCounters, probe, snapshot
from verdigris.proxy.table import Instance, RoutingTable, make_lock
from verdigris.proxy.upstream import UpstreamConn, UpstreamError, UpstreamPool
from verdigris.proxy.wake import Waker

log = logging.getLogger("verdigris.proxy")

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
"""Headers never passed on as is (framing is re-created for each side)."""
BODY_BUFFER_HIGH: Final = 256 * 1024
"""Bytes of a client's request body queued before the socket stops being read (backpressure)."""
SEND_JOIN_MAX: Final = 4096
"""Bytes up to which the pieces of a response are joined before one ``write``; larger: ``writelines``."""
RELEASE_POLL: Final = 0.005
"""Seconds between looks at the other workers' releases while requests wait for a slot."""
RELEASE_POLLS_FORCED: Final = 20
"""Waiters choose again after this many polls even if nothing was released (a lock timeout, see
:mod:`~verdigris.proxy.shared_load`)."""


class ClientGone(Exception):
    """The client closed the connection or sent something unparsable mid-request. ``error``: the answer
    still owed to the client (no response started yet), e.g. a 400 for a malformed chunked body."""

    def __init__(self, message: str, error: tuple[int, str, str] | None = None) -> None:
        super().__init__(message)
        self.error = error


@dataclass(eq=False, slots=True)
class Held:
    """The slot a client connection holds on an instance of a ``connections`` app (for as long as the
    client connection lasts), and its dedicated upstream connection while idle between requests."""

    instance: Instance
    slot: Slot
    conn: UpstreamConn | None = None
    dropped: bool = False

    def give_back(self, conn: UpstreamConn) -> None:
        """``UpstreamConn.home``: a reusable dedicated connection after an exchange."""
        if self.dropped or self.conn is not None:
            conn.close()
        else:
            self.conn = conn


class _TooLarge(Exception):
    """Raised from a parser callback to stop parsing a request line (414) or head (431) over its limit."""


def _upgrade_problem(method: bytes, headers: list[tuple[bytes, bytes]]) -> str | None:
    """Why an Upgrade (or CONNECT) request cannot be tunnelled, or None: only ``Upgrade: websocket``
    (one token, any case) is; ``h2c`` never is (HTTP/2 is not spoken here)."""
    if method == b"CONNECT":
        return "CONNECT is not supported"
    value = b", ".join(v for n, v in headers if n == b"upgrade")
    tokens = [t.strip().lower() for t in value.split(b",") if t.strip()]
    if tokens == [b"websocket"]:
        return None
    shown = value.decode("latin-1")
    if any(t.split(b"/")[0] == b"h2c" for t in tokens):
        return f"h2c upgrades are not tunnelled (Upgrade: {shown})"
    return f"only 'Upgrade: websocket' is tunnelled, not {shown!r}"


@dataclass
class Request:
    method: bytes
    url: bytes
    version: str
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    content_length: int | None
    chunked: bool
    body_done: bool = False
    host: str = ""
    rid: str = ""
    extra: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    """When the head was parsed (for the latency histogram)."""
    status: int = 0
    """The status sent to the client (0: none yet); ``app`` and ``region`` that answered, for metrics."""
    app: str = ""
    region: str = ""
    upgrade: bytes = b""
    """A WebSocket upgrade request: the Upgrade value to send on (its bytes after the head arrive as
    "body" events after "end"); empty for an ordinary request."""
    forwarded: int = 0
    """Hops of a request another region's proxy forwarded here (authenticated; 0: a client's)."""
    instance: str = ""
    """The local instance it was sent to (named to a peer in the answer)."""

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)


# ------------------------------------------------------------------------------------------------ client side


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests into an event queue that :meth:`_serve` consumes in order."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.events: deque[tuple[str, object]] = deque()
        self._wakeup: asyncio.Future[None] | None = None
        self._can_write: asyncio.Future[None] | None = None
        self._queued_body = 0
        self._paused = False
        self._headers: list[tuple[bytes, bytes]] = []
        self._url = b""
        self._head_bytes = 0
        self._in_head = False
        self._too_large: tuple[int, str, str] | None = None
        self._fields_bytes = 0
        self.upgraded = False
        """The parser is done: every byte now received is tunnelled (pushed as "body" events)."""
        self._tunnel_ok = False
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        """When the armed timeout (``_why``) expires; None: disarmed (``_timer`` may still be pending)."""
        self._why = ""
        self.loop: asyncio.AbstractEventLoop | None = None
        """Kept from connection_made: on 3.11 ``asyncio.get_running_loop()`` costs a getpid syscall."""
        self.busy = False
        self.closed = False
        self.peer_ip = ""
        self.local_port = 0
        self._task: asyncio.Task[None] | None = None
        self.held: dict[str, Held] = {}
        """App -> the slot this connection holds, for ``connections`` apps (released when it ends)."""

    # ---------------------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not an asyncio.Transport
        self.loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self.peer_ip = str(peer[0]) if peer else ""
        self.local_port = int(local[1]) if local else 0
        self.worker.connections.add(self)
        self._arm(self.worker.config.timeouts.idle, "idle")
        self._task = self.loop.create_task(self._serve())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.worker.connections.discard(self)
        self._disarm()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._push("closed", None)
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)

    def pause_writing(self) -> None:
        if self._can_write is None or self._can_write.done():
            assert self.loop is not None
            self._can_write = self.loop.create_future()

    def resume_writing(self) -> None:
        if self._can_write is not None and not self._can_write.done():
            self._can_write.set_result(None)

    def data_received(self, data: bytes) -> None:
        if self.upgraded:
            self.on_body(data)
            return
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
            if self._in_head and self._deadline is None:
                # armed only for a head that did not arrive in one read (the usual case costs no timer)
                self._arm(self.worker.config.timeouts.header_read, "header_read")
        except httptools.HttpParserUpgrade as e:
            # the head of an upgrade request has been pushed (or refused in on_headers_complete): what
            # follows it is the tunnel's, never parsed as HTTP
            self.upgraded = True
            rest = data[e.args[0] :]
            if self._tunnel_ok and rest:
                self.on_body(rest)
        except httptools.HttpParserError as e:
            if self._too_large is not None:
                self._push("error", self._too_large)
            else:
                self._push("error", (400, "bad_request", f"malformed request: {e}"))
            self._stop_reading()
        else:
            if self._in_head and self._head_bytes > self.worker.config.max_header_bytes:
                self._push("error", (431, "headers_too_large", "request headers too large"))
                self._stop_reading()

    # ---------------------------------------------------------------------------- httptools callbacks

    def on_message_begin(self) -> None:
        self._headers = []
        self._url = b""
        self._in_head = True
        self._head_bytes = 0
        self._fields_bytes = 0
        self._disarm()  # not idle any more; data_received arms header_read if the head is incomplete

    def on_url(self, url: bytes) -> None:
        self._url += url
        # method SP url SP HTTP/x.y (llhttp has parsed the method by now)
        if len(self._url) + len(self.parser.get_method()) + 10 > self.worker.config.max_request_line_bytes:
            self._too_large = (414, "uri_too_long", "request line too long")
            raise _TooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))
        # counted here too: data_received counts only what arrives once the head has begun
        self._fields_bytes += len(name) + len(value) + 4
        if self._fields_bytes + len(self._url) > self.worker.config.max_header_bytes:
            self._too_large = (431, "headers_too_large", "request headers too large")
            raise _TooLarge

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm()
        # the byte count in data_received misses a head that arrives in one piece: count it exactly here
        size = len(self._url) + sum(len(n) + len(v) + 4 for n, v in self._headers)
        if size > self.worker.config.max_header_bytes:
            self._push("error", (431, "headers_too_large", "request headers too large"))
            self._stop_reading()
            return
        p = self.parser
        upgrade = b""
        if p.should_upgrade():
            problem = _upgrade_problem(p.get_method(), self._headers)
            if problem is not None:
                self._push("error", (501, "upgrade_not_supported", problem))
                self._stop_reading()
                return
            upgrade = b"websocket"
            self._tunnel_ok = True
        length: int | None = None
        chunked = False
        for name, value in self._headers:
            if name == b"content-length":
                try:
                    length = int(value)  # llhttp has rejected anything else (and with Transfer-Encoding)
                except ValueError:
                    self._push("error", (400, "bad_request", "malformed Content-Length"))
                    self._stop_reading()
                    return
            elif name == b"transfer-encoding":
                chunked = True
        req = Request(
            method=p.get_method(),
            url=self._url,
            version=p.get_http_version(),
            headers=self._headers,
            keep_alive=p.should_keep_alive() and not upgrade,  # after an upgrade: no more HTTP
            content_length=length,
            chunked=chunked,
            upgrade=upgrade,
        )
        self._push("request", req)

    def on_body(self, body: bytes) -> None:
        self._queued_body += len(body)
        self._push("body", body)
        if self._queued_body > BODY_BUFFER_HIGH and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self._push("end", None)

    # ---------------------------------------------------------------------------- plumbing

    def _stop_reading(self) -> None:
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def _arm(self, delay: float, why: str) -> None:
        # _disarm only clears the deadline (the timer, if it fires, finds none): one cancel per re-arm
        assert self.loop is not None
        deadline = self.loop.time() + delay
        self._deadline, self._why = deadline, why
        timer = self._timer
        if timer is not None:
            if timer.when() <= deadline:
                return  # it fires first and re-arms for the deadline (no new timer per request)
            timer.cancel()
        self._timer = self.loop.call_at(deadline, self._fire)

    def _disarm(self) -> None:
        self._deadline = None

    def _fire(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self.loop is None or self.closed:
            return
        if self.loop.time() < deadline:
            self._timer = self.loop.call_at(deadline, self._fire)
            return
        self._deadline = None
        self._timed_out(self._why)

    def _timed_out(self, why: str) -> None:
        if why == "header_read" and self.transport is not None and not self.busy:
            self.transport.write(
                self.worker.error_bytes(
                    (408, "header_timeout", "request headers took too long"), "", close=True
                )
            )
        self.worker.stats["timeouts_" + why] = self.worker.stats.get("timeouts_" + why, 0) + 1
        if self.write_blocked:
            self.abort()  # an answer still unread: closing would wait for the client to read it
        else:
            self.close()

    def _push(self, kind: str, value: object) -> None:
        self.events.append((kind, value))
        w = self._wakeup
        if w is not None and not w.done():
            w.set_result(None)

    async def next_event(self) -> tuple[str, object]:
        while not self.events:
            assert self.loop is not None
            self._wakeup = self.loop.create_future()
            await self._wakeup
        kind, value = self.events.popleft()
        if kind == "body" and isinstance(value, bytes):
            self._queued_body -= len(value)
            if self._paused and self._queued_body < BODY_BUFFER_HIGH // 2 and self.transport is not None:
                self._paused = False
                self.transport.resume_reading()
        return kind, value

    async def body(self, req: Request) -> AsyncIterator[bytes]:
        """The request body as it arrives (before any response: a stall or a parse error is answered)."""
        wait = self.worker.config.timeouts.body_read
        while not req.body_done:
            if self.events:
                kind, value = await self.next_event()
            else:
                try:
                    async with asyncio.timeout(wait):
                        kind, value = await self.next_event()
                except TimeoutError:
                    self.worker.count("timeouts_body_read")
                    raise ClientGone(
                        "the request body stalled",
                        (408, "body_timeout", f"no byte of the request body for {wait:g} s"),
                    ) from None
            if kind == "body" and isinstance(value, bytes):
                yield value
            elif kind == "end":
                req.body_done = True
            elif kind == "error" and isinstance(value, tuple):
                raise ClientGone("the request body is malformed", value)
            else:
                raise ClientGone("the client went away during the request body")

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def send(self, parts: list[bytes]) -> None:
        """``parts`` in one system call: joined when small, else handed over as they are (``writev``:
        a large body is not copied once more into a joined buffer)."""
        if self.transport is None or self.closed:
            return
        if len(parts) == 1:
            self.transport.write(parts[0])
        elif sum(map(len, parts)) < SEND_JOIN_MAX:
            self.transport.write(b"".join(parts))
        else:
            self.transport.writelines(parts)

    @property
    def write_blocked(self) -> bool:
        """The transport has paused us: the client is not reading fast enough (its socket is full)."""
        return self._can_write is not None and not self._can_write.done()

    async def drain(self) -> None:
        """Wait until the client can take more, for at most ``timeouts.send``: a client that stops
        reading is aborted then (:class:`ClientGone`), so that it cannot hold the request forever."""
        if self.closed:
            raise ClientGone("the client went away")
        fut = self._can_write
        if fut is not None and not fut.done():
            send = self.worker.config.timeouts.send
            try:
                async with asyncio.timeout(send):
                    await asyncio.shield(fut)
            except TimeoutError:
                self.worker.count("timeouts_send")
                self.abort()
                raise ClientGone(f"the client read nothing for {send:g} s") from None
            if self.closed:
                raise ClientGone("the client went away")

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # ---------------------------------------------------------------------------- request loop

    async def _serve(self) -> None:
        w = self.worker
        try:
            while not self.closed:
                kind, value = await self.next_event()
                if kind == "closed":
                    return
                if kind == "error" and isinstance(value, tuple):
                    w.count(f"error_{value[1]}")
                    self.write(w.error_bytes(value, "", close=True))
                    self.close()
                    return
                if kind != "request" or not isinstance(value, Request):
                    continue
                req = value
                self._disarm()  # no idle timer while a request is being handled
                self.busy = True
                w.in_flight += 1
                try:
                    await w.handle(self, req)
                finally:
                    w.in_flight -= 1
                    self.busy = False
                    w.request_done(req)
                if not req.body_done:
                    if any(kind == "end" for kind, _ in self.events):
                        while self.events:  # the rest of an unread body has arrived: skip it
                            kind, value = self.events.popleft()
                            if kind == "end":
                                break
                            if isinstance(value, bytes):
                                self._queued_body -= len(value)
                        req.body_done = True
                    else:
                        req.keep_alive = False
                if not req.keep_alive or w.stopping or self.closed:
                    self.close()
                    return
                self._arm(w.config.timeouts.idle, "idle")
        except ClientGone as e:
            if e.error is not None:
                w.count(f"error_{e.error[1]}")
                self.write(w.error_bytes(e.error, "", close=True))
            self.close()
        except Exception:
            log.exception("connection handler failed")
            self.abort()
        finally:
            if self.held:
                w.drop_held(self)


# ------------------------------------------------------------------------------------------------ worker


_SESSION_HEADERS: Final = frozenset({REPLAY_HEADER.encode(), b"content-type"})
"""The response headers :meth:`ReplaySession.response` looks at."""
_SESSION_LENGTHS: Final = frozenset(len(n) for n in _SESSION_HEADERS)
"""Their lengths: most headers are passed over without a ``lower()``."""
_REASONS: Final = {s.value: s.phrase.encode() for s in http.HTTPStatus}


def _reason(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")  # a dict: HTTPStatus(status) is an Enum lookup per call


class Worker:
    """The state of one proxy worker process: routing table, balancer, upstream pool, connections."""

    def __init__(
        self, config: ProxyConfig, table: RoutingTable | None = None, *, load: LoadTracker | None = None
    ) -> None:
        self.config = config
        self.table = (
            table
            if table is not None
            else RoutingTable(lock=make_lock(config.table_lock), incident_row=config.fault.incident_row)
        )
        self.balancer = Balancer(self.table, config.region, rng=random.Random(), load=load)
        self.shared = load if isinstance(load, SharedLoadTracker) else None
        """Load counted across the worker processes (None: this process only)."""
        self._watcher: asyncio.Task[None] | None = None
        self.pool = UpstreamPool(config.pool_idle, config.timeouts.connect)
        self.connections: set[ClientConnection] = set()
        self.in_flight = 0
        self.stopping = False
        self.waiting = 0
        self._released: asyncio.Event | None = None
        self.stats: dict[str, int] = {}
        self.metrics = RequestCounters()
        h = config.headers
        self.via = f"1.1 {h.via}".encode()
        self.internal = frozenset(
            {
                h.request_id.encode(),
                h.region.encode(),
                h.client_ip.encode(),
                b"x-forwarded-for",
                b"x-forwarded-proto",
                b"x-forwarded-port",
                REPLAY_SRC_HEADER.encode(),
                REPLAY_FAILED_HEADER.encode(),
                h.forwarded_hops.encode(),
                h.peer_token.encode(),
                EXCLUDE_HEADER,
            }
        )
        self._rid_prefix = os.urandom(4).hex()
        self.drop_request = HOP_BY_HOP | self.internal
        """Request headers never passed on as the client sent them (see :meth:`build_head`)."""
        self.forwarder = Forwarder(self)
        """Forwarding to other regions' proxies, and requests forwarded by them (forward.py)."""
        self.waker = Waker(
            self.table, config.region, config.agent, config.token, config.timeouts.wake, self.count
        )
        """Autostart of an app with no instance in reach (wake.py)."""
        self.balancer.distances = self.table.distances(config.region)  # live region_rtt rows
        self._rid = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drop_response = HOP_BY_HOP | {REPLAY_HEADER.encode()}
        self._rid_name = h.request_id.encode() + b": "
        self._client_ip_name = h.client_ip.encode() + b": "
        self._region_line = h.region.encode() + b": " + config.region.encode()
        self._routing_names = frozenset(n.encode() for n in ROUTING_HEADERS)
        self._ready = False
        self._responders: dict[tuple[str, str, str], Responder] = {}

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, looked up once (on 3.11 each lookup is a getpid syscall)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    # ---------------------------------------------------------------------------- helpers

    def count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    def request_done(self, req: Request | None = None) -> None:
        if req is not None:
            self.metrics.finished(req)

    def _notify_release(self) -> None:
        ev = self._released
        if ev is not None:
            ev.set()
            self._released = None

    def release(self, slot: Slot | None) -> None:
        if slot is not None and slot.release():
            self._notify_release()

    def error_bytes(self, reject: Reject | tuple[int, str, str], rid: str, *, close: bool = False) -> bytes:
        """An error answer: the status, the error code in a header, ``code: reason`` as the body."""
        status, code, reason = (
            (reject.status, str(reject.code), reject.reason) if isinstance(reject, Reject) else reject
        )
        body = f"{code}: {reason}\n".encode("utf-8", "replace")
        lines = [
            b"HTTP/1.1 %d %s" % (status, _reason(status)),
            b"content-type: text/plain; charset=utf-8",
            b"content-length: %d" % len(body),
            self.config.headers.error_code.encode() + b": " + code.encode(),
            b"via: " + self.via,
        ]
        if rid:
            lines.append(self.config.headers.request_id.encode() + b": " + rid.encode())
        if close:
            lines.append(b"connection: close")
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    def _responder(self, inst: Instance) -> Responder:
        """The (immutable) :class:`Responder` of a local instance, made once per instance."""
        key = (inst.id, inst.app, inst.region)
        r = self._responders.get(key)
        if r is None:
            if len(self._responders) >= 4096:
                self._responders.clear()
            r = self._responders[key] = Responder(inst.id, inst.app, inst.region)
        return r

    def _table_ready(self) -> bool:
        """``table.ready``, remembered once true (it never goes back: snapshots only replace snapshots)."""
        self._ready = self.table.ready
        return self._ready

    def _next_rid(self) -> str:
        self._rid += 1
        return f"{self._rid_prefix}{self._rid:012x}"

    # ---------------------------------------------------------------------------- routing

    async def decide(
        self, app: str, route: RouteRequest, *, host: str | None = None, timeout: float | None = None
    ) -> Route | Forward | Reject:
        """A decision that is not a Queue: waits (bounded, with a timeout) for a slot when told to queue."""
        loop = self.loop
        deadline: float | None = None
        while True:
            now = loop.time()
            if host is not None:
                d = self.balancer.choose_for_host(host, route, now=now)
            else:
                d = self.balancer.choose(app, route, now=now)
            if not isinstance(d, Queue):
                return d
            if deadline is None:
                if self.waiting >= self.config.queue_size:
                    self.count("queue_full")
                    return Reject(503, ErrorCode.QUEUE_FULL, f"{d.reason}, and the wait queue is full")
                deadline = now + (timeout if timeout is not None else self.config.timeouts.queue)
                self.count("queued")
            remaining = deadline - now
            if remaining <= 0:
                self.count("queue_timeout")
                return Reject(
                    503,
                    ErrorCode.QUEUE_TIMEOUT,
                    f"{d.reason}; no slot freed in "
                    f"{timeout if timeout is not None else self.config.timeouts.queue:g} s",
                )
            if self._released is None:
                self._released = asyncio.Event()
            ev = self._released
            self.waiting += 1
            self._watch_releases()
            try:
                await asyncio.wait_for(ev.wait(), remaining)
            except TimeoutError:
                pass
            finally:
                self.waiting -= 1
                self.stats["queue_wait_us"] = self.stats.get("queue_wait_us", 0) + int(
                    (loop.time() - now) * 1e6
                )

    def _watch_releases(self) -> None:
        """With load shared between workers, a slot freed by another worker sets no event here: while
        requests wait, poll the workers' release counters (one task per worker, only while waiting)."""
        if self.shared is not None and self._watcher is None:
            self._watcher = self.loop.create_task(self._poll_releases(self.shared))

    async def _poll_releases(self, shared: SharedLoadTracker) -> None:
        try:
            last, polls = shared.releases(), 0
            while self.waiting:
                await asyncio.sleep(RELEASE_POLL)
                now, polls = shared.releases(), polls + 1
                if now != last or polls >= RELEASE_POLLS_FORCED:  # and now and then anyway: see shared_load
                    last, polls = now, 0
                    self._notify_release()
        finally:
            self._watcher = None

    # ---------------------------------------------------------------------------- connections apps

    async def _decide_for_client(
        self, client: ClientConnection, app_name: str | None, route: RouteRequest, host: str
    ) -> Route | Forward | Reject:
        """:meth:`decide`, except for an app whose concurrency is ``connections``: the client connection's
        first request to it takes a slot that the connection keeps (:class:`Held`) until it closes; its
        later requests go to the same instance (slot ``None`` in the Route: nothing to release per
        request) while it is usable and the request's routing allows it, else the slot is given back and
        the choice made again."""
        app = self.table.app(app_name) if app_name is not None else None
        if app is None or app.concurrency != "connections":
            return await self.decide(app_name or "", route, host=host)
        held = client.held.get(app.name)
        if held is not None:
            inst = self._held_instance(held, route)
            if inst is not None:
                return Route(inst, None)
            self._drop(held, client, app.name)
        d = await self.decide(app.name, route, host=host)
        if isinstance(d, Route) and d.slot is not None:
            if client.closed:  # gone while this waited: do not go on
                self.release(d.slot)
                raise ClientGone("the client went away while its request waited for a slot")
            client.held[app.name] = Held(d.instance, d.slot)
            return Route(d.instance, None)
        return d

    def _held_instance(self, held: Held, route: RouteRequest) -> Instance | None:
        """The held instance as the table has it now, if it can still take this request."""
        inst = self.table.instance(held.instance.id)
        if (
            inst is None
            or inst.app != held.instance.app
            or (inst.host, inst.port) != (held.instance.host, held.instance.port)
            or not self.balancer.usable(inst, route, self.loop.time())
        ):
            return None
        if route.force_instance not in (None, inst.id) or route.prefer_instance not in (None, inst.id):
            return None
        if ANY_REGION not in route.regions and inst.region not in route.regions:
            return None
        return inst

    def _drop(self, held: Held, client: ClientConnection, app: str) -> None:
        if client.held.get(app) is held:
            del client.held[app]
        held.dropped = True
        conn, held.conn = held.conn, None
        if conn is not None:
            conn.home = None
            self.pool.release(conn)  # the client connection is done with it: shared from now on
        self.release(held.slot)

    def drop_held(self, client: ClientConnection) -> None:
        """The client connection ended: release every slot it held."""
        for app, held in list(client.held.items()):
            self._drop(held, client, app)

    def _drop_held_on(self, client: ClientConnection, inst: Instance) -> None:
        held = client.held.get(inst.app)
        if held is not None and held.instance.id == inst.id:
            self._drop(held, client, inst.app)

    async def _upstream_conn(self, client: ClientConnection, inst: Instance) -> UpstreamConn:
        """A connection to ``inst``: the client connection's dedicated one when it holds a slot there (a
        ``connections`` app), else one from the pool."""
        assert inst.host is not None and inst.port is not None
        held = client.held.get(inst.app) if client.held else None
        if held is None or held.instance.id != inst.id:
            return await self.pool.acquire(inst.id, inst.host, inst.port)
        conn, held.conn = held.conn, None
        if conn is not None:
            if conn.usable:
                conn.reused = True
                return conn
            conn.close()
        conn = await self.pool.acquire(inst.id, inst.host, inst.port)
        conn.home = held.give_back
        return conn

    # ---------------------------------------------------------------------------- one request

    async def handle(self, client: ClientConnection, req: Request) -> None:
        rid = self._next_rid()
        req.rid = rid
        self.count("requests")
        hosts = [v for n, v in req.headers if n == b"host"]
        result: Reject | None = None
        if not self._ready and not self._table_ready():
            result = Reject(503, ErrorCode.NOT_READY, "the proxy has not received its routing state yet")
        elif len(hosts) != 1:
            result = Reject(400, ErrorCode.BAD_HOST, "the request needs exactly one Host header")
        if result is None:
            req.host = hosts[0].decode("latin-1")
            # only the routing headers are read as text (names are lower case: see on_header)
            routing = self._routing_names
            str_headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in req.headers if n in routing]
            route = self.forwarder.route_request(req, str_headers)
            if isinstance(route, Reject):
                result = route
            else:
                result = await self._route_and_forward(client, req, route, str_headers)
        if result is not None:
            self.count(f"error_{result.code}")
            req.status = result.status
            unread = req.has_body and not req.body_done and not any(k == "end" for k, _ in client.events)
            if unread:
                req.keep_alive = False  # the rest of the body is not read: the connection closes after this
            client.write(self.error_bytes(result, rid, close=not req.keep_alive))

    async def _route_and_forward(
        self, client: ClientConnection, req: Request, route: RouteRequest, str_headers: list[tuple[str, str]]
    ) -> Reject | None:
        app_name = self.table.app_for_host(req.host)
        req.app = app_name or ""
        if req.forwarded:  # a peer's request: a slot per request, never a client connection's (forward.py)
            decision: Route | Remote | Forward | Reject = await self.forwarder.choose(
                app_name, route, host=req.host
            )
        elif route.force_instance is None and route.prefer_instance is None:
            decision = await self._decide_for_client(client, app_name, route, req.host)
        else:  # an instance this region may not know: see forward.py
            decision = await self.forwarder.choose(app_name, route, client=client, host=req.host)
        if isinstance(decision, Forward):
            decision = self.forwarder.plan(route, decision)
        if isinstance(decision, Reject):
            forwarded = bool(req.forwarded)  # autostart of a scaled-to-zero app (wake.py):
            if self.waker.applies(decision, app_name, route, req.extra, forwarded=forwarded):
                assert app_name is not None
                woken = await self.waker.wake(app_name, decision, local_only=forwarded)
                return woken or await self._route_and_forward(client, req, route, str_headers)
            return decision
        assert app_name is not None
        if req.upgrade:
            if isinstance(decision, Remote):
                return Reject(
                    503,
                    ErrorCode.NO_HEALTHY_INSTANCE,
                    f"no instance of {app_name} here; WebSocket upgrades are not forwarded to other regions",
                )
            return await self._tunnel(client, req, decision)
        session = ReplaySession(
            app_name,
            org_of=lambda a: x.org if (x := self.table.app(a)) is not None else None,
            body_length=req.content_length,
        )
        buffer: list[bytes] = []
        extra_set: tuple[tuple[str, str], ...] = ()
        extra_delete: tuple[str, ...] = ()
        path: bytes | None = None
        first = True
        route_decision: Route | Remote = decision
        while True:
            failure: Reject | None = None
            if isinstance(route_decision, Remote):  # another region's proxy (forward.py)
                inst: Instance | None = None
                slot: Slot | None = None
                try:
                    got = await self.forwarder.exchange(
                        client, req, route_decision, first, buffer, session, extra_set, extra_delete, path
                    )
                except ForwardFailed as e:
                    failure = e.reject
                else:
                    if got is None:  # a search: the instance is in none of the app's regions
                        first = first and not req.body_done  # the body went to a region that said no
                        nxt_decision = await self.forwarder.fall_back(route_decision)
                        if not isinstance(nxt_decision, Reject):
                            route_decision = nxt_decision
                            continue
                        failure = nxt_decision
                    else:
                        conn, headers, responder = got
                first = False
            else:
                inst, slot = route_decision.instance, route_decision.slot
                req.app, req.region, req.instance = inst.app, inst.region, inst.id
                try:
                    conn, headers = await self._exchange(
                        client, req, inst, first, buffer, session, extra_set, extra_delete, path
                    )
                except UpstreamError as e:
                    self.release(slot)
                    self._drop_held_on(client, inst)  # a connections app's next request chooses again
                    failure = self._upstream_reject(inst, e)
                except BaseException:  # the client went away, or the worker is stopping: give the slot back
                    self.release(slot)
                    raise
                else:
                    responder = self._responder(inst)
                first = False
            if failure is not None:
                if session.replays == 0:
                    return failure
                nxt = session.target_failed(failure, now_us=time.time_ns() // 1000)
                self.count("replay_failed" if isinstance(nxt, Reject) else "replay_fallback")
                if isinstance(nxt, Reject):
                    return nxt
                replay = nxt
            else:
                if req.forwarded:  # a peer's request: the edge proxy runs any replay (forward.py)
                    try:
                        await self._deliver(client, req, conn, headers)
                    finally:
                        self.release(slot)
                    return None
                # only the headers session.response reads are decoded (not all, per response)
                str_resp = [
                    (n.decode("latin-1"), v.decode("latin-1"))
                    for n, v in headers
                    if len(n) in _SESSION_LENGTHS and n.lower() in _SESSION_HEADERS
                ]
                verdict = session.response(str_resp, responder, now_us=time.time_ns() // 1000)
                if isinstance(verdict, ReadReplayBody):
                    body = bytearray()
                    try:
                        async for chunk in conn.body(self.config.timeouts.response):
                            body += chunk
                            if len(body) > verdict.limit:
                                break
                    except UpstreamError as e:
                        self.release(slot)
                        conn.close()
                        if inst is None:
                            return Reject(502, ErrorCode.UPSTREAM_BAD_RESPONSE, str(e))
                        return self._upstream_reject(inst, e)
                    verdict = session.replay_body(bytes(body), responder, now_us=time.time_ns() // 1000)
                if isinstance(verdict, Deliver):
                    try:
                        await self._deliver(client, req, conn, headers)
                    finally:
                        self.release(slot)
                    return None
                # a replay or a refusal: the answer that asked never reaches the client
                await self._discard(conn)
                self.release(slot)
                if isinstance(verdict, Reject):
                    self.count("replay_refused")
                    return verdict
                replay = verdict
            # route the replay
            self.count("replays")
            extra_set, extra_delete = replay.set_headers, replay.delete_headers
            path = replay.path.encode() if replay.path is not None else path
            while True:
                d = await self.forwarder.choose(replay.app, replay.route, timeout=replay.timeout)
                if not isinstance(d, Reject):
                    route_decision = d
                    break
                nxt = session.target_failed(d, now_us=time.time_ns() // 1000)
                self.count("replay_failed" if isinstance(nxt, Reject) else "replay_fallback")
                if isinstance(nxt, Reject):
                    return nxt
                replay = nxt
                extra_set, extra_delete = replay.set_headers, replay.delete_headers

    def _upstream_reject(self, inst: Instance, e: UpstreamError) -> Reject:
        self.metrics.upstream_error(e.kind, inst.app, inst.id)
        now = self.loop.time()
        if e.kind in ("refused", "connect_timeout") and self.balancer.outliers.connect_failed(inst.id, now):
            self.pool.drop_instance(inst.id)
            self.count("ejections")
        if e.kind == "refused":
            return Reject(502, ErrorCode.UPSTREAM_REFUSED, str(e))
        if e.kind in ("timeout", "connect_timeout"):
            return Reject(504, ErrorCode.UPSTREAM_TIMEOUT, str(e))
        return Reject(502, ErrorCode.UPSTREAM_BAD_RESPONSE, str(e))

    def _request_head(
        self,
        client: ClientConnection,
        req: Request,
        extra_set: Iterable[tuple[str, str]],
        extra_delete: Iterable[str],
        path: bytes | None,
    ) -> bytes:
        if req.forwarded:  # a peer's request: its client headers are kept (forward.py)
            return self.forwarder.upstream_head(client, req, extra_set, extra_delete, path)
        ip = client.peer_ip.encode()
        lines = [
            b"x-forwarded-for: " + ip,
            b"x-forwarded-proto: http",
            b"x-forwarded-port: %d" % client.local_port,
            self._rid_name + req.rid.encode(),
            self._region_line,
            self._client_ip_name + ip,
        ]
        return self.build_head(req, self.drop_request, lines, extra_set, extra_delete, path, upgrade=True)

    def build_head(
        self,
        req: Request,
        drop: frozenset[bytes],
        lines: list[bytes],
        extra_set: Iterable[tuple[str, str]],
        extra_delete: Iterable[str],
        path: bytes | None,
        *,
        upgrade: bool = False,
    ) -> bytes:
        """A request head for an instance or a peer proxy: the client's headers minus ``drop`` (and
        what its ``Connection`` names, and what ``extra_set``/``extra_delete`` replace), then
        ``lines``, ``Via``, ``extra_set`` and (``upgrade``) the headers asking for the upgrade.
        ``drop`` is precomputed by the caller and copied only when this request adds to it."""
        for name, value in req.headers:
            if name == b"connection":
                drop = drop | {t.strip().lower() for t in value.split(b",")}
        sets = [(n.lower().encode(), v.encode("latin-1")) for n, v in extra_set]
        if sets or extra_delete:
            drop = drop | {n for n, _ in sets} | {n.lower().encode() for n in extra_delete}
        out = [b"%s %s HTTP/1.1" % (req.method, path if path is not None else req.url)]
        via = self.via
        for name, value in req.headers:
            if name == b"via":
                via = value + b", " + self.via
            elif name not in drop:
                out.append(name + b": " + value)
        if req.content_length is not None:
            out.append(b"content-length: %d" % req.content_length)
        elif req.chunked:
            out.append(b"transfer-encoding: chunked")
        out += lines
        out.append(b"via: " + via)
        out += [n + b": " + v for n, v in sets]
        if upgrade and req.upgrade:  # the only hop-by-hop headers passed on: those asking for the upgrade
            out += [b"connection: upgrade", b"upgrade: " + req.upgrade]
        return b"\r\n".join(out) + b"\r\n\r\n"

    async def _exchange(
        self,
        client: ClientConnection,
        req: Request,
        inst: Instance,
        first: bool,
        buffer: list[bytes],
        session: ReplaySession,
        extra_set: tuple[tuple[str, str], ...],
        extra_delete: tuple[str, ...],
        path: bytes | None,
    ) -> tuple[UpstreamConn, list[tuple[bytes, bytes]]]:
        """Send the request to ``inst`` and read the response head. The body comes from the client the
        first time (kept in ``buffer`` while replayable), from ``buffer`` on a replay."""
        assert inst.host is not None and inst.port is not None
        head = self._request_head(client, req, extra_set, extra_delete, path)
        for attempt in (1, 2):
            conn = await self._upstream_conn(client, inst)
            conn.start_exchange()
            try:
                headers = await self.send_request(
                    conn, client, req, head, from_client=first and attempt == 1, first=first,
                    buffer=buffer, session=session,
                )  # fmt: skip
            except (ConnectionError, OSError) as e:
                conn.close()
                err = UpstreamError("bad_response", f"instance {inst.id}: {e}", sent=not conn.reused)
                if conn.reused and attempt == 1 and (not req.has_body or not first):
                    continue
                raise err from None
            except UpstreamError as e:
                conn.close()
                if not e.sent and conn.reused and attempt == 1 and (not req.has_body or not first):
                    continue  # a stale keep-alive connection: once more on a fresh one
                raise
            except ClientGone:
                conn.close()
                raise
            self._response_seen(inst, conn.status)
            return conn, headers
        raise AssertionError("unreachable")

    async def send_request(
        self,
        conn: UpstreamConn,
        client: ClientConnection,
        req: Request,
        head: bytes,
        *,
        from_client: bool,
        first: bool,
        buffer: list[bytes],
        session: ReplaySession,
    ) -> list[tuple[bytes, bytes]]:
        """Write ``head`` and the request body on ``conn``, then read the response head. The body comes
        from the client when ``from_client`` (kept in ``buffer`` while replayable), else from ``buffer``
        (to an instance or to a peer proxy alike)."""
        conn.write(head)
        if req.has_body:
            if from_client:
                async for chunk in client.body(req):
                    if session.body_received(len(chunk)):
                        buffer.append(chunk)
                    else:
                        buffer.clear()  # too large to replay: the session refuses replays
                    await self._send_chunk(conn, req, chunk)
            elif session.body_replayable:
                for chunk in buffer:
                    await self._send_chunk(conn, req, chunk)
            else:
                raise UpstreamError("bad_response", "the request body cannot be sent again", sent=True)
            if req.chunked:
                conn.write(b"0\r\n\r\n")
        elif first:
            req.body_done = req.body_done or self._pop_end(client)
        await conn.drain()
        return await conn.read_head(self.config.timeouts.response)

    def _response_seen(self, inst: Instance, status: int) -> None:
        """An instance's response status for outlier detection, ejecting the instance if it is one."""
        if self.balancer.outliers.response(inst.id, status, self.loop.time()):
            self.pool.drop_instance(inst.id)
            self.count("ejections")

    @staticmethod
    def _pop_end(client: ClientConnection) -> bool:
        if client.events and client.events[0][0] == "end":
            client.events.popleft()
            return True
        return False

    @staticmethod
    async def _send_chunk(conn: UpstreamConn, req: Request, chunk: bytes) -> None:
        if req.chunked:
            conn.write(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        else:
            conn.write(chunk)
        await conn.drain()

    async def _discard(self, conn: UpstreamConn) -> None:
        try:
            n = 0
            async for chunk in conn.body(self.config.timeouts.response):
                n += len(chunk)
                if n > 1024 * 1024:
                    conn.close()
                    return
            self.pool.release(conn)
        except UpstreamError:
            conn.close()

    async def _deliver(
        self, client: ClientConnection, req: Request, conn: UpstreamConn, headers: list[tuple[bytes, bytes]]
    ) -> None:
        status = conn.status
        head_only = req.method == b"HEAD"
        no_body = head_only or status in (204, 304) or 100 <= status < 200
        length: bytes | None = None
        drop = self._drop_response
        if req.forwarded:  # to a peer: fly-replay passed back (the edge replays), ours dropped
            drop = HOP_BY_HOP | PEER_RESPONSE_HEADERS
        http11 = req.version == "1.1"
        out = [b"HTTP/1.1 %d %s" % (status, _reason(status))]
        via = self.via
        kept: list[bytes] = []  # the lower-case names of the lines in ``out`` after the status line
        named: set[bytes] | None = None  # what Connection headers name
        for name, value in headers:  # one pass; what a Connection header names is taken out after
            low = name.lower()
            if low in drop:
                if low == b"content-length":
                    length = value.strip()
                elif low == b"connection":
                    if named is None and value.strip().lower() == b"keep-alive":
                        continue  # the usual value: names nothing beyond the hop-by-hop headers
                    tokens = {t.strip().lower() for t in value.split(b",")}
                    named = tokens if named is None else named | tokens
            elif low == b"via":
                via = value + b", " + self.via
            else:
                out.append(name + b": " + value)
                kept.append(low)
        if named is not None and not named <= drop:  # names beyond the hop-by-hop ones
            out[1:] = [line for line, low in zip(out[1:], kept, strict=True) if low not in named]
        chunked = False
        if length is not None:
            out.append(b"content-length: " + length)
        elif not no_body:
            if http11:
                chunked = True
                out.append(b"transfer-encoding: chunked")
            else:
                req.keep_alive = False
        out.append(b"via: " + via)
        out.append(self._rid_name + req.rid.encode())
        if req.forwarded:
            out += self.forwarder.response_lines(req)
        if not req.keep_alive or self.stopping:
            out.append(b"connection: close")
        req.status = status
        out.append(b"\r\n")
        # what is already here goes in one write (one send): the head with the body's buffered chunks
        pending = [b"\r\n".join(out)]
        body = conn.complete_body(head_only=head_only)
        if body is not None:  # the whole response is here: no async generator, one write
            if chunked:
                for c in body:
                    if c:
                        pending += (b"%x\r\n" % len(c), c, b"\r\n")
                pending.append(b"0\r\n\r\n")
            else:
                pending += body
            client.send(pending)
            self.pool.release(conn)
            if body:
                await client.drain()
            return
        wrote_body = False
        try:
            async for chunk in conn.body(self.config.timeouts.response, head_only=head_only):
                if chunk:
                    if chunked:
                        pending += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
                    else:
                        pending.append(chunk)
                    wrote_body = True
                if not conn.done:  # more to wait for: send what is here first
                    client.send(pending)
                    pending.clear()
                    await client.drain()
        except UpstreamError as e:
            conn.close()
            log.warning("request %s: %s", req.rid, e)
            self.count("upstream_broken_mid_response")
            self.metrics.upstream_error("reset", req.app, conn.instance_id)
            client.abort()
            raise ClientGone(str(e)) from None
        except ClientGone:
            conn.close()
            raise
        if chunked:
            pending.append(b"0\r\n\r\n")
        if pending:
            client.send(pending)
        self.pool.release(conn)
        if wrote_body:
            await client.drain()

    # ---------------------------------------------------------------------------- upgrade tunnels

    async def _tunnel(self, client: ClientConnection, req: Request, route: Route) -> Reject | None:
        """A WebSocket upgrade: send the head (and any bytes the client sent after it) to the instance; on
        ``101`` tunnel raw bytes both ways until either side closes; any other answer is delivered as
        usual. The client connection always closes afterwards; the upstream one is never pooled; the
        slot is held while the tunnel is open."""
        inst, slot = route.instance, route.slot
        req.keep_alive = False
        req.body_done = True  # what follows the head is the tunnel's, not a body
        try:
            try:
                conn, headers = await self._upgrade_exchange(client, req, inst)
            except UpstreamError as e:
                return self._upstream_reject(inst, e)
            if conn.status != 101:
                await self._deliver(client, req, conn, headers)
                conn.close()
                return None
            token = b", ".join(v for n, v in headers if n.lower() == b"upgrade").strip().lower()
            if token != b"websocket":
                conn.close()
                return Reject(
                    502,
                    ErrorCode.UPSTREAM_BAD_RESPONSE,
                    f"instance {inst.id} switched to {token.decode('latin-1')!r}, not websocket",
                )
            self.count("tunnels")
            req.app, req.region, req.status = inst.app, inst.region, 101
            client.write(self._switching_head(req, headers))
            if conn.tunnel_data:
                client.write(conn.tunnel_data)
            try:
                await self._pump(client, conn, req)
            finally:
                conn.close()
                if client.write_blocked:
                    client.abort()
                else:
                    client.close()
            return None
        finally:
            self.release(slot)

    async def _upgrade_exchange(
        self, client: ClientConnection, req: Request, inst: Instance
    ) -> tuple[UpstreamConn, list[tuple[bytes, bytes]]]:
        """The upgrade request's head and the bytes queued after it, then the response head (a stale
        pooled connection is retried once on a fresh one)."""
        assert inst.host is not None and inst.port is not None
        self._pop_end(client)
        first: list[bytes] = []
        while client.events and client.events[0][0] == "body":
            _, value = await client.next_event()  # does not wait: the event is there (and is counted)
            if isinstance(value, bytes):
                first.append(value)
        data = self._request_head(client, req, (), (), None) + b"".join(first)
        for attempt in (1, 2):
            conn = await self.pool.acquire(inst.id, inst.host, inst.port)
            conn.start_exchange()
            conn.reusable = False
            try:
                conn.write(data)
                await conn.drain()
                headers = await conn.read_head(self.config.timeouts.response)
            except (ConnectionError, OSError) as e:
                conn.close()
                if conn.reused and attempt == 1:
                    continue
                raise UpstreamError("bad_response", f"instance {inst.id}: {e}") from None
            except UpstreamError as e:
                conn.close()
                if not e.sent and conn.reused and attempt == 1:
                    continue
                raise
            except BaseException:  # cancelled (the worker stopping)
                conn.close()
                raise
            self._response_seen(inst, conn.status)
            return conn, headers
        raise AssertionError("unreachable")

    def _switching_head(self, req: Request, headers: list[tuple[bytes, bytes]]) -> bytes:
        drop = set(HOP_BY_HOP)
        drop.add(REPLAY_HEADER.encode())
        for name, value in headers:
            if name.lower() == b"connection":
                drop.update(t.strip().lower() for t in value.split(b","))
        out = [b"HTTP/1.1 101 Switching Protocols"]
        via = self.via
        for name, value in headers:
            low = name.lower()
            if low == b"via":
                via = value + b", " + self.via
            elif low not in drop:
                out.append(name + b": " + value)
        out += [
            b"connection: upgrade",
            b"upgrade: websocket",
            b"via: " + via,
            self.config.headers.request_id.encode() + b": " + req.rid.encode(),
        ]
        return b"\r\n".join(out) + b"\r\n\r\n"

    async def _pump(self, client: ClientConnection, conn: UpstreamConn, req: Request) -> None:
        """Copy bytes both ways until either side closes, a side cannot take what it is sent for
        ``timeouts.send``, or nothing moves for ``timeouts.tunnel_idle``. Backpressure: the instance is
        not read while the client is not writable; the client stops being read when its queued bytes
        are over ``BODY_BUFFER_HIGH`` (the instance not reading)."""
        loop = asyncio.get_running_loop()
        tmo = self.config.timeouts
        last = loop.time()

        async def to_client() -> None:
            nonlocal last
            while True:
                data = await conn.read_tunnel()
                if not data:
                    return
                last = loop.time()
                client.write(data)
                await client.drain()

        async def to_upstream() -> None:
            nonlocal last
            while True:
                kind, value = await client.next_event()
                if kind == "closed":
                    return
                if isinstance(value, bytes):
                    last = loop.time()
                    conn.write(value)
                    async with asyncio.timeout(tmo.send):
                        await conn.drain()

        tasks = {loop.create_task(to_client()), loop.create_task(to_upstream())}
        try:
            while True:
                remaining = last + tmo.tunnel_idle - loop.time()
                if remaining <= 0:
                    self.count("timeouts_tunnel_idle")
                    return
                done, _ = await asyncio.wait(tasks, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    if not t.cancelled() and (e := t.exception()) is not None:
                        log.debug("request %s: tunnel ended: %r", req.rid, e)
                if done:
                    return
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    # ---------------------------------------------------------------------------- lifecycle

    def begin_stop(self) -> None:
        """Stop taking requests: idle keep-alive connections are closed now, busy ones after their
        current response."""
        self.stopping = True
        for c in list(self.connections):
            if not c.busy:
                c.close()


LISTEN_BACKLOG: Final = 1024
"""Connections the kernel queues on the listening socket before refusing more: the queue that absorbs
new connections while every worker is stuck, until their replacements accept them."""
READY_WAIT: Final = 5.0
"""Seconds a worker on the shared socket waits for its routing table before accepting anyway."""
READY_POLL: Final = 0.01


def bind_listener(addr: tuple[str, int]) -> socket.socket:
    """The proxy's one listening socket on ``addr`` (the first address the host resolves to), listening,
    non-blocking. The supervisor binds it before any worker starts and hands it to every worker: they
    all accept from its one queue, so a connection waiting there is taken by whichever worker is free —
    none is lost to a worker that is stuck or killed, and a replacement accepts from the same socket.
    OSError (with ``strerror``) when it cannot be bound."""
    host, port = addr
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart while old connections linger
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(sockaddr)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def serve(
    config: ProxyConfig,
    *,
    stop: asyncio.Event,
    control: socket.socket | None = None,
    worker_index: int = 0,
    shared_load: SharedLoadHandle | None = None,
    listen_socket: socket.socket | None = None,
) -> int:
    """Run one worker until ``stop`` is set, then drain for at most ``timeouts.drain`` seconds.
    ``shared_load``: the supervisor's load counts, counted in as worker ``worker_index`` (without it,
    this worker counts alone: right for a single worker only). ``listen_socket``: the supervisor's
    listening socket, shared by every worker, served once this worker's routing table is complete (at
    most ``READY_WAIT`` seconds); without it the worker binds ``listen`` itself (a worker on its own)."""
    loop = asyncio.get_running_loop()
    shared = SharedLoad.attach(shared_load, worker_index) if shared_load is not None else None
    worker = Worker(config, load=SharedLoadTracker(shared) if shared is not None else None)
    feed = TableFeed(worker.table, config.agent, config.token)
    feed.start()
    ctl: ControlServer | None = None
    if control is not None:  # the supervisor's channel (probes, stats); its end means the supervisor is gone
        handlers = {"probe": lambda a: probe(worker, a), "stats": lambda a: snapshot(worker)}
        ctl = ControlServer(control, handlers, on_close=stop.set)
        ctl.start()
    if listen_socket is not None:
        # A shared socket: until this worker's table is complete, new connections are better off waiting
        # in the queue (or taken by a worker that is ready) than answered 503 not_ready here. Bounded: with
        # the agent down the worker accepts anyway (and answers not_ready, as a lone worker does).
        ready_by = loop.time() + READY_WAIT
        while not worker.table.ready and not stop.is_set() and loop.time() < ready_by:
            await asyncio.sleep(READY_POLL)
    try:
        sock = listen_socket if listen_socket is not None else bind_listener(config.listen)
        server = await loop.create_server(lambda: ClientConnection(worker), sock=sock, backlog=LISTEN_BACKLOG)
    except OSError as e:
        log.error("cannot listen on %s: %s", config.listen, e.strerror or e)
        await feed.close()
        if ctl is not None:
            await ctl.close()
        return 1
    await stop.wait()
    server.close()
    worker.begin_stop()
    deadline = loop.time() + config.timeouts.drain
    while worker.in_flight and loop.time() < deadline:
        await asyncio.sleep(0.02)
    for c in list(worker.connections):
        c.abort() if c.busy else c.close()
    worker.pool.close()
    await feed.close()
    if ctl is not None:
        await ctl.close()
    await asyncio.sleep(0)
    return 0


__all__ = ["LISTEN_BACKLOG", "ClientConnection", "Held", "Request", "Worker", "bind_listener", "serve"]
