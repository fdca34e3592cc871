"""The ``verdigris`` command line, run as real subprocesses against a real agent process."""

from __future__ import annotations

import json
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from _api_util import SCHEMA, WAIT, free_port, write_config
from verdigris.admin import AdminError, admin_call
from verdigris.config import load_config

VERDIGRIS = str(Path(sys.executable).with_name("verdigris"))
COMMANDS = ["agent", "exec", "query", "subscribe", "backup", "restore", "reload"]


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([VERDIGRIS, *args], capture_output=True, text=True, timeout=timeout, check=False)


class AgentProcess:
    """``verdigris agent -c CONFIG`` in a subprocess, started and stopped with bounded waits."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.settings = load_config(config)
        self.proc = subprocess.Popen(
            [VERDIGRIS, "agent", "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + WAIT
        while True:
            if self.proc.poll() is not None:
                _, err = self.proc.communicate()
                raise AssertionError(f"agent exited with {self.proc.returncode}: {err}")
            try:
                if admin_call(self.settings.admin.path, {"cmd": "ping"}, 1.0).get("ok"):
                    break
            except AdminError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError("agent did not start")
            time.sleep(0.05)

    def stop(self) -> tuple[int, str]:
        """SIGTERM, and the exit status and stderr."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=WAIT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        return self.proc.returncode, err

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=WAIT)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    proc = AgentProcess(write_config(tmp_path, port=free_port()))
    try:
        yield proc
    finally:
        proc.kill()


def api_args(agent: AgentProcess) -> list[str]:
    return ["-c", str(agent.config)]


# ---------------------------------------------------------------------------------------- help, errors


def test_help_lists_every_command_with_a_summary_and_examples() -> None:
    top = run("--help")
    assert top.returncode == 0
    for cmd in COMMANDS:
        assert f"  {cmd} " in top.stdout
        sub = run(cmd, "--help")
        assert sub.returncode == 0, sub.stderr
        assert "Example" in sub.stdout, cmd
        assert f"verdigris {cmd}" in sub.stdout, cmd
    assert run("--version").stdout.startswith("verdigris")


