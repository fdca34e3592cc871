"""The packet envelope: AES-GCM sealing, plaintext mode, freshness, replays, key rotation, fuzzing."""

from __future__ import annotations

import base64
import itertools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from verdigris.gossip.codec import (
    DEFAULT_MAX_PACKET,
    ENCRYPTED_OVERHEAD,
    PLAINTEXT_OVERHEAD,
    REASONS,
    VERSION_AES_GCM,
    VERSION_PLAINTEXT,
    DecodeError,
    PacketCodec,
)
from verdigris.gossip.keyring import Keyring

NOW = 1_700_000_000.0
CLUSTER = 7


def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


OLD, NEW, OTHER = key(1), key(2), key(3)
_counter = itertools.count(1)


def nonce() -> bytes:
    """Distinct 12-byte nonces (the runtime passes os.urandom(12); tests want determinism)."""
    return next(_counter).to_bytes(12, "big")


def codec(*keys: str, cluster: int = CLUSTER, **kw: object) -> PacketCodec:
    return PacketCodec(Keyring(keys or (OLD,)), cluster, **kw)  # type: ignore[arg-type]


def plain(cluster: int = CLUSTER, **kw: object) -> PacketCodec:
    return PacketCodec(None, cluster, plaintext=True, **kw)  # type: ignore[arg-type]


def reason_of(c: PacketCodec, packet: bytes, now: float = NOW) -> str:
    with pytest.raises(DecodeError) as info:
        c.open(packet, now)
    return info.value.reason


