"""What one agent tells the dashboard (``GET /v1/dashboard``): see docs/dashboard.md for the document.

:class:`DashboardView` builds it from what the agent already has, reading nothing twice:

* **regions and nodes** — the members of both clusters (:meth:`GossipRuntime.members_info`): the region's
  cluster gives its nodes' ``regional`` state, the global cluster every node's ``global`` state and
  region. A node is keyed by its API address (the same in both clusters' metadata; the node ids differ,
  one actor per scope);
* **apps** — the store: ``apps``, ``hostnames``, ``app_regions`` (global), and this region's
  ``machines`` and ``checks``; health per instance as the proxy judges it (started, every check
  passing); load and request rates from this region's proxies (:mod:`verdigris.dashboard.scrape`);
* **replication** — per scope, the runtime's status (versions needed, partially received versions,
  merge and broadcast queues, each actor's head) and when a remote version was last applied here (a
  commit listener on the store); and the same of the region's other agents (``peers``,
  :mod:`verdigris.dashboard.peers`);
* **events** — the proxies' recent watchdog events (their ``/events``) and the agent's own watchdog's
  restarts and reported stalls (from its counters, noticed at each build), newest first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final

from verdigris.dashboard.peers import PeerReplication
from verdigris.dashboard.scrape import ProxyScraper, ProxyState, ProxyTarget
from verdigris.store.store import CommitNotice

if TYPE_CHECKING:
    from verdigris.agent import Agent
    from verdigris.runtime.gossip import GossipRuntime

log = logging.getLogger("verdigris.dashboard")

MAX_EVENTS: Final = 50
WATCHDOG_LOOK_SECONDS: Final = 1.0
SCHEMA_VERSION: Final = 1
"""Bumped when a field of the document changes meaning (fields may be added at any time)."""


def _rows(conn: sqlite3.Connection, sql: str) -> list[dict[str, Any]]:
    """Rows as dicts; none when the table does not exist (a schema without it)."""
    try:
        cursor = conn.execute(sql)
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):
            return []
        raise
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def _read_tables(conn: sqlite3.Connection) -> dict[str, list[dict[str, Any]]]:
    # SELECT *: columns added later (an additive schema change) show up without a code change
    return {
        "apps": _rows(conn, "SELECT * FROM apps ORDER BY name"),
        "hostnames": _rows(conn, "SELECT hostname, app FROM hostnames ORDER BY hostname"),
        "app_regions": _rows(conn, "SELECT * FROM app_regions ORDER BY app, region"),
        "machines": _rows(conn, "SELECT * FROM machines ORDER BY app, id"),
        "checks": _rows(conn, "SELECT * FROM checks ORDER BY machine, name"),
        "proxies": _rows(conn, "SELECT * FROM proxies ORDER BY region, id"),
    }


def instance_health(state: str, checks: list[dict[str, Any]]) -> str:
    """``passing`` (started, every check passing or none), ``warning``, ``critical`` (a check says so),
    or the state itself when the instance is not started."""
    if state != "started":
        return state or "unknown"
    statuses = {str(c.get("status")) for c in checks}
    if "critical" in statuses or (statuses - {"passing", "warning"}):
        return "critical"
    if "warning" in statuses:
        return "warning"
    return "passing"


class DashboardView:
    """Builds the ``/v1/dashboard`` document of ``agent``; :meth:`close` when the agent stops."""

    def __init__(self, agent: Agent, scraper: ProxyScraper | None = None) -> None:
        self.agent = agent
        self.scraper = scraper or ProxyScraper()
        self.peers = PeerReplication(agent.api_settings.bearer_token)
        self.started_at = time.time()
        self._last_remote_apply: dict[str, float] = {}
        """scope -> unix time a remote version of that scope was last applied here."""
        self._listening = False
        self._agent_restarts: dict[str, float] | None = None
        self._agent_events: deque[dict[str, Any]] = deque(maxlen=MAX_EVENTS)
        self._watching: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------------ lifecycle

    def _on_commit(self, notice: CommitNotice) -> None:
        """On the writer thread, after a commit: note when remote versions were applied, per scope."""
        if not notice.remote_versions:
            return
        store = self.agent.store
        now = time.time()
        for actor, _ in notice.remote_versions:
            scope = store.scope_of(actor) if store is not None else None
            self._last_remote_apply[scope or "all"] = now

    async def start(self) -> None:
        """Listen to the store's commits and look at the agent's watchdog every second, so that event
        times do not depend on a page being open (idempotent; :meth:`build` calls it too)."""
        if self._watching is None:
            self._watching = asyncio.get_running_loop().create_task(
                self._watch_agent_watchdog(), name="dashboard-watchdog-events"
            )
        store, threads = self.agent.store, self.agent.threads
        if self._listening or store is None or threads is None:
            return
        self._listening = True
        await threads.write(store.add_commit_listener, self._on_commit)

    async def _watch_agent_watchdog(self) -> None:
        while True:
            try:
                self._agent_watchdog()
            except Exception:  # a look that fails must not end the looking
                log.exception("reading the agent watchdog's counters failed")
            await asyncio.sleep(WATCHDOG_LOOK_SECONDS)

    async def close(self) -> None:
        if self._watching is not None:
            self._watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watching
            self._watching = None
        store, threads = self.agent.store, self.agent.threads
        if self._listening and store is not None and threads is not None:
            self._listening = False
            await threads.write(store.remove_commit_listener, self._on_commit)
        await self.scraper.close()
        await self.peers.close()

    # ------------------------------------------------------------------------------------ the document

    async def build_replication(self) -> dict[str, Any]:
        """The small document a region's other agents ask for (``?only=replication``)."""
        if self.agent.store is None:
            raise RuntimeError("the agent is not running")
        await self.start()
        own_api = str(self.agent.api_addr) if self.agent.api_addr is not None else None
        return {
            "schema": SCHEMA_VERSION,
            "generated_at": time.time(),
            "self": {"api": own_api, "region": self._region(), "started_at": self.started_at},
            "region": self._region(),
            "replication": await self._replication(),
        }

    async def build(self) -> dict[str, Any]:
        agent = self.agent
        if agent.store is None or agent.threads is None:
            raise RuntimeError("the agent is not running")
        await self.start()
        region = self._region()
        peer_apis = self._region_peer_apis()
        tables = await agent.threads.read(_read_tables)
        targets = [
            ProxyTarget(
                id=str(p.get("id", "")),
                region=str(p.get("region", "")),
                address=str(p.get("address", "")),
                metrics=p.get("metrics") or None,
            )
            for p in tables["proxies"]
            if region is None or p.get("region") == region
        ]
        proxies, peer_replication = await asyncio.gather(  # the region's proxies and agents at once
            self.scraper.states(targets), self.peers.fetch(peer_apis)
        )
        own_api = str(agent.api_addr) if agent.api_addr is not None else None
        return {
            "schema": SCHEMA_VERSION,
            "generated_at": time.time(),
            "self": {"api": own_api, "region": region, "started_at": self.started_at},
            "region": region,
            "regions": self._regions(region, own_api),
            "apps": self._apps(region, tables, proxies),
            "proxies": [p.to_json() for p in proxies],
            "replication": await self._replication(),
            "peers": peer_replication,
            "events": self._events(proxies),
        }

    def _region_peer_apis(self) -> list[str]:
        """API addresses of the other agents of this region seen alive or suspect."""
        runtime = self.agent.gossip
        if runtime is None:
            return []
        return [
            str(m["api"])
            for m in runtime.members_info()
            if not m.get("self") and m.get("api") and m.get("state") in ("alive", "suspect")
        ]

    def _region(self) -> str | None:
        gossip = self.agent.config.gossip
        return gossip.region or None if gossip.enabled else None

    # ------------------------------------------------------------------------------------ nodes

    def _regions(self, region: str | None, own_api: str | None) -> list[dict[str, Any]]:
        """Regions (this one first), each with its nodes: ``regional`` and ``global`` member state."""
        agent = self.agent
        nodes: dict[str, dict[str, Any]] = {}

        def merge(runtime: GossipRuntime | None, field: str) -> None:
            if runtime is None:
                return
            for m in runtime.members_info():
                key = m.get("api") or m["id"]
                node = nodes.setdefault(
                    key,
                    {
                        "id": m["id"],
                        "api": m.get("api"),
                        "region": m.get("region") or region or "",
                        "regional": None,
                        "global": None,
                        "rtt_ms": None,
                        "last_seen_s": None,
                        "self": bool(m.get("self")),
                    },
                )
                node[field] = m["state"]
                if field == "regional":
                    node["id"] = m["id"]  # the regional actor: what this region's rows are written by
                    node["gossip"] = m.get("addr")
                if m.get("region"):
                    node["region"] = m["region"]
                if m.get("rtt_ms") is not None:
                    node["rtt_ms"] = m["rtt_ms"]
                if m.get("last_seen_s") is not None:
                    seen = node["last_seen_s"]
                    node["last_seen_s"] = m["last_seen_s"] if seen is None else min(seen, m["last_seen_s"])

        merge(agent.gossip, "regional")
        merge(agent.global_gossip, "global")
        if not nodes:  # no cluster: this agent alone
            nodes[own_api or "self"] = {
                "id": agent.store.site_id.hex() if agent.store is not None else "",
                "api": own_api,
                "region": region or "",
                "regional": "alive",
                "global": None,
                "rtt_ms": None,
                "last_seen_s": 0.0,
                "self": True,
            }
        by_region: dict[str, list[dict[str, Any]]] = {}
        for node in nodes.values():
            node["state"] = _overall_state(node)
            by_region.setdefault(node["region"], []).append(node)
        ordered = sorted(by_region, key=lambda r: (r != (region or ""), r))
        return [
            {
                "name": name,
                "nodes": sorted(by_region[name], key=lambda n: (str(n.get("api")), n["id"])),
                "alive": sum(1 for n in by_region[name] if n["state"] == "alive"),
            }
            for name in ordered
        ]

    # ------------------------------------------------------------------------------------ apps

    def _apps(
        self, region: str | None, tables: dict[str, list[dict[str, Any]]], proxies: list[ProxyState]
    ) -> list[dict[str, Any]]:
        in_flight: dict[tuple[str, str], float] = {}
        upstream_errors: dict[tuple[str, str], float] = {}
        rates: dict[str, list[float]] = {}
        totals: dict[str, list[float]] = {}
        for p in proxies:
            if p.sample is None:
                continue
            for key, n in p.sample.in_flight.items():
                in_flight[key] = in_flight.get(key, 0.0) + n
            for (app, instance, _), n in p.sample.upstream_errors.items():
                if instance:
                    upstream_errors[(app, instance)] = upstream_errors.get((app, instance), 0.0) + n
            for app, (rps, eps) in (p.rates or {}).items():
                acc = rates.setdefault(app, [0.0, 0.0])
                acc[0] += rps
                acc[1] += eps
            for app, n in p.sample.requests.items():
                tot = totals.setdefault(app, [0.0, 0.0])
                tot[0] += n
                tot[1] += p.sample.errors.get(app, 0.0)
        scraped = any(p.sample is not None for p in proxies)
        # proxies that count upstream errors per instance: no series means none, else the figure is unknown
        per_instance_errors = any(p.sample is not None and p.sample.per_instance_errors for p in proxies)
        ejected: dict[tuple[str, str], float] = {}
        for p in proxies:
            for key, seconds in (p.sample.ejected if p.sample is not None else {}).items():
                ejected[key] = max(ejected.get(key, 0.0), seconds)
        checks_of: dict[str, list[dict[str, Any]]] = {}
        for c in tables["checks"]:
            checks_of.setdefault(str(c.get("machine", "")), []).append(
                {k: c.get(k) for k in ("name", "status", "output", "updated_at")}
            )
        names = [str(a["name"]) for a in tables["apps"]]
        extra = {str(m.get("app", "")) for m in tables["machines"]} | set(totals)
        names += sorted(n for n in extra - set(names) if n)  # instances or traffic of an app not (yet) here
        apps: dict[str, dict[str, Any]] = {
            name: {
                "name": name,
                "hostnames": [],
                "regions": [],
                "instances": [],
                "requests_per_s": None,
                "errors_per_s": None,
                "requests_total": None,
                "errors_total": None,
            }
            for name in names
        }
        for a in tables["apps"]:
            apps[str(a["name"])].update(
                {k: a.get(k) for k in ("org", "concurrency", "soft_limit", "hard_limit")}
            )
        for h in tables["hostnames"]:
            if h["app"] in apps:
                apps[h["app"]]["hostnames"].append(h["hostname"])
        for r in tables["app_regions"]:
            if r["app"] in apps:
                apps[r["app"]]["regions"].append(
                    {
                        "region": r.get("region"),
                        "capacity": r.get("capacity"),
                        "updated_at": r.get("updated_at"),
                    }
                )
        for m in tables["machines"]:
            app, mid = str(m.get("app", "")), str(m.get("id", ""))
            if app not in apps or (region is not None and m.get("region") not in (region, "", None)):
                continue
            state = str(m.get("state", ""))
            checks = checks_of.get(mid, [])
            health = instance_health(state, checks)
            apps[app]["instances"].append(
                {
                    "id": mid,
                    "region": m.get("region") or region,
                    "node": m.get("node"),
                    "state": state,
                    "address": m.get("address"),
                    "health": health,
                    "healthy": health == "passing",
                    "checks": checks,
                    "in_flight": in_flight.get((app, mid), 0.0) if scraped else None,
                    "upstream_errors": upstream_errors.get((app, mid), 0.0) if per_instance_errors else None,
                    "ejected_s": ejected.get((app, mid)),
                    "updated_at": m.get("updated_at"),
                }
            )
        for name, app_doc in apps.items():
            if name in rates:
                rps, eps = rates[name]
                app_doc["requests_per_s"] = round(rps, 3)
                app_doc["errors_per_s"] = round(eps, 3)
            elif any(p.rates is not None for p in proxies):  # known: no request for it lately
                app_doc["requests_per_s"] = app_doc["errors_per_s"] = 0.0
            if name in totals:
                app_doc["requests_total"], app_doc["errors_total"] = totals[name]
        return list(apps.values())

    # ------------------------------------------------------------------------------------ replication

    async def _replication(self) -> dict[str, Any]:
        agent, store = self.agent, self.agent.store
        out: dict[str, Any] = {}
        now = time.time()
        for runtime in (agent.gossip, agent.global_gossip):
            if runtime is None:
                continue
            status = await runtime.status()
            scope = runtime.scope or "all"
            applied = self._last_remote_apply.get(scope)
            if scope == "all" and applied is None and self._last_remote_apply:
                applied = max(self._last_remote_apply.values())
            out[scope] = {
                "actor": runtime.node_id,
                "own_version": (store.db_version_of(runtime.scope) if runtime.scope else store.db_version)
                if store is not None
                else None,
                "members_alive": status["members_alive"],
                "gaps": status["gaps"],
                "partials": status["partials"],
                "merge_queue": status["merge_queue"],
                "broadcast_queue": status["broadcast"]["queued"],
                "broadcast_dropped": status["broadcast"]["dropped"],
                "heads": status["heads"],
                "versions_merged": sum(status["merged"]["versions"].values()),
                "last_remote_apply_age_s": None if applied is None else round(max(0.0, now - applied), 3),
            }
        return out

    # ------------------------------------------------------------------------------------ events

    def _agent_watchdog(self) -> None:
        """New events of the agent's own watchdog (:mod:`verdigris.watchdog.agent`) since the last look:
        its counters by cause, compared with the previous look. A restart re-executes the agent, so the
        first look of a new incarnation reports the restarts carried over, timed by the last one (and any
        stall before that first look, untimed)."""
        watchdog = self.agent.watchdog
        if watchdog is None:
            return
        info = watchdog.info()
        restarts: dict[str, int] = dict(info.get("restarts") or {})
        timeouts: dict[str, int] = dict(info.get("probe_timeouts") or {})
        counts = {
            **{f"restart/{c}": n for c, n in restarts.items()},
            **{f"stall/{c}": n for c, n in timeouts.items()},
        }
        previous, self._agent_restarts = self._agent_restarts, {k: float(v) for k, v in counts.items()}
        now = time.time()
        first_look = previous is None
        for cause in sorted(set(restarts) | set(timeouts)):
            new_restarts = restarts.get(cause, 0) - int((previous or {}).get(f"restart/{cause}", 0))
            # every restart is a missed deadline too: the rest were stalls only reported
            new_stalls = (
                timeouts.get(cause, 0) - int((previous or {}).get(f"stall/{cause}", 0)) - new_restarts
            )
            for kind, n in (("restart", new_restarts), ("stall", new_stalls)):
                if n <= 0:
                    continue
                at: float | None = now
                if first_look:  # from before this look (or process): only the last restart's time is known
                    last = kind == "restart" and info.get("last_cause") == cause
                    at = self._last_restart_time(watchdog) if last else None
                self._agent_events.append(
                    {
                        "at": at,
                        "component": "agent",
                        "api": str(self.agent.api_addr) if self.agent.api_addr else None,
                        "region": self._region(),
                        "kind": kind,
                        "cause": cause,
                        "count": n,
                        "detail": (
                            f"{cause} probe missed its deadline"
                            + (", agent re-executed" if kind == "restart" else ", reported only")
                            + (f"; stacks: {info['last_stack_file']}" if info.get("last_stack_file") else "")
                            + (f"; {n} times" if n > 1 else "")
                        ),
                    }
                )

    @staticmethod
    def _last_restart_time(watchdog: Any) -> float | None:
        """Wall time of the watchdog's last restart, from its monotonic ``last_failure`` (system-wide, so
        it survives the re-exec), or None when it is not known."""
        last = getattr(getattr(watchdog, "state", None), "last_failure", None)
        if not isinstance(last, int | float):
            return None
        return time.time() - (time.monotonic() - float(last))

    def _events(self, proxies: list[ProxyState]) -> list[dict[str, Any]]:
        self._agent_watchdog()
        events = list(self._agent_events)
        for p in proxies:
            events.extend(p.events)
        events.sort(key=lambda e: e.get("at") or 0.0, reverse=True)
        return events[:MAX_EVENTS]


def _overall_state(node: dict[str, Any]) -> str:
    """The worst of a node's states in the clusters it is seen in (alive < suspect < down < left)."""
    order = {"alive": 0, "suspect": 1, "down": 2, "left": 3}
    states = [s for s in (node.get("regional"), node.get("global")) if s]
    return max(states, key=lambda s: order.get(s, 2)) if states else "unknown"


__all__ = ["MAX_EVENTS", "DashboardView", "instance_health"]
