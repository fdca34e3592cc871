"""Deterministic simulation of the gossip cores: many nodes, one process, virtual time, seeded faults."""

from verdigris.sim.simulator import Network, SimStats, Simulator

__all__ = ["Network", "SimStats", "Simulator"]
