"""Region mode: a cluster per region for regional tables, one global cluster for global tables.

Six real agents (``verdigris agent`` subprocesses) in three regions of two, on ``schemas/platform.sql``
(``apps``/``hostnames``/``app_regions`` global, ``machines``/``services``/``checks`` regional). Each agent
has ``[gossip]`` (its region's cluster, an id per region) and ``[gossip.global]`` (every node, WAN timing,
one id). The tests drive them from outside only (HTTP API, admin socket, the CLI, the database file read
only) and wait by polling with deadlines. Helpers come from ``test_cluster``.

What is proven: a regional row reaches its region's other node and never any node of another region,
even after a later global write from the same node has reached everyone (the other regions' databases
hold no trace of the writer's regional actor: no rows, no books, no actor record); a global row reaches
all six; membership per scope; a region cut off from the global cluster keeps replicating regionally, and
global writes made on both sides of the cut (one on the same row) converge once it heals.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from test_cluster import Cluster, Node, free_port, new_key, until
from verdigris.admin import AdminError, admin_call
from verdigris.api.threads import StoreThreads
from verdigris.config import Addr, ConfigError, GossipConfig, parse_config
from verdigris.gossip.sync import SyncConfig
from verdigris.runtime import GossipRuntime, RuntimeSettings, peers_path
from verdigris.store.store import Store
from verdigris.store.types import Statement

PLATFORM_SQL = Path(__file__).resolve().parent.parent / "schemas" / "platform.sql"
CLI = (sys.executable, "-m", "verdigris.cli")
REGIONS = ("a", "b", "c")
GLOBAL_CLUSTER_ID = 1
REGIONAL_CLUSTER_IDS = {"a": 11, "b": 12, "c": 13}


@dataclass
class RegionNode(Node):
    """An agent in region mode: ``gossip_port`` is its region's cluster, ``global_port`` the global one."""

    global_port: int = 0
    global_bootstrap: list[str] = field(default_factory=list)
    cluster_id: int = 0

    @property
    def global_addr(self) -> str:
        return f"127.0.0.1:{self.global_port}"

    @property
    def config_path(self) -> Path:
        return self.root / "agent.toml"

    def write_config(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        lines = [
            "[db]",
            f'path = "{self.root / "state.db"}"',
            f'schema_paths = ["{PLATFORM_SQL}"]',
            "[api]",
            f'addr = "127.0.0.1:{self.api_port}"',
            "[admin]",
            f'path = "{self.admin_path}"',
            "[gossip]",
            f'addr = "{self.gossip}"',
            f"bootstrap = {json.dumps(self.bootstrap)}",
            f"cluster-id = {self.cluster_id}",
            f'region = "{self.region}"',
            f'key = "{self.key}"',
            "fault-injection = true",
            "[gossip.global]",
            f'addr = "{self.global_addr}"',
            f"bootstrap = {json.dumps(self.global_bootstrap)}",
            f"cluster-id = {GLOBAL_CLUSTER_ID}",
        ]
        if self.metrics_port is not None:
            lines += ["[telemetry.prometheus]", f'addr = "127.0.0.1:{self.metrics_port}"']
        lines += ["[log]", 'level = "info"', "colors = false"]
        self.config_path.write_text("\n".join(lines) + "\n")
        return self.config_path

    async def ids(self, table: str) -> set[str]:
        key = "name" if table == "apps" else "id"
        return {str(r[0]) for r in await self.query(f"SELECT {key} FROM {table}")}

    async def must_write(self, statements: list[Any]) -> None:
        assert await self.write(statements) is not None, f"{self.name} refused {statements}"

    async def members(self, scope: str) -> list[dict[str, Any]]:
        members: list[dict[str, Any]] = (await self.admin({"cmd": "members", "scope": scope}))["members"]
        return members

    def traces_of(self, actor_hex: str) -> dict[str, int]:
        """Rows mentioning ``actor`` in this node's bookkeeping tables, read from the database file."""
        actor = bytes.fromhex(actor_hex)
        conn = sqlite3.connect(f"file:{self.root / 'state.db'}?mode=ro", uri=True, timeout=10)
        try:
            return {
                table: int(
                    conn.execute(f"SELECT count(*) FROM {table} WHERE actor = ?", (actor,)).fetchone()[0]
                )
                for table in ("__vd_actors", "__vd_bookkeeping", "__vd_buffer")
            }
        finally:
            conn.close()


def machine(mid: str, region: str) -> list[Any]:
    return [
        "INSERT INTO machines (id, app, region, state, address) VALUES (?, 'web', ?, 'started', '127.0.0.1:1')",
        [mid, region],
    ]


def app(name: str, org: str) -> list[Any]:
    return [
        "INSERT INTO apps (name, org) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET org = excluded.org",
        [name, org],
    ]


RN = TypeVar("RN", bound=RegionNode)


@contextlib.asynccontextmanager
async def region_cluster(
    tmp_path: Path, node_type: type[RN], regions: tuple[str, ...], *, metrics: bool = False
) -> AsyncIterator[dict[str, list[RN]]]:
    """Two ``node_type`` agents per region (each pair bootstrapping off each other, all of them off
    the first node of regions a and b for the global cluster), by region; ``metrics``: the first node
    serves Prometheus metrics. Closed, logs dumped, on exit."""
    async with aiohttp.ClientSession() as http:
        cluster = Cluster(tmp_path, http)
        try:
            key = new_key()
            by_region: dict[str, list[RN]] = {}
            for region in regions:
                for i in range(2):
                    n = len(cluster.nodes)
                    admin_dir = Path(tempfile.mkdtemp(prefix="r", dir=cluster.admin_root))
                    node = node_type(
                        name=f"{region}{i}",
                        root=tmp_path / f"{region}{i}",
                        admin_dir=admin_dir,
                        api_port=free_port(),
                        gossip_port=free_port(),
                        global_port=free_port(),
                        http=http,
                        key=key,
                        region=region,
                        cluster_id=REGIONAL_CLUSTER_IDS[region],
                        metrics_port=free_port() if metrics and n == 0 else None,
                    )
                    cluster.nodes.append(node)
                    by_region.setdefault(region, []).append(node)
            seeds = [by_region["a"][0].global_addr, by_region["b"][0].global_addr]
            for nodes in by_region.values():
                nodes[0].bootstrap, nodes[1].bootstrap = [nodes[1].gossip], [nodes[0].gossip]
                for node in nodes:
                    node.global_bootstrap = seeds
            yield by_region
        finally:
            cluster.close()
            cluster.dump_logs()


@pytest.fixture
async def regions(tmp_path: Path) -> AsyncIterator[dict[str, list[RegionNode]]]:
    async with region_cluster(tmp_path, RegionNode, REGIONS, metrics=True) as by_region:
        yield by_region


# ------------------------------------------------------------------------------------------------ e2e


@pytest.mark.timeout(120)
async def test_regional_rows_stay_in_their_region_global_rows_reach_all_and_a_cut_region_heals(
    regions: dict[str, list[RegionNode]],
) -> None:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    everyone = [n for nodes in regions.values() for n in nodes]
    for n in everyone:
        n.start()
    await asyncio.gather(*(n.ready() for n in everyone))
    # The API answers a moment before the admin socket is up (it is opened last).
    await until("every admin socket", 10, lambda: _admin_up(everyone))
    started = loop.time() - t0

    async def memberships() -> bool:
        for n in everyone:
            regional = await n.members("regional")
            global_ = await n.members("global")
            if sum(m["state"] == "alive" for m in regional) != 2:
                return False
            if sum(m["state"] == "alive" for m in global_) != 6:
                return False
        return True

    joined = await until("2 regional and 6 global members everywhere", 40, memberships)
    a0, a1 = regions["a"]
    b0, b1 = regions["b"]
    c0, c1 = regions["c"]
    assert (await a0.health())["members"] == 2
    bad = await asyncio.to_thread(admin_call, a0.admin_path, {"cmd": "members", "scope": "planet"}, 10.0)
    assert not bad["ok"] and "unknown scope" in bad["error"]
    # The CLI, per scope (JSON output): the region's two nodes, or all six with their regions.
    out = await asyncio.to_thread(
        subprocess.run,
        [*CLI, "cluster", "members", "-c", str(b1.config_path), "--json"],
        capture_output=True,
        check=True,
        timeout=30,
    )
    regional = json.loads(out.stdout)
    assert len(regional) == 2 and {m["region"] for m in regional} == {"b"}
    out = await asyncio.to_thread(
        subprocess.run,
        [*CLI, "cluster", "members", "-c", str(b1.config_path), "--scope", "global", "--json"],
        capture_output=True,
        check=True,
        timeout=30,
    )
    global_members = json.loads(out.stdout)
    assert len(global_members) == 6
    assert sorted(m["region"] for m in global_members) == ["a", "a", "b", "b", "c", "c"]
    # Each runtime is its own member: a node's regional and global ids are its two actors.
    ping = await a0.admin({"cmd": "ping"})
    actors = ping["actors"]
    assert actors["regional"] == ping["site_id"] != actors["global"]
    assert {m["id"] for m in await a1.members("regional")} >= {actors["regional"]}
    assert {m["id"] for m in await a1.members("global")} >= {actors["global"]}

    # A regional row in each region reaches the region's other node.
    t_write = loop.time()
    for region, (first, _) in regions.items():
        await first.must_write([machine(f"m-{region}", region)])
    for region, (_, second) in regions.items():
        await until(
            f"m-{region} on {second.name}",
            10,
            lambda s=second, r=region: _contains(s, "machines", f"m-{r}"),
        )
    regional_took = loop.time() - t_write
    # Then a global row from a0 (the writer of m-a), which must reach all six.
    t_write = loop.time()
    await a0.must_write([app("app-a", "a0")])
    await until("app-a everywhere", 20, lambda: _all_contain(everyone, "apps", "app-a"))
    global_took = loop.time() - t_write
    # By now everything a0 sent on the global cluster has arrived everywhere: no node outside region a
    # has m-a, nor any trace of a0's regional actor (rows, books, actor record, heads).
    for region, nodes in regions.items():
        for n in nodes:
            assert await n.ids("machines") == {f"m-{region}"}, n.name
            traces = await asyncio.to_thread(n.traces_of, actors["regional"])
            if region == "a":
                assert traces["__vd_bookkeeping"] >= 1, (n.name, traces)
            else:
                assert traces == {"__vd_actors": 0, "__vd_bookkeeping": 0, "__vd_buffer": 0}, (n.name, traces)
            for scope in ("regional", "global"):
                heads = (await n.admin({"cmd": "status", "scope": scope}))["heads"]
                assert (actors["regional"] in heads) == (region == "a" and scope == "regional"), (
                    n.name,
                    scope,
                )
                assert (actors["global"] in heads) == (scope == "global"), (n.name, scope)

    # Two runtimes in one Prometheus registry: every family once, samples labelled by scope.
    async with a0.http.get(f"http://127.0.0.1:{a0.metrics_port}/metrics") as r:
        metrics = await r.text()
    assert metrics.count("# HELP verdigris_gossip_members ") == 1
    assert 'verdigris_gossip_members{scope="regional",state="alive"} 2.0' in metrics
    assert 'verdigris_gossip_members{scope="global",state="alive"} 6.0' in metrics

    # Region a cut off from the global cluster (its nodes drop all global traffic with b and c).
    outside = [n.global_addr for n in everyone if n.region != "a"]
    for n in (a0, a1):
        reply = await n.admin({"cmd": "fault", "scope": "global", "action": "block", "addrs": outside})
        assert len(reply["blocked"]) == 4
        assert (await n.admin({"cmd": "fault", "action": "status"}))["blocked"] == []  # regional untouched
    # The cut region keeps working on its own state: its regional cluster replicates as before. (Global
    # writes are accepted on both sides; inside region a they may need a sync round to spread, because
    # a0's broadcast also spends its few transmissions on the members it cannot reach, still held alive.)
    await a1.must_write([machine("m-a-cut", "a")])
    await a0.must_write([app("app-cut-a", "a0"), app("app-shared", "side-a")])
    await until("m-a-cut on a0", 10, lambda: _contains(a0, "machines", "m-a-cut"))
    # ...and so does the rest of the fleet, on the other side of the cut.
    await b0.must_write([app("app-cut-b", "b0"), app("app-shared", "side-b")])
    await c1.must_write([machine("m-c-cut", "c")])
    await until("app-cut-b on c0", 30, lambda: _contains(c0, "apps", "app-cut-b"))
    await until("m-c-cut on c0", 10, lambda: _contains(c0, "machines", "m-c-cut"))
    # The cut is real: neither side has the other's global write.
    assert "app-cut-b" not in await a1.ids("apps")
    assert "app-cut-a" not in await b1.ids("apps")

    for n in (a0, a1):
        assert (await n.admin({"cmd": "fault", "scope": "global", "action": "heal"}))["blocked"] == []

    async def apps_converged() -> bool:
        tables = await asyncio.gather(*(n.query("SELECT * FROM apps ORDER BY name") for n in everyone))
        names = {str(r[0]) for r in tables[0]}
        return all(t == tables[0] for t in tables) and {"app-cut-a", "app-cut-b", "app-shared"} <= names

    healed = await until("the global tables to converge after the heal", 50, apps_converged)
    orgs = {str(r[0]) for r in await c1.query("SELECT org FROM apps WHERE name = 'app-shared'")}
    assert orgs <= {"side-a", "side-b"} and len(orgs) == 1
    for region, nodes in regions.items():
        expected = (
            {f"m-{region}"}
            | ({"m-a-cut"} if region == "a" else set())
            | ({"m-c-cut"} if region == "c" else set())
        )
        for n in nodes:
            assert await n.ids("machines") == expected, n.name
    print(
        f"6 agents in 3 regions: started {started:.1f} s, joined {joined:.1f} s; regional rows in their "
        f"region {regional_took:.2f} s, global row everywhere {global_took:.2f} s; global tables converged "
        f"{healed:.2f} s after the heal; total {loop.time() - t0:.1f} s"
    )
    # Every agent leaves both clusters gracefully (all at once: each leave waits for its news to go out).
    codes = await asyncio.gather(*(asyncio.to_thread(n.terminate) for n in everyone))
    assert codes == [0] * len(everyone), [n.tail() for n, c in zip(everyone, codes, strict=True) if c != 0]
    # One members file per cluster, each under the node id (actor) it has in that cluster.
    saved = {
        name: json.loads((a0.root / name).read_text())
        for name in ("state.db.members.json", "state.db.global.members.json")
    }
    assert saved["state.db.members.json"]["node_id"] == actors["regional"]
    assert len(saved["state.db.members.json"]["members"]) == 1
    assert saved["state.db.global.members.json"]["node_id"] == actors["global"]
    assert len(saved["state.db.global.members.json"]["members"]) == 5


async def _admin_up(nodes: list[RegionNode]) -> bool:
    for n in nodes:
        try:
            await asyncio.to_thread(admin_call, n.admin_path, {"cmd": "ping"}, 5.0)
        except AdminError:
            return False
    return True


async def _contains(node: RegionNode, table: str, key: str) -> bool:
    return key in await node.ids(table)


async def _all_contain(nodes: list[RegionNode], table: str, key: str) -> bool:
    return all(await asyncio.gather(*(_contains(n, table, key) for n in nodes)))


# ------------------------------------------------------------------------------------------------ config


BASE = '[db]\npath = "/srv/vd/state.db"\n'
KEY = "3m9R62nrN4jwIBJtngCTwraECKYovAITzKF9x8WPg/s="


def parse(text: str) -> Any:
    return parse_config(BASE + text, "agent.toml", Path("/srv/vd"))


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return list(info.value.problems)


def test_region_mode_config() -> None:
    cfg = parse(
        f"""
        [gossip]
        addr = "10.0.0.1:8787"
        bootstrap = ["10.0.0.2:8787"]
        cluster-id = 11
        region = "ams"
        key = "{KEY}"
        fault-injection = true
        [gossip.global]
        addr = "10.0.0.1:8788"
        external-addr = "192.0.2.1:8788"
        bootstrap = ["10.9.0.1:8788", "10.8.0.1:8788"]
        cluster-id = 1
        """
    )
    g = cfg.gossip
    assert g.region_mode and g.profile == "lan" and g.cluster_id == 11
    assert g.global_ is not None and g.global_.profile == "wan"
    glob = g.for_global()
    assert (str(glob.addr), str(glob.external_addr), glob.cluster_id, glob.profile) == (
        "10.0.0.1:8788",
        "192.0.2.1:8788",
        1,
        "wan",
    )
    assert [str(a) for a in glob.bootstrap] == ["10.9.0.1:8788", "10.8.0.1:8788"]
    # Shared with [gossip]: encryption, keyring, region, fault injection.
    assert (glob.key, glob.keyring_path, glob.region, glob.fault_injection) == (
        KEY,
        g.keyring_path,
        "ams",
        True,
    )
    assert glob.global_ is None and not glob.region_mode
    lan = parse(
        '[gossip]\nregion = "x"\n[gossip.global]\naddr = "127.0.0.1:0"\ncluster-id = 2\nprofile = "lan"\n'
    )
    assert lan.gossip.global_ is not None and lan.gossip.global_.profile == "lan"


def test_without_gossip_global_nothing_changes() -> None:
    cfg = parse('[gossip]\nregion = "ams"\n')
    assert not cfg.gossip.region_mode and cfg.gossip.global_ is None
    with pytest.raises(ValueError):
        cfg.gossip.for_global()
    assert parse("").gossip.global_ is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[gossip]\n[gossip.global]\naddr = "127.0.0.1:9"\ncluster-id = 1\n',
            ['invalid value for "gossip.region" in agent.toml: must be set in region mode'],
        ),
        (
            '[gossip]\nregion = "ams"\ncluster-id = 4\n[gossip.global]\naddr = "127.0.0.1:9"\ncluster-id = 4\n',
            ['invalid value for "gossip.global.cluster-id" in agent.toml: 4 is also gossip.cluster-id'],
        ),
        (
            '[gossip]\nregion = "ams"\n[gossip.global]\ncluster-id = 1\n',
            ['missing required key "gossip.global.addr" in agent.toml'],
        ),
        (
            '[gossip]\nregion = "ams"\naddr = "127.0.0.1:7"\n[gossip.global]\naddr = "127.0.0.1:7"\ncluster-id = 1\n',
            [
                'invalid value for "gossip.global.addr" in agent.toml: 127.0.0.1:7 is already used by gossip.addr'
            ],
        ),
        (
            '[gossip]\nregion = "ams"\n[gossip.global]\naddr = "127.0.0.1:9"\ncluster-id = 1\nkey = "x"\n'
            'profile = "fast"\nexternal-addr = "10.0.0.1:0"\n',
            [
                'unknown key "gossip.global.key" in agent.toml',
                'invalid value for "gossip.global.profile" in agent.toml: "fast" is not one of "lan", "wan"',
                'invalid value for "gossip.global.external-addr" in agent.toml: the port must be given (not 0)',
            ],
        ),
        (
            '[gossip]\nregion = "ams"\n[gossip.global]\naddr = "nope"\ncluster-id = 70000\nbootstrap = [1]\n',
            [
                'invalid value for "gossip.global.addr" in agent.toml: "nope" is not a valid address',
                'wrong type for "gossip.global.bootstrap[0]" in agent.toml',
                'invalid value for "gossip.global.cluster-id" in agent.toml: 70000 is out of range',
            ],
        ),
        (
            '[gossip]\nregion = "ams"\nglobal = "yes"\n',
            ['wrong type for "gossip.global" in agent.toml: expected a table, got string "yes"'],
        ),
    ],
)
def test_region_mode_config_errors(text: str, expected: list[str]) -> None:
    found = problems(text)
    assert len(found) == len(expected), found
    for prefix in expected:
        assert any(p.startswith(prefix) for p in found), (prefix, found)


