"""Subscriptions: initial rows, incremental events, joins, sharing, refusals, resume, restart, incrementality.

Every test uses real SQLite files. Synchronisation is by ``SubscriptionManager.flush`` (a barrier through the
matcher thread) or by waiting on a condition with a timeout; never by sleeping.
"""

from __future__ import annotations

import random
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from verdigris.store import Changeset, Statement, Store
from verdigris.store.subscriptions import (
    ChangeEvent,
    GapError,
    Subscription,
    SubscriptionError,
    SubscriptionManager,
    sql_literal,
)

SCHEMA = """
CREATE TABLE apps (name TEXT PRIMARY KEY, org TEXT);
CREATE TABLE machines (id TEXT PRIMARY KEY, app TEXT, region TEXT, state TEXT, cpu INTEGER);
CREATE INDEX machines_app ON machines (app);
CREATE TABLE health (machine_id TEXT NOT NULL, check_name TEXT NOT NULL DEFAULT '', status TEXT,
                     PRIMARY KEY (machine_id, check_name));
CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, flag INTEGER);
CREATE INDEX items_name ON items (name);
"""


def tx(store: Store, *sql: str, params: list[Any] | None = None) -> None:
    store.transact([Statement(s, params) for s in sql])


class Collector:
    """A listener that records batches and lets a test wait for a number of events."""

    def __init__(self) -> None:
        self.events: list[ChangeEvent] = []
        self.batches = 0
        self._cond = threading.Condition()

    def __call__(self, events: list[ChangeEvent]) -> None:
        with self._cond:
            self.events.extend(events)
            self.batches += 1
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[ChangeEvent]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.events) >= n, timeout), (
                f"expected {n} events, got {self.events}"
            )
            return list(self.events)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "db.sqlite", schema_sql=SCHEMA)
    yield s
    s.close()


@pytest.fixture
def manager(store: Store, tmp_path: Path) -> Iterator[SubscriptionManager]:
    m = SubscriptionManager(store, tmp_path / "subs")
    yield m
    m.close()


def seed(store: Store) -> None:
    tx(
        store,
        "INSERT INTO apps VALUES ('web', 'acme'), ('api', 'acme'), ('db', 'other')",
        "INSERT INTO machines VALUES ('m1', 'web', 'ams', 'started', 1), ('m2', 'web', 'fra', 'stopped', 2), "
        "('m3', 'api', 'ams', 'started', 4)",
    )


def query_rows(store: Store, sub: Subscription) -> list[tuple[Any, ...]]:
    """The subscription's query run directly, for comparison with its snapshot."""
    conn = store.open_reader()
    try:
        params: Any = sub.params if sub.params is not None else ()
        return sorted((tuple(r) for r in conn.execute(sub.sql, params)), key=repr)
    finally:
        conn.close()


def snapshot_values(sub: Subscription) -> list[tuple[Any, ...]]:
    rows, _ = sub.snapshot()
    return sorted((v for _, v in rows), key=repr)


def apply_events(state: dict[int, tuple[Any, ...]], events: list[ChangeEvent]) -> None:
    for e in events:
        if e.kind == "insert":
            assert e.rowid not in state, e
            state[e.rowid] = e.values
        elif e.kind == "update":
            assert e.rowid in state, e
            state[e.rowid] = e.values
        else:
            assert state.pop(e.rowid) == e.values, e


# ------------------------------------------------------------------------------------------------ basics


def test_initial_rows_columns_and_change_id(store: Store, manager: SubscriptionManager) -> None:
    seed(store)
    sub, created = manager.subscribe(
        "SELECT id, state AS st, cpu * 2 FROM machines WHERE region = ?", ["ams"]
    )
    assert created
    assert sub.columns == ["id", "st", "cpu * 2"]
    rows, cid = sub.snapshot()
    assert cid == 0 and sub.change_id == 0
    assert [v for _, v in rows] == [("m1", "started", 2), ("m3", "started", 8)]
    assert [r for r, _ in rows] == sorted(r for r, _ in rows)
    assert len({r for r, _ in rows}) == 2
    assert sub.changes_since(0) == []
    assert manager.get(sub.id) is sub
    assert manager.list() == [sub]


