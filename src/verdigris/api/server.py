"""The agent's HTTP API, compatible with Corrosion's.

Endpoints (``docs/api.md`` has the details and examples):

* ``POST /v1/transactions`` — statements in one transaction, on the store's writer thread.
* ``POST /v1/queries`` — one read-only statement; rows streamed as NDJSON.
* ``POST /v1/subscriptions``, ``GET /v1/subscriptions/{id}`` — a query's rows, then its changes.
* ``POST /v1/updates/{table}`` — primary keys of a table's changed rows.
* ``GET /v1/health``, ``POST /v1/table_stats``.

Design:

* **Nothing blocks the loop.** Writes go to one writer thread, reads to a small pool of reader threads
  with their own read-only connections (:mod:`verdigris.api.threads`).
* **Everything is bounded.** Request bodies (413 above ``max_body_bytes``); query rows (streamed through
  a fixed number of in-flight chunks, never collected); per-client event queues of subscriptions and
  update streams (a client that falls behind is sent an ``error`` event and disconnected, and can resume
  a subscription with ``?from=``); socket writes (a client that stops reading is dropped after
  ``write_timeout``).
* **Bad input gets a 4xx JSON error** ``{"error": "..."}`` that names the problem (for transactions,
  Corrosion's ``ExecResponse`` shape with the error in ``results``, plus the same top-level ``error``),
  is counted, and changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web

from verdigris.api import wire
from verdigris.api.metrics import ApiMetrics
from verdigris.api.threads import ChunkPipe, StoreThreads
from verdigris.store.schema import quote_ident
from verdigris.store.store import CommitNotice, PkTuple, Store, value_key
from verdigris.store.subscriptions import (
    ChangeEvent,
    GapError,
    Subscription,
    SubscriptionError,
    SubscriptionManager,
)
from verdigris.store.types import SqlValue, Statement, StatementError, StoreError

log = logging.getLogger(__name__)

NDJSON: Final = "application/x-ndjson"
_IDLE_CHECK: Final = 5.0
"""Seconds between checks that an idle stream's client is still connected."""
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class ApiSettings:
    """Knobs of the API server; the defaults suit production."""

    bearer_token: str | None = None
    """When set, every request must carry ``Authorization: Bearer <token>``."""
    max_body_bytes: int = 16 * 1024 * 1024
    query_timeout: float = 240.0
    """Queries running longer are interrupted (Corrosion's default is 4 minutes). A request may ask
    for another limit with ``?timeout=<minutes>`` (0: none), as with Corrosion."""
    stream_chunk_bytes: int = 64 * 1024
    """Rows are sent in chunks of about this size."""
    client_queue_events: int = 10_000
    """The most events queued for one streaming client before it is dropped as too slow."""
    write_timeout: float = 30.0
    """A streaming client that accepts no data for this long is dropped."""
    updates_queue_commits: int = 10_000
    """The most commits waiting for ``/v1/updates`` dispatch before its clients are dropped."""


class ApiError(Exception):
    """An error answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _SlowClient(Exception):
    """A streaming client's queue overflowed."""


class _ClientGone(ConnectionResetError):
    """A streaming client disconnected, or stopped reading for longer than the write timeout (``slow``)."""

    def __init__(self, message: str, slow: bool) -> None:
        super().__init__(message)
        self.slow = slow


def _json_response(status: int, doc: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=wire.encode_json(doc), content_type="application/json", headers=headers
    )


def _error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json_response(status, {"error": message}, headers)


def sql_error_status(e: BaseException) -> int:
    """HTTP status for a SQLite error from user SQL: the caller's fault (400) unless the database
    itself is the problem (busy → 503, I/O, full, corrupt → 500)."""
    msg = str(e).lower()
    if "locked" in msg or "busy" in msg:
        return 503
    if isinstance(e, sqlite3.OperationalError) and (
        "disk" in msg or "i/o" in msg or "full" in msg or "out of memory" in msg
    ):
        return 500
    if isinstance(e, sqlite3.DatabaseError) and "malformed" in msg and "database disk image" in msg:
        return 500
    return 400


