"""In-flight load counts shared by the proxy's worker processes, so that limits hold for the whole proxy.

The supervisor creates one memory-mapped file (in ``/dev/shm`` when there is one, so it never touches a
disk) before it starts the workers; each worker maps it (:meth:`SharedLoad.attach`) and counts through a
:class:`SharedLoadTracker`, a :class:`~verdigris.proxy.balance.LoadTracker` whose loads are the totals over
every worker::

    shared = SharedLoad.create(workers=2)             # supervisor; shared.handle goes to each worker
    ...
    tracker = SharedLoadTracker(SharedLoad.attach(handle, index))   # worker `index`
    balancer = Balancer(table, region, rng=rng, load=tracker)
    ...
    shared.reset_worker(i)                            # supervisor, after worker i died, before restarting it
    shared.unlink()                                   # supervisor, at exit

Layout: a header, one release counter per worker, then per worker a row of ``cells`` int32 counters. An
instance id maps to a cell by a stable hash (BLAKE2b, the same in every process: not Python's randomised
``hash``). Each worker writes only its own row, so counting needs no lock; a reader sums the rows.

* **Collisions**: two instances whose ids hash to the same cell share a counter, so each looks as busy as
  both together — busier than it is, never less busy. Limits can only be under-used by a collision, never
  overrun. 2**18 cells (1 MiB per worker, of which only touched pages are allocated) make a collision
  between two *busy* instances of one region rare; ``[proxy] load_cells`` sets the size.
* **Hard limits are strict across workers**: "sum the rows, compare with the limit, count in my row" runs
  under an exclusive ``flock`` of the mapped file (:meth:`SharedLoad.try_add`). The kernel drops the lock
  of a process that dies, so a dead holder cannot keep it. A holder that is alive but stalled (stopped,
  descheduled) inside the few-microsecond critical section is waited for at most ``LOCK_TIMEOUT``; then
  the acquisition fails — the instance is treated as full for that choice (the request queues and tries
  again on the next release or poll), so the limit is never exceeded — and after a timeout the lock is
  only tried, never waited for, until it is next taken (or ``LOCK_BACKOFF`` seconds), so a stuck holder
  cannot block the event loop repeatedly. Slots without a hard limit are counted without the lock; soft
  limits are a preference, read without the lock.
* **A worker that dies** leaves its counts: the supervisor zeroes its row (:meth:`SharedLoad.reset_worker`)
  before starting its replacement.
* **Releases elsewhere**: each worker bumps its release counter on every release; a worker with queued
  requests polls :meth:`SharedLoad.releases` to wake them when another worker frees a slot.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import tempfile
import time
from dataclasses import dataclass
from hashlib import blake2b
from typing import Final

from verdigris.proxy.balance import LoadTracker, Slot

DEFAULT_CELLS: Final = 1 << 18
"""Counters per worker (int32 each)."""
LOCK_TIMEOUT: Final = 0.05
"""Longest wait, in seconds, for the hard-limit lock (a holder descheduled on a busy machine can keep it
for a scheduler time slice: milliseconds)."""
LOCK_BACKOFF: Final = 1.0
"""After a lock timeout, until the lock is next taken or for at most this long, it is only tried (never
waited for)."""
CELL_CACHE_MAX: Final = 1 << 20
"""Instance id -> cell memo size; emptied when full."""

_MAGIC: Final = b"VDLOAD01"
_HEADER: Final = struct.Struct("<8sII")
_HEADER_SIZE: Final = 64
_MASK64: Final = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class SharedLoadHandle:
    """What a worker needs to attach (picklable: passed to spawned processes)."""

    path: str
    workers: int
    cells: int


def _layout(workers: int, cells: int) -> tuple[int, int]:
    """(offset of the counters, total size)."""
    counters = _HEADER_SIZE + -(-(8 * workers) // 64) * 64
    return counters, counters + 4 * workers * cells


class SharedLoad:
    """The shared counters: ``workers`` rows of ``cells`` int32, plus a release counter per worker.

    :meth:`create` (the supervisor: owns the file, :meth:`unlink` removes it) or :meth:`attach` (a worker
    ``index``: writes only row ``index``).
    """

    def __init__(self, path: str, index: int | None, *, owner: bool) -> None:
        self.path = path
        self.index = index
        self.owner = owner
        self._fd = os.open(path, os.O_RDWR)
        try:
            size = os.fstat(self._fd).st_size
            self._mm = mmap.mmap(self._fd, size)
        except BaseException:
            os.close(self._fd)
            raise
        magic, workers, cells = _HEADER.unpack_from(self._mm, 0)
        counters, expected = _layout(workers, cells)
        if magic != _MAGIC or size != expected:
            self._mm.close()
            os.close(self._fd)
            raise ValueError(f"{path} is not a load-count file (or not of this version)")
        if index is not None and not 0 <= index < workers:
            self._mm.close()
            os.close(self._fd)
            raise ValueError(f"worker index {index} out of range (0..{workers - 1})")
        self.workers: int = workers
        self.cells: int = cells
        view = memoryview(self._mm)
        self._gen_view = view[_HEADER_SIZE : _HEADER_SIZE + 8 * workers]
        self._cnt_view = view[counters:]
        self._view = view
        self._gens = self._gen_view.cast("Q")
        self._counts = self._cnt_view.cast("i")
        self._offsets = tuple(w * cells for w in range(workers))
        self._own = (index or 0) * cells
        self._backoff_until = 0.0
        self.lock_timeouts = 0
        """Waits for the lock that ran out (``LOCK_TIMEOUT``)."""
        self.lock_refusals = 0
        """Slots refused without waiting because the lock was busy during a backoff."""
        self.closed = False

    # ------------------------------------------------------------------------ lifecycle

    @classmethod
    def create(cls, workers: int, cells: int = DEFAULT_CELLS, *, directory: str | None = None) -> SharedLoad:
        """A new, zeroed file for ``workers`` workers (the supervisor's)."""
        if workers < 1 or cells < 1:
            raise ValueError("workers and cells must be at least 1")
        if directory is None:
            directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        fd, path = tempfile.mkstemp(prefix="verdigris-proxy-load-", dir=directory)
        try:
            os.ftruncate(fd, _layout(workers, cells)[1])  # sparse: zero pages are not allocated
            os.pwrite(fd, _HEADER.pack(_MAGIC, workers, cells), 0)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        try:
            return cls(path, None, owner=True)
        except BaseException:
            os.unlink(path)
            raise

    @classmethod
    def attach(cls, handle: SharedLoadHandle, index: int) -> SharedLoad:
        """Map the supervisor's file as worker ``index``."""
        shared = cls(handle.path, index, owner=False)
        if (shared.workers, shared.cells) != (handle.workers, handle.cells):
            shared.close()
            raise ValueError(f"{handle.path}: layout differs from the handle's")
        return shared

    @property
    def handle(self) -> SharedLoadHandle:
        return SharedLoadHandle(self.path, self.workers, self.cells)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for v in (self._gens, self._counts, self._gen_view, self._cnt_view, self._view):
            v.release()
        self._mm.close()
        os.close(self._fd)

    def unlink(self) -> None:
        """Close, and remove the file (the owner, at exit)."""
        self.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    # ------------------------------------------------------------------------ counting

    def cell(self, instance_id: str) -> int:
        """The cell of an instance: a stable hash, the same in every process."""
        digest = blake2b(instance_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(digest, "little") % self.cells

    def total(self, cell: int) -> int:
        """Slots held on ``cell`` by all workers."""
        counts = self._counts
        n = 0
        for off in self._offsets:
            n += counts[off + cell]
        return n

    def own(self, cell: int) -> int:
        """Slots held on ``cell`` by this worker."""
        return int(self._counts[self._own + cell])

    def add(self, cell: int) -> None:
        """Count one slot in this worker's row (no limit: no lock)."""
        i = self._own + cell
        self._counts[i] += 1

    def try_add(self, cell: int, limit: int) -> bool:
        """Count one slot if the total is below ``limit``, atomically across workers. False when the cell
        is full, or when the lock could not be taken in time (see the module docstring)."""
        if not self._lock():
            return False
        try:
            if self.total(cell) >= limit:
                return False
            i = self._own + cell
            self._counts[i] += 1
            return True
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def remove(self, cell: int) -> None:
        """Give one slot back (this worker's row) and bump this worker's release counter."""
        i = self._own + cell
        n = self._counts[i]
        if n > 0:
            self._counts[i] = n - 1
        w = self.index or 0
        self._gens[w] = (self._gens[w] + 1) & _MASK64

    def releases(self) -> int:
        """A number that changes whenever any worker releases a slot (or a row is reset)."""
        return sum(self._gens)

    def reset_worker(self, index: int) -> None:
        """Zero the row of worker ``index`` (dead: its slots are gone) and wake the other workers' waiters.
        Only while that worker is not running."""
        if not 0 <= index < self.workers:
            raise ValueError(f"worker index {index} out of range")
        start = index * self.cells * 4
        self._cnt_view[start : start + self.cells * 4] = bytes(self.cells * 4)
        self._gens[index] = (self._gens[index] + 1) & _MASK64

    def row_total(self, index: int) -> int:
        """Sum of the row of worker ``index`` (tests and diagnostics; reads the whole row)."""
        off = index * self.cells
        return sum(self._counts[off : off + self.cells])

    def _lock(self) -> bool:
        fd = self._fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._backoff_until = 0.0
            return True
        except BlockingIOError:
            pass
        now = time.monotonic()
        if now < self._backoff_until:
            self.lock_refusals += 1
            return False
        deadline = now + LOCK_TIMEOUT
        while True:
            time.sleep(0.00005)  # the holder is inside a few-microsecond section, or descheduled
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                pass
            now = time.monotonic()
            if now >= deadline:
                self._backoff_until = now + LOCK_BACKOFF
                self.lock_timeouts += 1
                return False


class SharedLoadTracker(LoadTracker):
    """A :class:`LoadTracker` whose loads are the totals over every worker (see the module docstring).

    :meth:`load` and :meth:`lookup` (what the balancer decides on) are totals over every worker, a
    colliding instance's slots included; ``total``, :meth:`loads` and :meth:`own` are this worker's slots
    (metrics sum them over workers); :meth:`fleet_loads` is fleet-wide.
    """

    def __init__(self, shared: SharedLoad) -> None:
        super().__init__()
        self.shared = shared
        self._cells: dict[str, int] = {}
        self._counts = shared._counts
        self._offsets = shared._offsets
        self.lookup = self._lookup

    def _cell(self, instance_id: str) -> int:
        c = self._cells.get(instance_id)
        if c is None:
            if len(self._cells) >= CELL_CACHE_MAX:
                self._cells.clear()
            c = self._cells[instance_id] = self.shared.cell(instance_id)
        return c

    def _lookup(self, instance_id: str, default: int = 0) -> int:
        # SharedLoad.total inlined: this runs for every candidate of every request
        c = self._cells.get(instance_id)
        if c is None:
            c = self._cell(instance_id)
        counts = self._counts
        n = 0
        for off in self._offsets:
            n += counts[off + c]
        return n

    def load(self, instance_id: str) -> int:
        return self.shared.total(self._cell(instance_id))

    def acquire(self, instance_id: str) -> Slot:
        self.shared.add(self._cell(instance_id))
        return self._count(instance_id)

    def try_acquire(self, instance_id: str, limit: int) -> Slot | None:
        if limit <= 0:
            return self.acquire(instance_id)
        if not self.shared.try_add(self._cell(instance_id), limit):
            return None
        return self._count(instance_id)

    def _count(self, instance_id: str) -> Slot:
        mine = self._load
        mine[instance_id] = mine.get(instance_id, 0) + 1
        self.total += 1
        return Slot(self, instance_id)

    def _release(self, instance_id: str) -> None:
        self.shared.remove(self._cell(instance_id))
        super()._release(instance_id)

    def own(self, instance_id: str) -> int:
        """Slots this worker holds on the instance."""
        return self._load.get(instance_id, 0)

    def fleet_loads(self) -> dict[str, int]:
        """Instance id -> slots held by all workers, for the instances this worker has counted or looked
        up (with none: absent). :meth:`loads` is this worker's own (summing it over workers is right)."""
        out = {}
        for iid, c in self._cells.items():
            n = self.shared.total(c)
            if n:
                out[iid] = n
        return out

    def releases(self) -> int:
        return self.shared.releases()


__all__ = [
    "DEFAULT_CELLS",
    "LOCK_BACKOFF",
    "LOCK_TIMEOUT",
    "SharedLoad",
    "SharedLoadHandle",
    "SharedLoadTracker",
]
