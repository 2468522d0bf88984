"""The trainer's chain of block-range replicas, in parts: coordinator.chain.remote_chain is the facade."""

from coordinator.chain.remote_chain import RemoteChain
from coordinator.chain.stage import RangeLostError, RemoteStage

__all__ = ["RangeLostError", "RemoteChain", "RemoteStage"]
