"""The ``verdigris`` command line.

Exit status: 0 on success, 1 when the operation failed (the agent refused, could not be reached, a
statement failed...), 2 for a usage or configuration error. Errors are one line on stderr, never a
traceback.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import aiohttp
import click

from verdigris import __version__
from verdigris.admin import AdminError, AdminUnavailable, admin_call
from verdigris.api import wire
from verdigris.api.client import ApiError, CorrosionClient
from verdigris.config import Config, ConfigError, load_config, parse_addr

T = TypeVar("T")

DEFAULT_API = "127.0.0.1:8080"

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Failed(click.ClickException):
    """An operation failed: ``error: <message>`` on stderr, exit status 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class BadConfig(Failed):
    exit_code = 2


def _load(config_path: str) -> Config:
    try:
        return load_config(config_path)
    except ConfigError as e:
        raise BadConfig(str(e)) from None


def _serve(
    load: Callable[[str], T], errors: type[Exception], serve: Callable[[T], int], config_path: str
) -> NoReturn:
    """Load a service's config (``errors``: a bad config, exit status 2), then run the service until it
    stops and exit with its status."""
    try:
        config = load(config_path)
    except errors as e:
        raise BadConfig(str(e)) from None
    sys.exit(serve(config))


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except ApiError as e:
        raise Failed(
            e.message if e.status == 200 else f"the agent answered {e.status}: {e.message}"
        ) from None


def _api_url(config: Config | None, api: str | None) -> str:
    """The API's base URL, from ``--api`` (``host:port`` or a URL), else the config, else the default."""
    if api is not None:
        if api.startswith(("http://", "https://")):
            return api.rstrip("/")
        try:
            addr = parse_addr(api)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--api") from None
    elif config is not None:
        addr = config.api.addr
    else:
        addr = parse_addr(DEFAULT_API)
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(addr.host, addr.host)
    return f"http://[{host}]:{addr.port}" if ":" in host else f"http://{host}:{addr.port}"


def _client(config_path: str | None, api: str | None, token: str | None) -> tuple[CorrosionClient, str]:
    config = _load(config_path) if config_path else None
    url = _api_url(config, api)
    if token is None and config is not None:
        token = config.api.authz.bearer_token
    return CorrosionClient(url, token), url


async def _with_client(
    client: CorrosionClient, url: str, fn: Callable[[CorrosionClient], Coroutine[Any, Any, T]]
) -> T:
    try:
        async with client:
            return await fn(client)
    except aiohttp.ClientConnectorError as e:
        raise Failed(
            f"cannot reach the agent at {url}: {e.os_error.strerror or e} (is it running?)"
        ) from None
    except aiohttp.ClientError as e:
        raise Failed(f"talking to the agent at {url} failed: {e}") from None


