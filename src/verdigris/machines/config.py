"""The machines agent's configuration file (the ``[machines]`` section of a TOML file).

Validation is strict like the agent's and the proxy's: an unknown key anywhere is an error naming it,
a value of the wrong type or out of range too, and every problem of a file is reported at once in one
:class:`MachinesConfigError` (one per line). Relative paths (``logs_dir``, arguments of an app's
``command`` that name an existing file relative to the config file) are resolved against the directory
of the config file; ``{python}`` in a command argument expands to the running interpreter. The
reference is docs/machines.md.
"""

from __future__ import annotations

import re
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from verdigris.config import Addr, parse_addr

NAME_RE: Final = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
"""App names, regions and node ids: what is safe in an instance id, a header and a URL path."""
CONCURRENCY: Final = ("requests", "connections")
CHECK_TYPES: Final = ("http", "tcp")


class MachinesConfigError(Exception):
    """The file is missing, not TOML, or does not validate (one problem per line)."""


@dataclass(frozen=True)
class CheckSpec:
    """One health check of every instance of an app."""

    name: str
    type: str = "http"
    path: str = "/"
    interval: float = 1.0
    timeout: float = 1.0
    grace_period: float = 2.0
    """After an instance (re)starts, failures count as ``warning``, not ``critical``, for this long."""


@dataclass(frozen=True)
class AppSpec:
    """An app this machines agent may run instances of."""

    name: str
    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    regions: Mapping[str, int] = field(default_factory=dict)
    primary_region: str = ""
    hostnames: tuple[str, ...] = ()
    concurrency: str = "requests"
    soft_limit: int = 20
    hard_limit: int = 25
    min_machines_running: int = 0
    autostop_after: float = 0.0
    autostart: bool = True
    start_stopped: bool = False
    checks: tuple[CheckSpec, ...] = ()


@dataclass(frozen=True)
class MachinesConfig:
    node: str
    region: str
    agent: str
    token: str = ""
    listen: Addr = field(default_factory=lambda: Addr("127.0.0.1", 7001))
    advertise: str = "127.0.0.1:7001"
    instance_host: str = "127.0.0.1"
    port_range: tuple[int, int] = (20000, 20099)
    region_nodes: tuple[str, ...] = ()
    logs_dir: Path = Path("instances")
    stop_timeout: float = 5.0
    """SIGTERM to SIGKILL when stopping an instance."""
    apps: tuple[AppSpec, ...] = ()

    def share(self, app: AppSpec) -> list[int]:
        """The indexes j of ``app``'s instances in this region that run on this node:
        instance j runs on ``region_nodes[j % len(region_nodes)]``."""
        nodes = self.region_nodes or (self.node,)
        count = app.regions.get(self.region, 0)
        return [j for j in range(count) if nodes[j % len(nodes)] == self.node]

    def app(self, name: str) -> AppSpec | None:
        return next((a for a in self.apps if a.name == name), None)


