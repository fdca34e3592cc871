"""The presence publisher (src/verdigris/presence.py, docs/regions.md "Coarse global state").

Unit tests of the pure parts (buckets, desired state, diff → statements, designated writer, takeover
timing with an injected clock), the publisher against a real store with fake runtimes (guarded writes,
designated vs takeover, settling), and an end-to-end test with four real agents in two regions: the
first started instance of an app makes one ``app_regions`` row everywhere; check flaps and other machine
columns make no global version; bucket crossings write once; the last stop deletes the row; and
``region_rtt`` rows appear both ways. Gone regions: the cleanup of a region without alive global members
(grace, global designated writer, takeover, return) with fake runtimes, and with two real agents (one
per region; one is killed, its rows disappear at the other, and come back when it restarts).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from test_cluster import until
from test_regions import GLOBAL_CLUSTER_ID, PLATFORM_SQL, RegionNode, _admin_up, region_cluster
from verdigris.api.threads import StoreThreads
from verdigris.config import ConfigError, PresenceConfig, parse_config
from verdigris.gossip.membership import MemberInfo, MemberState
from verdigris.presence import (
    MismatchTracker,
    PresencePublisher,
    Write,
    capacity_bucket,
    designated_writer,
    desired_app_regions,
    desired_region_rtt,
    diff,
    gone_regions,
    keep_rtt_bucket,
    rtt_bucket_ms,
    statements,
)
from verdigris.store.store import Store
from verdigris.store.types import Statement

# ------------------------------------------------------------------------------------------------ pure


def test_capacity_bucket_is_the_count_rounded_down_to_a_power_of_two() -> None:
    expected = {0: 0, -1: 0, 1: 1, 2: 2, 3: 2, 4: 4, 7: 4, 8: 8, 15: 8, 16: 16, 1000: 512}
    assert {n: capacity_bucket(n) for n in expected} == expected


def test_rtt_bucket_rounds_up_to_the_1_2_5_series() -> None:
    cases = {
        0.0: 1,
        0.0001: 1,
        0.001: 1,
        0.0011: 2,
        0.002: 2,
        0.0021: 5,
        0.007: 10,
        0.0101: 20,
        0.049: 50,
        0.051: 100,
        0.150: 200,
        0.499: 500,
        0.9: 1000,
        1.5: 2000,
        3.0: 5000,
        float("nan"): 1,
    }
    assert {s: rtt_bucket_ms(s) for s in cases} == cases


def test_rtt_bucket_has_hysteresis() -> None:
    assert keep_rtt_bucket(None, 0.0013) == 2
    assert keep_rtt_bucket(1, 0.0011) == 1  # just above 1 ms: 1 is kept (up to 1.2 ms)
    assert keep_rtt_bucket(1, 0.0013) == 2
    assert keep_rtt_bucket(2, 0.0009) == 2  # down to 0.8 ms (80 % of the bucket below)
    assert keep_rtt_bucket(2, 0.0007) == 1
    assert keep_rtt_bucket(50, 0.059) == 50 and keep_rtt_bucket(50, 0.061) == 100
    assert keep_rtt_bucket(50, 0.017) == 50 and keep_rtt_bucket(50, 0.015) == 20
    assert keep_rtt_bucket(5, 0.3) == 500  # far away: the new bucket at once
    assert keep_rtt_bucket(3.0, 0.0031) == 5  # not a bucket: replaced
    assert keep_rtt_bucket(0, 0.0001) == 1
    members = [_member("1", region="b", rtt=0.0011)]
    assert desired_region_rtt("a", members, {"b": 1.0}) == {"b": 1}
    assert desired_region_rtt("a", members) == {"b": 2}


def _member(
    mid: str, state: MemberState = MemberState.ALIVE, region: str = "", rtt: float | None = None
) -> MemberInfo:
    return MemberInfo(
        id=mid,
        addr=("127.0.0.1", 1),  # type: ignore[arg-type]
        state=state,
        incarnation=1,
        metadata={"region": region},
        rtt=rtt,
        last_seen=None,
    )


def test_desired_state() -> None:
    assert desired_app_regions({"web": 3, "api": 1, "idle": 0}) == {"web": 2, "api": 1}
    members = [
        _member("1", region="b", rtt=0.004),
        _member("2", region="b", rtt=0.030),
        _member("3", region="b", rtt=0.011),  # median of b: 11 ms -> 20
        _member("4", MemberState.DEAD, region="c", rtt=0.001),  # not alive: c unknown
        _member("5", region="c", rtt=None),  # not probed yet
        _member("6", region="a", rtt=0.5),  # own region
        _member("7", region="", rtt=0.5),  # no region
        _member("8", MemberState.SUSPECT, region="d", rtt=0.001),
    ]
    assert desired_region_rtt("a", members) == {"b": 20}


def test_diff_and_statements() -> None:
    writes = diff("app_regions", {"web": 2, "api": 1, "same": 4}, {"web": 1, "same": 4.0, "gone": 1})
    assert writes == [
        Write("app_regions", "api", 1),
        Write("app_regions", "gone", None),
        Write("app_regions", "web", 2),
    ]
    assert diff("app_regions", {"x": 1}, {"x": 1}) == []
    assert diff("region_rtt", {"b": 5}, {"b": 5.0}) == []  # a REAL column compares equal
    stmts = statements("ams", [*writes, Write("region_rtt", "b", 5)], 1234)
    assert [s.params for s in stmts] == [
        ["api", "ams", 1, 1234],
        ["gone", "ams"],
        ["web", "ams", 2, 1234],
        ["ams", "b", 5, 1234],
    ]
    assert stmts[1].sql.startswith("DELETE FROM app_regions")
    assert "WHERE capacity IS NOT excluded.capacity" in stmts[0].sql
    assert "WHERE rtt_ms IS NOT excluded.rtt_ms" in stmts[3].sql
    with pytest.raises(ValueError):
        statements("ams", [Write("machines", "x", 1)], 0)


def test_designated_writer_is_the_smallest_alive_id() -> None:
    assert designated_writer("b", []) == "b"
    assert designated_writer("b", [_member("c"), _member("a")]) == "a"
    assert designated_writer("b", [_member("a", MemberState.DEAD), _member("c")]) == "b"
    assert designated_writer("b", [_member("a", MemberState.SUSPECT)]) == "b"
    assert designated_writer("b", [_member("a", MemberState.LEFT), _member("0")]) == "0"


def test_takeover_waits_for_a_mismatch_to_last_the_delay() -> None:
    t = MismatchTracker(10.0)
    assert t.next_deadline() is None and t.due(0.0) == set()
    x, y = ("app_regions", "x"), ("app_regions", "y")
    t.update([x], 100.0)
    assert t.next_deadline() == 110.0 and t.due(109.9) == set()
    t.update([x, y], 105.0)  # x keeps its start; y starts now
    assert t.due(110.0) == {x} and t.due(115.0) == {x, y}
    t.update([y], 111.0)  # x matched again: forgotten
    assert t.due(200.0) == {y} and len(t) == 1
    t.update([x, y], 120.0)  # x mismatches again: a new wait
    assert t.due(125.0) == {y} and t.due(130.0) == {x, y}
    t.update([], 131.0)
    assert t.next_deadline() is None and len(t) == 0


def test_presence_config() -> None:
    base = '[db]\npath = "/srv/vd/state.db"\n'
    cfg = parse_config(base, "agent.toml", Path("/srv"))
    assert cfg.presence == PresenceConfig() and cfg.presence.takeover_delay_ms == 10000
    assert cfg.presence.gone_region_after_ms == 60000
    cfg = parse_config(base + "[presence]\ngone-region-after-ms = 2000\n", "agent.toml", Path("/srv"))
    assert cfg.presence.gone_region_after_ms == 2000
    cfg = parse_config(
        base + "[presence]\nenabled = false\ndebounce-ms = 0\ninterval-ms = 100\ntakeover-delay-ms = 0\n",
        "agent.toml",
        Path("/srv"),
    )
    assert cfg.presence == PresenceConfig(False, 0, 100, 0)
    with pytest.raises(ConfigError) as info:
        parse_config(
            base + '[presence]\nenabled = "yes"\ninterval-ms = 10\ndebounce-ms = -1\ntakeover = 1\n'
            "gone-region-after-ms = 10\n",
            "agent.toml",
            Path("/srv"),
        )
    problems = "\n".join(info.value.problems)
    assert 'wrong type for "presence.enabled"' in problems
    assert 'invalid value for "presence.interval-ms"' in problems
    assert 'invalid value for "presence.debounce-ms"' in problems
    assert 'unknown key "presence.takeover"' in problems
    assert 'invalid value for "presence.gone-region-after-ms"' in problems


def test_gone_regions_have_rows_and_no_alive_or_suspect_global_member() -> None:
    members = [
        _member("1", region="b"),
        _member("2", MemberState.SUSPECT, region="c"),
        _member("3", MemberState.DEAD, region="d"),
        _member("4", MemberState.LEFT, region="e"),
        _member("5", MemberState.DEAD, region="b"),  # b has another member alive
    ]
    stored = ["a", "b", "c", "d", "e", "f", ""]
    # a is this node's own region; f has no member at all; the empty region name is nobody's.
    assert gone_regions("a", stored, members) == {"d", "e", "f"}
    assert gone_regions("a", [], members) == set()


# ------------------------------------------------------------------------------------------------ in process


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class _FakeMembership:
    others: list[MemberInfo] = field(default_factory=list)

    def members(self) -> list[MemberInfo]:
        return self.others


@dataclass
class _FakeStats:
    sessions: dict[tuple[str, str], int] = field(default_factory=dict)


@dataclass
class _FakeRuntime:
    node_id: str
    membership: _FakeMembership = field(default_factory=_FakeMembership)
    stats: _FakeStats = field(default_factory=_FakeStats)


@pytest.fixture
def local_store(tmp_path: Path) -> Iterator[tuple[Store, StoreThreads]]:
    writer = ThreadPoolExecutor(max_workers=1)
    store = writer.submit(Store, tmp_path / "state.db", [PLATFORM_SQL]).result()
    threads = StoreThreads(store, writer=writer, readers=1)
    try:
        yield store, threads
    finally:
        threads.close()
        writer.submit(store.close).result()
        writer.shutdown()


async def _global_version(store: Store, threads: StoreThreads) -> int:
    return await threads.write(store.db_version_of, "global")


async def test_publisher_writes_only_differences_and_takes_over_after_the_delay(
    local_store: tuple[Store, StoreThreads],
) -> None:
    store, threads = local_store
    clock = _Clock()
    regional = _FakeRuntime("bb")
    global_ = _FakeRuntime("gg")
    registry = CollectorRegistry()
    pub = PresencePublisher(
        store=store,
        threads=threads,
        regional=regional,  # type: ignore[arg-type]
        global_=global_,  # type: ignore[arg-type]
        region="a",
        config=PresenceConfig(takeover_delay_ms=10_000),
        registry=registry,
        clock=clock,
    )

    async def write(*sql: str) -> None:
        await threads.write(store.transact, [Statement(s) for s in sql])

    async def rows() -> list[tuple[Any, ...]]:
        return sorted(r[:2] + r[3:] for r in await threads.write(store.rows, "app_regions"))

    await write(
        "INSERT INTO machines (id, app, region, state) VALUES ('m1', 'web', 'a', 'started')",
        "INSERT INTO machines (id, app, region, state) VALUES ('m2', 'web', 'a', 'started')",
        "INSERT INTO machines (id, app, region, state) VALUES ('m3', 'api', '', 'started')",
        "INSERT INTO machines (id, app, region, state) VALUES ('m4', 'off', 'a', 'stopped')",
        "INSERT INTO machines (id, app, region, state) VALUES ('m5', 'far', 'z', 'started')",
        # Another region's row and this region's stale row.
        "INSERT INTO app_regions (app, region, capacity) VALUES ('web', 'z', 8), ('old', 'a', 1)",
    )
    v0 = await _global_version(store, threads)
    # Not settled (no sync yet, up for less than the takeover delay): nothing is written.
    assert await pub.evaluate() is False
    assert pub.stats.pending == 3 and await _global_version(store, threads) == v0
    regional.stats.sessions[("client", "ok")] = 1  # synced once: settled
    # Another node ("aa") is the designated writer: this one waits for the takeover delay.
    regional.membership.others = [_member("aa"), _member("cc")]
    assert not pub.is_designated()
    await pub.evaluate()
    assert await _global_version(store, threads) == v0
    clock.now += 9.9
    await pub.evaluate()
    assert await _global_version(store, threads) == v0
    clock.now += 0.2  # the mismatches have lasted 10.1 s
    await pub.evaluate()
    assert await _global_version(store, threads) == v0 + 1  # one transaction
    assert await rows() == [("api", "a", 1), ("web", "a", 2), ("web", "z", 8)]
    assert pub.stats.writes == {("app_regions", "takeover"): 3}
    # Steady state: nothing to write.
    for _ in range(3):
        await pub.evaluate()
    assert await _global_version(store, threads) == v0 + 1 and pub.stats.pending == 0
    # The designated writer ("aa") died: this node is designated and writes at once.
    regional.membership.others = [_member("aa", MemberState.DEAD), _member("cc")]
    global_.membership.others = [_member("g1", region="b", rtt=0.0004), _member("g2", region="c", rtt=0.03)]
    await write("UPDATE machines SET state = 'started' WHERE id = 'm4'")
    await pub.evaluate()
    assert await rows() == [("api", "a", 1), ("off", "a", 1), ("web", "a", 2), ("web", "z", 8)]
    rtt = sorted(r[:3] for r in await threads.write(store.rows, "region_rtt"))
    assert rtt == [("a", "b", 1), ("a", "c", 50)]
    assert pub.stats.writes == {
        ("app_regions", "takeover"): 3,
        ("app_regions", "designated"): 1,
        ("region_rtt", "designated"): 2,
    }
    v1 = await _global_version(store, threads)
    # Health and other columns: no write. A third web instance: same bucket, no write.
    await write(
        "INSERT INTO checks (machine, name, app, status) VALUES ('m1', 'http', 'web', 'passing')",
        "UPDATE machines SET address = '127.0.0.1:9' WHERE id = 'm1'",
        "INSERT INTO machines (id, app, region, state) VALUES ('m6', 'web', 'a', 'started')",
    )
    global_.membership.others[0] = _member("g1", region="b", rtt=0.0009)  # same bucket
    await pub.evaluate()
    assert await _global_version(store, threads) == v1
    # A fourth: bucket 4, one write. Stopping every api instance deletes its row.
    await write(
        "INSERT INTO machines (id, app, region, state) VALUES ('m7', 'web', 'a', 'started')",
        "UPDATE machines SET state = 'stopping' WHERE app = 'api'",
    )
    await pub.evaluate()
    assert await _global_version(store, threads) == v1 + 1
    assert await rows() == [("off", "a", 1), ("web", "a", 4), ("web", "z", 8)]
    # A concurrent writer already wrote the value: the guarded statements change nothing.
    result = await threads.write(
        store.transact,
        statements("a", [Write("app_regions", "web", 4), Write("app_regions", "api", None)], 1),
    )
    assert [r.rows_affected for r in result.results] == [0, 0] and result.versions == {}
    info = pub.info()
    assert info["designated"] and info["settled"] and info["errors"] == 0
    text = generate_latest(registry).decode()
    assert 'verdigris_presence_writes_total{reason="takeover",table="app_regions"} 3.0' in text
    assert 'verdigris_presence_writes_total{reason="designated",table="app_regions"} 3.0' in text
    assert "verdigris_presence_designated 1.0" in text


async def test_publisher_loop_debounces_commits_and_survives_errors(
    local_store: tuple[Store, StoreThreads],
) -> None:
    store, threads = local_store
    regional = _FakeRuntime("aa", stats=_FakeStats({("client", "ok"): 1}))
    pub = PresencePublisher(
        store=store,
        threads=threads,
        regional=regional,  # type: ignore[arg-type]
        global_=_FakeRuntime("gg"),  # type: ignore[arg-type]
        region="a",
        config=PresenceConfig(debounce_ms=50, interval_ms=60_000),
    )
    await pub.start()
    try:
        await until("the first evaluation", 5, lambda: _true(pub.stats.evaluations >= 1))
        before = pub.stats.evaluations
        # A burst of commits touching machines: one debounced evaluation (or two), not ten.
        for i in range(10):
            await threads.write(
                store.transact,
                [
                    Statement(
                        "INSERT INTO machines (id, app, region, state) VALUES (?, 'web', 'a', 'started')",
                        [f"m{i}"],
                    )
                ],
            )
        await until("the row", 5, lambda: _has_row(store, threads, ("web", "a")))
        await asyncio.sleep(0.3)
        assert 1 <= pub.stats.evaluations - before <= 5, pub.stats.evaluations - before
        # A commit touching other tables only: no evaluation.
        n = pub.stats.evaluations
        await threads.write(store.transact, [Statement("INSERT INTO apps (name) VALUES ('x')")])
        await asyncio.sleep(0.3)
        assert pub.stats.evaluations == n
        # An evaluation that fails is counted and logged; the loop goes on.
        regional.membership = None  # type: ignore[assignment]
        await threads.write(
            store.transact, [Statement("UPDATE machines SET state = 'stopped' WHERE id = 'm0'")]
        )
        await until("an error", 5, lambda: _true(pub.stats.errors >= 1))
        assert pub.info()["last_error"] is not None
        regional.membership = _FakeMembership()
        await threads.write(store.transact, [Statement("UPDATE machines SET state = 'stopped'")])
        await until("the row's delete", 5, lambda: _no_rows(store, threads))
    finally:
        await pub.stop()
    assert not pub._task


async def _true(value: bool) -> bool:
    return value


async def _has_row(store: Store, threads: StoreThreads, key: tuple[str, str]) -> bool:
    return any(r[:2] == key for r in await threads.write(store.rows, "app_regions"))


async def _no_rows(store: Store, threads: StoreThreads) -> bool:
    return not await threads.write(store.rows, "app_regions")


# ------------------------------------------------------------------------------------------------ e2e


@dataclass
class PresenceNode(RegionNode):
    presence: str = "[presence]\ninterval-ms = 1000\n"

    def write_config(self) -> Path:
        path = super().write_config()
        with path.open("a") as f:
            f.write(self.presence)
        return path


@pytest.fixture
async def two_regions(tmp_path: Path) -> AsyncIterator[dict[str, list[PresenceNode]]]:
    async with region_cluster(tmp_path, PresenceNode, ("a", "b")) as by_region:
        yield by_region


async def _counts(nodes: list[PresenceNode]) -> tuple[int, int, int]:
    """(global versions made by all nodes, app_regions writes, region_rtt writes) across ``nodes``; each
    node's numbers are read between two pings that agree, so a write landing meanwhile is not half-seen."""
    versions = app_writes = rtt_writes = 0
    for n in nodes:
        for _ in range(20):
            before = await n.admin({"cmd": "ping"})
            status = await n.admin({"cmd": "status", "scope": "global"})
            after = await n.admin({"cmd": "ping"})
            if before["presence"]["writes"] == after["presence"]["writes"]:
                break
        versions += int(status["heads"].get(after["actors"]["global"], 0))
        writes = after["presence"]["writes"]
        app_writes += sum(v for k, v in writes.items() if k.startswith("app_regions/"))
        rtt_writes += sum(v for k, v in writes.items() if k.startswith("region_rtt/"))
    return versions, app_writes, rtt_writes


