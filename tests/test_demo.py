"""``verdigris demo`` end to end, and its pieces.

ONE fleet for the module (the default 3 regions × 3 nodes: 27 processes plus instances and proxy
workers; its start-up dominates): the module fixture runs ``verdigris demo --status-file`` from a fresh
temp dir and times it until the status file appears. The tests then drive the sample apps through every
proxy, check that a write made in another region lands in the primary one, wake the scaled-to-zero app,
and finally (the last test) stop the demo with SIGINT and check that no process and no listening port
is left. Every wait is bounded; the fixture kills whatever is left if a test failed half-way.

The unit tests at the end need no fleet: option errors, the fixed port layout, the generated configs
(read back by the real config loaders) and a child dying during start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from verdigris.cli import main
from verdigris.demo import (
    ROLES,
    DemoError,
    allocate_ports,
    descendants,
    kill_leftovers,
    plan_fleet,
    start_child,
)

VERDIGRIS = str(Path(sys.executable).with_name("verdigris"))
REPO = Path(__file__).resolve().parent.parent
STARTUP_BOUND = 120.0
"""Seconds from launch to a ready fleet (status file written). Measured 12-23 s here (2 cores shared
with other work, see docs/demo.md); the bound is generous on purpose."""
WAKE_BOUND = 30.0
"""Seconds for the first request to the scaled-to-zero app to be answered (instance started, healthy)."""
STOP_BOUND = 60.0
HTTP_TIMEOUT = 30.0

# the fleet's start-up is paid by the first test (module fixture): more than pytest's default 120 s
pytestmark = pytest.mark.timeout(STARTUP_BOUND + STOP_BOUND + 60)


@dataclass
class DemoFleet:
    proc: subprocess.Popen[bytes]
    output: Path
    status: dict[str, Any]
    startup_seconds: float

    def text(self) -> str:
        return self.output.read_text(errors="replace")


def _wait_for_status(proc: subprocess.Popen[bytes], status_file: Path, output: Path) -> dict[str, Any]:
    deadline = time.monotonic() + STARTUP_BOUND
    while time.monotonic() < deadline:
        if status_file.exists():
            doc: dict[str, Any] = json.loads(status_file.read_text())
            return doc
        if proc.poll() is not None:
            raise AssertionError(
                f"demo exited ({proc.returncode}) before it was ready:\n{output.read_text()}"
            )
        time.sleep(0.2)
    raise AssertionError(f"the demo was not ready within {STARTUP_BOUND} s:\n{output.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoFleet]:
    tmp = tmp_path_factory.mktemp("demo")
    status_file = tmp / "status.json"
    output = tmp / "demo.out"
    env = {**os.environ, "COLUMNS": "200"}  # rich: keep the printed curl commands on one line
    with output.open("wb") as out:
        started = time.monotonic()
        proc = subprocess.Popen(
            [VERDIGRIS, "demo", "--status-file", str(status_file), "--timeout", str(STARTUP_BOUND)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
    try:
        status = _wait_for_status(proc, status_file, output)
        elapsed = time.monotonic() - started
        print(
            f"\ndemo 3x3 ready in {elapsed:.1f} s (the demo's own count: {status.get('startup_seconds')} s)"
        )
        yield DemoFleet(proc, output, status, elapsed)
    finally:
        if proc.poll() is None:  # a test failed before the SIGINT test: stop it, then sweep
            tree = descendants(proc.pid)
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_BOUND)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            kill_leftovers(tree)


def get(address: str, host: str, path: str = "/", method: str = "GET", body: bytes | None = None) -> Any:
    """One request through a proxy at ``address`` (host:port) for ``host``: (status, headers, JSON)."""
    hostname, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(hostname, int(port), timeout=HTTP_TIMEOUT)
    try:
        conn.request(method, path, body=body, headers={"Host": host})
        resp = conn.getresponse()
        raw = resp.read()
        try:
            doc = json.loads(raw)
        except ValueError:
            doc = raw.decode(errors="replace")
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, doc
    finally:
        conn.close()


def proxies_of(fleet: DemoFleet, region: str) -> list[str]:
    return [p["address"] for p in fleet.status["proxies"] if p["region"] == region]


def query(api: str, sql: str) -> list[list[Any]]:
    hostname, port = api.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(hostname, int(port), timeout=HTTP_TIMEOUT)
    try:
        conn.request(
            "POST", "/v1/queries", body=json.dumps(sql), headers={"content-type": "application/json"}
        )
        lines = conn.getresponse().read().decode().splitlines()
    finally:
        conn.close()
    return [json.loads(x)["row"][1] for x in lines if '"row"' in x]


# ------------------------------------------------------------------------------------------------ fleet


def test_fleet_starts_within_bound(fleet: DemoFleet) -> None:
    s = fleet.status
    assert fleet.startup_seconds < STARTUP_BOUND
    assert len(s["proxies"]) == len(s["agents"]) == len(s["machines"]) == 9
    assert sorted({p["region"] for p in s["proxies"]}) == ["ams", "iad", "sin"]
    assert s["dashboard"] == f"{s['agents'][0]['api']}/dashboard"
    assert set(s["apps"]) == {"hello", "notes", "sleepy"}
    assert s["apps"]["notes"]["primary_region"] == "ams"
    # the table the newcomer sees: every proxy, the curl commands, the dashboard
    text = fleet.text()
    for p in s["proxies"]:
        assert p["address"] in text
    assert s["dashboard"] in text and "curl -H 'Host: notes.localhost' -d" in text


def fetch(url: str) -> tuple[int, str, str]:
    """GET ``url``: (status, content type, body)."""
    hostport, _, path = url.removeprefix("http://").partition("/")
    hostname, port = hostport.rsplit(":", 1)
    conn = http.client.HTTPConnection(hostname, int(port), timeout=HTTP_TIMEOUT)
    try:
        conn.request("GET", "/" + path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("content-type", ""), resp.read().decode(errors="replace")
    finally:
        conn.close()


def test_dashboard_and_metrics_answer(fleet: DemoFleet) -> None:
    status, ctype, _ = fetch(fleet.status["dashboard"])
    assert status == 200 and ctype.startswith("text/html")
    urls = [x["metrics"] for x in fleet.status["agents"] + fleet.status["proxies"]]
    urls += [f"http://{m['address']}/metrics" for m in fleet.status["machines"]]
    for url in urls:
        status, _, body = fetch(url)
        assert status == 200 and "# TYPE " in body, (url, status, body[:200])


def test_hello_and_notes_through_every_proxy(fleet: DemoFleet) -> None:
    hello_regions = set(fleet.status["apps"]["hello"]["regions"])
    notes_regions = set(fleet.status["apps"]["notes"]["regions"])
    for p in fleet.status["proxies"]:
        status, headers, doc = get(p["address"], "hello.localhost")
        assert status == 200, (p, doc)
        assert doc["app"] == "hello" and doc["region"] in hello_regions, doc
        assert "verdigris" in headers["via"] and headers["fly-request-id"]
        if p["region"] in hello_regions:
            assert doc["region"] == p["region"], "a proxy serves hello from its own region when it can"
        status, _, doc = get(p["address"], "notes.localhost")
        assert status == 200, (p, doc)
        assert doc["app"] == "notes" and doc["region"] in notes_regions, doc


def test_printed_curl_commands_answer(fleet: DemoFleet) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (./dev test installs it)")
    commands = [line.strip() for line in fleet.text().splitlines() if line.strip().startswith("curl ")]
    reads = [c for c in commands if " -d " not in c and "sleepy" not in c]  # the write and the wake: below
    assert len(reads) >= 2, fleet.text()
    for command in reads:
        run = subprocess.run(
            [*shlex.split(command), "-sS", "--max-time", str(HTTP_TIMEOUT), "-w", "\n%{http_code}"],
            capture_output=True,
            timeout=HTTP_TIMEOUT + 5,
        )
        body, _, code = run.stdout.decode().rpartition("\n")
        assert run.returncode == 0 and code == "200", (command, run.stderr, body)
        assert json.loads(body)["app"] in ("hello", "notes")


def test_write_in_another_region_lands_in_primary(fleet: DemoFleet) -> None:
    primary = fleet.status["apps"]["notes"]["primary_region"]
    secondary = next(r for r in fleet.status["apps"]["notes"]["regions"] if r != primary)
    note = f"note-{uuid.uuid4().hex[:8]}"
    # through a proxy of the secondary region: its own notes instance answers fly-replay, the proxy
    # replays the write in the primary region
    status, _, doc = get(
        proxies_of(fleet, secondary)[1], "notes.localhost", method="POST", body=note.encode()
    )
    assert status == 201, doc
    assert doc["written_in"] == primary and doc["received_in"] == secondary, doc
    # a region with no notes instance: forwarded, and the write still lands in the primary region
    regions = {p["region"] for p in fleet.status["proxies"]}
    for region in sorted(regions - set(fleet.status["apps"]["notes"]["regions"])):
        status, _, doc = get(proxies_of(fleet, region)[0], "notes.localhost", method="POST", body=b"x")
        assert status == 201 and doc["written_in"] == primary, doc
    # read back in the primary region: the note is there
    status, _, doc = get(proxies_of(fleet, primary)[2], "notes.localhost")
    assert status == 200 and doc["region"] == primary and note in doc["notes"], doc
    # the secondary's instance never applied a write
    status, _, doc = get(proxies_of(fleet, secondary)[0], "notes.localhost")
    assert status == 200 and doc["region"] == secondary and doc["notes"] == [], doc


def test_scaled_to_zero_app_wakes_on_first_request(fleet: DemoFleet) -> None:
    app = fleet.status["apps"]["sleepy"]
    assert app["scaled_to_zero"]
    (region,) = app["regions"]
    api = next(a["api"] for a in fleet.status["agents"] if a["region"] == region)
    started = query(api, "SELECT id FROM machines WHERE app = 'sleepy' AND state = 'started'")
    assert started == [], "sleepy must be scaled to zero before its first request"
    edge = fleet.status["proxies"][0]  # the demo's printed command goes through the first proxy
    t0 = time.monotonic()
    status, _, doc = get(edge["address"], "sleepy.localhost")
    woken_in = time.monotonic() - t0
    print(f"\nsleepy woken and answered in {woken_in:.2f} s (from {edge['region']}, instance in {region})")
    assert status == 200, doc
    assert doc["app"] == "sleepy" and doc["region"] == region, doc
    assert woken_in < WAKE_BOUND
    assert query(api, "SELECT id FROM machines WHERE app = 'sleepy' AND state = 'started'")


def _bindable(address: str, kind: int) -> bool:
    """Could a new server take this address? (SO_REUSEADDR, as servers do: connections of the old
    processes lingering in TIME_WAIT do not count, a socket still bound or listening does.)"""
    host, port = address.rsplit(":", 1)
    with socket.socket(socket.AF_INET, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, int(port)))
            if kind == socket.SOCK_STREAM:
                s.listen()
        except OSError:
            return False
    return True


def test_sigint_stops_everything(fleet: DemoFleet) -> None:
    """Runs last in this module: the fleet is gone afterwards."""
    tree = descendants(fleet.proc.pid)
    child_pids = {c["pid"] for c in fleet.status["children"]}
    assert child_pids <= set(tree) and len(child_pids) == 27
    assert len(tree) > 27  # proxy workers and app instances too
    data_dir = Path(fleet.status["data_dir"])
    t0 = time.monotonic()
    fleet.proc.send_signal(signal.SIGINT)
    code = fleet.proc.wait(STOP_BOUND)
    print(f"\ndemo stopped in {time.monotonic() - t0:.1f} s ({len(tree)} processes)")
    assert code == 0, fleet.text()[-3000:]
    alive = kill_leftovers(tree)  # kills and names any process of the tree still running
    assert alive == [], f"left running: {alive}"
    busy = [a for a in fleet.status["listening"] if not _bindable(a, socket.SOCK_STREAM)]
    busy += [f"udp {a}" for a in fleet.status["listening"] if not _bindable(a, socket.SOCK_DGRAM)]
    for m in fleet.status["machines"]:
        first, last = m["instance_ports"]
        busy += [
            f"127.0.0.1:{p}"
            for p in range(first, last + 1)
            if not _bindable(f"127.0.0.1:{p}", socket.SOCK_STREAM)
        ]
    assert busy == [], f"still bound after the stop: {busy}"
    assert not data_dir.exists(), "the default temp dir is removed at exit"
    assert "stopped" in fleet.text()


# ------------------------------------------------------------------------------------------------ units


def test_bad_options_are_clear_errors() -> None:
    runner = CliRunner()
    for args, message in [
        (["--regions", "0"], "--regions must be between 1 and 9, not 0"),
        (["--nodes", "12"], "--nodes must be between 1 and 9, not 12"),
        (["--workers", "0"], "--workers must be at least 1, not 0"),
        (["--base-port", "65530"], "which must lie in 1024-65535"),
        (["--timeout", "0"], "must be > 0"),
        (["--status-file", "/nonexistent-dir/status.json"], "its directory does not exist"),
        (["--data-dir", __file__], "--data-dir"),
    ]:
        result = runner.invoke(main, ["demo", *args])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)


def test_base_port_layout_and_busy_ports() -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        base = port - 1  # the held port is the second proxy's
        with pytest.raises(DemoError, match=f"already in use: .*{port}"):
            allocate_ports(2, base)
    rng = random.Random()
    for _ in range(20):  # a layout on free ports (other tests may hold some: try another base)
        base = rng.randrange(20000, 30000)
        with contextlib.suppress(DemoError):
            ports = allocate_ports(3, base)
            break
    else:
        raise AssertionError("20 random bases between 20000 and 30000, each with a busy port")
    assert [p.proxy for p in ports] == [base, base + 1, base + 2]
    assert [p.api for p in ports] == [base + 3, base + 4, base + 5]
    assert ports[0].instances[0] == base + 3 * len(ROLES)
    every = [q for p in ports for q in [*p.listening(), *range(p.instances[0], p.instances[1] + 1)]]
    assert len(every) == len(set(every))


def test_generated_configs_load(tmp_path: Path) -> None:
    from verdigris.config import load_config
    from verdigris.machines.config import load_machines_config
    from verdigris.proxy.config import load_proxy_config

    plan = plan_fleet(4, 2, tmp_path, None, 2, REPO / "examples" / "apps")
    assert [n.name for n in plan.nodes][:3] == ["ams1", "ams2", "iad1"]
    assert plan.regions == ["ams", "iad", "sin", "r4"]
    from verdigris.demo import agent_config, machines_config, proxy_config

    node = plan.nodes[2]
    (tmp_path / "agent.toml").write_text(agent_config(plan, node, REPO / "schemas"))
    (tmp_path / "proxy.toml").write_text(proxy_config(plan, node))
    (tmp_path / "machines.toml").write_text(machines_config(plan, node))
    agent = load_config(tmp_path / "agent.toml")
    assert agent.gossip is not None and agent.gossip.region == "iad"
    proxy = load_proxy_config(tmp_path / "proxy.toml")
    assert (proxy.region, proxy.workers, proxy.peer_token) == ("iad", 2, plan.peer_token)
    machines = load_machines_config(tmp_path / "machines.toml")
    assert machines.region_nodes == ("iad1", "iad2")
    apps = {a.name: a for a in machines.apps}
    assert apps["hello"].regions == {"ams": 2, "iad": 1}
    assert apps["notes"].primary_region == "ams"
    assert apps["sleepy"].start_stopped and apps["sleepy"].regions == {"r4": 1}
    # one region: every app lives there
    one = plan_fleet(1, 1, tmp_path / "one", None, 1, REPO / "examples" / "apps")
    assert {a.name: a.regions for a in one.apps} == {
        "hello": {"ams": 2},
        "notes": {"ams": 1},
        "sleepy": {"ams": 1},
    }


def test_child_dying_is_reported_with_its_log(tmp_path: Path) -> None:
    script = "import sys; print('loading config'); print('boom: port taken', file=sys.stderr); sys.exit(3)"
    child = start_child("agent", "ams1", [sys.executable, "-c", script], tmp_path / "agent.log", tmp_path)
    try:
        child.proc.wait(30)
        with pytest.raises(DemoError) as info:
            child.check_alive()
        message = str(info.value)
        assert "agent ams1 exited with status 3" in message
        assert "loading config" in message and "boom: port taken" in message
    finally:
        child.log.close()


def test_descendants_and_leftover_sweep(tmp_path: Path) -> None:
    # a parent that starts a grandchild in its own session and exits: the sweep still finds it
    script = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True); "
        "print(p.pid, flush=True); time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert parent.stdout is not None
        grandchild = int(parent.stdout.readline())
        tree = descendants(parent.pid)
        assert grandchild in tree
        parent.kill()
        parent.wait(10)
        assert kill_leftovers(tree) == [grandchild]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{grandchild}").exists():
            stat = Path(f"/proc/{grandchild}/stat").read_text(errors="replace")
            if stat[stat.rindex(")") + 2] == "Z":
                break  # killed, waiting for init to reap it
            time.sleep(0.05)
        assert kill_leftovers(tree) == []
    finally:
        parent.kill()
        parent.wait(10)
        if parent.stdout is not None:
            parent.stdout.close()


async def test_a_step_that_never_finishes_times_out_with_its_reason(tmp_path: Path) -> None:
    from rich.console import Console
    from rich.progress import Progress

    from verdigris.demo import Fleet

    plan = plan_fleet(1, 1, tmp_path, None, 1, REPO / "examples" / "apps")
    console = Console(file=open(os.devnull, "w"))  # noqa: SIM115
    fleet = Fleet(plan, console, timeout=0.5)
    fleet.deadline = time.monotonic() + 0.5

    async def never() -> str | None:
        return "3/9 alive"

    async def fails() -> str | None:
        raise ConnectionRefusedError("refused")

    started = time.monotonic()
    with Progress(console=console) as progress, pytest.raises(DemoError) as info:
        await asyncio.wait_for(
            fleet.wait_all(progress, "clusters joined", [("ams1", never), ("ams2", fails)]), 10
        )
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "timed out (0 s start-up bound) waiting for clusters joined" in message
    assert "ams1: 3/9 alive" in message and "ams2: ConnectionRefusedError: refused" in message
    console.file.close()
