"""Where a run's metrics go, process 0 only: metrics.jsonl always, TensorBoard, and
Weights & Biases when config.logging.wandb.project is set (`pip install 'jit_tune[wandb]'`).

A tracker is anything with `log(step, metrics)` and `close()`; `open_trackers` gives
them all as one. Values logged for a step in several calls (its training metrics, then
its evaluation) land on that step in each. A resumed run logs again the steps after
its checkpoint, and none of them holds a step twice: metrics.jsonl drops its lines past
the checkpoint, TensorBoard purges its events from there, and W&B (the same run, its id
kept in the workdir) keeps the values it already has for those steps, which a resume
reproduces anyway.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import Protocol

import jax
from ml_collections import ConfigDict
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.summary import scalar

from jit_tune.config import WANDB_MISSING, ConfigError, config_to_dict
from jit_tune.files import atomic_write_text, named_as

WANDB_RUN_ID = "wandb_run_id"  # in the workdir: a resumed run logs to the same W&B run


class Tracker(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def _read_records(path: Path) -> list[dict]:
    """The whole JSON objects of metrics.jsonl; a line cut short by a kill is dropped."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [record for record in records if isinstance(record, dict)]


def last_logged_step(workdir: Path) -> int:
    """The last step metrics.jsonl holds (0: none)."""
    steps = [r["step"] for r in _read_records(Path(workdir) / "metrics.jsonl") if isinstance(r.get("step"), int)]
    return max(steps, default=0)


class JsonlTracker:
    """One JSON line per step in metrics.jsonl: the values logged for a step (e.g. its
    training metrics and then its eval results) are merged into its line. A run
    resumed at `start_step` first drops what the interrupted run logged after that
    step: it is about to be logged again."""

    def __init__(self, workdir: Path, start_step: int = 0, group: str = ""):
        self.group = group
        self.path = Path(workdir) / "metrics.jsonl"
        kept = [r for r in _read_records(self.path) if isinstance(r.get("step"), int) and r["step"] <= start_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "r+")
        self.file.seek(0, 2)
        self.last, self.last_offset = (kept[-1], self.file.tell() - len(json.dumps(kept[-1])) - 1) if kept else (
            None, 0)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.last is not None and self.last["step"] == step:  # more values for the last line
            record = {**self.last, **metrics}
            self.file.seek(self.last_offset)
            self.file.truncate()
        else:
            record = {"step": step, **({"group": self.group} if self.group else {}), **metrics}
            self.last_offset = self.file.tell()
        with named_as(self.path):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        self.last = record

    def close(self) -> None:
        self.file.close()


class TensorBoardTracker:
    """The numbers in workdir/tensorboard. Every run purges the events of earlier runs
    from `start_step` on (step 0 too: a run killed before its first checkpoint was
    final leaves events that its restart logs again), and writes the kept line of
    start_step again.

    Events are written and flushed here, a logging window at a time, not by
    SummaryWriter's thread: that thread dies on a full disk, and the next window's
    scalars would wait on its queue forever; here the write fails in the loop, which
    stops the run (exit 5) with its checkpoints kept."""

    def __init__(self, workdir: Path, start_step: int = 0, start_line: dict | None = None):
        self.directory = Path(workdir) / "tensorboard"
        self.directory.mkdir(parents=True, exist_ok=True)
        # A name per writer, in the order written (TensorBoard reads files in name order):
        # tensorboardX's own names repeat within a second, and a restart's would overwrite.
        with named_as(self.directory):
            self.events = EventsWriter(str(self.directory / "events"), f".{time.time_ns():020d}")
        self._write([Event(step=start_step, session_log=SessionLog(status=SessionLog.START))])
        if start_line:
            self.log(start_step, {k: v for k, v in start_line.items() if k != "step"})

    def log(self, step: int, metrics: dict[str, float]) -> None:
        now = time.time()
        self._write([Event(wall_time=now, step=step, summary=scalar(name, value)) for name, value in metrics.items()
                     if isinstance(value, (int, float))])

    def _write(self, events: list) -> None:
        with named_as(self.directory):
            for event in events:
                self.events.write_event(event)
            self.events.flush()

    def close(self) -> None:
        with named_as(self.directory):
            self.events.close()


class WandbTracker:
    """A W&B run: config.logging.wandb's project, entity, run name and mode (online,
    offline, disabled), logging.group as its group, the run's config as its config.
    Its files go to $WANDB_DIR, else the workdir."""

    def __init__(self, config: ConfigDict, workdir: Path):
        try:
            import wandb
        except ImportError:
            raise ConfigError(f"config.logging.wandb.project = {config.logging.wandb.project!r}, but "
                              f"{WANDB_MISSING}") from None
        w, id_path = config.logging.wandb, Path(workdir) / WANDB_RUN_ID
        run_id = id_path.read_text().strip() if id_path.is_file() else secrets.token_hex(4)
        self.run = wandb.init(project=w.project, entity=w.entity or None, name=w.run_name or None,
                              group=config.logging.group or None, mode=w.mode, id=run_id, resume="allow",
                              config=config_to_dict(config), dir=None if "WANDB_DIR" in os.environ else str(workdir))
        atomic_write_text(id_path, run_id)
        # A resumed run continues at the step after the last it holds; W&B ignores (with
        # a warning each) earlier steps, which a resume from an older checkpoint logs again.
        self.first_step = self.run.starting_step

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step >= self.first_step:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """A run's trackers as one (none on processes other than 0)."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for tracker in self.trackers:
            tracker.log(step, metrics)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()


def open_trackers(config: ConfigDict, workdir: Path, start_step: int = 0) -> Trackers:
    if jax.process_index() != 0:
        return Trackers([])
    wandb = [WandbTracker(config, workdir)] if config.logging.wandb.project else []  # first: it may fail
    jsonl = JsonlTracker(workdir, start_step, config.logging.group)
    start_line = jsonl.last if jsonl.last and jsonl.last["step"] == start_step else None
    return Trackers([jsonl, TensorBoardTracker(workdir, start_step, start_line), *wandb])
