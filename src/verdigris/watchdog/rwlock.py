"""Read-write locks that refuse to deadlock on themselves.

Two locks with one behaviour: :class:`RWLock` for threads (the owner is the thread) and
:class:`AsyncRWLock` for asyncio tasks (the owner is the current task). Both let many readers or one
writer in, and both turn the two self-deadlocks an ordinary RW lock would hang on into an immediate error:

* **upgrade**: an owner that holds the read side asks for the write side. It would wait for every reader
  to leave, itself included, forever. :class:`LockUpgradeError` is raised at once; its message holds the
  stack where the read side was taken and the stack asking for the write side.
* **re-entrant write**: an owner that holds the write side asks for it again.
  :class:`LockReentryError`, with both stacks.

Other rules, chosen and documented:

* **Writer preference.** While a writer waits, new readers wait too, so a stream of readers cannot starve
  a writer. An owner that already holds the read side may take it again (a re-entrant read) even while a
  writer waits; refusing it would deadlock that owner against the waiting writer.
* **A read inside a write, by the same owner, is allowed** (the writer already has exclusive access, so a
  nested read cannot conflict with anything). It is released with its own ``with`` block; the write side
  stays held. Asking for the write side inside that nested read is a re-entrant write and raises.
* **Bounded waits.** ``read(timeout=...)`` / ``write(timeout=...)``, or the lock's default ``timeout``,
  bound every wait; on expiry :class:`LockTimeoutError` names the current holders with their stacks.
* **Hold limit.** With ``hold_limit`` seconds set, releasing a hold that lasted longer logs a warning with
  the holder's stack and counts it in ``slow_holds``. :meth:`RWLock.holders` lists the current holders
  (owner, mode, since when, stack) for a watchdog to report.
* **Cheap stacks.** Acquiring records ``(file, line, function)`` of up to ``stack_depth`` frames (a frame
  walk, about a microsecond or two); source lines are looked up only when an error or warning is
  formatted. The thread lock's read side, taken on hot paths (the proxy's routing), is cheaper still: it
  keeps a reference to the acquiring frame and its line, and walks the frames only when a stack is
  needed (an error, a warning, :meth:`RWLock.holders`) — while the hold lasts, the frames above the
  acquiring one are suspended in their calls, so the walk then gives the stack as it was (except for a
  generator holding the read side across a ``yield``: its callers are then those of the moment).

No list grows without bound: holders are one record per owner, and the only waiters are the threads or
tasks actually waiting. The thread lock is not for asyncio tasks (every task on a loop shares one
thread, so two tasks would be one owner); use :class:`AsyncRWLock` there.

:class:`PlainRWLock` is the naive readers-writer lock these locks replace (a reader count, no owners, no
timeout). It exists only to reproduce the fleet-wide lock-up on purpose (the proxy's ``[proxy]
table_lock = "plain"``, fault injection only): with it, a read→write upgrade waits forever.
:class:`SyncRWLock` is what both thread locks offer, for code that takes either.
"""

from __future__ import annotations

import asyncio
import contextlib
import linecache
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Literal, Protocol

log = logging.getLogger("verdigris.watchdog.rwlock")

Mode = Literal["read", "write"]
FrameSummary = tuple[str, int, str]
"""``(filename, line number, function name)`` of one frame, innermost last."""

_SKIP_FILES = frozenset({__file__, contextlib.__file__})
DEFAULT_STACK_DEPTH = 24


class LockError(RuntimeError):
    """Misuse of a :class:`RWLock` / :class:`AsyncRWLock` that would otherwise deadlock or corrupt it."""


class LockUpgradeError(LockError):
    """The owner holds the read side and asked for the write side (a read→write upgrade)."""


class LockReentryError(LockError):
    """The owner holds the write side and asked for it again."""


class LockTimeoutError(LockError, TimeoutError):
    """The lock could not be had within the timeout."""


def capture_stack(depth: int = DEFAULT_STACK_DEPTH) -> tuple[FrameSummary, ...]:
    """The caller's stack as ``(file, line, function)`` tuples, innermost last, skipping this module's and
    contextlib's frames. Cheap: no source lines are read."""
    frame: FrameType | None = sys._getframe(1)
    out: list[FrameSummary] = []
    while frame is not None and len(out) < depth:
        code = frame.f_code
        if code.co_filename not in _SKIP_FILES:
            out.append((code.co_filename, frame.f_lineno, code.co_name))
        frame = frame.f_back
    out.reverse()
    return tuple(out)


