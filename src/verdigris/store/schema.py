"""Schema files: parse, validate, and compare against the schema already in a database.

A schema file holds ``CREATE TABLE`` and ``CREATE INDEX`` statements only. Statements are checked by
running them in a private in-memory SQLite database and reading back what SQLite made of them, so the
rules use SQLite's own understanding of the SQL rather than text matching.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from verdigris.store.types import SchemaError

INTERNAL_PREFIX = "__vd_"
"""Tables, indexes and triggers with this prefix belong to Verdigris itself."""

SCOPES = ("regional", "global")
"""Replication scopes of a table: ``regional`` (among the nodes of one region) or ``global`` (all nodes)."""
DEFAULT_SCOPE = "regional"
"""A table without a ``-- scope:`` directive is regional ("fine-grained state is regional by default")."""
SCOPES_TABLE = f"{INTERNAL_PREFIX}scopes"
"""Internal table ``(name, scope)`` recording each schema table's scope in the database."""

_DIRECTIVE = re.compile(r"--\s*scope\s*:(.*)$", re.IGNORECASE)


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
    scope: str = DEFAULT_SCOPE
    """``regional`` or ``global`` (see :data:`SCOPES`)."""

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


def read_table(
    conn: sqlite3.Connection, name: str, sql: str, source: str, scope: str = DEFAULT_SCOPE
) -> Table:
    cols = tuple(
        Column(name=r[1], type=r[2] or "", notnull=bool(r[3]), default=r[4], pk_index=int(r[5]))
        for r in conn.execute(f"PRAGMA table_info({quote_ident(name)})")
    )
    return Table(name=name, columns=cols, sql=sql, source=source, scope=scope)


