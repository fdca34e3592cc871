"""Scopes: regional and global tables in one store, one actor per scope, scope-checked merges, and
replicas where regional changes travel only inside a region while global ones reach everyone."""

from __future__ import annotations

import random
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from verdigris.restore import restore_database
from verdigris.store import (
    SCOPES,
    Change,
    Changeset,
    CommitNotice,
    SchemaError,
    Statement,
    StatementError,
    Store,
    split_changeset,
)
from verdigris.store.schema import load_schema_files, parse_schema
from verdigris.store.subscriptions import ChangeEvent, SubscriptionManager

SCHEMA = """
-- Apps: coarse, everywhere.
-- scope: global
CREATE TABLE apps (name TEXT PRIMARY KEY, org TEXT);

-- Instances: fine-grained, regional.
CREATE TABLE machines (id TEXT PRIMARY KEY, app TEXT, region TEXT, state TEXT);
CREATE INDEX machines_app ON machines (app);

-- scope: regional
CREATE TABLE checks (machine TEXT NOT NULL, name TEXT NOT NULL, status TEXT, PRIMARY KEY (machine, name));
"""


def tx(store: Store, *sql: str) -> Any:
    return store.transact([Statement(s) for s in sql])


def open_store(path: Path, schema: str = SCHEMA) -> Store:
    return Store(path, schema_sql=schema)


# ------------------------------------------------------------------------------------------- schema


def test_scope_directives() -> None:
    schema = parse_schema([("s.sql", SCHEMA)])
    assert {n: t.scope for n, t in schema.tables.items()} == {
        "apps": "global",
        "machines": "regional",
        "checks": "regional",
    }
    assert SCOPES == ("regional", "global")


def test_platform_schema_scopes() -> None:
    path = Path(__file__).resolve().parent.parent / "schemas" / "platform.sql"
    schema = load_schema_files([path])
    assert {n: t.scope for n, t in schema.tables.items()} == {
        "apps": "global",
        "hostnames": "global",
        "app_regions": "global",
        "machines": "regional",
        "services": "regional",
        "checks": "regional",
        "proxies": "global",
        "region_rtt": "global",
        "machine_agents": "global",
    }


def test_directive_forms_that_are_accepted() -> None:
    text = (
        "-- header\n\n"
        "-- a comment\n--scope:global\n-- another line of the same block\n"
        "CREATE TABLE a (id INTEGER PRIMARY KEY);\n"
        "-- '-- scope: global' inside a string is not a directive:\n"
        "CREATE TABLE b (id INTEGER PRIMARY KEY, c TEXT DEFAULT '-- scope: global');\n"
        "-- mentioning a `-- scope: global` line in prose is not one either\n"
        "CREATE TABLE c (id INTEGER PRIMARY KEY);\n"
    )
    schema = parse_schema([("f.sql", text)])
    assert {n: t.scope for n, t in schema.tables.items()} == {"a": "global", "b": "regional", "c": "regional"}


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        ("-- scope: planetary\nCREATE TABLE t (id INTEGER PRIMARY KEY);", "unknown scope 'planetary'", 1),
        ("-- scope:\nCREATE TABLE t (id INTEGER PRIMARY KEY);", "unknown scope ''", 1),
        ("-- scope: Global\nCREATE TABLE t (id INTEGER PRIMARY KEY);", "unknown scope 'Global'", 1),
        ("-- scope: global\n\nCREATE TABLE t (id INTEGER PRIMARY KEY);", "wrong place", 1),
        ("CREATE TABLE t (\n  -- scope: global\n  id INTEGER PRIMARY KEY);", "wrong place", 2),
        ("CREATE TABLE t (id INTEGER PRIMARY KEY); -- scope: global\n", "wrong place", 1),
        (
            "-- scope: global\n-- scope: regional\nCREATE TABLE t (id INTEGER PRIMARY KEY);",
            "more than one scope directive",
            2,
        ),
        (
            "CREATE TABLE t (id INTEGER PRIMARY KEY, a TEXT);\n-- scope: global\nCREATE INDEX t_a ON t (a);",
            "may only precede a CREATE TABLE",
            2,
        ),
        ("CREATE TABLE t (id INTEGER PRIMARY KEY);\n-- scope: global\n", "wrong place", 2),
    ],
)
def test_bad_directives_are_refused(tmp_path: Path, text: str, message: str, line: int) -> None:
    path = tmp_path / "bad.sql"
    path.write_text(text)
    with pytest.raises(SchemaError) as err:
        load_schema_files([path])
    msg = str(err.value)
    assert message in msg
    assert f"{path}:{line}:" in msg
    if "CREATE INDEX" not in text and not text.rstrip().endswith("-- scope: global"):
        assert "table 't'" in msg


