"""Helpers of the real-process cluster benchmarks (``bench/cluster_*.py``; not a public module).

* :class:`Procs` starts every child process (agents, Serf) and kills them all at the end, whatever happens:
  each child runs in a session of its own (a Ctrl-C in the terminal reaches only the benchmark, which then
  kills them), dies with the benchmark if the benchmark itself is killed (``PR_SET_PDEATHSIG``), and
  :func:`run_guarded` turns SIGTERM / SIGHUP into the same clean-up as Ctrl-C.
* :class:`VerdigrisCluster` / :class:`VerdigrisNode`: N ``verdigris agent`` processes on 127.0.0.1, each with
  its own database, API port, gossip port and admin socket, encrypted with one generated key.
* :class:`SerfCluster` / :class:`SerfNode`: N ``serf agent`` processes (Debian's ``serf``), driven through
  Serf's msgpack RPC (:class:`SerfRpc`, a few dozen lines: handshake, event, members, stream).
* :class:`Traffic`: bytes and packets sent on loopback by a group of ports, counted by nftables rules in
  the kernel (exact, no capture, no cost to the processes measured); needs root and ``nft``.
* :class:`CpuMeter`: CPU time of processes and of the whole machine, from ``/proc``.

Only 127.0.0.1 is ever used.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from _util import BenchFailure

HOST = "127.0.0.1"
POLL = 0.1
"""Interval of every poll (health, membership): short, so a wait ends soon after its condition holds."""

PROBE_SCHEMA = (
    "CREATE TABLE probes (id INTEGER NOT NULL PRIMARY KEY, ts INTEGER NOT NULL DEFAULT 0, "
    "origin INTEGER NOT NULL DEFAULT 0);\n"
)
"""The propagation benchmarks' table: one row per write, ``ts`` = ``time.time_ns()`` when it was sent."""
PROBE_INSERT = "INSERT INTO probes (id, ts, origin) VALUES (?, ?, ?)"


# ------------------------------------------------------------------------------------------------ helpers


def new_key() -> str:
    """A 32-byte AES key, base64: accepted by both ``verdigris`` (gossip.key) and ``serf -encrypt``."""
    return base64.b64encode(os.urandom(32)).decode()


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports on 127.0.0.1 that are free for both TCP and UDP (gossip uses both)."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(n * 20):
            if len(ports) == n:
                break
            t = socket.socket()
            t.bind((HOST, 0))
            port = int(t.getsockname()[1])
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                u.bind((HOST, port))
            except OSError:
                t.close()
                u.close()
                continue
            held += [t, u]
            ports.append(port)
    finally:
        for s in held:
            s.close()
    if len(ports) < n:
        raise BenchFailure(f"found only {len(ports)} of {n} free ports")
    return ports


