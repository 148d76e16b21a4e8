"""Evaluation results: aggregated per template, per task, per cluster and overall, each
with its n; printed as a table, saved as eval/results.json, logged, and the
per-example predictions saved so a person can read what the model did.

  tasks.<task>.templates.<template>   {held_out, n, loss, <metric>...}: means over its examples
  tasks.<task>.held_in | held_out     {n, templates, mean: {...}, median: {...}}: over the task's
                                      trained (held_in) or held-out templates, each template
                                      weighing the same; T0 reports the median, FLAN the mean
  clusters.<cluster>.held_in | ...    {tasks, n, mean: {...}}: the mean over its tasks
                                      (and held_out_of_training, members)
  overall.<all|trained|unseen>.<group> the same over all eval tasks, the trained ones, and the
                                      ones never trained on (held-out tasks and clusters)

Every aggregate carries `score`, each task's first metric (accuracy for a classification
task, exact match or ROUGE-L for a generation task), so tasks with different metrics
average into one number, and `loss`, the mean token loss of the reference answers
(token-weighted within a task).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from jit_tune.data.registry import TaskRegistry
from jit_tune.eval.examples import GROUPS, TaskSpec
from jit_tune.files import atomic_write_json, atomic_write_text


def _mean(values) -> float:
    values = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(values)) if values else float("nan")


def _median(values) -> float:
    values = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.median(values)) if values else float("nan")


def _template_values(records: list[dict], spec: TaskSpec) -> dict:
    tokens = sum(r["loss_tokens"] for r in records)
    values = {"loss": sum(r["loss_sum"] for r in records) / tokens if tokens else float("nan")}
    values.update({m: _mean(r.get(m) for r in records) for m in spec.metrics})
    values["score"] = values[spec.score]
    return values


def _task_results(records: list[dict], spec: TaskSpec) -> dict:
    templates = defaultdict(list)
    for record in records:
        templates[record["template"]].append(record)
    result = {"metrics": list(spec.metrics), "normalize": list(spec.normalize),
              "templates": {name: {"held_out": rs[0]["held_out"], "n": len(rs), **_template_values(rs, spec)}
                            for name, rs in templates.items()}}
    for group in GROUPS:
        chosen = [rs for rs in templates.values() if GROUPS[rs[0]["held_out"]] == group]
        if not chosen:
            continue
        per_template = [_template_values(rs, spec) for rs in chosen]
        keys = per_template[0]
        everything = [r for rs in chosen for r in rs]
        result[group] = {
            "n": len(everything), "templates": len(chosen),
            "mean": {**{k: _mean(t[k] for t in per_template) for k in keys},
                     "loss": _template_values(everything, spec)["loss"]},
            "median": {k: _median(t[k] for t in per_template) for k in keys},
        }
    return result


def _over_tasks(task_results: dict[str, dict]) -> dict:
    """The mean over tasks of each task's mean, per template group."""
    out = {}
    for group in GROUPS:
        present = {name: r[group] for name, r in task_results.items() if group in r}
        if not present:
            continue
        keys = sorted({k for r in present.values() for k in r["mean"]})
        out[group] = {"tasks": len(present), "n": sum(r["n"] for r in present.values()),
                      "mean": {k: _mean(r["mean"].get(k) for r in present.values()) for k in keys}}
    return out


def aggregate(records: list[dict], specs: dict[str, TaskSpec], registry: TaskRegistry) -> dict:
    by_task = defaultdict(list)
    for record in records:
        by_task[record["task"]].append(record)
    tasks = {}
    for name in registry.eval_tasks:
        tasks[name] = {"cluster": registry.cluster_of(name), "trained": registry.trained(name),
                       **_task_results(by_task.get(name, []), specs[name])}
    clusters = {name: {"held_out_of_training": c.held_out, "members": list(c.tasks),
                       **_over_tasks({t: tasks[t] for t in c.tasks if t in tasks})}
                for name, c in registry.clusters.items()}
    sets = {"all": tasks, "trained": {k: v for k, v in tasks.items() if v["trained"]},
            "unseen": {k: v for k, v in tasks.items() if not v["trained"]}}
    overall = {name: _over_tasks(chosen) for name, chosen in sets.items() if chosen}
    return {"tasks": tasks, "clusters": clusters, "overall": overall}


