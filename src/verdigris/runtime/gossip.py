"""The gossip runtime: the asyncio driver that makes agents a cluster.

The protocol cores are sans-IO (ARCHITECTURE.md, principle 1): :class:`~verdigris.gossip.Membership`
(SWIM + Lifeguard), :class:`~verdigris.gossip.broadcast.Broadcaster` (epidemic broadcast of change sets),
:class:`~verdigris.gossip.sync.SyncScheduler` / :class:`~verdigris.gossip.sync.SyncClient` /
:class:`~verdigris.gossip.sync.SyncServer` (anti-entropy). :class:`GossipRuntime` gives them a socket, a
clock and the store, and decides nothing they decide. What it owns:

**Transport.** One UDP socket on ``[gossip] addr`` carries membership and broadcast datagrams, told apart
by their first byte (1 membership, 2 broadcast); a TCP listener on the same port carries sync sessions
(:mod:`verdigris.runtime.stream`). Every datagram and every stream frame is sealed and opened by a
:class:`~verdigris.gossip.codec.PacketCodec` over the node's keyring, which drops and counts (by reason)
whatever does not authenticate, is stale or replayed. There is one codec per transport so the counts say
where bad traffic came in; both read the same keyring, so ``keys use`` switches both at once.

**Time.** One timer task sleeps until the earliest deadline of the cores (membership's
``get_timer()``, the broadcaster's, the sync scheduler's, and the runtime's own: reconnects, urgent syncs,
persisting members), wakes early when new input moved a deadline closer, and then calls ``handle_timer`` /
``tick`` and flushes the datagrams they produced. Cores get ``loop.time()`` (monotonic); only the codec
gets wall-clock time, because sender and receiver compare timestamps.

**The store.** The store's single writer thread (:class:`~verdigris.api.threads.StoreThreads`) runs
everything that reads or writes it: merges, change extraction, serving sync sessions, building sync
state. The loop never touches SQLite and never waits on the store's lock.

* *Local writes*: the store's commit listener (on the writer thread) posts each new local version to the
  loop; the loop reads those versions' change sets on the writer thread, a range at a time, and hands
  them to the broadcaster.
* *Received broadcasts*: the broadcaster keeps only the pieces that are new here (asking
  :class:`~verdigris.runtime.received.ReceivedVersions`, the loop's copy of the bookkeeping) and queues
  exactly those for relay. They go to a bounded merge queue, merged on the writer thread in batches.
  Versions the store refuses are withdrawn from the relay queue.
* *Sync*: every 1-15 s (the scheduler's backoff) a few peers are asked for what this node lacks, the
  state split between them so none is asked twice for the same thing. A member that just came up (a
  new node, a restarted one, the other half of a healed partition) is also synced with at once: it is
  the likeliest to hold what we lack, and waiting for a round could take up to 15 s.

**Membership.** The node id is the store's site id in hex. Metadata carries ``region``, ``api`` and
``gossip`` addresses, and a ``boot`` id new at every start (so a quick restart is noticed). Known members (and this node's incarnation) are persisted in ``<db>.members.json``
(:mod:`verdigris.runtime.peers`), so a restarted node joins the members it knew as well as its bootstrap
list. A join that gives up while the node is alone is retried with backoff; while some member is held
dead, one such member is re-contacted every ``reconnect_interval``, which is what heals a partition once
gossip to the dead has stopped. :meth:`stop` leaves gracefully (the ``Left`` news goes out first).

**Scopes** (docs/regions.md). A runtime built with ``scope=None`` is the node's only cluster and carries
every actor of every scope. With ``scope="regional"`` or ``"global"`` it is one of the two clusters of an
agent in region mode: its node id is the store's actor for that scope (so the two runtimes of one agent
are distinct members of distinct clusters), it broadcasts only that actor's local versions, reads, builds
and serves sync state only from that scope's books (:meth:`Store.books` with the scope), and merges with
``scope=`` so the store refuses a change set of the other scope. Nothing of another scope is ever sent
on it, so a node outside a region has no channel that could bring it that region's changes. Its log lines
and metrics say the scope.

**Fault injection** (:mod:`verdigris.runtime.faults`), when enabled, drops traffic to and from chosen
peers in both transports, for partition tests with real processes.

Every queue is bounded and every wait has a timeout; bad input is counted, never raised (principles 5, 6).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections import deque
from collections.abc import Coroutine, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from prometheus_client import CollectorRegistry

from verdigris.api.threads import StoreThreads
from verdigris.config import DEFAULT_KEYRING_NAME, GossipConfig, parse_addr
from verdigris.gossip.broadcast import Broadcaster
from verdigris.gossip.changes_wire import FAMILY_BROADCAST, SyncState
from verdigris.gossip.codec import DecodeError, PacketCodec
from verdigris.gossip.keyring import Keyring, KeyringError, fingerprint
from verdigris.gossip.membership import (
    JoinFailed,
    MemberDown,
    MemberEvent,
    MemberInfo,
    MemberLeft,
    Membership,
    MemberState,
    MemberSuspect,
    MemberUp,
)
from verdigris.gossip.sync import (
    ChangesReceived,
    Phase,
    SyncClient,
    SyncEvent,
    SyncScheduler,
    SyncServer,
    SyncStats,
    build_sync_state,
    split_sync_state,
)
from verdigris.gossip.wire import PROTOCOL_VERSION as FAMILY_MEMBERSHIP
from verdigris.runtime.faults import FaultFilter
from verdigris.runtime.metrics import Durations
from verdigris.runtime.metrics import attach as attach_metrics
from verdigris.runtime.metrics import detach as detach_metrics
from verdigris.runtime.peers import MAX_SAVED_MEMBERS, PeerRecord, SavedPeers, load_peers, save_peers
from verdigris.runtime.received import ReceivedVersions
from verdigris.runtime.settings import RuntimeSettings
from verdigris.runtime.stream import (
    SESSION_ID_SIZE,
    TO_CLIENT,
    TO_SERVER,
    SealedStream,
    StreamError,
    decode_hello,
    encode_hello,
)
from verdigris.store.schema import SCOPES
from verdigris.store.store import ActorBooks, CommitNotice, MergeResult, Store
from verdigris.store.types import Changeset
from verdigris.watchdog.rwlock import AsyncRWLock

__all__ = ["GossipRuntime", "GossipSetupError", "RuntimeStats", "open_keyring", "parse_peer_addr"]

log = logging.getLogger("verdigris.gossip")

Addr = tuple[str, int]

_UNSPECIFIED_HOSTS: Final = frozenset({"0.0.0.0", "::", ""})
_MAX_SEEDS: Final = 64
"""At most this many persisted members are added to the bootstrap list on start."""
_KEYS_LOCK_TIMEOUT: Final = 60.0
"""Bound on waiting for another keyring change (each saves the keyring file) before giving up."""


class GossipSetupError(Exception):
    """The runtime could not start; the message is a complete explanation for the user."""


def open_keyring(config: GossipConfig, db_path: Path) -> tuple[Keyring | None, Path]:
    """The keyring to run with, and where it is kept.

    The keyring file is authoritative once it exists (it carries every rotation since); ``gossip.key`` only
    seeds it the first time. In plaintext mode there is no keyring.
    """
    path = config.keyring_path or db_path.parent / DEFAULT_KEYRING_NAME
    if config.plaintext:
        return None, path
    if path.exists():
        try:
            keyring = Keyring.load(path)
        except KeyringError as e:
            raise GossipSetupError(str(e)) from None
        if config.key is not None and config.key not in keyring:
            log.warning(
                "gossip.key (%s) is not in the keyring file %s, which takes precedence; "
                "use `verdigris keys` to change keys on a running cluster",
                fingerprint(config.key),
                path,
            )
        return keyring, path
    if config.key is None:
        raise GossipSetupError(
            "gossip traffic is encrypted and no key is configured: set gossip.key to a base64 AES key "
            "(make one with `verdigris keys generate`), or gossip.plaintext = true on a trusted network"
        )
    keyring = Keyring([config.key])
    try:
        keyring.save(path)
    except KeyringError as e:
        raise GossipSetupError(f"{e} (gossip.keyring-path)") from None
    return keyring, path


@dataclass
class RuntimeStats:
    """The runtime's own counters (the cores and codecs keep theirs); exported as metrics."""

    datagrams_in: int = 0
    datagrams_out: int = 0
    bytes: dict[tuple[str, str], int] = field(default_factory=dict)
    """Bytes on the wire by (transport, direction): sealed datagrams; sync frames, counted per session."""
    send_errors: int = 0
    unknown_family: int = 0
    internal_errors: int = 0
    stream_errors: dict[str, int] = field(default_factory=dict)
    sessions: dict[tuple[str, str], int] = field(default_factory=dict)
    """Sync sessions by (role, result); result is "ok" or why it failed."""
    busy: int = 0
    """Incoming sync connections refused because ``max_server_sessions`` were running."""
    changes_merged: dict[str, int] = field(default_factory=lambda: {"broadcast": 0, "sync": 0})
    versions_merged: dict[str, int] = field(default_factory=lambda: {"broadcast": 0, "sync": 0})
    merge_failures: int = 0
    merge_rejected: int = 0
    merge_dropped: int = 0
    """Received pieces dropped because the merge queue was full (sync brings them later)."""
    local_skipped: int = 0
    """Local versions not broadcast because the backlog was full (sync spreads them)."""
    apply_seconds: Durations = field(default_factory=Durations)
    """Time to merge one batch of received change sets, measured on the writer thread."""

    def count_bytes(self, transport: str, direction: str, n: int) -> None:
        key = (transport, direction)
        self.bytes[key] = self.bytes.get(key, 0) + n

    def count_session(self, role: str, result: str) -> None:
        key = (role, result)
        self.sessions[key] = self.sessions.get(key, 0) + 1

    def count_stream_error(self, reason: str) -> None:
        self.stream_errors[reason] = self.stream_errors.get(reason, 0) + 1


