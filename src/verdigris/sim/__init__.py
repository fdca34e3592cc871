"""Deterministic simulation of the gossip cores: many nodes, one process, virtual time, seeded faults."""

from verdigris.sim.simulator import Changes, Network, SimStats, Simulator, StaticMembership

__all__ = ["Changes", "Network", "SimStats", "Simulator", "StaticMembership"]
