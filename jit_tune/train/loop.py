"""The training loop: one path from a laptop CPU to a pod.

Resume order, when the workdir holds a checkpoint: tokenizer (workdir/tokenizer), then
params, optimizer state and step, then the data iterator position, all from the latest
complete checkpoint. Running the same command again therefore continues exactly.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import jax
import numpy as np
from ml_collections import ConfigDict
from tqdm import tqdm

from jit_tune import mesh as mesh_lib
from jit_tune.config import ConfigError, save_config
from jit_tune.data.pipeline import mixture_rates, run_tokenizer, train_dataset
from jit_tune.data.tasks import SKIPPED
from jit_tune.eval import evaluator
from jit_tune.train.checkpoint import Checkpointer
from jit_tune.train.metrics import MetricsWriter
from jit_tune.train.optimizer import learning_rate_schedule
from jit_tune.train.preemption import Preempted, PreemptionWatch
from jit_tune.train.state import create_model_and_optimizer
from jit_tune.train.step import train_step


def setup(config: ConfigDict, workdir: Path):
    """Tokenizer, mesh, model, optimizer, data iterator and checkpointer, restored from
    the latest checkpoint when there is one. Returns them with the step to start at."""
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        save_config(config, workdir / "config.json")
    d = config.data
    tokenizer = run_tokenizer(config, workdir)
    if len(tokenizer) > config.model.vocab_size:
        raise ConfigError(
            f"config.model.vocab_size = {config.model.vocab_size}: expected at least the tokenizer's "
            f"{len(tokenizer)} tokens"
        )
    mesh = mesh_lib.make_mesh(config)
    mesh_lib.check_batch_divides(d.batch_size, mesh, config.train.microbatches)
    checkpointer = Checkpointer(workdir / "checkpoints", config.train.keep_checkpoints, config.train.keep_every,
                                config)
    start_step = checkpointer.latest_step() or 0
    dropped = collections.Counter()
    streams = checkpointer.stream_count(start_step) if start_step else None  # kept across process counts
    if streams and d.streams and d.streams != streams:
        raise ConfigError(f"config.data.streams = {d.streams}, but the checkpoint at step {start_step} in "
                          f"{workdir} has {streams} data streams: set it to {streams}, or 0 to follow the checkpoint")
    data_iterator = iter(train_dataset(config, tokenizer, jax.process_index(), jax.process_count(), dropped, streams))
    model, optimizer = create_model_and_optimizer(config, mesh, abstract=start_step > 0)
    if start_step:
        checkpointer.restore(start_step, model, optimizer, data_iterator)
    return tokenizer, mesh, model, optimizer, data_iterator, dropped, checkpointer, start_step


def train(config: ConfigDict, workdir: str | Path, stop_at_step: int | None = None) -> dict | None:
    """Train to config.train.steps (resuming if possible), then evaluate; returns the
    final per-task results, also printed as a table and written to workdir/eval.

    `stop_at_step` interrupts the run there with a checkpoint, as a preemption would,
    without changing the schedule; it returns None.
    """
    workdir = Path(workdir)
    tokenizer, mesh, model, optimizer, data_iterator, dropped, checkpointer, step = setup(config, workdir)
    t = config.train
    writer = MetricsWriter(workdir)
    schedule = learning_rate_schedule(config)
    is_main = jax.process_index() == 0
    if step and is_main:
        print(f"Resumed from {workdir / 'checkpoints'} at step {step}")
    progress = tqdm(total=t.steps, initial=step, disable=not is_main, unit="step", dynamic_ncols=True)
    # One step stays in flight: the host waits for step t only after dispatching step
    # t+1 (and reading its batch), so it never stalls the device, and the progress bar
    # counts finished steps rather than queued ones.
    in_flight = None
    throughput = _Throughput()
    guard = _NonfiniteGuard(t.on_nonfinite == "skip", t.max_skipped_steps)
    data_stats = _DataStats(list(mixture_rates(config)), dropped)
    last_step = min(t.steps, stop_at_step or t.steps)
    try:
        with mesh_lib.use_mesh(config, mesh), PreemptionWatch() as preemption:
            while step < last_step:
                save_now, stop_now = preemption.poll(step)
                if save_now:
                    if in_flight is not None:
                        _finish(*in_flight, writer, progress, schedule, throughput, guard, data_stats)
                        in_flight = None
                    if checkpointer.latest_step() != step:
                        checkpointer.save(step, model, optimizer, data_iterator)
                    if stop_now:
                        checkpointer.wait()
                        raise Preempted(step)
                    tqdm.write(f"step {step}: saved a checkpoint on demand (SIGUSR1)")
                local = next(data_iterator)
                # Counted now, added to the logged windows when the step finishes.
                counts = data_stats.count(local)
                tokens = int((local["segment_ids"] > 0).sum()) * jax.process_count()
                metrics = train_step(model, optimizer, mesh_lib.global_batch(local, mesh), t.microbatches)
                step += 1
                if in_flight is not None:
                    _finish(*in_flight, writer, progress, schedule, throughput, guard, data_stats)
                in_flight = (step, metrics, tokens, counts, step % t.log_every == 0 or step == last_step)
                if step % t.checkpoint_every == 0 or step == last_step:
                    # Checked before saving, so a non-finite loss never reaches a checkpoint.
                    _finish(*in_flight, writer, progress, schedule, throughput, guard, data_stats)
                    in_flight = None
                    checkpointer.save(step, model, optimizer, data_iterator)
                if config.eval.every_steps and step % config.eval.every_steps == 0 and step != t.steps:
                    _evaluate(model, tokenizer, config, step, workdir, writer)
            progress.close()
            checkpointer.wait()
            if SKIPPED.count and is_main:
                reasons = "\n  ".join(SKIPPED.reasons)
                print(f"Skipped {SKIPPED.count} bad records (data.on_bad_record = 'skip'); the first:\n  {reasons}")
            if step < t.steps:
                return None
            return _evaluate(model, tokenizer, config, step, workdir, writer)
    finally:
        progress.close()
        checkpointer.close()
        writer.close()


class _Throughput:
    """Non-padding tokens per second over the steps finished since the last report."""

    def __init__(self):
        self.tokens, self.start = 0, time.perf_counter()

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def take(self) -> float:
        now = time.perf_counter()
        rate = self.tokens / max(now - self.start, 1e-9)
        self.tokens, self.start = 0, now
        return rate


class _NonfiniteGuard:
    """A non-finite loss stops the run, or (train.on_nonfinite = "skip") counts as a
    skipped step, whose update the optimizer dropped, up to max_skipped_steps in a row."""

    def __init__(self, skip: bool, max_skipped: int):
        self.skip, self.max_skipped = skip, max_skipped
        self.skipped = self.in_a_row = 0

    def check(self, step: int, loss: float) -> None:
        if np.isfinite(loss):
            self.in_a_row = 0
            return
        self.skipped += 1
        self.in_a_row += 1
        if not self.skip:
            raise FloatingPointError(f"step {step}: loss is {loss}; stopping (the last good checkpoint is kept)")
        if self.in_a_row > self.max_skipped:
            raise FloatingPointError(
                f"step {step}: loss is {loss} for {self.in_a_row} steps in a row (train.max_skipped_steps = "
                f"{self.max_skipped}); stopping (the last good checkpoint is kept)")
        tqdm.write(f"step {step}: loss is {loss}; its update was skipped (train.on_nonfinite = 'skip')")


class _DataStats:
    """What this process's rows held since the last report: each task's share of the
    examples that start in them (the mixture as trained, beside the configured rates),
    the share of real tokens, examples per row, and truncated and dropped examples."""

    def __init__(self, tasks: list[str], dropped: collections.Counter):
        self.tasks, self.dropped = tasks, dropped  # the pipeline's running count
        # [examples of task 0..n-1, real tokens, token slots, rows, truncated examples]
        self.counts = np.zeros(len(tasks) + 4, np.int64)

    def count(self, local: dict[str, np.ndarray]) -> np.ndarray:
        """This batch's counts; pops the host-side features."""
        task_ids, truncated = local.pop("task_ids"), local.pop("truncated")
        starts = (local["positions"] == 0) & (local["segment_ids"] > 0)
        per_task = np.bincount(task_ids[starts], minlength=len(self.tasks) + 1)[1:]
        real = int((local["segment_ids"] > 0).sum())
        return np.concatenate([per_task, [real, task_ids.size, len(task_ids), int(truncated[starts].sum())]])

    def add(self, counts: np.ndarray) -> None:
        self.counts += counts

    def take(self) -> dict[str, float]:
        n = len(self.tasks)
        examples = int(self.counts[:n].sum())
        real, slots, rows, truncated = (int(c) for c in self.counts[n:])
        stats = {f"mixture/{t}": self.counts[i] / max(examples, 1) for i, t in enumerate(self.tasks)}
        stats.update({"data/packing_efficiency": real / max(slots, 1), "data/examples_per_row": examples / max(rows, 1),
                      "data/truncated": truncated, "data/dropped_too_long": self.dropped["too_long"],
                      "data/dropped_no_trained_token": self.dropped["no_trained_token"]})
        self.counts[:] = 0
        return stats


