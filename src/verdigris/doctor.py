"""``verdigris doctor``: is it our stall, the network's, or replication? A verdict and its evidence.

Operators once lost minutes believing an internal stall was an upstream network problem: a proxy whose
event loop is stuck times requests out exactly as an unreachable instance does. The doctor scrapes the
Prometheus endpoints of an agent and of proxies twice, ``interval`` seconds apart (counters become
rates), and looks at the signals that tell the cases apart (docs/metrics.md, "verdigris doctor"):

1. **internal stall in the proxy**: a worker not answering its supervisor's probes now
   (``verdigris_proxy_worker_stuck_seconds`` > 0), a worker event loop lag at or above ``loop_lag``, probes
   missed or workers restarted during the window, or a worker restarted less than ``recent_restart``
   seconds ago;
2. **internal stall in the agent**: the agent's watchdog restarted it or saw a probe miss its deadline
   during the window, its event loop lag at or above ``loop_lag``, or its apply path lag (a transaction on
   the writer thread) at or above ``agent_apply_lag``;
   Also: received changes waiting at least ``apply_lag`` while not one batch was merged during a window of
   at least that long (the writer thread is stuck, not busy);
3. **gossip**: a member suspect or dead in any scope, sync needs at or above ``sync_needs`` versions, apply
   lag (received changes not merged yet) at or above ``apply_lag`` while batches do get merged, broadcast
   drops at or above ``broadcast_drops`` per second;
4. **upstream network**: an (app, instance) whose connect errors, timeouts and broken exchanges together
   reach ``upstream_errors`` per second;
5. otherwise **healthy**.

The first case that holds is the verdict, in that order: an internal stall makes upstreams look broken
(requests time out inside the proxy) and stale replication makes the proxy route to instances that are gone,
so the cause is named before its symptoms. Every finding is listed as evidence, and the verdict line ends
with what looked healthy. Exit status: 0 healthy, 1 a problem found, 2 an endpoint could not be scraped.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from verdigris.admin import AdminError, admin_call
from verdigris.config import Config

__all__ = [
    "AGENT",
    "PROXY",
    "Diagnosis",
    "DoctorError",
    "Finding",
    "Samples",
    "Scrape",
    "Thresholds",
    "agent_metrics_url",
    "diagnose",
    "parse_samples",
    "run_doctor",
    "scrape",
]

AGENT: Final = "agent"
PROXY: Final = "proxy"

HEALTHY: Final = "healthy"
PROXY_STALL: Final = "proxy_stall"
AGENT_STALL: Final = "agent_stall"
GOSSIP: Final = "gossip"
UPSTREAM: Final = "upstream"
PRIORITY: Final = (PROXY_STALL, AGENT_STALL, GOSSIP, UPSTREAM)
"""Verdicts, most fundamental first: the first with a finding wins."""
HEADLINES: Final = {
    PROXY_STALL: "internal stall in the proxy",
    AGENT_STALL: "internal stall in the agent",
    GOSSIP: "gossip",
    UPSTREAM: "upstream network",
    HEALTHY: "healthy",
}
SCRAPE_TIMEOUT: Final = 5.0


class DoctorError(Exception):
    """An endpoint could not be scraped or read (the message names it); exit status 2."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    """At or above these, a signal is a finding (seconds, versions, per second)."""

    loop_lag: float = 0.25
    """Event loop lag of a proxy worker or of the agent."""
    recent_restart: float = 60.0
    """A proxy worker restarted less than this long ago is evidence of a stall (or crash) just past."""
    agent_apply_lag: float = 5.0
    """The agent watchdog's apply probe (a transaction queued on the writer thread behind merges)."""
    apply_lag: float = 2.0
    """Received change sets waiting to be merged."""
    sync_needs: float = 1000
    """Versions the node knows it lacks (missing + partial)."""
    broadcast_drops: float = 1.0
    """Broadcast pieces dropped per second (queues full)."""
    upstream_errors: float = 0.5
    """Per instance: connect errors + timeouts + broken exchanges per second."""


# ------------------------------------------------------------------------------------------- samples


