"""A version-only stand-in for the store, for the simulator.

:class:`VersionSource` keeps the bookkeeping a :class:`~verdigris.store.Store` keeps (per actor: complete
versions, partial versions with their received seq ranges) and nothing else: no SQLite, no rows. It is a
:class:`~verdigris.gossip.sync.ChangeSource`, merges pieces with the store's completion rule (a version is
complete once seqs ``0..min(claimed last_seq)`` are covered) and makes local versions, so the simulator can
run broadcast and sync at thousands of nodes and check that every node ends up knowing every version.

Its changesets carry no changes: a version's pieces are just seq ranges of ``0..last_seq``.
"""

from __future__ import annotations

from collections.abc import Iterable

from verdigris.store.ranges import RangeSet
from verdigris.store.store import ActorBooks, MergeResult
from verdigris.store.types import Changeset

__all__ = ["VersionSource"]


class VersionSource:
    """Bookkeeping of one simulated node whose own actor is ``actor``."""

    def __init__(self, actor: bytes) -> None:
        if len(actor) != 16:
            raise ValueError("actor id must be 16 bytes")
        self.actor = actor
        self._books: dict[bytes, ActorBooks] = {}
        self._last: dict[tuple[bytes, int], int] = {}
        """last_seq of complete versions that have more than one seq (absent: 0)."""

    # --- ChangeSource ---

    def books(self) -> dict[bytes, ActorBooks]:
        return self._books

    def changesets_for(self, actor: bytes, start: int, end: int) -> list[Changeset]:
        books = self._books.get(actor)
        if books is None:
            return []
        out: list[Changeset] = []
        for s, e in books.known:
            if e < start:
                continue
            if s > end:
                break
            for v in range(max(s, start), min(e, end) + 1):
                last = self._last.get((actor, v), 0)
                out.append(Changeset(actor=actor, version=v, changes=[], seqs=(0, last), last_seq=last))
        return out

    # --- the store-like rest ---

    @property
    def db_version(self) -> int:
        books = self._books.get(self.actor)
        return books.known.max if books else 0

    def commit(self, last_seq: int = 0) -> Changeset:
        """A new local version (of ``last_seq + 1`` seqs), booked as complete."""
        version = self.db_version + 1
        self._books.setdefault(self.actor, ActorBooks()).known.add(version)
        if last_seq:
            self._last[(self.actor, version)] = last_seq
        return Changeset(actor=self.actor, version=version, changes=[], seqs=(0, last_seq), last_seq=last_seq)

    def knows(self, actor: bytes, version: int) -> bool:
        books = self._books.get(actor)
        return books is not None and version in books.known

    def needs(self) -> dict[bytes, list[tuple[int, int]]]:
        return {a: n for a, b in self._books.items() if (n := b.needs())}

    def merge(self, changesets: Iterable[Changeset]) -> MergeResult:
        """Book pieces as the store would (without applying anything)."""
        result = MergeResult()
        for cs in changesets:
            s, e = cs.seqs
            if (
                len(cs.actor) != 16
                or cs.actor == self.actor
                or cs.version < 1
                or not 0 <= s <= e <= cs.last_seq
            ):
                result.rejected.append((cs.actor, cs.version, "invalid piece"))
                continue
            books = self._books.setdefault(cs.actor, ActorBooks())
            if cs.version in books.known:
                result.duplicates += 1
                continue
            seqs, last = books.partials.get(cs.version, (RangeSet(), cs.last_seq))
            last = min(last, cs.last_seq)
            seqs.add(s, e)
            if seqs.covers(0, last):
                books.partials.pop(cs.version, None)
                books.known.add(cs.version)
                if last:
                    self._last[(cs.actor, cs.version)] = last
                result.applied_versions.append((cs.actor, cs.version))
            else:
                books.partials[cs.version] = (seqs, last)
                result.buffered.append((cs.actor, cs.version))
        return result
