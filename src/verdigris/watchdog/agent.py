"""The agent's in-process watchdog: probes of the event loop and of the apply path, stack dumps, re-exec.

An agent is one process, so its watchdog is a thread in it (no extra process: ``kill -9 <agent pid>`` still
kills the agent, and nothing else changes for whoever runs it). Every ``probe-interval`` it sends two probes,
one at a time each:

* **loop**: ``loop.call_soon_threadsafe`` of a callback that does real work on the loop (``loop_work``: the
  agent counts its subscriptions through the subscription manager's lock, as the API does) and records when
  it ran. The loop must run one at least every ``loop-deadline`` (1 s).
* **apply**: a job on the writer thread, submitted to the same executor as gossip merges and API
  transactions (:class:`~verdigris.api.threads.StoreThreads`), that runs a real transaction on the write
  connection (``apply_work``). One must finish at least every ``apply-deadline``: 10 s by default, because the job
  queues behind the writes before it and a legitimate large merge batch holds the writer for seconds; a
  tighter deadline would restart a healthy agent that is catching up.

A deadline counts from the path's last sign of life (the previous probe's run), not from the probe's
send: a stall that begins just after a probe answered is then detected ``deadline`` after it began, not up
to ``probe-interval`` later.

The lag of each probe (sent → ran) is kept for ``/metrics``; a probe still in flight counts with its age, so
a stuck writer shows on ``verdigris_apply_lag_seconds`` while the loop still serves scrapes.

A missed deadline: the stacks of every thread (``faulthandler.dump_traceback``) and of every asyncio task of
the loop (``asyncio.all_tasks`` read from this thread while the loop is stuck: best effort) go to a file in
``stack-dir`` (the newest :data:`~verdigris.proxy.watchdog.STACK_KEEP` are kept), one structured log event is
written, and then:

* ``restart = true`` (the default) and a process that is the agent (:func:`verdigris.agent.serve`): after the
  crash-loop backoff (:class:`~verdigris.proxy.watchdog.Backoff`: the first restart of a streak at once, then
  0.1 s doubling to 10 s while restarts come within 60 s of each other) the process re-executes its own
  command line (``os.execv`` of ``sys.executable`` with ``sys.orig_argv``). The pid stays; listening sockets
  and SQLite's files are close-on-exec, stdout and stderr are kept. The counters, the backoff streak and the
  last cause ride across in the environment variable :data:`STATE_ENV`. Event: ``watchdog_restart``; the
  new incarnation logs ``watchdog_resumed`` with the time from the detection to its listeners being up.
  The event is logged from a helper thread waited for at most :data:`LOG_WAIT`: a stalled thread may hold a
  log handler's lock, and the restart must not wait on it.
* otherwise (``restart = false``, or an agent embedded in another process such as a test, which must never
  re-exec its host): only the event ``watchdog_stall`` and the metrics; when the probe finally answers,
  ``watchdog_recovered`` is logged.

If this thread itself wakes up far later than it asked to (the process was suspended, e.g. SIGSTOP, or
starved of CPU), the deadlines of the probes in flight start again: only a stall seen by a watchdog that
was itself running on time counts. Limit: a loop thread that holds the GIL without releasing it (a long
C call that does not drop it) keeps this thread from running at all, so such a stall is not detected.

Fault injection (``[watchdog] fault-injection = true`` only): :func:`stall_event_loop` and
:func:`stall_apply_path`, behind the admin socket's ``fault stall-loop <seconds>`` / ``fault stall-apply
<seconds>``.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import copy
import dataclasses
import faulthandler
import json
import logging
import math
import os
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TextIO

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from verdigris.config import WatchdogConfig
from verdigris.proxy.watchdog import DETECTION_BUCKETS, MAX_CAUSES, STACK_KEEP, Backoff, prune, stall_cause

__all__ = [
    "CAUSES",
    "MAX_FAULT_SECONDS",
    "STATE_ENV",
    "AgentWatchdog",
    "CarriedState",
    "FaultInjectionOff",
    "WatchdogCollector",
    "default_stack_dir",
    "fault_seconds",
    "stall_apply_path",
    "stall_event_loop",
]

log = logging.getLogger("verdigris.watchdog.agent")

Cause = Literal["loop", "apply"]
CAUSES: Final[tuple[Cause, ...]] = ("loop", "apply")
STATE_ENV: Final = "VERDIGRIS_AGENT_WATCHDOG"
"""The environment variable that carries the watchdog's counters across a re-exec (JSON)."""
MAX_FAULT_SECONDS: Final = 600.0
LATE_WAKE_MIN: Final = 0.25
"""This thread waking later than this (or half a deadline, if more) means the process was suspended or
starved, not that a probe was stuck: the deadlines restart instead."""
JOIN_TIMEOUT: Final = 2.0


