"""Broadcaster: splitting, dedupe, bounded retransmission, queue bounds and drop rule, rate limit, bad input.

Everything runs on virtual time with seeded randomness; no sockets, no sleeps."""

from __future__ import annotations

import contextlib
import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verdigris.gossip.broadcast import (
    Addr,
    BroadcastConfig,
    Broadcaster,
    new_to,
    retransmit_limit,
)
from verdigris.gossip.changes_wire import (
    FAMILY_BROADCAST,
    BroadcastWireError,
    broadcast_overhead,
    decode_broadcast,
    encode_broadcast,
    encode_piece,
)
from verdigris.store import Change, Changeset, Statement, Store

SCHEMA = "CREATE TABLE kv (k TEXT NOT NULL PRIMARY KEY, v TEXT, n INTEGER NOT NULL DEFAULT 0);"


@dataclass(frozen=True)
class M:
    id: str
    addr: Addr


def members(n: int, skip: int | None = None) -> list[M]:
    return [M(f"n{i}", ("10.0.0.1", 7000 + i)) for i in range(n) if i != skip]


def actor(i: int) -> bytes:
    return bytes([i]) * 16


def piece(a: int, version: int, *, size: int = 0, seqs: tuple[int, int] = (0, 0), last: int = 0) -> Changeset:
    """A synthetic piece with one change whose value is ``size`` bytes long."""
    ch = Change("kv", (f"k{version}",), "v", "x" * size, 1, version, actor(a), 1, seqs[0])
    return Changeset(actor=actor(a), version=version, changes=[ch], seqs=seqs, last_seq=max(last, seqs[1]))


def always_new(_a: bytes, _v: int, _s: tuple[int, int]) -> bool:
    return True


def make(seed: int = 0, **cfg: object) -> Broadcaster:
    return Broadcaster(is_new=always_new, rng=random.Random(seed), config=BroadcastConfig(**cfg))  # type: ignore[arg-type]


@pytest.fixture
def stores(tmp_path: Path) -> list[Store]:
    out = [Store(tmp_path / f"s{i}.db", schema_sql=SCHEMA) for i in range(2)]
    yield out  # type: ignore[misc]
    for s in out:
        s.close()


def commit(store: Store, stmts: list[Statement]) -> Changeset:
    version = store.transact(stmts).version
    assert version is not None
    cs = store.changeset(store.site_id, version)
    assert cs is not None
    return cs


# --- splitting ------------------------------------------------------------------------------------------


def test_local_commit_splits_into_pieces_that_fit_and_reassemble(stores: list[Store]) -> None:
    a, b = stores
    cs = commit(
        a, [Statement("INSERT INTO kv (k, v) VALUES (?, ?)", [f"key{i}", "v" * 60]) for i in range(40)]
    )
    bc = Broadcaster(is_new=new_to(a.books), rng=random.Random(1))
    n = bc.local_commit(cs, 0.0)
    assert n > 1 and bc.stats.oversized == 0
    # Every datagram fits the budget; gather every piece that goes out and merge them into b.
    got: list[Changeset] = []
    receiver = Broadcaster(is_new=new_to(b.books), rng=random.Random(2))
    t = 0.0
    while bc.queued:
        for payload, _addr in bc.tick(t, members(2)):
            assert len(payload) <= 1100
            got.extend(receiver.receive(payload, ("10.0.0.9", 1), t))
        t += 0.2
    keys = {(p.version, p.seqs) for p in got}
    assert len(keys) == n
    # The pieces' seq ranges tile 0..last_seq.
    ranges = sorted(s for _, s in keys)
    assert ranges[0][0] == 0 and ranges[-1][1] == cs.last_seq
    assert all(x[1] + 1 == y[0] for x, y in itertools.pairwise(ranges))
    result = b.merge(got)
    assert result.applied_versions == [(a.site_id, cs.version)] and not result.rejected
    assert b.rows("kv") == a.rows("kv") and b.clock_rows("kv") == a.clock_rows("kv")


