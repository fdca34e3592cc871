"""The proxy's supervisor ↔ worker control channel and its Prometheus metrics.

Unit tests of the channel's framing (bad input never crashes either side), then end to end with the real
proxy (2 workers) serving ``/metrics``: counts summed across workers, a worker killed and restarted, a
worker stopped (SIGSTOP) reported as a probe timeout. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import struct
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from _api_util import WAIT, free_port
from _proxy_env import Env, Proxy
from verdigris.proxy.config import ProxyConfigError, parse_proxy_config
from verdigris.proxy.control import (
    MAX_FRAME,
    ControlClient,
    ControlError,
    ControlReply,
    ControlRequest,
    ControlServer,
    ControlTimeout,
    FrameError,
    decode_body,
    encode_frame,
    read_frame,
)
from verdigris.proxy.server import Request
from verdigris.proxy.stats import LATENCY_BUCKETS, MAX_APPS, OTHER, RequestCounters

# ---------------------------------------------------------------------------------------- framing


def _reader(data: bytes, eof: bool = True) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    if eof:
        r.feed_eof()
    return r


async def test_frame_round_trip() -> None:
    frame = encode_frame(ControlRequest(7, "probe", {"sent": 1.5}))
    body = await read_frame(_reader(frame))
    assert decode_body(body, ControlRequest) == ControlRequest(7, "probe", {"sent": 1.5})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x00", "truncated frame: 2 of 4 header bytes"),
        (struct.pack(">I", 10) + b"abc", "truncated frame: 3 of 10 body bytes"),
        (struct.pack(">I", MAX_FRAME + 1) + b"x" * 10, "exceeds the"),
    ],
)
async def test_bad_frames_are_clear_errors(data: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        await read_frame(_reader(data))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\xff\xfegarbage", "not JSON"),
        (b'{"id": "x", "op": "probe"}', "not a valid ControlRequest"),
        (b'{"id": 1, "op": "probe", "evil": 1}', "not a valid ControlRequest"),
        (b"[1, 2]", "not a valid ControlRequest"),
    ],
)
def test_garbage_bodies_are_clear_errors(body: bytes, message: str) -> None:
    with pytest.raises(FrameError, match=message):
        decode_body(body, ControlRequest)


async def test_server_survives_garbage_and_closes_the_channel() -> None:
    """A worker's ControlServer fed garbage logs it and ends the channel (its ``on_close``), no crash."""
    for garbage in (
        b"\x00\x00\x00\x05hello",
        struct.pack(">I", MAX_FRAME + 1),
        b"\x00\x00\x00\x09{}",
    ):
        a, b = socket.socketpair()
        closed = asyncio.Event()
        server = ControlServer(a, {"probe": lambda args: {"ok": 1}}, on_close=closed.set)
        server.start()
        b.sendall(garbage)
        b.shutdown(socket.SHUT_WR)
        await asyncio.wait_for(closed.wait(), WAIT)
        await server.close()
        b.close()


async def test_client_and_server_over_a_socketpair() -> None:
    a, b = socket.socketpair()
    server = ControlServer(a, {"echo": lambda args: dict(args), "boom": lambda args: 1 / 0})
    server.start()
    client = await ControlClient.open(b)
    try:
        # concurrent requests are matched to their answers by id
        results = await asyncio.gather(*(client.call("echo", {"n": i}, timeout=WAIT) for i in range(20)))
        assert results == [{"n": i} for i in range(20)]
        with pytest.raises(ControlError, match="unknown op 'nope'"):
            await client.call("nope", timeout=WAIT)
        with pytest.raises(ControlError, match="ZeroDivisionError"):
            await client.call("boom", timeout=WAIT)
        assert server.served == 22
    finally:
        await client.close()
        await server.close()
    with pytest.raises(ControlError, match="closed"):
        await client.call("echo", timeout=WAIT)


async def test_client_times_out_on_a_silent_peer_and_fails_fast_when_it_is_gone() -> None:
    a, b = socket.socketpair()
    client = await ControlClient.open(b)
    t0 = time.monotonic()
    with pytest.raises(ControlTimeout):
        await client.call("probe", timeout=0.2)
    assert time.monotonic() - t0 < WAIT
    # a reply to a request that timed out is ignored; garbage from the peer closes the channel cleanly
    a.sendall(encode_frame(ControlReply(1, True, result=None)))
    a.sendall(b"\x00\x00\x00\x03xyz")
    deadline = time.monotonic() + WAIT
    while client.closed is None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert client.closed is not None and "not JSON" in client.closed
    with pytest.raises(ControlError, match="closed"):
        await client.call("probe", timeout=WAIT)
    await client.close()
    a.close()


