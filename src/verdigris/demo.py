"""``verdigris demo``: a whole local fleet with one command.

Starts, on this machine, ``regions`` × ``nodes`` nodes on loopback ports. Every node runs the three
processes a real server would: an **agent** in region mode (its region's cluster plus the global one,
encrypted gossip with a key generated for the run, Prometheus metrics), a **machines agent** running the
sample apps' instances of its node, and an **edge proxy** (``workers`` workers, metrics, the fleet's shared
``peer_token``). The sample apps live in ``examples/apps/``:

* ``hello``  stateless, instances in the first two regions;
* ``notes``  primary region = the first region; a write anywhere else is answered with
  ``fly-replay: region=<primary>``, so the proxy replays it there;
* ``sleepy`` scaled to zero at start, woken by its first request (the proxy asks a machines agent).

Start-up goes in order, each step bounded and shown as progress: agents → their API answers and every
member is alive in its region's cluster and in the global one → machines agents → proxies → every proxy
routes ``hello`` and ``notes``. Then a short table (proxies, ``curl`` commands, the dashboard URL) is
printed and ``--status-file`` is written. A child that dies during start-up is a clear error with the
tail of its log.

Every child runs in its own process group (a terminal's Ctrl-C reaches the demo only, which then stops
the fleet in order: proxies, machines agents, agents). Each is sent SIGTERM, given ``STOP_GRACE``
seconds, then its whole group is SIGKILLed; descendants seen before the stop (instances, proxy workers)
that are still alive after it are killed too, so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, Final

import aiohttp
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from verdigris.admin import admin_call
from verdigris.api.client import CorrosionClient
from verdigris.gossip.keyring import generate_key

REGION_NAMES: Final = ("ams", "iad", "sin")
"""The first regions' names; further ones are r4, r5, ..."""
MAX_REGIONS: Final = 9
MAX_NODES: Final = 9
MAX_TOTAL_NODES: Final = 27
"""Each node is 3 processes plus its instances and the proxy's workers: 27 nodes is already ~100."""
ROLES: Final = ("proxy", "api", "agent_metrics", "gossip", "global_gossip", "proxy_metrics", "machines")
"""The listening ports of a node, in the order ``--base-port`` lays them out (one block per role)."""
INSTANCE_PORTS: Final = 16
"""Ports reserved per node for its app instances (a node runs a handful at most)."""
GLOBAL_CLUSTER_ID: Final = 1
REGIONAL_CLUSTER_ID_BASE: Final = 10
PRESENCE_TAKEOVER_MS: Final = 2000
STOP_GRACE: Final = 10.0
"""Seconds a child gets to exit after SIGTERM before its process group is SIGKILLed."""
POLL: Final = 0.1
DEFAULT_TIMEOUT: Final = 180.0
ADMIN_SOCKET_MAX: Final = 100
"""Unix socket paths are limited to about 108 bytes; longer ones go to a short temp dir."""
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Each stops the fleet (SIGHUP: the terminal was closed; the children, in their own sessions, would
not get it and would be left running)."""
ROUTED_APPS: Final = ("hello", "notes")
"""The apps every proxy must route before the fleet counts as ready (sleepy would be woken)."""


class DemoError(Exception):
    """The demo cannot start (bad option, busy port, a child died, a step timed out)."""


# ------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class NodePorts:
    proxy: int
    api: int
    agent_metrics: int
    gossip: int
    global_gossip: int
    proxy_metrics: int
    machines: int
    instances: tuple[int, int]
    """First and last port (inclusive) of the node's instance range."""

    def listening(self) -> list[int]:
        return [getattr(self, role) for role in ROLES]


@dataclass(frozen=True)
class NodePlan:
    region: str
    region_index: int
    name: str
    """``<region><n>``, e.g. ``ams1``: the machines agent's node name and the proxy's id."""
    dir: Path
    ports: NodePorts
    admin_path: Path

    def addr(self, role: str) -> str:
        return f"127.0.0.1:{getattr(self.ports, role)}"