# --- round trips -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 100, 1200, DEFAULT_MAX_PACKET - ENCRYPTED_OVERHEAD])
def test_encrypted_round_trip(size: int) -> None:
    a, b = codec(), codec()
    payload = (b"verdigris gossip " * (size // 17 + 1))[:size]
    packet = a.seal(payload, NOW, nonce())
    assert len(packet) == len(payload) + ENCRYPTED_OVERHEAD == len(payload) + a.overhead
    assert packet[0] == VERSION_AES_GCM
    if size >= 64:
        assert payload[:64] not in packet  # encrypted, not merely framed
    assert b.open(packet, NOW + 1) == payload
    assert b.opened == 1 and b.opened_with_secondary == 0
    assert sum(b.stats.values()) == 0


@pytest.mark.parametrize("size", [0, 1, 1200, DEFAULT_MAX_PACKET - PLAINTEXT_OVERHEAD])
def test_plaintext_round_trip(size: int) -> None:
    a, b = plain(), plain()
    payload = b"p" * size
    packet = a.seal(payload, NOW, b"")
    assert len(packet) == size + PLAINTEXT_OVERHEAD == size + a.overhead
    assert packet[0] == VERSION_PLAINTEXT
    assert packet[1:3] == CLUSTER.to_bytes(2, "big")
    assert b.open(packet, NOW) == payload


def test_open_accepts_bytes_like() -> None:
    a, b = codec(), codec()
    packet = a.seal(b"hello", NOW, nonce())
    assert b.open(bytearray(packet), NOW) == b"hello"
    packet = a.seal(b"again", NOW, nonce())
    assert b.open(memoryview(packet), NOW) == b"again"
    packet = a.seal(b"abc", NOW, nonce())
    assert len(packet) % 4 == 0
    assert b.open(memoryview(packet).cast("I"), NOW) == b"abc"  # measured in bytes, not items
    packet = a.seal(b"strided", NOW, nonce())
    assert b.open(memoryview(bytes(x for byte in packet for x in (byte, 0)))[::2], NOW) == b"strided"


def test_stats_start_at_zero_for_every_reason() -> None:
    assert codec().stats == dict.fromkeys(REASONS, 0)
    assert plain().stats == dict.fromkeys(REASONS, 0)


def test_decode_error_carries_a_reason() -> None:
    e = DecodeError("stale", "5 ms")
    assert e.reason == "stale" and e.detail == "5 ms"
    assert str(e) == "stale: 5 ms"
    assert str(DecodeError("truncated")) == "truncated"


# --- authentication --------------------------------------------------------------------------------------


def test_wrong_key_fails_authentication() -> None:
    packet = codec(OLD).seal(b"secret", NOW, nonce())
    receiver = codec(OTHER)
    assert reason_of(receiver, packet) == "auth_failed"
    assert receiver.stats["auth_failed"] == 1


def test_other_cluster_is_refused() -> None:
    packet = codec(cluster=1).seal(b"x", NOW, nonce())
    assert reason_of(codec(cluster=2), packet) == "auth_failed"  # the cluster id is in the AAD only
    packet = plain(cluster=1).seal(b"x", NOW, b"")
    receiver = plain(cluster=2)
    assert reason_of(receiver, packet) == "wrong_cluster"
    assert receiver.stats["wrong_cluster"] == 1


def test_truncated_at_every_length() -> None:
    packet = codec().seal(b"0123456789" * 4, NOW, nonce())
    receiver = codec()
    for n in range(len(packet)):
        expected = "truncated" if n < ENCRYPTED_OVERHEAD else "auth_failed"
        assert reason_of(receiver, packet[:n]) == expected, n
    assert receiver.stats["truncated"] == ENCRYPTED_OVERHEAD
    assert receiver.open(packet, NOW) == b"0123456789" * 4


def test_plaintext_truncated_header() -> None:
    packet = plain().seal(b"abc", NOW, b"")
    receiver = plain()
    for n in range(PLAINTEXT_OVERHEAD):
        assert reason_of(receiver, packet[:n]) == "truncated", n


def test_every_bit_flip_is_detected() -> None:
    payload = b"the quick brown fox"
    packet = codec().seal(payload, NOW, nonce())
    receiver = codec()
    for i in range(len(packet)):
        for bit in range(8):
            mutated = bytearray(packet)
            mutated[i] ^= 1 << bit
            reason = reason_of(receiver, bytes(mutated))
            if i == 0:
                # The version byte is read before authentication; 0xA1 ^ 0x10 happens to be the
                # plaintext version, which an encrypted codec refuses by name.
                assert reason in ("bad_version", "plaintext_refused"), (i, bit)
            else:
                assert reason == "auth_failed", (i, bit)
    assert receiver.open(packet, NOW) == payload


def test_plaintext_and_encrypted_refuse_each_other() -> None:
    enc_packet = codec().seal(b"x", NOW, nonce())
    plain_packet = plain().seal(b"x", NOW, b"")
    assert reason_of(plain(), enc_packet) == "encrypted_refused"
    assert reason_of(codec(), plain_packet) == "plaintext_refused"


@pytest.mark.parametrize("version", [0x00, 0x01, 0xA0, 0xFF])
def test_unknown_version(version: int) -> None:
    packet = bytearray(codec().seal(b"x", NOW, nonce()))
    packet[0] = version
    assert reason_of(codec(), bytes(packet)) == "bad_version"
    assert reason_of(plain(), bytes(packet)) == "bad_version"


def test_too_large() -> None:
    receiver = codec()
    assert reason_of(receiver, bytes(DEFAULT_MAX_PACKET + 1)) == "too_large"
    small = codec(max_packet=100)
    assert small.max_payload == 100 - ENCRYPTED_OVERHEAD
    small.seal(bytes(small.max_payload), NOW, nonce())
    with pytest.raises(ValueError, match="exceeds the 63-byte limit"):
        small.seal(bytes(64), NOW, nonce())
    assert reason_of(small, codec().seal(bytes(64), NOW, nonce())) == "too_large"
    with pytest.raises(ValueError, match="exceeds"):
        plain().seal(bytes(DEFAULT_MAX_PACKET), NOW, b"")


# --- freshness and replays -------------------------------------------------------------------------------


def test_replay_is_dropped() -> None:
    a, b = codec(), codec()
    packet = a.seal(b"once", NOW, nonce())
    assert b.open(packet, NOW) == b"once"
    assert reason_of(b, packet, NOW + 1) == "replayed"
    assert b.stats["replayed"] == 1
    # The same payload sealed again (fresh nonce) is a new packet, not a replay.
    assert b.open(a.seal(b"once", NOW, nonce()), NOW + 1) == b"once"


def test_old_and_future_timestamps_are_stale() -> None:
    a, b = codec(), codec(replay_window_s=30)
    assert reason_of(b, a.seal(b"x", NOW - 30.001, nonce()), NOW) == "stale"
    assert reason_of(b, a.seal(b"x", NOW + 30.001, nonce()), NOW) == "stale"
    assert b.open(a.seal(b"x", NOW - 30, nonce()), NOW) == b"x"
    assert b.open(a.seal(b"x", NOW + 30, nonce()), NOW) == b"x"
    assert b.stats["stale"] == 2
    p = plain()
    assert reason_of(p, plain().seal(b"x", NOW - 31, b""), NOW) == "stale"


def test_a_replay_after_the_window_is_stale() -> None:
    a, b = codec(), codec()
    packet = a.seal(b"x", NOW, nonce())
    b.open(packet, NOW)
    assert b.replay_cache_size == 1
    assert reason_of(b, packet, NOW + 31) == "stale"
    b.open(a.seal(b"y", NOW + 31, nonce()), NOW + 31)
    assert b.replay_cache_size == 1  # the first nonce was pruned once the window passed it


def test_small_clock_step_back_does_not_reopen_the_window() -> None:
    a, b = codec(), codec()
    packet = a.seal(b"x", NOW, nonce())
    b.open(packet, NOW)
    b.open(a.seal(b"y", NOW + 40, nonce()), NOW + 40)  # prunes the first nonce
    # The receiver's clock steps back 20 s (less than the window): the old packet stays stale.
    assert reason_of(b, packet, NOW + 20) == "stale"
    assert b.clock_steps == 0
    # A step back of more than the window is a clock reset: the codec follows the new time.
    assert b.open(a.seal(b"z", NOW, nonce()), NOW) == b"z"
    assert b.clock_steps == 1


def test_full_cache_evicts_oldest_and_raises_a_stale_floor() -> None:
    a, b = codec(), codec(max_replay_cache=3)
    packets = [a.seal(bytes([i]), NOW + i, nonce()) for i in range(4)]
    # Arrival order differs from timestamp order: eviction goes by timestamp.
    for i in (1, 0, 2, 3):
        assert b.open(packets[i], NOW + 4) == bytes([i])
    assert b.replay_cache_size == 3
    assert b.evictions == 1
    # Packet 0 was evicted; its replay can no longer be recognised, so it (and anything as old) is stale.
    assert reason_of(b, packets[0], NOW + 4) == "stale"
    assert reason_of(b, a.seal(b"late", NOW - 1, nonce()), NOW + 4) == "stale"
    # Kept entries still catch replays; newer packets still flow.
    assert reason_of(b, packets[2], NOW + 4) == "replayed"
    assert b.open(a.seal(b"new", NOW + 4, nonce()), NOW + 4) == b"new"
    assert b.replay_cache_size == 3
    assert b.evictions == 2


def test_seal_rejects_bad_nonce_and_time() -> None:
    c = codec()
    with pytest.raises(ValueError, match="nonce must be 12 bytes"):
        c.seal(b"x", NOW, b"short")
    with pytest.raises(ValueError, match="finite"):
        c.seal(b"x", float("nan"), nonce())
    with pytest.raises(ValueError, match="timestamp range"):
        c.seal(b"x", -5.0, nonce())
    plain().seal(b"x", NOW, b"")  # plaintext mode ignores the nonce


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"keyring": None}, "needs a keyring"),
        ({"plaintext": True}, "choose one"),
        ({"cluster_id": 65536}, "u16"),
        ({"cluster_id": -1}, "u16"),
        ({"replay_window_s": 0}, "replay_window_s"),
        ({"replay_window_s": float("inf")}, "replay_window_s"),
        ({"max_replay_cache": 0}, "max_replay_cache"),
        ({"max_packet": 36}, "max_packet"),
    ],
)
def test_constructor_validation(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"keyring": Keyring([OLD]), "cluster_id": 1}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        PacketCodec(**args)  # type: ignore[arg-type]


