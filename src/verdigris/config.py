"""The agent's configuration file.

A Verdigris agent is configured by one TOML file, read with :mod:`tomllib` and validated into frozen
dataclasses. Section and key names follow `Corrosion <https://superfly.github.io/corrosion/>`_ where
Corrosion has an equivalent, so an existing ``corrosion.toml`` mostly carries over::

    [db]
    path = "/var/lib/verdigris/state.db"
    schema_paths = ["/etc/verdigris/schemas"]

    [api]
    addr = "127.0.0.1:8080"

    [api.authz]
    bearer-token = "s3cret"

    [gossip]
    addr = "0.0.0.0:8787"
    bootstrap = ["10.0.0.2:8787"]

    [gossip.global]            # optional: region mode (docs/regions.md)
    addr = "0.0.0.0:8788"
    bootstrap = ["10.9.0.2:8788"]
    cluster-id = 1

Validation is strict: an unknown section or key anywhere is an error (a typo must never be silently
ignored), as is a value of the wrong type or an address that cannot be bound. All problems found in a
file are reported together in one :class:`ConfigError`, one per line, each naming the dotted key and
the file.

Relative paths (``db.path``, ``db.schema_paths``, ``admin.path``) are resolved against the directory
that holds the config file, not the current directory, so a config file can sit next to its data.

The full reference, with every key and its default, is ``docs/config.md``.

Public API:

* :func:`load_config` reads and validates a file; :func:`parse_config` validates TOML text.
* :class:`Config` and its section classes :class:`DbConfig`, :class:`ApiConfig`,
  :class:`AuthzConfig`, :class:`GossipConfig`, :class:`GlobalGossipConfig`, :class:`AdminConfig`, :class:`TelemetryConfig`,
  :class:`PrometheusConfig`, :class:`LogConfig`, :class:`PerfConfig`, :class:`WatchdogConfig`.
* :class:`Addr` (a ``(host, port)`` named tuple) and :func:`parse_addr`.
* :class:`ConfigError`.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import ipaddress
import json
import logging
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal, NamedTuple, TypeAlias, cast

from verdigris.gossip.keyring import KeyringError, decode_key

__all__ = [
    "DEFAULT_ADMIN_SOCKET_NAME",
    "DEFAULT_API_ADDR",
    "DEFAULT_GOSSIP_ADDR",
    "DEFAULT_KEYRING_NAME",
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_WRITE_BATCH",
    "DEFAULT_SUBSCRIPTION_BATCH_MS",
    "GOSSIP_PROFILES",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "Addr",
    "AdminConfig",
    "ApiConfig",
    "AuthzConfig",
    "Config",
    "ConfigError",
    "DbConfig",
    "GlobalGossipConfig",
    "GossipConfig",
    "GossipProfile",
    "LogConfig",
    "LogFormat",
    "LogLevel",
    "PerfConfig",
    "PresenceConfig",
    "PrometheusConfig",
    "TelemetryConfig",
    "WatchdogConfig",
    "load_config",
    "parse_addr",
    "parse_config",
]

LogLevel: TypeAlias = Literal["debug", "info", "warning", "error"]
"""Accepted values of ``log.level``."""

LogFormat: TypeAlias = Literal["plaintext", "json"]
"""Accepted values of ``log.format``."""

GossipProfile: TypeAlias = Literal["lan", "wan"]
"""Accepted values of ``gossip.profile``."""

LOG_LEVELS: Final[tuple[LogLevel, ...]] = ("debug", "info", "warning", "error")
LOG_FORMATS: Final[tuple[LogFormat, ...]] = ("plaintext", "json")
GOSSIP_PROFILES: Final[tuple[GossipProfile, ...]] = ("lan", "wan")

DEFAULT_API_ADDR: Final = "127.0.0.1:8080"
DEFAULT_GOSSIP_ADDR: Final = "127.0.0.1:8787"
DEFAULT_MAX_BODY_BYTES: Final = 16 * 1024 * 1024
"""16 MiB: the largest request body the HTTP API accepts by default."""
DEFAULT_SUBSCRIPTION_BATCH_MS: Final = 5
DEFAULT_MAX_WRITE_BATCH: Final = 1000
DEFAULT_PRESENCE_DEBOUNCE_MS: Final = 200
DEFAULT_PRESENCE_INTERVAL_MS: Final = 5000
DEFAULT_PRESENCE_TAKEOVER_DELAY_MS: Final = 10000
DEFAULT_PRESENCE_GONE_REGION_AFTER_MS: Final = 60000
DEFAULT_KEYRING_NAME: Final = "keyring.json"
"""The keyring file's name when ``gossip.keyring-path`` is not set; it lives next to the database."""
MAX_REGION_LEN: Final = 64
DEFAULT_ADMIN_SOCKET_NAME: Final = "admin.sock"
"""The admin socket's file name when ``admin.path`` is not set; it lives next to the database."""

