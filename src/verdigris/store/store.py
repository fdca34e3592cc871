"""The replicated SQLite store: local transactions with per-column clocks, change extraction, CRDT merge.

Semantics follow cr-sqlite as Corrosion uses it (see ARCHITECTURE.md, "Store rules"):

* Every schema table ``t`` gets a clock table ``__vd_clock__t`` keyed by ``(pk..., cid)`` holding
  ``col_version`` and the ``(site_id, db_version, seq)`` of the change that set the current value.
  The sentinel ``cid = '-1'`` holds the row's causal length in ``col_version`` (odd alive, even deleted).
* Triggers record local writes; they only act while :meth:`Store.transact` runs (``vd_local()``), so merges
  of remote changes write the base tables directly without producing new local changes.
* One committed local transaction that changed something = one new version of this node's actor of the
  scope of the tables it wrote (``regional``: the site id; ``global``: a second actor id); a transaction
  writing tables of both scopes makes one version of each actor (see docs/store.md, "Scopes").

Thread-safety: one writer connection guarded by a mutex; readers open their own read-only connections.
"""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from verdigris.store.ranges import RangeSet
from verdigris.store.schema import (
    DEFAULT_SCOPE,
    INTERNAL_PREFIX,
    SCOPES,
    SCOPES_TABLE,
    Schema,
    SchemaChanges,
    Table,
    diff_schema,
    load_schema_files,
    parse_schema,
    quote_ident,
    read_database_schema,
)
from verdigris.store.types import (
    SENTINEL_CID,
    Change,
    Changeset,
    MergeError,
    SchemaError,
    SqlValue,
    Statement,
    StatementError,
    StatementResult,
    StoreError,
    TransactionResult,
)

PkTuple = tuple[SqlValue, ...]
NO_SITE = b""
"""Site id recorded on a sentinel whose causal length was implied by a column change (no sentinel change seen)."""

_change_list_encoder = msgspec.msgpack.Encoder()
_change_list_decoder = msgspec.msgpack.Decoder(list[Change])


def clock_table(table: str) -> str:
    return f"{INTERNAL_PREFIX}clock__{table}"


def value_key(v: SqlValue) -> tuple[int, Any]:
    """Sort key of a value in cr-sqlite's order: INTEGER > REAL > TEXT > BLOB > NULL; within a type
    numeric (numbers) or bytewise (text as UTF-8, blobs)."""
    if v is None:
        return (0, 0)
    if isinstance(v, bool):
        return (4, int(v))
    if isinstance(v, int):
        return (4, v)
    if isinstance(v, float):
        return (3, v)
    if isinstance(v, str):
        return (2, v.encode("utf-8", "surrogatepass"))
    return (1, bytes(v))


@dataclass
class CommitNotice:
    """Sent to commit listeners after every commit that changed rows."""

    tables: dict[str, set[PkTuple]]
    """Table name -> primary keys of rows inserted, updated or deleted by the commit."""
    local_version: int | None = None
    """The version of this node's regional actor (its site id) made by this commit, or None (a merge of
    remote changes, or a local transaction that wrote global tables only)."""
    remote_versions: list[tuple[bytes, int]] = field(default_factory=list)
    """(actor, version) pairs completed by a merge."""
    versions: dict[bytes, int] = field(default_factory=dict)
    """Local actor -> its new version, for every own actor (one per scope) this commit made a version of;
    empty for a merge."""


@dataclass
class MergeResult:
    applied_versions: list[tuple[bytes, int]] = field(default_factory=list)
    """Versions that became complete and were applied by this merge."""
    buffered: list[tuple[bytes, int]] = field(default_factory=list)
    """Partial versions whose pieces were stored, waiting for the rest."""
    duplicates: int = 0
    """Changesets for versions already known (ignored; merging is idempotent)."""
    rejected: list[tuple[bytes, int, str]] = field(default_factory=list)
    """(actor, version, reason) for changesets refused as invalid; they are not booked."""
    changes_applied: int = 0
    """Changes that won and were written."""
    changes_seen: int = 0


@dataclass
class ActorBooks:
    """What this node knows of one actor's versions."""

    known: RangeSet = field(default_factory=RangeSet)
    """Complete versions (applied, or cleared)."""
    partials: dict[int, tuple[RangeSet, int]] = field(default_factory=dict)
    """Version -> (seq ranges received, last seq) for versions received in part."""

    @property
    def head(self) -> int:
        return max(self.known.max, max(self.partials, default=0))

    def needs(self) -> list[tuple[int, int]]:
        """Version ranges below the head that are neither complete nor partial."""
        gaps = self.known.gaps(1, self.head) if self.head else []
        out: list[tuple[int, int]] = []
        for s, e in gaps:
            run_start = s
            for v in range(s, e + 1):
                if v in self.partials:
                    if run_start < v:
                        out.append((run_start, v - 1))
                    run_start = v + 1
            if run_start <= e:
                out.append((run_start, e))
        return out

    def partial_needs(self) -> dict[int, list[tuple[int, int]]]:
        return {v: seqs.gaps(0, last) for v, (seqs, last) in self.partials.items()}


_INTERNAL_DDL = f"""
CREATE TABLE IF NOT EXISTS {INTERNAL_PREFIX}site (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    site_id BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS {SCOPES_TABLE} (
    name TEXT PRIMARY KEY,
    scope TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS {INTERNAL_PREFIX}actors (
    actor BLOB PRIMARY KEY,
    scope TEXT NOT NULL,
    own INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {INTERNAL_PREFIX}bookkeeping (
    actor BLOB NOT NULL,
    start INTEGER NOT NULL,
    "end" INTEGER NOT NULL,
    PRIMARY KEY (actor, start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {INTERNAL_PREFIX}buffer (
    actor BLOB NOT NULL,
    version INTEGER NOT NULL,
    start_seq INTEGER NOT NULL,
    end_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    changes BLOB NOT NULL,
    PRIMARY KEY (actor, version, start_seq)
) WITHOUT ROWID;
"""


@dataclass
class _RowState:
    """In-memory view of one row during a merge batch."""

    cl: int
    meta: tuple[bytes, int, int] | None
    exists: bool
    clocks: dict[str, tuple[int, tuple[int, Any], bytes, int, int]]
    values: dict[str, SqlValue]
    reset: bool = False
    sentinel_dirty: bool = False
    dirty_cols: set[str] = field(default_factory=set)


