"""Blast radius of regional churn: region mode (a cluster per region + one global cluster) against one
fleet-wide cluster, with real agents on 127.0.0.1.

Two phases, in one run, on ``schemas/platform.sql``, each with ``--regions`` × ``--nodes`` agents
(3 × 4 by default):

* **A, region mode**: every agent has ``[gossip]`` (its region's cluster, one cluster id per region) and
  ``[gossip.global]`` (every node, one id, WAN profile as by default);
* **B, fleet-wide**: the same agents without ``[gossip.global]``: one cluster carries every table.

The same churn script runs in both against region ``a`` only, open loop at ``--rate`` events/s (100) for
``--seconds`` (60), each event one ``POST /v1/transactions`` to the a-node that owns the machine (machines
are spread over a's nodes, as hosts write their own instances): check flaps (passing ↔ critical),
instances stopped / started (every steady app keeps one started), new instances inserted (with their
check), and every 100th event one of a few single-instance apps gaining its first or losing its last
started instance in ``a`` — a **presence transition**, counted by the driver: the bound for global writes.
Besides, 2 probes/s (``INSERT INTO services``, regional) go round-robin to a's nodes; each a-node has a
subscription on them, and the propagation time of a probe is the arrival of its last event on the other
a-nodes minus the moment the writer acknowledged it (``from_ack``; ``from_send`` also reported).

Measured per node between a snapshot just before the churn and one after everything arrived:

* change sets applied: ``verdigris_gossip_versions_merged`` from each agent's Prometheus endpoint (by
  scope in region mode);
* bytes sent on the gossip ports (UDP + TCP, IP lengths): nftables counters matching the socket's group id
  (each agent runs under a group id of its own; needs root and ``nft``, else reported as null);
* global writes: new versions of every node's global actor (its head, admin ``status``), summed over the
  nodes; in phase B every change set goes fleet-wide, so there it is every new version of any own actor;
* regional state outside ``a``: versions of a-nodes' regional actors held by b/c nodes (heads), and, after
  the agents stopped, rows of ``machines``/``checks``/``services`` and books of a's regional actors in the
  b/c database files (read only).

Targets (the issue's): (1) phase A: zero regional change sets applied, rows or books of a's regional
actors outside ``a``; (2) phase A: app_regions writes ≤ presence transitions as the issue defines them
(an app's first/last started instance in ``a``, or its capacity hint crossing a bucket; the driver
replays the publisher's bucket rule), region_rtt publications reported apart; (3) phase A's propagation inside
``a`` no worse than phase B's (p50 and p99 within 10 % + 5 ms of phase B's). Checks (else ``FAILED``, exit
1): every event and probe acknowledged, every a-node ending with the driver's machine and check states,
every probe arriving once on every a-node.

    .venv/bin/python bench/blast_radius.py           # 3 × 4 agents, 100 events/s for 60 s, both phases
    .venv/bin/python bench/blast_radius.py --quick   # 3 × 2 agents, 50 events/s for 4 s (smoke)

The last line of stdout is one line of JSON with the figures (with every probe's propagation time), also
saved to ``bench/results/blast_radius.json`` (``--results DIR``) for ``bench/plot.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from rich.table import Table

from _cluster import (
    HOST,
    CpuMeter,
    Procs,
    Traffic,
    VerdigrisCluster,
    VerdigrisNode,
    follow_subscription,
    free_ports,
    machine_load,
    pct,
    run_guarded,
    until,
    workdir,
)
from _results import add_results_argument, save_results
from _util import BenchFailure, emit_json, environment, make_console

PLATFORM_SQL = Path(__file__).resolve().parent.parent / "schemas" / "platform.sql"
GLOBAL_CLUSTER_ID = 1
GID_BASE = 61_000
"""Agent i runs under group id GID_BASE + i (as root) so nftables can attribute every packet it sends."""
LATENCY_TOLERANCE = (1.10, 0.005)
"""Phase A's propagation is "no worse" than phase B's when ≤ B × 1.10 + 5 ms (noise of a shared machine)."""
STEADY_APPS, STEADY_INSTANCES, FLAPPY_APPS = 20, 5, 4
PRESENCE_EVERY = 100
PROBE_RATE = 2.0


# ------------------------------------------------------------------------------------------------ agents


class GidProcs(Procs):
    """:class:`Procs` whose children can run under a group id of their own (set before the death signal,
    which a credentials change would clear)."""

    def start_as(self, argv: list[str], log: Path, gid: int | None) -> subprocess.Popen[bytes]:
        if gid is None:
            return self.start(argv, log)
        from _cluster import _die_with_parent

        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                group=gid,
                extra_groups=[],
                preexec_fn=_die_with_parent,  # runs after the gid change
            )
        self.procs.append(proc)
        return proc


@dataclass
class Agent(VerdigrisNode):
    region: str = ""
    cluster_id: int = 0
    global_port: int | None = None
    global_bootstrap: list[str] = field(default_factory=list)
    metrics_port: int = 0
    gid: int | None = None
    actors: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.region}{self.index}"

    @property
    def db(self) -> Path:
        return self.root / "state.db"

    def write_config(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        lines = [
            "[db]",
            f'path = "{self.db}"',
            f'schema_paths = ["{PLATFORM_SQL}"]',
            "[api]",
            f'addr = "{HOST}:{self.api_port}"',
            "[admin]",
            f'path = "{self.admin_path}"',
            "[gossip]",
            f'addr = "{self.gossip}"',
            f"bootstrap = {json.dumps(self.bootstrap)}",
            f"cluster-id = {self.cluster_id}",
            f'region = "{self.region}"',
            f'key = "{self.key}"',
            'profile = "lan"',
        ]
        if self.global_port is not None:
            lines += [
                "[gossip.global]",
                f'addr = "{HOST}:{self.global_port}"',
                f"bootstrap = {json.dumps(self.global_bootstrap)}",
                f"cluster-id = {GLOBAL_CLUSTER_ID}",
            ]
        lines += ["[telemetry.prometheus]", f'addr = "{HOST}:{self.metrics_port}"']
        lines += ["[log]", f'level = "{self.log_level}"', "colors = false"]
        path = self.root / "agent.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start_agent(self, procs: GidProcs) -> None:
        config = self.write_config()
        self.admin.close()
        argv = [sys.executable, "-m", "verdigris.cli", "agent", "-c", str(config)]
        self.proc = procs.start_as(argv, self.log, self.gid)

    def gossip_ports(self) -> list[int]:
        return [self.gossip_port] + ([self.global_port] if self.global_port is not None else [])


class Fleet(VerdigrisCluster):
    """``regions`` × ``per_region`` agents; region mode when ``region_mode``, else one cluster."""

    def __init__(
        self, procs: GidProcs, root: Path, regions: list[str], per_region: int, *, region_mode: bool
    ) -> None:
        n = len(regions) * per_region
        super().__init__(procs, root, 0, schema="")
        self.procs: GidProcs = procs
        self.region_mode = region_mode
        self.regions = regions
        ports = free_ports(4 * n)
        gids = os.geteuid() == 0
        nodes: list[Agent] = []
        for r, region in enumerate(regions):
            for j in range(per_region):
                i = len(nodes)
                nodes.append(
                    Agent(
                        index=j,
                        root=root / f"{region}{j}",
                        admin_path=self.admin_root / f"{i}.sock",
                        api_port=ports[i],
                        gossip_port=ports[n + i],
                        key=self.key,
                        bootstrap=[],
                        schema="",
                        region=region,
                        cluster_id=(11 + r) if region_mode else 0,
                        global_port=ports[2 * n + i] if region_mode else None,
                        metrics_port=ports[3 * n + i],
                        gid=GID_BASE + i if gids else None,
                    )
                )
        by_region = {region: [a for a in nodes if a.region == region] for region in regions}
        for a in nodes:
            if region_mode:  # the region's first two nodes; the global cluster: each region's first node
                a.bootstrap = [b.gossip for b in by_region[a.region][:2] if b is not a]
                a.global_bootstrap = [
                    f"{HOST}:{rs[0].global_port}" for rs in by_region.values() if rs[0] is not a
                ]
            else:  # one cluster: each region's first node as seed
                a.bootstrap = [rs[0].gossip for rs in by_region.values() if rs[0] is not a]
        self.nodes = nodes  # type: ignore[assignment]
        self.agents = nodes
        self.by_region = by_region

    async def start_all(self, timeout: float) -> dict[str, float]:
        t0 = time.monotonic()
        for a in self.agents:
            a.start_agent(self.procs)
        await self.ready(self.agents, timeout)
        healthy = time.monotonic() - t0

        async def admin_up() -> bool:
            try:
                pings = await asyncio.gather(*(a.admin.call({"cmd": "ping"}, 5.0) for a in self.agents))
            except (OSError, TimeoutError, ConnectionError, ValueError):
                return False
            for a, p in zip(self.agents, pings, strict=True):
                a.actors = dict(p["actors"])
            return True

        await until("every admin socket", timeout, admin_up)
        per_region = len(self.agents) // len(self.regions)

        async def joined() -> bool:
            for a in self.agents:
                regional = (await a.admin.call({"cmd": "members", "scope": "regional"}))["members"]
                want = per_region if self.region_mode else len(self.agents)
                if sum(m["state"] == "alive" for m in regional) != want:
                    return False
                if self.region_mode:
                    glob = (await a.admin.call({"cmd": "members", "scope": "global"}))["members"]
                    if sum(m["state"] == "alive" for m in glob) != len(self.agents):
                        return False
            return True

        await until("every membership", timeout, joined)
        return {"healthy_s": round(healthy, 2), "joined_s": round(time.monotonic() - t0, 2)}

    def stop_all(self, timeout: float = 15.0) -> None:
        """SIGTERM (a graceful leave, the database closed), SIGKILL after ``timeout``."""
        for a in self.agents:
            a.admin.close()
            if a.alive():
                assert a.proc is not None
                a.proc.terminate()
        deadline = time.monotonic() + timeout
        for a in self.agents:
            if a.proc is not None:
                try:
                    a.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    a.proc.kill()
                    a.proc.wait(timeout=10)


# ------------------------------------------------------------------------------------------------ churn


@dataclass
class Script:
    """The churn, decided before the run (the same in both phases): event i goes to a-node ``events[i][0]``."""

    seed_statements: list[tuple[int, list[Any]]]
    apps: list[str]
    events: list[tuple[int, list[Any]]]
    kinds: dict[str, int]
    presence_transitions: int
    app_regions_changes: int
    """Changes of the desired app_regions rows with the publisher's capacity buckets (informational)."""
    final_machines: dict[str, str]
    final_checks: dict[str, str]