def _describe_read_error(e: BaseException) -> str:
    msg = str(e)
    low = msg.lower()
    if "not authorized" in low or "readonly" in low or "read-only" in low or "query_only" in low:
        return (
            f"statement is not read-only ({msg}): /v1/queries and /v1/subscriptions only read; "
            "write with /v1/transactions"
        )
    if isinstance(e, sqlite3.ProgrammingError) and ("binding" in low or "supplied" in low):
        return f"wrong parameters: {msg}"
    return msg


class _EventFeed:
    """One streaming client's pending events, fed from another thread, bounded.

    The producer (a subscription's matcher thread, or the updates dispatcher on the loop) calls
    :meth:`push_threadsafe` / :meth:`push`; past ``limit`` pending events the feed is marked overflowed
    and its events dropped, and the consumer ends the stream with an error instead of buffering without
    bound.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        self._loop = loop
        self._limit = limit
        self._pending: deque[Any] = deque()
        self._wake = asyncio.Event()
        self.overflowed = False
        self.closed = False

    def push_threadsafe(self, events: Sequence[Any]) -> None:
        if self.closed:
            return
        try:
            self._loop.call_soon_threadsafe(self.push, events)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.closed = True

    def push(self, events: Sequence[Any]) -> None:
        if self.closed or self.overflowed or not events:
            return
        if len(self._pending) + len(events) > self._limit:
            self.overflowed = True
            self._pending.clear()
        else:
            self._pending.extend(events)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def take(self) -> list[Any]:
        """Everything pending, without waiting."""
        out = list(self._pending)
        self._pending.clear()
        self._wake.clear()
        if self.overflowed:
            raise _SlowClient
        return out

    async def wait(self, timeout: float) -> None:
        """Until events are pending, the feed overflowed, :meth:`wake` was called or ``timeout``."""
        if not self._pending and not self.overflowed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)


class _Stream:
    """An NDJSON streaming response with bounded writes."""

    def __init__(self, request: web.Request, response: web.StreamResponse, write_timeout: float) -> None:
        self.request = request
        self.response = response
        self.write_timeout = write_timeout

    @classmethod
    async def open(
        cls, request: web.Request, write_timeout: float, headers: dict[str, str] | None = None
    ) -> _Stream:
        response = web.StreamResponse(status=200, headers={"Content-Type": NDJSON, **(headers or {})})
        await response.prepare(request)
        return cls(request, response, write_timeout)

    async def write(self, data: bytes) -> None:
        """Send ``data``; a client that does not take it within the write timeout is disconnected
        (raises ``ConnectionResetError``)."""
        if not data:
            return
        try:
            await asyncio.wait_for(self.response.write(data), self.write_timeout)
        except TimeoutError:
            self.abort()
            raise _ClientGone("client stopped reading", slow=True) from None
        except (ConnectionError, RuntimeError) as e:
            raise _ClientGone(f"client went away: {e}", slow=False) from None

    async def try_write(self, data: bytes) -> None:
        """Best-effort final write (an error event) before closing."""
        with contextlib.suppress(ConnectionError, TimeoutError, RuntimeError):
            await asyncio.wait_for(self.response.write(data), min(self.write_timeout, 2.0))

    @property
    def gone(self) -> bool:
        """The client disconnected (noticed without writing, so idle streams get cleaned up too)."""
        transport = self.request.transport
        return transport is None or transport.is_closing()

    def abort(self) -> None:
        transport = self.request.transport
        if transport is not None:
            transport.abort()

    async def finish(self) -> None:
        try:
            await asyncio.wait_for(self.response.write_eof(), self.write_timeout)
        except (ConnectionError, TimeoutError, RuntimeError):
            self.abort()


class ApiServer:
    """The HTTP API of one agent. ``app`` is the aiohttp application to serve; call :meth:`close`
    before stopping the server so that open streams end promptly."""

    def __init__(
        self,
        store: Store,
        threads: StoreThreads,
        subs: SubscriptionManager | None,
        settings: ApiSettings | None = None,
        metrics: ApiMetrics | None = None,
        *,
        members: Callable[[], int] = lambda: 0,
        queue_size: Callable[[], int] = lambda: 0,
    ) -> None:
        self.store = store
        self.threads = threads
        self.subs = subs
        self.settings = settings or ApiSettings()
        self.metrics = metrics or ApiMetrics()
        self._members = members
        self._queue_size = queue_size
        self._closing = asyncio.Event()
        self._streams: set[_EventFeed] = set()
        self._updates = _UpdatesHub(self)
        self._token = self.settings.bearer_token.encode() if self.settings.bearer_token else None
        self.public_routes: set[tuple[str, str]] = set()
        """(method, path) pairs served without the bearer token: added by the dashboard for its page (it
        holds no data) and the CORS preflight of its JSON (browsers send preflights without credentials)."""
        if subs is not None:
            self.metrics.track_subscriptions(lambda: len(subs.list()))
            subs.lag_observer = self.metrics.subscription_lag.observe
        self.metrics.db_version.set(store.db_version)

        app = web.Application(middlewares=[self._middleware], client_max_size=self.settings.max_body_bytes)
        app.router.add_post("/v1/transactions", self._transactions)
        app.router.add_post("/v1/queries", self._queries)
        app.router.add_post("/v1/subscriptions", self._subscribe)
        app.router.add_get("/v1/subscriptions/{id}", self._subscription_by_id)
        app.router.add_post("/v1/updates/{table}", self._updates_stream)
        app.router.add_get("/v1/health", self._health)
        app.router.add_post("/v1/table_stats", self._table_stats)
        app.on_startup.append(self._on_startup)
        app.on_shutdown.append(self._on_shutdown)
        self.app = app

    # ------------------------------------------------------------------------------------ lifecycle

    async def _on_startup(self, app: web.Application) -> None:
        self._updates.start()

    async def _on_shutdown(self, app: web.Application) -> None:
        await self.close()

    async def close(self) -> None:
        """End every open stream (clients see the stream end and may resume) and stop dispatching."""
        self._closing.set()
        for feed in list(self._streams):
            feed.wake()
        await self._updates.stop()

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    # ------------------------------------------------------------------------------------ middleware

    @web.middleware
    async def _middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        started = time.perf_counter()
        endpoint = _endpoint(request)
        status = 500
        try:
            if (
                self._token is not None
                and (request.method, request.path) not in self.public_routes
                and not self._authorized(request)
            ):
                response: web.StreamResponse = _error_response(
                    401,
                    "missing or wrong bearer token (send Authorization: Bearer <token>)",
                    {"WWW-Authenticate": "Bearer"},
                )
            else:
                try:
                    response = await handler(request)
                except ApiError as e:
                    response = _error_response(e.status, e.message)
                except wire.WireError as e:
                    response = _error_response(400, str(e))
                except web.HTTPRequestEntityTooLarge:
                    response = _error_response(
                        413, f"request body larger than the limit of {self.settings.max_body_bytes} bytes"
                    )
                except web.HTTPException as e:
                    response = _error_response(e.status, e.reason or "error")
            status = response.status
            return response
        except (ConnectionError, asyncio.CancelledError):
            status = 499  # the client went away
            raise
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            status = 500
            return _error_response(500, "internal error (see the agent's log)")
        finally:
            elapsed = time.perf_counter() - started
            self.metrics.requests.labels(endpoint, request.method, str(status)).inc()
            self.metrics.request_seconds.labels(endpoint).observe(elapsed)
            if 400 <= status < 500 and status != 499:
                self.metrics.bad_requests.labels(endpoint).inc()
            log.debug("%s %s -> %d in %.1f ms", request.method, request.path_qs, status, elapsed * 1000)

    def _authorized(self, request: web.Request) -> bool:
        assert self._token is not None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode(), self._token)

    async def _body(self, request: web.Request) -> bytes:
        limit = self.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise ApiError(
                413, f"request body of {request.content_length} bytes is over the limit of {limit}"
            )
        return await request.read()

    # ------------------------------------------------------------------------------------ transactions

    async def _transactions(self, request: web.Request) -> web.StreamResponse:
        actor = wire.actor_id_str(self.store.site_id)
        try:
            statements = wire.parse_statements(await self._body(request))
        except wire.WireError as e:
            self.metrics.transactions.labels("failed").inc()
            return self._exec_error(400, str(e), actor)
        try:
            result = await self.threads.write(self.store.transact, statements)
        except StatementError as e:
            self.metrics.transactions.labels("failed").inc()
            status = sql_error_status(e.__cause__) if e.__cause__ is not None else 400
            # 1-based like the parse errors, with the SQL, so the caller sees which statement failed
            return self._exec_error(
                status, f"statement {e.index + 1} ({_excerpt(e.sql)}): {e.message}", actor
            )
        except StoreError as e:
            self.metrics.transactions.labels("failed").inc()
            log.error("transaction failed: %s", e)
            return self._exec_error(500, str(e), actor)
        self.metrics.statements.inc(len(statements))
        if result.version is None:
            self.metrics.transactions.labels("unchanged").inc()
        else:
            self.metrics.transactions.labels("committed").inc()
            self.metrics.rows_affected.inc(sum(r.rows_affected for r in result.results))
            self.metrics.db_version.set(self.store.db_version)
        if "regional" not in result.versions and "global" in result.versions:
            # `version` is the global actor's: name that actor.
            actor = wire.actor_id_str(self.store.actor_for("global"))
        return _json_response(
            200,
            {
                "results": [{"rows_affected": r.rows_affected, "time": r.time} for r in result.results],
                "time": result.time,
                "version": result.version,
                "actor_id": actor,
                # Scope -> {version, actor_id} of each own actor the transaction made a version of.
                "versions": {
                    scope: {"version": v, "actor_id": wire.actor_id_str(self.store.actor_for(scope))}
                    for scope, v in result.versions.items()
                },
            },
        )

    @staticmethod
    def _exec_error(status: int, message: str, actor: str) -> web.Response:
        # Corrosion's shape (results holds the error) plus a top-level "error" like every other endpoint.
        return _json_response(
            status,
            {
                "results": [{"error": message}],
                "time": 0.0,
                "version": None,
                "actor_id": actor,
                "error": message,
            },
        )

    # ------------------------------------------------------------------------------------ queries

    def _timeout(self, request: web.Request) -> float | None:
        raw = request.query.get("timeout")
        if raw is None:
            return self.settings.query_timeout or None
        try:
            minutes = float(raw)
        except ValueError:
            raise ApiError(400, f"timeout must be a number of minutes, got {raw!r}") from None
        if minutes < 0:
            raise ApiError(400, "timeout must not be negative")
        return minutes * 60 or None

    async def _queries(self, request: web.Request) -> web.StreamResponse:
        stmt = wire.parse_one_statement(await self._body(request))
        timeout = self._timeout(request)
        loop = asyncio.get_running_loop()
        pipe: ChunkPipe[_QueryItem] = ChunkPipe(loop)
        chunk_bytes = self.settings.stream_chunk_bytes
        rows_counter = self.metrics.rows_streamed.labels("queries")
        self.threads.submit_read(lambda conn: _run_query(conn, stmt, pipe, chunk_bytes, rows_counter.inc))
        timer = (
            loop.call_later(timeout, pipe.interrupt, f"query interrupted after {timeout:g} s (timeout)")
            if timeout
            else None
        )
        gauge = self.metrics.active_streams.labels("queries")
        gauge.inc()
        try:
            first = await pipe.recv()
            if isinstance(first, _QueryFailed):
                return _error_response(first.status, first.message)
            stream = await _Stream.open(request, self.settings.write_timeout)
            item: _QueryItem = first
            try:
                while isinstance(item, bytes):
                    await stream.write(item)
                    item = await pipe.recv()
            except _ClientGone as e:
                if e.slow:
                    self.metrics.slow_clients.labels("queries").inc()
                return stream.response
            await stream.finish()
            return stream.response
        finally:
            gauge.dec()
            if timer is not None:
                timer.cancel()
            pipe.close()

    # ------------------------------------------------------------------------------------ subscriptions

    def _subs(self) -> SubscriptionManager:
        if self.subs is None:
            raise ApiError(503, "subscriptions are not available on this agent")
        return self.subs

    @staticmethod
    def _sub_params(request: web.Request) -> tuple[int | None, bool]:
        raw = request.query.get("from")
        from_: int | None = None
        if raw is not None:
            try:
                from_ = int(raw)
            except ValueError:
                raise ApiError(400, f"from must be a change id (an integer), got {raw!r}") from None
            if from_ < 0:
                raise ApiError(400, "from must not be negative")
        skip = request.query.get("skip_rows", "false").lower()
        if skip not in ("true", "false", "1", "0", ""):
            raise ApiError(400, f"skip_rows must be true or false, got {skip!r}")
        # Corrosion treats from=0 as "from the start": the rows again, then every change.
        return (from_ or None), skip in ("true", "1")

    async def _subscribe(self, request: web.Request) -> web.StreamResponse:
        subs = self._subs()
        stmt = wire.parse_one_statement(await self._body(request))
        from_, skip_rows = self._sub_params(request)
        params: Any = stmt.named_params if stmt.named_params is not None else stmt.params
        try:
            sub, created = await self.threads.in_reader(subs.subscribe, stmt.sql, params)
        except SubscriptionError as e:
            raise ApiError(400, str(e)) from None
        except sqlite3.Error as e:
            raise ApiError(sql_error_status(e), _describe_read_error(e)) from None
        if created and from_ is not None:
            raise ApiError(400, "a `from` query param was supplied, but no existing subscription found")
        return await self._stream_subscription(request, sub, from_, skip_rows, _sub_hash(sub))

    async def _subscription_by_id(self, request: web.Request) -> web.StreamResponse:
        subs = self._subs()
        sub_id = request.match_info["id"]
        from_, skip_rows = self._sub_params(request)
        sub = subs.get(sub_id)
        if sub is None:
            raise ApiError(404, f"could not find subscription with id {sub_id}")
        return await self._stream_subscription(request, sub, from_, skip_rows, _sub_hash(sub))

    async def _stream_subscription(
        self, request: web.Request, sub: Subscription, from_: int | None, skip_rows: bool, query_hash: str
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        feed = _EventFeed(loop, self.settings.client_queue_events)
        listener: Callable[[list[ChangeEvent]], None] = feed.push_threadsafe
        gauge = self.metrics.active_streams.labels("subscriptions")
        rows_counter = self.metrics.rows_streamed.labels("subscriptions")
        # Listen first, then read the starting point: changes made in between are in the feed and the
        # ones the starting point already covers are dropped by change id.
        sub.add_listener(listener)
        self._streams.add(feed)
        gauge.inc()
        stream: _Stream | None = None
        try:
            stream = await _Stream.open(
                request,
                self.settings.write_timeout,
                {wire.QUERY_ID_HEADER: sub.id, wire.QUERY_HASH_HEADER: query_hash},
            )
            try:
                if from_ is not None:
                    last = await self._send_changes_since(stream, sub, from_)
                elif skip_rows:
                    last = sub.change_id
                else:
                    t0 = time.perf_counter()
                    rows, last = await self.threads.in_reader(sub.snapshot)
                    elapsed = time.perf_counter() - t0
                    await stream.write(wire.encode_event(wire.Columns(list(sub.columns))))
                    await self._send_rows(stream, rows)
                    rows_counter.inc(len(rows))
                    await stream.write(wire.encode_event(wire.EndOfQuery(elapsed, last)))
                await self._follow(stream, sub, feed, last)
            except GapError as e:
                await stream.try_write(wire.encode_event(wire.Error(str(e))))
            except _SlowClient:
                await self._too_slow(
                    stream,
                    "subscriptions",
                    f"subscriber too slow: more than {self.settings.client_queue_events} events "
                    f"pending; resume with GET /v1/subscriptions/{sub.id}?from=<last change id>",
                )
            except (SubscriptionError, StoreError, sqlite3.Error) as e:
                await stream.try_write(wire.encode_event(wire.Error(str(e))))
            await stream.finish()
            return stream.response
        except ConnectionError as e:
            return self._client_gone(e, stream, "subscriptions")
        finally:
            feed.closed = True
            sub.remove_listener(listener)
            self._streams.discard(feed)
            gauge.dec()

    async def _too_slow(self, stream: _Stream, endpoint: str, message: str) -> None:
        """A client fell too far behind its bounded queue: count it and tell it why it is cut off."""
        self.metrics.slow_clients.labels(endpoint).inc()
        await stream.try_write(wire.encode_event(wire.Error(message)))

    def _client_gone(self, e: ConnectionError, stream: _Stream | None, endpoint: str) -> web.StreamResponse:
        """The client went away mid-stream: end the response quietly (re-raise before it started)."""
        if isinstance(e, _ClientGone) and e.slow:
            self.metrics.slow_clients.labels(endpoint).inc()
        if stream is None:
            raise e
        return stream.response

    async def _send_rows(self, stream: _Stream, rows: Sequence[tuple[int, Sequence[SqlValue]]]) -> None:
        buf = bytearray()
        limit = self.settings.stream_chunk_bytes
        for rowid, values in rows:
            buf += wire.encode_row(rowid, values)
            if len(buf) >= limit:
                await stream.write(bytes(buf))
                buf.clear()
        await stream.write(bytes(buf))

    async def _send_changes_since(self, stream: _Stream, sub: Subscription, after: int) -> int:
        """Send the kept changes after ``after``; GapError if they are no longer kept."""
        changes = await self.threads.in_reader(sub.changes_since, after)
        last = after
        buf = bytearray()
        for ev in changes:
            if ev.change_id <= last:
                continue
            buf += wire.encode_change(ev.kind, ev.rowid, ev.values, ev.change_id)
            last = ev.change_id
            if len(buf) >= self.settings.stream_chunk_bytes:
                await stream.write(bytes(buf))
                buf.clear()
        await stream.write(bytes(buf))
        return last

    async def _follow(self, stream: _Stream, sub: Subscription, feed: _EventFeed, last: int) -> None:
        """Forward the feed's changes after ``last`` until the server closes or the client leaves."""
        while not self._closing.is_set():
            await feed.wait(_IDLE_CHECK)
            if stream.gone:
                return
            events: list[ChangeEvent] = feed.take()
            buf = bytearray()
            for ev in events:
                if ev.change_id <= last:
                    continue  # already sent (with the rows, or while catching up)
                if ev.change_id != last + 1:
                    # Never leave a gap: fetch what is missing from the subscription's kept changes.
                    await stream.write(bytes(buf))
                    buf.clear()
                    last = await self._send_changes_since(stream, sub, last)
                    if ev.change_id <= last:
                        continue
                buf += wire.encode_change(ev.kind, ev.rowid, ev.values, ev.change_id)
                last = ev.change_id
            await stream.write(bytes(buf))

    # ------------------------------------------------------------------------------------ updates

    async def _updates_stream(self, request: web.Request) -> web.StreamResponse:
        table = request.match_info["table"]
        if table not in self.store.schema.tables:
            raise ApiError(404, f"unknown table {table!r}: not a table of the schema")
        feed = _EventFeed(asyncio.get_running_loop(), self.settings.client_queue_events)
        gauge = self.metrics.active_streams.labels("updates")
        self._updates.watch(table, feed)
        self._streams.add(feed)
        gauge.inc()
        stream: _Stream | None = None
        try:
            stream = await _Stream.open(request, self.settings.write_timeout)
            try:
                while not self._closing.is_set():
                    await feed.wait(_IDLE_CHECK)
                    if stream.gone:
                        break
                    events: list[wire.Notify | wire.Error] = feed.take()
                    await stream.write(b"".join(wire.encode_event(e) for e in events))
                    if any(isinstance(e, wire.Error) for e in events):
                        break
            except _SlowClient:
                await self._too_slow(
                    stream,
                    "updates",
                    f"client too slow: more than {self.settings.client_queue_events} updates pending",
                )
            await stream.finish()
            return stream.response
        except ConnectionError as e:
            return self._client_gone(e, stream, "updates")
        finally:
            feed.closed = True
            self._updates.unwatch(table, feed)
            self._streams.discard(feed)
            gauge.dec()

    # ------------------------------------------------------------------------------------ health, stats

    async def _health(self, request: web.Request) -> web.StreamResponse:
        def thresholds(name: str, kind: type[int] | type[float]) -> float | None:
            raw = request.query.get(name)
            if raw is None:
                return None
            try:
                return kind(raw)
            except ValueError:
                raise ApiError(400, f"{name} must be a number, got {raw!r}") from None

        max_gaps = thresholds("gaps", int)
        max_lag = thresholds("p99_lag", float)
        max_queue = thresholds("queue_size", int)
        failure_status = int(thresholds("failure_status", int) or 503)

        def gap_count() -> int:
            return sum(e - s + 1 for ranges in self.store.needs().values() for s, e in ranges)

        gaps = await self.threads.write(gap_count)
        p99_lag = 0.0
        queue_size = self._queue_size()
        healthy = not (
            (max_gaps is not None and gaps > max_gaps)
            or (max_lag is not None and p99_lag > max_lag)
            or (max_queue is not None and queue_size > max_queue)
        )
        body = {
            "response": {
                "gaps": gaps,
                "members": self._members(),
                "p99_lag": p99_lag,
                "queue_size": queue_size,
            }
        }
        return _json_response(200 if healthy else failure_status, body)

    async def _table_stats(self, request: web.Request) -> web.StreamResponse:
        tables = wire.parse_table_stats_request(await self._body(request))
        total, invalid = await self.threads.write(self.store.table_stats, tables)
        return _json_response(200, {"total_row_count": total, "invalid_tables": invalid})


