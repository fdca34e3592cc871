"""The fleet-wide lock-up, reproduced on one proxy and survived (docs/watchdog.md, "The incident switch").

A real agent and a real proxy with 2 workers; ``[proxy.fault] incident_row`` makes a change of one
``apps`` row take the routing table's read side and then, lower down, its write side:

(a) the project's lock refuses the upgrade at once: the change is refused (counted, one error event with
    both stacks), no probe times out, no worker restarts, requests keep being served and other rows
    still apply;
(b) the plain lock deadlocks every worker; the watchdog detects and replaces them all; connections opened
    meanwhile wait in the shared listening queue and are served by the replacements (delayed, not
    failed); the replacements loaded the trigger row from their snapshot and route it (workers started
    by the fork server, the default ``worker_start``);
(c) the plain lock without the watchdog: the stall persists (probe timeouts counted, a request times
    out) for a bounded observation, then the proxy is stopped cleanly;
(d) the switch is refused in production config and names only known tables.

Every wait is bounded (``WAIT``); each test stops the proxy it started.
"""

from __future__ import annotations

import json
import re
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from _api_util import WAIT, free_port, write_config
from _proxy_env import PLATFORM_SQL, VERDIGRIS, Agent, Proxy, Upstreams
from test_proxy_metrics import poll, scrape, total
from test_proxy_watchdog import log_events, one_request, watched_proxy
from verdigris.proxy.config import ProxyConfigError, parse_proxy_config
from verdigris.proxy.table import IncidentRow

pytestmark = pytest.mark.timeout(120)

MACHINE = "INSERT INTO machines (id, app, region, state, address) VALUES (?, ?, 'ams', 'started', ?)"


class IncidentEnv:
    """One agent and two upstreams. ``web.test`` routes to app ``web``; for each scenario ``x`` in a, b, c,
    ``incident-x.test`` has a hostname row and a machine for app ``incident-x``, whose ``apps`` row (the
    trigger) is written by the test."""

    def __init__(self, tmp: Path) -> None:
        self.upstreams = Upstreams(["A", "B"])
        self.agent = Agent(write_config(tmp, port=free_port(), schema=PLATFORM_SQL))
        a, b = (f"127.0.0.1:{self.upstreams.ports[n]}" for n in ("A", "B"))
        rows: list[tuple[str, list[object]]] = [
            ("INSERT INTO apps (name, org) VALUES (?, 'o')", ["web"]),
            ("INSERT INTO hostnames (hostname, app) VALUES (?, ?)", ["web.test", "web"]),
            (MACHINE, ["w1", "web", a]),
            (MACHINE, ["w2", "web", b]),
        ]
        for x in "abc":
            rows.append(
                (
                    "INSERT INTO hostnames (hostname, app) VALUES (?, ?)",
                    [f"incident-{x}.test", f"incident-{x}"],
                )
            )
            rows.append((MACHINE, [f"i{x}", f"incident-{x}", a]))
        self.agent.exec(*rows)  # type: ignore[arg-type]

    def trigger(self, x: str) -> float:
        """Insert scenario ``x``'s trigger row; the time just before the write."""
        t = time.monotonic()
        self.agent.exec(("INSERT INTO apps (name, org) VALUES (?, 'o')", [f"incident-{x}"]))
        return t


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IncidentEnv]:
    e = IncidentEnv.__new__(IncidentEnv)
    try:
        e.__init__(tmp_path_factory.mktemp("incident"))  # type: ignore[misc]
        yield e
    finally:
        if hasattr(e, "agent"):
            e.agent.stop()
        if hasattr(e, "upstreams"):
            e.upstreams.close()


def start_proxy(env: IncidentEnv, tmp: Path, x: str, extra: str) -> tuple[Proxy, int]:
    """A proxy (2 workers, metrics on, fault injection on) whose incident row is ``apps:incident-x``."""
    return watched_proxy(
        tmp, env.agent.url, f"proxy-{x}", f'{extra}[proxy.fault]\nincident_row = "apps:incident-{x}"\n'
    )


