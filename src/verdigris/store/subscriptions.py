"""Corrosion-compatible subscriptions: a SELECT whose result set is kept up to date, incrementally.

What a client sees (the HTTP layer turns these into Corrosion's NDJSON events)::

    {"columns": [...]}                      Subscription.columns
    {"row": [rowid, [values]]} ...          Subscription.snapshot() rows
    {"eoq": {"time": t, "change_id": n}}    Subscription.snapshot() change id
    {"change": [kind, rowid, [values], id]} ChangeEvent, to listeners and from changes_since()

How matching works (the approach Corrosion takes, re-derived here):

* The query is parsed with sqlglot (dialect ``sqlite``) for analysis only. Every table in FROM/JOIN must be
  a schema table; for each *occurrence* of a table (a self-join has two) hidden primary-key columns are
  spliced into the select list, so every result row is keyed by the primary keys of the source rows it was
  made from. The user's SQL text is otherwise kept verbatim (edits are made at token boundaries), so SQLite
  sees exactly the expressions the user wrote: same semantics and same column names.
* A commit touching table ``T`` with primary keys ``P`` can only change result rows whose ``T`` occurrence
  has a key in ``P``. For each such occurrence the query is re-run restricted to ``alias.pk IN (P)`` and
  diffed against the stored rows whose key has those pks, giving insert / update / delete events. The work
  is proportional to the rows touched, not to the table.
* A table on the nullable side of a LEFT JOIN is special: a change there can also make or unmake a
  null-extended row, which has no key for that table. Such changes are widened to the rows of the first
  FROM table (the "anchor", which is never null-extended) that join the changed rows, before or after the
  change, and those anchor rows are re-evaluated whole.
* Queries the rewrite cannot keep exact incrementally are refused with :class:`SubscriptionError`:
  aggregates, GROUP BY, HAVING, DISTINCT, LIMIT/OFFSET, compound SELECTs, window functions, WITH, subqueries
  anywhere (a subquery's table can change any result row), RIGHT/FULL joins, table-valued functions and
  tables outside the schema. Corrosion refuses most of these too.

State: each subscription has its own SQLite file ``<state_dir>/<id>.db`` (never in the replicated database)
holding the query, the current result rows (stable rowid, hidden key, values) and a bounded log of recent
change events, so ``changes_since`` can replay and a restart loses nothing: on start every subscription is
reloaded and re-diffed in full once (commits may have happened while it was down), and the differences are
logged as new change events.

Batching: commits that arrive while the matcher is busy are matched together, so a row changed several
times in between yields one event with its latest values (Corrosion batches changed keys the same way, for
up to 600 ms; here a batch is simply whatever accumulated during the previous pass, so an idle matcher
reacts to each commit at once).

Threads: the store calls :meth:`SubscriptionManager._on_commit` on the writer's thread right after each
commit; it only merges the touched keys into a bounded pending set (O(keys), no SQL) and wakes the matcher
thread, which batches whatever accumulated, runs the restricted queries on a read-only connection from
``store.open_reader()`` and calls listeners. The writer is never blocked by matching. If the pending set
overflows, the affected tables are marked and their subscriptions are re-diffed in full instead: no event
is ever dropped silently.
"""

from __future__ import annotations

import builtins
import concurrent.futures
import itertools
import logging
import math
import sqlite3
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeAlias

import msgspec
import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.tokenizer_core import Token, TokenType

from verdigris.store.schema import Schema, quote_ident
from verdigris.store.store import CommitNotice, Store
from verdigris.store.types import SqlValue, StoreError
from verdigris.watchdog.rwlock import RWLock

log = logging.getLogger(__name__)

Key: TypeAlias = tuple[SqlValue, ...]
"""Primary-key values: of one table row, or the hidden key of a result row (all occurrences)."""
Params: TypeAlias = list[Any] | dict[str, Any] | None
ChangeKind: TypeAlias = Literal["insert", "update", "delete"]
Rows: TypeAlias = list[tuple[int, tuple[SqlValue, ...]]]

STATE_FORMAT = 1
"""Version of the per-subscription state file layout."""
_CHUNK = 250
"""Keys per restricted query. Composite keys become an OR of ANDs, and SQLite's expression depth is 1000."""
_PROGRESS_STEP = 100
"""SQLite VM instructions between progress-handler calls (work counter and query deadline)."""
_LISTENERS_LOCK_TIMEOUT = 30.0
"""Bound on waiting for a subscription's listener list (held for a list copy or an append only)."""
_AGG_OPCODES = frozenset({"AggStep", "AggStep1", "AggFinal", "AggValue", "AggInverse"})
_SQLITE_AGGREGATES = frozenset(
    {
        "avg",
        "count",
        "group_concat",
        "json_group_array",
        "json_group_object",
        "jsonb_group_array",
        "jsonb_group_object",
        "string_agg",
        "sum",
        "total",
    }
)
_JOIN_WORDS = frozenset(
    {TokenType.NATURAL, TokenType.LEFT, TokenType.RIGHT, TokenType.FULL, TokenType.INNER, TokenType.CROSS}
)
_VERBATIM_TOKENS = frozenset(
    {TokenType.VAR, TokenType.IDENTIFIER, TokenType.STRING, TokenType.NUMBER, TokenType.HEX_STRING}
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder()


class SubscriptionError(StoreError):
    """A query cannot be subscribed to (bad SQL, not read-only, not incrementally maintainable), or a
    subscription request is invalid. The message is meant for the user."""


class GapError(SubscriptionError):
    """The requested change id is no longer kept in the change log (or is in the future): the client must
    start over from a snapshot rather than silently miss changes."""


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One change of a subscription's result set (Corrosion's ``{"change": [kind, rowid, values, id]}``)."""

    kind: ChangeKind
    rowid: int
    """The subscription's stable id of the result row (kept across updates, never reused)."""
    values: tuple[SqlValue, ...]
    """All column values; for a delete, the row's last values."""
    change_id: int
    """Strictly increasing by 1 per event of this subscription."""


@dataclass
class SubscriptionStats:
    """Counters of the matching work done for one subscription (observability, and tests of incrementality)."""

    batches: int = 0
    """Incremental matching passes."""
    full_rediffs: int = 0
    """Full re-runs of the query (restart catch-up, pending-set overflow, recovery from an error)."""
    rows_examined: int = 0
    """Result rows read back from the replicated database plus stored rows read from the state file."""
    vm_steps: int = 0
    """SQLite virtual-machine instructions spent in queries on the replicated database (in steps of 100):
    grows with rows scanned, so a full table scan shows up even when it returns nothing."""
    events: int = 0
    errors: int = 0
    last_error: str | None = None
    last_match_seconds: float = 0.0


# ------------------------------------------------------------------------------------------------ analysis