START = "INSERT INTO machines (id, app, region, state, address) VALUES (?, ?, ?, 'started', '127.0.0.1:1')"


@pytest.mark.timeout(150)
async def test_presence_across_two_regions(two_regions: dict[str, list[PresenceNode]]) -> None:
    a0, a1 = two_regions["a"]
    b0, b1 = two_regions["b"]
    everyone = [a0, a1, b0, b1]
    for n in everyone:
        n.start()
    await asyncio.gather(*(n.ready() for n in everyone))
    await until("every admin socket", 15, lambda: _admin_up(everyone))  # type: ignore[arg-type]

    async def joined() -> bool:
        for n in everyone:
            if sum(m["state"] == "alive" for m in await n.members("regional")) != 2:
                return False
            if sum(m["state"] == "alive" for m in await n.members("global")) != 4:
                return False
            presence = (await n.admin({"cmd": "ping"}))["presence"]
            if not presence["settled"]:
                return False
        return True

    await until("2 regional and 4 global members, settled", 40, joined)
    # One designated writer per region, the same as seen from both of its nodes.
    for nodes in (two_regions["a"], two_regions["b"]):
        infos = [(await n.admin({"cmd": "ping"}))["presence"] for n in nodes]
        assert infos[0]["designated_writer"] == infos[1]["designated_writer"]
        assert sorted(i["designated"] for i in infos) == [False, True]

    async def app_rows(node: PresenceNode) -> list[list[Any]]:
        return await node.query("SELECT app, region, capacity FROM app_regions ORDER BY app, region")

    async def everywhere(expected: list[list[Any]]) -> bool:
        return all([await app_rows(n) == expected for n in everyone])

    async def quiet(seconds: float = 2.5) -> None:
        """Longer than a debounce plus two repair intervals (1 s here)."""
        await asyncio.sleep(seconds)

    base_versions, base_app, base_rtt = await _counts(everyone)
    assert base_app == 0

    # The first started instance of "web" in region a: one row, seen in region b.
    await a0.must_write(
        [
            [START, ["m1", "web", "a"]],
            ["INSERT INTO checks (machine, name, app, status) VALUES ('m1', 'http', 'web', 'critical')", []],
        ]
    )
    await until("web's row on b's nodes", 20, lambda: everywhere([["web", "a", 1]]))
    await quiet()
    versions, app_writes, rtt_writes = await _counts(everyone)
    assert app_writes - base_app == 1
    # One publisher pass is one transaction (one version) that may carry several rows: every global
    # version is presence's if there are no more versions than rows written.
    assert 0 < versions - base_versions <= (app_writes - base_app) + (rtt_writes - base_rtt)

    # Health flaps, other columns, an instance that is not started, on both of a's nodes: nothing global.
    for i in range(6):
        node = (a0, a1)[i % 2]
        status = "passing" if i % 2 == 0 else "critical"
        await node.must_write(
            [
                ["UPDATE checks SET status = ?, output = ? WHERE machine = 'm1'", [status, f"try {i}"]],
                [
                    "UPDATE machines SET updated_at = ?, address = ? WHERE id = 'm1'",
                    [i, f"127.0.0.1:{i + 2}"],
                ],
            ]
        )
        await asyncio.sleep(0.1)
    await a1.must_write(
        [["INSERT INTO machines (id, app, region, state) VALUES ('m-new', 'web', 'a', 'created')", []]]
    )
    await quiet()
    before = versions, app_writes, rtt_writes
    versions, app_writes, rtt_writes = await _counts(everyone)
    assert app_writes == before[1], "health flaps or other columns caused an app_regions write"
    assert versions - before[0] <= rtt_writes - before[2], "a global write other than presence's"

    # A second instance crosses 1 -> 2 (one write); a third stays in the bucket (none); a fourth crosses.
    await a1.must_write([[START, ["m2", "web", "a"]]])
    await until("capacity 2 everywhere", 20, lambda: everywhere([["web", "a", 2]]))
    await a0.must_write([[START, ["m3", "web", "a"]]])
    await quiet()
    assert await everywhere([["web", "a", 2]])
    _, app_writes_3, _ = await _counts(everyone)
    assert app_writes_3 - app_writes == 1
    await a0.must_write([["UPDATE machines SET state = 'started' WHERE id = 'm-new'", []]])
    await until("capacity 4 everywhere", 20, lambda: everywhere([["web", "a", 4]]))
    await quiet()
    _, app_writes_4, _ = await _counts(everyone)
    assert app_writes_4 - app_writes_3 == 1

    # Region b starts "web" too; then a stops every instance: a's row goes, b's stays.
    await b1.must_write([[START, ["mb", "web", "b"]]])
    await until("b's row everywhere", 20, lambda: everywhere([["web", "a", 4], ["web", "b", 1]]))
    await a1.must_write([["UPDATE machines SET state = 'stopped' WHERE app = 'web'", []]])
    await until("a's row deleted everywhere", 20, lambda: everywhere([["web", "b", 1]]))
    await quiet()
    versions, app_writes, rtt_writes = await _counts(everyone)
    assert app_writes - base_app == 5  # a: created, 2, 4, deleted; b: created
    # One publisher pass is one transaction (one version) that may carry several rows: every global
    # version is presence's if there are no more versions than rows written.
    assert 0 < versions - base_versions <= (app_writes - base_app) + (rtt_writes - base_rtt)

    # The RTT table: a -> b and b -> a, on every node.
    async def rtt_rows() -> bool:
        for n in everyone:
            rows = await n.query("SELECT src, dst, rtt_ms FROM region_rtt ORDER BY src, dst")
            if [r[:2] for r in rows] != [["a", "b"], ["b", "a"]] or not all(r[2] >= 1 for r in rows):
                return False
        return True

    await until("region_rtt rows a->b and b->a everywhere", 30, rtt_rows)
    for n in everyone:
        ping = (await n.admin({"cmd": "ping"}))["presence"]
        assert ping["errors"] == 0, (n.name, ping)

    # Region a's designated writer dies (kill -9): its survivor publishes a new app (as the new designated
    # writer once membership notices, or by takeover before that).
    pings = {n.name: await n.admin({"cmd": "ping"}) for n in (a0, a1)}
    writer = pings["a0"]["presence"]["designated_writer"]
    dead, survivor = (a0, a1) if writer == pings["a0"]["actors"]["regional"] else (a1, a0)
    assert writer == pings[dead.name]["actors"]["regional"]
    dead.kill9()
    await survivor.must_write([[START, ["m-api", "api", "a"]]])
    await until(
        "the survivor's row on b's nodes",
        40,
        lambda: _all_rows([b0, b1], [["api", "a", 1], ["web", "b", 1]]),
    )
    survivors = [survivor, b0, b1]
    codes = await asyncio.gather(*(asyncio.to_thread(n.terminate) for n in survivors))
    assert codes == [0] * len(survivors), [n.tail() for n in survivors]