_MAX_PORT: Final = 65535
_MAX_CLUSTER_ID: Final = 65535
"""Corrosion's cluster id is a ``u16``; keep the same range so ids are interchangeable."""


# --------------------------------------------------------------------------------------------------
# Errors


class ConfigError(Exception):
    """The configuration file is missing, unreadable, not valid TOML, or does not validate.

    ``str(error)`` is a complete, user-facing message: every problem on its own line, each naming the
    offending key (as a dotted path such as ``api.authz.bearer-token``) and the file.

    Attributes:
        source: the file (or other source name) the configuration came from, if known.
        problems: the individual problems, one message each (a single element for I/O and TOML
            syntax errors).
        line: the 1-based line of a TOML syntax error, when known; ``None`` otherwise.
    """

    def __init__(
        self,
        message: str,
        *,
        source: str | None = None,
        problems: Sequence[str] = (),
        line: int | None = None,
    ) -> None:
        super().__init__(message)
        self.source = source
        self.problems: tuple[str, ...] = tuple(problems) or (message,)
        self.line = line


# --------------------------------------------------------------------------------------------------
# Addresses


class Addr(NamedTuple):
    """A ``host:port`` address to bind or connect to.

    It is a plain ``(host, port)`` tuple, so ``host, port = addr`` works, and ``str(addr)`` gives it back
    in ``host:port`` form (``[::1]:8080`` for IPv6). ``host`` never has brackets. Port 0 means "pick a
    free port" when binding.
    """

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


_HOST_LABEL: Final = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")
_NUMERIC_HOST: Final = re.compile(r"[0-9.]+")


def parse_addr(value: str) -> Addr:
    """Parse ``"host:port"`` into an :class:`Addr`.

    ``host`` may be an IPv4 address (``127.0.0.1``, ``0.0.0.0``), a bracketed IPv6 address
    (``[::1]``, ``[::]``) or a DNS name (``localhost``, ``node-1.internal``). ``port`` is a decimal
    number from 0 to 65535. No whitespace is allowed anywhere.

    >>> parse_addr("127.0.0.1:8080")
    Addr(host='127.0.0.1', port=8080)
    >>> str(parse_addr("[::1]:0"))
    '[::1]:0'

    Raises:
        ValueError: with a message saying what is wrong (it does not repeat the input).
    """
    if not value:
        raise ValueError('expected "host:port", got an empty string')
    if any(c.isspace() for c in value):
        raise ValueError("must not contain whitespace")
    if value.startswith("["):
        close = value.find("]")
        if close < 0:
            raise ValueError('missing "]" after the IPv6 address')
        host, rest = value[1:close], value[close + 1 :]
        if not rest.startswith(":"):
            raise ValueError('expected ":port" after "]"')
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not a valid IPv6 address") from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise ValueError('expected "host:port" (missing ":port")')
        if ":" in host:
            raise ValueError('IPv6 addresses must be in brackets, e.g. "[::1]:8080"')
        if not host:
            raise ValueError('expected "host:port" (missing host)')
        _check_host(host)
    if not port_text:
        raise ValueError("missing port number")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"port {port_text!r} is not a number")
    port = int(port_text)
    if port > _MAX_PORT:
        raise ValueError(f"port {port} is out of range (0-{_MAX_PORT})")
    return Addr(host, port)


def _check_host(host: str) -> None:
    """Accept an IPv4 address or a DNS name; raise ``ValueError`` otherwise."""
    if _NUMERIC_HOST.fullmatch(host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not a valid IPv4 address") from None
        return
    name = host.removesuffix(".")
    if len(name) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"{host!r} is not a valid host name or IP address")


# --------------------------------------------------------------------------------------------------
# The configuration


@dataclass(frozen=True)
class DbConfig:
    """``[db]``: the local SQLite database and the schema it must have.

    Attributes:
        path: the database file (``db.path``, required), absolute.
        schema_paths: schema files and/or directories of ``*.sql`` files (``db.schema_paths``),
            absolute, in the order given. Existence is not checked here; the store checks at start-up.
    """

    path: Path
    schema_paths: tuple[Path, ...] = ()


@dataclass(frozen=True)
class AuthzConfig:
    """``[api.authz]``: authorization for the HTTP API.

    Attributes:
        bearer_token: when set (``api.authz.bearer-token``), every API request must carry
            ``Authorization: Bearer <token>``. ``None`` disables authentication.
    """

    bearer_token: str | None = None


@dataclass(frozen=True)
class ApiConfig:
    """``[api]``: the client-facing HTTP API.

    Attributes:
        addr: where the API listens (``api.addr``).
        authz: ``[api.authz]``.
        max_body_bytes: the largest request body accepted (``api.max-body-bytes``); larger requests
            get 413.
    """

    addr: Addr = field(default_factory=lambda: parse_addr(DEFAULT_API_ADDR))
    authz: AuthzConfig = field(default_factory=AuthzConfig)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


