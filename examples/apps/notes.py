"""A sample app with a primary region: reads anywhere, writes only in the primary (``verdigris demo``).

Run by the machines agent with ``PORT``, ``VD_APP``, ``VD_INSTANCE``, ``VD_REGION``, ``VD_NODE`` and
``VD_PRIMARY_REGION`` in its environment (stdlib only, so it starts fast):

* ``GET /``          → 200 JSON ``{app, instance, region, node, primary_region, notes}``: this instance's
  notes (kept in memory; only the primary region's instance ever has any).
* ``POST /``, ``PUT /`` (the body is the note), ``DELETE /`` (forget every note): outside the primary
  region the answer is ``409`` with ``fly-replay: region=<primary>``, so the edge proxy replays the request
  there (the way a Fly app sends writes to its primary database); in the primary region the write is
  applied and answered with ``201`` (``200`` for DELETE) and JSON naming the region that applied it and,
  from ``fly-replay-src``, the region that first received it.
* ``GET /health``    → 200 ``ok`` (the machines agent's check).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

MAX_NOTE_BYTES = 64 * 1024
MAX_NOTES = 1000

APP = os.environ.get("VD_APP", "notes")
INSTANCE = os.environ.get("VD_INSTANCE", "")
REGION = os.environ.get("VD_REGION", "")
NODE = os.environ.get("VD_NODE", "")
PRIMARY = os.environ.get("VD_PRIMARY_REGION", "") or REGION

notes: list[str] = []
notes_lock = threading.Lock()


def replay_source(header: str | None) -> dict[str, str]:
    """``fly-replay-src`` (``instance=...;region=...;t=...``) as a dict; empty when absent."""
    if not header:
        return {}
    return dict(part.split("=", 1) for part in header.split(";") if "=" in part)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the proxy pools its upstream connections

    def log_message(self, format: str, *args: Any) -> None:  # one line per request, to the log
        sys.stderr.write(f"{self.command} {self.path} {args[1] if len(args) > 1 else ''}\n")

    def answer(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        body = (json.dumps(doc) + "\n").encode() if doc is not None else b""
        self.send_response(status)
        self.send_header("content-type", "application/json" if doc is not None else "text/plain")
        self.send_header("content-length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def identity(self) -> dict[str, Any]:
        return {"app": APP, "instance": INSTANCE, "region": REGION, "node": NODE, "primary_region": PRIMARY}

    def do_GET(self) -> None:
        if self.path == "/health":
            body = b"ok\n"
            self.send_response(200)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        with notes_lock:
            current = list(notes)
        self.answer(200, {**self.identity(), "notes": current})

    def read_body(self) -> bytes | None:
        length = int(self.headers.get("content-length") or 0)
        if length > MAX_NOTE_BYTES:
            self.answer(413, {"error": f"a note is at most {MAX_NOTE_BYTES} bytes"})
            return None
        return self.rfile.read(length)

    def write(self, apply: str) -> None:
        body = self.read_body()
        if body is None:
            return
        if REGION != PRIMARY:
            # not here: the proxy holds the body and replays the request in the primary region
            self.answer(409, None, {"fly-replay": f"region={PRIMARY}"})
            return
        source = replay_source(self.headers.get("fly-replay-src"))
        with notes_lock:
            if apply == "delete":
                notes.clear()
            elif len(notes) >= MAX_NOTES:
                self.answer(507, {"error": f"at most {MAX_NOTES} notes are kept"})
                return
            else:
                notes.append(body.decode(errors="replace"))
            count = len(notes)
        doc = {
            **self.identity(),
            "written_in": REGION,
            "received_in": source.get("region", REGION),
            "notes": count,
        }
        self.answer(200 if apply == "delete" else 201, doc)

    def do_POST(self) -> None:
        self.write("add")

    def do_PUT(self) -> None:
        self.write("add")

    def do_DELETE(self) -> None:
        self.write("delete")


def main() -> None:
    port = int(os.environ.get("PORT", "8080"))
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
