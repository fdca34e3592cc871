"""Catch-up of a restarted agent: how fast a node that was down gets everything it missed.

``--nodes`` real ``verdigris agent`` processes (3 by default) form one encrypted cluster on 127.0.0.1 (LAN
profile). Per repetition, the last agent is ``kill -9``ed; while it is down the others take ``--changes``
changes (100,000) in big transactions (``--rows-per-tx`` new rows each, written to the live agents in turn;
a new row of the ``machines`` table is 5 changes: 4 columns and the row's sentinel), and settle until they
agree (same heads, no gaps, no partial versions). Then the agent is restarted, and its admin ``status``
is polled every 100 ms until it has **no needs**: the same heads as the others, no gaps, no partial
versions.

Reported (median of ``--repeats``): seconds from the restart to the API answering, from the API answering
to caught up, and changes merged per second during that time (the restarted node's own ``merged`` counters
over the catch-up time from its API answering), with how many changes came by sync and by broadcast.
Checks: the restarted node merged exactly the changes it missed, and holds the same rows as the others;
otherwise ``FAILED`` and exit 1. Anchor: cr-sqlite applies 11–20 k changes/s on a laptop.

    .venv/bin/python bench/cluster_catchup.py             # 3 agents, 3 × 100,000 changes
    .venv/bin/python bench/cluster_catchup.py --quick     # 3 agents, 1 × 10,000 changes

The last line of stdout is one line of JSON with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from rich.table import Table

from _cluster import (
    POLL,
    CpuMeter,
    Procs,
    VerdigrisCluster,
    VerdigrisNode,
    machine_load,
    run_guarded,
    until,
    workdir,
)
from _util import INSERT_SQL, SCHEMA_SQL, BenchFailure, emit_json, environment, make_console, make_row, median

CHANGES_PER_ROW = 5
CATCHUP_TIMEOUT_S = 120.0
DIGEST_SQL = (
    "SELECT count(*), sum(id), sum(length(app) + length(region) + length(state)), sum(cast(cpu * 4 AS INTEGER)) "
    "FROM machines"
)


async def no_needs(nodes: list[VerdigrisNode]) -> tuple[bool, list[dict[str, Any]]]:
    """Whether ``nodes`` agree: same heads, no gaps, no partial versions anywhere."""
    statuses = await asyncio.gather(*(n.admin.call({"cmd": "status"}) for n in nodes))
    heads = [s["heads"] for s in statuses]
    ok = all(h == heads[0] for h in heads) and all(s["gaps"] == 0 and s["partials"] == 0 for s in statuses)
    return ok, list(statuses)


async def one_round(
    cluster: VerdigrisCluster, victim: VerdigrisNode, first_row: int, rows: int, rows_per_tx: int
) -> dict[str, Any]:
    live = [n for n in cluster.nodes if n is not victim]
    victim.kill9()
    t0 = time.monotonic()
    for k, start in enumerate(range(first_row, first_row + rows, rows_per_tx)):
        stop = min(first_row + rows, start + rows_per_tx)
        statements = [[INSERT_SQL, list(make_row(i))] for i in range(start, stop)]
        await cluster.write(live[k % len(live)], statements, timeout=60)
    wrote = time.monotonic() - t0

    async def live_agree() -> bool:
        return (await no_needs(live))[0]

    settle = await until("the live agents to agree", 120, live_agree)
    _, statuses = await no_needs(live)
    target_heads = statuses[0]["heads"]

    t_start = time.monotonic()
    victim.start(cluster.procs)
    await cluster.ready([victim], timeout=60)
    t_ready = time.monotonic()
    meter = CpuMeter([victim.proc.pid] if victim.proc else []).start()
    samples: list[tuple[float, int]] = []
    while True:
        status = await victim.admin.call({"cmd": "status"})
        now = time.monotonic()
        merged = status["merged"]["changes"]
        samples.append((now - t_ready, merged["sync"] + merged["broadcast"]))
        if status["heads"] == target_heads and status["gaps"] == 0 and status["partials"] == 0:
            break
        if now - t_ready > CATCHUP_TIMEOUT_S:
            raise BenchFailure(
                f"{victim.name} not caught up {CATCHUP_TIMEOUT_S:.0f} s after its restart: "
                f"gaps {status['gaps']}, partials {status['partials']}, merged {merged}"
            )
        await asyncio.sleep(POLL)
    caught = time.monotonic() - t_ready
    cpu = meter.stop()
    merged = status["merged"]["changes"]
    total = merged["sync"] + merged["broadcast"]
    expected = rows * CHANGES_PER_ROW
    if total != expected:
        raise BenchFailure(
            f"{victim.name} merged {total} changes ({merged}) after its restart; it missed {expected}"
        )
    (want,) = await cluster.query(live[0], DIGEST_SQL)
    (got,) = await cluster.query(victim, DIGEST_SQL)
    if got != want:
        raise BenchFailure(f"{victim.name} holds {got} (count, sums) after catching up; the others {want}")
    if want[0] != first_row + rows:
        raise BenchFailure(f"the cluster holds {want[0]} rows, {first_row + rows} were written")
    # The merge itself: from the last poll that saw nothing merged yet to the end.
    began = max((t for t, n in samples if n == 0), default=0.0)
    return {
        "changes": expected,
        "write_s": round(wrote, 2),
        "live_settle_s": round(settle, 2),
        "ready_s": round(t_ready - t_start, 2),
        "catchup_s": round(caught, 2),
        "catchup_from_start_s": round(time.monotonic() - t_start, 2),
        "changes_per_s": round(expected / max(caught, 1e-9), 0),
        "first_merge_after_s": round(began, 2),
        "merging_changes_per_s": round(expected / max(caught - began, 1e-9), 0),
        "by_sync": merged["sync"],
        "by_broadcast": merged["broadcast"],
        "versions_by_sync": status["merged"]["versions"]["sync"],
        "victim_cpu_pct": round(100 * cpu["agents_cpu_cores"], 1),
        "progress": [(round(t, 2), n) for t, n in samples[:: max(1, len(samples) // 20)]],
    }


async def run(args: argparse.Namespace, console: Any) -> tuple[dict[str, float], list[dict[str, Any]]]:
    procs = Procs()
    rows = args.changes // CHANGES_PER_ROW
    try:
        with workdir("vd-catchup-") as root:
            async with VerdigrisCluster(
                procs, root, args.nodes, schema=SCHEMA_SQL, seeds=min(3, args.nodes - 1)
            ) as cluster:
                started = await cluster.start()
                victim = cluster.nodes[-1]
                rounds = []
                for r in range(args.repeats):
                    console.print(
                        f"round {r + 1}/{args.repeats}: {victim.name} down while {args.changes:,} changes happen"
                    )
                    rounds.append(await one_round(cluster, victim, r * rows, rows, args.rows_per_tx))
                    console.print(
                        f"  caught up {rounds[-1]['catchup_s']:.2f} s after its API answered "
                        f"({rounds[-1]['changes_per_s']:,.0f} changes/s)"
                    )
                return started, rounds
    finally:
        procs.kill_all()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nodes", type=int, default=3, help="agents (default 3; the last one goes down)")
    parser.add_argument(
        "--changes", type=int, default=100_000, help="changes missed per round (default 100,000)"
    )
    parser.add_argument(
        "--rows-per-tx", type=int, default=1000, help="new rows per transaction (default 1000)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round of 10,000 changes")
    args = parser.parse_args(argv)
    if args.quick:
        args.changes, args.repeats = 10_000, 1
    if (
        not 2 <= args.nodes <= 16
        or args.changes < CHANGES_PER_ROW
        or args.repeats < 1
        or args.rows_per_tx < 1
    ):
        parser.error("--nodes 2..16, --changes ≥ 5, --repeats ≥ 1, --rows-per-tx ≥ 1")
    console = make_console()
    try:
        started, rounds = asyncio.run(run(args, console))
    except BenchFailure as e:
        console.print(f"[red]FAILED[/red]: {e}")
        return 1
    keys = [
        "ready_s",
        "catchup_s",
        "catchup_from_start_s",
        "changes_per_s",
        "first_merge_after_s",
        "merging_changes_per_s",
        "write_s",
        "live_settle_s",
    ]
    summary = {k: median([r[k] for r in rounds]) for k in keys}
    table = Table(
        title=f"Catch-up after a restart: {args.nodes} agents, {args.changes:,} changes missed per round"
    )
    for col in ["round", "written in", "live agree after", "restart → API", "API → caught up", "changes/s",
                "1st merge after", "changes/s merging", "by sync", "by broadcast", "its CPU"]:  # fmt: skip
        table.add_column(col, justify="right")
    for i, r in enumerate(rounds):
        table.add_row(
            str(i + 1),
            f"{r['write_s']:.1f} s",
            f"{r['live_settle_s']:.1f} s",
            f"{r['ready_s']:.2f} s",
            f"{r['catchup_s']:.2f} s",
            f"{r['changes_per_s']:,.0f}",
            f"{r['first_merge_after_s']:.2f} s",
            f"{r['merging_changes_per_s']:,.0f}",
            f"{r['by_sync']:,}",
            f"{r['by_broadcast']:,}",
            f"{r['victim_cpu_pct']:.0f} %",
        )
    table.add_row(
        "median", f"{summary['write_s']:.1f} s", f"{summary['live_settle_s']:.1f} s", f"{summary['ready_s']:.2f} s",
        f"{summary['catchup_s']:.2f} s", f"{summary['changes_per_s']:,.0f}",
        f"{summary['first_merge_after_s']:.2f} s", f"{summary['merging_changes_per_s']:,.0f}", "", "", "",
    )  # fmt: skip
    console.print(table)
    emit_json(
        {
            "bench": "cluster_catchup",
            **environment(),
            "quick": args.quick,
            "nodes": args.nodes,
            "changes": args.changes,
            "rows_per_tx": args.rows_per_tx,
            "repeats": len(rounds),
            "start": started,
            **{f"{k}_median": v for k, v in summary.items()},
            **machine_load(),
            "rounds": rounds,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
