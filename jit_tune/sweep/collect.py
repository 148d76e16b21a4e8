"""One table of a sweep: every run's mixture weights, seed and steps, every eval metric per
task, cluster and overall, and the target, read from the runs' workdirs alone (no
tracker service needed). Failed and unfinished runs are rows too, with their status.

Columns: id, kind, label, point, seed, status, steps, w/<unit> (weights), then from
eval/results.json:
  task/<task>/<group>/<metric>          a task's mean over its templates (group: held_in, held_out)
  task/<task>/<group>/median_<metric>   its median over templates
  cluster/<cluster>/<group>/<metric>    the mean over the cluster's tasks
  overall/<all|trained|unseen>/<group>/<metric>
and `target`, the sweep's weighted sum of target columns. Written as results.csv and
results.parquet in the sweep directory.
"""

from __future__ import annotations

import difflib
import io
from pathlib import Path

import pandas as pd

from jit_tune.config import ConfigError
from jit_tune.files import atomic_write_text, read_json
from jit_tune.sweep.plan import load_manifest, status


def flatten_results(results: dict) -> dict[str, float]:
    values = {}
    for kind, plural in (("task", "tasks"), ("cluster", "clusters"), ("overall", "overall")):
        for name, entry in results.get(plural, {}).items():
            for group in ("held_in", "held_out"):
                aggregate = entry.get(group, {})
                for metric, value in aggregate.get("mean", {}).items():
                    values[f"{kind}/{name}/{group}/{metric}"] = value
                for metric, value in aggregate.get("median", {}).items():
                    values[f"{kind}/{name}/{group}/median_{metric}"] = value
    return values


def collect(directory: Path, write: bool = True) -> pd.DataFrame:
    manifest = load_manifest(directory)
    target = manifest["config"]["target"]["metrics"]
    rows = []
    for run in manifest["runs"]:
        row = {"id": run["id"], "kind": run["kind"], "label": run.get("label", ""), "point": run.get("point", -1),
               "seed": run["seed"], "status": status(run), "steps": None}
        row.update({f"w/{unit}": run["mixture"].get(unit, 0.0) for unit in manifest["units"]})
        workdir = Path(run["workdir"])
        if (workdir / "config.json").is_file():
            row["steps"] = read_json(workdir / "config.json", keys=("train",))["train"]["steps"]
        if row["status"] == "finished":
            row.update(flatten_results(read_json(workdir / "eval" / "results.json", keys=("results",))["results"]))
        rows.append(row)
    table = pd.DataFrame(rows)
    finished = table[table["status"] == "finished"]
    missing = [column for column in target if column not in table.columns]
    if missing and len(finished):
        hints = {c: difflib.get_close_matches(c, list(table.columns), n=1) for c in missing}
        raise ConfigError("sweep.target.metrics: no such column in the collected results: " + ", ".join(
            f"{c!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for c, h in hints.items()))
    table["target"] = sum(weight * table[column] for column, weight in target.items()) if not missing else float("nan")
    if write:
        atomic_write_text(Path(directory) / "results.csv", table.to_csv(index=False))
        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        path = Path(directory) / "results.parquet"
        partial = path.with_name(f".{path.name}.partial")
        partial.write_bytes(buffer.getvalue())
        partial.replace(path)
    return table
