"""bench/plot.py: one command runs a real (quick) benchmark, saves its figures and draws them as a PNG; a
result file that lacks a field, or is not what its name says, is refused with an error naming the problem."""

from __future__ import annotations

import importlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
TIMEOUT_S = 150
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _plot_module() -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module("plot")


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG: {data[:8]!r}"
    assert data[12:16] == b"IHDR", f"{path}: no IHDR chunk first"
    width, height = struct.unpack(">II", data[16:24])
    assert data.rstrip(b"\0")[-8:-4] == b"IEND", f"{path}: truncated (no IEND chunk)"
    return int(width), int(height)


def test_run_and_plot_cluster_propagation_in_one_command(tmp_path: Path) -> None:
    """4 real agents (the benchmark's --quick), then the plot of their propagation-time distribution."""
    results, plots = tmp_path / "results", tmp_path / "plots"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run(
        [sys.executable, str(BENCH / "plot.py"), "--run", "cluster_propagation", "--quick",
         "--results", str(results), "--out", str(plots)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr}"
    )
    saved = json.loads((results / "cluster_propagation.json").read_text())
    (run,) = saved["results"]
    # the raw distribution behind the plot: one propagation time per write, consistent with the percentiles
    samples = run["spread_samples_s"]
    assert len(samples) == run["writes"] == 150
    assert min(samples) > 0 and max(samples) == pytest.approx(run["max_s"], abs=1e-3)
    # the benchmark's stdout ended with the same figures it saved
    stdout_json = next(line for line in reversed(proc.stdout.splitlines()) if line.startswith('{"'))
    assert json.loads(stdout_json)["date"] == saved["date"]
    pngs = sorted(plots.glob("*.png"))
    assert [p.name for p in pngs] == ["cluster_propagation.png"]  # one figure per result file
    width, height = png_size(pngs[0])
    plot = _plot_module()
    dpi = plot.DPI
    assert (width, height) == (12 * dpi, round(4.8 * dpi))
    assert 15_000 < pngs[0].stat().st_size < 2_000_000  # a drawn figure, not an empty canvas
    assert str(pngs[0]) in proc.stdout
    leftovers = [c for c in Path("/proc").glob("[0-9]*/cmdline") if b"vd-prop-" in _read(c)]
    assert not leftovers, "agents of the benchmark outlived it"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # the process ended meanwhile
        return b""


def _write(path: Path, payload: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload))
    return path


def _propagation_result() -> dict[str, Any]:
    return {
        "bench": "cluster_propagation",
        "date": "2026-11-26T00:00:00Z",
        "rate": 50.0,
        "seconds": 3.0,
        "target_p99_s": 1.0,
        "results": [{"nodes": 4, "writes": 3, "spread_samples_s": [0.01, 0.02, 0.2]}],
    }


def test_a_result_missing_a_field_is_a_clear_error(tmp_path: Path) -> None:
    plot = _plot_module()
    good = _propagation_result()
    assert plot.render(_write(tmp_path / "ok" / "cluster_propagation.json", good), tmp_path / "ok").exists()

    bad = _propagation_result()
    del bad["results"][0]["spread_samples_s"]  # a result saved before the samples were added
    path = _write(tmp_path / "bad" / "cluster_propagation.json", bad)
    with pytest.raises(plot.ResultsError) as err:
        plot.render(path, tmp_path / "bad")
    assert str(err.value) == f"{path}: missing field 'results.0.spread_samples_s'"
    assert not list((tmp_path / "bad").glob("*.png"))  # nothing half-drawn is left behind

    # the command says the same and fails
    proc = subprocess.run(
        [sys.executable, str(BENCH / "plot.py"), "--results", str(path.parent), "--out", str(tmp_path / "bad")],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert f"FAILED: {path}: missing field 'results.0.spread_samples_s'" in proc.stderr


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["results"][0].update(spread_samples_s="fast"), "field 'results.0.spread_samples_s' is not a list"),
        (lambda d: d["results"][0].update(spread_samples_s=[]), "field 'results.0.spread_samples_s' is an empty list"),
        (lambda d: d.update(target_p99_s=None), "field 'target_p99_s' is None, not a number"),
        (lambda d: d.update(bench="blast_radius"), "holds the results of 'blast_radius', expected 'cluster_propagation'"),
    ],
)  # fmt: skip
def test_malformed_results_are_refused(tmp_path: Path, change: Any, message: str) -> None:
    plot = _plot_module()
    payload = _propagation_result()
    change(payload)
    path = _write(tmp_path / "cluster_propagation.json", payload)
    with pytest.raises(plot.ResultsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plot.render(path, tmp_path)


def test_no_results_and_unknown_benchmarks_are_refused(tmp_path: Path) -> None:
    plot = _plot_module()
    assert plot.main(["--results", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 1
    not_json = tmp_path / "cluster_propagation.json"
    not_json.write_text("{ half")
    with pytest.raises(plot.ResultsError, match="not JSON"):
        plot.render(not_json, tmp_path)
    with pytest.raises(plot.ResultsError, match="no plot for a benchmark named 'write_throughput'"):
        plot.render(_write(tmp_path / "write_throughput.json", {"bench": "write_throughput"}), tmp_path)
    with pytest.raises(SystemExit):  # argparse: not one of the benchmarks it can run
        plot.main(["--run", "no_such_bench"])