def _param_value(text: str) -> Any:
    """``--param`` values: JSON when they parse as JSON (42, 1.5, null, true, "42", [1,2]), else the
    text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _statement(sql: str, params: tuple[str, ...], named: tuple[str, ...]) -> wire.StatementLike:
    if params and named:
        raise click.UsageError("give --param or --named, not both")
    if named:
        values: dict[str, Any] = {}
        for item in named:
            name, sep, value = item.partition("=")
            if not sep or not name:
                raise click.BadParameter(f"expected NAME=VALUE, got {item!r}", param_hint="--named")
            values[name] = _param_value(value)
        return (sql, values)
    if params:
        return (sql, [_param_value(p) for p in params])
    return sql


def _api_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--token", metavar="TOKEN", help="Bearer token (default: api.authz.bearer-token of -c)."
    )(f)
    f = click.option(
        "--api",
        "api",
        metavar="ADDR",
        help=f"The agent's API, host:port or URL (default: api.addr of -c, else {DEFAULT_API}).",
    )(f)
    f = click.option(
        "-c",
        "--config",
        "config_path",
        metavar="FILE",
        type=click.Path(dir_okay=False),
        help="The agent's config file.",
    )(f)
    return f


def _param_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--named",
        multiple=True,
        metavar="NAME=VALUE",
        help="A named parameter (:NAME in the SQL); repeatable. VALUE as for --param.",
    )(f)
    f = click.option(
        "-p",
        "--param",
        "params",
        multiple=True,
        metavar="VALUE",
        help='A positional parameter (? in the SQL), repeatable. JSON if it parses (42, null, "42"), else text.',
    )(f)
    return f


# ---------------------------------------------------------------------------------------- commands


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "-V", "--version", prog_name="verdigris")
def main() -> None:
    """Verdigris: a replicated SQLite database with a Corrosion-compatible HTTP API.

    \b
    Run an agent, then talk to it:
      verdigris agent -c agent.toml
      verdigris exec -c agent.toml "INSERT INTO apps (name) VALUES (?)" -p web
      verdigris query -c agent.toml "SELECT * FROM apps"
      verdigris subscribe -c agent.toml "SELECT name FROM apps"

    Every command takes -h for its options and examples. Exit status: 0 ok, 1 failed, 2 usage or
    configuration error.
    """


@main.command(context_settings=CONTEXT_SETTINGS)
@click.option("-c", "--config", "config_path", required=True, metavar="FILE", help="The config file (TOML).")
def agent(config_path: str) -> None:
    """Run an agent: the database, its HTTP API and its admin socket.

    \b
    Runs until SIGINT (Ctrl-C) or SIGTERM, then shuts down cleanly.
    Example:
      verdigris agent -c /etc/verdigris/agent.toml
    """
    from verdigris.agent import run_agent

    config = _load(config_path)
    sys.exit(run_agent(config))


@main.command("exec", context_settings=CONTEXT_SETTINGS)
@_api_options
@_param_options
@click.argument("sql", nargs=-1, required=True)
def exec_(
    config_path: str | None,
    api: str | None,
    token: str | None,
    params: tuple[str, ...],
    named: tuple[str, ...],
    sql: tuple[str, ...],
) -> None:
    """Run SQL statements in one transaction (POST /v1/transactions).

    \b
    Several SQL arguments run in one transaction; parameters go to the first.
    Examples:
      verdigris exec -c agent.toml "INSERT INTO apps (name, org) VALUES (?, ?)" -p web -p acme
      verdigris exec --api 127.0.0.1:8080 "UPDATE machines SET state = 'started' WHERE id = 'm1'"
      verdigris exec -c agent.toml "DELETE FROM apps WHERE name = :name" --named name=web
    """
    statements: list[wire.StatementLike] = [_statement(sql[0], params, named), *sql[1:]]
    client, url = _client(config_path, api, token)
    response = _run(_with_client(client, url, lambda c: c.transaction(statements)))
    for i, result in enumerate(response.results, 1):
        prefix = f"statement {i}: " if len(response.results) > 1 else ""
        click.echo(f"{prefix}{result.rows_affected} row(s) affected in {result.time * 1000:.2f} ms")
    if response.version is not None:
        click.echo(f"committed version {response.version}")
    else:
        click.echo("nothing changed")


@main.command(context_settings=CONTEXT_SETTINGS)
@_api_options
@_param_options
@click.option("--json", "as_json", is_flag=True, help="Print the raw NDJSON events instead of a table.")
@click.argument("sql")
def query(
    config_path: str | None,
    api: str | None,
    token: str | None,
    params: tuple[str, ...],
    named: tuple[str, ...],
    as_json: bool,
    sql: str,
) -> None:
    """Run a read-only query (POST /v1/queries) and print the rows.

    \b
    Examples:
      verdigris query -c agent.toml "SELECT name, org FROM apps"
      verdigris query -c agent.toml "SELECT * FROM machines WHERE app = ?" -p web --json
    """
    stmt = _statement(sql, params, named)
    client, url = _client(config_path, api, token)

    async def go(c: CorrosionClient) -> tuple[list[str], list[list[Any]]]:
        if as_json:
            async with c.query(stmt) as stream:
                async for event in stream:
                    sys.stdout.buffer.write(wire.encode_event(event))
                    sys.stdout.flush()
            return [], []
        return await c.rows(stmt)

    columns, rows = _run(_with_client(client, url, go))
    if not as_json:
        _print_table(columns, rows)


def _print_table(columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, show_lines=False, highlight=False)
    for row in rows:
        table.add_row(*(_cell(v) for v in row))
    console = Console()
    console.print(table)
    console.print(f"{len(rows)} row(s)", style="dim")


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bytes):
        return "x'" + value.hex() + "'"
    return str(value)


@main.command(
    context_settings=CONTEXT_SETTINGS, short_help="Subscribe to a query; print events as they come."
)
@_api_options
@_param_options
@click.option(
    "--from",
    "from_",
    type=click.IntRange(min=0),
    metavar="N",
    help="Resume: only changes after change id N (needs --id or an existing subscription).",
)
@click.option("--id", "sub_id", metavar="ID", help="Attach to an existing subscription by id instead of SQL.")
@click.option("--skip-rows", is_flag=True, help="Do not send the current rows, only the changes from now on.")
@click.argument("sql", required=False)
def subscribe(
    config_path: str | None,
    api: str | None,
    token: str | None,
    params: tuple[str, ...],
    named: tuple[str, ...],
    from_: int | None,
    sub_id: str | None,
    skip_rows: bool,
    sql: str | None,
) -> None:
    """Subscribe to a query and print its events (NDJSON) as they come.

    \b
    The subscription id goes to stderr; Ctrl-C stops. Events: columns, row..., eoq (with the
    change id the rows reflect), then change events. To resume after a disconnect, pass the id and
    the last change id seen.
    Examples:
      verdigris subscribe -c agent.toml "SELECT id, state FROM machines WHERE app = ?" -p web
      verdigris subscribe -c agent.toml --id 3f2a...-... --from 42
    """
    if (sql is None) == (sub_id is None):
        raise click.UsageError("give either SQL or --id")
    client, url = _client(config_path, api, token)

    async def go(c: CorrosionClient) -> None:
        if sub_id is not None:
            stream = c.subscribe_by_id(sub_id, from_=from_, skip_rows=skip_rows)
        else:
            assert sql is not None
            stream = c.subscribe(_statement(sql, params, named), from_=from_, skip_rows=skip_rows)
        async with stream:
            click.echo(f"subscription {stream.query_id}", err=True)
            async for event in stream:
                sys.stdout.buffer.write(wire.encode_event(event))
                sys.stdout.flush()

    try:
        _run(_with_client(client, url, go))
    except KeyboardInterrupt:
        sys.exit(130)


@main.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "-c", "--config", "config_path", required=True, metavar="FILE", help="The proxy's config file ([proxy])."
)
def proxy(config_path: str) -> None:
    """Run the edge proxy: worker processes sharing the listening port.

    \b
    Routes HTTP requests by Host to app instances, from the local agent's state.
    Runs until SIGINT (Ctrl-C) or SIGTERM, then drains in-flight requests.
    Example:
      verdigris proxy -c /etc/verdigris/proxy.toml
    """
    from verdigris.proxy.config import ProxyConfigError, load_proxy_config
    from verdigris.proxy.worker import run_proxy

    _serve(load_proxy_config, ProxyConfigError, run_proxy, config_path)


@main.command(context_settings=CONTEXT_SETTINGS)
@click.option(
    "-c", "--config", "config_path", required=True, metavar="FILE", help="The config file ([machines])."
)
def machines(config_path: str) -> None:
    """Run the machines agent: this node's app instances as child processes.

    \b
    Starts its share of each app's instances (instance j of a region runs on
    region_nodes[j % len]), restarts crashed ones with backoff, health-checks them,
    writes machines/checks/services rows through the local agent, stops idle ones
    (autostop) and starts stopped ones when a proxy asks (autostart).
    HTTP API and /metrics on machines.listen; see docs/machines.md.
    Runs until SIGINT (Ctrl-C) or SIGTERM, then stops every instance it started.
    Example:
      verdigris machines -c examples/machines.toml
    """
    from verdigris.machines.config import MachinesConfigError, load_machines_config
    from verdigris.machines.service import run_machines

    _serve(load_machines_config, MachinesConfigError, run_machines, config_path)


@main.command(context_settings=CONTEXT_SETTINGS)
@click.option("--regions", type=int, default=3, show_default=True, help="Regions (ams, iad, sin, r4, ...).")
@click.option("--nodes", type=int, default=3, show_default=True, help="Nodes per region.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where configs, databases and logs go (kept). Default: a fresh temp dir, removed at exit.",
)
@click.option("--keep", is_flag=True, help="Keep the default temp dir at exit (its path is printed).")
@click.option(
    "--base-port", type=int, help="Fixed ports from this one up (proxies first). Default: free ports."
)
@click.option(
    "--status-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the fleet's addresses as JSON here once it is ready (removed at exit).",
)
@click.option("--workers", type=int, default=1, show_default=True, help="Worker processes per proxy.")
@click.option("--timeout", type=float, default=180.0, show_default=True, help="Start-up bound in seconds.")
def demo(
    regions: int,
    nodes: int,
    data_dir: Path | None,
    keep: bool,
    base_port: int | None,
    status_file: Path | None,
    workers: int,
    timeout: float,
) -> None:
    """Run a whole local fleet: per node an agent, a machines agent and a proxy, with sample apps.

    \b
    Starts REGIONS x NODES nodes on 127.0.0.1, prints the proxies, curl commands for the sample apps
    (hello, notes, sleepy) and the dashboard URL; Ctrl-C stops every process. See docs/demo.md.
    Examples:
      verdigris demo
      verdigris demo --regions 2 --nodes 1 --base-port 9000 --data-dir /tmp/fleet
    """
    from verdigris.demo import DemoError, DemoOptions, run_demo

    if timeout <= 0:
        raise click.BadParameter(f"must be > 0, not {timeout}", param_hint="--timeout")
    options = DemoOptions(regions, nodes, data_dir, keep, base_port, status_file, workers, timeout)
    try:
        sys.exit(run_demo(options))
    except DemoError as e:
        raise BadConfig(str(e)) from None


@main.command(context_settings=CONTEXT_SETTINGS)
@click.option("-c", "--config", "config_path", required=True, metavar="FILE", help="The agent's config file.")
@click.argument("dest", type=click.Path(dir_okay=False))
def backup(config_path: str, dest: str) -> None:
    """Write a consistent copy of the database to DEST.

    \b
    With the agent running, the agent makes the copy (online, writes go on); otherwise the database
    file is copied directly. Restore it with `verdigris restore`.
    Example:
      verdigris backup -c agent.toml /var/backups/verdigris-$(date +%F).db
    """
    config = _load(config_path)
    target = Path(dest).resolve()
    if target.parent and not target.parent.is_dir():
        raise Failed(f"directory {target.parent} does not exist")
    try:
        reply = admin_call(config.admin.path, {"cmd": "backup", "path": str(target)}, timeout=3600)
    except AdminUnavailable:
        reply = None
    except AdminError as e:
        raise Failed(str(e)) from None
    if reply is not None:
        if not reply.get("ok"):
            raise Failed(str(reply.get("error")))
        click.echo(f"backup written to {target} ({reply.get('bytes')} bytes, by the running agent)")
        return
    if not config.db.path.exists():
        raise Failed(f"no database at {config.db.path} (db.path)")
    from verdigris.store.store import Store
    from verdigris.store.types import StoreError

    try:
        with Store(config.db.path) as store:
            store.backup(target)
    except (StoreError, OSError) as e:
        raise Failed(f"backup failed: {e}") from None
    click.echo(f"backup written to {target} ({target.stat().st_size} bytes; the agent is not running)")


@main.command(context_settings=CONTEXT_SETTINGS)
@click.option("-c", "--config", "config_path", required=True, metavar="FILE", help="The agent's config file.")
@click.option(
    "--new-site-id", is_flag=True, help="Give the node a fresh identity (site id) instead of keeping its own."
)
@click.argument("src", type=click.Path(dir_okay=False))
def restore(config_path: str, new_site_id: bool, src: str) -> None:
    """Replace the database with the backup SRC. The agent must be stopped.

    \b
    The node keeps its site id (as `corrosion restore` does), unless that would make it reuse
    version numbers it already gave out (it wrote versions the backup lacks): then the restore is
    refused, and --new-site-id restores under a fresh identity. The old -wal/-shm files and the
    subscriptions' state are removed.
    Example:
      verdigris restore -c agent.toml /var/backups/verdigris-2024-05-01.db
    """
    from verdigris.agent import subscriptions_dir
    from verdigris.restore import RestoreError, restore_database

    config = _load(config_path)
    try:
        admin_call(config.admin.path, {"cmd": "ping"}, timeout=5)
    except AdminUnavailable:
        pass
    except AdminError as e:
        raise Failed(f"cannot tell whether the agent is stopped: {e}") from None
    else:
        raise Failed(f"the agent is running (its admin socket {config.admin.path} answers): stop it first")
    try:
        result = restore_database(
            config.db.path,
            Path(src),
            new_site_id=new_site_id,
            state_dirs=(subscriptions_dir(config.db.path),),
        )
    except (RestoreError, OSError) as e:
        raise Failed(str(e)) from None
    identity = "a new site id" if result.new_identity else "its site id"
    click.echo(f"restored {config.db.path} from {src}; the node keeps {identity} {result.site_id.hex()}")


@main.command(context_settings=CONTEXT_SETTINGS, short_help="Apply schema file changes to the running agent.")
@click.option("-c", "--config", "config_path", required=True, metavar="FILE", help="The agent's config file.")
def reload(config_path: str) -> None:
    """Re-read the schema files and apply additive changes to the running agent.

    \b
    New tables, new columns and index changes take effect at once, without a restart. A change that
    is not additive is refused, and nothing is applied.
    Example:
      verdigris reload -c agent.toml
    """
    config = _load(config_path)
    try:
        reply = admin_call(config.admin.path, {"cmd": "reload"})
    except AdminError as e:
        raise Failed(f"{e} (is the agent running?)" if isinstance(e, AdminUnavailable) else str(e)) from None
    if not reply.get("ok"):
        raise Failed(str(reply.get("error")))
    changes: dict[str, list[str]] = reply.get("changes", {})
    if not reply.get("changed"):
        click.echo("schema unchanged")
        return
    for kind, names in changes.items():
        if names:
            click.echo(f"{kind.replace('_', ' ')}: {', '.join(names)}")


# ---------------------------------------------------------------------------------------- cluster


def _admin(config: Config, command: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """One admin command to the running agent; failures as :class:`Failed`."""
    try:
        reply = admin_call(config.admin.path, command, timeout=timeout)
    except AdminError as e:
        raise Failed(f"{e} (is the agent running?)" if isinstance(e, AdminUnavailable) else str(e)) from None
    if not reply.get("ok"):
        error = str(reply.get("error"))
        if error.startswith(f"unknown command {command['cmd']!r}"):
            raise Failed("the agent runs without a [gossip] section: it is not part of a cluster")
        raise Failed(error)
    return reply


def _config_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "-c", "--config", "config_path", required=True, metavar="FILE", help="The agent's config file."
    )(f)


def _scope_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--scope",
        type=click.Choice(["regional", "global"]),
        default="regional",
        show_default=True,
        help="Which cluster, in region mode ([gossip.global]): the region's or the global one. "
        "Without region mode both mean the agent's only cluster.",
    )(f)


@main.group(context_settings=CONTEXT_SETTINGS)
def cluster() -> None:
    """The cluster as this agent sees it (needs [gossip] in the config).

    \b
    Examples:
      verdigris cluster members -c agent.toml          # who is alive, suspect, dead or gone
      verdigris cluster members -c agent.toml --json
      verdigris cluster members -c agent.toml --scope global   # region mode: the global cluster
      verdigris cluster status -c agent.toml           # heads, gaps, queues, drops, sync sessions
      verdigris cluster rejoin -c agent.toml           # announce again after a network problem
    """


@cluster.command("members", context_settings=CONTEXT_SETTINGS)
@_config_option
@_scope_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def cluster_members(config_path: str, scope: str, as_json: bool) -> None:
    """List the members this agent knows, itself first.

    \b
    Columns: node id (the site id), gossip address, region, state (alive, suspect, dead, left),
    incarnation, smoothed round trip of direct probes, and how long ago a packet last came from it.
    Example:
      verdigris cluster members -c agent.toml
      verdigris cluster members -c agent.toml --scope global
    """
    command = {"cmd": "members", "scope": scope}
    members: list[dict[str, Any]] = _admin(_load(config_path), command)["members"]
    if as_json:
        click.echo(json.dumps(members, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    styles = {"alive": "green", "suspect": "yellow", "dead": "red", "left": "dim"}
    table = Table("ID", "ADDR", "REGION", "STATE", "INC", "RTT", "LAST SEEN", highlight=False)
    for m in members:
        state = str(m["state"])
        rtt = "-" if m.get("rtt_ms") is None else f"{m['rtt_ms']:.2f} ms"
        if m.get("self"):
            seen, ident = "(self)", f"{m['id']} *"
        else:
            seen = "never" if m.get("last_seen_s") is None else _ago(float(m["last_seen_s"]))
            ident = str(m["id"])
        table.add_row(
            ident,
            str(m["addr"]),
            str(m.get("region") or "-"),
            f"[{styles.get(state, '')}]{state}[/]",
            str(m["incarnation"]),
            rtt,
            seen,
        )
    console = Console()
    console.print(table)
    alive = sum(1 for m in members if m["state"] == "alive")
    console.print(f"{len(members)} member(s), {alive} alive", style="dim")


def _ago(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms ago"
    if seconds < 120:
        return f"{seconds:.1f} s ago"
    return f"{seconds / 60:.0f} min ago"


@cluster.command("rejoin", context_settings=CONTEXT_SETTINGS)
@_config_option
@_scope_option
def cluster_rejoin(config_path: str, scope: str) -> None:
    """Announce this agent again to its bootstrap list and every member it knows.

    \b
    For after a network problem, when the agent should not wait for its own reconnect attempts.
    Example:
      verdigris cluster rejoin -c agent.toml
    """
    targets: list[str] = _admin(_load(config_path), {"cmd": "rejoin", "scope": scope})["announced_to"]
    click.echo(f"announced to {len(targets)} address(es): {', '.join(targets) or '-'}")


@cluster.command("status", context_settings=CONTEXT_SETTINGS)
@_config_option
@_scope_option
def cluster_status(config_path: str, scope: str) -> None:
    """Print replication state and gossip counters as JSON (heads, gaps, queues, drops, sessions).

    In region mode the heads are those of the chosen scope's actors only."""
    reply = _admin(_load(config_path), {"cmd": "status", "scope": scope})
    reply.pop("ok", None)
    click.echo(json.dumps(reply, indent=2))


