"""The membership wire format: round trips, bounds, and fuzzing (only DecodeError may escape a decoder)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from verdigris.gossip import Membership, wire

CLUSTER = "verdigris"

node_ids = st.text(min_size=1, max_size=20)
seqs = st.integers(min_value=0, max_value=0xFFFF_FFFF)
incs = st.integers(min_value=0, max_value=2**63 - 1)
hosts = st.text(min_size=1, max_size=40)
ports = st.integers(min_value=0, max_value=65_535)
metas = st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=16), max_size=4)

controls = st.one_of(
    st.none(),
    st.builds(wire.Ping, seqs, node_ids),
    st.builds(wire.Ack, seqs),
    st.builds(wire.PingReq, seqs, node_ids, hosts, ports, st.booleans()),
    st.builds(wire.Nack, seqs),
    st.builds(wire.Announce, seqs, st.booleans()),
    st.builds(wire.Feed, seqs),
)
updates = st.one_of(
    st.builds(wire.Alive, node_ids, incs, hosts, ports, metas),
    st.builds(wire.Suspect, node_ids, incs, node_ids),
    st.builds(wire.Dead, node_ids, incs, node_ids),
    st.builds(wire.Left, node_ids, incs),
)
packets = st.builds(
    lambda sender, inc, msg, ups: wire.encode_packet(CLUSTER, sender, inc, msg, ups),
    node_ids,
    incs,
    controls,
    st.lists(updates, max_size=40),
)


def decode_or_error(data: bytes) -> wire.Packet | None:
    try:
        return wire.decode_packet(data, CLUSTER)
    except wire.DecodeError:
        return None


@settings(deadline=None)
@given(node_ids, incs, controls, st.lists(updates, max_size=40))
def test_round_trip(sender: str, inc: int, msg: wire.Control | None, ups: list[wire.Update]) -> None:
    data = wire.encode_packet(CLUSTER, sender, inc, msg, ups)
    assert data[0] == wire.PROTOCOL_VERSION
    assert wire.decode_packet(data, CLUSTER) == wire.Packet(CLUSTER, sender, inc, msg, ups)


def test_assemble_handles_every_array_header_size() -> None:
    head = wire.encode_head(CLUSTER, "a", 1, None)
    for n in (0, 15, 16, 300, 4096):
        ups = [wire.encode_update(wire.Left(f"n{i}", i)) for i in range(n)]
        packet = wire.decode_packet(wire.assemble(head, ups), CLUSTER)
        assert len(packet.updates) == n


def test_version_cluster_and_bounds_are_enforced() -> None:
    good = wire.encode_packet(CLUSTER, "a", 0, wire.Ack(1))
    for bad in (
        b"",
        bytes([wire.PROTOCOL_VERSION + 1]) + good[1:],
        good[:-1],
        good + b"\x00",
        b"\x01" + b"\x00" * wire.MAX_DATAGRAM,
        wire.encode_packet("other", "a", 0, wire.Ack(1)),
        wire.encode_packet(CLUSTER, "", 0, wire.Ack(1)),  # empty node id
        wire.encode_packet(CLUSTER, "a", 0, wire.Ack(2**32)),  # seq out of range
        wire.encode_packet(CLUSTER, "a", -1, None),
        wire.encode_packet(CLUSTER, "a", 0, wire.PingReq(1, "b", "h", 70_000, True)),
        wire.encode_packet(CLUSTER, "a", 0, None, [wire.Alive("b", 0, "h", 1, {"k": "v" * 300})]),
    ):
        assert decode_or_error(bad) is None, bad[:40]
    assert decode_or_error(good) is not None


def test_encode_checked_rejects_what_receivers_would() -> None:
    assert wire.encode_checked(wire.Alive("a", 0, "h", 1, {}))
    for bad in (wire.Alive("a" * 200, 0, "h", 1, {}), wire.Alive("a", 0, "", 1, {})):
        try:
            wire.encode_checked(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000))
def test_fuzz_random_bytes(data: bytes) -> None:
    decode_or_error(data)
    decode_or_error(b"\x01" + data)


@settings(max_examples=300, deadline=None)
@given(packets, st.data())
def test_fuzz_truncated_and_corrupted_packets(data: bytes, draw: st.DataObject) -> None:
    cut = draw.draw(st.integers(min_value=0, max_value=len(data) - 1))
    assert decode_or_error(data[:cut]) is None  # a proper prefix is never a packet
    flips = draw.draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)), max_size=4))
    mutated = bytearray(data)
    for pos, x in flips:
        mutated[pos] ^= x
    decode_or_error(bytes(mutated))


def _two_nodes() -> tuple[Membership, Membership]:
    a = Membership("a", ("10.0.0.1", 1), rng=random.Random(1))
    b = Membership("b", ("10.0.0.2", 2), rng=random.Random(2))
    a.join([], 0.0)
    b.join([a.addr], 0.0)
    for _ in range(3):  # a couple of exchanges: announce, feed, gossip
        for src, dst in ((b, a), (a, b)):
            for data, _addr in src.datagrams_to_send(0.0):
                dst.receive_datagram(data, src.addr, 0.0)
    return a, b


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=300), packets), max_size=20))
def test_membership_survives_garbage_and_keeps_working(junk: list[bytes]) -> None:
    a, b = _two_nodes()
    assert (a.member("b") or None) is not None
    for i, data in enumerate(junk):
        a.receive_datagram(data, ("10.0.0.66", 66), 0.1 + i * 0.001)  # must never raise
    # still a working node: a ping from b is answered
    ping = wire.encode_packet(CLUSTER, "b", b.incarnation, wire.Ping(99, "a"))
    a.datagrams_to_send(1.0)
    a.receive_datagram(ping, b.addr, 1.0)
    out = [wire.decode_packet(d, CLUSTER) for d, addr in a.datagrams_to_send(1.0) if addr == b.addr]
    assert any(isinstance(p.msg, wire.Ack) and p.msg.seq == 99 for p in out)
    assert a.stats.bad_packets <= len(junk)
    # the timer machinery still works too
    t = a.get_timer()
    assert t is not None
    a.handle_timer(t)
