"""The routing table: snapshots, incremental changes, resume, bad input, host lookup and health.

The model-based property feeds random change streams (consistent with the agent's protocol) and checks that
the incremental table always equals a table built afresh from the final rows; the store test runs the real
subscriptions of ``QUERIES`` over ``schemas/platform.sql`` and checks the same against the agent's own
snapshot.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verdigris.api.wire import Change, Columns, EndOfQuery, Error, Event, Notify, Row
from verdigris.proxy.table import (
    QUERIES,
    App,
    IncidentRow,
    RoutingTable,
    _columns_of,
    make_lock,
    normalize_host,
    parse_address,
)
from verdigris.store import Statement, Store
from verdigris.store.subscriptions import ChangeEvent, SubscriptionManager
from verdigris.watchdog.rwlock import PlainRWLock, RWLock

WAIT = 10.0

PLATFORM_SQL = Path(__file__).resolve().parent.parent / "schemas" / "platform.sql"

APP = ("web", "acme", "requests", 20, 25)


def loaded(**tables: list[tuple[Any, ...]]) -> RoutingTable:
    t = RoutingTable()
    for name in QUERIES:
        assert t.load(name, tables.get(name, [])) == []
    return t


def view(
    t: RoutingTable, hosts: list[str], apps: list[str], ids: list[str], regions: list[str]
) -> dict[str, Any]:
    """Everything the table answers, over the given keys: two tables are equal when their views are."""
    return {
        "apps": {a: t.app(a) for a in apps},
        "hosts": {h: t.app_for_host(h) for h in hosts},
        "instances": {i: t.instance(i) for i in ids},
        "healthy": {
            i: (inst is not None and t.is_healthy(inst)) for i in ids if (inst := t.instance(i)) or True
        },
        "reasons": {i: t.unhealthy_reason(inst) for i in ids if (inst := t.instance(i)) is not None},
        "checks": {i: dict(t.checks(i)) for i in ids},
        "regions": {a: t.regions(a) for a in apps},
        "placement": {(a, r): sorted(i.id for i in t.instances(a, r)) for a in apps for r in regions},
        "healthy_index": {
            (a, r): sorted(i.id for i in t.healthy_instances(a, r)) for a in apps for r in regions
        },
        "all": {a: sorted(i.id for i in t.instances(a)) for a in apps},
        "services": {a: dict(t.services(a)) for a in apps},
        "proxies": {r: sorted(p.id for p in t.proxies(r)) for r in regions},
        "distances": {r: dict(t.distances(r)) for r in regions},
        "counts": t.counts(),
    }


# ------------------------------------------------------------------------------------------------ basics


def test_queries_columns_match_required() -> None:
    assert _columns_of(QUERIES["machines"]) == ["id", "app", "region", "state", "address"]
    t = RoutingTable()
    assert set(t.subscriptions) == set(QUERIES)
    assert not t.ready
    for name in QUERIES:
        t.load(name, [])
    assert t.ready


def test_host_lookup_exact_wildcard_longest() -> None:
    t = loaded(
        apps=[("a", "o", "requests", 1, 2), ("b", "o", "requests", 1, 2), ("c", "o", "requests", 1, 2)],
        hostnames=[
            ("example.com", "a"),
            ("*.example.com", "b"),
            ("*.deep.example.com", "c"),
            ("exact.deep.example.com", "a"),
            ("Upper.Example.ORG.", "c"),
        ],
    )
    assert t.app_for_host("example.com") == "a"
    assert t.app_for_host("EXAMPLE.com:8080") == "a"
    assert t.app_for_host("example.com.") == "a"
    assert t.app_for_host("x.example.com") == "b"
    assert t.app_for_host("x.y.example.com") == "b"  # any depth
    assert t.app_for_host("x.deep.example.com") == "c"  # the longest wildcard wins
    assert t.app_for_host("deep.example.com") == "b"  # *.deep... does not match deep... itself
    assert t.app_for_host("exact.deep.example.com") == "a"  # exact beats every wildcard
    assert t.app_for_host("upper.example.org") == "c"  # stored names are normalised too
    assert t.app_for_host("example.net") is None
    assert t.app_for_host("notexample.com") is None
    for bad in (
        "",
        " ",
        "exa mple.com",
        "example.com:http",
        "[::1",
        "a..b",
        "-a.com",
        "a.com:123456",
        "é.com",
    ):
        assert t.app_for_host(bad) is None, bad


def test_normalize_host_and_address() -> None:
    assert normalize_host(" Example.COM:443 ") == "example.com"
    assert normalize_host("[::1]:8080") == "[::1]"
    assert normalize_host("[::1]") == "[::1]"
    assert normalize_host("[::1]x") is None
    assert normalize_host("[zz]") is None
    assert normalize_host("10.0.0.1:80") == "10.0.0.1"
    assert parse_address("10.0.0.1:8080") == ("10.0.0.1", 8080)
    assert parse_address("[fdaa::3]:80") == ("fdaa::3", 80)
    assert parse_address("app.internal:1") == ("app.internal", 1)
    for bad in (
        None,
        "",
        "host",
        "host:",
        "host:0",
        "host:70000",
        ":80",
        "fdaa::3:80",
        "[fdaa::3]80",
        "a b:80",
    ):
        assert parse_address(bad) is None, bad


def test_health_from_state_address_and_checks() -> None:
    t = loaded(
        apps=[APP],
        machines=[
            ("m1", "web", "ams", "started", "10.0.0.1:80"),
            ("m2", "web", "ams", "started", "10.0.0.2:80"),
            ("m3", "web", "ams", "stopped", "10.0.0.3:80"),
            ("m4", "web", "ams", "started", None),
        ],
        checks=[("m2", "http", "passing"), ("m2", "tcp", "critical"), ("m1", "x", "passing")],
    )
    healthy = {i.id: t.is_healthy(i) for i in t.instances("web")}
    assert healthy == {"m1": True, "m2": False, "m3": False, "m4": False}
    assert "failing checks: tcp" in (t.unhealthy_reason(t.instance("m2")) or "")  # type: ignore[arg-type]
    assert "stopped" in (t.unhealthy_reason(t.instance("m3")) or "")  # type: ignore[arg-type]
    assert "address" in (t.unhealthy_reason(t.instance("m4")) or "")  # type: ignore[arg-type]
    # The failing check recovers: a change event on the checks subscription (row 2 is m2/tcp).
    assert t.feed("checks", Change("update", 2, ["m2", "tcp", "passing"], 1)) is None
    assert t.is_healthy(t.instance("m2"))  # type: ignore[arg-type]
    assert t.feed("checks", Change("update", 2, ["m2", "tcp", "warning"], 2)) is None
    assert not t.is_healthy(t.instance("m2"))  # type: ignore[arg-type]  # warning is not passing
    assert t.feed("checks", Change("delete", 2, ["m2", "tcp", "warning"], 3)) is None
    assert t.is_healthy(t.instance("m2"))  # type: ignore[arg-type]  # no failing check left
    assert t.counts()["failing_instances"] == 0


def test_incremental_changes_and_placement() -> None:
    t = loaded(apps=[APP], machines=[("m1", "web", "ams", "started", "h:1")], app_regions=[("web", "iad")])
    assert t.regions("web") == {"ams", "iad"}
    v0 = t.version
    assert t.feed("machines", Change("insert", 2, ["m2", "web", "fra", "started", "h:2"], 1)) is None
    assert t.feed("machines", Change("update", 1, ["m1", "web", "ams", "stopping", "h:1"], 2)) is None
    assert t.version == v0 + 2
    assert [i.id for i in t.instances("web", "fra")] == ["m2"]
    assert t.instance("m1").state == "stopping"  # type: ignore[union-attr]
    assert t.feed("machines", Change("delete", 2, ["m2", "web", "fra", "started", "h:2"], 3)) is None
    assert t.instance("m2") is None and t.regions("web") == {"ams", "iad"}
    assert t.feed("app_regions", Change("delete", 1, ["web", "iad"], 1)) is None
    assert t.regions("web") == {"ams"}
    # An update that moves a machine to another app/region moves it in the index.
    assert t.feed("machines", Change("update", 1, ["m1", "api", "syd", "started", "h:1"], 4)) is None
    assert list(t.instances("web")) == [] and [i.id for i in t.instances("api", "syd")] == ["m1"]


def test_resume_duplicates_and_gaps() -> None:
    t = loaded(apps=[APP])
    t.attached("apps", "q-1")
    assert t.resume_point("apps") == ("q-1", 0)
    assert t.feed("apps", Change("insert", 2, ["api", "acme", "connections", 1, 2], 1)) is None
    assert t.resume_point("apps") == ("q-1", 1)
    # A resume replays what was already applied: ignored.
    assert t.feed("apps", Change("delete", 2, ["api", "acme", "connections", 1, 2], 1)) is None
    assert t.app("api") is not None and t.stats.duplicates == 1
    # A gap is never applied silently.
    p = t.feed("apps", Change("delete", 2, ["api", "acme", "connections", 1, 2], 3))
    assert p is not None and p.kind == "gap" and p.resubscribe
    assert t.app("api") is not None and t.resume_point("apps") == ("q-1", 1)
    assert t.resume_point("nope") == (None, None)
    assert RoutingTable().resume_point("apps") == (None, None)  # nothing to resume before a snapshot


def test_resubscription_keeps_serving_until_its_snapshot_is_complete() -> None:
    t = loaded(apps=[APP], hostnames=[("web.example.com", "web")])
    assert t.feed("hostnames", Columns(["hostname", "app"])) is None
    assert t.feed("hostnames", Row(1, ["new.example.com", "web"])) is None
    assert t.app_for_host("web.example.com") == "web"  # the old table still serves
    assert t.app_for_host("new.example.com") is None
    assert t.feed("hostnames", EndOfQuery(0.1, 40)) is None
    assert t.app_for_host("web.example.com") is None
    assert t.app_for_host("new.example.com") == "web"
    assert t.resume_point("hostnames")[1] == 40
    # An error event mid-snapshot abandons the staged rows and keeps the table.
    t.feed("hostnames", Columns(["hostname", "app"]))
    p = t.feed("hostnames", Error("agent shutting down"))
    assert p is not None and p.kind == "stream_error" and p.resubscribe
    assert t.app_for_host("new.example.com") == "web"
    p = t.feed("hostnames", Row(1, ["x.example.com", "web"]))
    assert p is not None and p.kind == "protocol"


def test_protocol_errors_are_reported_not_raised() -> None:
    t = RoutingTable()
    p = t.feed("machines", Change("insert", 1, ["m1", "web", "ams", "started", "h:1"], 1))
    assert p is not None and p.kind == "protocol" and p.resubscribe
    p = t.feed("machines", EndOfQuery(0.0, 1))
    assert p is not None and p.kind == "protocol"
    p = t.feed("machines", Notify("update", ["m1"]))
    assert p is not None and p.kind == "protocol"
    p = t.feed("nope", Columns(["x"]))
    assert p is not None and p.kind == "unknown_subscription"
    p = t.feed("machines", Columns(["id", "app"]))  # an agent with an older schema
    assert p is not None and "region" in p.message and not t.ready
    # A change during a snapshot is out of protocol.
    t.feed("apps", Columns(list(_columns_of(QUERIES["apps"]))))
    p = t.feed("apps", Change("insert", 1, list(APP), 1))
    assert p is not None and p.kind == "protocol"
    assert t.stats.protocol_errors >= 5 and len(t.problems) >= 5


def test_bad_rows_are_counted_and_can_be_fixed() -> None:
    t = loaded(apps=[APP])
    t.load("machines", [])
    p = t.feed("machines", Change("insert", 1, ["m1", "web", 7, "started", "h:1"], 1))
    assert p is not None and p.kind == "bad_row" and not p.resubscribe
    assert t.instance("m1") is None and t.stats.bad_rows == 1
    assert t.feed("machines", Change("update", 1, ["m1", "web", "ams", "started", "h:1"], 2)) is None
    assert t.instance("m1") is not None
    p = t.feed("machines", Change("update", 1, ["m1", "web"], 3))  # too few values
    assert p is not None and p.kind == "bad_row" and t.instance("m1") is None
    assert t.feed("machines", Change("delete", 1, ["m1", "web"], 4)) is None
    problems = t.load("hostnames", [("", "web"), ("*.", "web"), ("a b", "web"), ("ok.com", "")])
    assert [p.kind for p in problems] == ["bad_row"] * 4
    assert t.counts()["hostnames"] == 0


def test_out_of_domain_values_fall_back_with_a_warning() -> None:
    t = RoutingTable()
    problems = t.load("apps", [("web", "acme", "sessions", -1, 5), ("api", "acme", "connections", 0, 0)])
    assert [p.kind for p in problems] == ["coerced"]
    assert "sessions" in problems[0].message
    assert t.app("web") == App("web", "acme", "requests", 0, 5)
    assert t.app("api") == App("api", "acme", "connections", 0, 0)


def test_services() -> None:
    t = loaded(services=[("web", 443, "tcp", "tls, http", 8080, 1), ("web", 80, "tcp", "http", 0, 0)])
    s = t.services("web")
    assert s[443].handlers == ("tls", "http") and s[443].internal_port == 8080 and s[443].force_https
    assert s[80].handlers == ("http",) and not s[80].force_https
    assert t.feed("services", Change("delete", 1, ["web", 443, "tcp", "tls, http", 8080, 1], 1)) is None
    assert list(t.services("web")) == [80]


# ------------------------------------------------------------------------------------------------ model property

APPS_D = ["a", "b", "c"]
IDS_D = ["m1", "m2", "m3", "m4"]
REGIONS_D = ["ams", "fra", "iad"]
HOSTS_D = ["x.com", "*.x.com", "y.x.com", "*.y.x.com", "z.y.x.com", "q.org"]
QUERY_HOSTS = [*HOSTS_D, "w.x.com", "w.y.x.com", "x.com:80", "Z.Y.X.COM", "org", "other"]

text_or_bad = st.one_of(st.sampled_from(APPS_D), st.integers(0, 2), st.none())
ROW_STRATEGIES: dict[str, Any] = {
    "apps": st.tuples(
        st.sampled_from(APPS_D),
        st.sampled_from(["o1", "o2"]),
        st.sampled_from(["requests", "connections", "bogus"]),
        st.integers(-1, 3),
        st.one_of(st.integers(0, 4), st.text(max_size=2)),
    ),
    "hostnames": st.tuples(st.sampled_from(HOSTS_D), text_or_bad),
    "app_regions": st.tuples(st.sampled_from(APPS_D), st.sampled_from(REGIONS_D)),
    "machines": st.tuples(
        st.sampled_from(IDS_D),
        st.sampled_from(APPS_D),
        st.one_of(st.sampled_from(REGIONS_D), st.just(3)),
        st.sampled_from(["created", "started", "stopped"]),
        st.sampled_from([None, "10.0.0.1:80", "bad"]),
    ),
    "services": st.tuples(
        st.sampled_from(APPS_D),
        st.sampled_from([80, 443]),
        st.just("tcp"),
        st.sampled_from(["http", "tls,http"]),
        st.integers(0, 2),
        st.integers(0, 1),
    ),
    "checks": st.tuples(
        st.sampled_from(IDS_D),
        st.sampled_from(["http", "tcp"]),
        st.sampled_from(["passing", "warning", "critical"]),
    ),
    "proxies": st.tuples(
        st.sampled_from(["p1", "p2", ""]),
        st.sampled_from(REGIONS_D),
        st.sampled_from(["10.0.0.1:8000", "bad", "[::1]:8000"]),
    ),
    "region_rtt": st.tuples(
        st.sampled_from(REGIONS_D),
        st.sampled_from(REGIONS_D),
        st.one_of(st.integers(-1, 50), st.floats(0, 100), st.just("x")),
    ),
}
PK_LEN = {
    "apps": 1,
    "hostnames": 1,
    "app_regions": 2,
    "machines": 1,
    "services": 2,
    "checks": 2,
    "proxies": 1,
    "region_rtt": 2,
}


@st.composite
def change_streams(draw: st.DrawFn) -> list[tuple[str, tuple[Any, ...], bool]]:
    """(table, values, delete?) operations."""
    ops = []
    for _ in range(draw(st.integers(0, 60))):
        name = draw(st.sampled_from(list(QUERIES)))
        ops.append((name, draw(ROW_STRATEGIES[name]), draw(st.booleans()) and draw(st.booleans())))
    return ops


class Model:
    """What the agent does: rows keyed by primary key, stable row ids, change ids +1 per change."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[tuple[Any, ...], tuple[int, tuple[Any, ...]]]] = {n: {} for n in QUERIES}
        self.next_rowid = dict.fromkeys(QUERIES, 1)
        self.change_id = dict.fromkeys(QUERIES, 0)

    def apply(self, name: str, values: tuple[Any, ...], delete: bool) -> Event | None:
        pk = values[: PK_LEN[name]]
        rows = self.rows[name]
        if delete:
            if pk not in rows:
                return None
            rowid, old = rows.pop(pk)
            self.change_id[name] += 1
            return Change("delete", rowid, list(old), self.change_id[name])
        self.change_id[name] += 1
        if pk in rows:
            rowid = rows[pk][0]
            rows[pk] = (rowid, values)
            return Change("update", rowid, list(values), self.change_id[name])
        rowid = self.next_rowid[name]
        self.next_rowid[name] += 1
        rows[pk] = (rowid, values)
        return Change("insert", rowid, list(values), self.change_id[name])

    def fresh(self) -> RoutingTable:
        t = RoutingTable()
        for name, rows in self.rows.items():
            t.feed(name, Columns(_columns_of(QUERIES[name])))
            for rowid, values in sorted(rows.values()):
                t.feed(name, Row(rowid, list(values)))
            t.feed(name, EndOfQuery(0.0, self.change_id[name]))
        return t