def make_script(nodes: int, rate: float, seconds: float, seed: int) -> Script:
    rng = random.Random(seed)
    state: dict[str, str] = {}
    owner: dict[str, int] = {}
    app_of: dict[str, str] = {}
    check: dict[str, str] = {}
    started: dict[str, int] = {}
    seed_statements: list[tuple[int, list[Any]]] = []
    steady = [f"steady-{k:02d}" for k in range(STEADY_APPS)]
    flappy = [f"flappy-{k}" for k in range(FLAPPY_APPS)]
    counter = [0]

    def machine_sql(mid: str, app: str, st: str, ts: int) -> list[list[Any]]:
        return [
            [
                "INSERT INTO machines (id, app, region, state, address, updated_at, node, created_at) "
                "VALUES (?, ?, 'a', ?, ?, ?, ?, ?)",
                [mid, app, st, f"127.0.0.1:{10000 + counter[0] % 50000}", ts, f"a{owner[mid]}", ts],
            ],
            [
                "INSERT INTO checks (machine, name, app, status, output, updated_at) "
                "VALUES (?, 'http', ?, 'passing', 'ok', ?)",
                [mid, app, ts],
            ],
        ]

    def new_machine(app: str, st: str, ts: int) -> tuple[int, list[Any]]:
        counter[0] += 1
        mid = f"m{counter[0]:06d}"
        owner[mid], app_of[mid], state[mid], check[mid] = counter[0] % nodes, app, st, "passing"
        started[app] = started.get(app, 0) + (st == "started")
        return owner[mid], machine_sql(mid, app, st, ts)

    for app in steady:
        for _ in range(STEADY_INSTANCES):
            seed_statements.append(new_machine(app, "started", 0))
    for app in flappy:
        seed_statements.append(new_machine(app, "stopped", 0))
    flappy_machine = {app_of[m]: m for m in app_of if app_of[m] in flappy}

    def set_state(mid: str, st: str, ts: int) -> tuple[int, list[Any]]:
        app = app_of[mid]
        started[app] += (st == "started") - (state[mid] == "started")
        state[mid] = st
        sql = "UPDATE machines SET state = ?, updated_at = ? WHERE id = ?"
        return owner[mid], [[sql, [st, ts, mid]]]

    def bucket(n: int) -> int:
        return 0 if n <= 0 else 1 << (n.bit_length() - 1)

    total = int(rate * seconds)
    events: list[tuple[int, list[Any]]] = []
    desired_changes = 0
    kinds = {"check_flap": 0, "stop_start": 0, "new_instance": 0, "presence": 0}
    transitions = 0
    steady_machines = [m for m in app_of if app_of[m] in steady]
    for i in range(total):
        ts = i + 1
        buckets = {app: bucket(n) for app, n in started.items()}
        x = rng.random()
        if i % PRESENCE_EVERY == PRESENCE_EVERY // 2:
            app = flappy[(i // PRESENCE_EVERY) % len(flappy)]
            mid = flappy_machine[app]
            before = started[app] > 0
            events.append(set_state(mid, "stopped" if state[mid] == "started" else "started", ts))
            transitions += before != (started[app] > 0)
            kinds["presence"] += 1
        elif x < 0.4:
            mid = rng.choice(steady_machines)
            check[mid] = "critical" if check[mid] == "passing" else "passing"
            sql = (
                "UPDATE checks SET status = ?, output = ?, updated_at = ? WHERE machine = ? AND name = 'http'"
            )
            events.append((owner[mid], [[sql, [check[mid], f"flap {ts}", ts, mid]]]))
            kinds["check_flap"] += 1
        elif x < 0.75:
            mid = rng.choice(steady_machines)
            if state[mid] == "started" and started[app_of[mid]] <= 1:
                mid = next(m for m in steady_machines if app_of[m] == app_of[mid] and state[m] == "stopped")
            events.append(set_state(mid, "stopped" if state[mid] == "started" else "started", ts))
            kinds["stop_start"] += 1
        else:
            events.append(new_machine(rng.choice(steady), "started", ts))
            steady_machines.append(f"m{counter[0]:06d}")
            kinds["new_instance"] += 1
        desired_changes += sum(bucket(n) != buckets.get(app, 0) for app, n in started.items())
    return Script(
        seed_statements,
        steady + flappy,
        events,
        kinds,
        transitions,
        desired_changes,
        dict(state),
        dict(check),
    )


# ------------------------------------------------------------------------------------------------ probes


class ProbeWatch:
    """A subscription on the probes (``services`` rows of app 'probe') on each a-node."""

    def __init__(self, fleet: Fleet, nodes: list[Agent]) -> None:
        self.fleet, self.nodes = fleet, nodes
        self.sent: dict[int, tuple[int, int, int]] = {}
        """probe -> (writer index, send ns, ack ns)."""
        self.arrivals: dict[int, dict[int, int]] = {}
        self.problems: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, timeout: float = 30.0) -> None:
        ready = [asyncio.Event() for _ in self.nodes]
        self._tasks = [
            asyncio.create_task(self._follow(n, e)) for n, e in zip(self.nodes, ready, strict=True)
        ]
        try:
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), timeout)
        except TimeoutError as e:
            raise BenchFailure(
                f"probe subscriptions not ready in {timeout:.0f} s: {self.problems[:3]}"
            ) from e

    async def _follow(self, node: Agent, ready: asyncio.Event) -> None:
        assert self.fleet.http is not None

        def change(kind: str, values: list[Any], now: int) -> None:
            seen = self.arrivals.setdefault(int(values[0]), {})
            if kind != "insert" or node.index in seen:
                self.problems.append(f"{node.name}: probe {values[0]}: {kind}, again")
            seen[node.index] = now

        sql = "SELECT port, updated_at FROM services WHERE app = 'probe'"
        await follow_subscription(self.fleet.http, node, sql, ready, self.problems, change)

    async def run(self, seconds: float) -> None:
        count = int(seconds * PROBE_RATE)
        start = time.monotonic()
        for i in range(count):
            await asyncio.sleep(max(0.0, start + i / PROBE_RATE - time.monotonic()))
            node = self.nodes[i % len(self.nodes)]
            t_send = time.time_ns()
            sql = "INSERT INTO services (app, port, updated_at) VALUES ('probe', ?, ?)"
            await self.fleet.write(node, [[sql, [i, t_send]]])
            self.sent[i] = (node.index, t_send, time.time_ns())

    def complete(self) -> bool:
        return all(len(self.arrivals.get(i, {})) == len(self.nodes) for i in self.sent)

    def latencies(self) -> dict[str, Any]:
        from_ack, from_send = [], []
        for i, (writer, t_send, t_ack) in self.sent.items():
            last = max(t for n, t in self.arrivals[i].items() if n != writer)
            from_ack.append(max(0, last - t_ack) / 1e9)
            from_send.append((last - t_send) / 1e9)
        return {
            "probes": len(self.sent),
            "p50_s": round(pct(from_ack, 50), 4),
            "p99_s": round(pct(from_ack, 99), 4),
            "max_s": round(max(from_ack), 4),
            "from_send_p50_s": round(pct(from_send, 50), 4),
            "from_send_p99_s": round(pct(from_send, 99), 4),
            "samples_s": [round(x, 4) for x in from_ack],  # for bench/plot.py's distribution
        }

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# ------------------------------------------------------------------------------------------------ measures


