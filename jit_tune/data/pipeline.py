"""The one data path, on Grain: tasks -> mixture -> render + tokenize -> pack -> batch.

The mixed stream is dealt into data streams (streams.py), each packed on its own; each
process runs its share of them, so hosts never duplicate an example and the global
batch does not depend on the process count. The streams' states are saved inside each
checkpoint, so a resumed run continues with exactly the next batch.

Rows leave the pipeline as int32 arrays [rows, seq_len]:
  inputs, targets    tokens and the next token (shifted within an example, never across)
  loss_mask          1 where the target is trained (responses and their EOS)
  segment_ids        which packed example a token belongs to, 0 for padding
  positions          position within its example, restarting at 0
  task_ids           which task of the mixture a token came from (host-side, for logs)
  truncated          1 on the tokens of an example cut to fit the row (host-side, for logs)

Examples dropped before packing (too long, or with no trained token) are counted in the
`dropped` Counter a caller passes to train_dataset, in the process that renders them
(with data.workers > 0 that is a worker, and the caller's Counter stays empty).
"""

from __future__ import annotations

import collections
import functools

import grain
import numpy as np
from absl import flags
from grain.experimental import BestFitPackIterDataset, FirstFitPackIterDataset, WindowShuffleMapDataset
from ml_collections import ConfigDict
from transformers import PreTrainedTokenizerBase

from jit_tune.config import ConfigError
from jit_tune.data import builtin_tasks
from jit_tune.data import tasks as tasks_lib
from jit_tune.data.mixture import task_rates
from jit_tune.data.render import tokenize_conversation
from jit_tune.data.streams import Streams, owned_streams
from jit_tune.data.tokenizer import get_tokenizer

FEATURES = ("inputs", "targets", "loss_mask")
# task_ids: 1 + the task's index in the mixture, per token (0 for padding); host-side
# only, for logging the realized mixture.
HOST_FEATURES = ("task_ids", "truncated")
ROW_FEATURES = FEATURES + ("segment_ids", "positions") + HOST_FEATURES


def encode(example: dict, tokenizer: PreTrainedTokenizerBase, train_on: str) -> dict[str, np.ndarray]:
    """A conversation as next-token training arrays, shifted inside the example."""
    ids, mask = tokenize_conversation(tokenizer, example["messages"], train_on)
    return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:]}


def truncate(features: dict[str, np.ndarray], seq_len: int, policy: str) -> dict[str, np.ndarray] | None:
    """Fit an example into a row, or None to drop it. "left" cuts the prompt from the
    left and keeps everything from the first trained token on; an example whose trained
    part alone is longer than a row is dropped either way."""
    if len(features["inputs"]) <= seq_len:
        return features
    if policy == "drop":
        return None
    first_trained = int(np.argmax(features["loss_mask"]))
    start = len(features["inputs"]) - seq_len
    if start > first_trained:
        return None
    return {k: v[start:] for k, v in features.items()}


def _fit(features: dict[str, np.ndarray], seq_len: int, policy: str,
         dropped: collections.Counter) -> dict[str, np.ndarray] | None:
    if not features["loss_mask"].any():
        dropped["no_trained_token"] += 1  # nothing to learn from
        return None
    fitted = truncate(features, seq_len, policy)
    if fitted is None:
        dropped["too_long"] += 1
        return None
    fitted["truncated"] = np.full(len(fitted["inputs"]), fitted is not features, np.int32)
    return fitted


def _tagged(example: dict, task_index: dict[str, int], tokenizer, train_on: str) -> dict[str, np.ndarray]:
    features = encode(example, tokenizer, train_on)
    features["task_ids"] = np.full(len(features["inputs"]), task_index[example["task"]] + 1, np.int32)
    return features


def _to_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    row = {k: packed[k].astype(np.int32) for k in FEATURES + HOST_FEATURES}
    row["segment_ids"] = packed["inputs_segment_ids"].astype(np.int32)
    row["positions"] = packed["inputs_positions"].astype(np.int32)
    return row


