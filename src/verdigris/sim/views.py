"""Compact member views the simulator hands to the broadcaster and the sync scheduler.

A view is what a node's driver passes as ``members`` to :meth:`Broadcaster.tick` and
:meth:`SyncScheduler.choose_peers`: the live members, this node excluded. The runtime builds that list
from membership on every call; the simulator keeps it up to date instead (from membership events, or once
for every node in static mode), so that a gossip tick costs O(fanout), not O(N):

* :class:`PeerView` is a list of :class:`Peer` records with O(1) add and remove (swap-remove; the order is
  a deterministic function of the calls) and an :attr:`~PeerView.addrs` set view of their addresses.
* :class:`Without` is a view minus one node, computed on access: in static mode all nodes share one
  :class:`PeerView` and each holds only a ``Without`` over it (two references, not N).

Both are real :class:`collections.abc.Sequence` s, so ``random.sample`` draws from them exactly as it
would from the equivalent list. Addresses are unique per node in the simulator, which is what lets the
address views answer by node index.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import overload

from verdigris.gossip.membership import Addr

__all__ = ["Peer", "PeerView", "Without"]


@dataclass(frozen=True, slots=True)
class Peer:
    """A member as the broadcaster and the scheduler see it (their ``Member`` protocol)."""

    id: str
    addr: Addr
    index: int
    """The node's index in the simulator."""


class PeerView(Sequence[Peer]):
    """Live members in a list with O(1) add / remove by node index."""

    __slots__ = ("_by_addr", "_items", "_pos", "addrs")

    def __init__(self, by_addr: Mapping[Addr, int]) -> None:
        self._items: list[Peer] = []
        self._pos: dict[int, int] = {}
        self._by_addr = by_addr
        self.addrs: AbstractSet[Addr] = _Addrs(self)
        """The members' addresses, as a live set view (for ``Broadcaster.tick(addrs=...)``)."""

    def add(self, peer: Peer) -> bool:
        if peer.index in self._pos:
            return False
        self._pos[peer.index] = len(self._items)
        self._items.append(peer)
        return True

    def remove(self, index: int) -> bool:
        pos = self._pos.pop(index, None)
        if pos is None:
            return False
        last = self._items.pop()
        if last.index != index:
            self._items[pos] = last
            self._pos[last.index] = pos
        return True

    def has(self, index: int) -> bool:
        return index in self._pos

    def position(self, index: int) -> int:
        """Where node ``index`` is in the list, or -1."""
        return self._pos.get(index, -1)

    def clear(self) -> None:
        self._items.clear()
        self._pos.clear()

    def __len__(self) -> int:
        return len(self._items)

    @overload
    def __getitem__(self, i: int) -> Peer: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[Peer]: ...

    def __getitem__(self, i: int | slice) -> Peer | Sequence[Peer]:
        return self._items[i]

    def __iter__(self) -> Iterator[Peer]:
        return iter(self._items)

    def __contains__(self, value: object) -> bool:
        return isinstance(value, Peer) and self._pos.get(value.index, -1) >= 0


class _Addrs(AbstractSet[Addr]):
    __slots__ = ("_view",)

    def __init__(self, view: PeerView) -> None:
        self._view = view

    def __contains__(self, addr: object) -> bool:
        i = self._view._by_addr.get(addr)  # type: ignore[call-overload]
        return i is not None and i in self._view._pos

    def __len__(self) -> int:
        return len(self._view)

    def __iter__(self) -> Iterator[Addr]:
        return (p.addr for p in self._view._items)


class Without(Sequence[Peer]):
    """``view`` without node ``index``, computed on access (O(1) memory, O(1) indexing)."""

    __slots__ = ("_index", "_view", "addrs")

    def __init__(self, view: PeerView, index: int) -> None:
        self._view = view
        self._index = index
        self.addrs: AbstractSet[Addr] = _AddrsWithout(self)

    def __len__(self) -> int:
        n = len(self._view)
        return n - 1 if self._view.has(self._index) else n

    @overload
    def __getitem__(self, i: int) -> Peer: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[Peer]: ...

    def __getitem__(self, i: int | slice) -> Peer | Sequence[Peer]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("view index out of range")
        p = self._view.position(self._index)
        return self._view[i if p < 0 or i < p else i + 1]

    def __iter__(self) -> Iterator[Peer]:
        return (p for p in self._view if p.index != self._index)

    def __contains__(self, value: object) -> bool:
        return isinstance(value, Peer) and value.index != self._index and value in self._view


class _AddrsWithout(AbstractSet[Addr]):
    __slots__ = ("_w",)

    def __init__(self, w: Without) -> None:
        self._w = w

    def __contains__(self, addr: object) -> bool:
        view = self._w._view
        i = view._by_addr.get(addr)  # type: ignore[call-overload]
        return i is not None and i != self._w._index and view.has(i)

    def __len__(self) -> int:
        return len(self._w)

    def __iter__(self) -> Iterator[Addr]:
        return (p.addr for p in self._w)
