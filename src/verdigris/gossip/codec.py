"""The packet envelope: every gossip datagram and stream frame is sealed here before it leaves a node and
opened here before anything else reads it. Sans-IO: the caller passes the current time and the random
nonce in; nothing here reads a clock, a socket or a random source.

Encrypted packet (the default; version byte :data:`VERSION_AES_GCM`)::

    +---------+-----------+-----------------------------------------------+-----------+
    | version | nonce     | AES-GCM ciphertext of  timestamp_ms ‖ payload | tag       |
    | 1 byte  | 12 bytes  | 8 + len(payload) bytes                        | 16 bytes  |
    +---------+-----------+-----------------------------------------------+-----------+

    associated data (authenticated, not sent): b"verdigris/gossip" ‖ version ‖ cluster_id (u16 big-endian)

The AES-GCM framing costs 29 bytes, as memberlist's does; the sealed sender timestamp adds 8, so a
packet is :data:`ENCRYPTED_OVERHEAD` = 37 bytes longer than its payload. The cluster id is not sent: it is
authenticated, so a packet of another cluster (or one whose version byte was altered) fails
authentication exactly like a packet under an unknown key. The key is chosen as memberlist does it:
seal with the keyring's primary, open with every installed key in turn, primary first (see
:mod:`verdigris.gossip.keyring` for rotation).

Plaintext packet (only when a codec is built with ``plaintext=True``; version byte
:data:`VERSION_PLAINTEXT`)::

    version (1) ‖ cluster_id (u16 big-endian) ‖ timestamp_ms (u64 big-endian) ‖ payload

A plaintext codec refuses encrypted packets ("encrypted_refused") and an encrypted codec refuses plaintext
ones ("plaintext_refused"), so a misconfigured node is told apart from an attacker and never silently
downgrades a cluster.

Freshness and replays. ``now`` is wall-clock seconds (``time.time()`` in the runtime, the shared virtual
clock in the simulator), *not* a monotonic clock: sender and receiver compare their clocks, so they must
agree to well within ``replay_window_s``. A packet is dropped as

* "stale" when its timestamp is more than ``replay_window_s`` behind the receiver's clock, or more than
  ``replay_window_s`` ahead of it. "Behind" is measured from the newest ``now`` the codec has been given,
  so a clock that steps back a little never reopens a window it has already closed; a step back of more
  than the window is taken as a clock reset (counted in :attr:`PacketCodec.clock_steps`): the codec
  starts over from the new time (keeping its cache, forgetting the full-cache floor below) rather than
  going deaf until the clock catches up. Replays of packets pruned before the reset are then possible.
* "replayed" when its nonce was already accepted within the window. Accepted nonces are kept, with their
  timestamps, until the window has passed them (then any replay is stale anyway). Only authenticated
  packets enter the cache, so forged packets cannot fill it.

The replay cache holds at most ``max_replay_cache`` nonces. When it is full, the entry with the oldest
timestamp is evicted and the codec remembers that timestamp as a floor: from then on, every packet whose
timestamp is not newer than the newest evicted one is dropped as "stale", since the codec can no longer
prove it is not a replay. New traffic keeps flowing; only packets delayed past the floor are lost. With
the defaults (100,000 nonces, 30 s) the floor stays out of the way up to about 3,300 packets/s per codec
(roughly 20 MB of cache at the limit).

Plaintext packets carry no nonce, so a plaintext codec checks freshness only: plaintext mode has no
authenticity, and replay protection without it would be theatre.

AES-GCM with random 96-bit nonces: the caller must pass 12 bytes from a cryptographically secure source
(``os.urandom``/``secrets.token_bytes``) for every packet, never a seeded PRNG outside the simulator. A
repeated nonce under one key breaks GCM's authenticity. Random nonces keep the chance of a repeat below
2^-32 for the first 2^32 packets sealed under one key *across the whole cluster*; rotate keys well before a
cluster has sent that many.

:meth:`PacketCodec.open` raises :class:`DecodeError` and nothing else, whatever bytes it is given; the
error's ``reason`` is one of :data:`REASONS` and is counted in :attr:`PacketCodec.stats`.
"""

