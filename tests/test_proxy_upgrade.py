"""The proxy's WebSocket (HTTP Upgrade) tunnels, the send timeout for clients that stop reading, and the
request-line limit (414), end to end: a real agent process, a real aiohttp WebSocket upstream registered
as a machine through the agent API, and the proxy as a subprocess (one worker, so that per-worker limits
are the app's).

Every wait is bounded (``WAIT``); every process and thread is stopped at the end of the module.
"""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from _api_util import WAIT, free_port, write_config
from _proxy_env import PLATFORM_SQL, VERDIGRIS, Agent, Proxy

pytestmark = pytest.mark.timeout(60)

TUNNEL_IDLE = 1.5
SEND = 0.5
MIB = 1024 * 1024


# ---------------------------------------------------------------------------------------- upstream


class WsUpstream:
    """An aiohttp server in a thread of its own: ``/ws`` a WebSocket echo, ``/refuse`` a plain 403 to an
    upgrade, ``/big`` an endless streamed body; and a raw server answering 101 with ``Upgrade: h2c``.
    What happens there is reported through thread-safe queues / events."""

    def __init__(self) -> None:
        self.port = free_port()
        self.h2c_port = free_port()
        self.ended: queue.Queue[dict[str, Any]] = queue.Queue()
        """One entry per WebSocket handler that returned (the tunnel's upstream end closed)."""
        self.big_aborted = threading.Event()
        self.big_started = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(WAIT)

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=4 * MIB)
        if not ws.can_prepare(request).ok:
            return web.json_response({"server": "ws", "headers": dict(request.headers)})
        await ws.prepare(request)
        headers = {k.lower(): v for k, v in request.headers.items()}
        by_upstream = False
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                if msg.data == "close":
                    by_upstream = True
                    await ws.close(code=4001, message=b"bye")
                    break
                if msg.data == "headers":
                    await ws.send_str(json.dumps(headers))
                else:
                    await ws.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        self.ended.put({"close_code": ws.close_code, "by_upstream": by_upstream})
        return ws

    async def _refuse(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=403, text="no websockets here")

    async def _big(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"content-type": "application/octet-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        self.big_started.set()
        chunk = b"b" * 65536
        try:
            for _ in range(8192):  # 512 MiB: far more than every buffer on the way can hold
                await resp.write(chunk)
        except (ConnectionError, RuntimeError):
            self.big_aborted.set()
        except asyncio.CancelledError:
            self.big_aborted.set()
            raise
        return resp

    async def _other(self, request: web.Request) -> web.StreamResponse:
        return web.json_response({"server": "ws", "path": request.path_qs})

    async def _start(self) -> None:
        async def h2c(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n")
            await writer.drain()
            await reader.read()
            writer.close()

        self.h2c = await asyncio.start_server(h2c, "127.0.0.1", self.h2c_port)
        app = web.Application()
        app.router.add_get("/ws", self._ws)
        app.router.add_get("/refuse", self._refuse)
        app.router.add_get("/big", self._big)
        app.router.add_route("*", "/{tail:.*}", self._other)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def next_ended(self) -> dict[str, Any]:
        return self.ended.get(timeout=WAIT)

    async def wait_ended(self) -> dict[str, Any]:
        return await asyncio.to_thread(self.next_ended)

    def close(self) -> None:
        async def stop() -> None:
            self.h2c.close()
            await self.runner.cleanup()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(WAIT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)


class TunnelProxy(Proxy):
    """The proxy with this module's settings: one worker, short tunnel idle and send timeouts."""

    def __init__(self, tmp: Path, agent_url: str, *, name: str, timeouts: str) -> None:
        self.port = free_port()
        self.config = tmp / f"{name}.toml"
        self.config.write_text(
            "[proxy]\n"
            f'listen = "127.0.0.1:{self.port}"\n'
            "workers = 1\n"
            f'agent = "{agent_url}"\n'
            'region = "ams"\n'
            "[proxy.timeouts]\n" + timeouts
        )
        self.log = open(tmp / f"{name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [VERDIGRIS, "proxy", "-c", str(self.config)], stdout=self.log, stderr=subprocess.STDOUT
        )


TIMEOUTS = (
    f"connect = 1.0\nresponse = 5.0\nqueue = 1.0\ndrain = 0.5\nheader_read = 2.0\n"
    f"send = {SEND}\ntunnel_idle = {TUNNEL_IDLE}\n"
)


class WsEnv:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.upstream = WsUpstream()
        self.agent = Agent(write_config(tmp, port=free_port(), schema=PLATFORM_SQL))
        machine = "INSERT INTO machines (id, app, region, state, address) VALUES (?, ?, 'ams', 'started', ?)"
        app = "INSERT INTO apps (name, org, soft_limit, hard_limit) VALUES (?, 'o', ?, ?)"
        host = "INSERT INTO hostnames (hostname, app) VALUES (?, ?)"
        addr = f"127.0.0.1:{self.upstream.port}"
        self.agent.exec(
            (app, ["chat", 20, 25]),
            (host, ["chat.test", "chat"]),
            (machine, ["c1", "chat", addr]),
            (app, ["one", 1, 1]),  # one connection at a time: a tunnel holds the slot while open
            (host, ["one.test", "one"]),
            (machine, ["o1", "one", addr]),
            (
                "INSERT INTO apps (name, org, concurrency, soft_limit, hard_limit) VALUES (?, 'o', ?, 1, 1)",
                ["conn", "connections"],
            ),
            (host, ["conn.test", "conn"]),
            (machine, ["n1", "conn", addr]),
            (app, ["h2", 20, 25]),
            (host, ["h2.test", "h2"]),
            (machine, ["h1", "h2", f"127.0.0.1:{self.upstream.h2c_port}"]),
        )
        self.proxy = TunnelProxy(tmp, self.agent.url, name="proxy", timeouts=TIMEOUTS)
        self.proxy.wait_routes("chat.test")
        self.proxy.wait_routes("one.test")

    def url(self, path: str = "/ws", proxy: Proxy | None = None) -> str:
        return f"http://127.0.0.1:{(proxy or self.proxy).port}{path}"

    def close(self) -> None:
        for part in ("proxy", "agent", "upstream"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.close() if part == "upstream" else obj.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WsEnv]:
    e = WsEnv.__new__(WsEnv)
    try:
        e.__init__(tmp_path_factory.mktemp("upgrade"))  # type: ignore[misc]
        yield e
    finally:
        e.close()  # also after a failed start: nothing is left running


def raw_exchange(port: int, data: bytes, *, rcvbuf: int | None = None) -> bytes:
    """Send ``data`` on a new connection and read until the proxy closes it."""
    with socket.socket() as s:
        if rcvbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.settimeout(WAIT)
        s.connect(("127.0.0.1", port))
        s.sendall(data)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


UPGRADE_HEAD = (
    "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: keep-alive, Upgrade\r\nUpgrade: {token}\r\n"
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
)


def masked_text_frame(text: str) -> bytes:
    payload = text.encode()
    assert len(payload) < 126
    mask = b"\x01\x02\x03\x04"
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


# ---------------------------------------------------------------------------------------- WebSocket


async def test_websocket_text_binary_and_large_messages(env: WsEnv) -> None:
    async with asyncio.timeout(WAIT), aiohttp.ClientSession() as session:
        async with session.ws_connect(env.url(), headers={"Host": "chat.test"}, max_msg_size=4 * MIB) as ws:
            assert ws._response.headers["via"].endswith("1.1 verdigris")
            assert ws._response.headers["fly-request-id"]
            await ws.send_str("hello")
            assert await ws.receive_str() == "echo:hello"
            await ws.send_bytes(b"\x00\x01\x02")
            assert await ws.receive_bytes() == b"\x00\x01\x02"
            await ws.send_str("headers")
            seen = json.loads(await ws.receive_str())
            assert seen["upgrade"] == "websocket" and "upgrade" in seen["connection"].lower()
            assert seen["x-forwarded-for"] == "127.0.0.1" and seen["fly-region"] == "ams"
            assert seen["fly-request-id"] == ws._response.headers["fly-request-id"]
            big = bytes(range(256)) * (4 * 1024)  # 1 MiB each way
            assert len(big) == MIB
            for _ in range(3):
                await ws.send_bytes(big)
                assert await ws.receive_bytes() == big
            text = "é" * (MIB // 2)
            await ws.send_str(text)
            assert await ws.receive_str() == "echo:" + text
        # the client closed: the upstream's end of the tunnel closes too
        assert (await env.upstream.wait_ended()) == {"close_code": 1000, "by_upstream": False}


@pytest.mark.parametrize("host", ["one.test", "conn.test"])  # concurrency: requests / connections
async def test_upstream_close_ends_the_tunnel_and_releases_the_slot(env: WsEnv, host: str) -> None:
    async with asyncio.timeout(WAIT), aiohttp.ClientSession() as session:
        ws = await session.ws_connect(env.url(), headers={"Host": host})
        await ws.send_str("x")
        assert await ws.receive_str() == "echo:x"
        # hard_limit = 1: while the tunnel is open a second one waits for the slot, then gives up
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await session.ws_connect(env.url(), headers={"Host": host})
        assert e.value.status == 503 and e.value.headers is not None
        assert e.value.headers["fly-error-code"] == "queue_timeout"
        await ws.send_str("close")  # the upstream closes (code 4001)
        msg = await ws.receive()
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4001
        await ws.close()
        assert (await env.upstream.wait_ended())["by_upstream"]
        # the slot was released when the tunnel ended: a second WebSocket (queued until then if need be)
        async with session.ws_connect(env.url(), headers={"Host": host}) as ws2:
            await ws2.send_str("again")
            assert await ws2.receive_str() == "echo:again"
        await env.upstream.wait_ended()
        # and again after a client-side close
        async with session.ws_connect(env.url(), headers={"Host": host}) as ws3:
            await ws3.send_bytes(b"3")
            assert await ws3.receive_bytes() == b"3"
        await env.upstream.wait_ended()


async def test_bytes_after_the_head_are_forwarded_first(env: WsEnv) -> None:
    """A client that sends a frame right behind the upgrade head (same packet): it reaches the
    instance, which answers it after its 101."""

    def run() -> bytes:
        head = UPGRADE_HEAD.format(path="/ws", host="chat.test", token="WebSocket").encode()
        with socket.create_connection(("127.0.0.1", env.proxy.port), timeout=WAIT) as s:
            s.sendall(head + masked_text_frame("early"))
            data = b""
            want = b"\x81\x0aecho:early"
            while want not in data:
                chunk = s.recv(65536)
                assert chunk, data
                data += chunk
            s.sendall(bytes([0x88, 0x82]) + b"\0\0\0\0" + b"\x03\xe8")  # close, 1000
            while s.recv(65536):
                pass
            return data

    data = await asyncio.to_thread(run)
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0] == b"http/1.1 101 switching protocols"
    assert b"upgrade: websocket" in lines and b"connection: upgrade" in lines
    assert b"sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=" in lines
    assert any(line.startswith(b"fly-request-id: ") for line in lines)
    assert rest == b"\x81\x0aecho:early"
    await env.upstream.wait_ended()


async def test_refused_upgrade_is_delivered_as_a_response(env: WsEnv) -> None:
    head = UPGRADE_HEAD.format(path="/refuse", host="chat.test", token="websocket").encode()
    data = await asyncio.to_thread(raw_exchange, env.proxy.port, head)  # and the connection closes
    head_part, _, body = data.partition(b"\r\n\r\n")
    assert head_part.startswith(b"HTTP/1.1 403 ")
    assert b"connection: close" in head_part.lower() and body == b"no websockets here"
    async with asyncio.timeout(WAIT), aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.WSServerHandshakeError) as e:
            await session.ws_connect(env.url("/refuse"), headers={"Host": "chat.test"})
        assert e.value.status == 403


async def test_other_upgrades_are_refused(env: WsEnv) -> None:
    h2c = (
        b"GET / HTTP/1.1\r\nHost: chat.test\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    for request, reason in [
        (h2c, b"h2c upgrades are not tunnelled"),
        (
            UPGRADE_HEAD.format(path="/", host="chat.test", token="foo/2").encode(),
            b"only 'Upgrade: websocket'",
        ),
        (b"CONNECT chat.test:443 HTTP/1.1\r\nHost: chat.test:443\r\n\r\n", b"CONNECT is not supported"),
    ]:
        data = await asyncio.to_thread(raw_exchange, env.proxy.port, request)
        assert data.startswith(b"HTTP/1.1 501 ") and b"upgrade_not_supported" in data and reason in data, data
    # an instance that switches to another protocol than websocket: never tunnelled
    head = UPGRADE_HEAD.format(path="/", host="h2.test", token="websocket").encode()
    data = await asyncio.to_thread(raw_exchange, env.proxy.port, head)
    assert data.startswith(b"HTTP/1.1 502 ") and b"upstream_bad_response" in data and b"h2c" in data, data


async def test_idle_tunnel_is_closed(env: WsEnv) -> None:
    async with asyncio.timeout(WAIT), aiohttp.ClientSession() as session:
        async with session.ws_connect(env.url(), headers={"Host": "chat.test"}) as ws:
            await ws.send_str("ping")
            assert await ws.receive_str() == "echo:ping"
            t0 = time.monotonic()
            msg = await ws.receive()  # nothing moves: the proxy closes the tunnel
            elapsed = time.monotonic() - t0
            assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR)
            assert TUNNEL_IDLE - 0.2 <= elapsed < TUNNEL_IDLE + 3.0
        await env.upstream.wait_ended()


