"""The proxy end to end: a real agent process, real upstream HTTP servers, the proxy as a subprocess.

Every wait is bounded; every process is stopped at the end of the module.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from _api_util import WAIT, free_port, write_config
from verdigris.admin import AdminError, admin_call
from verdigris.config import load_config

VERDIGRIS = str(Path(sys.executable).with_name("verdigris"))
PLATFORM_SQL = (Path(__file__).parent.parent / "schemas" / "platform.sql").read_text()

UPSTREAM_NAME = web.AppKey("upstream_name", str)
"""Which test upstream answered (each tiny upstream server is named)."""


# ---------------------------------------------------------------------------------------- processes


class Agent:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.settings = load_config(config)
        self.url = f"http://127.0.0.1:{self.settings.api.addr.port}"
        self.log = open(config.parent / "agent.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [VERDIGRIS, "agent", "-c", str(config)], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + WAIT
        while True:
            assert self.proc.poll() is None, "agent exited"
            try:
                if admin_call(self.settings.admin.path, {"cmd": "ping"}, 1.0).get("ok"):
                    break
            except AdminError:
                pass
            assert time.monotonic() < deadline, "agent did not start"
            time.sleep(0.05)

    def exec(self, *statements: tuple[str, list[Any]]) -> None:
        body = json.dumps([[sql, params] for sql, params in statements]).encode()
        req = urllib.request.Request(
            self.url + "/v1/transactions", body, {"content-type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(req, timeout=WAIT) as resp:
            assert resp.status == 200

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        self.log.close()


class Proxy:
    def __init__(self, tmp: Path, agent_url: str, *, workers: int = 2, name: str = "proxy") -> None:
        self.port = free_port()
        self.config = tmp / f"{name}.toml"
        self.config.write_text(
            "[proxy]\n"
            f'listen = "127.0.0.1:{self.port}"\n'
            f"workers = {workers}\n"
            f'agent = "{agent_url}"\n'
            'region = "ams"\n'
            "[proxy.timeouts]\n"
            "connect = 1.0\nresponse = 5.0\nqueue = 0.4\ndrain = 5.0\nheader_read = 0.5\n"
        )
        self.log = open(tmp / f"{name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [VERDIGRIS, "proxy", "-c", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT
        )

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=WAIT)

    def get(self, host: str, path: str = "/", headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
        c = self.conn()
        try:
            c.request("GET", path, headers={"Host": host, **(headers or {})})
            r = c.getresponse()
            body = r.read()
            return r.status, r.headers, body
        finally:
            c.close()

    def wait_routes(self, host: str) -> Any:
        deadline = time.monotonic() + WAIT
        last: Any = None
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"proxy exited with {self.proc.returncode}"
            try:
                last = self.get(host)
                if last[0] == 200:
                    return json.loads(last[2])
            except OSError as e:
                last = e
            time.sleep(0.05)
        raise AssertionError(f"{host} never routed: {last}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        self.log.close()
        return self.proc.returncode


# ---------------------------------------------------------------------------------------- upstreams


async def _echo(request: web.Request) -> web.StreamResponse:
    name = request.app[UPSTREAM_NAME]
    if "s" in request.query:
        await asyncio.sleep(float(request.query["s"]))
    if request.query.get("replay_from") == name and "fly-replay-src" not in request.headers:
        await request.read()
        if "json" in request.query:
            return web.Response(
                body=json.dumps({"instance": request.query["replay_to"]}).encode(),
                content_type="application/vnd.fly.replay+json",
            )
        return web.Response(
            status=307,
            text="replay me",
            headers={"fly-replay": f"instance={request.query['replay_to']};state=abc"},
        )
    if request.path == "/500":
        return web.Response(status=500, text="boom")
    if request.path == "/die":  # dies mid-response
        resp = web.StreamResponse(headers={"content-length": "100000"})
        await resp.prepare(request)
        await resp.write(b"z" * 1000)
        assert request.transport is not None
        request.transport.abort()
        return resp
    body = await request.read()
    peer = request.transport.get_extra_info("peername") if request.transport else None
    doc = {
        "server": name,
        "method": request.method,
        "path": request.path_qs,
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "body_len": len(body),
        "peer_port": peer[1] if peer else None,
    }
    if request.path == "/stream":
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(50):
            await resp.write(b"%04d" % i * 256)
        await resp.write_eof()
        return resp
    return web.json_response(doc)


class Upstreams:
    """aiohttp servers in a thread of their own, each answering with its name."""

    def __init__(self, names: list[str]) -> None:
        self.loop = asyncio.new_event_loop()
        self.ports: dict[str, int] = {n: free_port() for n in names}
        self.runners: list[web.AppRunner] = []
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(WAIT)

    async def _start(self) -> None:
        async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(65536)
            writer.write(b"SSH-2.0-not-http\r\n\r\n")
            await writer.drain()
            writer.close()

        self.garbage_port = free_port()
        self.garbage = await asyncio.start_server(garbage, "127.0.0.1", self.garbage_port)
        for name, port in self.ports.items():
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app[UPSTREAM_NAME] = name
            app.router.add_route("*", "/{tail:.*}", _echo)
            runner = web.AppRunner(app, keepalive_timeout=0.2 if name == "D" else 75.0)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            self.runners.append(runner)

    def close(self) -> None:
        async def stop() -> None:
            self.garbage.close()
            for r in self.runners:
                await r.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(WAIT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)


# ---------------------------------------------------------------------------------------- fixture


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.upstreams = Upstreams(["A", "B", "C", "D"])
        self.agent_config = write_config(tmp, port=free_port(), schema=PLATFORM_SQL)
        self.agent = Agent(self.agent_config)
        self.dead_port = free_port()
        p = self.upstreams.ports
        machine = "INSERT INTO machines (id, app, region, state, address) VALUES (?, ?, 'ams', 'started', ?)"
        self.agent.exec(
            ("INSERT INTO apps (name, org) VALUES (?, 'o')", ["web"]),
            ("INSERT INTO apps (name, org) VALUES (?, 'o')", ["solo"]),
            ("INSERT INTO apps (name, org) VALUES (?, 'o')", ["dead"]),
            ("INSERT INTO apps (name, org) VALUES (?, 'o')", ["junk"]),
            ("INSERT INTO apps (name, org) VALUES (?, 'o')", ["stale"]),
            ("INSERT INTO hostnames (hostname, app) VALUES (?, ?)", ["stale.test", "stale"]),
            (machine, ["k1", "stale", f"127.0.0.1:{p['D']}"]),
            ("INSERT INTO hostnames (hostname, app) VALUES (?, ?)", ["junk.test", "junk"]),
            (machine, ["j1", "junk", f"127.0.0.1:{self.upstreams.garbage_port}"]),
            ("INSERT INTO apps (name, org, soft_limit, hard_limit) VALUES (?, 'o', 1, 1)", ["limited"]),
            ("INSERT INTO hostnames (hostname, app) VALUES (?, ?)", ["web.test", "web"]),
            ("INSERT INTO hostnames (hostname, app) VALUES (?, ?)", ["*.solo.test", "solo"]),
            ("INSERT INTO hostnames (hostname, app) VALUES (?, ?)", ["dead.test", "dead"]),
            ("INSERT INTO hostnames (hostname, app) VALUES (?, ?)", ["limited.test", "limited"]),
            (machine, ["w1", "web", f"127.0.0.1:{p['A']}"]),
            (machine, ["w2", "web", f"127.0.0.1:{p['B']}"]),
            (machine, ["s1", "solo", f"127.0.0.1:{p['C']}"]),
            (machine, ["d1", "dead", f"127.0.0.1:{self.dead_port}"]),
            (machine, ["l1", "limited", f"127.0.0.1:{p['A']}"]),
            (machine, ["l2", "limited", f"127.0.0.1:{p['B']}"]),
        )
        self.proxy = Proxy(tmp, self.agent.url)
        self.proxy.wait_routes("web.test")

    def close(self) -> None:
        for part in ("proxy", "agent", "upstreams"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.stop() if part != "upstreams" else obj.close()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env.__new__(Env)
    try:
        e.__init__(tmp_path_factory.mktemp("proxy"))  # type: ignore[misc]
        yield e
    finally:
        e.close()  # also after a failed start: nothing is left running


# ---------------------------------------------------------------------------------------- tests


def test_routes_by_host_and_sets_forwarding_headers(env: Env) -> None:
    seen = set()
    for _ in range(20):
        status, headers, body = env.proxy.get(
            "web.test", "/x?y=1", {"Fly-Client-IP": "6.6.6.6", "X-Forwarded-For": "6.6.6.6", "Via": "1.0 a"}
        )
        assert status == 200
        doc = json.loads(body)
        seen.add(doc["server"])
        h = doc["headers"]
        assert doc["path"] == "/x?y=1"
        assert h["fly-client-ip"] == "127.0.0.1" and h["x-forwarded-for"] == "127.0.0.1"
        assert h["x-forwarded-proto"] == "http" and h["x-forwarded-port"] == str(env.proxy.port)
        assert h["fly-region"] == "ams" and h["via"] == "1.0 a, 1.1 verdigris"
        assert h["fly-request-id"] == headers["fly-request-id"]
        assert "verdigris" in headers["via"]
    assert seen == {"A", "B"}  # both instances of web (random ties among the least loaded)
    # a wildcard host name
    status, _, body = env.proxy.get("api.solo.test")
    assert status == 200 and json.loads(body)["server"] == "C"


def test_unknown_host_is_a_clear_error(env: Env) -> None:
    status, headers, body = env.proxy.get("nope.test")
    assert status == 404
    assert headers["fly-error-code"] == "no_such_app"
    assert body.decode().startswith("no_such_app: no app is registered for host 'nope.test'")
    status, headers, _ = env.proxy.get("web.test", headers={"fly-force-instance-id": "???"})
    assert status == 400 and headers["fly-error-code"] == "bad_routing_header"
    c = env.proxy.conn()  # a refused request with a small body: the connection stays usable
    try:
        c.request("POST", "/", body=b"data", headers={"Host": "nope.test"})
        r = c.getresponse()
        assert r.status == 404 and r.read().startswith(b"no_such_app")
        c.request("GET", "/", headers={"Host": "web.test"})
        assert c.getresponse().status == 200
    finally:
        c.close()


def test_keep_alive_both_sides(env: Env) -> None:
    c = env.proxy.conn()
    try:
        ports = set()
        for _ in range(5):
            c.request("GET", "/", headers={"Host": "x.solo.test"})
            r = c.getresponse()
            assert r.status == 200
            ports.add(json.loads(r.read())["peer_port"])
            sock = c.sock
        assert c.sock is sock  # one client connection throughout
        assert len(ports) == 1  # and one upstream connection, reused from the worker's pool
    finally:
        c.close()


def test_chunked_bodies_streamed_both_ways(env: Env) -> None:
    chunk = b"x" * 65536

    def gen() -> Iterator[bytes]:
        for _ in range(48):  # 3 MiB: above the replay buffer
            yield chunk

    c = env.proxy.conn()
    try:
        c.request("POST", "/upload", body=gen(), headers={"Host": "web.test"}, encode_chunked=True)
        r = c.getresponse()
        doc = json.loads(r.read())
        assert r.status == 200
        assert doc["body_len"] == 48 * 65536 and doc["headers"]["transfer-encoding"] == "chunked"
        # a Content-Length body on the same connection
        c.request("PUT", "/p", body=b"hello", headers={"Host": "web.test"})
        r = c.getresponse()
        doc = json.loads(r.read())
        assert doc["body_len"] == 5 and doc["headers"]["content-length"] == "5"
        c.request("GET", "/stream", headers={"Host": "web.test"})
        r = c.getresponse()
        assert r.headers["transfer-encoding"] == "chunked"
        assert r.read() == b"".join(b"%04d" % i * 256 for i in range(50))
    finally:
        c.close()


def test_upstream_down_is_a_clear_error_then_ejected(env: Env) -> None:
    c = env.proxy.conn()  # one connection: one worker, whose passive health counts the failures
    try:
        codes = []
        for _ in range(4):
            c.request("GET", "/", headers={"Host": "dead.test"})
            r = c.getresponse()
            body = r.read().decode()
            codes.append((r.status, r.headers["fly-error-code"]))
        assert codes[:3] == [(502, "upstream_refused")] * 3
        assert "d1 refused the connection" in body or codes[3] == (503, "no_healthy_instance")
        assert codes[3] == (503, "no_healthy_instance")  # ejected after 3 connect failures
    finally:
        c.close()


def test_fly_replay_to_another_instance(env: Env) -> None:
    c = env.proxy.conn()
    try:
        c.request(
            "POST",
            "/r?replay_from=A&replay_to=w2",
            body=b"payload",
            headers={"Host": "web.test", "fly-force-instance-id": "w1", "fly-replay-src": "forged"},
        )
        r = c.getresponse()
        doc = json.loads(r.read())
        assert r.status == 200 and "fly-replay" not in r.headers
        assert doc["server"] == "B" and doc["body_len"] == 7
        src = doc["headers"]["fly-replay-src"]
        assert src.startswith("instance=w1;region=ams;t=") and src.endswith(";state=abc")
    finally:
        c.close()


def test_fly_replay_json_body_and_body_too_large(env: Env) -> None:
    c = env.proxy.conn()
    try:
        c.request(
            "GET",
            "/r?replay_from=B&replay_to=w1&json=1",
            headers={"Host": "web.test", "fly-force-instance-id": "w2"},
        )
        r = c.getresponse()
        doc = json.loads(r.read())
        assert r.status == 200 and doc["server"] == "A"
        assert doc["headers"]["fly-replay-src"].startswith("instance=w2;region=ams;t=")
        big = b"y" * (
            2 * 1024 * 1024
        )  # over the 1 MiB replay buffer: a clear error, never a truncated request
        c.request(
            "POST",
            "/r?replay_from=A&replay_to=w2",
            body=big,
            headers={"Host": "web.test", "fly-force-instance-id": "w1"},
        )
        r = c.getresponse()
        body = r.read()
        assert r.status == 413 and r.headers["fly-error-code"] == "replay_body_too_large", body
        assert "fly-replay" not in r.headers
    finally:
        c.close()


def test_hard_limit_least_loaded_and_queue_timeout(env: Env) -> None:
    proxy = Proxy(env.tmp, env.agent.url, workers=1, name="proxy1")
    try:
        proxy.wait_routes("limited.test")

        def slow(delay: float) -> tuple[int, str]:
            time.sleep(delay)
            status, headers, body = proxy.get("limited.test", "/?s=1.0")
            return status, json.loads(body)["server"] if status == 200 else headers["fly-error-code"]

        with ThreadPoolExecutor(3) as pool:
            results = list(pool.map(slow, [0.0, 0.1, 0.2]))
        # least loaded: the second request goes to the other instance; the third finds both at their
        # hard limit (1), waits 0.4 s and gets a 503
        assert sorted(r for r in results if r[0] == 200) == [(200, "A"), (200, "B")]
        assert (503, "queue_timeout") in results
    finally:
        assert proxy.stop() == 0


def test_keeps_serving_without_the_agent_and_resumes(env: Env) -> None:
    env.agent.stop()
    for host in ("web.test", "x.solo.test"):
        status, _, _ = env.proxy.get(host)
        assert status == 200
    env.agent = Agent(env.agent_config)  # same database: the subscriptions resume
    env.agent.exec(("INSERT INTO hostnames (hostname, app) VALUES (?, ?)", ["late.test", "web"]))
    assert env.proxy.wait_routes("late.test")["server"] in ("A", "B")


def test_slow_headers_time_out_and_bad_requests_are_refused(env: Env) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", env.proxy.port), timeout=WAIT) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: web.test\r\n")  # and never the end of the headers
        t0 = time.monotonic()
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        assert data.startswith(b"HTTP/1.1 408 ") and b"header_timeout" in data
        assert time.monotonic() - t0 < 3.0
    with socket.create_connection(("127.0.0.1", env.proxy.port), timeout=WAIT) as s:
        # request smuggling: Content-Length with Transfer-Encoding is refused, never forwarded
        s.sendall(
            b"POST / HTTP/1.1\r\nHost: web.test\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\n"
        )
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        assert data.startswith(b"HTTP/1.1 400 ") and b"bad_request" in data
    with socket.create_connection(("127.0.0.1", env.proxy.port), timeout=WAIT) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: web.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        assert data.startswith(b"HTTP/1.1 501 ") and b"upgrade_not_supported" in data


def test_upstream_5xx_passes_through(env: Env) -> None:
    status, headers, body = env.proxy.get("x.solo.test", "/500")
    assert status == 500 and body == b"boom" and "fly-error-code" not in headers


def test_backend_garbage_and_death_mid_response(env: Env) -> None:
    status, headers, body = env.proxy.get("junk.test")
    assert status == 502 and headers["fly-error-code"] == "upstream_bad_response", body
    c = env.proxy.conn()
    try:
        c.request("GET", "/die", headers={"Host": "x.solo.test"})
        r = c.getresponse()
        assert r.status == 200
        with pytest.raises(http.client.IncompleteRead):
            r.read()  # the client sees a truncated response, never a complete-looking one
    finally:
        c.close()
    assert env.proxy.get("x.solo.test")[0] == 200  # and the proxy keeps serving


def test_upstream_closing_idle_connections_is_not_an_error(env: Env) -> None:
    c = env.proxy.conn()  # one client connection: one worker and its pool
    try:
        for _ in range(3):
            c.request("POST", "/", body=b"abc", headers={"Host": "stale.test"})
            r = c.getresponse()
            assert r.status == 200 and json.loads(r.read())["body_len"] == 3
            time.sleep(0.4)  # D closes idle keep-alive connections after 0.2 s
    finally:
        c.close()


def test_proxy_config_is_validated(tmp_path: Path) -> None:
    from verdigris.proxy.config import ProxyConfigError, load_proxy_config

    good = tmp_path / "good.toml"
    good.write_text('[proxy]\nworkers = 3\nregion = "fra"\n[proxy.timeouts]\nqueue = 2\n')
    cfg = load_proxy_config(good)
    assert (
        cfg.workers == 3 and cfg.region == "fra" and cfg.timeouts.queue == 2.0 and cfg.timeouts.connect == 5.0
    )
    bad = tmp_path / "bad.toml"
    bad.write_text('[proxy]\nworkerz = 3\nagent = "ftp://x"\n[proxy.timeouts]\nidle = -1\n')
    with pytest.raises(ProxyConfigError) as e:
        load_proxy_config(bad)
    lines = str(e.value).splitlines()
    assert len(lines) == 3 and "proxy.workerz: unknown key" in lines[0]
    result = subprocess.run(
        [VERDIGRIS, "proxy", "-c", str(bad)], capture_output=True, text=True, timeout=WAIT
    )
    assert result.returncode == 2 and result.stderr.startswith("error: ")


def test_sigterm_drains_in_flight_requests(env: Env) -> None:
    out: list[int] = []
    t = threading.Thread(target=lambda: out.append(env.proxy.get("web.test", "/?s=0.8")[0]))
    t.start()
    time.sleep(0.3)
    assert env.proxy.stop() == 0
    t.join(WAIT)
    assert out == [200]


def test_worker_table_shares_limits_between_workers() -> None:
    from verdigris.proxy.server import WorkerTable

    table = WorkerTable(workers=2)
    assert table.load("apps", [["web", "o", "requests", 20, 25], ["free", "o", "requests", 0, 0]]) == []
    web, free = table.app("web"), table.app("free")
    assert web is not None and (web.soft_limit, web.hard_limit) == (10, 13)
    assert free is not None and (free.soft_limit, free.hard_limit) == (0, 0)  # 0 stays "no limit"
    assert WorkerTable(workers=1).app("web") is None
