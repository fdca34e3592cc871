"""The rows the machines agent keeps in the agent's database, written through ``/v1/transactions``.

* regional ``machines`` (one per instance of this node), ``checks`` (one per instance and check;
  ``critical`` while the instance does not run) and ``services`` (one per app: port 80, ``http``);
* global ``apps``, ``hostnames`` (the apps of the config file) and ``machine_agents`` (this agent: where
  proxies ask for an app to be started).

Writes are diffs: the writer remembers what it last wrote per instance (seeded at start from the rows
already there, so that rows of instances that no longer exist are deleted and unchanged ones are not
rewritten) and sends only what changed, coalescing a burst of changes into one transaction. The global
and ``services`` rows are upserts guarded with ``WHERE ... IS NOT excluded...``: every machines agent of
the fleet writes the same values, and a write that changes nothing makes no version. A failed write is
retried with backoff; nothing is lost because the desired state is recomputed from the instances.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

import aiohttp

from verdigris.api.client import ApiError, CorrosionClient
from verdigris.api.wire import StatementLike
from verdigris.machines.config import MachinesConfig
from verdigris.machines.instance import Instance, now_ms
from verdigris.machines.metrics import MachinesMetrics

log = logging.getLogger("verdigris.machines")

RETRY_FIRST: Final = 0.2
RETRY_MAX: Final = 5.0
MAX_STATEMENTS: Final = 500
"""Statements per transaction (more are sent in the next round at once)."""


@dataclass(frozen=True)
class MachineRow:
    app: str
    region: str
    state: str
    address: str
    node: str
    created_at: int


Snapshot = tuple[MachineRow | None, Mapping[str, tuple[str, str]]]
"""What an instance's rows are: its machines row (None: no row) and its checks (name -> status, output)."""


def desired(inst: Instance) -> Snapshot:
    if inst.destroyed:
        return None, {}
    row = MachineRow(
        inst.app.name, inst.config.region, inst.state, inst.address, inst.config.node, inst.created_at
    )
    return row, dict(inst.checks)


def global_statements(config: MachinesConfig) -> list[StatementLike]:
    """Guarded upserts of this config's apps, hostnames, services and the machine_agents row."""
    ms = now_ms()
    out: list[StatementLike] = []
    for app in config.apps:
        out.append(
            (
                "INSERT INTO apps (name, concurrency, soft_limit, hard_limit, updated_at) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET concurrency = excluded.concurrency, "
                "soft_limit = excluded.soft_limit, hard_limit = excluded.hard_limit, "
                "updated_at = excluded.updated_at WHERE apps.concurrency IS NOT excluded.concurrency "
                "OR apps.soft_limit IS NOT excluded.soft_limit OR apps.hard_limit IS NOT excluded.hard_limit",
                [app.name, app.concurrency, app.soft_limit, app.hard_limit, ms],
            )
        )
        for host in app.hostnames:
            out.append(
                (
                    "INSERT INTO hostnames (hostname, app, created_at) VALUES (?, ?, ?) "
                    "ON CONFLICT (hostname) DO UPDATE SET app = excluded.app "
                    "WHERE hostnames.app IS NOT excluded.app",
                    [host, app.name, ms],
                )
            )
        out.append(
            (
                "INSERT INTO services (app, port, protocol, handlers, internal_port, updated_at) "
                "VALUES (?, 80, 'tcp', 'http', 0, ?) ON CONFLICT (app, port) DO UPDATE SET "
                "protocol = excluded.protocol, handlers = excluded.handlers, "
                "internal_port = excluded.internal_port, updated_at = excluded.updated_at "
                "WHERE services.protocol IS NOT excluded.protocol OR services.handlers IS NOT excluded.handlers "
                "OR services.internal_port IS NOT excluded.internal_port",
                [app.name, ms],
            )
        )
    out.append(
        (
            "INSERT INTO machine_agents (id, region, address, apps, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET region = excluded.region, address = excluded.address, "
            "apps = excluded.apps, updated_at = excluded.updated_at "
            "WHERE machine_agents.region IS NOT excluded.region "
            "OR machine_agents.address IS NOT excluded.address OR machine_agents.apps IS NOT excluded.apps",
            [config.node, config.region, config.advertise, json.dumps(startable_apps(config)), ms],
        )
    )
    return out


def startable_apps(config: MachinesConfig) -> list[str]:
    """The apps a proxy may ask this node to start: autostart on, and instances of it here."""
    return sorted(a.name for a in config.apps if a.autostart and config.share(a))