from __future__ import annotations

import heapq
import math
from typing import Final, Literal, TypeAlias, get_args

from cryptography.exceptions import InvalidTag

from verdigris.gossip.keyring import Keyring

__all__ = [
    "DEFAULT_MAX_PACKET",
    "ENCRYPTED_OVERHEAD",
    "NONCE_SIZE",
    "PLAINTEXT_OVERHEAD",
    "REASONS",
    "VERSION_AES_GCM",
    "VERSION_PLAINTEXT",
    "DecodeError",
    "PacketCodec",
    "Reason",
]

VERSION_AES_GCM: Final = 0xA1
"""First byte of an encrypted packet. Distinct from the plaintext wire format's own version byte, so bare
(unenveloped) gossip bytes are reported as "bad_version"."""

VERSION_PLAINTEXT: Final = 0xB1
"""First byte of a plaintext-mode packet."""

NONCE_SIZE: Final = 12
TAG_SIZE: Final = 16
TIMESTAMP_SIZE: Final = 8

ENCRYPTED_OVERHEAD: Final = 1 + NONCE_SIZE + TAG_SIZE + TIMESTAMP_SIZE
"""Bytes an encrypted packet adds to its payload: 29 of AES-GCM framing (as memberlist) + 8 of timestamp."""

PLAINTEXT_OVERHEAD: Final = 1 + 2 + TIMESTAMP_SIZE
"""Bytes a plaintext packet adds to its payload."""

DEFAULT_MAX_PACKET: Final = 64 * 1024
"""Largest packet (sealed size) accepted or produced by default."""

_AAD_DOMAIN: Final = b"verdigris/gossip"
_MAX_TIMESTAMP_MS: Final = (1 << 64) - 1

Reason: TypeAlias = Literal[
    "truncated",
    "bad_version",
    "wrong_cluster",
    "auth_failed",
    "replayed",
    "stale",
    "too_large",
    "plaintext_refused",
    "encrypted_refused",
]

REASONS: Final[tuple[Reason, ...]] = get_args(Reason)
"""Every reason a packet is dropped for, as found in :attr:`DecodeError.reason` and the codec's stats."""