class _TableOps:
    """Prepared SQL for one replicated table."""

    def __init__(self, table: Table, tag: str) -> None:
        self.table = table
        self.tag = tag
        t = quote_ident(table.name)
        k = quote_ident(clock_table(table.name))
        pk = table.pk
        self.pk = pk
        self.non_pk = table.non_pk
        pk_cols = ", ".join(quote_ident(c) for c in pk)
        self.pk_cols = pk_cols
        pk_match = " AND ".join(f"{quote_ident(c)} = ?" for c in pk)
        self.select_clocks = (
            f"{tag} SELECT {pk_cols}, cid, col_version, site_id, db_version, seq FROM {k} "
            f"WHERE ({pk_cols}) IN (VALUES {{values}})"
        )
        all_cols = ", ".join(quote_ident(c) for c in (*pk, *table.non_pk))
        self.select_rows = f"{tag} SELECT {all_cols} FROM {t} WHERE ({pk_cols}) IN (VALUES {{values}})"
        self.pk_placeholder = "(" + ", ".join("?" for _ in pk) + ")"
        self.delete_row = f"{tag} DELETE FROM {t} WHERE {pk_match}"
        self.columns = frozenset(table.non_pk)
        self._upserts: dict[tuple[str, ...], str] = {}
        self.delete_col_clocks = f"{tag} DELETE FROM {k} WHERE {pk_match} AND cid != '{SENTINEL_CID}'"
        self.upsert_clock = (
            f"{tag} INSERT INTO {k} ({pk_cols}, cid, col_version, db_version, seq, site_id) "
            f"VALUES ({', '.join('?' for _ in pk)}, ?, ?, ?, ?, ?) "
            f"ON CONFLICT DO UPDATE SET col_version = excluded.col_version, db_version = excluded.db_version, "
            f"seq = excluded.seq, site_id = excluded.site_id"
        )
        value_case = (
            "CASE k.cid "
            + " ".join(f"WHEN {sql_str(c)} THEN t.{quote_ident(c)}" for c in table.non_pk)
            + " END"
            if table.non_pk
            else "NULL"
        )
        join_pk = " AND ".join(f"t.{quote_ident(c)} = k.{quote_ident(c)}" for c in pk)
        join_sentinel = " AND ".join(f"s.{quote_ident(c)} = k.{quote_ident(c)}" for c in pk)
        kpk = ", ".join(f"k.{quote_ident(c)}" for c in pk)
        self.select_changes = (
            f"{tag} SELECT {kpk}, k.cid, {value_case}, k.col_version, k.db_version, k.site_id, "
            f"COALESCE(s.col_version, 1), k.seq "
            f"FROM {k} AS k LEFT JOIN {t} AS t ON {join_pk} "
            f"LEFT JOIN {k} AS s ON {join_sentinel} AND s.cid = '{SENTINEL_CID}' "
            f"WHERE k.site_id = ? AND k.db_version BETWEEN ? AND ?"
        )
        self.select_touched = f"{tag} SELECT DISTINCT {pk_cols} FROM {k} WHERE site_id = ? AND db_version = ?"

    def upsert_row(self, cols: tuple[str, ...]) -> str:
        """Statement writing the primary key plus ``cols`` of one row, inserting it when absent."""
        sql = self._upserts.get(cols)
        if sql is None:
            names = ", ".join(quote_ident(c) for c in (*self.pk, *cols))
            marks = ", ".join("?" for _ in range(len(self.pk) + len(cols)))
            t = quote_ident(self.table.name)
            if cols:
                sets = ", ".join(f"{quote_ident(c)} = excluded.{quote_ident(c)}" for c in cols)
                sql = (
                    f"{self.tag} INSERT INTO {t} ({names}) VALUES ({marks}) ON CONFLICT DO UPDATE SET {sets}"
                )
            else:
                sql = f"{self.tag} INSERT OR IGNORE INTO {t} ({names}) VALUES ({marks})"
            self._upserts[cols] = sql
        return sql

    def clock_ddl(self) -> list[str]:
        table = self.table
        k = quote_ident(clock_table(table.name))
        pk_defs = ", ".join(f"{quote_ident(c.name)} {c.type}" for c in table.columns if c.pk_index)
        return [
            f"CREATE TABLE IF NOT EXISTS {k} ({pk_defs}, cid TEXT NOT NULL, col_version INTEGER NOT NULL, "
            f"db_version INTEGER NOT NULL, seq INTEGER NOT NULL, site_id BLOB NOT NULL, "
            f"PRIMARY KEY ({self.pk_cols}, cid)) WITHOUT ROWID",
            f"CREATE INDEX IF NOT EXISTS {quote_ident(clock_table(table.name) + '__by_version')} "
            f"ON {k} (site_id, db_version, seq)",
        ]

    def trigger_ddl(self) -> list[str]:
        table = self.table
        name = table.name
        scope = sql_str(table.scope)
        version, seq, site = f"vd_version({scope})", f"vd_seq({scope})", f"vd_site({scope})"
        t = quote_ident(name)
        k = quote_ident(clock_table(name))
        pk = self.pk

        def match(prefix: str) -> str:
            return " AND ".join(f"{quote_ident(c)} = {prefix}.{quote_ident(c)}" for c in pk)

        def pk_vals(prefix: str) -> str:
            return ", ".join(f"{prefix}.{quote_ident(c)}" for c in pk)

        def alive(prefix: str) -> list[str]:
            # Row (re)appears: sentinel to 1, or from even (deleted) to the next odd.
            return [
                f"INSERT INTO {k} ({self.pk_cols}, cid, col_version, db_version, seq, site_id) "
                f"SELECT {pk_vals(prefix)}, '{SENTINEL_CID}', 1, {version}, {seq}, {site} "
                f"WHERE NOT EXISTS (SELECT 1 FROM {k} WHERE {match(prefix)} AND cid = '{SENTINEL_CID}');",
                f"UPDATE {k} SET col_version = col_version + 1, db_version = {version}, seq = {seq}, "
                f"site_id = {site} WHERE {match(prefix)} AND cid = '{SENTINEL_CID}' AND col_version % 2 = 0;",
            ]

        def bump(prefix: str, col: str, cond: str = "") -> str:
            where = f" WHERE {cond}" if cond else " WHERE 1"
            return (
                f"INSERT INTO {k} ({self.pk_cols}, cid, col_version, db_version, seq, site_id) "
                f"SELECT {pk_vals(prefix)}, {sql_str(col)}, 1, {version}, {seq}, {site}{where} "
                f"ON CONFLICT DO UPDATE SET col_version = col_version + 1, db_version = excluded.db_version, "
                f"seq = excluded.seq, site_id = excluded.site_id;"
            )

        def gone(prefix: str) -> list[str]:
            return [
                f"UPDATE {k} SET col_version = col_version + 1, db_version = {version}, seq = {seq}, "
                f"site_id = {site} WHERE {match(prefix)} AND cid = '{SENTINEL_CID}' AND col_version % 2 = 1;",
                f"INSERT INTO {k} ({self.pk_cols}, cid, col_version, db_version, seq, site_id) "
                f"SELECT {pk_vals(prefix)}, '{SENTINEL_CID}', 2, {version}, {seq}, {site} "
                f"WHERE NOT EXISTS (SELECT 1 FROM {k} WHERE {match(prefix)} AND cid = '{SENTINEL_CID}');",
                f"DELETE FROM {k} WHERE {match(prefix)} AND cid != '{SENTINEL_CID}';",
            ]

        pk_same = " AND ".join(f"OLD.{quote_ident(c)} IS NEW.{quote_ident(c)}" for c in pk)
        ins_body = alive("NEW") + [bump("NEW", c) for c in self.non_pk]
        upd_body = [bump("NEW", c, f"OLD.{quote_ident(c)} IS NOT NEW.{quote_ident(c)}") for c in self.non_pk]
        pk_change_body = gone("OLD") + alive("NEW") + [bump("NEW", c) for c in self.non_pk]
        prefix = f"{INTERNAL_PREFIX}trg__{name}"
        ddl = [
            f"DROP TRIGGER IF EXISTS {quote_ident(prefix + '__ins')}",
            f"DROP TRIGGER IF EXISTS {quote_ident(prefix + '__upd')}",
            f"DROP TRIGGER IF EXISTS {quote_ident(prefix + '__updpk')}",
            f"DROP TRIGGER IF EXISTS {quote_ident(prefix + '__del')}",
            f"CREATE TRIGGER {quote_ident(prefix + '__ins')} AFTER INSERT ON {t} WHEN vd_local() BEGIN\n"
            + "\n".join(ins_body)
            + "\nEND",
            f"CREATE TRIGGER {quote_ident(prefix + '__del')} AFTER DELETE ON {t} WHEN vd_local() BEGIN\n"
            + "\n".join(gone("OLD"))
            + "\nEND",
            f"CREATE TRIGGER {quote_ident(prefix + '__updpk')} AFTER UPDATE ON {t} "
            f"WHEN vd_local() AND NOT ({pk_same}) BEGIN\n" + "\n".join(pk_change_body) + "\nEND",
        ]
        if upd_body:
            ddl.append(
                f"CREATE TRIGGER {quote_ident(prefix + '__upd')} AFTER UPDATE ON {t} "
                f"WHEN vd_local() AND {pk_same} BEGIN\n" + "\n".join(upd_body) + "\nEND"
            )
        return ddl


def sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


# Authorizer action codes that user SQL in a transaction may never use.
_DENIED_IN_TRANSACTIONS = {
    sqlite3.SQLITE_ATTACH,
    sqlite3.SQLITE_DETACH,
    sqlite3.SQLITE_PRAGMA,
    sqlite3.SQLITE_TRANSACTION,
    sqlite3.SQLITE_SAVEPOINT,
    sqlite3.SQLITE_ALTER_TABLE,
    sqlite3.SQLITE_CREATE_INDEX,
    sqlite3.SQLITE_CREATE_TABLE,
    sqlite3.SQLITE_CREATE_TEMP_INDEX,
    sqlite3.SQLITE_CREATE_TEMP_TABLE,
    sqlite3.SQLITE_CREATE_TEMP_TRIGGER,
    sqlite3.SQLITE_CREATE_TEMP_VIEW,
    sqlite3.SQLITE_CREATE_TRIGGER,
    sqlite3.SQLITE_CREATE_VIEW,
    sqlite3.SQLITE_CREATE_VTABLE,
    sqlite3.SQLITE_DROP_INDEX,
    sqlite3.SQLITE_DROP_TABLE,
    sqlite3.SQLITE_DROP_TEMP_INDEX,
    sqlite3.SQLITE_DROP_TEMP_TABLE,
    sqlite3.SQLITE_DROP_TEMP_TRIGGER,
    sqlite3.SQLITE_DROP_TEMP_VIEW,
    sqlite3.SQLITE_DROP_TRIGGER,
    sqlite3.SQLITE_DROP_VIEW,
    sqlite3.SQLITE_DROP_VTABLE,
}
_WRITE_ACTIONS = {sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE}


def _reader_authorizer(
    action: int,
    arg1: str | None,
    arg2: str | None,
    db: str | None,
    trig: str | None,
) -> int:
    # Table-valued functions (json_each, ...) declare their virtual table, which the authorizer sees as
    # an UPDATE of sqlite_master; SQLite itself refuses real writes to it.
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA and arg2 is not None:
        return sqlite3.SQLITE_DENY
    if action in _WRITE_ACTIONS and arg1 != "sqlite_master":
        return sqlite3.SQLITE_DENY
    if action in _DENIED_IN_TRANSACTIONS - {sqlite3.SQLITE_PRAGMA}:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