def test_config_errors_exit_2_in_one_line(tmp_path: Path) -> None:
    result = run("agent", "-c", str(tmp_path / "missing.toml"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: config file not found: {tmp_path / 'missing.toml'}"
    bad = tmp_path / "bad.toml"
    bad.write_text('[db]\npath = "x.db"\n[api]\nadr = "127.0.0.1:1"\n')
    result = run("agent", "-c", str(bad))
    assert result.returncode == 2
    assert 'unknown key "api.adr"' in result.stderr and "Traceback" not in result.stderr
    assert run("query", "-c", str(bad), "SELECT 1").returncode == 2


def test_start_up_errors_exit_1_without_traceback(tmp_path: Path) -> None:
    (tmp_path / "schema").mkdir()
    config = write_config(
        tmp_path / "schema", schema="CREATE TABLE t (id TEXT PRIMARY KEY, x TEXT NOT NULL);"
    )
    result = run("agent", "-c", str(config))
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "NOT NULL" in result.stderr
    assert "Traceback" not in result.stderr

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        (tmp_path / "port").mkdir()
        result = run("agent", "-c", str(write_config(tmp_path / "port", port=port)))
    assert result.returncode == 1
    assert f"error: cannot listen on 127.0.0.1:{port} (api.addr)" in result.stderr
    assert "Traceback" not in result.stderr


def test_client_commands_without_an_agent(tmp_path: Path) -> None:
    port = free_port()
    result = run("exec", "--api", f"127.0.0.1:{port}", "SELECT 1")
    assert result.returncode == 1
    assert result.stderr.startswith(f"error: cannot reach the agent at http://127.0.0.1:{port}")
    config = write_config(tmp_path)
    result = run("reload", "-c", str(config))
    assert result.returncode == 1 and "is the agent running?" in result.stderr
    assert run("exec", "SELECT 1", "--param", "1", "--named", "a=1").returncode == 2


# ---------------------------------------------------------------------------------------- with an agent


def test_exec_query_and_subscribe(agent: AgentProcess) -> None:
    args = api_args(agent)
    result = run("exec", *args, "INSERT INTO apps (name, org) VALUES (?, ?)", "-p", "web", "-p", "acme")
    assert result.returncode == 0, result.stderr
    assert "1 row(s) affected" in result.stdout and "committed version 1" in result.stdout
    result = run(
        "exec",
        *args,
        "INSERT INTO apps (name, config) VALUES (:name, :config)",
        "--named",
        "name=api",
        "--named",
        "config=42",
        "UPDATE apps SET org = 'beta' WHERE name = 'api'",
    )
    assert result.returncode == 0, result.stderr
    assert "statement 2: 1 row(s) affected" in result.stdout

    failed = run("exec", *args, "INSERT INTO apps (name) VALUES ('web')")
    assert failed.returncode == 1
    assert (
        failed.stderr.startswith("error: the agent answered 400: statement 1") and "UNIQUE" in failed.stderr
    )

    table = run("query", *args, "SELECT name, org, config FROM apps ORDER BY name")
    assert table.returncode == 0, table.stderr
    assert "name" in table.stdout and "acme" in table.stdout and "beta" in table.stdout
    assert "NULL" in table.stdout and "2 row(s)" in table.stdout

    as_json = run("query", *args, "--json", "SELECT name FROM apps WHERE org = ?", "-p", "acme")
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert events[0] == {"columns": ["name"]} and events[1] == {"row": [1, ["web"]]} and "eoq" in events[2]

    readonly = run("query", *args, "DELETE FROM apps")
    assert readonly.returncode == 1 and "read-only" in readonly.stderr

    sub = subprocess.Popen(
        [VERDIGRIS, "subscribe", *args, "SELECT name, org FROM apps WHERE org = ?", "-p", "acme"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert sub.stdout is not None and sub.stderr is not None
        out = LineReader(sub)
        lines = [json.loads(out.next()) for _ in range(3)]
        assert lines[0] == {"columns": ["name", "org"]} and lines[1] == {"row": [1, ["web", "acme"]]}
        change_id = lines[2]["eoq"]["change_id"]
        assert run("exec", *args, "INSERT INTO apps (name, org) VALUES ('db', 'acme')").returncode == 0
        change = json.loads(out.next())["change"]
        assert change[0] == "insert" and change[2] == ["db", "acme"] and change[3] == change_id + 1
        sub.send_signal(signal.SIGINT)
        assert sub.wait(timeout=WAIT) == 130
        err = sub.stderr.read()
        assert "Traceback" not in err
        sub_id = err.split()[1]
    finally:
        if sub.poll() is None:
            sub.kill()
            sub.wait(timeout=WAIT)

    # resume by id from the change id seen before
    assert run("exec", *args, "DELETE FROM apps WHERE name = 'web'").returncode == 0
    resumed = subprocess.Popen(
        [VERDIGRIS, "subscribe", *args, "--id", sub_id, "--from", str(change_id + 1)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        change = json.loads(LineReader(resumed).next())["change"]
        assert change[0] == "delete" and change[2] == ["web", "acme"]
    finally:
        resumed.kill()
        resumed.communicate(timeout=WAIT)


class LineReader:
    """A subprocess's stdout lines, read by a thread so that every wait can be bounded."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self._lines: queue.Queue[str] = queue.Queue()
        stdout = proc.stdout
        threading.Thread(target=lambda: [self._lines.put(line) for line in stdout], daemon=True).start()

    def next(self) -> str:
        return self._lines.get(timeout=WAIT)


def test_reload_adds_a_column(agent: AgentProcess, tmp_path: Path) -> None:
    args = api_args(agent)
    assert run("reload", *args).stdout.strip() == "schema unchanged"
    (tmp_path / "schema.sql").write_text(
        SCHEMA.replace("data   BLOB", "data   BLOB,\n    region TEXT NOT NULL DEFAULT 'ams'")
    )
    result = run("reload", *args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "new columns: apps.region"
    assert run("exec", *args, "INSERT INTO apps (name, region) VALUES ('a', 'cdg')").returncode == 0
    assert '["a","cdg"]' in run("query", *args, "--json", "SELECT name, region FROM apps").stdout
    (tmp_path / "schema.sql").write_text("CREATE TABLE apps (name TEXT NOT NULL PRIMARY KEY);")
    refused = run("reload", *args)
    assert refused.returncode == 1 and refused.stderr.startswith("error: reload failed")


def test_backup_restore_round_trip(agent: AgentProcess, tmp_path: Path) -> None:
    args = api_args(agent)
    db = agent.settings.db.path
    assert run("exec", *args, "INSERT INTO apps (name) VALUES ('before')").returncode == 0
    site = admin_call(agent.settings.admin.path, {"cmd": "ping"})["site_id"]

    online = tmp_path / "online.db"
    result = run("backup", *args, str(online))
    assert result.returncode == 0, result.stderr
    assert "by the running agent" in result.stdout
    _check_copy(online, ["before"])

    refused = run("restore", *args, str(online))
    assert refused.returncode == 1 and "the agent is running" in refused.stderr

    assert run("exec", *args, "INSERT INTO apps (name) VALUES ('after')").returncode == 0
    code, err = agent.stop()
    assert code == 0, err
    assert "stopped" in err and not agent.settings.admin.path.exists()

    offline = tmp_path / "offline.db"
    result = run("backup", *args, str(offline))
    assert result.returncode == 0 and "not running" in result.stdout, result.stderr
    _check_copy(offline, ["after", "before"])

    # the node wrote version 2 after the online backup: keeping its identity would reuse version 2
    refused = run("restore", *args, str(online))
    assert refused.returncode == 1 and "--new-site-id" in refused.stderr
    assert _names(db) == ["after", "before"]

    # the offline backup has everything this node wrote: it keeps its identity
    result = run("restore", *args, str(offline))
    assert result.returncode == 0, result.stderr
    assert f"keeps its site id {site}" in result.stdout

    result = run("restore", *args, "--new-site-id", str(online))
    assert result.returncode == 0, result.stderr
    assert "a new site id" in result.stdout
    assert not Path(f"{db}-wal").exists()
    assert _names(db) == ["before"]

    again = AgentProcess(agent.config)
    try:
        assert admin_call(again.settings.admin.path, {"cmd": "ping"})["site_id"] != site
        result = run("exec", *args, "INSERT INTO apps (name) VALUES ('new')")
        assert "committed version 1" in result.stdout, result.stderr  # a fresh actor starts at 1
        assert '["before"]' in run("query", *args, "--json", "SELECT name FROM apps ORDER BY name").stdout
    finally:
        code, err = again.stop()
        assert code == 0, err

    bogus = tmp_path / "bogus.db"
    bogus.write_text("not a database")
    result = run("restore", *args, str(bogus))
    assert result.returncode == 1 and "not a SQLite database" in result.stderr


def _names(db: Path) -> list[str]:
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute("SELECT name FROM apps ORDER BY name")]
    finally:
        conn.close()


def _check_copy(path: Path, names: list[str]) -> None:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        conn.close()
    assert _names(path) == names


def test_sigint_stops_the_agent(agent: AgentProcess) -> None:
    agent.proc.send_signal(signal.SIGINT)
    _, err = agent.proc.communicate(timeout=WAIT)
    assert agent.proc.returncode == 0, err
    assert "Traceback" not in err


def test_second_agent_on_the_same_socket_is_refused(agent: AgentProcess) -> None:
    result = run("agent", "-c", str(agent.config))
    assert result.returncode == 1
    assert "another agent is already running" in result.stderr


def test_admin_socket_is_private(agent: AgentProcess) -> None:
    assert agent.settings.admin.path.stat().st_mode & 0o077 == 0


# ---------------------------------------------------------------------------------------- cluster, keys


def gossip_config(tmp_path: Path, key: str | None) -> Path:
    config = write_config(tmp_path, port=free_port())
    section = f'\n[gossip]\naddr = "127.0.0.1:{free_port()}"\nregion = "ams"\n'
    if key is not None:
        section += f'key = "{key}"\n'
    config.write_text(config.read_text() + section)
    return config


def test_gossip_without_a_key_is_refused_at_start(tmp_path: Path) -> None:
    result = run("agent", "-c", str(gossip_config(tmp_path, None)))
    assert result.returncode == 1
    assert "no key is configured: set gossip.key" in result.stderr and "Traceback" not in result.stderr


def test_cluster_and_keys_commands(tmp_path: Path) -> None:
    generated = run("keys", "generate")
    assert generated.returncode == 0
    first = generated.stdout.strip()
    assert len(first) == 44 and first.endswith("=")
    second = run("keys", "generate").stdout.strip()
    config = gossip_config(tmp_path, first)
    proc = AgentProcess(config)
    try:
        c = str(config)
        members = run("cluster", "members", "-c", c)
        assert members.returncode == 0, members.stderr
        assert "alive" in members.stdout and "ams" in members.stdout and "(self)" in members.stdout
        rows = json.loads(run("cluster", "members", "-c", c, "--json").stdout)
        assert len(rows) == 1 and rows[0]["self"] and rows[0]["state"] == "alive"
        assert run("cluster", "rejoin", "-c", c).returncode == 0
        status = json.loads(run("cluster", "status", "-c", c).stdout)
        assert status["gaps"] == 0 and status["members_alive"] == 1

        from verdigris.gossip.keyring import fingerprint

        listed = run("keys", "list", "-c", c)
        assert listed.stdout.strip() == f"{fingerprint(first)}  (primary)"
        assert run("keys", "install", "-c", c, second).returncode == 0
        used = subprocess.run(
            [VERDIGRIS, "keys", "use", "-c", c, "-"],
            input=second + "\n",
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert used.returncode == 0, used.stderr
        removed = run("keys", "remove", "-c", c, first)
        assert removed.returncode == 0
        assert removed.stdout.splitlines()[-1] == f"{fingerprint(second)}  (primary)"
        assert first not in removed.stdout + used.stdout  # keys are shown by fingerprint only
        refused = run("keys", "remove", "-c", c, second)
        assert refused.returncode == 1 and "primary" in refused.stderr
        saved = json.loads((tmp_path / "keyring.json").read_text())
        assert saved["keys"] == [second]
    finally:
        proc.kill()


def test_cluster_commands_on_an_agent_without_gossip(agent: AgentProcess) -> None:
    result = run("cluster", "members", "-c", str(agent.config))
    assert result.returncode == 1
    assert "without a [gossip] section" in result.stderr