@settings(max_examples=300, deadline=None)
@given(before=change_streams(), after=change_streams())
def test_incremental_equals_fresh_snapshot(
    before: list[tuple[str, tuple[Any, ...], bool]], after: list[tuple[str, tuple[Any, ...], bool]]
) -> None:
    model = Model()
    for op in before:
        model.apply(*op)
    table = model.fresh()  # subscribed after `before`
    for op in after:
        event = model.apply(*op)
        if event is not None:
            p = table.feed(op[0], event)
            assert p is None or p.kind in ("bad_row", "coerced")
    expected = model.fresh()
    for a in APPS_D:  # the maintained healthy set is exactly what is_healthy says
        for r in REGIONS_D:
            want = sorted(i.id for i in table.instances(a, r) if table.is_healthy(i))
            assert sorted(i.id for i in table.healthy_instances(a, r)) == want
    assert view(table, QUERY_HOSTS, APPS_D, IDS_D, REGIONS_D) == view(
        expected, QUERY_HOSTS, APPS_D, IDS_D, REGIONS_D
    )
    for name in QUERIES:
        assert table.resume_point(name)[1] == model.change_id[name]


sql_values = st.one_of(
    st.none(), st.integers(-(2**63), 2**63 - 1), st.floats(), st.text(max_size=8), st.binary(max_size=4)
)
events = st.one_of(
    st.builds(
        Columns,
        st.lists(st.sampled_from(["id", "app", "region", "state", "address", "name", "x"]), max_size=7),
    ),
    st.builds(Row, st.integers(-2, 5), st.lists(sql_values, max_size=7)),
    st.builds(EndOfQuery, st.floats(0, 1), st.one_of(st.none(), st.integers(-1, 10))),
    st.builds(
        Change,
        st.sampled_from(["insert", "update", "delete"]),
        st.integers(-2, 5),
        st.lists(sql_values, max_size=7),
        st.integers(-1, 12),
    ),
    st.builds(Notify, st.sampled_from(["update", "delete"]), st.lists(sql_values, max_size=2)),
    st.builds(Error, st.text(max_size=10)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([*QUERIES, "bogus"]), events), max_size=40))
