"""A cluster of real agent processes on 127.0.0.1: convergence, kill -9, partitions, keys, catch-up.

Every agent is a ``verdigris agent`` subprocess with its own database, API port, gossip port and admin
socket. The tests drive them only from outside (the HTTP API, the admin socket, signals) and wait for
state by polling with a short interval and a deadline, never with fixed sleeps. Processes are always
killed at the end, whatever happens; an agent's log is printed when a test fails.

The partition is made with the agents' own fault injection (``[gossip] fault-injection = true`` and the
``fault block`` / ``fault heal`` admin commands), so no root, iptables or network namespace is needed.

Timings are printed (``pytest -rP`` shows them). ``VD_TEST_LOG=debug`` makes the agents log sync sessions.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from verdigris.admin import admin_call
from verdigris.gossip.keyring import fingerprint

SCHEMA = (
    "CREATE TABLE kv (k TEXT NOT NULL PRIMARY KEY, v INTEGER NOT NULL DEFAULT 0, "
    "w TEXT NOT NULL DEFAULT '', pad TEXT);\n"
)
UPSERT = (
    "INSERT INTO kv (k, v, w) VALUES (?, ?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v, w = excluded.w"
)
POLL = 0.1
"""Interval of every poll: short, so a wait ends soon after its condition holds."""


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


def free_port() -> int:
    """A port free for both TCP and UDP (gossip uses both on one port)."""
    for _ in range(50):
        with socket.socket() as t:
            t.bind(("127.0.0.1", 0))
            port = int(t.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


async def until(what: str, timeout: float, check: Callable[[], Awaitable[bool]]) -> float:
    """Poll ``check`` every :data:`POLL` s until it is true; return the time it took. Fails (naming
    ``what``) after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        if await check():
            return loop.time() - start
        if loop.time() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(POLL)