def test_scope_is_persisted_and_cannot_change(tmp_path: Path) -> None:
    store = open_store(tmp_path / "db")
    store.close()
    store = Store(tmp_path / "db")  # no schema given: read back from the database
    assert store.schema.tables["apps"].scope == "global"
    assert store.schema.tables["machines"].scope == "regional"
    with pytest.raises(SchemaError, match=r"table 'apps': scope changed from 'global' to 'regional'"):
        store.apply_schema(parse_schema([("new.sql", SCHEMA.replace("-- scope: global\n", ""))]))
    with pytest.raises(SchemaError, match=r"table 'machines': scope changed from 'regional' to 'global'"):
        store.apply_schema(
            parse_schema(
                [
                    (
                        "new.sql",
                        SCHEMA.replace("CREATE TABLE machines", "-- scope: global\nCREATE TABLE machines"),
                    )
                ]
            )
        )
    # Additive changes still work, and a new table may be global.
    changes = store.apply_schema(
        parse_schema(
            [("new.sql", SCHEMA + "-- scope: global\nCREATE TABLE certs (host TEXT PRIMARY KEY);\n")]
        )
    )
    assert changes.new_tables == ["certs"]
    assert store.schema.tables["certs"].scope == "global"
    store.close()


# ------------------------------------------------------------------------------------------- local writes


def test_each_scope_has_its_own_actor(tmp_path: Path) -> None:
    store = open_store(tmp_path / "db")
    regional, glob = store.actor_for("regional"), store.actor_for("global")
    assert regional == store.site_id and len(glob) == 16 and glob != regional
    assert store.scope_of(regional) == "regional" and store.scope_of(glob) == "global"
    assert store.scope_of(b"x" * 16) is None
    with pytest.raises(ValueError, match="unknown scope"):
        store.actor_for("planetary")
    store.close()
    store = Store(tmp_path / "db")
    assert store.actor_for("global") == glob and store.site_id == regional
    store.close()


