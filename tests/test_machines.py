"""The machines agent (docs/machines.md): config validation and idle detection in unit tests, then one
real fleet for the module: an agent in region mode (region ``a``, presence publisher on, so that
``app_regions`` follows the instances), a proxy (``workers = 1``) and ``verdigris machines`` running
real child processes (``examples/apps/hello.py`` and a small test app whose listener and health can be
switched off with flag files). Tests run in file order on the shared fleet; the last one stops the
machines agent with SIGTERM. The cross-region wake adds an agent and a proxy in region ``b`` (joined
through the global cluster). A second, short-lived machines agent is killed with ``kill -9`` to check
that its instances die with it. Every wait is bounded by ``WAIT``; every process is stopped at the end.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from _api_util import wait_until
from _proxy_env import stop_process
from test_cluster import free_port
from verdigris.machines import checks as probes
from verdigris.machines.config import MachinesConfigError, parse_machines_config
from verdigris.machines.state import MachineRow, diff_statements
from verdigris.proxy.balance import RouteRequest
from verdigris.proxy.errors import ErrorCode, Reject
from verdigris.proxy.table import RoutingTable
from verdigris.proxy.upstream import UpstreamPool
from verdigris.proxy.wake import Waker

VERDIGRIS = str(Path(sys.executable).with_name("verdigris"))
ROOT = Path(__file__).resolve().parent.parent
PLATFORM_SQL = ROOT / "schemas" / "platform.sql"
HELLO = ROOT / "examples" / "apps" / "hello.py"
WAIT = 20.0
PEER_TOKEN = "machines-test-peer-token"
WAKE_BOUND = 10.0
"""The first request to a scaled-to-zero app must be answered within this (measured: well under 1 s)."""

FLAKY_APP = """
import os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
flags = sys.argv[1]
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        sick = os.path.exists(os.path.join(flags, "sick"))
        body = b"sick" if sick else b"ok"
        self.send_response(500 if sick and self.path == "/health" else 200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
server = None
while True:  # the listener is closed while the flag file "off" exists
    off = os.path.exists(os.path.join(flags, "off"))
    if off and server is not None:
        server.shutdown(); server.server_close(); server = None
    elif not off and server is None:
        server = ThreadingHTTPServer(("127.0.0.1", int(os.environ["PORT"])), H)
        threading.Thread(target=server.serve_forever, daemon=True).start()
    time.sleep(0.05)
"""


def until(what: str, check: Callable[[], Any], timeout: float = WAIT) -> Any:
    return wait_until(what, check, timeout)


def stop(proc: subprocess.Popen[bytes], log: IO[bytes] | None = None) -> int:
    return stop_process(proc, log, WAIT)


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def http_json(method: str, url: str, timeout: float = WAIT) -> tuple[int, Any]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ---------------------------------------------------------------------------------------- unit tests


def _config(apps: list[dict[str, Any]], **machines: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "node": "a1",
        "region": "a",
        "agent": "http://127.0.0.1:1",
        "region_nodes": ["a1"],
    }
    base.update(machines)
    return {"machines": {**base, "apps": apps}}


def test_config_is_strict_and_names_every_problem(tmp_path: Path) -> None:
    doc = _config(
        [
            {
                "name": "web",
                "command": ["x"],
                "colour": "red",
                "checks": [{"name": "c", "type": "udp", "intervl": 1}],
            }
        ],
        port_range="9-3",
        typo=1,
    )
    doc["extra"] = {}
    with pytest.raises(MachinesConfigError) as e:
        parse_machines_config(doc, "m.toml", tmp_path)
    text = str(e.value)
    for expected in (
        "machines.typo: unknown key",
        "machines.apps[0].colour: unknown key",
        "machines.apps[0].checks[0].intervl: unknown key",
        "machines.apps[0].checks[0].type: must be one of http, tcp",
        "machines.port_range",
        "extra: unknown section",
    ):
        assert expected in text, text
    with pytest.raises(MachinesConfigError, match="must include this node"):
        parse_machines_config(_config([], region_nodes=["a2"]), "m.toml", tmp_path)
    with pytest.raises(MachinesConfigError, match="command: is required"):
        parse_machines_config(_config([{"name": "web"}]), "m.toml", tmp_path)
    with pytest.raises(MachinesConfigError, match="defined twice"):
        parse_machines_config(_config([{"name": "w", "command": ["x"]}] * 2), "m.toml", tmp_path)


def test_config_share_paths_and_python(tmp_path: Path) -> None:
    (tmp_path / "apps").mkdir()
    (tmp_path / "apps" / "a.py").write_text("")
    doc = _config(
        [
            {
                "name": "web",
                "command": ["{python}", "apps/a.py", "not/there", "-x"],
                "regions": {"a": 5, "b": 1},
            }
        ],
        node="a2",
        region_nodes=["a1", "a2", "a3"],
        logs_dir="logs",
    )
    cfg = parse_machines_config(doc, "m.toml", tmp_path)
    app = cfg.apps[0]
    assert app.command == (sys.executable, str(tmp_path / "apps" / "a.py"), "not/there", "-x")
    assert cfg.share(app) == [1, 4]  # instance j runs on region_nodes[j % 3]
    assert cfg.logs_dir == tmp_path / "logs"
    assert cfg.advertise == "127.0.0.1:7001"


def test_diff_writes_only_what_changed() -> None:
    row = MachineRow("web", "a", "started", "127.0.0.1:1", "a1", 5)
    same = diff_statements(
        "web-a-0", (row, {"c": ("passing", "HTTP 200")}), (row, {"c": ("passing", "HTTP 200")})
    )
    assert same == []
    check_only = diff_statements(
        "web-a-0", (row, {"c": ("passing", "HTTP 200")}), (row, {"c": ("critical", "x")})
    )
    assert [t for t, _ in check_only] == ["checks"]
    gone = diff_statements("web-a-0", (row, {"c": ("passing", "HTTP 200")}), (None, {}))
    assert [t for t, _ in gone] == ["machines", "checks"]


def test_established_ports_sees_a_real_connection_but_not_our_probes() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = int(server.getsockname()[1])
        assert probes.established_ports([port]) == set()
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = server.accept()
            with accepted:
                assert probes.established_ports([port]) == {port}
                probes.own_ports.add(int(client.getsockname()[1]))  # as while a probe runs
                try:
                    assert probes.established_ports([port]) == set()
                finally:
                    probes.own_ports.clear()


async def test_proxy_pool_closes_idle_connections_so_instances_can_look_idle() -> None:
    """The proxy's upstream pool closes a keep-alive connection idle for its bound (then the instance has
    no established connection left, which autostop needs)."""
    closed = asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()  # until the pool closes its side
        closed.set()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    pool = UpstreamPool(max_idle=4, connect_timeout=2.0, idle_timeout=0.3)
    try:
        async with asyncio.timeout(WAIT):
            conn = await pool.acquire("i1", "127.0.0.1", port)
            conn.start_exchange()
            conn.writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            await conn.read_head(WAIT)
            assert [c async for c in conn.body(WAIT)] == [b"ok"]
            released = time.monotonic()
            pool.release(conn)
            assert probes.established_ports([port]) == {port}  # kept for reuse meanwhile
            await closed.wait()
        assert time.monotonic() - released >= 0.25
        assert probes.established_ports([port]) == set()
    finally:
        pool.close()
        server.close()
        await server.wait_closed()


def test_waker_applies_only_when_nothing_is_in_reach() -> None:
    table = RoutingTable()
    table.load(
        "machines",
        [["w1", "web", "a", "stopped", "127.0.0.1:1"], ["v1", "vis", "a", "started", "127.0.0.1:2"]],
    )
    table.load("app_regions", [["far", "b"]])
    counts: list[str] = []
    waker = Waker(table, "a", "http://127.0.0.1:1", None, 1.0, counts.append)
    refusal = Reject(503, ErrorCode.NO_HEALTHY_INSTANCE, "nothing")
    usual = RouteRequest()
    extra: dict[str, str] = {}
    assert waker.applies(refusal, "web", usual, extra, forwarded=False)
    assert not waker.applies(refusal, "web", usual, extra, forwarded=False)  # a request waits once
    assert not waker.applies(refusal, "web", RouteRequest(force_instance="w1"), {}, forwarded=False)
    assert not waker.applies(refusal, "vis", usual, {}, forwarded=False)  # healthy here: another cause
    assert not waker.applies(refusal, "far", usual, {}, forwarded=False)  # a region to forward to
    assert waker.applies(refusal, "far", usual, {}, forwarded=True)  # pinned here: it must be local
    in_region = Reject(503, ErrorCode.NO_INSTANCE_IN_REGION, "nothing")
    assert not waker.applies(in_region, "web", usual, {}, forwarded=False)  # a forced region: not ours
    assert waker.applies(in_region, "web", usual, {}, forwarded=True)
    assert not waker.applies(Reject(404, ErrorCode.NO_SUCH_APP, "?"), None, usual, {}, forwarded=False)


async def test_waker_without_machines_agents_keeps_the_refusal() -> None:
    """No agent to read machine_agents from (nothing listens on the port): the refusal as it was."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    counts: list[str] = []
    waker = Waker(RoutingTable(), "a", dead, None, 1.0, counts.append)
    refusal = Reject(503, ErrorCode.NO_HEALTHY_INSTANCE, "nothing")
    async with asyncio.timeout(WAIT):
        assert await waker.wake("web", refusal) is refusal
        assert await waker.wake("web", refusal) is refusal
    assert counts == ["wake_agents_unreadable"]  # read once per AGENTS_TTL, not per request