def diff_statements(iid: str, old: Snapshot, new: Snapshot) -> list[tuple[str, StatementLike]]:
    """(table, statement) pairs turning ``old`` rows of instance ``iid`` into ``new``."""
    out: list[tuple[str, StatementLike]] = []
    old_row, old_checks = old
    new_row, new_checks = new
    ms = now_ms()
    if new_row is None:
        if old_row is not None:
            out.append(("machines", ("DELETE FROM machines WHERE id = ?", [iid])))
        if old_checks or old_row is not None:
            out.append(("checks", ("DELETE FROM checks WHERE machine = ?", [iid])))
        return out
    if new_row != old_row:
        r = new_row
        out.append(
            (
                "machines",
                (
                    "INSERT INTO machines (id, app, region, state, address, node, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET app = excluded.app, "
                    "region = excluded.region, state = excluded.state, address = excluded.address, "
                    "node = excluded.node, created_at = excluded.created_at, updated_at = excluded.updated_at",
                    [iid, r.app, r.region, r.state, r.address, r.node, r.created_at, ms],
                ),
            )
        )
    for name in sorted(set(old_checks) - set(new_checks)):
        out.append(("checks", ("DELETE FROM checks WHERE machine = ? AND name = ?", [iid, name])))
    for name, (status, output) in sorted(new_checks.items()):
        if old_checks.get(name) != (status, output):
            out.append(
                (
                    "checks",
                    (
                        "INSERT INTO checks (machine, name, app, status, output, updated_at) "
                        "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (machine, name) DO UPDATE SET "
                        "app = excluded.app, status = excluded.status, output = excluded.output, "
                        "updated_at = excluded.updated_at",
                        [iid, name, new_row.app, status, output, ms],
                    ),
                )
            )
    return out


class StateWriter:
    """Keeps this node's rows equal to its instances' state (see the module docstring)."""

    def __init__(
        self,
        config: MachinesConfig,
        client: CorrosionClient,
        metrics: MachinesMetrics,
        instances: Callable[[], Mapping[str, Instance]],
    ) -> None:
        self.config = config
        self.client = client
        self.metrics = metrics
        self._instances = instances
        self._written: dict[str, Snapshot] = {}
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()
        self._globals_pending = True
        self._seeded = False
        self.writes = 0
        self.last_error = ""

    def mark(self, inst: Instance) -> None:
        self._dirty.add(inst.id)
        self._settled.clear()
        self._wake.set()

    def mark_globals(self) -> None:
        self._globals_pending = True
        self._settled.clear()
        self._wake.set()

    async def settled(self, timeout: float) -> bool:
        """Wait until everything marked has been written (False after ``timeout``)."""
        try:
            async with asyncio.timeout(timeout):
                await self._settled.wait()
            return True
        except TimeoutError:
            return False

    async def _seed(self) -> None:
        """Learn the rows already there for this node, and delete those of instances that no longer
        exist (a previous run with another config, or one that was killed)."""
        _, machines = await self.client.rows(
            (
                "SELECT id, app, region, state, address, node, created_at FROM machines WHERE node = ?",
                [self.config.node],
            )
        )
        _, checks = await self.client.rows(
            (
                "SELECT machine, name, status, output FROM checks WHERE machine IN "
                "(SELECT id FROM machines WHERE node = ?)",
                [self.config.node],
            )
        )
        by_machine: dict[str, dict[str, tuple[str, str]]] = {}
        for machine, name, status, output in checks:
            by_machine.setdefault(str(machine), {})[str(name)] = (str(status), str(output))
        for iid, app, region, state, address, node, created in machines:
            row = MachineRow(str(app), str(region), str(state), str(address), str(node), int(created or 0))
            self._written[str(iid)] = (row, by_machine.get(str(iid), {}))
            self._dirty.add(str(iid))
        self._seeded = True

    async def run(self) -> None:
        delay = RETRY_FIRST
        while True:
            try:
                if not self._seeded:
                    await self._seed()
                await self._round()
                delay = RETRY_FIRST
            except (ApiError, aiohttp.ClientError, OSError, TimeoutError) as e:
                self.metrics.state_writes.labels("error").inc()
                self.last_error = str(e) or type(e).__name__
                log.warning(
                    "writing state to the agent at %s failed: %s (retry in %.1f s)",
                    self.config.agent,
                    self.last_error,
                    delay,
                )
                await asyncio.sleep(delay)  # a retry timer: nothing to wait on but time
                delay = min(delay * 2, RETRY_MAX)
                continue
            if not self._dirty and not self._globals_pending:
                self._settled.set()
                self._wake.clear()
                await self._wake.wait()

    async def _round(self) -> None:
        instances = self._instances()
        pairs: list[tuple[str, StatementLike]] = []
        if self._globals_pending:
            pairs += [("globals", s) for s in global_statements(self.config)]
        done: dict[str, Snapshot] = {}
        for iid in sorted(self._dirty):
            if len(pairs) >= MAX_STATEMENTS:
                break
            inst = instances.get(iid)
            new: Snapshot = desired(inst) if inst is not None else (None, {})
            pairs += diff_statements(iid, self._written.get(iid, (None, {})), new)
            done[iid] = new
        globals_sent = self._globals_pending
        if pairs:
            await self.client.transaction([s for _, s in pairs])
            self.writes += 1
            self.metrics.state_writes.labels("ok").inc()
            for table, _ in pairs:
                self.metrics.state_statements.labels(table).inc()
        for iid, snap in done.items():
            self._dirty.discard(iid)
            # a change that came in while the transaction was in flight is re-marked by mark()
            if (inst_now := instances.get(iid)) and desired(inst_now) != snap:
                self._dirty.add(iid)
            if snap[0] is None:
                self._written.pop(iid, None)
            else:
                self._written[iid] = snap
        if globals_sent:
            self._globals_pending = False

    async def remove_agent_row(self) -> None:
        await self.client.transaction([("DELETE FROM machine_agents WHERE id = ?", [self.config.node])])


__all__ = ["MachineRow", "StateWriter", "desired", "diff_statements", "global_statements", "startable_apps"]
