"""Smoke tests of the benchmarks in bench/: each runs with ``--quick`` and ends with one line of JSON, and a
benchmark whose correctness check fails exits non-zero without reporting figures."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
TIMEOUT_S = 120


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT / "src"), env.get("PYTHONPATH", "")) if p)
    return env


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


def _last_json(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output; stderr:\n{proc.stderr}"
    payload = json.loads(lines[-1])
    assert isinstance(payload, dict)
    return payload


def _positive(d: dict[str, Any], keys: list[str]) -> None:
    for k in keys:
        assert k in d, f"missing key {k!r} in {d}"
        v = d[k]
        assert isinstance(v, int | float) and not isinstance(v, bool), f"{k} = {v!r} is not a number"
        assert v > 0, f"{k} = {v!r} is not positive"


def test_write_throughput_quick() -> None:
    payload = _last_json(_run([str(BENCH / "write_throughput.py"), "--quick"]))
    assert payload["bench"] == "write_throughput"
    assert payload["quick"] is True
    _positive(payload, ["repeats"])
    results = payload["results"]
    assert [r["batch_size"] for r in results] == [1, 100]
    for r in results:
        _positive(
            r, ["batch_size", "rows", "transactions", "verdigris_rows_per_s", "plain_rows_per_s", "ratio"]
        )
        assert len(r["verdigris_runs"]) == len(r["plain_runs"]) == payload["repeats"]


def test_merge_throughput_quick() -> None:
    payload = _last_json(_run([str(BENCH / "merge_throughput.py"), "--quick"]))
    assert payload["bench"] == "merge_throughput"
    assert payload["quick"] is True
    _positive(
        payload,
        [
            "repeats",
            "rows",
            "versions",
            "changes",
            "superseded",
            "extract_changes_per_s",
            "target_changes_per_s",
        ],
    )
    assert isinstance(payload["target_met"], bool)
    results = payload["results"]
    assert [r["batch_size"] for r in results] == [1000, 10000]
    for r in results:
        _positive(
            r,
            [
                "batch_size",
                "batches",
                "verdigris_changes_per_s",
                "verdigris_cpu_changes_per_s",
                "plain_changes_per_s",
                "plain_rows_per_s",
                "ratio",
            ],
        )
        assert isinstance(r["meets_target"], bool)
    assert payload["target_met"] == all(r["meets_target"] for r in results)


# A broken store must make the benchmark fail: run it in-process with a sabotaged Store method.
_SABOTAGE = {
    "merge_throughput": """
        from verdigris.store import Change, Changeset, Store
        real = Store.merge
        def merge(self, changesets):
            out = []
            for cs in changesets:  # every non-sentinel value arrives wrong
                changes = [Change(c.table, c.pk, c.cid, c.val if c.cid == "-1" else "x", c.col_version,
                                  c.db_version, c.site_id, c.cl, c.seq) for c in cs.changes]
                out.append(Changeset(cs.actor, cs.version, changes, cs.seqs, cs.last_seq, cs.ts))
            return real(self, out)
        Store.merge = merge
        """,
    "write_throughput": """
        from verdigris.store import Store
        real = Store.transact
        def transact(self, statements):  # loses all but the first statement of each transaction
            return real(self, list(statements)[:1])
        Store.transact = transact
        """,
}


@pytest.mark.parametrize("bench", sorted(_SABOTAGE))
def test_bench_fails_on_broken_store(bench: str) -> None:
    args = ["--quick", "--repeats", "1"]
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(BENCH)!r})\n"
        + textwrap.dedent(_SABOTAGE[bench])
        + f"import {bench}\nsys.exit({bench}.main({args!r}))\n"
    )
    proc = _run(["-c", code])
    assert proc.returncode != 0, proc.stdout
    assert "FAILED" in proc.stdout
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert not last.startswith("{"), f"a failed run reported figures: {last}"


def test_subscription_latency_quick() -> None:
    payload = _last_json(_run([str(BENCH / "subscription_latency.py"), "--quick"]))
    assert payload["bench"] == "subscription_latency"
    assert payload["quick"] is True
    _positive(payload, ["achieved_rate", "p50_ms", "p99_ms", "max_ms"])
    assert payload["p50_ms"] <= payload["p99_ms"] <= payload["max_ms"]
    (run,) = payload["runs"]
    assert run["events"] == run["commits"] > 0


def test_sim_propagation_quick() -> None:
    payload = _last_json(_run([str(BENCH / "sim_propagation.py"), "--quick"]))
    assert payload["bench"] == "sim_propagation"
    assert payload["quick"] is True and payload["membership"] == "static"
    results = payload["results"]
    assert {(r["nodes"], r["loss"], r["driver"]) for r in results} == {
        (n, loss, d) for n in (100, 1000) for loss in (0.0, 0.1) for d in ("timer", "ticker")
    }
    for r in results:
        _positive(r, ["seeds", "t99_s", "t999_s", "t100_s", "serf_model_t99_s", "datagrams_per_node"])
        assert r["t99_s"] <= r["t999_s"] <= r["t100_s"]
        assert len(r["t99_runs"]) == r["seeds"] == 3
    # The model columns reproduce the published anchors at N = 1,000.
    serf = {r["loss"]: r for r in results if r["nodes"] == 1000}
    assert (
        round(serf[0.0]["serf_model_t99_s"], 2) == 1.53 and round(serf[0.1]["serf_model_t999_s"], 2) == 2.05
    )
    assert len(payload["anchors"]) == 4 and isinstance(payload["anchors_met"], bool)


def _no_leftovers(marker: bytes) -> None:
    """No process whose command line mentions ``marker`` (a benchmark's agents) is still running."""
    leftovers = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if any(marker in a for a in args):
            leftovers.append(b" ".join(args).decode(errors="replace"))
    assert not leftovers, leftovers


def test_cluster_propagation_quick(tmp_path: Path) -> None:
    """4 real agents on 127.0.0.1: every write reaches every node, and no agent outlives the benchmark."""
    payload = _last_json(_run([str(BENCH / "cluster_propagation.py"), "--quick", "--results", str(tmp_path)]))
    assert payload["bench"] == "cluster_propagation"
    assert payload["quick"] is True
    (r,) = payload["results"]
    assert r["nodes"] == 4 and r["writes"] == 150
    _positive(r, ["achieved_rate", "p50_s", "p90_s", "p99_s", "max_s", "single_p50_s"])
    assert r["p50_s"] <= r["p90_s"] <= r["p99_s"] <= r["max_s"]
    assert r["versions_by_broadcast"] + r["versions_by_sync"] == 150 * 3  # each write merged by the 3 others
    assert isinstance(payload["target_met"], bool)
    saved = json.loads((tmp_path / "cluster_propagation.json").read_text())
    assert saved == payload  # saved for bench/plot.py
    _no_leftovers(b"vd-prop-")


def test_blast_radius_quick(tmp_path: Path) -> None:
    """3 regions x 2 real agents, region mode then one fleet-wide cluster, churn in region a: nothing
    regional leaves region a in region mode, all of it does fleet-wide; no agent outlives the benchmark."""
    payload = _last_json(_run([str(BENCH / "blast_radius.py"), "--quick", "--results", str(tmp_path)]))
    assert payload["bench"] == "blast_radius"
    assert payload["quick"] is True and payload["regions"] == 3 and payload["nodes_per_region"] == 2
    assert set(payload["targets_met"]) == {
        "zero_regional_outside",
        "global_writes_bounded",
        "propagation_no_worse",
    }
    assert all(isinstance(v, bool) for v in payload["targets_met"].values())
    assert payload["targets_met"]["zero_regional_outside"] is True
    a, b = payload["by_region"]["a_region_mode"], payload["by_region"]["b_fleet_wide"]
    for region in ("b", "c"):
        assert a[region]["outside_a"] == {
            "regional_changesets_applied": 0,
            "a_regional_versions_held": 0,
            "rows": 0,
            "books_of_a_regional_actors": 0,
        }
        assert b[region]["outside_a"]["rows"] > 0 and b[region]["changesets_applied_per_node_total"] > 0
    _positive(a["a"]["changesets_applied_per_node"], ["regional"])
    assert payload["global_writes_b"] > payload["events"]["check_flap"]  # every change set went fleet-wide
    for phase in ("a_region_mode", "b_fleet_wide"):
        p = payload["propagation"][phase]
        _positive(p, ["probes", "p50_s", "p99_s"])
        assert p["p50_s"] <= p["p99_s"]
        assert len(p["samples_s"]) == p["probes"]  # the distribution bench/plot.py draws
    assert json.loads((tmp_path / "blast_radius.json").read_text()) == payload
    _no_leftovers(b"vd-blast-")


def test_routing_table_memory_quick() -> None:
    payload = _last_json(_run([str(BENCH / "routing_table_memory.py"), "--quick"]))
    assert payload["bench"] == "routing_table_memory"
    assert payload["quick"] is True and payload["instances"] == 10_000
    _positive(
        payload,
        [
            "instances_mib_per_100k_traced",
            "instances_mib_per_100k_rss",
            "checks_mib_per_100k_traced",
            "bytes_per_instance_traced",
            "machine_snapshot_events_per_s",
            "change_events_per_s",
        ],
    )
    assert set(payload["traced"]) == {"apps", "instances", "checks", "churn", "churn again", "total"}


_MISSING_PROXY_BENCH_TOOLS = [
    t
    for t in ("wrk", "nginx", "haproxy", "taskset")
    if shutil.which(t) is None and shutil.which(t, path="/usr/sbin:/sbin") is None
]


@pytest.mark.skipif(
    bool(_MISSING_PROXY_BENCH_TOOLS),
    reason="the proxy benchmark needs the Debian packages wrk, nginx and haproxy (.ci/run installs them); "
    f"not installed: {', '.join(_MISSING_PROXY_BENCH_TOOLS)}",
)
def test_proxy_vs_nginx_quick(tmp_path: Path) -> None:
    """nginx, HAProxy and Verdigris (with a real agent) in front of one nginx backend, each measured with
    wrk, the figures saved and drawn as a PNG by bench/plot.py; no process outlives the benchmark."""
    payload = _last_json(_run([str(BENCH / "proxy_vs_nginx.py"), "--quick", "--results", str(tmp_path)]))
    assert payload["bench"] == "proxy_vs_nginx"
    assert payload["quick"] is True and payload["repeats"] == 1
    results = payload["results"]
    assert set(results) == {"small", "16k"}
    for by in results.values():
        assert set(by) == {"direct", "nginx", "haproxy", "verdigris"}
        for name, s in by.items():
            _positive({k: v["median"] for k, v in s.items() if k != "runs"}, ["rps", "p50_ms", "p99_ms"])
            if name != "direct":
                _positive({k: s[k]["median"] for k in ("cpu_us", "cpu_user_us")}, ["cpu_us", "cpu_user_us"])
            (run,) = s["runs"]
            assert run["p50_ms"] <= run["p90_ms"] <= run["p99_ms"]
    for size in ("small", "16k"):
        assert isinstance(payload["ratios"][size]["verdigris_rps_vs_nginx"], float)
    assert set(payload["two_workers"]["results"]["small"]) == {"nginx", "haproxy", "verdigris"}
    assert isinstance(payload["target_met"], bool) and len(payload["targets"]) == 3
    saved = tmp_path / "proxy_vs_nginx.json"
    assert json.loads(saved.read_text()) == payload
    # requests/s, CPU per request and p99 beside nginx and HAProxy, as one PNG (two rows: 1 and 2 workers)
    plot = subprocess.run(
        [sys.executable, str(BENCH / "plot.py"), "--results", str(tmp_path), "--out", str(tmp_path / "plots")],
        capture_output=True, text=True, timeout=TIMEOUT_S, check=False,
    )  # fmt: skip
    assert plot.returncode == 0, plot.stderr
    png = (tmp_path / "plots" / "proxy_vs_nginx.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    assert 30_000 < len(png) < 3_000_000
    # every process of the run names its temporary directory (vd-proxybench-<bench pid>-...) in its
    # environment, its command line or, for nginx workers (which overwrite both), its open log files. A
    # process whose benchmark has exited is a leftover; one whose benchmark still runs belongs to another
    # run going on at the same time (another session on this machine), not to this one.
    leftovers = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            texts = [(proc / "environ").read_bytes(), (proc / "cmdline").read_bytes()]
            texts += [os.readlink(fd).encode() for fd in (proc / "fd").iterdir()]
        except OSError:
            continue
        owners = {int(m) for t in texts for m in re.findall(rb"vd-proxybench-(\d+)-", t)}
        if owners and not any(Path(f"/proc/{o}").exists() for o in owners):
            leftovers.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
    assert not leftovers, leftovers