# ---------------------------------------------------------------------------------------- queries


@dataclass(frozen=True)
class _QueryFailed:
    status: int
    message: str


_QueryItem = bytes | _QueryFailed | None
"""What a query's reader thread sends: the first item is the columns event (bytes) or a failure,
then chunks of rows, then ``None`` at the end."""


def _run_query(
    conn: sqlite3.Connection,
    stmt: Statement,
    pipe: ChunkPipe[_QueryItem],
    chunk_bytes: int,
    count_rows: Callable[[int], None],
) -> None:
    """Run one query on a reader thread and stream its events into ``pipe``: the columns event or a
    failure first, then chunks of rows, the ``eoq`` event (or an ``error`` event) and ``None``."""
    pipe.attach(conn)
    cur: sqlite3.Cursor | None = None
    started = False
    try:
        params: Any = stmt.named_params if stmt.named_params is not None else (stmt.params or ())
        t0 = time.perf_counter()
        try:
            cur = conn.execute(stmt.sql, params)
        except (sqlite3.Error, ValueError, OverflowError) as e:
            if pipe.interrupt_reason:
                failure = _QueryFailed(408, pipe.interrupt_reason)
            else:
                status = sql_error_status(e) if isinstance(e, sqlite3.Error) else 400
                failure = _QueryFailed(status, _describe_read_error(e))
            pipe.send(failure)
            return
        elapsed = time.perf_counter() - t0
        columns = [d[0] for d in cur.description] if cur.description else []
        started = True
        if not pipe.send(wire.encode_event(wire.Columns(columns))):
            return
        buf = bytearray()
        rowid = 1
        sent = 0
        try:
            while True:
                rows = cur.fetchmany(256)
                if not rows:
                    break
                for row in rows:
                    buf += wire.encode_row(rowid, row)
                    rowid += 1
                if len(buf) >= chunk_bytes:
                    count_rows(rowid - 1 - sent)
                    sent = rowid - 1
                    if not pipe.send(bytes(buf)):
                        return
                    buf.clear()
            buf += wire.encode_event(wire.EndOfQuery(elapsed))
        except (sqlite3.Error, ValueError, OverflowError) as e:
            buf += wire.encode_event(wire.Error(pipe.interrupt_reason or str(e)))
        count_rows(rowid - 1 - sent)
        if pipe.send(bytes(buf)):
            pipe.send(None)
    except Exception as e:  # a bug, not bad input: report it and keep the thread alive
        log.exception("query failed")
        if started:
            if pipe.send(wire.encode_event(wire.Error(f"internal error: {e}"))):
                pipe.send(None)
        else:
            pipe.send(_QueryFailed(500, f"internal error: {e}"))
    finally:
        if cur is not None:
            cur.close()
        pipe.detach()


