"""The agent's HTTP API, end to end: a real agent on a free 127.0.0.1 port with a real SQLite file.

Requests are made with plain aiohttp so that the wire format itself (Corrosion's) is what is checked;
the Python client and a standard-library "Corrosion client" are tested at the end.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from _api_util import SCHEMA, WAIT, Lines, free_port, short_dir, write_config
from verdigris.admin import admin_call
from verdigris.agent import Agent, AgentError
from verdigris.api.client import ApiError, CorrosionClient, StreamError
from verdigris.api.server import ApiSettings
from verdigris.api.wire import Change, Columns, EndOfQuery, Notify, Row
from verdigris.config import load_config

TOKEN = "s3cret-token"


async def start_agent(config_path: Path, **kwargs: Any) -> Agent:
    agent = Agent(load_config(config_path), **kwargs)
    await asyncio.wait_for(agent.start(), WAIT)
    return agent


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    a = await start_agent(write_config(tmp_path, max_body=64 * 1024))
    try:
        yield a
    finally:
        await asyncio.wait_for(a.stop(), WAIT)


@pytest.fixture
async def http(agent: Agent) -> AsyncIterator[Http]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
        yield Http(session, agent.api_url)


class Http:
    """Raw JSON requests against one agent."""

    def __init__(self, session: aiohttp.ClientSession, base: str, token: str | None = None) -> None:
        self.session = session
        self.base = base
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def post(self, path: str, body: Any = None, *, raw: bytes | None = None) -> tuple[int, Any]:
        kwargs: dict[str, Any] = {"data": raw} if raw is not None else {"json": body}
        async with self.session.post(self.base + path, headers=self.headers, **kwargs) as resp:
            text = await resp.text()
            return resp.status, _json_or_lines(text)

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(self.base + path, headers=self.headers) as resp:
            return resp.status, _json_or_lines(await resp.text())

    async def tx(self, *statements: Any) -> Any:
        status, body = await self.post("/v1/transactions", list(statements))
        assert status == 200, body
        return body

    async def query(self, statement: Any) -> list[Any]:
        status, events = await self.post("/v1/queries", statement)
        assert status == 200, events
        assert isinstance(events, list)
        return events

    async def rows(self, statement: Any) -> list[list[Any]]:
        return [e["row"][1] for e in await self.query(statement) if "row" in e]

    def stream(self, method: str, path: str, body: Any = None) -> Any:
        return self.session.request(
            method,
            self.base + path,
            json=body,
            headers=self.headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=WAIT),
        )


def _json_or_lines(text: str) -> Any:
    import json

    lines = [line for line in text.split("\n") if line.strip()]
    if len(lines) == 1:
        doc = json.loads(lines[0])
        # a one-event stream is still a list of events
        if isinstance(doc, dict) and len(doc) == 1 and next(iter(doc)) in ("columns", "eoq"):
            return [doc]
        return doc
    return [json.loads(line) for line in lines]


def insert_many(start: int, end: int) -> list[Any]:
    """One statement inserting apps n<start>..n<end - 1>."""
    return [
        "WITH RECURSIVE c(i) AS (SELECT ? UNION ALL SELECT i + 1 FROM c WHERE i + 1 < ?) "
        "INSERT INTO apps (name) SELECT 'n' || i FROM c",
        [start, end],
    ]


async def healthy(http: Http) -> None:
    status, body = await http.get("/v1/health")
    assert status == 200, body


# ---------------------------------------------------------------------------------------- transactions


async def test_every_statement_shape_in_one_transaction(http: Http, agent: Agent) -> None:
    body = await http.tx(
        "INSERT INTO apps (name, org) VALUES ('a', 'acme')",
        ["INSERT INTO apps (name, org) VALUES (?, ?)", ["b", "acme"]],
        ["INSERT INTO apps (name, org) VALUES (:name, :org)", {":name": "c", "org": "acme"}],
        {"query": "INSERT INTO apps (name, org) VALUES (?, ?)", "params": ["d", "beta"]},
        {
            "query": "INSERT INTO apps (name, org) VALUES ($name, @org)",
            "named_params": {"$name": "e", "@org": "x"},
        },
        {"query": "UPDATE apps SET config = 'on' WHERE org = 'acme'"},
    )
    assert [r["rows_affected"] for r in body["results"]] == [1, 1, 1, 1, 1, 3]
    assert all(isinstance(r["time"], float) for r in body["results"])
    assert isinstance(body["time"], float)
    assert body["version"] == 1
    assert agent.store is not None
    assert uuid.UUID(body["actor_id"]).bytes == agent.store.site_id
    rows = await http.rows("SELECT name, org, config FROM apps ORDER BY name")
    assert rows == [
        ["a", "acme", "on"],
        ["b", "acme", "on"],
        ["c", "acme", "on"],
        ["d", "beta", None],
        ["e", "x", None],
    ]
    # a second transaction is the next version; one that changes nothing makes none
    assert (await http.tx("DELETE FROM apps WHERE name = 'e'"))["version"] == 2
    unchanged = await http.tx("UPDATE apps SET org = org WHERE name = 'nobody'")
    assert unchanged["version"] is None
    assert unchanged["results"] == [{"rows_affected": 0, "time": unchanged["results"][0]["time"]}]


async def test_a_failing_statement_rolls_back_all(http: Http) -> None:
    await http.tx("INSERT INTO apps (name) VALUES ('keep')")
    status, body = await http.post(
        "/v1/transactions",
        [
            "INSERT INTO apps (name) VALUES ('x1')",
            "INSERT INTO apps (name) VALUES ('keep')",  # primary key conflict
            "INSERT INTO apps (name) VALUES ('x2')",
        ],
    )
    assert status == 400
    assert "statement 2" in body["error"] and "UNIQUE" in body["error"]
    # Corrosion's ExecResponse shape: the error is in results
    assert body["results"] == [{"error": body["error"]}]
    assert body["version"] is None
    assert await http.rows("SELECT name FROM apps ORDER BY name") == [["keep"]]
    await healthy(http)


async def test_values_round_trip_with_blobs_as_byte_arrays(http: Http) -> None:
    # "data" is a BLOB column: no type affinity, so every value keeps its type
    values: list[tuple[str, Any, Any, str]] = [
        ("blob", [0, 1, 255], [0, 1, 255], "blob"),
        ("empty", [], [], "blob"),
        ("big", 2**63 - 1, 2**63 - 1, "integer"),
        ("neg", -(2**63), -(2**63), "integer"),
        ("real", 1.5, 1.5, "real"),
        ("flag", True, 1, "integer"),
        ("json", {"a": [1, 2]}, '{"a":[1,2]}', "text"),
        ("list", [1, 300], "[1,300]", "text"),
        ("text", "héllo ✓", "héllo ✓", "text"),
        ("nul", None, None, "null"),
    ]
    await http.tx(
        *(["INSERT INTO apps (name, data) VALUES (?, ?)", [name, sent]] for name, sent, _, _ in values)
    )
    rows = await http.rows("SELECT name, data, typeof(data) FROM apps")
    assert sorted(rows, key=lambda r: r[0]) == sorted(
        ([n, got, t] for n, _, got, t in values), key=lambda r: r[0]
    )
    # blob parameters in queries too
    assert await http.rows(["SELECT name FROM apps WHERE data = ?", [[0, 1, 255]]]) == [["blob"]]
    assert await http.rows(["SELECT ?, ?", [[7], None]]) == [[[7], None]]


# ---------------------------------------------------------------------------------------- queries


async def test_query_stream_format(http: Http) -> None:
    await http.tx(
        ["INSERT INTO apps (name, org) VALUES (?, ?)", ["a", "x"]], "INSERT INTO apps (name) VALUES ('b')"
    )
    events = await http.query(["SELECT name, org FROM apps WHERE name >= ? ORDER BY name", ["a"]])
    assert events[0] == {"columns": ["name", "org"]}
    assert events[1:3] == [{"row": [1, ["a", "x"]]}, {"row": [2, ["b", ""]]}]
    assert list(events[3]) == ["eoq"] and list(events[3]["eoq"]) == ["time"]
    assert len(events) == 4
    # no rows: columns then eoq
    events = await http.query({"query": "SELECT name FROM apps WHERE name = :n", "named_params": {"n": "zz"}})
    assert events[0] == {"columns": ["name"]} and "eoq" in events[1] and len(events) == 2


async def test_large_results_are_streamed_in_order(http: Http) -> None:
    n = 20_000
    status, body = await http.post(
        "/v1/queries",
        f"WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < {n}) SELECT i, 'x' FROM c",
    )
    assert status == 200
    rows = [e["row"] for e in body if "row" in e]
    assert len(rows) == n
    assert rows[0] == [1, [1, "x"]] and rows[-1] == [n, [n, "x"]]
    assert "eoq" in body[-1]


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO apps (name) VALUES ('sneaky')",
        "DELETE FROM apps",
        "UPDATE apps SET org = 'x'",
        "PRAGMA user_version = 5",
        "ATTACH DATABASE ':memory:' AS other",
        "BEGIN",
        "CREATE TABLE t (x)",
    ],
)
async def test_queries_are_read_only(http: Http, sql: str) -> None:
    await http.tx("INSERT INTO apps (name) VALUES ('one')")
    status, body = await http.post("/v1/queries", sql)
    assert status == 400, body
    assert "read-only" in body["error"]
    assert await http.rows("SELECT name, org FROM apps") == [["one", ""]]
    assert await http.rows("PRAGMA user_version") == [[0]]
    await healthy(http)


async def test_query_timeout_interrupts(http: Http) -> None:
    status, body = await http.post(
        "/v1/queries?timeout=0.002",  # minutes, as in Corrosion: 0.12 s
        "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c) SELECT count(*) FROM c",
    )
    assert status == 408
    assert "timeout" in body["error"]
    await healthy(http)


# ---------------------------------------------------------------------------------------- bad input


BAD_INPUTS = [
    ("/v1/transactions", b"[\"INSERT INTO apps (name) VALUES ('x')\"", 400, "malformed JSON"),
    ("/v1/transactions", b"", 400, "empty body"),
    ("/v1/transactions", b'{"query": "SELECT 1"}', 400, "JSON array"),
    ("/v1/transactions", b"[]", 400, "at least 1 statement"),
    ("/v1/transactions", b"[42]", 400, "statement 1"),
    ("/v1/transactions", b'[["SELECT 1"]]', 400, "statement 1"),
    (
        "/v1/transactions",
        b'["INSERT INTO apps (name) VALUES (\'x\')", "INSERT INTO nope VALUES (1)"]',
        400,
        "no such table",
    ),
    (
        "/v1/transactions",
        b'["INSERT INTO apps (name) VALUES (\'x\')", "INSERT INTO apps (nam) VALUES (1)"]',
        400,
        "statement 2",
    ),
    ("/v1/transactions", b'["INSERTT INTO apps"]', 400, "syntax error"),
    ("/v1/transactions", b'[["INSERT INTO apps (name) VALUES (?)", 5]]', 400, "params must be an array"),
    ("/v1/transactions", b'[["INSERT INTO apps (name) VALUES (?)", [18446744073709551616]]]', 400, "64 bits"),
    ("/v1/transactions", b'[["INSERT INTO apps (name) VALUES (?)", []]]', 400, "wrong parameters"),
    ("/v1/transactions", b'[["INSERT INTO apps (name) VALUES (?)", ["a", "b"]]]', 400, "wrong parameters"),
    (
        "/v1/transactions",
        b'[{"query": "SELECT ?", "params": [1], "named_params": {"a": 1}}]',
        400,
        "not both",
    ),
    ("/v1/transactions", b'[{"sql": "SELECT 1"}]', 400, '"query"'),
    (
        "/v1/transactions",
        b"[\"INSERT INTO __vd_site (id, site_id) VALUES (1, x'00')\"]",
        400,
        "not authorized",
    ),
    ("/v1/transactions", b'["DROP TABLE apps"]', 400, "not authorized"),
    ("/v1/queries", b"{", 400, "malformed JSON"),
    ("/v1/queries", b"SELECT 1", 400, "malformed JSON"),
    ("/v1/queries", b'"SELEC 1"', 400, "syntax error"),
    ("/v1/queries", b'"SELECT * FROM nope"', 400, "no such table"),
    ("/v1/queries", b'"SELECT 1; SELECT 2"', 400, "one statement"),
    ("/v1/queries", b'["SELECT ?", {"x": 1}]', 400, "wrong parameters"),
    ("/v1/queries", b'["SELECT ?", [1, 2]]', 400, "wrong parameters"),
    ("/v1/queries", b'["SELECT ?", [1e400]]', 400, "malformed JSON"),
    ("/v1/subscriptions", b'"SELECT * FROM nope"', 400, "nope"),
    ("/v1/subscriptions", b"[1, 2]", 400, "statement"),
    ("/v1/subscriptions?from=abc", b'"SELECT name FROM apps"', 400, "from must be"),
    ("/v1/subscriptions?from=5", b'"SELECT name, org FROM apps"', 400, "no existing subscription"),
    ("/v1/table_stats", b'{"tables": "apps"}', 400, "tables"),
    ("/v1/table_stats", b'{"tables": [1]}', 400, "tables[0]"),
    ("/v1/updates/nope", b"", 404, "unknown table"),
    ("/v1/updates/__vd_site", b"", 404, "unknown table"),
    ("/v1/nothing", b"{}", 404, "Not Found"),
]


@pytest.mark.parametrize(("path", "body", "status", "message"), BAD_INPUTS)
async def test_bad_input_gets_a_json_error_and_changes_nothing(
    http: Http, agent: Agent, path: str, body: bytes, status: int, message: str
) -> None:
    got, doc = await http.post(path, raw=body)
    assert got == status, doc
    assert isinstance(doc, dict) and message in doc["error"], doc
    assert await http.rows("SELECT count(*) FROM apps") == [[0]]
    assert agent.store is not None and agent.store.db_version == 0
    await healthy(http)


async def test_wrong_method_and_oversized_body(http: Http) -> None:
    status, doc = await http.get("/v1/transactions")
    assert status == 405 and "error" in doc
    big = b'["' + b"x" * (70 * 1024) + b'"]'
    status, doc = await http.post("/v1/transactions", raw=big)
    assert status == 413 and "limit" in doc["error"]
    await healthy(http)
    await http.tx("INSERT INTO apps (name) VALUES ('still serving')")


async def test_bad_requests_are_counted(http: Http, agent: Agent) -> None:
    await http.post("/v1/transactions", raw=b"nope")
    text = agent.metrics.render().decode()
    assert 'verdigris_api_bad_requests_total{endpoint="/v1/transactions"} 1.0' in text
    assert 'verdigris_api_requests_total{endpoint="/v1/transactions",method="POST",status="400"} 1.0' in text


# ---------------------------------------------------------------------------------------- auth


async def test_bearer_token_is_required_everywhere(tmp_path: Path) -> None:
    agent = await start_agent(write_config(tmp_path, token=TOKEN))
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
            for token in (None, "wrong", TOKEN + "x"):
                anon = Http(session, agent.api_url, token)
                for method, path, body in [
                    ("POST", "/v1/transactions", ["INSERT INTO apps (name) VALUES ('x')"]),
                    ("POST", "/v1/queries", "SELECT 1"),
                    ("POST", "/v1/subscriptions", "SELECT name FROM apps"),
                    ("GET", "/v1/subscriptions/abc", None),
                    ("POST", "/v1/updates/apps", None),
                    ("GET", "/v1/health", None),
                    ("POST", "/v1/table_stats", {"tables": []}),
                ]:
                    async with session.request(
                        method, agent.api_url + path, json=body, headers=anon.headers
                    ) as resp:
                        assert resp.status == 401, (token, path)
                        assert resp.headers["WWW-Authenticate"] == "Bearer"
                        assert "bearer token" in (await resp.json())["error"]
            ok = Http(session, agent.api_url, TOKEN)
            await ok.tx("INSERT INTO apps (name) VALUES ('x')")
            assert await ok.rows("SELECT name FROM apps") == [["x"]]
            async with session.post(
                agent.api_url + "/v1/queries", json="SELECT 1", headers={"Authorization": f"bearer {TOKEN}"}
            ) as resp:
                assert resp.status == 200  # the scheme is case-insensitive
        assert agent.store is not None and agent.store.rows("apps") == [("x", "", None, None)]
    finally:
        await agent.stop()


# ---------------------------------------------------------------------------------------- subscriptions


async def test_subscription_rows_then_changes_then_resume(http: Http) -> None:
    await http.tx("INSERT INTO machines (id, app, state) VALUES ('m1', 'web', 'started')")
    sql = ["SELECT id, state FROM machines WHERE app = ?", ["web"]]
    async with http.stream("POST", "/v1/subscriptions", sql) as resp:
        assert resp.status == 200
        sub_id = resp.headers["corro-query-id"]
        uuid.UUID(sub_id)
        assert resp.headers["corro-query-hash"]
        events = Lines(resp)
        start = await events.until("eoq")
        assert start[0] == {"columns": ["id", "state"]}
        assert start[1] == {"row": [1, ["m1", "started"]]}
        change_id = start[2]["eoq"]["change_id"]
        assert isinstance(change_id, int)
        assert isinstance(start[2]["eoq"]["time"], float)

        # each change is awaited before the next commit: commits the matcher takes in one batch come out
        # as one diff (deletes, updates, inserts), not in commit order (docs/api.md, "Subscriptions")
        await http.tx("INSERT INTO machines (id, app, state) VALUES ('m2', 'web', 'created')")
        await http.tx(
            "INSERT INTO machines (id, app, state) VALUES ('other', 'db', 'created')"
        )  # not matched
        changes = [e["change"] for e in await events.take(1)]
        await http.tx("UPDATE machines SET state = 'stopped' WHERE id = 'm1'")
        changes += [e["change"] for e in await events.take(1)]
        await http.tx("DELETE FROM machines WHERE id = 'm2'")
        changes += [e["change"] for e in await events.take(1)]
        assert [c[3] for c in changes] == [change_id + 1, change_id + 2, change_id + 3]
        assert changes[0][0] == "insert" and changes[0][2] == ["m2", "created"]
        m2_rowid = changes[0][1]
        assert changes[1] == ["update", 1, ["m1", "stopped"], change_id + 2]
        assert changes[2] == ["delete", m2_rowid, ["m2", "created"], change_id + 3]
        assert await events.quiet()

    # same SQL again: the same subscription, rows as they are now
    async with http.stream("POST", "/v1/subscriptions", sql) as resp:
        assert resp.headers["corro-query-id"] == sub_id
        start = await Lines(resp).until("eoq")
        assert start[1:-1] == [{"row": [1, ["m1", "stopped"]]}]
        assert start[-1]["eoq"]["change_id"] == change_id + 3

    # resume from a change id: only the changes after it
    async with http.stream("GET", f"/v1/subscriptions/{sub_id}?from={change_id + 1}") as resp:
        assert resp.status == 200 and resp.headers["corro-query-id"] == sub_id
        events = Lines(resp)
        got = await events.take(2)
        assert [e["change"][3] for e in got] == [change_id + 2, change_id + 3]
        assert await events.quiet()
        await http.tx("INSERT INTO machines (id, app, state) VALUES ('m3', 'web', 'x')")
        assert (await events.next())["change"][0] == "insert"

    # GET without from: the rows again, then changes
    async with http.stream("GET", f"/v1/subscriptions/{sub_id}") as resp:
        events = Lines(resp)
        start = await events.until("eoq")
        assert start[0] == {"columns": ["id", "state"]}
        assert sorted(e["row"][1][0] for e in start if "row" in e) == ["m1", "m3"]
        await http.tx("DELETE FROM machines WHERE id = 'm1'")
        assert (await events.next())["change"][0] == "delete"

    # skip_rows: no rows, only changes from now on
    async with http.stream("GET", f"/v1/subscriptions/{sub_id}?skip_rows=true") as resp:
        events = Lines(resp)
        assert await events.quiet()
        await http.tx("INSERT INTO machines (id, app, state) VALUES ('m4', 'web', 'y')")
        first = await events.next()
        assert first["change"][0] == "insert" and first["change"][2] == ["m4", "y"]


async def test_subscription_errors(http: Http) -> None:
    status, body = await http.get("/v1/subscriptions/00000000-0000-0000-0000-000000000000")
    assert status == 404 and "could not find subscription" in body["error"]
    status, body = await http.post("/v1/subscriptions", "INSERT INTO apps (name) VALUES ('x')")
    assert status == 400
    async with http.stream("POST", "/v1/subscriptions", "SELECT name FROM apps") as resp:
        sub_id = resp.headers["corro-query-id"]
        await Lines(resp).until("eoq")
    # a change id that was never given out: an explicit error, never a silent gap
    async with http.stream("GET", f"/v1/subscriptions/{sub_id}?from=1000") as resp:
        rest = await Lines(resp).rest()
        assert len(rest) == 1 and "error" in rest[0], rest
    await healthy(http)


async def test_resume_from_a_change_no_longer_kept_is_an_error(http: Http, agent: Agent) -> None:
    assert agent.subs is not None
    async with http.stream("POST", "/v1/subscriptions", "SELECT name FROM apps") as resp:
        sub_id = resp.headers["corro-query-id"]
        await Lines(resp).until("eoq")
    sub = agent.subs.get(sub_id)
    assert sub is not None
    # more changes than the subscription keeps
    kept = 10_000
    for start in range(0, kept + 50, 2000):
        await http.tx(insert_many(start, min(start + 2000, kept + 50)))

    async def caught_up() -> None:
        while sub.change_id < kept + 50:
            await asyncio.sleep(0.02)

    await asyncio.wait_for(caught_up(), WAIT)
    async with http.stream("GET", f"/v1/subscriptions/{sub_id}?from=1") as resp:
        rest = await Lines(resp).rest()
        assert len(rest) == 1 and "error" in rest[0], rest[:3]


async def test_a_slow_subscriber_is_dropped_with_an_error(tmp_path: Path) -> None:
    agent = await start_agent(write_config(tmp_path), api_settings=ApiSettings(client_queue_events=5))
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
            http = Http(session, agent.api_url)
            async with http.stream("POST", "/v1/subscriptions", "SELECT name FROM apps") as resp:
                events = Lines(resp)
                await events.until("eoq")
                # one commit of 10 changes is more than the 5 this client may have pending
                await http.tx(insert_many(0, 10))
                rest = await events.rest()
                assert rest and "error" in rest[-1] and "too slow" in rest[-1]["error"]
            assert (
                'verdigris_api_slow_clients_total{endpoint="subscriptions"} 1.0'
                in agent.metrics.render().decode()
            )
            await healthy(http)
    finally:
        await agent.stop()


# ---------------------------------------------------------------------------------------- updates


async def test_updates_stream_primary_keys(http: Http) -> None:
    async with http.stream("POST", "/v1/updates/machines") as resp:
        assert resp.status == 200
        events = Lines(resp)
        assert await events.quiet()  # no snapshot: only what changes from now on
        await http.tx(
            "INSERT INTO machines (id, app) VALUES ('m1', 'web')",
            "INSERT INTO machines (id, app) VALUES ('m2', 'web')",
        )
        assert await events.take(2) == [{"notify": ["update", ["m1"]]}, {"notify": ["update", ["m2"]]}]
        await http.tx("INSERT INTO apps (name) VALUES ('other table')")
        await http.tx("UPDATE machines SET state = 'up' WHERE id = 'm2'")
        assert await events.next() == {"notify": ["update", ["m2"]]}
        await http.tx("DELETE FROM machines WHERE id = 'm1'")
        assert await events.next() == {"notify": ["delete", ["m1"]]}
        assert await events.quiet()


# ---------------------------------------------------------------------------------------- stats, health, metrics


async def test_table_stats(http: Http) -> None:
    await http.tx(
        "INSERT INTO apps (name) VALUES ('a'), ('b')",
        "INSERT INTO machines (id) VALUES ('m')",
    )
    status, body = await http.post("/v1/table_stats", {"tables": ["apps", "machines", "nope", "__vd_site"]})
    assert status == 200
    assert body == {"total_row_count": 3, "invalid_tables": ["nope", "__vd_site"]}
    status, body = await http.post("/v1/table_stats", {"tables": ["apps"]})
    assert body == {"total_row_count": 2, "invalid_tables": []}


async def test_health(http: Http) -> None:
    status, body = await http.get("/v1/health")
    assert status == 200
    assert body == {"response": {"gaps": 0, "members": 0, "p99_lag": 0.0, "queue_size": 0}}
    status, _ = await http.get("/v1/health?gaps=0&p99_lag=1.5&queue_size=10")
    assert status == 200
    status, body = await http.get("/v1/health?gaps=x")
    assert status == 400 and "gaps" in body["error"]


async def test_metrics_endpoint(tmp_path: Path) -> None:
    agent = await start_agent(write_config(tmp_path, prometheus_port=0))
    try:
        assert agent.metrics_addr is not None
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
            http = Http(session, agent.api_url)
            await http.tx("INSERT INTO apps (name) VALUES ('a')")
            url = f"http://127.0.0.1:{agent.metrics_addr.port}/metrics"
            async with session.get(url) as resp:
                assert resp.status == 200
                text = await resp.text()
        assert 'verdigris_api_transactions_total{result="committed"} 1.0' in text
        assert "verdigris_db_version 1.0" in text
        assert "verdigris_subscriptions 0.0" in text
        assert 'verdigris_api_request_duration_seconds_count{endpoint="/v1/transactions"} 1.0' in text
    finally:
        await agent.stop()


# ---------------------------------------------------------------------------------------- admin socket


async def test_reload_adds_a_column_live(http: Http, agent: Agent, tmp_path: Path) -> None:
    await http.tx("INSERT INTO apps (name) VALUES ('a')")
    async with http.stream("POST", "/v1/updates/apps") as resp:
        updates = Lines(resp)
        (tmp_path / "schema.sql").write_text(
            SCHEMA.replace("data   BLOB", "data   BLOB,\n    region TEXT NOT NULL DEFAULT 'ams'")
            + "\nCREATE TABLE regions (code TEXT NOT NULL PRIMARY KEY, name TEXT);\n"
        )
        path = agent.config.admin.path
        reply = await asyncio.to_thread(admin_call, path, {"cmd": "reload"})
        assert reply["ok"] and reply["changed"], reply
        assert reply["changes"]["new_columns"] == ["apps.region"]
        assert reply["changes"]["new_tables"] == ["regions"]
        assert await http.rows("SELECT name, region FROM apps") == [["a", "ams"]]
        await http.tx(
            "UPDATE apps SET region = 'cdg' WHERE name = 'a'", "INSERT INTO regions (code) VALUES ('cdg')"
        )
        assert await http.rows("SELECT region FROM apps") == [["cdg"]]
        assert await updates.next() == {"notify": ["update", ["a"]]}
    # unchanged files: nothing to do; a non-additive change: refused, nothing applied
    reply = await asyncio.to_thread(admin_call, agent.config.admin.path, {"cmd": "reload"})
    assert reply == {"ok": True, "changed": False, "changes": reply["changes"]}
    (tmp_path / "schema.sql").write_text(SCHEMA.replace("org    TEXT NOT NULL DEFAULT ''", "org INTEGER"))
    reply = await asyncio.to_thread(admin_call, agent.config.admin.path, {"cmd": "reload"})
    assert not reply["ok"] and "reload failed" in reply["error"]
    assert await http.rows("SELECT name, region FROM apps") == [["a", "cdg"]]


async def test_backup_is_consistent_while_writes_go_on(http: Http, agent: Agent, tmp_path: Path) -> None:
    await http.tx("INSERT INTO apps (name) VALUES ('first')")

    async def writer() -> int:
        n = 0
        while n < 200:
            await http.tx(["INSERT INTO machines (id, app) VALUES (?, 'w')", [f"m{n}"]])
            n += 1
        return n

    task = asyncio.create_task(writer())
    dest = tmp_path / "copy.db"
    reply = await asyncio.to_thread(admin_call, agent.config.admin.path, {"cmd": "backup", "path": str(dest)})
    assert reply["ok"] and reply["path"] == str(dest) and reply["bytes"] > 0, reply
    await asyncio.wait_for(task, WAIT)
    copy = sqlite3.connect(dest)
    try:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert copy.execute("SELECT name FROM apps").fetchall() == [("first",)]
        machines = copy.execute("SELECT count(*) FROM machines").fetchone()[0]
        # consistent: the books say exactly as many versions as there are transactions in the copy
        (top,) = copy.execute('SELECT max("end") FROM __vd_bookkeeping').fetchone()
        assert top == machines + 1
    finally:
        copy.close()
    bad = await asyncio.to_thread(
        admin_call, agent.config.admin.path, {"cmd": "backup", "path": "relative.db"}
    )
    assert not bad["ok"] and "absolute" in bad["error"]
    unknown = await asyncio.to_thread(admin_call, agent.config.admin.path, {"cmd": "explode"})
    assert not unknown["ok"] and "unknown command" in unknown["error"]


# ---------------------------------------------------------------------------------------- start-up errors


async def test_start_up_errors_are_one_line(tmp_path: Path) -> None:
    taken = free_port()
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", taken))
        s.listen()
        (tmp_path / "a").mkdir()
        with pytest.raises(AgentError, match=rf"cannot listen on 127\.0\.0\.1:{taken} \(api\.addr\)"):
            await start_agent(write_config(tmp_path / "a", port=taken))

    (tmp_path / "b").mkdir()
    with pytest.raises(AgentError, match="NOT NULL without a DEFAULT"):
        await start_agent(
            write_config(tmp_path / "b", schema="CREATE TABLE t (id TEXT PRIMARY KEY, x TEXT NOT NULL);")
        )

    (tmp_path / "c").mkdir()
    admin_dir = short_dir()
    first = await start_agent(write_config(tmp_path / "c", admin_dir=admin_dir))
    try:
        (tmp_path / "d").mkdir()
        with pytest.raises(AgentError, match="another agent is already running"):
            await start_agent(write_config(tmp_path / "d", admin_dir=admin_dir))
    finally:
        await first.stop()
    assert not (admin_dir / "admin.sock").exists()


# ---------------------------------------------------------------------------------------- clients


async def test_python_client(agent: Agent) -> None:
    async with CorrosionClient(agent.api_url) as client:
        response = await client.transaction(
            [
                ("INSERT INTO apps (name, data) VALUES (?, ?)", ["a", b"\x00\xff"]),
                "INSERT INTO apps (name) VALUES ('b')",
            ]
        )
        assert response.version == 1 and [r.rows_affected for r in response.results] == [1, 1]
        columns, rows = await client.rows(("SELECT name, data FROM apps WHERE name = ?", ["a"]))
        assert columns == ["name", "data"] and rows == [["a", b"\x00\xff"]]
        events = [e async for e in client.query("SELECT name FROM apps ORDER BY name")]
        assert (
            events[0] == Columns(["name"])
            and events[1] == Row(1, ["a"])
            and isinstance(events[-1], EndOfQuery)
        )

        with pytest.raises(ApiError) as err:
            await client.transaction(["INSERT INTO apps (name) VALUES ('a')"])
        assert err.value.status == 400 and "UNIQUE" in err.value.message

        async with client.subscribe("SELECT name FROM apps ORDER BY name") as sub:
            seen = [await asyncio.wait_for(sub.__anext__(), WAIT) for _ in range(4)]
            assert seen[0] == Columns(["name"]) and isinstance(seen[3], EndOfQuery)
            await client.transaction(["INSERT INTO apps (name) VALUES ('c')"])
            change = await asyncio.wait_for(sub.__anext__(), WAIT)
            assert isinstance(change, Change) and change.kind == "insert" and change.values == ["c"]
            sub_id, last = sub.id, sub.last_change_id
        assert last == change.change_id
        await client.transaction(["DELETE FROM apps WHERE name = 'b'"])
        async with client.subscribe_by_id(sub_id, from_=last) as resumed:
            change = await asyncio.wait_for(resumed.__anext__(), WAIT)
            assert isinstance(change, Change) and change.kind == "delete" and change.values == ["b"]
        async with client.subscribe_by_id(sub_id, from_=10**6) as broken:
            with pytest.raises(StreamError):
                await asyncio.wait_for(broken.__anext__(), WAIT)

        async with client.updates("apps") as updates:
            await client.transaction(["UPDATE apps SET org = 'x' WHERE name = 'a'"])
            assert await asyncio.wait_for(updates.__anext__(), WAIT) == Notify("update", ["a"])

        healthy_, info = await client.health(gaps=0)
        assert healthy_ and info["gaps"] == 0
        assert await client.table_stats(["apps", "nope"]) == (2, ["nope"])
        with pytest.raises(ApiError) as err:
            async with client.subscribe_by_id("nope"):
                pass
        assert err.value.status == 404


async def test_a_plain_corrosion_client_works(agent: Agent) -> None:
    path = Path(__file__).parent.parent / "examples" / "corrosion_client.py"
    spec = importlib.util.spec_from_file_location("corrosion_client", path)
    assert spec is not None and spec.loader is not None
    corro = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corro)
    base = agent.api_url

    def scenario() -> None:
        result = corro.transact(base, [["INSERT INTO apps (name, org) VALUES (?, ?)", ["demo", "acme"]]])
        assert result["version"] == 1 and result["results"][0]["rows_affected"] == 1
        events = corro.query(base, "SELECT name, org FROM apps")
        assert events[0] == {"columns": ["name", "org"]} and events[1] == {"row": [1, ["demo", "acme"]]}
        query_id, stream = corro.subscribe(base, "SELECT name FROM apps")
        first = [next(stream) for _ in range(3)]
        assert first[1] == {"row": [1, ["demo"]]} and "eoq" in first[2]
        corro.transact(base, ["INSERT INTO apps (name) VALUES ('two')"])
        change = next(stream)["change"]
        assert change[0] == "insert" and change[2] == ["two"]
        stream.close()
        corro.transact(base, ["DELETE FROM apps WHERE name = 'demo'"])
        resumed = corro.resume(base, query_id, change[3])
        assert next(resumed)["change"][:3] == ["delete", 1, ["demo"]]
        resumed.close()

    await asyncio.wait_for(asyncio.to_thread(scenario), WAIT)


# ---------------------------------------------------------------------------------------- bounds, shutdown


async def test_a_client_that_stops_reading_is_dropped(tmp_path: Path) -> None:
    """A query whose client never reads: the server's writes time out, the connection is dropped, the
    reader thread stops, and the agent keeps serving."""
    agent = await start_agent(write_config(tmp_path), api_settings=ApiSettings(write_timeout=0.5))
    try:
        assert agent.api_addr is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.api_addr.port, limit=1024)
        sock = writer.get_extra_info("socket")
        import socket

        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        body = (
            b'"WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 5000000) '
            b"SELECT i, printf('%0500d', i) FROM c\""
        )
        writer.write(
            b"POST /v1/queries HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        reader._transport.pause_reading()  # type: ignore[attr-defined]  # never read the response
        gauge = agent.metrics.active_streams.labels("queries")

        async def dropped() -> None:
            await asyncio.sleep(0.2)
            while gauge._value.get() > 0:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(dropped(), WAIT)
        assert 'verdigris_api_slow_clients_total{endpoint="queries"} 1.0' in agent.metrics.render().decode()
        writer.close()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
            http = Http(session, agent.api_url)
            await healthy(http)
            assert await http.rows("SELECT 1") == [[1]]
    finally:
        await asyncio.wait_for(agent.stop(), WAIT)


async def test_stop_ends_open_streams(tmp_path: Path) -> None:
    agent = await start_agent(write_config(tmp_path))
    stopped = False
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
            http = Http(session, agent.api_url)
            async with (
                http.stream("POST", "/v1/subscriptions", "SELECT name FROM apps") as sub,
                http.stream("POST", "/v1/updates/apps") as upd,
            ):
                await Lines(sub).until("eoq")
                await asyncio.wait_for(agent.stop(), WAIT)
                stopped = True
                assert await Lines(sub).rest() == []
                assert await Lines(upd).rest() == []
    finally:
        if not stopped:
            await agent.stop()


async def test_concurrent_transactions_get_distinct_versions(http: Http) -> None:
    results = await asyncio.gather(
        *(http.tx(["INSERT INTO apps (name) VALUES (?)", [f"a{i}"]]) for i in range(50))
    )
    assert sorted(r["version"] for r in results) == list(range(1, 51))
    assert await http.rows("SELECT count(*) FROM apps") == [[50]]


# ---------------------------------------------------------------------------------------- units


def test_wire_events_round_trip() -> None:
    from verdigris.api import wire

    events: list[wire.Event] = [
        wire.Columns(["a", "b"]),
        wire.Row(1, [None, 1, 1.5, "x", b"\x00\xff"]),
        wire.EndOfQuery(0.25),
        wire.EndOfQuery(0.25, 3),
        wire.Change("update", 2, ["y", b""], 4),
        wire.Notify("delete", ["k", 2]),
        wire.Error("boom"),
    ]
    lines = [wire.encode_event(e) for e in events]
    assert lines[1] == b'{"row":[1,[null,1,1.5,"x",[0,255]]]}\n'
    assert lines[2] == b'{"eoq":{"time":0.25}}\n'
    assert lines[4] == b'{"change":["update",2,["y",[]],4]}\n'
    assert [wire.decode_event(line) for line in lines] == events
    for bad in (b"[]", b'{"row": 1}', b'{"what": 1}', b'{"change": ["upsert", 1, [], 1]}', b"{"):
        with pytest.raises(wire.WireError):
            wire.decode_event(bad)


def test_statement_shapes_parse_the_same() -> None:
    from verdigris.api import wire
    from verdigris.store.types import Statement

    assert wire.parse_statement("SELECT 1") == Statement("SELECT 1")
    assert wire.parse_statement(["SELECT ?", [True, [1, 2], {"a": 1}]]) == Statement(
        "SELECT ?", params=[1, b"\x01\x02", '{"a":1}']
    )
    assert wire.parse_statement(["SELECT :a", {":a": 1}]) == Statement("SELECT :a", named_params={"a": 1})
    assert wire.parse_statement({"query": "SELECT :a", "named_params": {"@a": 1}}) == Statement(
        "SELECT :a", named_params={"a": 1}
    )
    with pytest.raises(wire.WireError, match="given twice"):
        wire.parse_statement(["SELECT :a", {":a": 1, "a": 2}])
    with pytest.raises(wire.WireError, match="empty SQL"):
        wire.parse_statement("  ")
    assert wire.statement_to_json(("SELECT ?", [b"\x01"])) == ["SELECT ?", [[1]]]


def test_json_logs(tmp_path: Path) -> None:
    import io
    import json
    import logging

    from verdigris.agent import configure_logging
    from verdigris.config import LogConfig

    out = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        configure_logging(LogConfig(level="info", format="json"), out)
        logging.getLogger("verdigris.test").info("hello %s", "there")
        logging.getLogger("verdigris.test").debug("not shown")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    (line,) = out.getvalue().splitlines()
    doc = json.loads(line)
    assert doc["level"] == "info" and doc["msg"] == "hello there" and doc["logger"] == "verdigris.test"
