"""Helpers shared by the benchmarks in this folder (not a public module).

Every benchmark prints a ``rich`` table for people and, as its very last line on stdout, one line of JSON
with the figures, so scripts and tests can read the result with ``json.loads(out.splitlines()[-1])``.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import sqlite3
import statistics
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console

SCHEMA_SQL = """
CREATE TABLE machines (
    id INTEGER NOT NULL PRIMARY KEY,
    app TEXT NOT NULL DEFAULT '',
    region TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT '',
    cpu REAL NOT NULL DEFAULT 0
);
"""
"""The table both benchmarks use: an integer key and four columns (text and real), like an instance row."""

COLUMNS: tuple[str, ...] = ("id", "app", "region", "state", "cpu")
INSERT_SQL = "INSERT INTO machines (id, app, region, state, cpu) VALUES (?, ?, ?, ?, ?)"
UPSERT_SQL = (
    INSERT_SQL + " ON CONFLICT (id) DO UPDATE SET app = excluded.app, region = excluded.region, "
    "state = excluded.state, cpu = excluded.cpu"
)
REGIONS: tuple[str, ...] = ("ams", "cdg", "fra", "iad", "lhr", "nrt", "ord", "sjc", "syd", "yyz")

Row = tuple[int, str, str, str, float]


class BenchFailure(Exception):
    """A correctness check of a benchmark failed: its figures must not be reported."""


def make_row(i: int) -> Row:
    """A deterministic row with the key ``i``."""
    return (i, f"app-{i % 997:03d}", REGIONS[i % len(REGIONS)], "started", float(i % 100) / 4)


def open_plain(path: str) -> sqlite3.Connection:
    """A plain SQLite connection set up as the store sets up its own: WAL, synchronous=NORMAL, autocommit
    mode (transactions are explicit), the same table."""
    conn = sqlite3.connect(path, isolation_level=None, cached_statements=512)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.executescript(SCHEMA_SQL)
    return conn


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def settle() -> None:
    """Collect garbage left by the previous run so that it is not charged to the next one."""
    gc.collect()


def environment() -> dict[str, Any]:
    """Facts about the run that explain its figures."""
    try:
        load1, load5, _ = os.getloadavg()
    except OSError:  # pragma: no cover - not on Linux
        load1 = load5 = -1.0
    return {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "cpus": os.cpu_count() or 0,
        "loadavg_1m": round(load1, 2),
        "loadavg_5m": round(load5, 2),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }


def emit_json(payload: dict[str, Any]) -> None:
    """Print the machine-readable result as the last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(payload, sort_keys=True, separators=(",", ":")), flush=True)


def make_console() -> Console:
    """A console wide enough for the tables also when stdout is a pipe or a file."""
    probe = Console()
    return probe if probe.is_terminal else Console(width=132)


def fmt_rate(x: float) -> str:
    return f"{x:,.0f}"
