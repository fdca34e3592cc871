"""Asyncio drivers around the sans-IO gossip cores: transports, timers, encryption, and the wiring
between gossip and the store. See :mod:`verdigris.runtime.gossip`."""

from verdigris.runtime.faults import FaultFilter, FaultInjectionDisabled
from verdigris.runtime.gossip import GossipRuntime, GossipSetupError, RuntimeStats, open_keyring
from verdigris.runtime.peers import peers_path
from verdigris.runtime.settings import RuntimeSettings

__all__ = [
    "FaultFilter",
    "FaultInjectionDisabled",
    "GossipRuntime",
    "GossipSetupError",
    "RuntimeSettings",
    "RuntimeStats",
    "open_keyring",
    "peers_path",
]