def test_mixed_transaction_makes_one_version_per_scope(tmp_path: Path) -> None:
    store = open_store(tmp_path / "db")
    notices: list[CommitNotice] = []
    store.add_commit_listener(notices.append)
    g, r = store.actor_for("global"), store.site_id

    res = tx(store, "INSERT INTO apps VALUES ('web', 'acme')")
    assert res.versions == {"global": 1} and res.version == 1
    assert notices[-1].local_version is None and notices[-1].versions == {g: 1}
    assert store.db_version == 0 and store.db_version_of("global") == 1

    res = tx(store, "INSERT INTO machines VALUES ('m1', 'web', 'ams', 'started')")
    assert res.versions == {"regional": 1} and res.version == 1
    assert notices[-1].local_version == 1 and notices[-1].versions == {r: 1}

    res = tx(
        store,
        "INSERT INTO machines VALUES ('m2', 'web', 'ams', 'started')",
        "UPDATE apps SET org = 'acme2' WHERE name = 'web'",
        "INSERT INTO checks VALUES ('m2', 'http', 'passing')",
    )
    assert res.versions == {"regional": 2, "global": 2} and res.version == 2
    notice = notices[-1]
    assert notice.local_version == 2 and notice.versions == {r: 2, g: 2}
    assert notice.tables == {"machines": {("m2",)}, "apps": {("web",)}, "checks": {("m2", "http")}}
    assert store.db_version == 2 and store.db_version_of("global") == 2

    # Each version holds its own scope's changes, seqs from 0 each.
    cs_r = store.changeset(r, 2)
    cs_g = store.changeset(g, 2)
    assert cs_r is not None and cs_g is not None
    assert {c.table for c in cs_r.changes} == {"machines", "checks"}
    assert {c.table for c in cs_g.changes} == {"apps"}
    assert [c.seq for c in cs_g.changes] == [0]
    assert [c.seq for c in cs_r.changes] == list(range(len(cs_r.changes)))
    assert all(c.site_id == g for c in cs_g.changes) and all(c.site_id == r for c in cs_r.changes)
    # Clock rows carry the actor of their table's scope.
    assert {row[-1] for row in store.clock_rows("apps")} == {g}
    assert {row[-1] for row in store.clock_rows("machines")} == {r}

    # A transaction that changes nothing makes no version.
    res = tx(store, "UPDATE apps SET org = 'acme2' WHERE name = 'web'")
    assert res.versions == {} and res.version is None
    store.close()


def test_failed_mixed_transaction_books_nothing(tmp_path: Path) -> None:
    store = open_store(tmp_path / "db")
    with pytest.raises(StatementError, match="statement 1"):
        tx(store, "INSERT INTO apps VALUES ('web', 'acme')", "INSERT INTO machines VALUES ('m1')")
    assert store.heads() == {} and store.db_version_of("global") == 0
    assert tx(store, "INSERT INTO apps VALUES ('web', 'acme')").versions == {"global": 1}
    store.close()


def test_changesets_for_carry_only_the_actors_scope(tmp_path: Path) -> None:
    a = open_store(tmp_path / "a")
    tx(
        a,
        "INSERT INTO apps VALUES ('web', 'acme')",
        "INSERT INTO machines VALUES ('m1', 'web', 'ams', 'started')",
        "INSERT INTO checks VALUES ('m1', 'http', 'passing')",
    )
    tx(a, "INSERT INTO apps VALUES ('api', 'acme')")
    regional = a.changesets_for(a.site_id, 1, 10)
    glob = a.changesets_for(a.actor_for("global"), 1, 10)
    assert [cs.version for cs in regional] == [1]
    assert [cs.version for cs in glob] == [1, 2]
    assert {c.table for cs in regional for c in cs.changes} == {"machines", "checks"}
    assert {c.table for cs in glob for c in cs.changes} == {"apps"}
    a.close()


# ------------------------------------------------------------------------------------------- merge


