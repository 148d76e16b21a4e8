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
  dropped_*          examples left out since the previous row, on its first token
                     (host-side, for logs): bad records, with no trained token, too long

Drops ride along the rows rather than in a counter of the process that renders them, so
they reach the training log from Grain worker processes too.
"""

from __future__ import annotations

import collections
import logging
import signal

import grain
import numpy as np
from absl import flags
from grain.experimental import BestFitPackIterDataset, FirstFitPackIterDataset, WindowShuffleMapDataset
from ml_collections import ConfigDict
from transformers import PreTrainedTokenizerBase

from jit_tune.config import ConfigError
from jit_tune.data.sources import SourceError
from jit_tune.data import tasks as tasks_lib
from jit_tune.data.registry import TaskRegistry
from jit_tune.data.render import tokenize_conversation
from jit_tune.data.streams import Streams, owned_streams
from jit_tune.data.tokenizer import build_tokenizer, saved_tokenizer

FEATURES = ("inputs", "targets", "loss_mask")
# Why an example was left out, in the order of ExampleFilter's checks.
DROP_REASONS = ("bad_record", "no_trained_token", "too_long")
# task_ids: 1 + the task's index in the mixture, per token (0 for padding); host-side
# only, for logging the realized mixture and drops.
PACKED_HOST_FEATURES = ("task_ids", "truncated")
HOST_FEATURES = PACKED_HOST_FEATURES + tuple(f"dropped_{reason}" for reason in DROP_REASONS)
ROW_FEATURES = FEATURES + ("segment_ids", "positions") + HOST_FEATURES
# A task whose first this many examples (or whole train split, if smaller) are all left
# out yields nothing to train on: an error, not an endless search.
DEAD_TASK_DRAWS = 1000
log = logging.getLogger(__name__)


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


class ExampleFilter:
    """Encodes examples and keeps those that fit a row and train at least one token. The
    ones left out are counted by reason (a bad record once, however many epochs read it)
    until the next packed row takes the counts (`take_counts`); the first reasons a
    process meets are logged. A task that yields nothing to train on is a SourceError
    naming it and why."""

    log_first = 5

    def __init__(self, config: ConfigDict, tokenizer, task_index: dict[str, int], sizes: dict[str, float]):
        d = config.data
        self.tokenizer, self.task_index, self.train_on = tokenizer, task_index, d.train_on
        self.seq_len, self.policy = d.seq_len, d.truncation
        self.limits = {task: int(min(size, DEAD_TASK_DRAWS)) for task, size in sizes.items()}
        self.pending = collections.Counter()  # left out since the last row took the counts
        self.tried = collections.defaultdict(collections.Counter)  # task -> reason/"kept" -> count
        self.bad_seen: set[tuple[str, int]] = set()
        self.logged = 0

    def __call__(self, example: dict) -> dict[str, np.ndarray] | None:
        task = example["task"]
        if "bad_record" in example:
            reason = "bad_record"
            if (task, example["record"]) not in self.bad_seen:
                self.bad_seen.add((task, example["record"]))
                self.pending[reason] += 1
                if self.logged < self.log_first:
                    self.logged += 1
                    log.warning("skipped a bad record (data.on_bad_record = 'skip'): %s", example["bad_record"])
            return self._left_out(task, reason, example["bad_record"])
        features = encode(example, self.tokenizer, self.train_on)
        if not features["loss_mask"].any():  # no assistant turn, or only empty answers
            self.pending["no_trained_token"] += 1
            return self._left_out(task, "no_trained_token")
        fitted = truncate(features, self.seq_len, self.policy)
        if fitted is None:
            self.pending["too_long"] += 1
            return self._left_out(task, "too_long")
        self.tried[task]["kept"] += 1
        n = len(fitted["inputs"])
        fitted["truncated"] = np.full(n, fitted is not features, np.int32)
        fitted["task_ids"] = np.full(n, self.task_index[task] + 1, np.int32)
        return fitted

    def take_counts(self, row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A packed row with the drops counted since the previous one (on its first slot)."""
        for reason in DROP_REASONS:
            row[f"dropped_{reason}"] = np.zeros_like(row["inputs"])
            row[f"dropped_{reason}"][0] = self.pending[reason]
        self.pending.clear()
        return row

    def _left_out(self, task: str, reason: str, detail: str = "") -> None:
        tried = self.tried[task]
        tried[reason] += 1
        if tried["kept"] == 0 and sum(tried.values()) >= self.limits[task]:
            raise SourceError(self._dead_task(task, tried, detail))
        return None

    def _dead_task(self, task: str, tried: collections.Counter, detail: str) -> str:
        n = sum(tried.values())
        why = {"too_long": f"longer than a row (data.seq_len = {self.seq_len}) even after data.truncation = "
                           f"{self.policy!r} (an answer alone must fit the row)",
               "no_trained_token": "with nothing to train on (no assistant turn, or only empty answers)",
               "bad_record": f"bad records (data.on_bad_record = 'skip'), e.g. {detail}"}
        reasons = "; ".join(f"{tried[r]:,} {why[r]}" for r in DROP_REASONS if tried[r])
        return f"task {task!r} yields no example to train on: all of the first {n:,} drawn were left out: {reasons}"


