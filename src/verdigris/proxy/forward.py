"""Forwarding across regions: a request with no usable instance here goes, in one hop, to a proxy of the
region that can serve it, which routes it locally (docs/proxy.md, "Forwarding across regions").

Both sides live here, and :class:`~verdigris.proxy.server.Worker` calls in:

* **Sending** (the *edge* proxy, which the client reached). A :class:`Remote` says where: one region
  (the balancer's :class:`~verdigris.proxy.balance.Forward`), or, for an instance this region's table does
  not know (``fly-force-instance-id`` / ``fly-prefer-instance-id`` or a replay's ``instance=`` /
  ``prefer_instance=``), the app's other regions nearest first: the first whose proxy does not answer
  "no such instance" has it. :meth:`Forwarder.exchange` picks a registered proxy of the region at random
  (another one after a connect failure, two attempts at most; passive health ejects failing ones), sends
  the request over a pooled keep-alive connection with the hop header and the shared peer token, and
  returns the response head. The edge keeps the request body (for replays) and the replay count: a
  ``fly-replay`` answer comes back unopened, naming the instance that asked, and is replayed here.
* **Receiving**. A request with the hop header *and* the right token is a peer's: routed with
  ``may_forward=False`` (a hop count over one is a 508 ``forward_loop``), its ``X-Forwarded-*`` /
  client IP / ``fly-replay-src`` headers kept as the edge set them, and its answer (a ``fly-replay``
  one too) passed back with ``verdigris-instance`` / ``-region`` / ``-app`` naming who answered. Without
  the right token, those headers are a client's: stripped, and the request routed as any other.
"""

from __future__ import annotations

import asyncio
import hmac
import random
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final, Literal

from verdigris.proxy.balance import (
    ANY_REGION,
    FORCE_INSTANCE_HEADER,
    FORCE_REGION_HEADER,
    PREFER_INSTANCE_HEADER,
    ROUTING_HEADERS,
    Forward,
    Route,
    RouteRequest,
    parse_routing_headers,
)
from verdigris.proxy.errors import ErrorCode, Reject
from verdigris.proxy.replay import REPLAY_FAILED_HEADER, REPLAY_SRC_HEADER, ReplaySession, Responder
from verdigris.proxy.table import PeerProxy
from verdigris.proxy.upstream import UpstreamConn, UpstreamError

if TYPE_CHECKING:
    from verdigris.proxy.server import ClientConnection, Request, Worker

PEER_KEY_PREFIX: Final = "peer:"
"""Keys of peer proxies in the worker's upstream pool and passive health (apart from instance ids)."""
MAX_PEER_ATTEMPTS: Final = 2
"""Proxies of one region tried for one request (another one only after a connect failure)."""
INSTANCE_HEADER: Final = b"verdigris-instance"
INSTANCE_REGION_HEADER: Final = b"verdigris-instance-region"
INSTANCE_APP_HEADER: Final = b"verdigris-instance-app"
PEER_RESPONSE_HEADERS: Final = frozenset({INSTANCE_HEADER, INSTANCE_REGION_HEADER, INSTANCE_APP_HEADER})
"""Set by a proxy answering a peer (who answered); never passed to a client, nor taken from an instance."""
EXCLUDE_HEADER: Final = b"verdigris-exclude-instance"
"""Peer request header: an instance not to use (a replay's ``elsewhere=true``), trusted from peers only."""

Mode = Literal["region", "force", "prefer"]


class ForwardFailed(Exception):
    """No proxy of the target region could be reached (or took the request): ``reject`` says why."""

    def __init__(self, reject: Reject) -> None:
        super().__init__(reject.reason)
        self.reject = reject


@dataclass(frozen=True, slots=True)
class Remote:
    """Send the request to a proxy of ``regions[0]`` (with ``search``: of each region in turn until one
    has ``instance``). ``mode``: what the forwarded request asks of that proxy: its region (``region``),
    the instance only (``force``), or the instance if it can (``prefer``). ``route``/``timeout``: the
    original routing, for the fall back of a ``prefer`` search that found nothing."""

    app: str
    regions: tuple[str, ...]
    instance: str | None
    mode: Mode
    route: RouteRequest
    timeout: float | None = None
    search: bool = False


