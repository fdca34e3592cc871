"""The proxy's configuration: the ``[proxy]`` section of a TOML file.

::

    [proxy]
    listen = "0.0.0.0:8000"          # the supervisor binds it once; every worker accepts from it
    workers = 2
    worker_start = "forkserver"      # or "spawn": a fresh interpreter per worker (slower restarts)
    agent = "http://127.0.0.1:8080"  # the local agent, whose subscriptions feed the routing table
    region = "ams"
    max_header_bytes = 65536         # request line + headers; beyond: 431
    max_request_line_bytes = 8192    # method + URL + version; beyond: 414
    metrics_listen = "127.0.0.1:9100"  # optional: the supervisor serves Prometheus text at /metrics
    probe_interval = 0.25            # seconds between the supervisor's probes of each worker
    probe_deadline = 1.0             # a worker that does not answer a probe within this is stuck
    watchdog = true                  # replace a stuck worker (stacks dumped first); false: only count
    stack_dir = "/var/tmp/vd-stacks" # where stuck workers' stacks are kept (the last 20; default: temp dir)
    environment = "development"      # "production" refuses every fault-injection setting below
    table_lock = "project"           # the routing table's lock; "plain": the naive one (fault injection)
    fault_injection = false          # tests only: the /fault/* endpoints, table_lock = "plain", [proxy.fault]
    id = "ams-edge-1"                # this proxy's row in the global `proxies` table (default: derived)
    external_addr = "10.0.0.5:8000"  # where other regions' proxies reach it (default: listen)
    peer_token = "..."               # shared by every proxy: authenticates forwarded requests

    [proxy.timeouts]                 # seconds
    header_read = 10.0
    body_read = 60.0                 # a request body with no byte for this long: 408, connection closed
    idle = 60.0
    connect = 5.0
    response = 60.0
    queue = 5.0
    drain = 10.0                     # SIGTERM: in-flight requests (and open tunnels) get this long
    send = 60.0                      # a client not reading what we have to write: aborted after this
    tunnel_idle = 300.0              # a WebSocket tunnel with no byte either way: closed after this
    wake = 20.0                      # autostart: a request held while a stopped app is started

    [proxy.fault]                    # fault injection only (needs fault_injection = true)
    incident_row = "apps:incident-trigger"  # a change of this row takes the table lock read, then write

``table_lock``: ``"project"`` (the default) is :class:`~verdigris.watchdog.rwlock.RWLock`, which refuses a
read→write upgrade with an error; ``"plain"`` is :class:`~verdigris.watchdog.rwlock.PlainRWLock`, the naive
lock that deadlocks on it, kept only to reproduce the incident. ``[proxy.fault] incident_row``:
``"<table>:<primary key value>"`` of a subscribed table (``apps``, ``hostnames``, ``app_regions``,
``machines``, ``services``, ``checks``, ``proxies``, ``region_rtt``), the parts of a composite key joined by
``/`` (``"checks:m1/http"``); see :class:`~verdigris.proxy.table.IncidentRow` and docs/watchdog.md, "The
incident switch". Both are accepted only with ``fault_injection = true``, and ``environment =
"production"`` refuses ``fault_injection = true``, ``table_lock = "plain"`` and any ``[proxy.fault]``.

Validation is strict, as for the agent's file: an unknown key or a value of the wrong type is an error,
and every problem is reported in one :class:`ProxyConfigError`.
"""

from __future__ import annotations

import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from verdigris.config import Addr, parse_addr
from verdigris.proxy.table import IncidentRow

Environment = Literal["production", "development"]
TableLockKind = Literal["project", "plain"]
WorkerStart = Literal["spawn", "forkserver"]


class ProxyConfigError(Exception):
    """The file is missing, not TOML, or does not validate (one problem per line)."""


@dataclass(frozen=True)
class ProxyTimeouts:
    header_read: float = 10.0
    """From the first byte of a request to the end of its headers."""
    body_read: float = 60.0
    """The longest wait for more of a request body the client still owes (a stalled upload:
    408, connection closed, so that it cannot hold an instance's slot forever)."""
    idle: float = 60.0
    """A keep-alive client connection with no request in flight."""
    connect: float = 5.0
    """Connecting to an instance."""
    response: float = 60.0
    """From the end of the request to the upstream response's headers (and between its body reads)."""
    queue: float = 5.0
    """How long a request waits for a slot when every instance is at its hard limit."""
    drain: float = 10.0
    """On SIGTERM: how long in-flight requests may take to finish (open tunnels are closed after it)."""
    send: float = 60.0
    """How long a client may leave us unable to write (its socket full: it is not reading) while there
    is more to send; then the client connection and the upstream one are aborted."""
    tunnel_idle: float = 300.0
    """A WebSocket (Upgrade) tunnel with no byte in either direction for this long is closed."""
    wake: float = 20.0
    """Autostart: how long a request for an app with no started instance in reach is held while a
    machines agent starts one (verdigris.proxy.wake); then 503 no_healthy_instance."""


