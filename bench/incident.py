"""The incident, reproduced and survived: a bad row change locks up proxies fleet-wide (issue 6).

The outage: a proxy took the read side of a read-write lock, and code lower in the same call tree took the
write side; an update gossiped to every node triggered that path everywhere at once and every proxy locked
up. Here the proxy's fault-injection switch (``[proxy] fault_injection = true``, ``[proxy.fault]
incident_row = "<table>:<key>"``) makes a worker's routing-table apply path take the read side and then
the write side of the table lock when a *change* of that row reaches it (docs/proxy.md).

A local multi-region fleet, all on 127.0.0.1: ``--regions`` × ``--nodes`` (3 × 2) agents in region mode
(``[gossip]`` per region + ``[gossip.global]``, as in ``bench/blast_radius.py``), on each node a
``verdigris proxy`` with ``--workers`` (2) workers on that node's agent, and per region one upstream (a tiny
keep-alive HTTP server in this process) that is the region's instance of the app ``web`` (host
``web.test``, no concurrency limits: the backlog a stall leaves must not become limit rejections).
Steady client load through every proxy: ``--rate`` (40) requests/s per proxy, open loop, each a new
connection (``connection: close``) with a ``--request-timeout`` (10 s), recording its send time, its end,
its result and the proxy. After ``--warmup`` s of load the trigger row is written on a region-a
agent. The four cases, in one run, each with freshly started proxies:

1. global row (``apps:<name>``), ``table_lock = "plain"``, ``watchdog = false``: every proxy stalls. Shown
   by the requests left unanswered and by the supervisors' probe timeouts over ``--stall-window`` s; then
   stopped (the proxies are stopped, SIGKILL to those that do not exit, which ends the requests they hold;
   the next case starts new ones);
2. global row, plain lock, ``watchdog = true``: every worker of every proxy is detected and replaced.
   Per proxy: **time to detect** (the supervisor's ``watchdog_restart`` log event, ``detected_at``, minus the
   moment the stall began), **time to serve again** (the first successful response after the stall began,
   minus that moment), failed client requests split into *in flight on the stuck worker* (the connection
   dropped when a stuck worker of that proxy was killed, the request sent before it was detected) and
   *other* (anything else: a timeout, an error status, a reset at another moment);
3. regional row (``machines:<id>``, written in region a), plain lock, watchdog on: only region a's proxies
   stall and are replaced; the other regions never see the row;
4. global row, ``table_lock = "project"`` (the project's RWLock), watchdog on: no stall at all — each
   worker refuses the update with ``LockUpgradeError`` (logged with both stacks as ``table_apply_refused``,
   counted in ``verdigris_proxy_table_apply_refused_total``), nothing is restarted, every request succeeds.

*When the stall began*, per proxy: the end of the last successful response it gave before the stall was
detected (cases 2, 3) or before its first failed request (case 1), and not before the trigger row was
sent. Under steady load this is within one request interval (1 / ``--rate``) of the real moment, which the
clients cannot see directly. The supervisor's own ``detection`` figure (from the send of the unanswered
probe) is reported beside it, and so is the replacement's start after the kill (``respawned_after_kill_s``:
the rest of "serving again" is the new worker's interpreter start and its routing table's snapshot). The
proxies run with ``probe_interval`` / ``probe_deadline`` = ``--probe-interval`` / ``--probe-deadline``
(0.25 / 1.0, the defaults: detection then takes 1.0–1.25 s after the stall began by construction).
Clocks: the supervisors log ``time.monotonic()``, the same system-wide clock this benchmark reads.

Targets (issue 6): case 2 detection ≤ 1 s and serving again ≤ 2 s after the stall began, zero failed
requests other than the in-flight ones (cases 2 and 3, and every proxy of the unaffected regions); case 4
zero stalls (no restart, no probe timeout) and zero failed requests. Checks (else ``FAILED``, exit 1, no
figures): the fleet comes up and routes through every proxy before each case; every proxy's workers start.

    .venv/bin/python bench/incident.py                  # 3 regions × 2 nodes, 2 workers per proxy
    .venv/bin/python bench/incident.py --quick          # 2 regions × 1 node, 1 worker, shorter windows

A table per case (targets, met / missed), and as the last line of stdout one line of JSON with the figures;
the same JSON with every request's timeline is saved to ``bench/results/incident.json`` for
``bench/plot.py``. Every process runs in a session of its own and is killed (its whole process group: a
stuck worker ignores SIGTERM) at the end, also on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from _cluster import HOST, CpuMeter, free_ports, log_tail, machine_load, pct, run_guarded, until, workdir
from _results import add_results_argument, save_results
from _util import BenchFailure, emit_json, environment, make_console
from blast_radius import Agent, Fleet, GidProcs

APP = "web"
HOSTNAME = "web.test"
TARGET_DETECT_S = 1.0
TARGET_SERVE_S = 2.0
MARK_ENV = "VD_INCIDENT_DIR"
"""Every proxy process of a run (workers too) carries the run's temporary directory in this variable."""
STOP_GRACE_S = 3.0
"""A proxy gets this long to stop on SIGTERM before its process group is killed."""
KILL_MATCH_WINDOW = (0.1, 1.0)
"""A dropped connection counts as "in flight on the stuck worker" when it ended within this many seconds
before / after the kill of a stuck worker of the same proxy."""

