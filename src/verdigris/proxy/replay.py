"""``fly-replay``: an app's answer "send this request somewhere else", parsed and enforced as pure decisions.

An instance may answer a request with a ``fly-replay`` response header (``region=sjc;state=x``) or with a
JSON body of content type ``application/vnd.fly.replay+json`` (``{"app": "worker", "timeout": "5s"}``).
The proxy then sends the *same* request again to the target it names, adding ``fly-replay-src`` (who
asked, from where, when, and the app's ``state``). The response that asked is never shown to the client.

Fields (both forms; semantics as Fly.io documents them):

=================== ==============================================================================
``region``          regions to try in order, comma-separated (quoted in the header form: ``"iad,ord"``);
                    ``any`` = anywhere, the usual order. Only these regions without ``any``.
``instance``        exactly this instance (forced: no other will do).
``prefer_instance`` this instance if it can take the request, else any of the target app's.
``app``             another app of the same organization (default: the app that answered).
``elsewhere``       ``true``: not the instance that answered (in the next choice only).
``state``           a string echoed to the target in ``fly-replay-src``.
``timeout``         how long to try to reach the target (``800ms``, ``10s``, ``1m30s``).
``fallback``        ``force_self`` (back to the instance that asked, or an error) or ``prefer_self``
                    (that instance if possible, else any of its app's) when the target is unreachable;
                    the request then carries ``fly-replay-failed`` and cannot be replayed again.
``transform``       (JSON only) ``path``, ``set_headers`` [{name, value}], ``delete_headers`` [names]:
                    changes to the replayed request.
=================== ==============================================================================

Unknown fields (``cache``, ``allow_bypass``, future ones) are ignored and listed in
:attr:`ReplayDirective.ignored`. Anything malformed is a :class:`ReplayError` *value*: the parsers and the
session never raise on any input (the tests feed them arbitrary text), and the server answers the client
with a clear 502 ``bad_replay``.

The :class:`ReplaySession` is the per-request state machine: it counts replays (at most
``max_replays``, 10), tracks whether the request body is still replayable (kept up to 1 MiB; a larger
body that gets a replay answer is a 413 ``replay_body_too_large``, never a truncated request), remembers
who asked for the last replay (for ``fallback``), and turns each upstream answer into one of
:class:`Deliver`, :class:`ReadReplayBody`, :class:`Replay` or :class:`~verdigris.proxy.errors.Reject`.
The server does all the I/O, including routing each :class:`Replay` with
:meth:`~verdigris.proxy.balance.Balancer.choose` and reporting a failure to reach the target with
:meth:`ReplaySession.target_failed`.
"""

from __future__ import annotations

import decimal
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias

from verdigris.proxy.balance import ANY_REGION, INSTANCE_ID_RE, REGION_RE, RouteRequest
from verdigris.proxy.errors import ErrorCode, Reject

REPLAY_HEADER: Final = "fly-replay"
REPLAY_SRC_HEADER: Final = "fly-replay-src"
REPLAY_FAILED_HEADER: Final = "fly-replay-failed"
REPLAY_CONTENT_TYPE: Final = "application/vnd.fly.replay+json"

MAX_REPLAYS: Final = 10
MAX_REPLAY_BODY: Final = 1024 * 1024
"""Request bodies up to this size are kept for a replay (Fly: "requests larger than 1MB cannot be replayed")."""
MAX_REPLAY_JSON: Final = 64 * 1024
"""Largest replay JSON body read from an app (it is buffered to be parsed)."""
MAX_HEADER_VALUE: Final = 8 * 1024
MAX_STATE: Final = 2048
MAX_REGIONS: Final = 16
MAX_TIMEOUT: Final = 3600.0
MAX_TRANSFORM_HEADERS: Final = 64

Fallback: TypeAlias = Literal["force_self", "prefer_self"]