async def _all_rows(nodes: list[PresenceNode], expected: list[list[Any]]) -> bool:
    for n in nodes:
        if await n.query("SELECT app, region, capacity FROM app_regions ORDER BY app, region") != expected:
            return False
    return True


# ------------------------------------------------------------------------------------------------ gone regions


async def test_rows_of_a_gone_region_are_deleted_after_the_grace_by_the_global_designated_writer(
    local_store: tuple[Store, StoreThreads], caplog: pytest.LogCaptureFixture
) -> None:
    """Region b's only global member dies: nothing happens during the grace; then the global designated
    writer (smallest alive global id) deletes b's rows, another node only after the grace plus the
    takeover delay; when b comes back its publisher rewrites its rows and nobody deletes them."""
    store, threads = local_store
    clock = _Clock()
    config = PresenceConfig(takeover_delay_ms=10_000, gone_region_after_ms=60_000)
    synced = _FakeStats({("client", "ok"): 1})

    def publisher(region: str, regional_id: str, global_id: str) -> PresencePublisher:
        return PresencePublisher(
            store=store,
            threads=threads,
            regional=_FakeRuntime(regional_id, stats=synced),  # type: ignore[arg-type]
            global_=_FakeRuntime(global_id),  # type: ignore[arg-type]
            region=region,
            config=config,
            clock=clock,
        )

    # Two nodes of region a: g1 is the global designated writer, g9 is not.
    p1, p9 = publisher("a", "a1", "g1"), publisher("a", "a9", "g9")
    g_b, g_c = _member("g2", region="b"), _member("g3", region="c")
    p1._global.membership.others = [g_b, g_c, _member("g9", region="a")]
    p9._global.membership.others = [g_b, g_c, _member("g1", region="a")]

    async def rows() -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        apps = sorted(r[:2] + r[3:] for r in await threads.write(store.rows, "app_regions"))
        rtt = sorted(r[:3] for r in await threads.write(store.rows, "region_rtt"))
        return apps, rtt

    await threads.write(
        store.transact,
        [
            Statement(
                "INSERT INTO app_regions (app, region, capacity) VALUES ('web', 'b', 2), ('web', 'c', 1)"
            ),
            Statement(
                "INSERT INTO region_rtt (src, dst, rtt_ms) VALUES ('a', 'b', 5), ('b', 'a', 5), ('b', 'c', 10), "
                "('c', 'b', 10), ('a', 'c', 20), ('c', 'a', 20)"
            ),
        ],
    )
    full = await rows()
    v0 = await _global_version(store, threads)

    async def both() -> None:
        await p9.evaluate()
        await p1.evaluate()

    await both()
    assert p1.stats.gone == [] and p1.is_global_designated() and not p9.is_global_designated()
    # b's member is suspect: b is not gone. Then it is dead: gone, but for less than the grace.
    p1._global.membership.others[0] = p9._global.membership.others[0] = _member(
        "g2", MemberState.SUSPECT, "b"
    )
    await both()
    assert p1.stats.gone == []
    p1._global.membership.others[0] = p9._global.membership.others[0] = _member("g2", MemberState.DEAD, "b")
    await both()
    assert p1.stats.gone == ["b"] and p9.stats.gone == ["b"]
    clock.now += 59.9
    await both()
    assert await rows() == full and await _global_version(store, threads) == v0
    assert p1._gone_deadline() == pytest.approx(clock.now + 0.1)
    assert p9._gone_deadline() == pytest.approx(clock.now + 10.1)
    # The grace is over: the designated one deletes b's rows (app_regions, region_rtt from and to b).
    clock.now += 0.2
    caplog.set_level("INFO", logger="verdigris.presence")
    await p9.evaluate()
    assert await rows() == full  # not designated: waits the takeover delay as well
    await p1.evaluate()
    assert await rows() == ([("web", "c", 1)], [("a", "c", 20), ("c", "a", 20)])
    assert await _global_version(store, threads) == v0 + 1
    assert p1.stats.writes == {("app_regions", "gone"): 1, ("region_rtt", "gone"): 4}
    assert p1.stats.regions_cleaned == 1 and p1.info()["regions_cleaned"] == 1
    lines = [r.getMessage() for r in caplog.records if "region b" in r.getMessage()]
    assert len(lines) == 1 and "deleted 1 app_regions and 4 region_rtt rows" in lines[0], lines
    # Nothing left of b: not tracked any more, nothing more to write, on either node.
    clock.now += 20.0
    await both()
    assert p1.stats.gone == [] and p9.stats.gone == [] and p9.stats.regions_cleaned == 0
    assert await _global_version(store, threads) == v0 + 1

    # b comes back: its publisher rewrites its row (the stored one differs from its desired one).
    await threads.write(
        store.transact,
        [Statement("INSERT INTO machines (id, app, region, state) VALUES ('mb', 'web', 'b', 'started')")],
    )
    pb = publisher("b", "b1", "g2")
    pb._global.membership.others = [_member("g1", region="a"), _member("g9", region="a"), g_c]
    await pb.evaluate()
    assert (await rows())[0] == [("web", "b", 1), ("web", "c", 1)]
    # a's nodes have not noticed b's member yet: a new grace starts, so the fresh row is kept...
    await both()
    clock.now += 59.0
    await both()
    assert (await rows())[0] == [("web", "b", 1), ("web", "c", 1)]
    # ...and once they see it alive, b is not gone any more.
    p1._global.membership.others[0] = p9._global.membership.others[0] = g_b
    clock.now += 60.0
    await both()
    assert p1.stats.gone == [] and (await rows())[0] == [("web", "b", 1), ("web", "c", 1)]
    assert p1.stats.regions_cleaned == 1

    # Takeover: region c dies and the designated g1 does nothing (dead before g9 noticed it): g9 deletes
    # c's rows once they have lasted the grace plus the takeover delay.
    p9._global.membership.others[1] = _member("g3", MemberState.DEAD, region="c")
    await p9.evaluate()
    clock.now += 69.9
    await p9.evaluate()
    assert ("web", "c", 1) in (await rows())[0]
    clock.now += 0.2
    await p9.evaluate()
    assert await rows() == ([("web", "b", 1)], [])
    assert p9.stats.writes == {("app_regions", "gone"): 1, ("region_rtt", "gone"): 2}
    assert p9.stats.regions_cleaned == 1 and p9.info()["gone_regions"] == ["c"]
    assert any("region c" in r.getMessage() and "takeover" in r.getMessage() for r in caplog.records)


