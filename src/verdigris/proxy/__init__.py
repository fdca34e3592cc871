"""The edge proxy: routes HTTP requests to app instances from the replicated state.

The sans-IO core lives here, with no sockets and no clock: :mod:`~verdigris.proxy.table` (the routing
table fed by agent subscriptions), :mod:`~verdigris.proxy.balance` (choosing an instance, passive health,
load accounting), :mod:`~verdigris.proxy.replay` (``fly-replay``) and :mod:`~verdigris.proxy.errors`
(the refusals). See docs/proxy.md.
"""
