"""The training loop: one path from a laptop CPU to a pod.

Resume order, when the workdir holds a checkpoint: tokenizer (workdir/tokenizer), then
params, optimizer state and step, then the data iterator position, all from the latest
complete checkpoint. Running the same command again therefore continues exactly.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np
from ml_collections import ConfigDict
from tqdm import tqdm

from jit_tune import mesh as mesh_lib
from jit_tune.config import ConfigError, save_config
from jit_tune.data.pipeline import train_dataset
from jit_tune.data.tokenizer import get_tokenizer
from jit_tune.eval import evaluator
from jit_tune.train.checkpoint import Checkpointer
from jit_tune.train.metrics import MetricsWriter
from jit_tune.train.optimizer import learning_rate_schedule
from jit_tune.train.state import create_model_and_optimizer
from jit_tune.train.step import train_step


def setup(config: ConfigDict, workdir: Path):
    """Tokenizer, mesh, model, optimizer, data iterator and checkpointer, restored from
    the latest checkpoint when there is one. Returns them with the step to start at."""
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        save_config(config, workdir / "config.json")
    d = config.data
    tokenizer = get_tokenizer(d.tokenizer, workdir, d.tokenizer_vocab_size, d.builtin_seed)
    if len(tokenizer) > config.model.vocab_size:
        raise ConfigError(
            f"config.model.vocab_size = {config.model.vocab_size}: expected at least the tokenizer's "
            f"{len(tokenizer)} tokens"
        )
    mesh = mesh_lib.make_mesh(config)
    mesh_lib.check_batch_divides(d.batch_size, mesh)
    data_iterator = iter(train_dataset(config, tokenizer, jax.process_index(), jax.process_count()))
    checkpointer = Checkpointer(workdir / "checkpoints", config.train.keep_checkpoints)
    start_step = checkpointer.latest_step() or 0
    model, optimizer = create_model_and_optimizer(config, mesh, abstract=start_step > 0)
    if start_step:
        checkpointer.restore(start_step, model, optimizer, data_iterator)
    return tokenizer, mesh, model, optimizer, data_iterator, checkpointer, start_step


def train(config: ConfigDict, workdir: str | Path) -> dict:
    """Train to config.train.steps (resuming if possible), then evaluate; returns the
    final per-task results, also printed as a table and written to workdir/eval."""
    workdir = Path(workdir)
    tokenizer, mesh, model, optimizer, data_iterator, checkpointer, step = setup(config, workdir)
    t = config.train
    writer = MetricsWriter(workdir)
    schedule = learning_rate_schedule(config)
    is_main = jax.process_index() == 0
    if step and is_main:
        print(f"Resumed from {workdir / 'checkpoints'} at step {step}")
    progress = tqdm(total=t.steps, initial=step, disable=not is_main, unit="step", dynamic_ncols=True)
    pending = None  # the previous step's metrics, fetched one step late so the host never stalls the device
    window_tokens, window_start = 0, time.perf_counter()
    with jax.set_mesh(mesh):
        while step < t.steps:
            local = next(data_iterator)
            window_tokens += int((local["segment_ids"] > 0).sum()) * jax.process_count()
            metrics = train_step(model, optimizer, mesh_lib.global_batch(local, mesh))
            step += 1
            if pending is not None:
                _report(pending, writer, progress, schedule)
            pending = None
            if step % t.log_every == 0 or step == t.steps:
                elapsed = time.perf_counter() - window_start
                pending = (step, metrics, window_tokens / elapsed)
                window_tokens, window_start = 0, time.perf_counter()
            progress.update(1)
            if step % t.checkpoint_every == 0 or step == t.steps:
                checkpointer.save(step, model, optimizer, data_iterator)
            if config.eval.every_steps and step % config.eval.every_steps == 0 and step != t.steps:
                _evaluate(model, tokenizer, config, step, workdir, writer)
        if pending is not None:
            _report(pending, writer, progress, schedule)
        progress.close()
        checkpointer.wait()
        results = _evaluate(model, tokenizer, config, step, workdir, writer)
    checkpointer.close()
    writer.close()
    return results


def _report(pending, writer: MetricsWriter, progress: tqdm, schedule) -> None:
    step, metrics, tokens_per_sec = pending
    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not np.isfinite(values["loss"]):
        raise FloatingPointError(f"step {step}: loss is {values['loss']}; stopping (the last checkpoint is kept)")
    values.update(lr=float(schedule(step - 1)), tokens_per_sec=tokens_per_sec)
    writer.write(step, values)
    progress.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{tokens_per_sec:,.0f}")


def _evaluate(model, tokenizer, config: ConfigDict, step: int, workdir: Path, writer: MetricsWriter) -> dict:
    results = evaluator.evaluate(model, tokenizer, config)
    if jax.process_index() == 0:
        evaluator.print_table(results, step)
        evaluator.save_results(results, step, workdir)
        writer.write(step, {
            f"eval/{group}/{metric}": value for group, metrics in results["mean"].items() for metric, value in metrics.items()
        })
    return results
