"""Draw the benchmarks' figures as PNG plots, from the JSON they save in ``bench/results/``.

    .venv/bin/python bench/plot.py                                   # every plot there are results for
    .venv/bin/python bench/plot.py --run cluster_propagation --quick # run it first (one command), then plot
    .venv/bin/python bench/plot.py --results DIR --out DIR

Plots (one PNG per result file, ``<out>/<bench>.png``):

* ``cluster_propagation`` — the distribution of write → visible-on-every-node times (histogram and CDF per
  cluster size, the p99 target marked);
* ``blast_radius`` — probe propagation inside region a, region mode beside the fleet-wide cluster;
* ``proxy_vs_nginx`` — requests/s, CPU µs per request (user + kernel) and p99 of Verdigris beside nginx and
  HAProxy (and direct), per response size, median with min–max bars; the two-worker run as a second row;
* ``sim_propagation`` — seconds to 99 % / 99.9 % / 100 % of N simulated nodes beside the Serf and round
  models;
* ``incident`` — every client request through every proxy over time in each case of the incident, with
  the stall, the detection and the return to service marked.

``--run NAME ...`` runs ``bench/NAME.py`` first (``--quick`` is passed on) with its output shown as it comes,
and saves its last line of JSON to the results directory, unless the benchmark saved its own file there
during the run (the benchmarks that plot do; ``incident``'s holds more than its last line).
A result file missing a field a plot needs is an error naming the file and the field; matplotlib runs on its
Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

from matplotlib.axes import Axes
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import DEFAULT_RESULTS_DIR, RESULTS_ENV, save_results

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT_DIR = BENCH_DIR / "plots"
DPI = 110
TARGET_COLOURS = {"direct": "#9e9e9e", "nginx": "#2e7d32", "haproxy": "#1565c0", "verdigris": "#c62828"}


class ResultsError(Exception):
    """A result file cannot be plotted: unreadable, not the expected benchmark, or missing a field."""


# ------------------------------------------------------------------------------------------------ fields


class Fields:
    """Read access to a result's JSON that names the file and the dotted path of anything missing."""

    def __init__(self, value: Any, source: str, path: str = "") -> None:
        self.value, self.source, self.path = value, source, path

    def _where(self, key: str | int) -> str:
        return f"{self.path}.{key}" if self.path else str(key)

    def __getitem__(self, key: str | int) -> Fields:
        where = self._where(key)
        if isinstance(key, str):
            if not isinstance(self.value, dict) or key not in self.value:
                raise ResultsError(f"{self.source}: missing field '{where}'")
            return Fields(self.value[key], self.source, where)
        if not isinstance(self.value, list) or not -len(self.value) <= key < len(self.value):
            raise ResultsError(f"{self.source}: missing field '{where}'")
        return Fields(self.value[key], self.source, where)

    def has(self, key: str) -> bool:
        return isinstance(self.value, dict) and key in self.value and self.value[key] is not None

    def items(self) -> list[tuple[str, Fields]]:
        if not isinstance(self.value, dict):
            raise ResultsError(f"{self.source}: field '{self.path}' is not an object")
        return [(k, self[k]) for k in self.value]

    def each(self) -> list[Fields]:
        if not isinstance(self.value, list):
            raise ResultsError(f"{self.source}: field '{self.path}' is not a list")
        return [self[i] for i in range(len(self.value))]

    def num(self) -> float:
        v = self.value
        if isinstance(v, bool) or not isinstance(v, int | float) or math.isnan(float(v)):
            raise ResultsError(f"{self.source}: field '{self.path}' is {v!r}, not a number")
        return float(v)

    def nums(self) -> list[float]:
        values = [f.num() for f in self.each()]
        if not values:
            raise ResultsError(f"{self.source}: field '{self.path}' is an empty list")
        return values

    def text(self) -> str:
        return str(self.value)


def describe(doc: Fields) -> str:
    """A short line saying when and how the figures were taken (for the figure's footer)."""
    parts = [doc.value.get(k) for k in ("date", "command") if isinstance(doc.value, dict)]
    load = doc.value.get("loadavg_1m") if isinstance(doc.value, dict) else None
    quick = " — quick (smoke) run" if isinstance(doc.value, dict) and doc.value.get("quick") else ""
    text = "  ".join(str(p) for p in parts if p)
    return f"{text}  load {load}{quick}" if load is not None else text + quick