class DecodeError(Exception):
    """A packet :meth:`PacketCodec.open` drops. ``reason`` is short and machine-readable (see
    :data:`REASONS`); ``detail`` is for humans and never holds key material or packet contents."""

    def __init__(self, reason: Reason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason: Reason = reason
        self.detail = detail


def _to_ms(now: float) -> int:
    if not math.isfinite(now):
        raise ValueError(f"now must be a finite wall-clock time in seconds, not {now!r}")
    ms = int(now * 1000)
    if not 0 <= ms <= _MAX_TIMESTAMP_MS:
        raise ValueError(f"now={now!r} is outside the timestamp range (seconds since the Unix epoch)")
    return ms


class PacketCodec:
    """Seals and opens the packets of one cluster (see the module docstring for format and rules).

    ``keyring`` is required unless ``plaintext=True``, and refused with it (ambiguous configuration).
    The keyring may change while the codec runs (install/use/remove); each packet reads its current state.
    """

    def __init__(
        self,
        keyring: Keyring | None,
        cluster_id: int,
        *,
        plaintext: bool = False,
        replay_window_s: float = 30.0,
        max_replay_cache: int = 100_000,
        max_packet: int = DEFAULT_MAX_PACKET,
    ) -> None:
        if not 0 <= cluster_id <= 0xFFFF:
            raise ValueError(f"cluster_id must be a u16 (0..65535), not {cluster_id}")
        if plaintext and keyring is not None:
            raise ValueError(
                "plaintext=True with a keyring: choose one (drop the keyring, or plaintext=False)"
            )
        if not plaintext and keyring is None:
            raise ValueError("encryption needs a keyring; pass plaintext=True explicitly to run without one")
        if not (math.isfinite(replay_window_s) and replay_window_s > 0):
            raise ValueError(f"replay_window_s must be a positive number of seconds, not {replay_window_s!r}")
        if max_replay_cache < 1:
            raise ValueError(f"max_replay_cache must be at least 1, not {max_replay_cache}")
        overhead = PLAINTEXT_OVERHEAD if plaintext else ENCRYPTED_OVERHEAD
        if max_packet < overhead:
            raise ValueError(f"max_packet must be at least the {overhead}-byte overhead, not {max_packet}")

        self.keyring = keyring
        self.cluster_id = cluster_id
        self.plaintext = plaintext
        self.replay_window_s = replay_window_s
        self.max_replay_cache = max_replay_cache
        self.max_packet = max_packet

        self.stats: dict[str, int] = dict.fromkeys(REASONS, 0)
        """Packets dropped, per :data:`REASONS` entry."""
        self.opened = 0
        """Packets accepted."""
        self.opened_with_secondary = 0
        """Packets accepted under a key other than the primary (zero for a while = the old key can go)."""
        self.evictions = 0
        """Replay-cache entries evicted for room (each may have raised the stale floor)."""
        self.clock_steps = 0
        """Times ``now`` went back by more than the window (see the module docstring)."""

        self._version = VERSION_PLAINTEXT if plaintext else VERSION_AES_GCM
        self._cluster = cluster_id.to_bytes(2, "big")
        self._aad = _AAD_DOMAIN + bytes((VERSION_AES_GCM,)) + self._cluster
        self._plain_head = bytes((VERSION_PLAINTEXT,)) + self._cluster
        self._window_ms = max(1, int(replay_window_s * 1000))
        self._high_ms: int | None = None  # newest `now` seen, ms
        self._floor_ms = -1  # newest timestamp evicted from a full cache: at or below it is stale
        self._seen: set[bytes] = set()
        self._heap: list[tuple[int, bytes]] = []  # (timestamp_ms, nonce), oldest first

    @property
    def overhead(self) -> int:
        """Bytes a sealed packet adds to its payload (reserve this much below the datagram size)."""
        return PLAINTEXT_OVERHEAD if self.plaintext else ENCRYPTED_OVERHEAD

    @property
    def max_payload(self) -> int:
        """The largest payload :meth:`seal` accepts."""
        return self.max_packet - self.overhead

    @property
    def replay_cache_size(self) -> int:
        return len(self._seen)

    # --- sealing ------------------------------------------------------------------------------------------

    def seal(self, payload: bytes, now: float, nonce: bytes) -> bytes:
        """The packet for ``payload``, stamped with ``now`` (wall-clock seconds).

        ``nonce`` must be 12 fresh bytes from a secure random source (ignored in plaintext mode).
        Raises ``ValueError`` for a payload above :attr:`max_payload` or a bad nonce or time.
        """
        if len(payload) > self.max_payload:
            raise ValueError(
                f"payload of {len(payload)} bytes exceeds the {self.max_payload}-byte limit "
                f"(max_packet {self.max_packet} minus {self.overhead} bytes of envelope)"
            )
        stamp = _to_ms(now).to_bytes(TIMESTAMP_SIZE, "big")
        if self.plaintext:
            return b"".join((self._plain_head, stamp, payload))
        if len(nonce) != NONCE_SIZE:
            raise ValueError(f"nonce must be {NONCE_SIZE} bytes, not {len(nonce)}")
        assert self.keyring is not None
        cipher = self.keyring.ciphers()[0]
        sealed = cipher.encrypt(nonce, stamp + payload, self._aad)
        return b"".join((bytes((VERSION_AES_GCM,)), nonce, sealed))

    # --- opening ------------------------------------------------------------------------------------------

    def open(self, packet: bytes | bytearray | memoryview, now: float) -> bytes:
        """The payload of ``packet``, or :class:`DecodeError` (counted in :attr:`stats`). ``now`` is the
        receiver's wall-clock time in seconds."""
        if isinstance(packet, memoryview) and (
            packet.format != "B" or packet.ndim != 1 or not packet.c_contiguous
        ):
            packet = packet.tobytes()  # index and measure in bytes, whatever the view's item type
        try:
            payload = self._open(packet, _to_ms(now))
        except DecodeError as e:
            self.stats[e.reason] += 1
            raise
        self.opened += 1
        return payload

    def _open(self, packet: bytes | bytearray | memoryview, now_ms: int) -> bytes:
        size = len(packet)
        if size > self.max_packet:
            raise DecodeError("too_large", f"{size} bytes, limit {self.max_packet}")
        if size == 0:
            raise DecodeError("truncated", "empty packet")
        version = packet[0]
        if version != self._version:
            if version == VERSION_PLAINTEXT:
                raise DecodeError("plaintext_refused", "plaintext packet, but this codec requires encryption")
            if version == VERSION_AES_GCM:
                raise DecodeError("encrypted_refused", "encrypted packet, but this codec runs in plaintext")
            raise DecodeError("bad_version", f"version byte 0x{version:02x}")
        if self.plaintext:
            return self._open_plain(packet, size, now_ms)
        return self._open_sealed(packet, size, now_ms)

    def _open_plain(self, packet: bytes | bytearray | memoryview, size: int, now_ms: int) -> bytes:
        if size < PLAINTEXT_OVERHEAD:
            raise DecodeError("truncated", f"{size} bytes, at least {PLAINTEXT_OVERHEAD} needed")
        if packet[1:3] != self._cluster:
            raise DecodeError("wrong_cluster", f"cluster {int.from_bytes(packet[1:3], 'big')}")
        self._check_fresh(int.from_bytes(packet[3:PLAINTEXT_OVERHEAD], "big"), now_ms)
        return bytes(packet[PLAINTEXT_OVERHEAD:])

    def _open_sealed(self, packet: bytes | bytearray | memoryview, size: int, now_ms: int) -> bytes:
        if size < ENCRYPTED_OVERHEAD:
            raise DecodeError("truncated", f"{size} bytes, at least {ENCRYPTED_OVERHEAD} needed")
        assert self.keyring is not None
        view = memoryview(packet)
        nonce = bytes(view[1 : 1 + NONCE_SIZE])
        body = view[1 + NONCE_SIZE :]
        plain: bytes | None = None
        ciphers = self.keyring.ciphers()
        for index, cipher in enumerate(ciphers):
            try:
                plain = cipher.decrypt(nonce, body, self._aad)
            except InvalidTag:
                continue
            if index:
                self.opened_with_secondary += 1
            break
        if plain is None:
            raise DecodeError("auth_failed", f"no installed key ({len(ciphers)}) authenticates it")
        stamp = int.from_bytes(plain[:TIMESTAMP_SIZE], "big")
        lower = self._check_fresh(stamp, now_ms)
        self._prune(lower)
        if nonce in self._seen:
            raise DecodeError("replayed", "nonce already accepted within the replay window")
        self._remember(stamp, nonce)
        return plain[TIMESTAMP_SIZE:]

    # --- freshness and the replay cache -------------------------------------------------------------------

    def _check_fresh(self, stamp: int, now_ms: int) -> int:
        """Raise "stale" unless ``stamp`` is inside the window; return the window's lower bound."""
        window = self._window_ms
        high = self._high_ms
        if high is None or now_ms > high:
            high = self._high_ms = now_ms
        elif high - now_ms > window:
            # The receiver's clock went back by more than the window: treat it as a reset.
            self.clock_steps += 1
            high = self._high_ms = now_ms
            self._floor_ms = -1
        lower = high - window
        if stamp < lower:
            raise DecodeError("stale", f"sent {now_ms - stamp} ms ago, window {window} ms")
        if stamp > now_ms + window:
            raise DecodeError("stale", f"sent {stamp - now_ms} ms in the future, window {window} ms")
        if stamp <= self._floor_ms:
            raise DecodeError("stale", "older than the replay cache can vouch for (cache full)")
        return lower

    def _prune(self, lower: int) -> None:
        heap = self._heap
        seen = self._seen
        while heap and heap[0][0] < lower:
            seen.discard(heapq.heappop(heap)[1])

    def _remember(self, stamp: int, nonce: bytes) -> None:
        self._seen.add(nonce)
        heapq.heappush(self._heap, (stamp, nonce))
        if len(self._seen) > self.max_replay_cache:
            oldest, evicted = heapq.heappop(self._heap)
            self._seen.discard(evicted)
            self._floor_ms = max(self._floor_ms, oldest)
            self.evictions += 1
