"""The Verdigris edge proxy beside nginx and HAProxy, same run, same backend (issue 4).

One backend, nginx serving two fixed bodies (``/small``: 13 bytes, ``/16k``: 16 KiB) with keep-alive, and
four targets measured with ``wrk`` in interleaved repetitions:

* **direct** — wrk straight to the backend (the ceiling of this set-up);
* **nginx** — ``proxy_pass`` to an ``upstream`` with ``keepalive``, ``proxy_http_version 1.1``;
* **haproxy** — ``mode http``, ``http-reuse always``;
* **verdigris** — ``verdigris proxy`` fed by a real ``verdigris agent`` (``schemas/platform.sql``; the app,
  its host name and one machine pointing at the backend are written through the agent's HTTP API), so
  every request takes the full routing path: Host → app → balancer (slot) → upstream pool.

Placement (2 cores): each proxy runs one worker pinned alone to core 0 (nginx ``worker_processes 1``,
HAProxy ``nbthread 1``, Verdigris ``workers = 1``); wrk, the backend, the agent and this script are pinned
to core 1. wrk sends ``Host: bench.test`` to every target. Upstream keep-alive is on everywhere with room
for every connection (nginx ``keepalive 64``, Verdigris ``pool_idle = 64``, HAProxy's idle pool is
unbounded), and the backend's ``stub_status`` counts the connections each run opened to it.

Per run: requests/s, wrk's latency percentiles (``--latency``: 50/75/90/99 %), the proxy's CPU time from
``/proc/PID/stat`` (utime / stime, summed over its processes: nginx master + worker, HAProxy's process,
Verdigris's worker processes — not the supervisor nor the agent) divided by the requests → µs per request
user / kernel, and how busy each core was (``/proc/stat``). Reported: the median over the repetitions with
min–max, and ratios to nginx. Targets (issue 4): Verdigris ≥ 0.65× nginx's requests/s on small responses,
≤ 1.15× nginx's CPU per request on 16 KiB responses (there the wrk + backend core saturates first, so
requests/s do not rank the proxies), p99 ≤ 1.5× nginx's (both sizes).

Then a **two-worker** run for reference: nginx ``worker_processes 2``, HAProxy ``nbthread 2`` and Verdigris
``workers = 2`` allowed on both cores, while wrk and the backend stay on core 1 (so the proxies share core 1
with the load: it shows what a second worker buys on a 2-core machine, not the capacity of two free
cores).

Checks (else ``FAILED``, exit 1, no JSON): every target answers the exact bodies before the runs (and
Verdigris with its ``via``); wrk reports no non-2xx answer and no socket error; every request wrk counted
reached the backend (its request counter); the bytes wrk read per request cover the body.

    .venv/bin/python bench/proxy_vs_nginx.py              # 3 × (2 sizes × 4 targets) × 10 s, + 2 workers
    .venv/bin/python bench/proxy_vs_nginx.py --quick      # 1 × 1 s each, 2 workers on small only
    .venv/bin/python bench/proxy_vs_nginx.py --pyspy /tmp/proxy.raw   # + a py-spy profile of the worker
    .venv/bin/python bench/proxy_vs_nginx.py --pyspy /tmp/proxy.raw --pyspy-native   # C frames too

Needs the Debian packages ``wrk nginx haproxy`` (and ``taskset``, util-linux). Only 127.0.0.1 is used;
every process runs in a session of its own and is stopped (SIGTERM, then SIGKILL to its process group) at
the end, also on Ctrl-C / SIGTERM. A run killed with SIGKILL takes its direct children with it
(``PR_SET_PDEATHSIG``) but nginx workers outlive their master: the next run kills those first (they name a
temporary directory ``vd-proxybench-<pid>-*`` whose benchmark process is gone). The last line of stdout is
one line of JSON with every figure, also saved to ``bench/results/proxy_vs_nginx.json`` (``--results DIR``)
for ``bench/plot.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from _cluster import Procs, free_ports, log_tail, run_guarded
from _results import add_results_argument, save_results
from _util import BenchFailure, emit_json, environment, make_console, median
from verdigris.proxy.worker import worker_pids

ROOT = Path(__file__).resolve().parent.parent
PLATFORM_SQL = ROOT / "schemas" / "platform.sql"
HOST = "127.0.0.1"
BENCH_HOST = "bench.test"
SMALL_BODY = b"Hello, world\n"
BODIES: dict[str, bytes] = {"small": SMALL_BODY, "16k": bytes(65 + i % 26 for i in range(16384))}
TARGET_RPS_RATIO = 0.65
TARGET_CPU_RATIO = 1.15
TARGET_P99_RATIO = 1.5
POOL = 64
"""Upstream keep-alive connections allowed per proxy (more than wrk's connections: no churn)."""
WAIT = 30.0
CLK_TCK = os.sysconf("SC_CLK_TCK")

REQUIRED = ("wrk", "nginx", "haproxy", "taskset")
MARK_DIR = "VD_PROXYBENCH_DIR"
"""An environment variable every process of a run carries: the run's temporary directory."""


def tool(name: str) -> str | None:
    """The path of a command; also in /usr/sbin and /sbin, where Debian puts nginx and haproxy (not on a
    normal user's PATH)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def missing_tools() -> list[str]:
    """The commands this benchmark needs that are not installed."""
    return [t for t in REQUIRED if tool(t) is None]


def _exe(name: str) -> str:
    path = tool(name)
    if path is None:
        raise BenchFailure(f"{name} is not installed")
    return path


# ------------------------------------------------------------------------------------------------ processes


class Services:
    """The processes of the run. Each is started in a session of its own (so its process group id is its
    pid) and is stopped as a group: SIGTERM, then SIGKILL after a bounded wait."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs = Procs()
        self.logs: dict[int, Path] = {}

    def start(self, name: str, argv: list[str], cpus: Sequence[int]) -> subprocess.Popen[bytes]:
        log = self.tmp / f"{name}.log"
        cpu_list = ",".join(str(c) for c in cpus)
        env = {**os.environ, MARK_DIR: str(self.tmp)}  # marks the run's processes (see run_marks)
        proc = self.procs.start([_exe("taskset"), "-c", cpu_list, *argv], log, env=env)
        self.logs[proc.pid] = log
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)  # the group of a process we started (start_new_session)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
            # the leader is gone; any member left (a worker) gets the same signal once more
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            break
        if proc in self.procs.procs:
            self.procs.procs.remove(proc)

    def tail(self, proc: subprocess.Popen[bytes]) -> str:
        return log_tail(self.logs.get(proc.pid, self.tmp / "none"), 15)

    def close(self) -> None:
        for p in list(reversed(self.procs.procs)):
            self.stop(p, timeout=5.0)