# ---------------------------------------------------------------------------------------- updates


class _UpdatesHub:
    """Feeds ``/v1/updates/{table}`` streams from the store's commit notices.

    The commit listener runs on the writer thread right after a commit, so it only filters the notice
    down to watched tables and hands it to the loop. A single dispatcher task then handles notices in
    commit order: it checks on a reader which of the changed primary keys still exist (``update``) and
    which do not (``delete``) and fans the events out to each watcher's bounded feed. If dispatch falls
    behind by more than ``updates_queue_commits`` commits, every watcher is sent an error and dropped
    rather than given a silent gap.
    """

    def __init__(self, server: ApiServer) -> None:
        self._server = server
        self._watchers: dict[str, set[_EventFeed]] = {}
        self._watched: frozenset[str] = frozenset()
        self._queue: deque[dict[str, set[PkTuple]]] = deque()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._server.store.add_commit_listener(self._on_commit)
        self._task = asyncio.create_task(self._dispatch(), name="vd-updates-dispatch")

    async def stop(self) -> None:
        self._server.store.remove_commit_listener(self._on_commit)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def watch(self, table: str, feed: _EventFeed) -> None:
        self._watchers.setdefault(table, set()).add(feed)
        self._watched = frozenset(self._watchers)

    def unwatch(self, table: str, feed: _EventFeed) -> None:
        feeds = self._watchers.get(table)
        if feeds is not None:
            feeds.discard(feed)
            if not feeds:
                del self._watchers[table]
        self._watched = frozenset(self._watchers)

    def _on_commit(self, notice: CommitNotice) -> None:
        # Writer thread: cheap filtering only.
        watched = self._watched
        tables = {t: pks for t, pks in notice.tables.items() if t in watched}
        if tables and self._loop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._enqueue, tables)

    def _enqueue(self, tables: dict[str, set[PkTuple]]) -> None:
        if len(self._queue) >= self._server.settings.updates_queue_commits:
            self._queue.clear()
            for feeds in self._watchers.values():
                for feed in feeds:
                    feed.push([wire.Error("updates fell behind; events were dropped, reconnect")])
            return
        self._queue.append(tables)
        self._wake.set()

    async def _dispatch(self) -> None:
        while True:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            tables = self._queue.popleft()
            for table, pks in tables.items():
                feeds = self._watchers.get(table)
                if not feeds:
                    continue
                try:
                    events = await self._server.threads.read(
                        functools.partial(_notify_events, store=self._server.store, table=table, pks=pks)
                    )
                except (sqlite3.Error, StoreError) as e:
                    log.error("updates for %s: %s", table, e)
                    events = [wire.Error(f"could not read {table}: {e}")]
                for feed in list(self._watchers.get(table, ())):
                    feed.push(events)


