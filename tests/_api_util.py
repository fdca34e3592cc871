"""Helpers shared by the API and CLI tests: config files, and reading NDJSON streams with bounded waits."""

from __future__ import annotations

import asyncio
import json
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

SCHEMA = """
CREATE TABLE apps (
    name   TEXT NOT NULL PRIMARY KEY,
    org    TEXT NOT NULL DEFAULT '',
    config TEXT,
    data   BLOB
);
CREATE TABLE machines (
    id    TEXT NOT NULL PRIMARY KEY,
    app   TEXT NOT NULL DEFAULT '',
    state TEXT
);
CREATE INDEX machines_app ON machines (app);
"""

WAIT = 10.0
"""Upper bound of every wait in these tests."""


def short_dir() -> Path:
    """A short directory for unix sockets (their paths are limited to about 100 bytes)."""
    return Path(tempfile.mkdtemp(prefix="vd"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    what: str,
    check: Callable[[], Any],
    timeout: float,
    interval: float = 0.05,
    tolerate: tuple[type[Exception], ...] = (OSError,),
) -> Any:
    """Poll ``check`` every ``interval`` s until it returns something true (returned); an exception of
    ``tolerate`` counts as a miss. After ``timeout`` s an AssertionError names ``what`` and the last value
    (or exception) seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except tolerate as e:
            last = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {last!r}")


def write_config(
    tmp_path: Path,
    *,
    port: int = 0,
    token: str | None = None,
    prometheus_port: int | None = None,
    max_body: int | None = None,
    schema: str = SCHEMA,
    admin_dir: Path | None = None,
) -> Path:
    """A config file with a schema file beside it; the admin socket in a short directory."""
    (tmp_path / "schema.sql").write_text(schema)
    admin = (admin_dir or short_dir()) / "admin.sock"
    lines = [
        "[db]",
        f'path = "{tmp_path / "state.db"}"',
        f'schema_paths = ["{tmp_path / "schema.sql"}"]',
        "[api]",
        f'addr = "127.0.0.1:{port}"',
    ]
    if max_body is not None:
        lines.append(f"max-body-bytes = {max_body}")
    if token is not None:
        lines += ["[api.authz]", f'bearer-token = "{token}"']
    lines += ["[admin]", f'path = "{admin}"']
    if prometheus_port is not None:
        lines += ["[telemetry.prometheus]", f'addr = "127.0.0.1:{prometheus_port}"']
    lines += ["[log]", 'level = "debug"']
    path = tmp_path / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


class Lines:
    """Reads NDJSON events from a streaming response, each read bounded by :data:`WAIT`."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp
        self._buf = b""

    async def next(self, timeout: float = WAIT) -> Any:
        while b"\n" not in self._buf:
            chunk = await asyncio.wait_for(self.resp.content.readany(), timeout)
            if not chunk:
                raise EOFError(f"stream ended; pending {self._buf!r}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    async def take(self, n: int, timeout: float = WAIT) -> list[Any]:
        return [await self.next(timeout) for _ in range(n)]

    async def until(self, key: str, timeout: float = WAIT) -> list[Any]:
        """Events up to and including the first with ``key``."""
        out = []
        while True:
            event = await self.next(timeout)
            out.append(event)
            if key in event:
                return out

    async def rest(self, timeout: float = WAIT) -> list[Any]:
        """Every remaining event until the stream ends."""
        out = []
        while True:
            try:
                out.append(await self.next(timeout))
            except EOFError:
                return out

    async def quiet(self, seconds: float = 0.3) -> bool:
        """True when nothing arrives for ``seconds``."""
        if b"\n" in self._buf:
            return False
        try:
            chunk = await asyncio.wait_for(self.resp.content.readany(), seconds)
        except TimeoutError:
            return True
        self._buf += chunk
        return False