# ------------------------------------------------------------------------------------------------ in process


SCOPED_SCHEMA = (
    "-- scope: global\n"
    "CREATE TABLE g (k TEXT NOT NULL PRIMARY KEY, v INTEGER NOT NULL DEFAULT 0);\n"
    "CREATE TABLE r (k TEXT NOT NULL PRIMARY KEY, v INTEGER NOT NULL DEFAULT 0);\n"
)
FAST = dataclasses.replace(
    RuntimeSettings.for_profile("lan"),
    io_timeout=0.5,
    sync=SyncConfig(request_timeout=0.5),
    sync_min_interval=0.2,
    sync_max_interval=0.5,
)
NO_SYNC = dataclasses.replace(FAST, sync_min_interval=1000.0, sync_max_interval=1000.0)
"""Periodic sync out of the way: what arrives came by broadcast (or the join's one urgent sync)."""


@dataclass
class Local:
    """A store, its threads and its runtimes (one per scope, or one for every scope), in this process."""

    store: Store
    threads: StoreThreads
    runtimes: dict[str | None, GossipRuntime] = field(default_factory=dict)

    async def write(self, *statements: tuple[str, list[Any]]) -> None:
        await self.threads.write(self.store.transact, [Statement(sql, params) for sql, params in statements])

    async def keys(self, table: str) -> set[str]:
        return {str(r[0]) for r in await self.threads.write(self.store.rows, table)}

    def addr(self, scope: str | None) -> Addr:
        a = self.runtimes[scope].addr
        assert a is not None
        return Addr(*a)


