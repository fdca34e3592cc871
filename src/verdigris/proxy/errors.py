"""The proxy's error answers: one status, one stable error code, one human reason.

Every refusal the proxy gives a client is a :class:`Reject`. The code is what scripts and dashboards key
on (it never changes once published); the reason is for a person reading it and may name the app, the
instance or the header at fault. The HTTP server turns a ``Reject`` into a response with the code in a
header and a short body (ARCHITECTURE.md, principle 6: bad input gets a clear error and is counted).

The codes the server itself will need (queueing, upstream failures) are listed here too, so that all of
them live in one enumeration and ``docs/proxy.md`` can document them from one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class ErrorCode(StrEnum):
    """Stable machine-readable error codes (the value is what goes on the wire)."""

    # Routing (verdigris.proxy.balance)
    BAD_HOST = "bad_host"
    """The Host header is missing or not a host name."""
    NO_SUCH_APP = "no_such_app"
    """No app is registered for the host (or the app named by a replay does not exist)."""
    NO_SUCH_INSTANCE = "no_such_instance"
    """A forced instance id is unknown, or belongs to another app."""
    INSTANCE_UNAVAILABLE = "instance_unavailable"
    """A forced instance exists but cannot take the request (stopped, failing checks, ejected...)."""
    NO_HEALTHY_INSTANCE = "no_healthy_instance"
    """The app has no instance that can take the request, here or in a region we may forward to."""
    NO_INSTANCE_IN_REGION = "no_instance_in_region"
    """A forced region (header or replay region list without ``any``) has no usable instance."""
    BAD_ROUTING_HEADER = "bad_routing_header"
    """A ``fly-prefer-*`` / ``fly-force-*`` request header is malformed or repeated."""

    # fly-replay (verdigris.proxy.replay)
    BAD_REPLAY = "bad_replay"
    """The app answered with a malformed ``fly-replay`` header or replay JSON body."""
    REPLAY_FORBIDDEN = "replay_forbidden"
    """The replay names an app of another organization."""
    REPLAY_LIMIT_EXCEEDED = "replay_limit_exceeded"
    """The request was replayed the maximum number of times and was asked to replay again."""
    REPLAY_BODY_TOO_LARGE = "replay_body_too_large"
    """The app asked to replay a request whose body was too large to keep for a replay."""
    REPLAY_AFTER_FALLBACK = "replay_after_fallback"
    """A request that already fell back to its origin instance was asked to replay again."""

    # Serving (the HTTP server; defined here so that every code lives in one place)
    NOT_READY = "not_ready"
    """The proxy has not received its routing state yet."""
    QUEUE_FULL = "queue_full"
    """Every instance is at its hard limit and the wait queue is full."""
    QUEUE_TIMEOUT = "queue_timeout"
    """Every instance stayed at its hard limit for longer than the queue timeout."""
    UPSTREAM_REFUSED = "upstream_refused"
    """The instance refused the connection."""
    UPSTREAM_TIMEOUT = "upstream_timeout"
    """The instance did not answer in time."""
    UPSTREAM_BAD_RESPONSE = "upstream_bad_response"
    """The instance answered with something that is not HTTP, or closed mid-response."""
    FORWARD_LOOP = "forward_loop"
    """A request that was already forwarded between regions would have to be forwarded again (508)."""


@dataclass(frozen=True, slots=True)
class Reject:
    """Refuse the request with ``status``, the stable ``code`` and a human ``reason``."""

    status: int
    code: ErrorCode
    reason: str


__all__ = ["ErrorCode", "Reject"]
