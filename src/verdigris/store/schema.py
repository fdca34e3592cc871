"""Schema files: parse, validate, and compare against the schema already in a database.

A schema file holds ``CREATE TABLE`` and ``CREATE INDEX`` statements only. Statements are checked by
running them in a private in-memory SQLite database and reading back what SQLite made of them, so the
rules use SQLite's own understanding of the SQL rather than text matching.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from verdigris.store.types import SchemaError

INTERNAL_PREFIX = "__vd_"
"""Tables, indexes and triggers with this prefix belong to Verdigris itself."""


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    notnull: bool
    default: str | None
    """The default value's SQL text, as SQLite reports it, or None."""
    pk_index: int
    """1-based position in the primary key, 0 when not part of it."""

    def definition(self) -> str:
        """Column definition for ``ALTER TABLE ... ADD COLUMN``."""
        parts = [quote_ident(self.name)]
        if self.type:
            parts.append(self.type)
        if self.notnull:
            parts.append("NOT NULL")
        if self.default is not None:
            parts.append(f"DEFAULT {self.default}")
        return " ".join(parts)


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    sql: str
    source: str
    """Where the table was declared (file path), for error messages."""

    @property
    def pk(self) -> tuple[str, ...]:
        return tuple(
            c.name for c in sorted((c for c in self.columns if c.pk_index), key=lambda c: c.pk_index)
        )

    @property
    def non_pk(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if not c.pk_index)

    def column(self, name: str) -> Column | None:
        for c in self.columns:
            if c.name == name:
                return c
        return None


@dataclass(frozen=True)
class Index:
    name: str
    table: str
    sql: str
    source: str


@dataclass
class Schema:
    tables: dict[str, Table] = field(default_factory=dict)
    indexes: dict[str, Index] = field(default_factory=dict)


@dataclass
class SchemaChanges:
    """What applying a new schema did (or would do) to a database."""

    new_tables: list[str] = field(default_factory=list)
    new_columns: list[tuple[str, str]] = field(default_factory=list)
    new_indexes: list[str] = field(default_factory=list)
    dropped_indexes: list[str] = field(default_factory=list)
    changed_indexes: list[str] = field(default_factory=list)

    def is_empty(self) -> bool:
        return not (
            self.new_tables
            or self.new_columns
            or self.new_indexes
            or self.dropped_indexes
            or self.changed_indexes
        )


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def split_statements(text: str) -> list[str]:
    """Split SQL text into complete statements using SQLite's own tokenizer rules."""
    statements: list[str] = []
    current: list[str] = []
    for line in text.splitlines(keepends=True):
        current.append(line)
        candidate = "".join(current)
        if sqlite3.complete_statement(candidate):
            stmt = candidate.strip()
            if _strip_comments(stmt).strip(" \t\r\n;"):
                statements.append(stmt)
            current = []
    rest = "".join(current)
    if _strip_comments(rest).strip(" \t\r\n;"):
        # sqlite3.complete_statement is False: the last statement lacks its ';' or is cut off.
        statements.append(rest.strip())
    return statements


def _strip_comments(sql: str) -> str:
    out: list[str] = []
    i = 0
    while i < len(sql):
        if sql.startswith("--", i):
            j = sql.find("\n", i)
            i = len(sql) if j < 0 else j
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = len(sql) if j < 0 else j + 2
        else:
            out.append(sql[i])
            i += 1
    return "".join(out)


def _short(sql: str) -> str:
    one_line = " ".join(sql.split())
    return one_line if len(one_line) <= 120 else one_line[:117] + "..."


def read_table(conn: sqlite3.Connection, name: str, sql: str, source: str) -> Table:
    cols = tuple(
        Column(name=r[1], type=r[2] or "", notnull=bool(r[3]), default=r[4], pk_index=int(r[5]))
        for r in conn.execute(f"PRAGMA table_info({quote_ident(name)})")
    )
    return Table(name=name, columns=cols, sql=sql, source=source)


def parse_schema(files: Iterable[tuple[str, str]]) -> Schema:
    """Parse and validate schema text. ``files`` yields ``(source name, text)`` pairs."""
    scratch = sqlite3.connect(":memory:")
    try:
        schema = Schema()
        for source, text in files:
            for stmt in split_statements(text):
                _apply_schema_statement(scratch, schema, source, stmt)
        return schema
    finally:
        scratch.close()


def load_schema_files(paths: Sequence[str | Path]) -> Schema:
    """Read schema files (or every ``*.sql`` in a directory) and validate them."""
    files: list[tuple[str, str]] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            targets = sorted(path.glob("*.sql"))
        elif path.exists():
            targets = [path]
        else:
            raise SchemaError(f"{path}: schema path does not exist")
        for t in targets:
            try:
                files.append((str(t), t.read_text(encoding="utf-8")))
            except (OSError, UnicodeDecodeError) as e:
                raise SchemaError(f"{t}: cannot read schema file: {e}") from e
    return parse_schema(files)