class _ScopedSource:
    """The store as a sync :class:`~verdigris.gossip.sync.ChangeSource` restricted to one scope's actors."""

    def __init__(self, store: Store, scope: str) -> None:
        self._store = store
        self._scope = scope

    def books(self) -> Mapping[bytes, ActorBooks]:
        return self._store.books(self._scope)

    def changesets_for(self, actor: bytes, start: int, end: int) -> list[Changeset]:
        return self._store.changesets_for(actor, start, end)


class _ScopeLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes a scoped runtime's log lines with ``[regional]`` / ``[global]``."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        scope = self.extra.get("scope") if self.extra else None
        return (f"[{scope}] {msg}" if scope else msg), kwargs


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, runtime: GossipRuntime) -> None:
        self._runtime = runtime

    def datagram_received(self, data: bytes, addr: tuple[str | Any, int]) -> None:
        self._runtime._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for an earlier send (port unreachable...): membership notices the silence itself.
        log.debug("gossip socket error: %s", exc)


class GossipRuntime:
    """One node's gossip: ``await start()``, then ``await stop()``. See the module docstring.

    Args:
        store: the node's store; only ever touched on ``threads.writer``.
        threads: the store's threads.
        config: ``[gossip]``.
        keyring: the keyring (None in plaintext mode), and ``keyring_path`` where changes are saved.
        peers_file: where known members are persisted.
        api_addr: the node's HTTP API address, advertised in membership metadata.
        settings: tuning (default: :meth:`RuntimeSettings.for_profile` of ``config.profile``).
        registry: where to register the runtime's metrics (none when None).
        scope: ``None`` (the node's only cluster: every scope), or ``"regional"`` / ``"global"`` (one of
            the two clusters of region mode; see the module docstring).
    """

    def __init__(
        self,
        *,
        store: Store,
        threads: StoreThreads,
        config: GossipConfig,
        keyring: Keyring | None,
        keyring_path: Path,
        peers_file: Path,
        api_addr: str | None = None,
        settings: RuntimeSettings | None = None,
        registry: CollectorRegistry | None = None,
        scope: str | None = None,
    ) -> None:
        if scope is not None and scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r} (expected one of: {', '.join(SCOPES)})")
        self.scope = scope
        self._log = _ScopeLog(log, {"scope": scope})
        self._store = store
        self._threads = threads
        self.config = config
        self.keyring = keyring
        self.keyring_path = keyring_path
        self.peers_file = peers_file
        self.api_addr = api_addr
        self.settings = settings or RuntimeSettings.for_profile(config.profile)
        self._registry = registry
        self.site_id = store.actor_for(scope) if scope is not None else store.site_id
        """This runtime's own actor: the store's actor of ``scope``, or the site id (the regional actor)."""
        self.node_id = self.site_id.hex()
        self._own_actors: frozenset[bytes] = (
            frozenset({self.site_id})
            if scope is not None
            else frozenset({store.site_id, *(store.actor_for(s) for s in SCOPES)})
        )
        """The node's actors whose local versions this runtime broadcasts."""
        self._source: _ScopedSource | Store = _ScopedSource(store, scope) if scope is not None else store
        seed = int.from_bytes(os.urandom(8), "big")
        self._rng = random.Random(seed)
        self._writer_rng = random.Random(seed ^ 0x5EED)  # used on the writer thread only
        self.udp_codec = PacketCodec(keyring, config.cluster_id, plaintext=config.plaintext)
        self.tcp_codec = PacketCodec(keyring, config.cluster_id, plaintext=config.plaintext)
        self.faults = FaultFilter(config.fault_injection)
        self.stats = RuntimeStats()
        self.client_stats = SyncStats()
        self.server_stats = SyncStats()
        self._received = ReceivedVersions(self.site_id, also_own=self._own_actors)
        self.broadcaster = Broadcaster(
            is_new=lambda actor, version, seqs: self._received.is_new(actor, version, seqs),
            rng=self._rng,
            config=self.settings.broadcast,
            node_id=self.node_id,
        )
        self._membership: Membership | None = None
        self._scheduler: SyncScheduler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._transport: asyncio.DatagramTransport | None = None
        self._server: asyncio.Server | None = None
        self.addr: Addr | None = None
        """The advertised gossip address (``external-addr``, else the bound address)."""
        self.bound: Addr | None = None
        self._seeds: list[Addr] = []
        self._wake = asyncio.Event()
        self._sleep_until = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timer_task: asyncio.Task[None] | None = None
        self._server_sessions: set[asyncio.Task[Any]] = set()
        self._client_sessions: dict[str, float] = {}
        self._urgent: dict[str, float] = {}
        self._urgent_last: dict[str, float] = {}
        self._merge_queue: deque[Changeset] = deque()
        self._merge_received_at: deque[float] = deque()
        """When each change set of ``_merge_queue`` arrived (monotonic), for the apply lag."""
        self._applying: dict[int, float] = {}
        """Merges on the writer thread now: id(batch) -> when its oldest change set arrived."""
        self._merge_queued_changes = 0
        self._merging = 0
        self._merge_wake = asyncio.Event()
        self._local_ranges: dict[bytes, tuple[int, int]] = {}
        self._local_wake = asyncio.Event()
        self._join_pending = False
        self._rejoin_at: float | None = None
        self._rejoin_backoff = self.settings.rejoin_backoff_initial
        self._next_reconnect = 0.0
        self._dirty = False
        self._next_persist = 0.0
        self._persisting = False
        self._persist_task: asyncio.Task[Any] | None = None
        self._saved_incarnation = -1
        # Key changes (install/use/remove + save) are writers; `list` is a reader.
        self._keys_lock = AsyncRWLock("gossip keyring", timeout=_KEYS_LOCK_TIMEOUT)
        self._metrics_attached = False
        self._closing = False

    # ------------------------------------------------------------------------------------------ lifecycle

    @property
    def membership(self) -> Membership:
        assert self._membership is not None, "the runtime is not started"
        return self._membership

    async def start(self) -> None:
        """Bind the sockets, join the cluster and start the tasks. Raises :class:`GossipSetupError`."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        cfg = self.config
        bind = cfg.addr
        # Port 0: the UDP socket picks a free port, which TCP may hold already; then pick another.
        attempts = 20 if bind.port == 0 else 1
        for attempt in range(attempts):
            try:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: _UdpProtocol(self), local_addr=(bind.host, bind.port)
                )
            except OSError as e:
                raise GossipSetupError(
                    f"cannot listen on {bind} (gossip.addr, UDP): {e.strerror or e}"
                ) from None
            sockname = transport.get_extra_info("sockname")
            port = int(sockname[1])
            try:
                self._server = await asyncio.start_server(
                    self._accept, bind.host, port, reuse_address=True, limit=256 * 1024
                )
            except OSError as e:
                transport.close()
                if attempt + 1 < attempts:
                    continue
                raise GossipSetupError(
                    f"cannot listen on {bind.host}:{port} (gossip.addr, TCP): {e.strerror or e}"
                ) from None
            self._transport = transport
            break
        self.bound = (bind.host, port)
        if cfg.external_addr is not None:
            external = (cfg.external_addr.host, cfg.external_addr.port)
            self.addr = await self._resolve_one(external) or external
        elif bind.host in _UNSPECIFIED_HOSTS:
            await self._close_sockets()
            raise GossipSetupError(
                f"gossip.addr {bind} listens on every interface: set gossip.external-addr to the address "
                "peers should use"
            )
        else:
            self.addr = await self._resolve_one((bind.host, port)) or (bind.host, port)
        try:
            await self._start_cores(loop)
        except BaseException:
            await self._close_sockets()
            raise

    async def _start_cores(self, loop: asyncio.AbstractEventLoop) -> None:
        cfg = self.config
        assert self.addr is not None
        saved = await asyncio.to_thread(load_peers, self.peers_file)
        incarnation = 0
        known: list[Addr] = []
        if saved is not None and saved.node_id == self.node_id:
            incarnation = saved.incarnation + 1
            alive_first = sorted(saved.members, key=lambda r: r.state != MemberState.ALIVE.value)
            known = [r.addr for r in alive_first if r.state != MemberState.LEFT.value][:_MAX_SEEDS]
        # "boot" changes at every start, so a node restarted before anyone noticed it was gone still shows
        # up as changed (MemberUpdated), and its peers sync with it at once: it may hold writes it
        # acknowledged but never got to broadcast before it died.
        metadata = {
            "region": cfg.region,
            "gossip": f"{self.addr[0]}:{self.addr[1]}",
            "boot": os.urandom(4).hex(),
        }
        if self.api_addr:
            metadata["api"] = self.api_addr
        try:
            self._membership = Membership(
                self.node_id,
                self.addr,
                rng=self._rng,
                cluster=str(cfg.cluster_id),
                metadata=metadata,
                timing=self.settings.timing,
                incarnation=incarnation,
            )
        except ValueError as e:
            raise GossipSetupError(f"membership refused this node's identity: {e}") from None
        now = loop.time()
        s = self.settings
        self._scheduler = SyncScheduler(
            self._rng,
            min_interval=s.sync_min_interval,
            max_interval=s.sync_max_interval,
            peers_per_round=s.sync_peers_per_round,
            now=now,
        )
        store = self._store
        self._received = await self._threads.write(self._received_from_books)
        await self._threads.write(store.add_commit_listener, self._on_commit)

        bootstrap = [a for a in [await self._resolve_one(a) for a in cfg.bootstrap] if a is not None]
        self._seeds = list(dict.fromkeys(bootstrap + known))
        self._next_reconnect = now + s.reconnect_interval
        self._join(self._seeds, now)
        if self._registry is not None:
            attach_metrics(self._registry, self)
            self._metrics_attached = True
        self._timer_task = self._spawn(self._timer_loop(), "gossip-timers")
        self._spawn(self._merge_loop(), "gossip-merge")
        self._spawn(self._local_loop(), "gossip-local")
        self._log.info(
            "gossip: node %s listening on %s (advertised %s), cluster %d (%s), %s, %d seed(s), incarnation %d",
            self.node_id,
            _fmt(self.bound),
            _fmt(self.addr),
            cfg.cluster_id,
            f"{self.scope} scope" if self.scope else "every scope",
            "plaintext"
            if cfg.plaintext
            else f"encrypted (key {fingerprint(self.keyring.primary) if self.keyring else '?'})",
            len(self._seeds),
            incarnation,
        )

    async def stop(self, *, leave: bool = True) -> None:
        """Leave the cluster gracefully (when ``leave``), stop every task, close the sockets, persist the
        members. Idempotent."""
        if self._closing:
            return
        self._closing = True
        loop = asyncio.get_running_loop()
        if self._timer_task is not None:
            self._timer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._timer_task
        m = self._membership
        if leave and m is not None and self._transport is not None:
            await self._leave(m, loop)
        if self._persist_task is not None:  # let a write in progress finish, so it cannot land last
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._persist_task), 5.0)
        tasks = list(self._tasks) + list(self._server_sessions)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._threads.write(self._store.remove_commit_listener, self._on_commit)
        await self._close_sockets()
        if m is not None:
            try:
                await asyncio.to_thread(save_peers, self.peers_file, self._snapshot_peers())
            except OSError as e:
                self._log.warning("cannot write the members file %s: %s", self.peers_file, e)
        if self._metrics_attached and self._registry is not None:
            detach_metrics(self._registry, self)
            self._metrics_attached = False

    async def _leave(self, m: Membership, loop: asyncio.AbstractEventLoop) -> None:
        """Tell the cluster we are going, and wait (bounded) until the news went out."""
        now = loop.time()
        alone = m.num_alive() <= 1
        m.leave(now)
        self._pump_membership(now)
        if alone:
            return  # nobody to tell
        deadline = now + self.settings.leave_timeout
        while not m.has_left:
            now = loop.time()
            if now >= deadline:
                break
            timer = m.get_timer()
            if timer is None:
                break
            await asyncio.sleep(max(0.0, min(timer, deadline) - now))
            now = loop.time()
            m.handle_timer(now)
            self._pump_membership(now)
        self._log.info("gossip: left the cluster")

    async def _close_sockets(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)
        if self._transport is not None:
            transport, self._transport = self._transport, None
            transport.close()

    async def _resolve_one(self, addr: tuple[str, int]) -> Addr | None:
        """``addr`` with its host resolved to an IP address (membership compares addresses as given)."""
        host, port = addr
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
            return (host, port)
        except OSError:
            pass
        assert self._loop is not None
        try:
            infos = await asyncio.wait_for(
                self._loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM), self.settings.connect_timeout
            )
        except (OSError, TimeoutError) as e:
            self._log.warning("cannot resolve %s:%d: %s", host, port, e)
            return None
        for _family, _type, _proto, _name, sockaddr in infos:
            return (str(sockaddr[0]), int(sockaddr[1]))
        return None

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.stats.internal_errors += 1
            self._log.error("gossip task %s failed", task.get_name(), exc_info=exc)

    # ------------------------------------------------------------------------------------------ queries

    def member_count(self) -> int:
        """Members alive or suspect, this node included (what ``/v1/health`` reports)."""
        return self._membership.num_alive() if self._membership is not None else 1

    def members_info(self) -> list[dict[str, Any]]:
        """This node and every member it knows, for ``verdigris cluster members``."""
        m = self.membership
        assert self._loop is not None
        now = self._loop.time()
        rows: list[dict[str, Any]] = [
            {
                "id": self.node_id,
                "addr": _fmt(m.addr),
                "region": m.metadata.get("region", ""),
                "api": m.metadata.get("api"),
                "state": "left" if m.has_left else "alive",
                "incarnation": m.incarnation,
                "rtt_ms": None,
                "last_seen_s": 0.0,
                "self": True,
            }
        ]
        for info in sorted(m.members(), key=lambda i: (i.state is not MemberState.ALIVE, i.id)):
            rows.append(
                {
                    "id": info.id,
                    "addr": _fmt(info.addr),
                    "region": info.metadata.get("region", ""),
                    "api": info.metadata.get("api"),
                    "state": info.state.value,
                    "incarnation": info.incarnation,
                    "rtt_ms": None if info.rtt is None else round(info.rtt * 1000, 3),
                    "last_seen_s": None if info.last_seen is None else round(now - info.last_seen, 3),
                    "self": False,
                }
            )
        return rows

    async def status(self) -> dict[str, Any]:
        """Replication state and counters, for the admin socket and tests."""
        store, scope = self._store, self.scope

        def books_summary() -> tuple[dict[str, int], int, int]:
            heads: dict[str, int] = {}
            gaps = partials = 0
            for actor, b in (store.books(scope) if scope is not None else store.books()).items():
                head = b.head
                if head:
                    heads[actor.hex()] = head
                gaps += head - b.known.count() - len(b.partials)
                partials += len(b.partials)
            return heads, gaps, partials

        heads, gaps, partials = await self._threads.write(books_summary)
        b = self.broadcaster
        return {
            "scope": self.scope or "all",
            "node_id": self.node_id,
            "addr": _fmt(self.addr) if self.addr else None,
            "cluster_id": self.config.cluster_id,
            "members_alive": self.member_count(),
            "heads": heads,
            "gaps": gaps,
            "partials": partials,
            "merge_queue": len(self._merge_queue) + self._merging,
            "broadcast": {
                "queued": b.queued,
                "local": b.stats.local_pieces,
                "received": b.stats.received_pieces,
                "new": b.stats.new_pieces,
                "duplicate": b.stats.duplicate_pieces,
                "sent_payloads": b.stats.sent_payloads,
                "dropped": b.stats.dropped,
            },
            "merged": {
                "changes": dict(self.stats.changes_merged),
                "versions": dict(self.stats.versions_merged),
            },
            "sync": {f"{role}:{result}": n for (role, result), n in sorted(self.stats.sessions.items())},
            "sync_changesets_received": self.client_stats.changesets_received,
            "sync_requests_served": self.server_stats.requests_served,
            "stream_errors": dict(self.stats.stream_errors),
            "dropped": {
                "udp": {k: v for k, v in self.udp_codec.stats.items() if v},
                "tcp": {k: v for k, v in self.tcp_codec.stats.items() if v},
                "unknown_family": self.stats.unknown_family,
                "membership_invalid": self.membership.stats.bad_packets,
                "broadcast_invalid": b.stats.bad_payloads,
                "merge_queue_full": self.stats.merge_dropped,
            },
            "fault": {
                "enabled": self.faults.enabled,
                "blocked": sorted(_fmt(a) for a in self.faults.blocked),
                "dropped_in": self.faults.dropped_in,
                "dropped_out": self.faults.dropped_out,
                "refused": self.faults.refused,
            },
        }

    def queue_size(self) -> int:
        """Change sets received and waiting to be merged (``/v1/health``'s ``queue_size``)."""
        return len(self._merge_queue) + self._merging

    def apply_lag(self, now: float | None = None) -> float:
        """Age in seconds of the oldest received change set not merged yet (queued or being merged); 0
        when there is none. A stuck writer thread or a merge that cannot keep up makes it grow."""
        oldest = list(self._applying.values())
        if self._merge_received_at:
            oldest.append(self._merge_received_at[0])
        if not oldest:
            return 0.0
        return max(0.0, (time.monotonic() if now is None else now) - min(oldest))

    # ------------------------------------------------------------------------------------------ commands

    def rejoin(self) -> list[str]:
        """Announce this node again to the bootstrap list and every member it knows (not left)."""
        m = self.membership
        assert self._loop is not None
        targets = list(self._seeds)
        targets += [i.addr for i in m.members() if i.state is not MemberState.LEFT]
        targets = list(dict.fromkeys(targets))[: _MAX_SEEDS * 2]
        self._join(targets, self._loop.time())
        self._poke()
        return [_fmt(a) for a in targets]

    def fault_block(self, addrs: Iterable[Addr]) -> list[str]:
        self.faults.block(addrs)
        self._log.warning(
            "fault injection: blocking %s", ", ".join(sorted(_fmt(a) for a in self.faults.blocked))
        )
        return sorted(_fmt(a) for a in self.faults.blocked)

    def fault_heal(self) -> None:
        if self.faults.blocked:
            self._log.warning("fault injection: healed")
        self.faults.heal()

    async def keys(self, action: str, key: str | None = None) -> dict[str, Any]:
        """``list`` the keyring, or ``install`` / ``use`` / ``remove`` a key; changes are saved to the
        keyring file before they are reported, and take effect on the next packet (both transports)."""
        keyring = self.keyring
        if keyring is None:
            raise RuntimeError("gossip runs in plaintext (gossip.plaintext = true): there is no keyring")
        if action == "list":
            # Listing reads the keyring; any number may run at once, never in the middle of a change.
            async with self._keys_lock.read():
                return self._keys_reply(keyring, changed=False)
        async with self._keys_lock.write():
            changed = False
            if key is None:
                raise ValueError(f"keys {action} needs a key")
            if action == "install":
                changed = keyring.install(key)

                def undo() -> None:
                    keyring.remove(key)

            elif action == "use":
                old = keyring.primary
                keyring.use(key)
                changed = fingerprint(old) != fingerprint(key)

                def undo() -> None:
                    keyring.use(old)

            elif action == "remove":
                changed = keyring.remove(key)

                def undo() -> None:
                    keyring.install(key)

            else:
                raise ValueError(f"unknown keys action {action!r} (list, install, use, remove)")
            if changed:
                try:
                    await asyncio.to_thread(keyring.save, self.keyring_path)
                except KeyringError:
                    undo()
                    raise
                self._log.info("keyring: %s key %s", action, fingerprint(key))
            return self._keys_reply(keyring, changed=changed)

    def _keys_reply(self, keyring: Keyring, *, changed: bool) -> dict[str, Any]:
        return {
            "changed": changed,
            "primary": fingerprint(keyring.primary),
            "keys": keyring.fingerprints(),
            "path": str(self.keyring_path),
            "accepted_with_secondary": {
                "udp": self.udp_codec.opened_with_secondary,
                "tcp": self.tcp_codec.opened_with_secondary,
            },
        }

    # ------------------------------------------------------------------------------------------ datagrams

    def _on_datagram(self, data: bytes, raw_addr: tuple[str | Any, int]) -> None:
        addr: Addr = (str(raw_addr[0]), int(raw_addr[1]))
        if self.faults.blocks(addr):
            self.faults.dropped_in += 1
            return
        self.stats.datagrams_in += 1
        self.stats.count_bytes("udp", "in", len(data))
        try:
            payload = self.udp_codec.open(data, time.time())
        except DecodeError:
            return  # counted by the codec, by reason
        if not payload or self._membership is None or self._loop is None:
            self.stats.unknown_family += 1
            return
        now = self._loop.time()
        try:
            family = payload[0]
            if family == FAMILY_MEMBERSHIP:
                self._membership.receive_datagram(payload, addr, now)
                self._pump_membership(now)
            elif family == FAMILY_BROADCAST:
                pieces = self.broadcaster.receive(payload, addr, now)
                if pieces:
                    self._enqueue_merge(pieces)
            else:
                self.stats.unknown_family += 1
                return
        except Exception:  # a bug must cost one datagram, never the loop
            self.stats.internal_errors += 1
            self._log.exception("handling a datagram from %s failed", _fmt(addr))
            return
        self._poke()

    def _send(self, payload: bytes, addr: Addr) -> None:
        if self.faults.blocks(addr):
            self.faults.dropped_out += 1
            return
        transport = self._transport
        if transport is None:
            return
        try:
            packet = self.udp_codec.seal(payload, time.time(), os.urandom(12))
            transport.sendto(packet, addr)
        except (OSError, ValueError) as e:
            self.stats.send_errors += 1
            self._log.debug("sending to %s failed: %s", _fmt(addr), e)
            return
        self.stats.datagrams_out += 1
        self.stats.count_bytes("udp", "out", len(packet))

    def _pump_membership(self, now: float) -> None:
        m = self.membership
        for data, addr in m.datagrams_to_send(now):
            self._send(data, addr)
        while (event := m.next_event()) is not None:
            self._on_member_event(event, now)

    def _on_member_event(self, event: MemberEvent, now: float) -> None:
        if isinstance(event, JoinFailed):
            self._join_pending = False
            if self.membership.num_alive() <= 1:
                self._log.warning(
                    "gossip: no seed answered after %d attempts; trying again in %.0f s",
                    event.attempts,
                    self._rejoin_backoff,
                )
                self._rejoin_at = now + self._rejoin_backoff
                self._rejoin_backoff = min(self._rejoin_backoff * 2, self.settings.rejoin_backoff_max)
            return
        info = event.member
        self._dirty = True
        if isinstance(event, MemberUp):
            self._join_pending = False
            self._rejoin_at = None
            self._rejoin_backoff = self.settings.rejoin_backoff_initial
            self._log.info(
                "member up: %s at %s (region %r)", info.id, _fmt(info.addr), info.metadata.get("region", "")
            )
            self._want_urgent_sync(info, now)
        elif isinstance(event, MemberDown):
            self._log.warning("member down: %s at %s", info.id, _fmt(info.addr))
        elif isinstance(event, MemberLeft):
            self._log.info("member left: %s at %s", info.id, _fmt(info.addr))
        elif isinstance(event, MemberSuspect):
            self._log.info("member suspect: %s at %s", info.id, _fmt(info.addr))
        else:
            self._log.info("member updated (restarted?): %s at %s", info.id, _fmt(info.addr))
            self._want_urgent_sync(info, now)

    def _join(self, seeds: list[Addr], now: float) -> None:
        # A seed's own bootstrap list often names itself; membership ignores that address, and so must
        # the "join pending" flag, or a lone seed would never get to reconnect.
        seeds = [a for a in seeds if a != self.addr]
        self._join_pending = bool(seeds)
        self.membership.join(seeds, now)
        self._pump_membership(now)

    def _alive_members(self) -> list[MemberInfo]:
        return [i for i in self.membership.members() if i.state is MemberState.ALIVE]

    # ------------------------------------------------------------------------------------------ timers

    def _poke(self) -> None:
        """New input may have moved a core's deadline closer: wake the timer task if so."""
        soonest = self._cores_deadline()
        if soonest is not None and soonest < self._sleep_until:
            self._wake.set()

    def _cores_deadline(self) -> float | None:
        best: float | None = None
        for t in (self.membership.get_timer(), self.broadcaster.get_timer()):
            if t is not None and (best is None or t < best):
                best = t
        return best

    async def _timer_loop(self) -> None:
        assert self._loop is not None
        loop = self._loop
        while True:
            now = loop.time()
            try:
                self._step(now)
            except Exception:
                self.stats.internal_errors += 1
                self._log.exception("gossip timer step failed")
                # A deadline that raises stays due: pause rather than spin on it.
                self._sleep_until = now + 0.1
                await asyncio.sleep(0.1)
                continue
            deadline = self._deadline(now)
            self._sleep_until = deadline
            self._wake.clear()
            delay = deadline - loop.time()
            if delay > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()

    def _deadline(self, now: float) -> float:
        s = self.settings
        best = now + s.max_sleep
        candidates: list[float | None] = [
            self._cores_deadline(),
            self._scheduler.get_timer() if self._scheduler is not None else None,
            self._next_reconnect,
            self._rejoin_at,
            self._next_persist if self._dirty else None,
            min(self._urgent.values()) if self._urgent else None,
        ]
        for t in candidates:
            if t is not None and t < best:
                best = t
        return best

    def _step(self, now: float) -> None:
        m = self.membership
        timer = m.get_timer()
        if timer is not None and timer <= now:
            m.handle_timer(now)
        self._pump_membership(now)
        bt = self.broadcaster.get_timer()
        if bt is not None and bt <= now:
            for payload, addr in self.broadcaster.tick(now, self._alive_members()):
                self._send(payload, addr)
        self._sync_step(now)
        if self._rejoin_at is not None and now >= self._rejoin_at:
            self._rejoin_at = None
            self._log.info("gossip: joining again")
            self.rejoin()
        if now >= self._next_reconnect:
            self._reconnect(now)
        if m.incarnation != self._saved_incarnation:
            self._dirty = True
        if self._dirty and now >= self._next_persist and not self._persisting:
            self._persisting = True
            self._dirty = False
            self._saved_incarnation = m.incarnation
            self._next_persist = now + self.settings.persist_interval
            self._persist_task = self._spawn(self._persist(self._snapshot_peers()), "gossip-persist")

    def _reconnect(self, now: float) -> None:
        s = self.settings
        self._next_reconnect = now + s.reconnect_interval * self._rng.uniform(0.5, 1.0)
        if self._join_pending:
            return
        dead = [i for i in self.membership.members() if i.state is MemberState.DEAD]
        if dead:
            target = self._rng.choice(dead)
            self._log.debug("gossip: reconnecting to %s at %s", target.id, _fmt(target.addr))
            self.membership.join([target.addr], now)
            self._pump_membership(now)

    # ------------------------------------------------------------------------------------------ persistence

    def _snapshot_peers(self) -> SavedPeers:
        m = self.membership
        infos = sorted(
            m.members(),
            key=lambda i: (i.state is not MemberState.ALIVE, -(i.last_seen or 0.0)),
        )[:MAX_SAVED_MEMBERS]
        records = [
            PeerRecord(
                id=i.id,
                host=i.addr[0],
                port=i.addr[1],
                state=i.state.value,
                incarnation=i.incarnation,
                metadata=dict(i.metadata),
            )
            for i in infos
            if i.addr[1] > 0
        ]
        return SavedPeers(node_id=self.node_id, incarnation=m.incarnation, members=records)

    async def _persist(self, saved: SavedPeers) -> None:
        try:
            await asyncio.to_thread(save_peers, self.peers_file, saved)
        except OSError as e:
            self._log.warning("cannot write the members file %s: %s", self.peers_file, e)
        finally:
            self._persisting = False

    # ------------------------------------------------------------------------------------------ local writes

    def _on_commit(self, notice: CommitNotice) -> None:
        """Store commit listener, on the writer thread: post new local versions of this runtime's actors
        to the loop (a commit writing both scopes made one version per scope actor; each runtime takes
        its own). Never raises: the transaction has committed, and its client must hear so."""
        if self._closing or self._loop is None:
            return
        mine = [(a, v) for a, v in notice.versions.items() if a in self._own_actors]
        if not mine:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing
            for actor, version in mine:
                self._loop.call_soon_threadsafe(self._local_version, actor, version)

    def _local_version(self, actor: bytes, version: int) -> None:
        current = self._local_ranges.get(actor)
        if current is None:
            lo = hi = version
        else:
            lo, hi = min(current[0], version), max(current[1], version)
        backlog = self.settings.local_backlog_versions
        if hi - lo + 1 > backlog:
            self.stats.local_skipped += hi - lo + 1 - backlog
            lo = hi - backlog + 1
        self._local_ranges[actor] = (lo, hi)
        self._local_wake.set()

    async def _local_loop(self) -> None:
        """Read new local versions' change sets on the writer thread and hand them to the broadcaster."""
        assert self._loop is not None
        store = self._store
        while True:
            await self._local_wake.wait()
            self._local_wake.clear()
            while self._local_ranges:
                actor = next(iter(self._local_ranges))
                lo, hi = self._local_ranges.pop(actor)
                end = min(hi, lo + 255)
                if end < hi:
                    self._local_ranges[actor] = (end + 1, hi)
                try:
                    changesets = await self._threads.write(store.changesets_for, actor, lo, end)
                except Exception:
                    self._log.exception("reading local versions %d..%d for broadcast failed", lo, end)
                    continue
                now = self._loop.time()
                for cs in changesets:
                    self.broadcaster.local_commit(cs, now)
                self._poke()

    # ------------------------------------------------------------------------------------------ merging

    def _enqueue_merge(self, pieces: list[Changeset]) -> None:
        limit = self.settings.merge_queue_changes
        now = time.monotonic()
        for cs in pieces:
            n = len(cs.changes)
            if self._merge_queued_changes + n > limit and self._merge_queue:
                self.stats.merge_dropped += 1
                continue
            self._received.record(cs)
            self._merge_queue.append(cs)
            self._merge_received_at.append(now)
            self._merge_queued_changes += n
        self._merge_wake.set()

    async def _merge_loop(self) -> None:
        """Merge received broadcasts on the writer thread, in batches of up to ``merge_batch_changes``."""
        limit = self.settings.merge_batch_changes
        queue = self._merge_queue
        while True:
            await self._merge_wake.wait()
            self._merge_wake.clear()
            while queue:
                batch: list[Changeset] = []
                n = 0
                oldest = self._merge_received_at[0]
                while queue and (not batch or n + len(queue[0].changes) <= limit):
                    cs = queue.popleft()
                    self._merge_received_at.popleft()
                    batch.append(cs)
                    n += len(cs.changes)
                self._merge_queued_changes -= n
                self._merging = len(batch)
                try:
                    await self._merge(batch, "broadcast", received_at=oldest)
                finally:
                    self._merging = 0

    def _timed_merge(self, batch: list[Changeset]) -> MergeResult:
        """On the writer thread: merge ``batch`` and observe how long it took (apply batch latency)."""
        started = time.perf_counter()
        try:
            if self.scope is None:
                return self._store.merge(batch)
            return self._store.merge(batch, self.scope)
        finally:
            self.stats.apply_seconds.observe(time.perf_counter() - started)

    async def _merge(
        self, batch: list[Changeset], source: str, *, received_at: float | None = None
    ) -> MergeResult | None:
        token = id(batch)
        self._applying[token] = time.monotonic() if received_at is None else received_at
        try:
            result = await self._threads.write(self._timed_merge, batch)
        except Exception as e:
            self.stats.merge_failures += 1
            self._log.error("merging %d change set(s) from %s failed: %s", len(batch), source, e)
            await self._reload_received()
            return None
        finally:
            del self._applying[token]
        for actor, version in result.applied_versions:
            self._received.complete(actor, version)
        for actor, version, reason in result.rejected:
            self.stats.merge_rejected += 1
            self.broadcaster.discard(actor, version)
            self._received.forget(actor, version)
            self._log.warning("refused version %d of %s (%s): %s", version, actor.hex(), source, reason)
        self.stats.changes_merged[source] += result.changes_applied
        self.stats.versions_merged[source] += len(result.applied_versions)
        return result

    async def _reload_received(self) -> None:
        """After a failed merge: start again from the store's books (plus what is still queued)."""
        try:
            fresh = await self._threads.write(self._received_from_books)
        except Exception:
            self._log.exception("reloading the bookkeeping failed")
            return
        for cs in self._merge_queue:
            fresh.record(cs)
        self._received = fresh

    def _received_from_books(self) -> ReceivedVersions:
        """On the writer thread: the loop's copy of this runtime's scope's bookkeeping."""
        books = self._store.books(self.scope) if self.scope is not None else self._store.books()
        return ReceivedVersions.from_books(self.site_id, books, also_own=self._own_actors)

    async def _merge_synced(self, pieces: list[Changeset]) -> int:
        """Merge what a sync session brought; return how many versions were new (for the scheduler)."""
        fresh = [cs for cs in pieces if self._received.is_new(cs.actor, cs.version, cs.seqs)]
        if not fresh:
            return 0
        for cs in fresh:
            self._received.record(cs)
        result = await self._merge(fresh, "sync")
        return 0 if result is None else len(result.applied_versions) + len(result.buffered)

    # ------------------------------------------------------------------------------------------ sync

    def _sync_step(self, now: float) -> None:
        scheduler = self._scheduler
        assert scheduler is not None
        s = self.settings
        if scheduler.due(now):
            peers = scheduler.choose_peers(now, self._alive_members())
            room = max(0, s.max_client_sessions - len(self._client_sessions))
            for extra in peers[room:]:
                scheduler.session_done(extra.id, now, ok=False, received=0)
            peers = peers[:room]
            if peers:
                self._spawn(self._sync_round(peers), "gossip-sync-round")
        if self._urgent:
            self._run_urgent(now)

    def _want_urgent_sync(self, info: MemberInfo, now: float) -> None:
        s = self.settings
        if info.id in self._urgent or len(self._urgent) >= s.urgent_sync_pending:
            return
        # Within urgent_sync_repeat of the last one it is deferred, not dropped: a member that just came
        # back is news even if we synced with it a moment before it went.
        due = now + self._rng.uniform(0.1, 0.6)
        last = self._urgent_last.get(info.id)
        if last is not None:
            due = max(due, last + s.urgent_sync_repeat)
        self._urgent[info.id] = due

    def _run_urgent(self, now: float) -> None:
        s = self.settings
        scheduler = self._scheduler
        assert scheduler is not None
        for mid, due in list(self._urgent.items()):
            if due > now:
                continue
            if len(self._client_sessions) >= s.max_client_sessions:
                return
            del self._urgent[mid]
            info = self.membership.member(mid)
            if (
                info is None
                or info.state is not MemberState.ALIVE
                or mid in self._client_sessions
                or mid in scheduler.in_flight
            ):
                self._log.debug("urgent sync with %s skipped (%s)", mid, info.state.value if info else "gone")
                continue
            self._urgent_last[mid] = now
            self._spawn(self._urgent_sync(info), "gossip-sync-urgent")
        if len(self._urgent_last) > 1024:
            cutoff = now - s.urgent_sync_repeat
            self._urgent_last = {k: v for k, v in self._urgent_last.items() if v >= cutoff}

    def _build_state(self) -> SyncState:
        """On the writer thread: what this node has and lacks."""
        return build_sync_state(self._source, self.site_id, self._writer_rng, self.settings.sync)

    async def _sync_round(self, peers: list[MemberInfo]) -> None:
        assert self._loop is not None and self._scheduler is not None
        loop, scheduler = self._loop, self._scheduler
        for p in peers:
            self._client_sessions[p.id] = loop.time()
        try:
            state = await self._threads.write(self._build_state)
        except Exception:
            self._log.exception("building the sync state failed")
            for p in peers:
                self._client_sessions.pop(p.id, None)
                scheduler.session_done(p.id, loop.time(), ok=False, received=0)
            return
        states = split_sync_state(state, len(peers), self._rng, self.settings.sync)
        results: list[tuple[bool, int]] = [(False, 0)] * len(peers)
        try:
            results = list(
                await asyncio.gather(
                    *(self._sync_session(p, st) for p, st in zip(peers, states, strict=True))
                )
            )
        finally:
            # Always, even when cancelled: a peer never reported stays "in flight" and is never chosen again.
            now = loop.time()
            for p, (ok, received) in zip(peers, results, strict=True):
                scheduler.session_done(p.id, now, ok=ok, received=received)

    async def _urgent_sync(self, peer: MemberInfo) -> None:
        assert self._loop is not None
        self._client_sessions[peer.id] = self._loop.time()
        try:
            state = await self._threads.write(self._build_state)
        except Exception:
            self._client_sessions.pop(peer.id, None)
            self._log.exception("building the sync state failed")
            return
        await self._sync_session(peer, state)

    async def _sync_session(self, peer: MemberInfo, state: SyncState) -> tuple[bool, int]:
        """One sync session as client; returns (finished cleanly, versions that were new). Never raises."""
        assert self._loop is not None
        loop = self._loop
        addr = peer.addr
        s = self.settings
        self._client_sessions[peer.id] = loop.time()
        received = 0
        stream: SealedStream | None = None
        try:
            client = SyncClient(state, loop.time(), config=s.sync)
        except ValueError as e:  # a state larger than a request may be: the next round trims differently
            self._client_sessions.pop(peer.id, None)
            self.stats.count_session("client", "request_too_large")
            self._log.warning("sync state too large for one request: %s", e)
            return False, 0
        try:
            if self.faults.blocks(addr):
                self.faults.refused += 1
                self.stats.count_session("client", "blocked")
                return False, 0
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(addr[0], addr[1], limit=256 * 1024), s.connect_timeout
                )
            except (OSError, TimeoutError) as e:
                self.stats.count_session("client", "connect")
                self._log.debug("sync: cannot connect to %s at %s: %s", peer.id, _fmt(addr), e)
                return False, 0
            faults = self.faults
            stream = SealedStream(
                reader,
                writer,
                self.tcp_codec,
                session=os.urandom(SESSION_ID_SIZE),
                sends=TO_SERVER,
                io_timeout=s.io_timeout,
                blocked=lambda: faults.blocks(addr),
            )
            assert self.addr is not None
            events: list[SyncEvent]
            try:
                await stream.send(encode_hello(self.node_id, self.addr))
                await stream.send(client.data_to_send())
            except StreamError as e:
                self._stream_failed(e, peer)
                client.abort(f"{e.reason}: {e.detail}")
            while client.phase is Phase.RECEIVING:
                deadline = client.get_timer()
                timeout = s.io_timeout if deadline is None else min(s.io_timeout, deadline - loop.time())
                if timeout <= 0:
                    events = client.handle_timer(loop.time()) or client.abort("session deadline")
                else:
                    try:
                        data = await stream.recv(timeout)
                    except StreamError as e:
                        self._stream_failed(e, peer)
                        events = client.abort(f"{e.reason}: {e.detail}")
                    else:
                        events = client.receive_data(data, loop.time())
                self.client_stats.observe(events)
                pieces = [cs for ev in events if isinstance(ev, ChangesReceived) for cs in ev.changesets]
                if pieces:
                    received += await self._merge_synced(pieces)
        except Exception:
            self.stats.internal_errors += 1
            self._log.exception("sync session with %s failed", peer.id)
            client.abort("internal error")
        finally:
            self._client_sessions.pop(peer.id, None)
            if stream is not None:
                await stream.aclose()
                self._count_stream_bytes(stream)
        ok = client.phase is Phase.DONE
        error = client.error
        self._log.debug("sync with %s: ok=%s, %d new", peer.id, ok, received)
        self.stats.count_session("client", "ok" if ok else (error.kind.value if error else "aborted"))
        if error is not None:
            self._log.debug("sync with %s failed (%s): %s", peer.id, error.kind.value, error.reason)
        elif received:
            self._log.debug("sync with %s brought %d new version(s)", peer.id, received)
        return ok, received

    def _count_stream_bytes(self, stream: SealedStream) -> None:
        self.stats.count_bytes("tcp", "out", stream.bytes_sent)
        self.stats.count_bytes("tcp", "in", stream.bytes_received)

    def _stream_failed(self, error: StreamError, peer: object) -> None:
        self.stats.count_stream_error(error.reason)
        self._log.debug("sync stream with %s: %s", peer, error)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve one incoming sync session (the TCP listener's callback)."""
        s = self.settings
        if self._closing or len(self._server_sessions) >= s.max_server_sessions:
            self.stats.busy += 1
            self.stats.count_session("server", "busy")
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None and self._loop is not None
        loop = self._loop
        self._server_sessions.add(task)
        peername = writer.get_extra_info("peername")
        stream = SealedStream(
            reader, writer, self.tcp_codec, session=None, sends=TO_CLIENT, io_timeout=s.io_timeout
        )
        server = SyncServer(self._source, loop.time(), config=s.sync)
        result: str | None = None
        try:
            try:
                deadline = server.get_timer()
                assert deadline is not None
                hello = decode_hello(await stream.recv(deadline - loop.time()))
                origin: Addr = (hello.host, hello.port)
                faults = self.faults
                if faults.blocks(origin):
                    faults.refused += 1
                    result = "blocked"
                    return
                stream.blocked = lambda: faults.blocks(origin)
                peername = f"{hello.node} at {_fmt(origin)}"
                while server.phase is Phase.AWAIT_REQUEST:
                    deadline = server.get_timer()
                    assert deadline is not None
                    data = await stream.recv(deadline - loop.time())
                    events = await self._threads.write(server.receive_data, data, loop.time())
                    self.server_stats.observe(events)
                while server.phase is Phase.SENDING:
                    events = server.handle_timer(loop.time())
                    if events:
                        self.server_stats.observe(events)
                        break
                    out = await self._threads.write(server.data_to_send)
                    await stream.send(out)
                await stream.send(server.data_to_send())  # the end frame, or a reject
            except StreamError as e:
                self._stream_failed(e, peername)
                self.server_stats.observe(server.abort(f"{e.reason}: {e.detail}"))
        except Exception:
            self.stats.internal_errors += 1
            self._log.exception("serving a sync session to %s failed", peername)
            server.abort("internal error")
        finally:
            self._server_sessions.discard(task)
            await stream.aclose()
            self._count_stream_bytes(stream)
            if result is None:
                error = server.error
                result = "ok" if server.phase is Phase.DONE else (error.kind.value if error else "aborted")
            self.stats.count_session("server", result)


def _fmt(addr: tuple[str, int] | None) -> str:
    if addr is None:
        return "?"
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_peer_addr(text: str) -> Addr:
    """``host:port`` as a ``(host, port)`` tuple, for the fault commands (ValueError if malformed)."""
    a = parse_addr(text)
    return (a.host, a.port)