# --- key rotation ----------------------------------------------------------------------------------------


def test_rotation_without_downtime() -> None:
    rings = {name: Keyring([OLD]) for name in "ABC"}
    nodes = {name: PacketCodec(ring, CLUSTER) for name, ring in rings.items()}
    clock = itertools.count(NOW, 0.5)

    def all_hear_all() -> None:
        for sender, receiver in itertools.permutations(nodes, 2):
            t = next(clock)
            packet = nodes[sender].seal(f"{sender}->{receiver}".encode(), t, nonce())
            assert nodes[receiver].open(packet, t) == f"{sender}->{receiver}".encode()

    all_hear_all()
    # Step 1: install the new key everywhere (nothing changes on the wire yet).
    for ring in rings.values():
        ring.install(NEW)
    all_hear_all()
    # Step 2, half done: A sends with NEW, B and C still send with OLD. Everybody understands everybody.
    rings["A"].use(NEW)
    all_hear_all()
    assert nodes["B"].opened_with_secondary > 0  # B decrypted A's NEW packets with its secondary key
    assert nodes["A"].opened_with_secondary > 0  # A decrypted B's and C's OLD packets
    # Step 2 complete.
    rings["B"].use(NEW)
    rings["C"].use(NEW)
    before = {name: c.opened_with_secondary for name, c in nodes.items()}
    all_hear_all()
    assert {name: c.opened_with_secondary for name, c in nodes.items()} == before  # nobody uses OLD now
    # Step 3: remove OLD everywhere; a packet still sealed with OLD (a node that missed the rotation,
    # or an attacker holding the retired key) is rejected.
    for ring in rings.values():
        ring.remove(OLD)
        assert ring.list() == [NEW]
    all_hear_all()
    laggard = PacketCodec(Keyring([OLD]), CLUSTER)
    t = next(clock)
    old_packet = laggard.seal(b"still on the old key", t, nonce())
    for c in nodes.values():
        assert reason_of(c, old_packet, t) == "auth_failed"