@dataclass(frozen=True)
class ProxyHeaders:
    """Names of the headers the proxy adds (configurable, as apps expect Fly's)."""

    request_id: str = "fly-request-id"
    region: str = "fly-region"
    client_ip: str = "fly-client-ip"
    error_code: str = "fly-error-code"
    via: str = "verdigris"
    forwarded_hops: str = "fly-forwarded-hops"
    """On a request forwarded to another region's proxy: the hop count (1). Trusted only together with
    a valid ``peer_token`` header."""
    peer_token: str = "verdigris-peer-token"
    """Carries the shared ``[proxy] peer_token`` on requests between proxies."""


@dataclass(frozen=True)
class ProxyFault:
    """``[proxy.fault]``: fault injection that reproduces the incident (needs ``fault_injection``)."""

    incident_row: IncidentRow | None = None
    """A change (not a snapshot row) of this row is applied under the read side of the table lock and
    then the write side (:mod:`verdigris.proxy.table`, "The incident switch")."""


@dataclass(frozen=True)
class ProxyConfig:
    listen: Addr = field(default_factory=lambda: parse_addr("127.0.0.1:8000"))
    workers: int = 2
    worker_start: WorkerStart = "forkserver"
    """How worker processes start: ``"spawn"`` (a fresh interpreter each) or ``"forkserver"`` (forked from
    a server that has imported the worker's modules: restarts take a fraction of the time)."""
    agent: str = "http://127.0.0.1:8080"
    token: str | None = None
    region: str = "local"
    queue_size: int = 1000
    """Requests waiting for a slot, per worker; beyond it: 503 queue_full."""
    pool_idle: int = 16
    """Idle keep-alive connections kept per instance, per worker."""
    max_header_bytes: int = 64 * 1024
    """Request line + headers; beyond: 431."""
    max_request_line_bytes: int = 8192
    """Method + URL + version; beyond: 414 uri_too_long."""
    load_cells: int = 1 << 18
    """Counters per worker in the load counts shared by the workers (``verdigris.proxy.shared_load``):
    more cells, fewer instances sharing one (a collision makes an instance look busier than it is)."""
    metrics_listen: Addr | None = None
    """Where the supervisor serves ``/metrics`` (Prometheus text); none by default."""
    probe_interval: float = 0.25
    """Seconds between the supervisor's probes of each worker over its control channel."""
    probe_deadline: float = 1.0
    """A probe not answered within this (counted from its send) is a probe timeout: the worker is stuck
    (replaced when ``watchdog`` is on); also the limit on a worker's answer to a metrics scrape."""
    watchdog: bool = True
    """Replace a worker that misses a probe deadline (its stacks dumped first); off: only log and count."""
    stack_dir: str | None = None
    """Where stuck workers' stack dumps go (the newest ``STACK_KEEP`` are kept); default
    :meth:`stack_directory`."""
    fault_injection: bool = False
    """Tests only: with ``metrics_listen``, the supervisor serves ``POST /fault/stall`` and
    ``/fault/crashloop``, and workers accept the ``stall`` and ``crash`` control ops; ``table_lock =
    "plain"`` and ``[proxy.fault]`` are accepted. Off by default; refused in production."""
    environment: Environment = "development"
    """``"production"`` refuses ``fault_injection``, ``table_lock = "plain"`` and ``[proxy.fault]``."""
    table_lock: TableLockKind = "project"
    """The routing table's read-write lock: ``"project"`` (:class:`~verdigris.watchdog.rwlock.RWLock`) or
    ``"plain"`` (:class:`~verdigris.watchdog.rwlock.PlainRWLock`, fault injection only)."""
    fault: ProxyFault = field(default_factory=ProxyFault)
    timeouts: ProxyTimeouts = field(default_factory=ProxyTimeouts)
    headers: ProxyHeaders = field(default_factory=ProxyHeaders)
    id: str | None = None
    """This proxy's id in the global ``proxies`` table (default: :meth:`proxy_id`)."""
    external_addr: Addr | None = None
    """The address other regions' proxies connect to (default: ``listen``)."""
    peer_token: str | None = None
    """The secret shared by the fleet's proxies. Without it this proxy neither forwards nor trusts
    forwarded requests (their hop and client headers are stripped as any client's)."""

    def stack_directory(self) -> str:
        """``stack_dir``, else ``verdigris-proxy-stacks`` in the system's temporary directory."""
        if self.stack_dir is not None:
            return self.stack_dir
        import tempfile

        return str(Path(tempfile.gettempdir()) / "verdigris-proxy-stacks")

    def proxy_id(self) -> str:
        """The configured ``id``, else ``<region>-<host>-<port>`` from the external address (the host
        name when it is a wildcard address)."""
        if self.id is not None:
            return self.id
        host, port = self.peer_address()
        return f"{self.region}-{host}-{port}"

    def peer_address(self) -> Addr:
        """Where other proxies reach this one: ``external_addr``, else ``listen`` (a wildcard host replaced
        by this machine's host name)."""
        if self.external_addr is not None:
            return self.external_addr
        host, port = self.listen
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        return Addr(host, port)