def default_stack_dir() -> Path:
    """``verdigris-agent-stacks-<uid>`` in the system's temporary directory."""
    return Path(tempfile.gettempdir()) / f"verdigris-agent-stacks-{os.getuid()}"


# ------------------------------------------------------------------------------------------ carried state


@dataclass
class CarriedState:
    """What one incarnation of the agent hands to the next across ``os.execv`` (:data:`STATE_ENV`)."""

    restarts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CAUSES, 0))
    timeouts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CAUSES, 0))
    detections: list[int] = field(default_factory=lambda: [0] * (len(DETECTION_BUCKETS) + 1))
    """Detection times counted per bucket of :data:`~verdigris.proxy.watchdog.DETECTION_BUCKETS` (the last
    one: above them all), as the proxy's supervisor counts its workers'."""
    detection_sum: float = 0.0
    stalled_in: dict[str, int] = field(default_factory=dict)
    """Missed deadlines by the stalled thread's innermost frame (``file.py:function``); at most
    :data:`~verdigris.proxy.watchdog.MAX_CAUSES` names, later ones count as ``other``."""
    last_cause: str | None = None
    last_detection: float | None = None
    last_stack_file: str | None = None
    streak: int = 0
    last_failure: float | None = None
    """``time.monotonic()`` of the last restart: CLOCK_MONOTONIC is system-wide, so it survives exec."""
    restart_detected_at: float | None = None
    """Wall-clock time of the detection that caused the re-exec under way; the new incarnation reports how
    long after it it serves again, then clears it."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> CarriedState:
        """Parse :meth:`to_json`'s output; ``ValueError`` for anything else."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        state = cls()
        for name in ("restarts", "timeouts"):
            counts = doc.get(name, {})
            if not isinstance(counts, dict) or not all(
                c in CAUSES and isinstance(n, int) and n >= 0 for c, n in counts.items()
            ):
                raise ValueError(f"{name}: expected counts by cause")
            getattr(state, name).update(counts)
        frames = doc.get("stalled_in", {})
        if not isinstance(frames, dict) or not all(
            isinstance(f, str) and isinstance(n, int) and n >= 0 for f, n in frames.items()
        ):
            raise ValueError("stalled_in: expected counts by frame")
        state.stalled_in = dict(list(frames.items())[:MAX_CAUSES])
        detections = doc.get("detections", state.detections)
        if (
            not isinstance(detections, list)
            or len(detections) != len(state.detections)
            or not all(isinstance(n, int) and n >= 0 for n in detections)
        ):
            raise ValueError("detections: expected counts per bucket")
        state.detections = detections
        state.detection_sum = _optional(doc, "detection_sum", float) or 0.0
        state.last_cause = _optional(doc, "last_cause", str)
        state.last_detection = _optional(doc, "last_detection", float)
        state.last_stack_file = _optional(doc, "last_stack_file", str)
        state.last_failure = _optional(doc, "last_failure", float)
        state.restart_detected_at = _optional(doc, "restart_detected_at", float)
        streak = doc.get("streak", 0)
        if not isinstance(streak, int) or streak < 0:
            raise ValueError("streak: expected a count")
        state.streak = streak
        return state

    @classmethod
    def take_from_environment(cls) -> CarriedState:
        """The state a previous incarnation left in :data:`STATE_ENV` (removed, so it is read once), or a
        fresh one; a malformed value is logged and ignored."""
        raw = os.environ.pop(STATE_ENV, None)
        if raw is None:
            return cls()
        try:
            return cls.from_json(raw)
        except ValueError as e:
            log.warning("ignoring %s from the environment: %s", STATE_ENV, e)
            return cls()