# --- fuzzing ---------------------------------------------------------------------------------------------

_SENDER = codec()
_VALID = _SENDER.seal(b"payload" * 20, NOW, nonce())
_PLAIN_VALID = plain().seal(b"payload" * 20, NOW, b"")


def _mutations(base: bytes) -> st.SearchStrategy[bytes]:
    positions = st.integers(min_value=0, max_value=len(base))
    insert = st.tuples(positions, st.binary(min_size=1, max_size=16)).map(
        lambda t: base[: t[0]] + t[1] + base[t[0] :]
    )
    if not base:
        return insert
    flip = st.tuples(st.integers(0, len(base) - 1), st.integers(1, 255)).map(
        lambda t: base[: t[0]] + bytes([base[t[0]] ^ t[1]]) + base[t[0] + 1 :]
    )
    cut = positions.map(lambda i: base[:i])
    drop_head = positions.map(lambda i: base[i:])
    splice = st.tuples(positions, positions, st.binary(max_size=64)).map(
        lambda t: base[: min(t[0], t[1])] + t[2] + base[max(t[0], t[1]) :]
    )
    return st.one_of(flip, cut, drop_head, insert, splice)


def _mutated_many(base: bytes) -> st.SearchStrategy[bytes]:
    return st.recursive(st.just(base), lambda inner: inner.flatmap(_mutations), max_leaves=4)


def _only_decode_errors(c: PacketCodec, data: bytes, now: float) -> bytes | None:
    try:
        return c.open(data, now)
    except DecodeError as e:
        assert e.reason in REASONS
        return None


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(
        st.binary(max_size=200),
        st.builds(  # around the size limit, cheaply
            lambda n, head: (head + bytes(n))[:n],
            st.integers(DEFAULT_MAX_PACKET - 2, DEFAULT_MAX_PACKET + 2),
            st.binary(max_size=64),
        ),
        st.binary(max_size=200).map(lambda b: bytes([VERSION_AES_GCM]) + b),
        st.binary(max_size=200).map(lambda b: bytes([VERSION_PLAINTEXT]) + CLUSTER.to_bytes(2, "big") + b),
    ),
    now=st.one_of(st.just(NOW), st.floats(min_value=0, max_value=2e10)),
)
def test_random_bytes_only_raise_decode_error(data: bytes, now: float) -> None:
    assert _only_decode_errors(codec(), data, now) is None  # no forgery without the key
    _only_decode_errors(plain(), data, now)  # plaintext has no authenticity: success is allowed


@settings(max_examples=400, deadline=None)
@given(data=_mutated_many(_VALID))
def test_mutated_packets_only_raise_decode_error(data: bytes) -> None:
    result = _only_decode_errors(codec(), data, NOW)
    assert result is None or data == _VALID


@settings(max_examples=300, deadline=None)
@given(data=_mutated_many(_PLAIN_VALID))
def test_mutated_plaintext_packets_only_raise_decode_error(data: bytes) -> None:
    _only_decode_errors(plain(), data, NOW)
