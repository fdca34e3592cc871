"""Load counts shared by the proxy's worker processes (``verdigris.proxy.shared_load``): the counters, the
hard limit across real processes, a dead worker's row, the balancer on shared counts; then end to end, a
two-worker proxy holding a hard limit of 1, and ``connections`` apps holding a slot per client connection.

Every wait is bounded (``WAIT``); processes started here are joined or stopped.
"""

from __future__ import annotations

import asyncio
import fcntl
import http.client
import json
import multiprocessing
import os
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from _api_util import WAIT, free_port, write_config
from _proxy_env import PLATFORM_SQL, Agent, Proxy
from verdigris.proxy.balance import Balancer, LoadTracker, Queue, Route, Slot
from verdigris.proxy.shared_load import (
    LOCK_TIMEOUT,
    SharedLoad,
    SharedLoadHandle,
    SharedLoadTracker,
)
from verdigris.proxy.table import RoutingTable
from verdigris.proxy.worker import worker_pids

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def shared() -> Iterator[SharedLoad]:
    s = SharedLoad.create(2, cells=64)
    try:
        yield s
    finally:
        s.unlink()
        assert not os.path.exists(s.path)


# ---------------------------------------------------------------------------------------- counters


def test_rows_are_per_worker_and_summed(shared: SharedLoad) -> None:
    w0, w1 = SharedLoad.attach(shared.handle, 0), SharedLoad.attach(shared.handle, 1)
    try:
        c = w0.cell("m1")
        assert c == w1.cell("m1") == shared.cell("m1") and 0 <= c < 64
        w0.add(c)
        w0.add(c)
        w1.add(c)
        assert (shared.total(c), w0.own(c), w1.own(c)) == (3, 2, 1)
        assert (shared.row_total(0), shared.row_total(1)) == (2, 1)
        gen = shared.releases()
        w1.remove(c)
        assert shared.total(c) == 2 and shared.releases() != gen
        w1.remove(c)  # never below zero
        assert w1.own(c) == 0 and shared.total(c) == 2
        assert w1.try_add(c, 3) and not w1.try_add(c, 3) and not w0.try_add(c, 3)
        assert shared.total(c) == 3
    finally:
        w0.close()
        w1.close()


def test_reset_worker_zeroes_its_row_and_wakes_waiters(shared: SharedLoad) -> None:
    w0, w1 = SharedLoad.attach(shared.handle, 0), SharedLoad.attach(shared.handle, 1)
    try:
        cells = [w1.cell(f"i{n}") for n in range(20)]
        for c in cells:
            w1.add(c)
            w0.add(c)
        gen = w0.releases()
        shared.reset_worker(1)  # worker 1 died holding 20 slots
        assert shared.row_total(1) == 0 and shared.row_total(0) == 20
        assert w0.releases() != gen
        with pytest.raises(ValueError):
            shared.reset_worker(2)
    finally:
        w0.close()
        w1.close()


def test_attach_checks_the_file(shared: SharedLoad, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="out of range"):
        SharedLoad.attach(shared.handle, 2)
    with pytest.raises(ValueError, match="layout differs"):
        SharedLoad.attach(SharedLoadHandle(shared.path, 3, 64), 0)
    junk = tmp_path / "junk"
    junk.write_bytes(b"x" * 4096)
    with pytest.raises(ValueError, match="not a load-count file"):
        SharedLoad.attach(SharedLoadHandle(str(junk), 2, 64), 0)


def test_tracker_counts_fleet_wide_and_slots_are_idempotent(shared: SharedLoad) -> None:
    t0 = SharedLoadTracker(SharedLoad.attach(shared.handle, 0))
    t1 = SharedLoadTracker(SharedLoad.attach(shared.handle, 1))
    try:
        a = t0.acquire("a")
        b = t1.try_acquire("a", 2)
        assert b is not None and t1.try_acquire("a", 2) is None  # the fleet holds 2: the limit
        assert t0.load("a") == t1.load("a") == t1.lookup("a", 0) == 2
        assert t0.loads() == {"a": 1} and t0.total == 1 and t1.fleet_loads() == {"a": 2}
        assert a.release() and not a.release()
        assert t1.load("a") == 1 and t0.total == 0 and t0.loads() == {}
        b.release()
        assert t0.load("a") == 0 and t1.fleet_loads() == {}
    finally:
        t0.shared.close()
        t1.shared.close()