def test_request_counters_bound_their_labels() -> None:
    c = RequestCounters()
    for i in range(MAX_APPS + 50):
        req = Request(b"GET", b"/", "1.1", [], True, None, False, app=f"app{i}", region="ams", status=200)
        c.finished(req, now=req.started + 0.003)
    assert len({app for app, _, _ in c.requests}) == MAX_APPS + 1
    assert c.requests[(OTHER, "ams", "2xx")] == 50
    assert sum(c.latency) == MAX_APPS + 50 and c.latency[LATENCY_BUCKETS.index(0.005)] == MAX_APPS + 50
    assert len(c.app_latency) == MAX_APPS + 1 and sum(c.app_latency[OTHER]) == 50  # the same bound
    c = RequestCounters()
    c.finished(Request(b"GET", b"/", "1.1", [], True, None, False))  # not routed, no answer sent
    assert c.requests == {("none", "none", "aborted"): 1}


def test_metrics_config_is_validated() -> None:
    cfg = parse_proxy_config({"proxy": {"metrics_listen": "127.0.0.1:9100", "probe_deadline": 2}})
    assert cfg.metrics_listen == ("127.0.0.1", 9100) and cfg.probe_deadline == 2.0
    assert parse_proxy_config({"proxy": {}}).metrics_listen is None
    with pytest.raises(ProxyConfigError) as e:
        parse_proxy_config({"proxy": {"metrics_listen": 9100, "probe_interval": 0, "probe_deadline": "1"}})
    text = str(e.value)
    assert (
        "proxy.metrics_listen" in text and "proxy.probe_interval" in text and "proxy.probe_deadline" in text
    )
    with pytest.raises(ProxyConfigError, match="must differ"):
        parse_proxy_config({"proxy": {"listen": "127.0.0.1:9000", "metrics_listen": "127.0.0.1:9000"}})


# ---------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env.__new__(Env)
    try:
        e.__init__(tmp_path_factory.mktemp("metrics"))  # type: ignore[misc]
        yield e
    finally:
        e.close()


@pytest.fixture(scope="module")
def proxy(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proxy, int]]:
    port = free_port()
    p = Proxy(
        tmp_path_factory.mktemp("metrics-proxy"),
        env.agent.url,
        name="mproxy",
        # watchdog off: a stopped worker is only counted here (tests/test_proxy_watchdog.py: replaced)
        extra=f'metrics_listen = "127.0.0.1:{port}"\nprobe_interval = 0.1\nprobe_deadline = 0.5\nwatchdog = false\n',
    )
    try:
        p.wait_routes("web.test")
        # every worker has its routing state (wait_routes saw only the one that answered)
        poll(port, lambda s: total(s, "verdigris_proxy_table_ready") == 2, "both workers ready")
        yield p, port
    finally:
        p.stop()


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def scrape(port: int) -> dict[str, float]:
    """``name{labels}`` -> value (labels as printed, sorted by prometheus_client)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=WAIT) as r:
        assert r.status == 200
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    n = 0.0
    for key, v in samples.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{val}"' in rest for k, val in labels.items()):
            n += v
    return n


def poll(
    port: int, ok: Callable[[dict[str, float]], bool], what: str, timeout: float = WAIT
) -> dict[str, float]:
    """Scrape until ``ok(samples)`` holds, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: dict[str, float] = {}
    while True:
        last = scrape(port)
        if ok(last):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s; last scrape: {last}")
        time.sleep(0.05)


