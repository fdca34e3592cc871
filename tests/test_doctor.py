"""``verdigris doctor``: the verdict from metric samples, then end to end with real processes.

Unit tests build the two scrapes by hand (:class:`~verdigris.doctor.Samples`) and check each verdict, the
priorities between them and every threshold at its boundary. End to end (the ``verdigris`` command as a
subprocess, real agent and proxy processes): all fine is healthy (exit 0); an app whose instance refuses
connections is the upstream network, naming app and instance; a proxy worker stalled by fault injection is
an internal stall (caught inside the doctor's window, then as a recent restart); an agent whose writer
thread is stalled (the agent watchdog's fault injection) while its peer writes is an internal stall in the
agent; an agent whose cluster peer was killed is gossip, naming the member. Every wait is bounded and every
process stopped, also on failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from _api_util import WAIT, free_port, short_dir, write_config
from _proxy_env import PLATFORM_SQL, VERDIGRIS, Agent, Proxy, Upstreams, stop_process
from test_cluster import free_port as gossip_port
from verdigris.admin import admin_call
from verdigris.cli import main
from verdigris.doctor import (
    AGENT,
    AGENT_STALL,
    GOSSIP,
    HEALTHY,
    PROXY,
    PROXY_STALL,
    UPSTREAM,
    DoctorError,
    Samples,
    Scrape,
    Thresholds,
    diagnose,
    parse_samples,
)

pytestmark = pytest.mark.timeout(120)

TH = Thresholds()


def proxy_samples(**overrides: float) -> Samples:
    """A healthy proxy with two workers; ``overrides`` set ``<metric>__<worker>`` gauges."""
    s = Samples()
    for w in ("0", "1"):
        s.add("verdigris_proxy_worker_up", 1, worker=w)
        s.add("verdigris_proxy_worker_stuck_seconds", overrides.get(f"stuck__{w}", 0), worker=w)
        s.add("verdigris_proxy_event_loop_lag_seconds", overrides.get(f"lag__{w}", 0.002), worker=w)
        s.add("verdigris_proxy_worker_restarts_total", overrides.get(f"restarts__{w}", 0), worker=w)
        s.add("verdigris_proxy_probe_timeouts_total", overrides.get(f"probe_timeouts__{w}", 0), worker=w)
        s.add("verdigris_proxy_worker_uptime_seconds", overrides.get(f"uptime__{w}", 3600), worker=w)
    for reason in ("probe_timeout", "startup_timeout", "exited"):
        s.add(
            "verdigris_proxy_watchdog_restarts_total", overrides.get(f"watchdog__{reason}", 0), reason=reason
        )
    s.add("verdigris_proxy_upstream_errors_total", 0, kind="refused")
    return s


def agent_samples(scope: str = "", **values: float) -> Samples:
    """A healthy clustered agent (two alive members); ``values`` override by short name."""
    s = Samples()
    sel = {"scope": scope} if scope else {}
    for state in ("alive", "suspect", "dead", "left"):
        s.add("verdigris_gossip_members", values.get(state, 2 if state == "alive" else 0), state=state, **sel)
    s.add("verdigris_gossip_sync_needs", values.get("missing", 0), kind="missing", **sel)
    s.add("verdigris_gossip_sync_needs", values.get("partial", 0), kind="partial", **sel)
    s.add("verdigris_gossip_gaps", values.get("gaps", 0), **sel)
    s.add("verdigris_gossip_apply_lag_seconds", values.get("apply_lag", 0), **sel)
    s.add("verdigris_gossip_apply_batch_seconds_count", values.get("batches", 0), **sel)
    s.add("verdigris_gossip_broadcasts_total", values.get("dropped", 0), event="dropped", **sel)
    for cause in ("loop", "apply"):
        s.add(
            "verdigris_watchdog_restarts_total",
            values.get(f"restarts_{cause}", 0),
            component="agent",
            cause=cause,
        )
        s.add(
            "verdigris_watchdog_probe_timeouts_total",
            values.get(f"timeouts_{cause}", 0),
            component="agent",
            cause=cause,
        )
    s.add("verdigris_loop_lag_seconds", values.get("loop_lag", 0.001), component="agent")
    s.add("verdigris_apply_lag_seconds", values.get("agent_apply_lag", 0.003))
    return s


def scrape_of(role: str, before: Samples, after: Samples, seconds: float = 2.0) -> Scrape:
    return Scrape(f"http://{role}.test/metrics", role, before, after, seconds)


def verdict(*scrapes: Scrape) -> str:
    return diagnose(scrapes, TH).verdict


# ---------------------------------------------------------------------------------------- units


def test_parse_samples_reads_prometheus_text_and_refuses_garbage() -> None:
    text = (
        "# TYPE verdigris_proxy_worker_up gauge\n"
        'verdigris_proxy_worker_up{worker="0"} 1.0\n'
        "# TYPE verdigris_proxy_upstream_errors counter\n"
        'verdigris_proxy_upstream_errors_total{kind="refused"} 7.0\n'
    )
    s = parse_samples(text)
    assert s.value("verdigris_proxy_worker_up", worker="0") == 1
    assert s.total("verdigris_proxy_upstream_errors_total") == 7
    with pytest.raises(DoctorError, match="http://x/metrics: not Prometheus text format"):
        parse_samples('metric{label="unterminated 1\n', "http://x/metrics")


def test_healthy() -> None:
    d = diagnose(
        [
            scrape_of(PROXY, proxy_samples(), proxy_samples()),
            scrape_of(AGENT, agent_samples(), agent_samples()),
        ]
    )
    assert d.verdict == HEALTHY and d.exit_code == 0 and d.findings == []
    assert d.lines()[0] == (
        "VERDICT: healthy — proxy loops healthy (lag 2.0 ms), no watchdog restarts; upstreams healthy; "
        "agent loop healthy (lag 1.0 ms); gossip healthy"
    )


@pytest.mark.parametrize(
    ("before", "after", "evidence"),
    [
        ({}, {"stuck__1": 1.2}, "worker 1 not answering probes for 1.2 s"),
        ({}, {"lag__0": 0.25}, "worker 0 loop lag 250 ms"),  # the threshold itself is a stall
        ({"lag__0": 0.3}, {}, "worker 0 loop lag 300 ms"),  # seen in either scrape
        (
            {},
            {"restarts__1": 2, "watchdog__probe_timeout": 2},
            "worker 1 replaced by the watchdog 2 time(s) in the last 2 s",
        ),
        ({}, {"watchdog__probe_timeout": 1}, "watchdog replaced 1 stuck worker(s) in the last 2 s"),
        ({}, {"restarts__0": 1, "watchdog__exited": 1}, "worker 0 restarted 1 time(s) in the last 2 s"),
        ({}, {"probe_timeouts__0": 3}, "worker 0 missed 3 probe(s) in the last 2 s"),
        (
            {"restarts__1": 1, "uptime__1": 59.0},
            {"restarts__1": 1, "uptime__1": 59.9},
            "worker 1 restarted 59.9 s ago (1 restart(s) in total)",
        ),
        (
            {"restarts__0": 1, "uptime__0": 3.0, "watchdog__probe_timeout": 1},
            {"restarts__0": 1, "uptime__0": 5.0, "watchdog__probe_timeout": 1},
            "worker 0 restarted 5.0 s ago (1 restart(s) in total; the watchdog replaced 1 stuck worker(s) "
            "since the proxy started)",
        ),
    ],
)
def test_proxy_stall_signals(before: dict[str, float], after: dict[str, float], evidence: str) -> None:
    d = diagnose([scrape_of(PROXY, proxy_samples(**before), proxy_samples(**after))], TH)
    assert d.verdict == PROXY_STALL and d.exit_code == 1
    assert d.headline.startswith(f"internal stall in the proxy — {evidence}")
    assert "upstreams healthy" in d.headline


def test_proxy_stall_names_where_the_worker_was_stuck() -> None:
    before = proxy_samples().add("verdigris_proxy_watchdog_stall_causes_total", 1, cause="table.py:apply")
    after = proxy_samples(restarts__0=1, watchdog__probe_timeout=1)
    after.add("verdigris_proxy_watchdog_stall_causes_total", 2, cause="table.py:apply")
    d = diagnose([scrape_of(PROXY, before, after)])
    assert d.headline == (
        "internal stall in the proxy — worker 0 replaced by the watchdog 1 time(s) in the last 2 s; "
        "stuck in table.py:apply; upstreams healthy"
    )


@pytest.mark.parametrize(
    "after",
    [
        {"lag__0": 0.2499},  # just under the loop lag threshold
        {"restarts__1": 1, "uptime__1": 60.0},  # restarted, but not recently (60 s is not "recent")
    ],
)
def test_proxy_below_thresholds_is_healthy(after: dict[str, float]) -> None:
    before = {k: v for k, v in after.items() if k.startswith("restarts")}  # no restart in the window
    assert verdict(scrape_of(PROXY, proxy_samples(**before), proxy_samples(**after))) == HEALTHY


def with_errors(s: Samples, app: str, instance: str, **kinds: float) -> Samples:
    for kind, n in kinds.items():
        s.add("verdigris_proxy_instance_upstream_errors_total", n, app=app, instance=instance, kind=kind)
    return s


def test_upstream_names_app_and_instance_with_rates() -> None:
    before = with_errors(proxy_samples(), "web", "i-3", refused=10, timeout=0)
    after = with_errors(proxy_samples(), "web", "i-3", refused=38, connect_timeout=0, timeout=6)
    d = diagnose([scrape_of(PROXY, before, after)])
    assert d.verdict == UPSTREAM
    assert d.headline == (
        "upstream network — app 'web' instance 'i-3' connect errors 14/s, timeouts 3.0/s; "
        "proxy loops healthy (lag 2.0 ms), no watchdog restarts"
    )


@pytest.mark.parametrize(
    ("errors", "seconds", "expected"),
    [(1, 2.0, UPSTREAM), (1, 2.1, HEALTHY), (0, 2.0, HEALTHY)],  # threshold: 0.5 errors/s per instance
)
def test_upstream_rate_threshold(errors: int, seconds: float, expected: str) -> None:
    before = with_errors(proxy_samples(), "web", "i-1", reset=5)
    after = with_errors(proxy_samples(), "web", "i-1", reset=5 + errors)
    assert verdict(scrape_of(PROXY, before, after, seconds)) == expected


def test_an_ejected_instance_is_upstream_evidence_without_new_errors() -> None:
    before = with_errors(proxy_samples(), "web", "i-2", refused=3)
    after = with_errors(proxy_samples(), "web", "i-2", refused=3)
    after.add("verdigris_proxy_instance_ejected_seconds", 27.5, app="web", instance="i-2")
    d = diagnose([scrape_of(PROXY, before, after)])
    assert d.verdict == UPSTREAM
    assert (
        "app 'web' instance 'i-2' connect errors 3 so far, ejected by passive health (27.5 s left)"
        in d.headline
    )


def test_a_counter_reset_counts_from_zero() -> None:
    # a proxy restarted between the scrapes: its counters start again; 4 errors since, not -96
    before = with_errors(proxy_samples(), "web", "i-1", refused=100)
    after = with_errors(proxy_samples(), "web", "i-1", refused=4)
    d = diagnose([scrape_of(PROXY, before, after)])
    assert d.verdict == UPSTREAM and "connect errors 2.0/s" in d.headline


@pytest.mark.parametrize(
    ("before", "after", "evidence"),
    [
        (
            {},
            {"restarts_loop": 1},
            "agent restarted by its watchdog 1 time(s) in the last 2 s (stalled: loop)",
        ),
        ({}, {"timeouts_apply": 1}, "agent watchdog: 1 apply probe(s) missed their deadline in the last 2 s"),
        ({}, {"loop_lag": 0.25}, "agent loop lag 250 ms"),
        ({}, {"agent_apply_lag": 5.0}, "apply path lag 5.0 s (writer thread)"),
        # changes wait 2 s and not one batch merged in the 2 s window: stuck, not busy
        (
            {},
            {"apply_lag": 2.0},
            "writer thread stuck: received changes wait 2.0 s, no batch merged in the last 2 s",
        ),
    ],
)
def test_agent_stall_signals(before: dict[str, float], after: dict[str, float], evidence: str) -> None:
    d = diagnose([scrape_of(AGENT, agent_samples(**before), agent_samples(**after))])
    assert d.verdict == AGENT_STALL
    assert d.headline.startswith(f"internal stall in the agent — {evidence}")


@pytest.mark.parametrize(
    ("values", "evidence"),
    [
        ({"suspect": 1, "dead": 2}, "1 suspect and 2 dead member(s) in scope regional"),
        ({"dead": 1}, "1 dead member(s) in scope regional"),
        ({"missing": 990, "partial": 10, "gaps": 3}, "sync needs 1000 versions (3 gaps) in scope regional"),
        ({"apply_lag": 2.0, "batches": 1}, "apply lag 2.0 s in scope regional"),  # merging, behind
    ],
)
def test_gossip_signals(values: dict[str, float], evidence: str) -> None:
    d = diagnose([scrape_of(AGENT, agent_samples("regional"), agent_samples("regional", **values))])
    assert d.verdict == GOSSIP
    assert d.headline.startswith(f"gossip — {evidence}")


def test_gossip_broadcast_drops_rate() -> None:
    before = agent_samples(dropped=10)
    assert verdict(scrape_of(AGENT, before, agent_samples(dropped=12))) == GOSSIP  # 1/s: the threshold
    assert verdict(scrape_of(AGENT, before, agent_samples(dropped=11))) == HEALTHY  # 0.5/s


@pytest.mark.parametrize(
    "values", [{"missing": 999}, {"apply_lag": 1.99}, {"agent_apply_lag": 4.99}, {"left": 3}]
)
def test_agent_below_thresholds_is_healthy(values: dict[str, float]) -> None:
    assert verdict(scrape_of(AGENT, agent_samples(), agent_samples(**values))) == HEALTHY


def test_priorities_name_the_cause_before_its_symptoms() -> None:
    stalled = scrape_of(
        PROXY, proxy_samples(), with_errors(proxy_samples(stuck__0=2.0), "web", "i-1", timeout=20)
    )
    erroring = scrape_of(PROXY, proxy_samples(), with_errors(proxy_samples(), "web", "i-1", timeout=20))
    agent_stuck = scrape_of(AGENT, agent_samples(), agent_samples(loop_lag=3, suspect=1))
    gossiping = scrape_of(AGENT, agent_samples(), agent_samples(suspect=1))
    assert verdict(stalled, agent_stuck) == PROXY_STALL
    assert verdict(erroring, agent_stuck) == AGENT_STALL
    assert verdict(erroring, gossiping) == GOSSIP
    assert verdict(erroring) == UPSTREAM
    d = diagnose([stalled, gossiping])
    # every finding is evidence; those of a lower verdict are tagged with it
    lines = d.lines()
    assert lines[0].startswith("VERDICT: internal stall in the proxy — worker 0 not answering probes")
    assert any("timeouts 10/s [upstream network]" in line for line in lines)
    assert any("1 suspect member(s) [gossip]" in line for line in lines)
    doc = d.as_json()
    assert doc["verdict"] == PROXY_STALL and doc["exit_code"] == 1
    assert [f["category"] for f in doc["findings"]] == [PROXY_STALL, GOSSIP, UPSTREAM]


def test_cli_cannot_scrape_is_exit_2_naming_the_url(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    r = CliRunner().invoke(main, ["doctor", "--proxy-metrics", f"127.0.0.1:{port}", "--interval", "0.1"])
    assert r.exit_code == 2
    assert f"cannot scrape http://127.0.0.1:{port}/metrics: connection refused" in r.output
    config = write_config(tmp_path)  # no [telemetry.prometheus]
    r = CliRunner().invoke(main, ["doctor", "-c", str(config)])
    assert r.exit_code == 2 and "no [telemetry.prometheus] addr" in r.output
    r = CliRunner().invoke(main, ["doctor", "--agent-metrics", "x:1", "--interval", "0"])
    assert r.exit_code == 2 and "--interval must be > 0" in r.output
    r = CliRunner().invoke(main, ["doctor"])
    assert r.exit_code == 2 and "nothing to examine" in r.output


# ---------------------------------------------------------------------------------------- end to end


def doctor(*args: str) -> tuple[int, str]:
    """Run ``verdigris doctor ARGS`` as a subprocess: (exit status, stdout + stderr), printed for ``-rP``."""
    r = subprocess.run([VERDIGRIS, "doctor", *args], capture_output=True, text=True, timeout=WAIT * 3)
    print(f"$ verdigris doctor {' '.join(args)}  -> exit {r.returncode}\n{r.stdout}{r.stderr}")
    return r.returncode, r.stdout + r.stderr


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=WAIT) as r:
        return parse_samples(r.read().decode(), url)


def poll(url: str, ok: Any, what: str) -> Samples:
    deadline = time.monotonic() + WAIT * 2
    while True:
        s = scrape(url)
        if ok(s):
            return s
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.1)


class Fleet:
    """One agent (metrics on), two upstreams' worth of rows, a proxy with 2 workers, metrics and fault
    injection on."""

    def __init__(self, tmp: Path) -> None:
        self.upstreams = Upstreams(["A"])
        self.dead_port = free_port()
        self.agent_metrics_port = free_port()
        self.agent_config = write_config(
            tmp, port=free_port(), schema=PLATFORM_SQL, prometheus_port=self.agent_metrics_port
        )
        self.agent: Agent | None = Agent(self.agent_config)
        machine = "INSERT INTO machines (id, app, region, state, address) VALUES (?, ?, 'ams', 'started', ?)"
        self.agent.exec(
            ("INSERT INTO apps (name, org) VALUES (?, 'o')", ["web"]),
            ("INSERT INTO apps (name, org) VALUES (?, 'o')", ["dead"]),
            ("INSERT INTO hostnames (hostname, app) VALUES (?, ?)", ["web.test", "web"]),
            ("INSERT INTO hostnames (hostname, app) VALUES (?, ?)", ["dead.test", "dead"]),
            (machine, ["w1", "web", f"127.0.0.1:{self.upstreams.ports['A']}"]),
            (machine, ["d1", "dead", f"127.0.0.1:{self.dead_port}"]),
        )
        self.metrics_port = free_port()
        self.proxy: Proxy | None = Proxy(
            tmp,
            self.agent.url,
            name="dproxy",
            extra=(
                f'metrics_listen = "127.0.0.1:{self.metrics_port}"\nprobe_interval = 0.25\n'
                f'probe_deadline = 1.0\nfault_injection = true\nstack_dir = "{tmp / "stacks"}"\n'
            ),
        )
        self.proxy.wait_routes("web.test")
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        poll(self.metrics_url, lambda s: s.total("verdigris_proxy_table_ready") == 2, "both workers ready")

    def close(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()
        if self.agent is not None:
            self.agent.stop()
        self.upstreams.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet.__new__(Fleet)
    f.proxy = f.agent = None
    try:
        f.__init__(tmp_path_factory.mktemp("doctor"))  # type: ignore[misc]
        yield f
    finally:
        if hasattr(f, "upstreams"):
            f.close()


# The three tests below share one fleet and run in this order: healthy first (an ejected instance or a
# replaced worker stays visible for a while afterwards).


def test_e2e_all_fine_is_healthy_exit_0(fleet: Fleet) -> None:
    assert fleet.proxy is not None
    assert all(fleet.proxy.get("web.test")[0] == 200 for _ in range(5))
    code, out = doctor("-c", str(fleet.agent_config), "--proxy-metrics", fleet.metrics_url, "--interval", "1")
    assert code == 0, out
    assert out.startswith("VERDICT: healthy — "), out
    for note in ("proxy loops healthy", "no watchdog restarts", "upstreams healthy", "agent loop healthy"):
        assert note in out, out
    assert "no gossip (single agent)" in out


def test_e2e_refused_connections_are_the_upstream_network(fleet: Fleet) -> None:
    proxy = fleet.proxy
    assert proxy is not None
    stop = threading.Event()
    statuses: list[int] = []

    def load() -> None:  # requests to the app whose instance refuses, all along the doctor's window
        while not stop.is_set():
            statuses.append(proxy.get("dead.test")[0])
            stop.wait(0.05)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        code, out = doctor("--proxy-metrics", fleet.metrics_url, "--interval", "2", "--json")
    finally:
        stop.set()
        thread.join(WAIT)
    assert code == 1, out
    doc = json.loads(out)
    assert doc["verdict"] == UPSTREAM, doc
    assert doc["headline"].startswith("upstream network — app 'dead' instance 'd1' "), doc
    assert "connect errors" in doc["headline"] and "proxy loops healthy" in doc["headline"]
    assert 502 in statuses  # refused: the proxy answered upstream_refused before ejecting d1


class Relay:
    """A tiny HTTP server in front of the proxy's ``/metrics`` (real metrics, forwarded) that tells the
    test when the doctor's first scrape has been answered: the stall can then start inside its window."""

    def __init__(self, target: str) -> None:
        self.first = threading.Event()
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with urllib.request.urlopen(target, timeout=WAIT) as r:
                    body = r.read()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                relay.first.set()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(WAIT)


