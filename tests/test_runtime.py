"""The gossip runtime in one process: sealed streams, bad peers cut off and counted, the loop's copy of
the bookkeeping, the members file, and two runtimes replicating over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from verdigris.admin import parse_command
from verdigris.api.threads import StoreThreads
from verdigris.config import Addr, GossipConfig
from verdigris.gossip.codec import PacketCodec
from verdigris.gossip.keyring import Keyring
from verdigris.gossip.sync import SyncConfig
from verdigris.runtime import FaultInjectionDisabled, GossipRuntime, RuntimeSettings, peers_path
from verdigris.runtime.faults import FaultFilter
from verdigris.runtime.peers import PeerRecord, SavedPeers, load_peers, save_peers
from verdigris.runtime.received import ReceivedVersions
from verdigris.runtime.stream import (
    HEADER,
    MAX_FRAME,
    TO_CLIENT,
    TO_SERVER,
    SealedStream,
    StreamError,
    decode_hello,
    encode_hello,
)
from verdigris.store.store import ActorBooks, Store
from verdigris.store.types import Changeset, Statement

SCHEMA = "CREATE TABLE kv (k TEXT NOT NULL PRIMARY KEY, v INTEGER NOT NULL DEFAULT 0);"
WAIT = 10.0


def key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


async def until(what: str, check: Callable[[], bool | Awaitable[bool]], timeout: float = WAIT) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------------------- sealed streams


async def stream_pair(
    client_codec: PacketCodec, server_codec: PacketCodec, io_timeout: float = 2.0
) -> tuple[SealedStream, SealedStream, asyncio.StreamWriter, asyncio.StreamReader]:
    """A connected (client, server) pair over a socketpair, plus the raw ends for tampering."""
    a, b = socket.socketpair()
    ra, wa = await asyncio.open_connection(sock=a)
    rb, wb = await asyncio.open_connection(sock=b)
    client = SealedStream(ra, wa, client_codec, session=os.urandom(8), sends=TO_SERVER, io_timeout=io_timeout)
    server = SealedStream(rb, wb, server_codec, session=None, sends=TO_CLIENT, io_timeout=io_timeout)
    return client, server, wa, rb


def codecs(k: str | None = None) -> tuple[PacketCodec, PacketCodec]:
    k = k or key()
    return PacketCodec(Keyring([k]), 7), PacketCodec(Keyring([k]), 7)


async def test_stream_carries_large_data_in_frames_of_at_most_64_kib() -> None:
    cc, sc = codecs()
    client, server, _, _ = await stream_pair(cc, sc)
    data = os.urandom(300_000)
    await client.send(encode_hello("node-a", ("127.0.0.1", 7000)))
    await client.send(data)
    hello = decode_hello(await server.recv())
    assert (hello.node, hello.host, hello.port) == ("node-a", "127.0.0.1", 7000)
    got = b""
    while len(got) < len(data):
        got += await server.recv()
    assert got == data
    assert client.bytes_sent // MAX_FRAME < 6  # 300 kB in 5-6 frames, each under the limit
    await server.send(b"answer")
    assert await client.recv() == b"answer"
    client.close()
    assert await server.recv() == b""  # a clean close between frames


def sealed(codec: PacketCodec, session: bytes, direction: int, seq: int, data: bytes) -> bytes:
    """One frame as a peer holding the key would put it on the wire."""
    packet = codec.seal(HEADER.pack(session, direction, seq) + data, time.time(), os.urandom(12))
    return len(packet).to_bytes(4, "big") + packet


@pytest.mark.parametrize(
    ("second", "reason"),
    [
        ("replay", "replayed"),  # the very same bytes again
        ("skip", "bad_header"),  # a frame dropped in between (sequence gap)
        ("other_session", "bad_header"),  # spliced in from another session
        ("reflected", "bad_header"),  # the receiver's own direction, sent back at it
    ],
)
async def test_stream_frames_are_valid_in_one_place_of_one_session(second: str, reason: str) -> None:
    k = key()
    cc, sc = codecs(k)
    _, server, raw_client, _ = await stream_pair(cc, sc)
    sender = PacketCodec(Keyring([k]), 7)
    session = os.urandom(8)
    first = sealed(sender, session, TO_SERVER, 0, b"first")
    raw_client.write(first)
    assert await server.recv() == b"first"
    frames = {
        "replay": first,
        "skip": sealed(sender, session, TO_SERVER, 2, b"x"),
        "other_session": sealed(sender, os.urandom(8), TO_SERVER, 1, b"x"),
        "reflected": sealed(sender, session, TO_CLIENT, 1, b"x"),
    }
    raw_client.write(frames[second])
    with pytest.raises(StreamError) as e:
        await server.recv()
    assert e.value.reason == reason
    raw_client.close()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ((MAX_FRAME + 1).to_bytes(4, "big"), "too_large"),
        (b"\x00\x00\x00\x00", "truncated"),
        (b"\x00\x00\x00\x05hello", "bad_version"),
        (b"\x00\x00", "truncated"),
    ],
)
async def test_stream_garbage_is_refused_with_a_reason(raw: bytes, reason: str) -> None:
    cc, sc = codecs()
    _, server, raw_client, _ = await stream_pair(cc, sc, io_timeout=0.5)
    raw_client.write(raw)
    if reason == "truncated" and len(raw) < 4:
        raw_client.close()
    with pytest.raises(StreamError) as e:
        await server.recv()
    assert e.value.reason == reason
    raw_client.close()


async def test_stream_wrong_key_stall_and_block() -> None:
    client, server, _, _ = await stream_pair(
        PacketCodec(Keyring([key()]), 7), PacketCodec(Keyring([key()]), 7)
    )
    await client.send(b"secret")
    with pytest.raises(StreamError) as e:
        await server.recv()
    assert e.value.reason == "auth_failed"

    cc, sc = codecs()
    client, server, _, _ = await stream_pair(cc, sc, io_timeout=0.2)
    with pytest.raises(StreamError) as e:
        await server.recv()  # the client says nothing
    assert e.value.reason == "timeout"
    client.blocked = lambda: True
    with pytest.raises(StreamError) as e:
        await client.send(b"x")
    assert e.value.reason == "blocked"


def test_hello_garbage() -> None:
    for data in (b"", b"\x93\x01\xa1x", os.urandom(40), encode_hello("n", ("h", 1))[:-1]):
        with pytest.raises(StreamError):
            decode_hello(data)
    assert HEADER.size == 13


# --------------------------------------------------------------------------------------- small parts


def cs(actor: bytes, version: int, seqs: tuple[int, int] = (0, 0), last: int = 0) -> Changeset:
    return Changeset(actor=actor, version=version, changes=[], seqs=seqs, last_seq=last)


def test_received_versions_follow_the_store_completion_rule() -> None:
    me, other = b"m" * 16, b"o" * 16
    books = {other: ActorBooks()}
    books[other].known.add(1, 3)
    rv = ReceivedVersions.from_books(me, books)
    assert not rv.is_new(me, 99, (0, 0))  # never our own
    assert not rv.is_new(other, 2, (0, 0))
    assert rv.is_new(other, 4, (0, 5))
    rv.record(cs(other, 4, (0, 2), 5))
    assert not rv.is_new(other, 4, (0, 2)) and rv.is_new(other, 4, (3, 5))
    assert rv.partial_versions == 1
    rv.record(cs(other, 4, (3, 4), 4))  # a smaller claim of last_seq completes it (store's rule)
    assert not rv.is_new(other, 4, (5, 5)) and rv.partial_versions == 0
    rv.forget(other, 2)
    assert rv.is_new(other, 2, (0, 0)) and not rv.is_new(other, 1, (0, 0)) and not rv.is_new(other, 3, (0, 0))
    rv.complete(other, 2)
    assert not rv.is_new(other, 2, (0, 0))


def test_members_file_round_trip_and_bad_files(tmp_path: Path) -> None:
    path = peers_path(tmp_path / "state.db")
    assert path.name == "state.db.members.json"
    assert load_peers(path) is None
    saved = SavedPeers(
        node_id="ab" * 16,
        incarnation=4,
        members=[
            PeerRecord(
                id="cd" * 16,
                host="127.0.0.1",
                port=7000,
                state="alive",
                incarnation=2,
                metadata={"region": "ams"},
            )
        ],
    )
    save_peers(path, saved)
    assert load_peers(path) == saved
    path.write_text("{not json")
    assert load_peers(path) is None
    path.write_text('{"node_id": "x", "incarnation": -1, "members": []}')
    assert load_peers(path) is None


def test_fault_filter_only_when_enabled() -> None:
    off = FaultFilter(enabled=False)
    with pytest.raises(FaultInjectionDisabled):
        off.block([("127.0.0.1", 1)])
    on = FaultFilter(enabled=True)
    assert not on.blocks(("127.0.0.1", 1))
    on.block([("127.0.0.1", 1)])
    assert on.blocks(("127.0.0.1", 1)) and not on.blocks(("127.0.0.1", 2))
    on.heal()
    assert not on.blocks(("127.0.0.1", 1))


def test_admin_words_for_cluster_commands() -> None:
    assert parse_command(b"fault block 127.0.0.1:1 127.0.0.1:2") == {
        "cmd": "fault",
        "action": "block",
        "addrs": ["127.0.0.1:1", "127.0.0.1:2"],
    }
    assert parse_command(b"fault heal") == {"cmd": "fault", "action": "heal"}
    assert parse_command(b"keys") == {"cmd": "keys", "action": "list"}
    assert parse_command(b"keys install abc=") == {"cmd": "keys", "action": "install", "key": "abc="}
    for bad in (b"fault", b"fault block", b"keys use", b"keys drop x", b"members now"):
        with pytest.raises(ValueError):
            parse_command(bad)


# --------------------------------------------------------------------------------------- runtimes


@dataclasses.dataclass
class Node:
    store: Store
    threads: StoreThreads
    runtime: GossipRuntime
    registry: CollectorRegistry | None = None
    """Where the runtime's metrics are (made with ``metrics=True``)."""

    async def write(self, k: str, v: int) -> None:
        await self.threads.write(
            self.store.transact,
            [
                Statement(
                    "INSERT INTO kv (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v", [k, v]
                )
            ],
        )

    async def rows(self) -> list[tuple[object, ...]]:
        return await self.threads.write(self.store.rows, "kv")