@dataclass(frozen=True)
class AppPlan:
    name: str
    script: Path
    regions: dict[str, int]
    primary_region: str
    scaled_to_zero: bool = False

    @property
    def hostname(self) -> str:
        return f"{self.name}.localhost"


@dataclass(frozen=True)
class FleetPlan:
    regions: list[str]
    nodes: list[NodePlan]
    apps: list[AppPlan]
    data_dir: Path
    workers: int
    key: str
    peer_token: str

    def region_nodes(self, region: str) -> list[NodePlan]:
        return [n for n in self.nodes if n.region == region]

    def first_node(self, region: str) -> NodePlan:
        return self.region_nodes(region)[0]


def region_names(count: int) -> list[str]:
    return [REGION_NAMES[i] if i < len(REGION_NAMES) else f"r{i + 1}" for i in range(count)]


def repo_root() -> Path:
    """The checkout holding ``schemas/`` and ``examples/apps/`` (the demo runs from a clone)."""
    root = Path(__file__).resolve().parents[2]
    for needed in (root / "schemas", root / "examples" / "apps"):
        if not needed.is_dir():
            raise DemoError(f"{needed} not found: `verdigris demo` runs from a clone of the repository")
    return root


def sample_apps(regions: list[str], apps_dir: Path) -> list[AppPlan]:
    """hello in the first two regions, notes with its primary in the first, sleepy in the last."""
    first = regions[0]
    second = regions[1] if len(regions) > 1 else first
    two = {first: 2} if first == second else {first: 2, second: 1}
    notes = {first: 1} if first == second else {first: 1, second: 1}
    hello = apps_dir / "hello.py"
    return [
        AppPlan("hello", hello, two, first),
        AppPlan("notes", apps_dir / "notes.py", notes, first),
        # the same program as hello: what matters is that it starts stopped and is woken
        AppPlan("sleepy", hello, {regions[-1]: 1}, regions[-1], scaled_to_zero=True),
    ]


def _tcp_free(port: int) -> bool:
    """Could a server listen on ``port``? With SO_REUSEADDR, as the fleet's servers bind: connections
    of an earlier run lingering in TIME_WAIT do not make a port busy, a listening socket does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
        except OSError:
            return False
    return True


def _udp_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port(taken: set[int]) -> int:
    """A port free for TCP and UDP (gossip uses both) and not already handed out."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in taken and _udp_free(port):
            taken.add(port)
            return port
    raise DemoError("no free port on 127.0.0.1")


def _free_block(taken: set[int], size: int) -> tuple[int, int]:
    """``size`` consecutive free ports below the kernel's ephemeral range (where bind(0) picks)."""
    rng = random.Random()
    for _ in range(200):
        first = rng.randrange(20000, 32000 - size)
        block = range(first, first + size)
        if not taken.intersection(block) and all(_tcp_free(p) for p in block):
            taken.update(block)
            return first, first + size - 1
    raise DemoError(f"no block of {size} free ports on 127.0.0.1 between 20000 and 32000")


def allocate_ports(count: int, base_port: int | None) -> list[NodePorts]:
    """Ports for ``count`` nodes. With ``base_port`` a fixed layout, one block of ``count`` ports per
    role (proxies first: base_port .. base_port+count-1, then the agents' APIs, ...), then the instance
    ranges; every port is checked free. Without it, free ports picked by the kernel."""
    if base_port is None:
        taken: set[int] = set()
        ports = []
        for _ in range(count):
            fixed = {role: _free_port(taken) for role in ROLES}
            ports.append(NodePorts(**fixed, instances=_free_block(taken, INSTANCE_PORTS)))
        return ports
    instances_at = base_port + len(ROLES) * count
    last = instances_at + count * INSTANCE_PORTS - 1
    if base_port < 1024 or last > 65535:
        raise DemoError(
            f"--base-port {base_port}: the fleet needs ports {base_port}-{last}, which must lie in 1024-65535"
        )
    ports = [
        NodePorts(
            **{role: base_port + r * count + k for r, role in enumerate(ROLES)},
            instances=(instances_at + k * INSTANCE_PORTS, instances_at + (k + 1) * INSTANCE_PORTS - 1),
        )
        for k in range(count)
    ]
    busy = [
        p
        for node in ports
        for p in [*node.listening(), *range(node.instances[0], node.instances[1] + 1)]
        if not _tcp_free(p) or (p in (node.gossip, node.global_gossip) and not _udp_free(p))
    ]
    if busy:
        shown = ", ".join(map(str, busy[:10])) + (" ..." if len(busy) > 10 else "")
        raise DemoError(f"--base-port {base_port}: port(s) already in use: {shown}")
    return ports