@dataclass
class Node:
    """One agent process and everything needed to start, stop and talk to it."""

    name: str
    root: Path
    admin_dir: Path
    api_port: int
    gossip_port: int
    http: aiohttp.ClientSession
    key: str | None = None
    plaintext: bool = False
    bootstrap: list[str] = field(default_factory=list)
    region: str = ""
    metrics_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def gossip(self) -> str:
        return f"127.0.0.1:{self.gossip_port}"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def log(self) -> Path:
        return self.root / "agent.log"

    @property
    def admin_path(self) -> Path:
        return self.admin_dir / "admin.sock"

    def write_config(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "schema.sql").write_text(SCHEMA)
        lines = [
            "[db]",
            f'path = "{self.root / "state.db"}"',
            f'schema_paths = ["{self.root / "schema.sql"}"]',
            "[api]",
            f'addr = "127.0.0.1:{self.api_port}"',
            "[admin]",
            f'path = "{self.admin_path}"',
            "[gossip]",
            f'addr = "{self.gossip}"',
            f"bootstrap = {json.dumps(self.bootstrap)}",
            f'region = "{self.region}"',
            "fault-injection = true",
        ]
        lines.append("plaintext = true" if self.plaintext else f'key = "{self.key}"')
        if self.metrics_port is not None:
            lines += ["[telemetry.prometheus]", f'addr = "127.0.0.1:{self.metrics_port}"']
        lines += ["[log]", f'level = "{os.environ.get("VD_TEST_LOG", "info")}"', "colors = false"]
        path = self.root / "agent.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self) -> None:
        config = self.write_config()
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "verdigris.cli", "agent", "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def ready(self, timeout: float = 30.0) -> None:
        async def healthy() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                async with self.http.get(
                    f"{self.api}/v1/health", timeout=aiohttp.ClientTimeout(total=2)
                ) as r:
                    return r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                return False

        await until(f"{self.name} to answer /v1/health", timeout, healthy)

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 10.0) -> int | None:
        """SIGTERM (graceful leave), then SIGKILL if it does not exit in time."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return None

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # --- talking to it ------------------------------------------------------------------------

    async def admin(self, command: dict[str, Any]) -> dict[str, Any]:
        reply = await asyncio.to_thread(admin_call, self.admin_path, command, 10.0)
        assert reply.get("ok"), reply
        return reply

    async def health(self) -> dict[str, Any]:
        async with self.http.get(f"{self.api}/v1/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
            body: dict[str, Any] = (await r.json())["response"]
            return body

    async def rows(self) -> list[list[Any]]:
        return await self.query("SELECT k, v, w FROM kv ORDER BY k")

    async def query(self, sql: str) -> list[list[Any]]:
        """The rows ``sql`` returns (each row's values)."""
        async with self.http.post(
            f"{self.api}/v1/queries", json=sql, timeout=aiohttp.ClientTimeout(total=10)
        ) as r:
            assert r.status == 200, await r.text()
            out: list[list[Any]] = []
            for line in (await r.read()).decode().splitlines():
                event = json.loads(line)
                assert "error" not in event, event
                if "row" in event:
                    out.append(event["row"][1])
            return out

    async def digest(self) -> str:
        return hashlib.sha256(json.dumps(await self.rows()).encode()).hexdigest()

    async def write(self, statements: list[Any], timeout: float = 5.0) -> int | None:
        """Run a transaction; its version when acknowledged, None when it was not (agent down...)."""
        try:
            async with self.http.post(
                f"{self.api}/v1/transactions", json=statements, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as r:
                if r.status != 200:
                    return None
                version = (await r.json()).get("version")
                return int(version) if version is not None else None
        except (aiohttp.ClientError, TimeoutError, ConnectionError):
            return None


class Cluster:
    """Nodes made by :meth:`add`; :meth:`close` kills every process and removes the sockets' directory."""

    def __init__(self, root: Path, http: aiohttp.ClientSession) -> None:
        self.root = root
        self.http = http
        self.admin_root = Path(tempfile.mkdtemp(prefix="vdc"))  # unix socket paths must stay short
        self.nodes: list[Node] = []

    def add(self, *, key: str | None, bootstrap: list[str] | None = None, **kw: Any) -> Node:
        i = len(self.nodes)
        admin_dir = self.admin_root / str(i)
        admin_dir.mkdir()
        node = Node(
            name=f"n{i}",
            root=self.root / f"n{i}",
            admin_dir=admin_dir,
            api_port=free_port(),
            gossip_port=free_port(),
            http=self.http,
            key=key,
            bootstrap=bootstrap or [],
            **kw,
        )
        self.nodes.append(node)
        return node

    async def start(self, nodes: list[Node]) -> None:
        for n in nodes:
            n.start()
        await asyncio.gather(*(n.ready() for n in nodes))

    async def wait_members(self, nodes: list[Node], count: int, timeout: float = 30.0) -> float:
        async def all_see() -> bool:
            healths = await asyncio.gather(*(n.health() for n in nodes))
            return all(h["members"] == count for h in healths)

        return await until(f"{len(nodes)} nodes to see {count} members", timeout, all_see)

    async def converged(self, nodes: list[Node]) -> bool:
        """Identical rows, identical heads, no gaps and no partial versions anywhere."""
        digests = await asyncio.gather(*(n.digest() for n in nodes))
        if len(set(digests)) != 1:
            return False
        statuses = await asyncio.gather(*(n.admin({"cmd": "status"}) for n in nodes))
        heads = [s["heads"] for s in statuses]
        return all(h == heads[0] for h in heads) and all(
            s["gaps"] == 0 and s["partials"] == 0 for s in statuses
        )

    def close(self) -> None:
        procs = [n for n in self.nodes if n.alive()]
        for n in procs:
            assert n.proc is not None
            n.proc.kill()
        for n in procs:
            assert n.proc is not None
            n.proc.wait(timeout=10)
        shutil.rmtree(self.admin_root, ignore_errors=True)

    def dump_logs(self) -> None:
        for n in self.nodes:
            print(f"----- {n.name} ({n.gossip}) -----\n{n.tail(60)}")


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    async with aiohttp.ClientSession() as http:
        c = Cluster(tmp_path, http)
        try:
            yield c
        finally:
            c.close()
            c.dump_logs()  # captured: pytest shows it only when the test failed


class Writer:
    """Concurrent writes to random nodes, remembering what was acknowledged (and what was attempted)."""

    def __init__(self, nodes: list[Node], seed: int, shared_keys: int = 8) -> None:
        self.nodes = nodes
        self.rng = random.Random(seed)
        self.acked: dict[str, tuple[int, str]] = {}
        """Unique keys: key -> (value, writer) of the acknowledged write."""
        self.shared: dict[str, set[int]] = {}
        """Shared keys (written by many nodes, to make conflicts): key -> every value attempted."""
        self.shared_keys = shared_keys
        self.attempts = 0
        self.failures = 0
        self._n = 0

    async def write_one(self, node: Node) -> bool:
        self._n += 1
        n = self._n
        key = f"u{n:06d}"
        shared = f"s{self.rng.randrange(self.shared_keys)}"
        self.shared.setdefault(shared, set()).add(n)
        self.attempts += 1
        version = await node.write(
            [[UPSERT, [key, n, node.name]], [UPSERT, [shared, n, node.name]]], timeout=5.0
        )
        if version is None:
            self.failures += 1
            return False
        self.acked[key] = (n, node.name)
        return True

    async def run(self, count: int, *, among: list[Node] | None = None, concurrency: int = 4) -> None:
        """Make ``count`` acknowledged writes to random nodes of ``among`` (default: all running)."""
        done = 0

        async def worker() -> None:
            nonlocal done
            while done < count:
                pool = [n for n in (among or self.nodes) if n.alive()]
                if await self.write_one(self.rng.choice(pool)):
                    done += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))

    def check(self, rows: list[list[Any]]) -> None:
        """No acknowledged write is missing, and shared keys hold one of the values written."""
        stored = {str(k): (int(v), str(w)) for k, v, w in rows}
        missing = [k for k in self.acked if k not in stored]
        assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:5]}"
        wrong = [k for k, val in self.acked.items() if stored[k] != val]
        assert not wrong, f"acknowledged values changed: {[(k, stored[k], self.acked[k]) for k in wrong[:5]]}"
        for k, values in self.shared.items():
            if k in stored:
                assert stored[k][0] in values, (k, stored[k])


