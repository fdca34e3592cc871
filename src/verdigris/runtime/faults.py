"""Fault injection in the transport: drop all traffic to and from chosen peers.

Partition tests need a real cluster of real processes split in two and healed again, with nothing but
the agents themselves involved (no iptables, no root). :class:`FaultFilter` sits where datagrams leave and
arrive and where sync streams connect: a blocked peer's datagrams are dropped both ways, connections to
it are refused, and running sessions with it fail at their next read or write.

It only acts when enabled (``[gossip] fault-injection = true``); otherwise :meth:`block` refuses, so an
agent in production can never be told through its admin socket to go deaf.

Peers are named by their gossip address (what membership and the sync hello carry), compared as
``(host, port)``.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["FaultFilter", "FaultInjectionDisabled"]


class FaultInjectionDisabled(RuntimeError):
    """``fault`` commands on an agent that does not allow them."""


class FaultFilter:
    """The set of blocked peer addresses, and what was dropped because of it."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._blocked: frozenset[tuple[str, int]] = frozenset()
        self.dropped_in = 0
        """Datagrams from blocked peers dropped."""
        self.dropped_out = 0
        """Datagrams to blocked peers dropped."""
        self.refused = 0
        """Sync connections to or from blocked peers refused or cut."""

    @property
    def blocked(self) -> frozenset[tuple[str, int]]:
        return self._blocked

    def blocks(self, addr: tuple[str, int]) -> bool:
        # The common case, nothing blocked, costs one truth test.
        return bool(self._blocked) and (addr[0], addr[1]) in self._blocked

    def block(self, addrs: Iterable[tuple[str, int]]) -> None:
        if not self.enabled:
            raise FaultInjectionDisabled("fault injection is disabled (set gossip.fault-injection = true)")
        self._blocked = self._blocked | {(h, p) for h, p in addrs}

    def heal(self) -> None:
        """Unblock everyone (allowed even when disabled: it can only restore traffic)."""
        self._blocked = frozenset()