def plan_fleet(
    regions: int, nodes: int, data_dir: Path, base_port: int | None, workers: int, apps_dir: Path
) -> FleetPlan:
    if not 1 <= regions <= MAX_REGIONS:
        raise DemoError(f"--regions must be between 1 and {MAX_REGIONS}, not {regions}")
    if not 1 <= nodes <= MAX_NODES:
        raise DemoError(f"--nodes must be between 1 and {MAX_NODES}, not {nodes}")
    if regions * nodes > MAX_TOTAL_NODES:
        raise DemoError(
            f"{regions} regions × {nodes} nodes is over {MAX_TOTAL_NODES} nodes: too many for one machine"
        )
    if workers < 1:
        raise DemoError(f"--workers must be at least 1, not {workers}")
    names = region_names(regions)
    ports = allocate_ports(regions * nodes, base_port)
    admin_dir = data_dir
    if len(str(data_dir / f"{names[-1]}{nodes}" / "admin.sock")) > ADMIN_SOCKET_MAX:
        admin_dir = Path(tempfile.mkdtemp(prefix="vd-demo-"))  # removed with the fleet
    plans = []
    for r, region in enumerate(names):
        for i in range(nodes):
            name = f"{region}{i + 1}"
            plans.append(
                NodePlan(
                    region=region,
                    region_index=r,
                    name=name,
                    dir=data_dir / name,
                    ports=ports[r * nodes + i],
                    admin_path=admin_dir / name / "admin.sock",
                )
            )
    return FleetPlan(
        regions=names,
        nodes=plans,
        apps=sample_apps(names, apps_dir),
        data_dir=data_dir,
        workers=workers,
        key=generate_key(secrets.token_bytes),
        peer_token=secrets.token_urlsafe(24),
    )


# ---------------------------------------------------------------------------------------------- configs