def format_stack(stack: tuple[FrameSummary, ...]) -> str:
    """Format a :func:`capture_stack` result like a traceback (source lines looked up now)."""
    lines = []
    for filename, lineno, name in stack:
        lines.append(f'  File "{filename}", line {lineno}, in {name}')
        src = linecache.getline(filename, lineno).strip()
        if src:
            lines.append(f"    {src}")
    return "\n".join(lines) if lines else "  <no stack>"


@dataclass(frozen=True, slots=True)
class Holder:
    """One owner's hold on a lock, as :meth:`RWLock.holders` reports it."""

    owner: str
    """Thread name and id, or task name."""
    mode: Mode
    since: float
    """``time.monotonic()`` when the hold began."""
    count: int
    """Nested holds of this owner (re-entrant reads, or reads nested in the write)."""
    stack: str
    """Where the hold began (formatted)."""

    def held_for(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.since


def _stack_from(frame: FrameType, line: int, depth: int) -> tuple[FrameSummary, ...]:
    """The stack from ``frame`` (at ``line``) outwards, as :func:`capture_stack` would have recorded it
    in ``frame``; its callers are read at their current lines (still in their calls while a hold lasts)."""
    out: list[FrameSummary] = []
    f: FrameType | None = frame
    while f is not None and len(out) < depth:
        code = f.f_code
        if code.co_filename not in _SKIP_FILES:
            out.append((code.co_filename, line if f is frame else f.f_lineno, code.co_name))
        f = f.f_back
    out.reverse()
    return tuple(out)


class _Hold:
    __slots__ = ("_depth", "_frame", "_line", "_owner", "_stack", "count", "nested_reads", "since")

    def __init__(
        self,
        owner: str | threading.Thread,
        stack: tuple[FrameSummary, ...] | None,
        frame: FrameType | None = None,
        depth: int = DEFAULT_STACK_DEPTH,
    ) -> None:
        self._owner = owner
        self._stack = stack
        # lazy stack (the thread lock's read side): the acquiring frame and its line, walked when needed
        self._frame = frame
        self._line = frame.f_lineno if frame is not None else 0
        self._depth = depth
        self.since = time.monotonic()
        self.count = 1
        self.nested_reads = 0

    @property
    def label(self) -> str:
        o = self._owner
        return o if isinstance(o, str) else f"thread {o.name} ({o.ident})"

    @property
    def stack(self) -> tuple[FrameSummary, ...]:
        if self._stack is None:
            self._stack = _stack_from(self._frame, self._line, self._depth) if self._frame else ()
            self._frame = None
        return self._stack


class _Book:
    """Holder bookkeeping shared by both locks; the caller provides mutual exclusion."""

    __slots__ = ("hold_limit", "name", "readers", "slow_holds", "waiting_writers", "writer", "writer_key")

    def __init__(self, name: str, hold_limit: float | None) -> None:
        self.name = name
        self.hold_limit = hold_limit
        self.readers: dict[object, _Hold] = {}
        self.writer: _Hold | None = None
        self.writer_key: object = None
        self.waiting_writers = 0
        self.slow_holds = 0

    # -- checks made before waiting: they raise instead of deadlocking

    def check_write(self, key: object, stack: tuple[FrameSummary, ...]) -> None:
        if self.writer is not None and self.writer_key == key:
            raise LockReentryError(
                f"lock {self.name!r}: {self.writer.label} asked for the write side while it already holds "
                f"it (a re-entrant write would deadlock).\n"
                f"Write side taken at:\n{format_stack(self.writer.stack)}\n"
                f"Asked again at:\n{format_stack(stack)}"
            )
        held = self.readers.get(key)
        if held is not None:
            raise LockUpgradeError(
                f"lock {self.name!r}: {held.label} asked for the write side while it holds the read side "
                f"(a read→write upgrade would deadlock). Release the read side first, and re-check what "
                f"you read once you hold the write side.\n"
                f"Read side taken at:\n{format_stack(held.stack)}\n"
                f"Write side asked at:\n{format_stack(stack)}"
            )

    def nested_read(self, key: object) -> bool:
        """Take a read the owner may have at once (inside its own write, or re-entrant). True if taken."""
        if self.writer is not None and self.writer_key == key:
            self.writer.nested_reads += 1
            return True
        held = self.readers.get(key)
        if held is not None:
            held.count += 1
            return True
        return False

    def can_read(self) -> bool:
        return self.writer is None and self.waiting_writers == 0

    def can_write(self) -> bool:
        return self.writer is None and not self.readers

    def add_read(self, key: object, label: str, stack: tuple[FrameSummary, ...]) -> None:
        self.readers[key] = _Hold(label, stack)

    def add_read_lazy(self, key: object, thread: threading.Thread, frame: FrameType, depth: int) -> None:
        self.readers[key] = _Hold(thread, None, frame, depth)

    def add_write(self, key: object, label: str, stack: tuple[FrameSummary, ...]) -> None:
        self.writer = _Hold(label, stack)
        self.writer_key = key

    def release_read(self, key: object) -> bool:
        """Release one read hold of ``key``. True if the lock may now admit a writer."""
        if self.writer is not None and self.writer_key == key and self.writer.nested_reads > 0:
            self.writer.nested_reads -= 1
            return False
        held = self.readers.get(key)
        if held is None:
            raise LockError(f"lock {self.name!r}: read side released by an owner that does not hold it")
        held.count -= 1
        if held.count:
            return False
        del self.readers[key]
        self._check_limit(held, "read")
        return not self.readers

    def release_write(self, key: object) -> None:
        if self.writer is None or self.writer_key != key:
            raise LockError(f"lock {self.name!r}: write side released by an owner that does not hold it")
        held = self.writer
        self.writer = None
        self.writer_key = None
        self._check_limit(held, "write")

    def _check_limit(self, held: _Hold, mode: Mode) -> None:
        if self.hold_limit is None:
            return
        took = time.monotonic() - held.since
        if took > self.hold_limit:
            self.slow_holds += 1
            log.warning(
                "lock %r: %s held the %s side for %.3f s (limit %.3f s); taken at:\n%s",
                self.name,
                held.label,
                mode,
                took,
                self.hold_limit,
                format_stack(held.stack),
            )

    def holders(self) -> list[Holder]:
        out = [
            Holder(h.label, "read", h.since, h.count, format_stack(h.stack)) for h in self.readers.values()
        ]
        if self.writer is not None:
            w = self.writer
            out.append(Holder(w.label, "write", w.since, 1 + w.nested_reads, format_stack(w.stack)))
        return out

    def timeout_error(self, mode: Mode, label: str, timeout: float) -> LockTimeoutError:
        parts = [f"lock {self.name!r}: {label} could not take the {mode} side within {timeout:g} s."]
        for h in self.holders():
            parts.append(f"Held ({h.mode}) for {h.held_for():.3f} s by {h.owner}, taken at:\n{h.stack}")
        if self.waiting_writers:
            parts.append(f"{self.waiting_writers} writer(s) waiting.")
        return LockTimeoutError("\n".join(parts))


class _LockBase:
    """What :class:`RWLock` and :class:`AsyncRWLock` share: the arguments, the owners' book, ``repr``."""

    def __init__(self, name: str, timeout: float | None, hold_limit: float | None, stack_depth: int) -> None:
        if timeout is not None and timeout < 0:
            raise ValueError("timeout must be >= 0 or None")
        if hold_limit is not None and hold_limit <= 0:
            raise ValueError("hold_limit must be > 0 or None")
        if stack_depth < 1:
            raise ValueError("stack_depth must be >= 1")
        self.name = name
        self.timeout = timeout
        self.stack_depth = stack_depth
        self._book = _Book(name, hold_limit)

    @property
    def slow_holds(self) -> int:
        """Holds released after longer than ``hold_limit``."""
        return self._book.slow_holds

    def _describe(self) -> str:
        b = self._book
        state = "write" if b.writer is not None else f"{len(b.readers)} reader(s)"
        return f"{type(self).__name__}({self.name!r}, {state}, {b.waiting_writers} writer(s) waiting)"

    def _deadline(self, timeout: float | None) -> float | None:
        t = self.timeout if timeout is None else timeout
        if t is not None and t < 0:
            raise ValueError("timeout must be >= 0 or None")
        return t


class RWLock(_LockBase):
    """A read-write lock for threads; see the module docstring.

    ``with lock.read(): ...`` / ``with lock.write(): ...``. ``timeout`` is the default bound on every wait
    (``None``: wait as long as it takes), overridable per call; ``hold_limit`` turns long holds into
    warnings; ``name`` appears in every error and warning.
    """

    def __init__(
        self,
        name: str = "rwlock",
        *,
        timeout: float | None = None,
        hold_limit: float | None = None,
        stack_depth: int = DEFAULT_STACK_DEPTH,
    ) -> None:
        super().__init__(name, timeout, hold_limit, stack_depth)
        self._mutex = threading.Lock()
        self._cond = threading.Condition(self._mutex)
        self._read_guard = _ReadGuard(self, None)

    def __repr__(self) -> str:
        with self._mutex:
            return self._describe()

    def holders(self) -> list[Holder]:
        """Current holders with the stacks where they took the lock."""
        with self._mutex:
            return self._book.holders()

    @staticmethod
    def _owner() -> tuple[int, str]:
        t = threading.current_thread()
        return threading.get_ident(), f"thread {t.name} ({t.ident})"

    def read(self, timeout: float | None = None) -> contextlib.AbstractContextManager[None]:
        """Hold the read side for the ``with`` block (the hot path: a small guard object, no generator,
        the stack recorded lazily; see the module docstring)."""
        if timeout is None:
            return self._read_guard  # stateless: one per lock, no allocation per use
        if timeout < 0:
            raise ValueError("timeout must be >= 0 or None")
        return _ReadGuard(self, timeout)

    def _enter_read(self, timeout: float | None, frame: FrameType) -> None:
        key = threading.get_ident()
        b = self._book
        with self._mutex:  # the condition's own lock (``with self._cond`` is one Python call more)
            if b.writer is None and b.waiting_writers == 0 and key not in b.readers:  # the usual case
                b.add_read_lazy(key, threading.current_thread(), frame, self.stack_depth)
                return
            if b.nested_read(key):
                return
            limit = self._deadline(timeout)
            if not self._cond.wait_for(b.can_read, limit):
                raise b.timeout_error("read", self._owner()[1], limit or 0.0)
            b.add_read_lazy(key, threading.current_thread(), frame, self.stack_depth)

    def _exit_read(self) -> None:
        key = threading.get_ident()
        b = self._book
        with self._mutex:
            held = b.readers.get(key)
            if held is not None and held.count == 1 and b.writer is None and b.hold_limit is None:
                del b.readers[key]  # the usual case, inline: the last hold of a plain read
                if not b.readers and b.waiting_writers:
                    self._cond.notify_all()
            elif b.release_read(key):
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the write side for the ``with`` block. Raises at once on an upgrade or a re-entrant write."""
        key, label = self._owner()
        limit = self._deadline(timeout)
        stack = capture_stack(self.stack_depth)
        b = self._book
        with self._cond:
            b.check_write(key, stack)
            b.waiting_writers += 1
            ok = False
            try:
                ok = self._cond.wait_for(b.can_write, limit)
            finally:
                b.waiting_writers -= 1
                if not ok:
                    # Gave up (timeout or exception): readers held back for this writer may go now.
                    self._cond.notify_all()
            if not ok:
                raise b.timeout_error("write", label, limit or 0.0)
            b.add_write(key, label, stack)
        try:
            yield
        finally:
            with self._cond:
                b.release_write(key)
                self._cond.notify_all()


class _ReadGuard:
    """``with lock.read():`` of :class:`RWLock`."""

    __slots__ = ("_lock", "_timeout")

    def __init__(self, lock: RWLock, timeout: float | None) -> None:
        self._lock = lock
        self._timeout = timeout

    def __enter__(self) -> None:
        self._lock._enter_read(self._timeout, sys._getframe(1))

    def __exit__(self, *exc: object) -> None:
        self._lock._exit_read()


class AsyncRWLock(_LockBase):
    """A read-write lock for the asyncio tasks of one event loop; the owner is the current task.

    ``async with lock.read(): ...`` / ``async with lock.write(): ...``; same rules and arguments as
    :class:`RWLock`. A cancelled waiter leaves no trace; release never awaits, so a holder cancelled in
    its block still releases.
    """

    def __init__(
        self,
        name: str = "async-rwlock",
        *,
        timeout: float | None = None,
        hold_limit: float | None = None,
        stack_depth: int = DEFAULT_STACK_DEPTH,
    ) -> None:
        super().__init__(name, timeout, hold_limit, stack_depth)
        self._waiters: deque[asyncio.Future[None]] = deque()
        """One future per waiting task (so bounded by the tasks actually waiting)."""

    def __repr__(self) -> str:
        return self._describe()

    def holders(self) -> list[Holder]:
        """Current holders with the stacks where they took the lock."""
        return self._book.holders()

    @staticmethod
    def _owner() -> tuple[asyncio.Task[object], str]:
        task = asyncio.current_task()
        if task is None:
            raise LockError("AsyncRWLock must be used from an asyncio task")
        return task, f"task {task.get_name()}"

    def _wake(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)

    async def _wait(self, pred: Callable[[], bool], limit: float | None) -> bool:
        """Wait until ``pred()``; False if ``limit`` seconds pass first."""
        if pred():
            return True
        loop = asyncio.get_running_loop()
        deadline = None if limit is None else loop.time() + limit
        try:
            async with asyncio.timeout_at(deadline):
                while not pred():
                    fut: asyncio.Future[None] = loop.create_future()
                    self._waiters.append(fut)
                    try:
                        await fut
                    finally:
                        self._waiters.remove(fut)
        except TimeoutError:
            return pred()
        return True

    @contextlib.asynccontextmanager
    async def read(self, timeout: float | None = None) -> AsyncIterator[None]:
        """Hold the read side for the ``async with`` block."""
        key, label = self._owner()
        limit = self._deadline(timeout)
        stack = capture_stack(self.stack_depth)
        b = self._book
        if not b.nested_read(key):
            if not await self._wait(b.can_read, limit):
                raise b.timeout_error("read", label, limit or 0.0)
            b.add_read(key, label, stack)
        try:
            yield
        finally:
            if b.release_read(key):
                self._wake()

    @contextlib.asynccontextmanager
    async def write(self, timeout: float | None = None) -> AsyncIterator[None]:
        """Hold the write side for the ``async with`` block. Raises at once on an upgrade or a
        re-entrant write."""
        key, label = self._owner()
        limit = self._deadline(timeout)
        stack = capture_stack(self.stack_depth)
        b = self._book
        b.check_write(key, stack)
        b.waiting_writers += 1
        ok = False
        try:
            ok = await self._wait(b.can_write, limit)
        finally:
            b.waiting_writers -= 1
            if not ok:
                self._wake()  # gave up (timeout or cancelled): readers held back for this writer may go
        if not ok:
            raise b.timeout_error("write", label, limit or 0.0)
        b.add_write(key, label, stack)
        try:
            yield
        finally:
            b.release_write(key)
            self._wake()


class SyncRWLock(Protocol):
    """What :class:`RWLock` and :class:`PlainRWLock` both offer: ``with lock.read():`` /
    ``with lock.write():``."""

    def read(self) -> contextlib.AbstractContextManager[None]: ...

    def write(self) -> contextlib.AbstractContextManager[None]: ...


class PlainRWLock:
    """A naive readers-writer lock, kept ONLY to reproduce the incident (fault injection): a count of
    readers and a writer flag under one condition variable, with no owner tracking and no timeout.

    A writer waits until there is no reader and no writer; nothing notices that the reader it waits for
    is itself, so a read→write upgrade (or a re-entrant write) blocks the calling thread forever, exactly
    as the lock behind the original outage did. Never use it for anything else: :class:`RWLock` is the
    project's lock.
    """

    def __init__(self, name: str = "plain-rwlock") -> None:
        self.name = name
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False

    def __repr__(self) -> str:
        state = "write" if self._writer else f"{self._readers} reader(s)"
        return f"PlainRWLock({self.name!r}, {state})"

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        """Hold the read side for the ``with`` block (waits, unbounded, while a writer holds the lock)."""
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        """Hold the write side for the ``with`` block: waits, with no bound, for ``readers == 0``."""
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()
