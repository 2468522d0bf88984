"""One logging format for every process; third-party chatter turned down."""

from __future__ import annotations

import logging
import os
import warnings


def setup_logging(level: str = "INFO", name: str = "swarm") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {name} %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    quiet_third_parties()


def quiet_third_parties() -> None:
    os.environ.setdefault("HIVEMIND_LOGLEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for noisy in ("hivemind", "transformers", "peft", "asyncio", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass
