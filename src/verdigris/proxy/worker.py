"""``verdigris proxy``: a supervisor process and N worker processes sharing the port (SO_REUSEPORT).

Each worker runs uvloop, its own routing table fed by the local agent, its own upstream pools and load
counts. The supervisor restarts a worker that dies (at most 5 times a minute, then gives up with exit
status 1) and on SIGTERM / SIGINT passes SIGTERM on: every worker stops accepting, drains its in-flight
requests for at most ``timeouts.drain`` seconds and exits; stragglers are killed after that.

The supervisor is an asyncio program. It keeps a control channel to every worker
(:mod:`verdigris.proxy.control`, one socketpair each): it probes each worker every ``probe_interval``
(a worker that does not answer within ``probe_deadline`` is logged and counted,
:meth:`Supervisor.on_probe_timeout`) and asks for counters when ``/metrics`` is scraped
(:mod:`verdigris.proxy.metrics`, served at ``metrics_listen`` when set). A worker whose supervisor goes
away (its channel closes) drains and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import socket
import sys
import time
from collections.abc import Coroutine
from multiprocessing.process import BaseProcess
from typing import Any

import msgspec

from verdigris.proxy.config import ProxyConfig
from verdigris.proxy.control import ControlClient, ControlError, ControlTimeout
from verdigris.proxy.shared_load import SharedLoad, SharedLoadHandle
from verdigris.proxy.stats import WorkerStats

log = logging.getLogger("verdigris.proxy")

RESTART_BUDGET = 5
RESTART_WINDOW = 60.0
STARTUP_DEADLINE = 30.0
"""How long a new worker may take to answer its first probe (interpreter start, imports)."""


def worker_main(
    config: ProxyConfig,
    index: int,
    *,
    control: socket.socket | None = None,
    shared_load: SharedLoadHandle | None = None,
) -> None:
    """The entry point of a worker process. ``control``: its end of the supervisor's channel;
    ``shared_load``: the load counts shared by the workers."""
    import uvloop

    from verdigris.proxy.server import serve

    logging.basicConfig(level=logging.WARNING, format=f"proxy[{index}] %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; it sends SIGTERM

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        return await serve(config, stop=stop, control=control, worker_index=index, shared_load=shared_load)

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        code = runner.run(main())
    sys.exit(code)


class WorkerSlot:
    """The supervisor's view of worker ``index`` (the process in it changes when it is restarted)."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: BaseProcess | None = None
        self.client: ControlClient | None = None
        self.pid = 0
        self.exited = asyncio.Event()
        self.prober: asyncio.Task[None] | None = None
        self.restarts = 0
        self.up = False
        """The last probe was answered in time."""
        self.answered = False
        """The current process has answered a probe at least once."""
        self.probe_timeouts = 0
        self.probe_errors = 0
        self.stats_timeouts = 0
        self.consecutive_timeouts = 0
        self.stuck_since: float | None = None
        self.lag: float | None = None
        self.rtt: float | None = None
        self.route_us: float | None = None
        self.last_stats: WorkerStats | None = None
        self.stats_at: float | None = None