def test_select_star_and_duplicate_column_names(store: Store, manager: SubscriptionManager) -> None:
    seed(store)
    star, _ = manager.subscribe("SELECT * FROM machines WHERE id = 'm1'")
    assert star.columns == ["id", "app", "region", "state", "cpu"]
    assert snapshot_values(star) == [("m1", "web", "ams", "started", 1)]
    both, _ = manager.subscribe("SELECT m.app, a.name, a.* FROM machines m JOIN apps a ON a.name = m.app")
    assert both.columns == ["app", "name", "name", "org"]
    assert snapshot_values(both) == query_rows(store, both)


def test_insert_update_delete_events(store: Store, manager: SubscriptionManager) -> None:
    seed(store)
    sub, _ = manager.subscribe("SELECT id, state FROM machines WHERE app = 'web'")
    (rows, cid) = sub.snapshot()
    rowid = {v[0]: r for r, v in rows}
    got = Collector()
    sub.add_listener(got)

    for sql in (
        "INSERT INTO machines VALUES ('m4', 'web', 'ams', 'created', 1)",
        "UPDATE machines SET state = 'started' WHERE id = 'm2'",
        "UPDATE machines SET cpu = 99 WHERE id = 'm2'",  # not a selected column: no event
        "DELETE FROM machines WHERE id = 'm1'",
        "UPDATE machines SET app = 'api' WHERE id = 'm4'",  # leaves the result: delete
        "UPDATE machines SET app = 'web' WHERE id = 'm4'",  # comes back: insert, with a new rowid
    ):
        tx(store, sql)
        # One commit per matching pass: commits matched together coalesce per row (as in Corrosion).
        assert manager.flush()
    events = got.wait_for(5)
    m4 = events[0].rowid
    assert m4 not in rowid.values()
    assert events == [
        ChangeEvent("insert", m4, ("m4", "created"), 1),
        ChangeEvent("update", rowid["m2"], ("m2", "started"), 2),
        ChangeEvent("delete", rowid["m1"], ("m1", "started"), 3),
        ChangeEvent("delete", m4, ("m4", "created"), 4),
        ChangeEvent("insert", events[4].rowid, ("m4", "created"), 5),
    ]
    assert events[4].rowid > m4  # rowids are never reused
    assert sub.change_id == 5
    assert sub.changes_since(cid) == events
    assert snapshot_values(sub) == query_rows(store, sub)
    state = dict(rows)
    apply_events(state, events)
    assert sorted(state.items()) == sub.snapshot()[0]


def test_primary_key_change_is_delete_plus_insert(store: Store, manager: SubscriptionManager) -> None:
    seed(store)
    sub, _ = manager.subscribe("SELECT id, region FROM machines")
    got = Collector()
    sub.add_listener(got)
    tx(store, "UPDATE machines SET id = 'm9' WHERE id = 'm1'")
    events = got.wait_for(2)
    assert sorted((e.kind, e.values) for e in events) == [
        ("delete", ("m1", "ams")),
        ("insert", ("m9", "ams")),
    ]


def test_composite_primary_key(store: Store, manager: SubscriptionManager) -> None:
    tx(store, "INSERT INTO health VALUES ('m1', 'http', 'passing'), ('m1', 'tcp', 'passing')")
    sub, _ = manager.subscribe("SELECT machine_id, check_name, status FROM health")
    got = Collector()
    sub.add_listener(got)
    tx(store, "UPDATE health SET status = 'critical' WHERE check_name = 'tcp'")
    tx(store, "INSERT INTO health VALUES ('m2', 'http', 'warning')")
    assert manager.flush()
    events = got.wait_for(2)
    assert [(e.kind, e.values) for e in events] == [
        ("update", ("m1", "tcp", "critical")),
        ("insert", ("m2", "http", "warning")),
    ]
    assert snapshot_values(sub) == query_rows(store, sub)


def test_named_and_numbered_parameters(store: Store, manager: SubscriptionManager) -> None:
    seed(store)
    named, _ = manager.subscribe(
        "SELECT id FROM machines WHERE app = :app AND state = :st", {"app": "web", "st": "started"}
    )
    numbered, _ = manager.subscribe(
        "SELECT id FROM machines WHERE state = ?2 AND app = ?1", ["web", "started"]
    )
    assert snapshot_values(named) == snapshot_values(numbered) == [("m1",)]
    got = Collector()
    numbered.add_listener(got)
    tx(store, "UPDATE machines SET state = 'started' WHERE id = 'm2'")
    assert got.wait_for(1)[0].values == ("m2",)
    assert manager.flush()
    assert snapshot_values(named) == [("m1",), ("m2",)]


