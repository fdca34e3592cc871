"""Shared pieces of the proxy's end-to-end tests: a real agent process, tiny aiohttp upstreams in a
thread, the proxy as a subprocess, and :class:`Env` that wires them on ``schemas/platform.sql``.

Every wait is bounded by ``WAIT``; :meth:`Env.close` stops every process it started.
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
from pathlib import Path
from typing import IO, Any

from aiohttp import web

from _api_util import WAIT, free_port, write_config
from verdigris.admin import AdminError, admin_call
from verdigris.config import load_config

VERDIGRIS = str(Path(sys.executable).with_name("verdigris"))
PLATFORM_SQL = (Path(__file__).parent.parent / "schemas" / "platform.sql").read_text()

UPSTREAM_NAME = web.AppKey("upstream_name", str)
"""Which test upstream answered (each tiny upstream server is named)."""


# ---------------------------------------------------------------------------------------- processes


def stop_process(proc: subprocess.Popen[bytes], log: IO[bytes] | None = None, timeout: float = WAIT) -> int:
    """SIGTERM (a kill if it does not exit within ``timeout``), then close its log (if any); its exit
    code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    if log is not None:
        log.close()
    return proc.returncode


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
        stop_process(self.proc, self.log)


class Proxy:
    def __init__(
        self,
        tmp: Path,
        agent_url: str,
        *,
        workers: int = 2,
        name: str = "proxy",
        region: str = "ams",
        extra: str = "",
        timeouts: str = "connect = 1.0\nresponse = 5.0\nqueue = 0.4\ndrain = 5.0\nheader_read = 0.5\n",
    ) -> None:
        """``extra``: more lines of the ``[proxy]`` section; ``timeouts``: the ``[proxy.timeouts]`` lines."""
        self.port = free_port()
        self.config = tmp / f"{name}.toml"
        self.config.write_text(
            "[proxy]\n"
            f'listen = "127.0.0.1:{self.port}"\n'
            f"workers = {workers}\n"
            f'agent = "{agent_url}"\n'
            f'region = "{region}"\n' + extra + "[proxy.timeouts]\n" + timeouts
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
        streak = 0  # each get is a new connection, which the kernel spreads over the workers: several
        while time.monotonic() < deadline:  # in a row make "every worker has its table" very likely
            assert self.proc.poll() is None, f"proxy exited with {self.proc.returncode}"
            try:
                last = self.get(host)
                if last[0] == 200:
                    streak += 1
                    if streak >= 8:
                        return json.loads(last[2])
                    continue
            except OSError as e:
                last = e
            streak = 0
            time.sleep(0.05)
        raise AssertionError(f"{host} never routed: {last}")

    def stop(self) -> int:
        return stop_process(self.proc, self.log)


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