# ------------------------------------------------------------------------------------------------ plots


def _distribution(ax_hist: Axes, ax_cdf: Axes, samples_ms: list[float], label: str, colour: str) -> None:
    ordered = sorted(samples_ms)
    bins = min(60, max(10, int(math.sqrt(len(ordered)) * 2)))
    ax_hist.hist(ordered, bins=bins, histtype="stepfilled", alpha=0.35, color=colour, label=label)
    ax_hist.hist(ordered, bins=bins, histtype="step", color=colour)
    ax_cdf.step(
        ordered,
        [(i + 1) / len(ordered) * 100 for i in range(len(ordered))],
        where="post",
        color=colour,
        label=label,
    )


def _percentile(ordered: Sequence[float], p: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, int(p / 100 * len(ordered) + 0.5) - 1))]


def plot_cluster_propagation(doc: Fields, fig: Figure) -> None:
    results = [
        (int(r["nodes"].num()), [x * 1000 for x in r["spread_samples_s"].nums()])
        for r in doc["results"].each()
    ]
    target_ms = doc["target_p99_s"].num() * 1000
    ax_hist, ax_cdf = fig.subplots(1, 2)
    colours = ["#c62828", "#1565c0", "#2e7d32", "#6a1b9a", "#ef6c00"]
    for i, (nodes, samples) in enumerate(results):
        ordered = sorted(samples)
        label = f"N = {nodes}: p50 {_percentile(ordered, 50):.0f} ms, p99 {_percentile(ordered, 99):.0f} ms"
        _distribution(ax_hist, ax_cdf, samples, label, colours[i % len(colours)])
    ax_hist.set(xlabel="write → visible on every node (ms)", ylabel="writes", title="distribution")
    ax_cdf.axvline(
        target_ms, color="black", linestyle="--", linewidth=1, label=f"target p99 ≤ {target_ms:.0f} ms"
    )
    ax_cdf.axhline(99, color="grey", linestyle=":", linewidth=1)
    ax_cdf.set(
        xlabel="write → visible on every node (ms)", ylabel="% of writes", title="cumulative", ylim=(0, 101)
    )
    ax_cdf.set_xscale("log")
    for ax in (ax_hist, ax_cdf):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"Propagation through real agents ({doc['rate'].num():g} writes/s for {doc['seconds'].num():g} s)"
    )


def plot_blast_radius(doc: Fields, fig: Figure) -> None:
    phases = {
        "A: region mode": doc["propagation"]["a_region_mode"],
        "B: one fleet-wide cluster": doc["propagation"]["b_fleet_wide"],
    }
    samples = {name: [x * 1000 for x in p["samples_s"].nums()] for name, p in phases.items()}
    ax_hist, ax_cdf = fig.subplots(1, 2)
    for (name, values), colour in zip(samples.items(), ("#c62828", "#1565c0"), strict=True):
        ordered = sorted(values)
        label = f"{name}: p50 {_percentile(ordered, 50):.0f} ms, p99 {_percentile(ordered, 99):.0f} ms"
        _distribution(ax_hist, ax_cdf, values, label, colour)
    ax_hist.set(xlabel="probe ack → visible on the other a-nodes (ms)", ylabel="probes", title="distribution")
    ax_cdf.set(
        xlabel="probe ack → visible on the other a-nodes (ms)",
        ylabel="% of probes",
        title="cumulative",
        ylim=(0, 101),
    )
    for ax in (ax_hist, ax_cdf):
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(
        f"Propagation inside region a under churn ({doc['regions'].num():g} regions × "
        f"{doc['nodes_per_region'].num():g} agents, {doc['rate'].num():g} events/s)"
    )


@dataclass
class _Bar:
    median: float
    low: float
    high: float


def _bar(s: Fields, metric: str) -> _Bar | None:
    if not s.has(metric):
        return None
    m = s[metric]
    return _Bar(m["median"].num(), m["min"].num(), m["max"].num())


def _versus_nginx(ax: Axes, x: float, top: float, value: float, nginx: float | None) -> None:
    """Write Verdigris's ratio to nginx above its bar."""
    if nginx:
        ax.annotate(f"×{value / nginx:.2f}", (x, top), ha="center", va="bottom", fontsize=7,
                    xytext=(0, 2), textcoords="offset points")  # fmt: skip