def http_get(
    port: int, path: str, host: str = BENCH_HOST, timeout: float = 2.0
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://{HOST}:{port}{path}", headers={"Host": host})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def wait_until(
    what: str, check: Callable[[], bool], proc: subprocess.Popen[bytes] | None, services: Services
) -> None:
    deadline = time.monotonic() + WAIT
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchFailure(f"{what}: the process exited with {proc.returncode}:\n{services.tail(proc)}")
        try:
            if check():
                return
        except (OSError, urllib.error.URLError, ValueError) as e:
            last = e
        time.sleep(0.05)
    log = f"; its log ends:\n{services.tail(proc)}" if proc is not None else ""
    raise BenchFailure(f"timed out after {WAIT:.0f} s waiting for {what} (last: {last!r}){log}")


def serves_bodies(port: int, *, via: str | None = None) -> Callable[[], bool]:
    def check() -> bool:
        for name, body in BODIES.items():
            status, headers, got = http_get(port, f"/{name}")
            if status != 200 or got != body:
                return False
            if via is not None and via not in headers.get("via", ""):
                raise BenchFailure(f"the answer did not come through the proxy (via: {headers.get('via')!r})")
        return True

    return check


# ------------------------------------------------------------------------------------------------ configs

_NGINX_COMMON = """\
{user}worker_processes {workers};
pid {tmp}/{name}.pid;
error_log {tmp}/{name}.err warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/{name}-body;
    proxy_temp_path {tmp}/{name}-proxy;
    fastcgi_temp_path {tmp}/{name}-fastcgi;
    uwsgi_temp_path {tmp}/{name}-uwsgi;
    scgi_temp_path {tmp}/{name}-scgi;
    types {{ }}
    default_type text/plain;
    sendfile on;
    tcp_nodelay on;
    keepalive_timeout 300s;
    keepalive_requests 100000000;
{body}
}}
"""