def test_merge_records_scopes_and_rejects_foreign_changesets(tmp_path: Path) -> None:
    a = open_store(tmp_path / "a")
    b = open_store(tmp_path / "b")
    tx(a, "INSERT INTO apps VALUES ('web', 'acme')", "INSERT INTO machines VALUES ('m1', 'web', 'ams', 'x')")
    ga, ra = a.actor_for("global"), a.site_id
    glob = a.changesets_for(ga, 1, 1)
    regional = a.changesets_for(ra, 1, 1)

    # The global cluster refuses a regional changeset and vice versa; nothing is booked.
    res = b.merge(regional, scope="global")
    assert [(actor, v) for actor, v, _ in res.rejected] == [(ra, 1)]
    assert "scope 'regional'" in res.rejected[0][2]
    res = b.merge(glob, scope="regional")
    assert [(actor, v) for actor, v, _ in res.rejected] == [(ga, 1)]
    assert b.heads() == {} and b.rows("apps") == [] and b.scope_of(ga) is None

    res = b.merge(glob, scope="global")
    assert res.rejected == [] and res.applied_versions == [(ga, 1)]
    assert b.scope_of(ga) == "global" and b.rows("apps") == [("web", "acme")]
    res = b.merge(regional)  # no scope: the single-cluster mode
    assert res.rejected == [] and b.scope_of(ra) == "regional"
    assert b.rows("machines") == [("m1", "web", "ams", "x")]

    # A known actor sending a change to the other scope's table is invalid.
    tx(a, "INSERT INTO apps VALUES ('api', 'acme')")
    forged_change = a.changesets_for(ga, 2, 2)[0].changes[0]
    forged = Changeset(
        actor=ra,
        version=2,
        changes=[
            Change(
                table="apps",
                pk=("api",),
                cid="org",
                val="evil",
                col_version=1,
                db_version=2,
                site_id=ra,
                cl=1,
                seq=0,
            )
        ],
        seqs=(0, 0),
        last_seq=0,
    )
    res = b.merge([forged])
    assert len(res.rejected) == 1 and "actor of scope 'regional'" in res.rejected[0][2]
    assert not b.knows(ra, 2)

    # A changeset mixing both scopes is invalid.
    other = open_store(tmp_path / "o")
    m = a.changesets_for(ra, 1, 1)[0].changes
    mixed_actor = b"\x01" * 16
    mixed = Changeset(
        actor=mixed_actor,
        version=1,
        changes=[
            Change(c.table, c.pk, c.cid, c.val, c.col_version, 1, mixed_actor, c.cl, i)
            for i, c in enumerate([*m, forged_change])
        ],
        seqs=(0, len(m)),
        last_seq=len(m),
    )
    res = other.merge([mixed])
    assert len(res.rejected) == 1 and "mixes regional and global" in res.rejected[0][2]
    assert other.scope_of(mixed_actor) is None

    # This node's own global actor is refused like its site id.
    res = a.merge(glob)
    assert res.rejected and "own actor" in res.rejected[0][2]
    for s in (a, b, other):
        s.close()


def test_empty_changesets_take_the_recorded_or_given_scope(tmp_path: Path) -> None:
    b = open_store(tmp_path / "b")
    g = b"\x02" * 16
    empty = Changeset(actor=g, version=1, changes=[], seqs=(0, 0), last_seq=0)
    res = b.merge([empty], scope="global")
    assert res.rejected == [] and b.scope_of(g) == "global" and b.knows(g, 1)
    # Recorded as global: a cleared version of it does not belong in the regional cluster.
    res = b.merge([Changeset(actor=g, version=2, changes=[], seqs=(0, 0), last_seq=0)], scope="regional")
    assert len(res.rejected) == 1 and not b.knows(g, 2)
    res = b.merge([Changeset(actor=g, version=2, changes=[], seqs=(0, 0), last_seq=0)])
    assert res.rejected == [] and b.knows(g, 2)
    # Unknown actor, no scope given: booked, scope left unknown until a change tells it.
    u = b"\x03" * 16
    assert b.merge([Changeset(actor=u, version=1, changes=[], seqs=(0, 0), last_seq=0)]).rejected == []
    assert b.scope_of(u) is None and b.heads() == {g: 2, u: 1}
    assert b.heads("global") == {g: 2} and b.heads("regional") == {}
    b.close()


