"""The proxy end to end, the hard cases: every fly-replay field, replay loops, routing headers, limits and
queues, upstream timeouts, request smuggling vectors, oversized heads, slow clients, backends that die or
send garbage — each through the real proxy subprocess, a real agent and real upstream servers.

The upstreams record every request they received *completely* (body read to its end), so "never
forwarded" is asserted on what an instance actually got. One module-level environment; the proxy under
test has one worker (deterministic limits and pool) and short timeouts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import http.client
import json
import select
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import quote

import pytest
from aiohttp import web

from _api_util import WAIT, free_port
from _proxy_env import Agent, Env, Proxy
from verdigris.proxy.replay import parse_replay_src

NAME = web.AppKey("name", str)
LOG = web.AppKey("log", list)

TIMEOUTS = "connect = 0.3\nresponse = 0.6\nqueue = 1.0\ndrain = 2.0\nheader_read = 0.5\nbody_read = 0.5\nidle = 1.0\n"


# ---------------------------------------------------------------------------------------- upstreams


async def _handler(request: web.Request) -> web.StreamResponse:
    """Records the request once its body is read to the end, then behaves as the query says:
    ``rp_<name>=<fly-replay value>`` / ``rj_<name>=<replay JSON>`` (only on a first visit, i.e. without
    ``fly-replay-src``, unless ``loop``; never with ``fly-replay-failed`` unless ``loop``), ``sleep=<s>``, ``drip=<n>`` (n bytes 0.25 s apart),
    ``/big?n=`` (Content-Length) / ``/bigc?n=`` (chunked) answers; else the record as JSON."""
    name = request.app[NAME]
    body = await request.read()  # a request that never completes is never recorded
    q = request.query
    peer = request.transport.get_extra_info("peername") if request.transport else None
    hdrs: dict[str, list[str]] = {}
    for k, v in request.headers.items():
        hdrs.setdefault(k.lower(), []).append(v)
    rec = {
        "server": name,
        "method": request.method,
        "path": request.path_qs,
        "headers": hdrs,
        "body_len": len(body),
        "sha": hashlib.sha256(body).hexdigest(),
        "peer_port": peer[1] if peer else None,
    }
    request.app[LOG].append(rec)
    if "sleep" in q:
        await asyncio.sleep(float(q["sleep"]))
    loop = "loop" in q
    first = "fly-replay-src" not in request.headers and "fly-replay-failed" not in request.headers
    if loop or first:
        if f"rp_{name}" in q:
            return web.Response(status=409, text="replay me", headers={"fly-replay": q[f"rp_{name}"]})
        if f"rj_{name}" in q:
            return web.Response(body=q[f"rj_{name}"].encode(), content_type="application/vnd.fly.replay+json")
    if "drip" in q:  # a slow answer that never trips the response timeout: a chunk every 0.25 s
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(int(q["drip"])):
            await resp.write(b"d")
            await asyncio.sleep(0.25)
        await resp.write_eof()
        return resp
    if request.path in ("/big", "/bigc"):
        n = int(q["n"])
        data = _pattern(n)
        if request.path == "/big":
            return web.Response(body=data, content_type="application/octet-stream")
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i in range(0, n, 100_000):
            await resp.write(data[i : i + 100_000])
        await resp.write_eof()
        return resp
    return web.json_response(rec)


def _pattern(n: int) -> bytes:
    return (b"0123456789abcdef" * (n // 16 + 1))[:n]


@dataclass
class Raw:
    """A raw HTTP/1.1 upstream answering per path with canned (often broken) bytes; it logs
    ``(connection number, path)`` and which connections the proxy closed."""

    port: int = 0
    log: list[tuple[int, str]] = field(default_factory=list)
    closed: set[int] = field(default_factory=set)
    n: int = 0

    CANNED: ClassVar[dict[str, bytes]] = {
        "/cl-te": b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "/two-cl": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        "/nul": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
        "/bare-lf": b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
        "/obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nok",
        "/bad-status": b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
        "/garbage": b"\x00\x01\x02 not http at all\r\n\r\n",
    }

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.n += 1
        cid = self.n
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    self.closed.add(cid)
                    return
                path = head.split(b" ", 2)[1].decode()
                self.log.append((cid, path))
                if path == "/ok":
                    body = json.dumps({"conn": cid}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                elif path in self.CANNED:
                    writer.write(self.CANNED[path])
                elif path == "/half-head":  # dies in the middle of the response head
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
                    await writer.drain()
                    writer.close()
                    return
                elif path == "/die-body":  # dies in the middle of the body
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
                    await writer.drain()
                    writer.transport.abort()
                    return
                elif path == "/bad-chunk":  # the head and a chunk, then a bad chunk size
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.05)
                    writer.write(b"zz\r\n")
                elif path == "/stall":  # 10 of 100 bytes, then silence
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
                elif path == "/double":  # a second, unasked-for response on the idle connection
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    await writer.drain()
                    await asyncio.sleep(0.1)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nstolen")
                await writer.drain()
        except ConnectionError:
            self.closed.add(cid)
        finally:
            writer.close()


@dataclass
class E2E:
    env: Env
    proxy: Proxy
    logs: dict[str, list[dict[str, Any]]]
    raw: Raw
    runners: list[web.AppRunner]
    servers: list[asyncio.AbstractServer]
    blackhole: list[socket.socket]

    def seen(self, server: str, marker: str) -> list[dict[str, Any]]:
        """The complete requests ``server`` received whose path holds ``marker``."""
        return [r for r in self.logs[server] if marker in r["path"]]

    def everywhere(self, marker: str) -> list[dict[str, Any]]:
        return [r for log in self.logs.values() for r in log if marker in r["path"]]


def _run(env: Env, coro: Any) -> Any:
    return asyncio.run_coroutine_threadsafe(coro, env.upstreams.loop).result(WAIT)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    tmp = tmp_path_factory.mktemp("e2e")
    env = Env.__new__(Env)
    proxy: Proxy | None = None
    runners: list[web.AppRunner] = []
    servers: list[asyncio.AbstractServer] = []
    holes: list[socket.socket] = []
    try:
        env.__init__(tmp)  # type: ignore[misc]
        names = ["R1", "R2", "R3", "R4", "R5"]
        ports = {n: free_port() for n in names}
        logs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        raw = Raw(port=free_port())

        async def start() -> None:
            for n in names:
                app = web.Application(client_max_size=64 * 1024 * 1024)
                app[NAME], app[LOG] = n, logs[n]
                app.router.add_route("*", "/{tail:.*}", _handler)
                runner = web.AppRunner(app)
                await runner.setup()
                await web.TCPSite(runner, "127.0.0.1", ports[n]).start()
                runners.append(runner)
            servers.append(await asyncio.start_server(raw.serve, "127.0.0.1", raw.port))

        _run(env, start())
        # a listener whose accept queue is full: connecting to it hangs (a connect timeout)
        hole = socket.socket()
        hole.bind(("127.0.0.1", 0))
        hole.listen(0)
        holes.append(hole)
        for _ in range(4):
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(hole.getsockname())
            holes.append(c)
        hole_port = hole.getsockname()[1]
        app = "INSERT INTO apps (name, org, soft_limit, hard_limit) VALUES (?, ?, ?, ?)"
        host = "INSERT INTO hostnames (hostname, app) VALUES (?, ?)"
        machine = "INSERT INTO machines (id, app, region, state, address) VALUES (?, ?, ?, 'started', ?)"
        env.agent.exec(
            (app, ["rp", "o", 20, 25]),
            (app, ["rpb", "o", 20, 25]),
            (app, ["alien", "other-org", 20, 25]),
            (app, ["gone", "o", 20, 25]),
            (app, ["one", "o", 1, 1]),
            (app, ["raw", "o", 0, 0]),
            (app, ["hole", "o", 20, 25]),
            (host, ["rp.test", "rp"]),
            (host, ["rpb.test", "rpb"]),
            (host, ["one.test", "one"]),
            (host, ["raw.test", "raw"]),
            (host, ["hole.test", "hole"]),
            (machine, ["rp1", "rp", "ams", f"127.0.0.1:{ports['R1']}"]),
            (machine, ["rp2", "rp", "ams", f"127.0.0.1:{ports['R2']}"]),
            (machine, ["rpf", "rp", "fra", f"127.0.0.1:{ports['R1']}"]),
            (machine, ["rpb1", "rpb", "ams", f"127.0.0.1:{ports['R3']}"]),
            (machine, ["al1", "alien", "ams", f"127.0.0.1:{ports['R4']}"]),
            (machine, ["g1", "gone", "ams", f"127.0.0.1:{free_port()}"]),
            (machine, ["one1", "one", "ams", f"127.0.0.1:{ports['R5']}"]),
            (machine, ["raw1", "raw", "ams", f"127.0.0.1:{raw.port}"]),
            (machine, ["h1", "hole", "ams", f"127.0.0.1:{hole_port}"]),
        )
        proxy = Proxy(tmp, env.agent.url, workers=1, name="e2e", extra="queue_size = 1\n", timeouts=TIMEOUTS)
        proxy.wait_routes("rp.test")
        proxy.wait_routes("one.test")
        for log in logs.values():
            log.clear()
        yield E2E(env, proxy, logs, raw, runners, servers, holes)
    finally:
        if proxy is not None:
            proxy.stop()

        async def stop() -> None:
            for s in servers:
                s.close()
            for r in runners:
                await r.cleanup()

        if env.__dict__.get("upstreams") is not None:
            _run(env, stop())
        for s in holes:
            s.close()
        env.close()


# ---------------------------------------------------------------------------------------- helpers


def request(
    e: E2E,
    method: str,
    path: str,
    host: str = "rp.test",
    headers: dict[str, str] | None = None,
    body: Any = None,
    **kw: Any,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    c = e.proxy.conn()
    try:
        c.request(method, path, body=body, headers={"Host": host, **(headers or {})}, **kw)
        r = c.getresponse()
        data = r.read()
        assert "fly-replay" not in r.headers  # never, whatever happened
        return r.status, r.headers, data
    finally:
        c.close()


def replay(
    e: E2E,
    marker: str,
    value: str,
    *,
    json_form: bool = False,
    first: str = "rp1",
    extra: str = "",
    **kw: Any,
) -> tuple[int, http.client.HTTPMessage, bytes]:
    """A request to rp forced to ``first`` (rp1 is R1), which answers with ``value`` as a replay."""
    key = ("rj_" if json_form else "rp_") + {"rp1": "R1", "rp2": "R2"}[first]
    headers = {"fly-force-instance-id": first, **kw.pop("headers", {})}
    return request(
        e, kw.pop("method", "GET"), f"/{marker}?{key}={quote(value)}{extra}", headers=headers, **kw
    )


def error_code(status_headers: tuple[int, http.client.HTTPMessage, bytes]) -> tuple[int, str | None]:
    return status_headers[0], status_headers[1]["fly-error-code"]


def raw_exchange(port: int, data: bytes | list[bytes], *, gap: float = 0.0, wait: float = 3.0) -> bytes:
    """Send ``data`` (pieces ``gap`` seconds apart) on a fresh connection; read until the proxy closes it
    (or ``wait`` seconds)."""
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        for piece in [data] if isinstance(data, bytes) else data:
            try:
                s.sendall(piece)
            except OSError:
                break
            if select.select([s], [], [], gap)[0]:
                break  # the proxy answered (or closed): stop sending, read what it said
        deadline = time.monotonic() + wait
        try:
            while time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    return out


def src_of(rec: dict[str, Any]) -> dict[str, str]:
    vals = rec["headers"]["fly-replay-src"]
    assert len(vals) == 1
    parsed = parse_replay_src(vals[0])
    assert isinstance(parsed, dict), parsed
    return parsed


# ---------------------------------------------------------------------------------------- replay fields


def test_replay_header_fields_state_and_src(e2e: E2E) -> None:
    state = 'a b;c=d,"e"\\f'
    r = replay(e2e, "st1", f"instance=rp2;state={json.dumps(state)}", method="POST", body=b"hello")
    assert r[0] == 200, r
    doc = json.loads(r[2])
    assert doc["server"] == "R2" and doc["body_len"] == 5 and doc["method"] == "POST"
    src = src_of(doc)
    assert src["instance"] == "rp1" and src["region"] == "ams" and src["state"] == state
    assert abs(int(src["t"]) / 1e6 - time.time()) < 30
    assert "fly-replay" not in r[1] and len(e2e.seen("R1", "st1")) == 1


def test_replay_region_lists(e2e: E2E) -> None:
    r = replay(e2e, "rg1", 'region="xyz,any"')  # xyz has nothing: then anywhere
    assert r[0] == 200 and json.loads(r[2])["server"] in ("R1", "R2")
    r = replay(e2e, "rg2", "region=ams")
    assert r[0] == 200
    r = replay(e2e, "rg3", "region=xyz")  # only xyz: a clear failure
    assert error_code(r) == (503, "no_instance_in_region") and b"replay failed" in r[2]
    r = replay(e2e, "rg4", 'region="fra"')  # rp has an instance in fra, but this proxy has no peer_token
    assert error_code(r) == (503, "no_healthy_instance") and b"needs [proxy] peer_token" in r[2]
    assert [r["server"] for r in e2e.everywhere("rg3")] == ["R1"]  # only the first request


def test_replay_prefer_instance_and_elsewhere(e2e: E2E) -> None:
    for i in range(5):
        r = replay(e2e, f"pi{i}", "prefer_instance=rp2")
        assert r[0] == 200 and json.loads(r[2])["server"] == "R2"
    r = replay(e2e, "pi-unknown", "prefer_instance=nope")  # unknown: any of the app's instead
    assert r[0] == 200 and json.loads(r[2])["server"] in ("R1", "R2")
    for i in range(8):  # elsewhere=true: never the instance that asked
        r = replay(e2e, f"el{i}", "elsewhere=true", first="rp1" if i % 2 else "rp2")
        assert r[0] == 200 and json.loads(r[2])["server"] == ("R2" if i % 2 else "R1")
    r = request(e2e, "GET", f"/el-one?rp_R5={quote('elsewhere=true')}", host="one.test")
    assert error_code(r) == (503, "no_healthy_instance") and b"replay failed" in r[2]


def test_replay_to_other_apps(e2e: E2E) -> None:
    r = replay(e2e, "ap1", "app=rpb;state=s1")  # same organization
    assert r[0] == 200
    doc = json.loads(r[2])
    assert doc["server"] == "R3" and src_of(doc)["instance"] == "rp1" and src_of(doc)["state"] == "s1"
    r = replay(e2e, "ap2", "app=alien", method="POST", body=b"secret")  # another organization
    assert error_code(r) == (502, "replay_forbidden")
    assert e2e.seen("R4", "ap2") == []  # never reached
    r = replay(e2e, "ap3", "app=nosuch")
    assert error_code(r) == (404, "no_such_app") and b"replay failed" in r[2]


def test_replay_timeout_is_the_wait_for_the_target(e2e: E2E) -> None:
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(request, e2e, "GET", "/hold?drip=8", "one.test")
        time.sleep(0.2)  # one1 is at its hard limit (1) for 2 s
        t0 = time.monotonic()
        r = replay(e2e, "to1", "app=one;timeout=300ms")
        took = time.monotonic() - t0
        assert error_code(r) == (503, "queue_timeout") and b"replay failed" in r[2], r
        assert 0.25 < took < 0.9  # the replay's timeout, not the proxy's queue timeout (1 s)
        assert b"0.3 s" in r[2], r[2]
        t0 = time.monotonic()
        r = replay(e2e, "to2", "app=one;timeout=3s")  # longer than the queue timeout: waits for it
        took = time.monotonic() - t0
        assert r[0] == 200 and json.loads(r[2])["server"] == "R5", r
        assert took > 1.0
        assert busy.result()[0] == 200


def test_replay_fallbacks(e2e: E2E) -> None:
    body = b"B" * 5000
    r = replay(e2e, "fb1", "app=gone;fallback=force_self", method="POST", body=body)
    assert r[0] == 200, r
    doc = json.loads(r[2])
    assert doc["server"] == "R1" and doc["sha"] == hashlib.sha256(body).hexdigest()
    failed = parse_replay_src(doc["headers"]["fly-replay-failed"][0])
    assert isinstance(failed, dict)
    assert failed["reason"] in ("upstream_refused", "instance_unavailable") and failed["app"] == "gone"
    assert src_of(doc)["instance"] == "rp1"
    r = replay(e2e, "fb2", "app=nosuch;fallback=prefer_self", first="rp2")
    assert r[0] == 200, r
    doc = json.loads(r[2])
    failed = parse_replay_src(doc["headers"]["fly-replay-failed"][0])
    assert isinstance(failed, dict) and failed["reason"] == "no_such_app" and failed["app"] == "nosuch"
    assert doc["server"] == "R2"
    r = replay(e2e, "fb3", "instance=rp2;fallback=force_self", extra="&loop=1&rp_R2=" + quote("region=xyz"))
    # rp2 asks again; the replay to xyz fails with no fallback of its own: a clear error
    assert error_code(r) == (503, "no_instance_in_region")
    r = replay(e2e, "fb4", "app=nosuch;fallback=force_self", extra="&loop=1")
    assert error_code(r) == (502, "replay_after_fallback")  # fell back, then asked again


def test_replay_limit(e2e: E2E) -> None:
    r = replay(e2e, "lim", "instance=rp1", extra="&loop=1", method="POST", body=b"x" * 100)
    assert error_code(r) == (502, "replay_limit_exceeded"), r
    seen = e2e.seen("R1", "lim")
    assert len(seen) == 11 and all(s["body_len"] == 100 for s in seen)  # the first + 10 replays


def test_replay_json_with_transform(e2e: E2E) -> None:
    doc = {
        "instance": "rp2",
        "state": "j",
        "timeout": 2.5,
        "transform": {
            "path": "/moved?x=1",
            "set_headers": [{"name": "X-Set", "value": "new"}],
            "delete_headers": ["x-del"],
        },
    }
    r = replay(
        e2e, "js1", json.dumps(doc), json_form=True, headers={"x-set": "old", "x-del": "d", "x-keep": "k"}
    )
    assert r[0] == 200, r
    got = json.loads(r[2])
    h = got["headers"]
    assert got["server"] == "R2" and got["path"] == "/moved?x=1"
    assert h["x-set"] == ["new"] and "x-del" not in h and h["x-keep"] == ["k"]
    assert src_of(got)["state"] == "j"
    bad = {"instance": "rp2", "transform": {"set_headers": [{"name": "fly-client-ip", "value": "1.2.3.4"}]}}
    r = replay(e2e, "js2", json.dumps(bad), json_form=True)
    assert error_code(r) == (502, "bad_replay") and e2e.seen("R2", "js2") == []
    r = replay(e2e, "js3", "instance=rp2;bogus")
    assert error_code(r) == (502, "bad_replay")


def _chunks(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    i = 0
    while i < len(data):
        for n in sizes:
            if i >= len(data):
                break
            yield data[i : i + n]
            i += n


def test_replay_bodies(e2e: E2E) -> None:
    body = bytes(range(256)) * 2400  # 600 KiB, chunked in uneven pieces: replayed intact
    r = replay(
        e2e,
        "bd1",
        "instance=rp2",
        method="POST",
        body=_chunks(body, [1, 70000, 13, 4096]),
        encode_chunked=True,
    )
    assert r[0] == 200, r
    doc = json.loads(r[2])
    assert doc["server"] == "R2" and doc["sha"] == hashlib.sha256(body).hexdigest()
    assert doc["headers"]["transfer-encoding"] == ["chunked"]
    exact = b"e" * (1024 * 1024)  # exactly 1 MiB: still replayable
    r = replay(e2e, "bd2", "instance=rp2", method="POST", body=exact)
    assert r[0] == 200 and json.loads(r[2])["body_len"] == len(exact)
    big = b"g" * (1024 * 1024 + 1)
    for marker, kw in (
        ("bd3", {"body": big}),
        ("bd4", {"body": _chunks(big, [65536]), "encode_chunked": True}),
    ):
        r = replay(e2e, marker, "instance=rp2", method="POST", **kw)
        assert error_code(r) == (413, "replay_body_too_large"), r
        assert len(e2e.seen("R1", marker)) == 1 and e2e.seen("R1", marker)[0]["body_len"] == len(big)
        assert e2e.seen("R2", marker) == []  # never a truncated request


# ---------------------------------------------------------------------------------------- routing


def test_routing_headers(e2e: E2E) -> None:
    for _ in range(4):
        r = request(e2e, "GET", "/h1", headers={"fly-prefer-instance-id": "rp2"})
        assert r[0] == 200 and json.loads(r[2])["server"] == "R2"
        r = request(e2e, "GET", "/h2", headers={"fly-force-instance-id": "rp1"})
        assert r[0] == 200 and json.loads(r[2])["server"] == "R1"
    assert request(e2e, "GET", "/h3", headers={"fly-prefer-instance-id": "nope"})[0] == 200
    assert request(e2e, "GET", "/h4", headers={"fly-force-region": "ams"})[0] == 200
    assert request(e2e, "GET", "/h5", headers={"fly-prefer-region": "xyz"})[0] == 200
    r = request(e2e, "GET", "/h6", headers={"fly-force-region": "xyz"})
    assert error_code(r) == (503, "no_instance_in_region")
    r = request(e2e, "GET", "/h7", headers={"fly-force-region": "fra"})  # no peer_token: no forwarding
    assert error_code(r) == (503, "no_healthy_instance") and b"needs [proxy] peer_token" in r[2]
    r = request(e2e, "GET", "/h8", headers={"fly-force-instance-id": "rpf"})
    assert error_code(r) == (503, "no_healthy_instance")
    r = request(e2e, "GET", "/h9", headers={"fly-force-instance-id": "al1"})  # another app's instance
    assert error_code(r) == (404, "no_such_instance")
    r = request(e2e, "GET", "/h10", headers={"fly-force-region": "A B"})
    assert error_code(r) == (400, "bad_routing_header")
    assert e2e.everywhere("/h6") == e2e.everywhere("/h9") == e2e.everywhere("/h10") == []


def test_internal_headers_are_replaced(e2e: E2E) -> None:
    c = e2e.proxy.conn()
    try:
        c.putrequest("GET", "/ih", skip_host=True)
        for name, value in [
            ("Host", "rp.test"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("x-forwarded-for", "7.7.7.7"),
            ("FLY-CLIENT-IP", "6.6.6.6"),
            ("Fly-Region", "zzz"),
            ("fly-request-id", "forged"),
            ("X-Forwarded-Proto", "https"),
            ("X-Forwarded-Port", "1"),
            ("Fly-Replay-Src", "instance=evil;region=zzz;t=1"),
            ("fly-replay-failed", "reason=forged"),
            ("Connection", "keep-alive, X-Secret"),
            ("X-Secret", "s"),
            ("Keep-Alive", "timeout=5"),
            ("Fly-Replay", "instance=rp2"),  # a request header of that name means nothing
        ]:
            c.putheader(name, value)
        c.endheaders()
        r = c.getresponse()
        doc = json.loads(r.read())
        rid = r.headers["fly-request-id"]
    finally:
        c.close()
    h = doc["headers"]
    assert h["x-forwarded-for"] == ["127.0.0.1"] and h["fly-client-ip"] == ["127.0.0.1"]
    assert h["fly-region"] == ["ams"] and h["fly-request-id"] == [rid] and rid != "forged"
    assert h["x-forwarded-proto"] == ["http"] and h["x-forwarded-port"] == [str(e2e.proxy.port)]
    for gone in ("fly-replay-src", "fly-replay-failed", "x-secret", "keep-alive"):
        assert gone not in h, gone


# ---------------------------------------------------------------------------------------- limits, timeouts


def test_queue_full_and_queue_wait(e2e: E2E) -> None:
    def get(delay: float, path: str) -> tuple[int, str | None, float]:
        time.sleep(delay)
        t0 = time.monotonic()
        r = request(e2e, "GET", path, host="one.test")
        return r[0], r[1]["fly-error-code"], time.monotonic() - t0

    with ThreadPoolExecutor(3) as pool:
        futs = [
            pool.submit(get, 0.0, "/q1?drip=3"),
            pool.submit(get, 0.15, "/q2"),
            pool.submit(get, 0.3, "/q3"),
        ]
        held, waited, full = (f.result() for f in futs)
    assert held[:2] == (200, None)
    assert waited[:2] == (200, None) and waited[2] > 0.2  # queued until the slot was released
    assert full[:2] == (503, "queue_full") and full[2] < 0.3  # queue_size = 1: refused at once
    assert e2e.seen("R5", "/q3") == []


def test_upstream_connect_and_response_timeouts(e2e: E2E) -> None:
    t0 = time.monotonic()
    r = request(e2e, "GET", "/ct", host="hole.test")
    assert error_code(r) == (504, "upstream_timeout") and time.monotonic() - t0 < 2.0, r
    c = e2e.proxy.conn()
    try:
        t0 = time.monotonic()
        c.request("GET", "/rt?sleep=1.2", headers={"Host": "rp.test", "fly-force-instance-id": "rp1"})
        r2 = c.getresponse()
        assert (r2.status, r2.headers["fly-error-code"]) == (504, "upstream_timeout")
        r2.read()
        assert time.monotonic() - t0 < 1.1
        c.request("GET", "/rt2", headers={"Host": "rp.test", "fly-force-instance-id": "rp1"})
        r2 = c.getresponse()  # the late answer to /rt is never taken for this one's
        assert r2.status == 200 and json.loads(r2.read())["path"] == "/rt2"
    finally:
        c.close()


# ---------------------------------------------------------------------------------------- bodies


def test_large_bodies_both_ways(e2e: E2E) -> None:
    n = 8 * 1024 * 1024
    data = _pattern(n)
    r = request(e2e, "PUT", "/up", body=data)
    assert r[0] == 200 and json.loads(r[2])["sha"] == hashlib.sha256(data).hexdigest()
    for path in ("/big", "/bigc"):
        r = request(e2e, "GET", f"{path}?n={n}")
        assert r[0] == 200 and r[2] == data, path


# ---------------------------------------------------------------------------------------- bad input


HEAD = b"Host: rp.test\r\n"

SMUGGLING = {
    "cl-te": b"POST /sm-cl-te HTTP/1.1\r\n"
    + HEAD
    + b"Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /sm-inner1 HTTP/1.1\r\n"
    + HEAD
    + b"\r\n",
    "te-cl": b"POST /sm-te-cl HTTP/1.1\r\n"
    + HEAD
    + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    "two-cl": b"POST /sm-two-cl HTTP/1.1\r\n"
    + HEAD
    + b"Content-Length: 3\r\nContent-Length: 40\r\n\r\nabc"
    + b"GET /sm-inner2 HTTP/1.1\r\n"
    + HEAD
    + b"\r\n",
    "cl-list": b"POST /sm-cl-list HTTP/1.1\r\n" + HEAD + b"Content-Length: 3, 3\r\n\r\nabc",
    "te-list": b"POST /sm-te-list HTTP/1.1\r\n"
    + HEAD
    + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "te-identity": b"POST /sm-te-identity HTTP/1.1\r\n" + HEAD + b"Transfer-Encoding: identity\r\n\r\nabc",
    "te-space": b"POST /sm-te-space HTTP/1.1\r\n" + HEAD + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "bad-chunk": b"POST /sm-bad-chunk HTTP/1.1\r\n"
    + HEAD
    + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n",
    "chunk-ovf": b"POST /sm-chunk-ovf HTTP/1.1\r\n"
    + HEAD
    + b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
    "chunk-lf": b"POST /sm-chunk-lf HTTP/1.1\r\n"
    + HEAD
    + b"Transfer-Encoding: chunked\r\n\r\n3\nabc\r\n0\r\n\r\n",
    "obs-fold": b"GET /sm-obs-fold HTTP/1.1\r\n" + HEAD + b"X-A: a\r\n b\r\n\r\n",
    "bare-lf": b"GET /sm-bare-lf HTTP/1.1\n" + HEAD + b"\n",
    "bare-lf-header": b"GET /sm-bare-lf-header HTTP/1.1\r\nHost: rp.test\nX-B: c\r\n\r\n",
    "bare-cr": b"GET /sm-bare-cr HTTP/1.1\r\nHost: rp.test\rX-B: c\r\n\r\n",
    "nul": b"GET /sm-nul HTTP/1.1\r\n" + HEAD + b"X-A: a\x00b\r\n\r\n",
    "ctl": b"GET /sm-ctl HTTP/1.1\r\n" + HEAD + b"X-A: a\x01b\r\n\r\n",
    "del": b"GET /sm-del HTTP/1.1\r\n" + HEAD + b"X-A: a\x7fb\r\n\r\n",
    "nul-name": b"GET /sm-nul-name HTTP/1.1\r\n" + HEAD + b"X\x00A: a\r\n\r\n",
    "nul-url": b"GET /sm-nul-url\x00 HTTP/1.1\r\n" + HEAD + b"\r\n",
    "space-before-colon": b"GET /sm-space HTTP/1.1\r\n" + HEAD + b"X-A : a\r\n\r\n",
}


def test_smuggling_vectors_are_refused_and_never_forwarded(e2e: E2E) -> None:
    good = e2e.proxy.conn()  # a well-behaved client, served throughout
    try:
        for name, payload in SMUGGLING.items():
            out = raw_exchange(e2e.proxy.port, payload)
            assert out.startswith(b"HTTP/1.1 400 "), (name, out[:200])
            assert b"fly-error-code: bad_request" in out, (name, out[:300])
            assert out.count(b"HTTP/1.1") == 1, (name, out)  # one answer, then the connection closed
            good.request("GET", "/sm-good", headers={"Host": "rp.test"})
            resp = good.getresponse()
            assert resp.status == 200
            resp.read()
        assert [r["path"] for r in e2e.everywhere("/sm-") if r["path"] != "/sm-good"] == []
    finally:
        good.close()


def test_oversized_heads_are_431(e2e: E2E) -> None:
    big = b"GET /big-head HTTP/1.1\r\n" + HEAD + b"X-Big: " + b"b" * 100_000 + b"\r\n\r\n"
    out = raw_exchange(e2e.proxy.port, big)  # in one piece
    assert out.startswith(b"HTTP/1.1 431 ") and b"headers_too_large" in out, out[:200]
    many = (
        b"GET /many-heads HTTP/1.1\r\n"
        + HEAD
        + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 90) for i in range(800))
    )
    out = raw_exchange(e2e.proxy.port, [many[i : i + 8192] for i in range(0, len(many), 8192)] + [b"\r\n"])
    assert out.startswith(b"HTTP/1.1 431 "), out[:200]
    just = b"GET /fine-head HTTP/1.1\r\n" + HEAD + b"X-Ok: " + b"o" * 6_000 + b"\r\nConnection: close\r\n\r\n"
    assert raw_exchange(e2e.proxy.port, just).startswith(b"HTTP/1.1 200 ")
    assert e2e.everywhere("/big-head") == e2e.everywhere("/many-heads") == []


def test_slow_clients_time_out_and_others_are_served(e2e: E2E) -> None:
    head = b"GET /slow-head HTTP/1.1\r\n" + HEAD + b"X-Slow: 1\r\n\r\n"

    def timed(*args: Any, **kw: Any) -> tuple[bytes, float]:
        out = raw_exchange(*args, **kw)
        return out, time.monotonic() - t0

    with ThreadPoolExecutor(3) as pool:
        t0 = time.monotonic()
        silent = pool.submit(timed, e2e.proxy.port, b"", wait=4.0)  # connects, says nothing
        trickle = pool.submit(
            raw_exchange, e2e.proxy.port, [head[i : i + 1] for i in range(len(head))], gap=0.05
        )
        body = b"POST /slow-body HTTP/1.1\r\n" + HEAD + b"Content-Length: 100\r\n\r\n" + b"x" * 10
        stall = pool.submit(raw_exchange, e2e.proxy.port, body, wait=4.0)
        for _ in range(5):  # everyone else is served meanwhile
            assert request(e2e, "GET", "/slow-other")[0] == 200
        out = trickle.result()
        assert out.startswith(b"HTTP/1.1 408 ") and b"header_timeout" in out, out[:200]
        assert time.monotonic() - t0 < 2.0
        out = stall.result()
        took = time.monotonic() - t0
        quiet, quiet_took = silent.result()
    assert out.startswith(b"HTTP/1.1 408 ") and b"body_timeout" in out, out[:200]  # a stalled body too
    assert took < 3.0
    assert quiet == b"" and quiet_took < 3.0  # closed after the idle timeout (1 s)
    assert e2e.everywhere("/slow-head") == e2e.everywhere("/slow-body") == []


def test_backend_garbage_is_502_and_never_passed_on(e2e: E2E) -> None:
    for path in Raw.CANNED:
        before = set(e2e.raw.closed)
        r = request(e2e, "GET", path, host="raw.test")
        assert error_code(r) == (502, "upstream_bad_response"), (path, r)
        cid = next(c for c, p in reversed(e2e.raw.log) if p == path)
        deadline = time.monotonic() + 2
        while cid not in e2e.raw.closed and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cid in e2e.raw.closed - before, path  # that connection is dropped, never pooled
    r = request(e2e, "GET", "/half-head", host="raw.test")  # dies before the head is complete
    assert error_code(r) == (502, "upstream_bad_response")
    assert request(e2e, "GET", "/ok", host="raw.test")[0] == 200


def _conn_of(e: E2E, c: http.client.HTTPConnection, path: str) -> tuple[int, Any]:
    c.request("GET", path, headers={"Host": "raw.test"})
    r = c.getresponse()
    try:
        return r.status, r.read()
    except (http.client.IncompleteRead, ConnectionError) as err:
        return r.status, err


def test_backend_dying_mid_response_drops_the_pooled_connection(e2e: E2E) -> None:
    for bad in ("/die-body", "/bad-chunk", "/stall"):
        c = e2e.proxy.conn()
        try:
            status, body = _conn_of(e2e, c, "/ok")
            first = json.loads(body)["conn"]
            status, body = _conn_of(e2e, c, "/ok")
            assert json.loads(body)["conn"] == first  # pooled
            status, body = _conn_of(e2e, c, bad)  # on the pooled connection: a truncated answer
            assert status == 200 and isinstance(body, http.client.IncompleteRead | ConnectionError), (
                bad,
                body,
            )
        finally:
            c.close()
        c = e2e.proxy.conn()
        try:
            status, body = _conn_of(e2e, c, "/ok")
            assert status == 200 and json.loads(body)["conn"] != first, bad  # a fresh upstream connection
        finally:
            c.close()
        if bad != "/die-body":  # (that one closes it itself)
            assert first in e2e.raw.closed, bad  # the proxy dropped the broken connection


def test_unasked_for_bytes_on_an_idle_connection_are_never_an_answer(e2e: E2E) -> None:
    c = e2e.proxy.conn()
    try:
        assert _conn_of(e2e, c, "/double") == (200, b"ok")
        time.sleep(0.3)  # the stray response sits on the pooled connection
        status, body = _conn_of(e2e, c, "/ok")
        assert status == 200 and body != b"stolen" and "conn" in json.loads(body)
    finally:
        c.close()


# ---------------------------------------------------------------------------------------- agent restart


def test_agent_restart_while_serving(e2e: E2E) -> None:
    env = e2e.env
    stop = threading.Event()
    results: list[int] = []

    def load() -> None:
        while not stop.is_set():
            results.append(request(e2e, "GET", "/during-restart")[0])

    t = threading.Thread(target=load)
    t.start()
    try:
        time.sleep(0.2)
        env.agent.stop()
        time.sleep(0.3)
        env.agent = Agent(env.agent_config)
        env.agent.exec(("INSERT INTO hostnames (hostname, app) VALUES (?, ?)", ["after.test", "rpb"]))
        assert e2e.proxy.wait_routes("after.test")["server"] == "R3"
    finally:
        stop.set()
        t.join(WAIT)
    assert len(results) > 10 and set(results) == {200}