class Load:
    """Requests on new connections from a few threads until stopped: every result is kept."""

    def __init__(self, port: int, host: str = "web.test", threads: int = 2) -> None:
        self.port, self.host = port, host
        self.results: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Condition()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            r = one_request(self.port, self.host)
            with self._lock:
                self.results.append(r)
                self._lock.notify_all()
            self._stop.wait(0.01)  # pacing: a steady trickle, not a flood on the shared cores

    def wait_for(self, n: int) -> None:
        """Until ``n`` requests are done (bounded by ``WAIT``)."""
        with self._lock:
            assert self._lock.wait_for(lambda: len(self.results) >= n, WAIT), self.results

    def stop(self) -> list[str]:
        self._stop.set()
        for t in self._threads:
            t.join(WAIT + 1)
        return list(self.results)


def pids(samples: dict[str, float]) -> tuple[float, float]:
    return samples['verdigris_proxy_worker_pid{worker="0"}'], samples[
        'verdigris_proxy_worker_pid{worker="1"}'
    ]


# ---------------------------------------------------------------------------------------- (a)


def test_project_lock_refuses_the_change_and_serving_goes_on(env: IncidentEnv, tmp_path: Path) -> None:
    p, port = start_proxy(env, tmp_path, "a", "")  # table_lock = "project" is the default
    try:
        assert one_request(p.port, "incident-a.test") == "status 404"  # no apps row yet
        before = pids(scrape(port))
        load = Load(p.port)
        env.trigger("a")
        poll(port, lambda s: s["verdigris_proxy_table_apply_refused_total"] == 2, "both workers refused it")
        env.agent.exec(("UPDATE apps SET org = 'o2' WHERE name = ?", ["incident-a"]))
        poll(port, lambda s: s["verdigris_proxy_table_apply_refused_total"] == 4, "the update refused too")
        # other rows still apply, on both workers (the stream went on: no gap, no resubscription)
        env.agent.exec(("INSERT INTO hostnames (hostname, app) VALUES (?, ?)", ["after-a.test", "web"]))
        p.wait_routes("after-a.test")
        load.wait_for(20)
        results = load.stop()
        after = scrape(port)
        # the refused row is not in the table (the agent has it; the proxy refused both changes)
        assert one_request(p.port, "incident-a.test") == "status 404"
        assert total(after, "verdigris_proxy_probe_timeouts_total") == 0
        assert total(after, "verdigris_proxy_watchdog_restarts_total") == 0
        assert pids(after) == before
        assert after['verdigris_proxy_table_events_total{kind="gaps"}'] == 0
        assert after['verdigris_proxy_table_events_total{kind="apply_refused"}'] == 4
        print(f"\nproject lock: {len(results)} requests during the refusals, {results.count('ok')} ok")
        assert results and results == ["ok"] * len(results), results
        events = log_events(p, "table_apply_refused")
        assert len(events) == 4, events
        assert {e["kind"] for e in events} == {"insert", "update"}
        for ev in events:
            assert json.loads(ev["row"]) == "apps:incident-a" and ev["error_type"] == "LockUpgradeError"
            error = json.loads(ev["error"])
            read_at, _, write_at = error.partition("Write side asked at:")
            assert "Read side taken at:" in read_at and "in _feed_incident" in read_at, error
            assert "in _apply_under_read" in write_at, error
    finally:
        assert p.stop() == 0


# ---------------------------------------------------------------------------------------- (b)


