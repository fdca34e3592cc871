"""The proxy's row in the global ``proxies`` table: written by the supervisor (once per proxy, not per
worker) through the local agent's API, so that other regions' proxies can forward to this one.

:class:`Registration` upserts ``(id, region, address, updated_at, metrics)`` at start, retrying with backoff
(0.2 s doubling to 10 s) while the agent is away, and deletes the row on a clean stop (best effort, for
at most 2 s: a proxy that dies leaves its row, and peers that cannot connect to it fall back on another
proxy of the region and eject it by passive health).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import aiohttp

from verdigris.api.client import ApiError, CorrosionClient
from verdigris.config import Addr
from verdigris.proxy.config import ProxyConfig

log = logging.getLogger("verdigris.proxy")

MIN_BACKOFF = 0.2
MAX_BACKOFF = 10.0
UPSERT = (
    "INSERT INTO proxies (id, region, address, updated_at, metrics) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (id) DO UPDATE SET region = excluded.region, address = excluded.address, "
    "updated_at = excluded.updated_at, metrics = excluded.metrics"
)


def metrics_address(config: ProxyConfig) -> str | None:
    """Where the dashboard scrapes this proxy (``metrics_listen``; a wildcard host replaced by the host of
    :meth:`~verdigris.proxy.config.ProxyConfig.peer_address`), or None without ``metrics_listen``."""
    if config.metrics_listen is None:
        return None
    host, port = config.metrics_listen
    if host in ("0.0.0.0", "::", ""):
        host = config.peer_address().host
    return str(Addr(host, port))


class Registration:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.id = config.proxy_id()
        self.address = str(config.peer_address())
        self.metrics = metrics_address(config)
        self.registered = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._register(), name="proxy-registration")

    async def _register(self) -> None:
        backoff = MIN_BACKOFF
        async with CorrosionClient(self.config.agent, self.config.token, timeout=5.0) as client:
            while True:
                try:
                    params = [self.id, self.config.region, self.address, int(time.time()), self.metrics]
                    await client.transaction([(UPSERT, params)])
                except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as e:
                    log.info("registering proxy %s: the agent is not reachable (%s); retrying", self.id, e)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, MAX_BACKOFF)
                    continue
                log.info(
                    "registered as proxy %s of region %s at %s", self.id, self.config.region, self.address
                )
                self.registered.set()
                return

    async def close(self, *, deregister: bool = True) -> None:
        """Stop retrying; delete the row if it was written (best effort, 2 s at most)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not (deregister and self.registered.is_set()):
            return
        try:
            async with CorrosionClient(self.config.agent, self.config.token, timeout=2.0) as client:
                async with asyncio.timeout(2.0):
                    await client.transaction([("DELETE FROM proxies WHERE id = ?", [self.id])])
        except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as e:
            log.info("deregistering proxy %s: %s (its row stays)", self.id, e)


__all__ = ["Registration"]