async def test_sigterm_closes_tunnels_after_drain(env: WsEnv) -> None:
    timeouts = TIMEOUTS.replace(f"tunnel_idle = {TUNNEL_IDLE}", "tunnel_idle = 60")
    proxy = TunnelProxy(env.tmp, env.agent.url, name="drain", timeouts=timeouts)
    try:
        await asyncio.to_thread(proxy.wait_routes, "chat.test")
        async with asyncio.timeout(WAIT), aiohttp.ClientSession() as session:
            ws = await session.ws_connect(env.url(proxy=proxy), headers={"Host": "chat.test"})
            await ws.send_str("a")
            assert await ws.receive_str() == "echo:a"
            proxy.proc.send_signal(signal.SIGTERM)
            t0 = time.monotonic()
            await ws.send_str("b")  # the tunnel still works while the worker drains
            assert await ws.receive_str() == "echo:b"
            msg = await ws.receive()  # then it is closed, after drain (0.5 s)
            assert time.monotonic() - t0 >= 0.4
            assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR)
            await ws.close()
            assert await asyncio.to_thread(proxy.proc.wait, WAIT) == 0
        await env.upstream.wait_ended()
    finally:
        proxy.stop()


# ---------------------------------------------------------------------------------------- slow reader


async def test_client_that_stops_reading_is_aborted(env: WsEnv) -> None:
    env.upstream.big_aborted.clear()
    env.upstream.big_started.clear()

    def run() -> tuple[int, float]:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.settimeout(WAIT)
            s.connect(("127.0.0.1", env.proxy.port))
            s.sendall(b"GET /big HTTP/1.1\r\nHost: one.test\r\n\r\n")
            assert env.upstream.big_started.wait(WAIT)
            t0 = time.monotonic()
            # read nothing: the proxy gives up after `send` seconds and drops the upstream connection
            assert env.upstream.big_aborted.wait(WAIT)
            elapsed = time.monotonic() - t0
            got = 0
            try:
                while chunk := s.recv(1 << 20):
                    got += len(chunk)
            except ConnectionResetError:
                pass  # aborted: what was buffered may or may not be readable first
            return got, elapsed

    got, elapsed = await asyncio.to_thread(run)
    assert got < 256 * MIB  # a truncated response: the client was cut off
    assert SEND - 0.1 <= elapsed < SEND + 5.0
    # the slot of the hard_limit = 1 app was released: the next request is served, not queued out
    status, _, body = await asyncio.to_thread(env.proxy.get, "one.test", "/after")
    assert status == 200 and json.loads(body)["path"] == "/after"


