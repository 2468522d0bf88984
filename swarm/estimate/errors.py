"""The typed errors of `swarm-coordinator estimate`: each names the flag at fault."""

from __future__ import annotations

from swarm.errors import SwarmError


class EstimateInputError(SwarmError):
    """A flag of `swarm-coordinator estimate` is malformed or out of range."""


class SizeFormatError(EstimateInputError):
    """A count, size or bandwidth could not be parsed."""


class ModelShapeError(EstimateInputError):
    """The model shape is inconsistent, or no Llama-like shape has the requested parameter count."""
