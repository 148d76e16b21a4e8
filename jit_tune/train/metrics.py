"""Metrics to metrics.jsonl and TensorBoard in the workdir (process 0 only)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
from tensorboardX import SummaryWriter


class MetricsWriter:
    def __init__(self, workdir: Path):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            self.jsonl = open(Path(workdir) / "metrics.jsonl", "a")
            self.tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for name, value in metrics.items():
            self.tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()