def _grouped_bars(
    ax: Axes, by_size: dict[str, dict[str, _Bar | None]], sizes: list[str], ylabel: str, title: str
) -> None:
    names = [n for n in TARGET_COLOURS if any(by_size[s].get(n) is not None for s in sizes)]
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        xs, heights, lows, highs = [], [], [], []
        for i, size in enumerate(sizes):
            b = by_size[size].get(name)
            if b is None:
                continue
            xs.append(i - 0.4 + width * (j + 0.5))
            heights.append(b.median)
            lows.append(max(0.0, b.median - b.low))
            highs.append(max(0.0, b.high - b.median))
        ax.bar(xs, heights, width, color=TARGET_COLOURS[name], label=name, yerr=[lows, highs], capsize=3)
        if name == "verdigris":
            for x, size, h, hi in zip(
                xs, [s for s in sizes if by_size[s].get(name)], heights, highs, strict=True
            ):
                nginx = by_size[size].get("nginx")
                _versus_nginx(ax, x, h + hi, h, nginx.median if nginx else None)
    ax.set_xticks(range(len(sizes)), [f"/{s}" for s in sizes])
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)


def _cpu_bars(ax: Axes, results: Fields, sizes: list[str]) -> None:
    """CPU µs per request, stacked user (solid) + kernel (hatched), per size and proxy."""
    names = [n for n in TARGET_COLOURS if n != "direct"]
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        for i, size in enumerate(sizes):
            s = results[size]
            if not s.has(name) or not s[name].has("cpu_user_us"):
                continue
            user = s[name]["cpu_user_us"]["median"].num()
            kernel = s[name]["cpu_kernel_us"]["median"].num()
            x = i - 0.4 + width * (j + 0.5)
            colour = TARGET_COLOURS[name]
            ax.bar(x, user, width, color=colour, label=name if i == 0 else None)
            ax.bar(x, kernel, width, bottom=user, color="white", edgecolor=colour, hatch="///")
            if name == "verdigris" and s.has("nginx") and s["nginx"].has("cpu_us"):
                _versus_nginx(ax, x, user + kernel, user + kernel, s["nginx"]["cpu_us"]["median"].num())
    ax.set_xticks(range(len(sizes)), [f"/{s}" for s in sizes])
    ax.set(ylabel="CPU µs per request (user + kernel hatched)", title="proxy CPU per request")
    ax.grid(axis="y", alpha=0.3)


def plot_proxy_vs_nginx(doc: Fields, fig: Figure) -> None:
    rows: list[tuple[str, Fields]] = [("1 worker", doc["results"])]
    if doc.has("two_workers"):
        rows.append(("2 workers", doc["two_workers"]["results"]))
    axes = fig.subplots(len(rows), 3, squeeze=False)
    sizes_bytes = {k: f.num() for k, f in doc["body_bytes"].items()} if doc.has("body_bytes") else {}
    for r, (label, results) in enumerate(rows):
        sizes = sorted((s for s, _ in results.items()), key=lambda s: sizes_bytes.get(s, math.inf))
        rps = {size: {n: _bar(s, "rps") for n, s in by.items()} for size, by in results.items()}
        p99 = {size: {n: _bar(s, "p99_ms") for n, s in by.items()} for size, by in results.items()}
        for size, by in rps.items():  # a target every plot needs
            if by.get("verdigris") is None or by.get("nginx") is None:
                raise ResultsError(f"{doc.source}: missing field '{results.path}.{size}.verdigris/nginx.rps'")
        _grouped_bars(axes[r][0], rps, sizes, "requests/s", f"{label}: requests/s")
        _cpu_bars(axes[r][1], results, sizes)
        axes[r][1].set_title(f"{label}: CPU per request")
        _grouped_bars(axes[r][2], p99, sizes, "p99 latency (ms)", f"{label}: p99 latency")
        axes[r][0].legend(fontsize=8)
        axes[r][1].legend(fontsize=8)
    wrk = doc["wrk"]
    fig.suptitle(
        f"Verdigris proxy beside nginx and HAProxy (wrk -c{wrk['connections'].num():g}, "
        f"{doc['seconds'].num():g} s × {doc['repeats'].num():g}; median, bars min–max; ×: Verdigris / nginx)"
    )