@dataclass(slots=True)
class _Body:
    from_client: bool
    """The request body is still to be read from the client (the first exchange of a request)."""


class Forwarder:
    """One per worker: peer selection, the forwarded request's head, and the receiving side's checks."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        cfg = worker.config
        self.token = cfg.peer_token.encode() if cfg.peer_token else None
        self.enabled = self.token is not None
        h = cfg.headers
        self.hops_header = h.forwarded_hops.encode()
        self.token_header = h.peer_token.encode()
        self.self_id = cfg.proxy_id()
        self.rng = random.Random()
        self.kept_from_peer = frozenset(
            {
                b"x-forwarded-for",
                b"x-forwarded-proto",
                b"x-forwarded-port",
                h.client_ip.encode(),
                REPLAY_SRC_HEADER.encode(),
                REPLAY_FAILED_HEADER.encode(),
            }
        )
        """Internal request headers a peer sets for us (as the edge set them for the client)."""
        self.routing = frozenset(n.encode() for n in ROUTING_HEADERS)
        self.drop_to_instance = worker.drop_request - self.kept_from_peer
        """Dropped from a peer's request sent to a local instance (the edge's client headers kept)."""
        self.drop_to_peer = worker.drop_request | self.routing
        """Dropped from a request sent to a peer proxy (our own headers and the routing ones)."""

    # ---------------------------------------------------------------------------- receiving side

    def route_request(self, req: Request, headers: list[tuple[str, str]]) -> RouteRequest | Reject:
        """:func:`parse_routing_headers`, knowing peers: a request with the hop header and the right
        peer token is routed with ``may_forward=False`` (and ``req.forwarded`` set); a hop count over
        one is a 508 ``forward_loop``. Anything else is a client's request (hop headers ignored)."""
        if not self.enabled:
            return parse_routing_headers(headers)
        hops = self._peer_hops(req)
        if hops is None:
            return parse_routing_headers(headers)
        if hops > 1:
            return Reject(508, ErrorCode.FORWARD_LOOP, f"the request was already forwarded {hops} times")
        req.forwarded = hops
        rid_name = self.worker.config.headers.request_id.encode()
        for name, value in req.headers:
            if name == rid_name and 0 < len(value) <= 64:
                req.rid = value.decode("latin-1")  # one id for the request on both proxies
        route = parse_routing_headers(headers, may_forward=False)
        excluded = frozenset(v.decode("latin-1") for n, v in req.headers if n == EXCLUDE_HEADER)
        if isinstance(route, RouteRequest) and excluded:
            route = replace(route, exclude=route.exclude | excluded)
        return route

    def _peer_hops(self, req: Request) -> int | None:
        """The hop count of an authenticated peer request; ``None`` for a client's request."""
        token = hops = None
        for name, value in req.headers:
            if name == self.token_header:
                token = value
            elif name == self.hops_header:
                hops = value
        if token is None or hops is None or self.token is None:
            return None
        if not hmac.compare_digest(token.strip(), self.token):
            return None
        try:
            n = int(hops.strip())
        except ValueError:
            return 2  # a peer that sends garbage is not forwarded again either
        return max(n, 1)

    def upstream_head(
        self,
        client: ClientConnection,
        req: Request,
        extra_set: Iterable[tuple[str, str]],
        extra_delete: Iterable[str],
        path: bytes | None,
    ) -> bytes:
        """The head of a peer's request as sent to a local instance: the client headers the edge set
        (``X-Forwarded-*``, client IP, ``fly-replay-src``) are kept, ours added."""
        w = self.worker
        h = w.config.headers
        lines = [
            h.request_id.encode() + b": " + req.rid.encode(),
            h.region.encode() + b": " + w.config.region.encode(),
            self.hops_header + b": %d" % req.forwarded,  # set here, never a client's
        ]
        return w.build_head(req, self.drop_to_instance, lines, extra_set, extra_delete, path)

    def response_lines(self, req: Request) -> list[bytes]:
        """Added to an instance's answer to a peer's request: who answered (for ``fly-replay-src``)."""
        return [
            INSTANCE_HEADER + b": " + req.instance.encode(),
            INSTANCE_REGION_HEADER + b": " + req.region.encode(),
            INSTANCE_APP_HEADER + b": " + req.app.encode(),
        ]

    # ---------------------------------------------------------------------------- sending side

    def search(self, app: str | None, route: RouteRequest, timeout: float | None = None) -> Remote | None:
        """For a request naming an instance this region's table does not know (instances are regional
        state): the app's other regions, nearest first, to ask in turn. ``None`` otherwise."""
        iid = route.force_instance or route.prefer_instance
        if iid is None or not self.enabled or not route.may_forward or app is None:
            return None
        w = self.worker
        if w.table.instance(iid) is not None or w.table.app(app) is None:
            return None
        regions = w.balancer._remote_regions(app)
        if route.force_instance is None and ANY_REGION not in route.regions:
            regions = [r for r in regions if r in route.regions]
        if not regions:
            return None
        mode: Mode = "force" if route.force_instance is not None else "prefer"
        return Remote(app, tuple(regions), iid, mode, route, timeout, search=True)

    def plan(self, route: RouteRequest, fwd: Forward, timeout: float | None = None) -> Remote | Reject:
        """The :class:`Remote` for the balancer's :class:`Forward`."""
        if not route.may_forward:
            return Reject(508, ErrorCode.FORWARD_LOOP, f"{fwd.reason}, and the request was already forwarded")
        if not self.enabled:
            return Reject(
                503,
                ErrorCode.NO_HEALTHY_INSTANCE,
                f"{fwd.reason}; forwarding to region {fwd.region} needs [proxy] peer_token",
            )
        mode: Mode = "region"
        if fwd.instance is not None:
            mode = "force" if route.force_instance == fwd.instance else "prefer"
        return Remote(fwd.app, (fwd.region,), fwd.instance, mode, route, timeout)

    async def choose(
        self,
        app: str | None,
        route: RouteRequest,
        *,
        timeout: float | None = None,
        client: ClientConnection | None = None,
        host: str | None = None,
    ) -> Route | Remote | Reject:
        """Where a request (``client``/``host``: a client's first request) or a replay goes: an instance
        search, else the balancer's decision (waiting when it says Queue), a Forward made a Remote."""
        w = self.worker
        remote = self.search(app, route, timeout)
        if remote is not None:
            return remote
        if client is not None and host is not None:
            d = await w._decide_for_client(client, app, route, host)
        else:
            d = await w.decide(app or "", route, host=host, timeout=timeout)
        if isinstance(d, Forward):
            return self.plan(route, d, timeout)
        return d

    async def fall_back(self, remote: Remote) -> Route | Remote | Reject:
        """A search that found its instance nowhere: ``prefer`` routes as usual, ``force`` is a 404."""
        if remote.mode == "prefer":
            return await self.choose(
                remote.app, replace(remote.route, prefer_instance=None), timeout=remote.timeout
            )
        return Reject(
            404,
            ErrorCode.NO_SUCH_INSTANCE,
            f"app {remote.app} has no instance {remote.instance} here nor in {', '.join(remote.regions)}",
        )

    async def exchange(
        self,
        client: ClientConnection,
        req: Request,
        remote: Remote,
        first: bool,
        buffer: list[bytes],
        session: ReplaySession,
        extra_set: tuple[tuple[str, str], ...],
        extra_delete: tuple[str, ...],
        path: bytes | None,
    ) -> tuple[UpstreamConn, list[tuple[bytes, bytes]], Responder] | None:
        """Send the request to ``remote`` and read the response head; returns the connection, the
        headers meant for the client and who answered. ``None``: a search found the instance in none of
        the regions. Raises :class:`ForwardFailed` when no proxy could be reached."""
        w = self.worker
        body = _Body(first and req.has_body)
        failure: Reject | None = None
        for region in remote.regions:
            if req.has_body and not body.from_client and not session.body_replayable:
                raise ForwardFailed(
                    Reject(
                        502,
                        ErrorCode.UPSTREAM_BAD_RESPONSE,
                        f"the request body is too large to be sent again (to region {region})",
                    )
                )
            try:
                conn, headers = await self._to_region(
                    client, req, remote, region, first, body, buffer, session, extra_set, extra_delete, path
                )
            except ForwardFailed as e:
                if not remote.search:
                    raise
                failure = e.reject
                w.count("forward_search_unreachable")
                continue
            if remote.search and self._not_here(conn, headers, remote.mode):
                w.count("forward_search_miss")
                await w._discard(conn)
                continue
            req.app, req.region = remote.app, region
            responder = Responder("", remote.app, region)
            out: list[tuple[bytes, bytes]] = []
            rid = w.config.headers.request_id.encode()
            for name, value in headers:
                low = name.lower()
                if low == INSTANCE_HEADER:
                    responder = Responder(value.decode("latin-1"), responder.app, responder.region)
                elif low == INSTANCE_REGION_HEADER:
                    responder = Responder(responder.instance, responder.app, value.decode("latin-1"))
                    req.region = responder.region
                elif low == INSTANCE_APP_HEADER:
                    responder = Responder(responder.instance, value.decode("latin-1"), responder.region)
                elif low != rid:
                    out.append((name, value))
            return conn, out, responder
        if remote.mode == "force" and failure is not None:
            raise ForwardFailed(failure)
        return None

    @staticmethod
    def _not_here(conn: UpstreamConn, headers: list[tuple[bytes, bytes]], mode: Mode) -> bool:
        """In a search: the remote proxy's own error answer (no instance named) saying the instance is
        not there (``force``), or that it cannot take the request (``prefer``: any such error)."""
        code = None
        for name, value in headers:
            low = name.lower()
            if low == INSTANCE_HEADER:
                return False
            if low == b"fly-error-code":
                code = value.strip()
        if code is None:
            return False
        return mode == "prefer" or (conn.status == 404 and code == ErrorCode.NO_SUCH_INSTANCE.encode())

    def _peers(self, region: str) -> list[PeerProxy]:
        """The region's proxies in a random order, those ejected by passive health last."""
        w = self.worker
        now = asyncio.get_running_loop().time()
        peers = [p for p in w.table.proxies(region) if p.id != self.self_id]
        self.rng.shuffle(peers)
        peers.sort(key=lambda p: w.balancer.outliers.is_ejected(PEER_KEY_PREFIX + p.id, now))
        return peers

    async def _to_region(
        self,
        client: ClientConnection,
        req: Request,
        remote: Remote,
        region: str,
        first: bool,
        body: _Body,
        buffer: list[bytes],
        session: ReplaySession,
        extra_set: tuple[tuple[str, str], ...],
        extra_delete: tuple[str, ...],
        path: bytes | None,
    ) -> tuple[UpstreamConn, list[tuple[bytes, bytes]]]:
        w = self.worker
        peers = self._peers(region)
        if not peers:
            raise ForwardFailed(
                Reject(503, ErrorCode.NO_HEALTHY_INSTANCE, f"no proxy is registered in region {region}")
            )
        head = self._peer_head(client, req, remote, region, extra_set, extra_delete, path)
        last: Reject | None = None
        for peer in peers[:MAX_PEER_ATTEMPTS]:
            key = PEER_KEY_PREFIX + peer.id
            for attempt in (1, 2):
                try:
                    conn = await w.pool.acquire(key, peer.host, peer.port)
                except UpstreamError as e:
                    last = self._peer_failed(peer, e)
                    break  # the next proxy of the region
                conn.start_exchange()
                from_client = body.from_client and req.has_body
                resend = not from_client  # the body can be sent again on a fresh connection
                body.from_client = body.from_client and not from_client
                try:
                    headers = await w.send_request(
                        conn, client, req, head, from_client=from_client, first=first,
                        buffer=buffer, session=session,
                    )  # fmt: skip
                except (ConnectionError, OSError, UpstreamError) as e:
                    conn.close()
                    stale = conn.reused and attempt == 1 and resend
                    if stale and (not isinstance(e, UpstreamError) or not e.sent):
                        continue  # a stale keep-alive connection: once more on a fresh one
                    err = e if isinstance(e, UpstreamError) else UpstreamError("bad_response", str(e))
                    raise ForwardFailed(self._peer_failed(peer, err, connected=True)) from None
                except BaseException:
                    conn.close()
                    raise
                now = asyncio.get_running_loop().time()
                w.balancer.outliers.response(key, min(conn.status, 499), now)  # reachable: reset failures
                w.count("forwarded")
                return conn, headers
        assert last is not None
        raise ForwardFailed(last)

    def _peer_failed(self, peer: PeerProxy, e: UpstreamError, *, connected: bool = False) -> Reject:
        w = self.worker
        key = PEER_KEY_PREFIX + peer.id
        w.count("forward_failures")
        w.metrics.upstream_error(e.kind)
        now = asyncio.get_running_loop().time()
        if not connected and w.balancer.outliers.connect_failed(key, now):
            w.pool.drop_instance(key)
            w.count("ejections")
        what = f"proxy {peer.id} of region {peer.region}"
        if e.kind in ("timeout", "connect_timeout"):
            return Reject(504, ErrorCode.UPSTREAM_TIMEOUT, f"{what}: {e}")
        if e.kind == "refused":
            return Reject(502, ErrorCode.UPSTREAM_REFUSED, f"{what} refused the connection")
        return Reject(502, ErrorCode.UPSTREAM_BAD_RESPONSE, f"{what}: {e}")

    def _peer_head(
        self,
        client: ClientConnection,
        req: Request,
        remote: Remote,
        region: str,
        extra_set: Iterable[tuple[str, str]],
        extra_delete: Iterable[str],
        path: bytes | None,
    ) -> bytes:
        """The head sent to a peer proxy: the client's headers (minus the proxies' own and its routing
        headers), the client's address as an edge sets it, what to ask of the remote region, the hop
        header and the token."""
        w = self.worker
        h = w.config.headers
        assert self.token is not None
        ip = client.peer_ip.encode()
        lines = [
            b"x-forwarded-for: " + ip,
            b"x-forwarded-proto: http",
            b"x-forwarded-port: %d" % client.local_port,
            h.client_ip.encode() + b": " + ip,
            h.request_id.encode() + b": " + req.rid.encode(),
            self.hops_header + b": 1",
            self.token_header + b": " + self.token,
        ]
        if remote.instance is not None and remote.mode == "force":
            lines.append(FORCE_INSTANCE_HEADER.encode() + b": " + remote.instance.encode())
        else:
            lines.append(FORCE_REGION_HEADER.encode() + b": " + region.encode())
            if remote.instance is not None:
                lines.append(PREFER_INSTANCE_HEADER.encode() + b": " + remote.instance.encode())
        lines += [EXCLUDE_HEADER + b": " + i.encode() for i in sorted(remote.route.exclude)]
        return w.build_head(req, self.drop_to_peer, lines, extra_set, extra_delete, path)


__all__ = [
    "EXCLUDE_HEADER",
    "INSTANCE_APP_HEADER",
    "INSTANCE_HEADER",
    "INSTANCE_REGION_HEADER",
    "MAX_PEER_ATTEMPTS",
    "PEER_KEY_PREFIX",
    "PEER_RESPONSE_HEADERS",
    "ForwardFailed",
    "Forwarder",
    "Remote",
]