_KEY_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
_PLAIN_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-.^_`|~/:?@[]{}()<>"
)
"""Characters a parameter value may hold without quoting (visible ASCII except ``" \\ ; , =``)."""
_HEADER_NAME_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,128}")
_DURATION_RE: Final = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|ms|s|m|h)")
_UNIT: Final = {
    "ns": (1, 1e9),
    "us": (1, 1e6),
    "µs": (1, 1e6),
    "ms": (1, 1e3),
    "s": (1, 1),
    "m": (60, 1),
    "h": (3600, 1),
}
"""Unit -> (multiplier, divisor): dividing by an exact power of ten rounds correctly, so that
``800ms`` is exactly the double nearest 0.8, as ``0.8s`` is."""
PROTECTED_HEADERS: Final = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "forwarded",
        "via",
    }
)
"""Request headers a replay ``transform`` may not set or delete: framing and hop-by-hop headers (a change
could desynchronise the request), and — with every ``fly-*`` and ``x-forwarded-*`` name — the headers the
proxy itself vouches for."""


# ------------------------------------------------------------------------------------------------ values


@dataclass(frozen=True, slots=True)
class ReplayError:
    """A malformed replay; ``reason`` says what and where."""

    reason: str

    def reject(self, who: str = "the app") -> Reject:
        return Reject(502, ErrorCode.BAD_REPLAY, f"{who} asked for a malformed replay: {self.reason}")


@dataclass(frozen=True, slots=True)
class Transform:
    """Changes to apply to the replayed request (JSON form only)."""

    path: str | None = None
    set_headers: tuple[tuple[str, str], ...] = ()
    delete_headers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ReplayDirective:
    """A parsed, validated replay request. ``regions == ()`` means no region was named."""

    regions: tuple[str, ...] = ()
    instance: str | None = None
    prefer_instance: str | None = None
    app: str | None = None
    elsewhere: bool = False
    state: str | None = None
    timeout: float | None = None
    fallback: Fallback | None = None
    transform: Transform | None = None
    ignored: tuple[str, ...] = ()

    def to_header(self) -> str:
        """The header form (``transform`` and ignored fields are JSON-only and left out)."""
        parts: list[tuple[str, str]] = []
        if self.regions:
            parts.append(("region", ",".join(self.regions)))
        for key, value in (
            ("instance", self.instance),
            ("prefer_instance", self.prefer_instance),
            ("app", self.app),
        ):
            if value is not None:
                parts.append((key, value))
        if self.elsewhere:
            parts.append(("elsewhere", "true"))
        if self.state is not None:
            parts.append(("state", self.state))
        if self.timeout is not None:
            parts.append(("timeout", format_duration(self.timeout)))
        if self.fallback is not None:
            parts.append(("fallback", self.fallback))
        return format_params(parts)

    def route(self, responder: str | None = None) -> RouteRequest:
        """The routing this directive asks for; ``responder`` is the instance that answered (excluded
        with ``elsewhere``)."""
        exclude = frozenset((responder,)) if self.elsewhere and responder else frozenset()
        return RouteRequest(
            regions=self.regions or (ANY_REGION,),
            force_instance=self.instance,
            prefer_instance=self.prefer_instance,
            exclude=exclude,
        )


# ------------------------------------------------------------------------------------------------ formatting


def _quote(value: str) -> str:
    if value and all(c in _PLAIN_CHARS for c in value):
        return value
    out = ['"']
    for c in value:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\t" or " " <= c <= "~":
            out.append(c)
        else:
            out.append("?")  # never reached for validated values; keeps any header value safe
    out.append('"')
    return "".join(out)


def format_params(params: Iterable[tuple[str, str]]) -> str:
    """``key=value;key="quoted value"`` — values quoted when they hold anything but plain characters."""
    return ";".join(f"{k}={_quote(v)}" for k, v in params)


def format_duration(seconds: float) -> str:
    """A duration :func:`parse_duration` reads back exactly: whole milliseconds as ``ms``, else seconds
    written positionally (never in exponent notation, which durations do not have)."""
    ms = seconds * 1000.0
    if ms.is_integer() and ms / 1000.0 == seconds:
        return f"{int(ms)}ms"
    return f"{decimal.Decimal(repr(seconds)):f}s"


def _bad_chars(value: str) -> str | None:
    for c in value:
        if c != "\t" and not (" " <= c <= "~"):
            return f"character {c!r} is not allowed"
    return None


def parse_params(value: str) -> list[tuple[str, str]] | ReplayError:
    """Split ``key=value;key="quoted"`` (the syntax of ``fly-replay`` and ``fly-replay-src``) into
    ``(lower-case key, value)`` pairs. Empty elements are skipped; keys must be tokens; quoted values
    take backslash escapes. Never raises."""
    if len(value) > MAX_HEADER_VALUE:
        return ReplayError(f"header value longer than {MAX_HEADER_VALUE} characters")
    bad = _bad_chars(value)
    if bad is not None:
        return ReplayError(bad)
    out: list[tuple[str, str]] = []
    i, n = 0, len(value)
    while i < n:
        while i < n and value[i] in " \t":
            i += 1
        if i < n and value[i] == ";":
            i += 1
            continue
        if i >= n:
            break
        j = i
        while j < n and value[j] not in "=;":
            j += 1
        key = value[i:j].strip(" \t").lower()
        if not key or any(c not in _KEY_CHARS for c in key):
            return ReplayError(f"malformed field name {value[i:j].strip()[:64]!r}")
        if j >= n or value[j] == ";":
            return ReplayError(f"field {key!r} has no value")
        j += 1
        while j < n and value[j] in " \t":
            j += 1
        if j < n and value[j] == '"':
            j += 1
            buf: list[str] = []
            while True:
                if j >= n:
                    return ReplayError(f"unterminated quoted value of {key!r}")
                c = value[j]
                if c == "\\":
                    if j + 1 >= n:
                        return ReplayError(f"unterminated quoted value of {key!r}")
                    buf.append(value[j + 1])
                    j += 2
                elif c == '"':
                    j += 1
                    break
                else:
                    buf.append(c)
                    j += 1
            while j < n and value[j] in " \t":
                j += 1
            if j < n and value[j] != ";":
                return ReplayError(f"unexpected text after the quoted value of {key!r}")
            val = "".join(buf)
        else:
            k = value.find(";", j)
            k = n if k < 0 else k
            val = value[j:k].strip(" \t")
            if '"' in val or "\\" in val:
                return ReplayError(f"stray quote or backslash in the value of {key!r}")
            j = k
        out.append((key, val))
        i = j
    return out


def replay_src_header(instance: str, region: str, t_us: int, state: str | None = None) -> str:
    """The ``fly-replay-src`` value added to a replayed request: the instance that asked, its region,
    the time of the replay (microseconds since the Unix epoch, passed in) and the app's ``state``.
    ``state`` comes last and is quoted when it holds ``;``, ``,``, ``"``, spaces and the like."""
    parts = [("instance", instance), ("region", region), ("t", str(t_us))]
    if state is not None:
        parts.append(("state", state))
    return format_params(parts)


def parse_replay_src(value: str) -> dict[str, str] | ReplayError:
    """Read a ``fly-replay-src`` (or ``fly-replay-failed``) value back into a dict. Never raises."""
    params = parse_params(value)
    if isinstance(params, ReplayError):
        return params
    out: dict[str, str] = {}
    for k, v in params:
        if k in out:
            return ReplayError(f"field {k!r} given twice")
        out[k] = v
    return out


def replay_failed_header(code: ErrorCode | str, directive: ReplayDirective, t_us: int) -> str:
    """The ``fly-replay-failed`` value sent with a fallback: why the replay failed (an error code),
    what it was aimed at, and when (microseconds since the Unix epoch). Fly does not specify the format;
    ours uses the same ``key=value;...`` syntax as ``fly-replay-src``."""
    parts = [("reason", str(code))]
    if directive.app is not None:
        parts.append(("app", directive.app))
    if directive.regions:
        parts.append(("region", ",".join(directive.regions)))
    if directive.instance is not None:
        parts.append(("instance", directive.instance))
    if directive.prefer_instance is not None:
        parts.append(("prefer_instance", directive.prefer_instance))
    parts.append(("t", str(t_us)))
    return format_params(parts)


# ------------------------------------------------------------------------------------------------ parsing


def parse_duration(text: str) -> float | ReplayError:
    """``800ms``, ``10s``, ``1m30s``, ``1.5s`` (Go's syntax; units ns us µs ms s m h) -> seconds,
    0 < t <= :data:`MAX_TIMEOUT`."""
    t = text.strip()
    if not t or len(t) > 32:
        return ReplayError(f"timeout {text[:40]!r} is not a duration like '800ms' or '10s'")
    pos, total = 0, 0.0
    for m in _DURATION_RE.finditer(t):
        if m.start() != pos:
            break
        mul, div = _UNIT[m.group(2)]
        total += float(m.group(1)) * mul / div
        pos = m.end()
    if pos != len(t):
        return ReplayError(f"timeout {text[:40]!r} is not a duration like '800ms' or '10s'")
    return _check_timeout(total, text)


def _check_timeout(seconds: float, text: object) -> float | ReplayError:
    if not (math.isfinite(seconds) and 0.0 < seconds <= MAX_TIMEOUT):
        return ReplayError(f"timeout {str(text)[:40]!r} is not in (0, {MAX_TIMEOUT:g} s]")
    return seconds


def parse_replay_header(value: str) -> ReplayDirective | ReplayError:
    """Parse one ``fly-replay`` header value. Never raises."""
    params = parse_params(value)
    if isinstance(params, ReplayError):
        return params
    fields: dict[str, object] = {}
    for k, v in params:
        if k in fields:
            return ReplayError(f"field {k!r} given twice")
        fields[k] = v
    return _directive(fields, json_form=False)


def is_replay_content_type(value: str) -> bool:
    """Whether a response's Content-Type announces a replay JSON body (parameters ignored)."""
    return value.split(";", 1)[0].strip(" \t").lower() == REPLAY_CONTENT_TYPE


def parse_replay_json(body: bytes) -> ReplayDirective | ReplayError:
    """Parse a replay JSON body (content type :data:`REPLAY_CONTENT_TYPE`). Never raises."""
    if len(body) > MAX_REPLAY_JSON:
        return ReplayError(f"replay body larger than {MAX_REPLAY_JSON} bytes")
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        return ReplayError(f"replay body is not JSON: {str(e)[:200]}")
    if not isinstance(doc, dict):
        return ReplayError(f"replay body is JSON {type(doc).__name__}, not an object")
    return _directive({k: v for k, v in doc.items() if v is not None}, json_form=True)


def _ident(value: object, key: str) -> str | ReplayError:
    if not isinstance(value, str) or not INSTANCE_ID_RE.fullmatch(value):
        return ReplayError(f"{key} {str(value)[:64]!r} is not a valid name")
    return value


def _regions(value: object) -> tuple[str, ...] | ReplayError:
    if isinstance(value, str):
        items: list[object] = list(value.split(","))
    elif isinstance(value, list):
        items = list(value)
    else:
        return ReplayError(f"region must be a string or a list, not {type(value).__name__}")
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            return ReplayError(f"region {str(item)[:40]!r} is not a string")
        r = item.strip(" \t").lower()
        if not REGION_RE.fullmatch(r):
            return ReplayError(f"region {item[:40]!r} is not a region code")
        if r not in out:
            out.append(r)
    if not out:
        return ReplayError("region is empty")
    if len(out) > MAX_REGIONS:
        return ReplayError(f"more than {MAX_REGIONS} regions")
    return tuple(out)


def _header_name(value: object, where: str) -> str | ReplayError:
    if not isinstance(value, str) or not _HEADER_NAME_RE.fullmatch(value):
        return ReplayError(f"{where}: {str(value)[:64]!r} is not a header name")
    low = value.lower()
    if low in PROTECTED_HEADERS or low.startswith(("fly-", "x-forwarded-")):
        return ReplayError(f"{where}: header {value!r} cannot be changed by a replay")
    return low


def _transform(value: object) -> Transform | ReplayError:
    if not isinstance(value, dict):
        return ReplayError("transform must be an object")
    path = value.get("path")
    if path is not None:
        if not isinstance(path, str) or not path.startswith("/") or len(path) > MAX_HEADER_VALUE:
            return ReplayError(f"transform.path {str(path)[:64]!r} must be a string starting with '/'")
        if any(not ("!" <= c <= "~") or c == "#" for c in path):
            return ReplayError(
                f"transform.path {path[:64]!r} holds a character not allowed in a request target"
            )
    sets: list[tuple[str, str]] = []
    raw_sets = value.get("set_headers")
    raw_deletes = value.get("delete_headers")
    raw_sets = [] if raw_sets is None else raw_sets
    raw_deletes = [] if raw_deletes is None else raw_deletes
    if not isinstance(raw_sets, list) or not isinstance(raw_deletes, list):
        return ReplayError("transform.set_headers and transform.delete_headers must be lists")
    if len(raw_sets) + len(raw_deletes) > MAX_TRANSFORM_HEADERS:
        return ReplayError(f"transform changes more than {MAX_TRANSFORM_HEADERS} headers")
    for item in raw_sets:
        if not isinstance(item, dict):
            return ReplayError("transform.set_headers items must be {name, value} objects")
        name = _header_name(item.get("name"), "transform.set_headers")
        if isinstance(name, ReplayError):
            return name
        hv = item.get("value")
        if not isinstance(hv, str) or len(hv) > MAX_HEADER_VALUE or _bad_chars(hv) is not None:
            return ReplayError(f"transform.set_headers: the value of {name!r} is not a valid header value")
        sets.append((name, hv.strip(" \t")))
    deletes: list[str] = []
    for item in raw_deletes:
        name = _header_name(item, "transform.delete_headers")
        if isinstance(name, ReplayError):
            return name
        deletes.append(name)
    return Transform(path, tuple(sets), tuple(deletes))


_KNOWN: Final = frozenset(
    {"region", "instance", "prefer_instance", "app", "elsewhere", "state", "timeout", "fallback", "transform"}
)


def _directive(fields: Mapping[str, object], *, json_form: bool) -> ReplayDirective | ReplayError:
    regions: tuple[str, ...] = ()
    ids: dict[str, str | None] = {"instance": None, "prefer_instance": None, "app": None}
    elsewhere = False
    state: str | None = None
    timeout: float | None = None
    fallback: Fallback | None = None
    transform: Transform | None = None
    if "region" in fields:
        r = _regions(fields["region"])
        if isinstance(r, ReplayError):
            return r
        regions = r
    for key in ids:
        if key in fields:
            v = _ident(fields[key], key)
            if isinstance(v, ReplayError):
                return v
            ids[key] = v
    if "elsewhere" in fields:
        e = fields["elsewhere"]
        if isinstance(e, bool):
            elsewhere = e
        elif isinstance(e, str) and e.lower() in ("true", "false"):
            elsewhere = e.lower() == "true"
        else:
            return ReplayError(f"elsewhere must be true or false, not {str(e)[:40]!r}")
    if "state" in fields:
        s = fields["state"]
        if not isinstance(s, str):
            return ReplayError("state must be a string")
        if len(s) > MAX_STATE:
            return ReplayError(f"state longer than {MAX_STATE} characters")
        bad = _bad_chars(s)
        if bad is not None:
            return ReplayError(f"state: {bad} (printable ASCII only: it is echoed in a header)")
        state = s
    if "timeout" in fields:
        t = fields["timeout"]
        if isinstance(t, str):
            d = parse_duration(t)
        elif isinstance(t, int | float) and not isinstance(t, bool) and json_form:
            d = _check_timeout(float(t), t)
        else:
            d = ReplayError(f"timeout {str(t)[:40]!r} is not a duration like '800ms' or '10s'")
        if isinstance(d, ReplayError):
            return d
        timeout = d
    if "fallback" in fields:
        f = fields["fallback"]
        if f == "force_self":
            fallback = "force_self"
        elif f == "prefer_self":
            fallback = "prefer_self"
        else:
            return ReplayError(f"fallback must be force_self or prefer_self, not {str(f)[:40]!r}")
    if "transform" in fields:
        if not json_form:
            return ReplayError("transform is only accepted in the JSON form")
        tr = _transform(fields["transform"])
        if isinstance(tr, ReplayError):
            return tr
        transform = tr
    if ids["instance"] is not None and ids["prefer_instance"] is not None:
        return ReplayError("instance and prefer_instance are mutually exclusive")
    if not (regions or ids["instance"] or ids["prefer_instance"] or ids["app"] or elsewhere):
        return ReplayError("names no target (region, instance, prefer_instance, app or elsewhere=true)")
    ignored = tuple(sorted(str(k)[:64] for k in fields if k not in _KNOWN))[:32]
    return ReplayDirective(
        regions=regions,
        instance=ids["instance"],
        prefer_instance=ids["prefer_instance"],
        app=ids["app"],
        elsewhere=elsewhere,
        state=state,
        timeout=timeout,
        fallback=fallback,
        transform=transform,
        ignored=ignored,
    )


# ------------------------------------------------------------------------------------------------ session


@dataclass(frozen=True, slots=True)
class Responder:
    """The instance whose response is being looked at (the server knows it: it routed there, or the
    proxy of another region said so)."""

    instance: str
    app: str
    region: str


@dataclass(frozen=True, slots=True)
class Deliver:
    """Not a replay: send the response to the client."""


@dataclass(frozen=True, slots=True)
class ReadReplayBody:
    """The response announces a replay JSON body: read at most ``limit`` bytes of it, then call
    :meth:`ReplaySession.replay_body` (a longer body is a ``bad_replay``)."""

    limit: int


@dataclass(frozen=True, slots=True)
class Replay:
    """Send the buffered request again: to app ``app`` routed as ``route`` (with
    :meth:`~verdigris.proxy.balance.Balancer.choose`), trying for at most ``timeout`` seconds (``None``:
    the server's default), with ``set_headers`` replacing any header of the same name,
    ``delete_headers`` removed and the path replaced by ``path`` when set. ``fallback`` marks the return
    to the instance that asked, which may not be replayed again."""

    app: str
    route: RouteRequest
    timeout: float | None
    set_headers: tuple[tuple[str, str], ...]
    delete_headers: tuple[str, ...] = ()
    path: str | None = None
    attempt: int = 1
    fallback: bool = False


SessionDecision: TypeAlias = Deliver | ReadReplayBody | Replay | Reject
_DELIVER: Final = Deliver()
"""The one :class:`Deliver` (immutable, no fields): not a new object per response."""


@dataclass
class _Pending:
    directive: ReplayDirective
    responder: Responder
    src: str


@dataclass
class ReplaySession:
    """Replay bookkeeping for one client request. See the module docstring.

    ``org_of(app)`` (optional) gives an app's organization, to refuse replays across organizations;
    ``body_length`` is the request's Content-Length when known (``None`` for chunked bodies, which are
    counted with :meth:`body_received`).
    """

    app: str
    org_of: Callable[[str], str | None] | None = None
    body_length: int | None = None
    max_replays: int = MAX_REPLAYS
    max_body: int = MAX_REPLAY_BODY
    replays: int = 0
    body_seen: int = 0
    fallback_used: bool = False
    _pending: _Pending | None = field(default=None, repr=False)

    @property
    def body_replayable(self) -> bool:
        """Whether the request body is (still) small enough to be kept for a replay."""
        if self.body_length is not None and self.body_length > self.max_body:
            return False
        return self.body_seen <= self.max_body

    def body_received(self, nbytes: int) -> bool:
        """Count ``nbytes`` more of the request body; True while the server should keep buffering it."""
        self.body_seen += max(nbytes, 0)
        return self.body_replayable

    def response(
        self, headers: Sequence[tuple[str, str]], responder: Responder, *, now_us: int
    ) -> SessionDecision:
        """Decide what to do with an upstream response, from its headers (names in any case)."""
        replay_values: list[str] = []
        content_types: list[str] = []
        for name, value in headers:
            low = name.lower()
            if low == REPLAY_HEADER:
                replay_values.append(value)
            elif low == "content-type":
                content_types.append(value)
        if not replay_values:
            if len(content_types) == 1 and is_replay_content_type(content_types[0]):
                return self._gate(responder) or ReadReplayBody(MAX_REPLAY_JSON)
            return _DELIVER
        gate = self._gate(responder)
        if gate is not None:
            return gate
        if len(replay_values) > 1:
            return ReplayError("more than one fly-replay header").reject(_who(responder))
        directive = parse_replay_header(replay_values[0])
        if isinstance(directive, ReplayError):
            return directive.reject(_who(responder))
        return self._replay(directive, responder, now_us)

    def replay_body(self, body: bytes, responder: Responder, *, now_us: int) -> Replay | Reject:
        """The replay JSON body announced by a :class:`ReadReplayBody` decision."""
        gate = self._gate(responder)
        if gate is not None:
            return gate
        directive = parse_replay_json(body)
        if isinstance(directive, ReplayError):
            return directive.reject(_who(responder))
        return self._replay(directive, responder, now_us)

    def target_failed(self, failure: Reject, *, now_us: int) -> Replay | Reject:
        """The last :class:`Replay` could not reach its target (``failure``: the balancer's refusal, a
        connect failure, the replay timeout...). With a ``fallback``, go back to the instance that asked,
        once; otherwise the client gets ``failure``, its reason saying it was a replay."""
        pending = self._pending
        if pending is None or pending.directive.fallback is None or self.fallback_used:
            return Reject(failure.status, failure.code, f"replay failed: {failure.reason}")
        self.fallback_used = True
        d, who = pending.directive, pending.responder
        if d.fallback == "force_self":
            route = RouteRequest(force_instance=who.instance)
        else:
            route = RouteRequest(prefer_instance=who.instance)
        failed = replay_failed_header(failure.code, d, now_us)
        return Replay(
            app=who.app,
            route=route,
            timeout=None,
            set_headers=((REPLAY_SRC_HEADER, pending.src), (REPLAY_FAILED_HEADER, failed)),
            attempt=self.replays,
            fallback=True,
        )

    def _gate(self, responder: Responder) -> Reject | None:
        who = _who(responder)
        if self.fallback_used:
            return Reject(
                502,
                ErrorCode.REPLAY_AFTER_FALLBACK,
                f"{who} asked to replay a request that already fell back",
            )
        if self.replays >= self.max_replays:
            return Reject(
                502,
                ErrorCode.REPLAY_LIMIT_EXCEEDED,
                f"{who} asked for replay {self.replays + 1}; at most {self.max_replays} are allowed",
            )
        if not self.body_replayable:
            return Reject(
                413,
                ErrorCode.REPLAY_BODY_TOO_LARGE,
                f"{who} asked for a replay, but the request body is larger than {self.max_body} bytes",
            )
        return None

    def _replay(self, d: ReplayDirective, who: Responder, now_us: int) -> Replay | Reject:
        if d.app is not None and d.app != who.app and self.org_of is not None:
            mine, theirs = self.org_of(who.app), self.org_of(d.app)
            if mine is not None and theirs is not None and mine != theirs:
                return Reject(
                    502,
                    ErrorCode.REPLAY_FORBIDDEN,
                    f"{_who(who)} asked to replay to app {d.app}, which belongs to another organization",
                )
        src = replay_src_header(who.instance, who.region, now_us, d.state)
        self.replays += 1
        self._pending = _Pending(d, who, src)
        set_headers: list[tuple[str, str]] = [(REPLAY_SRC_HEADER, src)]
        delete_headers: tuple[str, ...] = ()
        path = None
        if d.transform is not None:
            set_headers.extend(d.transform.set_headers)
            delete_headers = d.transform.delete_headers
            path = d.transform.path
        return Replay(
            app=d.app or who.app,
            route=d.route(who.instance),
            timeout=d.timeout,
            set_headers=tuple(set_headers),
            delete_headers=delete_headers,
            path=path,
            attempt=self.replays,
        )


def _who(r: Responder) -> str:
    return f"instance {r.instance} of {r.app}"


__all__ = [
    "MAX_REPLAYS",
    "MAX_REPLAY_BODY",
    "MAX_REPLAY_JSON",
    "PROTECTED_HEADERS",
    "REPLAY_CONTENT_TYPE",
    "REPLAY_FAILED_HEADER",
    "REPLAY_HEADER",
    "REPLAY_SRC_HEADER",
    "Deliver",
    "ReadReplayBody",
    "Replay",
    "ReplayDirective",
    "ReplayError",
    "ReplaySession",
    "Responder",
    "SessionDecision",
    "Transform",
    "format_duration",
    "format_params",
    "is_replay_content_type",
    "parse_duration",
    "parse_params",
    "parse_replay_header",
    "parse_replay_json",
    "parse_replay_src",
    "replay_failed_header",
    "replay_src_header",
]