def test_feed_never_raises(stream: list[tuple[str, Event]]) -> None:
    t = RoutingTable()
    for name, event in stream:
        t.feed(name, event)
    counts = t.counts()
    assert counts["failing_instances"] <= counts["checks"]
    for app in APPS_D:
        t.app_for_host(f"{app}.x.com")
        for inst in t.instances(app):
            t.is_healthy(inst)


# ------------------------------------------------------------------------------------------------ real agent


@pytest.fixture
def platform_store(tmp_path: Path) -> Iterator[tuple[Store, SubscriptionManager]]:
    store = Store(tmp_path / "db.sqlite", schema_sql=PLATFORM_SQL.read_text())
    manager = SubscriptionManager(store, tmp_path / "subs")
    yield store, manager
    manager.close()
    store.close()


def test_queries_are_incremental_on_the_platform_schema(
    platform_store: tuple[Store, SubscriptionManager],
) -> None:
    """Every query is accepted by the agent and maintained by primary-key lookups (no table scans)."""
    _, manager = platform_store
    for sql in QUERIES.values():
        sub, _ = manager.subscribe(sql)
        assert sub.scan_warnings == [], (sql, sub.scan_warnings)


@pytest.mark.parametrize("seed", range(4))
def test_table_follows_a_real_agent_subscription(
    platform_store: tuple[Store, SubscriptionManager], seed: int
) -> None:
    store, manager = platform_store
    rng = random.Random(seed)

    def write() -> None:
        stmts = []
        for _ in range(rng.randint(1, 4)):
            m = rng.choice(IDS_D)
            match rng.randrange(7):
                case 0:
                    stmts.append(
                        Statement(
                            "INSERT OR REPLACE INTO apps (name, org, concurrency, soft_limit, hard_limit) VALUES (?, 'o', ?, ?, ?)",
                            [rng.choice(APPS_D), rng.choice(["requests", "connections"]), rng.randint(0, 3), rng.randint(0, 5)],
                        )
                    )  # fmt: skip
                case 1:
                    stmts.append(
                        Statement(
                            "INSERT OR REPLACE INTO hostnames (hostname, app) VALUES (?, ?)",
                            [rng.choice(HOSTS_D), rng.choice(APPS_D)],
                        )
                    )
                case 2:
                    stmts.append(
                        Statement(
                            "INSERT OR REPLACE INTO machines (id, app, region, state, address) VALUES (?, ?, ?, ?, ?)",
                            [m, rng.choice(APPS_D), rng.choice(REGIONS_D), rng.choice(["started", "stopped"]), f"10.0.0.{rng.randint(1, 9)}:80"],
                        )
                    )  # fmt: skip
                case 3:
                    stmts.append(
                        Statement(
                            "INSERT OR REPLACE INTO checks (machine, name, status) VALUES (?, ?, ?)",
                            [m, rng.choice(["http", "tcp"]), rng.choice(["passing", "critical"])],
                        )
                    )
                case 4:
                    stmts.append(Statement("DELETE FROM checks WHERE machine = ?", [m]))
                case 5:
                    stmts.append(Statement("DELETE FROM machines WHERE id = ?", [m]))
                case 6:
                    stmts.append(
                        Statement(
                            "INSERT OR REPLACE INTO app_regions (app, region) VALUES (?, ?)",
                            [rng.choice(APPS_D), rng.choice(REGIONS_D)],
                        )
                    )
        store.transact(stmts)

    for _ in range(10):
        write()
    table = RoutingTable()
    queues: dict[str, list[ChangeEvent]] = {}
    snapshot_ids: dict[str, int] = {}
    for name, sql in QUERIES.items():
        sub, _ = manager.subscribe(sql)
        queue: list[ChangeEvent] = []
        sub.add_listener(queue.extend)  # listen first, then snapshot (the protocol of Subscription)
        rows, cid = sub.snapshot()
        table.attached(name, sub.id)
        assert table.feed(name, Columns(sub.columns)) is None
        for rowid, values in rows:
            assert table.feed(name, Row(rowid, list(values))) is None
        assert table.feed(name, EndOfQuery(0.0, cid)) is None
        queues[name], snapshot_ids[name] = queue, cid
    assert table.ready
    for _ in range(40):
        write()
    assert manager.flush()
    for name, queue in queues.items():
        for e in queue:
            if e.change_id > snapshot_ids[name]:
                assert table.feed(name, Change(e.kind, e.rowid, list(e.values), e.change_id)) is None
    fresh = RoutingTable()
    for name, sql in QUERIES.items():
        sub, _ = manager.subscribe(sql)
        rows, cid = sub.snapshot()
        fresh.feed(name, Columns(sub.columns))
        for rowid, values in rows:
            fresh.feed(name, Row(rowid, list(values)))
        fresh.feed(name, EndOfQuery(0.0, cid))
        assert table.resume_point(name) == (sub.id, cid)
    assert view(table, QUERY_HOSTS, APPS_D, IDS_D, REGIONS_D) == view(
        fresh, QUERY_HOSTS, APPS_D, IDS_D, REGIONS_D
    )
    # And against the database itself: healthy = started and no check other than passing.
    reader = store.open_reader()
    try:
        expected = {
            r[0]: bool(r[1])
            for r in reader.execute(
                "SELECT id, state = 'started' AND NOT EXISTS "
                "(SELECT 1 FROM checks c WHERE c.machine = m.id AND c.status != 'passing') FROM machines m"
            )
        }
    finally:
        reader.close()
    got = {i: table.is_healthy(inst) for i in IDS_D if (inst := table.instance(i)) is not None}
    assert got == expected