@dataclass(frozen=True)
class GlobalGossipConfig:
    """``[gossip.global]``: the global cluster of an agent in region mode (docs/regions.md).

    Only what differs between the two clusters is here; encryption (``plaintext``, ``key``, the
    keyring), ``region`` and ``fault-injection`` are shared with ``[gossip]``.

    Attributes:
        addr: where this agent listens for the global cluster's peers (``gossip.global.addr``, required).
        external_addr: the address global peers should use (``gossip.global.external-addr``).
        bootstrap: global peers to contact on start-up (``gossip.global.bootstrap``).
        cluster_id: the global cluster's id (``gossip.global.cluster-id``); must differ from
            ``gossip.cluster-id``.
        profile: protocol timing (``gossip.global.profile``), ``"wan"`` by default.
    """

    addr: Addr
    external_addr: Addr | None = None
    bootstrap: tuple[Addr, ...] = ()
    cluster_id: int = 0
    profile: GossipProfile = "wan"


@dataclass(frozen=True)
class GossipConfig:
    """``[gossip]``: cluster membership and replication (:mod:`verdigris.runtime`).

    Attributes:
        enabled: the file has a ``[gossip]`` section. Only then does the agent join a cluster: an agent
            configured without one stays a single node and binds no gossip port, so existing single-node
            setups (and tests running many agents side by side) never collide on the default port.
        addr: where this agent listens for peers (``gossip.addr``), UDP and TCP on the same port.
        external_addr: the address peers should use to reach this agent (``gossip.external-addr``);
            ``None`` means ``addr``, which must then name a concrete host (not ``0.0.0.0``/``[::]``).
        bootstrap: peers to contact on start-up (``gossip.bootstrap``).
        plaintext: talk to peers without encryption (``gossip.plaintext``).
        cluster_id: agents only talk to peers with the same id (``gossip.cluster-id``), 0-65535.
        key: the initial AES key, base64 (``gossip.key``); used to create the keyring file when there is
            none yet. Hidden from ``repr`` so it never lands in a log or a traceback.
        keyring_path: the keyring file (``gossip.keyring-path``), absolute; ``None`` (only from
            :meth:`Config.for_db`) means ``keyring.json`` beside the database.
        region: this agent's region, carried in its membership metadata (``gossip.region``).
        profile: protocol timing (``gossip.profile``): ``"lan"`` (memberlist's LAN defaults) or
            ``"wan"`` (foca's WAN defaults, as Corrosion uses).
        fault_injection: accept the admin socket's ``fault`` commands (``gossip.fault-injection``), for
            partition tests. Off by default: a production agent must never be told to go deaf.
        global_: ``[gossip.global]``, or ``None``. When set the agent runs in *region mode*: this
            section is its region's cluster (``regional`` tables only) and ``global_`` a second cluster
            of every node (``global`` tables only); ``region`` is then required. Without it one cluster
            carries every scope.
    """

    addr: Addr = field(default_factory=lambda: parse_addr(DEFAULT_GOSSIP_ADDR))
    bootstrap: tuple[Addr, ...] = ()
    plaintext: bool = False
    cluster_id: int = 0
    enabled: bool = False
    external_addr: Addr | None = None
    key: str | None = field(default=None, repr=False)
    keyring_path: Path | None = None
    region: str = ""
    profile: GossipProfile = "lan"
    fault_injection: bool = False
    global_: GlobalGossipConfig | None = None

    @property
    def region_mode(self) -> bool:
        """A ``[gossip.global]`` table is configured: one cluster per scope."""
        return self.global_ is not None

    def for_global(self) -> GossipConfig:
        """The settings of the global cluster: ``[gossip.global]``'s addresses, id and profile, with the
        shared keys, region and fault injection of ``[gossip]``. Only in region mode."""
        g = self.global_
        if g is None:
            raise ValueError("no [gossip.global]: this agent runs a single cluster")
        return dataclasses.replace(
            self,
            addr=g.addr,
            external_addr=g.external_addr,
            bootstrap=g.bootstrap,
            cluster_id=g.cluster_id,
            profile=g.profile,
            global_=None,
        )


@dataclass(frozen=True)
class AdminConfig:
    """``[admin]``: the local admin interface.

    Attributes:
        path: the admin unix socket (``admin.path``), absolute. Defaults to ``admin.sock`` in the
            database's directory. Keep it short: unix socket paths are limited to about 100 bytes.
    """

    path: Path


@dataclass(frozen=True)
class PrometheusConfig:
    """``[telemetry.prometheus]``.

    Attributes:
        addr: where to serve Prometheus metrics (``telemetry.prometheus.addr``); ``None`` (the
            default) serves no metrics endpoint.
    """

    addr: Addr | None = None


