"""Sets of integers kept as sorted, disjoint, non-adjacent inclusive ranges."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator


class RangeSet:
    """A set of ints as inclusive ``(start, end)`` ranges; adding reports which ranges it merged."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for s, e in ranges:
            self.add(s, e)

    def add(self, start: int, end: int | None = None) -> tuple[list[tuple[int, int]], tuple[int, int]]:
        """Add ``start..end``; return (ranges that were replaced, the range that now holds it)."""
        if end is None:
            end = start
        if end < start:
            raise ValueError(f"empty range {start}..{end}")
        # First range whose end >= start - 1 (may touch or overlap on the left).
        i = bisect.bisect_left(self._ends, start - 1)
        j = i
        new_s, new_e = start, end
        replaced: list[tuple[int, int]] = []
        while j < len(self._starts) and self._starts[j] <= end + 1:
            replaced.append((self._starts[j], self._ends[j]))
            new_s = min(new_s, self._starts[j])
            new_e = max(new_e, self._ends[j])
            j += 1
        self._starts[i:j] = [new_s]
        self._ends[i:j] = [new_e]
        return replaced, (new_s, new_e)

    def __contains__(self, value: object) -> bool:
        if not isinstance(value, int):
            return False
        i = bisect.bisect_left(self._ends, value)
        return i < len(self._starts) and self._starts[i] <= value

    def covers(self, start: int, end: int) -> bool:
        i = bisect.bisect_left(self._ends, start)
        return i < len(self._starts) and self._starts[i] <= start and self._ends[i] >= end

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(self._starts, self._ends, strict=True))

    def __len__(self) -> int:
        return len(self._starts)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and list(self) == list(other)

    def __repr__(self) -> str:
        return f"RangeSet({list(self)!r})"

    @property
    def max(self) -> int:
        return self._ends[-1] if self._ends else 0

    def count(self) -> int:
        return sum(e - s + 1 for s, e in self)

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The ranges inside ``start..end`` that are not in the set."""
        out: list[tuple[int, int]] = []
        cursor = start
        for s, e in self:
            if e < cursor:
                continue
            if s > end:
                break
            if s > cursor:
                out.append((cursor, min(s - 1, end)))
            cursor = max(cursor, e + 1)
            if cursor > end:
                break
        if cursor <= end:
            out.append((cursor, end))
        return out