def test_books_heads_needs_by_scope(tmp_path: Path) -> None:
    a = open_store(tmp_path / "a")
    b = open_store(tmp_path / "b")
    for i in range(3):
        tx(
            a,
            f"INSERT INTO apps VALUES ('app{i}', 'o')",
            f"INSERT INTO machines VALUES ('m{i}', 'app{i}', 'r', 's')",
        )
    ga, ra = a.actor_for("global"), a.site_id
    # b gets global versions 1 and 3 (a gap at 2), regional version 2 in two pieces of which one arrives.
    b.merge([cs for cs in a.changesets_for(ga, 1, 3) if cs.version != 2], scope="global")
    piece = split_changeset(a.changesets_for(ra, 2, 2)[0], 1)[0]
    b.merge([piece], scope="regional")
    assert b.heads() == {ga: 3, ra: 2}
    assert b.heads("global") == {ga: 3} and b.heads("regional") == {ra: 2}
    assert set(b.books("global")) == {ga} and set(b.books("regional")) == {ra}
    assert b.needs("global") == {ga: [(2, 2)]}
    assert b.needs("regional") == {ra: [(1, 1)]}
    assert b.needs() == {ga: [(2, 2)], ra: [(1, 1)]}
    assert b.books("regional")[ra].partials.keys() == {2}
    # The writer's own books, by scope.
    assert a.heads("global") == {ga: 3} and a.heads("regional") == {ra: 3}
    with pytest.raises(ValueError, match="unknown scope"):
        b.books("planetary")
    # Scopes of remote actors survive a restart.
    b.close()
    b = Store(tmp_path / "b")
    assert b.scope_of(ga) == "global" and b.scope_of(ra) == "regional"
    assert b.needs("global") == {ga: [(2, 2)]}
    a.close()
    b.close()


def test_database_from_before_scopes_is_upgraded(tmp_path: Path) -> None:
    old_schema = SCHEMA.replace("-- scope: global\n", "")
    a = open_store(tmp_path / "a", old_schema)
    b = open_store(tmp_path / "b", old_schema)
    tx(a, "INSERT INTO apps VALUES ('web', 'acme')")
    b.merge(a.changesets_for(a.site_id, 1, 1))
    site = b.site_id
    b.close()
    # Make b's file look like one written before scopes existed.
    conn = sqlite3.connect(tmp_path / "b")
    conn.execute("DROP TABLE __vd_actors")
    conn.execute("DROP TABLE __vd_scopes")
    conn.commit()
    conn.close()
    b = Store(tmp_path / "b", schema_sql=old_schema)
    assert b.site_id == site and b.scope_of(a.site_id) == "regional"
    assert b.schema.tables["apps"].scope == "regional"
    assert b.heads("regional") == {a.site_id: 1}
    # Its tables were regional: declaring one global now is a scope change.
    with pytest.raises(SchemaError, match="scope changed"):
        b.apply_schema(parse_schema([("s.sql", SCHEMA)]))
    a.close()
    b.close()


def test_restore_keeps_both_actors(tmp_path: Path) -> None:
    store = open_store(tmp_path / "db")
    tx(
        store,
        "INSERT INTO apps VALUES ('web', 'acme')",
        "INSERT INTO machines VALUES ('m1', 'web', 'r', 's')",
    )
    store.backup(tmp_path / "backup")
    site, glob = store.site_id, store.actor_for("global")
    store.close()
    restore_database(tmp_path / "db", tmp_path / "backup")
    store = Store(tmp_path / "db")
    assert store.site_id == site and store.actor_for("global") == glob
    store.close()
    # Writing global versions the backup lacks: keeping the identity is refused.
    store = Store(tmp_path / "db")
    tx(store, "INSERT INTO apps VALUES ('api', 'acme')")
    store.close()
    with pytest.raises(Exception, match="global actor id"):
        restore_database(tmp_path / "db", tmp_path / "backup")
    result = restore_database(tmp_path / "db", tmp_path / "backup", new_site_id=True)
    store = Store(tmp_path / "db")
    assert store.site_id == result.site_id != site
    new_glob = store.actor_for("global")
    assert new_glob not in (glob, site, store.site_id)
    assert store.scope_of(glob) == "global" and store.scope_of(site) == "regional"
    assert store.heads("global") == {glob: 1}
    store.close()


# ------------------------------------------------------------------------------------------- reading both