@dataclass(frozen=True)
class _Occurrence:
    """One table reference in FROM/JOIN."""

    index: int
    table: str
    """The schema's name of the table (as the store names it in commit notices)."""
    alias: str
    """The name the query uses for it (alias, or the table name as written)."""
    pk: tuple[str, ...]
    pk_types: tuple[str, ...]
    nullable: bool
    """On the right of a LEFT JOIN: result rows may have it null-extended."""
    hidden: tuple[int, ...]
    """Positions of its primary-key columns among the hidden columns (= the result row's key)."""
    outer_tokens: tuple[tuple[int, int], ...]
    """Text spans of the LEFT / OUTER keywords of its join; blanked to turn the join into an inner one."""


@dataclass(frozen=True)
class _Plan:
    """The analysed query and the text pieces needed to build its rewritten forms."""

    text: str
    canonical: str
    occurrences: tuple[_Occurrence, ...]
    select_end: int
    where: tuple[int, int] | None
    """(start, end) of the WHERE expression text, if any."""
    where_insert: int
    """Where to insert a WHERE clause when the query has none."""
    hidden_select: str

    @property
    def n_hidden(self) -> int:
        return sum(len(o.pk) for o in self.occurrences)

    @property
    def tables(self) -> frozenset[str]:
        return frozenset(o.table for o in self.occurrences)

    def layout(self) -> list[list[Any]]:
        """What the hidden key is made of; persisted, and checked when a subscription is reloaded."""
        return [[o.table, list(o.pk)] for o in self.occurrences]

    def full_sql(self) -> str:
        return self._build(self.text, None)

    def restricted_sql(self, restriction: str, inner_join_for: _Occurrence | None = None) -> str:
        """The query with hidden key columns, restricted by ``restriction`` (an SQL boolean expression).
        With ``inner_join_for``, that occurrence's LEFT JOIN becomes an inner join; this is exact when the
        restriction requires the occurrence to be non-null, and lets SQLite start from its primary key."""
        text = self.text
        if inner_join_for is not None:
            chars = list(text)
            for s, e in inner_join_for.outer_tokens:
                chars[s:e] = " " * (e - s)
            text = "".join(chars)
        return self._build(text, restriction)

    def _build(self, text: str, restriction: str | None) -> str:
        parts = [text[: self.select_end], " ", self.hidden_select, ","]
        if restriction is None:
            parts.append(text[self.select_end :])
        elif self.where is not None:
            s, e = self.where
            parts += [text[self.select_end : s], " (", restriction, ") AND (", text[s:e], "\n) ", text[e:]]
        else:
            p = self.where_insert
            parts += [text[self.select_end : p], " WHERE ", restriction, " ", text[p:]]
        return "".join(parts)


def _fail(message: str) -> SubscriptionError:
    return SubscriptionError(message)


def _arg(node: exp.Expression, *names: str) -> Any:
    """An AST argument under any of its names (sqlglot renamed ``from``/``with`` to ``from_``/``with_``)."""
    for n in names:
        v = node.args.get(n)
        if v:
            return v
    return None


def _tokenize(sql: str) -> list[Token]:
    try:
        return list(sqlglot.Dialect.get_or_raise("sqlite").tokenize(sql))
    except SqlglotError as e:
        raise _fail(f"could not parse the query: {e}") from e


def _canonical(text: str, tokens: Sequence[Token]) -> str:
    """Token-level normal form: whitespace, comments and keyword case do not matter; identifiers, literals
    and parameters are kept exactly (they can change the meaning or the column names)."""
    out = []
    for t in tokens:
        raw = text[t.start : t.end + 1]
        if t.token_type not in _VERBATIM_TOKENS and raw.replace(" ", "").isalpha():
            raw = " ".join(raw.upper().split())
        out.append(raw)
    return " ".join(out)


def analyse(sql: str, schema: Schema) -> _Plan:
    """Check that ``sql`` is a SELECT this module can maintain incrementally and work out its rewrite.
    Raises SubscriptionError saying what is not supported."""
    if not isinstance(sql, str) or not sql.strip():
        raise _fail("the query is empty")
    tokens = _tokenize(sql)
    while tokens and tokens[-1].token_type == TokenType.SEMICOLON:
        tokens.pop()
    if not tokens:
        raise _fail("the query is empty")
    if any(t.token_type == TokenType.SEMICOLON for t in tokens):
        raise _fail("a subscription takes exactly one SQL statement")
    text = sql[: tokens[-1].end + 1]

    # sqlglot does not know SQLite's numbered parameters (?NNN); blank the number for the analysis parse.
    chars = list(text)
    for a, b in itertools.pairwise(tokens):
        if (
            a.token_type == TokenType.PLACEHOLDER
            and b.token_type == TokenType.NUMBER
            and b.start == a.end + 1
        ):
            chars[b.start : b.end + 1] = " " * (b.end + 1 - b.start)
    try:
        parsed = [e for e in sqlglot.parse("".join(chars), read="sqlite") if e is not None]
    except SqlglotError as e:
        raise _fail(f"could not parse the query: {e}") from e
    if len(parsed) != 1:
        raise _fail("a subscription takes exactly one SQL statement")
    root = parsed[0]
    if isinstance(root, exp.SetOperation):
        raise _fail("compound SELECTs (UNION / INTERSECT / EXCEPT) are not supported in subscriptions")
    if not isinstance(root, exp.Select):
        kind = root.key.upper()
        raise _fail(f"only SELECT statements can be subscribed to (got {kind}); subscriptions are read-only")
    _check_select(root)

    occurrences = _occurrences(root, text, tokens, schema)
    depth0 = _depth0(tokens)
    first = depth0[0]
    if first.token_type != TokenType.SELECT:
        raise _fail("the query must start with SELECT")
    select_end = first.end + 1
    if len(depth0) > 1 and depth0[1].token_type == TokenType.ALL:
        select_end = depth0[1].end + 1
    wheres = [t for t in depth0 if t.token_type == TokenType.WHERE]
    orders = [t for t in depth0 if t.token_type == TokenType.ORDER_BY]
    has_where = _arg(root, "where") is not None
    has_order = _arg(root, "order") is not None
    if len(wheres) != int(has_where) or len(orders) != int(has_order):
        raise _fail("could not analyse the query's WHERE / ORDER BY clauses")
    clause_end = orders[0].start if orders else len(text)
    where = (wheres[0].end + 1, clause_end) if wheres else None
    hidden_cols = []
    n = 0
    for occ in occurrences:
        for col in occ.pk:
            hidden_cols.append(f"{quote_ident(occ.alias)}.{quote_ident(col)} AS {quote_ident(f'__vd_h{n}')}")
            n += 1
    return _Plan(
        text=text,
        canonical=_canonical(text, tokens),
        occurrences=tuple(occurrences),
        select_end=select_end,
        where=where,
        where_insert=clause_end,
        hidden_select=", ".join(hidden_cols),
    )


