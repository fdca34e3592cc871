"""The proxy end to end: a real agent process, real upstream HTTP servers, the proxy as a subprocess.

Every wait is bounded; every process is stopped at the end of the module.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from _api_util import WAIT
from _proxy_env import VERDIGRIS, Agent, Env, Proxy


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
        # only WebSocket upgrades are tunnelled (tests/test_proxy_upgrade.py); h2c never is
        s.sendall(b"GET / HTTP/1.1\r\nHost: web.test\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
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


def test_workers_enforce_the_apps_own_limits() -> None:
    """Load counts are shared between the workers (tests/test_proxy_shared_load.py): each enforces the
    app's limits themselves, not a share of them."""
    from verdigris.proxy.config import ProxyConfig
    from verdigris.proxy.server import Worker

    table = Worker(ProxyConfig(workers=2)).table
    assert table.load("apps", [["web", "o", "requests", 20, 25]]) == []
    web = table.app("web")
    assert web is not None and (web.soft_limit, web.hard_limit) == (20, 25)
