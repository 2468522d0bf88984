"""The job's `oversight` section: what the trainer measures about *what* is trained while it trains."""

from __future__ import annotations

from pydantic import Field

from swarm.config.strict import StrictModel


class OversightSpec(StrictModel):
    """Live oversight of what is trained (coordinator.live_probe): at each evaluation the trainer applies defection
    probes (swarm.probe) to the hidden states it relays between two nodes, and signs their AUROC into the
    evaluation event. The nodes serve only the calls evaluation makes anyway, so none can skip it."""

    probe: bool = Field(False, description="fit the probes at each phase's start and measure them at each evaluation")
    layer: int | None = Field(None, ge=1, description="the block boundary to probe: the stage boundary nearest it "
                                                      "(default: nearest the middle block)")
    seed: int = Field(0, ge=0, description="draws the supervised probe's training prompts and the bootstrap "
                                           "(`swarm-audit probe --seed` of the same value reproduces the numbers)")
