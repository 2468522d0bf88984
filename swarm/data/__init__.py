"""Tokenizers, task generators and batches: the trainer's deterministic data."""
