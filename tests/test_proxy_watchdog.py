"""The proxy's worker watchdog, end to end (real agent, real proxy with 2 workers, fault injection on).

A worker whose event loop is blocked (fault injection: ``time.sleep`` on its loop) is detected within
1.5 s of the stall, its stacks are dumped (the stalling frame is in the file), it is killed and replaced,
``/metrics`` counts it, and every new connection meanwhile is served by the other worker (the workers
accept from one listening socket: none waits in a stuck worker's queue). A worker in a crash
loop is restarted with growing delays. Plus unit tests of the pieces (backoff, stall cause, pruning,
config). Every wait is bounded.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from _api_util import WAIT, free_port
from _proxy_env import VERDIGRIS, Env, Proxy
from test_proxy_metrics import poll, scrape, total
from verdigris.proxy.config import ProxyConfig, ProxyConfigError, parse_proxy_config
from verdigris.proxy.watchdog import Backoff, keep_stacks, prune, stall_cause

# ---------------------------------------------------------------------------------------- units


def test_backoff_doubles_within_the_window_and_resets_after() -> None:
    b = Backoff(minimum=0.1, maximum=1.0, window=60.0)
    delays = [b.failure(t) for t in (0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0)]
    assert delays == [0.0, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert b.failure(100.0) == 0.0  # a minute without failure: a new streak


def test_stall_cause_is_the_main_threads_innermost_frame() -> None:
    text = (
        "# verdigris proxy worker=0 pid=1 main_thread=0x00007f00000000aa\n"
        "Thread 0x00007f00000000bb (most recent call first):\n"
        '  File "/x/threading.py", line 320 in wait\n'
        "\n"
        "Current thread 0x00007f00000000aa (most recent call first):\n"
        '  File "/x/watchdog.py", line 10 in fault_stall\n'
        '  File "/x/control.py", line 20 in answer\n'
        '  File "/x/control.py", line 30 in _run\n'
        '  File "/x/base.py", line 40 in run\n'
    )
    cause, frames = stall_cause(text)
    assert cause == "watchdog.py:fault_stall"
    assert len(frames) == 3 and "fault_stall" in frames[0]
    assert stall_cause("") == ("unknown", [])


def test_stack_files_are_bounded(tmp_path: Path) -> None:
    for i in range(25):
        live = tmp_path / f"worker-{10**7 + i}.live"
        live.write_text("x")
        kept = keep_stacks(live, 0, i, keep=20)
        assert kept is not None and kept.exists()
        # distinct names even within one second
        kept.rename(kept.with_name(f"stuck-w0-{i:03d}.stacks"))
    assert prune(tmp_path, 20) == 20
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 20 and names[0] == "stuck-w0-005.stacks"


def test_watchdog_config_is_validated() -> None:
    cfg = parse_proxy_config({"proxy": {}})
    assert cfg.watchdog is True and cfg.fault_injection is False and cfg.probe_deadline == 1.0
    assert cfg.stack_directory().endswith("verdigris-proxy-stacks")
    cfg = parse_proxy_config({"proxy": {"watchdog": False, "stack_dir": "/tmp/s", "fault_injection": True}})
    assert (cfg.watchdog, cfg.stack_directory(), cfg.fault_injection) == (False, "/tmp/s", True)
    with pytest.raises(ProxyConfigError) as e:
        parse_proxy_config({"proxy": {"watchdog": "yes", "fault_injection": 1, "stack_dir": ""}})
    text = str(e.value)
    assert "proxy.watchdog" in text and "proxy.fault_injection" in text and "proxy.stack_dir" in text


def test_fault_endpoints_exist_only_with_fault_injection() -> None:
    from verdigris.proxy.metrics import metrics_app
    from verdigris.proxy.worker import Supervisor

    class Fake:
        def __init__(self, config: ProxyConfig) -> None:
            self.config = config

    def paths(cfg: ProxyConfig) -> set[str]:
        app = metrics_app(Fake(cfg))  # type: ignore[arg-type]
        return {r.resource.canonical for r in app.router.routes() if r.resource is not None}

    assert not any(p.startswith("/fault") for p in paths(ProxyConfig()))
    assert {"/fault/stall", "/fault/crashloop"} <= paths(ProxyConfig(fault_injection=True))
    assert Supervisor  # the real one is exercised below


# ---------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    e = Env.__new__(Env)
    try:
        e.__init__(tmp_path_factory.mktemp("watchdog"))  # type: ignore[misc]
        e.proxy.stop()  # its own default proxy is not used here: fewer processes on the shared cores
        yield e
    finally:
        e.close()


def watched_proxy(tmp: Path, agent_url: str, name: str, extra: str = "") -> tuple[Proxy, int]:
    """A proxy (2 workers, metrics on, a fast watchdog, fault injection on, stack files in ``tmp/stacks``)
    routing ``web.test`` with both workers ready; its metrics port. ``extra``: more ``[proxy]`` keys (or
    sections after them)."""
    port = free_port()
    p = Proxy(
        tmp,
        agent_url,
        name=name,
        extra=(
            f'metrics_listen = "127.0.0.1:{port}"\nprobe_interval = 0.25\nprobe_deadline = 1.0\n'
            f'fault_injection = true\nstack_dir = "{tmp / "stacks"}"\n{extra}'
        ),
    )
    try:
        p.wait_routes("web.test")
        poll(port, lambda s: total(s, "verdigris_proxy_table_ready") == 2, "both workers ready")
    except BaseException:
        p.stop()
        raise
    return p, port


@pytest.fixture(scope="module")
def proxy(env: Env, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proxy, int, Path]]:
    tmp = tmp_path_factory.mktemp("watchdog-proxy")
    stacks = tmp / "stacks"
    p, port = watched_proxy(tmp, env.agent.url, "wproxy")
    try:
        yield p, port, stacks
    finally:
        assert p.stop() == 0
    # workers that stopped cleanly leave no live stack file; the kept dump is still there
    assert not list(stacks.glob("*.live")) and len(list(stacks.glob("*.stacks"))) == 1


def post(port: int, path: str) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", b"", method="POST")
    with urllib.request.urlopen(req, timeout=WAIT) as r:
        return json.loads(r.read())


def log_events(p: Proxy, event: str) -> list[dict[str, str]]:
    out = []
    for line in Path(p.log.name).read_text().splitlines():
        i = line.find(event + " ")
        if i >= 0:
            out.append(dict(re.findall(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)', line[i:])))
    return out


def one_request(port: int, host: str = "web.test", timeout: float = WAIT) -> str:
    """A GET over a new connection: ``ok``, ``status N``, or the exception's name."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", "/", headers={"Host": host})
        r = c.getresponse()
        r.read()
        return "ok" if r.status == 200 else f"status {r.status}"
    except (OSError, http.client.HTTPException) as e:
        return type(e).__name__
    finally:
        c.close()


