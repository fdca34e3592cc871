"""fly-replay: the header and JSON forms, fly-replay-src / fly-replay-failed, and the per-request session
(10 replays at most, 1 MiB replayable bodies, fallbacks) — examples from Fly's documentation, errors, and
properties (the parsers never raise on any input; format and parse are inverse)."""

from __future__ import annotations

import json
import random
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verdigris.proxy.balance import Balancer, Forward, Route, RouteRequest
from verdigris.proxy.errors import ErrorCode, Reject
from verdigris.proxy.replay import (
    MAX_REPLAY_BODY,
    MAX_REPLAY_JSON,
    REPLAY_FAILED_HEADER,
    REPLAY_SRC_HEADER,
    Deliver,
    ReadReplayBody,
    Replay,
    ReplayDirective,
    ReplayError,
    ReplaySession,
    Responder,
    Transform,
    format_duration,
    is_replay_content_type,
    parse_duration,
    parse_replay_header,
    parse_replay_json,
    parse_replay_src,
    replay_failed_header,
    replay_src_header,
)
from verdigris.proxy.table import RoutingTable

WHO = Responder("m1", "web", "ams")


def ok(value: str) -> ReplayDirective:
    d = parse_replay_header(value)
    assert isinstance(d, ReplayDirective), (value, d)
    return d


def err(value: str) -> str:
    d = parse_replay_header(value)
    assert isinstance(d, ReplayError), (value, d)
    return d.reason


# ------------------------------------------------------------------------------------------------ header form


def test_header_examples_from_flys_docs() -> None:
    assert ok("region=sjc") == ReplayDirective(regions=("sjc",))
    assert ok('region="iad,ord,us,na"').regions == ("iad", "ord", "us", "na")
    assert ok('region="sjc,any"').regions == ("sjc", "any")
    assert ok("instance=00bb33ff") == ReplayDirective(instance="00bb33ff")
    assert ok("app=app-in-same-org") == ReplayDirective(app="app-in-same-org")
    assert ok('region="sjc,any";app=target-app') == ReplayDirective(regions=("sjc", "any"), app="target-app")
    assert ok("app=my-worker;timeout=10s;fallback=force_self") == ReplayDirective(
        app="my-worker", timeout=10.0, fallback="force_self"
    )
    assert ok("app=my-worker;timeout=2s").timeout == 2.0
    assert ok("instance=x;timeout=5s;fallback=prefer_self").fallback == "prefer_self"
    assert ok("elsewhere=true") == ReplayDirective(elsewhere=True)
    assert ok("prefer_instance=abc;state=hello") == ReplayDirective(prefer_instance="abc", state="hello")


def test_header_syntax_is_tolerant_where_unambiguous() -> None:
    assert ok(" Region = SJC ; ; app=web ;").regions == ("sjc",)  # whitespace, case, empty elements
    assert ok("region=iad,ord").regions == ("iad", "ord")  # unquoted list: ';' separates fields anyway
    assert ok('region="iad, ord, iad"').regions == ("iad", "ord")  # spaces and duplicates
    assert ok('app=web;state="a;b=c,\\"d\\" \\\\e"').state == 'a;b=c,"d" \\e'
    assert ok("app=web;ELSEWHERE=False").elsewhere is False
    d = ok("app=web;cache=x;allow_bypass=1")
    assert d.ignored == ("allow_bypass", "cache")


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("", "no target"),
        ("state=x", "no target"),
        ("timeout=1s;fallback=force_self", "no target"),
        ("elsewhere=false", "no target"),
        ("region", "no value"),
        ("region;app=x", "no value"),
        ("=sjc", "field name"),
        ("re gion=sjc", "field name"),
        ("region=sjc;region=iad", "twice"),
        ('region="sjc', "unterminated"),
        ('state="a\\', "unterminated"),
        ('region="sjc" x', "after the quoted"),
        ('region=sj"c', "stray"),
        ("region=", "not a region"),
        ('region=""', "not a region"),
        ("region=s!c", "not a region"),
        ('region="iad,,ord"', "not a region"),
        ("region=" + ",".join(f"r{i}" for i in range(17)), "more than 16"),
        ("instance=a b", "not a valid name"),
        ("instance=../x", "not a valid name"),
        ("app=" + "a" * 200, "not a valid name"),
        ("instance=a;prefer_instance=b", "mutually exclusive"),
        ("app=x;elsewhere=yes", "true or false"),
        ("app=x;timeout=10", "duration"),
        ("app=x;timeout=0s", "not in"),
        ("app=x;timeout=2h", "not in"),
        ("app=x;timeout=-1s", "duration"),
        ("app=x;timeout=1e3s", "duration"),
        ("app=x;timeout=١s", "not allowed"),
        ("app=x;fallback=self", "force_self or prefer_self"),
        ("app=x;transform=y", "JSON form"),
        ("app=x;state=\x01", "not allowed"),
        ("app=x\r\nset-cookie: a=b", "not allowed"),
        ("app=x;state=" + "s" * 3000, "longer than"),
        ("app=" + "x" * 9000, "longer than"),
    ],
)
def test_header_errors_are_clear(value: str, needle: str) -> None:
    assert needle in err(value)