class Samples:
    """One scrape's samples: name -> [(labels, value)], names as exposed (``_total``, ``_bucket``...)."""

    def __init__(self, series: dict[str, list[tuple[dict[str, str], float]]] | None = None) -> None:
        self.series: dict[str, list[tuple[dict[str, str], float]]] = series or {}

    def add(self, name: str, value: float, **labels: str) -> Samples:
        """Add one sample (for tests and fakes); returns self."""
        self.series.setdefault(name, []).append((labels, float(value)))
        return self

    def has(self, name: str) -> bool:
        return name in self.series

    def get(self, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
        """Samples of ``name`` whose labels include ``labels``."""
        return [
            (lab, v)
            for lab, v in self.series.get(name, [])
            if all(lab.get(k) == want for k, want in labels.items())
        ]

    def total(self, name: str, **labels: str) -> float:
        return sum(v for _, v in self.get(name, **labels))

    def value(self, name: str, **labels: str) -> float | None:
        """The first matching sample's value, or None."""
        found = self.get(name, **labels)
        return found[0][1] if found else None


def parse_samples(text: str, source: str = "") -> Samples:
    """Parse Prometheus' text format; a body that is not one is a :class:`DoctorError` naming ``source``."""
    out = Samples()
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out.series.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    except (ValueError, TypeError, IndexError) as e:
        raise DoctorError(f"{source or 'metrics'}: not Prometheus text format ({e})") from None
    return out


@dataclass(slots=True)
class Scrape:
    """Two scrapes of one endpoint, ``seconds`` apart."""

    url: str
    role: str
    """:data:`AGENT` or :data:`PROXY`."""
    before: Samples
    after: Samples
    seconds: float

    def delta(self, name: str, **labels: str) -> float:
        """How much counter ``name`` (summed over matching series) grew; a reset counts from zero."""
        b, a = self.before.total(name, **labels), self.after.total(name, **labels)
        return a - b if a >= b else a

    def deltas(self, name: str, key: Sequence[str]) -> dict[tuple[str, ...], float]:
        """Growth of each series of counter ``name``, grouped by the ``key`` labels (absent before: from
        zero; reset: from zero)."""
        before: dict[tuple[str, ...], float] = {}
        for lab, v in self.before.get(name):
            k = tuple(lab.get(x, "") for x in key)
            before[k] = before.get(k, 0.0) + v
        after: dict[tuple[str, ...], float] = {}
        for lab, v in self.after.get(name):
            k = tuple(lab.get(x, "") for x in key)
            after[k] = after.get(k, 0.0) + v
        out: dict[tuple[str, ...], float] = {}
        for k, a in after.items():
            b = before.get(k, 0.0)
            out[k] = a - b if a >= b else a
        return out

    def rate(self, growth: float) -> float:
        return growth / self.seconds if self.seconds > 0 else growth


# ------------------------------------------------------------------------------------------ verdict


@dataclass(slots=True)
class Finding:
    """One piece of evidence: which verdict it supports, where it was seen, what it says."""

    category: str
    source: str
    text: str


@dataclass(slots=True)
class Diagnosis:
    verdict: str
    """:data:`HEALTHY` or one of :data:`PRIORITY`."""
    headline: str
    """The ``VERDICT:`` line without its prefix."""
    findings: list[Finding] = field(default_factory=list)
    healthy: list[str] = field(default_factory=list)
    """What was checked and looked fine (ends the verdict line)."""
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 0 if self.verdict == HEALTHY else 1

    def lines(self) -> list[str]:
        out = [f"VERDICT: {self.headline}"]
        for f in self.findings:
            tag = "" if f.category == self.verdict else f" [{HEADLINES[f.category]}]"
            out.append(f"  - {f.text}{tag} ({f.source})")
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "headline": self.headline,
            "exit_code": self.exit_code,
            "interval": round(self.seconds, 3),
            "findings": [asdict(f) for f in self.findings],
            "healthy": self.healthy,
        }


def _fmt_s(seconds: float) -> str:
    if seconds < 0.01:
        return f"{seconds * 1000:.1f} ms"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"


def _fmt_rate(per_s: float) -> str:
    return f"{per_s:.0f}/s" if per_s >= 10 else f"{per_s:.1f}/s"