def _to_row(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    row = {k: packed[k].astype(np.int32) for k in FEATURES + PACKED_HOST_FEATURES}
    row["segment_ids"] = packed["inputs_segment_ids"].astype(np.int32)
    row["positions"] = packed["inputs_positions"].astype(np.int32)
    return row


def train_dataset(
    config: ConfigDict, tokenizer: PreTrainedTokenizerBase, registry: TaskRegistry, process_index: int = 0,
    process_count: int = 1, stream_count: int | None = None,
) -> Streams:
    """This process's batches of packed rows (`batch_size / process_count` of each global
    batch), endless and deterministic in config.seed, from its share of the data streams
    (streams.py; `stream_count` overrides config.data.streams, as a resumed run's
    checkpoint does)."""
    d = config.data
    stream_count = stream_count or d.streams or process_count
    if d.batch_size % stream_count:
        raise ConfigError(f"config.data.batch_size = {d.batch_size}: expected a multiple of the {stream_count} data "
                          "streams (config.data.streams, or one per process)")
    rates = registry.rates
    mixed = mixed_examples(config, registry)
    sizes = {name: tasks_lib.task_size(registry.tasks[name], "train") for name in rates}
    keep = ExampleFilter(config, tokenizer, {name: i for i, name in enumerate(rates)}, sizes)

    def stream(index: int) -> grain.IterDataset:
        encoded = mixed[index::stream_count].map(keep)
        # Rendering runs inline: Grain's thread prefetch polls its futures under the GIL and
        # cut throughput by 2.3x here (tools/bench_pipeline.py); parallel reading is for
        # worker processes (mp_prefetch).
        inline = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
        packed = pack(encoded.to_iter_dataset(inline), config, FEATURES + PACKED_HOST_FEATURES)
        rows = packed.map(_to_row).map(keep.take_counts)  # in the process that ran `keep`
        batches = rows.batch(d.batch_size // stream_count, drop_remainder=True)
        if d.workers:
            # Worker processes render and pack, each its share of the stream's batches; the
            # iterator's state (saved in checkpoints) covers all of them.
            flags.FLAGS.mark_as_parsed()  # Grain's workers read absl flags
            batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.workers),
                                          worker_init_fn=_ignore_ctrl_c)
        return batches

    return Streams(stream, owned_streams(stream_count, process_index, process_count), stream_count)


def _ignore_ctrl_c(worker_index: int, worker_count: int) -> None:
    """In Grain's workers: a terminal's Ctrl-C reaches the whole process group, and the
    training process, which saves before it stops, stops its workers itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def pack(examples: grain.IterDataset, config: ConfigDict, features: tuple[str, ...] = FEATURES) -> grain.IterDataset:
    """Grain's packer chosen by config.data.packing over config.data.packing_bins open
    rows (tools/bench_packing.py measures the choices)."""
    d = config.data
    packer = {"best_fit": BestFitPackIterDataset, "first_fit": FirstFitPackIterDataset}[d.packing]
    return packer(examples, length_struct={k: d.seq_len for k in features}, num_packing_bins=d.packing_bins,
                  seed=config.seed, shuffle_bins=True)


def mixed_examples(config: ConfigDict, registry: TaskRegistry) -> grain.MapDataset:
    """Conversation examples drawn from every task at its mixture rate. The order is
    shuffled within windows of data.shuffle_window (lazy, index-only) to vary the task
    order within rows; a global shuffle of the endless mixture would sample each task's
    records with replacement instead of one epoch after another. Bad records skipped
    under data.on_bad_record = "skip" appear as `tasks.bad_record` markers."""
    rates = registry.rates
    mixture = grain.MapDataset.mix(
        [tasks_lib.train_examples(registry.tasks[name], config) for name in rates], weights=list(rates.values())
    )
    return WindowShuffleMapDataset(mixture, window_size=config.data.shuffle_window, seed=config.seed)


def tokenizer_corpus(config: ConfigDict, registry: TaskRegistry):
    """Text to train a "bpe" tokenizer on: the first training examples of every task in
    the mixture (a deterministic sample, so every host trains the same tokenizer)."""
    for name in registry.rates:
        examples = tasks_lib.train_examples(registry.tasks[name], config)
        for i in range(config.data.tokenizer_corpus_examples):
            for message in examples[i].get("messages", ()):  # a bad record has none
                yield message["content"]


def run_tokenizer(config: ConfigDict, registry: TaskRegistry, workdir=None) -> PreTrainedTokenizerBase:
    """The tokenizer of a run with `config`: the one saved in `workdir` when there is
    one, else built as the config says (training saves it once the run is accepted)."""
    d = config.data
    saved = saved_tokenizer(workdir) if workdir is not None else None
    return saved or build_tokenizer(d.tokenizer, d.tokenizer_vocab_size, d.builtin_seed,
                                    corpus=lambda: tokenizer_corpus(config, registry), chat_template=d.chat_template)
