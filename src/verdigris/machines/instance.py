"""One instance of an app: a child process in its own process group, restarted with backoff when it
exits on its own, stopped with SIGTERM then SIGKILL, health-checked while it runs.

States (the ``machines.state`` values): ``created`` (not running yet, or waiting to be restarted after a
crash), ``started`` (the process runs), ``stopping`` (SIGTERM sent), ``stopped`` (stopped on request or
by autostop: its row stays so that a proxy can ask for it to start again). Every change calls
``on_change`` (the state writer), which writes only what differs from what it wrote last.

Children get ``PR_SET_PDEATHSIG`` (SIGKILL) so that a machines agent killed with ``kill -9`` takes its
instances down with it; a clean stop kills the whole process group so that grandchildren go too.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Final

from verdigris.machines import checks as probes
from verdigris.machines.config import AppSpec, CheckSpec, MachinesConfig
from verdigris.machines.metrics import MachinesMetrics

log = logging.getLogger("verdigris.machines")

BACKOFF_FIRST: Final = 0.1
BACKOFF_MAX: Final = 10.0
STABLE_AFTER: Final = 10.0
"""An instance that stayed up this long has its restart backoff reset to :data:`BACKOFF_FIRST`."""
FAST_PROBE: Final = 0.1
"""Probe period until a check first passes (a started instance becomes routable quickly)..."""
FAST_PROBE_FOR: Final = 10.0
"""...for at most this long after a start (an instance that never passes is probed at its interval)."""
PR_SET_PDEATHSIG: Final = 1

_libc = ctypes.CDLL(None, use_errno=True)  # loaded before any fork: the child only calls into it


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:  # in the child, between fork and exec
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl: nobody would kill us later
            os._exit(1)

    return preexec


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Instance:
    """Instance ``index`` of ``app`` in this region, on port ``port`` of ``config.instance_host``."""

    def __init__(
        self,
        config: MachinesConfig,
        app: AppSpec,
        index: int,
        port: int,
        metrics: MachinesMetrics,
        on_change: Callable[[Instance], None],
    ) -> None:
        self.config = config
        self.app = app
        self.index = index
        self.id = f"{app.name}-{config.region}-{index}"
        self.port = port
        self.metrics = metrics
        self.on_change = on_change
        self.state = "created"
        self.want_running = not app.start_stopped
        self.destroyed = False
        """The instance is gone for good (the agent stops): its rows are deleted."""
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.exit_codes: list[int] = []
        self.created_at = now_ms()
        self.started_at = 0.0
        """Monotonic time of the last spawn."""
        self.last_active = time.monotonic()
        """Monotonic time an established connection to the instance was last seen (autostop)."""
        self.checks: dict[str, tuple[str, str]] = self._not_running()
        """Check name -> (status, output). While no process runs every check is ``critical`` (not
        absent): a proxy that sees the machines row turn ``started`` before it sees the checks rows of
        the same transaction (one subscription per table, no order between them) must still find the
        instance failing, not healthy with no checks, until its first check passes."""
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._check_tasks: list[asyncio.Task[None]] = []
        if app.start_stopped:
            self.state = "stopped"

    @property
    def address(self) -> str:
        h = self.config.instance_host
        return f"[{h}]:{self.port}" if ":" in h else f"{h}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.returncode is None else None

    @property
    def health(self) -> str:
        """``passing`` when every check passes (or there are none and it runs), else the worst status."""
        if self.state != "started":
            return "none"
        statuses = {s for s, _ in self.checks.values()}
        for worst in ("critical", "warning"):
            if worst in statuses:
                return worst
        return "passing"

    def describe(self) -> dict[str, object]:
        return {
            "id": self.id,
            "app": self.app.name,
            "region": self.config.region,
            "node": self.config.node,
            "state": self.state,
            "address": self.address,
            "pid": self.pid,
            "health": self.health,
            "checks": {n: {"status": s, "output": o} for n, (s, o) in sorted(self.checks.items())},
            "restarts": self.restarts,
        }

    # ---------------------------------------------------------------------------------- control

    def start(self) -> None:
        """Run the supervision task (spawns the process unless the instance is to stay stopped)."""
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name=f"instance {self.id}")
        self.on_change(self)

    def request_running(self, running: bool) -> None:
        self.want_running = running
        self._changed.set()

    async def destroy(self) -> None:
        """Stop the process (if any) and end supervision; the rows are deleted by the writer."""
        self.want_running = False
        self.destroyed = True
        self._changed.set()
        if self._task is not None:
            await self._task
        self.checks = {}
        self.on_change(self)

    def _set_state(self, state: str) -> None:
        if state != self.state:
            log.info("instance %s: %s -> %s", self.id, self.state, state)
            self.state = state
            self.on_change(self)

    # ---------------------------------------------------------------------------------- supervision

    async def _supervise(self) -> None:
        backoff = BACKOFF_FIRST
        while not self.destroyed:
            if not self.want_running:
                if self.state != "stopped" and not self.destroyed:
                    self._set_state("stopped")
                self._changed.clear()
                await self._changed.wait()
                continue
            self._changed.clear()
            try:
                await self._spawn()
            except (OSError, subprocess.SubprocessError) as e:
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                log.error("instance %s: cannot start %s: %s", self.id, self.app.command[0], why)
                self.restarts += 1
                self.metrics.restarts.labels(self.app.name).inc()
                self._set_state("created")
                backoff = await self._backoff(backoff)
                continue
            assert self.proc is not None
            exited = asyncio.ensure_future(self.proc.wait())
            stopped = False
            while True:
                wanted = asyncio.ensure_future(self._changed.wait())
                await asyncio.wait({exited, wanted}, return_when=asyncio.FIRST_COMPLETED)
                wanted.cancel()
                if exited.done():
                    break
                self._changed.clear()
                if not self.want_running:  # a stop (or destroy) was asked for
                    await self._terminate()
                    self._stop_checks()
                    stopped = True
                    break
            if stopped:
                continue
            # the process exited on its own
            code = self.proc.returncode
            self._stop_checks()
            self.exit_codes = ([*self.exit_codes, code if code is not None else -1])[-10:]
            self._kill_group()
            uptime = time.monotonic() - self.started_at
            if uptime >= STABLE_AFTER:
                backoff = BACKOFF_FIRST
            self.restarts += 1
            self.metrics.restarts.labels(self.app.name).inc()
            log.warning(
                "instance %s exited with %s after %.1f s; restarting in %.1f s",
                self.id,
                code,
                uptime,
                backoff,
            )
            self._set_state("created")
            backoff = await self._backoff(backoff)

    async def _backoff(self, delay: float) -> float:
        """Wait ``delay`` (cut short when a stop is asked for); the next delay."""
        self._changed.clear()
        try:
            async with asyncio.timeout(delay):
                await self._changed.wait()
        except TimeoutError:
            pass
        return min(delay * 2, BACKOFF_MAX)

    async def _spawn(self) -> None:
        self.config.logs_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(self.app.env)
        env.update(
            PORT=str(self.port),
            VD_APP=self.app.name,
            VD_INSTANCE=self.id,
            VD_REGION=self.config.region,
            VD_NODE=self.config.node,
            VD_PRIMARY_REGION=self.app.primary_region,
        )
        with open(self.config.logs_dir / f"{self.id}.log", "ab") as logfile:
            logfile.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {self.app.command}\n".encode())
            logfile.flush()
            self.proc = await asyncio.create_subprocess_exec(
                *self.app.command,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                env=env,
                process_group=0,  # its own group: a stop reaches whatever it spawned
                preexec_fn=_die_with_parent(os.getpid()),
            )
        self.started_at = time.monotonic()
        self.last_active = self.started_at
        self.checks = {c.name: ("warning", "starting") for c in self.app.checks}
        self._set_state("started")
        self.on_change(self)  # the checks, when the state was already started
        loop = asyncio.get_running_loop()
        self._check_tasks = [loop.create_task(self._check_loop(c)) for c in self.app.checks]

    async def _terminate(self) -> None:
        """SIGTERM to the group, SIGKILL after ``stop_timeout``; waits for the process."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            self._kill_group()
            return
        self._set_state("stopping")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            async with asyncio.timeout(self.config.stop_timeout):
                await proc.wait()
        except TimeoutError:
            log.warning("instance %s ignored SIGTERM for %g s: killing it", self.id, self.config.stop_timeout)
        self._kill_group()
        await proc.wait()

    def _kill_group(self) -> None:
        """SIGKILL whatever is left in the instance's process group (its own children)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def _not_running(self) -> dict[str, tuple[str, str]]:
        return {c.name: ("critical", "not running") for c in self.app.checks}

    def _stop_checks(self) -> None:
        for t in self._check_tasks:
            t.cancel()
        self._check_tasks = []
        self.checks = self._not_running()
        self.on_change(self)

    # ---------------------------------------------------------------------------------- checks

    async def _check_loop(self, spec: CheckSpec) -> None:
        passed_once = False
        while True:
            t0 = time.monotonic()
            ok, output = await probes.probe(
                spec.type, self.config.instance_host, self.port, spec.path, spec.timeout
            )
            self.metrics.check_seconds.labels(self.app.name, spec.name).observe(time.monotonic() - t0)
            if ok:
                status, passed_once = "passing", True
            elif time.monotonic() - self.started_at < spec.grace_period:
                status = "warning"
            else:
                status = "critical"
            self.metrics.checks.labels(self.app.name, spec.name, status).inc()
            if self.checks.get(spec.name) != (status, output) and self.state == "started":
                if self.checks.get(spec.name, ("",))[0] != status:
                    log.info("instance %s: check %s %s (%s)", self.id, spec.name, status, output)
                self.checks[spec.name] = (status, output)
                self.on_change(self)
            fast = not passed_once and time.monotonic() - self.started_at < FAST_PROBE_FOR
            await asyncio.sleep(min(spec.interval, FAST_PROBE) if fast else spec.interval)


__all__ = ["Instance", "now_ms"]
