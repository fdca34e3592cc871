"""Autostart: wake an app that has no usable instance anywhere in reach (scaled to zero).

When routing finds nothing for an app (503 ``no_healthy_instance``: no healthy local instance and no
region to forward to; not for a forced instance), the worker asks :meth:`Waker.wake` instead of
answering at once:

1. the machines agents that can start the app are read from the local agent (the global
   ``machine_agents`` table, ``apps`` a JSON list of app names; the rows are reused for
   :data:`AGENTS_TTL`), nearest region first (this region, then by the table's ``region_rtt``
   distances; unknown = farthest; random within a region). None: the original refusal, at once;
2. ``POST http://<address>/v1/apps/<app>/start`` to each in turn until one answers 200;
3. the request is held until the routing table shows a healthy instance of the app here, or (not for a
   request another region's proxy forwarded here) a region in ``app_regions`` to forward to; then it
   is routed as usual. The wait is bounded by ``[proxy.timeouts] wake`` (20 s); past it, or when every
   machines agent asked failed, the answer is a 503 ``no_healthy_instance`` whose reason says what was
   tried.

At most one wake per app is in flight per worker: concurrent requests for the app wait on the same one.
The wait looks at the instances again each time the routing table changes
(:meth:`~verdigris.proxy.table.RoutingTable.next_change`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
from collections.abc import Callable
from typing import Final

import aiohttp

from verdigris.api.client import ApiError, CorrosionClient
from verdigris.proxy.balance import RouteRequest
from verdigris.proxy.errors import ErrorCode, Reject
from verdigris.proxy.table import RoutingTable
from verdigris.store.types import SqlValue

log = logging.getLogger("verdigris.proxy.wake")

AGENTS_TTL: Final = 2.0
"""Seconds the ``machine_agents`` rows read from the agent are reused."""
START_TIMEOUT: Final = 3.0
"""Bound of one ``POST /v1/apps/<app>/start`` to a machines agent."""
WOKEN: Final = "woken"
"""Key set in a request's ``extra`` once it has waited for a wake (it never waits twice)."""


