"""The run's tasks, resolved once: every task the config defines (the built-in suite,
file tasks, task directories), the training mixture's rates, and what evaluation
covers (eval tasks, their clusters, metric declarations). The entry points (train, eval,
data inspect, tools) build it once and pass it to the pipeline, the evaluator and the
logs; indexing a task's files happens here and nowhere else.
"""

from __future__ import annotations

import dataclasses

from ml_collections import ConfigDict

from jit_tune.data import builtin_tasks
from jit_tune.data.mixture import task_rates
from jit_tune.data.tasks import file_tasks, task_size


@dataclasses.dataclass(frozen=True)
class Cluster:
    name: str
    tasks: tuple[str, ...]
    held_out: bool  # held out of training: none of its tasks is trained on


@dataclasses.dataclass
class TaskRegistry:
    tasks: dict[str, object]  # name -> builtin_tasks.Task or tasks.FileTask
    rates: dict[str, float]  # the training mixture: task -> share of examples (> 0)
    eval_tasks: list[str]
    clusters: dict[str, Cluster]
    metrics: dict[str, dict]  # task, group or cluster name -> {metrics, normalize} (config.eval.metrics)
    groups: dict[str, tuple[str, ...]]  # data.groups, flattened to their tasks

    def cluster_of(self, task: str) -> str | None:
        return next((c.name for c in self.clusters.values() if task in c.tasks), None)

    def trained(self, task: str) -> bool:
        return task in self.rates

    def declared_metrics(self, task: str) -> dict:
        """config.eval.metrics for a task: its own entry, else its cluster's, else a
        group's it belongs to; {} when none (the default rule applies)."""
        owners = [task, self.cluster_of(task)] + [g for g, members in self.groups.items() if task in members]
        return next((self.metrics[o] for o in owners if o in self.metrics), {})


def _group_tasks(groups: dict, name: str) -> tuple[str, ...]:
    if name not in groups:
        return (name,)
    return tuple(t for member in groups[name]["tasks"] for t in _group_tasks(groups, member))


def build_registry(config: ConfigDict) -> TaskRegistry:
    """Every task of the config, opened and indexed once."""
    tasks = {**builtin_tasks.TASKS_BY_NAME, **file_tasks(config)}
    groups = {name: {"cap": 0, "temperature": 1.0, **group.to_dict()} for name, group in config.data.groups.items()}
    sizes = {name: task_size(task, "train") for name, task in tasks.items()}
    rates = task_rates(dict(config.data.mixture), groups, sizes)
    clusters = {}
    for name, spec in config.eval.clusters.items():
        values = {"held_out": False, **spec.to_dict()}
        clusters[name] = Cluster(name, tuple(values["tasks"]), bool(values["held_out"]))
    flat_groups = {name: _group_tasks(groups, name) for name in groups}
    if config.eval.tasks:
        names = [t for name in config.eval.tasks
                 for t in (clusters[name].tasks if name in clusters else flat_groups.get(name, (name,)))]
    else:
        names = list(rates) + [t for c in clusters.values() for t in c.tasks]
    return TaskRegistry(tasks, rates, list(dict.fromkeys(names)), clusters,
                        {name: spec.to_dict() for name, spec in config.eval.metrics.items()}, flat_groups)
