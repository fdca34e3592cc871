"""A Corrosion client in plain Python (standard library only), to show that Verdigris speaks Corrosion's API.

Nothing here knows about Verdigris: it follows Corrosion's documented HTTP API (``/v1/transactions``,
``/v1/queries``, ``/v1/subscriptions`` with the ``corro-query-id`` header and ``?from=``), so it works
the same against a Corrosion agent. Run it against a local agent::

    verdigris agent -c examples/agent.toml &
    python examples/corrosion_client.py http://127.0.0.1:8080
"""

from __future__ import annotations

import json
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any


def _post(base: str, path: str, body: Any, token: str | None = None, timeout: float = 10.0) -> Any:
    req = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        headers={
            "content-type": "application/json",
            **({"authorization": f"Bearer {token}"} if token else {}),
        },
        method="POST",
    )
    return urllib.request.urlopen(req, timeout=timeout)


def transact(base: str, statements: list[Any], token: str | None = None) -> dict[str, Any]:
    """POST /v1/transactions: ``{"results": [{"rows_affected": n, "time": s}], "time": s, "version": v}``."""
    with _post(base, "/v1/transactions", statements, token) as resp:
        result: dict[str, Any] = json.load(resp)
        return result


def query(base: str, statement: Any, token: str | None = None) -> list[dict[str, Any]]:
    """POST /v1/queries: the NDJSON events ``columns``, ``row``..., ``eoq``."""
    with _post(base, "/v1/queries", statement, token) as resp:
        return [json.loads(line) for line in resp if line.strip()]


def subscribe(
    base: str, statement: Any, token: str | None = None, timeout: float = 10.0
) -> tuple[str, Iterator[dict[str, Any]]]:
    """POST /v1/subscriptions: the query id (``corro-query-id``) and an iterator of events."""
    resp = _post(base, "/v1/subscriptions", statement, token, timeout)
    query_id = resp.headers["corro-query-id"]

    def events() -> Iterator[dict[str, Any]]:
        with resp:
            for line in resp:
                if line.strip():
                    yield json.loads(line)

    return query_id, events()


def resume(
    base: str, query_id: str, from_change: int, token: str | None = None, timeout: float = 10.0
) -> Iterator[dict[str, Any]]:
    """GET /v1/subscriptions/{id}?from=N: only the changes after change id N."""
    req = urllib.request.Request(
        f"{base}/v1/subscriptions/{query_id}?from={from_change}",
        headers={"authorization": f"Bearer {token}"} if token else {},
    )
    resp = urllib.request.urlopen(req, timeout=timeout)

    def events() -> Iterator[dict[str, Any]]:
        with resp:
            for line in resp:
                if line.strip():
                    yield json.loads(line)

    return events()


def main(base: str) -> None:
    print(transact(base, [["INSERT OR REPLACE INTO apps (name, org) VALUES (?, ?)", ["demo", "acme"]]]))
    for event in query(base, "SELECT name, org FROM apps"):
        print(event)
    query_id, events = subscribe(base, "SELECT name FROM apps")
    print("subscription", query_id)
    for event in events:
        print(event)
        if "eoq" in event:
            break


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080")
