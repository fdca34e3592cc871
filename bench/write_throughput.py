"""Local write throughput: rows/s through ``Store.transact`` beside plain SQLite, in the same run.

For each batch size (rows per transaction, 1 and 100 by default) and each repetition, a fresh database
receives the same rows, one ``INSERT`` statement per row:

* **verdigris**: ``Store.transact([Statement, ...])`` per batch — clock triggers, version bookkeeping,
  the touched-rows query and the commit, everything a local write costs;
* **plain**: the ``sqlite3`` module on the same table, WAL, ``synchronous = NORMAL``, one
  ``BEGIN IMMEDIATE ... COMMIT`` per batch with one ``execute`` per row.

The two are interleaved (their order alternates per repetition) so that noise from other work on the
machine falls on both. Statements and parameters are built before the clock starts. Figures are medians.

    .venv/bin/python bench/write_throughput.py            # default run, well under 2 minutes
    .venv/bin/python bench/write_throughput.py --quick    # smoke run, a few seconds

The last line of stdout is one line of JSON with the figures. Exit status 1 if a correctness check fails
(every run must end with exactly the rows it wrote).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from _util import (
    INSERT_SQL,
    SCHEMA_SQL,
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
from verdigris.store import Statement, Store

Impl = Callable[[Path, list[list[Row]]], float]


def run_verdigris(path: Path, batches: list[list[Row]]) -> float:
    """Write the batches through ``Store.transact``; return the seconds spent writing."""
    with Store(path, schema_sql=SCHEMA_SQL) as store:
        stmts = [[Statement(INSERT_SQL, list(row)) for row in batch] for batch in batches]
        settle()
        t0 = time.perf_counter()
        for batch_stmts in stmts:
            store.transact(batch_stmts)
        elapsed = time.perf_counter() - t0
        expected = sum(len(b) for b in batches)
        count, _ = store.table_stats(["machines"])
        if count != expected:
            raise BenchFailure(f"verdigris: {count} rows in the table after writing {expected}")
        if store.db_version != len(batches):
            raise BenchFailure(f"verdigris: db_version {store.db_version} after {len(batches)} transactions")
    return elapsed


def run_plain(path: Path, batches: list[list[Row]]) -> float:
    """Write the batches with plain ``sqlite3``; return the seconds spent writing."""
    conn = open_plain(str(path))
    try:
        settle()
        t0 = time.perf_counter()
        for batch in batches:
            conn.execute("BEGIN IMMEDIATE")
            for row in batch:
                conn.execute(INSERT_SQL, row)
            conn.execute("COMMIT")
        elapsed = time.perf_counter() - t0
        expected = sum(len(b) for b in batches)
        (count,) = conn.execute("SELECT count(*) FROM machines").fetchone()
        if count != expected:
            raise BenchFailure(f"plain: {count} rows in the table after writing {expected}")
    finally:
        conn.close()
    return elapsed


IMPLS: dict[str, Impl] = {"verdigris": run_verdigris, "plain": run_plain}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("--quick", action="store_true", help="smoke run: few rows, 3 repetitions")
    p.add_argument("--repeats", type=int, default=None, help="repetitions per measurement (default 5)")
    p.add_argument(
        "--batch-sizes", default="1,100", help="rows per transaction, comma-separated (default 1,100)"
    )
    p.add_argument(
        "--rows",
        type=str,
        default=None,
        help="rows written per run for each batch size, comma-separated (default 10000,100000)",
    )
    args = p.parse_args(argv)
    args.batch_sizes = [int(x) for x in args.batch_sizes.split(",")]
    if args.rows is None:
        per_size = {1: 300, 100: 3000} if args.quick else {1: 10000, 100: 100000}
        args.rows = [per_size.get(b, b * 300 if not args.quick else b * 30) for b in args.batch_sizes]
    else:
        args.rows = [int(x) for x in args.rows.split(",")]
        if len(args.rows) != len(args.batch_sizes):
            p.error("--rows needs one figure per batch size")
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.repeats < 1 or any(b < 1 for b in args.batch_sizes) or any(r < 1 for r in args.rows):
        p.error("repeats, batch sizes and rows must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = make_console()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vd-bench-write-") as tmp:
        tmpdir = Path(tmp)
        for batch_size, nrows in zip(args.batch_sizes, args.rows, strict=True):
            rows = [make_row(i) for i in range(nrows)]
            batches = [rows[i : i + batch_size] for i in range(0, nrows, batch_size)]
            rates: dict[str, list[float]] = {name: [] for name in IMPLS}
            for rep in range(args.repeats):
                order = list(IMPLS) if rep % 2 == 0 else list(reversed(IMPLS))
                for name in order:
                    path = tmpdir / f"{name}-b{batch_size}-r{rep}.db"
                    try:
                        elapsed = IMPLS[name](path, batches)
                    except BenchFailure as e:
                        console.print(f"[bold red]FAILED[/]: batch {batch_size}: {e}")
                        return 1
                    rates[name].append(nrows / elapsed)
            v, pl = median(rates["verdigris"]), median(rates["plain"])
            results.append(
                {
                    "batch_size": batch_size,
                    "rows": nrows,
                    "transactions": len(batches),
                    "verdigris_rows_per_s": round(v, 1),
                    "plain_rows_per_s": round(pl, 1),
                    "ratio": round(v / pl, 4),
                    "verdigris_runs": [round(x, 1) for x in rates["verdigris"]],
                    "plain_runs": [round(x, 1) for x in rates["plain"]],
                }
            )

    table = Table(title=f"Local write throughput (rows/s, median of {args.repeats})")
    table.add_column("rows/tx", justify="right")
    table.add_column("rows", justify="right")
    table.add_column("verdigris", justify="right")
    table.add_column("plain sqlite", justify="right")
    table.add_column("verdigris/plain", justify="right")
    table.add_column("verdigris min–max", justify="right")
    table.add_column("plain min–max", justify="right")
    for r in results:
        table.add_row(
            str(r["batch_size"]),
            f"{r['rows']:,}",
            fmt_rate(r["verdigris_rows_per_s"]),
            fmt_rate(r["plain_rows_per_s"]),
            f"{r['ratio']:.3f}",
            f"{fmt_rate(min(r['verdigris_runs']))}–{fmt_rate(max(r['verdigris_runs']))}",
            f"{fmt_rate(min(r['plain_runs']))}–{fmt_rate(max(r['plain_runs']))}",
        )
    console.print(table)
    emit_json(
        {
            "bench": "write_throughput",
            "quick": args.quick,
            "repeats": args.repeats,
            "results": results,
            **environment(),
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