def _optional(doc: Mapping[str, Any], key: str, kind: type[str] | type[float]) -> Any:
    value = doc.get(key)
    if value is None:
        return None
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    raise ValueError(f"{key}: wrong type")


# ------------------------------------------------------------------------------------------ fault injection


class FaultInjectionOff(RuntimeError):
    """A stall was asked for while ``[watchdog] fault-injection`` is off."""


def fault_seconds(command: Mapping[str, Any]) -> float:
    """The ``seconds`` of a stall command; ``ValueError`` with a clear message for bad input."""
    raw = command.get("seconds")
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        raise ValueError(f'fault {command.get("action")} needs "seconds", a number (got {raw!r})')
    if not 0 < raw <= MAX_FAULT_SECONDS:
        raise ValueError(f"fault seconds must be more than 0 and at most {MAX_FAULT_SECONDS:g} (got {raw:g})")
    return float(raw)


def stall_event_loop(seconds: float) -> None:
    """Fault injection: block the calling thread, the event loop's, for ``seconds`` (its name is what the
    stack file shows)."""
    time.sleep(seconds)  # a blocking wait in C: the innermost Python frame is this function


def stall_apply_path(seconds: float) -> None:
    """Fault injection: block the writer thread (this runs there) for ``seconds``."""
    time.sleep(seconds)  # a blocking wait in C: the innermost Python frame is this function


# ------------------------------------------------------------------------------------------ the watchdog


@dataclass
class _Probe:
    sent: float
    deadline_from: float
    """When the previous probe of the same path ran (its last sign of life; ``sent`` for the first one), or
    later when the deadline restarted after a late wake of the watchdog thread."""
    ran_at: float | None = None
    ran_on: int | None = None
    """The ident of the thread the probe ran on (the loop's or the writer's)."""
    reported: bool = False


