"""Health probes (HTTP GET expecting 2xx/3xx, TCP connect) and idle detection from ``/proc/net/tcp*``.

A probe returns ``(ok, output)``; ``output`` is a stable description ("HTTP 200", "connection refused",
"timed out after 1 s") without timings, so that the state writer writes a check row only when the
result changes, never once per probe. While a probe runs, its local port is in ``own_ports`` so that
idle detection does not count the agent's own probes as traffic.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import Final

PROC_TCP: Final = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
TCP_ESTABLISHED: Final = "01"

own_ports: set[int] = set()
"""Local ports of this process's probe connections in flight (not traffic for idle detection)."""


async def probe(kind: str, host: str, port: int, path: str, timeout: float) -> tuple[bool, str]:
    """One probe of ``host:port``: ``kind`` ``http`` (GET ``path``, 2xx/3xx passes) or ``tcp``."""
    writer: asyncio.StreamWriter | None = None
    local_port = 0
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            sock = writer.get_extra_info("sockname")
            local_port = int(sock[1]) if sock else 0
            own_ports.add(local_port)
            if kind == "tcp":
                return True, "TCP connect ok"
            hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {hostport}\r\nUser-Agent: verdigris-machines\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            await writer.drain()
            line = await reader.readline()
    except TimeoutError:
        return False, f"timed out after {timeout:g} s"
    except OSError as e:
        return False, f"connection failed: {e.strerror or e}"
    finally:
        if writer is not None:
            writer.close()
        own_ports.discard(local_port)
    parts = line.decode("latin-1").split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        return False, "not an HTTP response" if line else "closed without answering"
    status = int(parts[1])
    return 200 <= status < 400, f"HTTP {status}"


def established_ports(ports: Iterable[int], files: Iterable[Path] = PROC_TCP) -> set[int]:
    """Which of ``ports`` (local ports of this host's listening instances) have at least one
    established connection, not counting this process's own probes. Read from ``/proc/net/tcp*``:
    ``sl local_address rem_address st ...`` with addresses as ``HEXIP:HEXPORT``."""
    wanted = set(ports)
    busy: set[int] = set()
    if not wanted:
        return busy
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue  # no IPv6 on this host, say
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 4 or fields[3] != TCP_ESTABLISHED:
                continue
            try:
                local = int(fields[1].rsplit(":", 1)[1], 16)
                remote = int(fields[2].rsplit(":", 1)[1], 16)
            except (IndexError, ValueError):
                continue
            if local in wanted and remote not in own_ports:
                busy.add(local)
    return busy


__all__ = ["established_ports", "own_ports", "probe"]