QUICK = dataclasses.replace(
    RuntimeSettings.for_profile("lan"),
    io_timeout=0.5,
    sync=SyncConfig(request_timeout=0.5),
    sync_min_interval=0.2,
    sync_max_interval=0.5,
)
"""The LAN profile with timeouts and sync intervals short enough for tests."""
FAST = dataclasses.replace(QUICK, max_server_sessions=2)


@contextlib.asynccontextmanager
async def runtime_nodes(
    tmp_path: Path, settings: RuntimeSettings = FAST
) -> AsyncIterator[Callable[..., Awaitable[Node]]]:
    """``make(name, bootstrap=(), metrics=False, **gossip_config)`` starts a gossip runtime on 127.0.0.1
    over a store of its own (``kv``; plaintext and fault injection unless ``gossip_config`` says
    otherwise; with ``metrics``, its metrics in a registry of its own); every one is stopped at the end."""
    nodes: list[Node] = []

    async def make(
        name: str, bootstrap: tuple[Addr, ...] = (), metrics: bool = False, **config: object
    ) -> Node:
        writer = ThreadPoolExecutor(max_workers=1)
        store = Store(tmp_path / name / "state.db", schema_sql=SCHEMA)
        threads = StoreThreads(store, writer=writer, readers=1)
        cfg = GossipConfig(
            addr=Addr("127.0.0.1", 0), bootstrap=bootstrap, plaintext=True, enabled=True, fault_injection=True
        )
        cfg = dataclasses.replace(cfg, **config)  # type: ignore[arg-type]
        keyring = None if cfg.plaintext else Keyring([cfg.key or key()])
        registry = CollectorRegistry() if metrics else None
        runtime = GossipRuntime(
            store=store,
            threads=threads,
            config=cfg,
            keyring=keyring,
            keyring_path=tmp_path / name / "keyring.json",
            peers_file=peers_path(store.path),
            settings=settings,
            registry=registry,
        )
        await runtime.start()
        node = Node(store, threads, runtime, registry)
        nodes.append(node)
        return node

    try:
        yield make
    finally:
        for node in nodes:
            await node.runtime.stop()
            await asyncio.to_thread(node.threads.close)
            node.threads.writer.submit(node.store.close).result(WAIT)
            node.threads.writer.shutdown()