def test_durations() -> None:
    assert parse_duration("800ms") == 0.8
    assert parse_duration("1m30s") == 90.0
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("1h") == 3600.0
    assert parse_duration("250000us") == 0.25
    assert parse_duration(".5s") == 0.5
    for bad in ("", "s", "10", "1s2", "1 s", "1.5.5s", "10x", "1m 30s", "01:00"):
        assert isinstance(parse_duration(bad), ReplayError), bad
    for v in (0.8, 10.0, 0.001, 1.2345, 1e-7, 3599.999999):
        assert parse_duration(format_duration(v)) == v, v


# ------------------------------------------------------------------------------------------------ JSON form


def test_json_examples() -> None:
    body = {"app": "example-app", "region": "syd", "cache": {"prefix": "/some/path/*", "ttl": 30}}
    d = parse_replay_json(json.dumps(body).encode())
    assert d == ReplayDirective(regions=("syd",), app="example-app", ignored=("cache",))
    d = parse_replay_json(
        json.dumps(
            {"instance": "fly-machine-2", "state": "browser:list", "timeout": "5s", "fallback": "prefer_self"}
        ).encode()
    )
    assert d == ReplayDirective(
        instance="fly-machine-2", state="browser:list", timeout=5.0, fallback="prefer_self"
    )
    d = parse_replay_json(
        json.dumps(
            {
                "app": "api",
                "region": ["iad", "any"],
                "elsewhere": True,
                "timeout": 2.5,
                "state": None,
                "transform": {
                    "path": "/v1/items?x=1",
                    "set_headers": [{"name": "X-Tenant", "value": " acme "}],
                    "delete_headers": ["Cookie"],
                },
            }
        ).encode()
    )
    assert d == ReplayDirective(
        regions=("iad", "any"),
        app="api",
        elsewhere=True,
        timeout=2.5,
        transform=Transform("/v1/items?x=1", (("x-tenant", "acme"),), ("cookie",)),
    )


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"", "not JSON"),
        (b"\xff", "not JSON"),
        (b"[1]", "not an object"),
        (b"{}", "no target"),
        (b'{"app": 1}', "not a valid name"),
        (b'{"region": 5}', "string or a list"),
        (b'{"region": ["iad", 1]}', "not a string"),
        (b'{"region": []}', "empty"),
        (b'{"app": "x", "elsewhere": "true"}', None),  # a string is accepted as in the header form
        (b'{"app": "x", "elsewhere": 1}', "true or false"),
        (b'{"app": "x", "timeout": true}', "duration"),
        (b'{"app": "x", "timeout": Infinity}', "not in"),
        (b'{"app": "x", "timeout": -1}', "not in"),
        (b'{"app": "x", "state": 1}', "must be a string"),
        (b'{"app": "x", "state": "caf\\u00e9"}', "printable ASCII"),
        (b'{"app": "x", "transform": []}', "must be an object"),
        (b'{"app": "x", "transform": {"path": "x"}}', "starting with '/'"),
        (b'{"app": "x", "transform": {"path": "/a b"}}', "not allowed"),
        (b'{"app": "x", "transform": {"set_headers": {}}}', "must be lists"),
        (b'{"app": "x", "transform": {"set_headers": ["a"]}}', "{name, value}"),
        (b'{"app": "x", "transform": {"set_headers": [{"name": "a b", "value": ""}]}}', "not a header name"),
        (b'{"app": "x", "transform": {"set_headers": [{"name": "Host", "value": "e"}]}}', "cannot be changed"),
        (b'{"app": "x", "transform": {"set_headers": [{"name": "Fly-Replay-Src", "value": "e"}]}}', "cannot be changed"),
        (b'{"app": "x", "transform": {"delete_headers": ["Content-Length"]}}', "cannot be changed"),
        (b'{"app": "x", "transform": {"delete_headers": ["X-Forwarded-For"]}}', "cannot be changed"),
        (b'{"app": "x", "transform": {"set_headers": [{"name": "a", "value": "x\\r\\ny: z"}]}}', "not a valid header value"),
        (b'{"app": "x", "transform": {"delete_headers": ' + json.dumps(["a"] * 65).encode() + b"}}", "more than 64"),
        (b"[" * 100_000, "larger than"),
        (b"[" * 50_000 + b"]" * 50_000, "larger than"),
        (b"[" * 30_000 + b"]" * 30_000, "not JSON"),  # too deep: a clear error, not a crash
        (b'{"app": "x", "n": 1' + b"0" * 5000 + b"}", "not JSON"),
    ],
)  # fmt: skip
def test_json_errors_are_clear(body: bytes, needle: str | None) -> None:
    d = parse_replay_json(body)
    if needle is None:
        assert isinstance(d, ReplayDirective)
    else:
        assert isinstance(d, ReplayError) and needle in d.reason, d