def log_values(results: dict) -> dict[str, float]:
    """Flat `eval/...` scalars for metrics.jsonl and TensorBoard: every task's,
    cluster's and overall mean, by template group."""
    values = {}
    for kind, entries in (("task", results["tasks"]), ("cluster", results["clusters"]),
                          ("overall", results["overall"])):
        for name, entry in entries.items():
            for group in GROUPS:
                for metric, value in entry.get(group, {}).get("mean", {}).items():
                    values[f"eval/{kind}/{name}/{group}/{metric}"] = value
    return values


SHORT = {"exact_match": "EM", "token_f1": "F1", "rouge_l": "ROUGE-L", "acc": "acc", "acc_norm": "acc_norm",
         "acc_token_mean": "acc_tok", "score": "score"}


def _cell(value: float | None, metric: str) -> str:
    if value is None or np.isnan(value):
        return "-"
    return f"{value:.3f}" if metric == "loss" else f"{100 * value:.1f}%"


def print_table(results: dict, step: int, console: Console | None = None) -> None:
    """Each task's score (its first metric) on its trained templates (mean and median
    over templates) and held-out templates, its loss and n; then clusters and overall
    means. Every other metric is in eval/results.json."""
    has_clusters = bool(results["clusters"])
    table = Table(title=f"Evaluation at step {step}")
    columns = ["task"] + (["cluster"] if has_clusters else []) + ["metric", "held-in", "median", "held-out",
                                                                  "loss", "n"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("task", "cluster", "metric") else "right",
                         no_wrap=column == "task")

    def row(name: str, cluster: str, metric: str, entry: dict, end: bool = False) -> None:
        held_in, held_out = entry.get("held_in", {}), entry.get("held_out", {})
        n = held_in.get("n", 0) + held_out.get("n", 0)
        cells = [_cell(held_in.get("mean", {}).get("score"), metric),
                 _cell(held_in.get("median", {}).get("score"), metric),
                 _cell(held_out.get("mean", {}).get("score"), metric),
                 _cell(held_in.get("mean", {}).get("loss"), "loss"), str(n) if n else "no examples"]
        table.add_row(name, *([cluster] if has_clusters else []), SHORT.get(metric, metric), *cells, end_section=end)

    tasks = results["tasks"]
    for i, (name, entry) in enumerate(tasks.items()):
        row(name if entry["trained"] else f"{name} (unseen)", entry["cluster"] or "",
            entry["metrics"][0] if entry["metrics"] else "-", entry, end=i == len(tasks) - 1)
    clusters = results["clusters"]
    for i, (name, entry) in enumerate(clusters.items()):
        row(f"cluster {name}" + (" (held out)" if entry["held_out_of_training"] else ""), "", "score", entry,
            end=i == len(clusters) - 1)
    overall = results["overall"]
    for name, entry in overall.items():
        if name != "all" or len(overall) == 3:  # "all" is worth a row when trained and unseen tasks mix
            row(f"mean: {name}", "", "score", entry)
    console = console or Console()
    if not console.is_terminal:  # a log file: wide enough that names are not cut
        console = Console(width=max(console.width, 120), file=console.file)
    console.print(table)
    cut = results.get("prompts_cut", {}).get("examples")
    if cut:
        console.print(f"{cut} of {results['prompts_cut']['of']} examples did not fit a row (data.seq_len) with "
                      "their answer: their prompts lost their first tokens (eval/predictions: prompt_tokens_cut). "
                      "Few-shot exemplars (eval.shots) lengthen prompts; raise data.seq_len or lower eval.shots.")


def save_results(results: dict, step: int, workdir: Path, predictions: bool = True) -> None:
    """eval/results_step<N>.json and eval/results.json (the latest evaluation), and with
    `predictions`, eval/predictions/step_<N>/<task>.jsonl: one line per example."""
    summary = {"step": step, "results": {k: v for k, v in results.items() if k != "records"}}
    for name in (f"results_step{step}.json", "results.json"):
        atomic_write_json(Path(workdir) / "eval" / name, summary)
    if predictions:
        by_task = defaultdict(list)
        for record in results["records"]:
            by_task[record["task"]].append(record)
        for task, records in by_task.items():
            path = Path(workdir) / "eval" / "predictions" / f"step_{step}" / f"{task.replace('/', '__')}.jsonl"
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))
