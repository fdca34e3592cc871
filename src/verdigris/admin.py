"""The agent's admin socket: local administration over a unix socket.

The protocol is one command per line and one JSON reply per line, so it can be driven by the CLI, by
tests, or by hand (``socat - UNIX-CONNECT:admin.sock``). A command is a JSON object
``{"cmd": "backup", "path": "/tmp/copy.db"}`` or, for people, the same as words: ``backup /tmp/copy.db``.
Every reply has ``"ok"``; a failed command has ``"ok": false`` and ``"error"``.

Commands (the agent provides the handlers):

* ``ping`` → ``{"ok": true, "pong": true, ...}``
* ``reload`` → re-read the schema files and apply additive changes live; the reply lists the changes.
* ``backup <path>`` → a consistent online copy of the database at ``path``.

A clustered agent (one with ``[gossip]``) adds:

* ``members`` → every member this node knows, itself first (id, addr, region, state, incarnation, RTT,
  last seen).
* ``rejoin`` → announce this node again to its bootstrap list and every member it knows.
* ``status`` → replication state (heads, gaps, partial versions, queues) and gossip counters.
* ``keys list`` | ``keys install <key>`` | ``keys use <key>`` | ``keys remove <key>`` → the gossip keyring;
  changes are saved to the keyring file and take effect at once. Replies name keys by fingerprint only.
* ``fault block <host:port>...`` | ``fault heal`` | ``fault status`` → drop all traffic to and from peers
  (only with ``gossip.fault-injection = true``; for partition tests).

Any agent:

* ``fault stall-loop <seconds>`` | ``fault stall-apply <seconds>`` → block the event loop (the reply comes
  after the stall) or the writer thread (the reply comes at once) for the agent watchdog's tests (only with
  ``watchdog.fault-injection = true``; docs/watchdog.md "Agent watchdog").

``members``, ``rejoin``, ``status`` and ``fault`` act on one cluster: in region mode (``[gossip.global]``)
the region's by default, the global one with a scope: ``members global``, ``fault global block ...``, or
``"scope": "global"`` in JSON (``regional`` names the default). Without region mode both names mean the
agent's only cluster.

The socket file is created with mode 0600: whoever can use it can back up the whole database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from verdigris.store.types import StoreError

log = logging.getLogger(__name__)

AdminHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

MAX_LINE: Final = 64 * 1024
IDLE_TIMEOUT: Final = 60.0


class AdminError(Exception):
    """Talking to the admin socket failed; the message is meant for the user."""


class AdminUnavailable(AdminError):
    """Nothing answers on the admin socket (no agent running)."""


def parse_command(line: bytes) -> dict[str, Any]:
    """A command line as a dict with ``cmd``; raises ``ValueError`` with a message for bad input."""
    text = line.decode("utf-8", "replace").strip()
    if not text:
        raise ValueError("empty command")
    if text.startswith("{"):
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"malformed JSON: {e}") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("cmd"), str):
            raise ValueError('a JSON command must be an object with "cmd" (a string)')
        return doc
    try:
        words = shlex.split(text)
    except ValueError as e:
        raise ValueError(f"cannot parse command: {e}") from None
    cmd, args = words[0], words[1:]
    scope: dict[str, str] = {}
    if cmd in _SCOPED and args[:1] and args[0] in _SCOPE_WORDS:
        scope, args = {"scope": args[0]}, args[1:]
    if cmd == "backup":
        if len(args) != 1:
            raise ValueError("usage: backup <path>")
        return {"cmd": "backup", "path": args[0]}
    if cmd == "keys":
        if args in (["list"], []):
            return {"cmd": "keys", "action": "list"}
        if len(args) != 2 or args[0] not in ("install", "use", "remove"):
            raise ValueError("usage: keys list | keys install|use|remove <base64 key>")
        return {"cmd": "keys", "action": args[0], "key": args[1]}
    if cmd == "fault":
        if args[:1] == ["block"] and len(args) > 1:
            return {"cmd": "fault", **scope, "action": "block", "addrs": args[1:]}
        if args in (["heal"], ["status"]):
            return {"cmd": "fault", **scope, "action": args[0]}
        if args[:1] in (["stall-loop"], ["stall-apply"]) and len(args) == 2 and not scope:
            try:
                return {"cmd": "fault", "action": args[0], "seconds": float(args[1])}
            except ValueError:
                raise ValueError(f"fault {args[0]}: {args[1]!r} is not a number of seconds") from None
        raise ValueError(
            "usage: fault [regional|global] block <host:port>... | fault [regional|global] heal|status"
            " | fault stall-loop|stall-apply <seconds>"
        )
    if args:
        if cmd in _SCOPED:
            raise ValueError(f"usage: {cmd} [regional|global]")
        raise ValueError(f"{cmd} takes no arguments")
    return {"cmd": cmd, **scope}


_SCOPED: Final = frozenset({"members", "rejoin", "status", "fault"})
"""Commands that act on one cluster, and take an optional scope word first."""
_SCOPE_WORDS: Final = ("regional", "global")


class AdminServer:
    """Serves the admin protocol on a unix socket, dispatching to ``handlers`` by command name."""

    def __init__(self, path: Path, handlers: dict[str, AdminHandler]) -> None:
        self.path = path
        self.handlers = handlers
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen. Refuses (``AdminError``) when another process answers on the socket; removes a stale
        socket file left by an agent that died."""
        path = self.path
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise AdminError(f"admin.path {path} exists and is not a socket")
            try:
                await asyncio.to_thread(admin_call, path, {"cmd": "ping"}, 2.0)
            except AdminUnavailable:
                path.unlink()  # left by an agent that died
            except AdminError:
                raise AdminError(f"another process listens on the admin socket {path}") from None
            else:
                raise AdminError(f"another agent is already running (its admin socket {path} answers)")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(path), limit=MAX_LINE)
        except OSError as e:
            raise AdminError(
                f"cannot create the admin socket {path} (admin.path): {e.strerror or e}"
            ) from None
        os.chmod(path, 0o600)

    async def close(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            while True:
                try:
                    line = await asyncio.wait_for(reader.readline(), IDLE_TIMEOUT)
                except (TimeoutError, ValueError, ConnectionError):
                    # idle, a line over the limit, or a dropped client: hang up
                    break
                if not line:
                    break
                reply = await self._dispatch(line)
                writer.write(json.dumps(reply).encode() + b"\n")
                await asyncio.wait_for(writer.drain(), IDLE_TIMEOUT)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            command = parse_command(line)
        except ValueError as e:
            return {"ok": False, "error": str(e)}
        handler = self.handlers.get(command["cmd"])
        if handler is None:
            known = ", ".join(sorted(self.handlers))
            return {"ok": False, "error": f"unknown command {command['cmd']!r} (known: {known})"}
        log.info("admin: %s", command["cmd"])
        try:
            reply = await handler(command)
        except (ValueError, RuntimeError, OSError, StoreError) as e:
            # the command was refused or could not be done: the user's problem, not a bug
            log.warning("admin command %s failed: %s", command["cmd"], e)
            return {"ok": False, "error": f"{command['cmd']} failed: {e}"}
        except Exception as e:
            log.exception("admin command %s failed", command["cmd"])
            return {"ok": False, "error": f"{command['cmd']} failed: {e}"}
        return {"ok": True, **reply}


def admin_call(
    path: str | os.PathLike[str], command: dict[str, Any], timeout: float = 60.0
) -> dict[str, Any]:
    """Send one command to the admin socket at ``path`` and return its reply.

    Raises :class:`AdminUnavailable` when no agent listens there, :class:`AdminError` when the exchange
    fails. A reply with ``"ok": false`` is returned, not raised.
    """
    p = os.fspath(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(p)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            raise AdminUnavailable(f"no agent answers on {p} ({e.strerror})") from None
        except OSError as e:
            raise AdminError(f"cannot connect to the admin socket {p}: {e.strerror or e}") from None
        sock.sendall(json.dumps(command).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except TimeoutError:
        raise AdminError(f"the agent did not answer on {p} within {timeout:g} s") from None
    except OSError as e:
        raise AdminError(f"admin socket {p}: {e.strerror or e}") from None
    finally:
        sock.close()
    try:
        reply = json.loads(data)
    except json.JSONDecodeError:
        raise AdminError(f"unexpected reply on {p}: {data[:200]!r}") from None
    if not isinstance(reply, dict):
        raise AdminError(f"unexpected reply on {p}: {reply!r}")
    return reply


def is_alive(path: str | os.PathLike[str], timeout: float = 2.0) -> bool:
    """Whether an agent answers ``ping`` on the admin socket at ``path``."""
    try:
        return bool(admin_call(path, {"cmd": "ping"}, timeout).get("ok"))
    except AdminError:
        return False