def test_stuck_worker_is_detected_dumped_and_replaced(proxy: tuple[Proxy, int, Path]) -> None:
    p, port, stacks = proxy
    before = scrape(port)
    pid = int(before['verdigris_proxy_worker_pid{worker="0"}'])
    other = int(before['verdigris_proxy_worker_pid{worker="1"}'])
    results: list[str] = []
    lock = threading.Lock()

    def fire() -> None:
        r = one_request(p.port)
        with lock:
            results.append(r)

    stall = post(port, "/fault/stall?worker=0&seconds=8")
    assert stall["pid"] == pid
    # 50 requests, each over a new connection, spread over the stall and its detection (~1.3 s)
    with ThreadPoolExecutor(max_workers=50) as pool:
        start = time.monotonic()
        for i in range(50):
            pool.submit(fire)
            pace = start + (i + 1) * 0.026 - time.monotonic()  # load pacing, not synchronisation
            if pace > 0:
                threading.Event().wait(pace)
    after = poll(
        port,
        lambda s: (
            s.get('verdigris_proxy_watchdog_restarts_total{reason="probe_timeout"}', 0) >= 1
            and s.get('verdigris_proxy_worker_pid{worker="0"}', pid) != pid
            and s.get('verdigris_proxy_worker_up{worker="0"}') == 1
            and s.get('verdigris_proxy_table_ready{worker="0"}') == 1  # 503 not_ready until re-subscribed
        ),
        "worker 0 replaced",
    )
    events = [e for e in log_events(p, "watchdog_restart") if e["pid"] == str(pid)]
    assert len(events) == 1, events
    ev = events[0]
    detected_after = float(ev["detected_at"]) - float(stall["sent"])
    assert ev["reason"] == "probe_timeout" and ev["worker"] == "0"
    assert detected_after <= 1.5, f"detected {detected_after:.3f} s after the stall began"
    assert float(ev["killed_at"]) - float(ev["detected_at"]) < 0.5
    # the stack file: every thread (faulthandler) with the stalling frame, and the asyncio tasks
    path = Path(json.loads(ev["stacks"]))
    assert path.parent == stacks and path.exists()
    text = path.read_text()
    assert "in fault_stall" in text and "asyncio tasks" in text and ev["dump"] == "complete", text
    assert json.loads(ev["cause"]) == "watchdog.py:fault_stall"
    assert "fault_stall" in json.loads(ev["main_stack"])
    # metrics
    assert after['verdigris_proxy_watchdog_stall_causes_total{cause="watchdog.py:fault_stall"}'] == 1
    assert after["verdigris_proxy_watchdog_detection_seconds_count"] == 1
    assert 0.9 <= after["verdigris_proxy_watchdog_last_detection_seconds"] <= 1.5
    assert after['verdigris_proxy_watchdog_stack_dumps_total{result="complete"}'] == 1
    assert after["verdigris_proxy_watchdog_stack_files"] == 1
    assert after['verdigris_proxy_worker_pid{worker="1"}'] == other  # the other worker went on
    assert after['verdigris_proxy_worker_restart_backoff_seconds{worker="0"}'] == 0  # first failure
    # clients: one listening socket for every worker, so no new connection waits on the stuck one
    failed = [r for r in results if r != "ok"]
    print(
        f"\nstall: detected {detected_after:.3f} s after it began; {len(failed)}/50 requests failed: {failed}"
    )
    assert len(results) == 50
    assert failed == [], failed
    # after the replacement every request succeeds again
    assert [one_request(p.port) for _ in range(20)] == ["ok"] * 20
    assert p.proc.poll() is None