def _apply_schema_statement(scratch: sqlite3.Connection, schema: Schema, source: str, stmt: str) -> None:
    where = f"{source}: in statement `{_short(stmt)}`"
    if not sqlite3.complete_statement(stmt):
        raise SchemaError(f"{where}: incomplete statement (missing ';'?)")
    before = {(r[0], r[1]) for r in scratch.execute("SELECT type, name FROM sqlite_master")}
    try:
        scratch.executescript(stmt)
    except sqlite3.Error as e:
        raise SchemaError(f"{where}: {e}") from e
    rows = scratch.execute("SELECT type, name, tbl_name, sql FROM sqlite_master").fetchall()
    after = {(r[0], r[1]) for r in rows}
    added = after - before
    if before - after or not added:
        raise SchemaError(f"{where}: only CREATE TABLE and CREATE INDEX statements are allowed in a schema")
    for typ, name, tbl_name, sql in rows:
        if (typ, name) not in added:
            continue
        if name.startswith(INTERNAL_PREFIX) or (name.startswith("sqlite_") and typ != "index"):
            raise SchemaError(f"{where}: the name {name!r} is reserved")
        if typ == "table":
            _check_table(scratch, name, where)
            schema.tables[name] = read_table(scratch, name, sql, source)
        elif typ == "index":
            if sql is None:
                # sqlite_autoindex_*: made for a UNIQUE constraint or a non-rowid primary key.
                continue
            schema.indexes[name] = Index(name=name, table=tbl_name, sql=sql, source=source)
            _check_indexes(scratch, tbl_name, where)
        else:
            raise SchemaError(
                f"{where}: only CREATE TABLE and CREATE INDEX statements are allowed (got {typ})"
            )


def _check_table(conn: sqlite3.Connection, name: str, where: str) -> None:
    info = conn.execute(f"PRAGMA table_info({quote_ident(name)})").fetchall()
    if not any(r[5] for r in info):
        raise SchemaError(f"{where}: table {name!r} has no PRIMARY KEY")
    for r in info:
        cname, notnull, default, pk = r[1], r[3], r[4], r[5]
        if notnull and default is None and not pk:
            raise SchemaError(f"{where}: column {name}.{cname} is NOT NULL without a DEFAULT")
        if cname == "-1" or cname.startswith(INTERNAL_PREFIX):
            raise SchemaError(f"{where}: column name {cname!r} is reserved")
    if conn.execute(f"PRAGMA foreign_key_list({quote_ident(name)})").fetchall():
        raise SchemaError(
            f"{where}: table {name!r} declares a FOREIGN KEY (not allowed in a replicated table)"
        )
    gen = [r[1] for r in conn.execute(f"PRAGMA table_xinfo({quote_ident(name)})") if r[6] not in (0, 1)]
    if gen:
        raise SchemaError(f"{where}: generated columns are not supported ({', '.join(gen)})")
    _check_indexes(conn, name, where)


def _check_indexes(conn: sqlite3.Connection, table: str, where: str) -> None:
    for r in conn.execute(f"PRAGMA index_list({quote_ident(table)})"):
        idx_name, unique, origin = r[1], r[2], r[3]
        if unique and origin != "pk":
            raise SchemaError(
                f"{where}: unique index or constraint {idx_name!r} on {table!r} "
                "(only the primary key may be unique in a replicated table)"
            )


def diff_schema(current: Schema, new: Schema) -> SchemaChanges:
    """Compare the schema in a database with a new one; refuse anything that is not additive."""
    changes = SchemaChanges()
    for name, old in current.tables.items():
        nt = new.tables.get(name)
        if nt is None:
            raise SchemaError(
                f"table {name!r} is in the database but missing from the schema (dropping is not allowed)"
            )
        where = f"{nt.source}: table {name!r}"
        if nt.pk != old.pk:
            raise SchemaError(f"{where}: primary key changed from {old.pk} to {nt.pk} (not allowed)")
        for oc in old.columns:
            nc = nt.column(oc.name)
            if nc is None:
                raise SchemaError(f"{where}: column {oc.name!r} was dropped (not allowed)")
            if nc.type.upper() != oc.type.upper():
                raise SchemaError(f"{where}: column {oc.name!r} changed type from {oc.type!r} to {nc.type!r}")
        for nc in nt.columns:
            if old.column(nc.name) is None:
                if nc.pk_index:
                    raise SchemaError(f"{where}: new column {nc.name!r} cannot be part of the primary key")
                changes.new_columns.append((name, nc.name))
    for name in new.tables:
        if name not in current.tables:
            changes.new_tables.append(name)
    for name, idx in new.indexes.items():
        old_idx = current.indexes.get(name)
        if old_idx is None:
            changes.new_indexes.append(name)
        elif _norm(old_idx.sql) != _norm(idx.sql):
            changes.changed_indexes.append(name)
    for name in current.indexes:
        if name not in new.indexes:
            changes.dropped_indexes.append(name)
    return changes


def _norm(sql: str) -> str:
    return " ".join(sql.split()).rstrip(";").lower()


def read_database_schema(conn: sqlite3.Connection) -> Schema:
    """The user schema currently in a database (internal objects excluded)."""
    schema = Schema()
    rows = conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE type IN ('table', 'index') AND sql IS NOT NULL"
    ).fetchall()
    for typ, name, tbl_name, sql in rows:
        if (
            name.startswith(INTERNAL_PREFIX)
            or name.startswith("sqlite_")
            or tbl_name.startswith(INTERNAL_PREFIX)
        ):
            continue
        if typ == "table":
            schema.tables[name] = read_table(conn, name, sql, "database")
        else:
            schema.indexes[name] = Index(name=name, table=tbl_name, sql=sql, source="database")
    return schema