# ---------------------------------------------------------------------------------------- limits


async def test_request_line_too_long_is_414_and_headers_too_large_431(env: WsEnv) -> None:
    def req(path: str, extra: str = "") -> bytes:
        return f"GET {path} HTTP/1.1\r\nHost: chat.test\r\n{extra}\r\n".encode()

    ok = "/" + "a" * 8100  # the request line is 8,113 bytes: under 8,192
    status, _, body = await asyncio.to_thread(env.proxy.get, "chat.test", ok)
    assert status == 200 and json.loads(body)["path"] == ok
    # (sizes that one read takes whole: the proxy closes with nothing unread, so no reset hides the answer)
    for path in ("/" + "a" * 8200, "/" + "a" * 50_000):
        data = await asyncio.to_thread(raw_exchange, env.proxy.port, req(path))  # closed after it
        assert data.startswith(b"HTTP/1.1 414 ") and b"uri_too_long" in data, data[:200]
        assert b"connection: close" in data
    # a short request line, but headers beyond max_header_bytes (64 KiB)
    many = "".join(f"x-h{i}: {'v' * 1000}\r\n" for i in range(70))
    data = await asyncio.to_thread(raw_exchange, env.proxy.port, req("/", many))
    assert data.startswith(b"HTTP/1.1 431 ") and b"headers_too_large" in data, data[:200]