def test_query_joins_regional_and_global_tables(tmp_path: Path) -> None:
    a = open_store(tmp_path / "a")
    b = open_store(tmp_path / "b")
    tx(a, "INSERT INTO apps VALUES ('web', 'acme')")  # global, written elsewhere
    b.merge(a.changesets_for(a.actor_for("global"), 1, 1), scope="global")
    tx(b, "INSERT INTO machines VALUES ('m1', 'web', 'ams', 'started'), ('m2', 'nope', 'ams', 'started')")
    reader = b.open_reader()
    try:
        rows = reader.execute(
            "SELECT m.id, a.name, a.org FROM machines m JOIN apps a ON a.name = m.app ORDER BY m.id"
        ).fetchall()
    finally:
        reader.close()
    assert rows == [("m1", "web", "acme")]
    a.close()
    b.close()


class _Collector:
    def __init__(self) -> None:
        self.events: list[ChangeEvent] = []
        self._cond = threading.Condition()

    def __call__(self, events: list[ChangeEvent]) -> None:
        with self._cond:
            self.events.extend(events)
            self._cond.notify_all()

    def wait_for(self, n: int, timeout: float = 10.0) -> list[ChangeEvent]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.events) >= n, timeout), self.events
            return list(self.events)


def test_subscription_on_a_join_sees_both_scopes(tmp_path: Path) -> None:
    a = open_store(tmp_path / "a")
    b = open_store(tmp_path / "b")
    try:
        with SubscriptionManager(b, tmp_path / "subs") as manager:
            sub, _ = manager.subscribe(
                "SELECT m.id, m.state, a.org FROM machines m JOIN apps a ON a.name = m.app"
            )
            got = _Collector()
            sub.add_listener(got)
            tx(b, "INSERT INTO machines VALUES ('m1', 'web', 'ams', 'started')")  # no app yet
            # The app arrives from the global cluster: the row appears.
            tx(a, "INSERT INTO apps VALUES ('web', 'acme')")
            b.merge(a.changesets_for(a.actor_for("global"), 1, 1), scope="global")
            events = got.wait_for(1)
            assert [(e.kind, e.values) for e in events] == [("insert", ("m1", "started", "acme"))]
            # A regional change from a peer of the region.
            tx(a, "INSERT INTO machines VALUES ('m2', 'web', 'ams', 'started')")
            b.merge(a.changesets_for(a.site_id, 1, 1), scope="regional")
            events = got.wait_for(2)
            assert (events[1].kind, events[1].values) == ("insert", ("m2", "started", "acme"))
            # A global update changes both rows; a local mixed transaction changes one row of each side.
            tx(a, "UPDATE apps SET org = 'acme2' WHERE name = 'web'")
            b.merge(a.changesets_for(a.actor_for("global"), 2, 2), scope="global")
            events = got.wait_for(4)
            assert sorted(e.values for e in events[2:]) == [
                ("m1", "started", "acme2"),
                ("m2", "started", "acme2"),
            ]
            tx(b, "UPDATE machines SET state = 'stopped' WHERE id = 'm1'", "UPDATE apps SET org = 'x'")
            events = got.wait_for(6)
            assert sorted(e.values for e in events[4:]) == [("m1", "stopped", "x"), ("m2", "started", "x")]
            assert manager.flush()
    finally:
        a.close()
        b.close()


# ------------------------------------------------------------------------------------------- convergence

CONV_SCHEMA = """
-- scope: global
CREATE TABLE apps (name TEXT PRIMARY KEY, v);
CREATE TABLE machines (id INTEGER PRIMARY KEY, app TEXT, v);
"""

values = st.one_of(st.none(), st.integers(min_value=-2, max_value=2), st.sampled_from(["", "x", "y"]))
op = st.one_of(
    st.tuples(st.just("app"), st.sampled_from(["a", "b", "c"]), values),
    st.tuples(st.just("del_app"), st.sampled_from(["a", "b", "c"]), st.none()),
    st.tuples(st.just("machine"), st.integers(min_value=1, max_value=3), values),
    st.tuples(st.just("del_machine"), st.integers(min_value=1, max_value=3), st.none()),
)


