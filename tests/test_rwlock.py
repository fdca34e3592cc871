"""RWLock (threads) and AsyncRWLock (asyncio tasks): exclusion, errors instead of deadlocks, bounds."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time

import pytest

from verdigris.watchdog import (
    AsyncRWLock,
    LockError,
    LockReentryError,
    LockTimeoutError,
    LockUpgradeError,
    RWLock,
)
from verdigris.watchdog.rwlock import PlainRWLock

pytestmark = pytest.mark.timeout(60)

WAIT = 5.0  # every wait in these tests is bounded by this


# ------------------------------------------------------------------------------------------- threads


def test_readers_share() -> None:
    lock = RWLock("share")
    inside = threading.Barrier(3, timeout=WAIT)

    def reader() -> None:
        with lock.read(timeout=WAIT):
            inside.wait()  # all three readers are inside at once

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    reader()
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive()


def test_writer_excludes_readers_and_writers() -> None:
    lock = RWLock("excl")
    state = {"writers": 0, "readers": 0, "bad": 0}
    guard = threading.Lock()

    def writer() -> None:
        for _ in range(200):
            with lock.write(timeout=WAIT):
                with guard:
                    state["writers"] += 1
                    if state["writers"] != 1 or state["readers"]:
                        state["bad"] += 1
                with guard:
                    state["writers"] -= 1

    def reader() -> None:
        for _ in range(200):
            with lock.read(timeout=WAIT):
                with guard:
                    state["readers"] += 1
                    if state["writers"]:
                        state["bad"] += 1
                with guard:
                    state["readers"] -= 1

    threads = [threading.Thread(target=f) for f in (writer, writer, reader, reader, reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT * 4)
        assert not t.is_alive()
    assert state["bad"] == 0


def _take_read(lock: RWLock) -> None:
    with lock.read():
        _ask_write(lock)


def _ask_write(lock: RWLock) -> None:
    with lock.write():
        pass


def test_upgrade_raises_at_once_with_both_stacks() -> None:
    lock = RWLock("routes")
    t0 = time.monotonic()
    with pytest.raises(LockUpgradeError) as info:
        _take_read(lock)
    assert time.monotonic() - t0 < 1.0
    msg = str(info.value)
    assert "'routes'" in msg
    assert "read→write upgrade" in msg
    # the stack where the read was taken, and the one asking for the write
    read_at, write_at = msg.split("Write side asked at:")
    assert "_take_read" in read_at and "with lock.read():" in read_at
    assert "_ask_write" in write_at and "with lock.write():" in write_at
    # the lock is usable afterwards: the read was released on the way out
    assert lock.holders() == []
    with lock.write(timeout=WAIT):
        pass


def test_reentrant_write_raises_with_both_stacks() -> None:
    lock = RWLock("reg")

    def outer() -> None:
        with lock.write():
            inner()

    def inner() -> None:
        with lock.write():
            pass

    with pytest.raises(LockReentryError) as info:
        outer()
    msg = str(info.value)
    assert "'reg'" in msg
    first, second = msg.split("Asked again at:")
    assert "outer" in first and "inner" in second
    assert lock.holders() == []


def test_nested_read_inside_write_and_reentrant_read() -> None:
    lock = RWLock("nest")
    with lock.write():
        with lock.read():
            [h] = lock.holders()
            assert h.mode == "write" and h.count == 2
            with pytest.raises(LockReentryError), lock.write():
                pass
        assert lock.holders()[0].count == 1
    with lock.read(), lock.read():
        [h] = lock.holders()
        assert h.mode == "read" and h.count == 2
    assert lock.holders() == []


def test_reentrant_read_passes_a_waiting_writer() -> None:
    """Writer preference must not deadlock an owner that re-enters the read side."""
    lock = RWLock("pref")
    started = threading.Event()
    wrote = threading.Event()

    def writer() -> None:
        started.set()
        with lock.write(timeout=WAIT):
            wrote.set()

    with lock.read():
        t = threading.Thread(target=writer)
        t.start()
        assert started.wait(WAIT)
        deadline = time.monotonic() + WAIT
        while lock._book.waiting_writers == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        with lock.read(timeout=1.0):  # re-entrant: allowed while the writer waits
            pass
        assert not wrote.is_set()
    t.join(WAIT)
    assert wrote.is_set()


def test_writer_preference_holds_new_readers() -> None:
    lock = RWLock("pref2")
    release = threading.Event()
    order: list[str] = []

    def first_reader() -> None:
        with lock.read():
            release.wait(WAIT)

    def writer() -> None:
        with lock.write(timeout=WAIT):
            order.append("writer")

    r = threading.Thread(target=first_reader)
    r.start()
    deadline = time.monotonic() + WAIT
    while not lock.holders() and time.monotonic() < deadline:
        time.sleep(0.001)
    w = threading.Thread(target=writer)
    w.start()
    while lock._book.waiting_writers == 0 and time.monotonic() < deadline:
        time.sleep(0.001)
    # A new reader must wait behind the waiting writer.
    with pytest.raises(LockTimeoutError), lock.read(timeout=0.05):
        pass
    release.set()
    with lock.read(timeout=WAIT):
        order.append("reader")
    r.join(WAIT)
    w.join(WAIT)
    assert order == ["writer", "reader"]


def test_timeouts_name_the_holder() -> None:
    lock = RWLock("slow")
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with lock.write():
            held.set()
            release.wait(WAIT)

    t = threading.Thread(target=holder, name="the-holder")
    t.start()
    assert held.wait(WAIT)
    t0 = time.monotonic()
    with pytest.raises(LockTimeoutError) as info, lock.read(timeout=0.05):
        pass
    assert 0.04 <= time.monotonic() - t0 < 2.0
    assert "the-holder" in str(info.value) and "def holder" not in str(info.value)
    assert "with lock.write():" in str(info.value)
    with pytest.raises(TimeoutError), lock.write(timeout=0.01):
        pass
    assert lock._book.waiting_writers == 0
    release.set()
    t.join(WAIT)
    # The lock's default timeout bounds a wait that names none.
    default = RWLock("default", timeout=0.01)
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with default.read():
                pass
        except BaseException as e:
            errors.append(e)

    with default.write():
        o = threading.Thread(target=other)
        o.start()
        o.join(WAIT)
    assert len(errors) == 1 and isinstance(errors[0], LockTimeoutError)


def test_hold_limit_warns_with_holder_stack(caplog: pytest.LogCaptureFixture) -> None:
    lock = RWLock("limited", hold_limit=0.01)
    with caplog.at_level(logging.WARNING, logger="verdigris.watchdog.rwlock"):
        with lock.read():
            time.sleep(0.03)
        with lock.write():
            pass
    assert lock.slow_holds == 1
    [rec] = [r for r in caplog.records if "limited" in r.getMessage()]
    msg = rec.getMessage()
    assert "read side" in msg and "test_hold_limit_warns_with_holder_stack" in msg
    assert "with lock.read():" in msg


def test_holders_report_stacks() -> None:
    lock = RWLock("intro")
    with lock.read():
        [h] = lock.holders()
        assert h.mode == "read" and "MainThread" in h.owner
        assert "test_holders_report_stacks" in h.stack
        assert h.held_for() >= 0
    assert "intro" in repr(lock)


def test_bad_arguments_and_foreign_release() -> None:
    with pytest.raises(ValueError):
        RWLock(timeout=-1)
    with pytest.raises(ValueError):
        RWLock(hold_limit=0)
    lock = RWLock()
    with pytest.raises(LockError):
        lock._book.release_read(object())
    with pytest.raises(LockError):
        lock._book.release_write(object())


def test_randomized_stress_threads_no_deadlock() -> None:
    """Random mixes of reads, writes, nested reads and (refused) upgrades finish in bounded time."""
    lock = RWLock("stress", timeout=WAIT)
    errors: list[BaseException] = []
    refused = [0]
    counter = [0]
    entered = [0] * 6

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(300):
                op = rng.random()
                if op < 0.5:
                    with lock.read():
                        time.sleep(0)
                        if rng.random() < 0.2:
                            with lock.read():
                                pass
                elif op < 0.85:
                    with lock.write():
                        entered[seed] += 1
                        n = counter[0]
                        time.sleep(0)  # let the others run while the write side is held
                        counter[0] = n + 1
                        if rng.random() < 0.2:
                            with lock.read():
                                pass
                else:
                    try:
                        with lock.read(), lock.write():
                            pass
                    except LockUpgradeError:
                        refused[0] += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(6)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
        assert not t.is_alive(), "deadlock"
    assert errors == []
    assert refused[0] > 0
    assert counter[0] == sum(entered) > 0  # writers excluded each other: no lost update
    assert lock.holders() == [] and lock._book.waiting_writers == 0
    assert time.monotonic() - t0 < 30


# --------------------------------------------------------------------------------------------- asyncio


async def test_async_readers_share_writer_excludes() -> None:
    lock = AsyncRWLock("a")
    inside = 0
    peak = 0
    bad = 0

    async def reader() -> None:
        nonlocal inside, peak, bad
        async with lock.read(timeout=WAIT):
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.01)
            inside -= 1

    async def writer() -> None:
        nonlocal bad
        async with lock.write(timeout=WAIT):
            if inside:
                bad += 1
            await asyncio.sleep(0.005)
            if inside:
                bad += 1

    await asyncio.wait_for(asyncio.gather(*(reader() for _ in range(5)), writer(), reader()), WAIT)
    assert peak >= 2 and bad == 0


async def _async_take_read(lock: AsyncRWLock) -> None:
    async with lock.read():
        await _async_ask_write(lock)


async def _async_ask_write(lock: AsyncRWLock) -> None:
    async with lock.write():
        pass


async def test_async_upgrade_raises_with_both_stacks() -> None:
    lock = AsyncRWLock("atable")
    with pytest.raises(LockUpgradeError) as info:
        await asyncio.wait_for(_async_take_read(lock), WAIT)
    read_at, write_at = str(info.value).split("Write side asked at:")
    assert "_async_take_read" in read_at and "_async_ask_write" in write_at
    assert "'atable'" in read_at
    assert lock.holders() == []


async def test_async_reentrant_write_and_nested_read() -> None:
    lock = AsyncRWLock("areg")
    async with lock.write():
        async with lock.read():
            pass
        with pytest.raises(LockReentryError):
            async with lock.write():
                pass
    assert lock.holders() == []


async def test_async_owner_is_the_task() -> None:
    """Another task is another owner: it waits (and times out) instead of raising."""
    lock = AsyncRWLock("own")
    async with lock.read():

        async def other() -> None:
            async with lock.write(timeout=0.05):
                pass

        with pytest.raises(LockUpgradeError):
            await other()  # awaited in the same task: an upgrade, refused at once

    async with lock.read():
        task = asyncio.create_task(_async_ask_write_timeout(lock))
        with pytest.raises(LockTimeoutError):
            await asyncio.wait_for(task, WAIT)
    assert lock._book.waiting_writers == 0


async def _async_ask_write_timeout(lock: AsyncRWLock) -> None:
    async with lock.write(timeout=0.05):
        pass


async def test_async_cancelled_waiter_leaves_no_trace() -> None:
    lock = AsyncRWLock("cancel")
    async with lock.read():
        task = asyncio.create_task(_async_ask_write(lock))
        await asyncio.sleep(0.01)
        assert lock._book.waiting_writers == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert lock._book.waiting_writers == 0 and not lock._waiters
    async with lock.write(timeout=WAIT):
        pass


async def test_async_hold_limit(caplog: pytest.LogCaptureFixture) -> None:
    lock = AsyncRWLock("alimit", hold_limit=0.01)
    with caplog.at_level(logging.WARNING, logger="verdigris.watchdog.rwlock"):
        async with lock.write():
            [h] = lock.holders()
            assert h.mode == "write" and "task" in h.owner
            await asyncio.sleep(0.03)
    assert lock.slow_holds == 1
    assert any("test_async_hold_limit" in r.getMessage() for r in caplog.records)


async def test_async_randomized_stress() -> None:
    lock = AsyncRWLock("astress", timeout=WAIT)
    refused = 0

    async def worker(seed: int) -> None:
        nonlocal refused
        rng = random.Random(seed)
        for _ in range(200):
            op = rng.random()
            if op < 0.5:
                async with lock.read():
                    await asyncio.sleep(0)
            elif op < 0.85:
                async with lock.write():
                    await asyncio.sleep(0)
            else:
                try:
                    async with lock.read(), lock.write():
                        pass
                except LockUpgradeError:
                    refused += 1

    await asyncio.wait_for(asyncio.gather(*(worker(s) for s in range(8))), 30)
    assert refused > 0
    assert lock.holders() == [] and lock._book.waiting_writers == 0 and not lock._waiters


def test_async_lock_needs_a_task() -> None:
    lock = AsyncRWLock()
    cm = lock.read()
    with pytest.raises(LockError):
        asyncio.run(_enter_outside_task(cm))


async def _enter_outside_task(cm: object) -> None:
    # Simulate "no current task" by patching current_task.
    import unittest.mock

    with unittest.mock.patch("asyncio.current_task", return_value=None):
        async with cm:  # type: ignore[attr-defined]
            pass


async def test_async_cancelled_writer_releases_held_back_readers() -> None:
    lock = AsyncRWLock("cancel2")
    got: list[str] = []

    async def late_reader() -> None:
        async with lock.read(timeout=WAIT):
            got.append("reader")

    async with lock.read():
        writer = asyncio.create_task(_async_ask_write(lock))
        await asyncio.sleep(0.01)
        reader = asyncio.create_task(late_reader())  # waits behind the writer (writer preference)
        await asyncio.sleep(0.01)
        assert got == []
        writer.cancel()
        await asyncio.wait_for(reader, WAIT)  # let go once the writer gave up
        assert got == ["reader"]
    with pytest.raises(asyncio.CancelledError):
        await writer


# ------------------------------------------------------------------------------------------- lazy stacks


def _hold_read_then_go_deeper(lock: RWLock, inside: threading.Event, done: threading.Event) -> None:
    with lock.read():
        _deeper(inside, done)


def _deeper(inside: threading.Event, done: threading.Event) -> None:
    inside.set()
    done.wait(WAIT)


def test_read_stack_is_where_the_read_was_taken_while_the_holder_goes_deeper() -> None:
    """The thread lock's read side records its stack lazily (a frame reference): read from another thread
    while the holder runs deeper code, it is still the stack at the acquisition."""
    lock = RWLock("lazy")
    inside, done = threading.Event(), threading.Event()
    t = threading.Thread(target=_hold_read_then_go_deeper, args=(lock, inside, done), name="holder")
    t.start()
    try:
        assert inside.wait(WAIT)
        [h] = lock.holders()
        assert "holder" in h.owner and h.mode == "read"
        assert h.stack.rstrip().endswith("with lock.read():"), h.stack  # the acquiring line, not the current
        assert "in _hold_read_then_go_deeper" in h.stack and "in _deeper" not in h.stack
    finally:
        done.set()
        t.join(WAIT)
    assert lock.holders() == []


# ------------------------------------------------------------------------------------------- plain lock


def test_plain_lock_shares_readers_and_excludes_a_writer() -> None:
    lock = PlainRWLock("plain")
    with lock.read(), lock.read():  # readers share (no owners: a nested read is just one more)
        assert "2 reader(s)" in repr(lock)
    order: list[str] = []
    holding, release = threading.Event(), threading.Event()

    def writer() -> None:
        with lock.write():
            holding.set()
            release.wait(WAIT)
            order.append("writer done")

    def reader() -> None:
        with lock.read():
            order.append("reader in")

    w = threading.Thread(target=writer)
    w.start()
    assert holding.wait(WAIT)
    r = threading.Thread(target=reader)
    r.start()
    r.join(0.2)  # a bounded observation: the reader waits while the writer holds the lock
    assert r.is_alive() and order == []
    release.set()
    w.join(WAIT)
    r.join(WAIT)
    assert order == ["writer done", "reader in"]


def test_plain_lock_upgrade_blocks_forever() -> None:
    """The incident: the read side, then the write side, in one thread. The plain lock waits for the
    thread's own reader to leave: it never does (observed for a bounded time, then released by hand)."""
    lock = PlainRWLock("plain")
    wrote = threading.Event()

    def upgrade() -> None:
        with lock.read(), lock.write():
            wrote.set()

    t = threading.Thread(target=upgrade, daemon=True)
    t.start()
    assert not wrote.wait(0.5) and t.is_alive()
    with lock._cond:  # cleanup only: drop the reader it waits for (nothing in the lock ever would)
        lock._readers -= 1
        lock._cond.notify_all()
    assert wrote.wait(WAIT)
    t.join(WAIT)
    with pytest.raises(LockUpgradeError):  # the project's lock refuses the same thing at once
        project = RWLock("project")
        with project.read(), project.write():
            pass