def test_new_settings_are_validated(tmp_path: Path) -> None:
    from verdigris.proxy.config import ProxyConfig, ProxyConfigError, load_proxy_config

    good = tmp_path / "good.toml"
    good.write_text("[proxy]\nmax_request_line_bytes = 4096\n[proxy.timeouts]\nsend = 2\ntunnel_idle = 30\n")
    cfg = load_proxy_config(good)
    assert cfg.max_request_line_bytes == 4096
    assert cfg.timeouts.send == 2.0 and cfg.timeouts.tunnel_idle == 30.0
    defaults = ProxyConfig()
    assert defaults.max_request_line_bytes == 8192
    assert defaults.timeouts.send == 60.0 and defaults.timeouts.tunnel_idle == 300.0
    bad = tmp_path / "bad.toml"
    bad.write_text('[proxy]\nmax_request_line_bytes = 0\n[proxy.timeouts]\nsend = "x"\ntunnel_idle = 0\n')
    with pytest.raises(ProxyConfigError) as e:
        load_proxy_config(bad)
    lines = str(e.value).splitlines()
    assert len(lines) == 3
    assert "max_request_line_bytes: must be at least 1" in lines[0]
    assert "timeouts.send: expected a number" in lines[1] and "timeouts.tunnel_idle" in lines[2]