def test_plain_lock_every_worker_stalls_and_is_replaced(env: IncidentEnv, tmp_path: Path) -> None:
    # workers forked from a preloaded fork server: the replacements start in a fraction of a second
    p, port = start_proxy(env, tmp_path, "b", 'table_lock = "plain"\n')
    try:
        assert one_request(p.port, "incident-b.test") == "status 404"
        before = scrape(port)
        old = pids(before)
        t0 = env.trigger("b")
        # New connections while every worker is stuck wait in the shared listening queue. They start
        # 0.3 s after the write (the change reaches the workers within milliseconds): a connection a
        # worker accepted just before it stalled is that worker's in-flight one, and is lost with it.
        with ThreadPoolExecutor(max_workers=20) as pool:
            futures: list[Future[tuple[str, float]]] = []
            for i in range(20):
                threading.Event().wait(max(0.0, t0 + 0.3 + i * 0.05 - time.monotonic()))  # load pacing
                futures.append(pool.submit(lambda: (one_request(p.port, "web.test"), time.monotonic())))
            done = [f.result(timeout=2 * WAIT) for f in futures]
        after = poll(
            port,
            lambda s: (
                s.get('verdigris_proxy_watchdog_restarts_total{reason="probe_timeout"}', 0) >= 2
                and all(a != b for a, b in zip(pids(s), old, strict=True))
                and total(s, "verdigris_proxy_worker_up") == 2
                and total(s, "verdigris_proxy_table_ready") == 2
            ),
            "both workers replaced",
        )
        results = [r for r, _ in done]
        served_again = max(t for _, t in done) - t0
        events = [e for e in log_events(p, "watchdog_restart") if e["pid"] in {str(int(x)) for x in old}]
        detections = [float(e["detected_at"]) - t0 for e in events]
        print(
            f"\nplain lock + watchdog: detected {[f'{d:.3f}' for d in detections]} s after the write; "
            f"the last of 20 queued requests answered {served_again:.3f} s after it; results {results}"
        )
        assert results == ["ok"] * 20, results  # delayed, not failed
        assert len(events) == 2 and {e["worker"] for e in events} == {"0", "1"}, events
        assert all(d <= 3.0 for d in detections), detections  # generous: the benchmark measures it
        for ev in events:
            text = Path(json.loads(ev["stacks"])).read_text()
            assert "in _apply_under_read" in text and "in _feed_incident" in text, text
        assert after["verdigris_proxy_table_apply_refused_total"] == 0
        # the replacements loaded the trigger row from their snapshot, and live: it routes on both
        p.wait_routes("incident-b.test")
        assert pids(scrape(port)) == pids(after)
    finally:
        assert p.stop() == 0


# ---------------------------------------------------------------------------------------- (c)


def test_plain_lock_without_watchdog_stays_stuck(env: IncidentEnv, tmp_path: Path) -> None:
    p, port = start_proxy(env, tmp_path, "c", 'table_lock = "plain"\nwatchdog = false\n')
    try:
        old = pids(scrape(port))
        env.trigger("c")
        stuck = poll(
            port,
            lambda s: (
                all(s[f'verdigris_proxy_probe_timeouts_total{{worker="{w}"}}'] >= 2 for w in "01")
                and total(s, "verdigris_proxy_worker_up") == 0
            ),
            "both workers stuck",
        )
        assert one_request(p.port, "web.test", timeout=1.5) in ("TimeoutError", "timeout")  # nobody answers
        assert total(stuck, "verdigris_proxy_watchdog_restarts_total") == 0
        assert pids(stuck) == old
        assert p.proc.poll() is None
    finally:
        t = time.monotonic()
        assert p.stop() == 0  # the supervisor kills workers that are stuck instead of waiting for a drain
        print(f"\nplain lock, no watchdog: stopped {time.monotonic() - t:.3f} s after SIGTERM")
    assert any("is stuck; killing it" in line for line in Path(p.log.name).read_text().splitlines())


# ---------------------------------------------------------------------------------------- (d)