def _toml(value: Any) -> str:
    """A TOML value: JSON's strings, numbers, booleans and arrays are valid TOML."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def _section(name: str, values: dict[str, Any], array: bool = False) -> str:
    head = f"[[{name}]]" if array else f"[{name}]"
    return "\n".join([head, *(f"{k} = {_toml(v)}" for k, v in values.items())]) + "\n"


def agent_config(plan: FleetPlan, node: NodePlan, schemas: Path) -> str:
    peers = [n.addr("gossip") for n in plan.region_nodes(node.region) if n is not node]
    global_seeds = [plan.first_node(r).addr("global_gossip") for r in plan.regions]
    global_seeds = [s for s in global_seeds if s != node.addr("global_gossip")]
    if not global_seeds and len(plan.nodes) > 1:  # the first node of the only region: its region mates
        global_seeds = [n.addr("global_gossip") for n in plan.nodes if n is not node]
    return "\n".join(
        [
            _section("db", {"path": str(node.dir / "state.db"), "schema_paths": [str(schemas)]}),
            _section("api", {"addr": node.addr("api")}),
            _section("admin", {"path": str(node.admin_path)}),
            _section(
                "gossip",
                {
                    "addr": node.addr("gossip"),
                    "bootstrap": peers,
                    "cluster-id": REGIONAL_CLUSTER_ID_BASE + node.region_index,
                    "region": node.region,
                    "key": plan.key,
                },
            ),
            # lan timings for the global cluster too: every node is on loopback
            _section(
                "gossip.global",
                {
                    "addr": node.addr("global_gossip"),
                    "bootstrap": global_seeds,
                    "cluster-id": GLOBAL_CLUSTER_ID,
                    "profile": "lan",
                },
            ),
            # a region of one node publishes its presence only after the takeover delay (it has no
            # region mate to sync with): 10 s by default, shortened for a fleet on one machine
            _section("presence", {"takeover-delay-ms": PRESENCE_TAKEOVER_MS}),
            _section("telemetry.prometheus", {"addr": node.addr("agent_metrics")}),
            _section("log", {"level": "info", "colors": False}),
        ]
    )


def proxy_config(plan: FleetPlan, node: NodePlan) -> str:
    return _section(
        "proxy",
        {
            "listen": node.addr("proxy"),
            "workers": plan.workers,
            "agent": f"http://{node.addr('api')}",
            "region": node.region,
            "metrics_listen": node.addr("proxy_metrics"),
            "peer_token": plan.peer_token,
            "id": node.name,
        },
    )


def machines_config(plan: FleetPlan, node: NodePlan) -> str:
    first, last = node.ports.instances
    parts = [
        _section(
            "machines",
            {
                "node": node.name,
                "region": node.region,
                "agent": f"http://{node.addr('api')}",
                "listen": node.addr("machines"),
                "advertise": node.addr("machines"),
                "instance_host": "127.0.0.1",
                "port_range": f"{first}-{last}",
                "region_nodes": [n.name for n in plan.region_nodes(node.region)],
                "logs_dir": "instances",
            },
        )
    ]
    for app in plan.apps:
        parts.append(
            _section(
                "machines.apps",
                {
                    "name": app.name,
                    "command": ["{python}", str(app.script)],
                    "env": {},
                    "regions": app.regions,
                    "primary_region": app.primary_region,
                    "hostnames": [app.hostname],
                    "min_machines_running": 0,
                    "autostop_after": 60.0 if app.scaled_to_zero else 0.0,
                    "autostart": True,
                    "start_stopped": app.scaled_to_zero,
                },
                array=True,
            )
        )
        parts.append(
            _section(
                "machines.apps.checks",
                {
                    "name": "alive",
                    "type": "http",
                    "path": "/health",
                    "interval": 1.0,
                    "timeout": 1.0,
                    "grace_period": 2.0,
                },
                array=True,
            )
        )
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- children


def _proc_stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time in clock ticks) of a live process, from /proc; None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    if fields[0] == "Z":
        return None  # a zombie holds nothing; its parent reaps it
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """Every live descendant of ``root``: pid → start time (to tell a reused pid from the same process)."""
    children: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        for pid, started in children.get(todo.pop(), []):
            if pid not in found:
                found[pid] = started
                todo.append(pid)
    return found


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode(errors="replace")
    except OSError as e:
        return f"(cannot read {path}: {e.strerror})"
    return "\n".join(text.splitlines()[-lines:]) or "(the log is empty)"


@dataclass
class Child:
    """A process of the fleet, in its own process group, its output in ``log_path``."""

    role: str
    node: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]

    @property
    def name(self) -> str:
        return f"{self.role} {self.node}"

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise DemoError(
                f"{self.name} exited with status {code} during start-up; "
                f"the end of {self.log_path}:\n{log_tail(self.log_path)}"
            )


def start_child(role: str, node: str, argv: list[str], log_path: Path, cwd: Path) -> Child:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,  # Ctrl-C in a terminal reaches the demo only; it stops the fleet in order
        )
    except OSError as e:
        log.close()
        raise DemoError(f"cannot start {role} {node} ({argv[0]}): {e.strerror or e}") from None
    return Child(role, node, proc, log_path, log)


def stop_children(
    children: list[Child], grace: float = STOP_GRACE, hurry: Callable[[], bool] = lambda: False
) -> None:
    """SIGTERM every child, wait at most ``grace`` for all (less once ``hurry()`` is true: a second
    Ctrl-C), then SIGKILL the process group of each (stragglers included: a proxy's workers)."""
    for child in children:
        if child.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    # polled, not Popen.wait(): a second signal must be able to cut the wait short
    while time.monotonic() < deadline and not hurry() and any(c.proc.poll() is None for c in children):
        time.sleep(0.05)
    for child in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, signal.SIGKILL)
        if child.proc.poll() is None:
            child.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.proc.wait(5.0)
        child.log.close()


