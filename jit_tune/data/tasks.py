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
import logging
import zlib

import grain
import numpy as np
from ml_collections import ConfigDict

from jit_tune.data import builtin_tasks
from jit_tune.data.formats import FILE_TASK_FIELDS, TASK_DIR_FIELDS, task_spec, to_conversation
from jit_tune.data.sources import EmptySourceError, SourceError, open_source, task_directory
from jit_tune.data.templates import TemplateSet, example_key, few_shot_prompt

_GENERATED = 2**40  # index space of a generated task
log = logging.getLogger(__name__)


def bad_record(task: str, index: int, reason: str) -> dict:
    """What a bad record becomes under data.on_bad_record = "skip": a marker that flows
    down the pipeline to where drops are counted (pipeline.ExampleFilter), once per
    record however many epochs read it."""
    return {"task": task, "bad_record": reason, "record": index}


def is_bad(example: dict) -> bool:
    return "bad_record" in example


@dataclasses.dataclass
class FileTask:
    name: str
    templates: list[tuple[str, object]]  # (template name, source)
    format: str
    fields: dict
    validation_share: float
    skip_bad_records: bool = False
    templates_spec: dict | None = None  # for format "templated"
    seed: int = 0

    def __post_init__(self):  # the spec was checked by formats.task_spec
        self.template_set = None
        if self.format == "templated":
            self.template_set = TemplateSet(self.templates_spec, f"config.data.tasks.{self.name}.templates")
        self._starts = np.cumsum([0] + [len(source) for _, source in self.templates])
        n = int(self._starts[-1])
        in_validation = np.asarray([zlib.crc32(f"{self.name}:{i}".encode()) % 10_000 for i in range(n)]) < (
            self.validation_share * 10_000)
        self.indices = {"train": np.flatnonzero(~in_validation), "validation": np.flatnonzero(in_validation)}
        self._answers: dict[int, list[str] | None] = {}  # distinct_answers, per template file

    def size(self, split: str) -> int:
        return len(self.indices[split])

    @property
    def has_held_out_templates(self) -> bool:
        return self.template_set is not None and bool(self.template_set.held_out)

    def record(self, split: str, position: int) -> tuple[int, dict]:
        """(file index, raw record) at `position` of `split`."""
        index = int(self.indices[split][position])
        part = int(np.searchsorted(self._starts, index, side="right") - 1)
        return part, self.templates[part][1][index - self._starts[part]]

    def example(self, split: str, position: int, epoch: int = 0, held_out: bool = False,
                shots: int | None = None) -> dict:
        """The conversation at `position` of `split` (templated tasks: rendered for
        `epoch`, on a held-out template if asked). `shots` is evaluation's: exactly that
        many exemplars of the same template from the train split, and never an inverted
        template; None is training's rule (the templates' few-shot and inversion shares).
        A bad record raises the SourceError naming file, line and field, or when skipping
        becomes a `bad_record` marker. Templated tasks with answer options carry them."""
        try:
            part, record = self.record(split, position)
            key = example_key(self.seed, self.name, int(self.indices[split][position]), epoch)
            if self.template_set is None:
                example = {"task": self.name, "template_id": part, "template": self.templates[part][0],
                           **to_conversation(record, self.format, self.fields)}
                if shots:
                    exemplars = [to_conversation(self.record("train", p)[1], self.format, self.fields)["messages"]
                                 for p in self._exemplar_positions(key, shots, part)]
                    example["messages"] = _with_shots(example["messages"], exemplars)
                return example
            if shots is None:
                exclude = position if split == "train" else -1
                template, picks = self.template_set.choose(key, held_out, self.size("train"), exclude)
            else:
                template, picks = self.template_set.pick(key, held_out), self._exemplar_positions(key, shots)
            exemplars = [self.record("train", p)[1] for p in picks]
            return {"task": self.name, "template_id": self.template_set.ids[template.name],
                    "template": template.name, "_where": record.get("_where", "?"),
                    "messages": self.template_set.render(template, record, exemplars),
                    "options": self.template_set.fields(record).get("options")}
        except SourceError as e:
            if not self.skip_bad_records:
                raise
            return bad_record(self.name, int(self.indices[split][position]), str(e))

    def _exemplar_positions(self, key: tuple, shots: int, part: int | None = None) -> list[int]:
        """`shots` train positions (of one template file, for `part`), drawn by `key`."""
        train = self.indices["train"]
        pool = np.arange(len(train)) if part is None else np.flatnonzero(
            (train >= self._starts[part]) & (train < self._starts[part + 1]))
        rng = np.random.default_rng([*key, shots])
        return [int(p) for p in rng.choice(pool, size=min(shots, len(pool)), replace=False)]

    def distinct_answers(self, part: int, limit: int) -> list[str] | None:
        """The answers of template file `part` when it has at most `limit` distinct
        non-empty ones (a classification template: they are its options), else None."""
        cache = self._answers
        if part not in cache:
            answers: dict[str, None] = {}
            source = self.templates[part][1]
            for i in range(len(source)):
                try:
                    answer = to_conversation(source[i], self.format, self.fields)["messages"][-1]["content"]
                except SourceError:
                    continue
                if answer.strip():
                    answers[answer] = None
                if len(answers) > limit:
                    break
            cache[part] = sorted(answers) if len(answers) <= limit else None
        return cache[part]

    def epoch_example(self, split: str, index: int, position: int) -> dict:
        """For Grain's map_with_index over an endless, reshuffled stream of positions."""
        return self.example(split, position, epoch=index // self.size(split))


def _with_shots(messages: list[dict], exemplars: list[list[dict]]) -> list[dict]:
    """A single-turn conversation with exemplar conversations before its prompt (FLAN's
    format); multi-turn conversations are left as they are."""
    if len(messages) != 2 or any(len(e) != 2 for e in exemplars):
        return messages
    prompt = few_shot_prompt([(e[0]["content"], e[1]["content"]) for e in exemplars], messages[0]["content"])
    return [{"role": "user", "content": prompt}, messages[1]]


def file_tasks(config: ConfigDict) -> dict[str, FileTask]:
    d = config.data
    tasks = {}
    for name, raw in d.tasks.items():
        spec = task_spec(raw, FILE_TASK_FIELDS, f"config.data.tasks.{name}")
        source = open_source(spec["path"], spec["kind"], spec["split"], spec["data_files"])
        tasks[name] = FileTask(name, [(name, source)], spec["format"], spec["fields"], d.validation_share,
                               d.on_bad_record == "skip", spec["templates"], config.seed)
    for prefix, raw in d.task_dirs.items():
        spec = task_spec(raw, TASK_DIR_FIELDS, f"config.data.task_dirs.{prefix}")
        for task, templates in task_directory(spec["path"]).items():
            name = f"{prefix}/{task}"
            parts = []
            # Scraped template dumps (P3, FLAN) hold the odd empty template: it has nothing
            # to mix, and should not stop the task's other templates or the run.
            for template, path in templates.items():
                try:
                    parts.append((template, open_source(str(path))))
                except EmptySourceError:
                    log.warning("%s: empty template file, skipped (task %s)", path, name)
            if not parts:
                log.warning("%s: every template file is empty, task %s skipped", path.parent, name)
                continue
            tasks[name] = FileTask(name, parts, spec["format"], spec["fields"], d.validation_share,
                                   d.on_bad_record == "skip")
    return tasks


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
    return positions.repeat().map_with_index(functools.partial(task.epoch_example, "train"))
