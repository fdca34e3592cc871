"""Watchdog: locks that refuse to deadlock on themselves, and a static check for nested lock use.

* :mod:`verdigris.watchdog.rwlock`: :class:`RWLock` (threads) and :class:`AsyncRWLock` (asyncio tasks).
* :mod:`verdigris.watchdog.lockcheck`: ``python -m verdigris.watchdog.lockcheck src/``.
"""

from verdigris.watchdog.rwlock import (
    AsyncRWLock,
    Holder,
    LockError,
    LockReentryError,
    LockTimeoutError,
    LockUpgradeError,
    RWLock,
)

__all__ = [
    "AsyncRWLock",
    "Holder",
    "LockError",
    "LockReentryError",
    "LockTimeoutError",
    "LockUpgradeError",
    "RWLock",
]
