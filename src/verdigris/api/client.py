"""An asyncio client for the agent's HTTP API (and Corrosion's, which it mirrors).

::

    async with CorrosionClient("http://127.0.0.1:8080", token="s3cret") as client:
        await client.transaction([("INSERT INTO apps (name) VALUES (?)", ["web"])])
        columns, rows = await client.rows("SELECT name FROM apps")
        async with client.subscribe("SELECT name FROM apps") as sub:
            async for event in sub:          # Columns, Row..., EndOfQuery, then Change...
                ...
            # after a disconnect: client.subscribe_by_id(sub.id, from_=sub.last_change_id)

Streams are read line by line as they arrive; an ``{"error": ...}`` event raises :class:`StreamError`
(Corrosion's guidance: error events are fatal), an HTTP error status raises :class:`ApiError`.
"""

from __future__ import annotations

import types
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, Final

import aiohttp

from verdigris.api import wire
from verdigris.api.wire import (
    Change,
    Columns,
    EndOfQuery,
    Event,
    ExecResponse,
    Notify,
    Row,
    StatementLike,
)
from verdigris.store.types import SqlValue

MAX_LINE: Final = 256 * 1024 * 1024
"""The longest event line accepted (a row holding a huge blob); longer means a broken server."""


class ApiError(Exception):
    """The API answered with an error status; ``message`` is the server's ``error`` text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


class StreamError(ApiError):
    """A stream ended with an ``{"error": ...}`` event."""

    def __init__(self, message: str) -> None:
        super().__init__(200, message)


async def _raise_for_status(resp: aiohttp.ClientResponse) -> None:
    if resp.status < 400:
        return
    body = await resp.read()
    message = body.decode("utf-8", "replace")
    try:
        doc = wire.decode_json(body)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            message = doc["error"]
        elif isinstance(doc, dict) and doc.get("results"):
            message = str(doc["results"][0].get("error", message))
    except wire.WireError:
        pass
    raise ApiError(resp.status, message)


async def _lines(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The response body's lines as they arrive (no line-length limit below :data:`MAX_LINE`)."""
    buf = bytearray()
    async for chunk in resp.content.iter_any():
        buf += chunk
        start = 0
        while (end := buf.find(b"\n", start)) >= 0:
            line = bytes(buf[start:end])
            start = end + 1
            if line.strip():
                yield line
        del buf[:start]
        if len(buf) > MAX_LINE:
            raise StreamError(f"event line longer than {MAX_LINE} bytes")
    if buf.strip():
        yield bytes(buf)


class EventStream:
    """An open NDJSON stream: an async iterator of :mod:`~verdigris.api.wire` events and an async
    context manager that closes the connection. ``query_id`` is the ``corro-query-id`` header;
    ``last_change_id`` the newest change id seen (to resume a subscription with ``from_``)."""

    def __init__(self, opener: Any) -> None:
        self._opener = opener
        self._resp: aiohttp.ClientResponse | None = None
        self._iter: AsyncIterator[bytes] | None = None
        self.query_id: str | None = None
        self.query_hash: str | None = None
        self.last_change_id: int | None = None

    @property
    def id(self) -> str:
        """The subscription's id (raises if the stream has no ``corro-query-id``)."""
        if self.query_id is None:
            raise ApiError(0, "the response carried no corro-query-id")
        return self.query_id

    async def open(self) -> EventStream:
        if self._resp is None:
            resp: aiohttp.ClientResponse = await self._opener()
            try:
                await _raise_for_status(resp)
            except BaseException:
                resp.release()
                raise
            self._resp = resp
            self.query_id = resp.headers.get(wire.QUERY_ID_HEADER)
            self.query_hash = resp.headers.get(wire.QUERY_HASH_HEADER)
            self._iter = _lines(resp)
        return self

    async def __aenter__(self) -> EventStream:
        return await self.open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._resp is not None:
            self._resp.close()

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> Event:
        await self.open()
        assert self._iter is not None
        try:
            line = await self._iter.__anext__()
        except aiohttp.ClientPayloadError as e:
            raise StreamError(f"stream broken: {e}") from None
        event = wire.decode_event(line)
        if isinstance(event, wire.Error):
            raise StreamError(event.message)
        if isinstance(event, Change) or (isinstance(event, EndOfQuery) and event.change_id is not None):
            self.last_change_id = event.change_id
        return event