def plot_sim_propagation(doc: Fields, fig: Figure) -> None:
    rows = doc["results"].each()
    losses = sorted({r["loss"].num() for r in rows})
    axes = fig.subplots(1, len(losses), squeeze=False)[0]
    styles = {"99": ("-", "99 %"), "999": ("--", "99.9 %"), "100": (":", "100 %")}
    for ax, loss in zip(axes, losses, strict=True):
        for driver, colour in (("timer", "#c62828"), ("ticker", "#1565c0")):
            mine = sorted((r for r in rows if r["loss"].num() == loss and r["driver"].text() == driver),
                          key=lambda r: r["nodes"].num())  # fmt: skip
            if not mine:
                continue
            xs = [r["nodes"].num() for r in mine]
            for key, (style, percent) in styles.items():
                ys = [r[f"t{key}_s"].value for r in mine]  # None: not reached
                ax.plot(xs, [math.nan if y is None else y for y in ys], style, color=colour, marker="o",
                        label=f"{driver} {percent}")  # fmt: skip
            if driver == "timer":  # the models do not depend on the driver
                ax.plot(
                    xs,
                    [r["serf_model_t99_s"].num() for r in mine],
                    "-",
                    color="#555555",
                    label="Serf model 99 %",
                )
                ax.plot(xs, [r["round_model_t99_s"].value or math.nan for r in mine], "-.", color="#999999",
                        label="round model 99 %")  # fmt: skip
        ax.set_xscale("log")
        ax.set(xlabel="nodes", ylabel="seconds", title=f"loss {loss * 100:g} %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("One update through N simulated nodes (fanout 3, 200 ms interval)")


LATE_MS = 1000.0
"""An answered request that took longer than this waited through the stall (queued for a replacement)."""
OUTCOME_STYLE = {  # class -> colour, label, marker, size
    "ok": ("#2e7d32", "ok", "|", 6),
    "late": ("#f9a825", f"ok, answered after > {LATE_MS / 1000:g} s (waited through the stall)", "|", 10),
    "in_flight": ("#ef6c00", "failed: in flight on the stuck worker", "x", 16),
    "other": ("#c62828", "failed: other", "x", 14),
}


def plot_incident(doc: Fields, fig: Figure) -> None:
    cases = doc["cases"].each()
    axes = fig.subplots(len(cases), 1, squeeze=False)[:, 0]
    for ax, case in zip(axes, cases, strict=True):
        proxies = [p.text() for p in case["proxies"].each()]
        points: dict[str, list[tuple[float, float]]] = {k: [] for k in OUTCOME_STYLE}
        for q in case["timeline"].each():  # [sent (s since the trigger), proxy index, class, latency ms]
            kind = q[2].text()
            if kind not in OUTCOME_STYLE:
                raise ResultsError(
                    f"{doc.source}: field '{q.path}.2' is {kind!r}, not one of {list(OUTCOME_STYLE)}"
                )
            if kind == "ok" and q[3].num() > LATE_MS:
                kind = "late"
            points[kind].append((q[0].num(), q[1].num()))
        for kind, (colour, label, marker, size) in OUTCOME_STYLE.items():
            pts = points[kind]
            if pts:
                ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=size, color=colour, label=label,
                           marker=marker, linewidths=1)  # fmt: skip
        ax.axvline(0, color="black", linewidth=1, label="trigger row written")
        for i, p in enumerate(case["per_proxy"].each()):
            if p.has("detected_at_s"):
                ax.plot([p["detected_at_s"].num()], [i], marker="v", color="#6a1b9a", markersize=7,
                        label="watchdog detected" if i == 0 else None)  # fmt: skip
            if p.has("serving_again_at_s"):
                ax.plot([p["serving_again_at_s"].num()], [i], marker="^", color="#0277bd", markersize=7,
                        label="serving again" if i == 0 else None)  # fmt: skip
        ax.set_yticks(range(len(proxies)), proxies)
        ax.set(title=case["title"].text(), xlabel="seconds since the trigger row was written")
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0))  # outside: no mark hidden
    fig.suptitle("The incident: client requests through every proxy, by send time (one mark per request)")


@dataclass(frozen=True)
class Plot:
    bench: str
    draw: Callable[[Fields, Figure], None]
    size: Callable[[Fields], tuple[float, float]]