async def test_an_unsettled_node_deletes_no_gone_region(local_store: tuple[Store, StoreThreads]) -> None:
    store, threads = local_store
    clock = _Clock()
    pub = PresencePublisher(
        store=store,
        threads=threads,
        regional=_FakeRuntime("a1"),  # type: ignore[arg-type]  # never synced
        global_=_FakeRuntime("g1"),  # type: ignore[arg-type]
        region="a",
        config=PresenceConfig(takeover_delay_ms=120_000, gone_region_after_ms=1000),
        clock=clock,
    )
    await threads.write(
        store.transact, [Statement("INSERT INTO app_regions (app, region, capacity) VALUES ('web', 'b', 1)")]
    )
    await pub.evaluate()
    clock.now += 5.0
    await pub.evaluate()
    assert pub.stats.gone == ["b"] and await threads.write(store.rows, "app_regions")
    clock.now += 120.0  # settled (up for the takeover delay): deleted
    await pub.evaluate()
    assert not await threads.write(store.rows, "app_regions") and pub.stats.regions_cleaned == 1


@dataclass
class GoneNode(PresenceNode):
    presence: str = (
        "[presence]\ninterval-ms = 500\ndebounce-ms = 50\ntakeover-delay-ms = 1000\n"
        "gone-region-after-ms = 2000\n"
    )

    def write_config(self) -> Path:
        """LAN timing for the global cluster too, so that a killed node is declared dead in seconds."""
        path = super().write_config()
        marker = f"cluster-id = {GLOBAL_CLUSTER_ID}\n"
        text = path.read_text()
        assert marker in text
        path.write_text(text.replace(marker, marker + 'profile = "lan"\n'))
        return path


