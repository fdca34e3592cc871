"""Propagation of one update through N simulated nodes, beside Serf's convergence model.

Each run builds a cluster of N nodes in the deterministic simulator (:mod:`verdigris.sim`), every node
running the real :class:`~verdigris.gossip.broadcast.Broadcaster` (fanout 3, 200 ms gossip interval,
retransmit limit ``4 · ceil(log10(N + 1))``) over a version-only source, with **static membership** (every
node sees every other, as SWIM converges to in a stable cluster: one shared compact view, which is what
makes 10,000 nodes fit) and seeded datagram loss and latency (0.5 ms + an exponential tail of mean 1 ms).
One node writes one version; the figures are the virtual times until 99 %, 99.9 % and 100 % of the N
nodes hold it (counted in nodes, the writer included: 99 % of 100 is 99 nodes), median over seeds.

Two ways to drive the broadcaster are measured:

* ``timer``: as the agent's runtime drives it, when ``Broadcaster.get_timer()`` says, so a node relays a
  new piece at once and then every gossip interval;
* ``ticker``: on a fixed 200 ms ticker of random phase per node, as memberlist's gossip loop and Serf's
  model assume (a new piece waits for the next tick).

Beside them, two models for the same N, fanout, interval and loss: **Serf's** (the logistic curve of its
convergence simulator; no retransmit limit; it gives the published anchors: N = 1,000 → 99 % in 1.53 s,
99.9 % in 1.84 s, 1.70 / 2.05 s at 10 % loss) and a **round model** (mean-field synchronous rounds with
the same retransmit limit). "100 %" in the models is fewer than half a node expected uninformed.

By default sync is off, so the figures are the broadcast's own (what the models describe); ``--sync``
runs anti-entropy rounds too (they can only bring the version sooner). Checks: every run must reach at
least 99.9 % of the nodes, and a repeated run must give the same trace digest; otherwise the benchmark
prints ``FAILED`` and exits 1 without figures.

    .venv/bin/python bench/sim_propagation.py            # N = 100, 1,000, 10,000; about 2 minutes
    .venv/bin/python bench/sim_propagation.py --quick    # N = 100, 1,000, 3 seeds; a few seconds

The last line of stdout is one line of JSON with the figures.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.table import Table

from _util import BenchFailure, emit_json, environment, make_console, median, settle
from verdigris.gossip.broadcast import BroadcastConfig, retransmit_limit
from verdigris.sim import Changes, Network, Simulator, StaticMembership
from verdigris.sim.models import full_fraction, round_model_time_to, serf_time_to

PERCENTS: tuple[float, ...] = (0.99, 0.999, 1.0)
LABELS: tuple[str, ...] = ("99", "99.9", "100")
# Serf's convergence model, N = 1,000, fanout 3, 200 ms (ARCHITECTURE.md reference figures).
ANCHORS: dict[float, dict[float, float]] = {0.0: {0.99: 1.53, 0.999: 1.84}, 0.1: {0.99: 1.70, 0.999: 2.05}}
ANCHOR_N = 1000
DEFAULT_SEEDS = {100: 9, 1000: 9, 10_000: 5}
WINDOW_S = 5.0  # simulated seconds after the write: every retransmission is over by then


def needed(n: int, p: float) -> int:
    """Nodes that make ``p`` of ``n`` (the writer included)."""
    return min(n, math.ceil(p * n - 1e-9))


def model_fraction(n: int, p: float) -> float:
    """The models' fraction for ``p`` of ``n`` nodes: ``p``, or their "100 %" where that is lower."""
    return min(p, full_fraction(n))