async def scrape(fleet: Fleet, a: Agent) -> dict[str, float]:
    """versions/changes merged, by scope ('all' without region mode)."""
    assert fleet.http is not None
    async with fleet.http.get(
        f"http://{HOST}:{a.metrics_port}/metrics", timeout=aiohttp.ClientTimeout(total=10)
    ) as r:
        text = await r.text()
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == "verdigris_presence_writes":  # rows the presence publisher wrote, by table
            for s in fam.samples:
                if s.name.endswith("_total"):
                    key = f"presence_rows:{s.labels.get('table', '?')}"
                    out[key] = out.get(key, 0.0) + s.value
        if fam.name in ("verdigris_gossip_versions_merged", "verdigris_gossip_changes_merged"):
            what = "versions" if "versions" in fam.name else "changes"
            for s in fam.samples:
                if s.name.endswith("_total"):
                    key = f"{what}:{s.labels.get('scope', 'all')}"
                    out[key] = out.get(key, 0.0) + s.value
    return out


async def heads(a: Agent, region_mode: bool) -> dict[str, int]:
    scopes = ("regional", "global") if region_mode else ("regional",)
    merged: dict[str, int] = {}
    for scope in scopes:
        merged.update((await a.admin.call({"cmd": "status", "scope": scope}))["heads"])
    return merged


