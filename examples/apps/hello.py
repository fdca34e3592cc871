"""A tiny HTTP app for the machines agent (stdlib only): listens on 127.0.0.1:$PORT (or $HOST), answers
``GET /`` with JSON ``{app, instance, region, node, greeting}`` and ``GET /health`` with 200.

Idle keep-alive connections are closed after 5 s so that an idle instance really has no connection
left (the machines agent's autostop looks for established connections). SIGTERM stops it cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 5.0  # idle keep-alive connections are closed after this

    def do_GET(self) -> None:
        if self.path == "/health":
            self._send(200, {"ok": True})
        elif self.path.split("?", 1)[0] == "/":
            self._send(
                200,
                {
                    "app": os.environ.get("VD_APP", ""),
                    "instance": os.environ.get("VD_INSTANCE", ""),
                    "region": os.environ.get("VD_REGION", ""),
                    "node": os.environ.get("VD_NODE", ""),
                    "greeting": os.environ.get("GREETING", "hello"),
                },
            )
        else:
            self._send(404, {"error": f"no such path: {self.path}"})

    def _send(self, status: int, doc: dict[str, object]) -> None:
        body = json.dumps(doc).encode() + b"\n"
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per request would fill the instance's log


def main() -> int:
    port = int(os.environ.get("PORT", "8080"))
    server = ThreadingHTTPServer((os.environ.get("HOST", "127.0.0.1"), port), Handler)
    server.daemon_threads = True

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"hello: {os.environ.get('VD_INSTANCE', '')} listening on port {port}", flush=True)
    server.serve_forever()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