class AgentWatchdog:
    """The watchdog thread of one agent (see the module docstring).

    ``loop_work`` runs on ``loop`` for every loop probe; ``apply_work`` runs on ``writer`` (the agent's
    one writer thread) for every apply probe. ``may_exec``: this process is the agent, so a restart may
    re-execute it; otherwise a stall is only reported whatever ``config.restart`` says.
    """

    def __init__(
        self,
        config: WatchdogConfig,
        *,
        loop: asyncio.AbstractEventLoop,
        writer: Executor,
        loop_work: Callable[[], object],
        apply_work: Callable[[], object],
        may_exec: bool = False,
        carried: CarriedState | None = None,
    ) -> None:
        self.config = config
        self.loop = loop
        self.writer = writer
        self.loop_work = loop_work
        self.apply_work = apply_work
        self.may_exec = may_exec and bool(sys.executable) and bool(sys.orig_argv)
        self.argv = list(sys.orig_argv)
        self.state = carried or CarriedState()
        self.stack_dir = config.stack_dir or default_stack_dir()
        self.deadlines: dict[Cause, float] = {"loop": config.loop_deadline, "apply": config.apply_deadline}
        self.backoff = Backoff()
        self.backoff.streak, self.backoff.last = self.state.streak, self.state.last_failure
        self._lock = threading.Lock()  # guards the figures below, read by scrapes on the loop
        self._lag: dict[Cause, float] = dict.fromkeys(CAUSES, 0.0)
        self._max_lag: dict[Cause, float] = dict.fromkeys(CAUSES, 0.0)
        self._probes: dict[Cause, int] = dict.fromkeys(CAUSES, 0)
        self._inflight: dict[Cause, _Probe | None] = dict.fromkeys(CAUSES)
        self._alive_at: dict[Cause, float | None] = dict.fromkeys(CAUSES)
        """When each path last ran a probe: the next probe's deadline counts from there."""
        self._threads: dict[Cause, int | None] = dict.fromkeys(CAUSES)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # --------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the watchdog is already running")
        self._thread = threading.Thread(target=self._run, name="vd-watchdog", daemon=True)
        self._thread.start()
        log.info(
            "watchdog: probing the event loop (deadline %gs) and the apply path (deadline %gs) every %gs; "
            "on a stall: %s",
            self.config.loop_deadline,
            self.config.apply_deadline,
            self.config.probe_interval,
            "restart" if self.restart_enabled else "report only",
        )
        detected_at, self.state.restart_detected_at = self.state.restart_detected_at, None
        if detected_at is not None:  # this incarnation is a restart: the agent serves again (it started)
            log.warning(
                "watchdog_resumed component=agent cause=%s serving_again=%.3fs (after the detection) restarts=%d",
                self.state.last_cause,
                time.time() - detected_at,
                sum(self.state.restarts.values()),
            )

    def stop(self) -> None:
        """Stop probing (before the agent shuts down, so a slow shutdown is never taken for a stall)."""
        self._stopping.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(JOIN_TIMEOUT)

    @property
    def restart_enabled(self) -> bool:
        return self.config.restart and self.may_exec

    # --------------------------------------------------------------------------------- probing

    def _run(self) -> None:
        interval = self.config.probe_interval
        next_send: dict[Cause, float] = dict.fromkeys(CAUSES, time.monotonic())
        wake_at = time.monotonic()
        while not self._stopping.is_set():
            now = time.monotonic()
            late = now - wake_at
            if late > max(LATE_WAKE_MIN, min(self.deadlines.values()) / 2):
                # suspended or starved: what the probes saw in the meantime says nothing about the loop
                _bounded(
                    log.info,
                    "watchdog: woke %.3fs late (process suspended or starved); deadlines restart",
                    late,
                )
                for probe in self._inflight.values():
                    if probe is not None:
                        probe.deadline_from = now
                for cause in CAUSES:
                    if self._alive_at[cause] is not None:
                        self._alive_at[cause] = now
            for cause in CAUSES:
                probe = self._inflight[cause]
                if probe is not None and probe.ran_at is not None:
                    self._alive_at[cause] = probe.ran_at
                    self._finished(cause, probe)
                    self._inflight[cause] = probe = None
                    next_send[cause] = max(next_send[cause], now)
                if probe is None and now >= next_send[cause]:
                    self._send(cause, now)
                    next_send[cause] = now + interval
                elif (
                    probe is not None
                    and not probe.reported
                    and now - probe.deadline_from >= self.deadlines[cause]
                ):
                    probe.reported = True
                    self._missed(cause, probe, now)
                    if self._stopping.is_set():
                        return
            wake_at = min(
                [next_send[c] for c in CAUSES if self._inflight[c] is None]
                + [
                    p.deadline_from + self.deadlines[c]
                    for c, p in self._inflight.items()
                    if p is not None and not p.reported
                ]
                + [now + interval]
            )
            self._wake.wait(max(0.0, wake_at - time.monotonic()))
            self._wake.clear()

    def _send(self, cause: Cause, now: float) -> None:
        alive_at = self._alive_at[cause]
        probe = _Probe(sent=now, deadline_from=now if alive_at is None else min(alive_at, now))
        self._inflight[cause] = probe
        if cause == "loop":
            try:
                self.loop.call_soon_threadsafe(self._loop_probe, probe)
            except RuntimeError:  # the loop is closed: the agent is gone
                self._stopping.set()
        else:
            try:
                future = self.writer.submit(self._apply_probe, probe)
            except RuntimeError:  # the writer is shut down: the agent is stopping
                self._stopping.set()
                return
            future.add_done_callback(self._apply_done)

    def _loop_probe(self, probe: _Probe) -> None:
        """Runs on the event loop."""
        try:
            self.loop_work()
        finally:
            probe.ran_on = threading.get_ident()
            probe.ran_at = time.monotonic()
            self._wake.set()

    def _apply_probe(self, probe: _Probe) -> None:
        """Runs on the writer thread."""
        probe.ran_on = threading.get_ident()
        try:
            self.apply_work()
        finally:
            probe.ran_at = time.monotonic()
            self._wake.set()

    def _apply_done(self, future: Future[None]) -> None:
        if not future.cancelled() and (error := future.exception()) is not None:
            log.warning("watchdog: the apply probe failed: %s: %s", type(error).__name__, error)

    def _finished(self, cause: Cause, probe: _Probe) -> None:
        assert probe.ran_at is not None
        lag = probe.ran_at - probe.sent
        with self._lock:
            self._lag[cause] = lag
            self._max_lag[cause] = max(self._max_lag[cause], lag)
            self._probes[cause] += 1
            self._threads[cause] = probe.ran_on
        if probe.reported:
            log.warning(
                "watchdog_recovered component=agent cause=%s stalled=%.3fs (the %s answered again)",
                cause,
                lag,
                "event loop" if cause == "loop" else "apply path",
            )

    # --------------------------------------------------------------------------------- a stall

    def _missed(self, cause: Cause, probe: _Probe, now: float) -> None:
        detection = now - probe.deadline_from  # from the last sign of life: at least the stall's duration
        detected_at = time.time()
        with self._lock:
            self.state.timeouts[cause] += 1
            self.state.last_cause = cause
            self.state.last_detection = detection
            self.state.detections[bisect.bisect_left(DETECTION_BUCKETS, detection)] += 1
            self.state.detection_sum += detection
        stack_file = self._dump_stacks(cause, detection)
        dump_seconds = time.monotonic() - now
        stack_text = _read(stack_file) if stack_file is not None else ""
        stalled_in, frames = stall_cause(stack_text)
        with self._lock:
            self.state.last_stack_file = str(stack_file) if stack_file is not None else None
            counts = self.state.stalled_in
            name = stalled_in if stalled_in in counts or len(counts) < MAX_CAUSES else "other"
            counts[name] = counts.get(name, 0) + 1
        restart = self.restart_enabled and not self._stopping.is_set()
        delay = 0.0
        if restart:
            delay = self.backoff.failure(time.monotonic())
            with self._lock:
                self.state.restarts[cause] += 1
                self.state.streak, self.state.last_failure = self.backoff.streak, self.backoff.last
        _bounded(
            log.error,
            "%s component=agent cause=%s detection=%.3fs deadline=%gs detected_at=%.3f dump=%.3fs stacks=%s "
            "stalled_in=%s main_stack=%s restarts=%d backoff=%.3fs%s",
            "watchdog_restart" if restart else "watchdog_stall",
            cause,
            detection,
            self.deadlines[cause],
            detected_at,
            dump_seconds,
            json.dumps(str(stack_file) if stack_file is not None else None),
            json.dumps(stalled_in),
            json.dumps(" | ".join(frames)),
            sum(self.state.restarts.values()),
            delay,
            "" if restart else f" action=report ({self._why_no_restart()})",
        )
        if restart:
            self.state.restart_detected_at = detected_at
            self._reexec(delay)

    def _why_no_restart(self) -> str:
        if self._stopping.is_set():
            return "the agent is stopping"
        if not self.config.restart:
            return "watchdog.restart = false"
        return "embedded agent: the process is not the agent's own"

    def _dump_stacks(self, cause: Cause, detection: float) -> Path | None:
        """Every thread's stack and every asyncio task's, in a new file in ``stack_dir``; ``None`` (logged)
        when the file cannot be written."""
        try:
            _private_dir(self.stack_dir)
            stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
            path = (
                self.stack_dir / f"agent-pid{os.getpid()}-{stamp}-{time.time_ns() % 10**9:09d}-{cause}.stacks"
            )
            # stall_cause() reads the stalled thread's stack: the one named main_thread in the header
            stalled = self._threads[cause] or threading.main_thread().ident or 0
            with open(path, "w", encoding="utf-8") as f:
                f.write(
                    f"# verdigris agent pid={os.getpid()} cause={cause} detection={detection:.3f}s "
                    f"main_thread=0x{stalled:016x} (the {'event loop' if cause == 'loop' else 'writer'} thread)\n"
                )
                f.flush()
                faulthandler.dump_traceback(f, all_threads=True)
                _dump_tasks(self.loop, f)
            prune(self.stack_dir, STACK_KEEP)
            return path
        except OSError as e:
            _bounded(log.error, "watchdog: cannot write the stack file in %s: %s", self.stack_dir, e)
            return None

    def _reexec(self, delay: float) -> None:
        """Wait out the backoff, then replace this process with a fresh agent (same pid, same argv)."""
        if delay > 0:
            time.sleep(delay)  # the backoff itself: nothing to wait for but time
        os.environ[STATE_ENV] = self.state.to_json()
        _bounded(_flush_output)
        try:
            os.execv(sys.executable, self.argv)
        except OSError as e:
            # Stuck and unable to restart: exit, so that a process supervisor starts a fresh agent.
            log.critical("watchdog: cannot re-execute %s: %s; exiting", sys.executable, e)
            os._exit(70)

    # --------------------------------------------------------------------------------- reporting

    def lag(self, cause: Cause) -> float:
        """The last probe's lag, or the age of the probe in flight when larger."""
        probe = self._inflight[cause]
        with self._lock:
            lag = self._lag[cause]
        if probe is not None and probe.ran_at is None:
            lag = max(lag, time.monotonic() - probe.sent)
        return lag

    def info(self) -> dict[str, Any]:
        """The watchdog's state, for the admin socket's ``ping`` and ``status``."""
        lags = {cause: self.lag(cause) for cause in CAUSES}
        with self._lock:
            state = self.state
            return {
                "enabled": True,
                "restart": self.restart_enabled,
                "probe_interval": self.config.probe_interval,
                "loop_deadline": self.config.loop_deadline,
                "apply_deadline": self.config.apply_deadline,
                "restarts": dict(state.restarts),
                "probe_timeouts": dict(state.timeouts),
                "stalled_in": dict(state.stalled_in),
                "probes": dict(self._probes),
                "max_lag": dict(self._max_lag),
                "last_cause": state.last_cause,
                "last_detection": state.last_detection,
                "last_stack_file": state.last_stack_file,
                "stack_dir": str(self.stack_dir),
                "lag": lags,
            }

    def snapshot(self) -> CarriedState:
        """A consistent copy of the counters."""
        with self._lock:
            return copy.deepcopy(self.state)