# ---------------------------------------------------------------------------------------- keys


@main.group(context_settings=CONTEXT_SETTINGS)
def keys() -> None:
    """The gossip encryption keyring of a running agent (rotate with install, use, remove).

    \b
    Rotation with no downtime, one step at a time on every agent:
      verdigris keys install -c agent.toml NEWKEY   # accept the new key too
      verdigris keys use -c agent.toml NEWKEY       # send with it
      verdigris keys remove -c agent.toml OLDKEY    # stop accepting the old one
    Changes are saved to the keyring file and take effect at once. Keys are shown by fingerprint.
    """


def _print_keyring(reply: dict[str, Any]) -> None:
    primary = reply["primary"]
    for fp in reply["keys"]:
        click.echo(f"{fp}{'  (primary)' if fp == primary else ''}")


@keys.command("list", context_settings=CONTEXT_SETTINGS)
@_config_option
def keys_list(config_path: str) -> None:
    """List the installed keys by fingerprint, the primary (the one used to send) marked."""
    _print_keyring(_admin(_load(config_path), {"cmd": "keys", "action": "list"}))


def _key_command(action: str, doc: str) -> None:
    @keys.command(action, context_settings=CONTEXT_SETTINGS, help=doc)
    @_config_option
    @click.argument("key")
    def command(config_path: str, key: str) -> None:
        if key == "-":
            key = sys.stdin.readline().strip()
        reply = _admin(_load(config_path), {"cmd": "keys", "action": action, "key": key})
        click.echo(f"{action}: {'done' if reply.get('changed') else 'nothing to change'}")
        _print_keyring(reply)