def kill_leftovers(seen: dict[int, int]) -> list[int]:
    """SIGKILL the processes of ``seen`` (pid → start time) still alive as the same process; their pids."""
    killed = []
    for pid, started in seen.items():
        stat = _proc_stat(pid)
        if stat is not None and stat[1] == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
    return killed


# ------------------------------------------------------------------------------------------------ fleet


@dataclass
class Fleet:
    plan: FleetPlan
    console: Console
    timeout: float
    children: list[Child] = field(default_factory=list)
    deadline: float = 0.0
    hurry: bool = False
    """Set by a signal received while stopping: no more grace periods."""

    @property
    def python(self) -> str:
        return sys.executable

    def _start(self, role: str, node: NodePlan, config_text: str, command: str) -> Child:
        node.dir.mkdir(parents=True, exist_ok=True)
        config = node.dir / f"{role}.toml"
        config.write_text(config_text)
        argv = [self.python, "-m", "verdigris.cli", command, "-c", str(config)]
        child = start_child(role, node.name, argv, node.dir / f"{role}.log", node.dir)
        self.children.append(child)
        return child

    def check_children(self) -> None:
        for child in self.children:
            child.check_alive()

    async def wait_all(
        self,
        progress: Progress,
        what: str,
        items: Sequence[tuple[str, Callable[[], Awaitable[str | None]]]],
    ) -> None:
        """Poll every item's check (``None``: ready, else why not yet) until all are ready, a child
        dies, or the start-up deadline passes; the progress bar counts the ready ones."""
        started = time.monotonic()
        task = progress.add_task(what, total=len(items))
        pending = dict(items)
        reasons: dict[str, str] = {}
        while pending:
            self.check_children()
            if time.monotonic() > self.deadline:
                shown = "; ".join(f"{k}: {reasons.get(k, 'no answer yet')}" for k in list(pending)[:5])
                raise DemoError(
                    f"timed out ({self.timeout:.0f} s start-up bound) waiting for {what}: {shown}"
                )

            async def one(name: str, check: Callable[[], Awaitable[str | None]]) -> tuple[str, str | None]:
                try:
                    return name, await asyncio.wait_for(check(), 5.0)
                except Exception as e:  # not ready yet, whatever the failure; named if it lasts
                    return name, f"{type(e).__name__}: {e}".rstrip(": ")

            for name, reason in await asyncio.gather(*(one(n, c) for n, c in pending.items())):
                if reason is None:
                    del pending[name]
                    progress.advance(task)
                else:
                    reasons[name] = reason
            if pending:
                await asyncio.sleep(POLL)
        progress.update(task, description=f"{what} [dim]({time.monotonic() - started:.1f} s)[/]")

    async def start(self, progress: Progress, schemas: Path) -> None:
        self.deadline = time.monotonic() + self.timeout
        plan = self.plan
        total = len(plan.nodes)
        per_region = len(plan.region_nodes(plan.regions[0]))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0)) as http:

            async def answers(url: str, host: str | None = None) -> str | None:
                headers = {"Host": host} if host else {}
                async with http.get(url, headers=headers) as resp:
                    if resp.status == 200:
                        return None
                    body = (await resp.text())[:200]
                    return f"{resp.status} {resp.headers.get('fly-error-code', '')} {body}".strip()

            async def members(node: NodePlan, scope: str, expected: int) -> str | None:
                command = {"cmd": "members", "scope": scope}
                reply = await asyncio.to_thread(admin_call, node.admin_path, command, 3.0)
                alive = sum(1 for m in reply.get("members", []) if m.get("state") == "alive")
                return None if alive >= expected else f"{alive}/{expected} alive"

            hostnames = [app.hostname for app in plan.apps]

            async def machine_agents_known(node: NodePlan) -> str | None:
                # what a proxy needs to wake sleepy: every machines agent registered, and every app's
                # host name (global rows written by the machines agents), on every node
                marks = ", ".join("?" for _ in hostnames)
                sql = (
                    "SELECT (SELECT count(*) FROM machine_agents), "
                    f"(SELECT count(*) FROM hostnames WHERE hostname IN ({marks}))"
                )
                async with CorrosionClient(f"http://{node.addr('api')}", session=http) as client:
                    _, rows = await client.rows((sql, list(hostnames)))
                agents, names = (int(str(v)) for v in rows[0])
                if agents < total or names < len(hostnames):
                    return f"{agents}/{total} machines agents, {names}/{len(hostnames)} host names"
                return None

            expected_presence = {
                (app.name, region) for app in plan.apps if not app.scaled_to_zero for region in app.regions
            }

            async def presence_known(node: NodePlan) -> str | None:
                # forwarding to another region (and replaying a write there) needs the app_regions rows
                # the regions' presence publishers write once their instances are started
                async with CorrosionClient(f"http://{node.addr('api')}", session=http) as client:
                    _, rows = await client.rows("SELECT app, region FROM app_regions")
                missing = expected_presence - {(str(app), str(region)) for app, region in rows}
                return None if not missing else "missing " + ", ".join(f"{a}@{r}" for a, r in sorted(missing))

            for node in plan.nodes:
                node.admin_path.parent.mkdir(parents=True, exist_ok=True)
                self._start("agent", node, agent_config(plan, node, schemas), "agent")
            await self.wait_all(
                progress,
                "agents answer",
                [(n.name, partial(answers, f"http://{n.addr('api')}/v1/health")) for n in plan.nodes],
            )
            await self.wait_all(
                progress,
                "clusters joined (regional and global)",
                [(f"{n.name} regional", partial(members, n, "regional", per_region)) for n in plan.nodes]
                + [(f"{n.name} global", partial(members, n, "global", total)) for n in plan.nodes],
            )
            for node in plan.nodes:
                self._start("machines", node, machines_config(plan, node), "machines")
            await self.wait_all(
                progress,
                "machines agents answer",
                [(n.name, partial(answers, f"http://{n.addr('machines')}/v1/health")) for n in plan.nodes],
            )
            await self.wait_all(
                progress,
                "machines agents registered everywhere",
                [(n.name, partial(machine_agents_known, n)) for n in plan.nodes],
            )
            for node in plan.nodes:
                self._start("proxy", node, proxy_config(plan, node), "proxy")
            await self.wait_all(
                progress,
                "apps' regions known everywhere",
                [(n.name, partial(presence_known, n)) for n in plan.nodes],
            )
            await self.wait_all(
                progress,
                "proxies route hello and notes",
                [
                    (f"{n.name} {app}", partial(answers, f"http://{n.addr('proxy')}/", f"{app}.localhost"))
                    for n in plan.nodes
                    for app in ROUTED_APPS
                ],
            )

    def status(self) -> dict[str, Any]:
        plan = self.plan
        first = plan.nodes[0]
        return {
            "pid": os.getpid(),
            "data_dir": str(plan.data_dir),
            "proxies": [
                {
                    "region": n.region,
                    "node": n.name,
                    "address": n.addr("proxy"),
                    "metrics": f"http://{n.addr('proxy_metrics')}/metrics",
                }
                for n in plan.nodes
            ],
            "agents": [
                {
                    "region": n.region,
                    "node": n.name,
                    "api": f"http://{n.addr('api')}",
                    "metrics": f"http://{n.addr('agent_metrics')}/metrics",
                    "admin": str(n.admin_path),
                }
                for n in plan.nodes
            ],
            "machines": [
                {
                    "region": n.region,
                    "node": n.name,
                    "address": n.addr("machines"),
                    "instance_ports": list(n.ports.instances),
                }
                for n in plan.nodes
            ],
            "dashboard": f"http://{first.addr('api')}/dashboard",
            "apps": {
                app.name: {
                    "hostname": app.hostname,
                    "regions": app.regions,
                    "primary_region": app.primary_region,
                    "scaled_to_zero": app.scaled_to_zero,
                }
                for app in plan.apps
            },
            "children": [
                {"role": c.role, "node": c.node, "pid": c.proc.pid, "log": str(c.log_path)}
                for c in self.children
            ],
            "listening": [n.addr(role) for n in plan.nodes for role in ROLES],
        }

    def stop(self) -> None:
        """Proxies first (no new traffic), then machines agents (they stop their instances through
        their agent), then agents. The process tree of each tier is noted just before it is stopped,
        and what of it is still alive at the end is killed (an instance whose machines agent had to be
        killed, say). A second SIGINT/SIGTERM meanwhile skips the grace periods."""
        seen: dict[int, int] = {}
        for role in ("proxy", "machines", "agent"):
            tier = [c for c in self.children if c.role == role]
            for child in tier:
                if child.proc.poll() is None:
                    seen.update(descendants(child.proc.pid))
            started = time.monotonic()
            stop_children(tier, hurry=lambda: self.hurry)
            self.console.print(
                f"[dim]{len(tier)} {role} process(es) stopped in {time.monotonic() - started:.1f} s[/]"
            )
        killed = kill_leftovers(seen)
        if killed:
            self.console.print(f"[yellow]killed {len(killed)} leftover process(es): {killed}[/]")