def _proxy(s: Scrape, th: Thresholds) -> tuple[list[Finding], list[Finding], list[str]]:
    """(stall findings, upstream findings, healthy notes) of one proxy's two scrapes."""
    stall: list[Finding] = []
    up: list[Finding] = []
    a = s.after
    window = f"in the last {s.seconds:.0f} s"

    flagged: set[str] = set()

    def add(worker: str, text: str) -> None:
        flagged.add(worker)
        stall.append(Finding(PROXY_STALL, s.url, text))

    stuck = {lab.get("worker", "?"): v for lab, v in a.get("verdigris_proxy_worker_stuck_seconds")}
    for w, seconds in sorted(stuck.items()):
        if seconds > 0:
            add(w, f"worker {w} not answering probes for {_fmt_s(seconds)}")
    lags = {lab.get("worker", "?"): v for lab, v in a.get("verdigris_proxy_event_loop_lag_seconds")}
    for lab, v in s.before.get("verdigris_proxy_event_loop_lag_seconds"):
        w = lab.get("worker", "?")
        lags[w] = max(lags.get(w, 0.0), v)
    for w, lag in sorted(lags.items()):
        if lag >= th.loop_lag:
            add(w, f"worker {w} loop lag {_fmt_s(lag)}")
    replaced = s.deltas("verdigris_proxy_watchdog_restarts_total", ["reason"])
    stuck_replaced = replaced.get(("probe_timeout",), 0) + replaced.get(("startup_timeout",), 0)
    restarts = s.deltas("verdigris_proxy_worker_restarts_total", ["worker"])
    for (w,), n in sorted(restarts.items()):
        if n > 0:
            how = "replaced by the watchdog" if stuck_replaced else "restarted"
            add(w, f"worker {w} {how} {n:.0f} time(s) {window}")
    if stuck_replaced and not any(n > 0 for n in restarts.values()):
        add("", f"watchdog replaced {stuck_replaced:.0f} stuck worker(s) {window}")
    for (cause,), n in sorted(s.deltas("verdigris_proxy_watchdog_stall_causes_total", ["cause"]).items()):
        if n > 0:  # where the stuck worker's main thread was: the first place to look
            add("", f"stuck in {cause}" + (f" ({n:.0f} times)" if n > 1 else ""))
    for (w,), n in sorted(s.deltas("verdigris_proxy_probe_timeouts_total", ["worker"]).items()):
        if n > 0 and w not in flagged:
            add(w, f"worker {w} missed {n:.0f} probe(s) {window}")
    totals = {lab.get("worker", "?"): v for lab, v in a.get("verdigris_proxy_worker_restarts_total")}
    ever_replaced = sum(
        a.total("verdigris_proxy_watchdog_restarts_total", reason=r)
        for r in ("probe_timeout", "startup_timeout")
    )
    detection = a.value("verdigris_proxy_watchdog_last_detection_seconds")
    for lab, uptime in a.get("verdigris_proxy_worker_uptime_seconds"):
        w = lab.get("worker", "?")
        if totals.get(w, 0) > 0 and uptime < th.recent_restart and restarts.get((w,), 0) == 0:
            text = f"worker {w} restarted {_fmt_s(uptime)} ago ({totals[w]:.0f} restart(s) in total"
            if ever_replaced:  # the watchdog's counts are not per worker: say what they are
                text += f"; the watchdog replaced {ever_replaced:.0f} stuck worker(s) since the proxy started"
                if detection is not None:
                    text += f", last detected in {_fmt_s(detection)}"
            add(w, text + ")")
    if not stall:
        worst = max(lags.values(), default=0.0)
        note = f"proxy loops healthy (lag {_fmt_s(worst)})" if lags else "proxy loops not reported"
        causes = a.total("verdigris_proxy_watchdog_restarts_total")
        stall_note = "no watchdog restarts" if causes == 0 else f"no watchdog restart {window}"
        notes = [f"{note}, {stall_note}"]
    else:
        notes = []

    # upstreams, per (app, instance); kinds grouped as an operator reads them
    group = {"refused": "connect errors", "connect_timeout": "connect errors", "timeout": "timeouts"}
    per: dict[tuple[str, str], dict[str, float]] = {}
    kinds = s.deltas("verdigris_proxy_instance_upstream_errors_total", ["app", "instance", "kind"])
    for (app, instance, kind), n in kinds.items():
        groups = per.setdefault((app, instance), {})
        name = group.get(kind, "broken exchanges")
        groups[name] = groups.get(name, 0.0) + n
    # an ejected instance gets no requests, hence no new errors: its ejection is the lasting evidence
    ejected = {
        (lab.get("app", ""), lab.get("instance", "")): v
        for lab, v in a.get("verdigris_proxy_instance_ejected_seconds")
        if v > 0
    }
    failing = []
    for key in set(per) | set(ejected):
        rate = s.rate(sum(per.get(key, {}).values()))
        if rate >= th.upstream_errors or key in ejected:
            failing.append((rate, key))
    for _, (app, instance) in sorted(failing, reverse=True):
        parts = [
            f"{g} {_fmt_rate(s.rate(n))}" for g, n in sorted(per.get((app, instance), {}).items()) if n > 0
        ]
        if (app, instance) in ejected:
            if not parts:  # no new errors while ejected: say what led to it
                counted: dict[str, float] = {}
                for lab, v in a.get(
                    "verdigris_proxy_instance_upstream_errors_total", app=app, instance=instance
                ):
                    name = group.get(lab.get("kind", ""), "broken exchanges")
                    counted[name] = counted.get(name, 0.0) + v
                parts = [f"{g} {n:.0f} so far" for g, n in sorted(counted.items()) if n > 0]
            parts.append(f"ejected by passive health ({_fmt_s(ejected[(app, instance)])} left)")
        up.append(Finding(UPSTREAM, s.url, f"app '{app}' instance '{instance}' {', '.join(parts)}"))
    if not s.after.has("verdigris_proxy_instance_upstream_errors_total"):
        # an older proxy: by kind only
        n = s.delta("verdigris_proxy_upstream_errors_total")
        if s.rate(n) >= th.upstream_errors:
            up.append(
                Finding(UPSTREAM, s.url, f"upstream errors {_fmt_rate(s.rate(n))} (no per-instance data)")
            )
    if not up:
        notes.append("upstreams healthy")
    return stall, up, notes