def _check_select(root: exp.Select) -> None:
    unsupported = [
        (("with", "with_"), "WITH clauses (common table expressions)"),
        (("distinct",), "DISTINCT"),
        (("group",), "GROUP BY"),
        (("having",), "HAVING"),
        (("limit",), "LIMIT"),
        (("offset",), "OFFSET"),
        (("windows",), "WINDOW clauses"),
        (("laterals",), "LATERAL"),
    ]
    for names, what in unsupported:
        if _arg(root, *names) is not None:
            raise _fail(
                f"{what}: not supported in subscriptions (the result could not be maintained incrementally)"
            )
    for node in root.walk():
        if node is root:
            continue
        if isinstance(node, exp.Query | exp.Subquery | exp.Exists):
            raise _fail(
                "subqueries are not supported in subscriptions (a change to a subquery's table could change "
                "any result row); use a JOIN instead"
            )
        if isinstance(node, exp.Window):
            raise _fail("window functions are not supported in subscriptions")
        if isinstance(node, exp.AggFunc) or (
            isinstance(node, exp.Anonymous) and str(node.name).lower() in _SQLITE_AGGREGATES
        ):
            raise _fail(
                "aggregate functions are not supported in subscriptions (subscribe to the rows instead)"
            )


def _depth0(tokens: Sequence[Token]) -> list[Token]:
    out = []
    depth = 0
    for t in tokens:
        if t.token_type == TokenType.L_PAREN:
            depth += 1
        elif t.token_type == TokenType.R_PAREN:
            depth -= 1
        elif depth == 0:
            out.append(t)
    return out


def _join_operators(tokens: Sequence[Token]) -> list[list[Token]]:
    """The join operators of the FROM clause, in order: each a run of keywords ending in JOIN, or a comma."""
    depth0 = _depth0(tokens)
    ops: list[list[Token]] = []
    in_from = False
    current: list[Token] = []
    for t in depth0:
        tt = t.token_type
        if tt == TokenType.FROM:
            in_from = True
            continue
        if not in_from:
            continue
        if tt in (TokenType.WHERE, TokenType.ORDER_BY, TokenType.GROUP_BY, TokenType.LIMIT):
            break
        if tt == TokenType.COMMA:
            ops.append([t])
        elif tt in _JOIN_WORDS or tt == TokenType.OUTER:
            current.append(t)
        elif tt == TokenType.JOIN:
            current.append(t)
            ops.append(current)
            current = []
    return ops


def _occurrences(root: exp.Select, text: str, tokens: Sequence[Token], schema: Schema) -> list[_Occurrence]:
    from_ = _arg(root, "from_", "from")
    if from_ is None:
        raise _fail("a subscription must read at least one table (the query has no FROM clause)")
    joins: list[exp.Join] = list(_arg(root, "joins") or [])
    operators = _join_operators(tokens)
    if len(operators) != len(joins):
        raise _fail("could not analyse the query's join clauses")
    items: list[tuple[exp.Expression, exp.Join | None, list[Token]]] = [(from_.this, None, [])]
    items += [(j.this, j, op) for j, op in zip(joins, operators, strict=True)]
    by_lower = {name.lower(): t for name, t in schema.tables.items()}
    occurrences: list[_Occurrence] = []
    n_hidden = 0
    for i, (item, join, op) in enumerate(items):
        if isinstance(item, exp.Subquery | exp.Query):
            raise _fail("subqueries in FROM are not supported in subscriptions")
        if not isinstance(item, exp.Table) or not isinstance(item.this, exp.Identifier):
            raise _fail(
                f"only schema tables can be read in a subscription (not {item.sql(dialect='sqlite')})"
            )
        db = item.args.get("db")
        if item.args.get("catalog") is not None or (db is not None and str(db.name).lower() != "main"):
            raise _fail(f"only tables of the main database can be read in a subscription (not {item.sql()})")
        name = str(item.name)
        table = by_lower.get(name.lower())
        if table is None:
            raise _fail(
                f"table {name!r} is not in the schema (subscriptions can only read replicated tables)"
            )
        side = (join.side or "").upper() if join is not None else ""
        if side in ("RIGHT", "FULL"):
            raise _fail(f"{side} JOIN is not supported in subscriptions (use LEFT JOIN or an inner join)")
        nullable = side == "LEFT"
        if join is not None and join.args.get("method") and str(join.args["method"]).upper() != "NATURAL":
            raise _fail(f"{join.args['method']} joins are not supported in subscriptions")
        outer = tuple((t.start, t.end + 1) for t in op if t.token_type in (TokenType.LEFT, TokenType.OUTER))
        if nullable and not outer:
            raise _fail("could not analyse the query's LEFT JOIN")
        alias = str(item.alias) if item.alias else name
        pk = table.pk
        pk_types = tuple(col.type if (col := table.column(c)) is not None else "" for c in pk)
        hidden = tuple(range(n_hidden, n_hidden + len(pk)))
        n_hidden += len(pk)
        occurrences.append(_Occurrence(i, table.name, alias, pk, pk_types, nullable, hidden, outer))
    return occurrences


# ------------------------------------------------------------------------------------------------ SQL values


def sql_literal(v: SqlValue) -> str:
    """An SQL literal for a value, for the IN lists of restricted queries. Literals (rather than bound
    parameters) keep the user's own ``?`` / ``?NNN`` / ``:name`` parameters untouched."""
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return "(-9223372036854775807 - 1)" if v == -(2**63) else str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "NULL"
        if math.isinf(v):
            return "9e999" if v > 0 else "-9e999"
        return repr(v)
    if isinstance(v, str):
        if "\x00" not in v:
            try:
                v.encode("utf-8")
                return "'" + v.replace("'", "''") + "'"
            except UnicodeEncodeError:
                pass
        return f"CAST(X'{v.encode('utf-8', 'surrogatepass').hex()}' AS TEXT)"
    if isinstance(v, bytes | bytearray | memoryview):
        return f"X'{bytes(v).hex()}'"
    raise TypeError(f"not an SQL value: {v!r}")


def _restriction(occ: _Occurrence, keys: Sequence[Key]) -> str:
    return _key_condition([f"{quote_ident(occ.alias)}.{quote_ident(c)}" for c in occ.pk], keys)


def _key_condition(cols: Sequence[str], keys: Sequence[Key]) -> str:
    """SQL true exactly for rows whose ``cols`` equal one of ``keys``, in a form SQLite answers with index
    lookups. Comparisons apply the columns' affinity, so a key received as '5' finds an INTEGER 5."""
    if len(cols) == 1:
        return f"{cols[0]} IN ({', '.join(sql_literal(k[0]) for k in keys)})"
    # An OR of ANDs: SQLite plans it as one primary-key lookup per key ("MULTI-INDEX OR"); a row-value IN
    # over VALUES would scan the table.
    return " OR ".join(
        "(" + " AND ".join(f"{c} = {sql_literal(v)}" for c, v in zip(cols, k, strict=True)) + ")"
        for k in keys
    )


def _same(a: Sequence[SqlValue], b: Sequence[SqlValue]) -> bool:
    """Equal values of equal SQLite types (1 and 1.0 differ: the client would see a different value)."""
    return a == b and all(type(x) is type(y) for x, y in zip(a, b, strict=True))