# ------------------------------------------------------------------------------------------------ joins


def test_join_reacts_to_either_table(store: Store, manager: SubscriptionManager) -> None:
    seed(store)
    sub, _ = manager.subscribe(
        "SELECT m.id, m.state, a.org FROM machines AS m JOIN apps a ON a.name = m.app WHERE a.org = 'acme'"
    )
    assert snapshot_values(sub) == [
        ("m1", "started", "acme"),
        ("m2", "stopped", "acme"),
        ("m3", "started", "acme"),
    ]
    rows, _ = sub.snapshot()
    rowid = {v[0]: r for r, v in rows}
    got = Collector()
    sub.add_listener(got)

    tx(store, "UPDATE apps SET org = 'acme2' WHERE name = 'web'")  # the apps side: two rows leave
    events = got.wait_for(2)
    assert sorted((e.kind, e.rowid) for e in events) == [("delete", rowid["m1"]), ("delete", rowid["m2"])]
    tx(store, "UPDATE machines SET state = 'stopped' WHERE id = 'm3'")  # the machines side
    events = got.wait_for(3)
    assert events[2] == ChangeEvent("update", rowid["m3"], ("m3", "stopped", "acme"), 3)
    tx(
        store,
        "UPDATE machines SET app = 'db' WHERE id = 'm3'",
        "UPDATE apps SET org = 'acme' WHERE name = 'db'",
    )
    # The row now comes from another apps row: another result row (delete + insert), same values.
    events = got.wait_for(5)
    assert events[3] == ChangeEvent("delete", rowid["m3"], ("m3", "stopped", "acme"), 4)
    assert events[4].kind == "insert" and events[4].values == ("m3", "stopped", "acme")
    assert manager.flush()
    assert snapshot_values(sub) == query_rows(store, sub)


def test_left_join_null_extension(store: Store, manager: SubscriptionManager) -> None:
    seed(store)
    sub, _ = manager.subscribe(
        "SELECT m.id, h.check_name, h.status FROM machines m LEFT JOIN health h ON h.machine_id = m.id "
        "WHERE m.app = 'web'"
    )
    assert snapshot_values(sub) == [("m1", None, None), ("m2", None, None)]
    got = Collector()
    sub.add_listener(got)
    tx(store, "INSERT INTO health VALUES ('m1', 'http', 'passing')")
    events = got.wait_for(2)
    assert sorted((e.kind, e.values) for e in events) == [
        ("delete", ("m1", None, None)),
        ("insert", ("m1", "http", "passing")),
    ]
    tx(store, "INSERT INTO health VALUES ('m1', 'tcp', 'passing')")
    tx(store, "DELETE FROM health WHERE machine_id = 'm1'")
    assert manager.flush()
    assert snapshot_values(sub) == query_rows(store, sub) == [("m1", None, None), ("m2", None, None)]


def test_self_join(store: Store, manager: SubscriptionManager) -> None:
    seed(store)
    sub, _ = manager.subscribe(
        "SELECT a.id, b.id FROM machines a JOIN machines b ON b.region = a.region AND b.id != a.id"
    )
    assert snapshot_values(sub) == [("m1", "m3"), ("m3", "m1")]
    tx(store, "UPDATE machines SET region = 'ams' WHERE id = 'm2'")
    assert manager.flush()
    assert snapshot_values(sub) == query_rows(store, sub)
    assert len(snapshot_values(sub)) == 6


# ------------------------------------------------------------------------------------------------ sharing, refusals