class GidTraffic(Traffic):
    def __init__(self, fleet: Fleet) -> None:
        super().__init__({})
        self.fleet = fleet

    def __enter__(self) -> GidTraffic:
        import shutil

        nft = shutil.which("nft")
        if nft is None or os.geteuid() != 0 or any(a.gid is None for a in self.fleet.agents):
            self.reason = "needs root and nft"
            return self
        self._remove_stale(nft)
        scopes = {"regional": [a.gossip_port for a in self.fleet.agents]}
        if self.fleet.region_mode:
            scopes["global"] = [a.global_port for a in self.fleet.agents if a.global_port is not None]
        lines = [f"table inet {self.table} {{", "  chain out {", "    type filter hook output priority 0;"]
        for a in self.fleet.agents:
            for scope, ports in scopes.items():
                s = "{ " + ", ".join(str(p) for p in ports) + " }"
                for proto in ("udp", "tcp"):
                    for d in ("sport", "dport"):
                        lines.append(
                            f"    ip daddr {HOST} meta skgid {a.gid} {proto} {d} {s} counter "
                            f'comment "{a.gid}:{scope}:{proto}:{d}"'
                        )
        lines += ["  }", "}"]
        proc = subprocess.run([nft, "-f", "-"], input="\n".join(lines) + "\n", capture_output=True, text=True)
        if proc.returncode != 0:
            self.reason = f"nft failed: {proc.stderr.strip()[:200]}"
            return self
        self.available = True
        return self

    def bytes_by(self) -> dict[tuple[int, str], int] | None:
        """(gid, scope) -> bytes sent so far. A datagram between two gossip ports matches sport and dport:
        UDP is counted by sport only; TCP by sport (server side) + dport (client side, ephemeral sport)."""
        if not self.available:
            return None
        out: dict[tuple[int, str], int] = {}
        for key, (_packets, nbytes) in self.snapshot().counters.items():
            gid, scope, proto, d = key.split(":")
            if proto == "udp" and d == "dport":
                continue
            k = (int(gid), scope)
            out[k] = out.get(k, 0) + nbytes
        return out