def nginx_backend_conf(tmp: Path, port: int) -> str:
    body = f"""\
    open_file_cache max=16 inactive=600s;
    server {{
        listen {HOST}:{port} backlog=4096;
        root {tmp}/www;
        location = /status {{ stub_status; }}
        location / {{ }}
    }}"""
    return _NGINX_COMMON.format(
        user=_nginx_user(),
        workers=1,
        tmp=tmp,
        name="backend",
        body=body,
    )


def nginx_proxy_conf(tmp: Path, name: str, port: int, backend: int, workers: int) -> str:
    body = f"""\
    upstream backend {{
        server {HOST}:{backend};
        keepalive {POOL};
        keepalive_requests 100000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen {HOST}:{port} backlog=4096;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}"""
    return _NGINX_COMMON.format(
        user=_nginx_user(),
        workers=workers,
        tmp=tmp,
        name=name,
        body=body,
    )


def _nginx_user() -> str:
    # As root nginx would switch its workers to nobody, who cannot read the private temp directory.
    return "user root;\n" if os.geteuid() == 0 else ""


def haproxy_conf(port: int, backend: int, threads: int) -> str:
    return f"""\
global
    nbthread {threads}
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 300s
    timeout server 300s
    timeout http-keep-alive 300s
    http-reuse always
frontend fe
    bind {HOST}:{port}
    default_backend be
backend be
    server b1 {HOST}:{backend}
"""


def agent_conf(tmp: Path, port: int) -> str:
    return (
        f'[db]\npath = "{tmp}/agent.db"\nschema_paths = ["{PLATFORM_SQL}"]\n'
        f'[api]\naddr = "{HOST}:{port}"\n[admin]\npath = "{tmp}/admin.sock"\n[log]\nlevel = "warning"\n'
    )


def verdigris_conf(port: int, agent_port: int, workers: int) -> str:
    return (
        f'[proxy]\nlisten = "{HOST}:{port}"\nworkers = {workers}\nagent = "http://{HOST}:{agent_port}"\n'
        f'region = "ams"\npool_idle = {POOL}\n'
    )


# ------------------------------------------------------------------------------------------------ /proc


def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    """Live child processes of ``pid``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if int(_stat_fields(int(d.name))[1]) == pid:
                out.append(int(d.name))
        except (OSError, IndexError, ValueError):
            continue
    return sorted(out)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def run_marks(pid: int) -> set[int]:
    """The benchmark runs (their owner pids) that process ``pid`` belongs to: the run's temporary
    directory, ``vd-proxybench-<owner pid>-...``, in its environment (:data:`MARK_DIR`), command line or
    open files. nginx overwrites its workers' environment and command line (process titles), so for those
    the open log files tell."""
    texts: list[str] = []
    with contextlib.suppress(OSError):
        texts.append(Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace"))
    texts.append(cmdline(pid))
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                texts.append(os.readlink(fd))
    return {int(m) for t in texts for m in re.findall(r"vd-proxybench-(\d+)-", t)}


def reap_stale() -> int:
    """Kill (SIGKILL, by pid) the processes left by an earlier run of this benchmark that was itself
    killed with SIGKILL (nginx workers outlive their master): they belong to a run whose benchmark
    process is gone. Returns how many."""
    killed = 0
    me = os.getpid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        owners = run_marks(int(d.name))
        if not owners or any("proxy_vs_nginx" in cmdline(o) for o in owners):
            continue  # not ours, or its benchmark is still running
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(d.name), signal.SIGKILL)
            killed += 1
    return killed


def cpu_ticks(pids: Sequence[int]) -> tuple[int, int]:
    """(utime, stime) in clock ticks, summed over ``pids``."""
    u = s = 0
    for pid in pids:
        try:
            f = _stat_fields(pid)
        except OSError:
            raise BenchFailure(f"process {pid} of the proxy is gone (a worker restarted?)") from None
        u += int(f[11])
        s += int(f[12])
    return u, s


def core_ticks() -> dict[int, tuple[int, int]]:
    """Per core: (busy, total) ticks since boot."""
    out: dict[int, tuple[int, int]] = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *vals = line.split()
            nums = [int(v) for v in vals[:8]]
            idle = nums[3] + nums[4]
            out[int(name[3:])] = (sum(nums) - idle, sum(nums))
    return out


def backend_counters(port: int) -> tuple[int, int]:
    """(connections accepted, requests) of the backend, from its ``stub_status``."""
    status, _, body = http_get(port, "/status", host="localhost")
    if status != 200:
        raise BenchFailure(f"backend stub_status answered {status}")
    lines = body.decode().splitlines()
    accepts, _handled, requests = (int(x) for x in lines[2].split())
    return accepts, requests


# ------------------------------------------------------------------------------------------------ wrk

_UNITS_S = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_UNITS_B = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def parse_wrk(out: str) -> dict[str, Any]:
    """Requests/s, requests, bytes, latency percentiles (ms) and errors from ``wrk --latency`` output."""
    res: dict[str, Any] = {"non_2xx": 0, "socket_errors": 0}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None:
        raise BenchFailure(f"no Requests/sec in wrk's output:\n{out}")
    res["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+), ([\d.]+)(\w+) read", out)
    if m is None:
        raise BenchFailure(f"no request count in wrk's output:\n{out}")
    res["requests"] = int(m.group(1))
    res["bytes"] = float(m.group(4)) * _UNITS_B[m.group(5)]
    for p, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", out, re.MULTILINE):
        res[f"p{p}_ms"] = float(value) * _UNITS_S[unit] * 1000
    if "p99_ms" not in res:
        raise BenchFailure(f"no latency distribution in wrk's output:\n{out}")
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if m:
        res["non_2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        res["socket_errors"] = sum(int(x) for x in m.groups())
    return res


# ------------------------------------------------------------------------------------------------ the bench


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen[bytes] | None
    """None for ``direct``."""
    cpu_pids: list[int] = field(default_factory=list)
    """The processes whose CPU counts as the proxy's."""