_key_command("install", "Install KEY (base64; '-' reads it from stdin): accepted from now on, not yet used.")
_key_command("use", "Make the installed KEY the primary: every packet is sealed with it from now on.")
_key_command("remove", "Remove KEY: packets sealed with it are refused from now on. Not the primary.")


@keys.command("generate", context_settings=CONTEXT_SETTINGS)
def keys_generate() -> None:
    """Print a new random 32-byte key (base64), for gossip.key or `keys install`."""
    import secrets

    from verdigris.gossip.keyring import generate_key

    click.echo(generate_key(secrets.token_bytes))


@main.command(context_settings=CONTEXT_SETTINGS, short_help="Tell an internal stall from the network's.")
@click.option(
    "-c",
    "--config",
    "config_path",
    metavar="FILE",
    type=click.Path(dir_okay=False),
    help="The agent's config: its [telemetry.prometheus] addr is scraped, its admin socket names members.",
)
@click.option("--agent-metrics", multiple=True, metavar="URL", help="An agent's /metrics (repeatable).")
@click.option(
    "--proxy-metrics", multiple=True, metavar="URL", help="A proxy's metrics_listen /metrics (repeatable)."
)
@click.option(
    "--interval", type=float, default=2.0, show_default=True, help="Seconds between the two scrapes (rates)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the verdict and evidence as JSON.")
def doctor(
    config_path: str | None,
    agent_metrics: tuple[str, ...],
    proxy_metrics: tuple[str, ...],
    interval: float,
    as_json: bool,
) -> None:
    """Scrape an agent and proxies twice and print a verdict with its evidence: an internal stall in the
    proxy or the agent, gossip trouble, the upstream network, or healthy (priorities and thresholds:
    docs/metrics.md).

    \b
    Exit status: 0 healthy, 1 a problem found, 2 an endpoint could not be scraped.
    Examples:
      verdigris doctor -c agent.toml --proxy-metrics 127.0.0.1:9091
      verdigris doctor --agent-metrics http://10.0.0.5:9090/metrics --json
    """
    from verdigris.doctor import DoctorError, run_doctor

    config = _load(config_path) if config_path else None
    try:
        code, text = run_doctor(
            config=config,
            agent_metrics=agent_metrics,
            proxy_metrics=proxy_metrics,
            interval=interval,
            as_json=as_json,
        )
    except DoctorError as e:
        raise BadConfig(str(e)) from None
    click.echo(text)
    sys.exit(code)


if __name__ == "__main__":  # pragma: no cover
    main()