def test_identical_queries_share_one_subscription(store: Store, manager: SubscriptionManager) -> None:
    seed(store)
    a, created_a = manager.subscribe("SELECT id, state FROM machines WHERE app = ?", ["web"])
    b, created_b = manager.subscribe("select id, state\n  from machines   where app = ? ;", ["web"])
    c, created_c = manager.subscribe("SELECT id, state FROM machines WHERE app = ?", ["api"])
    d, created_d = manager.subscribe("SELECT id, state FROM machines WHERE app = ? -- comment", ["web"])
    assert created_a and not created_b and created_c and not created_d
    assert a is b is d and a.id == b.id
    assert c.id != a.id
    assert len(manager.list()) == 2


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("SELECT count(*) FROM machines", "aggregate"),
        ("SELECT app, max(cpu) FROM machines GROUP BY app", "GROUP BY"),
        ("SELECT app FROM machines GROUP BY app", "GROUP BY"),
        ("SELECT DISTINCT app FROM machines", "DISTINCT"),
        ("SELECT id FROM machines LIMIT 10", "LIMIT"),
        ("SELECT id FROM machines ORDER BY id LIMIT 10 OFFSET 5", "LIMIT"),
        ("SELECT id FROM machines UNION SELECT name FROM apps", "compound"),
        ("SELECT id, row_number() OVER (ORDER BY id) FROM machines", "window"),
        ("SELECT * FROM (SELECT id FROM machines)", "subqueries"),
        ("SELECT id FROM machines WHERE app IN (SELECT name FROM apps)", "subqueries"),
        ("SELECT id, (SELECT org FROM apps WHERE name = app) FROM machines", "subqueries"),
        ("WITH x AS (SELECT id FROM machines) SELECT id FROM x", "WITH"),
        ("SELECT * FROM nope", "not in the schema"),
        ("SELECT * FROM sqlite_master", "not in the schema"),
        ("SELECT * FROM __vd_site", "not in the schema"),
        ("SELECT * FROM json_each('[1]')", "only schema tables"),
        ("SELECT * FROM machines m RIGHT JOIN apps a ON a.name = m.app", "RIGHT JOIN"),
        ("SELECT * FROM machines m FULL OUTER JOIN apps a ON a.name = m.app", "FULL JOIN"),
        ("SELECT 1", "at least one table"),
        ("SELECT nope FROM machines", "no such column"),
        ("SELECT id FROM machines; SELECT 1", "exactly one"),
        ("SELEC id FROM machines", "parse"),
        ("", "empty"),
    ],
)
def test_unsupported_queries_are_refused(manager: SubscriptionManager, sql: str, message: str) -> None:
    with pytest.raises(SubscriptionError, match=message):
        manager.subscribe(sql)
    assert manager.list() == []
    assert manager.refused == 1


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO machines (id) VALUES ('x')",
        "UPDATE machines SET state = 'x'",
        "DELETE FROM machines",
        "DROP TABLE machines",
        "CREATE TABLE x (id INTEGER PRIMARY KEY)",
        "PRAGMA writable_schema = 1",
        "ATTACH DATABASE 'x.db' AS x",
    ],
)
def test_writes_are_refused(store: Store, manager: SubscriptionManager, sql: str) -> None:
    seed(store)
    with pytest.raises(SubscriptionError):
        manager.subscribe(sql)
    assert store.table_stats(["machines"]) == (3, [])


def test_bad_parameters(manager: SubscriptionManager) -> None:
    with pytest.raises(SubscriptionError, match="parameters"):
        manager.subscribe("SELECT id FROM machines WHERE app = ?", [])
    with pytest.raises(SubscriptionError, match="unsupported type"):
        manager.subscribe("SELECT id FROM machines WHERE app = ?", [object()])


# ------------------------------------------------------------------------------------------------ resume, gaps


def test_resume_with_changes_since(store: Store, manager: SubscriptionManager) -> None:
    seed(store)
    sub, _ = manager.subscribe("SELECT id, cpu FROM machines")
    for i in range(5):
        tx(store, "UPDATE machines SET cpu = ? WHERE id = 'm1'", params=[10 + i])
        assert manager.flush()  # one event per commit (commits matched together would coalesce)
    assert sub.change_id == 5
    assert [e.change_id for e in sub.changes_since(0)] == [1, 2, 3, 4, 5]
    assert [e.values for e in sub.changes_since(3)] == [("m1", 13), ("m1", 14)]
    assert sub.changes_since(5) == []


def test_gap_error(store: Store, tmp_path: Path) -> None:
    seed(store)
    with SubscriptionManager(store, tmp_path / "subs", max_kept_changes=5) as manager:
        sub, _ = manager.subscribe("SELECT id, cpu FROM machines")
        for i in range(10):
            tx(store, "UPDATE machines SET cpu = ? WHERE id = 'm1'", params=[100 + i])
            assert manager.flush()
        assert sub.change_id == 10
        assert [e.change_id for e in sub.changes_since(5)] == [6, 7, 8, 9, 10]
        with pytest.raises(GapError, match="no longer kept"):
            sub.changes_since(4)
        with pytest.raises(GapError, match="no longer kept"):
            sub.changes_since(0)
        with pytest.raises(GapError, match="future"):
            sub.changes_since(11)
        with pytest.raises(SubscriptionError):
            sub.changes_since(-1)


