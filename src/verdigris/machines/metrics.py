"""Prometheus metrics of the machines agent, in a registry of its own (several agents in one process
never mix their numbers)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class MachinesMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.instances = Gauge(
            "verdigris_machines_instances",
            "Instances on this node, by app and state.",
            ["app", "state"],
            registry=r,
        )
        self.restarts = Counter(
            "verdigris_machines_restarts",
            "Instances restarted after they exited on their own.",
            ["app"],
            registry=r,
        )
        self.checks = Counter(
            "verdigris_machines_checks",
            "Health check probes, by app, check and result (passing, warning, critical).",
            ["app", "check", "status"],
            registry=r,
        )
        self.check_seconds = Histogram(
            "verdigris_machines_check_duration_seconds",
            "Time a health check probe took.",
            ["app", "check"],
            registry=r,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.autostops = Counter(
            "verdigris_machines_autostops", "Instances stopped after being idle.", ["app"], registry=r
        )
        self.autostarts = Counter(
            "verdigris_machines_autostarts",
            "Stopped instances started by POST /v1/apps/{app}/start (a proxy waking the app).",
            ["app"],
            registry=r,
        )
        self.state_writes = Counter(
            "verdigris_machines_state_writes",
            "Transactions sent to the agent, by result (ok, error).",
            ["result"],
            registry=r,
        )
        self.state_statements = Counter(
            "verdigris_machines_state_statements",
            "Statements written to the agent, by table.",
            ["table"],
            registry=r,
        )

    def render(self, counts: dict[tuple[str, str], int]) -> bytes:
        """The exposition text; ``counts``: (app, state) -> instances now."""
        self.instances.clear()
        for (app, state), n in counts.items():
            self.instances.labels(app, state).set(n)
        return generate_latest(self.registry)


__all__ = ["MachinesMetrics"]
