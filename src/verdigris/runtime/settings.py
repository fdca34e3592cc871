"""Tuning of the gossip runtime: what the config file does not say, per timing profile."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from verdigris.gossip.broadcast import BroadcastConfig
from verdigris.gossip.membership import Timing
from verdigris.gossip.sync import SyncConfig

__all__ = ["RuntimeSettings"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeSettings:
    """Everything the runtime needs beyond ``[gossip]``. Build one with :meth:`for_profile` and adjust
    fields with :func:`dataclasses.replace`. Times are in seconds."""

    timing: Timing = field(default_factory=Timing.lan)
    broadcast: BroadcastConfig = field(default_factory=BroadcastConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    sync_min_interval: float = 1.0
    sync_max_interval: float = 15.0
    """Anti-entropy rounds come every 1-15 s (Corrosion's range), sooner while they keep finding changes."""
    sync_peers_per_round: int = 3
    max_server_sessions: int = 8
    """Sync sessions served at once; more are refused (closed at once) and counted as "busy"."""
    max_client_sessions: int = 6
    """Sync sessions this node runs as client at once (scheduled rounds and urgent ones together)."""
    urgent_sync_pending: int = 3
    """Members waiting for an urgent sync (one that just came up); further ones wait for a round."""
    urgent_sync_repeat: float = 2.0
    """Least time between two urgent syncs with the same member (a later one is deferred, not dropped)."""
    connect_timeout: float = 3.0
    io_timeout: float = 10.0
    """Bound of every single read or write of a sync stream."""
    merge_batch_changes: int = 5000
    """Changes merged in one writer-thread call (received broadcasts are batched up to this)."""
    merge_queue_changes: int = 100_000
    """Changes waiting to be merged; pieces beyond are dropped (counted; sync brings them later)."""
    local_backlog_versions: int = 10_000
    """Local versions waiting to be broadcast; older ones beyond are left to sync (counted)."""
    reconnect_interval: float = 5.0
    """How often a node tries to reach one member it holds dead (Serf's reconnect), so two halves of a
    healed partition find each other even after gossip to the dead has stopped."""
    rejoin_backoff_initial: float = 2.0
    rejoin_backoff_max: float = 60.0
    """After a join gave up while this node is alone, it is tried again after this backoff (doubling)."""
    persist_interval: float = 5.0
    """The members file is written at most this often (and at shutdown)."""
    leave_timeout: float = 3.0
    """The longest a graceful leave waits for the ``Left`` news to go out."""
    max_sleep: float = 1.0
    """The timer task wakes at least this often, whatever the cores' deadlines say."""

    @classmethod
    def for_profile(cls, profile: Literal["lan", "wan"]) -> RuntimeSettings:
        """``"lan"``: memberlist's LAN timing; ``"wan"``: foca's WAN timing (Corrosion's choice)."""
        if profile == "wan":
            timing = Timing.wan()
            return cls(
                timing=timing,
                broadcast=BroadcastConfig(interval=timing.gossip_interval, fanout=timing.gossip_nodes),
                reconnect_interval=30.0,
                connect_timeout=5.0,
                io_timeout=20.0,
            )
        timing = Timing.lan()
        return cls(
            timing=timing,
            broadcast=BroadcastConfig(interval=timing.gossip_interval, fanout=timing.gossip_nodes),
        )