def test_snapshot_then_listen_protocol_under_concurrent_writes(
    store: Store, manager: SubscriptionManager
) -> None:
    """The documented protocol (listen, snapshot, drop events <= cid) neither misses nor repeats a change,
    while a writer thread keeps committing."""
    tx(store, "INSERT INTO items VALUES (1, 'a', 1)")
    sub, _ = manager.subscribe("SELECT id, name, flag FROM items WHERE flag = 1")
    stop = threading.Event()

    def writer() -> None:
        rng = random.Random(7)
        for i in range(400):
            k = rng.randrange(30)
            op = rng.randrange(3)
            if op == 0:
                tx(
                    store,
                    "INSERT OR REPLACE INTO items VALUES (?, ?, ?)",
                    params=[k, f"n{i}", rng.randrange(2)],
                )
            elif op == 1:
                tx(
                    store,
                    "UPDATE items SET name = ?, flag = ? WHERE id = ?",
                    params=[f"u{i}", rng.randrange(2), k],
                )
            else:
                tx(store, "DELETE FROM items WHERE id = ?", params=[k])
        stop.set()

    t = threading.Thread(target=writer)
    t.start()
    got = Collector()
    sub.add_listener(got)
    rows, cid = sub.snapshot()
    t.join(timeout=60)
    assert stop.is_set()
    assert manager.flush()
    after = [e for e in got.events if e.change_id > cid]
    assert [e.change_id for e in after] == list(range(cid + 1, sub.change_id + 1))
    state = dict(rows)
    apply_events(state, after)
    assert sorted(state.items()) == sub.snapshot()[0]
    assert snapshot_values(sub) == query_rows(store, sub)


# ------------------------------------------------------------------------------------------------ restart


def test_restart_catches_up_with_missed_changes(store: Store, tmp_path: Path) -> None:
    seed(store)
    state_dir = tmp_path / "subs"
    m1 = SubscriptionManager(store, state_dir)
    sub, _ = m1.subscribe("SELECT id, state FROM machines WHERE region = 'ams'")
    tx(store, "UPDATE machines SET state = 'stopping' WHERE id = 'm1'")
    assert m1.flush()
    before_rows, before_cid = sub.snapshot()
    assert before_cid == 1
    rowid = {v[0]: r for r, v in before_rows}
    m1.close()
    m1.close()  # idempotent

    # Writes while no manager runs: none of them can be matched incrementally.
    tx(store, "INSERT INTO machines VALUES ('m5', 'db', 'ams', 'created', 1)")
    tx(store, "UPDATE machines SET state = 'stopped' WHERE id = 'm1'")
    tx(store, "DELETE FROM machines WHERE id = 'm3'")
    tx(store, "UPDATE machines SET cpu = 7 WHERE id = 'm2'")  # not in the result: no event

    with SubscriptionManager(store, state_dir) as m2:
        assert m2.flush()
        sub2 = m2.get(sub.id)
        assert sub2 is not None
        assert sub2.sql == sub.sql and sub2.columns == ["id", "state"]
        events = sub2.changes_since(before_cid)
        assert sorted((e.kind, e.values) for e in events) == [
            ("delete", ("m3", "started")),
            ("insert", ("m5", "created")),
            ("update", ("m1", "stopped")),
        ]
        assert [e.change_id for e in events] == [2, 3, 4]
        assert {e.rowid for e in events if e.kind != "insert"} == {rowid["m1"], rowid["m3"]}
        state = dict(before_rows)
        apply_events(state, events)
        assert sorted(state.items()) == sub2.snapshot()[0]
        assert snapshot_values(sub2) == query_rows(store, sub2)

        # Identical query after restart: the same subscription, and live again.
        again, created = m2.subscribe("SELECT id, state FROM machines WHERE region = 'ams'")
        assert again is sub2 and not created
        got = Collector()
        sub2.add_listener(got)
        tx(store, "UPDATE machines SET state = 'started' WHERE id = 'm5'")
        m5 = next(e.rowid for e in events if e.kind == "insert")
        assert got.wait_for(1)[0] == ChangeEvent("update", m5, ("m5", "started"), 5)


def test_restart_without_changes_emits_nothing(store: Store, tmp_path: Path) -> None:
    seed(store)
    with SubscriptionManager(store, tmp_path / "subs") as m1:
        sub, _ = m1.subscribe("SELECT id FROM machines")
    with SubscriptionManager(store, tmp_path / "subs") as m2:
        assert m2.flush()
        sub2 = m2.get(sub.id)
        assert sub2 is not None and sub2.change_id == 0 and sub2.stats.full_rediffs == 1


