"""The tasks a run can mix: the built-in generated suite, and tasks read from files.

A task yields examples in the conversation form with its name and template attached.
File tasks come from `config.data.tasks` (one file or dataset each) or from
`config.data.task_dirs` (FLAN/T0 layout: every `<task>/` subdirectory is a task and
each of its files one template). Their records are split deterministically: a record
belongs to validation when a hash of (task, index) falls in `data.validation_share`.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib

import grain
import numpy as np
from ml_collections import ConfigDict

from jit_tune.data import builtin_tasks
from jit_tune.data.formats import DEFAULT_FIELDS, to_conversation
from jit_tune.data.sources import SourceError, open_source, task_directory

_GENERATED = 2**40  # index space of a generated task


class SkippedRecords:
    """Bad records skipped under data.on_bad_record = "skip": a count and the first
    reasons, for the run's log. (Counted in the process that reads; with Grain worker
    processes each worker keeps its own.)"""

    keep = 5

    def __init__(self):
        self.count, self.reasons = 0, []

    def add(self, reason: str) -> None:
        self.count += 1
        if len(self.reasons) < self.keep:
            self.reasons.append(reason)


SKIPPED = SkippedRecords()


@dataclasses.dataclass
class FileTask:
    name: str
    templates: list[tuple[str, object]]  # (template name, source)
    format: str
    fields: dict
    validation_share: float
    skip_bad_records: bool = False

    def __post_init__(self):
        self._starts = np.cumsum([0] + [len(source) for _, source in self.templates])
        n = int(self._starts[-1])
        in_validation = np.asarray([zlib.crc32(f"{self.name}:{i}".encode()) % 10_000 for i in range(n)]) < (
            self.validation_share * 10_000)
        self.indices = {"train": np.flatnonzero(~in_validation), "validation": np.flatnonzero(in_validation)}

    def size(self, split: str) -> int:
        return len(self.indices[split])

    def example(self, split: str, position: int) -> dict | None:
        """The conversation at `position` of `split`; None for a bad record when
        skipping (Grain drops Nones), else the SourceError naming file, line and field."""
        index = int(self.indices[split][position])
        part = int(np.searchsorted(self._starts, index, side="right") - 1)
        template, source = self.templates[part]
        try:
            example = to_conversation(source[index - self._starts[part]], self.format, self.fields)
        except SourceError as e:
            if not self.skip_bad_records:
                raise
            SKIPPED.add(str(e))
            return None
        return {"task": self.name, "template_id": part, "template": template, **example}


FILE_TASK_FIELDS = {"path": None, "kind": "auto", "format": "prompt_completion", "fields": {}, "split": "train",
                    "data_files": None}
TASK_DIR_FIELDS = {"path": None, "format": "t0", "fields": {}}


def _spec(spec: ConfigDict, defaults: dict, where: str) -> dict:
    """A task spec with its defaults filled in; unknown or missing keys are errors."""
    values = spec.to_dict() if isinstance(spec, ConfigDict) else dict(spec)
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise SourceError(f"{where}: unknown keys {unknown}; expected some of {sorted(defaults)}")
    merged = {**defaults, **values}
    if merged["path"] is None:
        raise SourceError(f"{where}: missing 'path'")
    return merged


def file_tasks(config: ConfigDict) -> dict[str, FileTask]:
    d = config.data
    tasks = {}
    for name, raw in d.tasks.items():
        spec = _spec(raw, FILE_TASK_FIELDS, f"config.data.tasks.{name}")
        source = open_source(spec["path"], spec["kind"], spec["split"], spec["data_files"])
        tasks[name] = FileTask(name, [(name, source)], spec["format"], spec["fields"], d.validation_share,
                               d.on_bad_record == "skip")
    for prefix, raw in d.task_dirs.items():
        spec = _spec(raw, TASK_DIR_FIELDS, f"config.data.task_dirs.{prefix}")
        for task, templates in task_directory(spec["path"]).items():
            parts = [(template, open_source(str(path))) for template, path in templates.items()]
            name = f"{prefix}/{task}"
            tasks[name] = FileTask(name, parts, spec["format"], spec["fields"], d.validation_share,
                                   d.on_bad_record == "skip")
    for task in tasks.values():
        if task.format not in DEFAULT_FIELDS:
            raise SourceError(f"config.data task {task.name!r}: format {task.format!r}: expected one of "
                              f"{', '.join(DEFAULT_FIELDS)}")
    return tasks


def all_tasks(config: ConfigDict) -> dict[str, object]:
    """{name: builtin_tasks.Task or FileTask} for every task the config can mix."""
    return {**builtin_tasks.TASKS_BY_NAME, **file_tasks(config)}


def task_size(task, split: str) -> float:
    return float("inf") if isinstance(task, builtin_tasks.Task) else task.size(split)


def train_examples(task, config: ConfigDict) -> grain.MapDataset:
    """Endless training examples of one task; file tasks reshuffle every epoch."""
    if isinstance(task, builtin_tasks.Task):
        make = functools.partial(builtin_tasks.make_example, task, "train", seed=config.data.builtin_seed)
        return grain.MapDataset.range(_GENERATED).map(make)
    if task.size("train") == 0:
        raise SourceError(f"task {task.name!r}: no training records (validation_share took them all)")
    positions = grain.MapDataset.range(task.size("train")).shuffle(seed=config.seed)
    return positions.repeat().map(functools.partial(task.example, "train"))
