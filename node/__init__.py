"""swarm-node: a volunteer process that serves and trains a range of blocks."""