PLOTS: dict[str, Plot] = {
    p.bench: p
    for p in (
        Plot("cluster_propagation", plot_cluster_propagation, lambda d: (12, 4.8)),
        Plot("blast_radius", plot_blast_radius, lambda d: (12, 4.8)),
        Plot("proxy_vs_nginx", plot_proxy_vs_nginx, lambda d: (15, 9.0 if d.has("two_workers") else 4.8)),
        Plot("sim_propagation", plot_sim_propagation, lambda d: (12, 4.8)),
        Plot("incident", plot_incident, lambda d: (15, 3.2 * max(1, len(d["cases"].each())))),
    )
}


# ------------------------------------------------------------------------------------------------ driver


def load_result(path: Path) -> Fields:
    """A result file, checked to be a JSON object naming the benchmark its file name says."""
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise ResultsError(f"{path}: cannot read: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: not JSON: {e}") from e
    doc = Fields(data, str(path))
    if not isinstance(data, dict):
        raise ResultsError(f"{path}: not a JSON object")
    if doc["bench"].text() != path.stem:
        raise ResultsError(f"{path}: holds the results of '{doc['bench'].text()}', expected '{path.stem}'")
    return doc


def render(path: Path, out_dir: Path) -> Path:
    """Draw the plot of one result file into ``out_dir``; the PNG's path."""
    plot = PLOTS.get(path.stem)
    if plot is None:
        raise ResultsError(f"{path}: no plot for a benchmark named '{path.stem}' (known: {', '.join(PLOTS)})")
    doc = load_result(path)
    fig = Figure(figsize=plot.size(doc), dpi=DPI, layout="constrained")
    plot.draw(doc, fig)  # every field is read (and checked) here, before anything is written
    # as the figure's x label, so the constrained layout keeps it clear of the axes' own labels
    fig.supxlabel(describe(doc), x=0.005, ha="left", fontsize=7, color="#666666")
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{plot.bench}.png"
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, out)
    return out


def render_all(results_dir: Path, out_dir: Path, only: Sequence[str] = ()) -> list[Path]:
    """Every plot that ``results_dir`` has a result for (or only those named); the PNGs written."""
    names = list(only) if only else [n for n in PLOTS if (results_dir / f"{n}.json").exists()]
    return [render(results_dir / f"{n}.json", out_dir) for n in names]


def run_bench(name: str, results_dir: Path, quick: bool) -> None:
    """Run ``bench/<name>.py`` with its output shown live; save its last line of JSON in ``results_dir``
    unless it saved its own result there during the run."""
    argv = [sys.executable, str(BENCH_DIR / f"{name}.py"), *(["--quick"] if quick else [])]
    env = dict(os.environ)
    env[RESULTS_ENV] = str(results_dir)  # the benchmarks that save results save them there
    src = str(BENCH_DIR.parent / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH", "")) if p)
    last = ""
    started = time.time()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            if line.strip():
                last = line.strip()
        code = proc.wait()
    if code != 0:
        raise ResultsError(f"bench/{name}.py exited with status {code}: no figures to plot")
    try:
        payload = json.loads(last)
    except json.JSONDecodeError as e:
        raise ResultsError(f"bench/{name}.py did not end with a line of JSON: {last[:200]!r}") from e
    if not isinstance(payload, dict) or payload.get("bench") != name:
        raise ResultsError(
            f"bench/{name}.py's last line is not its result (bench = {payload.get('bench')!r})"
        )
    saved = results_dir / f"{name}.json"
    if saved.exists() and saved.stat().st_mtime >= started:
        return  # the benchmark saved its own, possibly fuller (incident: every request), file: keep it
    save_results(payload, results_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--results", type=Path, default=None, help=f"result files (default ${RESULTS_ENV} or bench/results)"
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT_DIR, help="where the PNGs go (default bench/plots)"
    )
    parser.add_argument(
        "--run", nargs="+", default=[], metavar="NAME", choices=sorted(PLOTS),
        help=f"run these benchmarks first: {', '.join(PLOTS)}",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="run the benchmarks of --run with --quick")
    args = parser.parse_args(argv)
    env_dir = os.environ.get(RESULTS_ENV, "").strip()
    results_dir: Path = args.results or (Path(env_dir) if env_dir else DEFAULT_RESULTS_DIR)
    try:
        for name in args.run:
            run_bench(name, results_dir, args.quick)
        written = render_all(results_dir, args.out)
    except ResultsError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    if not written:
        print(
            f"FAILED: no results to plot in {results_dir} (run a benchmark, or: bench/plot.py --run NAME)",
            file=sys.stderr,
        )
        return 1
    for path in written:
        print(f"{path}  ({path.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