@pytest.fixture
async def make_local(tmp_path: Path) -> AsyncIterator[Any]:
    made: list[Local] = []

    async def make(name: str) -> Local:
        writer = ThreadPoolExecutor(max_workers=1)
        store = Store(tmp_path / name / "state.db", schema_sql=SCOPED_SCHEMA)
        node = Local(store, StoreThreads(store, writer=writer, readers=1))
        made.append(node)
        return node

    async def start(
        node: Local,
        scope: str | None,
        *,
        cluster_id: int = 0,
        bootstrap: tuple[Addr, ...] = (),
        settings: RuntimeSettings = FAST,
        registry: CollectorRegistry | None = None,
    ) -> GossipRuntime:
        cfg = GossipConfig(
            addr=Addr("127.0.0.1", 0),
            bootstrap=bootstrap,
            plaintext=True,
            enabled=True,
            cluster_id=cluster_id,
            region="x",
        )
        runtime = GossipRuntime(
            store=node.store,
            threads=node.threads,
            config=cfg,
            keyring=None,
            keyring_path=node.store.path.parent / "keyring.json",
            peers_file=peers_path(node.store.path, scope),
            settings=settings,
            registry=registry,
            scope=scope,
        )
        await runtime.start()
        node.runtimes[scope] = runtime
        return runtime

    make.start = start  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        for node in made:
            for runtime in node.runtimes.values():
                await runtime.stop()
            await asyncio.to_thread(node.threads.close)
            node.threads.writer.submit(node.store.close).result()
            node.threads.writer.shutdown()


