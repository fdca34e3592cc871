"""The replication state of the other agents of this agent's region, for the dashboard.

The page polls one agent per region, but each node of a region has its own replication state (what it
has applied of its region's and of the global actors). So the agent the page polls asks its region's
other agents (the regional cluster's members that are alive or suspect, at their ``api`` address) for
``GET /v1/dashboard?only=replication`` — a small document built without scraping or reading tables — all
at once with a short timeout, cached like the proxies' scrape. The bearer token of this agent is sent
(the agents of a fleet share one). A peer that does not answer is listed with its error.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from verdigris.watchdog.rwlock import AsyncRWLock


class PeerReplication:
    """Fetches the region's other agents' replication documents; see the module docstring."""

    def __init__(self, token: str | None, *, timeout: float = 0.8, cache_seconds: float = 0.9) -> None:
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self._session: aiohttp.ClientSession | None = None
        self._cached: tuple[float, tuple[str, ...], list[dict[str, Any]]] | None = None
        # one fetch at a time, the others wait for its result (bounded: a fetch is bounded by its timeout)
        self._lock = AsyncRWLock("dashboard peer agents cache", timeout=3 * timeout + 1)

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def fetch(self, apis: Sequence[str]) -> list[dict[str, Any]]:
        """``[{"api", "replication" | None, "error" | None}]`` for each API address (cached briefly)."""
        key = tuple(sorted(apis))
        if not key:
            return []
        async with self._lock.write():
            cached = self._cached
            if cached is not None and cached[1] == key and time.monotonic() - cached[0] < self.cache_seconds:
                return cached[2]
            if self._session is None:
                self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
            session = self._session
            results = list(await asyncio.gather(*(self._one(session, api) for api in key)))
            self._cached = (time.monotonic(), key, results)
            return results

    async def _one(self, session: aiohttp.ClientSession, api: str) -> dict[str, Any]:
        url = f"http://{api}/v1/dashboard?only=replication"
        try:
            async with session.get(url, headers=self.headers) as response:
                if response.status != 200:
                    return {"api": api, "replication": None, "error": f"HTTP {response.status}"}
                doc = await response.json()
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            error = "timed out" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
            return {"api": api, "replication": None, "error": error}
        replication = doc.get("replication") if isinstance(doc, dict) else None
        if not isinstance(replication, dict):
            return {"api": api, "replication": None, "error": "no replication state in the answer"}
        return {"api": api, "replication": replication, "error": None}


__all__ = ["PeerReplication"]
