"""The event loop's view of which versions this node already has.

The broadcaster asks "is this piece new here?" for every piece of every datagram (that answer decides what
is merged and what is relayed). The store's bookkeeping holds the truth, but it belongs to the writer
thread: it changes in the middle of merges, and reading it from the loop thread would race with them.
Blocking the loop on the store's lock instead would stall membership behind a long merge.

So the loop keeps :class:`ReceivedVersions`, a small copy of the bookkeeping: loaded once from the store
(on the writer thread), then advanced by the loop itself whenever it hands a piece to the merge queue or
sync merges something. It is "received", not "merged": a piece queued for merging is not new any more, so
the same piece arriving again from another peer a moment later is neither merged twice nor relayed twice.
When a merge fails the runtime reloads it from the store, so a lost batch is accepted again.

It may only err towards "already have it" for pieces whose merge is still pending; every such gap is closed
by sync, which reads the store's own books.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from verdigris.store.ranges import RangeSet
from verdigris.store.store import ActorBooks
from verdigris.store.types import Changeset

__all__ = ["ReceivedVersions"]


class ReceivedVersions:
    """Per actor: complete versions, and seq ranges of versions received in part."""

    def __init__(self, own_actor: bytes, *, also_own: Iterable[bytes] = ()) -> None:
        self.own_actor = own_actor
        self.own_actors = frozenset((own_actor, *also_own))
        """Every actor of this node this runtime carries (one per scope in a single cluster)."""
        self._known: dict[bytes, RangeSet] = {}
        self._partials: dict[tuple[bytes, int], tuple[RangeSet, int]] = {}

    @classmethod
    def from_books(
        cls, own_actor: bytes, books: Mapping[bytes, ActorBooks], *, also_own: Iterable[bytes] = ()
    ) -> ReceivedVersions:
        """A copy of the store's bookkeeping. Call it where the books are stable (the writer thread)."""
        out = cls(own_actor, also_own=also_own)
        for actor, b in books.items():
            out._known[actor] = RangeSet(list(b.known))
            for version, (seqs, last) in b.partials.items():
                out._partials[(actor, version)] = (RangeSet(list(seqs)), last)
        return out

    def is_new(self, actor: bytes, version: int, seqs: tuple[int, int]) -> bool:
        """The broadcaster's ``is_new``: would this piece teach this node something?"""
        if actor in self.own_actors:
            return False  # our own versions come from our own store, never from the network
        known = self._known.get(actor)
        if known is not None and version in known:
            return False
        partial = self._partials.get((actor, version))
        return partial is None or not partial[0].covers(seqs[0], seqs[1])

    def record(self, cs: Changeset) -> None:
        """``cs`` (a whole version or a piece of one) was handed to the merge."""
        key = (cs.actor, cs.version)
        known = self._known.setdefault(cs.actor, RangeSet())
        if cs.version in known:
            return
        seqs, last = self._partials.get(key, (RangeSet(), cs.last_seq))
        last = min(last, cs.last_seq)  # the store's completion rule: the smallest claim of last_seq
        seqs.add(cs.seqs[0], cs.seqs[1])
        if seqs.covers(0, last):
            self._partials.pop(key, None)
            known.add(cs.version)
        else:
            self._partials[key] = (seqs, last)

    def complete(self, actor: bytes, version: int) -> None:
        """The store now has ``version`` of ``actor`` complete."""
        self._partials.pop((actor, version), None)
        self._known.setdefault(actor, RangeSet()).add(version)

    def forget(self, actor: bytes, version: int) -> None:
        """Take back a version (the store refused it): a later copy may be accepted again."""
        self._partials.pop((actor, version), None)
        known = self._known.get(actor)
        if known is None or version not in known:
            return
        kept: list[tuple[int, int]] = []
        for s, e in known:
            if s <= version <= e:
                if s < version:
                    kept.append((s, version - 1))
                if version < e:
                    kept.append((version + 1, e))
            else:
                kept.append((s, e))
        self._known[actor] = RangeSet(kept)

    @property
    def partial_versions(self) -> int:
        return len(self._partials)