_RESTART = re.compile(
    r"watchdog_restart worker=(\d+) pid=(\d+) reason=(\S+) detection=([\d.]+)s .*?"
    r"detected_at=([\d.]+) killed_at=([\d.]+)"
)
_STARTED = re.compile(r"worker_started worker=(\d+) pid=(\d+) t=([\d.]+)")


@dataclass(frozen=True)
class Case:
    number: int
    title: str
    scope: str
    """``global``: a row of ``apps`` written in region a; ``regional``: a row of ``machines`` in region a."""
    lock: str
    """The proxies' ``table_lock``: ``plain`` (self-deadlocks on the upgrade) or ``project`` (refuses it)."""
    watchdog: bool

    @property
    def key(self) -> str:
        return f"case{self.number}"

    def trigger(self, run_id: str) -> tuple[str, str, list[Any]]:
        """(incident_row for the proxies' config, SQL, parameters) of this case's trigger row."""
        name = f"incident-{run_id}-c{self.number}"
        if self.scope == "global":
            return f"apps:{name}", "INSERT INTO apps (name, org) VALUES (?, 'incident')", [name]
        sql = "INSERT INTO machines (id, app, region, state) VALUES (?, ?, 'a', 'stopped')"
        return f"machines:{name}", sql, [name, APP]


CASES = (
    Case(1, "1. global row, plain lock, watchdog off: every proxy stalls", "global", "plain", False),
    Case(2, "2. global row, plain lock, watchdog on: every proxy detected and replaced", "global", "plain", True),
    Case(3, "3. regional row in region a, plain lock, watchdog on: only region a", "regional", "plain", True),
    Case(4, "4. global row, the project's lock: refused, no stall", "global", "project", True),
)  # fmt: skip


# ------------------------------------------------------------------------------------------------ upstream


class Upstream:
    """A region's instance of ``web``: a tiny HTTP/1.1 keep-alive server answering ``ok <region>``."""

    def __init__(self, region: str, port: int) -> None:
        self.region, self.port = region, port
        body = f"ok {region}\n".encode()
        self.response = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s" % (
            len(body),
            body,
        )
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, HOST, self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lower = head.lower()
                m = re.search(rb"\r\ncontent-length:\s*(\d+)", lower)
                if m:
                    await reader.readexactly(int(m.group(1)))
                writer.write(self.response)
                if b"\r\nconnection: close" in lower:
                    await writer.drain()
                    break
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


# ------------------------------------------------------------------------------------------------ proxies


