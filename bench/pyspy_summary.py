"""Summarise a py-spy ``raw`` (collapsed stacks) profile: top functions and lines by own time.

Only samples whose stack passes through a frame of the function named by ``--under`` count (by default
``Store.merge``), so a profile of a whole benchmark run gives the profile of the merge alone.
"Own time" is the leaf frame of a sample: with py-spy's default (Python frames only) it includes the
C code that the function calls, e.g. the SQLite work done inside ``executemany``; the line table shows
which call it was.

    .venv/bin/py-spy record -r 500 -f raw -o /tmp/merge.raw -- \\
        .venv/bin/python bench/merge_throughput.py --repeats 2
    .venv/bin/python bench/pyspy_summary.py /tmp/merge.raw --top 10
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def parse_frame(frame: str) -> tuple[str, str, str]:
    """``'Store.merge (verdigris/store/store.py:696)'`` -> ``('Store.merge', 'verdigris/store/store.py', '696')``."""
    m = _FRAME.match(frame)
    if m is None:
        return frame, "", ""
    return m["func"], m["file"], m["line"] or ""


def summarise(path: Path, under: str, top: int) -> str:
    own_fn: Counter[str] = Counter()
    own_line: Counter[str] = Counter()
    own_file: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = selected = 0
    for raw in path.read_text().splitlines():
        stack, _, count_s = raw.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        total += count
        frames = [parse_frame(f) for f in stack.split(";")]
        idx = next((i for i, (fn, _, _) in enumerate(frames) if fn == under), None)
        if idx is None:
            continue
        selected += count
        fn, file, line = frames[-1]
        own_fn[f"{fn} ({file})"] += count
        own_line[f"{fn} ({file}:{line})"] += count
        own_file[file or "?"] += count
        for name in {f"{f} ({fl})" for f, fl, _ in frames[idx:]}:
            incl[name] += count
    if selected == 0:
        return f"no sample passes through {under!r} ({total} samples in all)\n"

    def pct(n: int) -> str:
        return f"{100 * n / selected:5.1f} %"

    out = [f"{selected} samples under {under} ({total} in the whole run)", ""]
    out += ["| own time | function |", "|---:|---|"]
    out += [f"| {pct(n)} | `{name}` |" for name, n in own_fn.most_common(top)]
    out += ["", "| own time | line |", "|---:|---|"]
    out += [f"| {pct(n)} | `{name}` |" for name, n in own_line.most_common(top)]
    out += ["", "| inclusive | function |", "|---:|---|"]
    out += [f"| {pct(n)} | `{name}` |" for name, n in incl.most_common(top)]
    out += ["", "| own time | file or library (with --native: SQLite vs interpreter vs libc) |", "|---:|---|"]
    out += [f"| {pct(n)} | `{name}` |" for name, n in own_file.most_common(top)]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    p.add_argument("profile", type=Path, help="py-spy output written with --format raw")
    p.add_argument("--under", default="Store.merge", help="count only samples below this function")
    p.add_argument("--top", type=int, default=10, help="rows per table (default 10)")
    args = p.parse_args(argv)
    sys.stdout.write(summarise(args.profile, args.under, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