class WatchdogCollector:
    """The watchdog's figures on the agent's Prometheus registry, read at every scrape."""

    def __init__(self, watchdog: AgentWatchdog) -> None:
        self.watchdog = watchdog

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(self)

    def collect(self) -> Iterable[Metric]:
        w = self.watchdog
        state = w.snapshot()
        restarts_metric = CounterMetricFamily(
            "verdigris_watchdog_restarts",
            "Restarts by the watchdog, by stalled component and cause (carried across the agent's re-exec).",
            labels=["component", "cause"],
        )
        timeouts_metric = CounterMetricFamily(
            "verdigris_watchdog_probe_timeouts",
            "Watchdog probes that missed their deadline (restarted or, with restart off, only reported).",
            labels=["component", "cause"],
        )
        for cause in CAUSES:
            restarts_metric.add_metric(["agent", cause], state.restarts[cause])
            timeouts_metric.add_metric(["agent", cause], state.timeouts[cause])
        loop_lag = GaugeMetricFamily(
            "verdigris_loop_lag_seconds",
            "Event loop lag: the last watchdog probe's wait to run on the loop (or the age of the one in flight).",
            labels=["component"],
        )
        loop_lag.add_metric(["agent"], w.lag("loop"))
        apply_lag = GaugeMetricFamily(
            "verdigris_apply_lag_seconds",
            "Apply path lag: the last watchdog probe's time to run a transaction on the writer thread, "
            "queued behind merges and writes (or the age of the one in flight).",
            value=w.lag("apply"),
        )
        detection = GaugeMetricFamily(
            "verdigris_watchdog_last_detection_seconds",
            "Time from the stalled path's last sign of life to the watchdog noticing the stall (the last one).",
            labels=["component"],
        )
        if state.last_detection is not None:
            detection.add_metric(["agent"], state.last_detection)
        histogram = HistogramMetricFamily(
            "verdigris_watchdog_detection_seconds",
            "Detection times of missed deadlines: from the path's last sign of life to the watchdog noticing it "
            "(carried across the agent's re-exec).",
            labels=["component"],
        )
        cumulative, buckets = 0, []
        for bound, n in zip((*DETECTION_BUCKETS, float("inf")), state.detections, strict=True):
            cumulative += n
            buckets.append((f"{bound:g}" if bound != float("inf") else "+Inf", float(cumulative)))
        histogram.add_metric(["agent"], buckets, sum_value=state.detection_sum)
        frames = CounterMetricFamily(
            "verdigris_watchdog_stall_causes",
            "Missed deadlines by where the stalled thread was: its innermost frame, file.py:function "
            "(carried across the agent's re-exec).",
            labels=["component", "stalled_in"],
        )
        for frame, n in sorted(state.stalled_in.items()):
            frames.add_metric(["agent", frame], n)
        return [restarts_metric, timeouts_metric, frames, loop_lag, apply_lag, detection, histogram]


