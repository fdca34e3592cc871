"""The dashboard's routes on the agent's API app (docs/dashboard.md).

* ``GET /dashboard`` — the page: one self-contained HTML file (inline CSS and JS, nothing fetched from
  elsewhere), package data of :mod:`verdigris.dashboard`. It holds no data, so it is served without the
  bearer token; the page sends the token it is given in its URL (``/dashboard#token=...``) with its
  requests.
* ``GET /v1/dashboard`` — the JSON the page renders (:class:`~verdigris.dashboard.view.DashboardView`;
  ``?only=replication``: the replication state alone, what a region's agents ask each other),
  behind the bearer token like the rest of the API, with CORS headers so that a page served by one
  agent can read the agents of other regions. ``OPTIONS /v1/dashboard`` answers the browser's preflight
  (sent without credentials, hence also public).
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import TYPE_CHECKING, Final

from aiohttp import web

from verdigris.dashboard.view import DashboardView

if TYPE_CHECKING:
    from verdigris.agent import Agent
    from verdigris.api.server import ApiServer

PAGE_PATH: Final = "/dashboard"
JSON_PATH: Final = "/v1/dashboard"
CORS_HEADERS: Final = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization",
    "Access-Control-Max-Age": "600",
}


@functools.cache
def page_html() -> bytes:
    """The page, read once from the package data."""
    return resources.files("verdigris.dashboard").joinpath("dashboard.html").read_bytes()


def mount_dashboard(api: ApiServer, agent: Agent) -> DashboardView:
    """Add the dashboard's routes to ``api``'s app (before it is started); the view is closed with the
    app (``on_cleanup``)."""
    view = DashboardView(agent)

    async def page(request: web.Request) -> web.Response:
        return web.Response(
            body=page_html(),
            content_type="text/html",
            charset="utf-8",
            headers={"Cache-Control": "no-cache"},
        )

    async def document(request: web.Request) -> web.Response:
        only = request.query.get("only")
        if only not in (None, "replication"):
            return web.json_response(
                {
                    "error": f"only: expected 'replication' (or no 'only' for the whole document), got {only!r}"
                },
                status=400,
                headers=CORS_HEADERS,
            )
        doc = await (view.build_replication() if only == "replication" else view.build())
        return web.Response(
            text=json.dumps(doc, separators=(",", ":")),
            content_type="application/json",
            headers={**CORS_HEADERS, "Cache-Control": "no-store"},
        )

    async def preflight(request: web.Request) -> web.Response:
        return web.Response(status=204, headers=CORS_HEADERS)

    async def listen(app: web.Application) -> None:
        await view.start()  # from the start: when remote versions were last applied

    async def close(app: web.Application) -> None:
        await view.close()

    app = api.app
    app.router.add_get(PAGE_PATH, page)
    app.router.add_get(JSON_PATH, document)
    app.router.add_route("OPTIONS", JSON_PATH, preflight)
    app.on_startup.append(listen)
    app.on_cleanup.append(close)
    api.public_routes.update({("GET", PAGE_PATH), ("HEAD", PAGE_PATH), ("OPTIONS", JSON_PATH)})
    return view


__all__ = ["JSON_PATH", "PAGE_PATH", "mount_dashboard", "page_html"]