@pytest.fixture
async def make_node(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Node]]]:
    async with runtime_nodes(tmp_path) as make:
        yield make


def gossip_addr(node: Node) -> Addr:
    assert node.runtime.addr is not None
    return Addr(*node.runtime.addr)


async def test_two_runtimes_replicate_both_ways(make_node: Callable[..., Awaitable[Node]]) -> None:
    a = await make_node("a")
    b = await make_node("b", bootstrap=(gossip_addr(a),))
    await until("b to join a", lambda: a.runtime.member_count() == 2 and b.runtime.member_count() == 2)
    await a.write("from-a", 1)
    await b.write("from-b", 2)
    await until("both rows everywhere", lambda: _same_rows(a, b, 2))
    # Sync brings what broadcast cannot: a write made while b was blocked.
    a.runtime.fault_block([b.runtime.addr])  # type: ignore[list-item]
    b.runtime.fault_block([a.runtime.addr])  # type: ignore[list-item]
    await a.write("during", 3)
    await until(
        "a's broadcast of it to be dropped",
        lambda: (
            a.runtime.broadcaster.stats.local_pieces == 2
            and a.runtime.broadcaster.queued == 0
            and a.runtime.faults.dropped_out > 0
        ),
    )
    assert len(await b.rows()) == 2
    a.runtime.fault_heal()
    b.runtime.fault_heal()
    await until("the blocked write to arrive", lambda: _same_rows(a, b, 3))
    status = await b.runtime.status()
    assert status["gaps"] == 0 and status["partials"] == 0
    assert b.runtime.stats.versions_merged["sync"] >= 1