class CorrosionClient:
    """A client of one agent's API at ``base_url`` (``http://host:port``)."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        session: aiohttp.ClientSession | None = None,
        timeout: float | None = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session = session
        self._own_session = session is None
        self._timeout = timeout

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._own_session = True
        return self._session

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> CorrosionClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        await self.close()

    def _request_timeout(self, streaming: bool) -> aiohttp.ClientTimeout:
        if streaming:  # streams may stay quiet for long; only connecting is bounded
            return aiohttp.ClientTimeout(total=None, connect=self._timeout, sock_connect=self._timeout)
        return aiohttp.ClientTimeout(total=self._timeout)

    async def _post_json(self, path: str, doc: Any) -> Any:
        async with self._http().post(
            self.base_url + path,
            data=wire.encode_json(doc),
            headers={**self._headers, "Content-Type": "application/json"},
            timeout=self._request_timeout(False),
        ) as resp:
            await _raise_for_status(resp)
            return wire.decode_json(await resp.read())

    def _stream(
        self, method: str, path: str, body: Any = None, params: Mapping[str, str] | None = None
    ) -> EventStream:
        async def opener() -> aiohttp.ClientResponse:
            return await self._http().request(
                method,
                self.base_url + path,
                data=None if body is None else wire.encode_json(body),
                params=params,
                headers={**self._headers, "Content-Type": "application/json"},
                timeout=self._request_timeout(True),
            )

        return EventStream(opener)

    # ------------------------------------------------------------------------------------ endpoints

    async def transaction(self, statements: Sequence[StatementLike]) -> ExecResponse:
        """Run ``statements`` in one transaction (``POST /v1/transactions``)."""
        doc = await self._post_json("/v1/transactions", [wire.statement_to_json(s) for s in statements])
        return ExecResponse.from_json(doc)

    def query(self, statement: StatementLike, *, timeout_minutes: float | None = None) -> EventStream:
        """Stream a read-only query's events: :class:`Columns`, :class:`Row`..., :class:`EndOfQuery`."""
        params = None if timeout_minutes is None else {"timeout": f"{timeout_minutes:g}"}
        return self._stream("POST", "/v1/queries", wire.statement_to_json(statement), params)

    async def rows(self, statement: StatementLike) -> tuple[list[str], list[list[SqlValue]]]:
        """A query's column names and all its rows (for results that fit in memory)."""
        columns: list[str] = []
        rows: list[list[SqlValue]] = []
        async with self.query(statement) as stream:
            async for event in stream:
                if isinstance(event, Columns):
                    columns = event.columns
                elif isinstance(event, Row):
                    rows.append(event.values)
        return columns, rows

    def subscribe(
        self, statement: StatementLike, *, from_: int | None = None, skip_rows: bool = False
    ) -> EventStream:
        """Subscribe to a query (``POST /v1/subscriptions``): rows, ``eoq``, then changes."""
        return self._stream(
            "POST", "/v1/subscriptions", wire.statement_to_json(statement), _sub_params(from_, skip_rows)
        )

    def subscribe_by_id(
        self, sub_id: str, *, from_: int | None = None, skip_rows: bool = False
    ) -> EventStream:
        """Re-attach to an existing subscription (``GET /v1/subscriptions/{id}``); with ``from_``
        only the changes after that change id."""
        return self._stream("GET", f"/v1/subscriptions/{sub_id}", None, _sub_params(from_, skip_rows))

    def updates(self, table: str) -> EventStream:
        """Primary keys of ``table``'s changed rows as :class:`Notify` events (``POST /v1/updates/{table}``)."""
        return self._stream("POST", f"/v1/updates/{table}")

    async def health(self, **thresholds: float) -> tuple[bool, dict[str, Any]]:
        """``GET /v1/health``: (healthy, the ``response`` object). Thresholds (``gaps``, ``p99_lag``,
        ``queue_size``) make the agent answer unhealthy when exceeded."""
        async with self._http().get(
            self.base_url + "/v1/health",
            params={k: f"{v:g}" for k, v in thresholds.items()},
            headers=self._headers,
            timeout=self._request_timeout(False),
        ) as resp:
            body = wire.decode_json(await resp.read())
            if resp.status == 401 or not isinstance(body, dict) or "response" not in body:
                message = body.get("error", str(body)) if isinstance(body, dict) else str(body)
                raise ApiError(resp.status, message)
            return resp.status == 200, body["response"]

    async def table_stats(self, tables: Sequence[str] = ()) -> tuple[int, list[str]]:
        """``POST /v1/table_stats``: total rows of ``tables`` and the names that are not tables."""
        doc = await self._post_json("/v1/table_stats", {"tables": list(tables)})
        return int(doc["total_row_count"]), list(doc["invalid_tables"])


def _sub_params(from_: int | None, skip_rows: bool) -> dict[str, str]:
    params: dict[str, str] = {}
    if from_ is not None:
        params["from"] = str(from_)
    if skip_rows:
        params["skip_rows"] = "true"
    return params


__all__ = [
    "ApiError",
    "Change",
    "Columns",
    "CorrosionClient",
    "EndOfQuery",
    "EventStream",
    "ExecResponse",
    "Notify",
    "Row",
    "StreamError",
]