# ---------------------------------------------------------------------------------------- the lock


def test_lock_timeout_refuses_and_then_fails_fast(shared: SharedLoad) -> None:
    w0 = SharedLoad.attach(shared.handle, 0)
    fd = os.open(shared.path, os.O_RDWR)  # another open file description: as another process's
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a holder that never lets go
        c = w0.cell("x")
        t = time.monotonic()
        assert not w0.try_add(c, 5)  # refused (never counted past the lock), after LOCK_TIMEOUT
        waited = time.monotonic() - t
        assert LOCK_TIMEOUT <= waited < LOCK_TIMEOUT + 0.5
        t = time.monotonic()
        assert not w0.try_add(c, 5)  # within the backoff: only tried
        assert time.monotonic() - t < LOCK_TIMEOUT
        assert (w0.lock_timeouts, w0.lock_refusals, shared.total(c)) == (1, 1, 0)
        w0.add(c)  # counting without a limit needs no lock
        assert shared.total(c) == 1
        fcntl.flock(fd, fcntl.LOCK_UN)
        assert w0.try_add(c, 5)  # a free lock is taken even during the backoff, which it ends
        assert shared.total(c) == 2
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert not w0.try_add(c, 5)  # waited for again
        assert (w0.lock_timeouts, w0.lock_refusals) == (2, 1)
    finally:
        os.close(fd)
        w0.close()