def load_machines_config(path: str | Path) -> MachinesConfig:
    """Read and validate ``path`` (raises :class:`MachinesConfigError`)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise MachinesConfigError(f"{p}: cannot read: {e.strerror or e}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise MachinesConfigError(f"{p}: not valid TOML: {e}") from None
    return parse_machines_config(doc, str(p), p.resolve().parent)


class _Problems:
    def __init__(self, where: str) -> None:
        self.where = where
        self.lines: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.lines.append(f"{self.where}: {key}: {message}")


class _Section:
    """One TOML table being read: every key taken is checked off; :meth:`finish` reports the rest."""

    def __init__(self, doc: Mapping[str, Any], prefix: str, problems: _Problems) -> None:
        self.doc = doc
        self.prefix = prefix
        self.problems = problems
        self.taken: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def raw(self, name: str) -> Any:
        self.taken.add(name)
        return self.doc.get(name)

    def string(self, name: str, default: str | None = None, *, pattern: re.Pattern[str] | None = None) -> str:
        v = self.raw(name)
        if v is None:
            if default is None:
                self.problems.add(self.key(name), "is required")
                return ""
            return default
        if not isinstance(v, str):
            self.problems.add(self.key(name), f"must be a string, not {type(v).__name__}")
            return default or ""
        if pattern is not None and not pattern.match(v):
            self.problems.add(self.key(name), f"{v!r} must match {pattern.pattern}")
        return v

    def number(self, name: str, default: float, *, minimum: float, maximum: float | None = None) -> float:
        v = self.raw(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int | float):
            self.problems.add(self.key(name), f"must be a number, not {type(v).__name__}")
            return default
        if v < minimum or (maximum is not None and v > maximum):
            bound = f"between {minimum:g} and {maximum:g}" if maximum is not None else f">= {minimum:g}"
            self.problems.add(self.key(name), f"must be {bound}, not {v}")
            return default
        return float(v)

    def integer(self, name: str, default: int, *, minimum: int) -> int:
        v = self.raw(name)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int):
            self.problems.add(self.key(name), f"must be an integer, not {type(v).__name__}")
            return default
        if v < minimum:
            self.problems.add(self.key(name), f"must be >= {minimum}, not {v}")
            return default
        return v

    def boolean(self, name: str, default: bool) -> bool:
        v = self.raw(name)
        if v is None:
            return default
        if not isinstance(v, bool):
            self.problems.add(self.key(name), f"must be true or false, not {v!r}")
            return default
        return v

    def strings(self, name: str, *, pattern: re.Pattern[str] | None = None) -> tuple[str, ...]:
        v = self.raw(name)
        if v is None:
            return ()
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            self.problems.add(self.key(name), "must be a list of strings")
            return ()
        for x in v:
            if pattern is not None and not pattern.match(x):
                self.problems.add(self.key(name), f"{x!r} must match {pattern.pattern}")
        return tuple(v)

    def table(self, name: str) -> dict[str, Any]:
        v = self.raw(name)
        if v is None:
            return {}
        if not isinstance(v, dict):
            self.problems.add(self.key(name), "must be a table")
            return {}
        return v

    def finish(self) -> None:
        for k in sorted(set(self.doc) - self.taken):
            self.problems.add(self.key(k), "unknown key")


def _resolve_arg(arg: str, base_dir: Path) -> str:
    arg = arg.replace("{python}", sys.executable)
    if arg.startswith("-") or Path(arg).is_absolute() or "/" not in arg:
        return arg
    candidate = base_dir / arg
    return str(candidate) if candidate.exists() else arg


def _parse_app(doc: Any, index: int, base_dir: Path, problems: _Problems) -> AppSpec | None:
    prefix = f"machines.apps[{index}]"
    if not isinstance(doc, dict):
        problems.add(prefix, "must be a table")
        return None
    s = _Section(doc, prefix, problems)
    name = s.string("name", pattern=NAME_RE)
    command_raw = s.raw("command")
    command: tuple[str, ...] = ()
    if (
        not isinstance(command_raw, list)
        or not command_raw
        or not all(isinstance(x, str) for x in command_raw)
    ):
        problems.add(s.key("command"), "is required: a non-empty list of strings (argv)")
    else:
        command = tuple(_resolve_arg(x, base_dir) for x in command_raw)
    env: dict[str, str] = {}
    for k, v in s.table("env").items():
        if not isinstance(v, str):
            problems.add(f"{s.key('env')}.{k}", f"must be a string, not {type(v).__name__}")
        else:
            env[k] = v
    regions: dict[str, int] = {}
    for k, v in s.table("regions").items():
        if not NAME_RE.match(k):
            problems.add(f"{s.key('regions')}.{k}", f"region must match {NAME_RE.pattern}")
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            problems.add(f"{s.key('regions')}.{k}", f"must be an integer >= 0, not {v!r}")
        else:
            regions[k] = v
    primary = s.string("primary_region", "")
    if primary and not NAME_RE.match(primary):
        problems.add(s.key("primary_region"), f"{primary!r} must match {NAME_RE.pattern}")
    hostnames = tuple(h.lower().rstrip(".") for h in s.strings("hostnames"))
    concurrency = s.string("concurrency", "requests")
    if concurrency not in CONCURRENCY:
        problems.add(s.key("concurrency"), f"must be one of {', '.join(CONCURRENCY)}, not {concurrency!r}")
    soft = s.integer("soft_limit", 20, minimum=0)
    hard = s.integer("hard_limit", 25, minimum=0)
    min_running = s.integer("min_machines_running", 0, minimum=0)
    autostop = s.number("autostop_after", 0.0, minimum=0.0)
    autostart = s.boolean("autostart", True)
    start_stopped = s.boolean("start_stopped", False)
    checks: list[CheckSpec] = []
    raw_checks = s.raw("checks")
    if raw_checks is not None and not isinstance(raw_checks, list):
        problems.add(s.key("checks"), "must be an array of tables ([[machines.apps.checks]])")
    for ci, c in enumerate(raw_checks or []):
        cp = f"{prefix}.checks[{ci}]"
        if not isinstance(c, dict):
            problems.add(cp, "must be a table")
            continue
        cs = _Section(c, cp, problems)
        cname = cs.string("name", pattern=NAME_RE)
        ctype = cs.string("type", "http")
        if ctype not in CHECK_TYPES:
            problems.add(cs.key("type"), f"must be one of {', '.join(CHECK_TYPES)}, not {ctype!r}")
        path = cs.string("path", "/")
        if not path.startswith("/"):
            problems.add(cs.key("path"), f"must start with '/', not {path!r}")
        checks.append(
            CheckSpec(
                name=cname,
                type=ctype,
                path=path,
                interval=cs.number("interval", 1.0, minimum=0.05, maximum=3600),
                timeout=cs.number("timeout", 1.0, minimum=0.01, maximum=600),
                grace_period=cs.number("grace_period", 2.0, minimum=0.0, maximum=3600),
            )
        )
        cs.finish()
    if len({c.name for c in checks}) != len(checks):
        problems.add(s.key("checks"), "check names must be unique")
    s.finish()
    return AppSpec(
        name=name,
        command=command,
        env=env,
        regions=regions,
        primary_region=primary,
        hostnames=hostnames,
        concurrency=concurrency,
        soft_limit=soft,
        hard_limit=hard,
        min_machines_running=min_running,
        autostop_after=autostop,
        autostart=autostart,
        start_stopped=start_stopped,
        checks=tuple(checks),
    )


def parse_machines_config(doc: Mapping[str, Any], where: str, base_dir: Path) -> MachinesConfig:
    """Validate a parsed TOML document (``base_dir``: where relative paths start)."""
    problems = _Problems(where)
    for k in sorted(set(doc) - {"machines"}):
        problems.add(k, "unknown section (only [machines] belongs in this file)")
    raw = doc.get("machines")
    if not isinstance(raw, dict):
        problems.add("machines", "the [machines] section is required")
        raise MachinesConfigError("\n".join(problems.lines))
    s = _Section(raw, "machines", problems)
    node = s.string("node", pattern=NAME_RE)
    region = s.string("region", pattern=NAME_RE)
    agent = s.string("agent", "http://127.0.0.1:8080").rstrip("/")
    if not agent.startswith(("http://", "https://")):
        problems.add("machines.agent", f"must be an http:// URL, not {agent!r}")
    token = s.string("token", "")
    listen_s = s.string("listen", "127.0.0.1:7001")
    listen = Addr("127.0.0.1", 7001)
    try:
        listen = parse_addr(listen_s)
    except ValueError as e:
        problems.add("machines.listen", str(e))
    advertise = s.string("advertise", listen_s)
    try:
        adv = parse_addr(advertise)
        if adv.host in ("0.0.0.0", "::"):
            problems.add("machines.advertise", "must be an address others can connect to, not a wildcard")
    except ValueError as e:
        problems.add("machines.advertise", str(e))
    instance_host = s.string("instance_host", "127.0.0.1")
    pr = s.string("port_range", "20000-20099")
    port_range = (20000, 20099)
    m = re.fullmatch(r"(\d+)-(\d+)", pr)
    if m is None or not (1 <= int(m[1]) <= int(m[2]) <= 65535):
        problems.add("machines.port_range", f"must be 'LOW-HIGH' with 1 <= LOW <= HIGH <= 65535, not {pr!r}")
    else:
        port_range = (int(m[1]), int(m[2]))
    region_nodes = s.strings("region_nodes", pattern=NAME_RE) or (node,)
    if node and node not in region_nodes:
        problems.add("machines.region_nodes", f"must include this node {node!r}")
    if len(set(region_nodes)) != len(region_nodes):
        problems.add("machines.region_nodes", "must not repeat a node")
    logs = Path(s.string("logs_dir", "instances"))
    logs_dir = logs if logs.is_absolute() else base_dir / logs
    stop_timeout = s.number("stop_timeout", 5.0, minimum=0.0, maximum=600)
    apps: list[AppSpec] = []
    raw_apps = s.raw("apps")
    if raw_apps is not None and not isinstance(raw_apps, list):
        problems.add("machines.apps", "must be an array of tables ([[machines.apps]])")
    for i, a in enumerate(raw_apps or []):
        spec = _parse_app(a, i, base_dir, problems)
        if spec is not None:
            apps.append(spec)
    names = [a.name for a in apps]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.add("machines.apps", f"app {dup!r} is defined twice")
    s.finish()
    if problems.lines:
        raise MachinesConfigError("\n".join(problems.lines))
    return MachinesConfig(
        node=node,
        region=region,
        agent=agent,
        token=token,
        listen=listen,
        advertise=advertise,
        instance_host=instance_host,
        port_range=port_range,
        region_nodes=region_nodes,
        logs_dir=logs_dir,
        stop_timeout=stop_timeout,
        apps=tuple(apps),
    )


__all__ = [
    "AppSpec",
    "CheckSpec",
    "MachinesConfig",
    "MachinesConfigError",
    "load_machines_config",
    "parse_machines_config",
]
