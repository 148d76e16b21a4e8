"""What a run reports: metrics.jsonl and TensorBoard (process 0 only), the progress a
person reads (a bar in a terminal, one plain line per logging window in a log file),
and throughput measured over training time only."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import jax
from tensorboardX import SummaryWriter
from tqdm import tqdm

from jit_tune.files import atomic_write_text


def _read_records(path: Path) -> list[dict]:
    """The whole JSON lines of metrics.jsonl; a line cut short by a kill is dropped."""
    records = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsWriter:
    """One JSON line per step in metrics.jsonl (the values logged for a step, e.g. its
    training metrics and then its eval results, are merged into its line) and the same
    scalars in TensorBoard.

    A run resumed at `start_step` first drops what the interrupted run logged after
    that step (it is about to be logged again) and tells TensorBoard to purge those
    events, so neither holds a step twice."""

    def __init__(self, workdir: Path, start_step: int = 0, group: str = ""):
        self.enabled, self.group = jax.process_index() == 0, group
        if not self.enabled:
            return
        self.path = Path(workdir) / "metrics.jsonl"
        kept = [r for r in _read_records(self.path) if isinstance(r.get("step"), int) and r["step"] <= start_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.jsonl = open(self.path, "r+")
        self.jsonl.seek(0, 2)
        self.last, self.last_offset = (kept[-1], self.jsonl.tell() - len(json.dumps(kept[-1])) - 1) if kept else (
            None, 0)
        # purge_step: TensorBoard discards the events of earlier runs from this step on;
        # the kept line of start_step itself is written again.
        self.tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"), purge_step=start_step or None)
        if self.last and self.last["step"] == start_step:
            self._scalars(start_step, {k: v for k, v in self.last.items() if k != "step"})

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.last is not None and self.last["step"] == step:  # more values for the last line
            record = {**self.last, **metrics}
            self.jsonl.seek(self.last_offset)
            self.jsonl.truncate()
        else:
            record = {"step": step, **({"group": self.group} if self.group else {}), **metrics}
            self.last_offset = self.jsonl.tell()
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        self.last = record
        self._scalars(step, metrics)

    def _scalars(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self.tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tensorboard.close()


class Throughput:
    """Tokens per second of training time since the last report: time spent where
    `excluded()` says (evaluation) does not count, and `restart()` starts a window
    afresh (after the first step, whose time is mostly compilation)."""

    def __init__(self, clock=time.perf_counter):
        self.clock = clock
        self.restart()

    def restart(self) -> None:
        self.tokens, self.start, self.skipped = 0, self.clock(), 0.0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    @contextlib.contextmanager
    def excluded(self):
        began = self.clock()
        try:
            yield
        finally:
            self.skipped += self.clock() - began

    def take(self) -> float:
        elapsed = self.clock() - self.start - self.skipped
        rate = self.tokens / max(elapsed, 1e-9)
        self.restart()
        return rate


class Progress:
    """Progress for whoever reads stderr: a tqdm bar in a terminal; otherwise (a SLURM
    .out file, a redirected log) one plain line per logging window, since carriage
    returns turn a log file into one unreadable line. Process 0 only."""

    def __init__(self, total: int, initial: int, enabled: bool, stream=None):
        self.stream = stream or sys.stderr
        self.enabled, self.total, self.step = enabled, total, initial
        self.interactive = enabled and self.stream.isatty()
        self.start = time.monotonic()
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=self.stream) \
            if self.interactive else None

    def update(self, steps: int = 1) -> None:
        self.step += steps
        if self.bar:
            self.bar.update(steps)

    def log(self, values: dict[str, float]) -> None:
        """The logging window's summary: the bar's postfix, or a line."""
        if not self.enabled:
            return
        shown = {"loss": f"{values['loss']:.4f}", "tok_s": f"{values['tokens_per_sec']:,.0f}"}
        if self.bar:
            self.bar.set_postfix(**shown)
            return
        elapsed = time.monotonic() - self.start
        print(f"step {self.step}/{self.total}  loss {shown['loss']}  grad_norm {values.get('grad_norm', 0):.3f}  "
              f"lr {values.get('lr', 0):.3g}  tokens/s {shown['tok_s']}  elapsed {_duration(elapsed)}",
              file=self.stream, flush=True)

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
            self.bar = None


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"