@pytest.mark.timeout(120)
async def test_a_dead_regions_rows_disappear(tmp_path: Path) -> None:
    """Two regions of one agent each (the second node of each region is never started): region b's agent
    is killed (kill -9); after the grace, b's rows disappear at a; b restarts and its rows come back."""
    async with region_cluster(tmp_path, GoneNode, ("a", "b")) as by_region:
        a0, b0 = by_region["a"][0], by_region["b"][0]
        both = [a0, b0]
        for n in both:
            n.start()
        await asyncio.gather(*(n.ready() for n in both))
        await until("both admin sockets", 15, lambda: _admin_up(both))  # type: ignore[arg-type]

        async def joined() -> bool:
            for n in both:
                if sum(m["state"] == "alive" for m in await n.members("global")) != 2:
                    return False
                if not (await n.admin({"cmd": "ping"}))["presence"]["settled"]:
                    return False
            return True

        await until("2 global members, settled", 30, joined)
        await b0.must_write([[START, ["mb", "web", "b"]]])

        async def rows_at_a() -> tuple[list[list[Any]], list[list[Any]]]:
            apps = await a0.query("SELECT app, region, capacity FROM app_regions ORDER BY app, region")
            rtt = await a0.query("SELECT src, dst FROM region_rtt ORDER BY src, dst")
            return apps, rtt

        async def b_present() -> bool:
            apps, rtt = await rows_at_a()
            return apps == [["web", "b", 1]] and rtt == [["a", "b"], ["b", "a"]]

        await until("b's app_regions row and both region_rtt rows at a", 30, b_present)
        b0.kill9()

        async def b_gone() -> bool:
            return await rows_at_a() == ([], [])

        await until("b's rows deleted at a", 40, b_gone)
        presence = (await a0.admin({"cmd": "ping"}))["presence"]
        assert presence["regions_cleaned"] == 1 and presence["global_designated"], presence
        assert presence["writes"]["app_regions/gone"] == 1, presence
        assert presence["writes"]["region_rtt/gone"] == 2, presence
        assert "region b has had no alive member" in a0.log.read_text()

        # b comes back (same database): its publisher rewrites its row.
        b0.start()
        await b0.ready()
        await until("b's row back at a", 40, lambda: _all_rows([a0], [["web", "b", 1]]))
        codes = await asyncio.gather(*(asyncio.to_thread(n.terminate) for n in both))
        assert codes == [0, 0], [n.tail() for n in both]