def test_content_type() -> None:
    assert is_replay_content_type("application/vnd.fly.replay+json")
    assert is_replay_content_type("Application/VND.fly.replay+JSON; charset=utf-8")
    assert not is_replay_content_type("application/json")
    assert not is_replay_content_type("")


# ------------------------------------------------------------------------------------------------ src / failed


def test_replay_src_header() -> None:
    v = replay_src_header("m1", "ams", 1_700_000_000_123_456, "user=42;x")
    assert v == 'instance=m1;region=ams;t=1700000000123456;state="user=42;x"'
    assert parse_replay_src(v) == {
        "instance": "m1",
        "region": "ams",
        "t": "1700000000123456",
        "state": "user=42;x",
    }
    assert replay_src_header("m1", "ams", 5) == "instance=m1;region=ams;t=5"
    assert replay_src_header("m1", "ams", 5, "plain-token") == "instance=m1;region=ams;t=5;state=plain-token"
    assert replay_src_header("m\n1", "ams", 5) == 'instance="m?1";region=ams;t=5'  # never a broken header
    assert isinstance(parse_replay_src("t=1;t=2"), ReplayError)


def test_replay_failed_header() -> None:
    d = ok('app=worker;region="iad,ord";instance=m9')
    v = replay_failed_header(ErrorCode.NO_HEALTHY_INSTANCE, d, 7)
    assert parse_replay_src(v) == {
        "reason": "no_healthy_instance", "app": "worker", "region": "iad,ord", "instance": "m9", "t": "7",
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ session


def test_session_delivers_ordinary_responses() -> None:
    s = ReplaySession("web")
    assert s.response([("content-type", "text/html")], WHO, now_us=1) == Deliver()
    assert s.response([], WHO, now_us=1) == Deliver()
    # Two content types are not a replay announcement.
    two = [("content-type", "application/vnd.fly.replay+json"), ("Content-Type", "text/plain")]
    assert s.response(two, WHO, now_us=1) == Deliver()


def test_session_replays_with_src_and_counts() -> None:
    s = ReplaySession("web")
    d = s.response([("Fly-Replay", "region=iad;elsewhere=true;state=s1;timeout=800ms")], WHO, now_us=99)
    assert isinstance(d, Replay)
    assert d.app == "web" and d.attempt == 1 and d.timeout == 0.8 and not d.fallback
    assert d.route == RouteRequest(regions=("iad",), exclude=frozenset({"m1"}))
    assert d.set_headers == ((REPLAY_SRC_HEADER, "instance=m1;region=ams;t=99;state=s1"),)
    for n in range(2, 11):
        d = s.response([("fly-replay", "app=other")], Responder(f"m{n}", "web", "fra"), now_us=n)
        assert isinstance(d, Replay) and d.attempt == n and d.app == "other"
    d = s.response([("fly-replay", "app=other")], WHO, now_us=11)
    assert isinstance(d, Reject) and d.code is ErrorCode.REPLAY_LIMIT_EXCEEDED and d.status == 502
    assert "11" in d.reason and "10" in d.reason
    # The limit also applies to JSON announcements (the body is not even read).
    d2 = s.response([("content-type", "application/vnd.fly.replay+json")], WHO, now_us=12)
    assert isinstance(d2, Reject) and d2.code is ErrorCode.REPLAY_LIMIT_EXCEEDED


def test_session_json_body_flow_and_transform() -> None:
    s = ReplaySession("web")
    d = s.response([("content-type", "application/vnd.fly.replay+json")], WHO, now_us=1)
    assert d == ReadReplayBody(MAX_REPLAY_JSON)
    body = {"app": "api", "transform": {"path": "/x", "set_headers": [{"name": "a", "value": "b"}],
                                        "delete_headers": ["cookie"]}}  # fmt: skip
    r = s.replay_body(json.dumps(body).encode(), WHO, now_us=2)
    assert isinstance(r, Replay) and r.app == "api" and r.path == "/x"
    assert r.set_headers == ((REPLAY_SRC_HEADER, "instance=m1;region=ams;t=2"), ("a", "b"))
    assert r.delete_headers == ("cookie",)
    bad = s.replay_body(b"{", WHO, now_us=3)
    assert isinstance(bad, Reject) and bad.code is ErrorCode.BAD_REPLAY and "m1" in bad.reason


def test_session_bad_replays() -> None:
    s = ReplaySession("web")
    d = s.response([("fly-replay", "region=")], WHO, now_us=1)
    assert (
        isinstance(d, Reject) and d.status == 502 and d.code is ErrorCode.BAD_REPLAY and "region" in d.reason
    )
    d = s.response([("fly-replay", "app=a"), ("fly-replay", "app=b")], WHO, now_us=1)
    assert isinstance(d, Reject) and "more than one" in d.reason
    assert s.replays == 0


def test_session_body_limits() -> None:
    big = ReplaySession("web", body_length=MAX_REPLAY_BODY + 1)
    assert not big.body_replayable
    d = big.response([("fly-replay", "app=x")], WHO, now_us=1)
    assert isinstance(d, Reject) and d.status == 413 and d.code is ErrorCode.REPLAY_BODY_TOO_LARGE
    assert ReplaySession("web", body_length=MAX_REPLAY_BODY).body_replayable  # exactly 1 MiB is fine
    chunked = ReplaySession("web")
    assert chunked.body_received(MAX_REPLAY_BODY)
    assert not chunked.body_received(1)  # the server stops buffering...
    d = chunked.response([("fly-replay", "app=x")], WHO, now_us=1)
    assert isinstance(d, Reject) and d.code is ErrorCode.REPLAY_BODY_TOO_LARGE  # ...and never replays a stub
    assert chunked.response([("x", "y")], WHO, now_us=1) == Deliver()  # an ordinary answer still goes through


def test_session_fallback_force_self() -> None:
    s = ReplaySession("web")
    d = s.response([("fly-replay", "app=worker;timeout=5s;fallback=force_self")], WHO, now_us=10)
    assert isinstance(d, Replay) and d.timeout == 5.0
    failure = Reject(503, ErrorCode.NO_HEALTHY_INSTANCE, "no usable instance of worker")
    f = s.target_failed(failure, now_us=20)
    assert isinstance(f, Replay) and f.fallback and f.app == "web"
    assert f.route == RouteRequest(force_instance="m1")
    headers = dict(f.set_headers)
    assert headers[REPLAY_SRC_HEADER] == "instance=m1;region=ams;t=10"
    assert parse_replay_src(headers[REPLAY_FAILED_HEADER]) == {
        "reason": "no_healthy_instance",
        "app": "worker",
        "t": "20",
    }
    # Once fallen back, the request cannot be replayed again.
    d2 = s.response([("fly-replay", "app=worker")], WHO, now_us=30)
    assert isinstance(d2, Reject) and d2.code is ErrorCode.REPLAY_AFTER_FALLBACK
    # And if the origin cannot take it either, the client gets the failure.
    f2 = s.target_failed(Reject(503, ErrorCode.INSTANCE_UNAVAILABLE, "instance m1 is stopped"), now_us=40)
    assert (
        isinstance(f2, Reject) and f2.code is ErrorCode.INSTANCE_UNAVAILABLE and "replay failed" in f2.reason
    )


def test_session_fallback_prefer_self_and_no_fallback() -> None:
    s = ReplaySession("web")
    s.response([("fly-replay", "region=iad;fallback=prefer_self")], WHO, now_us=1)
    f = s.target_failed(Reject(504, ErrorCode.UPSTREAM_TIMEOUT, "timed out"), now_us=2)
    assert isinstance(f, Replay) and f.route == RouteRequest(prefer_instance="m1")
    plain = ReplaySession("web")
    plain.response([("fly-replay", "region=iad")], WHO, now_us=1)
    f = plain.target_failed(Reject(504, ErrorCode.UPSTREAM_TIMEOUT, "timed out"), now_us=2)
    assert isinstance(f, Reject) and f.status == 504 and f.code is ErrorCode.UPSTREAM_TIMEOUT
    never = ReplaySession("web").target_failed(Reject(502, ErrorCode.UPSTREAM_REFUSED, "x"), now_us=1)
    assert isinstance(never, Reject) and never.code is ErrorCode.UPSTREAM_REFUSED


def test_session_refuses_other_organizations() -> None:
    orgs = {"web": "acme", "api": "acme", "evil": "other"}
    s = ReplaySession("web", org_of=orgs.get)
    assert isinstance(s.response([("fly-replay", "app=api")], WHO, now_us=1), Replay)
    d = s.response([("fly-replay", "app=evil")], WHO, now_us=1)
    assert isinstance(d, Reject) and d.code is ErrorCode.REPLAY_FORBIDDEN
    # An unknown app is left to routing (no_such_app), where a fallback can still apply.
    assert isinstance(s.response([("fly-replay", "app=ghost")], WHO, now_us=1), Replay)


def test_replay_routes_through_the_balancer() -> None:
    t = RoutingTable()
    t.load("apps", [("web", "acme", "requests", 0, 0), ("api", "acme", "requests", 0, 0)])
    t.load("machines", [("m1", "web", "ams", "started", "h:1"), ("m2", "web", "ams", "started", "h:2"),
                        ("a1", "api", "iad", "started", "h:3")])  # fmt: skip
    b = Balancer(t, "ams", rng=random.Random(0))
    s = ReplaySession("web")
    r = s.response([("fly-replay", "elsewhere=true")], WHO, now_us=1)
    assert isinstance(r, Replay)
    for _ in range(10):
        d = b.choose(r.app, r.route, now=0, acquire=False)
        assert isinstance(d, Route) and d.instance.id == "m2"
    r = s.response([("fly-replay", "app=api")], WHO, now_us=2)
    assert isinstance(r, Replay)
    d2 = b.choose(r.app, r.route, now=0)
    assert isinstance(d2, Forward) and (d2.region, d2.app) == ("iad", "api")


# ------------------------------------------------------------------------------------------------ properties

HEADER_ALPHABET = ';=", \\\t' + string.ascii_letters + string.digits + "_-.:"
KEYS = ["region", "instance", "prefer_instance", "app", "elsewhere", "state", "timeout", "fallback", "x"]


@settings(max_examples=1000)
@given(st.one_of(st.text(), st.text(alphabet=HEADER_ALPHABET)))
def test_header_parser_never_raises(value: str) -> None:
    d = parse_replay_header(value)
    assert isinstance(d, ReplayDirective | ReplayError)
    assert isinstance(parse_replay_src(value), dict | ReplayError)


@settings(max_examples=1000)
@given(st.lists(st.tuples(st.sampled_from(KEYS), st.text(alphabet=HEADER_ALPHABET, max_size=12)), max_size=6))
def test_header_parser_never_raises_on_field_soup(fields: list[tuple[str, str]]) -> None:
    d = parse_replay_header(";".join(f"{k}={v}" for k, v in fields))
    assert isinstance(d, ReplayDirective | ReplayError)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=1000)
