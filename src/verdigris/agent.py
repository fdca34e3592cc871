"""The agent runtime: one process that owns the store and serves the API.

:class:`Agent` wires the pieces together from a :class:`~verdigris.config.Config`:

* the :class:`~verdigris.store.Store` (``[db]``), opened on the writer thread, which from then on runs
  every write (:class:`~verdigris.api.threads.StoreThreads`);
* the :class:`~verdigris.store.subscriptions.SubscriptionManager`, its state in ``<db path>.subscriptions/``;
* the HTTP API on ``[api] addr`` and, when configured, Prometheus metrics on
  ``[telemetry.prometheus] addr``;
* the admin socket on ``[admin] path`` (:mod:`verdigris.admin`): ``ping``, ``reload``, ``backup``,
  ``fault stall-loop|stall-apply`` (watchdog fault injection), and for a clustered agent ``members``,
  ``rejoin``, ``status``, ``keys`` and the gossip ``fault`` actions;
* unless ``[watchdog] enabled = false``, the in-process watchdog (:mod:`verdigris.watchdog.agent`), started
  last and stopped first: it probes the event loop and the writer thread and, run by :func:`serve`,
  re-executes the agent when one is stuck (an embedded agent's watchdog only reports);
* when the file has a ``[gossip]`` section, the :class:`~verdigris.runtime.GossipRuntime` that makes the
  agent a member of a cluster (membership, broadcast and sync on ``[gossip] addr``); in region mode
  (``[gossip.global]`` too, docs/regions.md) two of them: :attr:`Agent.gossip` is the region's cluster
  (regional tables) and :attr:`Agent.global_gossip` the cluster of every node (global tables). The admin
  commands ``members``, ``status``, ``rejoin`` and ``fault`` take a ``scope`` (``regional`` by default,
  or ``global``) to say which;
* in region mode (unless ``[presence] enabled = false``), the
  :class:`~verdigris.presence.PresencePublisher`, which keeps this region's rows of the global tables
  ``app_regions`` and ``region_rtt`` up to date (docs/regions.md, "Coarse global state"); ``ping`` and
  ``status`` report it under ``presence``.

Start-up problems (a bad schema, a database that cannot be opened, a port in use, another agent on the
same admin socket) raise :class:`AgentError` with a one-line message, so the CLI can print it and exit
with status 1 instead of a traceback. :func:`run_agent` is the CLI's entry: it installs SIGINT/SIGTERM
handlers, runs until one arrives and shuts down in order (stop accepting, end streams, close the store).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
import os
import signal
import sqlite3
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar, TextIO

from aiohttp import web

from verdigris.admin import AdminError, AdminHandler, AdminServer, AdminUnavailable, admin_call
from verdigris.api.metrics import ApiMetrics, metrics_app
from verdigris.api.server import ApiServer, ApiSettings
from verdigris.api.threads import StoreThreads
from verdigris.config import Addr, Config, LogConfig
from verdigris.dashboard.web import mount_dashboard
from verdigris.presence import PresencePublisher
from verdigris.runtime import (
    FaultInjectionDisabled,
    GossipRuntime,
    GossipSetupError,
    open_keyring,
    peers_path,
)
from verdigris.runtime.gossip import parse_peer_addr
from verdigris.store.schema import SCOPES
from verdigris.store.store import Store
from verdigris.store.subscriptions import SubscriptionManager
from verdigris.store.types import StoreError
from verdigris.watchdog.agent import (
    AgentWatchdog,
    CarriedState,
    FaultInjectionOff,
    WatchdogCollector,
    fault_seconds,
    stall_apply_path,
    stall_event_loop,
)

log = logging.getLogger("verdigris.agent")


class AgentError(Exception):
    """The agent could not start; the message is a complete, one-line explanation for the user."""


def subscriptions_dir(db_path: Path) -> Path:
    """Where the subscriptions' state lives: next to the database, named after it."""
    return db_path.with_name(db_path.name + ".subscriptions")


