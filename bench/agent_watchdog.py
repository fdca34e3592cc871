"""The agent watchdog's detection and recovery times: stall a real agent, time its re-exec.

One ``verdigris agent`` process on 127.0.0.1 (JSON logs, ``[watchdog] fault-injection = true``), one row
written. Then ``--runs`` times (5): the admin socket's ``fault stall-loop`` (or ``stall-apply`` with
``--cause apply``, whose deadline is then ``--apply-deadline``, 1 s) blocks the event loop (the writer) for
60 s, and the bench measures, against its own clock (same machine):

* **detection**: the ``watchdog_restart`` event's ``detected_at`` (wall clock) minus the moment the fault
  was sent (the stall's onset, within a millisecond), and the watchdog's own figure (``detection=``: probe
  the stalled path's last sign of life → noticed, ≥ the deadline); then the time to write the stack file (``dump=``);
* **re-exec'd agent up**: the new incarnation's own figure (``watchdog_resumed serving_again=``: from the
  detection to its listeners being up, backoff included);
* **serving again**: the first moment ``/v1/health`` answers *and* the admin ``ping`` shows the new restart
  count (so the answer comes from the re-executed agent), minus the fault's sending. It includes the
  crash-loop backoff of the run (at once, then 0.1 s doubling, as runs follow each other within 60 s),
  shown apart;
* each stall starts 0.3-0.8 s (random, ``--seed``) after the agent served again, so its onset falls at any
  phase of the probe cycle;
* every run checks that the pid is unchanged (re-exec in place) and the row is still there.

Targets: detection within the deadline + one probe interval (1.25 s for the loop by default); serving again
within 2 s of detection plus the backoff. A failed check prints ``FAILED`` and exits 1.

    .venv/bin/python bench/agent_watchdog.py [--runs 5] [--cause loop|apply]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.table import Table

from _util import BenchFailure, emit_json, environment, make_console, median
from verdigris.admin import AdminError, admin_call
from verdigris.watchdog.agent import STATE_ENV

STALL_SECONDS = 60.0
WAIT = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(url: str, body: object | None = None, timeout: float = 5.0) -> bytes:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        payload: bytes = resp.read()
        return payload


class AgentProcess:
    """A real ``verdigris agent`` process run from ``config`` (JSON logs appended to ``log``, fault
    injection on): started outside any watchdog's carried state, polled until it serves, stalled through the
    admin socket's ``fault`` command, its log events read. Also drives tests/test_agent_watchdog.py."""

    def __init__(self, config: Path, log: Path, port: int, admin: Path) -> None:
        self.config = config
        self.log = log
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.admin = admin
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != STATE_ENV}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "verdigris.cli", "agent", "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.wait_serving(lambda ping: True)

    def wait_serving(
        self, ready: Callable[[dict[str, Any]], bool], timeout: float = WAIT, interval: float = 0.05
    ) -> dict[str, Any]:
        """Poll until /v1/health answers and the admin ping is ok and satisfies ``ready``; the ping reply."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise BenchFailure(f"the agent exited:\n{self.log_text()[-3000:]}")
            try:
                http(f"{self.base}/v1/health", timeout=1)
                ping = admin_call(self.admin, {"cmd": "ping"}, 1.0)
                if ping.get("ok") and ready(ping):
                    return ping
            except (OSError, ValueError, KeyError, AdminError):
                pass
            time.sleep(interval)  # polling another process: no event to await
        raise BenchFailure(f"agent not serving as expected within {timeout}s:\n{self.log_text()[-3000:]}")

    def send_fault(self, action: str, seconds: float) -> float:
        """Send a fault command without waiting for the reply (a stalled loop sends none); the wall time."""
        sent = time.time()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.admin))
            sock.sendall(json.dumps({"cmd": "fault", "action": action, "seconds": seconds}).encode() + b"\n")
            if action == "stall-apply":  # answered at once: the writer stalls, the loop does not
                reply = json.loads(sock.makefile().readline())
                if reply.get("ok") is not True:
                    raise BenchFailure(f"fault {action} refused: {reply}")
        return sent

    def events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                doc = json.loads(line)
                if doc["msg"].startswith(name + " "):
                    out.append(doc)
        return out

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Bench(AgentProcess):
    def __init__(self, work: Path, cause: str, apply_deadline: float) -> None:
        port = free_port()
        admin = Path(tempfile.mkdtemp(prefix="vdw")) / "admin.sock"
        (work / "schema.sql").write_text("CREATE TABLE kv (k TEXT NOT NULL PRIMARY KEY, v INTEGER);\n")
        config = work / "agent.toml"
        config.write_text(
            f'[db]\npath = "{work / "state.db"}"\nschema_paths = ["{work / "schema.sql"}"]\n'
            f'[api]\naddr = "127.0.0.1:{port}"\n[admin]\npath = "{admin}"\n[log]\nformat = "json"\n'
            f'[watchdog]\nfault-injection = true\nstack-dir = "{work / "stacks"}"\n'
            + (f"apply-deadline = {apply_deadline}\n" if cause == "apply" else "")
        )
        super().__init__(config, work / "agent.log", port, admin)
        self.cause = cause

    def serving_with(self, restarts: int) -> tuple[float, dict[str, Any]]:
        """Poll until the agent with ``restarts`` restarts of this cause serves; (wall time, ping)."""
        ping = self.wait_serving(lambda p: p["watchdog"]["restarts"][self.cause] == restarts, interval=0.005)
        return time.time(), ping

    def stall(self) -> float:
        return self.send_fault("stall-loop" if self.cause == "loop" else "stall-apply", STALL_SECONDS)

    def rows(self) -> list[Any]:
        events = [
            json.loads(line) for line in http(f"{self.base}/v1/queries", "SELECT k, v FROM kv").splitlines()
        ]
        return [e["row"] for e in events if "row" in e]


def field(event: dict[str, Any], key: str) -> str:
    for word in event["msg"].split():
        if word.startswith(key + "="):
            return word.split("=", 1)[1]
    raise BenchFailure(f"no {key}= in {event['msg']}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="vd-agent-watchdog-"))
    bench = Bench(work, args.cause, args.apply_deadline)
    runs: list[dict[str, float]] = []
    try:
        bench.start()
        http(f"{bench.base}/v1/transactions", [["INSERT INTO kv (k, v) VALUES ('a', 1)", []]])
        rows = bench.rows()
        pid = bench.proc.pid if bench.proc else -1
        rng = random.Random(args.seed)
        for i in range(1, args.runs + 1):
            # the stall's onset at a random phase of the probe cycle (else it would always follow the
            # first probe of a freshly started agent, the worst case)
            time.sleep(rng.uniform(0.3, 0.8))
            sent = bench.stall()
            served, ping = bench.serving_with(i)
            events, resumed = bench.events("watchdog_restart"), bench.events("watchdog_resumed")
            if len(events) != i or len(resumed) != i:
                raise BenchFailure(
                    f"run {i}: {len(events)} watchdog_restart, {len(resumed)} watchdog_resumed events"
                )
            event = events[-1]
            onset = float(field(event, "detected_at")) - sent
            if ping["pid"] != pid:
                raise BenchFailure(f"run {i}: pid {ping['pid']} != {pid}: not re-executed in place")
            if bench.rows() != rows:
                raise BenchFailure(f"run {i}: the rows changed across the restart")
            runs.append(
                {
                    "detection_s": round(onset, 3),
                    "watchdog_detection_s": float(field(event, "detection").rstrip("s")),
                    "backoff_s": float(field(event, "backoff").rstrip("s")),
                    "dump_s": float(field(event, "dump").rstrip("s")),
                    "resumed_after_detection_s": float(field(resumed[-1], "serving_again").rstrip("s")),
                    "serving_again_s": round(served - sent, 3),
                }
            )
    finally:
        bench.stop()
        if args.keep:
            print(f"kept: {work} (agent.log, stacks/)")
        else:
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(bench.admin.parent, ignore_errors=True)
    return {"runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="stalls (default 5)")
    parser.add_argument("--cause", choices=("loop", "apply"), default="loop", help="what to stall (loop)")
    parser.add_argument("--keep", action="store_true", help="keep the agent's directory (log, stack files)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the stalls' random onsets")
    parser.add_argument("--apply-deadline", type=float, default=1.0, help="with --cause apply (default 1 s)")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    console = make_console()
    try:
        result = run(args)
    except BenchFailure as e:
        console.print(f"[red]FAILED[/red]: {e}")
        return 1
    runs = result["runs"]
    table = Table(title=f"agent watchdog: {args.cause} stall → re-exec ({args.runs} runs)")
    columns = {
        "detection_s": "detection (s, from onset)",
        "watchdog_detection_s": "watchdog detection (s)",
        "dump_s": "stack dump (s)",
        "backoff_s": "backoff (s)",
        "resumed_after_detection_s": "re-exec'd agent up, after detection (s)",
        "serving_again_s": "serving again (s)",
    }
    table.add_column("run", justify="right")
    for title in columns.values():
        table.add_column(title, justify="right")
    for i, r in enumerate(runs, 1):
        table.add_row(str(i), *(f"{r[key]:.3f}" for key in columns))
    summary = {key: median([r[key] for r in runs]) for key in columns}
    summary["serving_again_minus_backoff_s"] = median([r["serving_again_s"] - r["backoff_s"] for r in runs])
    table.add_row("median", *(f"{summary[key]:.3f}" for key in columns))
    console.print(table)
    console.print(f"serving again minus backoff, median: {summary['serving_again_minus_backoff_s']:.3f} s")
    emit_json(
        {"bench": "agent_watchdog", "cause": args.cause, "runs": runs, "median": summary, **environment()}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