# ---------------------------------------------------------------------------------------------- display


def curl_examples(plan: FleetPlan) -> list[tuple[str, str]]:
    """(what it shows, the command) for each sample app, through proxies of different regions."""

    def proxy_of(region: str) -> str:
        return plan.first_node(region).addr("proxy")

    first = plan.regions[0]
    other = plan.regions[1] if len(plan.regions) > 1 else first
    last = plan.regions[-1]
    notes = next(a for a in plan.apps if a.name == "notes")
    sleepy = next(a for a in plan.apps if a.name == "sleepy")
    return [
        (f"hello through {last}'s proxy", f"curl -H 'Host: hello.localhost' http://{proxy_of(last)}/"),
        (
            f"a write in {other}, replayed to {notes.primary_region}"
            if other != notes.primary_region
            else f"a write, in {notes.primary_region} (the primary region)",
            f"curl -H 'Host: notes.localhost' -d 'hello from {other}' http://{proxy_of(other)}/",
        ),
        (
            f"the notes, read in {notes.primary_region}",
            f"curl -H 'Host: notes.localhost' http://{proxy_of(first)}/",
        ),
        (
            f"wakes sleepy ({'/'.join(sleepy.regions)}), scaled to zero",
            f"curl -H 'Host: sleepy.localhost' http://{proxy_of(first)}/",
        ),
    ]


