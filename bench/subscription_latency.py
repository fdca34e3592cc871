"""Subscription latency: commit → change event, through a real agent process and its HTTP API.

A `verdigris agent` runs as its own process on a free loopback port. One client subscribes to
``SELECT id, ts FROM probes`` over ``POST /v1/subscriptions``; writers send transactions over
``POST /v1/transactions`` on an open-loop schedule of ``--rate`` commits/s (1,000 by default), each writing
``ts = time.time_ns()`` taken just before the request is sent. The latency of a commit is the time the
matching ``change`` event reaches the subscriber minus that ``ts``: it includes the HTTP request, the
commit, matching and the event's trip back — an upper bound on commit → event.

Reported: achieved commit rate, events received, p50/p90/p99/max latency (median over ``--repeats``).
Target: p99 ≤ 50 ms (Corrosion batches changed keys up to 600 ms before sending events).

    .venv/bin/python bench/subscription_latency.py            # default: 3 × 10 s at 1,000 commits/s
    .venv/bin/python bench/subscription_latency.py --quick    # smoke run, a few seconds

The last line of stdout is one line of JSON with the figures. Exit status 1 if an event is missing or
wrong (every commit must produce exactly its event).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from rich.table import Table

from _util import BenchFailure, emit_json, environment, make_console, median
from verdigris.api.client import CorrosionClient
from verdigris.api.wire import Change, EndOfQuery

SCHEMA = "CREATE TABLE probes (id INTEGER NOT NULL PRIMARY KEY, ts INTEGER NOT NULL DEFAULT 0, n INTEGER);\n"
KEYS = 200
TARGET_P99_MS = 50.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_agent(tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    (tmp / "schema.sql").write_text(SCHEMA)
    config = tmp / "agent.toml"
    config.write_text(
        f'[db]\npath = "{tmp / "agent.db"}"\nschema_paths = ["{tmp / "schema.sql"}"]\n'
        f'[api]\naddr = "127.0.0.1:{port}"\n[admin]\npath = "{tmp / "admin.sock"}"\n[log]\nlevel = "warning"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "verdigris.cli", "agent", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=(tmp / "agent.log").open("wb"),
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchFailure(f"agent exited: {(tmp / 'agent.log').read_text()}")
        try:
            with urllib.request.urlopen(f"{base}/v1/health", timeout=1):
                return proc, base
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.05)
    proc.kill()
    raise BenchFailure("agent did not become healthy in 30 s")


async def run_once(base: str, rate: float, seconds: float, writers: int) -> dict[str, Any]:
    total = int(rate * seconds)
    sent_ts: dict[int, int] = {}
    latencies_ms: list[float] = []
    done = asyncio.Event()
    async with CorrosionClient(base) as client:
        # Seed the keys so every commit is an update of an existing row (one event each).
        await client.transaction(
            [
                ["INSERT INTO probes (id, ts, n) VALUES (?, 0, -1) ON CONFLICT DO NOTHING", [k]]
                for k in range(KEYS)
            ]
        )
        sub = client.subscribe("SELECT id, ts, n FROM probes")
        await sub.open()
        ready = asyncio.Event()

        async def subscriber() -> None:
            async for event in sub:
                if not ready.is_set():
                    if isinstance(event, EndOfQuery):
                        ready.set()
                    continue
                if isinstance(event, Change):
                    now = time.time_ns()
                    _, ts, n = event.values
                    if isinstance(n, int) and n >= 0:
                        if sent_ts.get(n) != ts:
                            raise BenchFailure(f"event for commit {n} carries ts {ts}, sent {sent_ts.get(n)}")
                        latencies_ms.append((now - int(ts)) / 1e6)
                        if len(latencies_ms) == total:
                            done.set()
                            return

        sub_task = asyncio.create_task(subscriber())
        await asyncio.wait_for(ready.wait(), timeout=30)
        start = time.monotonic()

        async def writer(w: int) -> None:
            for n in range(w, total, writers):
                due = start + n / rate
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)  # open-loop pacing of the load, not synchronisation
                ts = time.time_ns()
                sent_ts[n] = ts
                await client.transaction(
                    [["UPDATE probes SET ts = ?, n = ? WHERE id = ?", [ts, n, n % KEYS]]]
                )

        await asyncio.gather(*(writer(w) for w in range(writers)))
        write_elapsed = time.monotonic() - start
        try:
            await asyncio.wait_for(done.wait(), timeout=30)
        except TimeoutError as e:
            raise BenchFailure(f"only {len(latencies_ms)} of {total} change events arrived") from e
        finally:
            sub_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sub_task
            await sub.close()
    latencies_ms.sort()

    def pct(p: float) -> float:
        return latencies_ms[min(len(latencies_ms) - 1, int(p / 100 * len(latencies_ms)))]

    return {
        "commits": total,
        "events": len(latencies_ms),
        "achieved_rate": total / write_elapsed,
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "max_ms": latencies_ms[-1],
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=1000.0, help="commits per second (default 1000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds per repetition (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--writers", type=int, default=16, help="concurrent writer connections (default 16)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 × 1 s at 200 commits/s")
    args = parser.parse_args()
    if args.quick:
        args.rate, args.seconds, args.repeats, args.writers = 200.0, 1.0, 1, 4
    console = make_console()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vd-sublat-") as tmp:
        proc, base = start_agent(Path(tmp))
        try:
            for i in range(args.repeats):
                console.print(
                    f"run {i + 1}/{args.repeats}: {args.rate:,.0f} commits/s for {args.seconds:g} s"
                )
                runs.append(asyncio.run(run_once(base, args.rate, args.seconds, args.writers)))
        except BenchFailure as e:
            console.print(f"[red]FAILED[/red]: {e}")
            return 1
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    keys = ["achieved_rate", "p50_ms", "p90_ms", "p99_ms", "max_ms"]
    summary = {k: median([r[k] for r in runs]) for k in keys}
    table = Table(title=f"Subscription latency, commit → change event (median of {len(runs)})")
    for col in [
        "commits/s asked",
        "achieved",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        f"p99 ≤ {TARGET_P99_MS:g} ms",
    ]:
        table.add_column(col, justify="right")
    met = summary["p99_ms"] <= TARGET_P99_MS
    table.add_row(
        f"{args.rate:,.0f}",
        f"{summary['achieved_rate']:,.0f}",
        f"{summary['p50_ms']:.1f}",
        f"{summary['p90_ms']:.1f}",
        f"{summary['p99_ms']:.1f}",
        f"{summary['max_ms']:.1f}",
        "met" if met else "MISSED",
    )
    console.print(table)
    emit_json(
        {
            "bench": "subscription_latency",
            **environment(),
            "rate": args.rate,
            "seconds": args.seconds,
            "repeats": len(runs),
            "quick": args.quick,
            **{k: round(v, 3) for k, v in summary.items()},
            "target_p99_ms": TARGET_P99_MS,
            "target_met": met,
            "runs": runs,
        }
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