# ------------------------------------------------------------------------------------------ helpers


LOG_WAIT: Final = 1.0
"""Longest wait, in seconds, for logging or flushing before a restart goes on without it."""


def _bounded(fn: Callable[..., object], *args: object) -> None:
    """``fn(*args)`` on a helper thread, waited for at most :data:`LOG_WAIT`: the stalled thread may hold a
    logging handler's lock (e.g. blocked writing to a full stderr pipe), and the restart must not wait on
    it. A call still blocked when the process re-executes ends with it."""
    helper = threading.Thread(target=fn, args=args, name="vd-watchdog-log", daemon=True)
    helper.start()
    helper.join(LOG_WAIT)


def _flush_output() -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _private_dir(path: Path) -> None:
    """Create ``path`` (mode 0700) or check that it is a directory of ours, not a planted symlink."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise OSError(f"{path} is not a directory owned by this user")


def _dump_tasks(loop: asyncio.AbstractEventLoop, f: TextIO) -> None:
    """Every task of ``loop``, read from this thread while the loop may be stuck: best effort."""
    f.write("\n--- asyncio tasks (read from the watchdog thread while the loop is stuck: best effort) ---\n")
    try:
        current = asyncio.current_task(loop)
        tasks = sorted(asyncio.all_tasks(loop), key=lambda t: t is not current)
        f.write(f"{len(tasks)} tasks\n")
        for task in tasks:
            f.write(f"\n{'RUNNING (the loop is stuck in it) ' if task is current else ''}{task!r}\n")
            task.print_stack(limit=30, file=f)
    except Exception as e:  # a task changing under us must not cost the restart
        f.write(f"(asyncio task dump failed: {type(e).__name__}: {e})\n")
    f.write("--- end of asyncio tasks ---\n")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