_TOP = {
    "listen",
    "workers",
    "worker_start",
    "agent",
    "token",
    "region",
    "queue_size",
    "pool_idle",
    "max_header_bytes",
    "max_request_line_bytes",
    "load_cells",
    "metrics_listen",
    "probe_interval",
    "probe_deadline",
    "watchdog",
    "stack_dir",
    "fault_injection",
    "environment",
    "table_lock",
    "id",
    "external_addr",
    "peer_token",
}
_TIMEOUTS = set(ProxyTimeouts.__dataclass_fields__)
_HEADERS = set(ProxyHeaders.__dataclass_fields__)
_FAULT = set(ProxyFault.__dataclass_fields__)
_SECTIONS = {"timeouts", "headers", "fault"}
_CHOICES: dict[str, tuple[str, ...]] = {
    "environment": ("production", "development"),
    "table_lock": ("project", "plain"),
    "worker_start": ("spawn", "forkserver"),
}


def load_proxy_config(path: str | Path) -> ProxyConfig:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ProxyConfigError(f"config file not found: {p}") from None
    except OSError as e:
        raise ProxyConfigError(f"cannot read {p}: {e.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ProxyConfigError(f"{p}: not valid TOML: {e}") from None
    return parse_proxy_config(doc, str(p))


def parse_proxy_config(doc: dict[str, Any], where: str = "<config>") -> ProxyConfig:
    errors: list[str] = []
    sec = doc.get("proxy")
    if not isinstance(sec, dict):
        raise ProxyConfigError(f"{where}: no [proxy] section")
    kw: dict[str, Any] = {}

    def num(d: dict[str, Any], key: str, dotted: str, *, integer: bool, minimum: float) -> Any:
        v = d[key]
        ok = isinstance(v, int) if integer else isinstance(v, int | float)
        if isinstance(v, bool) or not ok:
            errors.append(f"{dotted}: expected {'an integer' if integer else 'a number'}, got {v!r}")
            return None
        if v < minimum:
            errors.append(f"{dotted}: must be at least {minimum}, got {v!r}")
            return None
        return v if integer else float(v)

    for key, value in sec.items():
        dotted = f"proxy.{key}"
        if key == "fault":
            if not isinstance(value, dict):
                errors.append(f"{dotted}: expected a table")
                continue
            fault: dict[str, Any] = {}
            for k, v in value.items():
                if k not in _FAULT:
                    errors.append(f"{dotted}.{k}: unknown key (known: {', '.join(sorted(_FAULT))})")
                elif not isinstance(v, str):
                    errors.append(f'{dotted}.{k}: expected a "<table>:<primary key value>" string, got {v!r}')
                else:
                    try:
                        fault[k] = IncidentRow.parse(v)
                    except ValueError as e:
                        errors.append(f"{dotted}.{k}: {e}")
            kw[key] = ProxyFault(**fault)
        elif key in _CHOICES:
            choices = _CHOICES[key]
            if value in choices:
                kw[key] = value
            else:
                errors.append(f"{dotted}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
        elif key == "timeouts" or key == "headers":
            if not isinstance(value, dict):
                errors.append(f"{dotted}: expected a table")
                continue
            allowed = _TIMEOUTS if key == "timeouts" else _HEADERS
            sub: dict[str, Any] = {}
            for k in value:
                if k not in allowed:
                    errors.append(f"{dotted}.{k}: unknown key (known: {', '.join(sorted(allowed))})")
                elif key == "timeouts":
                    v = num(value, k, f"{dotted}.{k}", integer=False, minimum=0.001)
                    if v is not None:
                        sub[k] = v
                elif not isinstance(value[k], str) or not value[k]:
                    errors.append(f"{dotted}.{k}: expected a non-empty string")
                else:
                    sub[k] = value[k].lower() if k != "via" else value[k]
            kw[key] = ProxyTimeouts(**sub) if key == "timeouts" else ProxyHeaders(**sub)
        elif key not in _TOP:
            errors.append(f"{dotted}: unknown key (known: {', '.join(sorted(_TOP | _SECTIONS))})")
        elif key == "listen":
            try:
                kw[key] = parse_addr(str(value))
            except ValueError as e:
                errors.append(f"{dotted}: {e}")
        elif key == "external_addr":
            try:
                if not isinstance(value, str):
                    raise ValueError(f'expected a "host:port" string, got {value!r}')
                addr = parse_addr(value)
                if addr.port == 0 or addr.host in ("0.0.0.0", "::"):
                    raise ValueError(f"{value!r} is not an address another proxy can connect to")
                kw[key] = addr
            except ValueError as e:
                errors.append(f"{dotted}: {e}")
        elif key == "metrics_listen":
            try:
                if not isinstance(value, str):
                    raise ValueError(f'expected a "host:port" string, got {value!r}')
                kw[key] = parse_addr(value)
            except ValueError as e:
                errors.append(f"{dotted}: {e}")
        elif key in ("watchdog", "fault_injection"):
            if isinstance(value, bool):
                kw[key] = value
            else:
                errors.append(f"{dotted}: expected true or false, got {value!r}")
        elif key in ("probe_interval", "probe_deadline"):
            v = num(sec, key, dotted, integer=False, minimum=0.01)
            if v is not None:
                kw[key] = v
        elif key in (
            "workers",
            "queue_size",
            "pool_idle",
            "max_header_bytes",
            "max_request_line_bytes",
            "load_cells",
        ):
            v = num(sec, key, dotted, integer=True, minimum=1 if key != "pool_idle" else 0)
            if v is not None:
                kw[key] = v
        elif not isinstance(value, str) or not value:
            errors.append(f"{dotted}: expected a non-empty string")
        elif key == "agent" and not value.startswith(("http://", "https://")):
            errors.append(f"{dotted}: expected an http:// URL, got {value!r}")
        else:
            kw[key] = value.rstrip("/") if key == "agent" else value
    m = kw.get("metrics_listen")
    if m is not None and m.port != 0 and m == kw.get("listen", ProxyConfig().listen):
        errors.append("proxy.metrics_listen: must differ from proxy.listen")
    errors.extend(_fault_rules(sec, kw))
    if errors:
        raise ProxyConfigError("\n".join(f"{where}: {e}" for e in errors))
    return ProxyConfig(**kw)


def _fault_rules(sec: dict[str, Any], kw: dict[str, Any]) -> list[str]:
    """Fault injection is off by default and refused in production: the settings that reproduce the
    incident need ``fault_injection = true``, which ``environment = "production"`` refuses."""
    errors: list[str] = []
    faulty = []
    if kw.get("table_lock") == "plain":
        faulty.append('proxy.table_lock = "plain"')
    if "fault" in sec:
        faulty.append("[proxy.fault]")
    if kw.get("environment") == "production":
        if kw.get("fault_injection"):
            faulty.insert(0, "proxy.fault_injection = true")
        for what in faulty:
            errors.append(f'{what}: refused with proxy.environment = "production" (fault injection only)')
    elif faulty and not kw.get("fault_injection"):
        for what in faulty:
            errors.append(
                f"{what}: fault injection only; set proxy.fault_injection = true (never in production)"
            )
    return errors


__all__ = [
    "Environment",
    "ProxyConfig",
    "ProxyConfigError",
    "ProxyFault",
    "ProxyHeaders",
    "ProxyTimeouts",
    "TableLockKind",
    "WorkerStart",
    "load_proxy_config",
]