def test_a_change_too_big_for_a_datagram_is_left_to_sync_and_counted(stores: list[Store]) -> None:
    a, b = stores
    stmts = [Statement("INSERT INTO kv (k, v) VALUES (?, ?)", [f"key{i}", "v" * 50]) for i in range(10)]
    stmts.append(Statement("INSERT INTO kv (k, v) VALUES (?, ?)", ["huge", "h" * 5000]))
    cs = commit(a, stmts)
    bc = Broadcaster(is_new=new_to(a.books), rng=random.Random(1))
    queued = bc.local_commit(cs, 0.0)
    assert bc.stats.oversized == 1 and queued >= 1
    receiver = Broadcaster(is_new=new_to(b.books), rng=random.Random(2))
    got = []
    for t in range(40):
        for payload, _ in bc.tick(t * 0.2, members(2)):
            got.extend(receiver.receive(payload, None, t * 0.2))
    result = b.merge(got)
    # The version is still partial at b: the huge change's seqs are missing (sync fetches them).
    assert result.applied_versions == []
    partial = b.books()[a.site_id].partials[cs.version]
    assert partial[0].gaps(0, partial[1])


def test_a_single_small_changeset_is_one_piece() -> None:
    bc = make()
    assert bc.local_commit(piece(1, 1, size=10), 0.0) == 1
    assert bc.queued_keys() == [(actor(1), 1, (0, 0))]


# --- transmission -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 4, 10, 30])
def test_each_piece_is_transmitted_at_most_the_limit_never_twice_to_a_member(n: int) -> None:
    bc = make(seed=n)
    bc.local_commit(piece(1, 1), 0.0)
    peers = members(n)
    limit = retransmit_limit(4, n + 1)
    assert limit == 4 * math.ceil(math.log10(n + 2))
    sent_to: list[Addr] = []
    t = 0.0
    for _ in range(100):
        out = bc.tick(t, peers)
        assert len(out) <= 3
        assert len({addr for _, addr in out}) == len(out)
        sent_to.extend(addr for _, addr in out)
        t += 0.2
    assert len(sent_to) == min(limit, n)
    assert len(set(sent_to)) == len(sent_to)
    assert bc.queued == 0 and bc.get_timer() is None
    assert bc.stats.transmissions == len(sent_to)
    assert bc.stats.expired == 1


def test_several_pieces_are_packed_into_one_datagram() -> None:
    bc = make()
    for v in range(1, 11):
        bc.local_commit(piece(1, v, size=20), 0.0)
    out = bc.tick(0.0, members(1))
    assert len(out) == 1
    payload, _ = out[0]
    assert len(decode_broadcast(payload)) == 10
    assert len(payload) <= 1100


def test_datagrams_respect_the_payload_budget_exactly() -> None:
    bc = make(max_payload=300)
    sizes = [5, 60, 120, 7, 200, 33, 90, 150]
    for v, size in enumerate(sizes, start=1):
        bc.local_commit(piece(1, v, size=size), 0.0)
    t = 0.0
    for _ in range(30):
        for payload, _ in bc.tick(t, members(5)):
            assert len(payload) <= 300
            pieces = decode_broadcast(payload)
            assert len(payload) == broadcast_overhead(len(pieces)) + sum(len(raw) for _, raw in pieces)
        t += 0.2
    assert bc.queued == 0


def test_fewest_transmissions_first() -> None:
    bc = make(max_payload=200)
    bc.local_commit(piece(1, 1, size=100), 0.0)
    bc.tick(0.0, members(1))  # v1 sent once
    bc.local_commit(piece(1, 2, size=100), 0.1)
    # Only one fits per datagram; a fresh member gets v2 (0 transmissions) before v1.
    out = bc.tick(0.2, [M("other", ("10.0.0.2", 1))])
    assert [cs.version for cs, _ in decode_broadcast(out[0][0])] == [2]


