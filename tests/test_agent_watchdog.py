"""The agent's in-process watchdog (src/verdigris/watchdog/agent.py): real agent processes stalled through
the admin socket's fault injection are detected, their stacks kept, and re-executed serving the same ports
with their data; ``restart = false`` and embedded agents only report; the config section is strict."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from _api_util import free_port, short_dir
from verdigris.admin import admin_call, parse_command
from verdigris.agent import Agent
from verdigris.config import ConfigError, parse_config
from verdigris.watchdog.agent import STATE_ENV, AgentWatchdog, CarriedState

BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))
# the benchmark (bench/agent_watchdog.py) drives the same agent process: one piece of code for both
from agent_watchdog import AgentProcess, field, http  # noqa: E402

SCHEMA = "CREATE TABLE kv (k TEXT NOT NULL PRIMARY KEY, v INTEGER NOT NULL DEFAULT 0);\n"
WAIT = 30.0
"""Upper bound of every wait on an agent process (start-up, restart) in these tests."""
DETECTION_BOUND = 5.0
"""Generous bound on loop-stall detection (the deadline is 1 s; the bench reports the real figure)."""


class AgentProc(AgentProcess):
    """A real ``verdigris agent`` process with fault injection on, JSON logs, API and metrics ports."""

    def __init__(self, tmp: Path, watchdog: str = "", extra: str = "") -> None:
        port, self.metrics_port = free_port(), free_port()
        admin = short_dir() / "admin.sock"
        self.stack_dir = tmp / "stacks"
        self.db = tmp / "state.db"
        (tmp / "schema.sql").write_text(SCHEMA)
        config = tmp / "agent.toml"
        config.write_text(
            f'[db]\npath = "{self.db}"\nschema_paths = ["{tmp / "schema.sql"}"]\n'
            f'[api]\naddr = "127.0.0.1:{port}"\n[admin]\npath = "{admin}"\n'
            f'[telemetry.prometheus]\naddr = "127.0.0.1:{self.metrics_port}"\n[log]\nformat = "json"\n'
            f'{extra}[watchdog]\nfault-injection = true\nstack-dir = "{self.stack_dir}"\n{watchdog}'
        )
        super().__init__(config, tmp / "agent.log", port, admin)

    def wait_log(self, text: str) -> None:
        deadline = time.monotonic() + WAIT
        while text not in self.log_text():
            assert time.monotonic() < deadline, f"{text!r} not logged:\n{self.log_text()}"
            time.sleep(0.01)  # another process's log file: polled, bounded

    def metrics(self) -> str:
        return http(f"http://127.0.0.1:{self.metrics_port}/metrics").decode()

    def inherited_fds(self) -> list[str]:
        """The process's file descriptors beyond stdin/stdout/stderr that an exec would keep open (no
        O_CLOEXEC): a leak of sockets or SQLite's files into the re-executed agent."""
        assert self.proc is not None
        leaks = []
        for info in Path(f"/proc/{self.proc.pid}/fdinfo").iterdir():
            fd = int(info.name)
            try:
                flags = int(info.read_text().split("flags:")[1].split()[0], 8)
                target = os.readlink(f"/proc/{self.proc.pid}/fd/{fd}")
            except (OSError, IndexError):
                continue  # closed meanwhile
            if fd > 2 and not flags & os.O_CLOEXEC:
                leaks.append(f"{fd} -> {target}")
        return leaks


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Any]:
    started: list[AgentProc] = []

    def make(watchdog: str = "", name: str = "a", extra: str = "") -> AgentProc:
        d = tmp_path / name
        d.mkdir()
        agent = AgentProc(d, watchdog, extra)
        started.append(agent)
        agent.start()
        return agent

    yield make
    for agent in started:
        agent.stop()
        shutil.rmtree(agent.admin.parent, ignore_errors=True)