class Supervisor:
    """Runs ``config.workers`` workers until SIGTERM / SIGINT (see the module docstring)."""

    def __init__(self, config: ProxyConfig) -> None:
        from verdigris.proxy.metrics import Totals

        self.config = config
        self.ctx = multiprocessing.get_context("spawn")
        self.slots = [WorkerSlot(i) for i in range(config.workers)]
        self.retired = Totals()
        """Counters of workers that died (their last snapshot): totals stay monotonic across restarts."""
        self.stop = asyncio.Event()
        self.stopping = False
        self.status = 0
        self._restarts: list[float] = []
        self._stats_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.shared_load: SharedLoad | None = None
        """The workers' shared load counts (run_proxy creates them); a dead worker's row is zeroed."""

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------------------- processes

    async def spawn(self, slot: WorkerSlot) -> None:
        if self.stopping:  # a restart scheduled just before SIGTERM
            return
        parent, child = socket.socketpair()
        p = self.ctx.Process(
            target=worker_main,
            args=(self.config, slot.index),
            kwargs={"control": child, "shared_load": self.shared_load.handle if self.shared_load else None},
            name=f"verdigris-proxy-{slot.index}",
            daemon=False,
        )
        try:
            p.start()
        finally:
            child.close()
        slot.proc, slot.pid = p, p.pid or 0
        slot.up = slot.answered = False
        slot.consecutive_timeouts = 0
        slot.stuck_since = None
        slot.exited = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_reader(p.sentinel, self._on_exit, slot, p)
        try:
            slot.client = await ControlClient.open(parent)
        except OSError as e:  # cannot happen with a fresh socketpair; the worker then runs unprobed
            log.error("worker %d: control channel: %s", slot.index, e)
            parent.close()
            return
        slot.prober = loop.create_task(self._probe_loop(slot, slot.client))

    def _on_exit(self, slot: WorkerSlot, p: BaseProcess) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(p.sentinel)
        p.join(0)
        if slot.proc is not p:
            return
        slot.up = False
        if slot.prober is not None:
            slot.prober.cancel()
            slot.prober = None
        if slot.client is not None:
            self._background(slot.client.close())
            slot.client = None
        if slot.last_stats is not None:
            self.retired.add(slot.last_stats)
            slot.last_stats, slot.stats_at = None, None
        slot.exited.set()
        if self.stopping:
            return
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if now - t < RESTART_WINDOW] + [now]
        if p.exitcode == 1 or len(self._restarts) > RESTART_BUDGET:
            log.error("worker %d exited with status %s; stopping", slot.index, p.exitcode)
            self.status = 1
            self.stop.set()
            return
        log.warning(
            "worker %d (pid %d) exited with status %s; restarting it", slot.index, slot.pid, p.exitcode
        )
        slot.restarts += 1
        if self.shared_load is not None:
            self.shared_load.reset_worker(slot.index)  # its slots died with it
        self._background(self.spawn(slot))

    def replace(self, slot: WorkerSlot, why: str) -> None:
        """Kill worker ``slot`` (SIGKILL): its exit is then handled as any other death (restarted, within
        the restart budget). For a worker that is stuck: a stopped or blocked loop cannot drain."""
        p = slot.proc
        if p is not None and p.is_alive():
            log.warning("replacing worker %d (pid %d): %s", slot.index, slot.pid, why)
            p.kill()

    # ---------------------------------------------------------------------------- probes

    async def _probe_loop(self, slot: WorkerSlot, client: ControlClient) -> None:
        cfg = self.config
        started = time.monotonic()
        while client.closed is None:
            t0 = time.monotonic()
            deadline = cfg.probe_deadline
            if not slot.answered:  # a new worker: its first answer may take an interpreter start
                deadline = max(deadline, started + STARTUP_DEADLINE - t0)
            try:
                r = await client.call("probe", {"sent": t0}, timeout=deadline)
            except ControlTimeout:
                self.on_probe_timeout(slot)
            except ControlError as e:
                if client.closed is not None:
                    return  # the worker is gone: _on_exit takes over
                slot.probe_errors += 1
                log.warning("probe_error worker=%d pid=%d error=%s", slot.index, slot.pid, e)
            else:
                self._probe_answered(slot, r, time.monotonic() - t0)
            await asyncio.sleep(max(0.0, cfg.probe_interval - (time.monotonic() - t0)))

    def _probe_answered(self, slot: WorkerSlot, r: object, rtt: float) -> None:
        if isinstance(r, dict):
            lag, route_us = r.get("lag"), r.get("route_us")
            slot.lag = float(lag) if isinstance(lag, int | float) else None
            slot.route_us = float(route_us) if isinstance(route_us, int | float) else None
        slot.rtt = rtt
        slot.up = slot.answered = True
        if slot.stuck_since is not None:
            log.warning(
                "probe_recovered worker=%d pid=%d stuck_for=%.2fs timeouts=%d",
                slot.index,
                slot.pid,
                time.monotonic() - slot.stuck_since,
                slot.consecutive_timeouts,
            )
        slot.stuck_since = None
        slot.consecutive_timeouts = 0

    def on_probe_timeout(self, slot: WorkerSlot) -> None:
        """Worker ``slot`` did not answer a probe within ``probe_deadline``: its event loop is blocked or
        the process is stopped. For now it is only logged and counted; to replace stuck workers, call
        ``self.replace(slot, "no answer to probes")`` here."""
        slot.probe_timeouts += 1
        slot.consecutive_timeouts += 1
        slot.up = False
        n = slot.consecutive_timeouts
        if slot.stuck_since is None:
            slot.stuck_since = time.monotonic() - self.config.probe_deadline
        if n == 1 or n % 10 == 0:
            log.warning(
                "probe_timeout worker=%d pid=%d deadline=%gs consecutive=%d",
                slot.index,
                slot.pid,
                self.config.probe_deadline,
                n,
            )

    # ---------------------------------------------------------------------------- stats

    async def refresh_stats(self) -> None:
        """Ask every worker for a snapshot (concurrently, each bounded by ``probe_deadline``); a worker that
        does not answer keeps its last one, and is counted."""

        async def one(slot: WorkerSlot) -> None:
            client, pid = slot.client, slot.pid
            if client is None or not slot.answered:
                return  # restarting, or starting: it has counted nothing yet
            try:
                result = await client.call("stats", timeout=self.config.probe_deadline)
                stats = msgspec.convert(result, WorkerStats)
            except (ControlError, msgspec.ValidationError) as e:
                slot.stats_timeouts += 1
                log.warning("stats_unanswered worker=%d pid=%d error=%s", slot.index, pid, e)
                return
            if slot.client is client:  # not a worker that died meanwhile (its last snapshot is retired)
                slot.last_stats, slot.stats_at = stats, time.monotonic()

        async with self._stats_lock:
            await asyncio.gather(*(one(s) for s in self.slots))

    # ---------------------------------------------------------------------------- main

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        loop.add_signal_handler(signal.SIGINT, self.stop.set)
        runner = None
        if self.config.metrics_listen is not None:
            from aiohttp import web

            from verdigris.proxy.metrics import metrics_app

            runner = web.AppRunner(metrics_app(self), access_log=None)
            await runner.setup()
            host, port = self.config.metrics_listen
            try:
                await web.TCPSite(runner, host, port).start()
            except OSError as e:
                log.error("cannot serve metrics on %s: %s", self.config.metrics_listen, e.strerror or e)
                await runner.cleanup()
                return 1
        for slot in self.slots:
            await self.spawn(slot)
        log.info(
            "listening on %s with %d workers (agent %s)%s",
            self.config.listen,
            self.config.workers,
            self.config.agent,
            f"; metrics at http://{_addr(runner.addresses[0])}/metrics" if runner is not None else "",
        )
        try:
            await self.stop.wait()
        finally:
            self.stopping = True
            await self._shutdown()
            if runner is not None:
                await runner.cleanup()
        return self.status

    async def _shutdown(self) -> None:
        for slot in self.slots:
            if slot.prober is not None:
                slot.prober.cancel()
            p = slot.proc
            if p is not None and p.exitcode is None:
                p.terminate()  # SIGTERM: drain and exit
        alive = [s for s in self.slots if s.proc is not None and not s.exited.is_set()]
        if alive:
            waits = [asyncio.ensure_future(s.exited.wait()) for s in alive]
            _, pending = await asyncio.wait(waits, timeout=self.config.timeouts.drain + 5.0)
            for w in pending:
                w.cancel()
        for slot in self.slots:
            p = slot.proc
            if p is not None and p.exitcode is None and not slot.exited.is_set():
                log.warning("worker %d (pid %d) did not stop in time; killing it", slot.index, slot.pid)
                p.kill()
                p.join(5.0)
            if p is not None:
                with contextlib.suppress(ValueError, OSError):
                    asyncio.get_running_loop().remove_reader(p.sentinel)
            if slot.client is not None:
                await slot.client.close()
                slot.client = None


def _addr(address: Any) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def run_proxy(config: ProxyConfig) -> int:
    """Supervise ``config.workers`` workers until SIGTERM / SIGINT. Returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="proxy %(levelname)s: %(message)s")

    shared = SharedLoad.create(config.workers, config.load_cells)

    async def main() -> int:
        supervisor = Supervisor(config)
        supervisor.shared_load = shared
        return await supervisor.run()

    try:
        return asyncio.run(main())
    finally:
        shared.unlink()


__all__ = ["Supervisor", "WorkerSlot", "run_proxy", "worker_main"]