# ------------------------------------------------------------------------------------------------ tests


@pytest.mark.timeout(60)
async def test_three_agents_converge_on_writes_made_at_each(cluster: Cluster) -> None:
    key = new_key()
    seed = cluster.add(key=key)
    others = [cluster.add(key=key, bootstrap=[seed.gossip]) for _ in range(2)]
    nodes = [seed, *others]
    await cluster.start(nodes)
    joined = await cluster.wait_members(nodes, 3)

    loop = asyncio.get_running_loop()
    t0 = loop.time()
    writer = Writer(nodes, seed=1)
    for node in nodes:  # writes made at each node
        for _ in range(10):
            assert await writer.write_one(node)
    took = await until("3 nodes to converge", 20, lambda: cluster.converged(nodes))
    rows = await nodes[0].rows()
    writer.check(rows)
    assert len(rows) == 30 + len(writer.shared)
    members = (await nodes[1].admin({"cmd": "members"}))["members"]
    assert [m["state"] for m in members] == ["alive"] * 3
    assert {m["api"] for m in members} == {n.api.removeprefix("http://") for n in nodes}
    print(
        f"joined in {joined:.2f} s; converged {took:.2f} s after the last write ({loop.time() - t0:.2f} s total)"
    )


@pytest.mark.timeout(170)
async def test_ten_agents_survive_kill9_and_a_partition(cluster: Cluster) -> None:
    """The issue's test: 10 agents from 3 seeds, writes to random nodes, one agent kill -9'd and
    restarted, the cluster split in halves and healed; every node ends identical, with no gaps and no
    acknowledged write lost, within 30 s of the heal."""
    key = new_key()
    seeds = [cluster.add(key=key) for _ in range(3)]
    addrs = [s.gossip for s in seeds]
    for i, s in enumerate(seeds):
        s.bootstrap = [a for j, a in enumerate(addrs) if j != i]
    nodes = seeds + [cluster.add(key=key, bootstrap=addrs) for _ in range(7)]
    for i, n in enumerate(nodes):
        n.region = "ams" if i < 5 else "ord"
    loop = asyncio.get_running_loop()
    t_start = loop.time()
    await cluster.start(nodes)
    started = loop.time() - t_start
    joined = await cluster.wait_members(nodes, 10, timeout=40)
    writer = Writer(nodes, seed=2)

    # Writes while one agent is killed with SIGKILL in the middle of them, then restarted.
    victim = nodes[7]
    writes = asyncio.create_task(writer.run(200))
    await until("the first 60 writes", 30, lambda: _true(len(writer.acked) >= 60))
    victim.kill9()
    await writes
    victim.start()
    await victim.ready()
    await cluster.wait_members(nodes, 10, timeout=30)

    # Split in two halves; wait until each half holds the other dead, and keep writing to both.
    left, right = nodes[:5], nodes[5:]
    ids = {n.name: (await n.admin({"cmd": "ping"}))["site_id"] for n in nodes}
    for side, other in ((left, right), (right, left)):
        for n in side:
            await n.admin({"cmd": "fault", "action": "block", "addrs": [o.gossip for o in other]})
    t_split = loop.time()

    async def split_seen() -> bool:
        for watcher, other in ((left[0], right), (right[0], left)):
            members = {m["id"]: m["state"] for m in (await watcher.admin({"cmd": "members"}))["members"]}
            if any(members.get(ids[o.name]) != "dead" for o in other):
                return False
        return True

    await until("each half to hold the other dead", 30, split_seen)
    detected = loop.time() - t_split
    await writer.run(150)
    # The partition is real: what the right half wrote is not on the left.
    right_only = [k for k, (_, w) in writer.acked.items() if w in {n.name for n in right}]
    left_keys = {r[0] for r in await left[0].rows()}
    assert right_only and not (set(right_only[-20:]) <= left_keys)

    for n in nodes:
        await n.admin({"cmd": "fault", "action": "heal"})
    t_heal = loop.time()
    converged = await until("the healed cluster to converge", 30, lambda: cluster.converged(nodes))
    rows = await nodes[0].rows()
    writer.check(rows)
    assert len(writer.acked) >= 350
    await cluster.wait_members(nodes, 10, timeout=30)
    statuses = [await n.admin({"cmd": "status"}) for n in nodes]
    assert all(s["dropped"]["udp"].get("auth_failed", 0) == 0 for s in statuses)
    synced = sum(s["merged"]["versions"]["sync"] for s in statuses)
    assert synced > 0  # what was written during the split crossed by sync
    print(
        f"10 agents: started {started:.1f} s, joined {joined:.1f} s; split seen in {detected:.1f} s; "
        f"converged {converged:.2f} s after the heal ({loop.time() - t_heal:.1f} s incl. checks); "
        f"{len(writer.acked)} acknowledged writes, {writer.failures} refused while an agent was down; "
        f"{synced} versions merged by sync"
    )
    for n in nodes:
        assert n.terminate() == 0, n.tail()


