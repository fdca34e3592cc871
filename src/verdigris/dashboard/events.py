"""Recent watchdog events of a proxy supervisor, served as JSON at ``GET /events`` on its metrics server.

The supervisor already logs one structured line per event (docs/proxy.md, "Watchdog"):
``watchdog_restart worker=N pid=P reason=R ... cause="file.py:fn"`` when it replaces a stuck worker, and
``worker_exited worker=N pid=P status=S ...`` when a worker dies. :class:`ProxyEventLog` is a logging
handler on the ``verdigris.proxy`` logger that keeps the last :data:`KEEP` of them, parsed, so the
dashboard can show *when* and *why* without the supervisor's code knowing about it (the counters in
``/metrics`` only say how many). A worker that the watchdog killed also exits: that exit is folded into
the ``watchdog_restart`` event instead of being listed twice.

Each event: ``{"seq", "at" (unix seconds), "component": "proxy", "worker", "pid", "kind"
("probe_timeout", "startup_timeout" or "exited"), "cause", "detail"}``; ``seq`` grows by one per event,
so a reader can tell new events from ones it has seen.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import deque
from typing import Any, Final

from aiohttp import web

KEEP: Final = 50
"""Events kept (the oldest are dropped)."""

_PAIR: Final = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')
_LOGGER: Final = "verdigris.proxy"


def parse_fields(message: str) -> dict[str, str]:
    """``key=value`` pairs of a structured log line; JSON-quoted values are decoded."""
    fields: dict[str, str] = {}
    for key, raw in _PAIR.findall(message):
        if raw.startswith('"'):
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw.strip('"')
            fields[key] = "" if value is None else str(value)
        else:
            fields[key] = raw
    return fields


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


class ProxyEventLog(logging.Handler):
    """Keeps the supervisor's recent watchdog events (see the module docstring)."""

    def __init__(self, keep: int = KEEP) -> None:
        super().__init__(level=logging.WARNING)
        self._events: deque[dict[str, Any]] = deque(maxlen=keep)
        self._replaced: deque[int] = deque(maxlen=keep)
        """Pids the watchdog killed: their exit is part of that event, not a new one."""
        self._seq = 0
        self._guard = threading.Lock()  # emit() may run on any thread that logs

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            return
        head = message.split(" ", 1)[0]
        if head not in ("watchdog_restart", "worker_exited"):
            return
        fields = parse_fields(message)
        pid = _int(fields.get("pid"))
        with self._guard:
            if head == "worker_exited":
                if pid is not None and pid in self._replaced:
                    return
                kind, cause = "exited", f"exit status {fields.get('status', '?')}"
                detail = f"uptime {fields.get('uptime', '?')}, restart after {fields.get('backoff', '?')}"
            else:
                if pid is not None:
                    self._replaced.append(pid)
                kind, cause = fields.get("reason", "stuck"), fields.get("cause", "")
                detail = (
                    f"detected in {fields.get('detection', '?')}, stacks: {fields.get('dump', '?')}; "
                    + fields.get("main_stack", "")
                ).strip("; ")
            self._seq += 1
            self._events.append(
                {
                    "seq": self._seq,
                    "at": record.created,
                    "component": "proxy",
                    "worker": _int(fields.get("worker")),
                    "pid": pid,
                    "kind": kind,
                    "cause": cause,
                    "detail": detail,
                }
            )

    def events(self) -> list[dict[str, Any]]:
        """The kept events, oldest first."""
        with self._guard:
            return list(self._events)


def add_events_route(app: web.Application) -> ProxyEventLog:
    """Serve ``GET /events`` on the supervisor's metrics ``app`` from a new :class:`ProxyEventLog` that
    listens on the ``verdigris.proxy`` logger from now on (removed when the app is cleaned up)."""
    event_log = ProxyEventLog()
    logger = logging.getLogger(_LOGGER)
    logger.addHandler(event_log)  # sees what the log level lets through: events are warnings and errors

    async def events(request: web.Request) -> web.Response:
        return web.json_response({"events": event_log.events()})

    async def detach(app: web.Application) -> None:
        logger.removeHandler(event_log)

    app.router.add_get("/events", events)
    app.on_cleanup.append(detach)
    return event_log


__all__ = ["KEEP", "ProxyEventLog", "add_events_route", "parse_fields"]
