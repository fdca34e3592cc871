"""The store on one node: schema rules, clocks and causal lengths, transactions, bookkeeping, restarts."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from verdigris.store import (
    SENTINEL_CID,
    Changeset,
    SchemaError,
    Statement,
    StatementError,
    Store,
    split_changeset,
)
from verdigris.store.schema import load_schema_files

SCHEMA = """
-- apps of the platform
CREATE TABLE apps (name TEXT NOT NULL PRIMARY KEY, org TEXT NOT NULL DEFAULT '', config TEXT);
CREATE TABLE machines (id TEXT NOT NULL PRIMARY KEY, app TEXT NOT NULL DEFAULT '', state TEXT);
CREATE INDEX machines_app ON machines (app);
"""


def write_schema(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("CREATE TABLE a (id INTEGER PRIMARY KEY, b INTEGER REFERENCES c(id));", "FOREIGN KEY"),
        ("CREATE TABLE a (id INTEGER PRIMARY KEY, b TEXT UNIQUE);", "unique"),
        ("CREATE TABLE a (id INTEGER PRIMARY KEY, b TEXT);\nCREATE UNIQUE INDEX a_b ON a (b);", "unique"),
        ("CREATE TABLE a (id INTEGER PRIMARY KEY, b TEXT NOT NULL);", "NOT NULL without a DEFAULT"),
        ("CREATE TABLE a (id INTEGER, b TEXT);", "no PRIMARY KEY"),
        ("CREATE TABLE a (id INTEGER PRIMARY KEY);\nCREATE VIEW v AS SELECT * FROM a;", "only CREATE TABLE"),
        ("CREATE TABLE a (id INTEGER PRIMARY KEY);\nINSERT INTO a VALUES (1);", "only CREATE TABLE"),
        ("CREATE TABLE a (id INTEGER PRIMARY KEY, b TEXT", "incomplete"),
        ("CREATE TABLE __vd_x (id INTEGER PRIMARY KEY);", "reserved"),
        ("CREATE TABLE a (id INTEGER PRIMARY KEY, b NOTATYPE DEFAULT (;", "syntax error"),
    ],
)
def test_schema_refusals_name_file_and_statement(tmp_path: Path, sql: str, message: str) -> None:
    path = write_schema(tmp_path / "bad.sql", sql)
    with pytest.raises(SchemaError) as err:
        load_schema_files([path])
    text = str(err.value)
    assert str(path) in text
    assert message in text
    assert "statement `" in text


def test_non_additive_changes_are_refused(tmp_path: Path) -> None:
    schema = write_schema(tmp_path / "s.sql", SCHEMA)
    store = Store(tmp_path / "db", [schema])
    refusals = {
        "dropped table": (
            "CREATE TABLE apps (name TEXT NOT NULL PRIMARY KEY, org TEXT NOT NULL DEFAULT '', config TEXT);",
            "missing from the schema",
        ),
        "dropped column": (SCHEMA.replace(", config TEXT", ""), "column 'config' was dropped"),
        "changed pk": (
            SCHEMA.replace("id TEXT NOT NULL PRIMARY KEY, app", "id TEXT NOT NULL, app").replace(
                "state TEXT)", "state TEXT, PRIMARY KEY (id, app))"
            ),
            "primary key changed",
        ),
        "changed type": (SCHEMA.replace("config TEXT", "config BLOB"), "changed type"),
    }
    for name, (text, message) in refusals.items():
        write_schema(schema, text)
        with pytest.raises(SchemaError, match=message):
            store.reload_schema([schema])
        assert store.rows("apps") == [], name
    # The database still has its old schema and still works.
    assert store.transact([Statement("INSERT INTO apps (name, config) VALUES ('a', 'c')")]).version == 1
    store.close()


def test_additive_reload_applies_live(tmp_path: Path) -> None:
    schema = write_schema(tmp_path / "s.sql", SCHEMA)
    store = Store(tmp_path / "db", [schema])
    store.transact([Statement("INSERT INTO apps (name) VALUES ('a')")])
    write_schema(
        schema,
        SCHEMA
        + "CREATE TABLE regions (code TEXT NOT NULL PRIMARY KEY, name TEXT);\n"
        + "CREATE INDEX apps_org ON apps (org);\n",
    )
    schema.write_text(
        schema.read_text().replace("config TEXT)", "config TEXT, tier INTEGER NOT NULL DEFAULT 1, note TEXT)")
    )
    changes = store.reload_schema([schema])
    assert changes.new_tables == ["regions"]
    assert sorted(changes.new_columns) == [("apps", "note"), ("apps", "tier")]
    assert changes.new_indexes == ["apps_org"]
    # New columns are replicated: the triggers were rebuilt with them.
    v = store.transact([Statement("UPDATE apps SET tier = 3, note = 'n' WHERE name = 'a'")]).version
    assert v is not None
    cs = store.changeset(store.site_id, v)
    assert cs is not None
    assert {(c.cid, c.val) for c in cs.changes} == {("tier", 3), ("note", "n")}
    store.transact([Statement("INSERT INTO regions (code, name) VALUES ('ams', 'Amsterdam')")])
    assert store.rows("regions") == [("ams", "Amsterdam")]
    store.close()


def test_causal_length_delete_and_reinsert(tmp_path: Path) -> None:
    store = Store(tmp_path / "db", schema_sql=SCHEMA)

    def sentinel() -> int:
        rows = [r for r in store.clock_rows("apps") if r[1] == SENTINEL_CID]
        assert len(rows) == 1
        return int(rows[0][2])

    store.transact([Statement("INSERT INTO apps (name, config) VALUES ('a', 'x')")])
    assert sentinel() == 1
    store.transact([Statement("DELETE FROM apps WHERE name = 'a'")])
    assert sentinel() == 2
    # Column clocks go with the row; only the sentinel remains.
    assert [r[1] for r in store.clock_rows("apps")] == [SENTINEL_CID]
    store.transact([Statement("INSERT INTO apps (name, config) VALUES ('a', 'y')")])
    assert sentinel() == 3
    store.transact([Statement("UPDATE apps SET config = 'z' WHERE name = 'a'")])
    assert sentinel() == 3
    config_clock = [r for r in store.clock_rows("apps") if r[1] == "config"]
    assert config_clock[0][2] == 2  # col_version: insert (1) then update (2)
    assert store.rows("apps") == [("a", "", "z")]
    store.close()


def test_one_transaction_is_one_version_in_seq_order(tmp_path: Path) -> None:
    store = Store(tmp_path / "db", schema_sql=SCHEMA)
    result = store.transact(
        [
            Statement("INSERT INTO apps (name, org) VALUES (?, ?)", params=["a", "o"]),
            Statement(
                "INSERT INTO machines (id, app) VALUES (:id, :app)", named_params={"id": "m1", "app": "a"}
            ),
            Statement("SELECT * FROM apps"),
        ]
    )
    assert result.version == 1
    assert [r.rows_affected for r in result.results] == [1, 1, 0]
    cs = store.changeset(store.site_id, 1)
    assert cs is not None
    assert [c.seq for c in cs.changes] == list(range(len(cs.changes)))
    assert cs.seqs == (0, cs.last_seq) == (0, len(cs.changes) - 1)
    assert {(c.table, c.cid) for c in cs.changes} == {
        ("apps", SENTINEL_CID),
        ("apps", "org"),
        ("apps", "config"),
        ("machines", SENTINEL_CID),
        ("machines", "app"),
        ("machines", "state"),
    }
    # A transaction that changes nothing makes no version.
    assert store.transact([Statement("UPDATE apps SET org = 'o' WHERE name = 'a'")]).version is None
    assert store.transact([Statement("DELETE FROM apps WHERE name = 'nope'")]).version is None
    assert store.db_version == 1
    store.close()


def test_failing_statement_rolls_back_everything(tmp_path: Path) -> None:
    store = Store(tmp_path / "db", schema_sql=SCHEMA)
    with pytest.raises(StatementError) as err:
        store.transact(
            [
                Statement("INSERT INTO apps (name) VALUES ('a')"),
                Statement("INSERT INTO nope (x) VALUES (1)"),
            ]
        )
    assert err.value.index == 1
    assert "no such table: nope" in str(err.value)
    with pytest.raises(StatementError, match="wrong parameters"):
        store.transact([Statement("INSERT INTO apps (name) VALUES (?)", params=[])])
    with pytest.raises(StatementError):
        store.transact(
            [
                Statement("INSERT INTO apps (name) VALUES ('b')"),
                Statement("INSERT INTO apps (name) VALUES ('b')"),
            ]
        )
    assert store.rows("apps") == []
    assert store.db_version == 0
    assert store.clock_rows("apps") == []
    # And the next transaction works and takes version 1.
    assert store.transact([Statement("INSERT INTO apps (name) VALUES ('c')")]).version == 1
    store.close()


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE TABLE x (id INTEGER PRIMARY KEY)",
        "DROP TABLE apps",
        "ALTER TABLE apps ADD COLUMN z TEXT",
        "PRAGMA journal_mode = DELETE",
        "ATTACH DATABASE ':memory:' AS other",
        "INSERT INTO __vd_bookkeeping (actor, start, \"end\") VALUES (x'00', 1, 1)",
        "DELETE FROM __vd_clock__apps",
        "BEGIN",
        "COMMIT",
        "SAVEPOINT s",
        "DROP TRIGGER __vd_trg__apps__ins",
    ],
)
def test_transactions_cannot_touch_schema_or_internals(tmp_path: Path, sql: str) -> None:
    store = Store(tmp_path / "db", schema_sql=SCHEMA)
    store.transact([Statement("INSERT INTO apps (name) VALUES ('a')")])
    before = (store.rows("apps"), store.clock_rows("apps"), store.db_version)
    with pytest.raises(StatementError):
        store.transact([Statement("INSERT INTO apps (name) VALUES ('b')"), Statement(sql)])
    assert (store.rows("apps"), store.clock_rows("apps"), store.db_version) == before
    store.close()


def test_reader_is_read_only(tmp_path: Path) -> None:
    store = Store(tmp_path / "db", schema_sql=SCHEMA)
    store.transact([Statement("INSERT INTO apps (name) VALUES ('a')")])
    reader = store.open_reader()
    assert reader.execute("SELECT name FROM apps").fetchall() == [("a",)]
    for sql in [
        "INSERT INTO apps (name) VALUES ('b')",
        "DELETE FROM apps",
        "PRAGMA query_only = OFF",
        "ATTACH DATABASE 'x.db' AS x",
        "CREATE TABLE t (id INTEGER PRIMARY KEY)",
    ]:
        with pytest.raises(sqlite3.DatabaseError):
            reader.execute(sql)
    assert store.rows("apps") == [("a", "", None)]
    reader.close()
    store.close()


def test_bookkeeping_and_partials_survive_restart(tmp_path: Path) -> None:
    src = Store(tmp_path / "src.db", schema_sql=SCHEMA)
    for i in range(5):
        src.transact([Statement("INSERT INTO apps (name, org, config) VALUES (?, 'o', 'c')", [f"app{i}"])])
    sets = src.changesets_for(src.site_id, 1, 5)
    dst_path = tmp_path / "dst.db"
    dst = Store(dst_path, schema_sql=SCHEMA)
    # Versions 1, 2 and 5 complete, version 4 half received, version 3 missing.
    dst.merge([sets[0], sets[1], sets[4]])
    halves = split_changeset(sets[3], 2)
    assert len(halves) == 2
    result = dst.merge([halves[0]])
    assert result.buffered == [(src.site_id, 4)]
    assert dst.rows("apps") == [("app0", "o", "c"), ("app1", "o", "c"), ("app4", "o", "c")]
    dst.close()

    dst = Store(dst_path, schema_sql=SCHEMA)
    books = dst.books()[src.site_id]
    assert list(books.known) == [(1, 2), (5, 5)]
    assert books.needs() == [(3, 3)]
    assert books.partial_needs() == {4: [(halves[1].seqs[0], halves[1].seqs[1])]}
    assert dst.heads() == {src.site_id: 5}
    result = dst.merge([halves[1], sets[2]])
    assert sorted(result.applied_versions) == [(src.site_id, 3), (src.site_id, 4)]
    assert dst.needs() == {}
    assert dst.rows("apps") == src.rows("apps")
    assert dst.clock_rows("apps") == src.clock_rows("apps")
    dst.close()
    src.close()


def test_invalid_changesets_are_rejected_not_booked(tmp_path: Path) -> None:
    src = Store(tmp_path / "src.db", schema_sql=SCHEMA)
    src.transact([Statement("INSERT INTO apps (name) VALUES ('a')")])
    good = src.changesets_for(src.site_id, 1, 1)[0]
    dst = Store(tmp_path / "dst.db", schema_sql=SCHEMA)
    c0 = good.changes[0]
    bad = [
        Changeset(actor=b"short", version=1, changes=[], seqs=(0, 0), last_seq=0),
        Changeset(actor=good.actor, version=0, changes=[], seqs=(0, 0), last_seq=0),
        Changeset(actor=good.actor, version=2, changes=[], seqs=(3, 1), last_seq=5),
        Changeset(
            actor=good.actor,
            version=3,
            changes=[c0.__class__(**{**_fields(c0), "table": "nope"})],
            seqs=(0, 5),
            last_seq=5,
        ),
        Changeset(
            actor=good.actor,
            version=4,
            changes=[c0.__class__(**{**_fields(c0), "pk": ("a", "b")})],
            seqs=(0, 5),
            last_seq=5,
        ),
        Changeset(
            actor=good.actor,
            version=5,
            changes=[c0.__class__(**{**_fields(c0), "cid": "zzz", "db_version": 5})],
            seqs=(0, 5),
            last_seq=5,
        ),
        Changeset(
            actor=good.actor,
            version=6,
            changes=[c0.__class__(**{**_fields(c0), "val": [1, 2], "db_version": 6})],
            seqs=(0, 5),
            last_seq=5,
        ),
        Changeset(actor=dst.site_id, version=1, changes=[], seqs=(0, 0), last_seq=0),
    ]
    result = dst.merge([*bad, good])
    assert len(result.rejected) == len(bad)
    assert result.applied_versions == [(good.actor, 1)]
    assert dst.rows("apps") == [("a", "", None)]
    assert set(dst.books()) == {good.actor}
    dst.close()
    src.close()


def _fields(c: object) -> dict[str, object]:
    return {f: getattr(c, f) for f in c.__struct_fields__}  # type: ignore[attr-defined]


def test_backup_is_a_consistent_copy(tmp_path: Path) -> None:
    store = Store(tmp_path / "db", schema_sql=SCHEMA)
    for i in range(50):
        store.transact([Statement("INSERT INTO apps (name) VALUES (?)", [f"a{i}"])])
    store.backup(tmp_path / "copy.db")
    copy = Store(tmp_path / "copy.db")
    assert copy.site_id == store.site_id
    assert copy.rows("apps") == store.rows("apps")
    assert copy.db_version == 50
    copy.close()
    store.close()


def test_table_stats(tmp_path: Path) -> None:
    store = Store(tmp_path / "db", schema_sql=SCHEMA)
    store.transact(
        [
            Statement("INSERT INTO apps (name) VALUES ('a'), ('b')"),
            Statement("INSERT INTO machines (id) VALUES ('m')"),
        ]
    )
    assert store.table_stats(["apps", "machines", "nope"]) == (3, ["nope"])
    assert store.table_stats([]) == (3, [])
    store.close()


def test_table_valued_functions_work_in_transactions_and_readers(tmp_path: Path) -> None:
    store = Store(tmp_path / "db", schema_sql=SCHEMA)
    result = store.transact(
        [Statement("INSERT INTO apps (name) SELECT value FROM json_each(?)", ['["a", "b"]'])]
    )
    assert result.results[0].rows_affected == 2
    reader = store.open_reader()
    assert reader.execute("SELECT count(*) FROM json_each('[1, 2, 3]')").fetchone() == (3,)
    with pytest.raises(sqlite3.DatabaseError):
        reader.execute("CREATE TEMP TABLE x (id INTEGER PRIMARY KEY)")
    reader.close()
    store.close()