@dataclass(frozen=True)
class TelemetryConfig:
    """``[telemetry]``: metrics.

    Attributes:
        prometheus: ``[telemetry.prometheus]``.
    """

    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)


@dataclass(frozen=True)
class LogConfig:
    """``[log]``: logging.

    Attributes:
        level: the minimum level logged (``log.level``), lower-case.
        format: ``"plaintext"`` for humans or ``"json"`` for one JSON object per line (``log.format``).
        colors: colour plaintext output (``log.colors``); callers should still disable colours when
            the output is not a terminal.
    """

    level: LogLevel = "info"
    format: LogFormat = "plaintext"
    colors: bool = True

    @property
    def level_number(self) -> int:
        """``level`` as a :mod:`logging` level number, e.g. ``logging.INFO``."""
        return cast(int, getattr(logging, self.level.upper()))


@dataclass(frozen=True)
class PerfConfig:
    """``[perf]``: tuning knobs.

    Attributes:
        subscription_batch_ms: how long a subscription collects changes before sending them
            (``perf.subscription-batch-ms``); 0 sends each change at once.
        max_write_batch: the most queued writes committed in one SQLite transaction
            (``perf.max-write-batch``).
    """

    subscription_batch_ms: int = DEFAULT_SUBSCRIPTION_BATCH_MS
    max_write_batch: int = DEFAULT_MAX_WRITE_BATCH


@dataclass(frozen=True)
class PresenceConfig:
    """``[presence]``: the presence publisher of region mode (docs/regions.md, "Coarse global state");
    ignored without ``[gossip.global]``.

    Attributes:
        enabled: run the publisher (``presence.enabled``).
        debounce_ms: how long after a commit touching ``machines`` the publisher waits before it
            evaluates (``presence.debounce-ms``).
        interval_ms: the period of the repair evaluation (``presence.interval-ms``).
        takeover_delay_ms: how long a mismatch must last before a node that is not its region's
            designated writer repairs it (``presence.takeover-delay-ms``).
        gone_region_after_ms: how long a region with global rows must have no alive (nor suspect)
            member in the global cluster before its rows are deleted (``presence.gone-region-after-ms``).
    """

    enabled: bool = True
    debounce_ms: int = DEFAULT_PRESENCE_DEBOUNCE_MS
    interval_ms: int = DEFAULT_PRESENCE_INTERVAL_MS
    takeover_delay_ms: int = DEFAULT_PRESENCE_TAKEOVER_DELAY_MS
    gone_region_after_ms: int = DEFAULT_PRESENCE_GONE_REGION_AFTER_MS


@dataclass(frozen=True)
class WatchdogConfig:
    """``[watchdog]``: the agent's in-process watchdog (:mod:`verdigris.watchdog.agent`,
    docs/watchdog.md "Agent watchdog").

    Attributes:
        enabled: run the watchdog (``watchdog.enabled``).
        probe_interval: seconds between probes of the event loop and of the apply path
            (``watchdog.probe-interval``).
        loop_deadline: seconds within which a probe must run on the event loop (``watchdog.loop-deadline``).
        apply_deadline: seconds within which a probe must run on the writer thread
            (``watchdog.apply-deadline``); long, because a legitimate large merge batch holds it for seconds.
        restart: re-exec the agent on a missed deadline; ``False`` only reports (``watchdog.restart``).
        stack_dir: where stack files are kept (``watchdog.stack-dir``), absolute; ``None`` means a
            directory in the system's temporary directory.
        fault_injection: accept the admin socket's ``fault stall-loop`` / ``fault stall-apply``
            (``watchdog.fault-injection``), for tests only.
    """

    enabled: bool = True
    probe_interval: float = 0.25
    loop_deadline: float = 1.0
    apply_deadline: float = 10.0
    restart: bool = True
    stack_dir: Path | None = None
    fault_injection: bool = False


