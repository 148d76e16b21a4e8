"""What evaluation asks of each task: its validation examples (on the task's trained and
held-out templates, zero- or few-shot), their answer options, and the metrics that fit.

Metrics, by default (config.eval.metrics overrides them by task, group or cluster name;
the first metric listed is the task's score):
- a task whose examples have answer options is scored by rank classification (acc,
  acc_norm, acc_token_mean; see eval/metrics.py). Options are a templated task's
  `options` or `options_field`, a built-in task's possible answers, or, for data without
  options, the answers of a template file when they take at most `eval.max_options`
  (10) distinct values (a classification template);
- otherwise answers of at most 5 words on average are scored by exact match (after
  SQuAD's normalization: case, punctuation, articles, whitespace) and token F1; longer
  answers by ROUGE-L and token F1;
- the built-in tasks by exact match with only whitespace normalized (case and
  punctuation are what `uppercase` or `commas` ask for), plus rank classification where
  the answers are few (count, count_unique, has_duplicates).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from ml_collections import ConfigDict

from jit_tune.data import builtin_tasks
from jit_tune.data.registry import TaskRegistry
from jit_tune.data.tasks import is_bad
from jit_tune.data.templates import few_shot_prompt
from jit_tune.eval.metrics import GENERATION_METRICS, RANK_METRICS, SQUAD

LONG_ANSWER_WORDS = 5  # mean answer length above which ROUGE-L scores a task
GROUPS = ("held_in", "held_out")  # the task's trained templates, and its held-out ones


@dataclasses.dataclass
class EvalExample:
    task: str
    template: str
    held_out: bool  # on a held-out template
    messages: list[dict]  # the conversation; the last turn is the reference answer
    options: tuple[str, ...] | None = None

    @property
    def target(self) -> str:
        return self.messages[-1]["content"]

    @property
    def group(self) -> str:
        return GROUPS[self.held_out]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """How a task is scored."""
    metrics: tuple[str, ...]
    normalize: tuple[str, ...]

    @property
    def score(self) -> str:
        return self.metrics[0]

    @property
    def ranked(self) -> bool:
        return any(m in RANK_METRICS for m in self.metrics)

    @property
    def generated(self) -> bool:
        return any(m in GENERATION_METRICS for m in self.metrics)


def _builtin_examples(task: builtin_tasks.Task, config: ConfigDict, held_out: bool) -> list[EvalExample]:
    seed, shots = config.data.builtin_seed, config.eval.shots
    examples = []
    for i in range(config.eval.examples_per_task):
        example = builtin_tasks.make_example(task, "validation", i, seed, held_out)
        messages = example["messages"]
        if shots:
            rng = np.random.default_rng([seed, i, int(held_out), shots])
            exemplars = [builtin_tasks.make_example(task, "train", int(j), seed, template_id=example["template_id"])
                         ["messages"] for j in rng.integers(0, 2**31, size=shots)]
            prompt = few_shot_prompt([(e[0]["content"], e[1]["content"]) for e in exemplars], messages[0]["content"])
            messages = [{"role": "user", "content": prompt}, messages[1]]
        examples.append(EvalExample(task.name, str(example["template_id"]), held_out, messages,
                                    task.options or None))
    return examples


def _file_examples(task, config: ConfigDict, held_out: bool) -> list[EvalExample]:
    if held_out and not task.has_held_out_templates:
        return []
    examples = []
    for i in range(min(task.size("validation"), config.eval.examples_per_task)):
        example = task.example("validation", i, held_out=held_out, shots=config.eval.shots)
        if is_bad(example):
            continue
        options = example.get("options")
        if options is None and task.template_set is None:
            options = task.distinct_answers(example["template_id"], config.eval.max_options)
        examples.append(EvalExample(task.name, example["template"], held_out, example["messages"],
                                    tuple(options) if options else None))
    return examples


def task_examples(config: ConfigDict, registry: TaskRegistry, name: str) -> list[EvalExample]:
    """The fixed validation examples of one task, on its trained templates and then on
    its held-out ones (built-in tasks and templated tasks that declare some)."""
    task = registry.tasks[name]
    make = _builtin_examples if isinstance(task, builtin_tasks.Task) else _file_examples
    return [example for held_out in (False, True) for example in make(task, config, held_out)]


def task_spec(registry: TaskRegistry, name: str, examples: list[EvalExample]) -> TaskSpec:
    """The metrics of a task: declared in config.eval.metrics, else the default rule."""
    declared = registry.declared_metrics(name)
    has_options = any(e.options for e in examples)
    if isinstance(registry.tasks[name], builtin_tasks.Task):
        metrics, normalize = ("exact_match",) + (RANK_METRICS if has_options else ()), ("whitespace",)
    elif has_options:
        metrics, normalize = RANK_METRICS, SQUAD
    else:
        words = np.mean([len(e.target.split()) for e in examples]) if examples else 0
        metrics = ("rouge_l", "token_f1") if words > LONG_ANSWER_WORDS else ("exact_match", "token_f1")
        normalize = SQUAD
    return TaskSpec(tuple(declared.get("metrics", metrics)), tuple(declared.get("normalize", normalize)))
