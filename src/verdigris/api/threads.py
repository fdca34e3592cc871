"""The threads that touch SQLite on behalf of the event loop.

SQLite calls block, so none of them run on the event loop:

* **one writer thread** runs every store write (:meth:`StoreThreads.write`). One thread, because the
  store has one writer connection and SQLite serializes writers anyway; queueing writes in one place
  keeps them in arrival order and makes a slow write delay other writes, never reads or the loop.
* **a small pool of reader threads**, each with its own read-only connection from
  :meth:`Store.open_reader`, runs queries (:meth:`StoreThreads.read`). WAL mode lets them read while
  the writer writes. One connection per thread because a SQLite connection must not run two
  statements from two threads at once.

:class:`ChunkPipe` hands results from a reader thread to the loop with a fixed number of chunks in
flight, so a query's rows are streamed without ever being held in memory all at once, and a slow HTTP
client slows the reader thread down instead of growing a buffer.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Generic, ParamSpec, TypeVar

from verdigris.store.store import Store

T = TypeVar("T")
P = ParamSpec("P")


class StoreThreads:
    """The writer thread and the reader pool of one :class:`Store` (see the module docstring)."""

    def __init__(self, store: Store, *, writer: ThreadPoolExecutor | None = None, readers: int = 4) -> None:
        self.store = store
        self._own_writer = writer is None
        self.writer = writer or ThreadPoolExecutor(max_workers=1, thread_name_prefix="vd-writer")
        self.readers = ThreadPoolExecutor(max_workers=max(1, readers), thread_name_prefix="vd-reader")
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    async def write(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` on the writer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.writer, functools.partial(fn, *args, **kwargs))

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn(conn)`` on a reader thread with that thread's read-only connection."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.readers, self._with_conn, fn)

    async def in_reader(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` on a reader thread (for blocking calls that bring their own
        connection, e.g. a subscription's snapshot)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.readers, functools.partial(fn, *args, **kwargs))

    def submit_read(self, fn: Callable[[sqlite3.Connection], T]) -> Future[T]:
        """Start ``fn(conn)`` on a reader thread; for streaming, where the caller consumes a
        :class:`ChunkPipe` instead of waiting for the result."""
        return self.readers.submit(self._with_conn, fn)

    def _with_conn(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return fn(self.reader_connection())

    def reader_connection(self) -> sqlite3.Connection:
        """This reader thread's connection, opened on first use."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self.store.open_reader()
            with self._lock:
                if self._closed:
                    conn.close()
                    raise RuntimeError("the store's threads are shut down")
                self._conns.append(conn)
            self._local.conn = conn
        return conn

    def close(self) -> None:
        """Wait for running calls, then close the reader connections (and the writer thread if this
        object made it). Blocking: call it off the loop."""
        self.readers.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()
        if self._own_writer:
            self.writer.shutdown(wait=True)


class ChunkPipe(Generic[T]):
    """A bounded hand-off from one producer thread to one consumer on the event loop.

    The producer calls :meth:`send`, which blocks while ``capacity`` items are in flight and returns
    ``False`` once the consumer has gone (:meth:`close`), so the producer can stop. The consumer awaits
    :meth:`recv`. :meth:`interrupt` aborts the SQLite statement the producer is running (a query past its
    deadline, or whose client left), on the connection registered with :meth:`attach`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int = 8) -> None:
        self._loop = loop
        self._credits = threading.Semaphore(capacity)
        self._queue: asyncio.Queue[T] = asyncio.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self.interrupt_reason: str | None = None
        """Why :meth:`interrupt` was called, for the producer's error message."""

    # producer side (a thread)

    def send(self, item: T) -> bool:
        while not self._credits.acquire(timeout=0.2):
            if self._closed:
                return False
        if self._closed:
            return False
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop is closed
            self._closed = True
            return False
        return True

    def attach(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            self._conn = conn

    def detach(self) -> None:
        with self._lock:
            self._conn = None

    # consumer side (the loop)

    async def recv(self) -> T:
        item = await self._queue.get()
        self._credits.release()
        return item

    def interrupt(self, reason: str = "query interrupted") -> None:
        with self._lock:
            if self._conn is not None:
                self.interrupt_reason = reason
                self._conn.interrupt()

    def close(self) -> None:
        """The consumer is gone: stop the producer at its next :meth:`send` and abort its statement."""
        self._closed = True
        self.interrupt("the client went away")
