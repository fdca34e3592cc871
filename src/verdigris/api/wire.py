"""JSON shapes of the agent's HTTP API, compatible with Corrosion's.

Corrosion's types are Rust enums serialized by serde, so the wire format is serde's:

* A **statement** is ``"sql"``, ``["sql", [params...]]``, ``["sql", {"name": value}]`` or
  ``{"query": "sql", "params": [...], "named_params": {...}}`` (serde's untagged ``Statement``).
* A **SQL value** is JSON ``null``, a number, a string, or, for a blob, an array of byte values
  (serde's default for ``Vec<u8>``): ``x'0aff'`` is ``[10, 255]``. Both directions use that form.
* Stream **events** are externally tagged, one JSON object per line (NDJSON)::

    {"columns": ["id", "name"]}
    {"row": [1, [7, "web"]]}
    {"eoq": {"time": 0.0001, "change_id": 3}}
    {"change": ["update", 1, [7, "api"], 4]}
    {"notify": ["delete", [7]]}
    {"error": "what went wrong"}

Everything here is pure (no I/O) so the server, the client and the tests share one definition of the
format. Parsing is strict about shapes and names the offending part in :class:`WireError`'s message,
because the message goes back to the API's caller as is.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeAlias

import msgspec

from verdigris.store.types import SqlValue, Statement

QUERY_ID_HEADER: Final = "corro-query-id"
"""Response header of ``/v1/subscriptions`` naming the subscription (Corrosion's name)."""
QUERY_HASH_HEADER: Final = "corro-query-hash"
"""Response header with a hash of the subscription's statement (Corrosion's name)."""

INT64_MIN: Final = -(2**63)
INT64_MAX: Final = 2**63 - 1

_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder()


class WireError(ValueError):
    """A request body does not have the expected shape. The message says where and why."""


# --------------------------------------------------------------------------------------------------
# Requests


def decode_json(body: bytes) -> Any:
    """Decode a JSON document; a malformed one raises :class:`WireError`."""
    if not body.strip():
        raise WireError("empty body: expected JSON")
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as e:
        raise WireError(f"malformed JSON: {e}") from None


def parse_param(value: Any, where: str) -> SqlValue:
    """One statement parameter as a value SQLite can bind, following Corrosion's ``SqliteParam``.

    ``true``/``false`` bind as 1/0, an array of integers 0-255 is a blob, and any other array or object
    binds as its JSON text (Corrosion's ``Json`` variant, handy for JSON columns). An integer outside
    SQLite's 64-bit range is refused rather than silently rounded to a float.
    """
    if value is None or isinstance(value, str | float):
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        if not INT64_MIN <= value <= INT64_MAX:
            raise WireError(f"{where}: integer {value} does not fit in 64 bits (SQLite's INTEGER)")
        return value
    if isinstance(value, list):
        if all(type(b) is int and 0 <= b <= 255 for b in value):
            return bytes(value)
        return _encoder.encode(value).decode()
    if isinstance(value, dict):
        return _encoder.encode(value).decode()
    raise WireError(f"{where}: unsupported parameter type {type(value).__name__}")  # pragma: no cover


def _parse_params(value: Any, where: str) -> list[SqlValue]:
    if not isinstance(value, list):
        raise WireError(f"{where}: params must be an array, got {_json_type(value)}")
    return [parse_param(v, f"{where}, param {i + 1}") for i, v in enumerate(value)]


def _parse_named(value: Any, where: str) -> dict[str, SqlValue]:
    if not isinstance(value, dict):
        raise WireError(f"{where}: named_params must be an object, got {_json_type(value)}")
    out: dict[str, SqlValue] = {}
    for key, v in value.items():
        # Corrosion (rusqlite) names parameters with their prefix (":name", "@name", "$name");
        # Python's sqlite3 wants the bare name. Accept both.
        name = key[1:] if key[:1] in (":", "@", "$") else key
        if not name:
            raise WireError(f"{where}: empty parameter name {key!r}")
        if name in out:
            raise WireError(f"{where}: parameter {name!r} given twice")
        out[name] = parse_param(v, f"{where}, param {key!r}")
    return out


def parse_statement(value: Any, where: str = "statement") -> Statement:
    """One statement in any of Corrosion's four shapes (see the module docstring)."""
    if isinstance(value, str):
        return Statement(sql=_check_sql(value, where))
    if isinstance(value, list):
        if len(value) != 2 or not isinstance(value[0], str):
            raise WireError(
                f'{where}: an array statement must be ["sql", [params]] or ["sql", {{named params}}]'
            )
        sql = _check_sql(value[0], where)
        if isinstance(value[1], dict):
            return Statement(sql=sql, named_params=_parse_named(value[1], where))
        return Statement(sql=sql, params=_parse_params(value[1], where))
    if isinstance(value, dict):
        query = value.get("query")
        if not isinstance(query, str):
            raise WireError(f'{where}: an object statement needs "query" (a string)')
        params = value.get("params")
        named = value.get("named_params")
        if params is not None and named is not None:
            raise WireError(f'{where}: give "params" or "named_params", not both')
        return Statement(
            sql=_check_sql(query, where),
            params=None if params is None else _parse_params(params, where),
            named_params=None if named is None else _parse_named(named, where),
        )
    raise WireError(f'{where}: expected "sql", ["sql", params] or {{"query": ...}}, got {_json_type(value)}')


def parse_statements(body: bytes) -> list[Statement]:
    """The body of ``POST /v1/transactions``: a JSON array of at least one statement."""
    doc = decode_json(body)
    if not isinstance(doc, list):
        raise WireError(f"expected a JSON array of statements, got {_json_type(doc)}")
    if not doc:
        raise WireError("at least 1 statement is required")
    return [parse_statement(s, f"statement {i + 1}") for i, s in enumerate(doc)]


def parse_one_statement(body: bytes) -> Statement:
    """The body of ``/v1/queries`` and ``/v1/subscriptions``: one statement."""
    return parse_statement(decode_json(body))


def parse_table_stats_request(body: bytes) -> list[str]:
    """The body of ``POST /v1/table_stats``: ``{"tables": ["name", ...]}``."""
    doc = decode_json(body)
    if not isinstance(doc, dict) or not isinstance(doc.get("tables"), list):
        raise WireError('expected {"tables": ["table", ...]}')
    tables = doc["tables"]
    for i, t in enumerate(tables):
        if not isinstance(t, str):
            raise WireError(f"tables[{i}] must be a string, got {_json_type(t)}")
    return list(tables)


def _check_sql(sql: str, where: str) -> str:
    if not sql.strip():
        raise WireError(f"{where}: empty SQL")
    return sql


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__  # pragma: no cover


def statement_to_json(stmt: StatementLike) -> Any:
    """The wire form of a statement, for clients. Accepts ``"sql"``, ``("sql", [params])``,
    ``("sql", {named})`` or a :class:`~verdigris.store.types.Statement`."""
    if isinstance(stmt, str):
        return stmt
    if isinstance(stmt, Statement):
        if stmt.named_params is not None:
            return [stmt.sql, {k: value_to_json(v) for k, v in stmt.named_params.items()}]
        if stmt.params is not None:
            return [stmt.sql, [value_to_json(v) for v in stmt.params]]
        return stmt.sql
    sql, params = stmt
    if isinstance(params, Mapping):
        return [sql, {k: value_to_json(v) for k, v in params.items()}]
    return [sql, [value_to_json(v) for v in params]]


StatementLike: TypeAlias = str | Statement | tuple[str, Sequence[Any] | Mapping[str, Any]]
"""What clients may pass as a statement."""


def statement_hash(stmt: Statement) -> str:
    """A stable hash of a statement and its parameters (sent as ``corro-query-hash``)."""
    return hashlib.sha256(_encoder.encode(statement_to_json(stmt))).hexdigest()


# --------------------------------------------------------------------------------------------------
# Values


def value_to_json(value: Any) -> Any:
    """A SQL value as JSON: blobs become arrays of byte values; everything else is unchanged."""
    if isinstance(value, bytes | bytearray | memoryview):
        return list(bytes(value))
    return value


def row_to_json(values: Sequence[Any]) -> list[Any]:
    """A row's values as JSON (see :func:`value_to_json`)."""
    return [list(v) if isinstance(v, bytes) else v for v in values]


def value_from_json(value: Any) -> SqlValue:
    """A SQL value received from the server: an array is always a blob (SQLite has no arrays)."""
    if isinstance(value, list):
        return bytes(value)
    if value is None or isinstance(value, int | float | str):
        return value
    raise WireError(f"not a SQL value: {_json_type(value)}")


# --------------------------------------------------------------------------------------------------
# Events

ChangeKind: TypeAlias = Literal["insert", "update", "delete"]
NotifyKind: TypeAlias = Literal["update", "delete"]


@dataclass(frozen=True)
class Columns:
    """The names of the result's columns; always the first event of a query or subscription."""

    columns: list[str]


@dataclass(frozen=True)
class Row:
    """One row of the result. ``rowid`` numbers rows within the result (it is not SQLite's rowid);
    a subscription's changes refer to rows by it."""

    rowid: int
    values: list[SqlValue]


@dataclass(frozen=True)
class EndOfQuery:
    """End of the rows. ``time`` is the query's execution time in seconds; ``change_id`` (subscriptions
    only) is the change id the rows reflect, to resume from."""

    time: float
    change_id: int | None = None


@dataclass(frozen=True)
class Change:
    """A row of a subscription's result was inserted, updated or deleted. ``values`` are the row's
    values (its last values for a delete); ``change_id`` increases by one per change."""

    kind: ChangeKind
    rowid: int
    values: list[SqlValue]
    change_id: int


@dataclass(frozen=True)
class Notify:
    """``/v1/updates/{table}``: the row with primary key ``pk`` changed (``update``, which includes
    inserts) or is gone (``delete``)."""

    kind: NotifyKind
    pk: list[SqlValue]


@dataclass(frozen=True)
class Error:
    """A fatal error; the stream ends after it."""

    message: str


Event: TypeAlias = Columns | Row | EndOfQuery | Change | Notify | Error


def encode_event(event: Event) -> bytes:
    """One event as an NDJSON line (with its newline)."""
    match event:
        case Row(rowid, values):
            doc: Any = {"row": (rowid, row_to_json(values))}
        case Change(kind, rowid, values, change_id):
            doc = {"change": (kind, rowid, row_to_json(values), change_id)}
        case Columns(columns):
            doc = {"columns": columns}
        case EndOfQuery(time, change_id):
            eoq: dict[str, Any] = {"time": time}
            if change_id is not None:
                eoq["change_id"] = change_id
            doc = {"eoq": eoq}
        case Notify(kind, pk):
            doc = {"notify": (kind, row_to_json(pk))}
        case Error(message):
            doc = {"error": message}
    return _encoder.encode(doc) + b"\n"


def encode_row(rowid: int, values: Sequence[Any]) -> bytes:
    """``{"row": [rowid, values]}`` + newline, without building a :class:`Row` (the hot path)."""
    return _encoder.encode({"row": (rowid, row_to_json(values))}) + b"\n"


def encode_change(kind: str, rowid: int, values: Sequence[Any], change_id: int) -> bytes:
    """``{"change": [kind, rowid, values, change_id]}`` + newline (the hot path of subscriptions)."""
    return _encoder.encode({"change": (kind, rowid, row_to_json(values), change_id)}) + b"\n"


def encode_json(doc: Any) -> bytes:
    """Any JSON document (blobs must already be arrays)."""
    return _encoder.encode(doc)


def decode_event(line: bytes | str) -> Event:
    """Parse one NDJSON event line; anything unexpected raises :class:`WireError`."""
    try:
        doc = _decoder.decode(line)
    except msgspec.DecodeError as e:
        raise WireError(f"malformed event: {e}") from None
    if not isinstance(doc, dict) or len(doc) != 1:
        raise WireError(f"malformed event: {line!r}")
    ((tag, body),) = doc.items()
    try:
        match tag:
            case "row":
                rowid, values = body
                return Row(int(rowid), [value_from_json(v) for v in values])
            case "change":
                kind, rowid, values, change_id = body
                if kind not in ("insert", "update", "delete"):
                    raise WireError(f"unknown change kind {kind!r}")
                return Change(kind, int(rowid), [value_from_json(v) for v in values], int(change_id))
            case "columns":
                return Columns([str(c) for c in body])
            case "eoq":
                cid = body.get("change_id")
                return EndOfQuery(float(body["time"]), None if cid is None else int(cid))
            case "notify":
                kind, pk = body
                if kind not in ("update", "delete"):
                    raise WireError(f"unknown notify kind {kind!r}")
                return Notify(kind, [value_from_json(v) for v in pk])
            case "error":
                return Error(str(body))
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        if isinstance(e, WireError):
            raise
        raise WireError(f"malformed {tag!r} event: {line!r}") from None
    raise WireError(f"unknown event {tag!r}")


# --------------------------------------------------------------------------------------------------
# Responses


def actor_id_str(site_id: bytes) -> str:
    """A 16-byte site id in Corrosion's ``actor_id`` form (a hyphenated UUID)."""
    return str(uuid.UUID(bytes=site_id)) if len(site_id) == 16 else site_id.hex()


@dataclass(frozen=True)
class ExecResult:
    """One statement's outcome in an :class:`ExecResponse`: ``rows_affected`` and ``time``, or
    ``error``."""

    rows_affected: int = 0
    time: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class ExecResponse:
    """The response of ``POST /v1/transactions``."""

    results: list[ExecResult]
    time: float
    version: int | None = None
    actor_id: str | None = None

    @classmethod
    def from_json(cls, doc: Any) -> ExecResponse:
        if not isinstance(doc, dict) or not isinstance(doc.get("results"), list):
            raise WireError("malformed transaction response")
        results = [
            ExecResult(error=str(r["error"]))
            if "error" in r
            else ExecResult(rows_affected=int(r["rows_affected"]), time=float(r["time"]))
            for r in doc["results"]
        ]
        version = doc.get("version")
        return cls(
            results=results,
            time=float(doc.get("time", 0.0)),
            version=None if version is None else int(version),
            actor_id=doc.get("actor_id"),
        )
