"""The proxy's worker watchdog: stack dumps of a stuck worker, restart backoff, fault injection.

Worker side (:func:`install_stack_dumps`, called by ``worker_main`` before anything else):

- ``faulthandler.register(SIGUSR1, file=<stack file>, all_threads=True)``: on SIGUSR1 the C signal
  handler writes the Python stack of every thread, with no need of the GIL or of the event loop;
- a daemon thread waits (``sigwait``) for SIGUSR2 (blocked in every other thread) and writes the stack of
  every asyncio task of the worker's loop (``Task.print_stack``), then :data:`END_MARKER`. The loop is
  stuck when this is asked, so the tasks are read from another thread without it: **best effort** (a task
  may be mid-step; a main thread that holds the GIL in C code keeps this thread from running at all — the
  faulthandler part still works then).

The stack file is ``<stack_dir>/worker-<pid>.live``; it starts with a header naming the main thread's id,
so the supervisor can pick the main thread's stack (the stall cause) out of faulthandler's output.

Supervisor side: :func:`collect_stacks` (signals, bounded wait), :func:`stall_cause`, :func:`keep_stacks`
(renames the file and keeps the last :data:`STACK_KEEP`), :class:`Backoff` (crash-loop restart delays),
:class:`WatchdogStats` (what ``/metrics`` shows).

Fault injection (``[proxy] fault_injection = true`` only; never on by default): the control ops
``stall`` (``time.sleep`` on the worker's event loop) and ``crash`` (exit at once with status
:data:`FAULT_EXIT`), see :func:`fault_handlers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TextIO

DUMP_THREADS: Final = signal.SIGUSR1
DUMP_TASKS: Final = signal.SIGUSR2
END_MARKER: Final = "--- end of asyncio tasks ---"
STACK_KEEP: Final = 20
"""Stack files kept in ``stack_dir`` (the newest); older ones are deleted."""
DUMP_WAIT: Final = 0.25
"""Longest wait, in seconds, for a stuck worker's stacks before it is killed."""
MAX_STACK_READ: Final = 256 * 1024
FAULT_EXIT: Final = 3
"""Exit status of a worker crashed by fault injection (1 would mean "cannot listen": stop the proxy)."""
MAX_CAUSES: Final = 50
"""Distinct stall causes counted by name in metrics; later ones count as ``other``."""
DETECTION_BUCKETS: Final = (0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)

BACKOFF_MIN: Final = 0.1
BACKOFF_MAX: Final = 10.0
BACKOFF_WINDOW: Final = 60.0
"""A failure of a slot within this many seconds of its previous one continues its streak."""


def live_stack_path(stack_dir: str, pid: int) -> Path:
    return Path(stack_dir) / f"worker-{pid}.live"


# ------------------------------------------------------------------------------------------------ worker side