def test_remove_deletes_state(store: Store, manager: SubscriptionManager, tmp_path: Path) -> None:
    sub, _ = manager.subscribe("SELECT id FROM machines")
    assert list((tmp_path / "subs").glob("*.db"))
    assert manager.remove(sub.id)
    assert not manager.remove(sub.id)
    assert manager.get(sub.id) is None
    assert not list((tmp_path / "subs").glob("*.db"))


# ------------------------------------------------------------------------------------------------ incrementality


@pytest.mark.parametrize("use_join", [False, True])
def test_matching_work_does_not_grow_with_table_size(store: Store, tmp_path: Path, use_join: bool) -> None:
    """A one-row commit costs the same matching work on a 10-row table as on a 20,000-row one. Work is
    measured two ways: result/stored rows examined, and SQLite VM instructions (which would show a scan)."""
    costs = []
    for size, name in ((10, "small"), (20_000, "big")):
        s = Store(tmp_path / f"{name}.sqlite", schema_sql=SCHEMA)
        tx(
            s,
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < ?) "
            "INSERT INTO items SELECT x, 'n' || x, x % 2 FROM c",
            params=[size],
        )
        tx(s, "INSERT INTO apps VALUES ('n1', 'acme'), ('changed', 'acme')")
        with SubscriptionManager(s, tmp_path / f"subs-{name}") as m:
            if use_join:
                sql = "SELECT i.id, i.name, a.org FROM items i LEFT JOIN apps a ON a.name = i.name WHERE i.flag = 1"
            else:
                sql = "SELECT id, name FROM items WHERE flag = 1"
            before_fill = m.work_counter
            sub, _ = m.subscribe(sql)
            fill_cost = m.work_counter - before_fill
            assert len(sub.snapshot()[0]) == size // 2
            got = Collector()
            sub.add_listener(got)
            before = (sub.stats.rows_examined, sub.stats.vm_steps)
            tx(s, "UPDATE items SET name = 'changed' WHERE id = 1")
            assert m.flush()
            if use_join:
                tx(s, "UPDATE apps SET org = 'other' WHERE name = 'changed'")
                assert m.flush()
            got.wait_for(2 if use_join else 1)
            costs.append(
                (
                    sub.stats.rows_examined - before[0],
                    sub.stats.vm_steps - before[1],
                    fill_cost,
                    sub.stats.batches,
                )
            )
        s.close()
    (small_rows, small_steps, small_fill, _), (big_rows, big_steps, big_fill, _) = costs
    assert big_fill > 100 * max(small_fill, 100)  # the counter does see a full scan
    assert big_rows == small_rows <= 6
    assert big_steps <= small_steps + 200


def test_scan_warnings_name_the_missing_index(manager: SubscriptionManager) -> None:
    indexed, _ = manager.subscribe("SELECT m.id, a.org FROM machines m JOIN apps a ON a.name = m.app")
    assert indexed.scan_warnings == []
    unindexed, _ = manager.subscribe("SELECT i.id, a.name FROM items i JOIN apps a ON a.org = i.name")
    assert len(unindexed.scan_warnings) == 1
    assert "a change to items (as i)" in unindexed.scan_warnings[0]
    assert "SCAN a" in unindexed.scan_warnings[0]


# ------------------------------------------------------------------------------------------------ remote changes


def test_remote_merge_produces_events(tmp_path: Path) -> None:
    a = Store(tmp_path / "a.sqlite", schema_sql=SCHEMA)
    b = Store(tmp_path / "b.sqlite", schema_sql=SCHEMA)
    try:
        with SubscriptionManager(b, tmp_path / "subs-b") as m:
            sub, _ = m.subscribe("SELECT m.id, m.state, a.org FROM machines m JOIN apps a ON a.name = m.app")
            got = Collector()
            sub.add_listener(got)
            seed(a)
            b.merge(a.changesets_for(a.site_id, 1, a.db_version))
            events = got.wait_for(3)
            assert sorted(e.values for e in events) == [
                ("m1", "started", "acme"),
                ("m2", "stopped", "acme"),
                ("m3", "started", "acme"),
            ]
            assert {e.kind for e in events} == {"insert"}
            v = a.db_version
            tx(a, "UPDATE apps SET org = 'acme2' WHERE name = 'api'", "DELETE FROM machines WHERE id = 'm2'")
            b.merge(a.changesets_for(a.site_id, v + 1, a.db_version))
            events = got.wait_for(5)[3:]
            assert sorted((e.kind, e.values) for e in events) == [
                ("delete", ("m2", "stopped", "acme")),
                ("update", ("m3", "started", "acme2")),
            ]
            assert m.flush()
            assert snapshot_values(sub) == query_rows(b, sub)
    finally:
        a.close()
        b.close()


