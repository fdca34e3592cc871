"""Verdigris: an open routing plane for an edge platform."""

__version__ = "0.1.0"