class StackDumps:
    """A worker's stack dump machinery (see the module docstring). ``loop`` is set once it runs."""

    def __init__(self, path: Path, index: int) -> None:
        self.path = path
        self.loop: asyncio.AbstractEventLoop | None = None
        self.file: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115 - kept for the process's life
        main = threading.main_thread().ident or 0
        self.file.write(f"# verdigris proxy worker={index} pid={os.getpid()} main_thread=0x{main:016x}\n")
        self.file.flush()
        faulthandler.register(DUMP_THREADS, file=self.file, all_threads=True, chain=False)
        # blocked here before any other thread exists: every thread inherits it, the dumper waits for it
        signal.pthread_sigmask(signal.SIG_BLOCK, {DUMP_TASKS})
        self.thread = threading.Thread(target=self._serve, name="verdigris-stack-dumper", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            signal.sigwait({DUMP_TASKS})
            try:
                self.dump_tasks()
            except Exception as e:  # best effort: never kill the process over a dump
                with contextlib.suppress(Exception):
                    self.file.write(f"(asyncio task dump failed: {type(e).__name__}: {e})\n{END_MARKER}\n")
                    self.file.flush()

    def dump_tasks(self) -> None:
        f, loop = self.file, self.loop
        f.write("\n--- asyncio tasks (read from another thread while the loop is stuck: best effort) ---\n")
        if loop is None:
            f.write("(no event loop yet)\n")
        else:
            current = asyncio.current_task(loop)
            tasks = asyncio.all_tasks(loop)
            f.write(f"{len(tasks)} tasks\n")
            for task in sorted(tasks, key=lambda t: t is not current):
                f.write(f"\n{'RUNNING (the loop is stuck in it) ' if task is current else ''}{task!r}\n")
                task.print_stack(limit=30, file=f)
        f.write(END_MARKER + "\n")
        f.flush()


def install_stack_dumps(stack_dir: str, index: int) -> StackDumps | None:
    """Set up this worker's stack dumps (before any thread starts); ``None`` (logged) if impossible."""
    import logging

    try:
        return StackDumps(live_stack_path(stack_dir, os.getpid()), index)
    except (OSError, ValueError, RuntimeError) as e:
        logging.getLogger("verdigris.proxy").error("cannot set up stack dumps in %s: %s", stack_dir, e)
        return None


def fault_stall(args: Mapping[str, Any]) -> dict[str, Any]:
    """Fault injection: block the event loop (this runs on it) for ``seconds``."""
    seconds = float(args.get("seconds", 5.0))
    time.sleep(max(0.0, min(seconds, 600.0)))
    return {"stalled": seconds}


def fault_crash(args: Mapping[str, Any]) -> None:
    """Fault injection: exit at once, as a crash."""
    os._exit(FAULT_EXIT)


def fault_handlers() -> dict[str, Callable[[Mapping[str, Any]], Any]]:
    return {"stall": fault_stall, "crash": fault_crash}


# ------------------------------------------------------------------------------------------------ supervisor side


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _tail_has_marker(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            return END_MARKER.encode() in f.read()
    except OSError:
        return False


async def collect_stacks(pid: int, path: Path, wait: float = DUMP_WAIT) -> str:
    """Ask worker ``pid`` for its stacks (SIGUSR1: threads; then SIGUSR2: asyncio tasks) and wait at most
    ``wait`` seconds for them. Returns ``complete``, ``threads`` (no task dump in time), ``none``."""
    deadline = time.monotonic() + wait
    start = _file_size(path)
    if start < 0:
        return "none"
    try:
        os.kill(pid, DUMP_THREADS)
    except OSError:
        return "none"
    # faulthandler writes from the signal handler: wait until the file grows (polled, bounded)
    while _file_size(path) <= start and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    threads = _file_size(path) > start
    try:
        os.kill(pid, DUMP_TASKS)
    except OSError:
        return "threads" if threads else "none"
    while time.monotonic() < deadline:
        if _tail_has_marker(path):
            return "complete" if threads else "tasks"
        await asyncio.sleep(0.005)
    return "threads" if threads else "none"


_HEADER = re.compile(r"main_thread=0x([0-9a-fA-F]+)")
_THREAD = re.compile(r"^(?:Current thread|Thread) 0x([0-9a-fA-F]+) \(most recent call first\):")
_FRAME = re.compile(r'^\s+File "([^"]*)", line (\d+) in (\S+)')


def read_stacks(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read(MAX_STACK_READ)
    except OSError:
        return ""


def stall_cause(text: str, lines: int = 3) -> tuple[str, list[str]]:
    """From a stack file: (the innermost frame of the main thread as ``file.py:function``, the main
    thread's first ``lines`` frames as printed). ``("unknown", [])`` without a main thread dump."""
    m = _HEADER.search(text)
    main = int(m.group(1), 16) if m else None
    frames: list[str] = []
    inside = False
    for line in text.splitlines():
        t = _THREAD.match(line)
        if t:
            if frames:
                break
            inside = main is None or int(t.group(1), 16) == main
            continue
        if inside:
            if not line.strip():
                inside = False
                continue
            if _FRAME.match(line):
                frames.append(line.strip())
    if not frames:
        return "unknown", []
    f = _FRAME.match("  " + frames[0])
    cause = f"{os.path.basename(f.group(1))}:{f.group(3)}" if f else "unknown"
    return cause, frames[:lines]


def keep_stacks(path: Path, index: int, pid: int, keep: int = STACK_KEEP) -> Path | None:
    """Rename a stuck worker's live stack file to a kept one and delete all but the newest ``keep``."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    kept = path.with_name(f"stuck-w{index}-pid{pid}-{stamp}.stacks")
    try:
        path.rename(kept)
    except OSError:
        return None
    prune(path.parent, keep)
    return kept


def prune(stack_dir: Path, keep: int = STACK_KEEP) -> int:
    """Delete all but the newest ``keep`` kept stack files, and live files of processes that are gone.
    Returns how many kept files remain."""
    files: list[tuple[float, Path]] = []
    with contextlib.suppress(OSError):
        for p in stack_dir.iterdir():
            if p.suffix == ".stacks":
                with contextlib.suppress(OSError):
                    files.append((p.stat().st_mtime, p))
            elif p.suffix == ".live" and p.stem.startswith("worker-"):
                with contextlib.suppress(ValueError, OSError):
                    if not _alive(int(p.stem[7:])):
                        p.unlink()
    files.sort(key=lambda x: (x[0], x[1].name))
    for _, p in files[:-keep] if keep > 0 else files:
        with contextlib.suppress(OSError):
            p.unlink()
    return min(len(files), keep)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Backoff:
    """Restart delays of one worker slot: a failure (death or replacement) within ``window`` seconds of
    the previous one continues a streak; the first failure of a streak restarts at once, then
    ``minimum`` seconds, doubling up to ``maximum``."""

    def __init__(
        self, minimum: float = BACKOFF_MIN, maximum: float = BACKOFF_MAX, window: float = BACKOFF_WINDOW
    ) -> None:
        self.minimum, self.maximum, self.window = minimum, maximum, window
        self.streak = 0
        self.last: float | None = None
        self.delay = 0.0

    def failure(self, now: float) -> float:
        """Record a failure at ``now``; the delay before the next start."""
        if self.last is not None and now - self.last < self.window:
            self.streak += 1
        else:
            self.streak = 1
        self.last = now
        self.delay = 0.0 if self.streak <= 1 else min(self.maximum, self.minimum * 2 ** (self.streak - 2))
        return self.delay


@dataclass
class WatchdogStats:
    """The supervisor's watchdog counters, for ``/metrics``."""

    restarts: dict[str, int] = field(
        default_factory=lambda: {"probe_timeout": 0, "startup_timeout": 0, "exited": 0}
    )
    detection: list[int] = field(default_factory=lambda: [0] * (len(DETECTION_BUCKETS) + 1))
    detection_sum: float = 0.0
    last_detection: float | None = None
    causes: dict[str, int] = field(default_factory=dict)
    dumps: dict[str, int] = field(
        default_factory=lambda: {"complete": 0, "threads": 0, "tasks": 0, "none": 0}
    )
    stack_files: int = 0

    def stuck(self, reason: str, detection: float, cause: str, dump: str) -> None:
        from bisect import bisect_left

        self.restarts[reason] = self.restarts.get(reason, 0) + 1
        self.detection[bisect_left(DETECTION_BUCKETS, detection)] += 1
        self.detection_sum += detection
        self.last_detection = detection
        if cause not in self.causes and len(self.causes) >= MAX_CAUSES:
            cause = "other"
        self.causes[cause] = self.causes.get(cause, 0) + 1
        self.dumps[dump] = self.dumps.get(dump, 0) + 1


__all__ = [
    "DETECTION_BUCKETS",
    "END_MARKER",
    "FAULT_EXIT",
    "STACK_KEEP",
    "Backoff",
    "StackDumps",
    "WatchdogStats",
    "collect_stacks",
    "fault_handlers",
    "install_stack_dumps",
    "keep_stacks",
    "live_stack_path",
    "prune",
    "read_stacks",
    "stall_cause",
]
