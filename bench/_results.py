"""Where the benchmarks keep their figures for ``bench/plot.py`` (not a public module).

A benchmark that draws a plot saves the same JSON it prints as its last line of stdout to
``<results dir>/<bench>.json``: ``bench/results/`` by default, or the directory named by ``--results`` or by
the environment variable ``VERDIGRIS_BENCH_RESULTS`` (which ``bench/plot.py --run`` sets for the benchmarks
it runs). The file is written to a temporary name and renamed, so a plot never reads half a file.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

DEFAULT_RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS_ENV = "VERDIGRIS_BENCH_RESULTS"


def default_results_dir() -> Path:
    """The directory results go to when no ``--results`` is given."""
    env = os.environ.get(RESULTS_ENV, "").strip()
    return Path(env) if env else DEFAULT_RESULTS_DIR


def add_results_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--results DIR`` option every plotting benchmark takes."""
    parser.add_argument(
        "--results",
        type=Path,
        default=None,
        help=f"directory to save the JSON figures in, for bench/plot.py (default ${RESULTS_ENV} or "
        "bench/results)",
    )


def save_results(payload: dict[str, Any], directory: Path | None = None) -> Path:
    """Write ``payload`` (it must name its ``bench``) to ``<directory>/<bench>.json``; the path."""
    bench = payload.get("bench")
    if not isinstance(bench, str) or not bench:
        raise ValueError("a benchmark result must have a non-empty 'bench' name to be saved")
    target_dir = directory if directory is not None else default_results_dir()
    target_dir.mkdir(parents=True, exist_ok=True)
    path = target_dir / f"{bench}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, sort_keys=True, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
    return path
