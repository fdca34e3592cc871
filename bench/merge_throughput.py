"""Remote merge throughput: changes/s through ``Store.merge`` beside a plain SQLite upsert, in the same run.

1. A source ``Store`` gets ``--rows`` rows (4 columns + the row's sentinel = 5 changes a row) through
   ``transact`` in transactions of ``--rows-per-tx`` rows, then two rounds of updates (every 5th row's
   ``state`` and ``cpu``, then every 20th row's ``state``) so that many versions have superseded seqs.
2. ``changesets_for(site_id, 1, db_version)`` extracts every version (timed: extraction changes/s).
3. For each batch size, whole changesets are grouped into batches by cumulative change count (a batch is
   closed as soon as it holds at least that many changes) and, per repetition, a fresh target ``Store``
   merges them batch by batch: the time of the ``merge()`` calls is measured. Afterwards the target must
   hold exactly the source's rows and clock rows, with every version booked and nothing buffered or
   rejected; otherwise the benchmark fails loudly (exit status 1) and reports no figures.
4. Beside it, a plain SQLite database (same table, WAL, ``synchronous = NORMAL``) receives the same
   rows: for each batch, every row the batch touches, with its final values, through
   ``INSERT ... ON CONFLICT DO UPDATE`` with ``executemany``, one transaction per batch. Its rate is given
   in the same changes of the same batch per second, so ``verdigris/plain`` compares like with like.
   Rows are built before the clock starts; the plain result is checked against the source too.

Verdigris and plain runs alternate in order per repetition; figures are medians. The target is
50,000 changes/s on one core (the merge runs on one thread; native cr-sqlite does 11–20 k/s on a laptop).

    .venv/bin/python bench/merge_throughput.py            # default run, well under 2 minutes
    .venv/bin/python bench/merge_throughput.py --quick    # smoke run, a few seconds

The last line of stdout is one line of JSON with the figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from _util import (
    INSERT_SQL,
    SCHEMA_SQL,
    UPSERT_SQL,
    BenchFailure,
    Row,
    emit_json,
    environment,
    fmt_rate,
    make_console,
    make_row,
    median,
    open_plain,
    settle,
)
from verdigris.store import Changeset, Statement, Store

TARGET_CHANGES_PER_S = 50_000.0
NON_PK_COLUMNS = 4


@dataclass
class Source:
    store: Store
    changesets: list[Changeset]
    rows: list[tuple[Any, ...]]
    clock_rows: list[tuple[Any, ...]]
    final_rows: dict[int, Row]
    changes: int
    """Current changes over all changesets."""
    written: int
    """Changes the workload wrote (current + superseded)."""
    extract_s: list[float]


@dataclass
class Run:
    elapsed: float
    cpu: float


def build_source(path: Path, nrows: int, rows_per_tx: int, extract_repeats: int) -> Source:
    store = Store(path, schema_sql=SCHEMA_SQL)
    final: dict[int, Row] = {}
    written = 0

    def write(stmts: list[Statement]) -> None:
        for i in range(0, len(stmts), rows_per_tx):
            store.transact(stmts[i : i + rows_per_tx])

    rows = [make_row(i) for i in range(nrows)]
    write([Statement(INSERT_SQL, list(r)) for r in rows])
    final.update((r[0], r) for r in rows)
    written += nrows * (1 + NON_PK_COLUMNS)

    # Round 1: every 5th row gets a new state and cpu (2 changes each, superseding 2 seqs of its insert).
    upd1: list[Statement] = []
    for i in range(0, nrows, 5):
        r = final[i] = (*final[i][:3], "stopped", final[i][4] + 0.5)
        upd1.append(Statement("UPDATE machines SET state = ?, cpu = ? WHERE id = ?", [r[3], r[4], i]))
    write(upd1)
    written += 2 * len(upd1)
    # Round 2: every 20th row gets a new state again (superseding seqs of round 1's versions).
    upd2: list[Statement] = []
    for i in range(0, nrows, 20):
        r = final[i]
        final[i] = (r[0], r[1], r[2], "destroyed", r[4])
        upd2.append(Statement("UPDATE machines SET state = ? WHERE id = ?", ["destroyed", i]))
    write(upd2)
    written += len(upd2)

    extract_s: list[float] = []
    changesets: list[Changeset] = []
    for _ in range(extract_repeats):
        settle()
        t0 = time.perf_counter()
        changesets = store.changesets_for(store.site_id, 1, store.db_version)
        extract_s.append(time.perf_counter() - t0)
    if len(changesets) != store.db_version:
        raise BenchFailure(f"extracted {len(changesets)} changesets of {store.db_version} versions")
    changes = sum(len(cs.changes) for cs in changesets)
    src_rows = store.rows("machines")
    if sorted(map(tuple, src_rows)) != sorted(final.values()):
        raise BenchFailure("the source store does not hold the rows the workload wrote")
    return Source(
        store=store,
        changesets=changesets,
        rows=src_rows,
        clock_rows=store.clock_rows("machines"),
        final_rows=final,
        changes=changes,
        written=written,
        extract_s=extract_s,
    )


def make_batches(changesets: Sequence[Changeset], batch_size: int) -> list[list[Changeset]]:
    """Group whole changesets, in order, into batches of at least ``batch_size`` changes (the last may
    hold fewer)."""
    out: list[list[Changeset]] = []
    cur: list[Changeset] = []
    n = 0
    for cs in changesets:
        cur.append(cs)
        n += len(cs.changes)
        if n >= batch_size:
            out.append(cur)
            cur, n = [], 0
    if cur:
        out.append(cur)
    return out


def plain_batches(batches: list[list[Changeset]], final: dict[int, Row]) -> list[list[Row]]:
    """For each batch, every row its changes touch (once, in first-touch order) with its final values."""
    out: list[list[Row]] = []
    for batch in batches:
        pks: dict[int, None] = {}
        for cs in batch:
            for ch in cs.changes:
                pks[ch.pk[0]] = None
        out.append([final[pk] for pk in pks])
    return out


def run_verdigris(path: Path, src: Source, batches: list[list[Changeset]]) -> Run:
    with Store(path, schema_sql=SCHEMA_SQL) as target:
        settle()
        elapsed = 0.0
        cpu = 0.0
        applied = 0
        changes_applied = 0
        for batch in batches:
            c0 = time.process_time()
            t0 = time.perf_counter()
            res = target.merge(batch)
            elapsed += time.perf_counter() - t0
            cpu += time.process_time() - c0
            if res.rejected or res.buffered or res.duplicates:
                raise BenchFailure(
                    f"merge: {len(res.rejected)} rejected (first: {res.rejected[:1]}), "
                    f"{len(res.buffered)} buffered, {res.duplicates} duplicates"
                )
            applied += len(res.applied_versions)
            changes_applied += res.changes_applied
        verify_target(target, src, applied, changes_applied)
    return Run(elapsed=elapsed, cpu=cpu)


def verify_target(target: Store, src: Source, applied: int, changes_applied: int) -> None:
    actor = src.store.site_id
    if applied != len(src.changesets):
        raise BenchFailure(f"merge applied {applied} versions of {len(src.changesets)}")
    if changes_applied != src.changes:
        raise BenchFailure(f"merge applied {changes_applied} changes of {src.changes}")
    rows = target.rows("machines")
    if rows != src.rows:
        missing = len(set(src.rows) - set(rows))
        extra = len(set(rows) - set(src.rows))
        raise BenchFailure(
            f"target rows differ from the source's: {len(rows)} vs {len(src.rows)} rows, "
            f"{missing} source rows missing or different, {extra} target rows not in the source"
        )
    if target.clock_rows("machines") != src.clock_rows:
        raise BenchFailure("target clock rows differ from the source's")
    if target.heads().get(actor) != src.store.db_version or target.needs():
        raise BenchFailure(
            f"target books: head {target.heads().get(actor)} (source {src.store.db_version}), "
            f"needs {target.needs()}"
        )


def run_plain(path: Path, src: Source, batches: list[list[Row]]) -> Run:
    conn = open_plain(str(path))
    try:
        settle()
        c0 = time.process_time()
        t0 = time.perf_counter()
        for batch in batches:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(UPSERT_SQL, batch)
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - c0
        got = conn.execute("SELECT * FROM machines ORDER BY id").fetchall()
    finally:
        conn.close()
    if got != [src.final_rows[k] for k in sorted(src.final_rows)]:
        raise BenchFailure("plain upsert: the rows differ from the source's")
    return Run(elapsed=elapsed, cpu=cpu)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="smoke run: 2,000 rows, 3 repetitions")
    p.add_argument("--rows", type=int, default=None, help="rows written on the source (default 50000)")
    p.add_argument("--rows-per-tx", type=int, default=100, help="rows per source transaction (default 100)")
    p.add_argument(
        "--batch-sizes", default="1000,10000", help="changes per merge batch, (default %(default)s)"
    )
    p.add_argument("--repeats", type=int, default=None, help="repetitions per measurement (default 5)")
    args = p.parse_args(argv)
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    if args.rows is None:
        args.rows = 2_000 if args.quick else 50_000
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if min(args.rows, args.rows_per_tx, args.repeats, *args.batch_sizes) < 1:
        p.error("rows, rows per transaction, repeats and batch sizes must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = make_console()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vd-bench-merge-") as tmp:
        tmpdir = Path(tmp)
        try:
            t0 = time.perf_counter()
            src = build_source(tmpdir / "source.db", args.rows, args.rows_per_tx, args.repeats)
            build_s = time.perf_counter() - t0
            console.print(
                f"source: {args.rows:,} rows, {len(src.changesets):,} versions, {src.changes:,} current "
                f"changes ({src.written - src.changes:,} superseded), built in {build_s:.1f} s"
            )
            for batch_size in args.batch_sizes:
                batches = make_batches(src.changesets, batch_size)
                pbatches = plain_batches(batches, src.final_rows)
                runs: dict[str, list[Run]] = {"verdigris": [], "plain": []}
                for rep in range(args.repeats):
                    order = ["verdigris", "plain"] if rep % 2 == 0 else ["plain", "verdigris"]
                    for name in order:
                        path = tmpdir / f"{name}-b{batch_size}-r{rep}.db"
                        if name == "verdigris":
                            runs[name].append(run_verdigris(path, src, batches))
                        else:
                            runs[name].append(run_plain(path, src, pbatches))
                        for suffix in ("", "-wal", "-shm"):
                            Path(f"{path}{suffix}").unlink(missing_ok=True)
                v_rates = [src.changes / r.elapsed for r in runs["verdigris"]]
                p_rates = [src.changes / r.elapsed for r in runs["plain"]]
                v_cpu_rates = [src.changes / r.cpu for r in runs["verdigris"] if r.cpu > 0]
                v, pl = median(v_rates), median(p_rates)
                results.append(
                    {
                        "batch_size": batch_size,
                        "batches": len(batches),
                        "mean_changes_per_batch": round(src.changes / len(batches), 1),
                        "verdigris_changes_per_s": round(v, 1),
                        "verdigris_cpu_changes_per_s": round(median(v_cpu_rates), 1) if v_cpu_rates else 0.0,
                        "plain_changes_per_s": round(pl, 1),
                        "plain_rows_per_s": round(
                            median([sum(len(b) for b in pbatches) / r.elapsed for r in runs["plain"]]), 1
                        ),
                        "ratio": round(v / pl, 4),
                        "meets_target": v >= TARGET_CHANGES_PER_S,
                        "verdigris_runs": [round(x, 1) for x in v_rates],
                        "plain_runs": [round(x, 1) for x in p_rates],
                    }
                )
        except BenchFailure as e:
            console.print(f"[bold red]FAILED[/]: {e}")
            return 1
        finally:
            if "src" in locals():
                src.store.close()

    extract_rate = src.changes / median(src.extract_s)
    table = Table(title=f"Remote merge throughput (changes/s, median of {args.repeats})")
    table.add_column("batch ≥", justify="right")
    table.add_column("batches", justify="right")
    table.add_column("verdigris", justify="right")
    table.add_column("plain upsert", justify="right")
    table.add_column("verdigris/plain", justify="right")
    table.add_column("verdigris min–max", justify="right")
    table.add_column(f"≥ {TARGET_CHANGES_PER_S:,.0f}/s", justify="center")
    for r in results:
        table.add_row(
            f"{r['batch_size']:,}",
            f"{r['batches']:,}",
            fmt_rate(r["verdigris_changes_per_s"]),
            fmt_rate(r["plain_changes_per_s"]),
            f"{r['ratio']:.3f}",
            f"{fmt_rate(min(r['verdigris_runs']))}–{fmt_rate(max(r['verdigris_runs']))}",
            "[green]met[/]" if r["meets_target"] else "[red]not met[/]",
        )
    console.print(table)
    verdict = "[green]met[/]" if all(r["meets_target"] for r in results) else "[red]not met[/]"
    console.print(
        f"extraction (changesets_for): {fmt_rate(extract_rate)} changes/s\n"
        f"merge target {TARGET_CHANGES_PER_S:,.0f} changes/s at every batch size "
        f"(native cr-sqlite: 11–20 k/s on a laptop): {verdict}"
    )
    emit_json(
        {
            "bench": "merge_throughput",
            "quick": args.quick,
            "repeats": args.repeats,
            "rows": args.rows,
            "rows_per_tx": args.rows_per_tx,
            "versions": len(src.changesets),
            "changes": src.changes,
            "superseded": src.written - src.changes,
            "extract_changes_per_s": round(extract_rate, 1),
            "target_changes_per_s": TARGET_CHANGES_PER_S,
            "target_met": all(r["meets_target"] for r in results),
            "results": results,
            **environment(),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