def test_a_relayed_piece_is_never_sent_back_to_its_sender() -> None:
    src = make(seed=1)
    src.local_commit(piece(1, 1), 0.0)
    relay = make(seed=2)
    (payload, _), *_ = src.tick(0.0, members(1))
    origin = ("10.0.0.1", 7000)
    assert len(relay.receive(payload, origin, 0.0)) == 1
    peers = members(3)  # includes the origin's address
    t = 0.0
    for _ in range(20):
        for _p, addr in relay.tick(t, peers):
            assert addr != origin
        t += 0.2


def test_node_id_keeps_self_out_of_targets() -> None:
    bc = Broadcaster(is_new=always_new, rng=random.Random(0), node_id="n0")
    bc.local_commit(piece(1, 1), 0.0)
    t = 0.0
    for _ in range(20):
        for _, addr in bc.tick(t, members(3)):
            assert addr != ("10.0.0.1", 7000)
        t += 0.2


def test_pieces_past_a_shrunken_clusters_limit_expire() -> None:
    bc = make()
    bc.local_commit(piece(1, 1), 0.0)
    big = members(200)  # limit 4*3 = 12
    for i in range(3):
        bc.tick(i * 0.2, big)
    assert bc.transmits_of((actor(1), 1, (0, 0))) == 9
    assert bc.tick(1.0, members(2)) == []  # limit now 4: already past it
    assert bc.queued == 0 and bc.stats.expired == 1


# --- dedupe -----------------------------------------------------------------------------------------------


def test_only_new_pieces_are_returned_and_relayed(stores: list[Store]) -> None:
    a, b = stores
    cs = commit(a, [Statement("INSERT INTO kv (k, v) VALUES ('x', 'y')")])
    src = Broadcaster(is_new=new_to(a.books), rng=random.Random(1))
    src.local_commit(cs, 0.0)
    (payload, _), *_ = src.tick(0.0, members(1))
    node = Broadcaster(is_new=new_to(b.books), rng=random.Random(2))
    first = node.receive(payload, ("10.0.0.5", 1), 0.0)
    assert len(first) == 1 and node.queued == 1
    # Again before merging (still queued): a duplicate, not returned twice.
    assert node.receive(payload, ("10.0.0.6", 1), 0.0) == []
    b.merge(first)
    # Once relayed out and forgotten, the store's books still say it is not new.
    t = 0.0
    while node.queued:
        node.tick(t, members(3))
        t += 0.2
    assert node.receive(payload, ("10.0.0.7", 1), t) == []
    assert node.stats.new_pieces == 1 and node.stats.duplicate_pieces == 2
    assert node.queued == 0


def test_what_a_node_already_had_from_sync_is_not_rebroadcast(stores: list[Store]) -> None:
    a, b = stores
    cs = commit(a, [Statement("INSERT INTO kv (k, v) VALUES ('x', 'y')")])
    b.merge([cs])  # b got it some other way (sync)
    src = Broadcaster(is_new=new_to(a.books), rng=random.Random(1))
    src.local_commit(cs, 0.0)
    (payload, _), *_ = src.tick(0.0, members(1))
    node = Broadcaster(is_new=new_to(b.books), rng=random.Random(2))
    assert node.receive(payload, None, 0.0) == []
    assert node.queued == 0 and node.tick(0.2, members(4)) == []
    # Its own versions coming back are not new either.
    back = Broadcaster(is_new=new_to(a.books), rng=random.Random(3))
    assert back.receive(payload, None, 0.0) == []