async def snapshot(fleet: Fleet, traffic: GidTraffic) -> dict[str, Any]:
    metrics = await asyncio.gather(*(scrape(fleet, a) for a in fleet.agents))
    hs = await asyncio.gather(*(heads(a, fleet.region_mode) for a in fleet.agents))
    return {"metrics": metrics, "heads": hs, "bytes": traffic.bytes_by(), "t": time.monotonic()}


async def wait_final(fleet: Fleet, script: Script, timeout: float) -> float:
    """Every a-node holds the driver's final machine states and check statuses."""
    want_m = sorted(script.final_machines.items())
    want_c = sorted(script.final_checks.items())

    async def done() -> bool:
        for a in fleet.by_region["a"]:
            m = await fleet.query(a, "SELECT id, state FROM machines ORDER BY id")
            c = await fleet.query(a, "SELECT machine, status FROM checks ORDER BY machine")
            if [tuple(r) for r in m] != want_m or [tuple(r) for r in c] != want_c:
                return False
        return True

    try:
        return await until("the driver's final states on every a-node", timeout, done)
    except BenchFailure:
        a = fleet.by_region["a"][0]
        m = dict((r[0], r[1]) for r in await fleet.query(a, "SELECT id, state FROM machines"))
        diff = sum(m.get(k) != v for k, v in script.final_machines.items())
        raise BenchFailure(
            f"a-node {a.name}: {diff} of {len(want_m)} machines differ from the driver"
        ) from None


def db_traces(a: Agent, actors: list[bytes]) -> dict[str, int]:
    """Regional rows and books of ``actors`` in ``a``'s database file (read only, agent stopped)."""
    conn = sqlite3.connect(f"file:{a.db}?mode=ro", uri=True, timeout=10)
    try:
        out = {
            t: int(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0])
            for t in ("machines", "checks", "services")
        }
        marks = ",".join("?" * len(actors))
        for t in ("__vd_actors", "__vd_bookkeeping"):
            out[t] = int(
                conn.execute(f"SELECT count(*) FROM {t} WHERE actor IN ({marks})", actors).fetchone()[0]
            )
        return out
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------------ a phase


async def phase(
    region_mode: bool, regions: list[str], per_region: int, script: Script, args: argparse.Namespace
) -> dict[str, Any]:
    label = "A (region mode)" if region_mode else "B (fleet-wide)"
    procs = GidProcs()
    try:
        with workdir("vd-blast-") as root:
            fleet = Fleet(procs, root, regions, per_region, region_mode=region_mode)
            async with fleet:
                with GidTraffic(fleet) as traffic:
                    result = await _phase(fleet, traffic, script, args)
                    fleet.stop_all()
                    a_regional = [bytes.fromhex(a.actors["regional"]) for a in fleet.by_region["a"]]
                    traces = {a.name: db_traces(a, a_regional) for a in fleet.agents if a.region != "a"}
    finally:
        procs.kill_all()
    result["phase"] = label
    result["region_mode"] = region_mode
    result["db_outside_a"] = traces
    return result


