"""Per-task validation loss and greedy exact match, on held-in and held-out templates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from ml_collections import ConfigDict
from rich.console import Console
from rich.table import Table
from transformers import PreTrainedTokenizerBase

from jit_tune.data import tasks as tasks_lib
from jit_tune.files import atomic_write_json
from jit_tune.data.pipeline import encode, mixture_rates, truncate, validation_examples
from jit_tune.data.render import prompt_ids
from jit_tune.eval.decode import generate_greedy
from jit_tune.mesh import to_host
from jit_tune.models.decoder import Decoder
from jit_tune.train.step import eval_losses

GROUPS = (("held_in", False), ("held_out", True))


def _unpacked_rows(features: list[dict | None], seq_len: int, batch: int) -> dict[str, np.ndarray]:
    """One example per row, zero-padded (segment 0) to seq_len and to `batch` rows; a
    None (an example the truncation policy drops) leaves its row empty."""
    rows = {k: np.zeros((batch, seq_len), np.int32) for k in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
    for i, f in enumerate(features):
        if f is None:
            continue
        n = len(f["inputs"])
        for k in ("inputs", "targets", "loss_mask"):
            rows[k][i, :n] = f[k][:n]
        rows["segment_ids"][i, :n] = 1
        rows["positions"][i, :n] = np.arange(n)
    return rows


def evaluate(model: Decoder, tokenizer: PreTrainedTokenizerBase, config: ConfigDict) -> dict:
    """{task: {group: {"loss", "exact_match", "examples"}}} plus a "mean" entry per group;
    a task with no validation examples gets an empty entry."""
    registry = tasks_lib.all_tasks(config)
    tasks = list(mixture_rates(config, registry))
    items = [
        (name, group, example)
        for name in tasks
        for group, held_out in GROUPS
        for example in validation_examples(config, registry[name], held_out)
    ]
    batch, seq_len = config.eval.batch_size, config.data.seq_len
    loss_sums, counts = [], []
    for start in range(0, len(items), batch):
        chunk = items[start: start + batch]
        # The training rows' truncation, so the loss is measured on what was trained.
        features = [truncate(encode(ex, tokenizer, config.data.train_on), seq_len, config.data.truncation)
                    for _, _, ex in chunk]
        row_loss, row_count = eval_losses(model, _unpacked_rows(features, seq_len, batch))
        loss_sums.extend(to_host(row_loss)[: len(chunk)])
        counts.extend(to_host(row_count)[: len(chunk)])

    # Long prompts keep their end (the instruction usually closes them), like the
    # left-cut truncation of training rows.
    prompts = [prompt_ids(tokenizer, ex["messages"][:-1])[-seq_len:] for _, _, ex in items]
    outputs = generate_greedy(
        model, prompts, config.eval.max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, batch
    ) if prompts else []
    correct = [
        tokenizer.decode(out, skip_special_tokens=True).strip() == ex["messages"][-1]["content"].strip()
        for out, (_, _, ex) in zip(outputs, items)
    ]

    results: dict = {task: {} for task in tasks}
    for (task, group, _), loss, count, ok in zip(items, loss_sums, counts, correct):
        entry = results.setdefault(task, {}).setdefault(group, {"loss_sum": 0.0, "tokens": 0.0, "correct": 0, "examples": 0})
        entry["loss_sum"] += float(loss)
        entry["tokens"] += float(count)
        entry["correct"] += int(ok)
        entry["examples"] += 1
    for task_results in results.values():
        for group, entry in task_results.items():
            task_results[group] = {
                "loss": entry["loss_sum"] / entry["tokens"] if entry["tokens"] else float("nan"),
                "exact_match": entry["correct"] / entry["examples"],
                "examples": entry["examples"],
            }
    results["mean"] = {
        group: {
            metric: float(np.nanmean([r[group][metric] for r in results.values() if group in r]))
            for metric in ("loss", "exact_match")
        }
        for group, _ in GROUPS
        if any(group in r for r in results.values())
    }
    return results


def print_table(results: dict, step: int, console: Console | None = None) -> None:
    table = Table(title=f"Per-task validation at step {step}")
    for column in ("task", "loss held-in", "EM held-in", "loss held-out", "EM held-out"):
        table.add_column(column, justify="left" if column == "task" else "right")
    names = list(results)
    for task, groups in results.items():
        cells = []
        for group, _ in GROUPS:
            if group in groups:
                cells += [f"{groups[group]['loss']:.3f}", f"{100 * groups[group]['exact_match']:.1f}%"]
            else:
                cells += ["-", "-"]
        if not groups and task != "mean":
            cells[0] = "no validation examples"
        table.add_row(task, *cells, end_section=len(names) > 1 and task == names[-2])
    (console or Console()).print(table)


def save_results(results: dict, step: int, workdir: Path) -> None:
    for name in (f"results_step{step}.json", "results.json"):
        atomic_write_json(Path(workdir) / "eval" / name, {"step": step, "results": results})
