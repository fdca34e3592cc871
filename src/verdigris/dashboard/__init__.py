"""The live dashboard served by the agent (docs/dashboard.md).

* :mod:`verdigris.dashboard.web` — ``GET /dashboard`` (the page) and ``GET /v1/dashboard`` (its JSON) on
  the agent's API app;
* :mod:`verdigris.dashboard.view` — what one agent knows: members of both clusters, apps and instances,
  replication state, watchdog events;
* :mod:`verdigris.dashboard.scrape` — the region's proxies' ``/metrics`` and ``/events``, cached, with
  rates from successive scrapes;
* :mod:`verdigris.dashboard.events` — the proxy supervisor's ``GET /events`` (recent watchdog events).

This package imports nothing of the agent at import time: the proxy supervisor imports ``events``.
"""