def _normalize_params(params: Any) -> Params:
    if params is None:
        return None
    if isinstance(params, list | tuple):
        return [_param_value(v) for v in params] or None
    if isinstance(params, dict):
        out: dict[str, Any] = {}
        for k, v in params.items():
            if not isinstance(k, str):
                raise _fail("named parameters must have string names")
            out[k] = _param_value(v)
        return out or None
    raise _fail("parameters must be a list (positional) or an object (named)")


def _param_value(v: Any) -> SqlValue:
    if isinstance(v, bool):
        return int(v)
    if v is None or isinstance(v, int | float | str | bytes):
        return v
    raise _fail(f"parameter value of unsupported type {type(v).__name__}")


def _params_key(params: Params) -> str:
    def typed(v: SqlValue) -> str:
        return f"{type(v).__name__}:{v!r}"

    if params is None:
        return "-"
    if isinstance(params, list):
        return "L[" + ",".join(typed(v) for v in params) + "]"
    return "D{" + ",".join(f"{k!r}={typed(params[k])}" for k in sorted(params)) + "}"


# ------------------------------------------------------------------------------------------------ state file


def _open_state(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute("PRAGMA busy_timeout = 5000")
    return conn


def _create_state_schema(conn: sqlite3.Connection, plan: _Plan) -> None:
    hidden_defs = []
    for occ in plan.occurrences:
        for i, typ in zip(occ.hidden, occ.pk_types, strict=True):
            hidden_defs.append(f"h{i} {typ}".rstrip())
    conn.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID")
    conn.execute(f"CREATE TABLE rows (rid INTEGER PRIMARY KEY, {', '.join(hidden_defs)}, vals BLOB NOT NULL)")
    for occ in plan.occurrences:
        cols = ", ".join(f"h{i}" for i in occ.hidden)
        conn.execute(f"CREATE INDEX rows_by_occurrence_{occ.index} ON rows ({cols})")
    conn.execute(
        "CREATE TABLE changes (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, rid INTEGER NOT NULL, "
        "vals BLOB NOT NULL)"
    )


def _meta(conn: sqlite3.Connection) -> dict[str, Any]:
    return {k: v for k, v in conn.execute("SELECT key, value FROM meta")}


def _set_meta(conn: sqlite3.Connection, values: dict[str, Any]) -> None:
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT DO UPDATE SET value = excluded.value",
        list(values.items()),
    )


# ------------------------------------------------------------------------------------------------ subscription


class Subscription:
    """One live query, shared by every client that subscribed to the same SQL and parameters.

    Getting a consistent stream (what the HTTP layer should do)::

        q = queue.SimpleQueue()
        sub.add_listener(q.put)            # 1. listen first: nothing emitted from now on is missed
        rows, cid = sub.snapshot()         # 2. rows as of change id `cid`
        send(columns, rows, eoq(cid))
        for batch in iter(q.get, None):    # 3. drop what the snapshot already reflects
            send([e for e in batch if e.change_id > cid])

    Resuming with ``from=n``: ``add_listener`` first, then ``changes_since(n)`` (may raise GapError), then
    forward queued events whose change_id is greater than the last replayed one. Events are delivered in
    change-id order, so filtering on the id is all the de-duplication needed.
    """

    def __init__(
        self,
        sub_id: str,
        sql: str,
        params: Params,
        columns: list[str],
        plan: _Plan,
        key: str,
        path: Path,
        conn: sqlite3.Connection,
        change_id: int,
        next_rowid: int,
    ) -> None:
        self.id = sub_id
        self.sql = sql
        self.params = params
        self.columns = columns
        self.stats = SubscriptionStats()
        self.scan_warnings: list[str] = []
        """Restricted queries whose plan scans a table: changes to it cost time in proportion to its size
        (usually a join column without an index)."""
        self._plan = plan
        self._key = key
        self._path = path
        self._conn = conn
        """Writer connection to the state file; used by the matcher thread only."""
        self._change_id = change_id
        self._next_rowid = next_rowid
        self._listeners: list[Callable[[list[ChangeEvent]], None]] = []
        # Read by the matcher thread on every batch, changed rarely from the loop: a reader/writer lock.
        self._listeners_lock = RWLock(f"subscription {sub_id} listeners", timeout=_LISTENERS_LOCK_TIMEOUT)
        self._needs_full = False
        self._retry_at = 0.0
        self._removed = False

    def __repr__(self) -> str:
        return f"Subscription(id={self.id!r}, sql={self.sql!r}, change_id={self._change_id})"

    @property
    def change_id(self) -> int:
        """The id of the last change event (0 before the first)."""
        return self._change_id

    @property
    def tables(self) -> frozenset[str]:
        return self._plan.tables

    @property
    def needs_full_rediff(self) -> bool:
        """True while a full re-diff is pending (after a restart, a pending-set overflow or an error)."""
        return self._needs_full

    def _reader(self) -> sqlite3.Connection:
        if self._removed:
            raise SubscriptionError(f"subscription {self.id} was removed")
        conn = sqlite3.connect(str(self._path), isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA query_only = ON")
        return conn

    def snapshot(self) -> tuple[Rows, int]:
        """Current rows ``(rowid, values)`` ordered by rowid, and the change id they reflect. Both come from
        one read transaction of the state file, so they are consistent with each other and with the log."""
        conn = self._reader()
        try:
            conn.execute("BEGIN")
            cid = int(_meta(conn)["change_id"])
            rows = [
                (rid, tuple(_decoder.decode(v)))
                for rid, v in conn.execute("SELECT rid, vals FROM rows ORDER BY rid")
            ]
            conn.execute("COMMIT")
            return rows, cid
        finally:
            conn.close()

    def changes_since(self, change_id: int) -> list[ChangeEvent]:
        """Events with a change id greater than ``change_id``, from the kept log, in order. GapError if some
        of them are no longer kept, or if ``change_id`` is beyond the current change id."""
        if not isinstance(change_id, int) or change_id < 0:
            raise SubscriptionError(f"change id must be a non-negative integer (got {change_id!r})")
        conn = self._reader()
        try:
            conn.execute("BEGIN")
            current = int(_meta(conn)["change_id"])
            if change_id > current:
                raise GapError(f"change id {change_id} is in the future: the current change id is {current}")
            if change_id == current:
                return []
            (oldest,) = conn.execute("SELECT min(id) FROM changes").fetchone()
            if oldest is None or oldest > change_id + 1:
                raise GapError(
                    f"changes after {change_id} are no longer kept (oldest kept change id: {oldest}, "
                    f"current: {current}); subscribe again without `from` to get a fresh snapshot"
                )
            events = [
                ChangeEvent(kind, rid, tuple(_decoder.decode(v)), cid)
                for cid, kind, rid, v in conn.execute(
                    "SELECT id, kind, rid, vals FROM changes WHERE id > ? ORDER BY id", (change_id,)
                )
            ]
            conn.execute("COMMIT")
            return events
        finally:
            conn.close()

    def add_listener(self, fn: Callable[[list[ChangeEvent]], None]) -> None:
        """Call ``fn`` with every later batch of new events, in order, on the matcher thread. ``fn`` must be
        quick and must not block (e.g. ``loop.call_soon_threadsafe`` or a queue put): every subscription's
        matching waits for it. Exceptions from ``fn`` are logged and ignored."""
        with self._listeners_lock.write():
            self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[list[ChangeEvent]], None]) -> None:
        with self._listeners_lock.write():
            if fn in self._listeners:
                self._listeners.remove(fn)

    @property
    def listener_count(self) -> int:
        with self._listeners_lock.read():
            return len(self._listeners)

    def _emit(self, events: list[ChangeEvent]) -> None:
        with self._listeners_lock.read():
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn(events)
            except Exception:
                log.exception("subscription %s: listener %r failed", self.id, fn)


