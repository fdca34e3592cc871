"""Crash safety: `kill -9` the agent in the middle of a write load; after a restart every transaction
that was acknowledged is there, with its version, and the bookkeeping agrees."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

SCHEMA = "CREATE TABLE kv (k TEXT NOT NULL PRIMARY KEY, v INTEGER NOT NULL DEFAULT 0, writer INTEGER);\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def post(url: str, body: object, timeout: float = 5.0) -> object:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def query_rows(base: str, sql: str) -> list[list[object]]:
    req = urllib.request.Request(
        f"{base}/v1/queries", data=json.dumps(sql).encode(), headers={"Content-Type": "application/json"}
    )
    rows: list[list[object]] = []
    with urllib.request.urlopen(req, timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            event = json.loads(line)
            if "row" in event:
                rows.append(event["row"][1])
            assert "error" not in event, event
    return rows


class Agent:
    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        (tmp / "schema.sql").write_text(SCHEMA)
        self.config = tmp / "agent.toml"
        self.config.write_text(
            f'[db]\npath = "{tmp / "agent.db"}"\nschema_paths = ["{tmp / "schema.sql"}"]\n'
            f'[api]\naddr = "127.0.0.1:{self.port}"\n[admin]\npath = "{tmp / "admin.sock"}"\n'
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "agent.log"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "verdigris.cli", "agent", "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()
            try:
                with urllib.request.urlopen(f"{self.base}/v1/health", timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)  # polling a process we do not control: no event to await
        raise AssertionError(f"agent did not become healthy:\n{self.log.read_text()}")

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[Agent]:
    a = Agent(tmp_path)
    try:
        yield a
    finally:
        a.stop()


@pytest.mark.timeout(180)
def test_kill9_during_write_load_loses_no_acknowledged_transaction(agent: Agent) -> None:
    agent.start()
    acked: dict[str, int] = {}
    versions: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()
    enough = threading.Event()

    def writer(n: int) -> None:
        i = 0
        while not stop.is_set() and i < 100_000:
            key = f"w{n}-{i}"
            stmts = [
                ["INSERT INTO kv (k, v, writer) VALUES (?, ?, ?)", [key, i, n]],
                [
                    "INSERT INTO kv (k, v, writer) VALUES (?, ?, ?) ON CONFLICT DO UPDATE SET v = v + 1",
                    [f"count{n}", 1, n],
                ],
            ]
            try:
                resp = post(f"{agent.base}/v1/transactions", stmts, timeout=5)
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                return  # the agent died under us: this transaction was never acknowledged
            assert isinstance(resp, dict)
            with lock:
                acked[key] = i
                versions.append(int(resp["version"]))
                if len(acked) >= 600:
                    enough.set()
            i += 1

    threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(4)]
    for t in threads:
        t.start()
    assert enough.wait(timeout=60), "write load did not get going"
    agent.kill9()  # mid-load: writers are in flight
    stop.set()
    for t in threads:
        t.join(timeout=10)
    with lock:
        acked_now = dict(acked)
        max_version = max(versions)

    agent.start()
    rows = query_rows(agent.base, "SELECT k, v FROM kv WHERE k LIKE 'w%'")
    stored = {str(k): v for k, v in rows}
    missing = [k for k in acked_now if k not in stored]
    assert not missing, f"{len(missing)} acknowledged transactions lost, e.g. {missing[:5]}"
    assert all(stored[k] == v for k, v in acked_now.items())
    # Each transaction is one version; versions stay contiguous and at least the highest acknowledged.
    assert len(set(versions)) == len(versions)
    (count,) = query_rows(agent.base, "SELECT count(*) FROM kv WHERE k LIKE 'w%'")
    assert count[0] >= len(acked_now)
    # The restarted agent keeps writing at the next version, with no gap in its own history.
    resp = post(f"{agent.base}/v1/transactions", ["INSERT INTO kv (k) VALUES ('after')"])
    assert isinstance(resp, dict)
    assert resp["version"] > max_version
    assert resp["version"] == count[0] + 1