def _agent(s: Scrape, th: Thresholds) -> tuple[list[Finding], list[Finding], list[str]]:
    """(agent stall findings, gossip findings, healthy notes) of one agent's two scrapes."""
    gossip: list[Finding] = []
    a = s.after
    window = f"in the last {s.seconds:.0f} s"

    def watchdog_findings(metric: str, text: Callable[[str, str, float], str]) -> list[Finding]:
        """One finding per (component, cause) whose counter ``metric`` grew in the window."""
        deltas = s.deltas(metric, ["component", "cause"])
        return [
            Finding(AGENT_STALL, s.url, text(component, cause, n))
            for (component, cause), n in sorted(deltas.items())
            if n > 0
        ]

    stall = watchdog_findings(
        "verdigris_watchdog_restarts_total",
        lambda component, cause, n: (
            f"{component} restarted by its watchdog {n:.0f} time(s) {window} (stalled: {cause})"
        ),
    )
    if not stall:
        stall = watchdog_findings(
            "verdigris_watchdog_probe_timeouts_total",
            lambda component, cause, n: (
                f"{component} watchdog: {n:.0f} {cause} probe(s) missed their deadline {window}"
            ),
        )
    for lab, lag in a.get("verdigris_loop_lag_seconds"):
        if lag >= th.loop_lag:
            stall.append(
                Finding(AGENT_STALL, s.url, f"{lab.get('component', 'agent')} loop lag {_fmt_s(lag)}")
            )
    apply_path = a.value("verdigris_apply_lag_seconds")
    if apply_path is not None and apply_path >= th.agent_apply_lag:
        stall.append(Finding(AGENT_STALL, s.url, f"apply path lag {_fmt_s(apply_path)} (writer thread)"))

    scopes = sorted({lab.get("scope", "") for lab, _ in a.get("verdigris_gossip_members")})
    for scope in scopes:
        where = f" in scope {scope}" if scope else ""
        sel = {"scope": scope} if scope else {}
        suspect = a.total("verdigris_gossip_members", state="suspect", **sel)
        dead = a.total("verdigris_gossip_members", state="dead", **sel)
        if suspect or dead:
            parts = [f"{suspect:.0f} suspect"] if suspect else []
            parts += [f"{dead:.0f} dead"] if dead else []
            gossip.append(Finding(GOSSIP, s.url, " and ".join(parts) + " member(s)" + where))
        needs = a.total("verdigris_gossip_sync_needs", **sel)
        if needs >= th.sync_needs:
            gaps = a.total("verdigris_gossip_gaps", **sel)
            gossip.append(Finding(GOSSIP, s.url, f"sync needs {needs:.0f} versions ({gaps:.0f} gaps){where}"))
        lag = max((v for _, v in a.get("verdigris_gossip_apply_lag_seconds", **sel)), default=0.0)
        merged = s.delta("verdigris_gossip_apply_batch_seconds_count", **sel)
        if lag >= th.apply_lag and merged == 0 and s.seconds >= th.apply_lag:
            # changes wait and not one batch (bounded, normally well under a second) was merged in the
            # whole window: the writer thread is stuck, not merely busy catching up
            stall.append(
                Finding(
                    AGENT_STALL,
                    s.url,
                    f"writer thread stuck: received changes wait {_fmt_s(lag)}, "
                    f"no batch merged {window}{where}",
                )
            )
        elif lag >= th.apply_lag:
            gossip.append(Finding(GOSSIP, s.url, f"apply lag {_fmt_s(lag)}{where}"))
        drops = s.rate(s.delta("verdigris_gossip_broadcasts_total", event="dropped", **sel))
        if drops >= th.broadcast_drops:
            gossip.append(Finding(GOSSIP, s.url, f"broadcast drops {_fmt_rate(drops)}{where}"))
    notes = []
    if not stall:
        loop_lag = a.value("verdigris_loop_lag_seconds", component="agent")
        notes.append("agent loop healthy" + (f" (lag {_fmt_s(loop_lag)})" if loop_lag is not None else ""))
    if not gossip:
        notes.append("gossip healthy" if scopes else "no gossip (single agent)")
    return stall, gossip, notes