def test_incident_switch_config() -> None:
    ok = parse_proxy_config(
        {
            "proxy": {
                "fault_injection": True,
                "table_lock": "plain",
                "fault": {"incident_row": "machines:incident-1"},
            }
        }
    )
    assert ok.table_lock == "plain" and ok.fault.incident_row == IncidentRow("machines", ("incident-1",))
    assert parse_proxy_config({"proxy": {}}).environment == "development"
    assert parse_proxy_config({"proxy": {}}).table_lock == "project"
    assert parse_proxy_config({"proxy": {}}).worker_start == "forkserver"
    assert parse_proxy_config({"proxy": {"worker_start": "spawn"}}).worker_start == "spawn"
    # production refuses every fault-injection setting, each named
    with pytest.raises(ProxyConfigError) as e:
        parse_proxy_config(
            {
                "proxy": {
                    "environment": "production",
                    "fault_injection": True,
                    "table_lock": "plain",
                    "fault": {"incident_row": "apps:x"},
                }
            }
        )
    lines = str(e.value).splitlines()
    assert len(lines) == 3 and all('proxy.environment = "production"' in line for line in lines), lines
    assert {"proxy.fault_injection", "proxy.table_lock", "[proxy.fault]"} == {
        next(w for w in ("proxy.fault_injection", "proxy.table_lock", "[proxy.fault]") if w in line)
        for line in lines
    }
    with pytest.raises(ProxyConfigError, match=re.escape("proxy.fault_injection = true: refused")):
        parse_proxy_config({"proxy": {"environment": "production", "fault_injection": True}})
    # off by default: the switch needs fault_injection
    with pytest.raises(ProxyConfigError, match=r"\[proxy.fault\]: fault injection only"):
        parse_proxy_config({"proxy": {"fault": {"incident_row": "apps:x"}}})
    with pytest.raises(ProxyConfigError, match=re.escape('proxy.table_lock = "plain": fault injection only')):
        parse_proxy_config({"proxy": {"table_lock": "plain"}})
    # bad values, each with a clear error
    bad = {
        "nosuch:x": "unknown table 'nosuch' (known: app_regions, apps, checks",
        "apps": 'expected "<table>:<primary key value>"',
        "checks:m1": "table checks has the primary key (machine, name): write 2",
        "checks:m1/": "write 2 non-empty value(s) separated by '/', got 'm1/'",
    }
    for value, message in bad.items():
        with pytest.raises(ProxyConfigError) as e:
            parse_proxy_config({"proxy": {"fault_injection": True, "fault": {"incident_row": value}}})
        assert "proxy.fault.incident_row: " in str(e.value) and message in str(e.value), str(e.value)
    for doc, message in (
        ({"environment": "staging"}, "proxy.environment: expected one of 'production', 'development'"),
        ({"table_lock": "rw"}, "proxy.table_lock: expected one of 'project', 'plain'"),
        ({"worker_start": "fork"}, "proxy.worker_start: expected one of 'spawn', 'forkserver'"),
        ({"fault_injection": True, "fault": {"row": "apps:x"}}, "proxy.fault.row: unknown key"),
        ({"fault_injection": True, "fault": {"incident_row": 3}}, "proxy.fault.incident_row: expected"),
    ):
        with pytest.raises(ProxyConfigError, match=message):
            parse_proxy_config({"proxy": doc})
    # composite keys
    assert IncidentRow.parse("checks:m1/http").key == ("m1", "http")
    assert IncidentRow.parse("apps:a/b").key == ("a/b",)  # a one-column key may hold a '/'
    assert str(IncidentRow.parse("services:web/80")) == "services:web/80"


def test_production_config_is_refused_by_the_command(tmp_path: Path) -> None:
    config = tmp_path / "proxy.toml"
    config.write_text(
        '[proxy]\nlisten = "127.0.0.1:0"\nenvironment = "production"\nfault_injection = true\n'
        '[proxy.fault]\nincident_row = "apps:incident-trigger"\n'
    )
    r = subprocess.run([VERDIGRIS, "proxy", "-c", str(config)], capture_output=True, text=True, timeout=WAIT)
    assert r.returncode != 0
    assert 'proxy.fault_injection = true: refused with proxy.environment = "production"' in r.stderr, r.stderr
    assert '[proxy.fault]: refused with proxy.environment = "production"' in r.stderr, r.stderr
