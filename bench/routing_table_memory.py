"""Memory of the proxy's routing table (``verdigris.proxy.table.RoutingTable``) per 100,000 instances.

The table is fed exactly as a proxy worker feeds it: every event is an NDJSON line as the agent sends it
(``verdigris.api.wire.encode_row`` / ``encode_change``), decoded with ``decode_event`` and handed to
``RoutingTable.feed``; lines are produced one at a time, so only the table's own memory remains.

Phases, each measured after ``gc.collect()``:

1. **apps**: N/10 apps, one host name, one ``app_regions`` row and one service each (snapshots);
2. **instances**: N machines (10 per app, Fly-like 14-hex ids, IPv6 ``[fdaa:…]:8080`` addresses, state
   ``started``) as one snapshot — the figure the issue asks for, reported per 100,000 instances;
3. **checks**: one passing check per instance (snapshot);
4. **churn**, twice: N/10 change events each (machine state ``started`` → ``stopping`` → ``started``
   updates). The first round may grow the dicts once (a row updated is re-inserted at the end); the second
   must leave the memory where it was (no growth per change: more than 5 % of the instances' memory fails).

Memory is measured twice: the growth of the process's resident set (``/proc/self/statm``) in a first pass,
and the bytes ``tracemalloc`` attributes to live objects in a second pass (tracemalloc's own bookkeeping
would inflate the RSS, hence two passes). Also reported: snapshot and change feed rates (first pass).
Checks (else ``FAILED``, exit 1): no growth in the second churn round; the table holds every app, host name, instance and check, every instance is
healthy after the churn, and host lookups route.

    .venv/bin/python bench/routing_table_memory.py            # N = 100,000
    .venv/bin/python bench/routing_table_memory.py --quick    # N = 10,000

The last line of stdout is one line of JSON with the figures.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

from rich.table import Table

from _util import REGIONS, BenchFailure, emit_json, environment, make_console
from verdigris.api.wire import Columns, EndOfQuery, decode_event, encode_change, encode_event, encode_row
from verdigris.proxy.table import QUERIES, RoutingTable, _columns_of

PER_APP = 10
MIB = 1024 * 1024
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


def machine_id(i: int) -> str:
    return f"{(i * 2654435761) & 0xFFFFFFFFFFFFFF:014x}"


def app_name(a: int) -> str:
    return f"app-{a:06d}"


def machine_row(i: int, state: str = "started") -> list[Any]:
    a = i // PER_APP
    return [
        machine_id(i),
        app_name(a),
        REGIONS[a % len(REGIONS)],
        state,
        f"[fdaa:0:{a & 0xFFFF:x}:a7b:{i & 0xFFFF:x}:{(i >> 16) & 0xFFFF:x}::2]:8080",
    ]


def snapshot_lines(name: str, rows: Iterator[list[Any]]) -> Iterator[bytes]:
    yield encode_event(Columns(_columns_of(QUERIES[name])))
    for rowid, values in enumerate(rows, 1):
        yield encode_row(rowid, values)
    yield encode_event(EndOfQuery(0.001, 0))


def feed(table: RoutingTable, name: str, lines: Iterator[bytes]) -> int:
    n = 0
    for line in lines:
        problem = table.feed(name, decode_event(line))
        if problem is not None:
            raise BenchFailure(f"{name}: {problem.kind}: {problem.message}")
        n += 1
    return n


def phases(n: int) -> list[tuple[str, Callable[[RoutingTable], int]]]:
    apps = n // PER_APP

    def load_apps(t: RoutingTable) -> int:
        events = feed(
            t, "apps", snapshot_lines("apps", ([app_name(a), "org", "requests", 20, 25] for a in range(apps)))
        )
        events += feed(
            t,
            "hostnames",
            snapshot_lines("hostnames", ([f"{app_name(a)}.example.dev", app_name(a)] for a in range(apps))),
        )
        events += feed(
            t,
            "app_regions",
            snapshot_lines("app_regions", ([app_name(a), REGIONS[a % len(REGIONS)]] for a in range(apps))),
        )
        events += feed(
            t,
            "services",
            snapshot_lines("services", ([app_name(a), 443, "tcp", "tls,http", 8080, 1] for a in range(apps))),
        )
        return events

    def load_machines(t: RoutingTable) -> int:
        return feed(t, "machines", snapshot_lines("machines", (machine_row(i) for i in range(n))))

    def load_checks(t: RoutingTable) -> int:
        return feed(
            t, "checks", snapshot_lines("checks", ([machine_id(i), "http", "passing"] for i in range(n)))
        )

    change_id = [0]  # the machines subscription's last change id, across both churn rounds

    def churn(t: RoutingTable) -> int:
        def lines() -> Iterator[bytes]:
            for k in range(n // 10):
                i = (k * 7919) % n
                for state in ("stopping", "started"):
                    change_id[0] += 1
                    yield encode_change("update", i + 1, machine_row(i, state), change_id[0])

        return feed(t, "machines", lines())

    return [
        ("apps", load_apps),
        ("instances", load_machines),
        ("checks", load_checks),
        ("churn", churn),
        ("churn again", churn),
    ]


def verify(t: RoutingTable, n: int) -> None:
    apps = n // PER_APP
    counts = t.counts()
    want = {"apps": apps, "hostnames": apps, "machines": n, "checks": n, "healthy_instances": n}
    wrong = {k: (counts[k], v) for k, v in want.items() if counts[k] != v}
    if wrong or not t.ready:
        raise BenchFailure(f"table incomplete (got, want): {wrong}; ready={t.ready}")
    for a in (0, apps // 2, apps - 1):
        if t.app_for_host(f"{app_name(a)}.example.dev") != app_name(a):
            raise BenchFailure(f"host of {app_name(a)} does not route")
        if len(t.healthy_instances(app_name(a), REGIONS[a % len(REGIONS)])) != PER_APP:
            raise BenchFailure(f"{app_name(a)} does not have {PER_APP} healthy instances")


def run_pass(n: int, traced: bool) -> dict[str, dict[str, float]]:
    gc.collect()
    if traced:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0] if traced else rss()
    table = RoutingTable()
    out: dict[str, dict[str, float]] = {}
    prev = base
    for name, step in phases(n):
        t0 = time.perf_counter()
        events = step(table)
        dt = time.perf_counter() - t0
        gc.collect()
        now = tracemalloc.get_traced_memory()[0] if traced else rss()
        out[name] = {"bytes": now - prev, "events": events, "events_per_s": events / dt, "seconds": dt}
        prev = now
    verify(table, n)
    again, inst = out["churn again"]["bytes"], out["instances"]["bytes"]
    if again > 0.05 * inst:
        raise BenchFailure(f"the second churn round grew the table by {again:,} bytes (instances: {inst:,})")
    if traced:
        tracemalloc.stop()
    out["total"] = {"bytes": prev - base}
    del table
    gc.collect()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=100_000, help="instances (default 100,000)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 10,000 instances")
    args = parser.parse_args(argv)
    n = 10_000 if args.quick else args.instances
    if n < PER_APP * 10:
        parser.error(f"--instances must be at least {PER_APP * 10}")
    console = make_console()
    try:
        plain = run_pass(n, traced=False)
        traced = run_pass(n, traced=True)
    except BenchFailure as e:
        console.print(f"[red]FAILED[/red]: {e}")
        return 1
    scale = 100_000 / n
    table = Table(title=f"RoutingTable memory, {n:,} instances ({n // PER_APP:,} apps), fed as NDJSON events")
    for c in ["phase", "events", "events/s", "RSS growth MiB", "traced MiB", "traced MiB per 100k inst."]:
        table.add_column(c, justify="left" if c == "phase" else "right")
    for phase in ("apps", "instances", "checks", "churn", "churn again", "total"):
        p, tr = plain[phase], traced[phase]
        table.add_row(
            phase,
            f"{p['events']:,.0f}" if "events" in p else "",
            f"{p['events_per_s']:,.0f}" if "events_per_s" in p else "",
            f"{p['bytes'] / MIB:.1f}",
            f"{tr['bytes'] / MIB:.1f}",
            f"{tr['bytes'] / MIB * scale:.1f}",
        )
    console.print(table)
    per100k = traced["instances"]["bytes"] * scale / MIB
    console.print(
        f"instances: {per100k:.1f} MiB per 100,000 (tracemalloc), "
        f"{plain['instances']['bytes'] * scale / MIB:.1f} MiB (RSS); "
        f"{traced['instances']['bytes'] / n:.0f} bytes per instance"
    )

    def rounded(d: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        return {k: {f: round(v, 3) for f, v in x.items()} for k, x in d.items()}

    emit_json(
        {
            "bench": "routing_table_memory",
            **environment(),
            "quick": args.quick,
            "instances": n,
            "apps": n // PER_APP,
            "instances_mib_per_100k_traced": round(per100k, 2),
            "instances_mib_per_100k_rss": round(plain["instances"]["bytes"] * scale / MIB, 2),
            "checks_mib_per_100k_traced": round(traced["checks"]["bytes"] * scale / MIB, 2),
            "total_mib_per_100k_traced": round(traced["total"]["bytes"] * scale / MIB, 2),
            "bytes_per_instance_traced": round(traced["instances"]["bytes"] / n, 1),
            "churn_bytes_traced": traced["churn"]["bytes"],
            "churn_again_bytes_traced": traced["churn again"]["bytes"],
            "machine_snapshot_events_per_s": round(plain["instances"]["events_per_s"]),
            "change_events_per_s": round(plain["churn"]["events_per_s"]),
            "rss": rounded(plain),
            "traced": rounded(traced),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
