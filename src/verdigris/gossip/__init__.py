"""Gossip protocols, sans-IO: SWIM membership now; change-set broadcast and sync to follow.

Everything here takes bytes and the current time in and gives datagrams, timer deadlines and events out
(see ARCHITECTURE.md, principle 1); the asyncio runtime and the simulator drive the same objects.
"""

from verdigris.gossip.membership import (
    Addr,
    JoinFailed,
    Limits,
    MemberDown,
    MemberEvent,
    MemberInfo,
    MemberLeft,
    Membership,
    MembershipStats,
    MemberState,
    MemberSuspect,
    MemberUp,
    MemberUpdated,
    Timing,
)
from verdigris.gossip.wire import DecodeError

__all__ = [
    "Addr",
    "DecodeError",
    "JoinFailed",
    "Limits",
    "MemberDown",
    "MemberEvent",
    "MemberInfo",
    "MemberLeft",
    "MemberState",
    "MemberSuspect",
    "MemberUp",
    "MemberUpdated",
    "Membership",
    "MembershipStats",
    "Timing",
]