def test_host_answers_follow_changes_despite_the_memo() -> None:
    t = loaded(apps=[APP], hostnames=[("a.example.com", "web")])
    assert t.app_for_host("a.example.com") == "web" and t.app_for_host("b.example.com") is None
    assert t.feed("hostnames", Change("insert", 2, ["*.example.com", "api"], 1)) is None
    assert t.app_for_host("b.example.com") == "api"  # a cached miss is forgotten on change
    assert t.feed("hostnames", Change("delete", 1, ["a.example.com", "web"], 2)) is None
    assert t.app_for_host("a.example.com") == "api"  # the wildcard now answers
    for i in range(5000):  # the memo is bounded
        t.app_for_host(f"h{i}.example.com")
    assert len(t._host_cache) <= 4096


# ------------------------------------------------------------------------------------------------ lock, incident


class RecordingLock:
    """The project's lock, recording which side each use took (to show who takes what)."""

    def __init__(self) -> None:
        self.inner = RWLock("recorded")
        self.taken: list[str] = []

    def read(self) -> contextlib.AbstractContextManager[None]:
        self.taken.append("read")
        return self.inner.read()

    def write(self) -> contextlib.AbstractContextManager[None]:
        self.taken.append("write")
        return self.inner.write()


def incident_table(lock: Any = None) -> RoutingTable:
    t = RoutingTable(lock=lock, incident_row=IncidentRow.parse("apps:trigger"))
    for name in QUERIES:  # the trigger row in a snapshot is loaded like any row: a restarted worker lives
        rows = [APP, ("trigger", "acme", "requests", 1, 2)] if name == "apps" else []
        assert t.load(name, rows) == []
    return t