# ------------------------------------------------------------------------------------------------ manager


@dataclass
class _Created:
    """A subscription to create on the matcher thread, and where to put the result."""

    sql: str
    params: Params
    plan: _Plan
    columns: list[str]
    key: str
    scans: list[str]
    future: concurrent.futures.Future[tuple[Subscription, bool]] = field(
        default_factory=concurrent.futures.Future
    )


class SubscriptionManager:
    """Owns every subscription of a store: creation (shared by identical queries), matching on a dedicated
    thread, persistence under ``state_dir`` and reload on start.

    ``max_pending_keys`` bounds the keys waiting for the matcher; past it the tables concerned are marked
    and their subscriptions re-diffed in full. ``query_timeout`` bounds a new subscription's initial query.
    """

    def __init__(
        self,
        store: Store,
        state_dir: str | Path,
        *,
        max_kept_changes: int = 10_000,
        max_pending_keys: int = 100_000,
        query_timeout: float = 30.0,
    ) -> None:
        if max_kept_changes < 1:
            raise ValueError("max_kept_changes must be >= 1")
        self._store = store
        self._dir = Path(state_dir)
        self._dir.mkdir(parents=True, exist_ok=True)
        self._max_kept = max_kept_changes
        self._max_pending = max_pending_keys
        self._query_timeout = query_timeout
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._subs: dict[str, Subscription] = {}
        self._by_key: dict[str, Subscription] = {}
        self._creating: list[frozenset[str]] = []
        self._interest: frozenset[str] = frozenset()
        self._pending: dict[str, set[Key]] = {}
        self._pending_keys = 0
        self._overflowed: set[str] = set()
        self._tasks: deque[Callable[[], None]] = deque()
        self._barriers: list[threading.Event] = []
        self._closed = False
        self.overflows = 0
        """Times the pending set overflowed (each turned into full re-diffs)."""
        self.refused = 0
        """Subscription requests refused as invalid or unsupported."""
        self.lag_observer: Callable[[float], None] | None = None
        """Called on the matcher thread with the seconds from a commit to its events handed to a
        subscription's listeners (from the earliest commit of the batch; the API's metrics set it)."""
        self._pending_since: float | None = None
        """When the oldest commit of the pending batch arrived (monotonic)."""
        self._batch_since: float | None = None
        self._vm_steps = 0
        self._deadline: float | None = None
        self._reader = store.open_reader()
        self._reader.set_progress_handler(self._progress, _PROGRESS_STEP)
        self._load_all()
        self._thread = threading.Thread(target=self._run, name="verdigris-subscriptions", daemon=True)
        store.add_commit_listener(self._on_commit)
        self._thread.start()

    # ------------------------------------------------------------------------------------- public API

    def subscribe(
        self, sql: str, params: list[Any] | dict[str, Any] | None = None
    ) -> tuple[Subscription, bool]:
        """The existing subscription for the same query and parameters, or a new one (``True``). A new one
        has run its initial query when this returns. Raises SubscriptionError for a query that is invalid,
        writes, or cannot be maintained incrementally."""
        if self._closed:
            raise SubscriptionError("the subscription manager is closed")
        try:
            norm = _normalize_params(params)
            plan = analyse(sql, self._store.schema)
            columns, scans = self._probe(plan, norm)
        except SubscriptionError:
            self.refused += 1
            raise
        key = f"{plan.canonical}\x00{_params_key(norm)}\x00{columns!r}"
        with self._lock:
            existing = self._by_key.get(key)
            if existing is not None:
                return existing, False
        req = _Created(sql, norm, plan, columns, key, scans)
        if threading.current_thread() is self._thread:
            self._create(req)
        else:
            with self._cond:
                if self._closed:
                    raise SubscriptionError("the subscription manager is closed")
                self._tasks.append(lambda: self._create(req))
                self._cond.notify_all()
        try:
            return req.future.result(timeout=self._query_timeout + 30.0)
        except concurrent.futures.TimeoutError as e:
            raise SubscriptionError("timed out waiting for the subscription to be created") from e

    def get(self, sub_id: str) -> Subscription | None:
        with self._lock:
            return self._subs.get(sub_id)

    def list(self) -> list[Subscription]:
        with self._lock:
            return list(self._subs.values())

    def remove(self, sub_id: str) -> bool:
        """Drop a subscription and delete its state file. Returns False if it did not exist."""
        done: concurrent.futures.Future[bool] = concurrent.futures.Future()

        def task() -> None:
            try:
                with self._lock:
                    sub = self._subs.pop(sub_id, None)
                    if sub is not None:
                        self._by_key.pop(sub._key, None)
                        self._recompute_interest()
                if sub is not None:
                    sub._removed = True
                    sub._conn.close()
                    for suffix in ("", "-wal", "-shm"):
                        with suppress(FileNotFoundError):
                            Path(str(sub._path) + suffix).unlink()
                done.set_result(sub is not None)
            except BaseException as e:
                done.set_exception(e)
                raise

        if threading.current_thread() is self._thread:
            task()
        else:
            with self._cond:
                if self._closed:
                    return False
                self._tasks.append(task)
                self._cond.notify_all()
        return done.result(timeout=60.0)

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every commit notified before this call (and any re-diff already due) has been
        matched and its events delivered. False on timeout or if closed. Not callable from a listener (the
        matcher thread cannot wait for itself)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("flush() cannot be called on the matcher thread (from a listener)")
        ev = threading.Event()
        with self._cond:
            if self._closed:
                return False
            self._barriers.append(ev)
            self._cond.notify_all()
        return ev.wait(timeout)

    @property
    def work_counter(self) -> int:
        """SQLite VM instructions spent by the matcher on the replicated database (in steps of 100)."""
        return self._vm_steps

    def close(self) -> None:
        """Stop the matcher thread and close every file. Idempotent. State stays on disk for a restart."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._store.remove_commit_listener(self._on_commit)
        self._thread.join(timeout=5.0)
        if self._thread.is_alive():
            self._reader.interrupt()
            self._thread.join(timeout=5.0)
        with self._lock:
            tasks = list(self._tasks)
            self._tasks.clear()
            barriers, self._barriers = self._barriers, []
            subs = list(self._subs.values())
        for task in tasks:
            # Creation requests still queued: fail them rather than leave callers waiting.
            with suppress(Exception):
                task()
        for ev in barriers:
            ev.set()
        if not self._thread.is_alive():
            for sub in subs:
                with suppress(sqlite3.Error):
                    sub._conn.close()
            with suppress(sqlite3.Error):
                self._reader.close()

    def __enter__(self) -> SubscriptionManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------- commit listener

    def _on_commit(self, notice: CommitNotice) -> None:
        """Runs on the writer's thread, right after a commit: merge the touched keys into the pending set
        and wake the matcher. O(keys) under a short lock, no I/O."""
        with self._cond:
            if self._closed:
                return
            added = False
            for table, pks in notice.tables.items():
                if table not in self._interest or table in self._overflowed:
                    continue
                cur = self._pending.setdefault(table, set())
                before = len(cur)
                cur |= pks
                self._pending_keys += len(cur) - before
                added = True
            if added and self._pending_since is None:
                self._pending_since = time.monotonic()
            if self._pending_keys > self._max_pending:
                # Bounded: give up on key-level matching for these tables; a full re-diff replaces it.
                self._overflowed.update(self._pending)
                self._pending.clear()
                self._pending_keys = 0
                self.overflows += 1
                log.warning("subscriptions: pending keys over %d; full re-diff scheduled", self._max_pending)
            if added:
                self._cond.notify_all()

    def _recompute_interest(self) -> None:
        tables: set[str] = set()
        for sub in self._subs.values():
            tables |= sub.tables
        for t in self._creating:
            tables |= t
        self._interest = frozenset(tables)

    def _progress(self) -> int:
        self._vm_steps += _PROGRESS_STEP
        if self._deadline is not None and time.monotonic() > self._deadline:
            return 1  # interrupts the running query
        return 0

    # ------------------------------------------------------------------------------------- matcher thread

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (
                    self._closed
                    or self._tasks
                    or self._pending
                    or self._overflowed
                    or self._barriers
                    or self._retry_due()
                ):
                    self._cond.wait(0.5)
                if self._closed:
                    return
                tasks = list(self._tasks)
                self._tasks.clear()
                batch, self._pending = self._pending, {}
                self._pending_keys = 0
                since, self._pending_since = self._pending_since, None
                overflowed, self._overflowed = self._overflowed, set()
                barriers, self._barriers = self._barriers, []
            for task in tasks:
                try:
                    task()
                except Exception:
                    log.exception("subscriptions: task failed")
            self._batch_since = since  # events of this batch only: tasks above are no commit's events
            try:
                self._match_all(batch, overflowed)
            except Exception:
                # A bug, not a query error (those are handled per subscription): the batch's keys are lost,
                # so fall back to full re-diffs rather than miss changes.
                log.exception("subscriptions: matching failed; scheduling full re-diffs")
                with self._lock:
                    for sub in self._subs.values():
                        sub._needs_full = True
            self._batch_since = None
            for ev in barriers:
                ev.set()

    def _retry_due(self) -> bool:
        now = time.monotonic()
        return any(s._needs_full and s._retry_at <= now for s in self._subs.values())

    def _match_all(self, batch: dict[str, set[Key]], overflowed: set[str]) -> None:
        with self._lock:
            subs = list(self._subs.values())
        now = time.monotonic()
        for sub in subs:
            if sub._removed:
                continue
            if sub.tables & overflowed:
                sub._needs_full = True
            touched = {t: batch[t] for t in sub.tables if t in batch}
            if sub._needs_full:
                if sub._retry_at > now:
                    continue  # a full re-diff is due later; it will cover these keys too
                self._apply(sub, None)
            elif touched:
                self._apply(sub, touched)

    @contextmanager
    def _read_snapshot(self, needed: bool = True) -> Iterator[None]:
        """Keep one read transaction open on the reader across several queries, so a batch sees one
        consistent state. The store's reader authorizer refuses BEGIN; an unfinished statement holds the
        read transaction open just the same (SQLite's autocommit mode ends it when the last statement is
        reset). ``needed=False`` when only one statement will run (it is its own snapshot)."""
        if not needed:
            yield
            return
        pin = self._reader.execute("SELECT 1 FROM sqlite_master")
        try:
            yield
        finally:
            pin.close()

    def _query(self, sub: Subscription, sql: str) -> builtins.list[tuple[Key, tuple[SqlValue, ...]]]:
        """Run a (rewritten) query on the replicated database: (hidden key, values) per result row."""
        n = sub._plan.n_hidden
        params: Any = sub.params if sub.params is not None else ()
        rows = self._reader.execute(sql, params).fetchall()
        sub.stats.rows_examined += len(rows)
        return [(row[:n], row[n:]) for row in rows]

    def _stored(self, sub: Subscription, occ: _Occurrence, keys: Iterable[Key]) -> dict[Key, tuple[int, Key]]:
        """Stored result rows whose ``occ`` key is one of ``keys``: full key -> (rowid, values)."""
        n = sub._plan.n_hidden
        head = f"SELECT rid, {', '.join(f'h{i}' for i in range(n))}, vals FROM rows WHERE "
        cols = [f"h{i}" for i in occ.hidden]
        keys = list(keys)
        out: dict[Key, tuple[int, Key]] = {}
        for i in range(0, len(keys), _CHUNK):
            rows = sub._conn.execute(head + _key_condition(cols, keys[i : i + _CHUNK])).fetchall()
            sub.stats.rows_examined += len(rows)
            for row in rows:
                out[row[1 : n + 1]] = (row[0], tuple(_decoder.decode(row[n + 1])))
        return out

    def _apply(self, sub: Subscription, touched: dict[str, set[Key]] | None) -> None:
        """Match one subscription against touched keys (None: re-run the whole query), store the result
        and log and deliver the events. On error the subscription is marked for a full re-diff, retried
        later with a back-off; nothing is delivered for a pass that did not commit."""
        started = time.perf_counter()
        steps = self._vm_steps
        try:
            new, old = self._collect(sub, touched)
            events = self._commit_diff(sub, new, old)
        except Exception as e:
            sub.stats.errors += 1
            sub.stats.last_error = str(e)
            backoff = min(30.0, 0.5 * 2 ** min(sub.stats.errors, 6))
            sub._needs_full = True
            sub._retry_at = time.monotonic() + backoff
            log.exception("subscription %s: matching failed; full re-diff in %.1f s", sub.id, backoff)
            with suppress(sqlite3.Error):
                if sub._conn.in_transaction:
                    sub._conn.execute("ROLLBACK")
            return
        finally:
            sub.stats.vm_steps += self._vm_steps - steps
            sub.stats.last_match_seconds = time.perf_counter() - started
        if touched is None:
            sub.stats.full_rediffs += 1
            sub._needs_full = False
        else:
            sub.stats.batches += 1
        if events:
            sub.stats.events += len(events)
            sub._emit(events)
            observe, since = self.lag_observer, self._batch_since
            if observe is not None and since is not None:
                observe(time.monotonic() - since)

    def _collect(
        self, sub: Subscription, touched: dict[str, set[Key]] | None
    ) -> tuple[dict[Key, tuple[SqlValue, ...]], dict[Key, tuple[int, Key]]]:
        """Current result rows and stored rows in the scope of a change: ``(new, old)``, both keyed by the
        result row's hidden key. A row in neither is unaffected by the change."""
        plan = sub._plan
        new: dict[Key, tuple[SqlValue, ...]] = {}
        old: dict[Key, tuple[int, Key]] = {}
        if touched is None:
            with self._read_snapshot(needed=False):  # one statement: its own snapshot
                for key, vals in self._query(sub, plan.full_sql()):
                    new[key] = vals
            n = plan.n_hidden
            hidden = ", ".join(f"h{i}" for i in range(n))
            for row in sub._conn.execute(f"SELECT rid, {hidden}, vals FROM rows"):
                sub.stats.rows_examined += 1
                old[tuple(row[1 : n + 1])] = (row[0], tuple(_decoder.decode(row[n + 1])))
            return new, old

        plain: builtins.list[tuple[_Occurrence, builtins.list[Key]]] = []
        nullable: builtins.list[tuple[_Occurrence, builtins.list[Key]]] = []
        for occ in plan.occurrences:
            pks = touched.get(occ.table)
            if pks:
                (nullable if occ.nullable else plain).append((occ, list(pks)))
        anchor = plan.occurrences[0]
        anchors: set[Key] = set()
        single = not nullable and len(plain) == 1 and len(plain[0][1]) <= _CHUNK
        with self._read_snapshot(needed=not single):
            for occ, keys in plain:
                for i in range(0, len(keys), _CHUNK):
                    sql = plan.restricted_sql(_restriction(occ, keys[i : i + _CHUNK]))
                    for key, vals in self._query(sub, sql):
                        new[key] = vals
            if nullable:
                # Widen to whole anchor rows: those joined to the changed rows now, or before the change.
                for occ, keys in nullable:
                    for i in range(0, len(keys), _CHUNK):
                        sql = plan.restricted_sql(_restriction(occ, keys[i : i + _CHUNK]), inner_join_for=occ)
                        for key, _ in self._query(sub, sql):
                            anchors.add(tuple(key[j] for j in anchor.hidden))
                    for key in self._stored(sub, occ, keys):
                        anchors.add(tuple(key[j] for j in anchor.hidden))
                anchors = {a for a in anchors if None not in a}
                anchor_keys = list(anchors)
                for i in range(0, len(anchor_keys), _CHUNK):
                    sql = plan.restricted_sql(_restriction(anchor, anchor_keys[i : i + _CHUNK]))
                    for key, vals in self._query(sub, sql):
                        new[key] = vals
        for occ, keys in plain:
            old.update(self._stored(sub, occ, keys))
        if anchors:
            old.update(self._stored(sub, anchor, anchors))
        return new, old

    def _commit_diff(
        self,
        sub: Subscription,
        new: dict[Key, tuple[SqlValue, ...]],
        old: dict[Key, tuple[int, Key]],
    ) -> builtins.list[ChangeEvent]:
        deletes = [(rid, vals) for key, (rid, vals) in old.items() if key not in new]
        updates: builtins.list[tuple[int, tuple[SqlValue, ...]]] = []
        inserts: builtins.list[tuple[Key, tuple[SqlValue, ...]]] = []
        for key, vals in new.items():
            prev = old.get(key)
            if prev is None:
                inserts.append((key, vals))
            elif not _same(prev[1], vals):
                updates.append((prev[0], vals))
        if not (deletes or updates or inserts):
            return []
        cid = sub._change_id
        next_rid = sub._next_rowid
        events: builtins.list[ChangeEvent] = []
        for rid, vals in deletes:
            cid += 1
            events.append(ChangeEvent("delete", rid, vals, cid))
        for rid, vals in updates:
            cid += 1
            events.append(ChangeEvent("update", rid, vals, cid))
        insert_rows = []
        for key, vals in inserts:
            cid += 1
            events.append(ChangeEvent("insert", next_rid, vals, cid))
            insert_rows.append((next_rid, *key, _encoder.encode(vals)))
            next_rid += 1
        n = sub._plan.n_hidden
        conn = sub._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if deletes:
                conn.executemany("DELETE FROM rows WHERE rid = ?", [(rid,) for rid, _ in deletes])
            if updates:
                conn.executemany(
                    "UPDATE rows SET vals = ? WHERE rid = ?", [(_encoder.encode(v), r) for r, v in updates]
                )
            if insert_rows:
                conn.executemany(
                    f"INSERT INTO rows (rid, {', '.join(f'h{i}' for i in range(n))}, vals) "
                    f"VALUES ({', '.join('?' for _ in range(n + 2))})",
                    insert_rows,
                )
            conn.executemany(
                "INSERT INTO changes (id, kind, rid, vals) VALUES (?, ?, ?, ?)",
                [(e.change_id, e.kind, e.rowid, _encoder.encode(e.values)) for e in events],
            )
            if cid > self._max_kept:
                conn.execute("DELETE FROM changes WHERE id <= ?", (cid - self._max_kept,))
            _set_meta(conn, {"change_id": cid, "next_rowid": next_rid})
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        sub._change_id = cid
        sub._next_rowid = next_rid
        return events

    # ------------------------------------------------------------------------------------- creation

    def _probe(self, plan: _Plan, params: Params) -> tuple[builtins.list[str], builtins.list[str]]:
        """Ask SQLite itself what the rewritten query reads and how its columns are named, without running
        it: an authorizer records every table read (so nothing outside the analysed tables slips through,
        whatever the parser missed), EXPLAIN shows aggregate opcodes, and the query restricted by a false
        condition yields the column names. Returns the column names and the scan warnings."""
        tables_read: set[str] = set()

        def authorizer(
            action: int, arg1: str | None, arg2: str | None, db: str | None, trig: str | None
        ) -> int:
            if action == sqlite3.SQLITE_READ:
                tables_read.add(arg1 or "")
                return sqlite3.SQLITE_OK
            if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_FUNCTION):
                return sqlite3.SQLITE_OK
            return sqlite3.SQLITE_DENY

        conn = self._store.open_reader()
        try:
            conn.set_authorizer(authorizer)
            bind: Any = params if params is not None else ()
            try:
                opcodes = {str(r[1]) for r in conn.execute("EXPLAIN " + plan.full_sql(), bind)}
                cur = conn.execute(plan.restricted_sql("0"), bind)
                names = [d[0] for d in cur.description or ()]
                cur.fetchall()
                scans = self._scans(conn, plan, bind)
            except sqlite3.ProgrammingError as e:
                raise SubscriptionError(f"wrong parameters: {e}") from e
            except (sqlite3.Error, ValueError, OverflowError) as e:
                msg = str(e)
                if "not authorized" in msg:
                    msg += " (subscriptions may only read the schema's tables)"
                raise SubscriptionError(f"the query failed: {msg}") from e
        finally:
            conn.close()
        if opcodes & _AGG_OPCODES:
            raise SubscriptionError("aggregate or window functions are not supported in subscriptions")
        allowed = {t.lower() for t in plan.tables}
        others = sorted(t for t in tables_read if t.lower() not in allowed)
        if others:
            raise SubscriptionError(
                f"the query reads tables that cannot be subscribed to: {', '.join(others)}"
            )
        return names[plan.n_hidden :], scans

    @staticmethod
    def _scans(conn: sqlite3.Connection, plan: _Plan, bind: Any) -> builtins.list[str]:
        """Table scans in the plans of the restricted queries. A scan there makes every change to that
        table cost time in proportion to the scanned table (typically a join column without an index);
        it still works, so this is reported (logged, and on ``Subscription.scan_warnings``), not refused."""
        out = []
        for occ in plan.occurrences:
            dummy = [tuple(0 for _ in occ.pk)]
            sql = plan.restricted_sql(_restriction(occ, dummy), inner_join_for=occ if occ.nullable else None)
            for row in conn.execute("EXPLAIN QUERY PLAN " + sql, bind):
                detail = str(row[3])
                if detail.startswith("SCAN ") and not detail.startswith("SCAN CONSTANT"):
                    out.append(
                        f"a change to {occ.table} (as {occ.alias}) is matched with a table scan: {detail}"
                    )
        return out

    def _create(self, req: _Created) -> None:
        """Runs on the matcher thread, so no commit can be matched for this subscription before its initial
        result is stored. Its tables join the interest set before the initial query's read snapshot starts:
        every later commit is therefore queued and matched afterwards (matching is idempotent, so commits the
        snapshot already includes do no harm)."""
        if req.future.done():
            return
        if self._closed:
            req.future.set_exception(SubscriptionError("the subscription manager is closed"))
            return
        with self._lock:
            existing = self._by_key.get(req.key)
            if existing is not None:
                req.future.set_result((existing, False))
                return
            self._creating.append(req.plan.tables)
            self._recompute_interest()
        sub_id = str(uuid.uuid4())
        path = self._dir / f"{sub_id}.db"
        conn: sqlite3.Connection | None = None
        try:
            conn = _open_state(path)
            sub = self._fill(sub_id, req, path, conn)
        except BaseException as e:
            if conn is not None:
                conn.close()
            for suffix in ("", "-wal", "-shm"):
                with suppress(FileNotFoundError):
                    Path(str(path) + suffix).unlink()
            with self._lock:
                self._creating.remove(req.plan.tables)
                self._recompute_interest()
            err = e if isinstance(e, SubscriptionError) else SubscriptionError(f"the query failed: {e}")
            req.future.set_exception(err)
            if not isinstance(e, Exception):
                raise
            return
        with self._lock:
            self._creating.remove(req.plan.tables)
            self._subs[sub_id] = sub
            self._by_key[req.key] = sub
            self._recompute_interest()
        req.future.set_result((sub, True))

    def _fill(self, sub_id: str, req: _Created, path: Path, conn: sqlite3.Connection) -> Subscription:
        plan = req.plan
        n = plan.n_hidden
        insert = (
            f"INSERT INTO rows (rid, {', '.join(f'h{i}' for i in range(n))}, vals) "
            f"VALUES ({', '.join('?' for _ in range(n + 2))})"
        )
        conn.execute("BEGIN IMMEDIATE")
        _create_state_schema(conn, plan)
        rid = 0
        self._deadline = time.monotonic() + self._query_timeout
        bind: Any = req.params if req.params is not None else ()
        try:
            with self._read_snapshot(needed=False):  # one statement: its own snapshot
                cur = self._reader.execute(plan.full_sql(), bind)
                while chunk := cur.fetchmany(1000):
                    rows = []
                    for row in chunk:
                        rid += 1
                        rows.append((rid, *row[:n], _encoder.encode(tuple(row[n:]))))
                    conn.executemany(insert, rows)
        except sqlite3.OperationalError as e:
            if "interrupted" in str(e):
                if self._closed:
                    raise SubscriptionError("the subscription manager was closed") from e
                raise SubscriptionError(
                    f"the initial query took longer than {self._query_timeout:g} s"
                ) from e
            raise
        finally:
            self._deadline = None
        _set_meta(
            conn,
            {
                "format": STATE_FORMAT,
                "sql": req.sql,
                "params": _encoder.encode(req.params),
                "columns": _encoder.encode(req.columns),
                "layout": _encoder.encode(plan.layout()),
                "change_id": 0,
                "next_rowid": rid + 1,
                "created": time.time(),
            },
        )
        conn.execute("COMMIT")
        sub = Subscription(sub_id, req.sql, req.params, req.columns, plan, req.key, path, conn, 0, rid + 1)
        sub.scan_warnings = req.scans
        for w in req.scans:
            log.warning("subscription %s (%s): %s", sub_id, req.sql, w)
        return sub

    # ------------------------------------------------------------------------------------- reload

    def _load_all(self) -> None:
        for path in sorted(self._dir.glob("*.db")):
            try:
                sub = self._load(path)
            except Exception as e:
                log.error("subscription state %s could not be loaded (left in place): %s", path, e)
                continue
            self._subs[sub.id] = sub
            self._by_key[sub._key] = sub
        self._recompute_interest()

    def _load(self, path: Path) -> Subscription:
        sub_id = str(uuid.UUID(path.stem))
        conn = _open_state(path)
        try:
            meta = _meta(conn)
            if meta.get("format") != STATE_FORMAT:
                raise SubscriptionError(f"unknown state format {meta.get('format')!r}")
            sql = str(meta["sql"])
            params = _normalize_params(_decoder.decode(meta["params"]))
            plan = analyse(sql, self._store.schema)
            if _decoder.decode(meta["layout"]) != plan.layout():
                raise SubscriptionError("the query's tables or primary keys changed since it was stored")
            columns, scans = self._probe(plan, params)
            stored_columns = _decoder.decode(meta["columns"])
            if stored_columns != columns:
                log.warning("subscription %s: columns changed from %s to %s", sub_id, stored_columns, columns)
                conn.execute("BEGIN IMMEDIATE")
                _set_meta(conn, {"columns": _encoder.encode(columns)})
                conn.execute("COMMIT")
            key = f"{plan.canonical}\x00{_params_key(params)}\x00{columns!r}"
            sub = Subscription(
                sub_id,
                sql,
                params,
                columns,
                plan,
                key,
                path,
                conn,
                int(meta["change_id"]),
                int(meta["next_rowid"]),
            )
            sub.scan_warnings = scans
        except BaseException:
            conn.close()
            raise
        # The agent may have missed commits while it was down: re-run the query once and log the difference.
        sub._needs_full = True
        return sub


__all__ = [
    "ChangeEvent",
    "GapError",
    "Subscription",
    "SubscriptionError",
    "SubscriptionManager",
    "SubscriptionStats",
    "analyse",
    "sql_literal",
]