def print_ready(console: Console, fleet: Fleet, elapsed: float) -> None:
    plan = fleet.plan
    table = Table(
        "region", "node", "proxy", "agent API", "machines API", box=box.SIMPLE_HEAD, highlight=False
    )
    for n in plan.nodes:
        table.add_row(n.region, n.name, n.addr("proxy"), n.addr("api"), n.addr("machines"))
    console.print(table)
    console.print("[bold]Try:[/]")
    for what, command in curl_examples(plan):
        console.print(f"  [dim]# {what}[/]")
        console.print(f"  {command}", markup=False, highlight=False, soft_wrap=True)
    status = fleet.status()
    console.print(f"[bold]Dashboard:[/] {status['dashboard']}", soft_wrap=True)
    console.print(
        f"[green]{len(plan.nodes)} nodes ({len(plan.regions)} regions) ready in {elapsed:.1f} s[/]; "
        f"data and logs in {plan.data_dir}. Ctrl-C stops the fleet.",
        soft_wrap=True,
    )


def write_status(path: Path, status: dict[str, Any]) -> None:
    """Written whole or not at all (a reader polling for the file never sees half of it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(status, indent=2) + "\n")
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------- run


@dataclass(frozen=True)
class DemoOptions:
    regions: int = 3
    nodes: int = 3
    data_dir: Path | None = None
    keep: bool = False
    base_port: int | None = None
    status_file: Path | None = None
    workers: int = 1
    timeout: float = DEFAULT_TIMEOUT


async def _run(fleet: Fleet, options: DemoOptions, schemas: Path, console: Console) -> None:
    started = time.monotonic()
    with Progress(
        SpinnerColumn(finished_text="[green]✓[/]"),
        TextColumn("{task.description}"),
        BarColumn(bar_width=20),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        await fleet.start(progress, schemas)
    elapsed = time.monotonic() - started
    print_ready(console, fleet, elapsed)
    if options.status_file is not None:
        status = fleet.status()
        status["startup_seconds"] = round(elapsed, 2)
        write_status(options.status_file, status)
    while True:  # until a signal cancels us; a child that dies is reported, the rest keep running
        for child in list(fleet.children):
            code = child.proc.poll()
            if code is not None:
                console.print(
                    f"[red]{child.name} exited with status {code}[/]; the end of {child.log_path}:",
                    soft_wrap=True,
                )
                console.print(log_tail(child.log_path), markup=False, highlight=False)
                fleet.children.remove(child)
                child.log.close()
        await asyncio.sleep(1.0)


def run_demo(options: DemoOptions, console: Console | None = None) -> int:
    """Start the fleet, run until SIGINT/SIGTERM, stop it. 0 after a requested stop, 1 if it failed to
    start (the reason printed). Bad options raise :class:`DemoError` before anything starts."""
    console = console or Console()
    schemas = repo_root() / "schemas"
    apps_dir = repo_root() / "examples" / "apps"
    own_dir = options.data_dir is None
    data_dir = Path(tempfile.mkdtemp(prefix="verdigris-demo-")) if own_dir else options.data_dir
    assert data_dir is not None
    data_dir = data_dir.resolve()
    try:
        if options.status_file is not None:
            if not options.status_file.resolve().parent.is_dir():
                raise DemoError(f"--status-file {options.status_file}: its directory does not exist")
            options.status_file.unlink(missing_ok=True)  # a stale file must not look like a ready fleet
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DemoError(f"--data-dir {data_dir}: {e.strerror or e}") from None
        plan = plan_fleet(
            options.regions, options.nodes, data_dir, options.base_port, options.workers, apps_dir
        )
    except BaseException:
        if own_dir:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise
    fleet = Fleet(plan, console, options.timeout)
    code = 0
    try:
        code = asyncio.run(_main(fleet, options, schemas, console))
    finally:
        # from here on a signal must not interrupt the stop half-way (children would be left behind):
        # a second Ctrl-C (or SIGTERM, SIGHUP) only cuts the grace periods short
        def hurry(signum: int, frame: object) -> None:
            fleet.hurry = True

        previous = {sig: signal.signal(sig, hurry) for sig in STOP_SIGNALS}
        console.print(f"stopping {len(fleet.children)} processes (Ctrl-C again: no grace period) ...")
        stop_started = time.monotonic()
        fleet.stop()
        if options.status_file is not None:
            options.status_file.unlink(missing_ok=True)
        admin_dirs = {n.admin_path.parent.parent for n in plan.nodes} - {data_dir}
        for d in admin_dirs:
            shutil.rmtree(d, ignore_errors=True)
        if own_dir and not options.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            console.print(f"data and logs kept in {data_dir}", soft_wrap=True)
        console.print(f"stopped in {time.monotonic() - stop_started:.1f} s")
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code


async def _main(fleet: Fleet, options: DemoOptions, schemas: Path, console: Console) -> int:
    loop = asyncio.get_running_loop()
    run = asyncio.ensure_future(_run(fleet, options, schemas, console))
    stopping = asyncio.Event()

    def on_signal(signame: str) -> None:
        if stopping.is_set():  # a second one: stop without grace periods
            fleet.hurry = True
        else:
            console.print(f"\n{signame}: stopping the fleet")
            stopping.set()
            run.cancel()

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig.name)
    try:
        await run
    except asyncio.CancelledError:
        if not stopping.is_set():
            raise
        return 0
    except DemoError as e:
        console.print(f"error: {e}", style="red", markup=False, soft_wrap=True, highlight=False)
        return 1
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    return 0