def test_feed_takes_the_write_side_and_make_lock() -> None:
    lock = RecordingLock()
    t = RoutingTable(lock=lock)
    t.load("apps", [APP])
    assert lock.taken == ["write"] * 3  # columns, one row, end of query
    assert isinstance(make_lock("project"), RWLock) and isinstance(make_lock("plain"), PlainRWLock)
    assert isinstance(RoutingTable().lock, RWLock)  # the project's lock by default
    with pytest.raises(ValueError, match="expected 'project' or 'plain'"):
        make_lock("spin")


def test_incident_with_the_project_lock_is_refused_and_the_stream_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    t = incident_table()
    assert t.app("trigger") is not None  # loaded from the snapshot
    with caplog.at_level(logging.ERROR, logger="verdigris.proxy.table"):
        p = t.feed("apps", Change("update", 2, ["trigger", "acme", "requests", 5, 6], 1))
    assert p is not None and p.kind == "refused" and not p.resubscribe, p
    assert t.stats.apply_refused == 1 and t.app("trigger") == App("trigger", "acme", "requests", 1, 2)
    assert t.resume_point("apps")[1] == 1  # the change id is consumed: the next change is no gap
    [record] = [r for r in caplog.records if r.getMessage().startswith("table_apply_refused ")]
    message = record.getMessage()
    assert 'row="apps:trigger"' in message and "error_type=LockUpgradeError" in message
    error = json.loads(message.split(" error=", 1)[1])
    assert "Read side taken at:" in error and "in _feed_incident" in error and "in _apply_under_read" in error
    # other rows apply, and the lock is free again (a write from another thread gets it at once)
    assert t.feed("apps", Change("insert", 3, ["api", "acme", "requests", 0, 0], 2)) is None
    assert t.app("api") is not None and t.stats.gaps == 0
    p = t.feed("apps", Change("delete", 2, ["trigger", "acme", "requests", 1, 2], 3))
    assert p is not None and p.kind == "refused" and t.app("trigger") is not None
    done = threading.Event()

    def writer() -> None:
        with t.lock.write():
            done.set()

    threading.Thread(target=writer).start()
    assert done.wait(WAIT)
    # another app's row, and the trigger's key in another table, are not the incident
    assert IncidentRow.parse("apps:trigger").matches({"name": 0}, ["trigger"])
    assert not IncidentRow.parse("apps:trigger").matches({"name": 0}, ["other"])
    assert IncidentRow.parse("services:web/80").matches({"app": 0, "port": 1}, ["web", 80])
    assert not IncidentRow.parse("services:web/80").matches({"app": 0}, ["web"])  # no such column


def test_incident_with_the_plain_lock_blocks_the_applying_thread() -> None:
    lock = PlainRWLock("table")
    t = incident_table(lock)
    applied = threading.Event()

    def apply() -> None:
        t.feed("apps", Change("update", 2, ["trigger", "acme", "requests", 5, 6], 1))
        applied.set()

    thread = threading.Thread(target=apply, daemon=True)
    thread.start()
    # a bounded observation: the thread waits for itself (readers == 1, its own) and never gets on
    assert not applied.wait(0.5) and thread.is_alive()
    assert "1 reader(s)" in repr(lock)
    # let it go (the test's own cleanup: drop the reader it waits for, as nothing in the lock can)
    with lock._cond:
        lock._readers -= 1
        lock._cond.notify_all()
    assert applied.wait(WAIT)
    thread.join(WAIT)
    assert t.app("trigger") == App("trigger", "acme", "requests", 5, 6)  # the plain lock applied it