@dataclass(frozen=True)
class Config:
    """A whole, validated agent configuration. Build it with :func:`load_config` or
    :func:`parse_config`; in tests, :meth:`Config.for_db` is a quick way to get the defaults.

    Attributes:
        db, admin, api, gossip, telemetry, log, perf, presence, watchdog: the sections, named as in the file.
        source: where the configuration came from (the file path as given), for messages.
    """

    db: DbConfig
    admin: AdminConfig
    api: ApiConfig = field(default_factory=ApiConfig)
    gossip: GossipConfig = field(default_factory=GossipConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    log: LogConfig = field(default_factory=LogConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)
    source: str = "<memory>"
    presence: PresenceConfig = field(default_factory=PresenceConfig)
    watchdog: WatchdogConfig = field(default_factory=WatchdogConfig)

    @classmethod
    def for_db(
        cls,
        path: str | os.PathLike[str],
        *,
        schema_paths: Sequence[str | os.PathLike[str]] = (),
    ) -> Config:
        """A configuration with every default, for the database at ``path``.

        Relative paths are resolved against the current directory.
        """
        db_path = Path(os.path.abspath(path))
        return cls(
            db=DbConfig(
                path=db_path,
                schema_paths=tuple(Path(os.path.abspath(p)) for p in schema_paths),
            ),
            admin=AdminConfig(path=db_path.parent / DEFAULT_ADMIN_SOCKET_NAME),
        )


# --------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate the config file at ``path``.

    Relative paths inside the file are resolved against the file's directory.

    Raises:
        ConfigError: the file is missing or unreadable, is not UTF-8, is not valid TOML (the message
            names the line), or does not validate (the message lists every problem).
    """
    source = os.fspath(path)
    file = Path(source)
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {source}", source=source) from None
    except IsADirectoryError:
        raise ConfigError(f"config file {source} is a directory", source=source) from None
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(f"cannot read config file {source}: {reason}", source=source) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"config file {source} is not valid UTF-8 (at line {line})", source=source, line=line
        ) from None
    return parse_config(text, source, file.parent)


_TOML_POSITION: Final = re.compile(r"^(?P<msg>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)$", re.S)
_TOML_AT_END: Final = re.compile(r"^(?P<msg>.*) \(at end of document\)$", re.S)


def parse_config(text: str, source: str, base_dir: Path) -> Config:
    """Validate TOML ``text`` as a configuration.

    Args:
        text: the TOML document.
        source: a name for the document, used in messages (normally the file path).
        base_dir: the directory relative paths are resolved against (normally the file's directory);
            if it is itself relative, it is taken relative to the current directory.

    Raises:
        ConfigError: the text is not valid TOML, or does not validate.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _toml_error(e, text, source) from None
    return _build(document, source, Path(os.path.abspath(base_dir)))


def _toml_error(error: tomllib.TOMLDecodeError, text: str, source: str) -> ConfigError:
    """Turn tomllib's error into a ConfigError naming the file and the line."""
    message = str(error)
    if m := _TOML_POSITION.match(message):
        line = int(m["line"])
        where = f"at line {line}, column {m['col']}"
        message = m["msg"]
    elif m := _TOML_AT_END.match(message):
        line = max(1, len(text.splitlines()))
        where = f"at end of document (line {line})"
        message = m["msg"]
    else:  # pragma: no cover - tomllib always reports a position today
        return ConfigError(f"invalid TOML in {source}: {message}", source=source)
    return ConfigError(f"invalid TOML in {source} {where}: {message}", source=source, line=line)


def _build(document: Mapping[str, object], source: str, base_dir: Path) -> Config:
    """Validate a parsed TOML document into a Config, collecting every problem before raising."""
    report = _Report(source)
    root = _Table(report, "", document)

    db = root.table("db")
    db_path = db.path("path", base_dir, required=True)
    schema_paths = db.path_list("schema_paths", base_dir)
    db.finish()

    api = root.table("api")
    api_addr = api.addr("addr", DEFAULT_API_ADDR)
    authz = api.table("authz")
    bearer_token = authz.optional_str("bearer-token", nonempty=True)
    authz.finish()
    max_body_bytes = api.integer("max-body-bytes", DEFAULT_MAX_BODY_BYTES, minimum=1)
    api.finish()

    gossip_enabled = "gossip" in document
    gossip = root.table("gossip")
    gossip_addr = gossip.addr("addr", DEFAULT_GOSSIP_ADDR)
    external_addr = gossip.optional_addr("external-addr")
    bootstrap = gossip.addr_list("bootstrap")
    plaintext = gossip.boolean("plaintext", False)
    cluster_id = gossip.integer("cluster-id", 0, minimum=0, maximum=_MAX_CLUSTER_ID)
    gossip_key = gossip.optional_str("key", nonempty=True)
    keyring_path = gossip.path("keyring-path", base_dir)
    region = gossip.optional_str("region") or ""
    profile = gossip.choice("profile", GOSSIP_PROFILES, "lan")
    fault_injection = gossip.boolean("fault-injection", False)
    raw_gossip = document.get("gossip")
    global_present = isinstance(raw_gossip, dict) and isinstance(raw_gossip.get("global"), dict)
    global_table = gossip.table("global")
    global_cfg: GlobalGossipConfig | None = None
    if global_present:
        g_addr = global_table.optional_addr("addr")
        if g_addr is None and "addr" not in global_table:
            report.missing("gossip.global.addr")
        g_external = global_table.optional_addr("external-addr")
        g_bootstrap = global_table.addr_list("bootstrap")
        g_cluster_id = global_table.integer("cluster-id", 0, minimum=0, maximum=_MAX_CLUSTER_ID)
        g_profile = global_table.choice("profile", GOSSIP_PROFILES, "wan")
        if g_addr is not None:
            global_cfg = GlobalGossipConfig(
                addr=g_addr,
                external_addr=g_external,
                bootstrap=g_bootstrap,
                cluster_id=g_cluster_id,
                profile=cast(GossipProfile, g_profile),
            )
        if g_external is not None and g_external.port == 0:
            report.invalid("gossip.global.external-addr", "the port must be given (not 0)")
    global_table.finish()
    gossip.finish()
    if gossip_key is not None:
        try:
            decode_key(gossip_key)
        except KeyringError as e:
            report.invalid("gossip.key", str(e))
            gossip_key = None
        if plaintext:
            report.invalid("gossip.key", "a key and plaintext = true exclude each other; choose one")
    if len(region) > MAX_REGION_LEN or any(c.isspace() for c in region):
        report.invalid("gossip.region", f"at most {MAX_REGION_LEN} characters and no whitespace")
        region = ""
    if external_addr is not None and external_addr.port == 0:
        report.invalid("gossip.external-addr", "the port must be given (not 0)")
    if global_present:
        if not region and not any(p.startswith('invalid value for "gossip.region"') for p in report.other):
            report.invalid(
                "gossip.region",
                "must be set in region mode ([gossip.global] is configured): [gossip] is the cluster of "
                "this region, so the agent needs to know which region it is in",
            )
        if global_cfg is not None:
            if global_cfg.cluster_id == cluster_id:
                report.invalid(
                    "gossip.global.cluster-id",
                    f"{cluster_id} is also gossip.cluster-id: the global cluster and the region's cluster "
                    "must have different ids, or their members would mix",
                )
            if global_cfg.addr == gossip_addr and gossip_addr.port != 0:
                report.invalid("gossip.global.addr", f"{gossip_addr} is already used by gossip.addr")

    admin = root.table("admin")
    admin_path = admin.path("path", base_dir)
    admin.finish()

    telemetry = root.table("telemetry")
    prometheus = telemetry.table("prometheus")
    prometheus_addr = prometheus.optional_addr("addr")
    prometheus.finish()
    telemetry.finish()

    log = root.table("log")
    level = log.choice("level", LOG_LEVELS, "info", fold_case=True)
    log_format = log.choice("format", LOG_FORMATS, "plaintext")
    colors = log.boolean("colors", True)
    log.finish()

    perf = root.table("perf")
    subscription_batch_ms = perf.integer("subscription-batch-ms", DEFAULT_SUBSCRIPTION_BATCH_MS, minimum=0)
    max_write_batch = perf.integer("max-write-batch", DEFAULT_MAX_WRITE_BATCH, minimum=1)
    perf.finish()

    presence = root.table("presence")
    presence_enabled = presence.boolean("enabled", True)
    presence_debounce = presence.integer(
        "debounce-ms", DEFAULT_PRESENCE_DEBOUNCE_MS, minimum=0, maximum=60_000
    )
    presence_interval = presence.integer(
        "interval-ms", DEFAULT_PRESENCE_INTERVAL_MS, minimum=100, maximum=3_600_000
    )
    presence_takeover = presence.integer(
        "takeover-delay-ms", DEFAULT_PRESENCE_TAKEOVER_DELAY_MS, minimum=0, maximum=3_600_000
    )
    presence_gone_region = presence.integer(
        "gone-region-after-ms", DEFAULT_PRESENCE_GONE_REGION_AFTER_MS, minimum=1000, maximum=86_400_000
    )
    presence.finish()

    watchdog = root.table("watchdog")
    watchdog_enabled = watchdog.boolean("enabled", True)
    probe_interval = watchdog.seconds("probe-interval", 0.25, maximum=60.0)
    loop_deadline = watchdog.seconds("loop-deadline", 1.0, maximum=3600.0)
    apply_deadline = watchdog.seconds("apply-deadline", 10.0, maximum=3600.0)
    watchdog_restart = watchdog.boolean("restart", True)
    stack_dir = watchdog.path("stack-dir", base_dir)
    watchdog_faults = watchdog.boolean("fault-injection", False)
    watchdog.finish()
    if probe_interval > min(loop_deadline, apply_deadline):
        report.invalid(
            "watchdog.probe-interval",
            f"{probe_interval:g} s is longer than a deadline (loop-deadline {loop_deadline:g} s, "
            f"apply-deadline {apply_deadline:g} s): a stall could go unnoticed between two probes",
        )

    root.finish()

    if prometheus_addr is not None and prometheus_addr == api_addr and api_addr.port != 0:
        report.invalid("telemetry.prometheus.addr", f"{prometheus_addr} is already used by api.addr")

    report.raise_if_any()
    assert db_path is not None  # a missing required key was reported above
    return Config(
        db=DbConfig(path=db_path, schema_paths=schema_paths),
        admin=AdminConfig(path=admin_path or db_path.parent / DEFAULT_ADMIN_SOCKET_NAME),
        api=ApiConfig(addr=api_addr, authz=AuthzConfig(bearer_token), max_body_bytes=max_body_bytes),
        gossip=GossipConfig(
            addr=gossip_addr,
            bootstrap=bootstrap,
            plaintext=plaintext,
            cluster_id=cluster_id,
            enabled=gossip_enabled,
            external_addr=external_addr,
            key=gossip_key,
            keyring_path=keyring_path or db_path.parent / DEFAULT_KEYRING_NAME,
            region=region,
            profile=cast(GossipProfile, profile),
            fault_injection=fault_injection,
            global_=global_cfg,
        ),
        telemetry=TelemetryConfig(prometheus=PrometheusConfig(addr=prometheus_addr)),
        log=LogConfig(level=cast(LogLevel, level), format=cast(LogFormat, log_format), colors=colors),
        perf=PerfConfig(subscription_batch_ms=subscription_batch_ms, max_write_batch=max_write_batch),
        source=source,
        presence=PresenceConfig(
            enabled=presence_enabled,
            debounce_ms=presence_debounce,
            interval_ms=presence_interval,
            takeover_delay_ms=presence_takeover,
            gone_region_after_ms=presence_gone_region,
        ),
        watchdog=WatchdogConfig(
            enabled=watchdog_enabled,
            probe_interval=probe_interval,
            loop_deadline=loop_deadline,
            apply_deadline=apply_deadline,
            restart=watchdog_restart,
            stack_dir=stack_dir,
            fault_injection=watchdog_faults,
        ),
    )


# --------------------------------------------------------------------------------------------------
# Validation helpers


class _Report:
    """Problems found while validating one document. Unknown keys come first, sorted by key; the
    other problems follow in the order the keys are checked."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._unknown: list[tuple[str, str]] = []
        self._other: list[str] = []

    @property
    def other(self) -> list[str]:
        """The problems other than unknown keys found so far."""
        return self._other

    def unknown(self, key: str, hint: str | None) -> None:
        suffix = f' (did you mean "{hint}"?)' if hint else ""
        self._unknown.append((key, f'unknown key "{key}" in {self.source}{suffix}'))

    def missing(self, key: str) -> None:
        self._other.append(f'missing required key "{key}" in {self.source}')

    def wrong_type(self, key: str, expected: str, value: object) -> None:
        self._other.append(
            f'wrong type for "{key}" in {self.source}: expected {expected}, got {_describe(value)}'
        )

    def invalid(self, key: str, reason: str) -> None:
        self._other.append(f'invalid value for "{key}" in {self.source}: {reason}')

    def raise_if_any(self) -> None:
        problems = [message for _, message in sorted(self._unknown)] + self._other
        if problems:
            raise ConfigError("\n".join(problems), source=self.source, problems=problems)


class _Missing:
    """The type of :data:`_MISSING`."""


_MISSING: Final = _Missing()
"""Returned by :meth:`_Table.take` for a key that is absent."""


class _Table:
    """One TOML table being validated: typed accessors that record problems instead of raising,
    and remember which keys are known so :meth:`finish` can report the rest as unknown."""

    def __init__(
        self, report: _Report, prefix: str, data: Mapping[str, object], *, broken: bool = False
    ) -> None:
        self._report = report
        self._prefix = prefix
        self._data = data
        self._known: list[str] = []
        self._broken = broken
        """The table's value was not a table (already reported): don't also report its keys missing."""

    def __contains__(self, key: str) -> bool:
        return key in self._data

    def key(self, key: str) -> str:
        """The dotted path of ``key`` in this table."""
        return f"{self._prefix}.{key}" if self._prefix else key

    def take(self, key: str) -> object:
        """The raw value of ``key``, or ``_MISSING``; marks ``key`` as known."""
        self._known.append(key)
        return self._data.get(key, _MISSING)

    def finish(self) -> None:
        """Report every key of this table that no accessor asked for."""
        for key in self._data:
            if key not in self._known:
                close = difflib.get_close_matches(key, self._known, n=1)
                self._report.unknown(self.key(key), self.key(close[0]) if close else None)

    def table(self, key: str) -> _Table:
        """The sub-table ``key`` (empty if absent). A non-table value is reported."""
        value = self.take(key)
        if isinstance(value, _Missing):
            return _Table(self._report, self.key(key), {})
        if not isinstance(value, dict):
            self._report.wrong_type(self.key(key), "a table", value)
            return _Table(self._report, self.key(key), {}, broken=True)
        return _Table(self._report, self.key(key), cast(dict[str, object], value))

    def optional_str(self, key: str, *, nonempty: bool = False) -> str | None:
        value = self.take(key)
        if isinstance(value, _Missing):
            return None
        if not isinstance(value, str):
            self._report.wrong_type(self.key(key), "a string", value)
            return None
        if nonempty and not value:
            self._report.invalid(self.key(key), "must not be empty (leave the key out instead)")
            return None
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.take(key)
        if isinstance(value, _Missing):
            return default
        if not isinstance(value, bool):
            self._report.wrong_type(self.key(key), "true or false", value)
            return default
        return value

    def integer(self, key: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        value = self.take(key)
        if isinstance(value, _Missing):
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            self._report.wrong_type(self.key(key), "an integer", value)
            return default
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            self._report.invalid(self.key(key), f"{value} is out of range (must be {bounds})")
            return default
        return value

    def seconds(self, key: str, default: float, *, maximum: float) -> float:
        """A duration in seconds: an integer or a float, more than 0 and at most ``maximum``."""
        value = self.take(key)
        if isinstance(value, _Missing):
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            self._report.wrong_type(self.key(key), "a number of seconds", value)
            return default
        if not 0 < value <= maximum:  # also refuses nan
            self._report.invalid(
                self.key(key), f"{value:g} s is out of range (more than 0, at most {maximum:g})"
            )
            return default
        return float(value)

    def choice(self, key: str, choices: Sequence[str], default: str, *, fold_case: bool = False) -> str:
        value = self.take(key)
        if isinstance(value, _Missing):
            return default
        if not isinstance(value, str):
            self._report.wrong_type(self.key(key), "a string", value)
            return default
        normalized = value.lower() if fold_case else value
        if normalized not in choices:
            allowed = ", ".join(f'"{c}"' for c in choices)
            self._report.invalid(self.key(key), f"{_quote(value)} is not one of {allowed}")
            return default
        return normalized

    def _addr(self, key: str, value: object) -> Addr | None:
        if not isinstance(value, str):
            self._report.wrong_type(self.key(key), 'a string "host:port"', value)
            return None
        try:
            return parse_addr(value)
        except ValueError as e:
            self._report.invalid(self.key(key), f"{_quote(value)} is not a valid address: {e}")
            return None

    def addr(self, key: str, default: str) -> Addr:
        value = self.take(key)
        parsed = None if isinstance(value, _Missing) else self._addr(key, value)
        return parse_addr(default) if parsed is None else parsed

    def optional_addr(self, key: str) -> Addr | None:
        value = self.take(key)
        return None if isinstance(value, _Missing) else self._addr(key, value)

    def _list(self, key: str, what: str) -> list[object]:
        value = self.take(key)
        if isinstance(value, _Missing):
            return []
        if not isinstance(value, list):
            self._report.wrong_type(self.key(key), f"an array of {what}", value)
            return []
        return cast(list[object], value)

    def addr_list(self, key: str) -> tuple[Addr, ...]:
        result = []
        for i, item in enumerate(self._list(key, 'strings "host:port"')):
            addr = self._addr(f"{key}[{i}]", item)
            if addr is not None:
                result.append(addr)
        return tuple(result)

    def _path(self, key: str, value: object, base_dir: Path) -> Path | None:
        if not isinstance(value, str):
            self._report.wrong_type(self.key(key), "a string (a path)", value)
            return None
        if not value:
            self._report.invalid(self.key(key), "the path must not be empty")
            return None
        if "\0" in value:
            self._report.invalid(self.key(key), "the path must not contain a NUL character")
            return None
        return _resolve(base_dir, value)

    def path(self, key: str, base_dir: Path, *, required: bool = False) -> Path | None:
        value = self.take(key)
        if isinstance(value, _Missing):
            if required and not self._broken:
                self._report.missing(self.key(key))
            return None
        return self._path(key, value, base_dir)

    def path_list(self, key: str, base_dir: Path) -> tuple[Path, ...]:
        result = []
        for i, item in enumerate(self._list(key, "strings (paths)")):
            path = self._path(f"{key}[{i}]", item, base_dir)
            if path is not None:
                result.append(path)
        return tuple(result)


def _resolve(base_dir: Path, value: str) -> Path:
    """``value`` as an absolute, normalized path; ``~`` is expanded, relative paths join ``base_dir``."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    return Path(os.path.normpath(path))


def _quote(text: str, limit: int = 60) -> str:
    """``text`` as a double-quoted string for messages, shortened if long."""
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return json.dumps(text, ensure_ascii=False)


def _describe(value: object) -> str:
    """A TOML-flavoured description of ``value``'s type (and value, when short) for messages."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value}"
    if isinstance(value, str):
        return f"string {_quote(value)}"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime.datetime):
        return "a date-time"
    if isinstance(value, datetime.date):
        return "a date"
    if isinstance(value, datetime.time):
        return "a time"
    return type(value).__name__  # pragma: no cover - tomllib produces nothing else
