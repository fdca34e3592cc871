"""Keeps a worker's :class:`~verdigris.proxy.table.RoutingTable` fed by the local agent's subscriptions.

One task per subscription (:data:`~verdigris.proxy.table.QUERIES`). After a disconnect (agent restart)
it resumes with ``subscribe_by_id(id, from_=last)``; if the agent no longer knows the subscription, or
the table asks for it (a gap, a protocol problem), it subscribes afresh, and the table swaps the new
snapshot in atomically at its end. Meanwhile the worker keeps routing on its last table. Reconnects back
off from 0.1 s to 2 s.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from verdigris.api.client import ApiError, CorrosionClient
from verdigris.proxy.table import QUERIES, RoutingTable

log = logging.getLogger("verdigris.proxy.feed")

MIN_BACKOFF = 0.1
MAX_BACKOFF = 2.0


class TableFeed:
    def __init__(self, table: RoutingTable, agent: str, token: str | None = None) -> None:
        self.table = table
        self.client = CorrosionClient(agent, token, timeout=5.0)
        self.connected: dict[str, bool] = dict.fromkeys(QUERIES, False)
        self.reconnects = 0
        self.resumes = 0
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(name), name=f"feed-{name}") for name in QUERIES]

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.close()

    async def _run(self, name: str) -> None:
        backoff = MIN_BACKOFF
        fresh = True
        while True:
            query_id, last = self.table.resume_point(name)
            resume = not fresh and query_id is not None and last is not None
            try:
                if resume and query_id is not None:
                    stream = self.client.subscribe_by_id(query_id, from_=last)
                else:
                    stream = self.client.subscribe(QUERIES[name])
                async with stream:
                    self.table.attached(name, stream.query_id)
                    self.connected[name] = True
                    if resume:
                        self.resumes += 1
                    fresh = False
                    backoff = MIN_BACKOFF
                    async for event in stream:
                        problem = self.table.feed(name, event)
                        if problem is not None:
                            log.warning("subscription %s: %s: %s", name, problem.kind, problem.message)
                            if problem.resubscribe:
                                fresh = True
                                break
            except asyncio.CancelledError:
                raise
            except ApiError as e:
                log.warning("subscription %s: the agent answered %s", name, e)
                fresh = True  # an unknown subscription id (agent restarted without it): start over
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                log.info("subscription %s: agent unreachable (%s); serving from the last table", name, e)
            self.connected[name] = False
            self.reconnects += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)


__all__ = ["TableFeed"]