async def _phase(
    fleet: Fleet, traffic: GidTraffic, script: Script, args: argparse.Namespace
) -> dict[str, Any]:
    started = await fleet.start_all(args.start_timeout)
    a_nodes = fleet.by_region["a"]
    # Seed: the apps (global) from a0; region a's first instances on their owners.
    apps = [["INSERT INTO apps (name, org) VALUES (?, 'bench')", [app]] for app in script.apps]
    await fleet.write(a_nodes[0], apps)
    by_owner: dict[int, list[Any]] = {}
    for owner, stmts in script.seed_statements:
        by_owner.setdefault(owner, []).extend(stmts)
    await asyncio.gather(*(fleet.write(a_nodes[o], s) for o, s in by_owner.items()))
    seeded = {m for _, stmts in script.seed_statements for m in [stmts[0][1][0]]}

    async def seeded_everywhere() -> bool:
        for a in fleet.agents:
            n_apps = (await fleet.query(a, "SELECT count(*) FROM apps"))[0][0]
            if n_apps != len(script.apps):
                return False
            counted = a.region == "a" or not fleet.region_mode
            if counted and (await fleet.query(a, "SELECT count(*) FROM machines"))[0][0] != len(seeded):
                return False
        return True

    await until("the seed everywhere", 60, seeded_everywhere)
    await asyncio.sleep(args.settle)
    watch = ProbeWatch(fleet, a_nodes)
    await watch.start()
    before = await snapshot(fleet, traffic)
    meter = CpuMeter([a.proc.pid for a in fleet.agents if a.proc is not None]).start()
    failures: list[str] = []
    sent = [0]
    t0 = time.monotonic()
    late = [0.0]

    async def send(i: int) -> None:
        owner, stmts = script.events[i]
        try:
            await fleet.write(a_nodes[owner], stmts)
            sent[0] += 1
        except BenchFailure as e:
            failures.append(str(e))

    async def churn() -> float:
        # open loop, in order of the script, at most `writers` in flight
        sem = asyncio.Semaphore(args.writers)
        tasks: list[asyncio.Task[None]] = []
        for i in range(len(script.events)):
            delay = t0 + i / args.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                late[0] = max(late[0], -delay)
            await sem.acquire()
            task = asyncio.create_task(send(i))
            task.add_done_callback(lambda _t: sem.release())
            tasks.append(task)
        await asyncio.gather(*tasks)
        return len(script.events) / max(1e-9, time.monotonic() - t0)

    bound = args.seconds * 3 + 60

    async def both() -> tuple[float, None]:
        return await asyncio.gather(churn(), watch.run(args.seconds))

    achieved, _ = await asyncio.wait_for(both(), bound)
    cpu = meter.stop()
    load = machine_load()
    if failures:
        raise BenchFailure(f"{len(failures)} churn writes failed: {failures[:3]}")
    drain = await wait_final(fleet, script, 90)
    await until("every probe on every a-node", 30, lambda: _true(watch.complete()))
    await watch.stop()
    if watch.problems:
        raise BenchFailure("; ".join(watch.problems[:5]))
    await asyncio.sleep(args.settle)  # let sync rounds after the drain show up in the counters
    after = await snapshot(fleet, traffic)
    seconds = after["t"] - before["t"]

    nodes: list[dict[str, Any]] = []
    a_regional = {a.actors["regional"] for a in a_nodes}
    for k, a in enumerate(fleet.agents):
        m0, m1 = before["metrics"][k], after["metrics"][k]
        applied = {
            key.split(":")[1]: int(m1.get(key, 0) - m0.get(key, 0))
            for key in m1
            if key.startswith("versions:")
        }
        changes = {
            key.split(":")[1]: int(m1.get(key, 0) - m0.get(key, 0))
            for key in m1
            if key.startswith("changes:")
        }
        presence_rows = {
            key.split(":")[1]: int(m1.get(key, 0) - m0.get(key, 0))
            for key in m1
            if key.startswith("presence_rows:")
        }
        h0, h1 = before["heads"][k], after["heads"][k]

        def grew(actor: str, h0: dict[str, int] = h0, h1: dict[str, int] = h1) -> int:
            return h1.get(actor, 0) - h0.get(actor, 0)

        own_global = grew(a.actors["global"])
        own_all = own_global + grew(a.actors["regional"])
        sent_bytes = None
        if before["bytes"] is not None and after["bytes"] is not None and a.gid is not None:
            sent_bytes = {
                scope: after["bytes"].get((a.gid, scope), 0) - before["bytes"].get((a.gid, scope), 0)
                for scope in (("regional", "global") if fleet.region_mode else ("regional",))
            }
            if not fleet.region_mode:
                sent_bytes = {"all": sent_bytes["regional"]}
        nodes.append(
            {
                "name": a.name,
                "region": a.region,
                "changesets_applied": applied,
                "changes_applied": changes,
                "bytes_sent": sent_bytes,
                "own_global_versions": own_global,
                "presence_rows_written": presence_rows,
                "own_versions": own_all,
                "a_regional_versions_held": sum(h1.get(x, 0) for x in a_regional)
                if a.region != "a"
                else None,
            }
        )
    return {
        "agents": len(fleet.agents),
        "start": started,
        "events": len(script.events),
        "events_acked": sent[0],
        "achieved_rate": round(achieved, 1),
        "max_late_s": round(late[0], 3),
        "drain_s": round(drain, 2),
        "window_s": round(seconds, 2),
        "propagation_a": watch.latencies(),
        "nodes": nodes,
        "cpu": cpu,
        "bytes_available": traffic.available,
        "bytes_unavailable_reason": traffic.reason or None,
        **load,
    }


