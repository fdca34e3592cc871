"""Anti-entropy sync with real stores: convergence after lossy broadcast, catch-up from several peers,
serving every actor, partial versions, bounds, bad peers; plus the scheduler, the sim's VersionSource and
decoder fuzzing. Byte streams are piped in memory (split at random boundaries); time is virtual."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verdigris.gossip.broadcast import Addr, Broadcaster, new_to
from verdigris.gossip.changes_wire import (
    FAMILY_SYNC,
    PROTOCOL_VERSION,
    ActorNeed,
    FrameReader,
    PartialNeed,
    SyncChanges,
    SyncEnd,
    SyncRequest,
    SyncState,
    SyncWireError,
    changeset_problem,
    decode_sync,
    encode_piece,
    encode_sync,
    encode_sync_changes,
    frame,
)
from verdigris.gossip.sync import (
    ChangeSource,
    ChangesReceived,
    FailKind,
    Phase,
    RequestReceived,
    SyncClient,
    SyncConfig,
    SyncDone,
    SyncEvent,
    SyncFailed,
    SyncScheduler,
    SyncServer,
    SyncStats,
    build_sync_state,
    reject_frame,
    share_of,
    split_sync_state,
)
from verdigris.gossip.versions import VersionSource
from verdigris.store import Change, Changeset, Statement, Store, split_changeset

SCHEMA = "CREATE TABLE kv (k TEXT NOT NULL PRIMARY KEY, v TEXT, n INTEGER NOT NULL DEFAULT 0);"


@dataclass(frozen=True)
class M:
    id: str
    addr: Addr


class Node:
    def __init__(self, i: int, path: Path, seed: int) -> None:
        self.id = f"n{i}"
        self.addr: Addr = ("10.0.0.1", 7000 + i)
        self.store = Store(path, schema_sql=SCHEMA)
        self.bc = Broadcaster(is_new=new_to(self.store.books), rng=random.Random(seed), node_id=self.id)
        self.stats = SyncStats()

    def write(self, stmts: list[Statement], now: float) -> Changeset | None:
        version = self.store.transact(stmts).version
        if version is None:
            return None
        cs = self.store.changeset(self.store.site_id, version)
        assert cs is not None
        self.bc.local_commit(cs, now)
        return cs


@pytest.fixture
def make_nodes(tmp_path: Path) -> Iterator[object]:
    made: list[Node] = []

    def make(n: int, seed: int = 0) -> list[Node]:
        nodes = [Node(len(made) + i, tmp_path / f"n{len(made) + i}.db", seed * 100 + i) for i in range(n)]
        made.extend(nodes)
        return nodes

    yield make
    for node in made:
        node.store.close()


def random_write(node: Node, rng: random.Random, now: float) -> None:
    key = f"k{rng.randrange(12)}"
    r = rng.random()
    if r < 0.45:
        stmts = [
            Statement(
                "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT DO UPDATE SET v = excluded.v, n = n + 1",
                [key, f"{node.id}-{rng.randrange(1000)}"],
            )
        ]
    elif r < 0.6:
        stmts = [Statement("DELETE FROM kv WHERE k = ?", [key])]
    elif r < 0.85:
        stmts = [Statement("UPDATE kv SET n = n + ? WHERE k = ?", [rng.randrange(1, 5), key])]
    else:  # a big transaction: many rows, split into several broadcast pieces
        base = rng.randrange(1000)
        stmts = [
            Statement(
                "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT DO UPDATE SET v = excluded.v",
                [f"b{base + j}", "x" * rng.randrange(10, 120)],
            )
            for j in range(rng.randrange(10, 40))
        ]
    node.write(stmts, now)


def gossip_tick(nodes: list[Node], rng: random.Random, now: float, loss: float) -> None:
    members = [M(n.id, n.addr) for n in nodes]
    by_addr = {n.addr: n for n in nodes}
    for n in nodes:
        for payload, addr in n.bc.tick(now, members):
            assert len(payload) <= 1100
            if rng.random() < loss:
                continue
            dst = by_addr[addr]
            pieces = dst.bc.receive(payload, n.addr, now)
            if pieces:
                result = dst.store.merge(pieces)
                assert not result.rejected


def chunks(data: bytes, rng: random.Random | None) -> list[bytes]:
    """``data`` cut at a few random points (or whole)."""
    if rng is None or len(data) < 2:
        return [data] if data else []
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(0, 6))))
    return [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]


@dataclass
class Session:
    client: SyncClient
    server: SyncServer
    events: list[SyncEvent]
    applied: int


def run_session(
    client_store: Store | VersionSource,
    state: SyncState,
    source: ChangeSource,
    rng: random.Random | None = None,
    config: SyncConfig | None = None,
    now: float = 0.0,
) -> Session:
    client = SyncClient(state, now, config=config)
    server = SyncServer(source, now, config=config)
    events: list[SyncEvent] = []
    for part in chunks(client.data_to_send(), rng):
        events += server.receive_data(part, now)
    applied = 0
    while True:
        out = server.data_to_send()
        if not out:
            break
        for part in chunks(out, rng):
            for ev in client.receive_data(part, now):
                events.append(ev)
                if isinstance(ev, ChangesReceived):
                    result = client_store.merge(ev.changesets)
                    assert not result.rejected, result.rejected
                    applied += len(result.applied_versions)
    return Session(client, server, events, applied)


def sync_with(
    node: Node, peers: list[Node], rng: random.Random, config: SyncConfig | None = None
) -> list[Session]:
    state = build_sync_state(node.store, node.store.site_id, rng, config)
    parts = split_sync_state(state, len(peers), rng, config)
    sessions = []
    for peer, part in zip(peers, parts, strict=True):
        s = run_session(node.store, part, peer.store, rng, config)
        node.stats.observe(s.events)
        assert s.client.phase is Phase.DONE and s.server.phase is Phase.DONE
        sessions.append(s)
    return sessions


def fingerprint(store: Store) -> tuple[object, ...]:
    books = {a: (list(b.known), sorted(b.partials)) for a, b in store.books().items()}
    return (store.rows("kv"), store.clock_rows("kv"), books)


def converged(nodes: list[Node]) -> bool:
    first = nodes[0].store
    return all(
        n.store.rows("kv") == first.rows("kv")
        and n.store.clock_rows("kv") == first.clock_rows("kv")
        and n.store.needs() == {}
        and not any(b.partials for b in n.store.books().values())
        and n.store.heads() == first.heads()
        for n in nodes
    )


# --- convergence --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_lossy_broadcast_then_sync_converges(make_nodes, seed: int) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    nodes: list[Node] = make_nodes(rng.choice([3, 4, 5]), seed)
    now = 0.0
    for _ in range(150):
        for _ in range(rng.randrange(0, 3)):
            random_write(rng.choice(nodes), rng, now)
        gossip_tick(nodes, rng, now, loss=0.3)
        now += 0.2
    for _ in range(10):  # let the queues drain, still lossy
        gossip_tick(nodes, rng, now, loss=0.3)
        now += 0.2
    # Broadcast alone (with loss) leaves nodes behind; sync between random pairs repairs it.
    rounds = 0
    while not converged(nodes):
        rounds += 1
        assert rounds <= 30, "sync did not converge"
        node = rng.choice(nodes)
        others = [n for n in nodes if n is not node]
        sync_with(node, rng.sample(others, rng.randint(1, len(others))), rng)
    assert rounds > 0  # broadcast with loss alone had left some node behind
    assert all(n.stats.sessions_failed == 0 for n in nodes)
    assert nodes[0].store.rows("kv")  # something was written


def test_broadcast_alone_spreads_everything_without_loss(make_nodes) -> None:  # type: ignore[no-untyped-def]
    rng = random.Random(7)
    nodes: list[Node] = make_nodes(5, 7)
    now = 0.0
    for _ in range(30):
        random_write(rng.choice(nodes), rng, now)
        gossip_tick(nodes, rng, now, loss=0.0)
        now += 0.2
    while any(n.bc.queued for n in nodes):
        gossip_tick(nodes, rng, now, loss=0.0)
        now += 0.2
    assert converged(nodes)
    # Relays pass on only what was new to them: nobody received more new pieces than exist.
    total_pieces = sum(n.bc.stats.local_pieces for n in nodes)
    for n in nodes:
        assert n.bc.stats.new_pieces <= total_pieces - n.bc.stats.local_pieces


# --- catch-up ------------------------------------------------------------------------------------------------


def test_missed_1000_versions_caught_up_from_several_peers_each_serving_part(make_nodes) -> None:  # type: ignore[no-untyped-def]
    a, b, c, d = make_nodes(4)
    for i in range(1000):
        a.write([Statement("INSERT INTO kv (k, v) VALUES (?, ?)", [f"k{i}", f"v{i}"])], 0.0)
    everything = a.store.changesets_for(a.store.site_id, 1, 1000)
    b.store.merge(everything)
    c.store.merge(everything)
    d.store.merge([everything[-1]])  # d knows the head, missed 1..999
    assert d.store.needs() == {a.store.site_id: [(1, 999)]}
    rng = random.Random(5)
    sessions = sync_with(d, [a, b, c], rng)
    served = [s.server.changesets for s in sessions]
    assert all(n > 0 for n in served), served  # each peer served a part
    assert sum(served) == 999  # and no version twice
    assert sum(s.applied for s in sessions) == 999
    assert converged([a, b, c, d])


def test_unknown_actor_is_fetched_whole_and_above_head_is_split_by_share(make_nodes) -> None:  # type: ignore[no-untyped-def]
    writers = make_nodes(4)
    holders = make_nodes(3)
    (d,) = make_nodes(1)
    for w in writers:
        for i in range(30):
            w.write([Statement("INSERT INTO kv (k, v) VALUES (?, ?)", [f"{w.id}-{i}", "v"])], 0.0)
        for h in holders:
            h.store.merge(w.store.changesets_for(w.store.site_id, 1, 30))
    rng = random.Random(3)
    sessions = sync_with(d, holders, rng)
    # Every writer's versions arrived exactly once, each from the holder whose share has that actor.
    assert sum(s.server.changesets for s in sessions) == 4 * 30
    for i, s in enumerate(sessions):
        for cs_actor in {w.store.site_id for w in writers}:
            got = share_of(cs_actor, 3) == i
            assert (
                any(
                    isinstance(ev, ChangesReceived) and any(cs.actor == cs_actor for cs in ev.changesets)
                    for ev in s.events
                )
                == got
            )
    assert converged([*holders, d])


def test_a_peer_serves_every_actors_versions_not_only_its_own(make_nodes) -> None:  # type: ignore[no-untyped-def]
    x, y, z, server, client = make_nodes(5)
    for w in (x, y, z, server):
        for i in range(5):
            w.write([Statement("INSERT INTO kv (k, v) VALUES (?, ?)", [f"{w.id}-{i}", "v"])], 0.0)
    for w in (x, y, z):
        server.store.merge(w.store.changesets_for(w.store.site_id, 1, 5))
    client.store.merge(x.store.changesets_for(x.store.site_id, 1, 2))  # knows a little of x only
    state = build_sync_state(client.store, client.store.site_id, random.Random(1))
    s = run_session(client.store, state, server.store, random.Random(2))
    assert isinstance(s.events[0], RequestReceived)
    assert isinstance(s.events[-1], SyncDone) and not s.events[-1].truncated
    got = {
        (cs.actor, cs.version) for ev in s.events if isinstance(ev, ChangesReceived) for cs in ev.changesets
    }
    expected = {(x.store.site_id, v) for v in (3, 4, 5)} | {
        (w.store.site_id, v) for w in (y, z, server) for v in range(1, 6)
    }
    assert got == expected
    assert client.store.rows("kv") == server.store.rows("kv")
    assert client.store.clock_rows("kv") == server.store.clock_rows("kv")


def test_truncated_sessions_resume_until_complete(make_nodes) -> None:  # type: ignore[no-untyped-def]
    a, b = make_nodes(2)
    for i in range(60):
        a.write([Statement("INSERT INTO kv (k, v) VALUES (?, ?)", [f"k{i}", "v"])], 0.0)
    cfg = SyncConfig(max_frames=2, max_changes_per_frame=8, target_frame_bytes=2048)
    rng = random.Random(4)
    sessions = 0
    while True:
        sessions += 1
        assert sessions < 50
        state = build_sync_state(b.store, b.store.site_id, rng, cfg)
        s = run_session(b.store, state, a.store, rng, cfg)
        done = s.events[-1]
        assert isinstance(done, SyncDone)
        assert s.client.frames <= 2
        if not done.truncated:
            break
    assert sessions > 5
    assert converged([a, b])


def test_partial_versions_are_completed_even_when_the_server_has_fewer_seqs(make_nodes) -> None:  # type: ignore[no-untyped-def]
    a, d = make_nodes(2)
    original = a.write(
        [Statement("INSERT INTO kv (k, v) VALUES (?, ?)", [f"k{i}", "v"]) for i in range(6)], 0.0
    )
    assert original is not None
    first = split_changeset(original, 9)[0]
    d.store.merge([first])  # d holds part of version 1 (with the original last_seq)
    assert d.store.books()[a.store.site_id].partials
    # a then deletes the last row: version 1's last changes are superseded at a.
    a.write([Statement("DELETE FROM kv WHERE k = 'k5'")], 0.0)
    now_v1 = a.store.changeset(a.store.site_id, 1)
    assert now_v1 is not None and now_v1.last_seq < original.last_seq
    state = build_sync_state(d.store, d.store.site_id, random.Random(1))
    assert state.partials == [PartialNeed(a.store.site_id, 1, [(first.seqs[1] + 1, original.last_seq)])]
    run_session(d.store, state, a.store, random.Random(2))
    assert converged([a, d])


def test_partial_need_wholly_past_the_servers_last_seq(make_nodes) -> None:  # type: ignore[no-untyped-def]
    a, d = make_nodes(2)
    original = a.write(
        [Statement("INSERT INTO kv (k, v) VALUES (?, ?)", [f"k{i}", "v"]) for i in range(4)], 0.0
    )
    assert original is not None
    pieces = split_changeset(original, 3)  # k0 | k1 | k2 | k3, 3 changes each
    d.store.merge(pieces[:3])
    a.write([Statement("DELETE FROM kv WHERE k = 'k3'")], 0.0)  # k3's changes of v1 all superseded
    state = build_sync_state(d.store, d.store.site_id, random.Random(1))
    run_session(d.store, state, a.store, random.Random(2))
    assert converged([a, d])


# --- the state a client sends -----------------------------------------------------------------------------


def test_state_bounds_and_rotation() -> None:
    me = VersionSource(bytes([1]) * 16)
    other = bytes([2]) * 16
    me.merge([Changeset(other, v, [], (0, 0), 0) for v in range(1, 400, 2)])  # 199 gaps
    me.merge([Changeset(other, 1000, [], (0, 0), 3)])  # a partial version
    cfg = SyncConfig(max_need_ranges=10, max_partials=1)
    state = build_sync_state(me, me.actor, random.Random(1), cfg)
    assert sum(len(n.ranges) for n in state.needs) == 10
    assert state.partials == [PartialNeed(other, 1000, [(1, 3)])]
    assert dict(state.heads) == {other: 1000}
    assert state.complete


def test_too_many_actors_clears_complete_and_the_server_serves_only_listed_ones() -> None:
    me = VersionSource(bytes([200]) * 16)
    me.commit()
    server = VersionSource(bytes([201]) * 16)
    actors = [i.to_bytes(2, "big") * 8 for i in range(1, 41)]
    for a in actors:
        me.merge([Changeset(a, 1, [], (0, 0), 0)])
        server.merge([Changeset(a, v, [], (0, 0), 0) for v in (1, 2)])
    cfg = SyncConfig(max_actors=10)
    state = build_sync_state(me, me.actor, random.Random(1), cfg)
    assert not state.complete and len(state.heads) == 10
    assert me.actor in dict(state.heads)
    s = run_session(me, state, server, None, cfg)
    listed = set(dict(state.heads))
    got = {cs.actor for ev in s.events if isinstance(ev, ChangesReceived) for cs in ev.changesets}
    assert got and got <= listed  # never an actor it left out (it would be served from version 1)


def test_split_deals_disjoint_parts_that_cover_the_whole() -> None:
    a, b = bytes([3]) * 16, bytes([4]) * 16
    state = SyncState(
        actor=bytes([9]) * 16,
        heads=[(a, 5000), (b, 90)],
        needs=[ActorNeed(a, [(1, 1000), (2000, 2100)]), ActorNeed(b, [(5, 5)])],
        partials=[PartialNeed(a, 1500, [(2, 3)]), PartialNeed(b, 7, [(0, 0)])],
    )
    for k in (1, 2, 3, 5):
        parts = split_sync_state(state, k, random.Random(k))
        assert len(parts) == k
        assert [p.share for p in parts] == ([(0, 1)] if k == 1 else [(i, k) for i in range(k)])
        versions: list[tuple[bytes, int]] = []
        for p in parts:
            assert p.heads == state.heads
            for n in p.needs:
                for s, e in n.ranges:
                    versions.extend((n.actor, v) for v in range(s, e + 1))
        assert len(versions) == len(set(versions)) == 1000 + 101 + 1
        dealt = sorted((p.actor, p.version) for q in parts for p in q.partials)
        assert dealt == sorted((p.actor, p.version) for p in state.partials)
        if k > 1:
            assert all(p.needs for p in parts)  # everyone got a part of the gaps


def test_share_of_is_stable_and_spread() -> None:
    actors = [random.Random(i).randbytes(16) for i in range(300)]
    for k in (2, 3, 7):
        counts = [0] * k
        for a in actors:
            assert share_of(a, k) == share_of(a, k)
            counts[share_of(a, k)] += 1
        assert min(counts) > 300 / k / 2
    assert share_of(actors[0], 1) == 0


# --- bad peers --------------------------------------------------------------------------------------------


def some_state(store: Store) -> SyncState:
    return build_sync_state(store, store.site_id, random.Random(0))


def server_stream(source: Store, state: SyncState) -> bytes:
    server = SyncServer(source, 0.0)
    server.receive_data(frame(encode_sync(SyncRequest(PROTOCOL_VERSION, state))), 0.0)
    out = b""
    while chunk := server.data_to_send():
        out += chunk
    return out


@pytest.fixture
def pair(make_nodes) -> tuple[Node, Node]:  # type: ignore[no-untyped-def]
    a, b = make_nodes(2)
    for i in range(20):
        a.write([Statement("INSERT INTO kv (k, v) VALUES (?, ?)", [f"k{i}", "v" * 30])], 0.0)
    return a, b


def feed_all(client: SyncClient, store: Store, data: list[bytes], now: float = 0.0) -> list[SyncEvent]:
    events: list[SyncEvent] = []
    for d in data:
        for ev in client.receive_data(d, now):
            events.append(ev)
            if isinstance(ev, ChangesReceived):
                store.merge(ev.changesets)
    return events


BAD_STREAMS = {
    "garbage": [b"\x00\x00\x00\x05hello"],
    "not msgpack": [frame(bytes([FAMILY_SYNC]) + b"\xc1\xc1")],
    "wrong family": [frame(b"\x02" + msgspec.msgpack.encode([2, 1, []]))],
    "wrong version": [frame(bytes([FAMILY_SYNC]) + msgspec.msgpack.encode([2, 9, []]))],
    "empty frame": [b"\x00\x00\x00\x00"],
    "request from server": [
        frame(encode_sync(SyncRequest(PROTOCOL_VERSION, SyncState(b"a" * 16, [], [], []))))
    ],
    "bad changeset": [
        frame(
            bytes([FAMILY_SYNC])
            + msgspec.msgpack.encode([2, 1, [[b"a" * 16, 0, [], [0, 0], 0, 0]]])  # version 0
        )
    ],
    "value overflow": [
        frame(
            bytes([FAMILY_SYNC])
            + msgspec.msgpack.encode(
                [2, 1, [[b"a" * 16, 1, [["kv", ["k"], "v", 2**64 - 1, 1, 1, b"a" * 16, 1, 0]], [0, 0], 0, 0]]]
            )
        )
    ],
}


@pytest.mark.parametrize("name", sorted(BAD_STREAMS))
def test_garbage_from_the_server_fails_the_session_and_leaves_the_store_alone(pair, name: str) -> None:  # type: ignore[no-untyped-def]
    _a, b = pair
    before = fingerprint(b.store)
    client = SyncClient(some_state(b.store), 0.0)
    events = feed_all(client, b.store, BAD_STREAMS[name])
    assert [type(e) for e in events] == [SyncFailed]
    assert isinstance(events[0], SyncFailed) and events[0].kind is FailKind.PROTOCOL
    assert client.phase is Phase.FAILED and client.get_timer() is None
    assert fingerprint(b.store) == before
    stats = SyncStats()
    stats.observe(events)
    assert stats.sessions_failed == 1 and stats.failures == {FailKind.PROTOCOL: 1}
    # Anything after the failure is ignored (counted), never acted on.
    assert client.receive_data(b"more", 1.0) == [] and client.ignored_bytes == 4


def test_a_frame_with_one_bad_changeset_is_refused_whole(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    good = a.store.changesets_for(a.store.site_id, 1, 1)[0]
    bad = msgspec.structs.replace(
        good, version=2, changes=[msgspec.structs.replace(good.changes[0], db_version=1)]
    )
    payload = encode_sync_changes([encode_piece(good), encode_piece(bad)])
    before = fingerprint(b.store)
    client = SyncClient(some_state(b.store), 0.0)
    events = feed_all(client, b.store, [frame(payload)])
    assert len(events) == 1 and isinstance(events[0], SyncFailed)
    assert fingerprint(b.store) == before


def test_truncated_stream_then_close(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    stream = server_stream(a.store, some_state(b.store))
    before = fingerprint(b.store)
    client = SyncClient(some_state(b.store), 0.0)
    events = feed_all(client, b.store, [stream[:7], b""])
    assert [type(e) for e in events] == [SyncFailed]
    assert isinstance(events[0], SyncFailed) and events[0].kind is FailKind.CLOSED
    assert fingerprint(b.store) == before


def test_oversized_frame_is_refused_at_its_header(pair) -> None:  # type: ignore[no-untyped-def]
    _a, b = pair
    client = SyncClient(some_state(b.store), 0.0, config=SyncConfig(max_frame_bytes=1 << 20))
    events = client.receive_data((1 << 20 + 1).to_bytes(4, "big") + b"x" * 10, 0.0)
    assert len(events) == 1 and isinstance(events[0], SyncFailed) and events[0].kind is FailKind.OVERSIZED


def test_too_many_frames_from_the_server(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    cfg = SyncConfig(max_frames=2, max_changes_per_frame=3)
    pieces = [encode_piece(cs) for cs in a.store.changesets_for(a.store.site_id, 1, 5)]
    flood = b"".join(frame(encode_sync_changes([p])) for p in pieces)
    client = SyncClient(some_state(b.store), 0.0, config=cfg)
    events = feed_all(client, b.store, [flood])
    assert isinstance(events[-1], SyncFailed) and events[-1].kind is FailKind.PROTOCOL
    assert sum(isinstance(e, ChangesReceived) for e in events) == 2


def test_stalling_server_times_out(pair) -> None:  # type: ignore[no-untyped-def]
    _a, b = pair
    cfg = SyncConfig(idle_timeout=5.0, session_timeout=30.0)
    client = SyncClient(some_state(b.store), 100.0, config=cfg)
    assert client.data_to_send() and client.data_to_send() == b""
    assert client.get_timer() == 105.0
    assert client.handle_timer(104.9) == []
    events = client.handle_timer(105.0)
    assert len(events) == 1 and isinstance(events[0], SyncFailed) and events[0].kind is FailKind.TIMEOUT
    # A trickling server (a byte every 4 s) is cut at the session deadline.
    client = SyncClient(some_state(b.store), 0.0, config=cfg)
    trickle = iter((4096).to_bytes(4, "big") + b"x" * 100)
    t = 0.0
    ended: list[SyncEvent] = []
    while not ended:
        t += 4.0
        timer = client.get_timer()
        assert timer is not None
        if timer <= t:
            ended = client.handle_timer(timer)
            break
        assert client.receive_data(bytes([next(trickle)]), t) == []
    assert t <= 32.0 and isinstance(ended[0], SyncFailed) and ended[0].kind is FailKind.TIMEOUT


def test_server_handles_bad_and_stalling_clients(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    before = fingerprint(a.store)
    cfg = SyncConfig(request_timeout=3.0, max_request_bytes=4096)
    cases: dict[str, tuple[list[bytes], FailKind]] = {
        "garbage": ([b"\x00\x00\x00\x03abc"], FailKind.PROTOCOL),
        "oversized": ([(100_000).to_bytes(4, "big")], FailKind.OVERSIZED),
        "closed": ([b"\x00\x00", b""], FailKind.CLOSED),
        "not a request": ([frame(encode_sync(SyncEnd(PROTOCOL_VERSION, False, 0)))], FailKind.PROTOCOL),
        "extra data": (
            [frame(encode_sync(SyncRequest(PROTOCOL_VERSION, some_state(b.store)))) + b"\x00"],
            FailKind.PROTOCOL,
        ),
        "bad share": (
            [
                frame(
                    bytes([FAMILY_SYNC])
                    + msgspec.msgpack.encode([1, 1, [b"a" * 16, [], [], [], True, [3, 2]]])
                )
            ],
            FailKind.PROTOCOL,
        ),
    }
    for name, (data, kind) in cases.items():
        server = SyncServer(a.store, 0.0, config=cfg)
        events: list[SyncEvent] = []
        for d in data:
            events += server.receive_data(d, 0.0)
        assert len(events) == 1 and isinstance(events[0], SyncFailed), name
        assert events[0].kind is kind, name
        assert server.phase is Phase.FAILED and server.get_timer() is None
        reply = server.data_to_send()
        if kind is not FailKind.CLOSED:
            # The client learns why: a reject frame.
            client = SyncClient(some_state(b.store), 0.0)
            (ev,) = client.receive_data(reply, 0.0)
            assert isinstance(ev, SyncFailed) and ev.kind is FailKind.REJECTED
        assert server.data_to_send() == b""
    # A client that never sends its request.
    server = SyncServer(a.store, 10.0, config=cfg)
    server.receive_data(b"\x00\x00", 11.0)
    assert server.get_timer() == 13.0
    (ev,) = server.handle_timer(13.0)
    assert isinstance(ev, SyncFailed) and ev.kind is FailKind.TIMEOUT
    # A client that stops reading: the session deadline ends it mid-send.
    server = SyncServer(a.store, 0.0, config=SyncConfig(session_timeout=20.0, send_buffer_bytes=1))
    server.receive_data(frame(encode_sync(SyncRequest(PROTOCOL_VERSION, some_state(b.store)))), 0.0)
    assert server.data_to_send()
    assert server.phase is Phase.SENDING and server.get_timer() == 20.0
    (ev,) = server.handle_timer(20.0)
    assert isinstance(ev, SyncFailed) and ev.kind is FailKind.TIMEOUT and server.data_to_send() == b""
    assert fingerprint(a.store) == before


def test_reject_frame_for_a_busy_server(pair) -> None:  # type: ignore[no-untyped-def]
    _a, b = pair
    client = SyncClient(some_state(b.store), 0.0)
    (ev,) = client.receive_data(reject_frame("busy"), 0.0)
    assert isinstance(ev, SyncFailed) and ev.kind is FailKind.REJECTED and ev.reason == "busy"


def test_source_errors_end_the_session_not_the_node(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair

    class Broken:
        def books(self):  # type: ignore[no-untyped-def]
            return a.store.books()

        def changesets_for(self, actor: bytes, start: int, end: int) -> list[Changeset]:
            raise RuntimeError("disk on fire")

    server = SyncServer(Broken(), 0.0)
    server.receive_data(frame(encode_sync(SyncRequest(PROTOCOL_VERSION, some_state(b.store)))), 0.0)
    reply = server.data_to_send()
    assert server.phase is Phase.FAILED and server.error is not None and server.error.kind is FailKind.SOURCE
    client = SyncClient(some_state(b.store), 0.0)
    (ev,) = client.receive_data(reply, 0.0)
    assert isinstance(ev, SyncFailed) and ev.kind is FailKind.REJECTED


def test_server_output_comes_in_bounded_chunks(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    cfg = SyncConfig(send_buffer_bytes=600, target_frame_bytes=1024, max_changes_per_frame=10)
    server = SyncServer(a.store, 0.0, config=cfg)
    server.receive_data(frame(encode_sync(SyncRequest(PROTOCOL_VERSION, some_state(b.store)))), 0.0)
    chunks_out = []
    while chunk := server.data_to_send():
        chunks_out.append(chunk)
    assert len(chunks_out) > 3
    # A call stops once it holds send_buffer_bytes, so it overshoots by at most one frame.
    assert max(len(c) for c in chunks_out) <= 600 + 1024 + 64
    client = SyncClient(some_state(b.store), 0.0, config=cfg)
    events = feed_all(client, b.store, chunks_out)
    assert isinstance(events[-1], SyncDone) and events[-1].frames == server.frames
    assert converged([a, b])


# --- scheduler --------------------------------------------------------------------------------------------


def test_scheduler_backoff_between_1_and_15_seconds() -> None:
    sched = SyncScheduler(random.Random(1), now=0.0)
    members = [M(f"p{i}", ("h", i)) for i in range(6)]
    now = sched.get_timer()
    assert 0 <= now <= 1.0
    gaps = []
    for _ in range(40):  # always in sync: the ceiling doubles to 15 s
        assert sched.due(now)
        peers = sched.choose_peers(now, members)
        assert len(peers) == 3
        for p in peers:
            sched.session_done(p.id, now + 0.1, ok=True, received=0)
        nxt = sched.get_timer()
        gaps.append(nxt - now)
        now = nxt
    assert all(1.0 - 1e-9 <= g <= 15.0 + 1e-9 for g in gaps), gaps
    assert max(gaps[-10:]) > 5.0
    # A round that brought changes brings the next one back to about 1 s.
    peers = sched.choose_peers(now, members)
    for p in peers:
        sched.session_done(p.id, now + 0.1, ok=True, received=3)
    assert sched.get_timer() - now <= 1.1 + 1e-9


def test_scheduler_prefers_peers_not_synced_recently_and_skips_running_ones() -> None:
    sched = SyncScheduler(random.Random(2), peers_per_round=2)
    members = [M(f"p{i}", ("h", i)) for i in range(5)]
    first = sched.choose_peers(0.0, members)
    second = sched.choose_peers(1.0, members)  # the first round's sessions are still running
    assert not {m.id for m in first} & {m.id for m in second}
    assert sched.in_flight == {m.id for m in first + second}
    for m in first + second:
        sched.session_done(m.id, 2.0, ok=True, received=0)
    (never,) = [m for m in members if m not in first + second]
    third = sched.choose_peers(3.0, members)
    assert third[0] == never  # never synced comes first
    for m in third:
        sched.session_done(m.id, 4.0, ok=False, received=0)
    # Then the least recently synced (first round, at 2.0, before the third's 4.0).
    fourth = sched.choose_peers(5.0, members)
    assert all(m not in third for m in fourth)
    assert sched.choose_peers(6.0, []) == []


# --- the simulator's version-only source ------------------------------------------------------------------


def test_version_source_nodes_converge_by_broadcast_and_sync() -> None:
    rng = random.Random(11)
    ids = [random.Random(i).randbytes(16) for i in range(6)]
    srcs = [VersionSource(a) for a in ids]
    bcs = [
        Broadcaster(is_new=new_to(s.books), rng=random.Random(i), node_id=f"n{i}") for i, s in enumerate(srcs)
    ]
    members = [M(f"n{i}", ("h", i)) for i in range(6)]
    now = 0.0
    for step in range(100):
        if step < 60:
            i = rng.randrange(6)
            bcs[i].local_commit(srcs[i].commit(last_seq=rng.choice([0, 0, 5])), now)
        for i, bc in enumerate(bcs):
            for payload, addr in bc.tick(now, members):
                if rng.random() < 0.4:
                    continue
                j = addr[1]
                srcs[j].merge(bcs[j].receive(payload, ("h", i), now))
        now += 0.2
    for _ in range(40):
        i = rng.randrange(6)
        peers = rng.sample([j for j in range(6) if j != i], 2)
        state = build_sync_state(srcs[i], ids[i], rng)
        for j, part in zip(peers, split_sync_state(state, 2, rng), strict=True):
            run_session(srcs[i], part, srcs[j], rng)
    heads = {a: s.db_version for a, s in zip(ids, srcs, strict=True)}
    for s in srcs:
        assert s.needs() == {}
        for a, head in heads.items():
            if head:
                assert s.books()[a].known == srcs[ids.index(a)].books()[a].known
                assert not s.books()[a].partials


def test_store_is_a_change_source(make_nodes) -> None:  # type: ignore[no-untyped-def]
    (node,) = make_nodes(1)
    source: ChangeSource = node.store  # structural: checked by mypy where typed
    assert source.books() is node.store.books()


# --- fuzzing ----------------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_decode_sync_raises_only_its_error(data: bytes) -> None:
    for payload in (data, bytes([FAMILY_SYNC]) + data):
        with contextlib.suppress(SyncWireError):
            decode_sync(payload)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8))
def test_fuzz_frame_reader(parts: list[bytes]) -> None:
    reader = FrameReader(1000)
    try:
        for p in parts:
            for payload in reader.feed(p):
                assert 0 < len(payload) <= 1000
    except SyncWireError:
        pass


_A = bytes([5]) * 16
_GOOD = [
    Changeset(_A, v, [Change("kv", (f"k{v}",), "v", "x" * v, 1, v, _A, 1, 0)], (0, 0), 0) for v in range(1, 4)
]
_GOOD_STREAM = (
    frame(encode_sync_changes([encode_piece(cs) for cs in _GOOD]))
    + frame(encode_sync(SyncChanges(PROTOCOL_VERSION, _GOOD[:1])))
    + frame(encode_sync(SyncEnd(PROTOCOL_VERSION, False, 2)))
)
_GOOD_REQUEST = frame(
    encode_sync(
        SyncRequest(
            PROTOCOL_VERSION,
            SyncState(_A, [(_A, 3)], [ActorNeed(_A, [(1, 2)])], [PartialNeed(_A, 3, [(0, 1)])], True, (0, 2)),
        )
    )
)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_streams_never_crash_a_session(data: st.DataObject) -> None:
    for stream, is_client in ((_GOOD_STREAM, True), (_GOOD_REQUEST, False)):
        buf = bytearray(stream)
        for _ in range(data.draw(st.integers(0, 5))):
            buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
        cut = data.draw(st.integers(0, len(buf)))
        blob = bytes(buf[:cut])
        splits = sorted(data.draw(st.lists(st.integers(0, len(blob)), max_size=4)))
        pieces = [blob[i:j] for i, j in zip([0, *splits], [*splits, len(blob)], strict=True)] + [b""]
        if is_client:
            client = SyncClient(SyncState(bytes([6]) * 16, [], [], []), 0.0)
            for p in pieces:
                for ev in client.receive_data(p, 0.0):
                    if isinstance(ev, ChangesReceived):
                        assert all(changeset_problem(cs) is None for cs in ev.changesets)
            assert client.phase in (Phase.DONE, Phase.FAILED)
        else:
            server = SyncServer(VersionSource(bytes([7]) * 16), 0.0)
            for p in pieces:
                server.receive_data(p, 0.0)
            server.data_to_send()
            assert server.phase in (Phase.DONE, Phase.FAILED, Phase.AWAIT_REQUEST)


@settings(max_examples=200, deadline=None)
@given(
    st.sets(st.integers(1, 80), max_size=40),
    st.sets(st.integers(1, 90), max_size=10),
)
def test_gap_computation_matches_the_stores(known: set[int], partial: set[int]) -> None:
    from verdigris.gossip.sync import _gaps
    from verdigris.store import ActorBooks
    from verdigris.store.ranges import RangeSet

    books = ActorBooks()
    for v in known:
        books.known.add(v)
    for v in partial - known:
        books.partials[v] = (RangeSet([(0, 0)]), 2)
    assert _gaps(books) == books.needs()
