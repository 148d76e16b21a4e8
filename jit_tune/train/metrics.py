"""What a run reports, besides where it goes (train/trackers.py): the progress a person
reads (a bar in a terminal, one plain line per logging window in a log file),
throughput and MFU measured over training time only, and each task's training loss."""

from __future__ import annotations

import contextlib
import sys
import time

import numpy as np
from tqdm import tqdm

from jit_tune.data.pipeline import DROP_REASONS


class Throughput:
    """Tokens per second of training time since the last report: time spent where
    `excluded()` says (evaluation) does not count, and `restart()` starts a window
    afresh (after the first step, whose time is mostly compilation).

    Real tokens and all token slots (padding too) are counted apart. With the model's
    FLOPs per token (jit_tune/flops.py) it also reports TFLOP/s per device, over every
    slot since the device computes them all, and with the devices' peak, MFU."""

    def __init__(self, clock=time.perf_counter, flops_per_token: float = 0.0, devices: int = 1,
                 peak_flops: float | None = None):
        self.clock, self.flops_per_token, self.devices, self.peak_flops = clock, flops_per_token, devices, peak_flops
        self.restart()

    def restart(self) -> None:
        self.steps, self.tokens, self.slots, self.start, self.skipped = 0, 0, 0, self.clock(), 0.0

    def add(self, tokens: int, slots: int = 0) -> None:
        """One step's real tokens and token slots."""
        self.steps += 1
        self.tokens += tokens
        self.slots += slots

    @contextlib.contextmanager
    def excluded(self):
        began = self.clock()
        try:
            yield
        finally:
            self.skipped += self.clock() - began

    def take(self) -> float:
        """Real tokens per second, and a new window."""
        return self.take_values()["tokens_per_sec"]

    def take_values(self) -> dict[str, float]:
        """tokens_per_sec, tokens_per_sec_padded, tflops_per_device and mfu (when known),
        and a new window; none of them for a window without a step (the first step's
        window holds only its compilation, restarted), rather than a speed of 0."""
        if not self.steps:
            self.restart()
            return {}
        elapsed = max(self.clock() - self.start - self.skipped, 1e-9)
        values = {"tokens_per_sec": self.tokens / elapsed, "tokens_per_sec_padded": self.slots / elapsed}
        if self.flops_per_token:
            flops = self.flops_per_token * self.slots / elapsed / self.devices
            values["tflops_per_device"] = flops / 1e12
            if self.peak_flops:
                values["mfu"] = flops / self.peak_flops
        self.restart()
        return values


class TaskLosses:
    """Each task's training loss (the mean over its trained tokens) and trained tokens
    over a logging window, from the train step's per-task sums: the mixture as trained,
    in tokens."""

    def __init__(self, tasks: list[str]):
        self.tasks = tasks
        self.loss_sums, self.tokens = np.zeros(len(tasks)), np.zeros(len(tasks))

    def add(self, metrics: dict[str, np.ndarray]) -> None:
        self.loss_sums += metrics["task_loss_sums"]
        self.tokens += metrics["task_tokens"]

    def take(self) -> dict[str, float]:
        values = {}
        for task, loss_sum, tokens in zip(self.tasks, self.loss_sums, self.tokens):
            if tokens:  # a task with no trained token in the window has no loss to show
                values[f"train/loss/{task}"] = float(loss_sum / tokens)
            values[f"train/tokens/{task}"] = int(tokens)
        self.loss_sums[:], self.tokens[:] = 0, 0
        return values


class DataStats:
    """What this process's rows held since the last report: each task's share of the
    examples that start in them (the mixture as trained, beside the configured rates),
    the share of real tokens, examples per row, truncated examples, and the examples
    left out before them (counted where they were rendered, workers included)."""

    def __init__(self, tasks: list[str]):
        self.tasks = tasks
        # [examples of task 0..n-1, real tokens, token slots, rows, truncated, dropped by reason...]
        self.counts = np.zeros(len(tasks) + 4 + len(DROP_REASONS), np.int64)
        self.bad_records = 0

    def count(self, local: dict[str, np.ndarray]) -> np.ndarray:
        """This batch's counts; pops the host-side features but task_ids, which the
        train step takes too (for per-task losses)."""
        task_ids, truncated = local["task_ids"], local.pop("truncated")
        dropped = [int(local.pop(f"dropped_{reason}").sum()) for reason in DROP_REASONS]
        starts = (local["positions"] == 0) & (local["segment_ids"] > 0)
        per_task = np.bincount(task_ids[starts], minlength=len(self.tasks) + 1)[1:]
        real = int((local["segment_ids"] > 0).sum())
        return np.concatenate([per_task, [real, task_ids.size, len(task_ids), int(truncated[starts].sum())], dropped])

    def add(self, counts: np.ndarray) -> None:
        self.counts += counts

    def take(self) -> dict[str, float]:
        n = len(self.tasks)
        examples = int(self.counts[:n].sum())
        real, slots, rows, truncated = (int(c) for c in self.counts[n:n + 4])
        dropped = dict(zip(DROP_REASONS, (int(c) for c in self.counts[n + 4:])))
        self.bad_records += dropped["bad_record"]
        stats = {f"mixture/{t}": self.counts[i] / max(examples, 1) for i, t in enumerate(self.tasks)}
        stats.update({"data/packing_efficiency": real / max(slots, 1), "data/examples_per_row": examples / max(rows, 1),
                      "data/truncated": truncated, "data/dropped_too_long": dropped["too_long"],
                      "data/dropped_no_trained_token": dropped["no_trained_token"],
                      "data/skipped_bad_records": dropped["bad_record"]})
        self.counts[:] = 0
        return stats


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
        timed = "tokens_per_sec" in values  # not in the first step's window: its compilation
        shown = {"loss": f"{values['loss']:.4f}", "tok_s": f"{values['tokens_per_sec']:,.0f}" if timed else "-"}
        if "mfu" in values:
            shown["mfu"] = f"{values['mfu']:.1%}"
        if self.bar:
            self.bar.set_postfix(**shown)
            return
        elapsed = time.monotonic() - self.start
        speed = (f"tokens/s {shown['tok_s']} (padded {values['tokens_per_sec_padded']:,.0f})" if timed
                 else "tokens/s - (compiling)")
        if "tflops_per_device" in values:
            speed += f"  TFLOP/s/device {values['tflops_per_device']:.3g}"
        if "mfu" in shown:
            speed += f"  MFU {shown['mfu']}"
        print(f"step {self.step}/{self.total}  loss {shown['loss']}  grad_norm {values.get('grad_norm', 0):.3f}  "
              f"lr {values.get('lr', 0):.3g}  {speed}  elapsed {_duration(elapsed)}", file=self.stream, flush=True)

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
