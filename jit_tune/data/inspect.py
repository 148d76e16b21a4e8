"""`jit-tune data inspect`: look at what training will see, without compiling a model.

Prints a few rendered examples with the trained tokens highlighted, the realized
mixture proportions against the configured rates, a histogram of example lengths,
packing statistics, all from the same pipeline functions training uses, and a
contamination check: how many of each eval task's examples overlap the training
mixture (data/contamination.py).
"""

from __future__ import annotations

import collections
import itertools

import numpy as np
from ml_collections import ConfigDict
from rich.console import Console
from rich.table import Table
from rich.text import Text
from transformers import PreTrainedTokenizerBase

from jit_tune.data import builtin_tasks
from jit_tune.data.contamination import NGRAM, TrainingIndex, contamination, report_lines
from jit_tune.data.pipeline import encode, mixed_examples, train_dataset, truncate
from jit_tune.data.registry import TaskRegistry
from jit_tune.data.tasks import is_bad


def _highlighted(tokenizer: PreTrainedTokenizerBase, ids: np.ndarray, mask: np.ndarray) -> Text:
    text = Text()
    for trained, run in itertools.groupby(zip(ids, mask), key=lambda pair: bool(pair[1])):
        piece = tokenizer.decode([int(i) for i, _ in run])
        text.append(piece, style="bold green" if trained else "dim")
    return text


GENERATED_FOR_CONTAMINATION = 2000  # examples of each generated (built-in) task indexed


def _text(example: dict) -> str:
    """An example's answer-bearing text: every turn, the answer included."""
    return "\n".join(m["content"] for m in example["messages"])


def training_texts(config: ConfigDict, registry: TaskRegistry):
    """The trained tasks' training texts: every record of a file task's train split, and
    a sample of each generated task."""
    for name in registry.rates:
        task = registry.tasks[name]
        if isinstance(task, builtin_tasks.Task):
            for i in range(GENERATED_FOR_CONTAMINATION):
                yield _text(builtin_tasks.make_example(task, "train", i, config.data.builtin_seed))
        else:
            for i in range(task.size("train")):
                example = task.example("train", i)
                if not is_bad(example):
                    yield _text(example)


def check_contamination(config: ConfigDict, registry: TaskRegistry) -> dict:
    """Per eval task, the share of its examples that overlap the training mixture."""
    from jit_tune.eval.examples import task_examples

    index = TrainingIndex(training_texts(config, registry))
    eval_texts = {name: [_text({"messages": e.messages}) for e in task_examples(config, registry, name)]
                  for name in registry.eval_tasks}
    return contamination(index, eval_texts, frozenset(builtin_tasks.TASKS_BY_NAME))


def inspect_data(config: ConfigDict, tokenizer: PreTrainedTokenizerBase, registry: TaskRegistry, n_show: int = 3,
                 n_sample: int = 2000, n_batches: int = 8, console: Console | None = None) -> dict:
    """Print the report; returns its numbers (for tests and notebooks)."""
    console = console or Console()
    d = config.data
    examples = mixed_examples(config, registry)
    drawn = [examples[i] for i in range(n_sample)]
    sample = [example for example in drawn if not is_bad(example)]
    bad = list(dict.fromkeys(example["bad_record"] for example in drawn if is_bad(example)))  # each record once

    console.rule("Rendered examples (trained tokens in bold green)")
    for example in sample[:n_show]:
        features = encode(example, tokenizer, d.train_on)
        inputs = np.concatenate([features["inputs"][:1], features["targets"]])
        mask = np.concatenate([[0], features["loss_mask"]])
        console.print(f"[bold]{example['task']}[/bold] (template {example['template_id']})")
        console.print(_highlighted(tokenizer, inputs, mask))
        console.print()

    rates = registry.rates
    counts = collections.Counter(example["task"] for example in drawn)
    table = Table(title=f"Mixture: realized over the first {n_sample:,} examples")
    for column in ("task", "rate", "realized"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for task, rate in rates.items():
        table.add_row(task, f"{rate:.2%}", f"{counts[task] / n_sample:.2%}")
    console.print(table)

    encoded = [encode(example, tokenizer, d.train_on) for example in sample]
    lengths = np.asarray([len(f["inputs"]) for f in encoded])
    untrained = sum(not f["loss_mask"].any() for f in encoded)
    fitted = [truncate(f, d.seq_len, d.truncation) for f in encoded if f["loss_mask"].any()]
    dropped = sum(f is None for f in fitted)
    truncated = sum(f is not None and len(f["inputs"]) < len(g["inputs"])
                    for f, g in zip(fitted, [g for g in encoded if g["loss_mask"].any()]))
    console.rule(f"Example lengths in tokens (row length {d.seq_len})")
    if len(lengths):
        edges = np.unique(np.quantile(lengths, np.linspace(0, 1, 9)).astype(int))
        histogram, _ = np.histogram(lengths, bins=np.append(edges[:-1], edges[-1] + 1))
        for lo, hi, count in zip(edges[:-1], edges[1:], histogram):
            console.print(f"{lo:>7}-{hi:<7} {'#' * int(60 * count / max(histogram.max(), 1))} {count}")

    console.rule("Packing")
    console.print(f"Packing {n_batches} batches ({d.packing_bins} open rows of {d.seq_len} tokens fill first) ...")
    rows = list(itertools.islice(iter(train_dataset(config, tokenizer, registry)), n_batches))
    segments = np.concatenate([b["segment_ids"] for b in rows])
    efficiency = float((segments > 0).mean())
    per_row = float(segments.max(axis=1).mean())
    stats = {
        "rates": rates,
        "realized": {t: counts[t] / n_sample for t in rates},
        "packing_efficiency": efficiency,
        "examples_per_row": per_row,
        "truncated": truncated,
        "dropped_too_long": dropped,
        "dropped_untrained": untrained,
        "bad_records": len(bad),
        "sampled": n_sample,
    }
    console.print(f"The first {n_batches} batches, {len(segments)} rows of {d.seq_len}: {efficiency:.1%} real tokens, "
                  f"{per_row:.1f} examples a row. Of the first {n_sample:,} examples: {truncated} truncated, "
                  f"{dropped} dropped as too long, {untrained} dropped with no trained token, {len(bad)} bad records "
                  "skipped", soft_wrap=True)
    if bad:  # whole lines, so a file:line stays one searchable string
        console.print("The first bad records:\n  " + "\n  ".join(bad[:5]), soft_wrap=True, markup=False)

    console.rule(f"Contamination: eval examples overlapping the training mixture (exact, or a {NGRAM}-gram)")
    stats["contamination"] = check_contamination(config, registry)
    for line in report_lines(stats["contamination"]):
        console.print(line, soft_wrap=True, markup=False)
    return stats