async def _true(value: bool) -> bool:
    return value


@pytest.mark.timeout(60)
async def test_wrong_key_and_plaintext_nodes_cannot_join(cluster: Cluster) -> None:
    key = new_key()
    a = cluster.add(key=key, metrics_port=free_port())
    b = cluster.add(key=key, bootstrap=[a.gossip])
    intruder = cluster.add(key=new_key(), bootstrap=[a.gossip, b.gossip])
    plain = cluster.add(key=None, plaintext=True, bootstrap=[a.gossip])
    await cluster.start([a, b, intruder, plain])
    await cluster.wait_members([a, b], 2)

    async def dropped() -> bool:
        udp = (await a.admin({"cmd": "status"}))["dropped"]["udp"]
        # several join attempts of each, all refused at the envelope
        return udp.get("auth_failed", 0) >= 3 and udp.get("plaintext_refused", 0) >= 3

    await until("the intruders' packets to be dropped", 20, dropped)
    for outsider in (intruder, plain):
        assert (await outsider.health())["members"] == 1
    ids = {m["id"] for m in (await a.admin({"cmd": "members"}))["members"]}
    assert ids == {(await n.admin({"cmd": "ping"}))["site_id"] for n in (a, b)}
    # The drops are in the agent's Prometheus metrics too.
    async with a.http.get(f"http://127.0.0.1:{a.metrics_port}/metrics") as r:
        text = await r.text()
    counts = {
        reason: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        for reason in ("auth_failed", "plaintext_refused")
        if line.startswith("verdigris_gossip_bad_packets_total{")
        and 'transport="udp"' in line
        and f'reason="{reason}"' in line
    }
    assert counts["auth_failed"] >= 3 and counts["plaintext_refused"] >= 3, counts
    assert 'verdigris_gossip_members{state="alive"} 2.0' in text
    wire = {
        line.split("{", 1)[1].split("}", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("verdigris_gossip_bytes_total{")
    }
    # Every datagram counted: at least the 2 × 3 dropped ones came in, and a has been gossiping to b.
    assert wire['direction="in",transport="udp"'] > 0 and wire['direction="out",transport="udp"'] > 0, wire
    # A write on the intruder never reaches the cluster, while cluster writes still flow.
    assert await intruder.write([[UPSERT, ["intruder", 1, "x"]]]) is not None
    assert await a.write([[UPSERT, ["member", 1, "a"]]]) is not None
    await until("b to get a's write", 10, lambda: _has(b, "member"))
    assert "intruder" not in {r[0] for r in await b.rows()}


async def _has(node: Node, key: str) -> bool:
    return key in {r[0] for r in await node.rows()}


@pytest.mark.timeout(90)
async def test_key_rotation_across_live_agents_with_writes_going_on(cluster: Cluster) -> None:
    old, new = new_key(), new_key()
    seed = cluster.add(key=old)
    nodes = [seed, *(cluster.add(key=old, bootstrap=[seed.gossip]) for _ in range(2))]
    await cluster.start(nodes)
    await cluster.wait_members(nodes, 3)
    writer = Writer(nodes, seed=3)
    stop = asyncio.Event()

    async def keep_writing() -> None:
        while not stop.is_set():
            await writer.run(5, concurrency=1)

    background = asyncio.create_task(keep_writing())
    try:
        for action, key in (("install", new), ("use", new)):
            for n in nodes:
                reply = await n.admin({"cmd": "keys", "action": action, "key": key})
                assert reply["changed"]
            marker = f"after-{action}"
            await nodes[-1].write([[UPSERT, [marker, 0, action]]])
            await until(f"writes to flow after `keys {action}`", 15, lambda m=marker: _all_have(nodes, m))
        for n in nodes:
            reply = await n.admin({"cmd": "keys", "action": "remove", "key": old})
            assert reply["keys"] == [fingerprint(new)] and reply["primary"] == fingerprint(new)
        await nodes[0].write([[UPSERT, ["after-remove", 0, "remove"]]])
        await until("writes to flow after `keys remove`", 15, lambda: _all_have(nodes, "after-remove"))
    finally:
        stop.set()
        await background
    await until("convergence after the rotation", 20, lambda: cluster.converged(nodes))
    writer.check(await nodes[1].rows())
    for n in nodes:
        status = await n.admin({"cmd": "status"})
        assert status["dropped"]["udp"].get("auth_failed", 0) == 0, status["dropped"]
        assert status["dropped"]["tcp"].get("auth_failed", 0) == 0, status["dropped"]
        saved = json.loads((n.root / "keyring.json").read_text())
        assert [fingerprint(k) for k in saved["keys"]] == [fingerprint(new)]

    # The rotation survives a restart: the node comes back with the keyring file (its config still
    # names the old key) and rejoins.
    restarted = nodes[2]
    assert restarted.terminate() == 0
    restarted.start()
    await restarted.ready()
    await cluster.wait_members(nodes, 3)
    assert "not in the keyring file" in restarted.log.read_text()
    await nodes[0].write([[UPSERT, ["after-restart", 0, "x"]]])
    await until("the restarted node to get new writes", 15, lambda: _has(restarted, "after-restart"))


async def _all_have(nodes: list[Node], key: str) -> bool:
    return all(await asyncio.gather(*(_has(n, key) for n in nodes)))


@pytest.mark.timeout(90)
async def test_node_down_during_many_writes_catches_up_by_sync(cluster: Cluster) -> None:
    key = new_key()
    seed = cluster.add(key=key)
    nodes = [seed, *(cluster.add(key=key, bootstrap=[seed.gossip]) for _ in range(2))]
    await cluster.start(nodes)
    await cluster.wait_members(nodes, 3)
    writer = Writer(nodes, seed=4)
    await writer.run(20)
    down = nodes[2]
    down.kill9()
    up = nodes[:2]
    await writer.run(600, among=up, concurrency=6)
    # One large transaction too: more changes than fit a datagram, so it can only travel by sync.
    pad = "x" * 200
    big = [[UPSERT, [f"big{i:05d}", i, "big"]] for i in range(2000)]
    big.append(["UPDATE kv SET pad = ? WHERE w = 'big'", [pad]])
    assert await up[0].write(big, timeout=30) is not None
    await until("the two live nodes to converge", 20, lambda: cluster.converged(up))
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    down.start()
    await down.ready()
    caught_up = await until("the restarted node to catch up", 30, lambda: cluster.converged(nodes))
    status = await down.admin({"cmd": "status"})
    assert status["merged"]["versions"]["sync"] >= 500  # (a few may still come by broadcast)
    writer.check(await down.rows())
    assert len(await down.rows()) >= 2000 + 620
    print(
        f"caught up with {status['merged']['versions']['sync']} versions by sync "
        f"{caught_up:.2f} s after the restart was ready ({loop.time() - t0:.2f} s incl. start)"
    )