def diagnose(scrapes: Iterable[Scrape], thresholds: Thresholds | None = None) -> Diagnosis:
    """The verdict (see the module docstring) from the scrapes of agents and proxies."""
    th = thresholds or Thresholds()
    findings: dict[str, list[Finding]] = {c: [] for c in PRIORITY}
    notes: list[str] = []
    seconds = 0.0
    for s in scrapes:
        seconds = max(seconds, s.seconds)
        if s.role == PROXY:
            stall, other, healthy = _proxy(s, th)
            findings[PROXY_STALL] += stall
            findings[UPSTREAM] += other
        else:
            stall, other, healthy = _agent(s, th)
            findings[AGENT_STALL] += stall
            findings[GOSSIP] += other
        notes += [n for n in healthy if n not in notes]
    verdict = next((c for c in PRIORITY if findings[c]), HEALTHY)
    ordered = [f for c in PRIORITY for f in findings[c]]
    if verdict == HEALTHY:
        headline = "healthy" + (f" — {'; '.join(notes)}" if notes else "")
    else:
        main = "; ".join(f.text for f in findings[verdict][:3])
        tail = f"; {'; '.join(notes)}" if notes else ""
        headline = f"{HEADLINES[verdict]} — {main}{tail}"
    return Diagnosis(verdict, headline, ordered, notes, seconds)


# ------------------------------------------------------------------------------------------- scraping


def agent_metrics_url(config: Config) -> str:
    """The agent's ``/metrics`` URL from its config (``[telemetry.prometheus] addr``)."""
    addr = config.telemetry.prometheus.addr
    if addr is None:
        raise DoctorError(
            "the agent's config has no [telemetry.prometheus] addr: set it, or give --agent-metrics URL"
        )
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(addr.host, addr.host)
    return f"http://[{host}]:{addr.port}/metrics" if ":" in host else f"http://{host}:{addr.port}/metrics"