@given(
    st.one_of(
        st.binary(max_size=100),
        st.dictionaries(st.sampled_from([*KEYS, "transform"]), json_values, max_size=5).map(
            lambda d: json.dumps(d).encode()
        ),
        st.fixed_dictionaries(
            {"app": st.just("x")},
            optional={"transform": st.dictionaries(st.sampled_from(["path", "set_headers", "delete_headers"]), json_values)},
        ).map(lambda d: json.dumps(d).encode()),
    )
)  # fmt: skip
def test_json_parser_never_raises(body: bytes) -> None:
    assert isinstance(parse_replay_json(body), ReplayDirective | ReplayError)


names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,20}", fullmatch=True)
printable = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E) | st.just("\t"), max_size=40
)
directives = st.builds(
    ReplayDirective,
    regions=st.lists(st.from_regex(r"[a-z0-9][a-z0-9-]{0,8}", fullmatch=True), max_size=4, unique=True).map(
        tuple
    ),
    instance=st.none() | names,
    app=st.none() | names,
    elsewhere=st.booleans(),
    state=st.none() | printable,
    timeout=st.none() | st.floats(min_value=1e-6, max_value=3600, allow_nan=False),
    fallback=st.sampled_from([None, "force_self", "prefer_self"]),
).filter(lambda d: bool(d.regions or d.instance or d.app or d.elsewhere))