def train_dataset(
    config: ConfigDict, tokenizer: PreTrainedTokenizerBase, process_index: int = 0, process_count: int = 1,
    dropped: collections.Counter | None = None, stream_count: int | None = None,
) -> Streams:
    """This process's batches of packed rows (`batch_size / process_count` of each global
    batch), endless and deterministic in config.seed, from its share of the data streams
    (streams.py; `stream_count` overrides config.data.streams, as a resumed run's
    checkpoint does). `dropped` counts the examples left out ("too_long",
    "no_trained_token")."""
    d = config.data
    stream_count = stream_count or d.streams or process_count
    if d.batch_size % stream_count:
        raise ConfigError(f"config.data.batch_size = {d.batch_size}: expected a multiple of the {stream_count} data "
                          "streams (config.data.streams, or one per process)")
    mixed = mixed_examples(config)
    task_index = {name: i for i, name in enumerate(mixture_rates(config))}
    dropped = collections.Counter() if dropped is None else dropped

    def stream(index: int) -> grain.IterDataset:
        encoded = mixed[index::stream_count].map(
            functools.partial(_tagged, task_index=task_index, tokenizer=tokenizer, train_on=d.train_on))
        encoded = encoded.map(functools.partial(_fit, seq_len=d.seq_len, policy=d.truncation, dropped=dropped))
        # Rendering runs inline: Grain's thread prefetch polls its futures under the GIL and
        # cut throughput by 2.3x here (tools/bench_pipeline.py); parallel reading is for
        # worker processes (mp_prefetch).
        inline = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        packed = pack(encoded.to_iter_dataset(inline), config, FEATURES + HOST_FEATURES)
        batches = packed.map(_to_row).batch(d.batch_size // stream_count, drop_remainder=True)
        if d.workers:
            # Worker processes render and pack, each its share of the stream's batches; the
            # iterator's state (saved in checkpoints) covers all of them.
            flags.FLAGS.mark_as_parsed()  # Grain's workers read absl flags
            batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.workers))
        return batches

    return Streams(stream, owned_streams(stream_count, process_index, process_count), stream_count)


def pack(examples: grain.IterDataset, config: ConfigDict, features: tuple[str, ...] = FEATURES) -> grain.IterDataset:
    """Grain's packer chosen by config.data.packing over config.data.packing_bins open
    rows (tools/bench_packing.py measures the choices)."""
    d = config.data
    packer = {"best_fit": BestFitPackIterDataset, "first_fit": FirstFitPackIterDataset}[d.packing]
    return packer(examples, length_struct={k: d.seq_len for k in features}, num_packing_bins=d.packing_bins,
                  seed=config.seed, shuffle_bins=True)


def mixed_examples(config: ConfigDict) -> grain.MapDataset:
    """Conversation examples drawn from every task at its mixture rate. The order is
    shuffled within windows of data.shuffle_window (lazy, index-only) to vary the task
    order within rows; a global shuffle of the endless mixture would sample each task's
    records with replacement instead of one epoch after another."""
    registry = tasks_lib.all_tasks(config)
    rates = mixture_rates(config, registry)
    mixture = grain.MapDataset.mix(
        [tasks_lib.train_examples(registry[name], config) for name in rates], weights=list(rates.values())
    )
    return WindowShuffleMapDataset(mixture, window_size=config.data.shuffle_window, seed=config.seed)


def mixture_rates(config: ConfigDict, registry: dict | None = None) -> dict[str, float]:
    """{task: share of training examples} from the config's (nested) mixture."""
    registry = registry or tasks_lib.all_tasks(config)
    sizes = {name: tasks_lib.task_size(task, "train") for name, task in registry.items()}
    groups = {name: {"cap": 0, "temperature": 1.0, **group.to_dict()} for name, group in config.data.groups.items()}
    return task_rates(dict(config.data.mixture), groups, sizes)


def tokenizer_corpus(config: ConfigDict):
    """Text to train a "bpe" tokenizer on: the first training examples of every task in
    the mixture (a deterministic sample, so every host trains the same tokenizer)."""
    registry = tasks_lib.all_tasks(config)
    for name in mixture_rates(config, registry):
        examples = tasks_lib.train_examples(registry[name], config)
        for i in range(config.data.tokenizer_corpus_examples):
            for message in examples[i]["messages"]:
                yield message["content"]


def run_tokenizer(config: ConfigDict, workdir) -> PreTrainedTokenizerBase:
    """The tokenizer a run with `config` uses, kept in (or read back from) `workdir`."""
    d = config.data
    return get_tokenizer(d.tokenizer, workdir, d.tokenizer_vocab_size, d.builtin_seed,
                         corpus=lambda: tokenizer_corpus(config), chat_template=d.chat_template)


def validation_examples(config: ConfigDict, task, held_out: bool) -> list[dict]:
    """The fixed validation set of one task on its held-in or held-out templates: for
    built-in tasks generated, for file tasks the first records of its validation split
    (held-out templates exist for templated tasks that declare some)."""
    if isinstance(task, builtin_tasks.Task):
        return [
            builtin_tasks.make_example(task, "validation", i, config.data.builtin_seed, held_out)
            for i in range(config.eval.examples_per_task)
        ]
    if held_out and not task.has_held_out_templates:
        return []
    count = min(task.size("validation"), config.eval.examples_per_task)
    examples = (task.example("validation", i, held_out=held_out) for i in range(count))
    return [example for example in examples if example is not None]
