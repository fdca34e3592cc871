"""``verdigris proxy``: a supervisor process and N worker processes accepting from one listening socket.

The supervisor binds the port once, before any worker starts (a bind error exits with status 1 and a
clear message), and hands that socket to every worker it spawns (multiprocessing passes the descriptor
to the spawned child). Every worker accepts from the socket's one kernel queue, so a connection waiting
there goes to whichever worker is free: a stuck worker takes none (it does not accept), a killed worker
loses none (its copy of the descriptor closes; the queue stays), and its replacement accepts from the
same socket. Only connections a worker had already accepted die with it. (Per-worker ``SO_REUSEPORT``
sockets, which this replaced, hash each new connection to one worker's own queue, where it waited for
a stuck worker and was reset when it was killed.)

Workers are forked from multiprocessing's fork server, which has already imported the worker's modules
(``[proxy] worker_start = "forkserver"``, the default): a replacement serves again in a fraction of the
time a fresh interpreter takes (measured in docs/proxy.md), at the price of two idle helper processes (the
fork server and multiprocessing's resource tracker), and the workers are the fork server's children rather
than the supervisor's (:func:`worker_pids`). ``worker_start = "spawn"`` starts a fresh interpreter each.

Each worker runs uvloop, its own routing table fed by the local agent, its own upstream pools and load
counts. The supervisor restarts a worker that dies — at once the first time, then after a delay growing
from 0.1 s to 10 s while the slot keeps failing (:class:`~verdigris.proxy.watchdog.Backoff`); a worker
that exits with status 1 (it cannot listen) stops the proxy with status 1. On SIGTERM / SIGINT it passes
SIGTERM on: every worker stops accepting, drains its in-flight requests for at most ``timeouts.drain``
seconds and exits; stragglers are killed after that, and a worker whose probes are unanswered (stuck:
its loop cannot drain) is killed at once.

The supervisor is an asyncio program. It keeps a control channel to every worker
(:mod:`verdigris.proxy.control`, one socketpair each): it probes each worker every ``probe_interval``
and asks for counters when ``/metrics`` is scraped (:mod:`verdigris.proxy.metrics`, served at
``metrics_listen`` when set). No answer within ``probe_deadline`` of the worker's last answer (its last
sign of life; of the probe's send for a worker that never answered) means the worker's loop is stuck (:meth:`Supervisor.on_probe_timeout`): with ``watchdog`` on (the default) the
supervisor asks for its stacks (:mod:`verdigris.proxy.watchdog`), kills it (SIGKILL) and starts a fresh
one, logging one ``watchdog_restart`` event. A worker whose supervisor goes away (its channel closes)
drains and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Coroutine
from multiprocessing.context import ForkServerContext, SpawnContext
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import msgspec

from verdigris.proxy.config import ProxyConfig
from verdigris.proxy.control import ControlClient, ControlError, ControlTimeout
from verdigris.proxy.shared_load import SharedLoad, SharedLoadHandle
from verdigris.proxy.stats import WorkerStats
from verdigris.proxy.watchdog import (
    FAULT_EXIT,
    Backoff,
    WatchdogStats,
    collect_stacks,
    keep_stacks,
    live_stack_path,
    prune,
    read_stacks,
    stall_cause,
)

log = logging.getLogger("verdigris.proxy")

PROBE_DEADLINE_FLOOR = 0.05
"""The least time a probe is given, whatever is left of ``probe_deadline`` since the last answer."""
STARTUP_DEADLINE = 30.0
"""How long a new worker may take to answer its first probe (interpreter start, imports)."""
FORKSERVER_PRELOAD = ("verdigris.proxy.server", "verdigris.proxy.watchdog", "uvloop")
"""With ``worker_start = "forkserver"``: what the fork server imports once, so a worker (or a replacement
of a stuck one) starts without an interpreter start and these imports."""


def worker_pids(supervisor_pid: int) -> list[int]:
    """The pids of a running supervisor's workers, from ``/proc`` (Linux): its children started with
    ``spawn`` (``spawn_main`` in their command line), or with ``forkserver`` the children of its fork
    server. For tools and tests that signal workers; empty when ``/proc`` cannot be read."""

    def children(pid: int) -> list[int]:
        found: list[int] = []
        try:
            for task in Path(f"/proc/{pid}/task").iterdir():
                found.extend(int(c) for c in (task / "children").read_text().split())
        except OSError:
            pass
        return found

    def cmdline(pid: int) -> bytes:
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return b""

    pids: list[int] = []
    for child in children(supervisor_pid):
        line = cmdline(child)
        if b"spawn_main" in line:
            pids.append(child)
        elif b"multiprocessing.forkserver" in line:
            pids.extend(children(child))
    return sorted(pids)


def worker_main(
    config: ProxyConfig,
    index: int,
    *,
    control: socket.socket | None = None,
    shared_load: SharedLoadHandle | None = None,
    stack_dir: str | None = None,
    fault_exit: bool = False,
    listen_socket: socket.socket | None = None,
) -> None:
    """The entry point of a worker process. ``control``: its end of the supervisor's channel;
    ``shared_load``: the load counts shared by the workers; ``stack_dir``: where its stack file goes
    (:func:`~verdigris.proxy.watchdog.install_stack_dumps`); ``fault_exit``: fault injection, exit at once
    (a crash loop); ``listen_socket``: the supervisor's listening socket (without it the worker binds
    ``listen`` itself)."""
    if fault_exit:
        sys.exit(FAULT_EXIT)
    logging.basicConfig(level=logging.WARNING, format=f"proxy[{index}] %(levelname)s %(name)s: %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides; it sends SIGTERM
    from verdigris.proxy.watchdog import install_stack_dumps

    dumps = install_stack_dumps(stack_dir, index) if stack_dir is not None else None  # before any thread

    import uvloop

    from verdigris.proxy.server import serve

    if config.fault_injection:
        from verdigris.proxy.control import add_process_handlers
        from verdigris.proxy.watchdog import fault_handlers

        add_process_handlers(fault_handlers())

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        if dumps is not None:
            dumps.loop = loop
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        return await serve(
            config,
            stop=stop,
            control=control,
            worker_index=index,
            shared_load=shared_load,
            listen_socket=listen_socket,
        )

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        code = runner.run(main())
    if dumps is not None:  # a clean exit: no stacks to keep (the supervisor also removes it, if killed)
        with contextlib.suppress(OSError):
            dumps.path.unlink()
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
        self.backoff = Backoff()
        self.last_answer: float | None = None
        self.replacing = False
        """The watchdog is dumping and killing the current process."""
        self.fault_crashes = 0
        """Fault injection: this many next starts exit at once."""
        self.started_at = 0.0


class Supervisor:
    """Runs ``config.workers`` workers until SIGTERM / SIGINT (see the module docstring)."""

    def __init__(self, config: ProxyConfig) -> None:
        from verdigris.proxy.metrics import Totals

        self.config = config
        self.ctx: SpawnContext | ForkServerContext
        if config.worker_start == "forkserver":  # forked from a server that has imported these already
            self.ctx = multiprocessing.get_context("forkserver")
            self.ctx.set_forkserver_preload(list(FORKSERVER_PRELOAD))
        else:
            self.ctx = multiprocessing.get_context("spawn")
        self.slots = [WorkerSlot(i) for i in range(config.workers)]
        self.retired = Totals()
        """Counters of workers that died (their last snapshot): totals stay monotonic across restarts."""
        self.stop = asyncio.Event()
        self.stopping = False
        self.status = 0
        self._stats_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.shared_load: SharedLoad | None = None
        """The workers' shared load counts (run_proxy creates them); a dead worker's row is zeroed."""
        self.watchdog = WatchdogStats()
        self.stack_dir: str | None = config.stack_directory()
        """Where workers' stack files go; ``None`` when it cannot be created (no dumps)."""
        self.listen_socket: socket.socket | None = None
        """The one listening socket every worker accepts from (bound in :meth:`run`, open until the end
        so that its queue outlives any worker)."""

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------------------- processes

    async def spawn(self, slot: WorkerSlot) -> None:
        if self.stopping:  # a restart scheduled just before SIGTERM
            return
        parent, child = socket.socketpair()
        fault_exit = slot.fault_crashes > 0
        if fault_exit:
            slot.fault_crashes -= 1
        p = self.ctx.Process(
            target=worker_main,
            args=(self.config, slot.index),
            kwargs={
                "control": child,
                "shared_load": self.shared_load.handle if self.shared_load else None,
                "stack_dir": self.stack_dir,
                "fault_exit": fault_exit,
                "listen_socket": self.listen_socket,
            },
            name=f"verdigris-proxy-{slot.index}",
            daemon=False,
        )
        try:
            p.start()
        finally:
            child.close()
        slot.proc, slot.pid = p, p.pid or 0
        slot.up = slot.answered = slot.replacing = False
        slot.consecutive_timeouts = 0
        slot.stuck_since = slot.last_answer = None
        slot.started_at = time.monotonic()
        log.info("worker_started worker=%d pid=%d t=%.3f", slot.index, slot.pid, slot.started_at)
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
        # the sentinel (a pipe) closes as the process exits, a moment before it can be reaped: wait for
        # that moment (bounded; milliseconds), or its exit status would be None
        p.join(1.0)
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
        if self.stack_dir is not None:
            with contextlib.suppress(OSError):  # a stuck worker's file was renamed (kept) before its kill
                live_stack_path(self.stack_dir, slot.pid).unlink()
        if self.stopping:
            return
        if p.exitcode == 1:
            log.error("worker %d exited with status 1 (it cannot listen); stopping", slot.index)
            self.status = 1
            self.stop.set()
            return
        now = time.monotonic()
        if not slot.replacing:
            self.watchdog.restarts["exited"] += 1
        delay = slot.backoff.failure(now)
        log.warning(
            "worker_exited worker=%d pid=%d status=%s uptime=%.3fs streak=%d backoff=%.3fs t=%.3f",
            slot.index,
            slot.pid,
            p.exitcode,
            now - slot.started_at,
            slot.backoff.streak,
            delay,
            now,
        )
        slot.restarts += 1
        if self.shared_load is not None:
            self.shared_load.reset_worker(slot.index)  # its slots died with it
        self._background(self._respawn(slot, delay))

    async def _respawn(self, slot: WorkerSlot, delay: float) -> None:
        """Start worker ``slot`` again after ``delay`` seconds (its crash-loop backoff; SIGTERM cuts it)."""
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), delay)
        await self.spawn(slot)

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
            origin = t0
            if slot.answered and slot.last_answer is not None:
                # the deadline counts from the worker's last sign of life, not from this probe's send: a
                # stall that begins just after an answer is caught probe_deadline after it began, not up
                # to probe_interval later (the floor keeps one scheduling hiccup of ours from counting)
                origin = min(slot.last_answer, t0)
                deadline = max(cfg.probe_deadline - (t0 - origin), PROBE_DEADLINE_FLOOR)
            else:  # a new worker: its first answer may take an interpreter start
                deadline = max(cfg.probe_deadline, started + STARTUP_DEADLINE - t0)
            try:
                r = await client.call("probe", {"sent": t0}, timeout=deadline)
            except ControlTimeout:
                if self.on_probe_timeout(slot, sent=origin, deadline=deadline):
                    await self._replace_stuck(
                        slot, "probe_timeout" if slot.answered else "startup_timeout", origin
                    )
                    return
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
        slot.last_answer = time.monotonic()
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

    def on_probe_timeout(
        self, slot: WorkerSlot, *, sent: float | None = None, deadline: float | None = None
    ) -> bool:
        """Worker ``slot`` did not answer within ``deadline`` of ``sent`` (its last sign of life): its event loop is
        blocked or the process is stopped. Logged and counted; True when it is to be replaced (``watchdog``
        on, not stopping)."""
        slot.probe_timeouts += 1
        slot.consecutive_timeouts += 1
        slot.up = False
        n = slot.consecutive_timeouts
        if slot.stuck_since is None:
            slot.stuck_since = sent if sent is not None else time.monotonic() - self.config.probe_deadline
        if n == 1 or n % 10 == 0:
            log.warning(
                "probe_timeout worker=%d pid=%d deadline=%gs consecutive=%d",
                slot.index,
                slot.pid,
                self.config.probe_deadline,
                n,
            )
        return self.config.watchdog and not self.stopping and slot.proc is not None

    async def _replace_stuck(self, slot: WorkerSlot, reason: str, sent: float) -> None:
        """The watchdog: dump worker ``slot``'s stacks (bounded wait), SIGKILL it, keep the stack file, log
        one ``watchdog_restart`` event and count it. Its exit then restarts it (:meth:`_on_exit`)."""
        p, pid = slot.proc, slot.pid
        if p is None or slot.replacing:
            return
        slot.replacing = True
        detected = time.monotonic()
        detection = detected - sent
        dump, text, kept = "none", "", None
        if self.stack_dir is not None and p.is_alive():
            path = live_stack_path(self.stack_dir, pid)
            dump = await collect_stacks(pid, path)
            text = read_stacks(path) if dump != "none" else ""
            if dump != "none":
                kept = keep_stacks(path, slot.index, pid)
                self.watchdog.stack_files = prune(Path(self.stack_dir))
        if slot.proc is p and p.is_alive():
            p.kill()
        killed = time.monotonic()
        cause, frames = stall_cause(text)
        self.watchdog.stuck(reason, detection, cause, dump)
        since = f"{detected - slot.last_answer:.3f}" if slot.last_answer is not None else "never"
        log.error(
            "watchdog_restart worker=%d pid=%d reason=%s detection=%.3fs since_last_answer=%s "
            "deadline=%gs detected_at=%.3f killed_at=%.3f dump=%s stacks=%s cause=%s main_stack=%s",
            slot.index,
            pid,
            reason,
            detection,
            since,
            self.config.probe_deadline,
            detected,
            killed,
            dump,
            json.dumps(str(kept) if kept is not None else None),
            json.dumps(cause),
            json.dumps(" | ".join(frames)),
        )

    # ---------------------------------------------------------------------------- fault injection

    async def fault_stall(self, index: int, seconds: float) -> dict[str, Any]:
        """Fault injection: have worker ``index`` block its event loop for ``seconds``. The request is sent
        and not waited for (the worker is then stuck)."""
        slot = self.slots[index]
        client = slot.client
        if client is None:
            raise ControlError(f"worker {index} is not running")

        async def send() -> None:
            with contextlib.suppress(ControlError):
                await client.call("stall", {"seconds": seconds}, timeout=seconds + 5.0)

        sent = time.monotonic()
        self._background(send())
        await asyncio.sleep(0)  # the request is written before this returns
        return {"worker": index, "pid": slot.pid, "sent": sent}

    async def fault_crashloop(self, index: int, times: int) -> dict[str, Any]:
        """Fault injection: crash worker ``index`` now, and make its next ``times`` starts exit at once."""
        slot = self.slots[index]
        client, pid = slot.client, slot.pid
        if client is None:
            raise ControlError(f"worker {index} is not running")
        slot.fault_crashes = times
        with contextlib.suppress(ControlError):  # it exits without answering
            await client.call("crash", timeout=1.0)
        return {"worker": index, "pid": pid, "times": times}

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
        from verdigris.proxy.server import bind_listener

        try:
            self.listen_socket = bind_listener(self.config.listen)
        except OSError as e:
            log.error("cannot listen on %s: %s", _addr(self.config.listen), e.strerror or e)
            return 1
        try:
            return await self._run()
        finally:
            self.listen_socket.close()

    async def _run(self) -> int:
        assert self.listen_socket is not None
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
        if self.stack_dir is not None:
            try:
                os.makedirs(self.stack_dir, exist_ok=True)
                self.watchdog.stack_files = prune(Path(self.stack_dir))
            except OSError as e:
                log.error(
                    "stack_dir %s: %s; stuck workers will be replaced without stack dumps", self.stack_dir, e
                )
                self.stack_dir = None
        for slot in self.slots:
            await self.spawn(slot)
        from verdigris.proxy.registry import Registration

        registration = Registration(self.config)  # the proxies row: once per proxy, not per worker
        registration.start()
        log.info(
            "listening on %s with %d workers (agent %s)%s",
            _addr(self.listen_socket.getsockname()),
            self.config.workers,
            self.config.agent,
            f"; metrics at http://{_addr(runner.addresses[0])}/metrics" if runner is not None else "",
        )
        try:
            await self.stop.wait()
        finally:
            self.stopping = True
            await registration.close()
            await self._shutdown()
            if runner is not None:
                await runner.cleanup()
        return self.status

    async def _shutdown(self) -> None:
        if self.listen_socket is not None:
            self.listen_socket.close()  # no more spawns; once the workers close theirs, connects are refused
        for slot in self.slots:
            if slot.prober is not None:
                slot.prober.cancel()
            p = slot.proc
            if p is not None and p.exitcode is None:
                if slot.stuck_since is not None:  # its loop is blocked (probes unanswered): it cannot drain
                    log.warning("worker %d (pid %d) is stuck; killing it", slot.index, slot.pid)
                    p.kill()
                else:
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
