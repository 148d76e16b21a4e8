"""Data streams: the unit in which the pipeline is sharded over processes and saved.

The mixed example stream is dealt into `S` streams (stream s reads examples s, s+S, ...),
each rendered and packed on its own into `batch_size / S` rows per batch. A global
batch is the streams' rows in stream order, and each process runs a contiguous block of
`S / process_count` streams. So the batches, and the losses, do not depend on how many
processes read them, and a checkpoint saves one state file per stream: a run restored
onto a different process count gives each process the streams it now owns, each
continuing exactly where it stopped.

`data.streams = 0` uses one stream per process at the first run; the count is saved with
the checkpoint and kept on resume, whatever the new process count (it must divide it).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jit_tune.config import ConfigError

COUNT_FILE = "streams.json"


def owned_streams(stream_count: int, process_index: int, process_count: int) -> range:
    if stream_count % process_count:
        raise ConfigError(
            f"config.data.streams = {stream_count}: expected a multiple of the {process_count} processes (each "
            "process runs a whole number of data streams); a run resumed from a checkpoint keeps its stream count")
    per_process = stream_count // process_count
    return range(process_index * per_process, (process_index + 1) * per_process)


class Streams:
    """This process's streams, as one iterable of its local batches."""

    def __init__(self, make_stream: Callable[[int], grain.IterDataset], streams: Sequence[int], stream_count: int):
        self.datasets = {s: make_stream(s) for s in streams}
        self.stream_count = stream_count

    def __iter__(self) -> StreamsIterator:
        return StreamsIterator({s: iter(d) for s, d in self.datasets.items()}, self.stream_count)


class StreamsIterator:
    """Concatenates one batch of each owned stream, in stream order."""

    def __init__(self, iterators: dict[int, Any], stream_count: int):
        self.iterators, self.stream_count = iterators, stream_count

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(self.iterators[s]) for s in sorted(self.iterators)]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self) -> dict[int, Any]:
        return {s: it.get_state() for s, it in self.iterators.items()}

    def set_state(self, states: dict[int, Any]) -> None:
        for s, it in self.iterators.items():
            it.set_state(states[s])


def saved_stream_count(directory: Path) -> int | None:
    """The stream count saved in a checkpoint's data item, if there is one."""
    path = Path(directory) / COUNT_FILE
    return json.loads(path.read_text())["streams"] if path.is_file() else None


class StreamsHandler(ocp.CheckpointHandler):
    """Orbax handler: every process writes the state of each stream it runs, one file per
    stream, and reads back the files of the streams it runs now."""

    def save(self, directory: epath.Path, args: StreamsSave) -> None:
        iterator = args.item
        for s, state in iterator.get_state().items():  # synchronous: the position of this step
            (directory / f"stream_{s}.json").write_text(json.dumps(state))
        if 0 in iterator.iterators:
            (directory / COUNT_FILE).write_text(json.dumps({"streams": iterator.stream_count}))

    def restore(self, directory: epath.Path, args: StreamsRestore) -> StreamsIterator:
        iterator = args.item
        saved = saved_stream_count(Path(directory))
        if saved != iterator.stream_count:
            raise ConfigError(f"{directory}: the checkpoint has {saved} data streams, this run {iterator.stream_count}")
        iterator.set_state({s: json.loads((directory / f"stream_{s}.json").read_text()) for s in iterator.iterators})
        return iterator

    def metadata(self, directory: epath.Path) -> None:
        return None


@ocp.args.register_with_handler(StreamsHandler, for_save=True)
@dataclasses.dataclass
class StreamsSave(ocp.args.CheckpointArgs):
    item: StreamsIterator


@ocp.args.register_with_handler(StreamsHandler, for_restore=True)
@dataclasses.dataclass
class StreamsRestore(ocp.args.CheckpointArgs):
    item: StreamsIterator