def _ts(event: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(event["ts"]).timestamp()


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return None


def _rows(base: str) -> list[list[Any]]:
    out = []
    for line in http(f"{base}/v1/queries", "SELECT k, v FROM kv ORDER BY k").decode().splitlines():
        event = json.loads(line)
        if "row" in event:
            out.append(event["row"][1])
    return out


# ------------------------------------------------------------------------------------------ real agents


def test_loop_stall_is_detected_and_the_agent_re_executed(agent_factory: Any) -> None:
    agent = agent_factory()
    http(f"{agent.base}/v1/transactions", [["INSERT INTO kv (k, v) VALUES (?, ?)", ["a", 1]]])
    first = admin_call(agent.admin, {"cmd": "ping"}, 5)
    assert first["watchdog"]["enabled"] is True and first["watchdog"]["restart"] is True
    assert _rows(agent.base) == [["a", 1]]  # a reader connection is open too
    assert agent.inherited_fds() == []

    # Suspended (SIGSTOP) for longer than the deadline while a probe is in flight (the loop is busy for
    # 0.9 s, below the deadline): not a stall of the agent's own, so no restart.
    agent.send_fault("stall-loop", 0.9)
    agent.wait_log("fault injection: blocking the event loop")
    time.sleep(0.4)  # into the busy stretch: a probe is sent within 0.25 s of its start
    agent.proc.send_signal(signal.SIGSTOP)
    time.sleep(2.0)  # the suspension itself is the test condition
    agent.proc.send_signal(signal.SIGCONT)
    # some probes after the suspension: a false detection would come with the first of them
    after_stop = agent.wait_serving(
        lambda p: p["watchdog"]["probes"]["loop"] >= first["watchdog"]["probes"]["loop"] + 6
    )
    assert after_stop["watchdog"]["probe_timeouts"] == {"loop": 0, "apply": 0}, agent.log_text()

    sent = agent.send_fault("stall-loop", 60)
    ping = agent.wait_serving(lambda p: p["watchdog"]["restarts"]["loop"] == 1)
    served_again = time.time() - sent

    assert ping["pid"] == first["pid"] == agent.proc.pid  # re-exec'd in place, not a new process
    assert ping["site_id"] == first["site_id"]
    assert _rows(agent.base) == [["a", 1]]
    assert agent.inherited_fds() == []
    [event] = agent.events("watchdog_restart")
    [resumed] = agent.events("watchdog_resumed")
    assert field(resumed, "cause") == "loop" and field(resumed, "restarts") == "1"
    assert 0 < float(field(resumed, "serving_again").rstrip("s")) < WAIT
    detection = float(field(event, "detection").rstrip("s"))
    since_sent = _ts(event) - sent
    print(
        f"loop stall: detection {detection:.3f}s (probe), {since_sent:.3f}s after the fault; "
        f"serving again {served_again:.3f}s after the fault"
    )
    assert 1.0 <= detection < DETECTION_BOUND
    assert since_sent < DETECTION_BOUND
    assert field(event, "cause") == "loop"
    assert json.loads(field(event, "stalled_in")) == "agent.py:stall_event_loop"
    stack_file = Path(json.loads(field(event, "stacks")))
    assert stack_file.parent == agent.stack_dir and stack_file.exists()
    stacks = stack_file.read_text()
    assert "stall_event_loop" in stacks and "_fault_stall" in stacks
    assert "--- asyncio tasks" in stacks and "end of asyncio tasks" in stacks
    running = stacks.split("RUNNING (the loop is stuck in it) ", 1)[1]
    assert running.startswith("<Task") and "coro=<AdminServer._serve()" in running.splitlines()[0]
    assert ping["watchdog"]["last_stack_file"] == str(stack_file)

    metrics = agent.metrics()
    assert _metric(metrics, 'verdigris_watchdog_restarts_total{cause="loop",component="agent"}') == 1
    assert _metric(metrics, 'verdigris_watchdog_restarts_total{cause="apply",component="agent"}') == 0
    assert _metric(metrics, 'verdigris_watchdog_last_detection_seconds{component="agent"}') == pytest.approx(
        detection, abs=0.001
    )
    lag = _metric(metrics, 'verdigris_loop_lag_seconds{component="agent"}')
    assert lag is not None and lag < 1.0


def test_clustered_agent_rejoins_and_catches_up_after_a_restart(agent_factory: Any) -> None:
    """A re-executed member binds its gossip port again and gets the writes it missed while stuck."""
    port_a, port_b = free_port(), free_port()
    gossip = '[gossip]\naddr = "127.0.0.1:{}"\nplaintext = true\nbootstrap = [{}]\n'
    a = agent_factory(name="a", extra=gossip.format(port_a, ""))
    b = agent_factory(name="b", extra=gossip.format(port_b, f'"127.0.0.1:{port_a}"'))
    http(f"{a.base}/v1/transactions", [["INSERT INTO kv (k, v) VALUES ('before', 1)", []]])
    _wait_for(lambda: _rows(b.base) == [["before", 1]], WAIT)

    b.send_fault("stall-loop", 60)
    http(f"{a.base}/v1/transactions", [["INSERT INTO kv (k, v) VALUES ('during', 2)", []]])
    ping = b.wait_serving(lambda p: p["watchdog"]["restarts"]["loop"] == 1)
    assert ping["gossip"] == f"127.0.0.1:{port_b}"
    _wait_for(lambda: _rows(b.base) == [["before", 1], ["during", 2]], WAIT)
    http(f"{b.base}/v1/transactions", [["INSERT INTO kv (k, v) VALUES ('after', 3)", []]])
    _wait_for(lambda: len(_rows(a.base)) == 3, WAIT)


def test_apply_stall_restarts_with_backoff(agent_factory: Any) -> None:
    agent = agent_factory("apply-deadline = 1\n")
    http(f"{agent.base}/v1/transactions", [["INSERT INTO kv (k, v) VALUES (?, ?)", ["b", 2]]])
    pid = agent.proc.pid

    agent.send_fault("stall-apply", 60)
    ping = agent.wait_serving(lambda p: p["watchdog"]["restarts"]["apply"] == 1)
    # a second stall within the backoff window continues the streak: 0.1 s before the exec
    agent.send_fault("stall-apply", 60)
    ping = agent.wait_serving(lambda p: p["watchdog"]["restarts"]["apply"] == 2)

    assert ping["pid"] == pid
    assert ping["watchdog"]["restarts"] == {"loop": 0, "apply": 2}
    first, second = agent.events("watchdog_restart")
    assert [field(e, "cause") for e in (first, second)] == ["apply", "apply"]
    assert [field(e, "backoff") for e in (first, second)] == ["0.000s", "0.100s"]
    assert json.loads(field(second, "stalled_in")) == "agent.py:stall_apply_path"
    assert "stall_apply_path" in Path(json.loads(field(second, "stacks"))).read_text()
    assert _rows(agent.base) == [["b", 2]]
    # the apply path works again: a write goes through
    http(f"{agent.base}/v1/transactions", [["UPDATE kv SET v = 3 WHERE k = 'b'", []]])
    assert _rows(agent.base) == [["b", 3]]
    metrics = agent.metrics()
    assert _metric(metrics, 'verdigris_watchdog_restarts_total{cause="apply",component="agent"}') == 2
    stalled = (
        'verdigris_watchdog_stall_causes_total{component="agent",stalled_in="agent.py:stall_apply_path"}'
    )
    assert _metric(metrics, stalled) == 2  # carried across both execs
    assert _metric(metrics, 'verdigris_watchdog_detection_seconds_count{component="agent"}') == 2
    assert _metric(metrics, 'verdigris_watchdog_detection_seconds_bucket{component="agent",le="0.75"}') == 0
    assert _metric(metrics, 'verdigris_watchdog_detection_seconds_bucket{component="agent",le="+Inf"}') == 2
    assert _metric(metrics, 'verdigris_watchdog_probe_timeouts_total{cause="apply",component="agent"}') == 2


def test_restart_false_only_reports(agent_factory: Any) -> None:
    agent = agent_factory("restart = false\napply-deadline = 1\n")
    before = admin_call(agent.admin, {"cmd": "ping"}, 5)
    assert before["watchdog"]["restart"] is False

    reply = admin_call(agent.admin, {"cmd": "fault", "action": "stall-loop", "seconds": 2.5}, 15)
    assert reply == {"ok": True, "stalled": "loop", "seconds": 2.5}  # the same loop, after the stall

    ping = agent.wait_serving(lambda p: p["watchdog"]["probe_timeouts"]["loop"] == 1)
    assert ping["pid"] == before["pid"]
    assert ping["watchdog"]["restarts"] == {"loop": 0, "apply": 0}
    assert agent.events("watchdog_restart") == []
    [stall] = agent.events("watchdog_stall")
    assert field(stall, "cause") == "loop" and "action=report" in stall["msg"]
    assert Path(json.loads(field(stall, "stacks"))).exists()
    deadline = time.monotonic() + WAIT
    while not agent.events("watchdog_recovered") and time.monotonic() < deadline:
        time.sleep(0.05)  # the log line is written by another process
    assert agent.events("watchdog_recovered")
    metrics = agent.metrics()
    assert _metric(metrics, 'verdigris_watchdog_probe_timeouts_total{cause="loop",component="agent"}') == 1
    assert _metric(metrics, 'verdigris_watchdog_restarts_total{cause="loop",component="agent"}') == 0

    # A stuck writer, while the loop still serves: the apply lag grows on /metrics, then it recovers.
    agent.send_fault("stall-apply", 2.5)
    deadline = time.monotonic() + WAIT
    lag = 0.0
    while lag < 1.5 and time.monotonic() < deadline:
        lag = _metric(agent.metrics(), "verdigris_apply_lag_seconds") or 0.0
        time.sleep(0.05)  # scraping another process
    assert lag >= 1.5
    ping = agent.wait_serving(
        lambda p: p["watchdog"]["probe_timeouts"]["apply"] == 1 and p["watchdog"]["lag"]["apply"] < 1
    )
    assert ping["pid"] == before["pid"] and ping["watchdog"]["restarts"] == {"loop": 0, "apply": 0}
    assert [field(e, "cause") for e in agent.events("watchdog_stall")] == ["loop", "apply"]


# ------------------------------------------------------------------------------------------ embedded agents


def _config(tmp_path: Path, watchdog: str) -> Any:
    admin = short_dir() / "admin.sock"
    text = (
        f'[db]\npath = "{tmp_path / "state.db"}"\n[api]\naddr = "127.0.0.1:0"\n'
        f'[admin]\npath = "{admin}"\n[watchdog]\nstack-dir = "{tmp_path / "stacks"}"\n{watchdog}'
    )
    return parse_config(text, "test.toml", tmp_path)


async def _admin(agent: Agent, command: dict[str, Any]) -> dict[str, Any]:
    return await asyncio.to_thread(admin_call, agent.config.admin.path, command, 10.0)


@pytest.mark.timeout(60)
async def test_fault_refused_when_fault_injection_is_off(tmp_path: Path) -> None:
    agent = Agent(_config(tmp_path, ""))
    await asyncio.wait_for(agent.start(), 20)
    try:
        reply = await _admin(agent, {"cmd": "fault", "action": "stall-loop", "seconds": 5})
        assert reply["ok"] is False
        assert "fault injection is off: set [watchdog] fault-injection = true" in reply["error"]
        reply = await _admin(agent, {"cmd": "fault", "action": "stall-apply", "seconds": 5})
        assert reply["ok"] is False and "fault-injection" in reply["error"]
        # the gossip actions still answer as before on an agent without [gossip]
        reply = await _admin(agent, {"cmd": "fault", "action": "heal"})
        assert reply == {"ok": False, "error": "fault failed: gossip is not running"}
    finally:
        await asyncio.wait_for(agent.stop(), 20)


@pytest.mark.timeout(60)
async def test_fault_bad_seconds_is_a_clear_error(tmp_path: Path) -> None:
    agent = Agent(_config(tmp_path, "fault-injection = true\n"))
    await asyncio.wait_for(agent.start(), 20)
    try:
        for bad in (0, -1, "x", True, 1e9):
            reply = await _admin(agent, {"cmd": "fault", "action": "stall-loop", "seconds": bad})
            assert reply["ok"] is False and "seconds" in reply["error"], reply
        reply = await asyncio.to_thread(
            admin_call, agent.config.admin.path, {"cmd": "fault", "action": "stall-loop"}, 10.0
        )
        assert 'needs "seconds"' in reply["error"]
    finally:
        await asyncio.wait_for(agent.stop(), 20)


@pytest.mark.timeout(60)
async def test_embedded_agent_only_reports(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An agent inside another process (this test) never re-execs it, even with restart = true."""
    caplog.set_level(logging.INFO, logger="verdigris.watchdog.agent")
    agent = Agent(_config(tmp_path, "fault-injection = true\nloop-deadline = 0.5\nprobe-interval = 0.1\n"))
    await asyncio.wait_for(agent.start(), 20)
    try:
        assert agent.watchdog is not None and not agent.watchdog.restart_enabled
        # the admin handler runs on this test's own loop and blocks it; the reply comes after the stall
        reply = await _admin(agent, {"cmd": "fault", "action": "stall-loop", "seconds": 1.5})
        assert reply == {"ok": True, "stalled": "loop", "seconds": 1.5}

        def messages() -> list[str]:
            return [r.getMessage() for r in caplog.records]

        await asyncio.wait_for(
            asyncio.to_thread(
                _wait_for, lambda: any(m.startswith("watchdog_recovered ") for m in messages())
            ),
            10,
        )
        info = agent.watchdog.info()
        assert info["probe_timeouts"]["loop"] == 1 and info["restarts"]["loop"] == 0
        assert info["max_lag"]["loop"] >= 1.0
        stalls = [m for m in messages() if m.startswith("watchdog_stall ")]
        assert len(stalls) == 1 and "cause=loop" in stalls[0] and "embedded agent" in stalls[0], stalls
    finally:
        await asyncio.wait_for(agent.stop(), 20)
    assert agent.watchdog is None


@pytest.mark.timeout(60)
async def test_watchdog_does_not_wait_on_a_stuck_log_handler(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stalled thread holding a log handler's lock (e.g. blocked writing to a full stderr pipe) must not
    stop the watchdog: its report is logged with a bounded wait, and probing (and a restart) goes on."""
    caplog.set_level(logging.INFO, logger="verdigris.watchdog.agent")
    agent = Agent(_config(tmp_path, "loop-deadline = 0.5\nprobe-interval = 0.1\n"))
    await asyncio.wait_for(agent.start(), 20)
    try:
        watchdog = agent.watchdog
        assert watchdog is not None
        caplog.handler.acquire()
        try:
            # Blocking polls on this test's loop thread, which holds the handler's lock: the loop stalls.
            _wait_for(lambda: watchdog.info()["probe_timeouts"]["loop"] == 1)
            after_detection = watchdog.info()["probes"]["apply"]
            _wait_for(lambda: watchdog.info()["probes"]["apply"] >= after_detection + 3)
        finally:
            caplog.handler.release()
    finally:
        await asyncio.wait_for(agent.stop(), 20)


def _wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)  # another thread's state: polled with a bound


# ------------------------------------------------------------------------------------------ units


def test_carried_state_round_trip_and_backoff() -> None:
    state = CarriedState()
    assert state.restarts == {"loop": 0, "apply": 0}
    state.restarts["loop"] = 3
    state.last_cause, state.last_detection, state.streak, state.last_failure = "loop", 1.1, 3, 123.5
    state.stalled_in = {"agent.py:stall_event_loop": 3}
    state.detections[5], state.detection_sum = 3, 3.3
    again = CarriedState.from_json(state.to_json())
    assert again == state
    for bad in ("", "[]", '{"restarts": {"disk": 1}}', '{"streak": -1}', '{"last_detection": "x"}'):
        with pytest.raises(ValueError):
            CarriedState.from_json(bad)

    loop = asyncio.new_event_loop()
    writer = ThreadPoolExecutor(max_workers=1)

    def watchdog(carried: CarriedState) -> AgentWatchdog:
        config = _parse("").watchdog
        return AgentWatchdog(
            config, loop=loop, writer=writer, loop_work=lambda: None, apply_work=lambda: None, carried=carried
        )

    # a fresh streak restarts at once, then 0.1 s doubling, capped at 10 s
    w = watchdog(CarriedState())
    delays = [w.backoff.failure(1000.0 + i) for i in range(10)]
    assert delays == [0.0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]
    # the streak carried across exec continues ...
    w = watchdog(CarriedState(streak=3, last_failure=500.0))
    assert w.backoff.failure(510.0) == 0.4
    # ... unless the last restart is older than the window
    w = watchdog(CarriedState(streak=3, last_failure=500.0))
    assert w.backoff.failure(600.0) == 0.0
    loop.close()
    writer.shutdown()


def test_state_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(STATE_ENV, CarriedState(restarts={"loop": 2, "apply": 1}).to_json())
    assert CarriedState.take_from_environment().restarts == {"loop": 2, "apply": 1}
    assert STATE_ENV not in os.environ  # read once
    monkeypatch.setenv(STATE_ENV, "garbage")
    assert CarriedState.take_from_environment() == CarriedState()


# ------------------------------------------------------------------------------------------ config


def _parse(watchdog: str) -> Any:
    return parse_config(
        f'[db]\npath = "/srv/vd/state.db"\n[watchdog]\n{watchdog}', "agent.toml", Path("/srv/vd")
    )


def test_config_defaults_and_values() -> None:
    w = _parse("").watchdog
    assert (w.enabled, w.probe_interval, w.loop_deadline, w.apply_deadline) == (True, 0.25, 1.0, 10.0)
    assert (w.restart, w.stack_dir, w.fault_injection) == (True, None, False)
    w = _parse(
        "enabled = false\nprobe-interval = 0.5\nloop-deadline = 2\napply-deadline = 30.5\nrestart = false\n"
        'stack-dir = "stacks"\nfault-injection = true\n'
    ).watchdog
    assert (w.enabled, w.probe_interval, w.loop_deadline, w.apply_deadline) == (False, 0.5, 2.0, 30.5)
    assert (w.restart, w.stack_dir, w.fault_injection) == (False, Path("/srv/vd/stacks"), True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "loop-deadline = -1\n",
            'invalid value for "watchdog.loop-deadline" in agent.toml: -1 s is out of range',
        ),
        (
            "apply-deadline = 0\n",
            'invalid value for "watchdog.apply-deadline" in agent.toml: 0 s is out of range',
        ),
        (
            'loop-deadline = "1s"\n',
            'wrong type for "watchdog.loop-deadline" in agent.toml: expected a number',
        ),
        (
            "loop-deadlin = 1\n",
            'unknown key "watchdog.loop-deadlin" in agent.toml (did you mean "watchdog.loop-deadline"?)',
        ),
        ("restart = 1\n", 'wrong type for "watchdog.restart" in agent.toml: expected true or false'),
        (
            "probe-interval = 2\n",
            'invalid value for "watchdog.probe-interval" in agent.toml: 2 s is longer than a deadline',
        ),
        ("loop-deadline = nan\n", 'invalid value for "watchdog.loop-deadline"'),
    ],
)
def test_config_errors_are_clear(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _parse(text)
    assert message in str(err.value)


def test_admin_text_form_of_the_stall_faults() -> None:
    assert parse_command(b"fault stall-loop 2.5") == {"cmd": "fault", "action": "stall-loop", "seconds": 2.5}
    assert parse_command(b"fault stall-apply 3") == {"cmd": "fault", "action": "stall-apply", "seconds": 3.0}
    with pytest.raises(ValueError, match="'soon' is not a number of seconds"):
        parse_command(b"fault stall-loop soon")
    with pytest.raises(ValueError, match="stall-loop\\|stall-apply <seconds>"):
        parse_command(b"fault stall-loop")
    # the gossip forms are unchanged
    assert parse_command(b"fault global heal") == {"cmd": "fault", "scope": "global", "action": "heal"}


def test_bench_quick() -> None:
    """bench/agent_watchdog.py runs and ends with its JSON line (one stall, to keep it light)."""
    bench = Path(__file__).resolve().parent.parent / "bench" / "agent_watchdog.py"
    out = subprocess.run(
        [sys.executable, str(bench), "--runs", "1"], capture_output=True, text=True, timeout=90, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out.stdout.splitlines()[-1])
    [run] = result["runs"]
    assert 1.0 <= run["watchdog_detection_s"] < DETECTION_BOUND and run["detection_s"] < DETECTION_BOUND
    assert run["serving_again_s"] > run["detection_s"]