def test_new_to_partial_pieces(stores: list[Store]) -> None:
    a, b = stores
    cs = commit(a, [Statement("INSERT INTO kv (k, v) VALUES (?, ?)", [f"k{i}", "v"]) for i in range(4)])
    first, second = (
        Changeset(cs.actor, cs.version, [c for c in cs.changes if c.seq <= 3], (0, 3), cs.last_seq),
        Changeset(cs.actor, cs.version, [c for c in cs.changes if c.seq > 3], (4, cs.last_seq), cs.last_seq),
    )
    is_new = new_to(b.books)
    b.merge([first])
    assert not is_new(cs.actor, cs.version, (0, 3))
    assert not is_new(cs.actor, cs.version, (1, 2))
    assert is_new(cs.actor, cs.version, (4, cs.last_seq))
    b.merge([second])
    assert not is_new(cs.actor, cs.version, (4, cs.last_seq))


def test_discard_drops_a_versions_pieces() -> None:
    bc = make(max_payload=200)
    cs = Changeset(
        actor(1),
        1,
        [Change("kv", (f"k{i}",), "v", "x" * 60, 1, 1, actor(1), 1, i) for i in range(6)],
        (0, 5),
        5,
    )
    n = bc.local_commit(cs, 0.0)
    bc.local_commit(piece(1, 2), 0.0)
    assert bc.discard(actor(1), 1) == n
    assert bc.queued_keys() == [(actor(1), 2, (0, 0))]


# --- bounds -----------------------------------------------------------------------------------------------


def test_queue_entry_bound_drops_oldest_when_counts_are_equal() -> None:
    bc = make(max_queue_entries=5)
    for v in range(1, 9):
        bc.local_commit(piece(1, v), 0.0)
    assert bc.queued == 5 and bc.stats.dropped == 3
    assert [k[1] for k in bc.queued_keys()] == [4, 5, 6, 7, 8]


def test_queue_drops_most_transmitted_first() -> None:
    bc = make(max_queue_entries=4, max_payload=160, fanout=1, max_datagrams_per_target=1)
    for v in (1, 2):
        bc.local_commit(piece(1, v, size=70), 0.0)  # one per datagram
    # One datagram to one member per tick: v1 then v2 get one transmission each; v1 a second one.
    peers = members(30)
    bc.tick(0.0, peers)  # v1 -> 1
    bc.tick(0.2, peers)  # v2 (fewest) -> 1
    bc.tick(0.4, peers)  # v1 -> 2 (oldest among equals)
    assert bc.transmits_of((actor(1), 1, (0, 0))) == 2
    assert bc.transmits_of((actor(1), 2, (0, 0))) == 1
    for v in (3, 4, 5):
        bc.local_commit(piece(1, v, size=70), 0.5)
    # Full at 4: v1 (most transmissions) went first.
    assert sorted(k[1] for k in bc.queued_keys()) == [2, 3, 4, 5]
    bc.local_commit(piece(1, 6, size=70), 0.6)
    # Next: v2 (1 transmission) before the untransmitted, older or not.
    assert sorted(k[1] for k in bc.queued_keys()) == [3, 4, 5, 6]
    bc.local_commit(piece(1, 7, size=70), 0.7)
    assert sorted(k[1] for k in bc.queued_keys()) == [4, 5, 6, 7]  # then oldest
    assert bc.stats.dropped == 3


def test_queue_byte_bound() -> None:
    bc = make(max_queue_bytes=2000, max_payload=1100)
    for v in range(1, 30):
        bc.local_commit(piece(1, v, size=200), 0.0)
        assert bc.queued_bytes <= 2000
    assert bc.stats.dropped > 0
    assert bc.queued_bytes == sum(len(encode_piece(piece(1, v, size=200))) for _, v, _ in bc.queued_keys())


def test_rate_limit_caps_bytes_per_second() -> None:
    rate, burst = 5000.0, 2200
    bc = make(rate_bytes_per_sec=rate, burst_bytes=burst, max_queue_entries=100_000)
    peers = members(20)
    for v in range(1, 400):
        bc.local_commit(piece(1, v, size=150), 0.0)
    t = 0.0
    sent = 0
    while t < 10.0:
        for payload, _ in bc.tick(t, peers):
            sent += len(payload)
        assert sent <= burst + rate * t + 1e-6
        t += 0.2
    assert sent >= rate * 9  # and it does use the budget
    assert bc.stats.rate_limited > 0
    assert bc.stats.sent_bytes == sent


