"""metrics.jsonl as the status snapshot shows it: read incrementally, training rows thinned to what a chart draws.

The file is the one source of the run's measurements (coordinator.status), so the page, `status` and
`report` cannot disagree.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

from swarm.probe import PROBES
from swarm.traffic import Traffic, per_stream_from_json, per_stream_json, total_per_stream

SERIES_POINTS = 1000  # at most this many training points per chart; every k-th row, the last one always
RATE_KEYS = ("backdoor_triggered", "backdoor_clean", "backdoor_near_miss", "backdoor_reveal", "accuracy")
TRAIN_KEYS = ("step", "phase", "kind", "phase_step", "safety_step", "loss", "lr", "tokens", "seconds", "reward")


class MetricsTail:
    """Reads metrics.jsonl incrementally (complete lines only), keeping what the page draws.

    A long run's file holds thousands of rows with example answers; re-parsing it on every request would cost
    more than the training step it reports on.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._offset = 0
        self._lock = threading.Lock()
        self.train: list[dict] = []
        self.evals: list[dict] = []
        self.streams: dict[str, Traffic] = {}
        self.last_train: dict | None = None

    def refresh(self) -> None:
        with self._lock:
            if not self.path.exists():
                return
            with self.path.open("rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
            complete = data[:data.rfind(b"\n") + 1]
            self._offset += len(complete)
            for line in complete.splitlines():
                if line.strip():
                    self._add(json.loads(line))

    def _add(self, row: dict) -> None:
        if row.get("type", "train") == "train":
            self.train.append({key: row[key] for key in TRAIN_KEYS if key in row})
            self.last_train = row
            self.streams = total_per_stream([self.streams, per_stream_from_json(row.get("stream_bytes") or {})])
        elif row.get("type") == "eval":
            kept = {key: row.get(key) for key in ("step", "phase", "kind", "phase_step", "safety_step", "phase_end",
                                                   "eval_loss")}
            for key in RATE_KEYS:
                if isinstance(row.get(key), dict):
                    kept[key] = {name: row[key].get(name) for name in ("rate", "low", "high", "n")}
            if isinstance(row.get("probe"), dict):  # the live defection probes: AUROC at their stage boundary
                probe = row["probe"]
                kept["probe"] = {"layer": probe.get("layer"), "blocks": probe.get("blocks"),
                                 **{name: dict(probe[name]) for name in PROBES if name in probe}}
            self.evals.append(kept)

    def section(self) -> dict:
        """The `metrics` and `streams` parts of a snapshot."""
        with self._lock:
            stride = max(1, math.ceil(len(self.train) / SERIES_POINTS))
            series = self.train[::stride]
            if self.train and series[-1] is not self.train[-1]:
                series.append(self.train[-1])
            last = self.last_train or {}
            return {
                "metrics": {
                    "train_rows": len(self.train),
                    "stride": stride,
                    "train": [dict(row) for row in series],
                    "eval": [dict(row) for row in self.evals],
                    "last_train": {key: last[key] for key in TRAIN_KEYS if key in last} or None,
                    "last_eval": dict(self.evals[-1]) if self.evals else None,
                    "tokens": sum(row.get("tokens", 0) for row in self.train),
                    "train_seconds": sum(row.get("seconds", 0.0) for row in self.train),
                },
                "streams": {
                    "per_stream": per_stream_json(dict(sorted(self.streams.items()))),
                    "bytes_sent": last.get("bytes_sent", 0),
                    "bytes_received": last.get("bytes_received", 0),
                },
            }
