"""The machines agent (``verdigris machines -c FILE``): runs app instances on its node as child
processes, health-checks them, writes their state into the regional state through the local agent,
stops idle ones and starts stopped ones when a proxy asks. See docs/machines.md.

Modules: :mod:`.config` (the ``[machines]`` file), :mod:`.instance` (one child process: spawn,
restart with backoff, stop), :mod:`.checks` (HTTP/TCP probes, idle detection from ``/proc/net/tcp``),
:mod:`.state` (the rows written through the agent), :mod:`.service` (the agent itself: supervision,
autostop, HTTP API, metrics).
"""