def op_statement(o: tuple[Any, ...], region: int) -> Statement:
    kind, key, val = o
    if kind == "app":
        return Statement(
            "INSERT INTO apps (name, v) VALUES (?, ?) ON CONFLICT DO UPDATE SET v = excluded.v", [key, val]
        )
    if kind == "del_app":
        return Statement("DELETE FROM apps WHERE name = ?", [key])
    # Regional rows are tagged with their region, to check they never leave it.
    mid = region * 100 + int(key)
    if kind == "machine":
        return Statement(
            "INSERT INTO machines (id, app, v) VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET v = excluded.v",
            [mid, f"r{region}", val],
        )
    return Statement("DELETE FROM machines WHERE id = ?", [mid])


def exchange(source: Store, target: Store, scope: str, rng: random.Random, *, partial: bool) -> None:
    """What a gossip runtime of ``scope`` would carry from ``source`` to ``target``."""
    batch: list[Changeset] = []
    for actor, books in source.books(scope).items():
        for start, end in books.known:
            for cs in source.changesets_for(actor, start, end):
                if actor in (target.actor_for("regional"), target.actor_for("global")):
                    continue
                if target.knows(actor, cs.version) or (partial and rng.random() < 0.3):
                    continue
                batch.extend(split_changeset(cs, rng.randint(1, 3)))
    rng.shuffle(batch)
    while batch:
        n = rng.randint(1, len(batch))
        result = target.merge(batch[:n], scope=scope)
        assert not result.rejected, result.rejected
        batch = batch[n:]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    regions=st.lists(st.integers(min_value=0, max_value=1), min_size=3, max_size=5),
    steps=st.lists(
        st.one_of(
            st.tuples(st.just("write"), st.integers(0, 4), st.lists(op, min_size=1, max_size=3)),
            st.tuples(st.just("sync"), st.integers(0, 4), st.integers(0, 4)),
        ),
        min_size=1,
        max_size=20,
    ),
    seed=st.integers(min_value=0, max_value=2**32 - 1),
)
def test_regional_changes_stay_in_their_region(
    tmp_path_factory: Any, regions: list[int], steps: list[tuple[Any, ...]], seed: int
) -> None:
    rng = random.Random(seed)
    base: Path = tmp_path_factory.mktemp("regions")
    n = len(regions)
    stores = [open_store(base / f"r{i}.db", CONV_SCHEMA) for i in range(n)]
    try:

        def sync(i: int, j: int, *, partial: bool) -> None:
            if i == j:
                return
            exchange(stores[i], stores[j], "global", rng, partial=partial)
            if regions[i] == regions[j]:
                exchange(stores[i], stores[j], "regional", rng, partial=partial)

        for s in steps:
            if s[0] == "write":
                who = s[1] % n
                stores[who].transact([op_statement(o, regions[who]) for o in s[2]])
            else:
                sync(s[1] % n, s[2] % n, partial=True)
        for _ in range(2):
            for j in range(n):
                order = list(range(n))
                rng.shuffle(order)
                for i in order:
                    sync(i, j, partial=False)

        def state(store: Store, table: str) -> tuple[object, ...]:
            return (store.rows(table), store.clock_rows(table))

        reference = state(stores[0], "apps")
        for i, store in enumerate(stores):
            assert state(store, "apps") == reference
            # Regional rows and actors of other regions never arrive.
            assert {m[1] for m in store.rows("machines")} <= {f"r{regions[i]}"}
            region_actors = {stores[k].site_id for k in range(n) if regions[k] == regions[i]}
            assert set(store.books("regional")) <= region_actors
            assert {row[-1] for row in store.clock_rows("machines")} <= region_actors
            assert set(store.books("global")) <= {s.actor_for("global") for s in stores}
            assert store.needs() == {}
            for j in range(n):
                if regions[j] == regions[i]:
                    assert state(store, "machines") == state(stores[j], "machines")
            assert store.heads("global") == {
                s.actor_for("global"): s.db_version_of("global") for s in stores if s.db_version_of("global")
            }
    finally:
        for s in stores:
            s.close()