async def _same_rows(a: Node, b: Node, n: int) -> bool:
    ra, rb = await a.rows(), await b.rows()
    return len(ra) == n and ra == rb


async def test_bad_sync_peers_are_cut_off_and_counted(make_node: Callable[..., Awaitable[Node]]) -> None:
    node = await make_node("a", plaintext=False, key=key())
    rt = node.runtime
    assert rt.bound is not None
    host, port = rt.bound

    async def exchange(data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(data)
        try:
            return await asyncio.wait_for(reader.read(), 3.0)  # the server hangs up
        finally:
            writer.close()

    assert await exchange(b"\x00\x00\x00\x05hello") == b""
    assert rt.tcp_codec.stats["bad_version"] == 1 and rt.stats.stream_errors["bad_version"] == 1
    assert await exchange((1 << 30).to_bytes(4, "big")) == b""
    assert rt.stats.stream_errors["too_large"] == 1
    assert await exchange(b"") == b""  # says nothing: cut at the request deadline
    assert rt.stats.stream_errors["timeout"] == 1
    # A sealed frame under another key.
    other = PacketCodec(Keyring([key()]), 0)
    packet = other.seal(b"x" * 20, time.time(), os.urandom(12))
    assert await exchange(len(packet).to_bytes(4, "big") + packet) == b""
    assert rt.tcp_codec.stats["auth_failed"] == 1

    # Only max_server_sessions at once; the next is refused at once and counted.
    stalled = [await asyncio.open_connection(host, port) for _ in range(2)]
    await until("two sessions running", lambda: len(rt._server_sessions) == 2)
    assert await exchange(b"") == b""
    assert rt.stats.busy == 1
    for _, w in stalled:
        w.close()

    # Garbage datagrams are counted by reason and change nothing.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"\xa1" + os.urandom(60), (host, port))
        s.sendto(b"junk", (host, port))
    await until(
        "the datagrams to be counted",
        lambda: rt.udp_codec.stats["auth_failed"] == 1 and rt.udp_codec.stats["bad_version"] == 1,
    )
    assert rt.member_count() == 1
    # The node still works after all that.
    await node.write("k", 1)
    assert await node.rows() == [("k", 1)]


async def test_keys_rotate_live_and_are_saved(
    make_node: Callable[..., Awaitable[Node]], tmp_path: Path
) -> None:
    first, second = key(), key()
    node = await make_node("a", plaintext=False, key=first)
    rt = node.runtime
    reply = await rt.keys("install", second)
    assert reply["changed"] and len(reply["keys"]) == 2
    await rt.keys("use", second)
    assert Keyring.load(tmp_path / "a" / "keyring.json").primary == second
    with pytest.raises(ValueError):
        await rt.keys("remove", second)  # the primary
    reply = await rt.keys("remove", first)
    assert reply["changed"] and reply["keys"] == [reply["primary"]]
    assert not (await rt.keys("remove", first))["changed"]
    with pytest.raises(ValueError):
        await rt.keys("rotate", first)


async def test_restart_rejoins_known_members_without_bootstrap(
    make_node: Callable[..., Awaitable[Node]],
) -> None:
    a = await make_node("a")
    b = await make_node("b", bootstrap=(gossip_addr(a),))
    await until("b to join a", lambda: a.runtime.member_count() == 2)
    # c joins through b only; then c is restarted with no bootstrap list at all: it finds a and b again
    # through its members file.
    c = await make_node("c", bootstrap=(gossip_addr(b),))
    await until("c to see everyone", lambda: c.runtime.member_count() == 3)
    port = c.runtime.addr[1] if c.runtime.addr else 0
    await c.runtime.stop()
    saved = load_peers(c.runtime.peers_file)
    assert saved is not None and {m.port for m in saved.members} == {gossip_addr(a).port, gossip_addr(b).port}
    await until("a to see c leave", lambda: a.runtime.member_count() == 2)
    c2 = GossipRuntime(
        store=c.store,
        threads=c.threads,
        config=dataclasses.replace(c.runtime.config, addr=Addr("127.0.0.1", port), bootstrap=()),
        keyring=None,
        keyring_path=c.runtime.keyring_path,
        peers_file=c.runtime.peers_file,
        settings=FAST,
    )
    c.runtime = c2
    await c2.start()
    assert c2.membership.incarnation == saved.incarnation + 1
    await until(
        "c to rejoin from its members file", lambda: c2.member_count() == 3 and a.runtime.member_count() == 3
    )