def test_get_timer_follows_the_interval_and_the_rate_limit() -> None:
    bc = make(rate_bytes_per_sec=1100.0, burst_bytes=1100)
    assert bc.get_timer() is None
    bc.local_commit(piece(1, 1, size=900), 5.0)
    assert bc.get_timer() == 5.0
    bc.tick(5.0, members(1))
    bc.local_commit(piece(1, 2, size=900), 5.1)
    # Next tick at 5.2, but the bucket needs ~0.9 s to hold a full datagram again.
    timer = bc.get_timer()
    assert timer is not None and timer > 5.2
    assert bc.tick(5.2, members(1)) == []  # held back
    assert bc.tick(timer, members(1)) != []


# --- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\x02",
        b"\x01hello",
        b"\x02\xc1",
        b"\x02" + msgspec.msgpack.encode([1, 2, []]),  # unsupported protocol version
        b"\x02" + msgspec.msgpack.encode([1, 1, [[b"short", 1, [], [0, 0], 0, 0]]]),
        b"\x02" + msgspec.msgpack.encode([1, 1, [[b"a" * 16, 2**64 - 1, [], [0, 0], 0, 0]]]),
        b"\x02" + msgspec.msgpack.encode([1, 1, [[b"a" * 16, 1, [], [3, 1], 5, 0]]]),
        b"\x02" + b"\x91" * 50_000,
        b"\x02" + b"\x00" * 70_000,
    ],
)
def test_bad_payloads_are_counted_and_dropped(payload: bytes) -> None:
    bc = make()
    assert bc.receive(payload, None, 0.0) == []
    assert bc.stats.bad_payloads == 1 and bc.last_error
    with pytest.raises(BroadcastWireError):
        decode_broadcast(payload)


def test_values_sqlite_cannot_hold_are_refused_at_the_wire() -> None:
    def with_val(val: object, pk: tuple[object, ...] = ("k",)) -> bytes:
        ch = ["kv", list(pk), "v", val, 1, 1, b"a" * 16, 1, 0]
        return b"\x02" + msgspec.msgpack.encode([1, 1, [[b"a" * 16, 1, [ch], [0, 0], 0, 0]]])

    for bad in (2**63, 2**64 - 1, True, [1], {"a": 1}, msgspec.msgpack.Ext(1, b"x")):
        with pytest.raises(BroadcastWireError):
            decode_broadcast(with_val(bad))
    with pytest.raises(BroadcastWireError):
        decode_broadcast(with_val("ok", pk=(2**64 - 1,)))
    assert decode_broadcast(with_val(2**63 - 1))[0][0].changes[0].val == 2**63 - 1


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_decode_broadcast_raises_only_its_error(data: bytes) -> None:
    for payload in (data, bytes([FAMILY_BROADCAST]) + data):
        with contextlib.suppress(BroadcastWireError):
            decode_broadcast(payload)


valid_payload = encode_broadcast([encode_piece(piece(1, 3, size=5)), encode_piece(piece(2, 4, size=0))])


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_mutated_valid_payloads(data: st.DataObject) -> None:
    buf = bytearray(valid_payload)
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    bc = make()
    for payload in (bytes(buf), bytes(buf[:cut])):
        try:
            for cs, raw in decode_broadcast(payload):
                assert encode_piece(cs) == raw or len(raw) > 0
        except BroadcastWireError:
            pass
        bc.receive(payload, None, 0.0)  # never raises


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        BroadcastConfig(max_payload=50)
    with pytest.raises(ValueError):
        BroadcastConfig(burst_bytes=100)
    with pytest.raises(ValueError):
        BroadcastConfig(fanout=0)
