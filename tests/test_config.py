"""Tests for verdigris.config: defaults, path resolution, and every kind of error message."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from verdigris.config import (
    DEFAULT_MAX_BODY_BYTES,
    Addr,
    AdminConfig,
    Config,
    ConfigError,
    DbConfig,
    load_config,
    parse_addr,
    parse_config,
)

REPO = Path(__file__).resolve().parent.parent
BASE = Path("/srv/vd")
SRC = "/srv/vd/agent.toml"
MINIMAL = '[db]\npath = "state.db"\n'


def parse(text: str) -> Config:
    return parse_config(text, SRC, BASE)


def errors(text: str) -> list[str]:
    """The problems reported for ``text``, which must not validate."""
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert info.value.source == SRC
    assert str(info.value) == "\n".join(info.value.problems)
    return list(info.value.problems)


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- defaults and values ---------------------------------------------------------------------------


def test_defaults() -> None:
    cfg = parse(MINIMAL)
    assert cfg.source == SRC
    assert cfg.db == DbConfig(path=Path("/srv/vd/state.db"), schema_paths=())
    assert cfg.admin == AdminConfig(path=Path("/srv/vd/admin.sock"))
    assert cfg.api.addr == Addr("127.0.0.1", 8080)
    assert cfg.api.authz.bearer_token is None
    assert cfg.api.max_body_bytes == DEFAULT_MAX_BODY_BYTES == 16 * 1024 * 1024
    assert cfg.gossip.addr == Addr("127.0.0.1", 8787)
    assert cfg.gossip.bootstrap == ()
    assert cfg.gossip.plaintext is False
    assert cfg.gossip.cluster_id == 0
    assert cfg.telemetry.prometheus.addr is None
    assert cfg.log.level == "info"
    assert cfg.log.format == "plaintext"
    assert cfg.log.colors is True
    assert cfg.log.level_number == logging.INFO
    assert cfg.perf.subscription_batch_ms == 5
    assert cfg.perf.max_write_batch == 1000


def test_every_key_set() -> None:
    cfg = parse(
        """
        [db]
        path = "/var/lib/vd/state.db"
        schema_paths = ["/etc/vd/schemas", "/etc/vd/extra.sql"]

        [api]
        addr = "0.0.0.0:9000"
        max-body-bytes = 1_048_576

        [api.authz]
        bearer-token = "s3cret"

        [gossip]
        addr = "[::]:8787"
        bootstrap = ["10.0.0.2:8787", "node-3.internal:8787", "[fd00::1]:8787"]
        plaintext = true
        cluster-id = 42

        [admin]
        path = "/run/vd/admin.sock"

        [telemetry.prometheus]
        addr = "127.0.0.1:9090"

        [log]
        level = "debug"
        format = "json"
        colors = false

        [perf]
        subscription-batch-ms = 0
        max-write-batch = 50
        """
    )
    assert cfg.db.path == Path("/var/lib/vd/state.db")
    assert cfg.db.schema_paths == (Path("/etc/vd/schemas"), Path("/etc/vd/extra.sql"))
    assert cfg.api.addr == Addr("0.0.0.0", 9000)
    assert cfg.api.max_body_bytes == 1_048_576
    assert cfg.api.authz.bearer_token == "s3cret"
    assert cfg.gossip.addr == Addr("::", 8787)
    assert cfg.gossip.bootstrap == (
        Addr("10.0.0.2", 8787),
        Addr("node-3.internal", 8787),
        Addr("fd00::1", 8787),
    )
    assert cfg.gossip.plaintext is True
    assert cfg.gossip.cluster_id == 42
    assert cfg.admin.path == Path("/run/vd/admin.sock")
    assert cfg.telemetry.prometheus.addr == Addr("127.0.0.1", 9090)
    assert (cfg.log.level, cfg.log.format, cfg.log.colors) == ("debug", "json", False)
    assert cfg.log.level_number == logging.DEBUG
    assert cfg.perf.subscription_batch_ms == 0
    assert cfg.perf.max_write_batch == 50


def test_bearer_token() -> None:
    cfg = parse(MINIMAL + '[api.authz]\nbearer-token = "tok-123"\n')
    assert cfg.api.authz.bearer_token == "tok-123"
    # The dotted-key form of the same thing.
    cfg = parse(MINIMAL + '[api]\nauthz.bearer-token = "tok-456"\n')
    assert cfg.api.authz.bearer_token == "tok-456"


def test_empty_bearer_token_is_rejected() -> None:
    assert errors(MINIMAL + '[api.authz]\nbearer-token = ""\n') == [
        f'invalid value for "api.authz.bearer-token" in {SRC}: must not be empty (leave the key out instead)'
    ]


def test_log_level_is_case_insensitive() -> None:
    assert parse(MINIMAL + '[log]\nlevel = "WARNING"\n').log.level == "warning"
    assert parse(MINIMAL + '[log]\nlevel = "error"\n').log.level_number == logging.ERROR


def test_config_is_frozen() -> None:
    cfg = parse(MINIMAL)
    with pytest.raises(AttributeError):
        cfg.db = DbConfig(path=Path("/x"))  # type: ignore[misc]


def test_for_db() -> None:
    cfg = Config.for_db("/tmp/vd/x.db", schema_paths=["/tmp/vd/schema.sql"])
    assert cfg.db.path == Path("/tmp/vd/x.db")
    assert cfg.db.schema_paths == (Path("/tmp/vd/schema.sql"),)
    assert cfg.admin.path == Path("/tmp/vd/admin.sock")
    assert cfg.api == parse(MINIMAL).api


# --- paths -----------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    path = write(
        conf_dir,
        '[db]\npath = "../data/agent.db"\nschema_paths = ["../schemas", "more/x.sql", "/abs/y.sql"]\n'
        '[admin]\npath = "run/admin.sock"\n',
    )
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)  # the current directory must not matter
    cfg = load_config(path)
    assert cfg.db.path == tmp_path / "data" / "agent.db"
    assert cfg.db.schema_paths == (tmp_path / "schemas", conf_dir / "more" / "x.sql", Path("/abs/y.sql"))
    assert cfg.admin.path == conf_dir / "run" / "admin.sock"
    assert cfg.source == str(path)


def test_default_admin_socket_is_next_to_the_database() -> None:
    cfg = parse('[db]\npath = "data/sub/agent.db"\n')
    assert cfg.admin.path == Path("/srv/vd/data/sub/admin.sock")


def test_load_config_with_a_relative_file_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, MINIMAL)
    monkeypatch.chdir(tmp_path)
    cfg = load_config("agent.toml")
    assert cfg.db.path == tmp_path / "state.db"
    assert cfg.db.path.is_absolute()


def test_relative_base_dir_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(MINIMAL, "<test>", Path("conf"))
    assert cfg.db.path == tmp_path / "conf" / "state.db"


def test_home_directory_is_expanded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/vd")
    assert parse('[db]\npath = "~/state.db"\n').db.path == Path("/home/vd/state.db")


def test_missing_db_path() -> None:
    assert errors("") == [f'missing required key "db.path" in {SRC}']
    assert errors("[db]\n") == [f'missing required key "db.path" in {SRC}']


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[db]\npath = ""\n', f'invalid value for "db.path" in {SRC}: the path must not be empty'),
        (
            '[db]\npath = "a\\u0000b"\n',
            f'invalid value for "db.path" in {SRC}: the path must not contain a NUL character',
        ),
        (
            MINIMAL + '[admin]\npath = ""\n',
            f'invalid value for "admin.path" in {SRC}: the path must not be empty',
        ),
    ],
)
def test_bad_paths(text: str, expected: str) -> None:
    assert errors(text) == [expected]


# --- unknown keys ----------------------------------------------------------------------------------


def test_unknown_top_level_section() -> None:
    assert errors(MINIMAL + "[database]\npath = 'x'\n") == [f'unknown key "database" in {SRC}']


def test_unknown_top_level_key() -> None:
    assert errors('verbose = true\n[db]\npath = "x"\n') == [f'unknown key "verbose" in {SRC}']


def test_unknown_key_in_section_suggests_the_right_one() -> None:
    assert errors(MINIMAL + '[api]\nadr = "127.0.0.1:1"\n') == [
        f'unknown key "api.adr" in {SRC} (did you mean "api.addr"?)'
    ]


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[db]\npath = "x"\nschema-paths = []\n', "db.schema-paths"),
        (MINIMAL + '[api.authz]\nbearer_token = "x"\n', "api.authz.bearer_token"),
        (MINIMAL + '[api.authz]\ntoken = "x"\n', "api.authz.token"),
        (MINIMAL + "[api.tls]\ncert = 'x'\n", "api.tls"),
        (MINIMAL + "[gossip]\nmax_mtu = 1200\n", "gossip.max_mtu"),
        (MINIMAL + "[gossip.tls]\ninsecure = true\n", "gossip.tls"),
        (MINIMAL + "[admin]\nsocket = 'x'\n", "admin.socket"),
        (MINIMAL + "[telemetry]\nopen-telemetry = {}\n", "telemetry.open-telemetry"),
        (MINIMAL + "[telemetry.prometheus]\nport = 9090\n", "telemetry.prometheus.port"),
        (MINIMAL + "[log]\ncolours = false\n", "log.colours"),
        (MINIMAL + "[perf]\nmax_write_batch = 1\n", "perf.max_write_batch"),
    ],
)
def test_unknown_nested_keys(text: str, key: str) -> None:
    (problem,) = errors(text)
    assert problem.startswith(f'unknown key "{key}" in {SRC}')


def test_every_unknown_key_is_reported_together_sorted_and_before_other_problems() -> None:
    problems = errors(
        """
        zzz = 1
        [db]
        path = "x"
        [api]
        adr = "x"
        max-body-bytes = "big"
        [api.authz]
        bearer_token = "x"
        [perf]
        max_write_batch = 1
        [nope.deeper]
        x = 1
        """
    )
    assert problems == [
        f'unknown key "api.adr" in {SRC} (did you mean "api.addr"?)',
        f'unknown key "api.authz.bearer_token" in {SRC} (did you mean "api.authz.bearer-token"?)',
        f'unknown key "nope" in {SRC}',
        f'unknown key "perf.max_write_batch" in {SRC} (did you mean "perf.max-write-batch"?)',
        f'unknown key "zzz" in {SRC}',
        f'wrong type for "api.max-body-bytes" in {SRC}: expected an integer, got string "big"',
    ]


# --- wrong types and bad values --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[db]\npath = 5\n", 'wrong type for "db.path" in {src}: expected a string (a path), got integer 5'),
        (
            '[db]\npath = "x"\nschema_paths = "schemas"\n',
            'wrong type for "db.schema_paths" in {src}: expected an array of strings (paths), '
            'got string "schemas"',
        ),
        (
            '[db]\npath = "x"\nschema_paths = ["a", 1]\n',
            'wrong type for "db.schema_paths[1]" in {src}: expected a string (a path), got integer 1',
        ),
        ('db = "x"\n', 'wrong type for "db" in {src}: expected a table, got string "x"'),
        ("[[db]]\npath = 'x'\n", 'wrong type for "db" in {src}: expected a table, got an array'),
        (
            MINIMAL + "[api]\naddr = 8080\n",
            'wrong type for "api.addr" in {src}: expected a string "host:port", got integer 8080',
        ),
        (
            MINIMAL + '[api]\nauthz = "tok"\n',
            'wrong type for "api.authz" in {src}: expected a table, got string "tok"',
        ),
        (
            MINIMAL + "[api.authz]\nbearer-token = 123\n",
            'wrong type for "api.authz.bearer-token" in {src}: expected a string, got integer 123',
        ),
        (
            MINIMAL + "[api]\nmax-body-bytes = 1.5\n",
            'wrong type for "api.max-body-bytes" in {src}: expected an integer, got float 1.5',
        ),
        (
            MINIMAL + "[api]\nmax-body-bytes = true\n",
            'wrong type for "api.max-body-bytes" in {src}: expected an integer, got boolean true',
        ),
        (
            MINIMAL + "[api]\nmax-body-bytes = 0\n",
            'invalid value for "api.max-body-bytes" in {src}: 0 is out of range (must be at least 1)',
        ),
        (
            MINIMAL + '[gossip]\nplaintext = "yes"\n',
            'wrong type for "gossip.plaintext" in {src}: expected true or false, got string "yes"',
        ),
        (
            MINIMAL + "[gossip]\nplaintext = 1\n",
            'wrong type for "gossip.plaintext" in {src}: expected true or false, got integer 1',
        ),
        (
            MINIMAL + '[gossip]\nbootstrap = "10.0.0.1:8787"\n',
            'wrong type for "gossip.bootstrap" in {src}: expected an array of strings "host:port", '
            'got string "10.0.0.1:8787"',
        ),
        (
            MINIMAL + "[gossip]\ncluster-id = 65536\n",
            'invalid value for "gossip.cluster-id" in {src}: 65536 is out of range (must be from 0 to 65535)',
        ),
        (
            MINIMAL + "[gossip]\ncluster-id = -1\n",
            'invalid value for "gossip.cluster-id" in {src}: -1 is out of range (must be from 0 to 65535)',
        ),
        (
            MINIMAL + "[telemetry]\nprometheus = 9090\n",
            'wrong type for "telemetry.prometheus" in {src}: expected a table, got integer 9090',
        ),
        (
            MINIMAL + '[log]\nlevel = "verbose"\n',
            'invalid value for "log.level" in {src}: "verbose" is not one of "debug", "info", "warning", '
            '"error"',
        ),
        (
            MINIMAL + '[log]\nformat = "JSON"\n',
            'invalid value for "log.format" in {src}: "JSON" is not one of "plaintext", "json"',
        ),
        (
            MINIMAL + "[log]\ncolors = 1979-05-27\n",
            'wrong type for "log.colors" in {src}: expected true or false, got a date',
        ),
        (
            MINIMAL + "[perf]\nsubscription-batch-ms = -5\n",
            'invalid value for "perf.subscription-batch-ms" in {src}: -5 is out of range '
            "(must be at least 0)",
        ),
        (
            MINIMAL + "[perf]\nmax-write-batch = 0\n",
            'invalid value for "perf.max-write-batch" in {src}: 0 is out of range (must be at least 1)',
        ),
    ],
)
def test_wrong_types_and_values(text: str, expected: str) -> None:
    assert errors(text) == [expected.format(src=SRC)]


def test_top_level_scalar_section() -> None:
    assert errors('api = "127.0.0.1:1"\n' + MINIMAL) == [
        f'wrong type for "api" in {SRC}: expected a table, got string "127.0.0.1:1"'
    ]


def test_long_string_values_are_shortened_in_messages() -> None:
    (problem,) = errors(MINIMAL + f'[log]\nlevel = "{"x" * 500}"\n')
    assert len(problem) < 200
    assert '"xxx' in problem and '..."' in problem


def test_several_problems_are_all_reported() -> None:
    problems = errors('[api]\naddr = "nohost"\n[log]\nformat = "xml"\n')
    assert problems == [
        f'missing required key "db.path" in {SRC}',
        f'invalid value for "api.addr" in {SRC}: "nohost" is not a valid address: '
        'expected "host:port" (missing ":port")',
        f'invalid value for "log.format" in {SRC}: "xml" is not one of "plaintext", "json"',
    ]


# --- addresses -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "section"),
    [
        ("api.addr", '[api]\naddr = "{v}"\n'),
        ("gossip.addr", '[gossip]\naddr = "{v}"\n'),
        ("gossip.bootstrap[1]", '[gossip]\nbootstrap = ["127.0.0.1:1", "{v}"]\n'),
        ("telemetry.prometheus.addr", '[telemetry.prometheus]\naddr = "{v}"\n'),
    ],
)
@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("127.0.0.1:99999", "port 99999 is out of range (0-65535)"),
        ("nohost", 'expected "host:port" (missing ":port")'),
        ("127.0.0.1:", "missing port number"),
        (":8080", 'expected "host:port" (missing host)'),
        ("127.0.0.1:http", "port 'http' is not a number"),
        ("127.0.0.1:-1", "port '-1' is not a number"),
        ("256.0.0.1:80", "'256.0.0.1' is not a valid IPv4 address"),
        ("::1:8080", 'IPv6 addresses must be in brackets, e.g. "[::1]:8080"'),
        ("[::1]8080", 'expected ":port" after "]"'),
        ("[::1:8080", 'missing "]" after the IPv6 address'),
        ("[nothex]:1", "'nothex' is not a valid IPv6 address"),
        ("bad_host!:80", "'bad_host!' is not a valid host name or IP address"),
        ("-lead.example:80", "'-lead.example' is not a valid host name or IP address"),
        ("127.0.0.1 :80", "must not contain whitespace"),
    ],
)
def test_bad_addresses(key: str, section: str, value: str, reason: str) -> None:
    text = MINIMAL + section.format(v=value)
    assert errors(text) == [f'invalid value for "{key}" in {SRC}: "{value}" is not a valid address: {reason}']


@pytest.mark.parametrize(
    ("text", "addr", "shown"),
    [
        ("127.0.0.1:8080", Addr("127.0.0.1", 8080), "127.0.0.1:8080"),
        ("0.0.0.0:0", Addr("0.0.0.0", 0), "0.0.0.0:0"),
        ("localhost:65535", Addr("localhost", 65535), "localhost:65535"),
        ("node-1.vd.internal.:8787", Addr("node-1.vd.internal.", 8787), "node-1.vd.internal.:8787"),
        ("[::1]:8080", Addr("::1", 8080), "[::1]:8080"),
        ("[::]:1", Addr("::", 1), "[::]:1"),
    ],
)
def test_parse_addr(text: str, addr: Addr, shown: str) -> None:
    parsed = parse_addr(text)
    assert parsed == addr
    assert str(parsed) == shown
    host, port = parsed
    assert (host, port) == (addr.host, addr.port)


def test_parse_addr_rejects_empty() -> None:
    with pytest.raises(ValueError, match="empty string"):
        parse_addr("")


def test_prometheus_must_not_share_the_api_address() -> None:
    text = MINIMAL + '[api]\naddr = "127.0.0.1:9000"\n[telemetry.prometheus]\naddr = "127.0.0.1:9000"\n'
    assert errors(text) == [
        f'invalid value for "telemetry.prometheus.addr" in {SRC}: 127.0.0.1:9000 is already used by api.addr'
    ]
    # Port 0 means "any free port", so the two can both ask for it.
    text = MINIMAL + '[api]\naddr = "127.0.0.1:0"\n[telemetry.prometheus]\naddr = "127.0.0.1:0"\n'
    assert parse(text).telemetry.prometheus.addr == Addr("127.0.0.1", 0)


# --- files and TOML syntax -------------------------------------------------------------------------


def test_load_config(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + '[api.authz]\nbearer-token = "t"\n')
    cfg = load_config(path)
    assert cfg.db.path == tmp_path / "state.db"
    assert cfg.api.authz.bearer_token == "t"
    assert cfg.source == str(path)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"config file not found: {path}"
    assert info.value.source == str(path)


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"is a directory"):
        load_config(tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read anything")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    path.chmod(0)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"cannot read config file {path}: Permission denied"


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[db]\npath = "x"\n\n[api\naddr = "127.0.0.1:1"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"invalid TOML in {path} at line 4, column 5: Expected ']' at the end of a table declaration"
    )
    assert info.value.line == 4
    assert info.value.source == str(path)


def test_toml_error_at_end_of_document() -> None:
    with pytest.raises(ConfigError) as info:
        parse('[db]\npath = "x"\nlevel =')
    assert str(info.value) == f"invalid TOML in {SRC} at end of document (line 3): Invalid value"
    assert info.value.line == 3


def test_duplicate_key_is_a_toml_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse('[db]\npath = "x"\npath = "y"\n')
    assert str(info.value).startswith(f"invalid TOML in {SRC}")
    assert info.value.line is not None


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(b'[db]\npath = "x"\n# \xff\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"config file {path} is not valid UTF-8 (at line 3)"
    assert info.value.line == 3


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load_config(path).db.path == tmp_path / "state.db"


# --- the shipped example ---------------------------------------------------------------------------


def test_example_config_loads() -> None:
    cfg = load_config(REPO / "examples" / "agent.toml")
    assert cfg.db.path == REPO / "data" / "agent.db"
    assert cfg.db.schema_paths == (REPO / "schemas",)
    assert cfg.admin.path == REPO / "data" / "admin.sock"
    assert cfg.api.addr == Addr("127.0.0.1", 8080)


def test_docs_example_config_loads(tmp_path: Path) -> None:
    """The full example in docs/config.md is valid and sets every key."""
    text = (REPO / "docs" / "config.md").read_text()
    start = text.index("```toml\n", text.index("## Full example")) + len("```toml\n")
    example = text[start : text.index("```", start)]
    cfg = parse_config(example, "docs/config.md", tmp_path)
    defaults = parse_config('[db]\npath = "x"\n', "defaults", tmp_path)
    for section in ("api", "gossip", "telemetry", "log", "perf"):
        assert getattr(cfg, section) != getattr(defaults, section), section
    assert cfg.db.schema_paths and cfg.admin.path != defaults.admin.path


# --- [gossip]: the cluster -------------------------------------------------------------------------------

GOSSIP_KEY = "3m9R62nrN4jwIBJtngCTwraECKYovAITzKF9x8WPg/s="


def test_gossip_runs_only_with_a_gossip_section() -> None:
    assert parse(MINIMAL).gossip.enabled is False
    assert Config.for_db("/tmp/x.db").gossip.enabled is False
    cfg = parse(MINIMAL + "[gossip]\n")
    assert cfg.gossip.enabled is True
    assert cfg.gossip.keyring_path == Path("/srv/vd/keyring.json")  # beside the database
    assert (cfg.gossip.profile, cfg.gossip.region, cfg.gossip.fault_injection) == ("lan", "", False)
    assert cfg.gossip.key is None and cfg.gossip.external_addr is None


def test_gossip_cluster_keys() -> None:
    cfg = parse(
        MINIMAL
        + f"""
        [gossip]
        addr = "0.0.0.0:7000"
        external-addr = "10.0.0.5:7000"
        key = "{GOSSIP_KEY}"
        keyring-path = "keys/ring.json"
        region = "ams"
        profile = "wan"
        fault-injection = true
        """
    )
    g = cfg.gossip
    assert g.external_addr == Addr("10.0.0.5", 7000)
    assert g.key == GOSSIP_KEY and g.keyring_path == Path("/srv/vd/keys/ring.json")
    assert (g.region, g.profile, g.fault_injection) == ("ams", "wan", True)
    assert GOSSIP_KEY not in repr(cfg)  # the key never lands in a log or a traceback


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[gossip]\nkey = "c2hvcnQ="\n',
            'invalid value for "gossip.key" in {src}: key decodes to 5 bytes; an AES key must be 16, 24 or 32 '
            "bytes (32 recommended)",
        ),
        (
            f'[gossip]\nkey = "{GOSSIP_KEY}"\nplaintext = true\n',
            'invalid value for "gossip.key" in {src}: a key and plaintext = true exclude each other; choose one',
        ),
        (
            '[gossip]\nprofile = "moon"\n',
            'invalid value for "gossip.profile" in {src}: "moon" is not one of "lan", "wan"',
        ),
        (
            '[gossip]\nregion = "a b"\n',
            'invalid value for "gossip.region" in {src}: at most 64 characters and no whitespace',
        ),
        (
            '[gossip]\nexternal-addr = "10.0.0.1:0"\n',
            'invalid value for "gossip.external-addr" in {src}: the port must be given (not 0)',
        ),
    ],
)
def test_gossip_key_errors(text: str, expected: str) -> None:
    assert errors(MINIMAL + text) == [expected.format(src=SRC)]


def test_gossip_key_error_never_echoes_the_key() -> None:
    secret = "not-base64-but-secret!"
    (problem,) = errors(MINIMAL + f'[gossip]\nkey = "{secret}"\n')
    assert secret not in problem and "gossip.key" in problem
