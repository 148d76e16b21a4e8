"""The training loop: one path from a laptop CPU to a pod.

Resume order, when the workdir holds a checkpoint: the config is checked against the
checkpoint's (train/resume.py), then the tokenizer (workdir/tokenizer), params,
optimizer state and step, then the data iterator position, all from the latest
complete checkpoint (with LoRA, params are the adapters: the frozen base is read from
model.init_from again, once its fingerprint matches the checkpoint's). Running the same
command again therefore continues exactly.

Nothing is written to the workdir before the run is accepted: config.json (and, on a
first run, the tokenizer) are written, atomically, once the checkpoint is restored and
the state created, so a rejected command leaves a good workdir as it was.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from ml_collections import ConfigDict
from transformers import PreTrainedTokenizerBase

from jit_tune import mesh as mesh_lib
from jit_tune.config import SAVED_CONFIG_KEYS, ConfigError, config_to_dict, save_config
from jit_tune.data.pipeline import run_tokenizer, train_dataset
from jit_tune.data.registry import TaskRegistry, build_registry
from jit_tune.data.streams import StreamsIterator
from jit_tune.data.tokenizer import save_tokenizer
from jit_tune.eval import evaluator, report
from jit_tune.models.decoder import Decoder
from jit_tune.files import no_empty_folders_on_error, read_json, written_by_main
from jit_tune.train.checkpoint import Checkpointer
from jit_tune.flops import peak_flops_per_device, training_flops_per_token
from jit_tune.train.metrics import DataStats, Progress, TaskLosses, Throughput
from jit_tune.train.optimizer import learning_rate_schedule
from jit_tune.train.preemption import SIGNALS, Preempted
from jit_tune.train.resume import ResumeError, check_resume
from jit_tune.train.state import create_model_and_optimizer, decoder_config, restore_model_and_optimizer
from jit_tune.train.step import train_step
from jit_tune.train.trackers import Trackers, last_logged_step, open_trackers


def status(message: str) -> None:
    """A line for the log (process 0, stderr): what the run is doing now."""
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def saved_config(checkpointer: Checkpointer, step: int, workdir: Path) -> dict | None:
    """The config the checkpoint at `step` was trained with (or, for checkpoints that
    predate recording it, the workdir's config.json)."""
    try:
        return checkpointer.saved_run(step)["config"]
    except (FileNotFoundError, KeyError, ValueError):
        path = workdir / "config.json"
        return read_json(path, keys=SAVED_CONFIG_KEYS) if path.is_file() else None


@dataclasses.dataclass
class Run:
    """What a training run is made of, restored from the latest checkpoint if any."""
    registry: TaskRegistry
    tokenizer: PreTrainedTokenizerBase
    mesh: Mesh
    model: Decoder
    optimizer: nnx.Optimizer
    data_iterator: StreamsIterator
    checkpointer: Checkpointer
    step: int  # the step to start at


def setup(config: ConfigDict, workdir: Path) -> Run:
    """Tasks, tokenizer, mesh, model, optimizer, data iterator and checkpointer, restored
    from the latest checkpoint when there is one."""
    d = config.data
    checkpointer = Checkpointer(workdir / "checkpoints", config.train.keep_checkpoints, config.train.keep_every,
                                config)
    start_step = checkpointer.latest_step() or 0
    if start_step:
        saved = saved_config(checkpointer, start_step, workdir)
        try:
            changes = check_resume(saved, config_to_dict(config), f"{workdir}/checkpoints/{start_step}") if saved else []
        except ResumeError as e:
            raise ConfigError(str(e)) from None
        status(f"Resuming {workdir} at step {start_step}" + (
            " with these config changes (applied):\n  " + "\n  ".join(changes) if changes else ""))
    elif logged := last_logged_step(workdir):
        status(f"Starting {workdir} at step 0: its run logged up to step {logged} but left no checkpoint in "
               f"{workdir}/checkpoints (stopped before its first one, or they were moved or deleted); its "
               "metrics.jsonl starts again")
    status("Reading the tasks")
    registry = build_registry(config)
    status("Building the tokenizer" if not start_step else "Reading the tokenizer")
    tokenizer = run_tokenizer(config, registry, workdir if start_step else None)
    if len(tokenizer) > config.model.vocab_size:
        raise ConfigError(
            f"config.model.vocab_size = {config.model.vocab_size}: expected at least the tokenizer's "
            f"{len(tokenizer)} tokens"
        )
    mesh = mesh_lib.make_mesh(config)
    mesh_lib.check_batch_divides(d.batch_size, mesh, config.train.microbatches)
    streams = checkpointer.stream_count(start_step) if start_step else None  # kept across process counts
    if streams and d.streams and d.streams != streams:
        raise ConfigError(f"config.data.streams = {d.streams}, but the checkpoint at step {start_step} in "
                          f"{workdir} has {streams} data streams: set it to {streams}, or 0 to follow the checkpoint")
    data_iterator = iter(train_dataset(config, tokenizer, registry, jax.process_index(), jax.process_count(), streams))
    status(f"Restoring step {start_step}" if start_step else "Creating the model")
    if start_step:
        model, optimizer = restore_model_and_optimizer(config, mesh, checkpointer, start_step, data_iterator)
    else:
        model, optimizer = create_model_and_optimizer(config, mesh)
    with written_by_main("config") as writer:  # the run is accepted: record it
        if writer:
            if not start_step:
                save_tokenizer(tokenizer, workdir)
            save_config(config, workdir / "config.json")
    return Run(registry, tokenizer, mesh, model, optimizer, data_iterator, checkpointer, start_step)


def train(config: ConfigDict, workdir: str | Path, stop_at_step: int | None = None) -> dict | None:
    """Train to config.train.steps (resuming if possible), then evaluate; returns the
    final per-task results, also printed as a table and written to workdir/eval.

    `stop_at_step` interrupts the run there with a checkpoint, as a preemption would,
    without changing the schedule; it returns None.
    """
    workdir = Path(workdir)
    SIGNALS.install()
    SIGNALS.reset()
    with SIGNALS.in_phase("startup"), no_empty_folders_on_error(workdir, workdir / "checkpoints"):
        workdir.mkdir(parents=True, exist_ok=True)
        run = setup(config, workdir)
    registry, tokenizer, mesh, model = run.registry, run.tokenizer, run.mesh, run.model
    optimizer, data_iterator, checkpointer, step = run.optimizer, run.data_iterator, run.checkpointer, run.step
    t = config.train
    writer = open_trackers(config, workdir, step)
    schedule = learning_rate_schedule(config)
    is_main = jax.process_index() == 0
    progress = Progress(t.steps, step, enabled=is_main)
    # One step stays in flight: the host waits for step t only after dispatching step
    # t+1 (and reading its batch), so it never stalls the device, and progress counts
    # finished steps rather than queued ones.
    in_flight = None
    throughput = Throughput(flops_per_token=training_flops_per_token(decoder_config(config), config.data.seq_len),
                            devices=jax.device_count(), peak_flops=peak_flops_per_device(jax.devices()[0].device_kind))
    guard = _NonfiniteGuard(t.on_nonfinite == "skip", t.max_skipped_steps, progress)
    tasks = list(registry.rates)  # task_ids count from 1 in this order
    data_stats, task_losses = DataStats(tasks), TaskLosses(tasks)
    last_step = min(t.steps, stop_at_step or t.steps)
    first_step = step + 1

    def finish(pending) -> None:
        step_done, metrics, tokens, slots, counts, log = pending
        metrics = jax.device_get(metrics)  # blocks until the step is done
        loss = float(metrics["loss"])
        if step_done == first_step:  # its time is mostly compilation
            throughput.restart()
        else:
            throughput.add(tokens, slots)
        data_stats.add(counts)
        task_losses.add(metrics)
        progress.update(1)
        guard.check(step_done, loss)
        if not log:
            return
        # The window ends with the step. Logging counts as training time: it runs while
        # the next step computes, so leaving it out would leave that step's time out too
        # (log_every=1 once showed 6k to 8M tokens/s on one run). Its one-off cost, the
        # schedule's first evaluation, is paid before training.
        speed = throughput.take_values()
        values = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}
        if guard.skipped:
            values["skipped_steps"] = guard.skipped
        values.update(lr=float(schedule(step_done - 1)), **speed, **data_stats.take(), **task_losses.take())
        writer.log(step_done, values)
        progress.log(values)

    def save_checkpoint(step: int) -> None:
        with throughput.excluded():  # its blocking part (device-to-host copy) is not training time
            checkpointer.save(step, model, optimizer, data_iterator)

    try:
        with mesh_lib.use_mesh(config, mesh), SIGNALS.in_phase("training"):
            float(schedule(0))  # its dozen small jits compiled now (under the mesh), not in the first window
            if step == 0 and config.eval.at_start:  # the run's baseline
                with SIGNALS.in_phase("eval"):
                    _evaluate(model, tokenizer, config, registry, step, workdir, writer, progress)
            if step < last_step:
                status(f"Training from step {step} to {last_step}")
            elif step > t.steps:  # a run never goes back: fewer steps than it has taken train nothing
                status(f"The run is at step {step}, past train.steps = {t.steps}: nothing to train; step {step} is "
                       "kept and evaluated (to train fewer steps, start a new workdir)")
            while step < last_step:
                save_now, stop_now = SIGNALS.poll(step)
                if save_now:
                    if in_flight is not None:
                        finish(in_flight)
                        in_flight = None
                    # SIGTERM before this process took a step has nothing new to save.
                    if checkpointer.latest_step() != step and not (stop_now and step == first_step - 1):
                        save_checkpoint(step)
                        progress.write(f"step {step}: saved a checkpoint" + ("" if stop_now else " on demand (SIGUSR1)"))
                    if stop_now:
                        checkpointer.wait()
                        raise Preempted(step, saved=checkpointer.latest_step() == step,
                                        interrupted=SIGNALS.interrupted)
                first = step == first_step - 1
                if first:  # the packer fills all its open rows before one leaves: at long rows, minutes
                    progress.write(f"Packing the first batch: {config.data.packing_bins} open rows of "
                                   f"{config.data.seq_len} tokens fill first (fewer data.packing_bins start sooner)")
                    waited = time.monotonic()
                local = next(data_iterator)
                # Counted now, added to the logged windows when the step finishes.
                counts = data_stats.count(local)
                tokens = int((local["segment_ids"] > 0).sum()) * jax.process_count()
                slots = local["segment_ids"].size * jax.process_count()
                if first:
                    progress.write(f"First batch after {time.monotonic() - waited:.1f} s")
                    progress.write("Compiling the train step (the first step; once per process and shape)")
                metrics = train_step(model, optimizer, mesh_lib.global_batch(local, mesh), t.microbatches,
                                     t.loss_chunk, len(tasks))
                step += 1
                if in_flight is not None:
                    finish(in_flight)
                in_flight = (step, metrics, tokens, slots, counts, step % t.log_every == 0 or step == last_step)
                save = step % t.checkpoint_every == 0 or step == last_step
                # Finished now: before saving, so a non-finite loss never reaches a checkpoint;
                # and the first step before the next is queued, so the throughput window opens
                # with the device idle (a CPU may run a queued step inside the call).
                evaluate = config.eval.every_steps and step % config.eval.every_steps == 0 and step != t.steps
                # (and before an evaluation: time left out of a window must not overlap a step)
                if save or step == first_step or evaluate:
                    finish(in_flight)
                    in_flight = None
                if save:
                    save_checkpoint(step)
                if evaluate:
                    with SIGNALS.in_phase("eval"), throughput.excluded():
                        _evaluate(model, tokenizer, config, registry, step, workdir, writer, progress)
            progress.close()
            checkpointer.wait()
            if data_stats.bad_records:
                status(f"Skipped {data_stats.bad_records} bad records (data.on_bad_record = 'skip'); the first "
                       "reasons are in the log above")
        if step < t.steps:
            return None
        with mesh_lib.use_mesh(config, mesh), SIGNALS.in_phase("final_eval"):
            return _evaluate(model, tokenizer, config, registry, step, workdir, writer, progress)
    finally:
        progress.close()
        checkpointer.close()
        writer.close()


class _NonfiniteGuard:
    """A non-finite loss stops the run, or (train.on_nonfinite = "skip") counts as a
    skipped step, whose update the optimizer dropped, up to max_skipped_steps in a row."""

    def __init__(self, skip: bool, max_skipped: int, progress: Progress):
        self.skip, self.max_skipped, self.progress = skip, max_skipped, progress
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
        self.progress.write(f"step {step}: loss is {loss}; its update was skipped (train.on_nonfinite = 'skip')")


def _evaluate(model, tokenizer, config: ConfigDict, registry: TaskRegistry, step: int, workdir: Path,
              writer: Trackers, progress: Progress) -> dict:
    progress.write(f"Evaluating at step {step}")
    results = evaluator.evaluate(model, tokenizer, config, registry)
    if jax.process_index() == 0:
        report.print_table(results, step)
        report.save_results(results, step, workdir, config.eval.predictions)
        writer.log(step, report.log_values(results))
    return results