def _finish(step: int, metrics, tokens: int, counts: np.ndarray, log: bool, writer: MetricsWriter,
            progress: tqdm, schedule, throughput: _Throughput, guard: _NonfiniteGuard, data_stats: _DataStats) -> None:
    """Wait for a dispatched step; check and log its metrics on logging steps."""
    loss = float(metrics["loss"])  # blocks until the step is done
    throughput.add(tokens)
    data_stats.add(counts)
    progress.update(1)
    guard.check(step, loss)
    if log:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if guard.skipped:
            values["skipped_steps"] = guard.skipped
        if SKIPPED.count:
            values["skipped_records"] = SKIPPED.count
        values.update(lr=float(schedule(step - 1)), tokens_per_sec=throughput.take(), **data_stats.take())
        writer.write(step, values)
        progress.set_postfix(loss=f"{loss:.4f}", tok_s=f"{values['tokens_per_sec']:,.0f}")


def _evaluate(model, tokenizer, config: ConfigDict, step: int, workdir: Path, writer: MetricsWriter) -> dict:
    results = evaluator.evaluate(model, tokenizer, config)
    if jax.process_index() == 0:
        evaluator.print_table(results, step)
        evaluator.save_results(results, step, workdir)
        writer.write(step, {
            f"eval/{group}/{metric}": value for group, metrics in results["mean"].items() for metric, value in metrics.items()
        })
    return results