class Waker:
    """One per worker. ``count``: the worker's event counter (``wakes``, ``wake_ok``, ``wake_failed``,
    ``wake_timeouts``)."""

    def __init__(
        self,
        table: RoutingTable,
        region: str,
        agent_url: str,
        token: str | None,
        timeout: float,
        count: Callable[[str], None],
    ) -> None:
        self.table = table
        self.region = region
        self.agent_url = agent_url
        self.token = token
        self.timeout = timeout
        self.count = count
        self.distances = table.distances(region)
        self._inflight: dict[tuple[str, bool], asyncio.Task[Reject | None]] = {}
        self._agents_rows: list[list[SqlValue]] | None = None
        self._agents_read = 0.0
        self.rng = random.Random()

    def applies(
        self,
        decision: Reject,
        app: str | None,
        route: RouteRequest,
        extra: dict[str, str],
        *,
        forwarded: bool,
    ) -> bool:
        """Whether a refusal may wait for a wake (then the request is marked: it waits once at most).

        Only when nothing is in reach: no healthy instance here and (for a client's request) no other
        region in ``app_regions``; not for a forced instance. A request forwarded here is pinned to this
        region (its refusal is ``no_instance_in_region`` too): the edge proxy forwards as soon as
        ``app_regions`` names this region, which happens when the instance starts, before its checks pass.
        """
        codes = (
            (ErrorCode.NO_HEALTHY_INSTANCE, ErrorCode.NO_INSTANCE_IN_REGION)
            if forwarded
            else (ErrorCode.NO_HEALTHY_INSTANCE,)
        )
        if app is None or decision.code not in codes or WOKEN in extra or route.force_instance is not None:
            return False
        if self.routable(app, forwarded):
            return False  # something is in reach (the refusal has another cause, e.g. no peer_token)
        extra[WOKEN] = "1"
        return True

    async def wake(self, app: str, decision: Reject, *, local_only: bool = False) -> Reject | None:
        """Wake ``app``; None once it is routable (route the request again), else the refusal. When no
        machines agent can start the app, the original ``decision`` is the answer, at once.
        ``local_only``: only an instance in this region will do (a request forwarded here)."""
        agents = await self._agents(app, local_only)
        if not agents:
            return decision
        key = (app, local_only)
        task = self._inflight.get(key)
        if task is None:
            self.count("wakes")
            task = asyncio.get_running_loop().create_task(self._wake(app, agents, local_only))
            self._inflight[key] = task
            task.add_done_callback(lambda _: self._inflight.pop(key, None))
        return await asyncio.shield(task)

    def routable(self, app: str, local_only: bool) -> bool:
        if self.table.healthy_instances(app, self.region):
            return True
        return not local_only and bool(self.table.regions(app) - {self.region})

    async def _wake(self, app: str, agents: list[tuple[str, str, str]], local_only: bool) -> Reject | None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        asked = ""
        try:
            async with asyncio.timeout(self.timeout):
                errors: list[str] = []
                async with aiohttp.ClientSession() as http:
                    for node, region, address in agents:
                        try:
                            await self._start(http, app, address)
                        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
                            errors.append(f"{node} ({region}, {address}): {e or type(e).__name__}")
                            continue
                        asked = f"{node} ({region})"
                        break
                if not asked:
                    self.count("wake_failed")
                    return _reject(f"autostart of {app} failed: " + "; ".join(errors))
                log.info("autostart of %s: asked machines agent %s", app, asked)
                while not self.routable(app, local_only):
                    await self.table.next_change()
        except TimeoutError:
            self.count("wake_timeouts")
            after = f"asked machines agent {asked}; " if asked else ""
            return _reject(f"autostart of {app}: {after}no instance became healthy within {self.timeout:g} s")
        self.count("wake_ok")
        log.info("autostart of %s: routable after %.2f s", app, loop.time() - started)
        return None

    async def _agents(self, app: str, local_only: bool) -> list[tuple[str, str, str]]:
        """(node, region, address) of the machines agents that can start ``app``, nearest first. The
        table is read at most every :data:`AGENTS_TTL` seconds (a refusal for an app nobody can start
        must not cost a query to the agent each time)."""
        now = asyncio.get_running_loop().time()
        if self._agents_rows is None or now - self._agents_read >= AGENTS_TTL:
            try:
                async with CorrosionClient(self.agent_url, self.token, timeout=START_TIMEOUT) as client:
                    _, rows = await client.rows("SELECT id, region, address, apps FROM machine_agents")
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as e:
                # no such table (a schema without machines agents) or no agent: nobody to wake, so
                # the request gets its refusal as it was
                self.count("wake_agents_unreadable")
                log.debug("autostart: cannot read machine_agents from %s: %s", self.agent_url, e)
                rows = []
            self._agents_rows, self._agents_read = rows, now
        found: list[tuple[float, float, str, str, str]] = []
        for node, region, address, apps in self._agents_rows:
            try:
                names = json.loads(str(apps))
            except ValueError:
                continue  # a bad row is skipped, never trusted
            if not isinstance(names, list) or app not in names or not address:
                continue
            region = str(region)
            if local_only and region != self.region:
                continue
            distance = 0.0 if region == self.region else self.distances.get(region, math.inf)
            found.append((distance, self.rng.random(), str(node), region, str(address)))
        found.sort()
        return [(node, region, address) for _, _, node, region, address in found]

    async def _start(self, http: aiohttp.ClientSession, app: str, address: str) -> None:
        url = f"http://{address}/v1/apps/{app}/start"
        async with http.post(url, timeout=aiohttp.ClientTimeout(total=START_TIMEOUT)) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise ValueError(f"answered {resp.status}: {body.decode('utf-8', 'replace').strip()[:200]}")


def _reject(reason: str) -> Reject:
    return Reject(503, ErrorCode.NO_HEALTHY_INSTANCE, reason)


__all__ = ["WOKEN", "Waker"]
