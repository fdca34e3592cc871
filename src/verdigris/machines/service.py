"""The machines agent process: its instances, the state writer, autostop, and the HTTP API.

HTTP API (aiohttp, on ``machines.listen``; every error is a JSON ``{"error": ...}`` with a 4xx status):

====================================  =====================================================================
``GET /v1/health``                    ``{"ok": true, "node", "region", "instances", "state_writes", ...}``
``GET /v1/instances``                 JSON list: id, app, region, node, state, address, pid, health, checks, restarts
``POST /v1/apps/{app}/start``         start a stopped instance of the app on this node (what a proxy asks
                                      for); 200 ``{"instance", "state", "started"}`` (``started`` false when
                                      one already runs); 404 unknown app; 409 no instance of it on this node
``POST /v1/instances/{id}/stop``      stop it (its row stays, ``stopped``); 404 unknown instance
``POST /v1/instances/{id}/start``     start it; 404 unknown instance
``GET /metrics``                      Prometheus text
====================================  =====================================================================

Autostop: every instance of an app with ``autostop_after`` > 0 that has had no established TCP connection
(``/proc/net/tcp*``, this agent's own probes excepted) for that long is stopped, unless it is one of the
``min_machines_running`` started instances of its app in the region with the smallest ids (read from the
agent): a deterministic choice, so that two nodes stopping at the same time never both stop a protected
one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Final

import aiohttp
from aiohttp import web

from verdigris.api.client import ApiError, CorrosionClient
from verdigris.machines import checks as probes
from verdigris.machines.config import MachinesConfig
from verdigris.machines.instance import Instance
from verdigris.machines.metrics import MachinesMetrics
from verdigris.machines.state import StateWriter, startable_apps

log = logging.getLogger("verdigris.machines")

GLOBALS_REPAIR: Final = 30.0
"""Seconds between re-sends of the guarded global upserts (they write nothing when nothing differs)."""
FLUSH_TIMEOUT: Final = 3.0
"""At shutdown: how long to wait for the last rows to reach the agent."""


class PortsExhausted(Exception):
    pass


class MachinesAgent:
    def __init__(self, config: MachinesConfig) -> None:
        self.config = config
        self.metrics = MachinesMetrics()
        self.client = CorrosionClient(config.agent, config.token or None, timeout=10.0)
        self.instances: dict[str, Instance] = {}
        self.writer = StateWriter(config, self.client, self.metrics, lambda: self.instances)
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self._next_port = config.port_range[0]
        self.autostops = 0

    # ---------------------------------------------------------------------------------- ports

    def _allocate_port(self) -> int:
        """The next port of ``port_range`` that no instance has and that can be bound now."""
        low, high = self.config.port_range
        taken = {i.port for i in self.instances.values()}
        for _ in range(high - low + 1):
            port = self._next_port
            self._next_port = low if port >= high else port + 1
            if port in taken:
                continue
            with socket.socket(socket.AF_INET6 if ":" in self.config.instance_host else socket.AF_INET) as s:
                s.setsockopt(
                    socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
                )  # as servers do: TIME_WAIT is no owner
                try:
                    s.bind((self.config.instance_host, port))
                except OSError:
                    continue
            return port
        raise PortsExhausted(f"no free port left in {low}-{high} on {self.config.instance_host}")

    # ---------------------------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        for app in self.config.apps:
            for j in self.config.share(app):
                inst = Instance(self.config, app, j, self._allocate_port(), self.metrics, self.writer.mark)
                self.instances[inst.id] = inst
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self.writer.run(), name="state writer"))
        for inst in self.instances.values():
            inst.start()
        self._tasks.append(loop.create_task(self._autostop_loop(), name="autostop"))
        self._tasks.append(loop.create_task(self._globals_loop(), name="globals repair"))
        api = web.Application(middlewares=[_json_errors])
        api.router.add_get("/v1/health", self._health)
        api.router.add_get("/v1/instances", self._list)
        api.router.add_post("/v1/apps/{app}/start", self._start_app)
        api.router.add_post("/v1/instances/{id}/stop", self._stop_instance)
        api.router.add_post("/v1/instances/{id}/start", self._start_instance)
        api.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(api, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.config.listen.host, self.config.listen.port).start()
        log.info(
            "machines agent %s (region %s) on %s: %d instance(s) of %s",
            self.config.node,
            self.config.region,
            self.config.listen,
            len(self.instances),
            ", ".join(a.name for a in self.config.apps) or "no app",
        )

    async def stop(self) -> None:
        """Stop every instance (SIGTERM, then SIGKILL), delete their rows and this agent's row."""
        if self._runner is not None:
            await self._runner.cleanup()
        for t in self._tasks[1:]:
            t.cancel()
        await asyncio.gather(*(i.destroy() for i in self.instances.values()), return_exceptions=True)
        if not await self.writer.settled(FLUSH_TIMEOUT):
            # the agent is gone or stuck (it may be stopping too): do not hold the shutdown any longer
            log.warning("the last state changes did not reach the agent within %g s", FLUSH_TIMEOUT)
        else:
            with contextlib.suppress(ApiError, aiohttp.ClientError, OSError, TimeoutError):
                await asyncio.wait_for(self.writer.remove_agent_row(), FLUSH_TIMEOUT)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.close()

    async def _globals_loop(self) -> None:
        while True:
            await asyncio.sleep(GLOBALS_REPAIR)  # a period, not a synchronisation
            self.writer.mark_globals()

    # ---------------------------------------------------------------------------------- autostop

    async def _autostop_loop(self) -> None:
        periods = [
            a.autostop_after for a in self.config.apps if a.autostop_after > 0 and self.config.share(a)
        ]
        if not periods:
            return
        tick = max(0.1, min(1.0, min(periods) / 4))
        while True:
            await asyncio.sleep(tick)  # sampling /proc/net/tcp: a period, nothing to wait on
            try:
                await self._autostop_round()
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as e:
                log.warning("autostop: cannot read the region's instances from the agent: %s", e)

    async def _autostop_round(self) -> None:
        now = time.monotonic()
        watched = {
            i.port: i
            for i in self.instances.values()
            if i.app.autostop_after > 0 and i.state == "started" and i.want_running
        }
        busy = probes.established_ports(watched)
        for port, inst in watched.items():
            if port in busy:
                inst.last_active = now
                continue
            if now - inst.last_active < inst.app.autostop_after:
                continue
            _, rows = await self.client.rows(
                (
                    "SELECT id FROM machines WHERE app = ? AND region = ? AND state = 'started' ORDER BY id",
                    [inst.app.name, self.config.region],
                )
            )
            protected = [str(r[0]) for r in rows][: inst.app.min_machines_running]
            if inst.id in protected or len(rows) <= inst.app.min_machines_running:
                inst.last_active = now  # look again after another idle period
                continue
            log.info("instance %s idle for %.1f s: stopping it (autostop)", inst.id, now - inst.last_active)
            self.autostops += 1
            self.metrics.autostops.labels(inst.app.name).inc()
            inst.request_running(False)

    # ---------------------------------------------------------------------------------- HTTP API

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "ok": True,
                "node": self.config.node,
                "region": self.config.region,
                "instances": len(self.instances),
                "startable_apps": startable_apps(self.config),
                "state_writes": self.writer.writes,
                "state_error": self.writer.last_error,
                "autostops": self.autostops,
            }
        )

    async def _list(self, request: web.Request) -> web.Response:
        return web.json_response([i.describe() for i in sorted(self.instances.values(), key=lambda i: i.id)])

    def _instance(self, request: web.Request) -> Instance:
        iid = request.match_info["id"]
        inst = self.instances.get(iid)
        if inst is None:
            raise _error(404, f"no instance {iid!r} on node {self.config.node}")
        return inst

    async def _start_app(self, request: web.Request) -> web.Response:
        name = request.match_info["app"]
        spec = self.config.app(name)
        if spec is None:
            raise _error(404, f"no app {name!r} in this machines agent's config")
        mine = sorted((i for i in self.instances.values() if i.app.name == name), key=lambda i: i.index)
        if not mine:
            raise _error(
                409,
                f"app {name!r} has no instance on node {self.config.node} "
                f"(region {self.config.region} runs {spec.regions.get(self.config.region, 0)})",
            )
        running = next((i for i in mine if i.want_running), None)
        if running is not None:
            return web.json_response({"instance": running.id, "state": running.state, "started": False})
        inst = mine[0]
        log.info("instance %s: start asked for (%s)", inst.id, request.remote)
        self.metrics.autostarts.labels(name).inc()
        inst.request_running(True)
        return web.json_response({"instance": inst.id, "state": inst.state, "started": True})

    async def _stop_instance(self, request: web.Request) -> web.Response:
        inst = self._instance(request)
        inst.request_running(False)
        return web.json_response({"instance": inst.id, "state": inst.state})

    async def _start_instance(self, request: web.Request) -> web.Response:
        inst = self._instance(request)
        inst.request_running(True)
        return web.json_response({"instance": inst.id, "state": inst.state})

    async def _metrics(self, request: web.Request) -> web.Response:
        counts: dict[tuple[str, str], int] = {}
        for i in self.instances.values():
            counts[(i.app.name, i.state)] = counts.get((i.app.name, i.state), 0) + 1
        body = self.metrics.render(counts)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def _error(status: int, message: str) -> web.HTTPException:
    exc = web.HTTPException(text=json.dumps({"error": message}), content_type="application/json")
    exc.set_status(status)
    return exc


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own 404/405 answers as JSON errors like ours."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.content_type == "application/json":
            raise
        message = {
            404: f"no such endpoint: {request.path}",
            405: f"{request.method} is not allowed on {request.path}",
        }
        raise _error(e.status, message.get(e.status, e.reason)) from None


async def serve(config: MachinesConfig, stop: asyncio.Event) -> int:
    agent = MachinesAgent(config)
    try:
        await agent.start()
    except (OSError, PortsExhausted) as e:
        log.error("cannot start: %s", e)
        await agent.stop()
        return 1
    await stop.wait()
    log.info("stopping: %d instance(s)", len(agent.instances))
    await agent.stop()
    return 0


def run_machines(config: MachinesConfig) -> int:
    """Run until SIGTERM or SIGINT, then stop every instance; the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await serve(config, stop)

    return asyncio.run(main())


__all__ = ["MachinesAgent", "run_machines", "serve"]