def one_run(n: int, seed: int, loss: float, driver: str, sync: bool) -> dict[str, Any]:
    times: list[float] = []
    changes = Changes(
        broadcast=BroadcastConfig(interval=0.2, fanout=3),
        sync_rounds=sync,
        urgent_sync=False,
        ticker=driver == "ticker",
    )
    sim = Simulator(
        seed,
        network=Network(loss=loss),
        membership=StaticMembership(),
        changes=changes,
        on_version=lambda t, _node, _actor, _v, _via: times.append(t),
    )
    ids = sim.add_nodes(n)
    sim.bootstrap()
    sim.run_until(2.0 if sync else 0.5)
    times.clear()
    started = time.perf_counter()
    sent_before = sim.stats.broadcast_datagrams
    t0 = sim.now
    sim.write(ids[0])
    sim.run_until(t0 + WINDOW_S)
    wall = time.perf_counter() - started
    arrivals = sorted(t - t0 for t in times)
    out: dict[str, Any] = {
        "reached": len(arrivals),
        "wall_s": wall,
        "datagrams_per_node": (sim.stats.broadcast_datagrams - sent_before) / n,
        "digest": sim.trace_digest(),
    }
    for p, label in zip(PERCENTS, LABELS, strict=True):
        k = needed(n, p)
        out[label] = arrivals[k - 1] if len(arrivals) >= k else math.inf
    return out