def _line_no(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _directives(text: str, offset: int) -> list[tuple[int, int, str]]:
    """Every ``-- scope:`` comment in ``text`` as (line number in the file, line index in ``text``, value).

    Found on the text with string literals and block comments blanked out, so a directive-like string
    in the SQL is not one."""
    out: list[tuple[int, int, str]] = []
    for i, line in enumerate(_blank_literals(text).splitlines()):
        at = line.find("--")
        m = _DIRECTIVE.match(line, at) if at >= 0 else None
        if m is not None:
            out.append((offset + i, i, m.group(1).strip()))
    return out


def _blank_literals(sql: str) -> str:
    """``sql`` with the inside of quoted strings/identifiers and block comments replaced by spaces (newlines
    kept), so line-comment directives can be found by position."""
    out: list[str] = []
    i = 0
    n = len(sql)
    while i < n:
        c = sql[i]
        if sql.startswith("--", i):
            j = sql.find("\n", i)
            j = n if j < 0 else j
            out.append(sql[i:j])
            i = j
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append("".join(ch if ch == "\n" else " " for ch in sql[i:j]))
            i = j
        elif c in "'\"`[":
            close = "]" if c == "[" else c
            j = i + 1
            while j < n:
                if sql[j] == close:
                    if close != "]" and j + 1 < n and sql[j + 1] == close:
                        j += 2
                        continue
                    break
                j += 1
            j = min(n, j + 1)
            out.append("".join(ch if ch == "\n" else " " for ch in sql[i:j]))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def statement_scope(source: str, stmt: str, first_line: int = 1) -> str | None:
    """The scope declared by a ``-- scope: <scope>`` directive for a statement, or None without one.

    The rule: the directive is a line of its own in the block of ``--`` comment lines directly above the
    statement (no blank line between the block and the statement). A directive anywhere else — inside
    the statement, separated by a blank line, before a statement that is not ``CREATE TABLE`` — an unknown
    scope or two directives for one statement are refused with a :class:`SchemaError`."""
    found = _directives(stmt, first_line)
    if not found:
        return None
    lines = stmt.splitlines()
    blanked = _blank_literals(stmt).splitlines()
    first_code = next(
        (i for i, line in enumerate(blanked) if line.strip() and not line.strip().startswith("--")),
        len(lines),
    )
    block_start = first_code
    while block_start > 0 and blanked[block_start - 1].strip().startswith("--"):
        block_start -= 1
    code = _strip_comments(stmt).strip()
    table_name = _created_table_name(code)
    what = f"table {table_name!r}" if table_name else f"statement `{_short(code)}`"
    scope: str | None = None
    for line_no, idx, value in found:
        where = f"{source}:{line_no}: scope directive for {what}"
        if not (block_start <= idx < first_code and blanked[idx].strip().startswith("--")):
            raise SchemaError(
                f"{where} is in the wrong place: write `-- scope: <{'|'.join(SCOPES)}>` as a comment line "
                "directly above the CREATE TABLE statement (no blank line between)"
            )
        if table_name is None:
            raise SchemaError(f"{where}: a scope directive may only precede a CREATE TABLE statement")
        if value not in SCOPES:
            raise SchemaError(f"{where}: unknown scope {value!r} (expected one of: {', '.join(SCOPES)})")
        if scope is not None:
            raise SchemaError(f"{where}: more than one scope directive")
        scope = value
    return scope


_CREATE_TABLE = re.compile(
    r"^\s*CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(\"(?:[^\"]|\"\")*\"|`[^`]*`|\[[^\]]*\]|[^\s(]+)",
    re.IGNORECASE,
)


def _created_table_name(code: str) -> str | None:
    m = _CREATE_TABLE.match(code)
    if m is None:
        return None
    name = m.group(1)
    if name[0] == '"':
        return name[1:-1].replace('""', '"')
    if name[0] in "`[":
        return name[1:-1]
    return name


def parse_schema(files: Iterable[tuple[str, str]]) -> Schema:
    """Parse and validate schema text. ``files`` yields ``(source name, text)`` pairs."""
    scratch = sqlite3.connect(":memory:")
    try:
        schema = Schema()
        for source, text in files:
            stmts = split_statements(text)
            line = 1
            pos = 0
            seen = 0
            for stmt in stmts:
                at = text.find(stmt, pos)
                if at >= 0:
                    line += text.count("\n", pos, at)
                    pos = at
                scope = statement_scope(source, stmt, line)
                seen += len(_directives(stmt, line))
                _apply_schema_statement(scratch, schema, source, stmt, scope)
            if seen < len(_directives(text, 1)):
                # Only comments after the last statement: a directive there precedes no CREATE TABLE.
                line_no = _directives(text, 1)[seen][0]
                raise SchemaError(
                    f"{source}:{line_no}: scope directive is in the wrong place: it must be a comment line "
                    "directly above a CREATE TABLE statement"
                )
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


def _apply_schema_statement(
    scratch: sqlite3.Connection, schema: Schema, source: str, stmt: str, scope: str | None = None
) -> None:
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
    if scope is not None and sum(1 for typ, _ in added if typ == "table") != 1:
        raise SchemaError(f"{where}: a scope directive must precede exactly one CREATE TABLE statement")
    for typ, name, tbl_name, sql in rows:
        if (typ, name) not in added:
            continue
        if name.startswith(INTERNAL_PREFIX) or (name.startswith("sqlite_") and typ != "index"):
            raise SchemaError(f"{where}: the name {name!r} is reserved")
        if typ == "table":
            _check_table(scratch, name, where)
            schema.tables[name] = read_table(scratch, name, sql, source, scope or DEFAULT_SCOPE)
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
        if nt.scope != old.scope:
            raise SchemaError(
                f"{where}: scope changed from {old.scope!r} to {nt.scope!r} (not allowed: the table's rows "
                f"and versions belong to the {old.scope} cluster; create a new table of scope {nt.scope!r} "
                "instead)"
            )
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
    scopes: dict[str, str] = {}
    if any(typ == "table" and name == SCOPES_TABLE for typ, name, _, _ in rows):
        scopes = {str(n): str(s) for n, s in conn.execute(f"SELECT name, scope FROM {SCOPES_TABLE}")}
    for typ, name, tbl_name, sql in rows:
        if (
            name.startswith(INTERNAL_PREFIX)
            or name.startswith("sqlite_")
            or tbl_name.startswith(INTERNAL_PREFIX)
        ):
            continue
        if typ == "table":
            schema.tables[name] = read_table(conn, name, sql, "database", scopes.get(name, DEFAULT_SCOPE))
        else:
            schema.indexes[name] = Index(name=name, table=tbl_name, sql=sql, source="database")
    return schema
