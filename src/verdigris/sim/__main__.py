"""Run one simulation and print what it cost: ``python -m verdigris.sim --nodes 1000``.

Membership only by default. ``--changes`` adds broadcast and sync on every node and ``--writes`` local
writes a second at random nodes (until ``--writes-until``); ``--static`` replaces the per-node SWIM
membership by one shared static view (implies ``--changes``; reaches 10,000 nodes).

``--cold`` joins every node through three seeds (a join storm, ``--join-rate`` nodes a second);
the default starts them as a formed cluster (:meth:`Simulator.bootstrap`). ``--crash`` kills one node
after ``--crash-at`` seconds and reports when the others declared it dead.
"""

from __future__ import annotations

import argparse
import functools
import random
import resource
import time

from verdigris.gossip import MemberDown, MemberEvent, Timing
from verdigris.sim.simulator import Changes, Network, Simulator, StaticMembership


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m verdigris.sim", description=__doc__)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=60.0, help="simulated time")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--wan", action="store_true", help="Timing.wan() instead of Timing.lan()")
    parser.add_argument("--cold", action="store_true", help="join through seeds instead of bootstrap()")
    parser.add_argument("--join-rate", type=float, default=100.0, help="joins per second with --cold")
    parser.add_argument("--crash", action="store_true")
    parser.add_argument("--crash-at", type=float, default=10.0)
    parser.add_argument("--changes", action="store_true", help="broadcast and sync on every node")
    parser.add_argument("--static", action="store_true", help="static membership (implies --changes)")
    parser.add_argument("--writes", type=float, default=1.0, help="local writes a second, with --changes")
    parser.add_argument("--writes-until", type=float, default=None, help="default: half of --seconds")
    args = parser.parse_args(argv)
    if args.static and args.cold:
        parser.error("--cold needs SWIM membership")

    downs: list[tuple[float, str]] = []

    def on_event(t: float, node: str, event: MemberEvent) -> None:
        if isinstance(event, MemberDown):
            downs.append((t, event.member.id))

    timing = Timing.wan() if args.wan else Timing.lan()
    changes = Changes() if args.changes or args.static else None
    sim = Simulator(
        args.seed,
        network=Network(loss=args.loss),
        timing=timing,
        on_event=on_event,
        membership=StaticMembership() if args.static else None,
        changes=changes,
    )
    ids = sim.add_nodes(args.nodes)
    started = time.perf_counter()
    if args.cold:
        seeds = ids[:3]
        sim.join(ids[0])
        for i, nid in enumerate(ids[1:], start=1):
            sim.join(nid, [s for s in seeds if s != nid], at=i / args.join_rate)
    else:
        sim.bootstrap()
        print(f"bootstrap: {time.perf_counter() - started:.1f} s wall")
    victim = ids[len(ids) // 2]
    if args.crash:
        sim.at(args.crash_at, lambda: sim.crash(victim))
    if changes is not None and args.writes > 0:
        rng = random.Random(f"{args.seed}/writes")
        until = args.writes_until if args.writes_until is not None else args.seconds / 2

        def write(nid: str) -> None:
            if sim.is_running(nid):
                sim.write(nid)

        t = rng.expovariate(args.writes)
        while t < until:
            sim.at(t, functools.partial(write, rng.choice(ids)))
            t += rng.expovariate(args.writes)
    step = max(1.0, args.seconds / 10)
    while sim.now < args.seconds:
        sim.run_until(min(args.seconds, sim.now + step))
        line = f"t={sim.now:7.1f}s  wall={time.perf_counter() - started:6.1f}s  datagrams={sim.stats.sent:>9}"
        if not args.static:
            views = [sim.node(x).num_alive() for x in ids if sim.is_up(x)]
            line += f"  view min/max={min(views)}/{max(views)}"
        if changes is not None:
            s = sim.stats
            line += (
                f"  versions={s.local_versions} via broadcast/sync={s.broadcast_versions}/{s.sync_versions}"
                f"  syncs={s.sync_sessions}  converged={sim.converged()}"
            )
        print(line)
    wall = time.perf_counter() - started
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.nodes} nodes, {args.seconds:.0f} s simulated in {wall:.1f} s wall, peak RSS {rss:,.0f} MiB")
    print(sim.stats)
    if args.crash:
        times = sorted(t - args.crash_at for t, member in downs if member == victim)
        if times:
            print(
                f"crash of {victim}: {len(times)} MemberDown, first +{times[0]:.1f} s, last +{times[-1]:.1f} s"
            )
        others = [m for _, m in downs if m != victim]
        print(f"false MemberDown: {len(others)}")
    print(f"trace digest: {sim.trace_digest()}")


if __name__ == "__main__":
    main()