def test_remote_keys_of_another_type_match_by_affinity(tmp_path: Path) -> None:
    """A remote peer may send an INTEGER primary key as text ('5'); SQLite's affinity stores it as 5, and
    matching must still find the row (the commit notice carries the key as received)."""
    a = Store(tmp_path / "a.sqlite", schema_sql=SCHEMA)
    b = Store(tmp_path / "b.sqlite", schema_sql=SCHEMA)
    try:
        with SubscriptionManager(b, tmp_path / "subs-b") as m:
            sub, _ = m.subscribe("SELECT id, name FROM items")
            got = Collector()
            sub.add_listener(got)

            def as_text(changesets: list[Changeset]) -> list[Changeset]:
                return [
                    msgspec.structs.replace(
                        cs,
                        changes=[
                            msgspec.structs.replace(c, pk=tuple(str(v) for v in c.pk)) for c in cs.changes
                        ],
                    )
                    for cs in changesets
                ]

            tx(a, "INSERT INTO items VALUES (5, 'five', 0)")
            b.merge(as_text(a.changesets_for(a.site_id, 1, 1)))
            assert got.wait_for(1)[0].values == (5, "five")
            tx(a, "UPDATE items SET name = 'FIVE' WHERE id = 5")
            b.merge(as_text(a.changesets_for(a.site_id, 2, 2)))
            tx(a, "DELETE FROM items WHERE id = 5")
            b.merge(as_text(a.changesets_for(a.site_id, 3, 3)))
            assert m.flush()
            events = got.wait_for(2)
            assert events[-1].kind == "delete" and events[-1].values[0] == 5
            assert sub.snapshot()[0] == [] and b.rows("items") == []
    finally:
        a.close()
        b.close()


# ------------------------------------------------------------------------------------------------ robustness


def test_pending_overflow_becomes_full_rediff(store: Store, tmp_path: Path) -> None:
    with SubscriptionManager(store, tmp_path / "subs", max_pending_keys=5) as m:
        sub, _ = m.subscribe("SELECT id, name FROM items")
        got = Collector()
        sub.add_listener(got)
        tx(
            store,
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 50) "
            "INSERT INTO items SELECT x, 'n' || x, 0 FROM c",
        )
        events = got.wait_for(50)
        assert m.overflows >= 1
        assert sub.stats.full_rediffs >= 1
        assert sorted(e.values for e in events) == sorted((i, f"n{i}") for i in range(1, 51))
        assert [e.change_id for e in events] == list(range(1, 51))


def test_listener_errors_do_not_stop_matching(store: Store, manager: SubscriptionManager) -> None:
    sub, _ = manager.subscribe("SELECT id FROM items")

    def broken(events: list[ChangeEvent]) -> None:
        raise RuntimeError("boom")

    got = Collector()
    sub.add_listener(broken)
    sub.add_listener(got)
    tx(store, "INSERT INTO items VALUES (1, 'a', 0)")
    tx(store, "INSERT INTO items VALUES (2, 'b', 0)")
    assert [e.values for e in got.wait_for(2)] == [(1,), (2,)]
    sub.remove_listener(got)
    sub.remove_listener(broken)
    assert sub.listener_count == 0


def test_closed_manager_refuses(store: Store, tmp_path: Path) -> None:
    m = SubscriptionManager(store, tmp_path / "subs")
    m.close()
    with pytest.raises(SubscriptionError, match="closed"):
        m.subscribe("SELECT id FROM items")
    assert not m.flush(0.1)


@pytest.mark.parametrize(
    "value",
    [0, -1, 2**63 - 1, -(2**63), 1.5, -0.25, 1e300, 1e-300, float("inf"), float("-inf"), "", "it's", "nul\x00byte",
     "ünï", b"", b"\x00\xff", None],
)  # fmt: skip
def test_sql_literal_round_trips(value: Any) -> None:
    conn = sqlite3.connect(":memory:")
    try:
        (got,) = conn.execute(f"SELECT {sql_literal(value)}").fetchone()
    finally:
        conn.close()
    assert type(got) is type(value) and got == value