@dataclass
class ProxyNode:
    """The ``verdigris proxy`` of one node (its supervisor and workers, one process group)."""

    index: int
    agent: Agent
    root: Path
    port: int = 0
    metrics_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(default_factory=Path)

    @property
    def name(self) -> str:
        return self.agent.name

    @property
    def region(self) -> str:
        return self.agent.region

    def write_config(self, case: Case, incident_row: str, args: argparse.Namespace) -> Path:
        lines = [
            "[proxy]",
            f'listen = "{HOST}:{self.port}"',
            f"workers = {args.workers}",
            f'agent = "{self.agent.api}"',
            f'region = "{self.region}"',
            f'id = "proxy-{self.name}"',
            f'metrics_listen = "{HOST}:{self.metrics_port}"',
            f"probe_interval = {args.probe_interval}",
            f"probe_deadline = {args.probe_deadline}",
            f"watchdog = {'true' if case.watchdog else 'false'}",
            f'stack_dir = "{self.root / "stacks"}"',
            "fault_injection = true",
            f'table_lock = "{case.lock}"',
            "[proxy.fault]",
            f'incident_row = "{incident_row}"',
            "[proxy.timeouts]",
            "drain = 1.0",
        ]
        path = self.root / f"proxy-{case.key}.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, procs: GidProcs, case: Case, incident_row: str, args: argparse.Namespace) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port, self.metrics_port = free_ports(2)
        config = self.write_config(case, incident_row, args)
        self.log = self.root / f"proxy-{case.key}.log"
        argv = [sys.executable, "-m", "verdigris.cli", "proxy", "-c", str(config)]
        env = {**os.environ, MARK_ENV: str(self.root.parent)}  # inherited by the workers: findable
        self.proc = procs.start(argv, self.log, env)  # a session of its own: its pid is its process group

    def kill_group(self) -> None:
        """SIGKILL to the whole process group (supervisor and workers, stuck or not)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def restarts(self) -> list[dict[str, Any]]:
        """The watchdog's ``watchdog_restart`` events in this case's log, in order."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        return [
            {"worker": int(m[0]), "pid": int(m[1]), "reason": m[2], "detection_s": float(m[3]),
             "detected_at": float(m[4]), "killed_at": float(m[5])}
            for m in _RESTART.findall(text)
        ]  # fmt: skip

    def worker_starts(self) -> list[float]:
        """When workers were started (``worker_started ... t=``, the supervisor's monotonic clock)."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return []
        return sorted(float(m[2]) for m in _STARTED.findall(text))

    def refusal(self) -> str:
        """The first ``table_apply_refused`` event of the log: its fields, then its error (JSON-quoted in
        the log line) decoded, with the stacks it carries; empty when there is none."""
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        for line in lines:
            if "table_apply_refused" not in line:
                continue
            m = re.search(r'error=("(?:[^"\\]|\\.)*")', line)
            if m is None:
                return line
            with contextlib.suppress(ValueError):
                return line[: m.start()] + "\n" + str(json.loads(m.group(1)))
            return line
        return ""


def stop_all(proxies: list[ProxyNode]) -> list[str]:
    """SIGTERM to every supervisor at once, then SIGKILL to the process group of those still running
    after :data:`STOP_GRACE_S` (a supervisor waits for its stuck workers' drain); how each stopped."""
    how = ["exited" if p.proc is None or p.proc.poll() is not None else "SIGTERM" for p in proxies]
    for p, h in zip(proxies, how, strict=True):
        if h == "SIGTERM" and p.proc is not None:
            p.proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for i, p in enumerate(proxies):
        if p.proc is None:
            continue
        try:
            p.proc.wait(timeout=max(0.01, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            how[i] = "SIGKILL"
        p.kill_group()  # also workers left behind by a supervisor that did exit
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.proc.wait(timeout=10)
    return how


# ------------------------------------------------------------------------------------------------ load


@dataclass
class Request:
    proxy: int
    sent: float
    ended: float = 0.0
    outcome: str = "pending"
    """``ok``, ``http_<status>[:<fly-error-code>]``, ``timeout``, ``reset``, ``eof`` (closed before a full
    response), ``refused`` or ``error:<name>``."""


class Load:
    """Open-loop client load: ``rate`` requests/s to every proxy, each a new connection."""

    def __init__(self, proxies: list[ProxyNode], rate: float, timeout: float) -> None:
        self.proxies, self.rate, self.timeout = proxies, rate, timeout
        self.requests: list[Request] = []
        self.sending = True
        self.max_send_lag = 0.0
        """The longest a request was sent after its scheduled time (this process starved of CPU)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._pacers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._pacers = [asyncio.create_task(self._pace(i)) for i in range(len(self.proxies))]

    async def _pace(self, index: int) -> None:
        start = time.monotonic() + index / (self.rate * len(self.proxies))  # proxies interleaved
        i = 0
        while self.sending:
            delay = start + i / self.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing of the load, not synchronisation
            if not self.sending:
                break
            req = Request(index, time.monotonic())
            self.max_send_lag = max(self.max_send_lag, req.sent - (start + i / self.rate))
            self.requests.append(req)
            task = asyncio.create_task(self._one(req, self.proxies[index].port))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            i += 1

    async def _one(self, req: Request, port: int) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(HOST, port)
                writer.write(
                    b"GET / HTTP/1.1\r\nhost: " + HOSTNAME.encode() + b"\r\nconnection: close\r\n\r\n"
                )
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                m = re.search(rb"\r\ncontent-length:\s*(\d+)", head.lower())
                body = await reader.readexactly(int(m.group(1))) if m else await reader.read()
                if status == 200 and body.startswith(b"ok "):
                    req.outcome = "ok"
                else:  # the proxy's own error answers name their cause
                    code = re.search(rb"\r\nfly-error-code:\s*([\w-]+)", head.lower())
                    req.outcome = f"http_{status}" + (f":{code.group(1).decode()}" if code else "")
        except TimeoutError:
            req.outcome = "timeout"
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            req.outcome = "eof"
        except ConnectionResetError:
            req.outcome = "reset"
        except ConnectionRefusedError:
            req.outcome = "refused"
        except (OSError, ValueError, IndexError) as e:
            req.outcome = f"error:{type(e).__name__}"
        finally:
            req.ended = time.monotonic()
            if writer is not None:
                writer.transport.abort()  # no lingering close handshake

    async def stop_sending(self) -> None:
        self.sending = False
        for t in self._pacers:
            t.cancel()
        await asyncio.gather(*self._pacers, return_exceptions=True)

    async def stop(self) -> None:
        """Stop sending; wait (bounded by the request timeout) for the requests in flight."""
        await self.stop_sending()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=self.timeout + 2.0)


# ------------------------------------------------------------------------------------------------ metrics


async def scrape(http: aiohttp.ClientSession, proxy: ProxyNode) -> dict[str, float]:
    """The proxy supervisor's metrics: sample name (labels folded into ``name{k=v,...}``) -> value, plus
    plain sums per sample name."""
    url = f"http://{HOST}:{proxy.metrics_port}/metrics"
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=15)) as r:
        if r.status != 200:
            raise BenchFailure(f"proxy {proxy.name}: /metrics answered {r.status}")
        text = await r.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + float(s.value)
            if s.labels:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = float(s.value)
    return out


def metric_delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def refused_count(m: dict[str, float]) -> float:
    """Updates the workers refused (the table lock's upgrade error), whatever the exact series name."""
    return sum(v for k, v in m.items() if "{" not in k and "apply_refused" in k and k.endswith("_total"))


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class Run:
    fleet: Fleet
    procs: GidProcs
    proxies: list[ProxyNode]
    upstreams: list[Upstream]
    args: argparse.Namespace
    run_id: str
    console: Any


async def wait_serving(http: aiohttp.ClientSession, proxy: ProxyNode, timeout: float) -> None:
    """Until the proxy answers ``web.test`` with 200 on 8 new connections in a row (the kernel spreads
    new connections over the workers: several in a row make "every worker has its table" very likely)."""
    streak = 0

    async def serving() -> bool:
        nonlocal streak
        if proxy.proc is not None and proxy.proc.poll() is not None:
            raise BenchFailure(
                f"proxy {proxy.name} exited with {proxy.proc.returncode}:\n{log_tail(proxy.log)}"
            )
        try:
            async with http.get(
                f"http://{HOST}:{proxy.port}/", headers={"host": HOSTNAME, "connection": "close"},
                timeout=aiohttp.ClientTimeout(total=2),
            ) as r:  # fmt: skip
                streak = streak + 1 if r.status == 200 else 0
        except (aiohttp.ClientError, TimeoutError, ConnectionError):
            streak = 0
        return streak >= 8

    try:
        await until(f"proxy {proxy.name} to route {HOSTNAME}", timeout, serving)
    except BenchFailure as e:
        raise BenchFailure(f"{e}\n{log_tail(proxy.log)}") from None


async def run_case(run: Run, case: Case) -> dict[str, Any]:
    args, fleet = run.args, run.fleet
    assert fleet.http is not None
    http = fleet.http
    incident_row, sql, params = case.trigger(run.run_id)
    for p in run.proxies:
        p.start(run.procs, case, incident_row, args)
    try:
        await asyncio.gather(*(wait_serving(http, p, args.start_timeout) for p in run.proxies))
        before = list(await asyncio.gather(*(scrape(http, p) for p in run.proxies)))
        load = Load(run.proxies, args.rate, args.request_timeout)
        meter = CpuMeter([p.proc.pid for p in run.proxies if p.proc is not None]).start()
        load.start()
        try:
            await asyncio.sleep(args.warmup)  # steady load before the trigger
            writer = fleet.by_region["a"][0]
            t_trigger = time.monotonic()
            await fleet.write(writer, [[sql, params]])
            t_ack = time.monotonic()
            affected = [p for p in run.proxies if case.scope == "global" or p.region == "a"]
            if not case.watchdog:
                await asyncio.sleep(args.stall_window)  # the stall, observed for a bounded time
            elif case.lock == "plain":

                async def recovered() -> bool:
                    for p in affected:
                        kills = p.restarts()
                        if len({k["worker"] for k in kills}) < args.workers:
                            return False
                        last_kill = max(k["killed_at"] for k in kills)
                        if not any(r.outcome == "ok" and r.proxy == p.index and r.ended > last_kill
                                   for r in load.requests):  # fmt: skip
                            return False
                    return True

                with contextlib.suppress(BenchFailure):  # not recovered in time: reported as missed
                    await until("every affected proxy replaced and serving", args.recover_timeout, recovered)
                await asyncio.sleep(args.after)  # steady load after the recovery
            else:
                await asyncio.sleep(args.stall_window)  # the project lock: nothing must happen
            await load.stop_sending()
            cpu = meter.stop()  # the supervisors' own CPU (while they run), and the machine's
            if not case.watchdog:
                # show the stall (the supervisors' probe timeouts), then stop it: the stuck proxies are
                # stopped, which ends the requests they hold
                after = list(await asyncio.gather(*(scrape(http, p) for p in run.proxies)))
                stopped = await asyncio.to_thread(stop_all, run.proxies)
                await load.stop()
            else:
                await load.stop()
                after = list(await asyncio.gather(*(scrape(http, p) for p in run.proxies)))
        finally:
            await load.stop()
    finally:
        # every path (also a failure) stops every proxy; blocking waits run off the event loop
        stopped_now = await asyncio.to_thread(stop_all, run.proxies)
    if case.watchdog:
        stopped = stopped_now
    result = analyse(run, case, incident_row, load, before, after, stopped, t_trigger, t_ack)
    result["machine"] = {
        "busy_pct": cpu["machine_busy_pct"],
        "supervisors_cpu_cores": cpu["agents_cpu_cores"],
        "bench_cpu_cores": cpu["bench_cpu_cores"],
        **machine_load(),
    }
    return result


def analyse(
    run: Run,
    case: Case,
    incident_row: str,
    load: Load,
    before: list[dict[str, float]],
    after: list[dict[str, float]],
    stopped: list[str],
    t_trigger: float,
    t_ack: float,
) -> dict[str, Any]:
    args = run.args
    per_proxy: list[dict[str, Any]] = []
    result_extra: dict[str, Any] = {}
    classes: dict[int, str] = {}  # id(request) -> ok / in_flight / other
    for p, m0, m1, how in zip(run.proxies, before, after, stopped, strict=True):
        reqs = [r for r in load.requests if r.proxy == p.index]
        kills = p.restarts()
        oks = sorted(r.ended for r in reqs if r.outcome == "ok")
        failed = [r for r in reqs if r.outcome != "ok"]
        first_failure = min((r.sent for r in failed if r.sent >= t_trigger), default=None)
        reference = min((k["detected_at"] for k in kills), default=first_failure)
        # the stall began after the last answer before it (and not before the trigger row was sent)
        stall_began = max([t_trigger, *(e for e in oks if e <= reference)]) if reference is not None else None
        # serving again: the first answer after the watchdog acted (without it, nothing ends the stall)
        serving_again = min((e for e in oks if e > reference), default=None) if kills and reference else None
        in_flight = other = 0
        for r in reqs:
            if r.outcome == "ok":
                classes[id(r)] = "ok"
                continue
            dropped = r.outcome in ("reset", "eof")
            on_stuck = dropped and any(
                r.sent <= k["detected_at"] and k["killed_at"] - KILL_MATCH_WINDOW[0] <= r.ended
                <= k["killed_at"] + KILL_MATCH_WINDOW[1] for k in kills
            )  # fmt: skip
            classes[id(r)] = "in_flight" if on_stuck else "other"
            in_flight += on_stuck
            other += not on_stuck
        probe_timeouts = metric_delta(m0, m1, "verdigris_proxy_probe_timeouts_total")
        restarts_metric = metric_delta(m0, m1, "verdigris_proxy_watchdog_restarts_total")
        after_stall = [r for r in reqs if stall_began is not None and r.sent > stall_began]
        entry: dict[str, Any] = {
            "proxy": p.name,
            "region": p.region,
            "requests": len(reqs),
            "ok": len(oks),
            "failed": len(failed),
            "failed_in_flight": in_flight,
            "failed_other": other,
            "failures_by_outcome": _count(r.outcome for r in failed),
            "stalled": stall_began is not None,
            "stall_began_at_s": _rel(stall_began, t_trigger),
            "restarts": len(kills),
            "workers_replaced": len({k["worker"] for k in kills}),
            "restarts_metric": restarts_metric,
            "probe_timeouts": probe_timeouts,
            "refused_updates": refused_count(m1) - refused_count(m0),
            "stopped_by": how,
            "unanswered_after_stall": sum(r.outcome != "ok" for r in after_stall),
            "ok_after_stall_during_window": sum(
                r.outcome == "ok" and r.ended <= t_trigger + args.stall_window for r in after_stall
            ),
        }
        if kills and stall_began is not None:
            entry["detect_s"] = round(max(k["detected_at"] for k in kills) - stall_began, 3)
            entry["detect_first_s"] = round(min(k["detected_at"] for k in kills) - stall_began, 3)
            entry["detect_supervisor_s"] = max(k["detection_s"] for k in kills)
            entry["detected_at_s"] = _rel(min(k["detected_at"] for k in kills), t_trigger)
            entry["killed_after_detect_s"] = round(max(k["killed_at"] - k["detected_at"] for k in kills), 3)
            # where the time to serve again goes: the replacement's start (a new Python process)
            starts = p.worker_starts()
            respawn = [min((t for t in starts if t >= k["killed_at"]), default=None) for k in kills]
            if all(t is not None for t in respawn):
                entry["respawned_after_kill_s"] = round(
                    max(t - k["killed_at"] for t, k in zip(respawn, kills, strict=True) if t is not None), 3
                )
        if serving_again is not None and stall_began is not None:
            entry["serving_again_s"] = round(serving_again - stall_began, 3)
            entry["serving_again_at_s"] = _rel(serving_again, t_trigger)
        if case.lock == "project":
            refusal = p.refusal()
            entry["refusal_logged"] = bool(refusal)
            entry["refusal_has_stack"] = "LockUpgradeError" in refusal and 'File "' in refusal
            if refusal and "refusal_example" not in result_extra:
                result_extra["refusal_example"] = refusal.splitlines()[:40]
        per_proxy.append(entry)

    ok_all = [r.ended - r.sent for r in load.requests if r.outcome == "ok"]
    result: dict[str, Any] = {
        "case": case.number,
        "title": case.title,
        "scope": case.scope,
        "table_lock": case.lock,
        "watchdog": case.watchdog,
        "incident_row": incident_row,
        "trigger_ack_s": round(t_ack - t_trigger, 4),
        "requests": len(load.requests),
        "failed": sum(e["failed"] for e in per_proxy),
        "failed_in_flight": sum(e["failed_in_flight"] for e in per_proxy),
        "failed_other": sum(e["failed_other"] for e in per_proxy),
        "latency_ok_p50_ms": round(pct(ok_all, 50) * 1000, 2) if ok_all else None,
        "latency_ok_p99_ms": round(pct(ok_all, 99) * 1000, 2) if ok_all else None,
        "max_send_lag_ms": round(load.max_send_lag * 1000, 1),
        "per_proxy": per_proxy,
        **result_extra,
        "proxies": [p.name for p in run.proxies],
        "timeline": [
            [round(r.sent - t_trigger, 4), r.proxy, classes[id(r)], round((r.ended - r.sent) * 1000, 2)]
            for r in load.requests
        ],
    }
    result["targets"] = targets(case, per_proxy, result, args.workers)
    result["target_met"] = all(t["met"] for t in result["targets"].values())
    return result


def _rel(t: float | None, t0: float) -> float | None:
    return None if t is None else round(t - t0, 4)


def _count(xs: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in xs:
        out[x] = out.get(x, 0) + 1
    return out


def targets(
    case: Case, per_proxy: list[dict[str, Any]], result: dict[str, Any], workers: int
) -> dict[str, dict[str, Any]]:
    """The case's targets: name -> {"want": text, "got": text, "met": bool}."""
    t: dict[str, dict[str, Any]] = {}

    def add(name: str, want: str, got: str, met: bool) -> None:
        t[name] = {"want": want, "got": got, "met": bool(met)}

    def stuck(e: dict[str, Any]) -> bool:
        return bool(
            e["stalled"] and e["ok_after_stall_during_window"] == 0 and e["unanswered_after_stall"] > 0
        )

    affected = [e for e in per_proxy if case.scope == "global" or e["region"] == "a"]
    spared = [e for e in per_proxy if e not in affected]
    if case.number == 1:
        add(
            "every_proxy_stalled",
            "no answer after the stall began, within the window",
            f"{sum(map(stuck, per_proxy))}/{len(per_proxy)}; unanswered requests "
            + ", ".join(f"{e['proxy']} {e['unanswered_after_stall']}" for e in per_proxy),
            all(map(stuck, per_proxy)),
        )
        add(
            "probe_timeouts_seen",
            "> 0 on every proxy",
            ", ".join(f"{e['proxy']} {e['probe_timeouts']:.0f}" for e in per_proxy),
            all(e["probe_timeouts"] > 0 for e in per_proxy),
        )
        add(
            "no_restart_without_watchdog",
            "0",
            str(sum(e["restarts"] for e in per_proxy)),
            all(e["restarts"] == 0 for e in per_proxy),
        )
    if case.number in (2, 3):
        add(
            "every_affected_proxy_replaced",
            f"all {workers} workers of every affected proxy",
            ", ".join(f"{e['proxy']} {e['workers_replaced']}" for e in affected),
            bool(affected) and all(e["workers_replaced"] >= workers for e in affected),
        )
        for name, key, bound, want in (
            ("detect_le_1s", "detect_s", TARGET_DETECT_S, "after the stall began (worst worker)"),
            ("serving_again_le_2s", "serving_again_s", TARGET_SERVE_S, "after the stall began"),
        ):
            times = [e.get(key) for e in affected]
            add(
                name, f"≤ {bound:g} s {want}", _worst(times), all(x is not None and x <= bound for x in times)
            )
        add(
            "zero_other_failures",
            "0 failed requests besides the stuck workers' in-flight ones",
            f"{result['failed_other']} (in flight: {result['failed_in_flight']})",
            result["failed_other"] == 0,
        )
    if case.number == 3:
        add(
            "other_regions_untouched",
            "no restart, probe timeout or failure outside region a",
            ", ".join(
                f"{e['proxy']} {e['restarts']}/{e['probe_timeouts']:.0f}/{e['failed']}" for e in spared
            ),
            all(e["restarts"] == 0 and e["probe_timeouts"] == 0 and e["failed"] == 0 for e in spared),
        )
    if case.number == 4:
        add(
            "zero_stalls",
            "no restart, no probe timeout",
            f"{sum(e['restarts'] for e in per_proxy)} restarts, {sum(e['probe_timeouts'] for e in per_proxy):.0f} "
            "probe timeouts",
            all(
                e["restarts"] == 0 and e["restarts_metric"] == 0 and e["probe_timeouts"] == 0
                for e in per_proxy
            ),
        )
        add(
            "update_refused_everywhere",
            "refused (counted) by every proxy, logged with its stack",
            ", ".join(
                f"{e['proxy']} {e['refused_updates']:.0f}{'' if e['refusal_has_stack'] else ' (no stack)'}"
                for e in per_proxy
            ),
            all(e["refused_updates"] >= 1 and e["refusal_has_stack"] for e in per_proxy),
        )
        add("zero_failures", "0 failed requests", str(result["failed"]), result["failed"] == 0)
    return t  # fmt: skip


def _worst(xs: list[Any]) -> str:
    known = [x for x in xs if x is not None]
    missing = len(xs) - len(known)
    text = f"worst {max(known):.3f} s" if known else "none measured"
    return text + (f", {missing} not measured" if missing else "")


async def bring_up(fleet: Fleet, upstreams: list[Upstream], args: argparse.Namespace) -> dict[str, float]:
    started = await fleet.start_all(args.start_timeout)
    a0 = fleet.by_region["a"][0]
    await fleet.write(a0, [
        # no concurrency limits: the backlog a stall leaves must not turn into limit rejections here
        ["INSERT INTO apps (name, org, soft_limit, hard_limit) VALUES (?, 'bench', 0, 0)", [APP]],
        ["INSERT INTO hostnames (hostname, app) VALUES (?, ?)", [HOSTNAME, APP]],
    ])  # fmt: skip
    for up in upstreams:
        first = fleet.by_region[up.region][0]
        sql = "INSERT INTO machines (id, app, region, state, address) VALUES (?, ?, ?, 'started', ?)"
        await fleet.write(first, [[sql, [f"{APP}-{up.region}", APP, up.region, f"{HOST}:{up.port}"]]])

    async def everywhere() -> bool:
        for node in fleet.agents:
            (got,) = await fleet.query(
                node, f"SELECT (SELECT count(*) FROM hostnames WHERE hostname = '{HOSTNAME}'), "
                f"(SELECT count(*) FROM machines WHERE app = '{APP}' AND region = '{node.region}')",
            )  # fmt: skip
            if list(got) != [1, 1]:
                return False
        return True

    await until("the app's rows on every agent", args.start_timeout, everywhere)
    return started


async def measure(args: argparse.Namespace, console: Any) -> dict[str, Any]:
    regions = [chr(ord("a") + r) for r in range(args.regions)]
    procs = GidProcs()
    proxies: list[ProxyNode] = []
    upstreams = [Upstream(r, port) for r, port in zip(regions, free_ports(len(regions)), strict=True)]
    try:
        with workdir("vd-incident-") as root:
            fleet = Fleet(procs, root, regions, args.nodes, region_mode=True)
            async with fleet:
                for up in upstreams:
                    await up.start()
                console.print(f"starting {len(fleet.agents)} agents in {len(regions)} regions (region mode)")
                started = await bring_up(fleet, upstreams, args)
                proxies = [ProxyNode(i, a, root / f"proxy-{a.name}") for i, a in enumerate(fleet.agents)]
                run = Run(fleet, procs, proxies, upstreams, args, f"{os.getpid()}", console)
                cases = []
                for case in CASES:
                    console.print(f"{case.title} ({len(proxies)} proxies × {args.workers} workers, "
                                  f"{args.rate:g} requests/s each)")  # fmt: skip
                    cases.append(await run_case(run, case))
    finally:
        for p in proxies:
            p.kill_group()
        procs.kill_all()
        for up in upstreams:
            await up.close()
    return {"fleet_start": started, "cases": cases}


# ------------------------------------------------------------------------------------------------ output


def _s(x: Any) -> str:
    return "–" if x is None else f"{x:.3f}"


def print_case(console: Any, c: dict[str, Any]) -> None:
    table = Table(
        title=f"{c['title']} — trigger {c['incident_row']} (times in s; stall began: after the trigger; "
        "detect / serve: after the stall began; sup.: the supervisor's own figure, from the unanswered probe)"
    )
    cols = ["proxy", "requests", "failed: in flight", "other", "stall began", "detect", "sup. detect",
            "serving again", "restarts", "probe t/o", "refused", "stopped by"]  # fmt: skip
    for col in cols:
        table.add_column(col, justify="left" if col == "proxy" else "right")
    for e in c["per_proxy"]:
        table.add_row(
            e["proxy"], str(e["requests"]), str(e["failed_in_flight"]), str(e["failed_other"]),
            "–" if e["stall_began_at_s"] is None else f"+{e['stall_began_at_s']:.3f}",
            _s(e.get("detect_s")), _s(e.get("detect_supervisor_s")), _s(e.get("serving_again_s")),
            str(e["restarts"]), f"{e['probe_timeouts']:.0f}", f"{e['refused_updates']:.0f}", e["stopped_by"],
        )  # fmt: skip
    console.print(table)
    t = Table(title=f"case {c['case']}: targets")
    for col in ("target", "want", "got", ""):
        t.add_column(col)
    for name, v in c["targets"].items():
        t.add_row(name, v["want"], v["got"], "met" if v["met"] else "[red]MISSED[/red]")
    console.print(t)
    fails: dict[str, int] = {}
    for e in c["per_proxy"]:
        for k, n in e["failures_by_outcome"].items():
            fails[k] = fails.get(k, 0) + n
    if fails:
        console.print(f"failed requests by outcome: {fails}")
    m = c["machine"]
    console.print(
        f"{c['requests']:,} requests, p50 {c['latency_ok_p50_ms']} ms / p99 {c['latency_ok_p99_ms']} ms (answered "
        f"ones); the load's worst send lag {c['max_send_lag_ms']:.0f} ms; machine {m['busy_pct']:.0f} % busy, "
        f"load {m['loadavg_1m']:.1f}"
    )
    if "refusal_example" in c:
        console.print(
            "the refused update, as proxy " + c["per_proxy"][0]["proxy"] + " logged it (first lines):"
        )
        console.print("\n".join(c["refusal_example"][:14]), markup=False, highlight=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--regions", type=int, default=3, help="regions (default 3)")
    parser.add_argument("--nodes", type=int, default=2, help="nodes (agent + proxy) per region (default 2)")
    parser.add_argument("--workers", type=int, default=2, help="workers per proxy (default 2)")
    parser.add_argument("--rate", type=float, default=40.0, help="requests/s per proxy (default 40)")
    parser.add_argument("--request-timeout", type=float, default=10.0, help="client timeout, s (10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the trigger (2)")
    parser.add_argument(
        "--stall-window",
        type=float,
        default=4.0,
        help="seconds cases 1 and 4 are observed after the trigger (4)",
    )
    parser.add_argument(
        "--recover-timeout", type=float, default=20.0, help="bound on the recovery in cases 2 and 3, s (20)"
    )
    parser.add_argument("--after", type=float, default=2.0, help="seconds of load after the recovery (2)")
    parser.add_argument("--probe-interval", type=float, default=0.25, help="[proxy] probe_interval (0.25)")
    parser.add_argument("--probe-deadline", type=float, default=1.0, help="[proxy] probe_deadline (1.0)")
    parser.add_argument("--start-timeout", type=float, default=90.0, help="bound on every start-up, s (90)")
    parser.add_argument("--quick", action="store_true", help="2 regions × 1 node, 1 worker, short windows")
    add_results_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.regions, args.nodes, args.workers, args.rate = 2, 1, 1, 20.0
        args.warmup, args.stall_window, args.after = 1.0, 2.5, 1.0
    if not 2 <= args.regions <= 6 or not 1 <= args.nodes <= 4 or not 1 <= args.workers <= 4:
        parser.error("--regions 2..6, --nodes 1..4, --workers 1..4")
    if args.rate <= 0 or args.rate > 500 or args.request_timeout <= 0:
        parser.error("--rate in (0, 500] requests/s per proxy, --request-timeout > 0")
    if min(args.warmup, args.stall_window, args.after, args.recover_timeout) <= 0:
        parser.error("--warmup, --stall-window, --after and --recover-timeout must be > 0")
    if not 0 < args.probe_interval < args.probe_deadline:
        parser.error("need 0 < --probe-interval < --probe-deadline")
    # every request is a socket, and requests to a stuck proxy pile up until their timeout
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    console = make_console()
    if not console.is_terminal:
        console = Console(width=170)  # the per-proxy tables are wide
    try:
        result = asyncio.run(measure(args, console))
    except BenchFailure as e:
        console.print(f"[red]FAILED[/red]: {e}")
        return 1
    cases = result["cases"]
    for c in cases:
        print_case(console, c)
    summary = {
        c["case"]: {
            "target_met": c["target_met"],
            "detect_s_max": max((e["detect_s"] for e in c["per_proxy"] if "detect_s" in e), default=None),
            "serving_again_s_max": max(
                (e["serving_again_s"] for e in c["per_proxy"] if "serving_again_s" in e), default=None
            ),
            "failed_in_flight": c["failed_in_flight"],
            "failed_other": c["failed_other"],
            "restarts": sum(e["restarts"] for e in c["per_proxy"]),
        }
        for c in cases
    }
    console.print("summary: " + "; ".join(
        f"case {k}: {'met' if v['target_met'] else 'MISSED'}" for k, v in summary.items()
    ))  # fmt: skip
    payload = {
        "bench": "incident",
        **environment(),
        "quick": args.quick,
        "regions": args.regions,
        "nodes_per_region": args.nodes,
        "workers": args.workers,
        "rate_per_proxy": args.rate,
        "request_timeout_s": args.request_timeout,
        "probe_interval_s": args.probe_interval,
        "probe_deadline_s": args.probe_deadline,
        "stall_began_resolution_s": round(1 / args.rate, 4),
        "targets_s": {"detect": TARGET_DETECT_S, "serving_again": TARGET_SERVE_S},
        "fleet_start": result["fleet_start"],
        "summary": summary,
        "target_met": all(c["target_met"] for c in cases),
        "cases": cases,
    }
    console.print(f"figures saved to {save_results(payload, args.results)} (with every request's timeline)")
    # stdout's last line without the per-request timelines (thousands of entries): they are in the file
    emit_json({**payload, "cases": [{k: v for k, v in c.items() if k != "timeline"} for c in cases]})
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