class Agent:
    """One agent. ``await start()``, then ``await stop()``; or use :func:`run_agent`."""

    def __init__(
        self,
        config: Config,
        *,
        api_settings: ApiSettings | None = None,
        reader_threads: int = 4,
        watchdog_may_exec: bool = False,
    ) -> None:
        self.config = config
        self._watchdog_may_exec = watchdog_may_exec
        """This process is the agent (:func:`serve`): its watchdog may re-exec it. An agent embedded in
        another process (tests, the simulator) never re-execs its host; its watchdog only reports."""
        self.watchdog: AgentWatchdog | None = None
        """The in-process watchdog (``[watchdog]``, :mod:`verdigris.watchdog.agent`) once started."""
        self.api_settings = api_settings or ApiSettings(
            bearer_token=config.api.authz.bearer_token, max_body_bytes=config.api.max_body_bytes
        )
        self._reader_threads = reader_threads
        self._writer: ThreadPoolExecutor | None = None
        self.store: Store | None = None
        self.threads: StoreThreads | None = None
        self.subs: SubscriptionManager | None = None
        self.metrics = ApiMetrics()
        self.api: ApiServer | None = None
        self._api_runner: web.AppRunner | None = None
        self._metrics_runner: web.AppRunner | None = None
        self._admin: AdminServer | None = None
        self.api_addr: Addr | None = None
        """Where the API actually listens (the real port when ``api.addr`` has port 0)."""
        self.metrics_addr: Addr | None = None
        self.gossip: GossipRuntime | None = None
        """The cluster runtime, when ``[gossip]`` is configured and the agent is started; in region mode
        the region's cluster (scope ``regional``)."""
        self.global_gossip: GossipRuntime | None = None
        """In region mode (``[gossip.global]``), the global cluster's runtime (scope ``global``)."""
        self.presence: PresencePublisher | None = None
        """In region mode (unless ``presence.enabled = false``), the presence publisher
        (:mod:`verdigris.presence`, docs/regions.md "Coarse global state")."""

    @property
    def api_url(self) -> str:
        assert self.api_addr is not None, "the agent is not started"
        host = self.api_addr.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        return (
            f"http://[{host}]:{self.api_addr.port}" if ":" in host else f"http://{host}:{self.api_addr.port}"
        )

    # ------------------------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open everything; on failure close what was opened and raise :class:`AgentError`."""
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> None:
        config = self.config
        loop = asyncio.get_running_loop()
        handlers: dict[str, AdminHandler] = {
            "ping": self._ping,
            "reload": self._reload,
            "backup": self._backup,
            "fault": self._fault,  # watchdog stalls; with [gossip] also partitions
        }
        if config.gossip.enabled:
            handlers.update(
                members=self._members,
                rejoin=self._rejoin,
                status=self._status,
                keys=self._keys,
                fault=self._fault,
            )
        admin = AdminServer(config.admin.path, handlers)
        # Before touching the database: refuse to run beside another agent on the same admin socket.
        await self._check_admin_free(admin)

        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vd-writer")
        self.store = await loop.run_in_executor(self._writer, self._open_store)
        self.threads = StoreThreads(self.store, writer=self._writer, readers=self._reader_threads)
        try:
            self.subs = await self.threads.write(
                SubscriptionManager, self.store, subscriptions_dir(config.db.path)
            )
        except (StoreError, sqlite3.Error, OSError) as e:
            raise AgentError(f"cannot start subscriptions: {e}") from None

        self.api = ApiServer(
            self.store,
            self.threads,
            self.subs,
            self.api_settings,
            self.metrics,
            members=lambda: self.gossip.member_count() if self.gossip is not None else 0,
            queue_size=lambda: sum(rt.queue_size() for rt in self._runtimes()),
        )
        mount_dashboard(self.api, self)  # GET /dashboard and /v1/dashboard (docs/dashboard.md)
        self._api_runner, self.api_addr = await self._listen(self.api.app, config.api.addr, "api.addr")
        if config.gossip.enabled:
            await self._start_gossip()
        if config.telemetry.prometheus.addr is not None:
            self._metrics_runner, self.metrics_addr = await self._listen(
                metrics_app(self.metrics), config.telemetry.prometheus.addr, "telemetry.prometheus.addr"
            )
        try:
            await admin.start()
        except AdminError as e:
            raise AgentError(str(e)) from None
        self._admin = admin
        if config.watchdog.enabled:
            self._start_watchdog(loop)
        log.info(
            "agent started: api %s, admin socket %s, database %s (site %s)",
            self.api_url,
            config.admin.path,
            config.db.path,
            self.store.site_id.hex(),
        )

    def _start_watchdog(self, loop: asyncio.AbstractEventLoop) -> None:
        store, subs, writer = self.store, self.subs, self._writer
        assert store is not None and subs is not None and writer is not None

        def apply_work() -> int:
            # an empty transaction takes the store's lock and SQLite's write lock, as every write does
            store.transact(())
            return store.db_version

        watchdog = AgentWatchdog(
            self.config.watchdog,
            loop=loop,
            writer=writer,
            loop_work=lambda: len(subs.list()),  # the subscription manager's lock, as the API takes it
            apply_work=apply_work,
            may_exec=self._watchdog_may_exec,
            carried=CarriedState.take_from_environment() if self._watchdog_may_exec else None,
        )
        WatchdogCollector(watchdog).register(self.metrics.registry)
        watchdog.start()
        self.watchdog = watchdog

    async def _start_gossip(self) -> None:
        assert self.store is not None and self.threads is not None and self.api_addr is not None
        config = self.config
        region_mode = config.gossip.region_mode
        try:
            keyring, keyring_path = await asyncio.to_thread(open_keyring, config.gossip, config.db.path)
            runtime = GossipRuntime(
                store=self.store,
                threads=self.threads,
                config=config.gossip,
                keyring=keyring,
                keyring_path=keyring_path,
                peers_file=peers_path(config.db.path),
                api_addr=str(self.api_addr),
                registry=self.metrics.registry,
                scope="regional" if region_mode else None,
            )
            await runtime.start()
        except GossipSetupError as e:
            raise AgentError(str(e)) from None
        self.gossip = runtime
        if not region_mode:
            return
        try:
            # The same keyring object: `keys` changes made through either runtime apply to both.
            global_runtime = GossipRuntime(
                store=self.store,
                threads=self.threads,
                config=config.gossip.for_global(),
                keyring=keyring,
                keyring_path=keyring_path,
                peers_file=peers_path(config.db.path, "global"),
                api_addr=str(self.api_addr),
                registry=self.metrics.registry,
                scope="global",
            )
            await global_runtime.start()
        except GossipSetupError as e:
            message = str(e).replace("gossip.addr", "gossip.global.addr")
            message = message.replace("gossip.external-addr", "gossip.global.external-addr")
            raise AgentError(f"global cluster: {message}") from None
        self.global_gossip = global_runtime
        if config.presence.enabled:
            presence = PresencePublisher(
                store=self.store,
                threads=self.threads,
                regional=runtime,
                global_=global_runtime,
                region=config.gossip.region,
                config=config.presence,
                registry=self.metrics.registry,
            )
            await presence.start()
            self.presence = presence

    async def _check_admin_free(self, admin: AdminServer) -> None:
        path = admin.path
        if not (path.exists() or path.is_symlink()):
            return
        try:
            await asyncio.to_thread(admin_call, path, {"cmd": "ping"}, 2.0)
        except AdminUnavailable:
            return
        except AdminError:
            raise AgentError(f"another process listens on the admin socket {path} (admin.path)") from None
        raise AgentError(f"another agent is already running (its admin socket {path} answers)")

    def _open_store(self) -> Store:
        db = self.config.db
        try:
            return Store(db.path, db.schema_paths)
        except StoreError as e:
            raise AgentError(str(e)) from None
        except sqlite3.Error as e:
            raise AgentError(f"cannot open the database {db.path} (db.path): {e}") from None
        except OSError as e:
            raise AgentError(f"cannot open the database {db.path} (db.path): {e.strerror or e}") from None

    async def _listen(self, app: web.Application, addr: Addr, key: str) -> tuple[web.AppRunner, Addr]:
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=5.0)
        await runner.setup()
        site = web.TCPSite(runner, addr.host, addr.port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await runner.cleanup()
            raise AgentError(f"cannot listen on {addr} ({key}): {e.strerror or e}") from None
        host, port = runner.addresses[0][:2]
        return runner, Addr(str(host), int(port))

    async def stop(self) -> None:
        """Stop accepting, end open streams, close the subscriptions and the store. Idempotent."""
        loop = asyncio.get_running_loop()
        if self.watchdog is not None:  # first: a slow shutdown must not look like a stall
            watchdog, self.watchdog = self.watchdog, None
            await asyncio.to_thread(watchdog.stop)
        if self.presence is not None:  # before the runtimes and the store it reads
            presence, self.presence = self.presence, None
            try:
                await presence.stop()
            except Exception:
                log.exception("stopping the presence publisher failed")
        runtimes = self._runtimes()
        self.gossip = self.global_gossip = None
        if runtimes:  # both clusters leave at once: each leave may wait for its news to go out
            results = await asyncio.gather(*(rt.stop() for rt in runtimes), return_exceptions=True)
            for rt, result in zip(runtimes, results, strict=True):
                if isinstance(result, Exception):
                    log.error("stopping gossip (%s) failed", rt.scope or "cluster", exc_info=result)
        if self.api is not None:
            await self.api.close()
        for runner in (self._api_runner, self._metrics_runner):
            if runner is not None:
                with contextlib.suppress(Exception):
                    await runner.cleanup()
        self._api_runner = self._metrics_runner = None
        if self._admin is not None:
            await self._admin.close()
            self._admin = None
        if self.subs is not None:
            subs, self.subs = self.subs, None
            try:
                await asyncio.to_thread(subs.close)
            except Exception:
                log.exception("closing subscriptions failed")
        if self.threads is not None:
            threads, self.threads = self.threads, None
            await asyncio.to_thread(threads.close)
        if self.store is not None and self._writer is not None:
            store, self.store = self.store, None
            await loop.run_in_executor(self._writer, store.close)
        if self._writer is not None:
            writer, self._writer = self._writer, None
            await asyncio.to_thread(writer.shutdown, True)
        self.api = None

    # ------------------------------------------------------------------------------------ admin commands

    async def _ping(self, command: dict[str, Any]) -> dict[str, Any]:
        store = self.store
        return {
            "pong": True,
            "pid": os.getpid(),
            "api": self.api_url if self.api_addr else None,
            "db": str(self.config.db.path),
            "site_id": store.site_id.hex() if store else None,
            "version": store.db_version if store else None,
            "gossip": f"{self.gossip.addr[0]}:{self.gossip.addr[1]}"
            if self.gossip and self.gossip.addr
            else None,
            "global_gossip": f"{self.global_gossip.addr[0]}:{self.global_gossip.addr[1]}"
            if self.global_gossip and self.global_gossip.addr
            else None,
            "region": self.config.gossip.region if self.config.gossip.enabled else None,
            "actors": {scope: store.actor_for(scope).hex() for scope in SCOPES} if store else None,
            "presence": self.presence.info() if self.presence is not None else None,
            "watchdog": self.watchdog.info() if self.watchdog is not None else {"enabled": False},
        }

    def _runtimes(self) -> list[GossipRuntime]:
        return [rt for rt in (self.gossip, self.global_gossip) if rt is not None]

    def _runtime(self, command: dict[str, Any] | None = None) -> GossipRuntime:
        """The runtime a command's ``scope`` names: ``regional`` (the default) or ``global``. Without
        region mode one cluster carries every scope, so both names mean it."""
        scope = (command or {}).get("scope") or "regional"
        if scope not in SCOPES:
            raise ValueError(f"unknown scope {scope!r} (expected one of: {', '.join(SCOPES)})")
        if self.gossip is None:
            raise RuntimeError("gossip is not running")
        if scope == "global" and self.config.gossip.region_mode:
            if self.global_gossip is None:
                raise RuntimeError("the global cluster is not running")
            return self.global_gossip
        return self.gossip

    async def _members(self, command: dict[str, Any]) -> dict[str, Any]:
        return {"members": self._runtime(command).members_info()}

    async def _rejoin(self, command: dict[str, Any]) -> dict[str, Any]:
        return {"announced_to": self._runtime(command).rejoin()}

    async def _status(self, command: dict[str, Any]) -> dict[str, Any]:
        status = await self._runtime(command).status()
        if self.presence is not None:
            status["presence"] = self.presence.info()
        status["watchdog"] = self.watchdog.info() if self.watchdog is not None else {"enabled": False}
        return status

    async def _keys(self, command: dict[str, Any]) -> dict[str, Any]:
        action = command.get("action", "list")
        key = command.get("key")
        if not isinstance(action, str) or (key is not None and not isinstance(key, str)):
            raise ValueError('keys needs "action" (list, install, use, remove) and a string "key"')
        return await self._runtime().keys(action, key)

    async def _fault(self, command: dict[str, Any]) -> dict[str, Any]:
        action = command.get("action")
        if action in ("stall-loop", "stall-apply"):
            return await self._fault_stall(command)
        runtime = self._runtime(command)
        if action == "heal":
            runtime.fault_heal()
            return {"blocked": []}
        if action == "block":
            raw = command.get("addrs")
            if not isinstance(raw, list) or not raw or not all(isinstance(a, str) for a in raw):
                raise ValueError('fault block needs "addrs", a list of "host:port"')
            addrs = [parse_peer_addr(a) for a in raw]
            try:
                return {"blocked": runtime.fault_block(addrs)}
            except FaultInjectionDisabled as e:
                raise RuntimeError(str(e)) from None
        if action == "status":
            fault: dict[str, Any] = (await runtime.status())["fault"]
            return fault
        raise ValueError(
            "usage: fault block <host:port>... | fault heal | fault status | fault stall-loop <seconds> | "
            "fault stall-apply <seconds>"
        )

    async def _fault_stall(self, command: dict[str, Any]) -> dict[str, Any]:
        """Watchdog fault injection: block the event loop, or the writer thread, for ``seconds``."""
        if not self.config.watchdog.fault_injection:
            raise FaultInjectionOff(
                "fault injection is off: set [watchdog] fault-injection = true (for tests only)"
            )
        seconds = fault_seconds(command)
        if command["action"] == "stall-loop":
            log.warning("fault injection: blocking the event loop for %gs", seconds)
            stall_event_loop(seconds)  # on the loop, on purpose: the reply comes after the stall
            return {"stalled": "loop", "seconds": seconds}
        if self._writer is None:
            raise RuntimeError("the agent is not running")
        log.warning("fault injection: blocking the writer thread for %gs", seconds)
        self._writer.submit(stall_apply_path, seconds)  # not awaited: the reply comes at once
        return {"stalled": "apply", "seconds": seconds}

    async def _reload(self, command: dict[str, Any]) -> dict[str, Any]:
        """Re-read the schema files of ``db.schema_paths`` and apply additive changes live."""
        if self.store is None or self.threads is None:
            raise RuntimeError("the agent is not running")
        paths = self.config.db.schema_paths
        if not paths:
            raise RuntimeError("no schema files configured (db.schema_paths)")
        changes = await self.threads.write(self.store.reload_schema, paths)
        summary = {
            "new_tables": list(changes.new_tables),
            "new_columns": [f"{t}.{c}" for t, c in changes.new_columns],
            "new_indexes": list(changes.new_indexes),
            "dropped_indexes": list(changes.dropped_indexes),
            "changed_indexes": list(changes.changed_indexes),
        }
        log.info("schema reloaded: %s", _describe_changes(summary))
        return {"changed": not changes.is_empty(), "changes": summary}

    async def _backup(self, command: dict[str, Any]) -> dict[str, Any]:
        """A consistent online copy: SQLite's backup API copies a snapshot while writes go on."""
        if self.store is None:
            raise RuntimeError("the agent is not running")
        raw = command.get("path")
        if not isinstance(raw, str) or not raw:
            raise ValueError('backup needs "path"')
        dest = Path(raw)
        if not dest.is_absolute():
            raise ValueError(f"backup path must be absolute (the agent's directory is not yours): {raw}")
        if dest.resolve() == self.config.db.path.resolve():
            raise ValueError("backup path is the database itself")
        await asyncio.to_thread(self.store.backup, dest)
        return {"path": str(dest), "bytes": dest.stat().st_size}


def _describe_changes(summary: dict[str, list[str]]) -> str:
    parts = [f"{k.replace('_', ' ')}: {', '.join(v)}" for k, v in summary.items() if v]
    return "; ".join(parts) or "no changes"


# ---------------------------------------------------------------------------------------- running


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class _PlainFormatter(logging.Formatter):
    _COLORS: ClassVar[dict[str, str]] = {
        "DEBUG": "\x1b[2m",
        "INFO": "\x1b[32m",
        "WARNING": "\x1b[33m",
        "ERROR": "\x1b[31m",
        "CRITICAL": "\x1b[1;31m",
    }

    def __init__(self, colors: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.colors = colors

    def formatMessage(self, record: logging.LogRecord) -> str:
        text = super().formatMessage(record)
        if self.colors:
            color = self._COLORS.get(record.levelname, "")
            text = text.replace(record.levelname, f"{color}{record.levelname}\x1b[0m", 1)
        return text


def configure_logging(config: LogConfig, stream: TextIO | None = None) -> None:
    """Log per ``[log]``: level, plaintext (coloured on a terminal when ``colors``) or JSON lines."""
    out = stream or sys.stderr
    handler = logging.StreamHandler(out)
    if config.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_PlainFormatter(config.colors and out.isatty()))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level_number)
    # aiohttp's access log duplicates our per-request debug line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


async def serve(config: Config) -> int:
    """Run an agent until SIGINT or SIGTERM. Returns the process exit status."""
    agent = Agent(config, watchdog_may_exec=True)
    try:
        await agent.start()
    except AgentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await agent.stop()
    log.info("stopped")
    return 0


def run_agent(config: Config) -> int:
    """Blocking entry for ``verdigris agent``: logging per ``[log]``, uvloop when available."""
    configure_logging(config.log)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is a dependency, but optional in spirit
        runner = asyncio.run
    code: int = runner(serve(config))
    return code