def _normalise(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        url = "http://" + url
    _, sep, path = url.partition("://")[2].partition("/")
    return url if sep and path else url.rstrip("/") + "/metrics"


async def scrape(session: aiohttp.ClientSession, url: str, timeout: float = SCRAPE_TIMEOUT) -> Samples:
    """GET ``url`` and parse it; any failure is a :class:`DoctorError` naming the URL."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            body = await r.text()
            if r.status != 200:
                raise DoctorError(f"cannot scrape {url}: HTTP {r.status} {body[:200]!r}")
    except aiohttp.ClientConnectorError as e:
        why = "connection refused" if isinstance(e.os_error, ConnectionRefusedError) else e.os_error
        raise DoctorError(f"cannot scrape {url}: {why} (is it running?)") from None
    except TimeoutError:
        raise DoctorError(
            f"cannot scrape {url}: no answer within {timeout:g} s "
            "(if the process is running, its event loop may be stalled)"
        ) from None
    except aiohttp.ClientError as e:
        raise DoctorError(f"cannot scrape {url}: {e}") from None
    return parse_samples(body, url)


async def scrape_twice(
    targets: Sequence[tuple[str, str]], interval: float, timeout: float = SCRAPE_TIMEOUT
) -> list[Scrape]:
    """Scrape every ``(role, url)`` at once, wait ``interval`` seconds, scrape them again."""
    async with aiohttp.ClientSession() as session:

        async def all_once() -> list[tuple[Samples, float]]:
            async def one(url: str) -> tuple[Samples, float]:
                samples = await scrape(session, url, timeout)
                return samples, time.monotonic()

            return list(await asyncio.gather(*(one(url) for _, url in targets)))

        first = await all_once()
        await asyncio.sleep(interval)
        second = await all_once()
    return [
        Scrape(url, role, b, a, max(0.0, ta - tb))
        for (role, url), (b, tb), (a, ta) in zip(targets, first, second, strict=True)
    ]


def _name_members(config: Config, diagnosis: Diagnosis) -> None:
    """Gossip findings: name the suspect and dead members, asked from the admin socket (best effort)."""
    if not any(f.category == GOSSIP for f in diagnosis.findings):
        return
    scopes = [None, "global"] if config.gossip.region_mode else [None]
    for scope in scopes:
        command: dict[str, Any] = {"cmd": "members"}
        if scope is not None:
            command["scope"] = scope
        try:
            reply = admin_call(config.admin.path, command, timeout=5.0)
        except AdminError as e:
            diagnosis.findings.append(Finding(GOSSIP, str(config.admin.path), f"members not listed: {e}"))
            return
        members = reply.get("members")
        if not reply.get("ok") or not isinstance(members, list):
            continue
        for m in members:
            if isinstance(m, dict) and m.get("state") in ("suspect", "dead"):
                where = f" (scope {scope})" if scope else ""
                diagnosis.findings.append(
                    Finding(
                        GOSSIP,
                        str(config.admin.path),
                        f"member {str(m.get('id', '?'))[:12]} at {m.get('addr', '?')} is {m['state']}{where}",
                    )
                )


def run_doctor(
    *,
    config: Config | None,
    agent_metrics: Sequence[str],
    proxy_metrics: Sequence[str],
    interval: float,
    as_json: bool,
    thresholds: Thresholds | None = None,
    timeout: float = SCRAPE_TIMEOUT,
) -> tuple[int, str]:
    """Scrape, diagnose, format: (exit status, text to print). Raises :class:`DoctorError` (exit 2)."""
    if interval <= 0:
        raise DoctorError(f"--interval must be > 0, not {interval:g}")
    targets = [(AGENT, _normalise(u)) for u in agent_metrics]
    if config is not None:
        targets.insert(0, (AGENT, agent_metrics_url(config)))
    targets += [(PROXY, _normalise(u)) for u in proxy_metrics]
    if not targets:
        raise DoctorError(
            "nothing to examine: give -c agent.toml, --agent-metrics URL or --proxy-metrics URL"
        )
    scrapes = asyncio.run(scrape_twice(targets, interval, timeout))
    diagnosis = diagnose(scrapes, thresholds)
    if config is not None and config.gossip.enabled:
        _name_members(config, diagnosis)
    if as_json:
        return diagnosis.exit_code, json.dumps(diagnosis.as_json(), indent=2, ensure_ascii=False)
    return diagnosis.exit_code, "\n".join(diagnosis.lines())