async def _wait(what: str, check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    await until(what, timeout, check)


G = "INSERT INTO g (k, v) VALUES (?, 1)"
R = "INSERT INTO r (k, v) VALUES (?, 1)"


async def test_single_cluster_broadcasts_the_versions_of_both_actors(make_local: Any) -> None:
    """Without region mode one runtime carries every scope: a transaction writing a global and a regional
    table (two versions, one per actor) and a global-only one both travel by broadcast."""
    a, b = await make_local("a"), await make_local("b")
    await make_local.start(a, None, settings=NO_SYNC)
    await make_local.start(b, None, settings=NO_SYNC, bootstrap=(a.addr(None),))
    await _wait(
        "b to join a", lambda: _true(a.runtimes[None].member_count() == 2 == b.runtimes[None].member_count())
    )

    def quiet(
        rt: GossipRuntime,
    ) -> bool:  # the join's urgent sync is over: now only broadcast carries changes
        done = sum(n for (role, _), n in rt.stats.sessions.items() if role == "client")
        return done >= 1 and not rt._urgent and not rt._client_sessions

    await _wait("the join's syncs", lambda: _true(quiet(a.runtimes[None]) and quiet(b.runtimes[None])))
    await a.write((G, ["both"]), (R, ["both"]))
    await a.write((G, ["global-only"]))
    await _wait("both rows on b", lambda: _keys_are(b, {"g": {"both", "global-only"}, "r": {"both"}}))
    heads = (await b.runtimes[None].status())["heads"]
    assert heads[a.store.actor_for("global").hex()] == 2 and heads[a.store.site_id.hex()] == 1
    assert a.runtimes[None].broadcaster.stats.local_pieces == 3
    assert b.runtimes[None].stats.versions_merged == {"broadcast": 3, "sync": 0}


async def test_scoped_runtimes_keep_regional_versions_in_their_cluster(make_local: Any) -> None:
    """Two regions (x: a and b; y: c), each node with a regional and a global runtime, sync running fast:
    a's transaction writing both scopes reaches b whole, and c only in its global part; c never learns of
    a's regional actor. Both runtimes report into one registry, labelled by scope."""
    registry = CollectorRegistry()
    a, b, c = await make_local("a"), await make_local("b"), await make_local("c")
    await make_local.start(a, "regional", cluster_id=11, registry=registry)
    await make_local.start(a, "global", cluster_id=1, registry=registry)
    await make_local.start(b, "regional", cluster_id=11, bootstrap=(a.addr("regional"),))
    await make_local.start(b, "global", cluster_id=1, bootstrap=(a.addr("global"),))
    await make_local.start(c, "regional", cluster_id=12)
    await make_local.start(c, "global", cluster_id=1, bootstrap=(a.addr("global"),))
    ra, ga = a.runtimes["regional"], a.runtimes["global"]
    assert (ra.node_id, ga.node_id) == (a.store.site_id.hex(), a.store.actor_for("global").hex())
    await _wait(
        "the memberships",
        lambda: _true(
            [n.runtimes[s].member_count() for n in (a, b, c) for s in ("regional", "global")]
            == [2, 3, 2, 3, 1, 3]
        ),
    )
    await a.write((G, ["g1"]), (R, ["r1"]))
    await c.write((G, ["from-c"]), (R, ["c-only"]))
    await _wait("a's rows on b", lambda: _keys_are(b, {"g": {"g1", "from-c"}, "r": {"r1"}}))
    await _wait("a's global row on c", lambda: _keys_are(c, {"g": {"g1", "from-c"}, "r": {"c-only"}}))
    await asyncio.sleep(1.5)  # several sync rounds in every cluster
    assert await c.keys("r") == {"c-only"} and await a.keys("r") == {"r1"}
    books_c = await c.threads.write(lambda: set(c.store.books()))
    assert a.store.site_id not in books_c and a.store.actor_for("global") in books_c
    for n in (a, b, c):
        for scope, rt in n.runtimes.items():
            status = await rt.status()
            assert status["scope"] == scope and status["gaps"] == 0
            assert all(n.store.scope_of(bytes.fromhex(h)) == scope for h in status["heads"])
            assert rt.stats.merge_rejected == 0  # nothing of another scope was ever offered
    text = generate_latest(registry).decode()
    assert text.count("# HELP verdigris_gossip_members ") == 1
    assert 'verdigris_gossip_members{scope="regional",state="alive"} 2.0' in text
    assert 'verdigris_gossip_members{scope="global",state="alive"} 3.0' in text
    await ga.stop()
    text = generate_latest(registry).decode()
    assert 'scope="global"' not in text and 'scope="regional"' in text


async def _true(value: bool) -> bool:
    return value


async def _keys_are(node: Local, expected: dict[str, set[str]]) -> bool:
    return all([await node.keys(t) == keys for t, keys in expected.items()])