async def _true(v: bool) -> bool:
    return v


def summarize(p: dict[str, Any], regions: list[str]) -> dict[str, Any]:
    """Per region: means per node, and the phase's global writes."""
    by: dict[str, Any] = {}
    mode = p["region_mode"]
    for region in regions:
        ns = [n for n in p["nodes"] if n["region"] == region]
        k = len(ns)
        applied = {
            s: sum(n["changesets_applied"].get(s, 0) for n in ns) / k for s in ns[0]["changesets_applied"]
        }
        bytes_ = None
        if all(n["bytes_sent"] is not None for n in ns):
            bytes_ = {s: sum(n["bytes_sent"][s] for n in ns) / k for s in ns[0]["bytes_sent"]}
        writes = sum(n["own_global_versions"] if mode else n["own_versions"] for n in ns)
        outside = None
        if region != "a":
            db = [p["db_outside_a"][n["name"]] for n in ns]
            outside = {
                "regional_changesets_applied": sum(n["changesets_applied"].get("regional", 0) for n in ns)
                if mode
                else sum(n["a_regional_versions_held"] for n in ns),
                "a_regional_versions_held": sum(n["a_regional_versions_held"] for n in ns),
                "rows": sum(d["machines"] + d["checks"] + d["services"] for d in db),
                "books_of_a_regional_actors": sum(d["__vd_bookkeeping"] + d["__vd_actors"] for d in db),
            }
        by[region] = {
            "nodes": k,
            "changesets_applied_per_node": {s: round(v, 1) for s, v in applied.items()},
            "changesets_applied_per_node_total": round(sum(applied.values()), 1),
            "bytes_sent_per_node": {s: round(v) for s, v in bytes_.items()} if bytes_ else None,
            "bytes_sent_per_node_total": round(sum(bytes_.values())) if bytes_ else None,
            "global_writes": writes,
            "presence_rows_written": {
                t: sum(n["presence_rows_written"].get(t, 0) for n in ns)
                for t in sorted({t for n in ns for t in n["presence_rows_written"]})
            },
            "outside_a": outside,
        }
    return by


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--regions", type=int, default=3, help="regions (default 3)")
    parser.add_argument("--nodes", type=int, default=4, help="agents per region (default 4)")
    parser.add_argument("--rate", type=float, default=100.0, help="churn events per second (default 100)")
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of churn per phase (default 60)")
    parser.add_argument(
        "--writers", type=int, default=16, help="churn requests in flight at most (default 16)"
    )
    parser.add_argument("--settle", type=float, default=3.0, help="quiet seconds before/after the churn")
    parser.add_argument("--start-timeout", type=float, default=90.0, help="bound on start + join (s)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the churn script")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 × 2 agents, 50 events/s for 4 s")
    add_results_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.nodes, args.rate, args.seconds, args.settle, args.writers = 2, 50.0, 4.0, 0.5, 8
    if args.regions < 2 or args.nodes < 2 or args.regions * args.nodes > 48:
        parser.error("at least 2 regions of 2 nodes, at most 48 agents")
    regions = [chr(ord("a") + r) for r in range(args.regions)]
    script = make_script(args.nodes, args.rate, args.seconds, args.seed)
    console = make_console()
    results: list[dict[str, Any]] = []
    try:
        for region_mode in (True, False):
            console.print(
                f"phase {'A (region mode)' if region_mode else 'B (fleet-wide)'}: {args.regions} × {args.nodes} "
                f"agents, {args.rate:g} events/s for {args.seconds:g} s in region a"
            )
            results.append(asyncio.run(phase(region_mode, regions, args.nodes, script, args)))
    except BenchFailure as e:
        console.print(f"[red]FAILED[/red]: {e}")
        return 1
    a_res, b_res = results
    summaries = [summarize(r, regions) for r in results]
    sa, sb = summaries

    # targets
    outside = [sa[r]["outside_a"] for r in regions if r != "a"]
    zero_outside = all(all(v == 0 for v in o.values()) for o in outside)
    global_writes_a = sum(sa[r]["global_writes"] for r in regions)
    rtt_rows_a = sum(sa[r]["presence_rows_written"].get("region_rtt", 0) for r in regions)
    # The issue's bound: app_regions changes only on an app's first/last started instance in a region
    # or when its capacity hint crosses a bucket; region_rtt rows are RTT publications, counted apart.
    presence_writes_a = global_writes_a - rtt_rows_a
    bound_ok = presence_writes_a <= script.app_regions_changes
    pa, pb = a_res["propagation_a"], b_res["propagation_a"]
    f, add = LATENCY_TOLERANCE
    no_worse = pa["p50_s"] <= pb["p50_s"] * f + add and pa["p99_s"] <= pb["p99_s"] * f + add

    for r, s in zip(results, summaries, strict=True):
        table = Table(
            title=f"Phase {r['phase']}: {r['events']:,} events at {r['achieved_rate']:.0f}/s in region a "
            f"({r['agents']} agents, load {r['loadavg_1m']:.1f})"
        )
        for col in ["region", "nodes", "change sets applied/node", "bytes sent/node", "global writes",
                    "a's regional versions held outside a", "rows outside a", "books of a's actors outside a"]:  # fmt: skip
            table.add_column(col, justify="right")
        for region in regions:
            x = s[region]
            applied = " + ".join(f"{v:,.0f} {k}" for k, v in x["changesets_applied_per_node"].items())
            by = x["bytes_sent_per_node"]
            b = " + ".join(f"{v / 1e6:.2f} MB {k}" for k, v in by.items()) if by else "n/a"
            o = x["outside_a"]
            table.add_row(
                region, str(x["nodes"]), applied, b, f"{x['global_writes']:,}",
                "—" if o is None else f"{o['a_regional_versions_held']:,}",
                "—" if o is None else f"{o['rows']:,}",
                "—" if o is None else f"{o['books_of_a_regional_actors']:,}",
            )  # fmt: skip
        console.print(table)
    lat = Table(title="Propagation inside region a (probe ack at the writer → visible on the other a-nodes)")
    for col in ["phase", "probes", "p50", "p99", "max", "p99 from send", "agents CPU", "machine busy"]:
        lat.add_column(col, justify="right")
    for r in results:
        q = r["propagation_a"]
        lat.add_row(r["phase"], str(q["probes"]), f"{q['p50_s'] * 1000:.0f} ms", f"{q['p99_s'] * 1000:.0f} ms",
                    f"{q['max_s'] * 1000:.0f} ms", f"{q['from_send_p99_s'] * 1000:.0f} ms",
                    f"{r['cpu']['agents_cpu_cores']:.2f} cores", f"{r['cpu']['machine_busy_pct']:.0f} %")  # fmt: skip
    console.print(lat)
    console.print(
        f"events: {script.kinds}; presence transitions (driver): {script.presence_transitions}; changes of "
        f"the desired app_regions rows counting capacity buckets: {script.app_regions_changes}"
    )
    rows = {
        t: sum(sa[r]["presence_rows_written"].get(t, 0) for r in regions)
        for t in ("app_regions", "region_rtt")
    }
    console.print(f"phase A presence publisher rows written: {rows}")
    for _name, ok, what in [
        ("zero_regional_outside", zero_outside, "phase A: no regional change set, row or book of a outside a"),
        ("global_writes_bounded", bound_ok,
         f"phase A: global writes {presence_writes_a} (+ {rtt_rows_a} region_rtt) ≤ presence transitions "
         f"{script.app_regions_changes} (first/last instance {script.presence_transitions} + capacity buckets)"),
        ("propagation_no_worse", no_worse,
         f"phase A p50/p99 {pa['p50_s'] * 1000:.0f}/{pa['p99_s'] * 1000:.0f} ms vs phase B "
         f"{pb['p50_s'] * 1000:.0f}/{pb['p99_s'] * 1000:.0f} ms (tolerance ×{f:g} + {add * 1000:.0f} ms)"),
    ]:  # fmt: skip
        console.print(f"{'met' if ok else 'MISSED'}: {what}")
    payload = {
        "bench": "blast_radius",
        **environment(),
        "quick": args.quick,
        "regions": args.regions,
        "nodes_per_region": args.nodes,
        "rate": args.rate,
        "seconds": args.seconds,
        "events": script.kinds,
        "presence_transitions": script.presence_transitions,
        "app_regions_changes_with_capacity": script.app_regions_changes,
        "global_writes_a": global_writes_a,
        "presence_writes_a": presence_writes_a,
        "region_rtt_writes_a": rtt_rows_a,
        "global_writes_b": sum(sb[r]["global_writes"] for r in regions),
        "by_region": {"a_region_mode": sa, "b_fleet_wide": sb},
        "propagation": {"a_region_mode": pa, "b_fleet_wide": pb},
        "targets_met": {
            "zero_regional_outside": zero_outside,
            "global_writes_bounded": bound_ok,
            "propagation_no_worse": no_worse,
        },
        "target_met": zero_outside and bound_ok and no_worse,
        "phases": results,
    }
    console.print(f"figures saved to {save_results(payload, args.results)}")
    emit_json(payload)
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