class Bench:
    def __init__(
        self, tmp: Path, services: Services, args: argparse.Namespace, proxy_cpu: int, load_cpu: int
    ) -> None:
        self.tmp = tmp
        self.services = services
        self.args = args
        self.proxy_cpu = proxy_cpu
        self.load_cpu = load_cpu
        self.backend_port = 0
        self.agent_port = 0
        self.agent: subprocess.Popen[bytes] | None = None

    # ---------------------------------------------------------------------------- set-up

    def start_backend(self) -> Target:
        www = self.tmp / "www"
        www.mkdir()
        for name, body in BODIES.items():
            (www / name).write_bytes(body)
        (self.backend_port,) = free_ports(1)
        conf = self.tmp / "backend.conf"
        conf.write_text(nginx_backend_conf(self.tmp, self.backend_port))
        proc = self.services.start(
            "backend",
            [_exe("nginx"), "-e", str(self.tmp / "backend.err"), "-c", str(conf), "-g", "daemon off;"],
            [self.load_cpu],
        )
        wait_until("the backend nginx", serves_bodies(self.backend_port), proc, self.services)
        return Target("direct", self.backend_port, None)

    def start_nginx(self, workers: int, cpus: Sequence[int]) -> Target:
        (port,) = free_ports(1)
        name = f"nginx{workers}"
        conf = self.tmp / f"{name}.conf"
        conf.write_text(nginx_proxy_conf(self.tmp, name, port, self.backend_port, workers))
        proc = self.services.start(
            name,
            [_exe("nginx"), "-e", str(self.tmp / f"{name}.err"), "-c", str(conf), "-g", "daemon off;"],
            cpus,
        )
        wait_until(f"nginx ({workers} workers)", serves_bodies(port), proc, self.services)
        pids = [proc.pid, *children(proc.pid)]
        if len(pids) != workers + 1:
            raise BenchFailure(f"nginx has {len(pids) - 1} workers, expected {workers}")
        return Target("nginx", port, proc, pids)

    def start_haproxy(self, threads: int, cpus: Sequence[int]) -> Target:
        (port,) = free_ports(1)
        conf = self.tmp / f"haproxy{threads}.cfg"
        conf.write_text(haproxy_conf(port, self.backend_port, threads))
        proc = self.services.start(f"haproxy{threads}", [_exe("haproxy"), "-f", str(conf), "-db"], cpus)
        wait_until(f"haproxy ({threads} threads)", serves_bodies(port), proc, self.services)
        return Target("haproxy", port, proc, [proc.pid])

    def start_agent(self) -> None:
        (self.agent_port,) = free_ports(1)
        conf = self.tmp / "agent.toml"
        conf.write_text(agent_conf(self.tmp, self.agent_port))
        self.agent = self.services.start(
            "agent", [sys.executable, "-m", "verdigris.cli", "agent", "-c", str(conf)], [self.load_cpu]
        )

        def healthy() -> bool:
            return http_get(self.agent_port, "/v1/health", host=HOST)[0] == 200

        wait_until("the agent", healthy, self.agent, self.services)
        statements = [
            ["INSERT INTO apps (name, org, soft_limit, hard_limit) VALUES (?, ?, 0, 0)", ["bench", "o"]],
            ["INSERT INTO hostnames (hostname, app) VALUES (?, ?)", [BENCH_HOST, "bench"]],
            [
                "INSERT INTO machines (id, app, region, state, address) VALUES (?, ?, 'ams', 'started', ?)",
                ["m1", "bench", f"{HOST}:{self.backend_port}"],
            ],
        ]
        req = urllib.request.Request(
            f"http://{HOST}:{self.agent_port}/v1/transactions",
            json.dumps(statements).encode(),
            {"content-type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=WAIT) as resp:
                resp.read()
        except urllib.error.HTTPError as e:
            raise BenchFailure(f"the agent refused the rows: HTTP {e.code}: {e.read()[:500]!r}") from None

    def start_verdigris(self, workers: int, cpus: Sequence[int]) -> Target:
        (port,) = free_ports(1)
        conf = self.tmp / f"verdigris{workers}.toml"
        conf.write_text(verdigris_conf(port, self.agent_port, workers))
        proc = self.services.start(
            f"verdigris{workers}", [sys.executable, "-m", "verdigris.cli", "proxy", "-c", str(conf)], cpus
        )
        wait_until(
            f"verdigris ({workers} workers) to route",
            serves_bodies(port, via="verdigris"),
            proc,
            self.services,
        )
        pids: list[int] = []
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            pids = worker_pids(proc.pid)
            if len(pids) == workers:
                break
            time.sleep(0.05)
        if len(pids) != workers:
            raise BenchFailure(f"verdigris has {len(pids)} worker processes, expected {workers}")
        # every worker must be routing (they share one accept queue): a few fresh connections each
        wait_until(
            "every verdigris worker to route",
            lambda: all(serves_bodies(port, via="verdigris")() for _ in range(8 * workers)),
            proc,
            self.services,
        )
        return Target("verdigris", port, proc, pids)

    # ---------------------------------------------------------------------------- one run

    def wrk(self, target: Target, size: str, seconds: int, *, measure: bool = True) -> dict[str, Any]:
        a = self.args
        argv = [
            _exe("taskset"), "-c", str(self.load_cpu), _exe("wrk"), f"-t{a.threads}", f"-c{a.connections}",
            f"-d{seconds}s", "--timeout", "10s", "--latency", "-H", f"Host: {BENCH_HOST}",
            f"http://{HOST}:{target.port}/{size}",
        ]  # fmt: skip
        cpu0 = cpu_ticks(target.cpu_pids)
        cores0 = core_ticks()
        conns0, reqs0 = backend_counters(self.backend_port)
        t0 = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
        wall = time.monotonic() - t0
        conns1, reqs1 = backend_counters(self.backend_port)
        cores1 = core_ticks()
        cpu1 = cpu_ticks(target.cpu_pids)
        if proc.returncode != 0:
            raise BenchFailure(
                f"wrk against {target.name} exited with {proc.returncode}: {proc.stderr.strip()}"
            )
        if target.proc is not None and target.proc.poll() is not None:
            raise BenchFailure(f"{target.name} died during the run:\n{self.services.tail(target.proc)}")
        r = parse_wrk(proc.stdout)
        if not measure:
            return r
        where = f"{target.name}, /{size}"
        if r["non_2xx"] or r["socket_errors"]:
            raise BenchFailure(
                f"{where}: {r['non_2xx']} non-2xx answers, {r['socket_errors']} socket errors\n{proc.stdout}"
            )
        reached = reqs1 - reqs0 - 1  # minus the first status request itself
        if reached < r["requests"]:
            raise BenchFailure(
                f"{where}: wrk counted {r['requests']} answers, the backend saw {reached} requests"
            )
        if r["bytes"] < r["requests"] * len(BODIES[size]) * 0.99:  # wrk rounds to 2 decimals
            raise BenchFailure(f"{where}: {r['bytes']:.0f} bytes read for {r['requests']} requests")
        n = max(1, r["requests"])
        du, ds = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
        busy = {}
        for core in (self.proxy_cpu, self.load_cpu):
            b0, t0_ = cores0[core]
            b1, t1_ = cores1[core]
            busy[core] = round(100 * (b1 - b0) / max(1, t1_ - t0_), 1)
        out: dict[str, Any] = {
            "rps": round(r["rps"], 1),
            "requests": r["requests"],
            "p50_ms": round(r["p50_ms"], 4),
            "p75_ms": round(r["p75_ms"], 4),
            "p90_ms": round(r["p90_ms"], 4),
            "p99_ms": round(r["p99_ms"], 4),
            "bytes_per_request": round(r["bytes"] / n, 1),
            "upstream_connections_opened": max(0, conns1 - conns0 - 1) if target.name != "direct" else None,
            "proxy_core_busy_pct": busy[self.proxy_cpu],
            "load_core_busy_pct": busy[self.load_cpu],
            "wall_s": round(wall, 2),
        }
        if target.cpu_pids:
            out |= {
                "cpu_user_us": round(du / CLK_TCK / n * 1e6, 3),
                "cpu_kernel_us": round(ds / CLK_TCK / n * 1e6, 3),
                "cpu_us": round((du + ds) / CLK_TCK / n * 1e6, 3),
                "proxy_cpu_cores": round((du + ds) / CLK_TCK / wall, 3),
            }
        return out


METRICS = ("rps", "p50_ms", "p90_ms", "p99_ms", "cpu_user_us", "cpu_kernel_us", "cpu_us")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    s: dict[str, Any] = {"runs": runs}
    for k in METRICS:
        xs = [r[k] for r in runs if r.get(k) is not None]
        if xs:
            s[k] = {"median": round(median(xs), 4), "min": min(xs), "max": max(xs)}
    return s


def run_matrix(
    bench: Bench,
    targets: list[Target],
    sizes: Sequence[str],
    repeats: int,
    seconds: int,
    console: Any,
    label: str,
) -> dict[str, dict[str, Any]]:
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {s: {t.name: [] for t in targets} for s in sizes}
    for rep in range(repeats):
        for size in sizes:
            for t in targets:
                r = bench.wrk(t, size, seconds)
                runs[size][t.name].append(r)
                cpu = f", {r['cpu_us']:.1f} µs CPU/req" if "cpu_us" in r else ""
                console.print(
                    f"{label} rep {rep + 1}/{repeats} /{size:<5} {t.name:<9} {r['rps']:>9,.0f} req/s "
                    f"p99 {r['p99_ms']:.2f} ms{cpu}"
                )
    return {s: {name: summarise(rs) for name, rs in by.items()} for s, by in runs.items()}


def _mmm(x: dict[str, Any] | None, fmt: str) -> str:
    if x is None:
        return "–"
    return (
        f"{x['median']:{fmt}} ({x['min']:{fmt}}–{x['max']:{fmt}})"
        if x["min"] != x["max"]
        else f"{x['median']:{fmt}}"
    )


def ratio(results: dict[str, Any], name: str, metric: str) -> float | None:
    a, b = results.get(name, {}).get(metric), results.get("nginx", {}).get(metric)
    if a is None or b is None or not b["median"]:
        return None
    return round(float(a["median"]) / float(b["median"]), 3)


def table_for(title: str, results: dict[str, dict[str, Any]]) -> Table:
    table = Table(title=title)
    cols = ["size", "target", "req/s (min–max)", "×nginx", "p50 ms", "p99 ms (min–max)", "×nginx",
            "CPU µs/req user", "kernel", "total (min–max)", "×nginx", "up conns", "busy % proxy/load core"]  # fmt: skip
    for c in cols:
        table.add_column(c, justify="left" if c in ("size", "target") else "right")
    for size, by in results.items():
        for name, s in by.items():
            runs = s["runs"]
            conns = [r["upstream_connections_opened"] for r in runs]
            busy = "/".join(
                f"{median([r[k] for r in runs]):.0f}" for k in ("proxy_core_busy_pct", "load_core_busy_pct")
            )
            rr, pr, cr = ratio(by, name, "rps"), ratio(by, name, "p99_ms"), ratio(by, name, "cpu_us")
            table.add_row(
                size,
                name,
                _mmm(s.get("rps"), ",.0f"),
                _num(rr, ".2f"),
                _num(s["p50_ms"]["median"], ".2f"),
                _mmm(s.get("p99_ms"), ".2f"),
                _num(pr, ".2f"),
                _num(s["cpu_user_us"]["median"] if "cpu_user_us" in s else None, ".1f"),
                _num(s["cpu_kernel_us"]["median"] if "cpu_kernel_us" in s else None, ".1f"),
                _mmm(s.get("cpu_us"), ".1f"),
                _num(cr, ".2f"),
                "–" if conns[0] is None else "/".join(str(c) for c in conns),
                busy,
            )
    return table


def _num(x: float | None, fmt: str) -> str:
    return "–" if x is None else f"{x:{fmt}}"


def ratios_of(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    return {
        size: {
            f"{name}_{m}_vs_nginx": ratio(by, name, m)
            for name in ("direct", "haproxy", "verdigris")
            for m in ("rps", "cpu_us", "p99_ms")
            if name in by
        }
        for size, by in results.items()
    }


def profile(bench: Bench, target: Target, out: Path, seconds: int, console: Any, *, native: bool) -> str:
    """py-spy on the (single) Verdigris worker during an extra wrk run on /small; the summary's text."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists():
        raise BenchFailure("--pyspy needs py-spy (.venv/bin/pip install py-spy)")
    (worker,) = target.cpu_pids[:1]
    argv = [_exe("taskset"), "-c", str(bench.load_cpu), pyspy, "record", "-p", str(worker), "-r", "250",
            "-f", "raw", "-o", str(out), "-d", str(seconds + 1), *(["--native"] if native else [])]  # fmt: skip
    log = bench.tmp / "py-spy.log"
    with log.open("wb") as f:
        spy = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        time.sleep(0.5)
        r = bench.wrk(target, "small", seconds, measure=False)
        spy.wait(timeout=seconds + 30)
    finally:
        if spy.poll() is None:
            os.killpg(spy.pid, signal.SIGINT)
            try:
                spy.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(spy.pid, signal.SIGKILL)
                spy.wait(5)
    if spy.returncode != 0 or not out.exists():
        raise BenchFailure(f"py-spy failed ({spy.returncode}): {log_tail(log, 10)}")
    console.print(f"py-spy run: {r['rps']:,.0f} req/s while sampled (not a figure); profile in {out}")
    summary = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("pyspy_summary.py")),
            str(out),
            "--under",
            "worker_main",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return summary.stdout + summary.stderr


def versions() -> dict[str, str]:
    def first(argv: list[str]) -> str:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        return (p.stdout + p.stderr).strip().splitlines()[0] if (p.stdout + p.stderr).strip() else "?"

    return {
        "nginx": first([_exe("nginx"), "-v"]),
        "haproxy": first([_exe("haproxy"), "-v"]),
        "wrk": first([_exe("wrk"), "-v"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions (default 3)")
    parser.add_argument("--seconds", type=int, default=10, help="seconds per wrk run (default 10)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument("--no-two-workers", action="store_true", help="skip the two-worker run")
    parser.add_argument(
        "--pyspy", type=Path, help="also profile the Verdigris worker with py-spy (raw output)"
    )
    parser.add_argument("--pyspy-native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 × 1 s per run, no warm-up")
    add_results_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.seconds = 1, 1
    console = make_console()
    if not console.is_terminal:
        console = Console(width=200)
    missing = missing_tools()
    if missing:
        console.print(
            f"[red]FAILED[/red]: not installed: {' '.join(missing)} (Debian: apt-get install -y wrk nginx haproxy)"
        )
        return 1
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        console.print("[red]FAILED[/red]: needs two cores (one for the proxy, one for wrk and the backend)")
        return 1
    proxy_cpu, load_cpu = cpus[0], cpus[1]
    os.sched_setaffinity(0, {load_cpu})  # this script stays off the proxy's core
    stale = reap_stale()
    if stale:
        console.print(f"killed {stale} processes left by an earlier run that was killed")
    sizes = list(BODIES)
    with tempfile.TemporaryDirectory(prefix=f"vd-proxybench-{os.getpid()}-") as tmp_s:
        tmp = Path(tmp_s)
        services = Services(tmp)
        try:
            bench = Bench(tmp, services, args, proxy_cpu, load_cpu)
            direct = bench.start_backend()
            bench.start_agent()
            one = [proxy_cpu]
            targets = [
                direct,
                bench.start_nginx(1, one),
                bench.start_haproxy(1, one),
                bench.start_verdigris(1, one),
            ]
            if not args.quick:
                for t in targets:  # warm-up: upstream connections opened, caches filled
                    for size in sizes:
                        bench.wrk(t, size, 1, measure=False)
            results = run_matrix(bench, targets, sizes, args.repeats, args.seconds, console, "1 worker")
            pyspy_text = ""
            if args.pyspy is not None:
                pyspy_text = profile(
                    bench, targets[3], args.pyspy, max(args.seconds, 10), console, native=args.pyspy_native
                )
            for t in targets[1:]:
                assert t.proc is not None
                services.stop(t.proc)
            two: dict[str, dict[str, Any]] = {}
            if not args.no_two_workers:
                both = [proxy_cpu, load_cpu]
                targets2 = [
                    bench.start_nginx(2, both),
                    bench.start_haproxy(2, both),
                    bench.start_verdigris(2, both),
                ]
                if not args.quick:
                    for t in targets2:
                        for size in sizes:
                            bench.wrk(t, size, 1, measure=False)
                sizes2 = ["small"] if args.quick else sizes
                two = run_matrix(bench, targets2, sizes2, args.repeats, args.seconds, console, "2 workers")
        except BenchFailure as e:
            console.print(f"[red]FAILED[/red]: {e}")
            return 1
        finally:
            services.close()
    load = environment()
    console.print(
        table_for(
            f"1 worker pinned to core {proxy_cpu}; wrk (-t{args.threads} -c{args.connections}, {args.seconds} s) "
            f"and backend on core {load_cpu}; median (min–max) of {args.repeats}; load {load['loadavg_1m']}",
            results,
        )
    )
    if two:
        console.print(table_for("2 workers / threads on both cores (wrk and backend still on core 1)", two))
    if pyspy_text:
        console.print(pyspy_text)
    ratios = ratios_of(results)
    rps_ok = (ratios["small"]["verdigris_rps_vs_nginx"] or 0) >= TARGET_RPS_RATIO
    cpu_ok = (ratios["16k"]["verdigris_cpu_us_vs_nginx"] or 1e9) <= TARGET_CPU_RATIO
    p99_ok = all((ratios[s]["verdigris_p99_ms_vs_nginx"] or 1e9) <= TARGET_P99_RATIO for s in sizes)
    targets_met = {
        f"small_rps_ge_{TARGET_RPS_RATIO}x_nginx": rps_ok,
        f"16k_cpu_le_{TARGET_CPU_RATIO}x_nginx": cpu_ok,
        f"p99_le_{TARGET_P99_RATIO}x_nginx": p99_ok,
    }
    console.print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in targets_met.items()))
    payload = {
        "bench": "proxy_vs_nginx",
        **load,
        "quick": args.quick,
        "repeats": args.repeats,
        "seconds": args.seconds,
        "wrk": {"threads": args.threads, "connections": args.connections},
        "body_bytes": {k: len(v) for k, v in BODIES.items()},
        "placement": {"proxy_core": proxy_cpu, "load_core": load_cpu},
        "versions": versions(),
        "results": results,
        "ratios": ratios,
        "two_workers": {"results": two, "ratios": ratios_of(two)} if two else None,
        "targets": targets_met,
        "target_met": all(targets_met.values()),
    }
    console.print(f"figures saved to {save_results(payload, args.results)}")
    emit_json(payload)
    return 0


if __name__ == "__main__":
    sys.exit(run_guarded(main))