def test_crash_loop_backs_off(proxy: tuple[Proxy, int, Path]) -> None:
    p, port, _ = proxy
    before = scrape(port)
    pid = int(before['verdigris_proxy_worker_pid{worker="1"}'])
    exited = before['verdigris_proxy_watchdog_restarts_total{reason="exited"}']
    n_before = len([e for e in log_events(p, "worker_exited") if e["worker"] == "1"])
    post(port, "/fault/crashloop?worker=1&times=4")  # crash now, then 4 starts that exit at once
    poll(
        port,
        lambda s: (
            s['verdigris_proxy_watchdog_restarts_total{reason="exited"}'] >= exited + 5
            and s.get('verdigris_proxy_worker_up{worker="1"}') == 1
            and s.get('verdigris_proxy_table_ready{worker="1"}') == 1
        ),
        "worker 1 back after its crash loop",
        timeout=3 * WAIT,
    )
    exits = [e for e in log_events(p, "worker_exited") if e["worker"] == "1"][n_before:]
    starts = [e for e in log_events(p, "worker_started") if e["worker"] == "1"]
    assert exits[0]["pid"] == str(pid) and len(exits) == 5, exits
    assert [e["status"] for e in exits] == ["3"] * 5
    backoffs = [float(e["backoff"].rstrip("s")) for e in exits]
    assert backoffs == [0.0, 0.1, 0.2, 0.4, 0.8], backoffs
    # each restart waited at least its backoff, and the spacing of restarts grows
    gaps = []
    for e, b in zip(exits, backoffs, strict=True):
        t = float(e["t"])
        nxt = min(float(s["t"]) for s in starts if float(s["t"]) > t)
        assert nxt - t >= b
        gaps.append(nxt - t)
    print(f"\ncrash loop: exit-to-restart gaps {[f'{g:.3f}' for g in gaps]}")
    assert gaps[1] < gaps[2] < gaps[3] < gaps[4], gaps
    assert p.proc.poll() is None
    p.wait_routes("web.test")


def test_probe_goes_through_routing(proxy: tuple[Proxy, int, Path]) -> None:
    """Both workers answer probes with a real routing decision (reported as its time)."""
    _, port, _ = proxy
    s = poll(port, lambda s: total(s, "verdigris_proxy_worker_up") == 2, "both workers up")
    for w in ("0", "1"):
        assert s[f'verdigris_proxy_probe_route_seconds{{worker="{w}"}}'] > 0


def test_no_fault_endpoints_without_fault_injection(env: Env, tmp_path: Path) -> None:
    port = free_port()
    p = Proxy(tmp_path, env.agent.url, name="wplain", extra=f'metrics_listen = "127.0.0.1:{port}"\n')
    try:
        p.wait_routes("web.test")
        with pytest.raises(urllib.error.HTTPError) as e:
            post(port, "/fault/stall?worker=0&seconds=5")
        assert e.value.code in (404, 405)
    finally:
        assert p.stop() == 0


def test_a_port_in_use_exits_1_before_any_worker_starts(tmp_path: Path) -> None:
    """The supervisor binds the one listening socket itself, before spawning: a bind error is its own,
    reported plainly, exit status 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "proxy.toml"
        config.write_text(f'[proxy]\nlisten = "127.0.0.1:{port}"\nworkers = 2\n')
        r = subprocess.run(
            [VERDIGRIS, "proxy", "-c", str(config)], capture_output=True, text=True, timeout=WAIT
        )
    assert r.returncode == 1, r.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr, r.stderr
    assert "worker_started" not in r.stderr