def pct(xs: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (nearest rank) of ``xs``."""
    s = sorted(xs)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, max(0, int(p / 100 * len(s) + 0.5) - 1))]


async def until(what: str, timeout: float, check: Callable[[], Awaitable[bool]]) -> float:
    """Poll ``check`` every :data:`POLL` s until it holds; the time it took. BenchFailure after ``timeout``."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise BenchFailure(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(POLL)


def machine_load() -> dict[str, float]:
    """The load averages (1, 5 min) now."""
    l1, l5, _ = os.getloadavg()
    return {"loadavg_1m": round(l1, 2), "loadavg_5m": round(l5, 2)}


# ------------------------------------------------------------------------------------------------ processes

_PR_SET_PDEATHSIG = 1
try:
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux
    _prctl = None


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: be killed when the benchmark dies, however it dies."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)


def log_tail(log: Path, lines: int = 20) -> str:
    """The last lines of a process log, for error messages."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def log_matches(log: Path, pattern: str) -> list[str]:
    """Every match of ``pattern``'s group in a process log, in order (none when it cannot be read)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return []
    return re.findall(pattern, text)


class Procs:
    """Every child process of the benchmark; :meth:`kill_all` ends them (SIGKILL) and reaps them."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # only prctl: nothing that could deadlock
                env=env,
            )
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        self.procs = [p for p in self.procs if p.poll() is None]


def run_guarded(main: Callable[[], int]) -> int:
    """Run ``main`` with SIGTERM and SIGHUP raising KeyboardInterrupt (so every ``finally`` runs, as on
    Ctrl-C); a Ctrl-C ends the benchmark with status 130 and no figures."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    # Ctrl-C must work even when started with SIGINT ignored (``cmd &`` in a script); asyncio.run then
    # turns it into the cancellation of the running benchmark (its ``finally`` blocks run).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return main()
    except KeyboardInterrupt:
        print("interrupted: all processes stopped", file=sys.stderr)
        return 130


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from ``/proc/stat``."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    total = sum(parts[:8])
    return (total - idle) / tick, total / tick


def _own_cpu() -> float:
    """CPU seconds used by this (benchmark) process."""
    t = os.times()
    return t.user + t.system


class CpuMeter:
    """CPU used between :meth:`start` and :meth:`stop` by some processes and by the whole machine."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._t0 = 0.0
        self._procs0: list[float] = []
        self._machine0 = (0.0, 0.0)
        self._self0 = 0.0

    def start(self) -> CpuMeter:
        self._t0 = time.monotonic()
        self._procs0 = [proc_cpu_seconds(p) for p in self.pids]
        self._machine0 = machine_cpu()
        self._self0 = _own_cpu()
        return self

    def stop(self) -> dict[str, float]:
        wall = max(1e-9, time.monotonic() - self._t0)
        used = [proc_cpu_seconds(p) - c for p, c in zip(self.pids, self._procs0, strict=True)]
        busy, total = machine_cpu()
        bench = (_own_cpu() - self._self0) / wall
        cpus = os.cpu_count() or 1
        machine_busy = (busy - self._machine0[0]) / max(1e-9, total - self._machine0[1])
        agents = sum(used) / wall
        return {
            "seconds": round(wall, 2),
            "agent_cpu_pct_mean": round(100 * agents / len(used), 2) if used else 0.0,
            "agents_cpu_cores": round(agents, 3),
            "bench_cpu_cores": round(bench, 3),
            "other_cpu_cores": round(max(0.0, machine_busy * cpus - agents - bench), 3),
            "machine_busy_pct": round(100 * machine_busy, 1),
            "machine_cores": cpus,
        }


# ------------------------------------------------------------------------------------------------ traffic


@dataclass
class TrafficSnapshot:
    at: float
    counters: dict[str, tuple[int, int]]
    """comment -> (packets, bytes)."""


class Traffic:
    """Loopback traffic of port groups, counted by the kernel (nftables, hook ``output``).

    For a group of ports P (the gossip ports of one cluster), three rules count every packet the group's
    processes send to each other exactly once: UDP to a port of P (datagrams: both ends are in P), TCP to a
    port of P (the client side of a stream, connecting from an ephemeral port), TCP from a port of P (the
    server side). Bytes are IP packet lengths: headers included (28 bytes per UDP datagram), as on a
    wire. The benchmark's own API and RPC traffic is on other ports and is not counted. Needs root and
    the ``nft`` command (Debian: ``nftables``); :attr:`available` says whether it works here.
    """

    def __init__(self, groups: dict[str, Sequence[int]]) -> None:
        self.table = f"vdbench{os.getpid()}"
        self.groups = {g: sorted(ports) for g, ports in groups.items()}
        self.available = False
        self.reason = ""

    def __enter__(self) -> Traffic:
        nft = shutil.which("nft")
        if nft is None:
            self.reason = "nft not found (Debian: apt-get install -y nftables)"
            return self
        if os.geteuid() != 0:
            self.reason = "nftables counters need root"
            return self
        self._remove_stale(nft)
        lines = [f"table inet {self.table} {{", "  chain out {", "    type filter hook output priority 0;"]
        for g, ports in self.groups.items():
            s = "{ " + ", ".join(str(p) for p in ports) + " }"
            lines += [
                f'    ip daddr {HOST} udp dport {s} counter comment "{g}:udp"',
                f'    ip daddr {HOST} tcp dport {s} counter comment "{g}:tcp_to"',
                f'    ip daddr {HOST} tcp sport {s} counter comment "{g}:tcp_from"',
            ]
            lines += [f'    ip daddr {HOST} udp sport {p} counter comment "{g}:udp_from:{p}"' for p in ports]
        lines += ["  }", "}"]
        proc = subprocess.run(
            [nft, "-f", "-"], input="\n".join(lines) + "\n", capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            self.reason = f"nft failed: {proc.stderr.strip()[:200]}"
            return self
        self.available = True
        return self

    @staticmethod
    def _remove_stale(nft: str) -> None:
        """Tables left by a benchmark that was killed with SIGKILL (its process is gone)."""
        out = subprocess.run([nft, "list", "tables"], capture_output=True, text=True, check=False).stdout
        for pid in re.findall(r"^table inet vdbench(\d+)$", out, re.MULTILINE):
            if not os.path.exists(f"/proc/{pid}"):
                subprocess.run(
                    [nft, "delete", "table", "inet", f"vdbench{pid}"], capture_output=True, check=False
                )

    def __exit__(self, *exc: object) -> None:
        if self.available:
            subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True, check=False)
            self.available = False

    def snapshot(self) -> TrafficSnapshot:
        now = time.monotonic()
        if not self.available:
            return TrafficSnapshot(now, {})
        out = subprocess.run(
            ["nft", "-j", "list", "table", "inet", self.table], capture_output=True, text=True, check=True
        ).stdout
        counters: dict[str, tuple[int, int]] = {}
        for item in json.loads(out).get("nftables", []):
            rule = item.get("rule")
            if not rule or "comment" not in rule:
                continue
            for expr in rule.get("expr", []):
                if "counter" in expr:
                    c = expr["counter"]
                    counters[rule["comment"]] = (int(c["packets"]), int(c["bytes"]))
        return TrafficSnapshot(now, counters)

    def rates(self, a: TrafficSnapshot, b: TrafficSnapshot, group: str, nodes: int) -> dict[str, Any] | None:
        """Bytes and packets per second per node of ``group`` between two snapshots (None if unavailable)."""
        if not a.counters or not b.counters:
            return None
        dt = max(1e-9, b.at - a.at)

        def delta(key: str) -> tuple[int, int]:
            pa, ba = a.counters.get(key, (0, 0))
            pb, bb = b.counters.get(key, (0, 0))
            return pb - pa, bb - ba

        udp, tcp_to, tcp_from = delta(f"{group}:udp"), delta(f"{group}:tcp_to"), delta(f"{group}:tcp_from")
        total_bytes = udp[1] + tcp_to[1] + tcp_from[1]
        total_packets = udp[0] + tcp_to[0] + tcp_from[0]
        per_node_udp = [delta(f"{group}:udp_from:{p}")[1] / dt for p in self.groups[group]]
        return {
            "seconds": round(dt, 2),
            "bytes_per_s_per_node": round(total_bytes / dt / nodes, 1),
            "packets_per_s_per_node": round(total_packets / dt / nodes, 2),
            "udp_bytes_per_s_per_node": round(udp[1] / dt / nodes, 1),
            "tcp_bytes_per_s_per_node": round((tcp_to[1] + tcp_from[1]) / dt / nodes, 1),
            "udp_sent_bytes_per_s_node_min": round(min(per_node_udp), 1),
            "udp_sent_bytes_per_s_node_median": round(sorted(per_node_udp)[len(per_node_udp) // 2], 1),
            "udp_sent_bytes_per_s_node_max": round(max(per_node_udp), 1),
        }


# ------------------------------------------------------------------------------------------------ verdigris


class AdminConn:
    """A persistent connection to an agent's admin socket (one JSON command per line)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._rw: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._lock = asyncio.Lock()

    async def call(self, command: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        async with self._lock:
            for attempt in (1, 2):
                try:
                    if self._rw is None:
                        self._rw = await asyncio.wait_for(
                            asyncio.open_unix_connection(str(self.path), limit=16 * 1024 * 1024), timeout
                        )
                    reader, writer = self._rw
                    writer.write(json.dumps(command).encode() + b"\n")
                    line = await asyncio.wait_for(reader.readline(), timeout)
                    if not line:
                        raise ConnectionError("admin socket closed")
                    reply: dict[str, Any] = json.loads(line)
                    if not reply.get("ok"):
                        raise BenchFailure(f"admin {command.get('cmd')} on {self.path}: {reply}")
                    return reply
                except (OSError, TimeoutError, ConnectionError, ValueError):
                    self.close()
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

    def close(self) -> None:
        if self._rw is not None:
            self._rw[1].close()
            self._rw = None


@dataclass
class VerdigrisNode:
    """One ``verdigris agent`` process."""

    index: int
    root: Path
    admin_path: Path
    api_port: int
    gossip_port: int
    key: str
    bootstrap: list[str]
    schema: str
    log_level: str = "warning"
    proc: subprocess.Popen[bytes] | None = None
    admin: AdminConn = field(init=False)

    def __post_init__(self) -> None:
        self.admin = AdminConn(self.admin_path)

    @property
    def name(self) -> str:
        return f"v{self.index}"

    @property
    def gossip(self) -> str:
        return f"{HOST}:{self.gossip_port}"

    @property
    def api(self) -> str:
        return f"http://{HOST}:{self.api_port}"

    @property
    def log(self) -> Path:
        return self.root / "agent.log"

    def write_config(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "schema.sql").write_text(self.schema)
        lines = [
            "[db]",
            f'path = "{self.root / "state.db"}"',
            f'schema_paths = ["{self.root / "schema.sql"}"]',
            "[api]",
            f'addr = "{HOST}:{self.api_port}"',
            "[admin]",
            f'path = "{self.admin_path}"',
            "[gossip]",
            f'addr = "{self.gossip}"',
            f"bootstrap = {json.dumps(self.bootstrap)}",
            f'key = "{self.key}"',
            'profile = "lan"',
            "[log]",
            f'level = "{self.log_level}"',
            "colors = false",
        ]
        path = self.root / "agent.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, procs: Procs) -> None:
        config = self.write_config()
        self.admin.close()
        self.proc = procs.start([sys.executable, "-m", "verdigris.cli", "agent", "-c", str(config)], self.log)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.admin.close()

    def tail(self, lines: int = 20) -> str:
        return log_tail(self.log, lines)

    def members_down_logged(self) -> list[str]:
        """Gossip addresses this agent logged as ``member down`` (declared dead), in order."""
        return log_matches(self.log, r"member down: \S+ at (\S+)")


class VerdigrisCluster:
    """N agents; the first ``seeds`` are everyone's bootstrap list. :meth:`close` kills them all."""

    def __init__(
        self, procs: Procs, root: Path, n: int, *, schema: str, key: str | None = None, seeds: int = 3
    ) -> None:
        self.procs = procs
        self.root = root
        self.key = key or new_key()
        self.admin_root = Path(tempfile.mkdtemp(prefix="vdbench-"))  # unix socket paths must stay short
        ports = free_ports(2 * n)
        api_ports, gossip_ports = ports[:n], ports[n:]
        seed_addrs = [f"{HOST}:{p}" for p in gossip_ports[:seeds]]
        self.nodes = [
            VerdigrisNode(
                index=i,
                root=root / f"v{i}",
                admin_path=self.admin_root / f"{i}.sock",
                api_port=api_ports[i],
                gossip_port=gossip_ports[i],
                key=self.key,
                bootstrap=[a for a in seed_addrs if a != f"{HOST}:{gossip_ports[i]}"],
                schema=schema,
            )
            for i in range(n)
        ]
        self.http: aiohttp.ClientSession | None = None

    @property
    def gossip_ports(self) -> list[int]:
        return [n.gossip_port for n in self.nodes]

    async def __aenter__(self) -> VerdigrisCluster:
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        if self.http is not None:
            await self.http.close()

    def close(self) -> None:
        for n in self.nodes:
            n.admin.close()
            if n.alive():
                assert n.proc is not None
                n.proc.kill()
        for n in self.nodes:
            if n.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    n.proc.wait(timeout=10)
        shutil.rmtree(self.admin_root, ignore_errors=True)

    async def health(self, node: VerdigrisNode) -> dict[str, Any] | None:
        assert self.http is not None
        try:
            async with self.http.get(f"{node.api}/v1/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                if r.status != 200:
                    return None
                body: dict[str, Any] = (await r.json())["response"]
                return body
        except (aiohttp.ClientError, TimeoutError, ConnectionError):
            return None

    async def ready(self, nodes: Sequence[VerdigrisNode], timeout: float = 120.0) -> float:
        async def all_healthy() -> bool:
            for n in nodes:
                if n.proc is not None and n.proc.poll() is not None:
                    raise BenchFailure(f"{n.name} exited with {n.proc.returncode}:\n{n.tail()}")
            hs = await asyncio.gather(*(self.health(n) for n in nodes))
            return all(h is not None for h in hs)

        return await until(f"{len(nodes)} agents to answer /v1/health", timeout, all_healthy)

    async def wait_members(
        self, count: int, nodes: Sequence[VerdigrisNode] | None = None, timeout: float = 60.0
    ) -> float:
        nodes = list(nodes or self.nodes)

        async def all_see() -> bool:
            hs = await asyncio.gather(*(self.health(n) for n in nodes))
            return all(h is not None and h["members"] == count for h in hs)

        return await until(f"{len(nodes)} agents to see {count} members", timeout, all_see)

    async def start(self, timeout: float = 120.0) -> dict[str, float]:
        """Start every agent; seconds until all answer and until all see all."""
        t0 = time.monotonic()
        for n in self.nodes:
            n.start(self.procs)
        await self.ready(self.nodes, timeout)
        healthy = time.monotonic() - t0
        await self.wait_members(len(self.nodes), timeout=timeout)
        return {"healthy_s": round(healthy, 2), "joined_s": round(time.monotonic() - t0, 2)}

    async def write(self, node: VerdigrisNode, statements: list[Any], timeout: float = 10.0) -> int:
        """Run a transaction on ``node``; its version. BenchFailure if it is not acknowledged."""
        assert self.http is not None
        try:
            async with self.http.post(
                f"{node.api}/v1/transactions", json=statements, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as r:
                body = await r.read()
                if r.status != 200:
                    raise BenchFailure(f"write on {node.name}: HTTP {r.status} {body[:200]!r}")
                return int(json.loads(body).get("version") or 0)
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as e:
            raise BenchFailure(f"write on {node.name} failed: {e!r}") from e

    async def query(self, node: VerdigrisNode, sql: str, timeout: float = 30.0) -> list[list[Any]]:
        assert self.http is not None
        async with self.http.post(
            f"{node.api}/v1/queries", json=sql, timeout=aiohttp.ClientTimeout(total=timeout)
        ) as r:
            if r.status != 200:
                raise BenchFailure(f"query on {node.name}: HTTP {r.status} {await r.text()}")
            rows: list[list[Any]] = []
            for line in (await r.read()).decode().splitlines():
                event = json.loads(line)
                if "error" in event:
                    raise BenchFailure(f"query on {node.name}: {event['error']}")
                if "row" in event:
                    rows.append(event["row"][1])
            return rows

    async def member_states(self, node: VerdigrisNode) -> dict[str, str]:
        """gossip address -> state, as ``node`` sees its members."""
        reply = await node.admin.call({"cmd": "members"})
        return {m["addr"]: m["state"] for m in reply["members"] if not m.get("self")}


async def merge_sources(cluster: VerdigrisCluster) -> dict[str, Any]:
    """How the remote versions arrived, summed over the nodes: by broadcast or by sync (repair)."""
    statuses = await asyncio.gather(*(n.admin.call({"cmd": "status"}) for n in cluster.nodes))
    broadcast = sum(s["merged"]["versions"]["broadcast"] for s in statuses)
    sync = sum(s["merged"]["versions"]["sync"] for s in statuses)
    return {
        "versions_by_broadcast": broadcast,
        "versions_by_sync": sync,
        "by_sync_pct": round(100 * sync / max(1, broadcast + sync), 2),
        "broadcast_dropped": sum(s["broadcast"]["dropped"] for s in statuses),
        "broadcast_queued_at_end": sum(s["broadcast"]["queued"] for s in statuses),
    }


async def follow_subscription(
    http: aiohttp.ClientSession,
    node: VerdigrisNode,
    sql: str,
    ready: asyncio.Event,
    problems: list[str],
    on_change: Callable[[str, list[Any], int], None],
) -> None:
    """Subscribe to ``sql`` on ``node`` until cancelled: ``ready`` set at the end of the initial query,
    ``on_change(kind, values, arrival time.time_ns())`` per change event; failures and error events are
    appended to ``problems``."""
    try:
        async with http.post(
            f"{node.api}/v1/subscriptions",
            json=sql,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        ) as resp:
            if resp.status != 200:
                problems.append(f"{node.name}: subscribe HTTP {resp.status}")
                return
            buf = b""
            async for chunk in resp.content.iter_any():
                now = time.time_ns()
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    if line.startswith(b'{"eoq"'):
                        ready.set()
                        continue
                    if not line.startswith(b'{"change"'):
                        if line.startswith(b'{"error"'):
                            problems.append(f"{node.name}: {line[:200]!r}")
                        continue
                    kind, _rowid, values, _cid = json.loads(line)["change"]
                    on_change(kind, values, now)
    except asyncio.CancelledError:
        raise
    except Exception as e:
        problems.append(f"{node.name}: subscription failed: {e!r}")


class ProbeWatch:
    """A subscription ``SELECT id, ts FROM probes`` on every node; :attr:`arrivals` maps a probe id to
    {node index: arrival time (``time.time_ns()``)}. Every event is checked against what was sent."""

    def __init__(self, cluster: VerdigrisCluster) -> None:
        self.cluster = cluster
        self.arrivals: dict[int, dict[int, int]] = {}
        self.sent: dict[int, int] = {}
        self.problems: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._ready: list[asyncio.Event] = []
        self.events = 0

    async def start(self, timeout: float = 60.0) -> None:
        for node in self.cluster.nodes:
            ev = asyncio.Event()
            self._ready.append(ev)
            self._tasks.append(asyncio.create_task(self._follow(node, ev)))
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in self._ready)), timeout)
        except TimeoutError as e:
            raise BenchFailure(f"subscriptions not ready in {timeout:.0f} s: {self.problems[:3]}") from e

    async def _follow(self, node: VerdigrisNode, ready: asyncio.Event) -> None:
        assert self.cluster.http is not None

        def change(kind: str, values: list[Any], now: int) -> None:
            self._arrived(node.index, kind, values, now)

        await follow_subscription(
            self.cluster.http, node, "SELECT id, ts FROM probes", ready, self.problems, change
        )

    def _arrived(self, index: int, kind: str, values: list[Any], now: int) -> None:
        self.events += 1
        pid, ts = int(values[0]), int(values[1])
        if kind != "insert":
            self.problems.append(f"v{index}: unexpected {kind} of probe {pid}")
            return
        if self.sent.get(pid, ts) != ts:
            self.problems.append(f"v{index}: probe {pid} carries ts {ts}, sent {self.sent.get(pid)}")
        seen = self.arrivals.setdefault(pid, {})
        if index in seen:
            self.problems.append(f"v{index}: probe {pid} arrived twice")
            return
        seen[index] = now

    def complete(self, ids: Sequence[int]) -> bool:
        n = len(self.cluster.nodes)
        return all(len(self.arrivals.get(i, {})) == n for i in ids)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# ------------------------------------------------------------------------------------------------ serf
# Serf's RPC speaks msgpack in the old "raw" flavour (go-msgpack): a request is a header map followed by
# an optional body map, a reply a header map followed by an optional body. This is just enough of it.


class _Incomplete(Exception):
    pass


def mp_encode(o: Any) -> bytes:
    if o is None:
        return b"\xc0"
    if o is True:
        return b"\xc3"
    if o is False:
        return b"\xc2"
    if isinstance(o, int):
        if 0 <= o < 128:
            return bytes([o])
        return b"\xcf" + struct.pack(">Q", o) if o >= 0 else b"\xd3" + struct.pack(">q", o)
    if isinstance(o, str):
        o = o.encode()
    if isinstance(o, bytes | bytearray):
        n = len(o)
        if n < 32:
            return bytes([0xA0 | n]) + o
        return (b"\xda" + struct.pack(">H", n) if n < 65536 else b"\xdb" + struct.pack(">I", n)) + o
    if isinstance(o, dict):
        head = bytes([0x80 | len(o)]) if len(o) < 16 else b"\xde" + struct.pack(">H", len(o))
        return head + b"".join(mp_encode(k) + mp_encode(v) for k, v in o.items())
    if isinstance(o, list | tuple):
        head = bytes([0x90 | len(o)]) if len(o) < 16 else b"\xdc" + struct.pack(">H", len(o))
        return head + b"".join(mp_encode(v) for v in o)
    raise TypeError(f"cannot encode {type(o).__name__}")


_FIXED = {0xCC: ">B", 0xCD: ">H", 0xCE: ">I", 0xCF: ">Q", 0xD0: ">b", 0xD1: ">h", 0xD2: ">i", 0xD3: ">q"}
_FIXED |= {0xCA: ">f", 0xCB: ">d"}
_SIZED = {0xC4: ">B", 0xC5: ">H", 0xC6: ">I", 0xD9: ">B", 0xDA: ">H", 0xDB: ">I"}


def mp_decode(b: bytes, p: int = 0) -> tuple[Any, int]:
    """One object from ``b`` at ``p``: (object, next position); raises _Incomplete when ``b`` ends first."""
    if p >= len(b):
        raise _Incomplete
    t = b[p]
    p += 1
    if t < 0x80:
        return t, p
    if t >= 0xE0:
        return t - 256, p
    if t <= 0x8F or t in (0xDE, 0xDF) or 0x90 <= t <= 0x9F or t in (0xDC, 0xDD):
        if t <= 0x9F:
            n = t & 0x0F
        else:
            f = ">H" if t in (0xDC, 0xDE) else ">I"
            k = struct.calcsize(f)
            if p + k > len(b):
                raise _Incomplete
            (n,) = struct.unpack_from(f, b, p)
            p += k
        if t <= 0x8F or t in (0xDE, 0xDF):
            d: dict[Any, Any] = {}
            for _ in range(n):
                key, p = mp_decode(b, p)
                d[key], p = mp_decode(b, p)
            return d, p
        a: list[Any] = []
        for _ in range(n):
            v, p = mp_decode(b, p)
            a.append(v)
        return a, p
    if t <= 0xBF:
        n = t & 0x1F
    elif t == 0xC0:
        return None, p
    elif t in (0xC2, 0xC3):
        return t == 0xC3, p
    elif t in _FIXED:
        k = struct.calcsize(_FIXED[t])
        if p + k > len(b):
            raise _Incomplete
        return struct.unpack_from(_FIXED[t], b, p)[0], p + k
    elif t in _SIZED:
        k = struct.calcsize(_SIZED[t])
        if p + k > len(b):
            raise _Incomplete
        (n,) = struct.unpack_from(_SIZED[t], b, p)
        p += k
    else:
        raise ValueError(f"msgpack type 0x{t:02x} not supported")
    if p + n > len(b):
        raise _Incomplete
    raw = bytes(b[p : p + n])
    try:
        return raw.decode(), p + n
    except UnicodeDecodeError:
        return raw, p + n


class SerfRpc:
    """One connection to a Serf agent's RPC port. Commands are sequential (a lock), or the connection is
    turned into a stream of events with :meth:`stream`."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._buf = b""
        self._seq = 0
        self._lock = asyncio.Lock()

    async def connect(self, timeout: float = 5.0) -> SerfRpc:
        self._reader, self._writer = await asyncio.wait_for(asyncio.open_connection(HOST, self.port), timeout)
        await self.call("handshake", {"Version": 1})
        return self

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    async def _read(self, timeout: float | None) -> Any:
        assert self._reader is not None
        while True:
            try:
                obj, p = mp_decode(self._buf)
            except _Incomplete:
                pass
            else:
                self._buf = self._buf[p:]
                return obj
            data = await asyncio.wait_for(self._reader.read(65536), timeout)
            if not data:
                raise ConnectionError("serf RPC closed")
            self._buf += data

    async def call(
        self,
        command: str,
        body: dict[str, Any] | None = None,
        *,
        reply_body: bool = False,
        timeout: float = 10.0,
    ) -> Any:
        async with self._lock:
            assert self._writer is not None
            self._seq += 1
            msg = mp_encode({"Command": command, "Seq": self._seq})
            if body is not None:
                msg += mp_encode(body)
            self._writer.write(msg)
            header = await self._read(timeout)
            if header.get("Error"):
                raise BenchFailure(f"serf RPC {command}: {header['Error']}")
            return await self._read(timeout) if reply_body else header

    async def stream(self, types: str) -> None:
        """Subscribe this connection to events (e.g. ``"user"``); read them with :meth:`next_event`."""
        await self.call("stream", {"Type": types})

    async def next_event(self) -> dict[str, Any]:
        await self._read(None)  # the header of the record
        record: dict[str, Any] = await self._read(None)
        return record

    async def members(self) -> list[dict[str, Any]]:
        reply = await self.call("members", reply_body=True)
        members: list[dict[str, Any]] = reply["Members"]
        return members

    async def event(self, name: str, payload: bytes) -> None:
        await self.call("event", {"Name": name, "Payload": payload, "Coalesce": False})


@dataclass
class SerfNode:
    index: int
    root: Path
    bind_port: int
    rpc_port: int
    key: str
    join: list[str]
    proc: subprocess.Popen[bytes] | None = None
    rpc: SerfRpc | None = None

    @property
    def name(self) -> str:
        return f"s{self.index}"

    @property
    def log(self) -> Path:
        return self.root / "serf.log"

    def start(self, procs: Procs) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        argv = [
            "serf", "agent", f"-node={self.name}", f"-bind={HOST}:{self.bind_port}",
            f"-rpc-addr={HOST}:{self.rpc_port}", f"-encrypt={self.key}", "-log-level=info",
        ]  # fmt: skip
        argv += [f"-join={a}" for a in self.join]
        self.close_rpc()
        self.proc = procs.start(argv, self.log)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.close_rpc()

    def close_rpc(self) -> None:
        if self.rpc is not None:
            self.rpc.close()
            self.rpc = None

    async def connect(self) -> SerfRpc:
        if self.rpc is None:
            self.rpc = await SerfRpc(self.rpc_port).connect()
        return self.rpc

    def tail(self, lines: int = 20) -> str:
        return log_tail(self.log, lines)

    def failed_logged(self) -> list[str]:
        """Names this agent logged as failed (``EventMemberFailed``), in order."""
        return log_matches(self.log, r"EventMemberFailed: (\S+)")


class SerfCluster:
    """N Serf agents (LAN profile, encrypted); the first is the seed everyone joins."""

    def __init__(self, procs: Procs, root: Path, n: int, *, key: str | None = None) -> None:
        if shutil.which("serf") is None:
            raise BenchFailure("the `serf` command is not installed (Debian: apt-get install -y serf)")
        self.procs = procs
        self.key = key or new_key()
        ports = free_ports(2 * n)
        self.nodes = [
            SerfNode(
                index=i,
                root=root / f"s{i}",
                bind_port=ports[i],
                rpc_port=ports[n + i],
                key=self.key,
                join=[] if i == 0 else [f"{HOST}:{ports[0]}"],
            )
            for i in range(n)
        ]

    @property
    def gossip_ports(self) -> list[int]:
        return [n.bind_port for n in self.nodes]

    def close(self) -> None:
        for n in self.nodes:
            n.close_rpc()
            if n.alive():
                assert n.proc is not None
                n.proc.kill()
        for n in self.nodes:
            if n.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    n.proc.wait(timeout=10)

    async def rpc_ready(self, node: SerfNode, timeout: float = 30.0) -> None:
        async def up() -> bool:
            if node.proc is not None and node.proc.poll() is not None:
                raise BenchFailure(f"{node.name} exited with {node.proc.returncode}:\n{node.tail()}")
            try:
                await node.connect()
                return True
            except (OSError, TimeoutError, ConnectionError):
                node.close_rpc()
                return False

        await until(f"{node.name}'s RPC", timeout, up)

    async def alive_counts(self, nodes: Sequence[SerfNode]) -> list[int]:
        async def count(n: SerfNode) -> int:
            rpc = await n.connect()
            return sum(1 for m in await rpc.members() if m["Status"] == "alive")

        return list(await asyncio.gather(*(count(n) for n in nodes)))

    async def wait_members(
        self, count: int, nodes: Sequence[SerfNode] | None = None, timeout: float = 60.0
    ) -> float:
        nodes = list(nodes or self.nodes)

        async def all_see() -> bool:
            return all(c == count for c in await self.alive_counts(nodes))

        return await until(f"{len(nodes)} Serf agents to see {count} alive", timeout, all_see)

    async def start(self, timeout: float = 60.0) -> dict[str, float]:
        t0 = time.monotonic()
        seed, rest = self.nodes[0], self.nodes[1:]
        seed.start(self.procs)
        await self.rpc_ready(seed, timeout)
        for n in rest:
            n.start(self.procs)
        await asyncio.gather(*(self.rpc_ready(n, timeout) for n in rest))
        healthy = time.monotonic() - t0
        await self.wait_members(len(self.nodes), timeout=timeout)
        return {"healthy_s": round(healthy, 2), "joined_s": round(time.monotonic() - t0, 2)}

    async def member_states(self, node: SerfNode) -> dict[str, str]:
        rpc = await node.connect()
        return {m["Name"]: m["Status"] for m in await rpc.members() if m["Name"] != node.name}


# ------------------------------------------------------------------------------------------------ pacing


async def paced(count: int, rate: float, fn: Callable[[int], Awaitable[None]], concurrency: int) -> float:
    """Call ``fn(i)`` for i in 0..count-1 on an open-loop schedule of ``rate`` per second, at most
    ``concurrency`` at once; the achieved rate."""
    start = time.monotonic()

    async def worker(w: int) -> None:
        for i in range(w, count, concurrency):
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing of the load, not synchronisation
            await fn(i)

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return count / max(1e-9, time.monotonic() - start)


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        yield Path(tmp)