def test_e2e_stalled_worker_is_an_internal_stall(fleet: Fleet) -> None:
    relay = Relay(fleet.metrics_url)
    try:
        proc = subprocess.Popen(
            [VERDIGRIS, "doctor", "--proxy-metrics", relay.url, "--interval", "3"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert relay.first.wait(WAIT), "the doctor never scraped"
            req = urllib.request.Request(
                f"http://127.0.0.1:{fleet.metrics_port}/fault/stall?worker=0&seconds=6", b"", method="POST"
            )
            with urllib.request.urlopen(req, timeout=WAIT) as r:
                assert r.status == 200
            out, _ = proc.communicate(timeout=WAIT * 2)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(WAIT)
    finally:
        relay.close()
    print(out)
    assert proc.returncode == 1, out
    first = out.splitlines()[0]
    # the stall began inside the window: caught stuck, or already replaced by the watchdog
    assert first.startswith("VERDICT: internal stall in the proxy — worker 0 "), out
    replaced = "replaced by the watchdog 1 time(s) in the last 3 s" in first
    assert replaced or "not answering probes" in first, out
    if replaced:
        assert "stuck in watchdog.py:fault_stall" in first, out  # the main thread's innermost frame
    # the watchdog replaces it: serving goes on
    poll(
        fleet.metrics_url,
        lambda s: (
            s.total("verdigris_proxy_watchdog_restarts_total", reason="probe_timeout") >= 1
            and s.total("verdigris_proxy_worker_up") == 2
        ),
        "the stuck worker to be replaced",
    )
    # a doctor that comes after the replacement still names it (a restart less than 60 s ago)
    code, out = doctor("--proxy-metrics", fleet.metrics_url, "--interval", "1")
    assert code == 1, out
    assert out.startswith("VERDICT: internal stall in the proxy — worker 0 restarted "), out
    assert "the watchdog replaced 1 stuck worker(s) since the proxy started" in out, out


# ---------------------------------------------------------------------------------------- gossip


def gossip_config(root: Path, port: int, bootstrap: list[str], metrics_port: int | None = None) -> Path:
    """An agent in a plaintext cluster; with ``metrics_port`` also metrics and the watchdog's fault
    injection (restart off: a stall is only reported, the agent is not re-executed)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "schema.sql").write_text("CREATE TABLE kv (k TEXT NOT NULL PRIMARY KEY, v INTEGER);\n")
    lines = [
        "[db]",
        f'path = "{root / "state.db"}"',
        f'schema_paths = ["{root / "schema.sql"}"]',
        "[api]",
        f'addr = "127.0.0.1:{free_port()}"',
        "[admin]",
        f'path = "{short_dir() / "admin.sock"}"',
        "[gossip]",
        f'addr = "127.0.0.1:{port}"',
        f"bootstrap = {json.dumps(bootstrap)}",
        "plaintext = true",
    ]
    if metrics_port is not None:
        lines += ["[telemetry.prometheus]", f'addr = "127.0.0.1:{metrics_port}"']
        lines += ["[watchdog]", "fault-injection = true", "restart = false"]
    path = root / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_e2e_cluster_healthy_then_stuck_writer_then_killed_peer(tmp_path: Path) -> None:
    """Agent a with peer b: healthy; a's writer thread stalled while b writes: an internal stall in the
    agent (not gossip); b killed: gossip, naming b."""
    port_a, port_b, metrics = gossip_port(), gossip_port(), free_port()
    config_a = gossip_config(tmp_path / "a", port_a, [], metrics)
    config_b = gossip_config(tmp_path / "b", port_b, [f"127.0.0.1:{port_a}"])
    url = f"http://127.0.0.1:{metrics}/metrics"
    agents: list[Agent] = []
    try:
        t0 = time.monotonic()
        agents.append(Agent(config_a))
        agents.append(Agent(config_b))
        poll(url, lambda s: s.value("verdigris_gossip_members", state="alive") == 2, "b to join a")
        print(f"cluster of 2 up in {time.monotonic() - t0:.1f} s")
        code, out = doctor("-c", str(config_a), "--interval", "1")
        assert code == 0, out
        assert out.startswith("VERDICT: healthy") and "gossip healthy" in out, out

        a, b = agents
        reply = admin_call(
            a.settings.admin.path, {"cmd": "fault", "action": "stall-apply", "seconds": 12}, WAIT
        )
        assert reply.get("ok"), reply
        for i in range(3):  # b's writes reach a, and wait there for its writer thread
            b.exec(("INSERT INTO kv (k, v) VALUES (?, ?)", [f"k{i}", i]))
        poll(url, lambda s: (s.value("verdigris_gossip_apply_lag_seconds") or 0) > 0, "a to receive them")
        code, out = doctor("-c", str(config_a), "--interval", "2")
        assert code == 1, out
        assert out.startswith("VERDICT: internal stall in the agent — "), out
        assert "writer thread stuck" in out or "apply path lag" in out, out
        poll(url, lambda s: s.value("verdigris_gossip_apply_lag_seconds") == 0, "a's writer to catch up")

        os.kill(b.proc.pid, signal.SIGKILL)
        b.proc.wait(WAIT)
        t0 = time.monotonic()
        poll(
            url,
            lambda s: (
                s.total("verdigris_gossip_members", state="suspect")
                + s.total("verdigris_gossip_members", state="dead")
                >= 1
            ),
            "a to notice b is gone",
        )
        print(f"b seen gone after {time.monotonic() - t0:.1f} s")
        code, out = doctor("-c", str(config_a), "--interval", "1")
        assert code == 1, out
        assert out.startswith("VERDICT: gossip — 1 suspect member(s)") or out.startswith(
            "VERDICT: gossip — 1 dead member(s)"
        ), out
        # the admin socket names it
        assert f"at 127.0.0.1:{port_b} is " in out, out
    finally:
        for agent in agents:
            stop_process(agent.proc, agent.log)