def test_counts_summed_across_workers(proxy: tuple[Proxy, int]) -> None:
    p, port = proxy
    before = scrape(port)
    statuses = [p.get(host)[0] for host in ["web.test"] * 10 + ["nope.test"] * 3 + ["dead.test"] * 2]
    assert statuses == [200] * 10 + [404] * 3 + [502] * 2
    assert p.get("web.test")[0] == 200  # one more
    after = scrape(port)

    def delta(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert delta("verdigris_proxy_requests_total", app="web", region="ams", status="2xx") == 11
    assert delta("verdigris_proxy_requests_total", app="none", status="4xx") == 3
    assert delta("verdigris_proxy_requests_total", app="dead", status="5xx") == 2
    assert delta("verdigris_proxy_errors_total", code="no_such_app") == 3
    assert delta("verdigris_proxy_errors_total", code="upstream_refused") == 2
    assert delta("verdigris_proxy_upstream_errors_total", kind="refused") == 2
    assert delta("verdigris_proxy_request_duration_seconds_count") == 16
    assert delta("verdigris_proxy_request_duration_seconds_bucket", le="+Inf") == 16
    assert delta("verdigris_proxy_request_duration_seconds_sum") > 0
    # per app too: the same requests, by app label
    assert delta("verdigris_proxy_app_request_duration_seconds_count", app="web") == 11
    assert delta("verdigris_proxy_app_request_duration_seconds_bucket", app="dead", le="+Inf") == 2
    assert delta("verdigris_proxy_app_request_duration_seconds_count") == 16
    # both workers answer and report a loop lag and a probe
    for w in ("0", "1"):
        assert after[f'verdigris_proxy_worker_up{{worker="{w}"}}'] == 1
        assert 0 <= after[f'verdigris_proxy_event_loop_lag_seconds{{worker="{w}"}}'] < 1
        assert after[f'verdigris_proxy_probe_rtt_seconds{{worker="{w}"}}'] > 0
        assert after[f'verdigris_proxy_table_ready{{worker="{w}"}}'] == 1
        assert after[f'verdigris_proxy_table_entries{{kind="apps",worker="{w}"}}'] >= 6
        assert after[f'verdigris_proxy_worker_pid{{worker="{w}"}}'] > 0
    assert after["verdigris_proxy_workers"] == 2
    assert after["verdigris_proxy_client_connections"] >= 0


def test_killed_worker_is_restarted_and_counted(proxy: tuple[Proxy, int]) -> None:
    p, port = proxy
    before = scrape(port)
    restarts = total(before, "verdigris_proxy_worker_restarts_total")
    served = total(before, "verdigris_proxy_requests_total")
    pid = int(before['verdigris_proxy_worker_pid{worker="0"}'])
    os.kill(pid, signal.SIGKILL)
    after = poll(
        port,
        lambda s: (
            s.get('verdigris_proxy_worker_pid{worker="0"}', pid) != pid
            and s.get('verdigris_proxy_worker_up{worker="0"}') == 1
            and s.get('verdigris_proxy_table_ready{worker="0"}') == 1  # 503 not_ready until re-subscribed
        ),
        "restart of worker 0",
    )
    assert total(after, "verdigris_proxy_worker_restarts_total") == restarts + 1
    assert after['verdigris_proxy_worker_restarts_total{worker="0"}'] >= 1
    # counters of the dead worker are kept: totals never go down
    assert total(after, "verdigris_proxy_requests_total") >= served
    p.wait_routes("web.test")
    assert p.get("web.test")[0] == 200
    assert p.proc.poll() is None


def test_stopped_worker_is_a_probe_timeout(proxy: tuple[Proxy, int]) -> None:
    p, port = proxy
    before = scrape(port)
    pid = int(before['verdigris_proxy_worker_pid{worker="1"}'])
    timeouts = before['verdigris_proxy_probe_timeouts_total{worker="1"}']
    os.kill(pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        after = poll(
            port,
            lambda s: s['verdigris_proxy_probe_timeouts_total{worker="1"}'] > timeouts,
            "a probe timeout of the stopped worker",
        )
        # probe_deadline is 0.5 s; a scrape waits at most that long for the stopped worker's stats
        assert time.monotonic() - t0 < 3.0
        assert after['verdigris_proxy_worker_up{worker="1"}'] == 0
        assert after['verdigris_proxy_worker_up{worker="0"}'] == 1
        assert after['verdigris_proxy_stats_timeouts_total{worker="1"}'] >= 1
        # a stall in progress is a gauge too (verdigris doctor reads it): stuck for at least a deadline
        assert after['verdigris_proxy_worker_stuck_seconds{worker="1"}'] >= 0.5
        assert after['verdigris_proxy_worker_stuck_seconds{worker="0"}'] == 0
        # its last snapshot still counts: the totals are there
        assert total(after, "verdigris_proxy_requests_total") >= total(
            before, "verdigris_proxy_requests_total"
        )
    finally:
        os.kill(pid, signal.SIGCONT)
    poll(port, lambda s: s['verdigris_proxy_worker_up{worker="1"}'] == 1, "worker 1 answering again")
    assert p.proc.poll() is None
    log = Path(p.log.name).read_text()
    assert "probe_timeout worker=1" in log and "probe_recovered worker=1" in log
    assert scrape(port)['verdigris_proxy_worker_stuck_seconds{worker="1"}'] == 0


def test_upstream_errors_per_instance_and_ejection(env: Env, proxy: tuple[Proxy, int]) -> None:
    """Errors are counted per app and instance; an instance ejected after connect failures shows its
    ejection; an instance removed from the table loses its series (bounded cardinality)."""
    p, port = proxy
    refused = f"127.0.0.1:{env.dead_port}"  # nothing listens there
    env.agent.exec(
        ("INSERT INTO apps (name, org) VALUES ('gone', 'o')", []),
        ("INSERT INTO hostnames (hostname, app) VALUES ('gone.test', 'gone')", []),
        (
            "INSERT INTO machines (id, app, region, state, address) VALUES ('g1', 'gone', 'ams', 'started', ?)",
            [refused],
        ),
    )
    errors = "verdigris_proxy_instance_upstream_errors_total"
    ejected = "verdigris_proxy_instance_ejected_seconds"
    deadline = time.monotonic() + WAIT
    while True:  # new connections spread over both workers: go on until one has ejected g1
        p.get("gone.test")
        s = scrape(port)
        if total(s, ejected, app="gone", instance="g1") > 0:
            break
        assert time.monotonic() < deadline, f"g1 never ejected: {s}"
    assert total(s, errors, app="gone", instance="g1", kind="refused") >= 3
    assert total(s, errors, app="gone", instance="g1") == total(
        s, errors, app="gone", instance="g1", kind="refused"
    )
    assert 0 < total(s, ejected, app="gone", instance="g1") <= 30  # base_ejection
    # the aggregate by kind is kept as it was
    assert total(s, "verdigris_proxy_upstream_errors_total", kind="refused") >= 3
    for w in ("0", "1"):
        assert s[f'verdigris_proxy_worker_stuck_seconds{{worker="{w}"}}'] == 0
        assert s[f'verdigris_proxy_worker_uptime_seconds{{worker="{w}"}}'] > 0
    env.agent.exec(("DELETE FROM machines WHERE id = 'g1'", []))
    poll(
        port,
        lambda s: not any('instance="g1"' in key for key in s),
        "the series of g1 to go with it",
    )


def test_sigterm_stops_cleanly_with_metrics(env: Env, tmp_path: Path) -> None:
    port = free_port()
    p = Proxy(tmp_path, env.agent.url, name="mstop", extra=f'metrics_listen = "127.0.0.1:{port}"\n')
    try:
        p.wait_routes("web.test")
        assert scrape(port)["verdigris_proxy_workers"] == 2
    finally:
        assert p.stop() == 0
    log = Path(p.log.name).read_text()
    assert "Traceback" not in log, log


def test_metrics_port_taken_is_exit_1(env: Env, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = Proxy(tmp_path, env.agent.url, name="mtaken", extra=f'metrics_listen = "127.0.0.1:{port}"\n')
        try:
            assert p.proc.wait(WAIT) == 1
        finally:
            p.stop()
    assert "cannot serve metrics" in Path(p.log.name).read_text()


def _gone(pid: int) -> bool:
    """The process has exited (a zombie not reaped yet counts as exited)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except FileNotFoundError:
        return True


def test_workers_exit_when_the_supervisor_is_killed(env: Env, tmp_path: Path) -> None:
    """A worker's control channel closing means its supervisor is gone: it drains and exits rather than
    hold the port as an orphan."""
    port = free_port()
    p = Proxy(tmp_path, env.agent.url, name="morphan", extra=f'metrics_listen = "127.0.0.1:{port}"\n')
    pids: list[int] = []
    try:
        p.wait_routes("web.test")
        s = poll(port, lambda s: total(s, "verdigris_proxy_worker_up") == 2, "both workers up")
        pids += [int(s[f'verdigris_proxy_worker_pid{{worker="{w}"}}']) for w in ("0", "1")]
        p.proc.kill()
        p.proc.wait(WAIT)
        deadline = time.monotonic() + WAIT
        while not all(_gone(pid) for pid in pids):
            assert time.monotonic() < deadline, "orphaned workers still running"
            time.sleep(0.05)
        with pytest.raises(OSError):
            p.get("web.test")
    finally:
        for pid in pids:
            if not _gone(pid):
                os.kill(pid, signal.SIGKILL)
        p.stop()


async def test_an_unencodable_answer_is_an_error_reply() -> None:
    a, b = socket.socketpair()
    server = ControlServer(a, {"bad": lambda args: object()})
    server.start()
    client = await ControlClient.open(b)
    try:
        with pytest.raises(ControlError, match="unencodable answer"):
            await client.call("bad", timeout=WAIT)
        assert client.closed is None  # the channel goes on
    finally:
        await client.close()
        await server.close()