class Store:
    """A replicated SQLite database. See the module docstring."""

    def __init__(
        self,
        path: str | Path,
        schema_paths: Sequence[str | Path] = (),
        *,
        schema_sql: str | None = None,
        site_id: bytes | None = None,
        global_site_id: bytes | None = None,
    ) -> None:
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # Per-process markers keep internal statements and user SQL apart in the statement cache, so a
        # user statement can never reuse an internal statement prepared without the authorizer's checks.
        self._tag = f"/*vd:{secrets.token_hex(8)}*/"
        self._user_suffix = f"\n/*user:{secrets.token_hex(8)}*/"
        self._lock = threading.RLock()
        self._local = False
        self._user_sql = False
        self._pending_version: dict[str, int] = dict.fromkeys(SCOPES, 0)
        self._seq: dict[str, int] = dict.fromkeys(SCOPES, 0)
        self._listeners: list[Callable[[CommitNotice], None]] = []
        self._conn = sqlite3.connect(
            str(self.path), isolation_level=None, check_same_thread=False, cached_statements=512
        )
        try:
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.execute("PRAGMA busy_timeout = 5000")
            # 64 MiB page cache: merges touch clock tables and their indexes all over the file.
            self._conn.execute("PRAGMA cache_size = -65536")
            self._conn.create_function("vd_local", 0, lambda: 1 if self._local else 0)
            # The one-argument forms take the table's scope; the zero-argument ones (triggers made before
            # scopes existed) mean the regional actor.
            self._conn.create_function("vd_version", 0, lambda: self._pending_version[DEFAULT_SCOPE])
            self._conn.create_function("vd_version", 1, lambda scope: self._pending_version[scope])
            self._conn.create_function("vd_seq", 0, lambda: self._next_seq(DEFAULT_SCOPE))
            self._conn.create_function("vd_seq", 1, self._next_seq)
            self._conn.create_function("vd_site", 0, lambda: self.site_id)
            self._conn.create_function("vd_site", 1, lambda scope: self._own[scope])
            self._conn.set_authorizer(self._authorize)
            had_actors = (
                self._conn.execute(
                    f"SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = '{INTERNAL_PREFIX}actors'"
                ).fetchone()
                is not None
            )
            self._conn.executescript(_INTERNAL_DDL)
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._init_actors(site_id, global_site_id, migrate=not had_actors)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._books: dict[bytes, ActorBooks] = {}
            self._actor_scopes: dict[bytes, str] = {}
            self._load_books()
            self.schema = read_database_schema(self._conn)
            self._ops: dict[str, _TableOps] = {}
            self._rebuild_ops()
            if schema_sql is not None:
                self.apply_schema(parse_schema([("<schema>", schema_sql)]))
            elif schema_paths:
                self.apply_schema(load_schema_files(schema_paths))
        except BaseException:
            self._conn.close()
            raise

    def _init_actors(self, site_id: bytes | None, global_site_id: bytes | None, *, migrate: bool) -> None:
        """Read (or create) this node's actor of each scope, and record it in ``__vd_actors``."""
        conn = self._conn
        row = conn.execute(f"SELECT site_id FROM {INTERNAL_PREFIX}site WHERE id = 0").fetchone()
        if row is None:
            self.site_id = site_id or os.urandom(16)
            conn.execute(f"INSERT INTO {INTERNAL_PREFIX}site (id, site_id) VALUES (0, ?)", (self.site_id,))
        else:
            self.site_id = bytes(row[0])
        if migrate:
            # A database from before scopes: every table was regional, so was every actor it knows.
            conn.execute(
                f"INSERT OR IGNORE INTO {INTERNAL_PREFIX}actors (actor, scope, own) "
                f"SELECT DISTINCT actor, '{DEFAULT_SCOPE}', 0 FROM {INTERNAL_PREFIX}bookkeeping "
                f"UNION SELECT DISTINCT actor, '{DEFAULT_SCOPE}', 0 FROM {INTERNAL_PREFIX}buffer"
            )
        # The regional actor is the site id (``verdigris restore`` may have changed it: an old own actor
        # becomes an actor like any other).
        conn.execute(
            f"UPDATE {INTERNAL_PREFIX}actors SET own = 0 WHERE own = 1 AND scope = 'regional' AND actor != ?",
            (self.site_id,),
        )
        conn.execute(
            f"INSERT INTO {INTERNAL_PREFIX}actors (actor, scope, own) VALUES (?, 'regional', 1) "
            "ON CONFLICT (actor) DO UPDATE SET scope = 'regional', own = 1",
            (self.site_id,),
        )
        row = conn.execute(
            f"SELECT actor FROM {INTERNAL_PREFIX}actors WHERE own = 1 AND scope = 'global'"
        ).fetchone()
        if row is None:
            global_id = global_site_id or os.urandom(16)
            if global_id == self.site_id:
                raise StoreError("the global actor id must differ from the site id")
            conn.execute(
                f"INSERT INTO {INTERNAL_PREFIX}actors (actor, scope, own) VALUES (?, 'global', 1) "
                "ON CONFLICT (actor) DO UPDATE SET scope = 'global', own = 1",
                (global_id,),
            )
        else:
            global_id = bytes(row[0])
        self._own: dict[str, bytes] = {"regional": self.site_id, "global": global_id}

    # ----------------------------------------------------------------------------------------- basics

    def _next_seq(self, scope: str) -> int:
        s = self._seq[scope]
        self._seq[scope] = s + 1
        return s

    def actor_for(self, scope: str) -> bytes:
        """This node's actor id for ``scope`` (``regional``: :attr:`site_id`; ``global``: a second id)."""
        try:
            return self._own[scope]
        except KeyError:
            raise ValueError(f"unknown scope {scope!r} (expected one of: {', '.join(SCOPES)})") from None

    def scope_of(self, actor: bytes) -> str | None:
        """The scope of an actor's versions (own actors, and remote actors once seen), or None if unknown."""
        return self._actor_scopes.get(actor)

    def db_version_of(self, scope: str) -> int:
        """The highest version of this node's actor of ``scope``."""
        books = self._books.get(self.actor_for(scope))
        return books.known.max if books else 0

    def _authorize(
        self, action: int, arg1: str | None, arg2: str | None, db: str | None, trig: str | None
    ) -> int:
        if not self._user_sql:
            return sqlite3.SQLITE_OK
        if action in _DENIED_IN_TRANSACTIONS:
            return sqlite3.SQLITE_DENY
        if (
            action in _WRITE_ACTIONS
            and trig is None
            and arg1 is not None
            and (arg1.startswith(INTERNAL_PREFIX) or arg1 == "sqlite_sequence")
        ):
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK

    @property
    def db_version(self) -> int:
        """The highest version of this node's own regional actor (its site id)."""
        books = self._books.get(self.site_id)
        return books.known.max if books else 0

    def add_commit_listener(self, fn: Callable[[CommitNotice], None]) -> None:
        """Call ``fn`` (on the writer's thread, after commit) for every commit that changed rows."""
        self._listeners.append(fn)

    def remove_commit_listener(self, fn: Callable[[CommitNotice], None]) -> None:
        if fn in self._listeners:
            self._listeners.remove(fn)

    def _notify(self, notice: CommitNotice) -> None:
        for fn in list(self._listeners):
            fn(notice)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open_reader(self) -> sqlite3.Connection:
        """A new read-only connection: writes fail inside SQLite (read-only open mode), ATTACH and pragma
        writes are refused by an authorizer. Use one per thread."""
        uri = f"file:{self.path.resolve()}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA query_only = ON")
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.set_authorizer(_reader_authorizer)
        return conn

    # ----------------------------------------------------------------------------------------- schema

    def _rebuild_ops(self) -> None:
        self._ops = {name: _TableOps(t, self._tag) for name, t in self.schema.tables.items()}

    def reload_schema(self, schema_paths: Sequence[str | Path]) -> SchemaChanges:
        """Apply additive changes from schema files to the live database."""
        return self.apply_schema(load_schema_files(schema_paths))

    def apply_schema(self, new: Schema) -> SchemaChanges:
        with self._lock:
            current = read_database_schema(self._conn)
            changes = diff_schema(current, new)
            if changes.is_empty() and self._ops and set(self._ops) == set(new.tables):
                return changes
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for name in changes.new_tables:
                    self._conn.execute(new.tables[name].sql)
                for table, col in changes.new_columns:
                    column = new.tables[table].column(col)
                    assert column is not None
                    self._conn.execute(f"ALTER TABLE {quote_ident(table)} ADD COLUMN {column.definition()}")
                for name in changes.dropped_indexes + changes.changed_indexes:
                    self._conn.execute(f"DROP INDEX IF EXISTS {quote_ident(name)}")
                for name in changes.new_indexes + changes.changed_indexes:
                    self._conn.execute(new.indexes[name].sql)
                self._conn.executemany(
                    f"INSERT INTO {SCOPES_TABLE} (name, scope) VALUES (?, ?) ON CONFLICT DO NOTHING",
                    [(name, t.scope) for name, t in new.tables.items()],
                )
                self.schema = read_database_schema(self._conn)
                self._rebuild_ops()
                for ops in self._ops.values():
                    for stmt in ops.clock_ddl() + ops.trigger_ddl():
                        self._conn.execute(stmt)
                self._conn.execute("COMMIT")
            except sqlite3.Error as e:
                self._conn.execute("ROLLBACK")
                self.schema = read_database_schema(self._conn)
                self._rebuild_ops()
                raise SchemaError(f"applying schema failed: {e}") from e
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            return changes

    # ----------------------------------------------------------------------------------------- local writes

    def transact(self, statements: Sequence[Statement]) -> TransactionResult:
        """Run statements in one transaction. Any failure rolls back all and raises StatementError."""
        started = time.perf_counter()
        results: list[StatementResult] = []
        with self._lock:
            conn = self._conn
            conn.execute(f"{self._tag} BEGIN IMMEDIATE")
            for scope in SCOPES:
                self._pending_version[scope] = self.db_version_of(scope) + 1
                self._seq[scope] = 0
            self._local = True
            try:
                for i, st in enumerate(statements):
                    t0 = time.perf_counter()
                    params: Sequence[Any] | dict[str, Any] = (
                        st.named_params if st.named_params is not None else (st.params or ())
                    )
                    self._user_sql = True
                    try:
                        cur = conn.execute(st.sql + self._user_suffix, params)
                        if cur.description is not None:
                            cur.fetchall()
                        rows = cur.rowcount if cur.rowcount >= 0 else 0
                    except (sqlite3.Error, ValueError, OverflowError, TypeError) as e:
                        raise StatementError(i, st.sql, _describe_sql_error(e)) from e
                    finally:
                        self._user_sql = False
                    results.append(StatementResult(rows_affected=rows, time=time.perf_counter() - t0))
                self._local = False
                versions: dict[str, int] = {}
                touched: dict[str, set[PkTuple]] = {}
                for scope in SCOPES:
                    if self._seq[scope] > 0:
                        version = versions[scope] = self._pending_version[scope]
                        touched.update(self._touched_by_local(scope, version))
                        self._book_complete(self._own[scope], version)
                conn.execute(f"{self._tag} COMMIT")
            except BaseException:
                self._local = False
                self._user_sql = False
                if conn.in_transaction:
                    conn.execute(f"{self._tag} ROLLBACK")
                # After a rollback the in-memory books may be ahead of the database; re-read them.
                self._load_books()
                raise
            if versions:
                self._notify(
                    CommitNotice(
                        tables=touched,
                        local_version=versions.get("regional"),
                        versions={self._own[sc]: v for sc, v in versions.items()},
                    )
                )
        return TransactionResult(
            results=results,
            time=time.perf_counter() - started,
            version=versions.get("regional", versions.get("global")),
            versions=versions,
        )

    def _touched_by_local(self, scope: str, version: int) -> dict[str, set[PkTuple]]:
        touched: dict[str, set[PkTuple]] = {}
        actor = self._own[scope]
        for name, ops in self._ops.items():
            if ops.table.scope != scope:
                continue
            rows = self._conn.execute(ops.select_touched, (actor, version)).fetchall()
            if rows:
                touched[name] = {tuple(r) for r in rows}
        return touched

    # ----------------------------------------------------------------------------------------- extraction

    def changesets_for(self, actor: bytes, start: int, end: int) -> list[Changeset]:
        """Current changes of ``actor``'s versions ``start..end`` that this node knows completely, one
        changeset per version, in version order. Versions whose changes were all superseded come as
        empty ("cleared") changesets. Versions not known completely here are left out."""
        books = self._books.get(actor)
        if books is None:
            return []
        scope = self._actor_scopes.get(actor)
        with self._lock:
            by_version: dict[int, list[Change]] = {}
            for name, ops in self._ops.items():
                if scope is not None and ops.table.scope != scope:
                    continue
                cur = self._conn.execute(ops.select_changes, (actor, start, end))
                npk = len(ops.pk)
                for r in cur:
                    by_version.setdefault(r[npk + 3], []).append(
                        Change(
                            table=name,
                            pk=tuple(r[:npk]),
                            cid=r[npk],
                            val=r[npk + 1],
                            col_version=r[npk + 2],
                            db_version=r[npk + 3],
                            site_id=actor,
                            cl=r[npk + 5],
                            seq=r[npk + 6],
                        )
                    )
        out: list[Changeset] = []
        for s, e in books.known:
            for v in range(max(s, start), min(e, end) + 1):
                changes = sorted(by_version.get(v, []), key=lambda c: c.seq)
                last = changes[-1].seq if changes else 0
                out.append(Changeset(actor=actor, version=v, changes=changes, seqs=(0, last), last_seq=last))
        return out

    def changeset(self, actor: bytes, version: int) -> Changeset | None:
        found = self.changesets_for(actor, version, version)
        return found[0] if found else None

    # ----------------------------------------------------------------------------------------- bookkeeping

    def _load_books(self) -> None:
        self._books = {}
        self._actor_scopes = {
            bytes(actor): str(scope)
            for actor, scope in self._conn.execute(f"SELECT actor, scope FROM {INTERNAL_PREFIX}actors")
        }
        for actor, start, end in self._conn.execute(
            f'SELECT actor, start, "end" FROM {INTERNAL_PREFIX}bookkeeping ORDER BY actor, start'
        ):
            self._books.setdefault(bytes(actor), ActorBooks()).known.add(start, end)
        for actor, version, s, e, last in self._conn.execute(
            f"SELECT actor, version, start_seq, end_seq, last_seq FROM {INTERNAL_PREFIX}buffer"
        ):
            books = self._books.setdefault(bytes(actor), ActorBooks())
            seqs, prev_last = books.partials.get(version, (RangeSet(), last))
            seqs.add(s, e)
            books.partials[version] = (seqs, min(prev_last, last))

    def _book_complete(self, actor: bytes, version: int) -> None:
        books = self._books.setdefault(actor, ActorBooks())
        replaced, merged = books.known.add(version)
        table = f"{INTERNAL_PREFIX}bookkeeping"
        if replaced:
            self._conn.executemany(
                f"{self._tag} DELETE FROM {table} WHERE actor = ? AND start = ?",
                [(actor, s) for s, _ in replaced],
            )
        self._conn.execute(
            f'{self._tag} INSERT INTO {table} (actor, start, "end") VALUES (?, ?, ?)',
            (actor, merged[0], merged[1]),
        )

    def books(self, scope: str | None = None) -> dict[bytes, ActorBooks]:
        """Bookkeeping per actor (a live view; do not modify). With ``scope``, only the actors of that scope
        (a new dict of the live books)."""
        if scope is None:
            return self._books
        self._check_scope(scope)
        scopes = self._actor_scopes
        return {actor: b for actor, b in self._books.items() if scopes.get(actor) == scope}

    def heads(self, scope: str | None = None) -> dict[bytes, int]:
        return {actor: b.head for actor, b in self.books(scope).items()}

    def needs(self, scope: str | None = None) -> dict[bytes, list[tuple[int, int]]]:
        return {actor: n for actor, b in self.books(scope).items() if (n := b.needs())}

    @staticmethod
    def _check_scope(scope: str) -> None:
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r} (expected one of: {', '.join(SCOPES)})")

    def knows(self, actor: bytes, version: int) -> bool:
        books = self._books.get(actor)
        return books is not None and version in books.known

    # ----------------------------------------------------------------------------------------- merge

    def merge(self, changesets: Iterable[Changeset], scope: str | None = None) -> MergeResult:
        """Merge remote changesets in one transaction. Complete versions are applied; pieces of a chunked
        version are buffered (persisted) until every seq has arrived. Invalid changesets are rejected
        (reported, not booked) without affecting the others.

        Every changeset belongs to one scope: its tables' (all of one scope), which must be the scope
        recorded for its actor (on first sight). With ``scope`` (the cluster the changesets came from),
        changesets of the other scope are rejected too."""
        if scope is not None:
            self._check_scope(scope)
        result = MergeResult()
        with self._lock:
            conn = self._conn
            conn.execute(f"{self._tag} BEGIN IMMEDIATE")
            try:
                ready: list[Change] = []
                completed: list[tuple[bytes, int]] = []
                for cs in changesets:
                    problem = self._validate(cs) or self._check_changeset_scope(cs, scope)
                    if problem is not None:
                        result.rejected.append((cs.actor, cs.version, problem))
                        continue
                    books = self._books.setdefault(cs.actor, ActorBooks())
                    if cs.version in books.known or (cs.actor, cs.version) in completed:
                        result.duplicates += 1
                        continue
                    result.changes_seen += len(cs.changes)
                    if cs.seqs == (0, cs.last_seq) and cs.version not in books.partials:
                        ready.extend(cs.changes)
                        completed.append((cs.actor, cs.version))
                        continue
                    full = self._buffer_piece(books, cs)
                    if full is None:
                        result.buffered.append((cs.actor, cs.version))
                    else:
                        ready.extend(full)
                        completed.append((cs.actor, cs.version))
                touched = self._apply_changes(ready, result)
                for actor, version in completed:
                    self._book_complete(actor, version)
                conn.execute(f"{self._tag} COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute(f"{self._tag} ROLLBACK")
                self._load_books()
                raise
            result.applied_versions = completed
        if touched:
            self._notify(CommitNotice(tables=touched, remote_versions=list(completed)))
        return result

    def _check_changeset_scope(self, cs: Changeset, scope: str | None) -> str | None:
        """Check a (valid) changeset's scope; record its actor's scope on first sight."""
        scopes = {self._ops[ch.table].table.scope for ch in cs.changes}
        if len(scopes) > 1:
            return "changeset mixes regional and global tables (a version belongs to one scope)"
        known = self._actor_scopes.get(cs.actor)
        cs_scope = next(iter(scopes)) if scopes else (known or scope)
        if known is not None and cs_scope != known:
            table = cs.changes[0].table
            return f"actor of scope {known!r} sent a change to {cs_scope} table {table!r}"
        if scope is not None and cs_scope != scope:
            return f"changeset of scope {cs_scope!r} merged as {scope!r} (wrong cluster)"
        if known is None and cs_scope is not None:
            self._actor_scopes[cs.actor] = cs_scope
            self._conn.execute(
                f"{self._tag} INSERT INTO {INTERNAL_PREFIX}actors (actor, scope, own) VALUES (?, ?, 0) ON CONFLICT DO NOTHING",
                (cs.actor, cs_scope),
            )
        return None

    def _validate(self, cs: Changeset) -> str | None:
        if len(cs.actor) != 16:
            return "actor id must be 16 bytes"
        if cs.actor in self._own.values():
            return "changeset of this node's own actor"
        if cs.version < 1:
            return "version must be >= 1"
        s, e = cs.seqs
        if not (0 <= s <= e <= cs.last_seq):
            return f"bad seq range {s}..{e} of last seq {cs.last_seq}"
        for ch in cs.changes:
            if ch.site_id != cs.actor or ch.db_version != cs.version:
                return "change does not belong to the changeset's actor and version"
            if not (s <= ch.seq <= e):
                return f"change seq {ch.seq} outside {s}..{e}"
            ops = self._ops.get(ch.table)
            if ops is None:
                return f"unknown table {ch.table!r}"
            if len(ch.pk) != len(ops.pk):
                return f"primary key of {ch.table!r} has {len(ops.pk)} columns, change has {len(ch.pk)}"
            if ch.cid != SENTINEL_CID and ch.cid not in ops.columns:
                return f"unknown column {ch.table}.{ch.cid}"
            if not all(_is_sql_value(v) for v in ch.pk) or not _is_sql_value(ch.val):
                return f"value of a type SQLite cannot hold in {ch.table}.{ch.cid}"
            if ch.cl < 1 or ch.col_version < 1 or (ch.cid != SENTINEL_CID and ch.cl % 2 == 0):
                return "bad causal length or column version"
        return None

    def _buffer_piece(self, books: ActorBooks, cs: Changeset) -> list[Change] | None:
        """Store one piece of a chunked version; return all its changes once it is complete."""
        # Senders may disagree on last_seq: a sender whose last changes were superseded serves fewer
        # seqs. Any sender's claim is safe (what it leaves out is superseded by versions it knows), so a
        # version is complete once 0..(smallest claim) is covered.
        seqs, last = books.partials.get(cs.version, (RangeSet(), cs.last_seq))
        last = min(last, cs.last_seq)
        s, e = cs.seqs
        buf = f"{INTERNAL_PREFIX}buffer"
        if not seqs.covers(s, e):
            self._conn.execute(
                f"{self._tag} INSERT INTO {buf} (actor, version, start_seq, end_seq, last_seq, changes) "
                f"VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET end_seq = max(end_seq, excluded.end_seq), "
                f"changes = CASE WHEN excluded.end_seq > end_seq THEN excluded.changes ELSE changes END",
                (cs.actor, cs.version, s, e, cs.last_seq, _change_list_encoder.encode(cs.changes)),
            )
            seqs.add(s, e)
        books.partials[cs.version] = (seqs, last)
        if not seqs.covers(0, last):
            return None
        changes: dict[int, Change] = {}
        for (blob,) in self._conn.execute(
            f"{self._tag} SELECT changes FROM {buf} WHERE actor = ? AND version = ?", (cs.actor, cs.version)
        ):
            for ch in _change_list_decoder.decode(blob):
                changes.setdefault(ch.seq, ch)
        self._conn.execute(
            f"{self._tag} DELETE FROM {buf} WHERE actor = ? AND version = ?", (cs.actor, cs.version)
        )
        del books.partials[cs.version]
        return [changes[k] for k in sorted(changes)]

    def _apply_changes(self, changes: list[Change], result: MergeResult) -> dict[str, set[PkTuple]]:
        by_table: dict[str, list[Change]] = {}
        for ch in changes:
            by_table.setdefault(ch.table, []).append(ch)
        touched: dict[str, set[PkTuple]] = {}
        for name, table_changes in by_table.items():
            rows = self._apply_table_changes(self._ops[name], table_changes, result)
            if rows:
                touched[name] = rows
        return touched

    def _load_rows(self, ops: _TableOps, pks: list[PkTuple]) -> dict[PkTuple, _RowState]:
        states: dict[PkTuple, _RowState] = {pk: _RowState(0, None, False, {}, {}) for pk in pks}
        npk = len(ops.pk)
        chunk = max(1, 900 // npk)
        for i in range(0, len(pks), chunk):
            part = pks[i : i + chunk]
            values = ", ".join([ops.pk_placeholder] * len(part))
            flat = [v for pk in part for v in pk]
            for r in self._conn.execute(ops.select_rows.format(values=values), flat):
                st = states.get(tuple(r[:npk]))
                if st is not None:
                    st.exists = True
                    st.values = dict(zip(ops.non_pk, r[npk:], strict=True))
            for r in self._conn.execute(ops.select_clocks.format(values=values), flat):
                st = states.get(tuple(r[:npk]))
                if st is None:
                    continue
                cid, col_version, site, dbv, seq = (
                    r[npk],
                    r[npk + 1],
                    bytes(r[npk + 2]),
                    r[npk + 3],
                    r[npk + 4],
                )
                if cid == SENTINEL_CID:
                    st.cl = col_version
                    st.meta = None if site == NO_SITE else (site, dbv, seq)
                else:
                    st.clocks[cid] = (col_version, value_key(st.values.get(cid)), site, dbv, seq)
        return states

    def _apply_table_changes(
        self, ops: _TableOps, changes: list[Change], result: MergeResult
    ) -> set[PkTuple]:
        pks = list(dict.fromkeys(ch.pk for ch in changes))
        states = self._load_rows(ops, pks)
        for ch in changes:
            st = states[ch.pk]
            if ch.cid == SENTINEL_CID:
                meta = (ch.site_id, ch.db_version, ch.seq)
                if ch.cl > st.cl:
                    st.cl, st.meta, st.reset, st.sentinel_dirty = ch.cl, meta, True, True
                    st.clocks.clear()
                    st.dirty_cols.clear()
                    result.changes_applied += 1
                elif ch.cl == st.cl and (st.meta is None or meta > st.meta):
                    st.meta, st.sentinel_dirty = meta, True
                    result.changes_applied += 1
                continue
            if ch.cl > st.cl:
                st.cl, st.meta, st.reset, st.sentinel_dirty = ch.cl, None, True, True
                st.clocks.clear()
                st.dirty_cols.clear()
            elif ch.cl < st.cl:
                continue
            incoming = (ch.col_version, value_key(ch.val), ch.site_id, ch.db_version, ch.seq)
            local = st.clocks.get(ch.cid)
            if local is None or incoming > local:
                st.clocks[ch.cid] = incoming
                st.values[ch.cid] = ch.val
                st.dirty_cols.add(ch.cid)
                result.changes_applied += 1

        conn = self._conn
        deletes: list[PkTuple] = []
        resets: list[PkTuple] = []
        # Rows to write, grouped by which columns changed: one statement per row, whatever its width.
        row_writes: dict[tuple[str, ...], list[tuple[SqlValue, ...]]] = {}
        clock_rows: list[tuple[SqlValue, ...]] = []
        touched: set[PkTuple] = set()
        for pk, st in states.items():
            if not (st.sentinel_dirty or st.dirty_cols):
                continue
            alive = st.cl % 2 == 1
            if st.reset:
                resets.append(pk)
                if not alive:
                    deletes.append(pk)
                touched.add(pk)
            if st.sentinel_dirty:
                site, dbv, seq = st.meta if st.meta is not None else (NO_SITE, 0, 0)
                clock_rows.append((*pk, SENTINEL_CID, st.cl, dbv, seq, site))
            if alive and (st.reset or st.dirty_cols):
                cols = tuple(sorted(st.dirty_cols))
                row_writes.setdefault(cols, []).append((*pk, *(st.values[c] for c in cols)))
                for cid in cols:
                    col_version, _, site, dbv, seq = st.clocks[cid]
                    clock_rows.append((*pk, cid, col_version, dbv, seq, site))
                touched.add(pk)
        if resets:
            conn.executemany(ops.delete_col_clocks, resets)
        if deletes:
            conn.executemany(ops.delete_row, deletes)
        for cols, rows in row_writes.items():
            conn.executemany(ops.upsert_row(cols), rows)
        if clock_rows:
            conn.executemany(ops.upsert_clock, clock_rows)
        return touched

    # ----------------------------------------------------------------------------------------- admin

    def backup(self, dest: str | Path) -> None:
        """A consistent online copy of the database at ``dest`` (written to a temporary file, then renamed)."""
        dest = Path(dest)
        tmp = dest.with_name(dest.name + ".partial")
        if tmp.exists():
            tmp.unlink()
        src = sqlite3.connect(str(self.path))
        try:
            out = sqlite3.connect(str(tmp))
            try:
                src.backup(out)
            finally:
                out.close()
        finally:
            src.close()
        os.replace(tmp, dest)

    def table_stats(self, tables: Sequence[str]) -> tuple[int, list[str]]:
        """Total row count of the named tables (all schema tables when empty), and the names that are not
        schema tables."""
        names = list(tables) or list(self.schema.tables)
        invalid = [t for t in names if t not in self.schema.tables]
        total = 0
        # On a reader, so that counting a large table never holds up writes.
        reader = self.open_reader()
        try:
            for t in names:
                if t in self.schema.tables:
                    total += reader.execute(f"SELECT count(*) FROM {quote_ident(t)}").fetchone()[0]
        finally:
            reader.close()
        return total, invalid

    def clock_rows(self, table: str) -> list[tuple[Any, ...]]:
        """Every clock row of a table, sorted (for tests and digests)."""
        with self._lock:
            return sorted(
                self._conn.execute(f"{self._tag} SELECT * FROM {quote_ident(clock_table(table))}").fetchall(),
                key=repr,
            )

    def rows(self, table: str) -> list[tuple[Any, ...]]:
        """Every row of a table, sorted (for tests and digests)."""
        with self._lock:
            return sorted(
                self._conn.execute(f"{self._tag} SELECT * FROM {quote_ident(table)}").fetchall(), key=repr
            )


def split_changeset(cs: Changeset, max_changes: int) -> list[Changeset]:
    """Split a changeset into pieces of at most ``max_changes`` changes whose seq ranges are contiguous
    and together cover the original range (gaps between present seqs go to the piece before them)."""
    if max_changes < 1:
        raise ValueError("max_changes must be >= 1")
    if len(cs.changes) <= max_changes:
        return [cs]
    groups = [cs.changes[i : i + max_changes] for i in range(0, len(cs.changes), max_changes)]
    return split_changeset_groups(cs, groups)


def split_changeset_groups(cs: Changeset, groups: Sequence[Sequence[Change]]) -> list[Changeset]:
    """Pieces of ``cs`` made of consecutive groups of its (seq-ordered) changes."""
    pieces: list[Changeset] = []
    start = cs.seqs[0]
    for i, group in enumerate(groups):
        end = cs.seqs[1] if i == len(groups) - 1 else groups[i + 1][0].seq - 1
        pieces.append(
            Changeset(
                actor=cs.actor,
                version=cs.version,
                changes=list(group),
                seqs=(start, end),
                last_seq=cs.last_seq,
                ts=cs.ts,
            )
        )
        start = end + 1
    return pieces


def _is_sql_value(v: object) -> bool:
    return v is None or (isinstance(v, int | float | str | bytes) and not isinstance(v, bool))


def _describe_sql_error(e: BaseException) -> str:
    msg = str(e)
    if isinstance(e, sqlite3.DatabaseError) and "not authorized" in msg:
        return (
            f"{msg}: transactions may read and write the schema's tables only "
            "(no DDL, PRAGMA, ATTACH, transaction control or internal tables)"
        )
    if isinstance(e, sqlite3.ProgrammingError) and "bindings" in msg:
        return f"wrong parameters: {msg}"
    return msg


__all__ = [
    "ActorBooks",
    "CommitNotice",
    "MergeError",
    "MergeResult",
    "Store",
    "StoreError",
    "clock_table",
    "split_changeset",
    "split_changeset_groups",
    "value_key",
]