# ------------------------------------------------------------------------------------------------ property test

PROP_SCHEMA = """
CREATE TABLE a (id INTEGER PRIMARY KEY, grp INTEGER, v TEXT);
CREATE TABLE b (a_id INTEGER NOT NULL, k TEXT NOT NULL DEFAULT '', w INTEGER, PRIMARY KEY (a_id, k));
CREATE INDEX b_by_a ON b (a_id);
"""
PROP_QUERIES = [
    "SELECT id, v FROM a WHERE grp = 1",
    "SELECT a.id, a.v, b.k, b.w FROM a JOIN b ON b.a_id = a.id WHERE b.w > 0",
    "SELECT a.id, a.grp, b.k, b.w FROM a LEFT JOIN b ON b.a_id = a.id AND b.w IS NOT NULL",
    "SELECT x.id, y.id, y.v FROM a x JOIN a y ON y.grp = x.id",
    "SELECT b.a_id, b.k, a.v FROM b LEFT JOIN a ON a.id = b.a_id",
    "SELECT x.id, y.id, y.v FROM a x LEFT JOIN a y ON y.grp = x.id WHERE x.v IS NOT 'z'",
    "SELECT a.id, b.k, c.v FROM a LEFT JOIN b ON b.a_id = a.id LEFT JOIN a c ON c.id = b.w ORDER BY a.id",
]

ids = st.integers(0, 5)
ops = st.one_of(
    st.tuples(st.just("upsert_a"), ids, st.integers(0, 3), st.sampled_from(["x", "y", None])),
    st.tuples(st.just("update_a"), ids, st.integers(0, 3), st.sampled_from(["x", "z"])),
    st.tuples(st.just("move_a"), ids, ids, st.none()),
    st.tuples(st.just("delete_a"), ids, st.none(), st.none()),
    st.tuples(st.just("upsert_b"), ids, st.sampled_from(["p", "q"]), st.sampled_from([0, 1, 2, None])),
    st.tuples(st.just("delete_b"), ids, st.sampled_from(["p", "q"]), st.none()),
)


def _statement(op: tuple[str, Any, Any, Any]) -> Statement:
    kind, x, y, z = op
    if kind == "upsert_a":
        return Statement("INSERT OR REPLACE INTO a VALUES (?, ?, ?)", [x, y, z])
    if kind == "update_a":
        return Statement("UPDATE a SET grp = ?, v = ? WHERE id = ?", [y, z, x])
    if kind == "move_a":
        return Statement("UPDATE OR REPLACE a SET id = ? WHERE id = ?", [y, x])
    if kind == "delete_a":
        return Statement("DELETE FROM a WHERE id = ?", [x])
    if kind == "upsert_b":
        return Statement("INSERT OR REPLACE INTO b VALUES (?, ?, ?)", [x, y, z])
    return Statement("DELETE FROM b WHERE a_id = ? AND k = ?", [x, y])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    initial=st.lists(ops, max_size=8),
    transactions=st.lists(st.lists(ops, min_size=1, max_size=3), min_size=1, max_size=12),
    flush_every=st.integers(1, 4),
)
def test_random_changes_keep_snapshot_equal_to_query(
    initial: list[tuple[str, Any, Any, Any]],
    transactions: list[list[tuple[str, Any, Any, Any]]],
    flush_every: int,
) -> None:
    with tempfile.TemporaryDirectory() as d:
        store = Store(Path(d) / "db.sqlite", schema_sql=PROP_SCHEMA)
        try:
            for op in initial:
                store.transact([_statement(op)])
            with SubscriptionManager(store, Path(d) / "subs") as m:
                subs = [m.subscribe(q)[0] for q in PROP_QUERIES]
                starts = [dict(s.snapshot()[0]) for s in subs]
                for i, ops_ in enumerate(transactions):
                    store.transact([_statement(op) for op in ops_])
                    if i % flush_every == 0:
                        assert m.flush()
                assert m.flush()
                for sub, start in zip(subs, starts, strict=True):
                    assert snapshot_values(sub) == query_rows(store, sub), sub.sql
                    rows, cid = sub.snapshot()
                    events = sub.changes_since(0)
                    assert [e.change_id for e in events] == list(range(1, cid + 1))
                    apply_events(start, events)
                    assert sorted(start.items()) == rows, sub.sql
        finally:
            store.close()
