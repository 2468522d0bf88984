"""How a job runs on a swarm: placement and timeouts (`swarm`), who may join (`nodes`), the data-plane codecs
(`compression`) and the audit log's cadence (`audit`)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from swarm.config.strict import StrictModel


class SwarmSpec(StrictModel):
    min_nodes: int = Field(1, ge=1, description="nodes that must join before training starts")
    replicas: int | Literal["auto"] = Field(
        1, description="nodes serving each block range (they train in data parallel and sum their adapter "
        "gradients before every step); auto: spread every node that joins over the stages")
    stages: int | None = Field(
        None, ge=1, description="block ranges the model is split into (default: joined nodes // replicas; "
        "with replicas auto: min_nodes)")
    join_timeout_s: float = Field(
        300.0, gt=0, description="seconds other nodes get to join (counted from when the --local-nodes have "
        "joined), and a node gets to load its blocks")
    heartbeat_interval_s: float = Field(2.0, gt=0)
    rpc_timeout_s: float = Field(120.0, gt=0)
    checkpoint_every: int = Field(
        25, ge=0, description="steps between step checkpoints inside a phase (every range's and the trainer's "
        "whole training state, in RUN/checkpoints/): `resume` continues from the latest, and a node taking over a "
        "range that lost its last replica starts from it; 0: only at phase ends (no takeover)")
    kv_cache: bool = Field(
        True, description="generation (evaluation, RL samples, self responses) keeps each batch's keys and values "
        "on the nodes, so a new token travels the chain as one position; false: every token re-sends the prefix")
    direct_channels: bool = Field(
        True, description="the trainer calls each node over the node's direct TLS data channel where it can reach "
        "it (fewer copies and processes on the way than hivemind P2P's daemons; docs/ARCHITECTURE.md, Data plane), "
        "over hivemind P2P where it cannot; false: always over hivemind P2P")

    @field_validator("replicas", mode="before")
    @classmethod
    def _replicas(cls, value):
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise ValueError(f"must be a number of nodes per block range (>= 1) or auto, not {value!r}")


class NodesSpec(StrictModel):
    """Which volunteers may join: `allow` lists key fingerprints (what `swarm-node join` prints as its identity);
    absent, any node that proves its key may join."""

    allow: list[str] | None = Field(None, min_length=1)

    @field_validator("allow")
    @classmethod
    def _fingerprints(cls, allow: list[str] | None) -> list[str] | None:
        for item in allow or []:
            if not re.fullmatch(r"[0-9a-f]{16}", item):
                raise ValueError(f"{item!r} is not a node fingerprint (16 lowercase hex digits)")
        return allow


class CompressionSpec(StrictModel):
    """Codec per data-plane stream (swarm.p2p.codecs): activations forward, activation gradients backward."""

    forward: str = Field("none", description="codec of hidden states between trainer and nodes")
    backward: str = Field("none", description="codec of gradients w.r.t. hidden states")
    averaging: str = Field("none", description="codec of adapter gradients summed between replicas of a range")

    @field_validator("forward", "backward", "averaging")
    @classmethod
    def _known_codec(cls, name: str) -> str:
        from swarm.p2p.codecs import codec_type

        codec_type(name)  # raises ValueError naming the valid codecs
        return name


class AuditSpec(StrictModel):
    """The run's audit log (RUN_DIR/audit.db): how often the coordinator signs a tree head over it, and how many
    steps per phase it snapshots for `swarm-audit replay` (steps drawn at random, so nodes cannot tell which)."""

    tree_head_every: int = Field(50, ge=1, description="sign a tree head at least every N steps (and at phase ends)")
    snapshots_per_phase: int = Field(
        2, ge=0, description="steps per phase whose weights, optimizer state and batch are saved for replay")