def _hold_lock_and_die(path: str, ready: Any) -> None:
    fd = os.open(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    ready.set()
    os._exit(3)  # dies holding it


def test_a_dead_holder_does_not_keep_the_lock(shared: SharedLoad) -> None:
    ready = SPAWN.Event()
    p = SPAWN.Process(target=_hold_lock_and_die, args=(shared.path, ready))
    p.start()
    try:
        assert ready.wait(WAIT)
        p.join(WAIT)
        assert p.exitcode == 3
        w0 = SharedLoad.attach(shared.handle, 0)
        try:
            assert w0.try_add(w0.cell("x"), 1) and w0.lock_timeouts == 0
        finally:
            w0.close()
    finally:
        if p.is_alive():
            p.kill()
            p.join(WAIT)


def _racer(handle: SharedLoadHandle, index: int, rounds: int, limit: int, start: Any, out: Any) -> None:
    shared = SharedLoad.attach(handle, index)
    tracker = SharedLoadTracker(shared)
    rng = random.Random(index)
    ids = ["hot", "warm"]
    got = refused = max_seen = 0
    held: list[Slot] = []
    start.wait()  # both attached: race from here
    for _ in range(rounds):
        iid = rng.choice(ids)
        slot = tracker.try_acquire(iid, limit)
        if slot is None:
            refused += 1
        else:
            got += 1
            held.append(slot)
        for s in held:  # while holding: nobody else may have pushed the total past the limit
            max_seen = max(max_seen, tracker.load(s.instance_id))
        if held and rng.random() < 0.5:  # slots are held over a few rounds
            held.pop(rng.randrange(len(held))).release()
        free = tracker.acquire("free")  # no limit: no lock, concurrent single-writer counting
        free.release()
    for s in held:
        s.release()
    out.put((index, got, refused, max_seen))
    shared.close()


@pytest.mark.parametrize("limit", [1, 3])
def test_two_processes_racing_never_exceed_the_hard_limit(shared: SharedLoad, limit: int) -> None:
    start, out = SPAWN.Barrier(2, timeout=WAIT), SPAWN.Queue()
    rounds = 20_000
    procs = [
        SPAWN.Process(target=_racer, args=(shared.handle, i, rounds, limit, start, out)) for i in range(2)
    ]
    for p in procs:
        p.start()
    try:
        results = sorted(out.get(timeout=WAIT * 3) for _ in procs)
        for p in procs:
            p.join(WAIT)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(WAIT)
    for _, got, _refused, max_seen in results:
        assert max_seen <= limit and got > 0, results
    assert sum(r[2] for r in results) > 0, results  # they did contend for the slots
    assert shared.row_total(0) == shared.row_total(1) == 0  # every slot given back


# ---------------------------------------------------------------------------------------- the balancer


def make_table(n: int, soft: int, hard: int) -> RoutingTable:
    t = RoutingTable()
    t.load("apps", [("web", "acme", "requests", soft, hard)])
    t.load("hostnames", [("web.example.com", "web")])
    t.load("machines", [(f"m{i}", "web", "ams", "started", f"10.0.0.{i + 1}:80") for i in range(n)])
    for name in ("checks", "app_regions", "services"):
        t.load(name, [])
    return t


@pytest.mark.parametrize("seed", range(5))
def test_two_balancers_on_shared_counts_honour_fleet_limits(shared: SharedLoad, seed: int) -> None:
    """Two workers' balancers, interleaved at random: least loaded and the soft limit by fleet totals,
    never over the hard limit, a Queue only when the whole fleet is at the hard limit."""
    rng = random.Random(seed)
    soft, hard = 2, 3
    trackers = [SharedLoadTracker(SharedLoad.attach(shared.handle, i)) for i in range(2)]
    balancers = [
        Balancer(make_table(4, soft, hard), "ams", rng=random.Random(seed + i), load=t)
        for i, t in enumerate(trackers)
    ]
    ids = [f"m{i}" for i in range(4)]
    held: list[Slot] = []
    try:
        for _ in range(400):
            w = rng.randrange(2)
            if held and rng.random() < 0.4:
                held.pop(rng.randrange(len(held))).release()
                continue
            before = {i: trackers[0].load(i) for i in ids}
            d = balancers[w].choose("web", now=0)
            if isinstance(d, Route):
                assert d.slot is not None
                held.append(d.slot)
                n = before[d.instance.id]
                open_ = [v for v in before.values() if v < hard]
                under = [v for v in open_ if v < soft]
                assert n == min(under or open_)
            else:
                assert isinstance(d, Queue) and all(v >= hard for v in before.values())
            assert all(trackers[1].load(i) <= hard for i in ids)
            assert sum(t.total for t in trackers) == len(held)
    finally:
        for s in held:
            s.release()
        assert shared.row_total(0) == shared.row_total(1) == 0
        for t in trackers:
            t.shared.close()


class _StaleTracker(SharedLoadTracker):
    """Reads loads as zero (as if another worker took slots since they were read)."""

    def __init__(self, shared: SharedLoad) -> None:
        super().__init__(shared)
        self.lookup = self._zero

    @staticmethod
    def _zero(instance_id: str, default: int = 0) -> int:
        return 0


def test_stale_loads_cannot_overrun_the_hard_limit(shared: SharedLoad) -> None:
    stale = _StaleTracker(SharedLoad.attach(shared.handle, 0))
    other = SharedLoadTracker(SharedLoad.attach(shared.handle, 1))
    b = Balancer(make_table(2, 0, 1), "ams", rng=random.Random(1), load=stale)
    try:
        mine = b.choose("web", now=0)
        assert isinstance(mine, Route)
        theirs = other.try_acquire("m0" if mine.instance.id == "m1" else "m1", 1)
        assert theirs is not None
        # both instances are full fleet-wide; the balancer reads zeros, yet takes no slot
        assert isinstance(b.choose("web", now=0), Queue)
        assert stale.load("m0") == stale.load("m1") == 1
    finally:
        stale.shared.close()
        other.shared.close()


def test_in_process_tracker_try_acquire() -> None:
    lt = LoadTracker()
    a = lt.try_acquire("a", 1)
    assert a is not None and lt.try_acquire("a", 1) is None and lt.lookup("a", 0) == 1
    assert lt.try_acquire("a", 0) is not None  # 0: no limit
    a.release()
    assert lt.load("a") == 1


# ---------------------------------------------------------------------------------------- end to end


class CountingUpstream:
    """An aiohttp server in a thread of its own that counts requests in flight (and the most at once)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.active = 0
        self.max_active = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(WAIT)

    async def _handle(self, request: web.Request) -> web.Response:
        self.active += 1  # one event loop: no lock needed
        self.max_active = max(self.max_active, self.active)
        try:
            await asyncio.sleep(float(request.query.get("s", "0")))
        finally:
            self.active -= 1
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return web.json_response({"peer_port": peer[1] if peer else None})

    async def _start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        return runner

    def reset(self) -> None:
        async def zero() -> None:
            self.max_active = 0

        asyncio.run_coroutine_threadsafe(zero(), self.loop).result(WAIT)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(WAIT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT)


def wait_every_worker(proxy: Proxy, host: str, workers: int = 2) -> None:
    """Until every worker has routed ``host`` (each is ready on its own: a new connection may reach one
    still waiting for its routing state)."""
    proxy.wait_routes(host)
    ready: set[str] = set()
    deadline = time.monotonic() + WAIT
    while len(ready) < workers:
        assert time.monotonic() < deadline, f"only {len(ready)} worker(s) routed {host}"
        status, headers, _ = proxy.get(host)
        if status == 200:
            ready.add(headers["fly-request-id"][:8])  # the request id starts with the worker's prefix


class E2E:
    def __init__(self, tmp: Path) -> None:
        self.upstream = CountingUpstream()
        self.agent = Agent(write_config(tmp, port=free_port(), schema=PLATFORM_SQL))
        machine = "INSERT INTO machines (id, app, region, state, address) VALUES (?, ?, 'ams', 'started', ?)"
        addr = f"127.0.0.1:{self.upstream.port}"
        self.agent.exec(
            ("INSERT INTO apps (name, org, soft_limit, hard_limit) VALUES ('one', 'o', 1, 1)", []),
            ("INSERT INTO hostnames (hostname, app) VALUES ('one.test', 'one')", []),
            (machine, ["o1", "one", addr]),
            (
                "INSERT INTO apps (name, org, concurrency, soft_limit, hard_limit) "
                "VALUES ('conn', 'o', 'connections', 1, 1)",
                [],
            ),
            ("INSERT INTO hostnames (hostname, app) VALUES ('conn.test', 'conn')", []),
            (machine, ["c1", "conn", addr]),
        )
        # queue timeout 3 s: long enough for a queue of short requests to drain across both workers
        self.proxy = Proxy(
            tmp,
            self.agent.url,
            workers=2,
            name="proxy2",
            timeouts="connect = 1.0\nresponse = 5.0\nqueue = 3.0\ndrain = 2.0\nheader_read = 1.0\n",
        )
        # a short queue timeout, for the connections app
        self.quick = Proxy(tmp, self.agent.url, workers=2, name="quick")
        for proxy, host in ((self.proxy, "one.test"), (self.quick, "conn.test")):
            wait_every_worker(proxy, host)

    def close(self) -> None:
        for part in ("proxy", "quick", "agent", "upstream"):
            obj = getattr(self, part, None)  # None: a part that was never started
            if isinstance(obj, Proxy | Agent):
                obj.stop()
            elif isinstance(obj, CountingUpstream):
                obj.close()


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    e = E2E.__new__(E2E)
    try:
        e.__init__(tmp_path_factory.mktemp("shared"))  # type: ignore[misc]
        yield e
    finally:
        e.close()


def test_two_workers_hold_a_hard_limit_of_one(e2e: E2E) -> None:
    """Concurrent requests on separate connections (spread over both workers: they accept from one socket): the
    instance never sees two at once, and requests queued in one worker are woken by releases in the
    other (every one succeeds within the queue timeout)."""

    def one(_: int) -> tuple[int, str]:
        status, headers, _body = e2e.proxy.get("one.test", "/?s=0.1")
        return status, headers["fly-request-id"][:8]  # the request id starts with the worker's prefix

    for _attempt in range(
        5
    ):  # until both workers took part (whichever worker accepts first gets a connection)
        e2e.upstream.reset()
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(8)))
        assert [s for s, _ in results] == [200] * 8, results
        assert e2e.upstream.max_active == 1
        if len({w for _, w in results}) == 2:
            break
    else:
        pytest.fail(f"the requests never reached both workers: {results}")


def test_connections_app_holds_a_slot_per_client_connection(e2e: E2E) -> None:
    proxy = e2e.quick  # queue timeout 0.4 s
    first = proxy.conn()
    try:
        ports = set()
        for _ in range(3):  # keep-alive requests on one client connection: one dedicated upstream one
            first.request("GET", "/", headers={"Host": "conn.test"})
            r = first.getresponse()
            assert r.status == 200
            ports.add(json.loads(r.read())["peer_port"])
        assert len(ports) == 1
        # the only slot is held by the first client connection: a second one queues, then 503
        for _ in range(4):  # new connections: both workers are likely to see one
            status, headers, body = proxy.get("conn.test")
            assert status == 503 and headers["fly-error-code"] == "queue_timeout", body
        # the first connection still has it
        first.request("GET", "/", headers={"Host": "conn.test"})
        r = first.getresponse()
        assert r.status == 200 and json.loads(r.read())["peer_port"] in ports
    finally:
        first.close()
    # closing the first client connection frees the slot (once the proxy has seen the close)
    deadline = time.monotonic() + WAIT
    while True:
        status, headers, _ = proxy.get("conn.test")
        if status == 200:
            break
        assert headers["fly-error-code"] == "queue_timeout"
        assert time.monotonic() < deadline, "the slot was never released"


def test_connections_app_chooses_again_when_its_instance_goes(e2e: E2E) -> None:
    """A held instance that stops being usable gives its slot back at the next request of the client
    connection holding it (which then chooses again), even though that connection stays open."""
    proxy = e2e.quick
    first = proxy.conn()

    def ask(c: http.client.HTTPConnection) -> tuple[int, str]:
        c.request("GET", "/", headers={"Host": "conn.test"})
        r = c.getresponse()
        r.read()
        return r.status, r.headers.get("fly-error-code", "")

    state = "UPDATE machines SET state = ? WHERE id = 'c1'"
    try:
        assert ask(first) == (200, "")
        e2e.agent.exec((state, ["stopped"]))
        deadline = time.monotonic() + WAIT
        while (got := ask(first)) != (503, "no_healthy_instance"):
            assert got == (200, ""), got
            assert time.monotonic() < deadline, "the stopped instance was still routed to"
            time.sleep(0.05)
        e2e.agent.exec((state, ["started"]))
        # another client connection gets the slot: the first one no longer holds it
        while (got := proxy.get("conn.test")[0:2])[0] != 200:
            assert got[0] == 503, got
            assert time.monotonic() < deadline + WAIT, "the slot stayed with the first connection"
            time.sleep(0.05)
    finally:
        e2e.agent.exec((state, ["started"]))
        first.close()


def test_requests_app_counts_per_request_on_one_connection(e2e: E2E) -> None:
    """A ``requests`` app is unchanged: a keep-alive connection holds no slot between requests."""
    c = e2e.quick.conn()
    try:
        c.request("GET", "/", headers={"Host": "one.test"})
        r = c.getresponse()
        assert r.status == 200
        r.read()
        status, _, _ = e2e.quick.get("one.test")  # another connection, while the first stays open
        assert status == 200
    finally:
        c.close()


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc")
def test_a_worker_killed_holding_a_slot_does_not_keep_it(e2e: E2E) -> None:
    """SIGKILL the workers while one holds the only slot: the supervisor zeroes a dead worker's counts
    before restarting it, so the restarted proxy routes again (else: queue_timeout forever)."""
    import signal

    proxy = e2e.proxy
    out: list[object] = []

    def hold() -> None:
        try:
            out.append(proxy.get("one.test", "/?s=4")[0])
        except (OSError, http.client.HTTPException) as e:
            out.append(e)

    t = threading.Thread(target=hold)
    t.start()
    deadline = time.monotonic() + WAIT
    while e2e.upstream.active == 0:  # the slot is taken once the instance has the request
        assert time.monotonic() < deadline, "the request never reached the instance"
        time.sleep(0.01)
    pids = worker_pids(proxy.proc.pid)
    assert len(pids) == 2, pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    t.join(WAIT)
    assert out and not isinstance(out[0], int), out  # its worker died: no answer
    while True:
        try:
            status = proxy.get("one.test")[0]
        except OSError:  # between the old workers and the new ones
            status = 0
        if status == 200:
            break
        assert time.monotonic() < deadline + WAIT, "the dead worker's slot was never given back"
        time.sleep(0.05)
    assert set(worker_pids(proxy.proc.pid)).isdisjoint(pids)