def fmt_s(x: float) -> str:
    return "—" if math.isinf(x) else f"{x:.2f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="N = 100 and 1,000, 3 seeds: a smoke run")
    parser.add_argument("--nodes", default=None, help="comma-separated N (default 100,1000,10000)")
    parser.add_argument("--losses", default="0,0.1", help="comma-separated datagram loss rates")
    parser.add_argument("--drivers", default="timer,ticker", help="timer (the runtime's) and/or ticker")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per configuration (default by N)")
    parser.add_argument("--sync", action="store_true", help="run anti-entropy sync rounds too")
    args = parser.parse_args(argv)
    console = make_console()

    nodes = [int(x) for x in (args.nodes or ("100,1000" if args.quick else "100,1000,10000")).split(",")]
    losses = [float(x) for x in args.losses.split(",")]
    drivers = [d.strip() for d in args.drivers.split(",")]
    if not set(drivers) <= {"timer", "ticker"}:
        parser.error("--drivers: timer and/or ticker")

    fixed_seeds: int | None = args.seeds

    def seeds_for(n: int) -> int:
        if fixed_seeds is not None:
            return fixed_seeds
        return 3 if args.quick else DEFAULT_SEEDS.get(n, 3)

    results: list[dict[str, Any]] = []
    try:
        first: tuple[int, int, float, str] | None = None
        first_digest = ""
        for n in nodes:
            limit = retransmit_limit(4, n)
            for loss in losses:
                for driver in drivers:
                    runs = []
                    for seed in range(1, seeds_for(n) + 1):
                        settle()
                        r = one_run(n, seed, loss, driver, args.sync)
                        if r["reached"] < needed(n, 0.999):
                            raise BenchFailure(
                                f"N={n} loss={loss} {driver} seed {seed}: only {r['reached']} nodes reached"
                            )
                        if first is None:
                            first, first_digest = (n, seed, loss, driver), r["digest"]
                        runs.append(r)
                    row: dict[str, Any] = {
                        "nodes": n,
                        "loss": loss,
                        "driver": driver,
                        "seeds": len(runs),
                        "retransmit_limit": limit,
                        "reached_all_runs": sum(r["reached"] == n for r in runs),
                        "datagrams_per_node": round(median([r["datagrams_per_node"] for r in runs]), 2),
                        "wall_s_per_run": round(median([r["wall_s"] for r in runs]), 3),
                    }
                    for p, label in zip(PERCENTS, LABELS, strict=True):
                        key = f"t{label.replace('.', '')}_s"
                        values = [r[label] for r in runs]
                        med = median(values)
                        row[key] = None if math.isinf(med) else round(med, 4)
                        row[f"{key[:-2]}_runs"] = [None if math.isinf(v) else round(v, 4) for v in values]
                        frac = model_fraction(n, p)
                        row[f"serf_model_{key}"] = round(serf_time_to(frac, n, 3, 0.2, loss), 4)
                        rm = round_model_time_to(frac, n, 3, 0.2, loss, limit)
                        row[f"round_model_{key}"] = None if math.isinf(rm) else round(rm, 4)
                    results.append(row)
        if first is not None:
            n, seed, loss, driver = first
            if one_run(n, seed, loss, driver, args.sync)["digest"] != first_digest:
                raise BenchFailure("the same seed gave a different trace digest")
    except BenchFailure as e:
        console.print(f"[bold red]FAILED[/]: {e}")
        return 1

    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    table = Table(
        title="One update through N nodes: seconds to 99 % / 99.9 % / 100 % (median over seeds)"
        + (" — broadcast and sync" if args.sync else " — broadcast only")
    )
    for col in ("N", "loss", "driver", "seeds", "99 %", "99.9 %", "100 %"):
        table.add_column(col, justify="right")
    table.add_column("Serf model", justify="right")
    table.add_column("round model", justify="right")
    table.add_column("dgrams/node", justify="right")
    table.add_column("wall/run", justify="right")

    def triple(r: dict[str, Any], prefix: str) -> str:
        vals = [r[f"{prefix}t{lab}_s"] for lab in ("99", "999", "100")]
        return " / ".join("—" if v is None else f"{v:.2f}" for v in vals)

    for r in results:
        cells = [r[f"t{lab}_s"] for lab in ("99", "999", "100")]
        table.add_row(
            f"{r['nodes']:,}",
            f"{r['loss']:.0%}",
            r["driver"],
            str(r["seeds"]),
            *("—" if v is None else f"{v:.2f}" for v in cells),
            triple(r, "serf_model_"),
            triple(r, "round_model_"),
            f"{r['datagrams_per_node']:.1f}",
            f"{r['wall_s_per_run']:.1f} s",
        )
    console.print(table)

    anchors: list[dict[str, Any]] = []
    verdict_table = Table(title=f"Against Serf's model anchors (N = {ANCHOR_N:,}, fanout 3, 200 ms)")
    for col in ("loss", "reach", "anchor", *drivers):
        verdict_table.add_column(col, justify="right")
    for loss, marks in ANCHORS.items():
        rows = {r["driver"]: r for r in results if r["nodes"] == ANCHOR_N and r["loss"] == loss}
        if not rows:
            continue
        for p, anchor in marks.items():
            key = "t99_s" if p == 0.99 else "t999_s"
            entry: dict[str, Any] = {"loss": loss, "percent": p * 100, "anchor_s": anchor}
            cells = []
            for d in drivers:
                v = rows[d][key] if d in rows else None
                ok = v is not None and v <= anchor
                entry[f"{d}_s"] = v
                entry[f"{d}_at_or_below"] = ok
                cells.append("—" if v is None else f"{v:.2f} {'[green]≤[/]' if ok else '[red]>[/]'}")
            anchors.append(entry)
            verdict_table.add_row(f"{loss:.0%}", f"{p:.1%}", f"{anchor:.2f}", *cells)
    if anchors:
        console.print(verdict_table)
    met = bool(anchors) and all(a[f"{d}_at_or_below"] for a in anchors for d in drivers)
    console.print(
        f"at or below every anchor: {'[green]yes[/]' if met else '[red]no[/]'}; "
        f"peak RSS of this process {peak_rss_mib:,.0f} MiB"
    )
    emit_json(
        {
            "bench": "sim_propagation",
            "quick": args.quick,
            "sync": args.sync,
            "membership": "static",
            "fanout": 3,
            "interval_s": 0.2,
            "latency": {"min_s": Network().latency_min, "jitter_mean_s": Network().latency_jitter},
            "results": results,
            "anchors": anchors,
            "anchors_met": met,
            "peak_rss_mib": round(peak_rss_mib, 1),
            **environment(),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
