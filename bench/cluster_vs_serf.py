"""Verdigris beside HashiCorp Serf, in the same run: N real agents of each on 127.0.0.1.

Both clusters use memberlist's LAN timing (Serf's default ``lan`` profile; Verdigris ``profile = "lan"``:
probe 1 s, timeout 500 ms, gossip every 200 ms to 3 members) and AES-GCM with the same generated 32-byte
key. They run one after the other (Serf first), each with the machine to itself, and go through the
same steps:

1. **Start** N agents (Serf: ``serf agent -node=sI -bind=127.0.0.1:P -rpc-addr=127.0.0.1:R -encrypt=KEY``
   joining the first; Verdigris: ``verdigris agent`` with 3 seeds), wait until every agent sees N alive
   members, then ``--settle`` seconds of quiet.
2. **Idle traffic**: bytes per second per node over ``--idle-seconds``.
3. **Propagation under load**: ``--events`` events at ``--event-rate``/s (10) to random agents. Serf: a
   user event through the ``event`` RPC of one agent (``serf event``), received on every agent through an
   RPC ``stream`` of user events. Verdigris: a one-row write through ``POST /v1/transactions``, received on
   every agent through a ``POST /v1/subscriptions``. Each carries ``time.time_ns()`` taken just before
   its request; its propagation time is the arrival of the last of its N copies minus that. The traffic
   of the sending window is the "under load" figure.
4. **Failure detection**, ``--kills`` times: ``kill -9`` one agent (never a seed; a different one each
   time), then ask every survivor every 100 ms for its member list (Serf: the ``members`` RPC, what
   ``serf members`` shows; Verdigris: the admin socket's ``members``, what ``verdigris cluster members``
   shows) until it shows the victim ``failed`` / ``dead``. Reported: time until the first survivor and
   until every survivor shows it. The victim is restarted and rejoins before the next kill.
5. **False failures**: members declared failed / dead that were alive, from every agent's log
   (Serf ``EventMemberFailed``, Verdigris ``member down``) over the whole phase, and from the polls.

Traffic is counted by the kernel: nftables counters on the loopback output path, per group of gossip
ports (UDP datagrams, both sides of TCP streams; IP lengths, headers included) — see
``_cluster.Traffic``. Needs root and ``nft`` (Debian ``nftables``); without them bytes are not reported.
CPU used by the agents (``/proc/PID/stat``) and by the machine (``/proc/stat``) is reported per window.

    .venv/bin/python bench/cluster_vs_serf.py              # N = 32, ≈ 2.5 min
    .venv/bin/python bench/cluster_vs_serf.py --nodes 16
    .venv/bin/python bench/cluster_vs_serf.py --quick      # N = 8, one kill, short windows

Targets: Verdigris at least as fast as Serf on propagation (p50 and p99) and on detection (median time
until every survivor sees the kill), with no more false failures. The last line of stdout is one line of
JSON with the figures; exit 1 with ``FAILED`` if an event is lost or a kill is never detected.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections import Counter
from typing import Any

from rich.table import Table

from _cluster import (
    PROBE_INSERT,
    PROBE_SCHEMA,
    CpuMeter,
    ProbeWatch,
    Procs,
    SerfCluster,
    SerfRpc,
    Traffic,
    VerdigrisCluster,
    machine_load,
    merge_sources,
    new_key,
    paced,
    pct,
    run_guarded,
    until,
    workdir,
)
from _util import BenchFailure, emit_json, environment, make_console, median

DETECT_TIMEOUT_S = 60.0
KILL_POLL_S = 0.1


class SerfSide:
    """The Serf cluster, seen through the steps of the benchmark."""

    label = "serf"
    failed = frozenset({"failed"})

    def __init__(self, cluster: SerfCluster) -> None:
        self.c = cluster
        self.n = len(cluster.nodes)
        self.sent: dict[int, int] = {}
        self.arrivals: dict[int, dict[int, int]] = {}
        self.problems: list[str] = []
        self._streams: list[SerfRpc] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._rng = random.Random(7)

    async def start(self) -> dict[str, float]:
        return await self.c.start()

    def pids(self) -> list[int]:
        return [n.proc.pid for n in self.c.nodes if n.proc is not None and n.alive()]

    async def open_watch(self) -> None:
        for node in self.c.nodes:
            rpc = await SerfRpc(node.rpc_port).connect()
            await rpc.stream("user")
            self._streams.append(rpc)
            self._tasks.append(asyncio.create_task(self._follow(node.index, rpc)))

    async def _follow(self, index: int, rpc: SerfRpc) -> None:
        try:
            while True:
                record = await rpc.next_event()
                now = time.time_ns()
                payload = record.get("Payload")
                if isinstance(payload, bytes):
                    payload = payload.decode()
                eid = int(payload)
                seen = self.arrivals.setdefault(eid, {})
                if index in seen:
                    self.problems.append(f"s{index}: event {eid} arrived twice")
                else:
                    seen[index] = now
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self.problems.append(f"s{index}: stream failed: {e!r}")

    async def send(self, i: int) -> None:
        node = self.c.nodes[self._rng.randrange(self.n)]
        rpc = await node.connect()
        self.sent[i] = time.time_ns()
        await rpc.event("p", str(i).encode())

    async def close_watch(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for rpc in self._streams:
            rpc.close()

    def key(self, i: int) -> str:
        return self.c.nodes[i].name

    async def states(self, i: int) -> dict[str, str]:
        return await self.c.member_states(self.c.nodes[i])

    def kill9(self, i: int) -> None:
        self.c.nodes[i].kill9()

    async def restart(self, i: int) -> None:
        node = self.c.nodes[i]
        node.start(self.c.procs)
        await self.c.rpc_ready(node)
        await self.c.wait_members(self.n)

    def declared_failed(self) -> Counter[str]:
        """How often each member was declared failed, over all agents' logs."""
        out: Counter[str] = Counter()
        for node in self.c.nodes:
            out.update(node.failed_logged())
        return out

    async def check_end(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.c.close()


class VerdigrisSide:
    """The Verdigris cluster, seen through the same steps."""

    label = "verdigris"
    failed = frozenset({"dead"})

    def __init__(self, cluster: VerdigrisCluster) -> None:
        self.c = cluster
        self.n = len(cluster.nodes)
        self.watch = ProbeWatch(cluster)
        self._rng = random.Random(7)

    @property
    def sent(self) -> dict[int, int]:
        return self.watch.sent

    @property
    def arrivals(self) -> dict[int, dict[int, int]]:
        return self.watch.arrivals

    @property
    def problems(self) -> list[str]:
        return self.watch.problems

    async def start(self) -> dict[str, float]:
        await self.c.__aenter__()
        return await self.c.start()

    def pids(self) -> list[int]:
        return [n.proc.pid for n in self.c.nodes if n.proc is not None and n.alive()]

    async def open_watch(self) -> None:
        await self.watch.start()

    async def send(self, i: int) -> None:
        node = self.c.nodes[self._rng.randrange(self.n)]
        ts = time.time_ns()
        self.watch.sent[i] = ts
        await self.c.write(node, [[PROBE_INSERT, [i, ts, node.index]]])

    async def close_watch(self) -> None:
        await self.watch.stop()

    def key(self, i: int) -> str:
        return self.c.nodes[i].gossip

    async def states(self, i: int) -> dict[str, str]:
        return await self.c.member_states(self.c.nodes[i])

    def kill9(self, i: int) -> None:
        self.c.nodes[i].kill9()

    async def restart(self, i: int) -> None:
        node = self.c.nodes[i]
        node.start(self.c.procs)
        await self.c.ready([node])
        await self.c.wait_members(self.n)

    def declared_failed(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for node in self.c.nodes:
            out.update(node.members_down_logged())
        return out

    async def check_end(self) -> dict[str, Any]:
        """Every agent holds exactly the rows written (the writes of the propagation step); how the
        versions arrived (broadcast or sync)."""
        sent = self.watch.sent
        want = [len(sent), sum(sent), sum(ts % 1_000_003 for ts in sent.values())]
        for node in self.c.nodes:
            if not node.alive():
                continue
            (got,) = await self.c.query(node, "SELECT count(*), sum(id), sum(ts % 1000003) FROM probes")
            if list(got) != want:
                raise BenchFailure(f"{node.name} holds {got} (count, sum id, sum ts), expected {want}")
        return await merge_sources(self.c)

    def close(self) -> None:
        self.c.close()


Side = SerfSide | VerdigrisSide


async def propagation(
    side: Side, count: int, rate: float, traffic: Traffic, group: str, wait: float
) -> dict[str, Any]:
    """``count`` events at ``rate``/s; seconds until each reached every node. A Verdigris write that has
    not reached every node within ``wait`` s fails the benchmark; a Serf event that has not is counted as
    lost for that node (Serf repairs missed user events only by its push/pull every 30 s, if at all) and
    its time is reported as infinite."""
    await side.open_watch()
    meter = CpuMeter(side.pids()).start()
    before = traffic.snapshot()
    achieved = await paced(count, rate, side.send, 4)
    after = traffic.snapshot()
    cpu = meter.stop()
    ids = list(range(count))

    async def all_arrived() -> bool:
        if side.problems:
            raise BenchFailure(f"{side.label}: " + "; ".join(side.problems[:5]))
        return all(len(side.arrivals.get(i, {})) == side.n for i in ids)

    t_last = time.monotonic()
    try:
        await until(f"every {side.label} event to reach every node", wait, all_arrived)
    except BenchFailure as e:
        if isinstance(side, VerdigrisSide) or side.problems:
            missing = sum(side.n - len(side.arrivals.get(i, {})) for i in ids)
            raise BenchFailure(f"{e} ({missing} of {side.n * count} arrivals missing)") from None
    waited = time.monotonic() - t_last
    await side.close_watch()
    lost = sum(side.n - len(side.arrivals.get(i, {})) for i in ids)
    spread = [
        (max(side.arrivals[i].values()) - side.sent[i]) / 1e9
        if len(side.arrivals.get(i, {})) == side.n
        else INF
        for i in ids
    ]
    return {
        "events": count,
        "achieved_rate": round(achieved, 2),
        "p50_s": _finite(pct(spread, 50)),
        "p90_s": _finite(pct(spread, 90)),
        "p99_s": _finite(pct(spread, 99)),
        "max_s": _finite(max(spread)),
        "lost_deliveries": lost,
        "events_everywhere": sum(1 for x in spread if x != INF),
        "waited_after_last_s": round(waited, 2),
        "load_traffic": traffic.rates(before, after, group, side.n),
        "load_cpu": cpu,
    }


INF = float("inf")


def _finite(x: float) -> float | None:
    """JSON has no infinity: an event that never reached every node is reported as null."""
    return None if x == INF else round(x, 4)


async def detect(side: Side, victim: int, polled_false: Counter[tuple[str, str]]) -> dict[str, Any]:
    """kill -9 ``victim``; seconds until the first and until every survivor shows it failed."""
    survivors = [i for i in range(side.n) if i != victim]
    key = side.key(victim)
    seen: dict[int, float] = {}
    side.kill9(victim)
    t0 = time.monotonic()
    while len(seen) < len(survivors):
        if time.monotonic() - t0 > DETECT_TIMEOUT_S:
            raise BenchFailure(
                f"{side.label}: only {len(seen)} of {len(survivors)} survivors saw the kill of "
                f"{key} within {DETECT_TIMEOUT_S:.0f} s"
            )
        pending = [i for i in survivors if i not in seen]
        views = await asyncio.gather(*(side.states(i) for i in pending))
        now = time.monotonic() - t0
        for i, view in zip(pending, views, strict=True):
            if view.get(key) in side.failed:
                seen[i] = now
            for member, state in view.items():
                if member != key and state in side.failed:
                    polled_false[(side.key(i), member)] += 1
        await asyncio.sleep(KILL_POLL_S)
    return {
        "victim": key,
        "first_s": round(min(seen.values()), 2),
        "all_s": round(max(seen.values()), 2),
    }


async def run_side(
    side: Side, args: argparse.Namespace, traffic: Traffic, group: str, console: Any
) -> dict[str, Any]:
    t_phase = time.monotonic()
    console.print(f"[bold]{side.label}[/bold]: starting {side.n} agents")
    started = await side.start()
    await asyncio.sleep(args.settle)
    console.print(f"{side.label}: idle for {args.idle_seconds:g} s")
    meter = CpuMeter(side.pids()).start()
    before = traffic.snapshot()
    await asyncio.sleep(args.idle_seconds)
    idle_traffic = traffic.rates(before, traffic.snapshot(), group, side.n)
    idle_cpu = meter.stop()
    console.print(f"{side.label}: {args.events} events at {args.event_rate:g}/s")
    wait = args.serf_wait if isinstance(side, SerfSide) else 60.0
    prop = await propagation(side, args.events, args.event_rate, traffic, group, wait)
    sources = await side.check_end()
    await asyncio.sleep(1.0)
    polled_false: Counter[tuple[str, str]] = Counter()
    kills: list[dict[str, Any]] = []
    victims = list(range(side.n - 1, max(2, side.n - 1 - args.kills), -1))[: args.kills]
    for k, victim in enumerate(victims):
        console.print(f"{side.label}: kill -9 {side.key(victim)} ({k + 1}/{len(victims)})")
        kills.append(await detect(side, victim, polled_false))
        if k + 1 < len(victims):
            t = time.monotonic()
            await side.restart(victim)
            kills[-1]["rejoined_s"] = round(time.monotonic() - t, 2)
            await asyncio.sleep(1.0)
    declared = side.declared_failed()
    expected = Counter({side.key(v): side.n - 1 for v in victims})
    false_logged = sum((declared - expected).values())
    load = machine_load()
    side.close()
    return {
        "nodes": side.n,
        "start": started,
        "idle_traffic": idle_traffic,
        "idle_cpu": idle_cpu,
        **prop,
        **sources,
        "kills": kills,
        "detect_first_s_median": median([k["first_s"] for k in kills]),
        "detect_all_s_median": median([k["all_s"] for k in kills]),
        "false_failures_logged": false_logged,
        "false_failures_polled": sum(polled_false.values()),
        "false_failures_detail": {f"{a}->{b}": n for (a, b), n in sorted(polled_false.items())},
        "phase_s": round(time.monotonic() - t_phase, 1),
        **load,
    }


async def run(args: argparse.Namespace, console: Any) -> dict[str, dict[str, Any]]:
    procs = Procs()
    key = new_key()
    try:
        with workdir("vd-vs-serf-") as root:
            serf = SerfSide(SerfCluster(procs, root / "serf", args.nodes, key=key))
            vd = VerdigrisSide(VerdigrisCluster(procs, root / "vd", args.nodes, schema=PROBE_SCHEMA, key=key))
            groups = {"serf": serf.c.gossip_ports, "verdigris": vd.c.gossip_ports}
            results: dict[str, dict[str, Any]] = {}
            with Traffic(groups) as traffic:
                if not traffic.available:
                    console.print(f"[yellow]traffic not measured[/yellow]: {traffic.reason}")
                try:
                    results["serf"] = await run_side(serf, args, traffic, "serf", console)
                    results["verdigris"] = await run_side(vd, args, traffic, "verdigris", console)
                finally:
                    serf.close()
                    vd.close()
                    await vd.c.__aexit__()
                results["_traffic"] = {"method": "nftables" if traffic.available else None,
                                       "reason": traffic.reason}  # fmt: skip
            return results
    finally:
        procs.kill_all()


def _ms(x: float | None) -> str:
    return "∞ (lost)" if x is None else f"{x * 1000:,.0f} ms"


def _le(a: float | None, b: float | None) -> bool:
    """a ≤ b, None being infinite."""
    return b is None or (a is not None and a <= b)


def _bytes(t: dict[str, Any] | None) -> str:
    return "n/a" if t is None else f"{t['bytes_per_s_per_node']:,.0f} B/s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=32, help="agents of each (default 32)")
    parser.add_argument("--events", type=int, default=50, help="events for propagation (default 50)")
    parser.add_argument("--event-rate", type=float, default=10.0, help="events per second (default 10)")
    parser.add_argument("--kills", type=int, default=3, help="kill -9 trials (default 3)")
    parser.add_argument("--idle-seconds", type=float, default=15.0, help="idle traffic window (default 15)")
    parser.add_argument("--settle", type=float, default=5.0, help="quiet seconds after the join (default 5)")
    parser.add_argument(
        "--serf-wait",
        type=float,
        default=35.0,
        help="seconds to wait for Serf events that missed a node (default 35: one push/pull period + 5)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: N = 8, 20 events, one kill")
    args = parser.parse_args(argv)
    if args.quick:
        args.nodes, args.events, args.kills, args.idle_seconds, args.settle = 8, 20, 1, 3.0, 1.0
        args.serf_wait = 5.0
    if not 4 <= args.nodes <= 64 or args.kills < 1 or args.events < 1:
        parser.error("--nodes 4..64, --kills ≥ 1, --events ≥ 1")
    args.kills = min(args.kills, args.nodes - 4)
    console = make_console()
    try:
        results = asyncio.run(run(args, console))
    except BenchFailure as e:
        console.print(f"[red]FAILED[/red]: {e}")
        return 1
    traffic_info = results.pop("_traffic")
    s, v = results["serf"], results["verdigris"]

    def ratio(a: float | None, b: float | None) -> str:
        return "n/a" if not a or b is None else f"{b / a:.2f}×"

    def lost(r: dict[str, Any]) -> str:
        return f"{r['lost_deliveries']} ({r['events'] - r['events_everywhere']} events)"

    table = Table(
        title=f"Verdigris vs Serf, N = {args.nodes} each, same run (127.0.0.1, LAN timing, AES-GCM)"
    )
    for col, j in (("", "left"), ("Serf", "right"), ("Verdigris", "right"), ("Verdigris / Serf", "right")):
        table.add_column(col, justify=j)  # type: ignore[arg-type]
    rows: list[tuple[str, str, str, str]] = [
        ("start → all see all", f"{s['start']['joined_s']:.1f} s", f"{v['start']['joined_s']:.1f} s",
         ratio(s["start"]["joined_s"], v["start"]["joined_s"])),
        (f"propagation p50 ({args.events} events, {args.event_rate:g}/s)", _ms(s["p50_s"]), _ms(v["p50_s"]),
         ratio(s["p50_s"], v["p50_s"])),
        ("propagation p99", _ms(s["p99_s"]), _ms(v["p99_s"]), ratio(s["p99_s"], v["p99_s"])),
        ("propagation max", _ms(s["max_s"]), _ms(v["max_s"]), ratio(s["max_s"], v["max_s"])),
        ("deliveries missing at the end (events)", lost(s), lost(v), ""),
        (f"kill -9 seen by first survivor (median of {len(s['kills'])})", f"{s['detect_first_s_median']:.1f} s",
         f"{v['detect_first_s_median']:.1f} s", ratio(s["detect_first_s_median"], v["detect_first_s_median"])),
        ("kill -9 seen by every survivor (median)", f"{s['detect_all_s_median']:.1f} s",
         f"{v['detect_all_s_median']:.1f} s", ratio(s["detect_all_s_median"], v["detect_all_s_median"])),
        ("false failures (logged / polled)", f"{s['false_failures_logged']} / {s['false_failures_polled']}",
         f"{v['false_failures_logged']} / {v['false_failures_polled']}", ""),
        ("bytes/s per node, idle", _bytes(s["idle_traffic"]), _bytes(v["idle_traffic"]),
         ratio((s["idle_traffic"] or {}).get("bytes_per_s_per_node"), (v["idle_traffic"] or {}).get("bytes_per_s_per_node"))),
        (f"bytes/s per node, {args.event_rate:g} events/s", _bytes(s["load_traffic"]), _bytes(v["load_traffic"]),
         ratio((s["load_traffic"] or {}).get("bytes_per_s_per_node"), (v["load_traffic"] or {}).get("bytes_per_s_per_node"))),
        ("agent CPU per node, idle", f"{s['idle_cpu']['agent_cpu_pct_mean']:.2f} %",
         f"{v['idle_cpu']['agent_cpu_pct_mean']:.2f} %", ""),
        (f"agent CPU per node, {args.event_rate:g} events/s", f"{s['load_cpu']['agent_cpu_pct_mean']:.2f} %",
         f"{v['load_cpu']['agent_cpu_pct_mean']:.2f} %", ""),
        ("machine busy under load (2 cores = 100 %)", f"{s['load_cpu']['machine_busy_pct']:.0f} %",
         f"{v['load_cpu']['machine_busy_pct']:.0f} %", ""),
        ("  of which not these agents nor the bench", f"{s['load_cpu']['other_cpu_cores']:.2f} cores",
         f"{v['load_cpu']['other_cpu_cores']:.2f} cores", ""),
    ]  # fmt: skip
    for row in rows:
        table.add_row(*row)
    console.print(table)
    targets = {
        "propagation_p50": _le(v["p50_s"], s["p50_s"]),
        "propagation_p99": _le(v["p99_s"], s["p99_s"]),
        "detection_all": v["detect_all_s_median"] <= s["detect_all_s_median"],
        "false_failures": v["false_failures_logged"] <= s["false_failures_logged"],
    }
    for name, ok in targets.items():
        console.print(f"target {name}: {'met' if ok else '[red]MISSED[/red]'}")
    emit_json(
        {
            "bench": "cluster_vs_serf",
            **environment(),
            "quick": args.quick,
            "nodes": args.nodes,
            "event_rate": args.event_rate,
            "traffic_method": traffic_info["method"],
            "traffic_unavailable_reason": traffic_info["reason"] or None,
            "serf": s,
            "verdigris": v,
            "targets": targets,
            "targets_met": all(targets.values()),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