@settings(max_examples=1000)
@given(directives)
def test_header_format_and_parse_are_inverse(d: ReplayDirective) -> None:
    assert parse_replay_header(d.to_header()) == d


@settings(max_examples=500)
@given(names, st.from_regex(r"[a-z]{3}", fullmatch=True), st.integers(0, 2**63), st.none() | printable)
def test_replay_src_round_trips(instance: str, region: str, t: int, state: str | None) -> None:
    expected = {"instance": instance, "region": region, "t": str(t)}
    if state is not None:
        expected["state"] = state
    assert parse_replay_src(replay_src_header(instance, region, t, state)) == expected


responses = st.lists(
    st.one_of(
        st.just([("fly-replay", "app=web;fallback=force_self")]),
        st.just([("fly-replay", "elsewhere=true")]),
        st.just([("content-type", "application/vnd.fly.replay+json")]),
        st.just([("fly-replay", "nonsense")]),
        st.lists(
            st.tuples(st.sampled_from(["fly-replay", "Content-Type", "x"]), st.text(max_size=15)), max_size=3
        ),
        st.just("fail"),
    ),
    max_size=30,
)


@settings(max_examples=500)
@given(responses, st.integers(0, 3 * MAX_REPLAY_BODY))
def test_session_never_exceeds_the_replay_limit(script: list[Any], body: int) -> None:
    s = ReplaySession("web")
    s.body_received(body)
    replays = fallbacks = 0
    for item in script:
        if item == "fail":
            d: Any = s.target_failed(Reject(503, ErrorCode.NO_HEALTHY_INSTANCE, "x"), now_us=1)
        else:
            d = s.response(item, WHO, now_us=1)
            if isinstance(d, ReadReplayBody):
                d = s.replay_body(b'{"region": "iad"}', WHO, now_us=1)
        if isinstance(d, Replay):
            if d.fallback:
                fallbacks += 1
            else:
                replays += 1
                assert body <= MAX_REPLAY_BODY  # never a replay of a body that was not kept
    assert replays <= 10 and fallbacks <= 1 and s.replays == replays