def _notify_events(
    conn: sqlite3.Connection, store: Store, table: str, pks: set[PkTuple]
) -> list[wire.Notify | wire.Error]:
    """``update`` for primary keys whose row exists now, ``delete`` for the others, in a stable order."""
    spec = store.schema.tables.get(table)
    if spec is None:
        return [wire.Error(f"table {table!r} is no longer in the schema")]
    pk_cols = spec.pk
    ordered = sorted(pks, key=lambda pk: tuple(value_key(v) for v in pk))
    existing: set[PkTuple] = set()
    cols = ", ".join(quote_ident(c) for c in pk_cols)
    one = "(" + ", ".join("?" for _ in pk_cols) + ")"
    step = max(1, 900 // max(1, len(pk_cols)))
    for i in range(0, len(ordered), step):
        part = ordered[i : i + step]
        sql = f"SELECT {cols} FROM {quote_ident(table)} WHERE ({cols}) IN (VALUES {', '.join([one] * len(part))})"
        for row in conn.execute(sql, [v for pk in part for v in pk]):
            existing.add(tuple(row))
    return [wire.Notify("update" if pk in existing else "delete", list(pk)) for pk in ordered]


def _excerpt(sql: str, limit: int = 80) -> str:
    one_line = " ".join(sql.split())
    return one_line if len(one_line) <= limit else one_line[: limit - 3] + "..."


def _sub_hash(sub: Subscription) -> str:
    params: Any = sub.params
    if isinstance(params, dict):
        stmt = Statement(sql=sub.sql, named_params=dict(params))
    elif params:
        stmt = Statement(sql=sub.sql, params=list(params))
    else:
        stmt = Statement(sql=sub.sql)
    return wire.statement_hash(stmt)


def _endpoint(request: web.Request) -> str:
    """The route's pattern (``/v1/subscriptions/{id}``), so metrics labels stay few."""
    route = request.match_info.route
    resource = route.resource
    if resource is None:
        return "unmatched"
    return resource.canonical