# ---------------------------------------------------------------------------------------- the fleet


class Fleet:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
        self.flags = tmp / "flags"
        self.flags.mkdir()
        (tmp / "flaky.py").write_text(FLAKY_APP)
        self.key = base64.b64encode(os.urandom(32)).decode()
        self.global_port = free_port()
        self.api_port = free_port()
        self.agent_url = f"http://127.0.0.1:{self.api_port}"
        agent_cfg = self.agent_config("a", self.api_port, self.global_port, [])
        self.spawn("agent", [VERDIGRIS, "agent", "-c", str(agent_cfg)])
        until("the agent", lambda: http_json("GET", self.agent_url + "/v1/health", 2)[0] == 200)
        self.machines_port = free_port()
        self.machines_url = f"http://127.0.0.1:{self.machines_port}"
        self.machines_cfg = tmp / "machines.toml"
        self.machines_cfg.write_text(self.machines_toml())
        self.machines = self.spawn("machines", [VERDIGRIS, "machines", "-c", str(self.machines_cfg)])
        self.proxy_port = free_port()
        proxy_cfg = self.proxy_config("a", self.proxy_port, self.agent_url)
        self.proxy = self.spawn("proxy", [VERDIGRIS, "proxy", "-c", str(proxy_cfg)])
        until("instances running", lambda: self.instance("hello-a-0")["health"] == "passing")

    def agent_config(self, region: str, api_port: int, global_port: int, bootstrap: list[str]) -> Path:
        """An agent in region mode (presence publisher on, acting at once) in its own directory."""
        d = self.tmp / f"agent-{region}"
        d.mkdir()
        cfg = d / "agent.toml"
        cluster_id = {"a": 11, "b": 12}[region]
        cfg.write_text(
            f'[db]\npath = "{d / "state.db"}"\nschema_paths = ["{PLATFORM_SQL}"]\n'
            f'[api]\naddr = "127.0.0.1:{api_port}"\n'
            f'[admin]\npath = "{Path(tempfile.mkdtemp(prefix="vdm")) / "admin.sock"}"\n'
            f'[gossip]\naddr = "127.0.0.1:{free_port()}"\ncluster-id = {cluster_id}\nregion = "{region}"\n'
            f'key = "{self.key}"\n'
            f'[gossip.global]\naddr = "127.0.0.1:{global_port}"\ncluster-id = 1\nbootstrap = {json.dumps(bootstrap)}\n'
            "[presence]\ndebounce-ms = 50\ntakeover-delay-ms = 0\ninterval-ms = 1000\n"
        )
        return cfg

    def proxy_config(self, region: str, port: int, agent_url: str) -> Path:
        cfg = self.tmp / f"proxy-{region}.toml"
        cfg.write_text(
            f'[proxy]\nlisten = "127.0.0.1:{port}"\nworkers = 1\nagent = "{agent_url}"\n'
            f'region = "{region}"\nid = "proxy-{region}"\npeer_token = "{PEER_TOKEN}"\n'
            "[proxy.timeouts]\nconnect = 1.0\nresponse = 5.0\nwake = 3.0\n"
        )
        return cfg

    def machines_toml(self) -> str:
        check = '[[machines.apps.checks]]\nname = "alive"\npath = "/health"\ninterval = 0.2\ntimeout = 0.5\n'
        flaky = f'["{{python}}", "{self.tmp / "flaky.py"}", "{self.flags}"]'
        return (
            "[machines]\n"
            f'node = "a1"\nregion = "a"\nagent = "{self.agent_url}"\n'
            f'listen = "127.0.0.1:{self.machines_port}"\nport_range = "{self.port_range()}"\n'
            'region_nodes = ["a1"]\nlogs_dir = "logs"\nstop_timeout = 3.0\n'
            f'[[machines.apps]]\nname = "hello"\ncommand = ["{{python}}", "{HELLO}"]\nregions = {{ a = 1 }}\n'
            'hostnames = ["hello.localhost"]\nenv = { GREETING = "hi" }\n' + check + "grace_period = 1.0\n"
            f'[[machines.apps]]\nname = "flaky"\ncommand = {flaky}\nregions = {{ a = 1 }}\n'
            + check
            + "grace_period = 0.5\n"
            + '[[machines.apps.checks]]\nname = "port"\ntype = "tcp"\ninterval = 0.2\ntimeout = 0.5\n'
            "grace_period = 0.5\n"
            f'[[machines.apps]]\nname = "idler"\ncommand = ["{{python}}", "{HELLO}"]\nregions = {{ a = 2 }}\n'
            "autostop_after = 1.0\nmin_machines_running = 1\n" + check + "grace_period = 1.0\n"
            f'[[machines.apps]]\nname = "sleepy"\ncommand = ["{{python}}", "{HELLO}"]\nregions = {{ a = 1 }}\n'
            'hostnames = ["sleepy.localhost"]\nstart_stopped = true\n' + check + "grace_period = 1.0\n"
            f'[[machines.apps]]\nname = "broken"\ncommand = ["{{python}}", "{HELLO}"]\nregions = {{ a = 1 }}\n'
            'hostnames = ["broken.localhost"]\nstart_stopped = true\n'
            + check.replace("/health", "/missing")
            + "grace_period = 0.2\n"
            f'[[machines.apps]]\nname = "frozen"\ncommand = ["{{python}}", "{HELLO}"]\nregions = {{ a = 1 }}\n'
            'hostnames = ["frozen.localhost"]\nstart_stopped = true\nautostart = false\n'
            '[[machines.apps]]\nname = "crasher"\ncommand = ["{python}", "-c", "raise SystemExit(3)"]\n'
            "regions = { a = 1 }\nstart_stopped = true\n"
            '[[machines.apps]]\nname = "elsewhere"\ncommand = ["true"]\nregions = { b = 1 }\n'
        )

    def port_range(self) -> str:
        low = free_port()
        return f"{low}-{low + 40}" if low + 40 < 65536 else "20000-20040"

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp)
        self.procs.append((proc, log))
        return proc

    def close(self) -> None:
        for proc, log in reversed(self.procs):
            stop(proc, log)

    # helpers
    def instances(self) -> dict[str, dict[str, Any]]:
        status, body = http_json("GET", self.machines_url + "/v1/instances", 2)
        assert status == 200, body
        return {i["id"]: i for i in body}

    def instance(self, iid: str) -> dict[str, Any]:
        return self.instances()[iid]

    def query(self, sql: str, params: list[Any] | None = None, *, agent: str = "") -> list[list[Any]]:
        body = json.dumps([sql, params or []]).encode()
        url = (agent or self.agent_url) + "/v1/queries"
        req = urllib.request.Request(url, body, {"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=WAIT) as r:
            lines = r.read().decode().splitlines()
        return [json.loads(x)["row"][1] for x in lines if '"row"' in x]

    def get(
        self, host: str, path: str = "/", timeout: float = WAIT, *, port: int = 0
    ) -> tuple[int, str, dict[str, str]]:
        c = http.client.HTTPConnection("127.0.0.1", port or self.proxy_port, timeout=timeout)
        try:
            c.request("GET", path, headers={"Host": host})
            r = c.getresponse()
            return r.status, r.read().decode(), {k.lower(): v for k, v in r.getheaders()}
        finally:
            c.close()


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    tmp = Path(tempfile.mkdtemp(prefix="vd-machines-"))
    f: Fleet | None = None
    try:
        f = Fleet(tmp)
        yield f
    finally:
        if f is not None:
            f.close()


def test_instances_start_and_rows_appear_with_passing_checks(fleet: Fleet) -> None:
    inst = fleet.instance("hello-a-0")
    assert inst["state"] == "started" and inst["pid"] and inst["restarts"] == 0
    rows = until(
        "hello's rows",
        lambda: fleet.query(
            "SELECT m.state, m.address, m.node, c.status, c.output FROM machines m "
            "JOIN checks c ON c.machine = m.id WHERE m.id = 'hello-a-0' AND c.status = 'passing'"
        ),
    )
    assert rows == [["started", inst["address"], "a1", "passing", "HTTP 200"]]
    assert fleet.query("SELECT name, concurrency FROM apps WHERE name = 'hello'") == [["hello", "requests"]]
    assert fleet.query("SELECT app FROM hostnames WHERE hostname = 'hello.localhost'") == [["hello"]]
    assert fleet.query("SELECT handlers FROM services WHERE app = 'hello'") == [["http"]]
    agents = fleet.query("SELECT id, region, address, apps FROM machine_agents")
    assert agents == [
        [
            "a1",
            "a",
            f"127.0.0.1:{fleet.machines_port}",
            json.dumps(["broken", "crasher", "flaky", "hello", "idler", "sleepy"]),
        ]
    ]
    # the app answers through the proxy, with the env the agent set
    _, body, _ = until("hello through the proxy", lambda: (r := fleet.get("hello.localhost"))[0] == 200 and r)
    doc = json.loads(body)
    assert doc == {"app": "hello", "instance": "hello-a-0", "region": "a", "node": "a1", "greeting": "hi"}
    assert fleet.query("SELECT capacity FROM app_regions WHERE app = 'hello' AND region = 'a'") == [[1]]


def test_checks_turn_critical_when_the_app_stops_answering(fleet: Fleet) -> None:
    def statuses() -> dict[str, str]:
        rows = fleet.query("SELECT name, status FROM checks WHERE machine = 'flaky-a-0'")
        return {str(n): str(s) for n, s in rows}

    until("flaky passing", lambda: statuses() == {"alive": "passing", "port": "passing"})
    (fleet.flags / "sick").write_text("")  # /health answers 500: only the HTTP check fails
    until("http check critical", lambda: statuses() == {"alive": "critical", "port": "passing"})
    assert fleet.instance("flaky-a-0")["checks"]["alive"]["output"] == "HTTP 500"
    (fleet.flags / "sick").unlink()
    until("flaky passing again", lambda: statuses() == {"alive": "passing", "port": "passing"})
    (fleet.flags / "off").write_text("")  # the listener closes: both checks fail
    until("both critical", lambda: statuses() == {"alive": "critical", "port": "critical"})
    out = fleet.instance("flaky-a-0")["checks"]["port"]["output"]
    assert "connection failed" in out, out
    (fleet.flags / "off").unlink()
    until("flaky passing at last", lambda: statuses() == {"alive": "passing", "port": "passing"})
    assert fleet.instance("flaky-a-0")["restarts"] == 0  # the process never died


def test_crashed_instance_is_restarted_with_backoff(fleet: Fleet) -> None:
    before = fleet.instance("hello-a-0")
    os.kill(before["pid"], signal.SIGKILL)
    after = until(
        "hello restarted",
        lambda: (i := fleet.instance("hello-a-0"))["restarts"] == 1 and i["health"] == "passing" and i,
    )
    assert after["pid"] != before["pid"] and after["address"] == before["address"]
    until(
        "row started again",
        lambda: fleet.query("SELECT state FROM machines WHERE id = 'hello-a-0'") == [["started"]],
    )
    # an app that always exits: restarts are spaced 0.1, 0.2, 0.4, 0.8 s... (never faster)
    t0 = time.monotonic()
    assert http_json("POST", fleet.machines_url + "/v1/instances/crasher-a-0/start")[0] == 200
    until("4 crashes", lambda: fleet.instance("crasher-a-0")["restarts"] >= 4)
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.1 + 0.2 + 0.4, elapsed  # three backoff waits between four exits, at least
    assert fleet.instance("crasher-a-0")["restarts"] <= 8  # and not a tight loop
    assert http_json("POST", fleet.machines_url + "/v1/instances/crasher-a-0/stop")[0] == 200
    until("crasher stopped", lambda: fleet.instance("crasher-a-0")["state"] == "stopped")


def test_api_lists_starts_stops_and_refuses_bad_requests(fleet: Fleet) -> None:
    url = fleet.machines_url
    ids = set(fleet.instances())
    assert ids == {
        "hello-a-0",
        "flaky-a-0",
        "idler-a-0",
        "idler-a-1",
        "sleepy-a-0",
        "frozen-a-0",
        "crasher-a-0",
        "broken-a-0",
    }
    assert http_json("POST", url + "/v1/instances/nope/stop") == (
        404,
        {"error": "no instance 'nope' on node a1"},
    )
    assert http_json("POST", url + "/v1/apps/nope/start")[0] == 404
    status, body = http_json("POST", url + "/v1/apps/elsewhere/start")
    assert status == 409 and "no instance on node a1" in body["error"]
    assert http_json("GET", url + "/v1/nothing") == (404, {"error": "no such endpoint: /v1/nothing"})
    assert http_json("GET", url + "/v1/instances/hello-a-0/stop")[0] == 405
    status, body = http_json("POST", url + "/v1/apps/hello/start")  # already running: nothing to do
    assert status == 200 and body == {"instance": "hello-a-0", "state": "started", "started": False}
    assert http_json("POST", url + "/v1/instances/frozen-a-0/start")[0] == 200
    until("frozen started", lambda: fleet.instance("frozen-a-0")["health"] == "passing")
    assert http_json("POST", url + "/v1/instances/frozen-a-0/stop")[0] == 200
    until("frozen stopped", lambda: fleet.instance("frozen-a-0")["state"] == "stopped")
    assert fleet.instance("frozen-a-0")["pid"] is None
    until(
        "frozen row stopped",
        lambda: fleet.query("SELECT state FROM machines WHERE id = 'frozen-a-0'") == [["stopped"]],
    )
    with urllib.request.urlopen(url + "/metrics", timeout=WAIT) as r:
        metrics = r.read().decode()
    assert 'verdigris_machines_instances{app="hello",state="started"} 1.0' in metrics
    assert 'verdigris_machines_restarts_total{app="hello"}' in metrics
    assert "verdigris_machines_state_writes_total" in metrics


def test_autostop_after_idle_respects_min_machines_running(fleet: Fleet) -> None:
    until("idler-a-1 autostopped", lambda: fleet.instance("idler-a-1")["state"] == "stopped")
    until(
        "its row stays, stopped",
        lambda: fleet.query("SELECT state FROM machines WHERE id = 'idler-a-1'") == [["stopped"]],
    )
    # idler-a-0 is the region's one protected instance: it stays up however idle
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        assert fleet.instance("idler-a-0")["state"] == "started"
        time.sleep(0.1)
    with urllib.request.urlopen(fleet.machines_url + "/metrics", timeout=WAIT) as r:
        assert 'verdigris_machines_autostops_total{app="idler"} 1.0' in r.read().decode()


def test_steady_state_writes_nothing(fleet: Fleet) -> None:
    def instance_statements() -> float:
        with urllib.request.urlopen(fleet.machines_url + "/metrics", timeout=WAIT) as r:
            lines = r.read().decode().splitlines()
        return sum(
            float(x.rsplit(" ", 1)[1])
            for x in lines
            if x.startswith("verdigris_machines_state_statements_total{")
            and ('table="machines"' in x or 'table="checks"' in x)
        )

    first = instance_statements()
    assert first > 0
    time.sleep(1.5)  # checks probe every 0.2 s meanwhile: about 50 probes, none a change
    assert instance_statements() == first


def test_scaled_to_zero_app_is_woken_by_a_request(fleet: Fleet) -> None:
    assert fleet.instance("sleepy-a-0")["state"] == "stopped"
    assert fleet.query("SELECT region FROM app_regions WHERE app = 'sleepy'") == []
    t0 = time.monotonic()
    status, body, _ = fleet.get("sleepy.localhost", timeout=WAKE_BOUND)
    took = time.monotonic() - t0
    assert status == 200, body
    assert json.loads(body)["instance"] == "sleepy-a-0"
    assert took < WAKE_BOUND
    print(f"wake: first request answered in {took:.3f} s")
    until(
        "app_regions has sleepy",
        lambda: fleet.query("SELECT region FROM app_regions WHERE app = 'sleepy'") == [["a"]],
    )
    # an app nobody can start (autostart = false): the usual 503, at once
    t0 = time.monotonic()
    status, body, headers = fleet.get("frozen.localhost")
    assert status == 503 and headers["fly-error-code"] == "no_healthy_instance", body
    assert time.monotonic() - t0 < 2.0
    # an app that never becomes healthy: held for [proxy.timeouts] wake, then a 503 saying so
    t0 = time.monotonic()
    status, body, headers = fleet.get("broken.localhost")
    took = time.monotonic() - t0
    assert status == 503 and headers["fly-error-code"] == "no_healthy_instance"
    assert "autostart of broken: asked machines agent a1 (a); no instance became healthy within 3 s" in body
    assert 2.5 <= took < WAIT
    assert fleet.instance("broken-a-0")["health"] == "critical"
    assert http_json("POST", fleet.machines_url + "/v1/instances/broken-a-0/stop")[0] == 200
    # every instance of sleepy stopped: its app_regions row goes
    assert http_json("POST", fleet.machines_url + "/v1/instances/sleepy-a-0/stop")[0] == 200
    until(
        "app_regions without sleepy",
        lambda: fleet.query("SELECT region FROM app_regions WHERE app = 'sleepy'") == [],
    )


def test_scaled_to_zero_app_is_woken_from_another_regions_proxy(fleet: Fleet) -> None:
    api_b = free_port()
    agent_b = f"http://127.0.0.1:{api_b}"
    cfg = fleet.agent_config("b", api_b, free_port(), [f"127.0.0.1:{fleet.global_port}"])
    fleet.spawn("agent-b", [VERDIGRIS, "agent", "-c", str(cfg)])
    until("agent b", lambda: http_json("GET", agent_b + "/v1/health", 2)[0] == 200)
    proxy_b = free_port()
    fleet.spawn("proxy-b", [VERDIGRIS, "proxy", "-c", str(fleet.proxy_config("b", proxy_b, agent_b))])
    until(
        "region a's globals at b",
        lambda: (
            fleet.query("SELECT id FROM machine_agents", agent=agent_b) == [["a1"]]
            and fleet.query("SELECT id FROM proxies WHERE region = 'a'", agent=agent_b) == [["proxy-a"]]
            and fleet.query("SELECT app FROM hostnames WHERE hostname = 'sleepy.localhost'", agent=agent_b)
        ),
    )
    until(
        "sleepy stopped everywhere",
        lambda: fleet.query("SELECT app FROM app_regions WHERE app = 'sleepy'", agent=agent_b) == [],
    )
    until("proxy b routes hello", lambda: fleet.get("hello.localhost", port=proxy_b, timeout=2)[0] == 200)
    assert fleet.instance("sleepy-a-0")["state"] == "stopped"
    t0 = time.monotonic()
    status, body, headers = fleet.get("sleepy.localhost", timeout=WAKE_BOUND, port=proxy_b)
    took = time.monotonic() - t0
    assert status == 200, (body, headers)
    assert json.loads(body)["instance"] == "sleepy-a-0"
    assert took < WAKE_BOUND
    print(f"wake from region b: first request answered in {took:.3f} s")
    assert http_json("POST", fleet.machines_url + "/v1/instances/sleepy-a-0/stop")[0] == 200
    until("sleepy stopped", lambda: fleet.instance("sleepy-a-0")["state"] == "stopped")


def test_kill_9_of_a_machines_agent_takes_its_instances_down(fleet: Fleet) -> None:
    cfg = fleet.tmp / "other.toml"
    port = free_port()
    base = (
        f'[machines]\nnode = "k1"\nregion = "a"\nagent = "{fleet.agent_url}"\nlisten = "127.0.0.1:{port}"\n'
        f'port_range = "{fleet.port_range()}"\nlogs_dir = "logs-k1"\n'
        f'[[machines.apps]]\nname = "kapp"\ncommand = ["{{python}}", "{HELLO}"]\n'
    )
    cfg.write_text(base + "regions = { a = 2 }\n")
    proc = fleet.spawn("other", [VERDIGRIS, "machines", "-c", str(cfg)])
    url = f"http://127.0.0.1:{port}"

    def pids() -> list[int]:
        return [i["pid"] for i in http_json("GET", url + "/v1/instances", 2)[1] if i["pid"]]

    running = until("two kapp instances", lambda: len(p := pids()) == 2 and p)
    until("kapp rows", lambda: len(fleet.query("SELECT id FROM machines WHERE node = 'k1'")) == 2)
    proc.kill()
    proc.wait(WAIT)
    until("instances gone with their agent", lambda: not any(alive(p) for p in running))
    # a new run with one instance: the stale row of the other is removed, the kept one rewritten
    cfg.write_text(base + "regions = { a = 1 }\n")
    proc2 = fleet.spawn("other2", [VERDIGRIS, "machines", "-c", str(cfg)])
    until(
        "stale row removed",
        lambda: fleet.query("SELECT id FROM machines WHERE node = 'k1'") == [["kapp-a-0"]],
    )
    assert stop(proc2) == 0
    until("k1's rows removed", lambda: fleet.query("SELECT id FROM machines WHERE node = 'k1'") == [])


def test_sigterm_stops_every_instance_and_removes_the_rows(fleet: Fleet) -> None:
    pids = [i["pid"] for i in fleet.instances().values() if i["pid"]]
    assert len(pids) >= 3
    assert stop(fleet.machines) == 0
    assert not [p for p in pids if alive(p)]
    assert fleet.query("SELECT id FROM machines WHERE node = 'a1'") == []
    assert fleet.query("SELECT machine FROM checks") == []
    assert fleet.query("SELECT id FROM machine_agents WHERE id = 'a1'") == []
    until("app_regions empty", lambda: fleet.query("SELECT app FROM app_regions") == [])
